"""Windows prepared together (engine.prepare_rows_together, the reader of Engine.run): the
stages' row-wise work runs once over consecutive pieces whose input is complete, and each
window gets its slices. What must hold: every window's prepared frames equal those it gets
prepared alone, wherever the input is cut; tables do not depend on the batching; a batch
never spans a change of schema, and a live feed (paced) prepares window by window; when
the batch's work fails, each window does its own, and an error of one window's rows stops
the run after the windows before it committed."""

from __future__ import annotations

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from settle_arrow import engine, open_target, replay, schema
from settle_arrow.io.files import discover
from settle_arrow.refdata import load_refdata
from settle_arrow.stages import validate
from settle_arrow.stages.base import Window

TABLES = [t for t in schema.OUTPUT if t != "checkpoints"]
PREPARED = ("validation_prepared", "validation_by_key", "clearing_prepared", "registration_prepared")


@pytest.fixture(scope="module")
def whole(small_market):
    """Reference data and the small market's whole input as the engine reads it (3,000 rows
    with bad rows and cancellations, one frame)."""
    ref = load_refdata(small_market.refdata_dir)
    (raw,) = engine._windows(discover(list(small_market.trade_files)), {}, None)
    return ref, raw.frame


def _prepared(ref, frame: pl.DataFrame, rows: dict | None = None) -> Window:
    """Every stage's prepare of one window (as Engine.prepare), given its row frames or not."""
    window = Window(1, {"input": frame, **(rows or {})})
    for stage in engine.STAGES:
        window = stage.prepare(window, ref)
    return window


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cuts=st.lists(st.integers(1, 2999), max_size=12, unique=True))
def test_windows_prepared_together_equal_windows_prepared_alone(whole, cuts):
    ref, frame = whole
    bounds = [0, *sorted(cuts), frame.height]
    frames = [frame.slice(lo, hi - lo) for lo, hi in zip(bounds, bounds[1:], strict=False)]
    together = engine.prepare_rows_together(engine.STAGES, ref, frames)
    assert len(together) == len(frames)
    for f, rows in zip(frames, together, strict=True):
        # One frame prepares its own rows; several get slices of the rows made together.
        assert set(rows) == (set() if len(frames) == 1 else {"validation_rows", "clearing_rows"})
        assert all(r.height == f.height for r in rows.values())
        if rows:  # clearing's row frame holds the rows that passed validation's row checks alone
            failed = rows["validation_rows"]["reason0"].is_not_null()
            assert rows["clearing_rows"]["amount_fen"].is_null().equals(failed)
        alone, batched = _prepared(ref, f), _prepared(ref, f, rows)
        for name in PREPARED:
            assert batched.frames[name].equals(alone.frames[name]), name


def _count_batches(monkeypatch) -> list[pl.DataFrame]:
    """The frames Validate.prepare_rows is given (only ever for several pieces at once)."""
    given_frames: list[pl.DataFrame] = []
    prepare_rows = validate.Validate.prepare_rows

    def counted(self, frame, ref, rows=None):
        given_frames.append(frame)
        return prepare_rows(self, frame, ref, rows)

    monkeypatch.setattr(validate.Validate, "prepare_rows", counted)
    return given_frames


@pytest.mark.parametrize(("rows_max", "pieces_max", "pace", "batches"), [
    (1000, 16, None, [4, 4, 4]),  # the rows' bound
    (100_000, 5, None, [5, 5, 2]),  # the pieces' bound, and the input's end
    (250, 16, None, []),  # one window a batch: each prepares its own rows
    (1000, 16, engine.PACE_TRADES_PER_S_MAX, []),  # a live feed, even one far ahead: window by window
    (100_000, 16, 1250.0, []),  # a feed slower than the engine: no window waits for the next
])
def test_a_replay_prepares_the_windows_it_has_in_batches(small_market, small_market_tables, new_target, monkeypatch,
                                                        rows_max, pieces_max, pace, batches):
    monkeypatch.setattr(engine, "PREPARE_ROWS_MAX", rows_max)
    monkeypatch.setattr(engine, "PREPARE_PIECES_MAX", pieces_max)
    given_frames = _count_batches(monkeypatch)
    db = new_target()
    report = replay(list(small_market.trade_files), small_market.refdata_dir, db, window_rows=250,
                    pace_trades_per_s=pace)
    assert report.windows == 12
    assert [f.height for f in given_frames] == [250 * b for b in batches]
    with open_target(db) as t:
        for name in TABLES:
            assert t.table(name).equals(small_market_tables[name]), f"{name} differs"


