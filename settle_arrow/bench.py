"""The project's benchmark: trades/s of replay at several window sizes, peak memory, the
bare DuckDB GROUP BY floor on the same Parquet files, and for each DuckDB mode the rate of its
storage alone (the trade rows it committed, committed again with nothing else), in one run.

Data model: a generated market (generate.py) -> one measurement per mode, each replay in a
fresh subprocess (so its peak RSS is its own) into a fresh TARGET -> a table printed and
returned as a list of dicts. Modes: the floor, decoding alone, each window size and --batch
at full speed (each followed by its storage alone), the smallest window size again as a
live feed at PACE_SHARE of its full-speed rate, and a restart after SIGKILL.
`db_kind="postgresql"` replays into PostgreSQL instead: a new database on the server of
`pg_url` (dropped afterwards), one schema per mode.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa

from settle_arrow import schema
from settle_arrow.generate import MarketSpec, generate_market

RESTART_WINDOW = 100_000
BATCH_TARGET_ROWS = 20_000_000  # the scales VISION's batch and memory targets are set at
RSS_TARGET_ROWS = 100_000_000
# The paced replay feeds the smallest window size at this share of that size's full-speed
# steady rate: a live feed the engine keeps up with, so its latency is a window's own
# pass through the pipeline (plus whatever pauses the commit lane), not a backlog's queue.
PACE_SHARE = 0.5


@dataclasses.dataclass(frozen=True)
class BenchSpec:
    trades: int = 5_000_000
    accounts: int = 1_000_000
    securities: int = 2_000
    holdings: int | None = 10_000_000  # the state size: >= 10 M holdings rows
    days: int = 5
    windows: tuple[int, ...] = (10_000, 100_000)
    batch: bool = True
    restart: bool = True  # SIGKILL a --window 100,000 replay halfway, time the restart
    paced: bool = True  # the smallest window size again, as a live feed at PACE_SHARE of its rate
    out_dir: str = "bench_out"
    seed: int = 1
    db_kind: str = "duckdb"  # or "postgresql"
    pg_url: str = "postgresql://postgres@127.0.0.1:5432/test"

    @staticmethod
    def quick(out_dir: str = "bench_out", **kw) -> BenchSpec:
        return BenchSpec(trades=300_000, accounts=100_000, securities=500, holdings=None, days=2, out_dir=out_dir, **kw)


def floor_groupby(trade_glob: str, refdata: str) -> dict:
    """Bare DuckDB netting of both legs per participant x security, straight from Parquet."""
    con = duckdb.connect()
    con.execute(f"CREATE TABLE units AS SELECT * FROM read_parquet('{refdata}/trading_units.parquet')")
    sql = f"""
        SELECT u.participant_id, t.security_id, SUM(t.q) AS net, COUNT(*) AS legs FROM (
            SELECT buy_unit AS unit, security_id, quantity AS q FROM read_parquet('{trade_glob}')
            UNION ALL
            SELECT sell_unit AS unit, security_id, -quantity AS q FROM read_parquet('{trade_glob}')
        ) t JOIN units u ON u.unit_id = t.unit GROUP BY ALL"""
    con.execute(sql).fetchall()  # warm the file cache
    started = time.perf_counter()
    rows = con.execute(f"SELECT SUM(legs) FROM ({sql})").fetchone()[0]
    seconds = time.perf_counter() - started
    return {"mode": "floor: DuckDB GROUP BY", "rows": rows // 2, "seconds": seconds}


def cores() -> int:
    """The cores this process may run on: the CPU per trade a rate leaves is cores / rate."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity API (macOS)
        return os.cpu_count() or 1


def _cpu_s() -> float:
    """CPU seconds of this process so far, every thread's, user and system."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def input_decoding(trade_dir: Path) -> dict:
    """Decoding the input alone: every trade file read through the engine's reader
    (io.files.read_frames, the columns a replay reads) and dropped. Every replay does at
    least this, so its CPU per trade is part of any replay's."""
    from settle_arrow.io.files import discover, read_frames

    started, cpu = time.perf_counter(), _cpu_s()
    rows = sum(f.height for src in discover([str(trade_dir)]) for f in read_frames(src, list(schema.INPUT_TRADE.names)))
    return {"mode": "floor: input decoding alone", "rows": rows, "seconds": time.perf_counter() - started,
            "cpu_s": _cpu_s() - cpu}


