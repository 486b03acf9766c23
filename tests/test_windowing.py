"""SPEC §8: any windowing (1 row, odd sizes, whole files, resumed runs, --batch) gives
identical tables, on a generated market with bad rows and cancellations, on every backend
(the reference is one DuckDB batch run: PostgreSQL must match it exactly too)."""

from __future__ import annotations

import signal
import threading
import time

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from settle_arrow import open_target, replay, schema
from settle_arrow.errors import UserError
from settle_arrow.generate import MarketSpec, generate_market

TABLES = [t for t in schema.OUTPUT if t != "checkpoints"]


@pytest.fixture(scope="module")
def market(tmp_path_factory):
    root = tmp_path_factory.mktemp("market")
    summary = generate_market(root, MarketSpec(trades=360, seed=11, accounts=60, securities=12, participants=4,
                                               days=4, bad_rate=0.1, cancel_rate=0.12))
    return summary


def _tables(db: str) -> dict[str, pl.DataFrame]:
    with open_target(db) as t:
        return {name: t.table(name) for name in TABLES}


@pytest.fixture(scope="module")
def reference(market, tmp_path_factory):
    db = str(tmp_path_factory.mktemp("ref") / "batch.duckdb")
    report = replay(list(market.trade_files), market.refdata_dir, db, batch=True)
    assert report.rows_read == market.rows == report.rows_accepted + report.rows_quarantined
    tables = _tables(db)
    # The fixture must exercise what the property is about.
    assert set(tables["quarantine"]["reason"]) == set(schema.QUARANTINE_REASONS)
    assert tables["trades"].filter(pl.col("record_type") == "X").height > 0
    assert tables["exceptions"].height > 0
    return tables


def _assert_same(reference: dict[str, pl.DataFrame], db: str) -> None:
    got = _tables(db)
    for name in TABLES:
        assert got[name].equals(reference[name]), f"{name} differs"


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(window=st.sampled_from([1, 2, 3, 7, 64, 359, 360, 100_000]))
def test_any_window_size_gives_identical_tables(market, reference, new_target, window):
    db = new_target("w")
    replay(list(market.trade_files), market.refdata_dir, db, window_rows=window)
    _assert_same(reference, db)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_resumed_runs_with_changing_windows_give_identical_tables(market, reference, new_target, data):
    """Several runs into one TARGET, each over a growing prefix of the files with its own
    window size (or --batch): windows of varying size, cut at arbitrary file boundaries."""
    files = list(market.trade_files)
    cuts = sorted(data.draw(st.lists(st.integers(1, len(files)), min_size=1, max_size=4)))
    db = new_target("r")
    for cut in [*cuts, len(files)]:
        size = data.draw(st.sampled_from([None, 1, 5, 33, 250]))
        replay(files[:cut], market.refdata_dir, db, window_rows=size or 1, batch=size is None)
    _assert_same(reference, db)


def test_a_paced_replay_is_a_live_feed_with_the_same_tables(market, reference, new_target):
    """--pace: each window's input is complete no earlier than its last row's arrival from a
    feed of that many rows a second (so the run takes at least rows / pace), and the tables
    are the same as at full speed."""
    db, pace, window = new_target("p"), 2_000.0, 60
    timings = []
    started = time.perf_counter()
    replay(list(market.trade_files), market.refdata_dir, db, window_rows=window, on_commit=timings.append,
           pace_trades_per_s=pace)
    assert [t.rows for t in timings] == [window] * (market.rows // window)
    for n, t in enumerate(timings, start=1):
        assert t.input_complete_s >= started + n * window / pace
    assert time.perf_counter() - started >= market.rows / pace
    _assert_same(reference, db)


def test_a_feeds_window_is_complete_when_its_last_row_arrives(market, reference, new_target, monkeypatch):
    """A live feed's window is complete when its last row arrived, also where the reader
    comes to it later (here slow processing keeps the reader's queue of one prepared window
    full): that wait is part of its latency, so the windows' input_complete_s step by
    window / pace exactly, not by whenever the reader got to them."""
    from settle_arrow import engine

    monkeypatch.setattr(engine, "PREPARE_PIECES_MAX", 1)
    process = engine.Engine.process

    def slow(self, window):
        time.sleep(0.03)  # three windows' arrival
        return process(self, window)

    monkeypatch.setattr(engine.Engine, "process", slow)
    db, pace, window = new_target("late"), 6_000.0, 60  # a window due every 10 ms
    timings = []
    replay(list(market.trade_files), market.refdata_dir, db, window_rows=window, on_commit=timings.append,
           pace_trades_per_s=pace)
    assert len(timings) == market.rows // window
    steps = [b.input_complete_s - a.input_complete_s for a, b in zip(timings, timings[1:], strict=False)]
    assert steps == pytest.approx([window / pace] * len(steps), abs=1e-6)
    assert all(t.input_complete_s <= t.commit_started_s <= t.committed_s for t in timings)
    _assert_same(reference, db)


def test_a_paced_replay_stops_without_waiting_out_its_feed(market, reference, tmp_path):
    """Ctrl-C during a paced run (the reader waiting for its feed's next rows, the main
    thread for the reader) stops it at once, not when the reader's wait would have ended;
    the committed prefix then resumes exactly once. The engine's, so one backend."""
    db, pace, window = str(tmp_path / "s.duckdb"), 10.0, 60  # six seconds a window: a wait a stop must cut
    interrupted: list[float] = []

    def ctrl_c() -> None:
        interrupted.append(time.perf_counter())
        # A real SIGINT at the main thread, as Linux delivers a terminal's Ctrl-C (interrupt_main
        # only schedules the handler, which a thread blocked on a lock never runs).
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    timer = threading.Timer(7.5, ctrl_c)  # the first window committed, the reader waiting for the second
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            replay(list(market.trade_files), market.refdata_dir, db, window_rows=window, pace_trades_per_s=pace)
    finally:
        timer.cancel()
    assert time.perf_counter() - interrupted[0] < 2.5
    replay(list(market.trade_files), market.refdata_dir, db, window_rows=window)
    _assert_same(reference, db)


def test_a_paced_replay_reports_each_commit_before_the_next_window_arrives(market, reference, tmp_path):
    """The callbacks of a live feed's window run once it has committed, while the engine
    waits for the next window's rows, not when they arrive (a window a second here). The
    engine's, so one backend."""
    db, pace, window = str(tmp_path / "c.duckdb"), 60.0, 60
    timings, reported = [], []
    replay(list(market.trade_files), market.refdata_dir, db, window_rows=window, pace_trades_per_s=pace,
           on_commit=lambda t: (timings.append(t), reported.append(time.perf_counter())))
    assert len(timings) == market.rows // window
    lags = [r - t.input_complete_s for t, r in zip(timings, reported, strict=True)]
    assert max(lags) < 0.6 * window / pace, lags  # the next window is due a second after each
    _assert_same(reference, db)


@pytest.mark.parametrize("pace", [0.0, -1.0, float("nan"), float("inf"), 1e12])
def test_a_pace_out_of_range_is_a_user_error(market, new_target, pace):
    with pytest.raises(UserError, match="pace must be above 0"):
        replay(list(market.trade_files), market.refdata_dir, new_target("x"), window_rows=10, pace_trades_per_s=pace)
    with pytest.raises(UserError, match="streaming windows"):
        replay(list(market.trade_files), market.refdata_dir, new_target("y"), batch=True, pace_trades_per_s=100.0)
