"""Group commit: windows processed while the commit before them ran commit together, in one
transaction (Storage.commit_windows, Engine.run). What must hold, on every backend: each
window still commits whole or not at all, in order, with its own checkpoint row; source
offsets are those of the group's last window that read each source; results do not depend
on how windows were grouped; callbacks still come once per window, in window order.
(SIGKILLs inside a group's transaction: test_exactly_once.py, group-commits.)"""

from __future__ import annotations

import threading
import time

import polars as pl
import pyarrow as pa
import pytest

from settle_arrow import engine, open_target, pipeline, replay, schema
from settle_arrow.engine import WindowTiming
from settle_arrow.storage import open_storage
from settle_arrow.storage.base import SourceOffset, WindowMark

TABLES = [t for t in schema.OUTPUT if t != "checkpoints"]


def _quarantine(window_id: int, rows: int) -> pa.Table:
    """`rows` quarantine rows of `window_id` (all text but source_row and window_id)."""
    cols = {f.name: pa.array([f"{window_id}-{i}" for i in range(rows)], f.type)
            for f in schema.STORAGE["quarantine"] if pa.types.is_string(f.type)}
    return pa.table({**cols, "source_row": pa.array(range(rows), pa.int64()),
                     "window_id": pa.array([window_id] * rows, pa.int64())})


def _mark(window_id: int, rows_done: int, source: str = "a.parquet") -> WindowMark:
    return WindowMark(window_id, {"source": source, "offset": rows_done, "rows": 2, "digest": str(window_id)},
                      (SourceOffset(source, 100, "ab" * 32, rows_done),))


def test_windows_of_one_group_commit_together(new_target):
    storage = open_storage(new_target())
    try:
        storage.ensure_schema()
        rows = pa.concat_tables([_quarantine(1, 2), _quarantine(2, 3), _quarantine(3, 1)])
        marks = [_mark(1, 2), _mark(2, 4), WindowMark(3, _mark(3, 1, "b.parquet").checkpoint,
                                                         (SourceOffset("a.parquet", 100, "ab" * 32, 6),
                                                          SourceOffset("b.parquet", 50, None, 1)))]
        storage.commit_windows(marks, {"quarantine": rows})
        cps = storage.query('SELECT window_id, "offset", committed_at FROM checkpoints ORDER BY window_id')
        per_window = storage.query("SELECT window_id, COUNT(*) AS n FROM quarantine GROUP BY 1 ORDER BY 1")
        sources = storage.query("SELECT source, sha256, rows_done, window_id FROM sources ORDER BY source")
    finally:
        storage.close()
    assert cps["window_id"].to_pylist() == [1, 2, 3]
    assert cps["offset"].to_pylist() == [2, 4, 1]
    assert len(set(cps["committed_at"].to_pylist())) == 1, "one transaction, one commit time"
    assert per_window.to_pylist() == [{"window_id": 1, "n": 2}, {"window_id": 2, "n": 3}, {"window_id": 3, "n": 1}]
    # Each source as the group's last window that read it left it.
    assert sources.to_pylist() == [{"source": "a.parquet", "sha256": "ab" * 32, "rows_done": 6, "window_id": 3},
                                   {"source": "b.parquet", "sha256": None, "rows_done": 1, "window_id": 3}]


def test_a_failed_group_commits_none_of_its_windows(new_target, monkeypatch):
    storage = open_storage(new_target())
    try:
        storage.ensure_schema()
        storage.commit_windows([_mark(1, 2)], {"quarantine": _quarantine(1, 2)})
        append = type(storage)._append

        def failing(self, table, data):
            if table == "checkpoints":
                raise RuntimeError("disk full")  # after the group's rows went in
            append(self, table, data)

        monkeypatch.setattr(type(storage), "_append", failing)
        with pytest.raises(RuntimeError, match="disk full"):
            storage.commit_windows([_mark(2, 4), _mark(3, 6)],
                                   {"quarantine": pa.concat_tables([_quarantine(2, 2), _quarantine(3, 2)])})
        monkeypatch.undo()
        assert storage.max_window_id() == 1
        assert storage.count("quarantine") == 2
        assert storage.source_progress() == {"a.parquet": SourceOffset("a.parquet", 100, "ab" * 32, 2)}
        # and the TARGET takes the same windows again
        storage.commit_windows([_mark(2, 4), _mark(3, 6)],
                               {"quarantine": pa.concat_tables([_quarantine(2, 2), _quarantine(3, 2)])})
        assert storage.max_window_id() == 3 and storage.count("quarantine") == 6
    finally:
        storage.close()


