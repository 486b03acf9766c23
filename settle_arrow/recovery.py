"""Rebuild EngineState from a TARGET's committed tables: the state is never the only copy.

Data model: storage tables -> EngineState (see state.py): seen keys from trades and
quarantine, accepted N trades and cancellations from trades, holdings from the holdings
view, reported exceptions from exceptions.

Invariant: the rebuilt state equals the state the writer held right after its last
committed window, so a restart after SIGKILL continues exactly where the database stands.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow as pa

from settle_arrow import schema
from settle_arrow.io.parse import coerce
from settle_arrow.refdata import RefData
from settle_arrow.state import DAY0, DAY_BITS, ODD_KEY_SCHEMA, EngineState, trade_keys
from settle_arrow.storage.base import Storage


def _frame(t: pa.Table) -> pl.DataFrame:
    out = pl.from_arrow(t)
    assert isinstance(out, pl.DataFrame)
    return out


def _encode_trades(ref: RefData, t: pl.DataFrame) -> dict[str, np.ndarray]:
    sec = t.join(ref.securities.select("market", "security_id", "sec_idx"), on=["market", "security_id"],
                 how="left", maintain_order="left")["sec_idx"]
    return {
        "sec_idx": sec.fill_null(-1).cast(pl.Int32).to_numpy(),
        "price_milli": (t["price"] * 1000).cast(pl.Int64).to_numpy(),
        "quantity": t["quantity"].to_numpy(),
        "buy_acct_idx": ref.account_index.lookup(t["buy_account"]),
        "sell_acct_idx": ref.account_index.lookup(t["sell_account"]),
        "buy_unit_idx": ref.unit_index.lookup(t["buy_unit"]),
        "sell_unit_idx": ref.unit_index.lookup(t["sell_unit"]),
    }


def recover(storage: Storage, ref: RefData) -> EngineState:
    state = EngineState(n_sec=max(1, ref.securities.height))

    trades = _frame(storage.query(
        "SELECT market, trade_date, trade_id, record_type, ref_trade_id, security_id, price, quantity, "
        "buy_account, sell_account, buy_unit, sell_unit FROM trades"
    ))
    keys, ok = trade_keys(trades["market"], trades["trade_date"], trades["trade_id"])
    assert ok.all(), "accepted trades always have packable keys"
    n = (trades["record_type"] == "N").to_numpy()
    state.accepted.insert(keys[n], _encode_trades(ref, trades.filter(pl.Series(n))))
    refs, ok = trade_keys(trades["market"], trades["trade_date"], trades["ref_trade_id"])
    state.cancelled.insert(refs[~n])

    # Quarantined rows count as seen when their key fields parse (SPEC §3 DUPLICATE_TRADE).
    q = _frame(storage.query("SELECT market, trade_date, trade_id FROM quarantine"))
    typed = coerce(q, pa.schema([schema.INPUT_TRADE.field(c) for c in ODD_KEY_SCHEMA]))
    parsed = typed.filter(
        pl.all_horizontal(pl.col(list(ODD_KEY_SCHEMA)).is_not_null())
        & ~pl.any_horizontal(pl.col([f"{c}__bad" for c in ODD_KEY_SCHEMA]))
    ).select(list(ODD_KEY_SCHEMA))
    qkeys, qok = trade_keys(parsed["market"], parsed["trade_date"], parsed["trade_id"])
    all_keys = np.unique(np.concatenate([keys, qkeys[qok]]))
    state.seen.insert(all_keys)
    state.odd_seen = parsed.filter(pl.Series(~qok)).unique(maintain_order=True)

    h = _frame(storage.query("SELECT account_id, market, security_id, quantity FROM holdings"))
    acct = ref.account_index.lookup(h["account_id"])
    sec = h.join(ref.securities.select("market", "security_id", "sec_idx"), on=["market", "security_id"],
                 how="left", maintain_order="left")["sec_idx"].fill_null(-1).to_numpy()
    known = (acct >= 0) & (sec >= 0)
    assert known.all(), "holdings name an account or security missing from reference data"
    state.holdings.insert(state.holding_keys(acct, sec), {"quantity": h["quantity"].to_numpy()})

    e = _frame(storage.query(
        "SELECT account_id, market, security_id, trade_date FROM exceptions WHERE code = 'NEGATIVE_HOLDING'"
    ))
    acct = ref.account_index.lookup(e["account_id"])
    sec = e.join(ref.securities.select("market", "security_id", "sec_idx"), on=["market", "security_id"],
                 how="left", maintain_order="left")["sec_idx"].fill_null(0).to_numpy()
    day = e["trade_date"].cast(pl.Int32).to_numpy().astype(np.int64) - DAY0
    state.reported.insert(np.unique((state.holding_keys(acct, sec) << DAY_BITS) | day))
    return state
