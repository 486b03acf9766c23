"""Optimisations never change content: the bundled sample's output tables have the digests
recorded by the engine before the performance work (commit 51d08eb, the straightforward
one-thread engine), for any windowing, on every backend.

tests/golden/sample_digests.json holds them: table -> settle_arrow digest v1 of the table in
its output schema, with `source` URLs reduced to file names (the checkout's path differs
between machines). A legitimate change of output (a SPEC change) re-records the file.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.compute as pc
import pytest

from settle_arrow.digest import table_digest
from settle_arrow.engine import replay
from settle_arrow.target import open_target

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "samples"
GOLDEN = json.loads((Path(__file__).parent / "golden" / "sample_digests.json").read_text(encoding="utf-8"))


def _digests(db: str) -> dict[str, str]:
    out = {}
    with open_target(db) as t:
        for name in GOLDEN:
            data = t.arrow(name)
            if "source" in data.column_names:
                i = data.column_names.index("source")
                data = data.set_column(i, "source", pc.replace_substring_regex(data["source"], r"^.*/", ""))
            out[name] = table_digest(name, data)
    return out


@pytest.mark.parametrize("window", [777, 5_000, None], ids=["window-777", "window-5000", "batch"])
def test_sample_tables_match_the_recorded_digests(new_target, window):
    db = new_target()
    replay([str(SAMPLE / "trades")], str(SAMPLE / "refdata"), db, window_rows=window or 1, batch=window is None)
    assert _digests(db) == GOLDEN


def test_frozen_and_spilled_state_keeps_the_digests(new_target, tmp_path, monkeypatch):
    """State runs frozen and spilled to disk after a few dozen keys (and rebuilt by a restart
    halfway) give the same tables as state that lives in memory."""
    from settle_arrow import state

    monkeypatch.setattr(state, "SEEN_FROZEN_ROWS", 60)
    monkeypatch.setattr(state, "ACCEPTED_FROZEN_ROWS", 25)
    monkeypatch.setattr(state, "SPILL_DIR", str(tmp_path / "spill"))
    db = new_target()
    files = sorted(str(p) for p in (SAMPLE / "trades").glob("*.parquet"))
    replay(files[:3], str(SAMPLE / "refdata"), db, window_rows=97)
    replay(files, str(SAMPLE / "refdata"), db, window_rows=97)
    assert _digests(db) == GOLDEN
    # A DuckDB TARGET keeps its frozen runs beside its segments (tests/test_kept_runs.py).
    spilled = list((tmp_path / "spill").iterdir()) if (tmp_path / "spill").exists() else []
    assert spilled == [], "spill files are unlinked once mapped"


@pytest.mark.parametrize("window", [777, 5_000, None], ids=["window-777", "window-5000", "batch"])
def test_windows_processed_in_pieces_keep_the_digests(new_target, monkeypatch, window):
    """A window larger than PIECE_ROWS_MAX is processed piece by piece inside its one
    transaction: same tables, and still one checkpoint per window, and one timing per
    window (on_commit), in window order: its input complete before its commit began, and
    that before the commit returned."""
    from settle_arrow import engine

    monkeypatch.setattr(engine, "PIECE_ROWS_MAX", 333)
    db = new_target()
    timings: list[engine.WindowTiming] = []
    report = replay([str(SAMPLE / "trades")], str(SAMPLE / "refdata"), db, window_rows=window or 1, batch=window is None,
                    on_commit=timings.append)
    assert _digests(db) == GOLDEN
    with open_target(db) as t:
        checkpoints = t.arrow("checkpoints").filter(pc.greater(t.arrow("checkpoints")["window_id"], 0))
    assert checkpoints.num_rows == report.windows == (1 if window is None else -(-report.rows_read // window))
    assert pc.sum(checkpoints["rows"]).as_py() == report.rows_read
    assert [(t.window_id, t.rows) for t in timings] == list(zip(checkpoints["window_id"].to_pylist(),
                                                                checkpoints["rows"].to_pylist(), strict=True))
    assert all(t.input_complete_s < t.commit_started_s < t.committed_s for t in timings)
    assert all(a.committed_s < b.commit_started_s for a, b in zip(timings, timings[1:], strict=False))
    assert all(t.latency_s >= t.commit_s > 0 for t in timings)
