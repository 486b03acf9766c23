"""Registration (SPEC §5): holdings move with every accepted trade; negative positions flagged.

Data model:
  prepare  frames["validation_prepared"] rows that passed the stateless checks ->
           frames["registration_prepared"]: their legs (seq, side 0 buy / 1 sell, holding
           key), sorted by key, stably
  in   frames["cleared"] (sign, quantity, acct ids, sec_idx, trade_date, participants)
  out  frames["holdings_delta"]: (acct_idx, sec_idx) -> Σ signed quantity of this window
       (for self-checks; storage derives holdings from the trades themselves)
       frames["exceptions"]: NEGATIVE_HOLDING, once per (account, security, trade_date)
       effects: EngineState.holdings += deltas; reported exception keys

Invariants: the position of each leg is replayed in input order (buy leg before sell leg
within a trade), so exceptions do not depend on windowing; per window Σ delta per security
is 0 (holdings conserved).
"""

from __future__ import annotations

import dataclasses
import datetime

import numpy as np
import polars as pl

from settle_arrow.refdata import RefData
from settle_arrow.stages.base import StageContext, Window
from settle_arrow.stages.validate import passed_stateless
from settle_arrow.state import DAY0, DAY_BITS, holding_keys, stable_sort

_EPOCH = datetime.date(1970, 1, 1)


def _leg_keys(n_sec: int, t: pl.DataFrame) -> np.ndarray:
    """Holding key of each leg, interleaved (row 0 buy, row 0 sell, row 1 buy, ...)."""
    acct = np.empty(2 * t.height, dtype=np.int64)
    acct[0::2], acct[1::2] = t["buy_acct_idx"].to_numpy(), t["sell_acct_idx"].to_numpy()
    return holding_keys(acct, np.repeat(t["sec_idx"].to_numpy(), 2), n_sec)


