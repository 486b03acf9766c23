"""Readers while a replay writes (issue 3 §5): they see whole committed windows only.

PostgreSQL: any process reads during a replay (MVCC); `Target.snapshot()` makes several
reads agree. DuckDB: one process at a time while one writes; other processes get one clear
line (tests/test_cli.py::test_target_in_use), the writing process itself can read
(a notebook thread beside `replay`)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from test_cli import cli, ok

from settle_arrow import open_target, replay
from settle_arrow.generate import MarketSpec, generate_market

WINDOW = 100
# The other process's replay must last long enough for a polling reader (and a CLI status
# process between its reads) to land mid-run, however fast the engine and however loaded
# the machine: a faster engine once finished 90 windows of 100 rows between two reads, and
# one later 240 windows of 25 rows in three reads under the parallel suite. So it replays
# as a live feed: 9,000 trades at PG_PACE trades/s take at least 6 s.
PG_WINDOW = 25
PG_PACE = 1500


@pytest.fixture(scope="module")
def market(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("readers")
    generate_market(out, MarketSpec(trades=9000, seed=31, days=3, bad_rate=0.05, cancel_rate=0.05))
    return out


def committed_state(db: str) -> int:
    """Rows committed, after checking that one snapshot holds whole windows only."""
    with open_target(db) as t, t.snapshot():
        cps = t.arrow("checkpoints").to_pylist()
        rows = t.storage.count("trades") + t.storage.count("quarantine")
        sources = t.status().sources
    windows = [c for c in cps if c["window_id"] > 0]
    assert [c["window_id"] for c in windows] == list(range(1, len(windows) + 1)), "no gap, no half window"
    assert rows == sum(c["rows"] for c in windows) == sum(s["rows_done"] for s in sources)
    return rows


def _read(db: str, seen: list[int]) -> None:
    try:
        seen.append(committed_state(db))
    except Exception as exc:  # before the writer created the tables
        if "holds no settle_arrow data" not in str(exc) and "does not exist" not in str(exc):
            raise


def _watch(db: str, running) -> list[int]:
    seen: list[int] = []
    while running():
        _read(db, seen)
    return seen


def test_postgres_reader_process_sees_whole_windows(market, pg_backend, tmp_path):
    db = pg_backend.new(tmp_path)
    total = 9000
    writer = subprocess.Popen(
        [sys.executable, "-m", "settle_arrow.cli", "replay", str(market / "trades"), "--refdata",
         str(market / "refdata"), "--db", db, "--window", str(PG_WINDOW), "--pace", str(PG_PACE), "--quiet"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    statuses, seen = [], []
    try:
        while writer.poll() is None:
            _read(db, seen)
            if len(seen) % 2 and writer.poll() is None:  # a second CLI process reads too
                res = cli("status", "--db", db, "--json")
                if res.returncode == 0:
                    statuses.append(json.loads(res.stdout))
                else:
                    assert "holds no settle_arrow data" in res.stderr, res.stderr
    finally:
        _, err = writer.communicate(timeout=120)
    assert writer.returncode == 0, err.decode()
    partial = sorted({n for n in seen if 0 < n < total})
    assert len(partial) >= 3, f"reads should land mid-run: {seen}"
    assert seen == sorted(seen), "committed rows never go backwards"
    assert statuses, "a second CLI process read during the replay"
    for s in statuses:  # each CLI status is one consistent snapshot too
        rc = s["row_counts"]
        assert rc["trades"] + rc["quarantine"] == sum(src["rows_done"] for src in s["sources"])
    assert committed_state(db) == total


def test_duckdb_reader_in_the_writing_process(market, tmp_path):
    """A notebook runs `replay` in a thread and reads the same DuckDB file meanwhile."""
    db = str(tmp_path / "nb.duckdb")
    started, done, errors = threading.Event(), threading.Event(), []

    def run():
        try:
            replay([str(market / "trades")], str(market / "refdata"), db, window_rows=WINDOW,
                   on_start=lambda sources: started.set())
        except Exception as exc:  # noqa: BLE001 - reported by the test thread
            errors.append(exc)
        finally:
            started.set()
            done.set()

    thread = threading.Thread(target=run)
    thread.start()
    started.wait(60)
    seen = _watch(db, lambda: not done.is_set())
    thread.join()
    assert not errors, errors
    assert len({n for n in seen if 0 < n < 9000}) >= 3, seen
    assert seen == sorted(seen)
    assert committed_state(db) == 9000
    # ... and once the replay is over, other processes read it as usual
    assert json.loads(ok(cli("status", "--db", db, "--json")).stdout)["windows"] > 9000 // WINDOW
