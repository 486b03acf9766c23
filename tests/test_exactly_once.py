"""SPEC §8 exactly once: re-runs add nothing, new files continue, changed files are refused,
and a replay SIGKILLed at any moment and started again ends with the tables of an
uninterrupted run, on every backend (the reference run is DuckDB: PostgreSQL must match it)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from snapshots import RESULT_TABLES, assert_same_tables, snapshot

from settle_arrow import UserError, engine, open_target, pipeline, replay
from settle_arrow.generate import MarketSpec, generate_market

SEED = 20250616


@pytest.fixture(scope="module")
def market(tmp_path_factory) -> Path:
    """~20k rows over 6 daily files, with bad rows, cancellations and negative holdings."""
    out = tmp_path_factory.mktemp("market")
    generate_market(out, MarketSpec(trades=20_000, seed=SEED, days=6, bad_rate=0.04, cancel_rate=0.05))
    return out


def _files(market: Path) -> list[str]:
    return sorted(str(p) for p in (market / "trades").glob("*.parquet"))


def _rows(path: str) -> int:
    return pq.ParquetFile(path).metadata.num_rows


@pytest.fixture(scope="module")
def reference(market, tmp_path_factory) -> dict:
    """One uninterrupted run over every file (window 700), the expected tables."""
    db = str(tmp_path_factory.mktemp("ref") / "ref.duckdb")
    report = replay([str(market / "trades")], str(market / "refdata"), db, window_rows=700)
    assert report.rows_read == sum(_rows(f) for f in _files(market))
    assert report.rows_quarantined > 0 and report.by_reason
    snap = snapshot(db)
    assert snap["exceptions"].height > 0, "the market should exercise NEGATIVE_HOLDING"
    return snap


# --- re-runs -------------------------------------------------------------------------


@pytest.mark.parametrize(("first", "again"), [(700, 3), (700, None), (None, 1000)])
def test_rerun_adds_nothing(market, reference, tmp_path, first, again, new_target):
    db = new_target()
    paths, ref = [str(market / "trades")], str(market / "refdata")

    def run(w):
        return replay(paths, ref, db, window_rows=w or 1, batch=w is None)

    run(first)
    before = snapshot(db)
    assert_same_tables(before, reference)  # any windowing: same tables (SPEC §8)
    report = run(again)
    assert (report.rows_read, report.rows_accepted, report.windows) == (0, 0, 0)
    assert report.rows_skipped == reference["trades"].height + reference["quarantine"].height
    after = snapshot(db)
    for name in before:  # exactly the same rows, checkpoints (row count, timestamps) included
        assert after[name].equals(before[name], null_equal=True), name
    assert after["checkpoints"].height == before["checkpoints"].height


def test_rerun_with_other_spellings_of_the_same_files(market, tmp_path, monkeypatch, new_target):
    """A directory, a glob, the file list and relative paths name the same files."""
    db = new_target()
    ref = str(market / "refdata")
    replay([str(market / "trades")], ref, db, window_rows=5000)
    before = snapshot(db)
    monkeypatch.chdir(market)
    for paths in ([str(market / "trades" / "*.parquet")], _files(market), ["trades"], ["./trades/"]):
        report = replay(paths, ref, db, window_rows=5000)
        assert report.rows_read == 0, paths
    after = snapshot(db)
    for name in before:
        assert after[name].equals(before[name], null_equal=True), name


def test_new_file_later_continues(market, reference, tmp_path, new_target):
    files, ref = _files(market), str(market / "refdata")
    db = new_target()
    first = replay(files[:3], ref, db, window_rows=900)
    assert first.rows_read == sum(_rows(f) for f in files[:3])
    cps = snapshot(db, ("checkpoints",))["checkpoints"].height
    # The same files again plus the next one: only the new file's rows are read.
    second = replay(files[:4], ref, db, window_rows=900)
    assert second.rows_skipped == first.rows_read
    assert second.rows_read == _rows(files[3])
    assert snapshot(db, ("checkpoints",))["checkpoints"].height > cps
    # Only the remaining files, named alone: they continue after the ones already in.
    third = replay(files[4:], ref, db, window_rows=900)
    assert third.rows_skipped == 0
    assert third.rows_read == sum(_rows(f) for f in files[4:])
    assert_same_tables(snapshot(db), reference)


def test_changed_file_is_refused(market, tmp_path, new_target):
    files, ref = _files(market), str(market / "refdata")
    mine = tmp_path / "trades"
    mine.mkdir()
    copies = []
    for f in files[:2]:
        copies.append(mine / Path(f).name)
        copies[-1].write_bytes(Path(f).read_bytes())
    db = new_target()
    replay([str(mine)], ref, db, window_rows=1000)
    before = snapshot(db)
    # The second file grows by one row (a later version of the day's feed).
    t = pq.read_table(copies[1])
    pq.write_table(pa.concat_tables([t, t.slice(0, 1)]), copies[1])
    with pytest.raises(UserError, match=r"changed since it was replayed"):
        replay([str(mine)], ref, db, window_rows=1000)
    # ... also when it comes alone; the message names the file.
    with pytest.raises(UserError, match=copies[1].name):
        replay([str(copies[1])], ref, db, window_rows=1000)
    after = snapshot(db)
    for name in before:
        assert after[name].equals(before[name], null_equal=True), name
    # The unchanged file alone is fine (nothing to do).
    assert replay([str(copies[0])], ref, db).rows_read == 0


def _same_size_edit(path: Path) -> None:
    """Change one digit of the file's last data row: the same number of bytes, other content."""
    body = path.read_bytes()
    at = body.rstrip(b"\n").rfind(b"\n") + 1
    digit = next(i for i in range(len(body) - 1, at, -1) if body[i:i + 1].isdigit())
    path.write_bytes(body[:digit] + (b"1" if body[digit:digit + 1] != b"1" else b"2") + body[digit + 1:])


