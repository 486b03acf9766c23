"""Rebuild EngineState from a TARGET's committed tables: the state is never the only copy.

Data model: storage tables -> EngineState (see state.py), in three threads over three
handles on the TARGET (the holdings' base, their legs, the rest): seen keys, accepted N trades and
cancellations from the frozen runs the TARGET kept (Storage.state_runs, mapped, not
read) plus trade_facts of the windows after them and quarantine (integer ids mapped back
to reference rows through dims.DimIds), holdings from holdings_base plus holdings_legs
(integer ids only), reported exceptions from exceptions. So the restart reads the history
since the sets' last frozen runs, not all of it.

Invariant: the rebuilt state equals the state the writer held right after its last
committed window, so a restart after SIGKILL continues exactly where the database stands.
A kept run may hold keys of windows after its covered_window (a run frozen mid-window, or
during an earlier recovery): replayed keys already in their set are skipped. Kept runs hold
reference row indices, valid while dimension ids equal them (dims.in_reference_order);
otherwise, or when a file is missing or damaged, the set is rebuilt from the history and
its catalogue rows are dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait

import numpy as np
import polars as pl
import pyarrow as pa

from settle_arrow import schema
from settle_arrow.dims import DimIds, in_reference_order
from settle_arrow.holdings import HoldingsTable
from settle_arrow.io.parse import coerce
from settle_arrow.refdata import RefData, RefDataError
from settle_arrow.state import (
    DAY0,
    DAY_BITS,
    KEPT_SETS,
    ODD_KEY_SCHEMA,
    EngineState,
    SortedRuns,
    holding_keys,
    market_codes,
    pack_keys,
    trade_keys,
    unique_sorted,
)
from settle_arrow.storage.base import Storage

RECOVERY_BATCH_ROWS = 1_000_000  # trade rows rebuilt at a time (bounds recovery's memory)


def _frame(t: pa.Table) -> pl.DataFrame:
    out = pl.from_arrow(t)
    assert isinstance(out, pl.DataFrame)
    return out


def _to_ref(inverse: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """database ids -> reference row indices (-1 for keys the reference data no longer has),
    as a function: recovery maps batch after batch, and checks the mapping's shape once."""
    n = len(inverse)
    if not n:  # the reference data defines none: every stored id is unknown
        return lambda ids: np.full(len(ids), -1, dtype=np.int64)
    if inverse[-1] == n - 1 and (inverse == np.arange(n)).all():
        # Ids in reference order (the usual case): the id is the index, no gather of
        # millions, and where every id is known the ids themselves (ids are >= 0): no
        # fresh array (see _holdings).
        return lambda ids: ids if not len(ids) or int(ids.max()) < n else np.where(ids < n, ids, -1)

    def gather(ids: np.ndarray) -> np.ndarray:
        inside = ids < n
        return np.where(inside, inverse[np.where(inside, ids, 0)], -1)

    return gather


def _require_known(storage: Storage, unknown: pl.DataFrame) -> None:
    """Refuse to resume when the TARGET holds a position in an account or security that the
    reference data no longer defines: positions never silently vanish."""
    if not unknown.height:
        return
    row = unknown.row(0, named=True)
    acct = storage.query("SELECT account_id FROM dim_account WHERE id = ?", (row["acct_id"],))["account_id"][0]
    sec = storage.query("SELECT market, security_id FROM dim_security WHERE id = ?", (row["sec_id"],)).to_pylist()[0]
    raise RefDataError(
        f"{storage.url} holds {row['quantity']} of {sec['market']}/{sec['security_id']} in account {acct}, "
        "but the reference data no longer defines that account or security"
    )


def recover(storage: Storage, ref: RefData, dims: DimIds) -> EngineState:
    to_ref = tuple(_to_ref(DimIds.inverse(d)) for d in (dims.account, dims.unit, dims.security))
    # Holdings and the trade history are independent parts of the state: the holdings are
    # rebuilt through a second connection in another thread meanwhile (DuckDB, Polars and
    # numpy release the GIL): restart 4.6 -> 3.8 s with 10 M holdings and 2.5 M trades, measured.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="settle-recover") as pool:
        reader = storage.reader()
        try:
            holdings = pool.submit(_holdings, reader, ref.n_sec, to_ref[0], to_ref[2])
            try:
                state = _history(storage, ref.n_sec, in_reference_order(dims), *to_ref)
            finally:
                wait([holdings])  # the reader closes only once the other thread is done with it
            state.holdings = holdings.result()
        finally:
            reader.close()
    e = _frame(storage.query(
        "SELECT account_id, market, security_id, trade_date FROM exceptions WHERE code = 'NEGATIVE_HOLDING'"
    ))
    acct = ref.account_index.lookup(e["account_id"])
    sec = ref.sec_idx(e).fill_null(0).to_numpy()
    day = e["trade_date"].cast(pl.Int32).to_numpy().astype(np.int64) - DAY0
    state.reported.insert(unique_sorted((state.holding_keys(acct, sec) << DAY_BITS) | day))
    return state


