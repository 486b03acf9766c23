"""Securities obligations as a folded snapshot plus the trade rows after it (schema
version 6): every fold (Storage.fold_obligations, on the commit lane with each holdings
snapshot and at the end of a run) holds exactly the obligations as of its window, whether
it added up the lane's sums (obligations.py) or netted the trade rows (after a restart);
folds come with the holdings snapshots (across a restart too), the tables a replay leaves
do not depend on when folds came, and a TARGET of schema version 5 (per-window delta rows)
is read as it is and migrated by its next writer. On every backend."""

from __future__ import annotations

import datetime as dt
from unittest import mock

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from old_targets import KEY, LEGS, NONZERO, SUMS, as_version_5

from settle_arrow import engine, obligations, open_target, pipeline, replay, schema
from settle_arrow.errors import UserError
from settle_arrow.storage import open_storage
from settle_arrow.storage.base import Storage
from settle_arrow.target import copy_target

TABLES = [t for t in schema.OUTPUT if t != "checkpoints"]

# Obligations as of window {w} from the trade rows alone (no snapshot involved).
AS_OF = f"SELECT {', '.join(KEY)}, {SUMS} FROM ({LEGS}) o WHERE window_id <= {{w}} GROUP BY {', '.join(KEY)} {NONZERO}"


def _rows(t: pa.Table) -> pl.DataFrame:
    return pl.from_arrow(t.select([*KEY, "net_quantity", "buy_quantity", "sell_quantity"])).sort(KEY)


def _tables(db: str) -> dict[str, pl.DataFrame]:
    with open_target(db) as t:
        return {name: t.table(name) for name in TABLES}


@pytest.mark.parametrize("grouped", [False, True], ids=["window-by-window", "grouped"])
def test_every_fold_is_the_obligations_as_of_its_window(small_market, small_market_tables, new_target, monkeypatch,
                                                        grouped):
    monkeypatch.setattr(engine, "COMPACT_ROWS_MIN", 400)  # a fold with each holdings snapshot,
    monkeypatch.setattr(engine, "SNAPSHOT_GROWTH", 0)  # every ~200 trades
    if grouped:  # a lane that is always busy: groups of 5 windows, folds after whole groups
        monkeypatch.setattr(pipeline.CommitLane, "busy", lambda self: True)
        monkeypatch.setattr(engine, "COMMIT_GROUP_WINDOWS_MAX", 5)
    else:
        monkeypatch.setattr(engine, "COMMIT_GROUP_WINDOWS_MAX", 1)
    folds: list[tuple[int, int]] = []  # (fold's window, its rows)
    fold = Storage.fold_obligations

    def checked(self: Storage, since_snapshot: pa.Table | None = None) -> int:
        assert since_snapshot is not None, "a fresh run folds the lane's sums, never the trade rows"
        rows = fold(self, since_snapshot)
        w = self.max_window_id()
        stored = self.query("SELECT * FROM obligations_securities_snapshot")
        assert set(stored["window_id"].to_pylist()) <= {w} and stored.num_rows == rows
        assert _rows(stored).equals(_rows(self.query(AS_OF.format(w=w)))), f"fold as of window {w} is not the obligations then"
        assert self.meta()[schema.OBLIGATIONS_SNAPSHOT_KEY] == str(w)
        folds.append((w, rows))
        return rows

    monkeypatch.setattr(Storage, "fold_obligations", checked)
    db = new_target()
    replay(list(small_market.trade_files), small_market.refdata_dir, db, window_rows=70)
    assert len(folds) >= 3 and all(rows for _, rows in folds)
    with open_target(db) as t:  # the run ended folded
        assert folds[-1][0] == t.storage.max_window_id()
    got = _tables(db)
    for name in TABLES:
        assert got[name].equals(small_market_tables[name]), f"{name} differs"