def _as_csv(parquet: str, out: Path) -> Path:
    pl.read_parquet(parquet).with_columns(pl.all().cast(pl.String)).write_csv(out)
    return out


@pytest.mark.parametrize("finished", [False, True], ids=["partly-replayed", "finished"])
def test_same_size_changed_file_is_refused(market, tmp_path, new_target, finished, monkeypatch):
    """Another file of the same size under a replayed name (a corrected feed that changed
    one digit) is refused by its bytes' sha256: its rows after the committed offset would
    continue another file, and a finished one would hide the correction."""
    files, ref = _files(market), str(market / "refdata")
    csv = _as_csv(files[0], tmp_path / "day.csv")
    db = new_target()
    if finished:
        replay([str(csv)], ref, db, window_rows=1000)
    else:
        _stop_after_rows(csv, ref, db, monkeypatch)
    before = snapshot(db)
    size = csv.stat().st_size
    _same_size_edit(csv)
    assert csv.stat().st_size == size
    with pytest.raises(UserError, match=r"changed since it was replayed .*same size, other bytes: sha256"):
        replay([str(csv)], ref, db, window_rows=1000)
    after = snapshot(db)
    for name in before:
        assert after[name].equals(before[name], null_equal=True), name


class _Stop(Exception):
    pass


def _stop_after_rows(csv: Path, ref: str, db: str, monkeypatch) -> None:
    """Replay `csv` into `db` and stop after its first commit, as an interrupted run leaves
    a TARGET: windows committed, the rest of the file not read. The commit lane counts as
    busy, so every group holds COMMIT_GROUP_WINDOWS_MAX windows whatever the machine's
    load, and the callback stops the run before the second group is handed over."""
    monkeypatch.setattr(pipeline.CommitLane, "busy", lambda self: True)

    def stop(rows_read: int, _windows: int) -> None:
        raise _Stop

    with pytest.raises(_Stop):
        replay([str(csv)], ref, db, window_rows=100, on_window=stop)
    monkeypatch.undo()
    with open_target(db) as t:
        (progress,) = t.status().sources
    assert progress["rows_done"] == 100 * engine.COMMIT_GROUP_WINDOWS_MAX < pl.read_csv(csv).height


