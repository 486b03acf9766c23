"""A DuckDB TARGET keeps the engine's frozen key runs (seen, accepted, cancelled) as files
catalogued by its commits (schema.STATE_RUNS), and a restart maps them and replays only
the history after them: the rebuilt state equals the state of an uninterrupted engine,
whatever happened to those files, and the tables keep their golden digests.

Freeze sizes are a few dozen keys here, so the bundled sample freezes many runs.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from settle_arrow import engine, recovery, state
from settle_arrow.dims import DimIds, in_reference_order
from settle_arrow.engine import Engine, replay
from settle_arrow.io.files import discover
from settle_arrow.refdata import load_refdata
from settle_arrow.storage import open_storage
from settle_arrow.storage.duckdb import DuckDBStorage
from tests.test_golden import GOLDEN, SAMPLE, _digests

REFDATA = str(SAMPLE / "refdata")
FILES = sorted(str(p) for p in (SAMPLE / "trades").glob("*.parquet"))


@pytest.fixture(autouse=True)
def small_runs(monkeypatch, tmp_path):
    monkeypatch.setattr(state, "SEEN_FROZEN_ROWS", 60)
    monkeypatch.setattr(state, "ACCEPTED_FROZEN_ROWS", 25)
    monkeypatch.setattr(state, "CANCELLED_FROZEN_ROWS", 2)
    monkeypatch.setattr(state, "SPILL_DIR", str(tmp_path / "spill"))


def _content(runs: state.SortedRuns) -> dict[int, tuple[int, ...]]:
    out: dict[int, tuple[int, ...]] = {}
    for keys, cols in runs.runs:
        for i, k in enumerate(keys.tolist()):
            assert k not in out, "a key in two runs"
            out[k] = tuple(int(cols[c][i]) for c in sorted(cols))
    return out


def _history(storage, ref, dims) -> state.EngineState:
    to_ref = [recovery._to_ref(DimIds.inverse(d)) for d in (dims.account, dims.unit, dims.security)]
    return recovery._history(storage, ref.n_sec, in_reference_order(dims), *to_ref)


def _same_history(a: state.EngineState, b: state.EngineState) -> None:
    for name in state.KEPT_SETS:
        assert _content(getattr(a, name)) == _content(getattr(b, name)), name
    assert a.odd_seen.equals(b.odd_seen)


def _check_coverage(storage, live: state.EngineState) -> None:
    """Each catalogued run's covered_window holds: every key of the windows up to it is in
    that run or an earlier one of its set (recovery replays only the windows after)."""
    t = storage.query("SELECT f.trade_date, f.trade_id, f.ref_trade_id, f.sign, f.window_id, s.market "
                      "FROM trade_facts f JOIN dim_security s ON s.id = f.sec_id")
    codes = state.market_codes(pl.from_arrow(t["market"]))
    keys = state.pack_keys(codes, pl.from_arrow(t["trade_date"]), pl.from_arrow(t["trade_id"]))[0]
    refs = state.pack_keys(codes, pl.from_arrow(t["trade_date"]), pl.from_arrow(t["ref_trade_id"]))[0]
    sign, window = t["sign"].to_numpy(), t["window_id"].to_numpy()
    wanted = {"seen": (keys, np.ones(len(keys), bool)), "accepted": (keys, sign == 1), "cancelled": (refs, sign == -1)}
    checked = 0
    for run in storage.state_runs():
        held = {int(k) for keys_r, _ in getattr(live, run.set_name).runs[: run.run_no + 1] for k in keys_r}
        these, rows = wanted[run.set_name]
        due = {int(k) for k in these[rows & (window <= run.covered_window)]}
        assert due <= held, f"{run.set_name} run {run.run_no} misses keys of windows <= {run.covered_window}"
        checked += bool(due)
    assert checked


def _run(db: str, files: list[str], window: int | None) -> Engine:
    """An engine that replayed `files` into `db` (open: the caller closes its storage)."""
    storage = open_storage(db)
    eng = Engine(storage, load_refdata(REFDATA))
    eng.run(discover(files), window)
    return eng


def test_restart_maps_the_kept_runs_and_replays_only_the_windows_after_them(tmp_path):
    db = str(tmp_path / "t.duckdb")
    eng = _run(db, FILES[:4], 97)
    try:
        kept = eng.storage.state_runs()
        assert {r.set_name for r in kept} == set(state.KEPT_SETS), "every set froze runs"
        for name in state.KEPT_SETS:
            assert [r.run_no for r in kept if r.set_name == name] == list(range(getattr(eng.state, name).n_frozen))
        covered = min(max(r.covered_window for r in kept if r.set_name == name) for name in state.KEPT_SETS)
        assert covered > 1
        # The same TARGET elsewhere, without the trade detail of the windows every set's
        # runs cover: recovery must not need it.
        eng.storage.close()
        copy = tmp_path / "copy.duckdb"
        shutil.copy(db, copy)
        shutil.copytree(db + ".segments", str(copy) + ".segments")
        gone = [p for p in Path(str(copy) + ".segments").glob("trade_facts-*.parquet")
                if 0 < int(p.name.split("-")[1]) <= covered]
        assert gone
        for p in gone:
            p.unlink()
        storage = open_storage(str(copy))
        replayed: list[int] = []
        batches = storage.query_batches

        def counted(sql, rows):
            for batch in batches(sql, rows):
                replayed.append(batch.num_rows if "trade_facts" in sql else 0)
                yield batch

        storage.query_batches = counted
        try:
            rebuilt = _history(storage, eng.refdata, eng.dims)
            after = storage.query("SELECT COUNT(*) AS n FROM trade_facts WHERE window_id > ?", (covered,))["n"][0]
            assert 0 < sum(replayed) <= after.as_py(), "only the windows after the kept runs replay"
            _same_history(rebuilt, eng.state)
            assert all(getattr(rebuilt, n).n_frozen >= len([r for r in kept if r.set_name == n]) for n in state.KEPT_SETS)
            mapped = rebuilt.seen.runs[0][0]
            assert not mapped.flags.writeable, "kept runs are mapped, not read into memory"
        finally:
            storage.close()
    finally:
        eng.storage.close()


@pytest.mark.parametrize("window", [97, 5_000, None], ids=["window-97", "pieces", "batch"])
def test_runs_kept_across_restarts_keep_the_digests(tmp_path, monkeypatch, window):
    """Restarts at several points (runs frozen mid-window by pieces, and during recovery)
    give the tables of one uninterrupted run, each restart's state equals the live one, and
    every catalogued run covers what it says."""
    monkeypatch.setattr(engine, "PIECE_ROWS_MAX", 333)
    if window != 97:  # runs larger than a piece: they freeze in any piece, not only a window's last
        monkeypatch.setattr(state, "SEEN_FROZEN_ROWS", 1_000)
        monkeypatch.setattr(state, "ACCEPTED_FROZEN_ROWS", 700)
    db = str(tmp_path / "t.duckdb")
    for upto in (2, 4, 6):
        eng = _run(db, FILES[:upto], window)
        try:
            _check_coverage(eng.storage, eng.state)
            _same_history(_history(eng.storage, eng.refdata, eng.dims), eng.state)
        finally:
            eng.storage.close()
    assert _digests(db) == GOLDEN


def test_runs_written_after_their_window_are_catalogued_by_a_later_commit(tmp_path, monkeypatch):
    """A frozen run is written in the background: one whose write ends after its window
    committed is catalogued by a later commit, or after the run's last, still with the
    window it covers; when the run returns every frozen run is catalogued, in order, and
    a restart from them keeps the golden digests."""
    spill = state._spill

    def slow(*args):
        time.sleep(0.03)  # several 97-row windows commit meanwhile
        return spill(*args)

    monkeypatch.setattr(state, "_spill", slow)
    db = str(tmp_path / "t.duckdb")
    for upto in (3, 6):
        eng = _run(db, FILES[:upto], 97)
        try:
            for name in state.KEPT_SETS:
                runs = [r.run_no for r in eng.storage.state_runs() if r.set_name == name]
                assert runs == list(range(getattr(eng.state, name).n_frozen)), f"{name}: every run catalogued"
            _check_coverage(eng.storage, eng.state)
            _same_history(_history(eng.storage, eng.refdata, eng.dims), eng.state)
            rows = eng.storage.query("SELECT covered_window, window_id FROM state_runs")
            late = [c < w for c, w in zip(rows["covered_window"].to_pylist(), rows["window_id"].to_pylist(), strict=True)]
            assert any(late), "some run catalogued by a later commit than its window's"
        finally:
            eng.storage.close()
    assert _digests(db) == GOLDEN


def test_a_failed_run_write_fails_the_run_and_a_restart_rebuilds(tmp_path, monkeypatch):
    """A frozen run whose write fails (a full disk, say) stops the run with that error
    before any commit catalogues it; the next run rebuilds the state from the database and
    the tables keep their golden digests."""
    spill = state._spill
    writes = []

    def failing(*args):
        writes.append(args[-1])
        if len(writes) == 4:
            raise OSError(28, "No space left on device")
        return spill(*args)

    monkeypatch.setattr(state, "_spill", failing)
    db = str(tmp_path / "t.duckdb")
    with pytest.raises(OSError, match="No space left"):
        replay(FILES[:4], REFDATA, db, window_rows=97)
    storage = open_storage(db)
    try:
        catalogued = storage.state_runs()
    finally:
        storage.close()
    failed = writes[3]
    assert failed is not None and all(r.files != failed for r in catalogued), "the failed run is not catalogued"
    monkeypatch.setattr(state, "_spill", spill)
    replay(FILES, REFDATA, db, window_rows=97)
    assert _digests(db) == GOLDEN


@pytest.mark.parametrize("damage", ["missing", "truncated", "renamed"])
def test_a_damaged_kept_run_is_rebuilt_from_the_history(tmp_path, damage):
    db = str(tmp_path / "t.duckdb")
    eng = _run(db, FILES[:3], 97)
    live = eng.state
    kept = [r for r in eng.storage.state_runs() if r.set_name == "accepted"]
    eng.storage.close()
    victim = Path(db + ".segments") / kept[1].files["quantity"]
    if damage == "missing":
        victim.unlink()
    elif damage == "truncated":
        victim.write_bytes(victim.read_bytes()[:-3])
    else:  # a catalogue that names a run out of its place
        victim.rename(victim.with_name(victim.name.replace("-000001-", "-000009-")))
        storage = DuckDBStorage(db)
        with storage.transaction():
            storage._execute("UPDATE state_runs SET file = replace(file, '-000001-', '-000009-') "
                             "WHERE set_name = 'accepted' AND run_no = 1 AND column_name = 'quantity'")
        storage.close()
    storage = open_storage(db)
    try:
        rebuilt = _history(storage, load_refdata(REFDATA), eng.dims)
        _same_history(rebuilt, live)
        assert not [r for r in storage.state_runs() if r.set_name == "accepted"], "its catalogue is dropped"
        assert [r for r in storage.state_runs() if r.set_name == "seen"], "the other sets keep theirs"
    finally:
        storage.close()
    replay(FILES, REFDATA, db, window_rows=97)
    assert _digests(db) == GOLDEN
    storage = open_storage(db)
    try:
        assert [r.run_no for r in storage.state_runs() if r.set_name == "accepted"][:2] == [0, 1], "kept anew"
    finally:
        storage.close()


def test_reference_rows_in_another_order_rebuild_from_the_history(tmp_path):
    """Kept accepted runs hold reference row indices: with accounts listed in another order
    they would name other accounts, so the catalogue is dropped and nothing is kept."""
    ref_dir = tmp_path / "refdata"
    shutil.copytree(REFDATA, ref_dir)
    accounts = pl.read_parquet(ref_dir / "accounts.parquet")
    db = str(tmp_path / "t.duckdb")
    replay(FILES[:3], str(ref_dir), db, window_rows=97)
    accounts.reverse().write_parquet(ref_dir / "accounts.parquet")
    storage = open_storage(db)
    try:
        ref = load_refdata(str(ref_dir))
        eng = Engine(storage, ref)
        assert not in_reference_order(eng.dims)
        assert storage.state_runs() == [] and eng.state.seen.kept == []
        eng.run(discover(FILES), 97)
        assert storage.state_runs() == []
    finally:
        storage.close()
    assert _digests(db) == GOLDEN


def test_files_no_commit_catalogued_are_swept_and_catalogued_ones_stay(tmp_path):
    db = str(tmp_path / "t.duckdb")
    replay(FILES[:2], REFDATA, db, window_rows=97)
    segments = Path(db + ".segments")
    kept = {p.name for p in segments.glob("*.bin")}
    assert kept
    (segments / "seen-000999-key.bin").write_bytes(np.arange(4, dtype=np.uint64).tobytes())
    (segments / "settle_arrow_run_x.tmp").write_bytes(b"partial")
    open_storage(db).close()
    assert {p.name for p in segments.glob("*.bin")} == kept
    assert not list(segments.glob("*.tmp"))


def test_a_failed_commit_removes_its_runs_and_the_rerun_keeps_them_anew(tmp_path, monkeypatch):
    """The commit that would catalogue fresh runs fails: its files go with its rollback,
    and the next run (state rebuilt from the database) keeps runs again and ends with the
    golden tables."""
    db = str(tmp_path / "t.duckdb")
    put, calls = DuckDBStorage._put_state_runs, []

    def failing(self, window_id, runs):
        put(self, window_id, runs)
        calls.append([p for r in runs for p in r.files.values()])
        if len(calls) == 3:
            raise OSError("disk full")

    monkeypatch.setattr(DuckDBStorage, "_put_state_runs", failing)
    storage = open_storage(db)
    try:
        eng = Engine(storage, load_refdata(REFDATA))
        with pytest.raises(OSError, match="disk full"):
            eng.run(discover(FILES), 97)
        assert not [f for f in calls[2] if (Path(db + ".segments") / f).exists()], "rolled back with its window"
        monkeypatch.setattr(DuckDBStorage, "_put_state_runs", put)
        eng.run(discover(FILES), 97)
        catalogued = {r.set_name: r.run_no for r in storage.state_runs()}
        assert all(catalogued[n] + 1 == getattr(eng.state, n).n_frozen for n in state.KEPT_SETS)
    finally:
        storage.close()
    assert _digests(db) == GOLDEN


def test_postgres_keeps_no_runs(new_target):
    db = new_target()
    if "://" not in db:
        pytest.skip("a backend with a state directory")
    eng = _run(db, FILES[:2], 97)
    try:
        assert eng.storage.state_dir is None and eng.storage.state_runs() == []
        assert eng.state.seen.n_frozen and eng.state.seen.kept == []
        _same_history(_history(eng.storage, eng.refdata, eng.dims), eng.state)
    finally:
        eng.storage.close()