def test_a_batch_never_spans_two_schemas(small_market, new_target, tmp_path, monkeypatch):
    """A CSV file (text) before Parquet files (typed), and a window across the two (text):
    windows of different schemas are prepared apart, and the tables equal those of the same
    replay with every window prepared alone."""
    first, *rest = small_market.trade_files
    text = tmp_path / "first.csv"
    pl.read_parquet(first).write_csv(text)
    files = [str(text), *rest]
    given_frames = _count_batches(monkeypatch)
    batched = new_target("batched")
    replay(files, small_market.refdata_dir, batched, window_rows=250)
    assert max(f.height for f in given_frames) > 250, "windows were prepared together"
    assert len({tuple(f.schema.items()) for f in given_frames}) >= 2, "the batches met both schemas"
    monkeypatch.setattr(engine, "PREPARE_PIECES_MAX", 1)
    alone = new_target("alone")
    replay(files, small_market.refdata_dir, alone, window_rows=250)
    with open_target(batched) as a, open_target(alone) as b:
        for name in TABLES:
            assert a.table(name).equals(b.table(name)), f"{name} differs"


def test_a_batch_that_fails_together_is_prepared_window_by_window(small_market, small_market_tables, new_target,
                                                                  monkeypatch):
    """The row-wise work failing for a batch (here: for any frame of more than one window)
    leaves each window to do its own: the same tables."""
    row_checks = validate._row_checks
    failed: list[int] = []

    def fails_together(raw, ref):
        if raw.height > 250:
            failed.append(raw.height)
            raise MemoryError("too many rows at once")
        return row_checks(raw, ref)

    monkeypatch.setattr(validate, "_row_checks", fails_together)
    db = new_target()
    replay(list(small_market.trade_files), small_market.refdata_dir, db, window_rows=250)
    assert failed, "the batches failed"
    with open_target(db) as t:
        for name in TABLES:
            assert t.table(name).equals(small_market_tables[name]), f"{name} differs"


def test_an_error_in_one_windows_rows_stops_the_run_after_the_windows_before_it(small_market, new_target,
                                                                                monkeypatch):
    """Window 5's rows cannot be prepared, alone or with others: windows 1-4, prepared in the
    same batch, still commit, and the error is raised."""
    (fifth,) = [raw for i, raw in enumerate(engine._windows(discover(list(small_market.trade_files)), {}, 250))
                if i == 4]
    marker = fifth.frame.select("source", "source_row").row(0)
    row_checks = validate._row_checks

    def fails_on_window_5(raw, ref):
        if raw.select((pl.col("source") == marker[0]) & (pl.col("source_row") == marker[1])).to_series().any():
            raise ValueError("window 5 cannot be prepared")
        return row_checks(raw, ref)

    monkeypatch.setattr(validate, "_row_checks", fails_on_window_5)
    db = new_target()
    with pytest.raises(ValueError, match="window 5 cannot be prepared"):
        replay(list(small_market.trade_files), small_market.refdata_dir, db, window_rows=250)
    with open_target(db) as t:
        cps = t.table("checkpoints").filter(pl.col("window_id") > 0)
        assert cps["window_id"].to_list() == [1, 2, 3, 4] and cps["rows"].sum() == 1000