# --- SIGKILL at any moment -------------------------------------------------------------

HARNESS = textwrap.dedent(
    """
    # Runs the real CLI; SA_TRAP=KIND:N makes the process announce the Nth time it reaches a
    # point and then wait there, so the test can SIGKILL it exactly at that point (or, with
    # SA_TRAP_RESUME, drop its database connection and let it go on by writing a line to stdin).
    import os, sys, time
    from settle_arrow import engine
    from settle_arrow.cli import app
    from settle_arrow.storage.duckdb import DuckDBStorage
    from settle_arrow.storage.postgres import PostgresStorage

    kind, _, nth = os.environ.get("SA_TRAP", ":0").rpartition(":")
    hits = {"n": 0}
    announce = bool(os.environ.get("SA_ANNOUNCE"))
    if os.environ.get("SA_COMPACT_MIN"):
        engine.COMPACT_ROWS_MIN = int(os.environ["SA_COMPACT_MIN"])
    if os.environ.get("SA_GROUP_WINDOWS"):
        # Groups of exactly this many windows whatever the timing (traps count statements).
        from settle_arrow import pipeline
        engine.COMMIT_GROUP_WINDOWS_MAX = int(os.environ["SA_GROUP_WINDOWS"])
        pipeline.CommitLane.busy = lambda self: True
    elif os.environ.get("SA_GROUP_WINDOWS_MAX"):  # groups of at most this many, as timing forms them
        engine.COMMIT_GROUP_WINDOWS_MAX = int(os.environ["SA_GROUP_WINDOWS_MAX"])
    if os.environ.get("SA_PIECE_ROWS"):  # large windows in pieces, state runs frozen and spilled early
        from settle_arrow import state
        engine.PIECE_ROWS_MAX = int(os.environ["SA_PIECE_ROWS"])
        state.SEEN_FROZEN_ROWS = state.ACCEPTED_FROZEN_ROWS = int(os.environ["SA_PIECE_ROWS"])
        state.CANCELLED_FROZEN_ROWS = 8

    def trap(point):
        if kind and point.startswith(kind):
            hits["n"] += 1
            if hits["n"] == int(nth):
                sys.stderr.write("TRAPPED\\n")
                sys.stderr.flush()
                if os.environ.get("SA_TRAP_RESUME"):
                    sys.stdin.readline()
                else:
                    time.sleep(60)

    def patch(cls):
        append, execute, commit = cls._append, cls._execute, cls._commit

        def _append(self, table, data):
            append(self, table, data)
            trap(f"append-{table}")

        def _execute(self, sql, params=()):
            execute(self, sql, params)
            trap(sql.split(" WHERE")[0])

        def _commit(self):
            trap("before-commit")
            commit(self)
            if announce:
                sys.stderr.write("COMMITTED\\n")
                sys.stderr.flush()
            trap("after-commit")

        cls._append, cls._execute, cls._commit = _append, _execute, _commit

    patch(DuckDBStorage)
    patch(PostgresStorage)
    sys.argv = ["settle-arrow", *sys.argv[1:]]
    app()
    """
)


def _replay_cmd(harness: Path, market: Path, db: str, window: int) -> list[str]:
    return [sys.executable, str(harness), "replay", str(market / "trades"), "--refdata", str(market / "refdata"),
            "--db", db, "--window", str(window), "--quiet"]


def _committed_rows(db: str) -> int:
    try:
        with open_target(db) as t:
            return t.storage.count("trades") + t.storage.count("quarantine")
    except UserError:  # killed before the schema was committed
        return 0


def _kill_after(cmd: list[str], delay: float, env: dict | None = None) -> bool:
    """Start `cmd`, SIGKILL it after `delay` s; True if it was killed (not finished)."""
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        _, err = p.communicate(timeout=delay)
    except subprocess.TimeoutExpired:
        p.send_signal(signal.SIGKILL)
        p.communicate()
        return True
    assert p.returncode == 0, err.decode()
    return False