def _adopt(storage: Storage, state: EngineState) -> dict[str, int]:
    """Map the TARGET's kept runs into `state`'s sets; per set, the window its runs cover
    (-1: none, the whole history replays). A set whose runs do not map is rebuilt (see
    module doc)."""
    covered = dict.fromkeys(KEPT_SETS, -1)
    if state.run_dir is None:  # kept runs would name other reference rows now
        storage.forget_state_runs()
        return covered
    kept = storage.state_runs()
    for name in KEPT_SETS:
        mine = [r for r in kept if r.set_name == name]
        try:
            for run in mine:
                getattr(state, name).adopt(dict(run.files))
        except (OSError, ValueError):
            state.reset(name)
            storage.forget_state_runs(name)
            continue
        covered[name] = mine[-1].covered_window if mine else -1
    return covered


def _fresh(runs: SortedRuns, adopted: bool, keys: np.ndarray) -> np.ndarray:
    """Which `keys` are not in `runs` yet: only kept runs can hold replayed keys."""
    return ~runs.contains(keys) if adopted else np.ones(len(keys), dtype=bool)


def _history(storage: Storage, n_sec: int, ids_in_order: bool, account_of: Callable, unit_of: Callable,
             sec_of: Callable) -> EngineState:
    """EngineState's seen, accepted and cancelled keys from the kept runs, trade_facts and
    quarantine."""
    state = EngineState(n_sec=n_sec, run_dir=storage.state_dir if ids_in_order else None)
    covered = _adopt(storage, state)
    adopted = {name: getattr(state, name).n_frozen > 0 for name in KEPT_SETS}
    markets = _frame(storage.query("SELECT id, market FROM dim_security ORDER BY id"))
    code_of = np.full(int(markets["id"].max()) + 1 if markets.height else 0, -1, dtype=np.int64)
    code_of[markets["id"].to_numpy()] = market_codes(markets["market"])

    def batches(columns: str, where: str) -> Iterator[tuple[pl.DataFrame, np.ndarray]]:
        """trade_facts rows in batches, with the market code of each: the history can be far
        larger than memory, while the state it leaves (runs freeze and spill) is not."""
        sql = f"SELECT {columns}, sec_id, window_id FROM trade_facts WHERE {where}"
        for batch in storage.query_batches(sql, RECOVERY_BATCH_ROWS):
            facts = _frame(pa.Table.from_batches([batch]))
            yield facts, code_of[facts["sec_id"].to_numpy()] if facts.height else np.empty(0, np.int64)

    def add(name: str, keys: np.ndarray, take: np.ndarray, payload: dict[str, np.ndarray] | None = None) -> None:
        """Insert the `take` rows' keys into set `name`; only its kept runs may hold them
        already (keys are unique across the history)."""
        runs = getattr(state, name)
        take = take.copy()
        take[take] = _fresh(runs, adopted[name], keys[take])
        runs.insert(keys[take], {k: v[take] for k, v in payload.items()} if payload else None)

    # Each set replays only the windows after its kept runs, and reads only the columns it
    # needs: cancellations are the X rows alone; seen keys of windows no other set needs
    # are three columns, not twelve (measured: README, performance, kept state runs).
    w_canc, w_acc, w_seen = covered["cancelled"], covered["accepted"], covered["seen"]
    for facts, code in batches("trade_date, ref_trade_id", f"sign = -1 AND window_id > {int(w_canc)}"):
        refs, _ = pack_keys(code, facts["trade_date"], facts["ref_trade_id"])
        add("cancelled", refs, np.ones(facts.height, dtype=bool))
    if w_seen < w_acc:
        for facts, code in batches("trade_date, trade_id", f"window_id > {int(w_seen)} AND window_id <= {int(w_acc)}"):
            add("seen", pack_keys(code, facts["trade_date"], facts["trade_id"])[0], np.ones(facts.height, dtype=bool))
    columns = ("trade_date, trade_id, sign, price, quantity, buy_account_id, sell_account_id, buy_unit_id, "
               "sell_unit_id")
    for facts, code in batches(columns, f"window_id > {int(w_acc)}"):
        keys, ok = pack_keys(code, facts["trade_date"], facts["trade_id"])
        assert ok.all(), "accepted trades always have packable keys"
        window = facts["window_id"].to_numpy()
        n = (facts["sign"] == 1).to_numpy()
        add("accepted", keys, n, {
            "sec_idx": sec_of(facts["sec_id"].to_numpy()),
            "price_milli": (facts["price"] * 1000).cast(pl.Int64).to_numpy(),
            "quantity": facts["quantity"].to_numpy(),
            **{f"{side}_acct_idx": account_of(facts[f"{side}_account_id"].to_numpy()) for side in ("buy", "sell")},
            **{f"{side}_unit_idx": unit_of(facts[f"{side}_unit_id"].to_numpy()) for side in ("buy", "sell")},
        })
        add("seen", keys, window > w_seen)

    # Quarantined rows count as seen when their key fields parse (SPEC §3 DUPLICATE_TRADE);
    # their keys may repeat each other and accepted ones.
    odd: list[pl.DataFrame] = []
    for batch in storage.query_batches("SELECT market, trade_date, trade_id FROM quarantine", RECOVERY_BATCH_ROWS):
        typed = coerce(_frame(pa.Table.from_batches([batch])), pa.schema([schema.INPUT_TRADE.field(c) for c in ODD_KEY_SCHEMA]))
        parsed = typed.filter(
            pl.all_horizontal(pl.col(list(ODD_KEY_SCHEMA)).is_not_null())
            & ~pl.any_horizontal(pl.col([f"{c}__bad" for c in ODD_KEY_SCHEMA]))
        ).select(list(ODD_KEY_SCHEMA))
        qkeys, qok = trade_keys(parsed["market"], parsed["trade_date"], parsed["trade_id"])
        fresh = unique_sorted(qkeys[qok])
        state.seen.insert(fresh[~state.seen.contains(fresh)])
        odd.append(parsed.filter(pl.Series(~qok)))
    state.odd_seen = pl.concat(odd).unique(maintain_order=True) if odd else state.odd_seen
    return state


