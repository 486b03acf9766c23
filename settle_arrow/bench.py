"""The project's benchmark: trades/s of replay at several window sizes, peak memory, and the
bare DuckDB GROUP BY floor on the same Parquet files, in one run.

Data model: a generated market (generate.py) -> one measurement per mode, each replay in a
fresh subprocess (so its peak RSS is its own) into a fresh TARGET -> a table printed and
returned as a list of dicts. `db_kind="postgresql"` replays into PostgreSQL instead: a new
database on the server of `pg_url` (dropped afterwards), one schema per mode.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import duckdb

from settle_arrow.generate import MarketSpec, generate_market


@dataclasses.dataclass(frozen=True)
class BenchSpec:
    trades: int = 5_000_000
    accounts: int = 1_000_000
    securities: int = 2_000
    holdings: int | None = None
    days: int = 5
    windows: tuple[int, ...] = (10_000, 100_000)
    batch: bool = True
    out_dir: str = "bench_out"
    seed: int = 1
    db_kind: str = "duckdb"  # or "postgresql"
    pg_url: str = "postgresql://postgres@127.0.0.1:5432/test"

    @staticmethod
    def quick(out_dir: str = "bench_out", **kw) -> BenchSpec:
        return BenchSpec(trades=300_000, accounts=100_000, securities=500, days=2, out_dir=out_dir, **kw)


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


def run_one(paths: list[str], refdata: str, db: str, window: int | None) -> dict:
    """One replay in this process; returns rate, window latencies and peak RSS."""
    from settle_arrow.engine import replay

    stamps: list[float] = []
    sizes: list[int] = []
    started = time.perf_counter()
    report = replay(paths, refdata, db, window_rows=window or 1, batch=window is None,
                    on_window=lambda rows, n: (stamps.append(time.perf_counter()), sizes.append(rows)))
    wall = time.perf_counter() - started
    # Window latency from one commit to the next: the first window also carries start-up
    # (reference data, recovery), so it is reported in wall time, not in the latencies.
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)] or [wall]
    steady = (sizes[-1] - sizes[0]) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else report.rows_read / wall
    return {
        "rows": report.rows_read,
        "seconds": wall,
        "steady_trades_per_s": steady,
        "window_p50_ms": 1000 * statistics.median(gaps),
        # Nearest-rank percentile: with few windows p99 is the slowest one.
        "window_p99_ms": 1000 * sorted(gaps)[min(len(gaps), math.ceil(len(gaps) * 0.99)) - 1],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def run(spec: BenchSpec, echo=print) -> list[dict]:
    out = Path(spec.out_dir)
    market = out / "market"
    shutil.rmtree(market, ignore_errors=True)
    started = time.perf_counter()
    summary = generate_market(market, MarketSpec(trades=spec.trades, seed=spec.seed, accounts=spec.accounts,
                                                 securities=spec.securities, holdings=spec.holdings, days=spec.days))
    echo(f"generated {summary.rows:,} trades in {time.perf_counter() - started:.1f}s into {market}")
    results = [floor_groupby(str(market / "trades" / "*.parquet"), summary.refdata_dir)]
    modes: list[int | None] = [*spec.windows, *([None] if spec.batch else [])]
    if spec.db_kind not in ("duckdb", "postgresql"):
        raise ValueError(f"unknown --db-kind {spec.db_kind!r} (duckdb or postgresql)")
    pg_db = None
    if spec.db_kind == "postgresql":
        from settle_arrow.storage.postgres import create_database, drop_database

        pg_db = f"settle_bench_{os.getpid()}"
        drop_database(spec.pg_url, pg_db)
        pg_url = create_database(spec.pg_url, pg_db)
    try:
        for window in modes:
            name = f"bench_{window or 'batch'}"
            db = out / f"{name}.duckdb"
            db.unlink(missing_ok=True)
            target = f"{pg_url}?schema={name}" if pg_db else str(db)
            cmd = [sys.executable, "-m", "settle_arrow.bench", str(market / "trades"), summary.refdata_dir, target,
                   str(window or 0)]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode:
                raise RuntimeError(f"benchmark replay failed: {proc.stderr.strip().splitlines()[-1:]}")
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            r["mode"] = (f"replay --window {window:,}" if window else "replay --batch") + f" ({spec.db_kind})"
            results.append(r)
            db.unlink(missing_ok=True)
    finally:
        if pg_db:
            drop_database(spec.pg_url, pg_db)
    floor = results[0]["rows"] / results[0]["seconds"]
    for r in results:
        r["trades_per_s"] = r["rows"] / r["seconds"]
        r["floor_ratio"] = floor / r["trades_per_s"]
    return results


def main_one(argv: list[str]) -> None:
    paths, refdata, db, window = argv
    print(json.dumps(run_one([paths], refdata, db, int(window) or None)))


if __name__ == "__main__":
    main_one(sys.argv[1:])