def _kill_at_trap(cmd: list[str], trap: str, env_extra: dict | None = None) -> None:
    # One window a commit unless asked otherwise: traps count statements, and the groups
    # that form by themselves depend on timing.
    env = dict(os.environ, SA_TRAP=trap, **{"SA_GROUP_WINDOWS": "1", **(env_extra or {})})
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        assert p.stderr is not None
        line = p.stderr.readline()
        assert line.strip() == b"TRAPPED", f"trap {trap} never reached: {line!r} {p.stderr.read()[-2000:]!r}"
    finally:
        p.send_signal(signal.SIGKILL)
        p.communicate()


def _finish(cmd: list[str]) -> None:
    done = subprocess.run(cmd, capture_output=True, env=dict(os.environ, SA_TRAP=":0"), timeout=120)
    assert done.returncode == 0, done.stderr.decode()[-3000:]


def _check_against(db: str, reference: dict, total_rows: int) -> None:
    got = snapshot(db)
    assert_same_tables({n: got[n] for n in RESULT_TABLES}, {n: reference[n] for n in RESULT_TABLES})
    # Bookkeeping: every input row is in exactly one committed window.
    cps = got["checkpoints"].filter(got["checkpoints"]["window_id"] > 0)
    assert cps["rows"].sum() == total_rows
    assert cps["window_id"].is_unique().all()
    assert cps.select("source", "offset").is_unique().all()


@pytest.fixture(scope="module")
def harness(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("harness") / "sa_harness.py"
    path.write_text(HARNESS)
    return path


def test_sigkill_at_random_moments(market, reference, harness, tmp_path, new_target):
    db = new_target()
    total = sum(_rows(f) for f in _files(market))
    rng = random.Random(SEED)
    # Small windows, at most two a commit (a replay behind its input groups up to 16 for an
    # idle lane too): many commits, so random kills often land inside one.
    window, group = 600, {"SA_GROUP_WINDOWS_MAX": "2"}
    cmd = _replay_cmd(harness, market, db, window)
    # Very early kills by the clock (interpreter start-up, schema creation, opening
    # holdings) ...
    for delay in (0.05, 0.5, 0.7):
        assert _kill_after(cmd, delay, dict(os.environ, SA_TRAP=":0")), "finished before an early kill"
    # ... then kills at random moments through the run, paced by the process's own
    # commits so they land mid-run however fast this machine is: after k commits, wait a
    # random fraction of a window's time and kill (in processing, appends or COMMIT).
    progress, partial = [_committed_rows(db)], 0
    for _ in range(6):
        killed = _kill_after_commits(cmd, rng.randint(1, 6), rng.uniform(0.0, 0.08), group)
        progress.append(_committed_rows(db))
        partial += killed and 0 < progress[-1] < total
        if not killed:
            break
    assert partial >= 3, f"kills should land mid-run (committed rows after each: {progress})"
    print("committed rows after each kill:", progress)
    assert progress == sorted(progress), "committed rows never go backwards"
    _finish(cmd)
    _check_against(db, reference, total)
    _finish(cmd)  # and once more: nothing left to do
    _check_against(db, reference, total)


def _kill_after_commits(cmd: list[str], commits: int, delay: float, env_extra: dict | None = None) -> bool:
    """SIGKILL `cmd` `delay` s after its `commits`-th COMMIT; True if it was killed."""
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         env=dict(os.environ, SA_TRAP=":0", SA_ANNOUNCE="1", **(env_extra or {})))
    assert p.stderr is not None
    seen = 0
    while seen < commits:
        line = p.stderr.readline()
        if not line:  # finished (or failed) before that many commits
            p.wait()
            assert p.returncode == 0, p.stderr.read()
            return False
        seen += line.strip() == b"COMMITTED"
    time.sleep(delay)
    p.send_signal(signal.SIGKILL)
    p.communicate()
    return p.returncode == -signal.SIGKILL