def storage_ceiling(replayed: Path, window: int | None, scratch: Path) -> dict:
    """The storage design's bound for a replay mode: the trade rows that replay committed into
    `replayed`, committed again through the same storage code into a fresh file, in windows of
    the replay's size grouped as fully as the engine's group commit allows (`window` None: one
    transaction in PIECE_ROWS_MAX pieces, as --batch), with no reading, checking, clearing or
    registration: the trade rows' segment files and the DuckDB transactions, so no replay
    into this storage can beat this rate; only the time in storage calls counts."""
    from settle_arrow.engine import COMMIT_GROUP_ROWS_MAX, COMMIT_GROUP_WINDOWS_MAX, PIECE_ROWS_MAX
    from settle_arrow.storage import open_storage
    from settle_arrow.storage.base import WindowMark
    from settle_arrow.storage.duckdb import remove_target

    remove_target(scratch)
    source = duckdb.connect(str(replayed), read_only=True)
    storage = open_storage(str(scratch))
    seconds, cpu, rows, window_id, closed = 0.0, 0.0, 0, 1, False
    group: list[tuple[WindowMark, pa.Table]] = []
    try:
        storage.ensure_schema()
        cols = ", ".join(f'"{c}"' for c in schema.STORAGE["trade_facts"].names if c != "window_id")
        batches = iter(source.sql(f"SELECT {cols} FROM trade_facts").to_arrow_reader(window or PIECE_ROWS_MAX))
        batch = next(batches, None)
        while batch is not None:
            following = next(batches, None)
            piece = pa.Table.from_batches([batch])
            started, cpu_started = time.perf_counter(), time.process_time()
            if window is None and following is not None:
                storage.stage_window(window_id, {"trade_facts": piece})
            else:
                checkpoint = {"source": "ceiling", "offset": rows + batch.num_rows, "rows": batch.num_rows, "digest": ""}
                group.append((WindowMark(window_id, checkpoint),
                              piece.append_column("window_id", pa.array(np.full(piece.num_rows, window_id, dtype=np.int64)))))
                window_id += 1
                # The bounds as Engine.run applies them (a group goes once it reaches one).
                if (following is None or len(group) >= COMMIT_GROUP_WINDOWS_MAX
                        or sum(t.num_rows for _, t in group) >= COMMIT_GROUP_ROWS_MAX):
                    storage.commit_windows([m for m, _ in group], {"trade_facts": pa.concat_tables(t for _, t in group)})
                    group.clear()
            seconds += time.perf_counter() - started
            cpu += time.process_time() - cpu_started
            rows += batch.num_rows
            batch = following
        started, cpu_started = time.perf_counter(), time.process_time()
        storage.close()  # its final checkpoint counts, as it does in a replay's wall time
        seconds, cpu, closed = seconds + time.perf_counter() - started, cpu + time.process_time() - cpu_started, True
    finally:
        if not closed:
            storage.close()
        source.close()
        remove_target(scratch)
    mode = f"--window {window:,}" if window else "--batch"
    return {"mode": f"ceiling: storage alone ({mode})", "rows": rows, "seconds": seconds or math.nan, "cpu_s": cpu}