@dataclasses.dataclass(frozen=True)
class Register:
    name: str = "registration"

    def prepare(self, window: Window, ref: RefData) -> Window:
        """The legs of every row that passed the stateless checks (a superset of the rows
        `process` will find accepted), sorted by holding key, stably: the sort depends on
        the rows alone, so it runs one window ahead in the reader thread."""
        if "validation_prepared" not in window.frames:
            return window
        t = passed_stateless(window.frames["validation_prepared"], ("seq", "buy_acct_idx", "sell_acct_idx", "sec_idx"))
        order, keys = stable_sort(_leg_keys(ref.n_sec, t))  # stable: input order kept within a key
        return window.add(registration_prepared=pl.DataFrame(
            {"seq": t["seq"].to_numpy()[order // 2], "side": (order % 2).astype(np.int8), "key": keys}
        ))

    def process(self, window: Window, ctx: StageContext) -> Window:
        from settle_arrow.kernels import key_runs, running_positions  # numba loads in the background

        state = ctx.state
        c = window.frames["cleared"]
        n = c.height
        qty = c["quantity"].to_numpy() * c["sign"].cast(pl.Int64).to_numpy()
        # Legs interleaved as (trade 0 buy, trade 0 sell, trade 1 buy, ...): input order.
        delta = np.empty(2 * n, dtype=np.int64)
        delta[0::2], delta[1::2] = qty, -qty
        if "registration_prepared" in window.frames:  # prepare is an optimisation, never required
            p = window.frames["registration_prepared"]
            assert state.n_sec == ctx.refdata.n_sec, "prepared keys use another key base"
            rank = np.full(window.frames["input"].height, -1, dtype=np.int64)
            rank[c["seq"].to_numpy()] = np.arange(n)
            leg_rank = rank[p["seq"].to_numpy()]
            kept = leg_rank >= 0
            order = 2 * leg_rank[kept] + p["side"].to_numpy()[kept]
            k_sorted = p["key"].to_numpy()[kept]
            assert len(order) == 2 * n, "an accepted row was not prepared"
        else:
            order, k_sorted = stable_sort(_leg_keys(state.n_sec, c))
        d_sorted = delta[order]
        # Compiled passes over the sorted legs, where numpy took nine (a 100,000-trade
        # window's 200,000 legs: 5.4 -> 0.8 ms, measured).
        uniq, sums = key_runs(k_sorted, d_sorted)
        before, found = state.holdings.find(uniq)
        running = running_positions(k_sorted, d_sorted, before)  # each leg's position after it
        neg_sorted = (d_sorted < 0) & (running < 0)

        exceptions, new_reported = self._exceptions(ctx, c, order[neg_sorted], running[neg_sorted])
        holdings_delta = pl.DataFrame(
            {"acct_idx": uniq // state.n_sec, "sec_idx": (uniq % state.n_sec).astype(np.int32), "quantity": sums}
        )

        def register() -> None:
            state.holdings.add(uniq, sums, found)
            state.reported.insert(new_reported)

        return window.add(
            effects=(register,),
            holdings_delta=holdings_delta,
            exceptions=exceptions,
        )

    @staticmethod
    def _exceptions(ctx: StageContext, c: pl.DataFrame, legs: np.ndarray,
                    running: np.ndarray) -> tuple[pl.DataFrame, np.ndarray]:
        """NEGATIVE_HOLDING rows for negative legs, first per key in input order, not
        reported before; and their keys (holding key and day) for `reported`. Built from
        the legs' columns and one query: a window has a few dozen such legs, and each eager
        Polars query costs ~0.1 ms whatever its size (registration's process 5.3-5.8 ->
        3.7-3.9 ms a 10,000-row window, measured)."""
        state, ref = ctx.state, ctx.refdata
        order = np.argsort(legs, kind="stable")
        legs, running = legs[order], running[order]
        row, is_sell = legs // 2, (legs % 2) == 1
        acct_idx = np.where(is_sell, c["sell_acct_idx"].to_numpy()[row], c["buy_acct_idx"].to_numpy()[row])
        hkey = state.holding_keys(acct_idx, c["sec_idx"].to_numpy()[row])
        day = c["trade_date"].cast(pl.Int32).to_numpy()[row].astype(np.int64) - DAY0
        assert ((day >= 0) & (day < (1 << DAY_BITS))).all()
        key = (hkey << DAY_BITS) | day
        # First of each key by np.unique (the first index of each value, documented), not
        # Series.is_first_distinct: a query's fixed cost (~60 µs) on a few dozen keys.
        first = np.zeros(len(key), dtype=bool)
        first[np.unique(key, return_index=True)[1]] = True
        fresh = first & ~state.reported.contains(key)
        row, key = row[fresh], key[fresh]
        # One query gathers the legs' rows and builds every column: each Polars call on this
        # thread waits for the GIL it released while the reader and the commit lane run
        # Python (a gather of the columns, then a query: 1.9 -> 1.4 ms of wall a 10,000-row
        # window in a replay, measured).
        at = pl.Series("row", row, dtype=pl.Int64)
        is_sell_legs = pl.lit(pl.Series("is_sell", is_sell[fresh]))
        what = pl.when(pl.col("record_type").gather(at) == "X").then(pl.lit("cancellation")).otherwise(pl.lit("sale"))
        return c.select(
            pl.lit("NEGATIVE_HOLDING").alias("code"),
            pl.col("market").gather(at),
            pl.col("security_id").gather(at),
            pl.lit(ref.account_index.values(acct_idx[fresh]).alias("account_id")),
            pl.when(is_sell_legs).then(pl.col("sell_participant").gather(at))
            .otherwise(pl.col("buy_participant").gather(at)).alias("participant_id"),
            pl.col("trade_date").gather(at),
            pl.format("position {} after {} of trade {}", pl.lit(pl.Series("running", running[fresh])), what,
                      pl.col("trade_id").gather(at)).alias("detail"),
        ), key