def _holdings(storage: Storage, n_sec: int, account_of: Callable, sec_of: Callable) -> HoldingsTable:
    """EngineState.holdings: the base (the snapshot, or the opening before the first;
    unique keys) put in, then the legs since it (summed per key by the view) added; zero
    positions may stay (a missing key reads as zero), and those of accounts or securities
    the reference data no longer defines are left out (any other such position is an error)."""
    def positions(h: pl.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        acct = account_of(h["acct_id"].to_numpy())
        sec = sec_of(h["sec_id"].to_numpy())
        quantity = h["quantity"].to_numpy()
        unknown = (acct < 0) | (sec < 0)
        if unknown.any():
            _require_known(storage, h.filter(pl.Series(unknown) & (h["quantity"] != 0)))
            known = ~unknown
            acct, sec, quantity = acct[known], sec[known], quantity[known]
        # Where all are known (the usual case) no masks, gathers or filter, and with the ids
        # in reference order (_to_ref) no fresh arrays but the keys: a restart with 10 M
        # holdings and 2.5 M trades up to its first window 3.67 -> 3.44 s, CPU 5.74 -> 5.33 s
        # (five alternating pairs).
        return holding_keys(acct, sec, n_sec), quantity

    # No ORDER BY: a hash table takes keys in any order. The legs are summed by DuckDB
    # through a handle of their own while the base goes into the table (restart with 10 M
    # holdings and 2.5 M trades since: the holdings' rebuild 3.0-3.2 s, ~1 s of it that
    # GROUP BY, measured).
    columns = "SELECT acct_id, sec_id, quantity FROM"
    holdings = HoldingsTable()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="settle-legs") as pool:
        legs_reader = storage.reader()
        try:
            legs = pool.submit(lambda: _frame(legs_reader.query(f"{columns} holdings_legs")))
            try:
                holdings.insert(*positions(_frame(storage.query(f"{columns} holdings_base"))))
            finally:
                wait([legs])  # the handle closes only once the other thread is done with it
            holdings.add(*positions(legs.result()))
        finally:
            legs_reader.close()
    return holdings
