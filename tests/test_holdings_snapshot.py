"""The holdings snapshots a replay writes (Engine._snapshot_if_due on the processing
thread, Storage.replace_holdings_snapshot on the commit lane): each holds exactly the
holdings as of its window (the opening plus both legs of every trade of the windows up
to it), also when that window commits inside a group of later ones, and the tables a
replay leaves do not depend on when snapshots were taken. On every backend."""

from __future__ import annotations

from collections.abc import Iterable

import polars as pl
import pyarrow as pa
import pytest

from settle_arrow import engine, open_target, pipeline, replay, schema
from settle_arrow.storage.base import Storage

TABLES = [t for t in schema.OUTPUT if t != "checkpoints"]

# Holdings as of window :w from the history alone (no snapshot involved).
AS_OF = """
SELECT acct_id, sec_id, CAST(SUM(quantity) AS BIGINT) AS quantity FROM (
  SELECT acct_id, sec_id, quantity FROM opening_holdings
  UNION ALL SELECT buy_account_id, sec_id, sign * quantity FROM trade_facts WHERE window_id <= {w}
  UNION ALL SELECT sell_account_id, sec_id, -(sign * quantity) FROM trade_facts WHERE window_id <= {w}
) h GROUP BY acct_id, sec_id HAVING SUM(quantity) <> 0
"""


def _positions(t: pa.Table) -> dict[tuple[int, int], int]:
    return {(a, s): q for a, s, q in zip(*(t[c].to_pylist() for c in ("acct_id", "sec_id", "quantity")), strict=True)}


@pytest.mark.parametrize("grouped", [False, True], ids=["window-by-window", "grouped"])
def test_every_snapshot_is_the_holdings_as_of_its_window(small_market, small_market_tables, new_target, monkeypatch,
                                                         grouped):
    # A snapshot every ~200 trades: several per run, each checked as it is written.
    monkeypatch.setattr(engine, "COMPACT_ROWS_MIN", 400)
    monkeypatch.setattr(engine, "SNAPSHOT_GROWTH", 0)
    if grouped:  # a lane that is always busy: groups of 5 windows, snapshots mid-group
        monkeypatch.setattr(pipeline.CommitLane, "busy", lambda self: True)
        monkeypatch.setattr(engine, "COMMIT_GROUP_WINDOWS_MAX", 5)
        monkeypatch.setattr(engine, "SNAPSHOT_PIECE_ROWS", 37)  # and written in many pieces
    else:  # one window a commit, however slow the commits: every due snapshot is written
        monkeypatch.setattr(engine, "COMMIT_GROUP_WINDOWS_MAX", 1)
    written: list[tuple[int, int]] = []  # (snapshot's window, last committed window then)
    replace = Storage.replace_holdings_snapshot

    def checked(self: Storage, window_id: int, positions: Iterable[pa.Table]) -> None:
        replace(self, window_id, positions)
        stored = self.query("SELECT acct_id, sec_id, quantity, window_id FROM holdings_snapshot")
        assert set(stored["window_id"].to_pylist()) <= {window_id}
        assert _positions(stored) == _positions(self.query(AS_OF.format(w=int(window_id)))), \
            f"snapshot as of window {window_id} is not the holdings then"
        written.append((window_id, self.max_window_id()))

    monkeypatch.setattr(Storage, "replace_holdings_snapshot", checked)
    db = new_target()
    replay(list(small_market.trade_files), small_market.refdata_dir, db, window_rows=70)
    assert len(written) >= 5
    if grouped:
        assert any(w < last for w, last in written), "no snapshot of a window inside its group"
    with open_target(db) as t:
        got = {name: t.table(name) for name in TABLES}
        assert t.storage.meta()[schema.HOLDINGS_SNAPSHOT_KEY] == str(written[-1][0])
    for name in TABLES:
        assert got[name].equals(small_market_tables[name]), f"{name} differs"


def test_a_resumed_run_counts_the_legs_since_the_stored_snapshot(small_market, small_market_tables, new_target,
                                                                 monkeypatch):
    """A restart takes up the count of legs since the last snapshot from the TARGET: the
    next snapshot comes as due, not a whole threshold later."""
    monkeypatch.setattr(engine, "COMPACT_ROWS_MIN", 1000)
    monkeypatch.setattr(engine, "SNAPSHOT_GROWTH", 0)
    # One window a commit: a group holding two due windows writes only the later one's
    # snapshot (the test above covers that), which under a slow commit made this one flaky.
    monkeypatch.setattr(engine, "COMMIT_GROUP_WINDOWS_MAX", 1)
    files = list(small_market.trade_files)
    db = new_target()
    windows: list[int] = []
    replace = Storage.replace_holdings_snapshot

    def noted(self: Storage, window_id: int, positions: Iterable[pa.Table]) -> None:
        replace(self, window_id, positions)
        windows.append(window_id)

    monkeypatch.setattr(Storage, "replace_holdings_snapshot", noted)
    for part in (files[: len(files) // 2], files):
        replay(part, small_market.refdata_dir, db, window_rows=100)
    with open_target(db) as t:
        got = {name: t.table(name) for name in TABLES}
        rows = t.storage.query("SELECT window_id, COUNT(*) AS n FROM trade_facts GROUP BY 1 ORDER BY 1")
    # Due once more than 1,000 legs (500 trades) arrived since the last: never later.
    legs = pl.from_arrow(rows).with_columns(pl.col("n").cum_sum() * 2)
    due, last = [], 0
    for w, total in legs.iter_rows():
        if total - last > 1000:
            due.append(w)
            last = total
    assert windows == due
    for name in TABLES:
        assert got[name].equals(small_market_tables[name]), f"{name} differs"
