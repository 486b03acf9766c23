"""The securities obligations committed since the stored snapshot, added up by the commit
lane, so that a fold writes them instead of netting the trade rows again.

Data model:
  SinceFold  (trade_date, securities_settle_date, part_id, sec_id) -> (net_quantity,
             buy_quantity, sell_quantity): the sum of clearing's
             frames["obligations_securities_idx"] of every window committed after the
             snapshot, in storage encoding (dimension ids); `staged`: those of the pieces of
             a window in pieces that has not committed yet.

Invariants: only the commit lane touches it (the engine's thread only while the lane is
idle or gone: an abandoned window, the fold that ends a run), in window order, and only
after the commit that made its windows durable, so it is always exactly the obligations of
the committed windows after the snapshot (the view obligations_securities_ids adds the
same from the trade rows: a fold by either gives one table; tests/test_obligations_fold.py).
Its rows are kept as frames that are merged (grouped and summed) once they outgrow
MERGE_ROWS_MIN and twice the rows of the last merge: memory O(keys) and each row merged
O(1) times, amortised.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow as pa

from settle_arrow import schema

KEY = ["trade_date", "securities_settle_date", "part_id", "sec_id"]
QUANTITIES = ["net_quantity", "buy_quantity", "sell_quantity"]
# A merge holds the commit lane: 1 M rows took 80 ms (10,000-row windows: commit p99 60 ->
# 120 ms, measured), so merges come small and often; unmerged rows hold ~40 bytes each.
MERGE_ROWS_MIN = 250_000


class SinceFold:
    def __init__(self, participant_ids: np.ndarray, security_ids: np.ndarray) -> None:
        self._participant_ids = participant_ids  # participant row -> dim_participant.id
        self._security_ids = security_ids  # sec_idx -> dim_security.id
        self._merged = pl.from_arrow(schema.OBLIGATIONS_IDS.empty_table())  # one row a key
        self._frames: list[pl.DataFrame] = []  # added since the merge
        self._rows = 0  # of both
        self._staged: list[pl.DataFrame] = []

    @property
    def rows(self) -> int:
        """Rows held, merged or not (0: nothing committed since the snapshot)."""
        return self._rows

    def stage(self, by_idx: pl.DataFrame) -> None:
        """Hold a piece's rows until its window commits (commit) or is abandoned (abort)."""
        self._staged.append(self._encoded(by_idx))

    def abort(self) -> None:
        self._staged.clear()

    def commit(self, by_idx: list[pl.DataFrame]) -> None:
        """Add the rows of windows that have just committed (and of their staged pieces)."""
        # The windows' rows encoded at once: each Polars call on the commit lane waits for
        # the GIL the other threads hold (ten windows: 4.4 ms of wall, one encoding a window).
        added = self._staged + ([self._encoded(pl.concat(by_idx))] if by_idx else [])
        self._staged = []
        self._frames += [f for f in added if f.height]
        self._rows += sum(f.height for f in added)
        if self._rows > max(MERGE_ROWS_MIN, 2 * self._merged.height):
            self._merge()

    def table(self) -> pa.Table:
        """The sums, one row per key, in schema.OBLIGATIONS_IDS (rows whose sums are
        all zero included: the fold drops them, as the view does)."""
        self._merge()
        return self._merged.to_arrow().cast(schema.OBLIGATIONS_IDS)

    def _merge(self) -> None:
        if self._frames:
            self._merged = pl.concat([self._merged, *self._frames]).group_by(KEY).agg(pl.col(QUANTITIES).sum())
            self._frames = []
        self._rows = self._merged.height

    def _encoded(self, by_idx: pl.DataFrame) -> pl.DataFrame:
        """Clearing's rows (reference row indices) in storage encoding."""
        return pl.DataFrame([
            by_idx["trade_date"],
            by_idx["securities_settle_date"],
            pl.Series("part_id", self._participant_ids[by_idx["part_idx"].to_numpy()], dtype=pl.Int32),
            pl.Series("sec_id", self._security_ids[by_idx["sec_idx"].to_numpy()], dtype=pl.Int32),
            *(by_idx[c] for c in QUANTITIES),  # not select(): a query
        ])