def test_a_group_refuses_windows_out_of_order_or_rows_of_other_windows(tmp_path):
    storage = open_storage(str(tmp_path / "t.duckdb"))
    try:
        storage.ensure_schema()
        with pytest.raises(AssertionError, match="windows in order"):
            storage.commit_windows([_mark(2, 2), _mark(1, 4)], {})
        with pytest.raises(AssertionError, match="rows of other windows"):
            storage.commit_windows([_mark(1, 2), _mark(2, 4)], {"quarantine": _quarantine(3, 1)})
        assert storage.max_window_id() == 0
    finally:
        storage.close()


# --- the engine's grouping ---------------------------------------------------------------


@pytest.mark.parametrize(("windows_max", "rows_max", "group"), [(5, 200_000, 5), (16, 1750, 7), (1, 200_000, 1)])
def test_grouped_windows_give_the_same_tables(small_market, small_market_tables, new_target, monkeypatch,
                                              windows_max, rows_max, group):
    """A lane that is always busy: every group fills to its bound (windows or rows)."""
    monkeypatch.setattr(pipeline.CommitLane, "busy", lambda self: True)
    monkeypatch.setattr(engine, "COMMIT_GROUP_WINDOWS_MAX", windows_max)
    monkeypatch.setattr(engine, "COMMIT_GROUP_ROWS_MAX", rows_max)
    db = new_target()
    seen: list[tuple[int, int]] = []
    timings: list[WindowTiming] = []
    report = replay(list(small_market.trade_files), small_market.refdata_dir, db, window_rows=250,
                    on_window=lambda rows, windows: seen.append((rows, windows)), on_commit=timings.append)
    with open_target(db) as t:
        got = {name: t.table(name) for name in TABLES}
        cps = t.table("checkpoints").filter(pl.col("window_id") > 0)
        # Each input row stored under its own window.
        per_window = t.storage.query("SELECT window_id, COUNT(*) AS n FROM (SELECT window_id FROM trade_facts "
                                     "UNION ALL SELECT window_id FROM quarantine) AS w GROUP BY 1 ORDER BY 1")
    for name in TABLES:
        assert got[name].equals(small_market_tables[name]), f"{name} differs"
    n = report.windows
    assert n == 12 and cps["window_id"].to_list() == list(range(1, n + 1)) and cps["rows"].sum() == 3000
    assert per_window["window_id"].to_pylist() == list(range(1, n + 1)) and set(per_window["n"].to_pylist()) == {250}
    # Windows of one group share its commit time: groups of `group` windows, the last one
    # perhaps shorter.
    sizes = cps.group_by("committed_at", maintain_order=True).len()["len"].to_list()
    assert sizes == [group] * (n // group) + ([n % group] if n % group else [])
    # Callbacks: once per window, in order, each window's own rows.
    assert seen == [(250 * w, w) for w in range(1, n + 1)]
    assert [t.window_id for t in timings] == list(range(1, n + 1)) and all(t.rows == 250 for t in timings)
    assert all(t.input_complete_s <= t.commit_started_s <= t.committed_s for t in timings)


@pytest.mark.parametrize("reader", ["ahead", "behind"])
def test_an_idle_lane_waits_for_a_group_only_while_the_engine_is_behind_its_input(small_market, small_market_tables,
                                                                                   new_target, monkeypatch, reader):
    """A lane that is never busy: while the next window's input is complete already (slow
    processing, the reader ahead) windows still group up to the group's bound; while the
    reader is the slow one (a feed that has not delivered the next window yet), each
    window commits alone at once. Same tables either way."""
    monkeypatch.setattr(pipeline.CommitLane, "busy", lambda self: False)
    monkeypatch.setattr(engine, "COMMIT_GROUP_WINDOWS_MAX", 5)
    # Each piece prepared alone: a slow reader of files would otherwise read a batch of
    # pieces before preparing the first (test_prepare_batches.py), and group them.
    monkeypatch.setattr(engine, "PREPARE_PIECES_MAX", 1)
    slow = engine.Engine.process if reader == "ahead" else None
    windows = engine._windows

    if slow is not None:
        def process(self, window):
            time.sleep(0.15)  # the reader cuts the next window meanwhile
            return slow(self, window)

        monkeypatch.setattr(engine.Engine, "process", process)
    else:
        def late(*args, **kwargs):
            for raw in windows(*args, **kwargs):
                time.sleep(0.15)  # processing and the commit done before the next window is cut
                yield raw

        monkeypatch.setattr(engine, "_windows", late)
    db = new_target()
    report = replay(list(small_market.trade_files), small_market.refdata_dir, db, window_rows=250)
    with open_target(db) as t:
        got = {name: t.table(name) for name in TABLES}
        cps = t.table("checkpoints").filter(pl.col("window_id") > 0)
    for name in TABLES:
        assert got[name].equals(small_market_tables[name]), f"{name} differs"
    assert report.windows == 12 and cps["window_id"].to_list() == list(range(1, 13))
    sizes = cps.group_by("committed_at", maintain_order=True).len()["len"].to_list()
    # Ahead: groups fill to the bound, the last with what is left once the input ends.
    assert sizes == ([5, 5, 2] if reader == "ahead" else [1] * 12)


def test_an_error_in_a_window_commits_the_windows_held_before_it(small_market, new_target, monkeypatch):
    """Windows held for a group (a lane that stays busy) when a later window fails are
    processed and checked: the run stops after committing them, as it would have, and the
    failing window's error is the one raised."""
    monkeypatch.setattr(pipeline.CommitLane, "busy", lambda self: True)
    monkeypatch.setattr(engine, "COMMIT_GROUP_WINDOWS_MAX", 16)
    process = engine.Engine.process

    def failing(self, window):
        if window.window_id == 5:
            raise ValueError("window 5 cannot be processed")
        return process(self, window)

    monkeypatch.setattr(engine.Engine, "process", failing)
    db = new_target()
    with pytest.raises(ValueError, match="window 5 cannot be processed"):
        replay(list(small_market.trade_files), small_market.refdata_dir, db, window_rows=250)
    with open_target(db) as t:
        cps = t.table("checkpoints").filter(pl.col("window_id") > 0)
        assert cps["window_id"].to_list() == [1, 2, 3, 4] and cps["rows"].sum() == 1000
        assert cps["committed_at"].n_unique() == 1, "the held windows, one group"


def test_a_window_held_for_a_busy_lane_commits_once_the_lane_is_idle(small_market, small_market_tables, new_target,
                                                                     monkeypatch):
    """A live feed whose commit lane was busy when window 2 was processed: window 2 goes to
    the lane the moment the lane is idle, not with the next window once that arrives (the
    poll that used to hand it over is made too long to, so only the new hand-over can)."""
    monkeypatch.setattr(pipeline, "_POLL_S", 10.0)
    monkeypatch.setattr(engine, "PREPARE_PIECES_MAX", 1)  # the reader's gate below must not hold a batch
    job_started, w2_processed, job_done = threading.Event(), threading.Event(), threading.Event()
    commit_job, process, windows = engine.Engine._commit_job, engine.Engine.process, engine._windows

    def first_job_slow(self, group, checked=True):
        job = commit_job(self, group, checked)
        if group[0].window.window_id != 1:
            return job

        def slow() -> None:
            job_started.set()
            assert w2_processed.wait(10)
            time.sleep(0.05)  # the lane is busy when the engine decides about window 2
            job()
            job_done.set()

        return slow

    def processed(self, window):
        out = process(self, window)
        if window.window_id == 2:
            w2_processed.set()
        return out

    def gated(*args, **kwargs):
        for i, raw in enumerate(windows(*args, **kwargs)):
            if i == 1:
                assert job_started.wait(10)  # window 1 alone on the lane: the reader was not ahead
            elif i == 2:
                assert job_done.wait(10)
                time.sleep(0.3)  # window 3 arrives well after the lane went idle
            yield raw

    monkeypatch.setattr(engine.Engine, "_commit_job", first_job_slow)
    monkeypatch.setattr(engine.Engine, "process", processed)
    monkeypatch.setattr(engine, "_windows", gated)
    db = new_target()
    timings: list[WindowTiming] = []
    replay(list(small_market.trade_files), small_market.refdata_dir, db, window_rows=250, on_commit=timings.append)
    with open_target(db) as t:
        got = {name: t.table(name) for name in TABLES}
        cps = t.table("checkpoints").filter(pl.col("window_id") > 0)
    for name in TABLES:
        assert got[name].equals(small_market_tables[name]), f"{name} differs"
    w1, w2, w3 = timings[:3]
    assert w2.commit_started_s >= w1.committed_s, "window 2 waited for window 1's commit"
    assert w2.commit_started_s < w3.input_complete_s, "window 2 waited for window 3"
    at = dict(zip(cps["window_id"].to_list(), cps["committed_at"].to_list(), strict=True))
    assert at[1] != at[2] != at[3], "windows 1, 2 and 3 each committed alone"