@pytest.mark.parametrize(
    ("traps", "group"),
    [
        # schema creation; inside a window's transaction after its data, before its
        # checkpoint row, before COMMIT; right after COMMIT, before in-memory state moves on
        (["CREATE TABLE IF NOT EXISTS quarantine:1", "append-trade_facts:3", "append-checkpoints:2",
          "before-commit:5", "after-commit:4"], 1),
        # the opening-holdings commit (window 0), then while a window writes source offsets
        (["append-opening_holdings:1", "INSERT INTO sources:3", "DELETE FROM sources:7"], 1),
        # group commits of three windows each, killed inside the second group's transaction
        # (after its rows, after its checkpoint rows, before COMMIT) and right after one
        (["append-trade_facts:2", "append-checkpoints:2", "before-commit:2", "after-commit:1"], 3),
    ],
    ids=["one-window-commits", "opening-and-offsets", "group-commits"],
)
def test_sigkill_mid_commit(market, reference, harness, tmp_path, traps, group, new_target):
    db = new_target()
    total = sum(_rows(f) for f in _files(market))
    cmd = _replay_cmd(harness, market, db, 2000)
    for trap in traps:
        _kill_at_trap(cmd, trap, {"SA_GROUP_WINDOWS": str(group)})
        # Whole groups or nothing: committed rows are whole windows (2,000 rows each, the
        # last window aside).
        assert _committed_rows(db) % 2000 == 0 or _committed_rows(db) == total
    _finish(cmd)
    _check_against(db, reference, total)
    if group > 1:  # the groups did form: windows of one commit share its committed_at
        stamps = snapshot(db)["checkpoints"].filter(pl.col("window_id") > 0)["committed_at"]
        assert stamps.value_counts()["count"].max() >= group


def test_sigkill_mid_compaction(market, reference, harness, tmp_path, new_target):
    """Compaction (folding delta tables and the obligations snapshot) forced early and killed half-way: no
    effect on results."""
    db = new_target()
    total = sum(_rows(f) for f in _files(market))
    cmd = _replay_cmd(harness, market, db, 1000)
    compact = {"SA_COMPACT_MIN": "300"}  # folds every delta table several times in this run
    for trap in ("DELETE FROM obligations_cash_delta:1", "DELETE FROM obligations_securities_snapshot:1",
                 "DELETE FROM holdings_snapshot:1"):
        _kill_at_trap(cmd, trap, compact)
    done = subprocess.run(cmd, capture_output=True, env=dict(os.environ, SA_TRAP=":0", **compact), timeout=120)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    _check_against(db, reference, total)


@pytest.mark.parametrize("window", [5_000, None], ids=["window-5000", "batch"])
def test_sigkill_between_the_pieces_of_a_window(market, reference, harness, tmp_path, new_target, window):
    """Windows processed in pieces (state frozen and spilled early too), killed after some
    pieces were appended and again just before the window's checkpoint: no piece of an
    unfinished window is ever visible, and the finished run matches."""
    db = new_target()
    total = sum(_rows(f) for f in _files(market))
    cmd = _replay_cmd(harness, market, db, window or 1) + (["--batch"] if window is None else [])
    pieces = {"SA_PIECE_ROWS": "1500"}
    for trap in ("append-trade_facts:3", "append-checkpoints:1"):
        _kill_at_trap(cmd, trap, pieces)
        committed = _committed_rows(db)
        assert committed % (window or total) == 0, f"part of a window is visible: {committed} rows"
    done = subprocess.run(cmd, capture_output=True, env=dict(os.environ, SA_TRAP=":0", **pieces), timeout=120)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    _check_against(db, reference, total)


def test_killed_run_then_rerun_with_other_window(market, reference, harness, tmp_path, new_target):
    """Resume with a different window size (and finally a batch) after kills."""
    db = new_target()
    total = sum(_rows(f) for f in _files(market))
    _kill_at_trap(_replay_cmd(harness, market, db, 700), "append-checkpoints:6")
    _kill_at_trap(_replay_cmd(harness, market, db, 1300), "before-commit:3")
    _finish([*_replay_cmd(harness, market, db, 1), "--batch"])
    _check_against(db, reference, total)