def peak_rss_mb() -> float:
    """This process's peak resident memory. Not getrusage's ru_maxrss: across the spawn of a
    child it keeps the parent's peak (measured: a child of a parent holding 2 GB reports
    1.9 GB), and the benchmark's parent holds the whole generated market. VmHWM is the
    high-water mark of this process's own address space."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # no procfs: an upper bound


def run_one(paths: list[str], refdata: str, db: str, window: int | None, kill_at_rows: int = 0,
            pace: float | None = None) -> dict:
    """One replay in this process; returns rate, window latencies, start-up and peak RSS.
    `kill_at_rows` > 0: SIGKILL this process once that many rows have committed; `pace`:
    replay as a live feed of that many trades/s."""
    from settle_arrow import engine
    from settle_arrow.engine import WindowTiming, replay

    if kill_at_rows:
        # One window a commit, so the kill lands where asked: a group could commit the
        # rest of a small input before its first window's callback kills.
        engine.COMMIT_GROUP_WINDOWS_MAX = 1
    ready: list[float] = []
    timings: list[WindowTiming] = []

    def on_window(rows: int, n: int) -> None:
        if kill_at_rows and rows >= kill_at_rows:
            os.kill(os.getpid(), signal.SIGKILL)

    started, started_wall, cpu = time.perf_counter(), time.time(), _cpu_s()
    report = replay(paths, refdata, db, window_rows=window or 1, batch=window is None, on_window=on_window,
                    on_start=lambda _sources: ready.append(time.perf_counter()), on_commit=timings.append,
                    pace_trades_per_s=pace)
    wall, cpu = time.perf_counter() - started, _cpu_s() - cpu
    # Commit to commit, from the commits' own returns: the first window's wait also carries
    # start-up (reference data, recovery), so it is in the wall time, not in these gaps.
    done = [t.committed_s for t in timings]
    gaps = [b - a for a, b in zip(done, done[1:], strict=False)] or [wall]
    latencies = [t.latency_s for t in timings] or [math.nan]
    commits = [t.commit_s for t in timings] or [math.nan]
    # The rows committed after the first commit, over the time to the last.
    steady = sum(t.rows for t in timings[1:]) / (done[-1] - done[0]) if len(done) > 1 else report.rows_read / wall
    spawned = float(os.environ.get("SETTLE_BENCH_SPAWNED", "nan"))  # wall clock at fork, set by the parent
    return {
        "rows": report.rows_read,
        "seconds": wall,
        "cpu_s": cpu,  # over the same span as `seconds`, every thread's
        "steady_trades_per_s": steady,
        "window_p50_ms": 1000 * statistics.median(gaps),
        "window_p99_ms": 1000 * _p99(gaps),
        # Each window from its input being complete (the reader cut it; a feed's last row
        # arrived) to its commit's
        # return: what VISION's "a window is committed in" measures, pipeline depth included.
        "latency_p50_ms": 1000 * statistics.median(latencies),
        "latency_p99_ms": 1000 * _p99(latencies),
        # The commit's own time on the commit lane (outputs built, written, committed).
        "commit_p50_ms": 1000 * statistics.median(commits),
        "commit_p99_ms": 1000 * _p99(commits),
        "peak_rss_mb": peak_rss_mb(),
        # Reference data + opening the TARGET + rebuilding state, before the first window.
        "startup_s": ready[0] - started if ready else wall,
        # From process start (interpreter and imports included) to the first committed window.
        "first_commit_s": (done[0] - started) + (started_wall - spawned) if done else math.nan,
    }


def _p99(values: list[float]) -> float:
    """Nearest-rank 99th percentile: with few values it is the largest."""
    return sorted(values)[min(len(values), math.ceil(len(values) * 0.99)) - 1]


def _child(market: Path, refdata: str, target: str, window: int | None, kill_at_rows: int = 0,
           pace: float | None = None) -> dict | None:
    """run_one in a fresh process (its own peak RSS); None when it was SIGKILLed as asked."""
    cmd = [sys.executable, "-m", "settle_arrow.bench", str(market / "trades"), refdata, target, str(window or 0),
           str(kill_at_rows), repr(pace or 0.0)]
    env = dict(os.environ, SETTLE_BENCH_SPAWNED=repr(time.time()))
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if kill_at_rows and proc.returncode == -signal.SIGKILL:
        return None
    if proc.returncode:
        raise RuntimeError(f"benchmark replay failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(spec: BenchSpec, echo=print) -> list[dict]:
    from settle_arrow.storage.duckdb import remove_target

    out = Path(spec.out_dir)
    market = out / "market"
    shutil.rmtree(market, ignore_errors=True)
    started = time.perf_counter()
    # A small market cannot hold ten million distinct positions: cap at a quarter of the keys.
    holdings = None if spec.holdings is None else min(spec.holdings, spec.accounts * spec.securities // 4)
    summary = generate_market(market, MarketSpec(trades=spec.trades, seed=spec.seed, accounts=spec.accounts,
                                                 securities=spec.securities, holdings=holdings, days=spec.days))
    echo(f"generated {summary.rows:,} trades in {time.perf_counter() - started:.1f}s into {market}")
    # Compile the kernels into their on-disk cache here, outside every timing: from a fresh
    # checkout the first replay would otherwise compile them inside its own (~10 s, measured)
    # and its rate would say more about numba than about the engine. Each replay still loads
    # them from the cache at start, as any run after the first does.
    from settle_arrow import kernels

    started = time.perf_counter()
    kernels.warm()
    echo(f"kernels ready in {time.perf_counter() - started:.1f}s (compiled on a first run, then loaded from cache)")
    results = [floor_groupby(str(market / "trades" / "*.parquet"), summary.refdata_dir), input_decoding(market / "trades")]
    modes: list[int | None] = [*spec.windows, *([None] if spec.batch else [])]
    if spec.db_kind not in ("duckdb", "postgresql"):
        raise ValueError(f"unknown --db-kind {spec.db_kind!r} (duckdb or postgresql)")
    pg_db = None
    if spec.db_kind == "postgresql":
        from settle_arrow.storage.postgres import create_database, drop_database

        pg_db = f"settle_bench_{os.getpid()}"
        drop_database(spec.pg_url, pg_db)
        pg_url = create_database(spec.pg_url, pg_db)
    def fresh(name: str) -> tuple[Path, str]:
        """A mode's DuckDB file (removed, so fresh) and its TARGET: that file, or a schema."""
        db = out / f"{name}.duckdb"
        remove_target(db)
        return db, f"{pg_url}?schema={name}" if pg_db else str(db)

    try:
        for window in modes:
            db, target = fresh(f"bench_{window or 'batch'}")
            r = _child(market, summary.refdata_dir, target, window)
            assert r is not None
            r["mode"] = (f"replay --window {window:,}" if window else "replay --batch") + f" ({spec.db_kind})"
            results.append(r)
            if not pg_db:
                results.append(storage_ceiling(db, window, out / "bench_ceiling.duckdb"))
            remove_target(db)
        if spec.paced and spec.windows:
            window = min(spec.windows)
            full = next(r for r in results if r["mode"].startswith(f"replay --window {window:,} ("))
            pace = float(f"{PACE_SHARE * full['steady_trades_per_s']:.2g}")  # two figures: a readable label
            db, target = fresh("bench_paced")
            r = _child(market, summary.refdata_dir, target, window, pace=pace)
            assert r is not None
            r["mode"] = f"replay --window {window:,} --pace {pace:,.0f} ({spec.db_kind})"
            r["pace_trades_per_s"] = pace
            results.append(r)
            remove_target(db)
        if spec.restart:
            db, target = fresh("bench_restart")
            # Killed once half the input has committed; small scales get smaller windows.
            window = max(1, min(RESTART_WINDOW, summary.rows // 4))
            killed = _child(market, summary.refdata_dir, target, window, kill_at_rows=max(1, summary.rows // 2))
            if killed is not None:
                raise RuntimeError("the replay to be killed finished first: too few trades for the restart measure")
            r = _child(market, summary.refdata_dir, target, window)
            assert r is not None
            r["mode"] = f"restart after SIGKILL (--window {window:,}) ({spec.db_kind})"
            results.append(r)
            remove_target(db)
    finally:
        if pg_db:
            drop_database(spec.pg_url, pg_db)
    floor = results[0]["rows"] / results[0]["seconds"]
    for r in results:
        r["trades_per_s"] = r["rows"] / r["seconds"]
        r["floor_ratio"] = floor / r["trades_per_s"]
        if "cpu_s" in r:
            r["cpu_us_per_trade"] = 1e6 * r["cpu_s"] / max(1, r["rows"])
    return results


def targets(results: list[dict]) -> list[dict]:
    """The issue's targets next to what this run measured (only those this run covers)."""
    by = {r["mode"].split(" (")[0]: r for r in results}
    rows = []

    def add(what: str, goal: str, value: float | None, shown: str, met: bool | None) -> None:
        """met None: this run's scale is below the target's, so it cannot say."""
        if value is not None and not math.isnan(value):
            rows.append({"target": what, "goal": goal, "measured": shown, "met": met})

    w100, w10, batch = by.get("replay --window 100,000"), by.get("replay --window 10,000"), by.get("replay --batch")
    ceiling = {r["mode"].removeprefix("ceiling: storage alone (").removesuffix(")"): r
               for r in results if r["mode"].startswith("ceiling")}

    def bound(mode: str, goal: float) -> None:
        """The storage-alone rate of a mode beside its goal: below it, no replay can meet it."""
        c = ceiling.get(mode)
        if c:
            add(f"{mode}: storage alone (append + commit of its trade rows, nothing else)",
                f">= {goal:,.0f} trades/s, or the goal is out of reach", c["trades_per_s"],
                f"{c['trades_per_s']:,.0f} trades/s", c["trades_per_s"] >= goal)

    decoding = next((r for r in results if r["mode"] == "floor: input decoding alone"), None)

    def budget(mode: str, r: dict, goal: float) -> None:
        """CPU per trade: what the goal leaves on this machine's cores, beside what the
        replay spent and what its two unavoidable parts (decoding the input, storing the
        trade rows) cost alone. When those two exceed the budget, no replay that reads this
        input and writes this storage can meet the goal here, however little else it does."""
        if "cpu_us_per_trade" not in r:
            return
        allowed = 1e6 * cores() / goal
        c = ceiling.get(mode)
        parts = ""
        if decoding and c and "cpu_us_per_trade" in c:
            d, st = decoding["cpu_us_per_trade"], c["cpu_us_per_trade"]
            parts = f" (input decoding {d:.2f} + storage alone {st:.2f} = {d + st:.2f} us)"
        add(f"{mode}: CPU per trade, every thread", f"<= {allowed:.2f} us ({cores()} cores at the goal's rate)",
            r["cpu_us_per_trade"], f"{r['cpu_us_per_trade']:.2f} us{parts}", r["cpu_us_per_trade"] <= allowed)

    def rate(mode: str, r: dict) -> str:
        c = ceiling.get(mode)
        share = f" ({r['trades_per_s'] / c['trades_per_s']:.0%} of storage alone)" if c else ""
        return f"{r['trades_per_s']:,.0f} trades/s{share}"

    restart = next((r for r in results if r["mode"].startswith("restart")), None)
    paced = next((r for r in results if "pace_trades_per_s" in r), None)
    streams = [r for r in (w100, w10) if r]
    if w100:
        add("100,000-row windows", ">= 2,000,000 trades/s", w100["trades_per_s"], rate("--window 100,000", w100),
            w100["trades_per_s"] >= 2e6)
        bound("--window 100,000", 2e6)
        budget("--window 100,000", w100, 2e6)
    if batch:
        add(f"--batch of {batch['rows']:,} trades", ">= 3,000,000 trades/s (20 M trades)", batch["trades_per_s"],
            rate("--batch", batch),
            batch["trades_per_s"] >= 3e6 if batch["rows"] >= BATCH_TARGET_ROWS or batch["trades_per_s"] < 3e6 else None)
        bound("--batch", 3e6)
        budget("--batch", batch, 3e6)
    if w10:
        add("10,000-row windows", ">= 1,000,000 trades/s", w10["trades_per_s"], rate("--window 10,000", w10),
            w10["trades_per_s"] >= 1e6)
        bound("--window 10,000", 1e6)
        budget("--window 10,000", w10, 1e6)
        add("10,000-row windows, window latency p99 (input complete to committed)", "<= 50 ms",
            w10["latency_p99_ms"], f"{w10['latency_p99_ms']:,.0f} ms (the commit alone {w10['commit_p99_ms']:,.0f} ms, "
            f"commit to commit {w10['window_p99_ms']:,.0f} ms)", w10["latency_p99_ms"] <= 50)
    if streams:
        rss = max(r["peak_rss_mb"] for r in streams)
        add(f"streaming peak RSS ({streams[0]['rows']:,} trades)", "<= 4 GB (at 100 M trades)", rss, f"{rss / 1024:.2f} GB",
            rss <= 4096 if streams[0]["rows"] >= RSS_TARGET_ROWS or rss > 4096 else None)
        best = min(r["floor_ratio"] for r in streams)
        add("ratio to the DuckDB floor (best streaming mode)", "<= 10x", best, f"{best:,.0f}x", best <= 10)
    if paced and paced["mode"].startswith("replay --window 10,000 "):
        add(f"10,000-row windows as a live feed at {paced['pace_trades_per_s']:,.0f} trades/s ({PACE_SHARE:.0%} of "
            "the full-speed rate): window latency p99 (input complete to committed)",
            "< 100 ms (VISION: a 10,000-trade window committed in well under 100 ms)", paced["latency_p99_ms"],
            f"{paced['latency_p99_ms']:,.0f} ms (p50 {paced['latency_p50_ms']:,.0f} ms; the commit alone p50 / p99 "
            f"{paced['commit_p50_ms']:,.0f} / {paced['commit_p99_ms']:,.0f} ms)", paced["latency_p99_ms"] < 100)
    if restart:
        add("restart after SIGKILL: process start to first commit", "<= 5 s", restart["first_commit_s"],
            f"{restart['first_commit_s']:.1f} s (state rebuilt in {restart['startup_s']:.1f} s)",
            restart["first_commit_s"] <= 5)
    return rows


def main_one(argv: list[str]) -> None:
    paths, refdata, db, window, kill_at_rows, pace = argv
    print(json.dumps(run_one([paths], refdata, db, int(window) or None, int(kill_at_rows), float(pace) or None)))


if __name__ == "__main__":
    main_one(sys.argv[1:])