def test_folds_come_with_the_holdings_snapshots_across_a_restart(small_market, small_market_tables, new_target,
                                                                monkeypatch):
    """The fold runs in the commit job that writes a holdings snapshot, as of the window the
    job committed last: a restart, which takes up the snapshot's count of legs from the
    TARGET, takes up the folds' with it."""
    monkeypatch.setattr(engine, "COMPACT_ROWS_MIN", 1000)
    monkeypatch.setattr(engine, "SNAPSHOT_GROWTH", 0)
    monkeypatch.setattr(engine, "COMMIT_GROUP_WINDOWS_MAX", 1)  # each snapshot as of its job's last window
    files = list(small_market.trade_files)
    db = new_target()
    snapshots: list[int] = []
    folds: list[int] = []
    replace, fold = Storage.replace_holdings_snapshot, Storage.fold_obligations

    def snapshot_noted(self: Storage, window_id: int, positions) -> None:
        replace(self, window_id, positions)
        snapshots.append(window_id)

    def fold_noted(self: Storage, since_snapshot: pa.Table | None = None) -> int:
        folds.append(self.max_window_id())
        return fold(self, since_snapshot)

    monkeypatch.setattr(Storage, "replace_holdings_snapshot", snapshot_noted)
    monkeypatch.setattr(Storage, "fold_obligations", fold_noted)
    ends = []
    for part in (files[: len(files) // 2], files):
        replay(part, small_market.refdata_dir, db, window_rows=100)
        with open_target(db) as t:
            ends.append(t.storage.max_window_id())
    # Each run also ends folded (where it committed after its last snapshot).
    assert len(snapshots) >= 4 and folds == sorted(set(snapshots) | set(ends))
    with open_target(db) as t:
        assert t.storage.meta()[schema.OBLIGATIONS_SNAPSHOT_KEY] == str(folds[-1])
    got = _tables(db)
    for name in TABLES:
        assert got[name].equals(small_market_tables[name]), f"{name} differs"


def test_after_a_stop_the_first_fold_nets_the_trade_rows(small_market, small_market_tables, new_target,
                                                       monkeypatch):
    """A run that stopped between folds leaves trade rows after the snapshot that no engine
    holds the sums of: the next run's first fold nets them from the TARGET, each later fold
    adds up the lane's sums again; every fold is the obligations as of its window."""
    monkeypatch.setattr(engine, "COMPACT_ROWS_MIN", 1000)
    monkeypatch.setattr(engine, "SNAPSHOT_GROWTH", 0)
    monkeypatch.setattr(engine, "COMMIT_GROUP_WINDOWS_MAX", 1)
    files = list(small_market.trade_files)
    db = new_target()
    folds: list[tuple[int, bool]] = []  # (window, from the lane's sums)
    fold = Storage.fold_obligations

    def checked(self: Storage, since_snapshot: pa.Table | None = None) -> int:
        rows = fold(self, since_snapshot)
        w = self.max_window_id()
        stored = self.query("SELECT * FROM obligations_securities_snapshot")
        assert _rows(stored).equals(_rows(self.query(AS_OF.format(w=w)))), f"fold as of window {w} is not the obligations then"
        folds.append((w, since_snapshot is not None))
        return rows

    def stop(rows: int, windows: int) -> None:  # window ids are 1, 2, ... in a fresh TARGET
        if rows >= 1200 and folds and folds[-1][0] < windows:
            raise KeyboardInterrupt

    monkeypatch.setattr(Storage, "fold_obligations", checked)
    with pytest.raises(KeyboardInterrupt):
        replay(files, small_market.refdata_dir, db, window_rows=100, on_window=stop)
    assert folds and all(lane for _, lane in folds), "the stopped run folded (its snapshot) and never at its end"
    with open_target(db) as t:
        stopped_at = t.storage.max_window_id()
        assert int(t.storage.meta()[schema.OBLIGATIONS_SNAPSHOT_KEY]) < stopped_at, "rows after the fold"
    first_run = len(folds)
    replay(files, small_market.refdata_dir, db, window_rows=100)
    resumed = [lane for _, lane in folds[first_run:]]
    assert len(resumed) >= 2 and resumed[0] is False and all(resumed[1:])
    got = _tables(db)
    for name in TABLES:
        assert got[name].equals(small_market_tables[name]), f"{name} differs"


def test_a_run_that_commits_nothing_ends_folded_after_a_stop_before_the_fold(small_market, small_market_tables,
                                                                             new_target, monkeypatch):
    """A run stopped after its last commit but before the fold that ends it leaves trade rows
    after the snapshot; the next run over the same, finished input commits no window, and
    still leaves the TARGET folded, by the view's netting (no engine holds the sums)."""
    files = list(small_market.trade_files)
    db = new_target()
    fold = Storage.fold_obligations
    folds: list[bool] = []  # from the lane's sums

    def stopped(self: Storage, since_snapshot: pa.Table | None = None) -> int:
        raise KeyboardInterrupt

    def noted(self: Storage, since_snapshot: pa.Table | None = None) -> int:
        folds.append(since_snapshot is not None)
        return fold(self, since_snapshot)

    monkeypatch.setattr(Storage, "fold_obligations", stopped)  # small_market folds only at a run's end
    with pytest.raises(KeyboardInterrupt):
        replay(files, small_market.refdata_dir, db, window_rows=500)
    with open_target(db) as t:
        last = t.storage.max_window_id()
        assert last and t.storage.trade_rows_since_snapshot(schema.OBLIGATIONS_SNAPSHOT_KEY), "rows after the fold"
    monkeypatch.setattr(Storage, "fold_obligations", noted)
    report = replay(files, small_market.refdata_dir, db, window_rows=500)
    assert report.windows == 0 and report.rows_read == 0 and folds == [False]
    with open_target(db) as t:
        assert t.storage.max_window_id() == last
        assert t.storage.meta()[schema.OBLIGATIONS_SNAPSHOT_KEY] == str(last)
        assert t.storage.trade_rows_since_snapshot(schema.OBLIGATIONS_SNAPSHOT_KEY) == 0
    replay(files, small_market.refdata_dir, db, window_rows=500)  # folded already: no fold again
    assert folds == [False]
    got = _tables(db)
    for name in TABLES:
        assert got[name].equals(small_market_tables[name]), f"{name} differs"


def test_a_version_5_target_is_read_as_it_is_and_migrated(small_market, small_market_tables, new_target, tmp_path):
    """Read as it is (not copied: a copy writes this version's tables), then migrated by the
    next replay: its deltas folded as of its last window, the tables a fresh replay gives."""
    files = list(small_market.trade_files)
    db = new_target()
    replay(files[:1], small_market.refdata_dir, db, window_rows=300)
    before = _tables(db)["obligations_securities"]
    with open_target(db) as t:
        first_run = t.storage.max_window_id()
    as_version_5(db)
    with open_target(db) as t:  # a reader does not migrate
        assert t.storage.meta()["schema_version"] == "5"
        assert t.storage.count("obligations_securities_delta") > before.height, "deltas of several windows a key"
        assert t.table("obligations_securities").equals(before)
    with pytest.raises(UserError, match="of schema version 5; copy reads version 6: a replay into it"):
        copy_target(db, str(tmp_path / "copy.duckdb"))
    assert not (tmp_path / "copy.duckdb").exists()
    storage = open_storage(db)  # as the next replay opens it: a writer migrates
    try:
        storage.ensure_schema()
        meta, names = storage.meta(), storage._table_names()
    finally:
        storage.close()
    assert meta["schema_version"] == str(schema.SCHEMA_VERSION)
    assert "obligations_securities_delta" not in names
    assert int(meta[schema.OBLIGATIONS_SNAPSHOT_KEY]) == first_run  # the deltas' last window
    assert _tables(db)["obligations_securities"].equals(before)
    replay(files, small_market.refdata_dir, db, window_rows=300)
    got = _tables(db)
    for name in TABLES:
        assert got[name].equals(small_market_tables[name]), f"{name} differs"


_DAY = pl.Series([0], dtype=pl.Int32).cast(pl.Date)[0]


def _by_idx(rows: list[tuple[int, int, int, int]]) -> pl.DataFrame:
    """Clearing's obligations_securities_idx rows: (day, part_idx, sec_idx, signed quantity)."""
    day, part, sec, q = (list(c) for c in zip(*rows, strict=True)) if rows else ([], [], [], [])
    days = pl.Series("trade_date", day, dtype=pl.Int32).cast(pl.Date)
    return pl.DataFrame([
        days, (days + pl.Series([dt.timedelta(days=1)] * len(day), dtype=pl.Duration("ms"))).alias(
            "securities_settle_date"),
        pl.Series("part_idx", part, dtype=pl.Int32), pl.Series("sec_idx", sec, dtype=pl.Int32),
        pl.Series("net_quantity", q, dtype=pl.Int64), pl.Series("buy_quantity", [max(v, 0) for v in q], dtype=pl.Int64),
        pl.Series("sell_quantity", [max(-v, 0) for v in q], dtype=pl.Int64)])


@settings(max_examples=60, deadline=None)
@given(commits=st.lists(st.tuples(st.lists(st.lists(st.tuples(st.integers(0, 2), st.integers(0, 3), st.integers(0, 4),
                                                                    st.integers(-10**15, 10**15)), max_size=6),
                                            max_size=3),
                                   st.sampled_from(["commit", "stage", "abort"])), max_size=12),
       merge_rows=st.integers(0, 8))
def test_the_lanes_sums_are_every_committed_row_summed_by_key(commits, merge_rows):
    """However rows arrive (windows committed together, pieces staged and then committed or
    abandoned) and however often they are merged, the sums are those of every committed row
    per key, in storage encoding, with Python's integers."""
    participants, securities = np.array([7, 3, 5, 9], dtype=np.int32), np.array([11, 12, 10, 14, 13], dtype=np.int32)
    since = obligations.SinceFold(participants, securities)
    with mock.patch.object(obligations, "MERGE_ROWS_MIN", merge_rows):
        got, want = _fed(since, commits, participants, securities)
    assert since.table().schema.equals(schema.OBLIGATIONS_IDS)
    assert {(r[0].toordinal() - _DAY.toordinal(), r[1].toordinal() - _DAY.toordinal(), r[2], r[3]): list(r[4:])
            for r in got.rows()} == want
    assert got.height == len(want) and since.rows == len(want)


def _fed(since: obligations.SinceFold, commits: list, participants: np.ndarray,
         securities: np.ndarray) -> tuple[pl.DataFrame, dict[tuple, list[int]]]:
    """Feed `commits` to `since`: its table, and the sums Python computes from them."""
    want: dict[tuple, list[int]] = {}
    staged: list = []
    for frames, how in commits:
        if how == "stage":
            for rows in frames:
                since.stage(_by_idx(rows))
            staged += [r for rows in frames for r in rows]
            continue
        if how == "abort":
            since.abort()
            staged = []
            continue
        since.commit([_by_idx(rows) for rows in frames])
        for day, part, sec, q in staged + [r for rows in frames for r in rows]:
            sums = want.setdefault((day, day + 1, int(participants[part]), int(securities[sec])), [0, 0, 0])
            for i, v in enumerate((q, max(q, 0), max(-q, 0))):
                sums[i] += v
        staged = []
    got = pl.from_arrow(since.table())
    assert isinstance(got, pl.DataFrame)
    return got, want