def test_sigkill_csv_input(harness, tmp_path, new_target):
    """CSV inputs resume mid-file at the committed row (header and all) after kills."""
    market = tmp_path / "csv"
    generate_market(market, MarketSpec(trades=6000, seed=SEED + 1, days=3, bad_rate=0.05, cancel_rate=0.05, fmt="csv"))
    ref_db = new_target("ref")
    report = replay([str(market / "trades")], str(market / "refdata"), ref_db, batch=True)
    reference = snapshot(ref_db)
    db = new_target()
    _kill_at_trap(_replay_cmd(harness, market, db, 700), "append-checkpoints:4")  # inside window 3
    _kill_at_trap(_replay_cmd(harness, market, db, 333), "before-commit:6")
    _finish(_replay_cmd(harness, market, db, 1100))
    _check_against(db, reference, report.rows_read)


# --- a dropped database connection (PostgreSQL) -----------------------------------------


def _storage_error(err: str) -> None:
    """Exit 4 printed exactly one `error: lost the connection ...` line, no traceback."""
    lines = [ln for ln in err.splitlines() if ln.strip() not in ("COMMITTED", "TRAPPED")]
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("error: lost the connection to postgresql://"), err


@pytest.mark.parametrize("traps", [["append-quarantine:3", "before-commit:4", "after-commit:2", "INSERT INTO sources:5"]])
def test_dropped_connection_at_chosen_points(market, reference, harness, pg_backend, tmp_path, traps):
    """pg_terminate_backend of the writer inside a window (after its data, before COMMIT),
    right after a COMMIT and while offsets are written: one clear error line and exit 4;
    the re-run completes with the tables of an uninterrupted run."""
    backend, db = pg_backend, pg_backend.new(tmp_path)
    total = sum(_rows(f) for f in _files(market))
    cmd = _replay_cmd(harness, market, db, 1500)
    for trap in traps:
        p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             env=dict(os.environ, SA_TRAP=trap, SA_TRAP_RESUME="1", SA_GROUP_WINDOWS="1"))
        assert p.stderr is not None and p.stdin is not None
        line = p.stderr.readline()
        assert line.strip() == b"TRAPPED", line + p.stderr.read()
        assert backend.terminate_writers() == 1
        _, err = p.communicate(b"go\n", timeout=60)
        assert p.returncode == 4, err.decode()
        _storage_error(err.decode())
    _finish(cmd)
    _check_against(db, reference, total)


def test_dropped_connection_at_random_moments(market, reference, harness, pg_backend, tmp_path):
    backend, db = pg_backend, pg_backend.new(tmp_path)
    total = sum(_rows(f) for f in _files(market))
    # Small windows, each its own commit: four drops, each after at most 5 commits and 50
    # ms, must land mid-run however fast windows commit (600-row windows once let a faster
    # engine finish first, and group commits of up to 16 windows left a later run too few
    # commits to be dropped in).
    cmd = _replay_cmd(harness, market, db, 150)
    rng = random.Random(SEED + 3)
    dropped = 0
    for _ in range(4):
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             env=dict(os.environ, SA_TRAP=":0", SA_ANNOUNCE="1", SA_GROUP_WINDOWS_MAX="1"))
        assert p.stderr is not None
        for _ in range(rng.randint(1, 5)):
            if p.stderr.readline().strip() != b"COMMITTED":
                break
        time.sleep(rng.uniform(0.0, 0.05))
        terminated = backend.terminate_writers()
        _, err = p.communicate(timeout=60)
        if p.returncode == 0:  # it finished before the drop
            break
        assert terminated == 1 and p.returncode == 4, err.decode()
        _storage_error(err.decode())
        dropped += 1
    assert dropped >= 2
    _finish(cmd)
    _check_against(db, reference, total)

