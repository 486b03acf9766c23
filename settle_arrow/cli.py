"""`settle-arrow` command line: thin commands over the library API.

Exit codes: 0 success; 2 a user mistake (one-line message, no traceback); 3 a self-check
failed (nothing of the failing window was committed); 4 the TARGET's database failed during
the run, e.g. a dropped PostgreSQL connection (one line; run the command again to continue).

TARGET: a DuckDB file path, or postgresql://user@host:port/db[?schema=NAME].
"""

from __future__ import annotations

import datetime
import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from settle_arrow.engine import WINDOW_ROWS_DEFAULT, ReplayReport, replay
from settle_arrow.errors import SelfCheckError, StorageError, UserError
from settle_arrow.io.files import SourceFile
from settle_arrow.target import copy_target, open_target

TARGET_HELP = "TARGET: a DuckDB file path, or postgresql://user@host:port/db[?schema=NAME]"
app = typer.Typer(add_completion=False, no_args_is_help=True, help="Arrow-native securities clearing and settlement.")
out = Console()
err = Console(stderr=True)


def _fail(exc: Exception, code: int) -> typer.Exit:
    # Messages carry paths and values: escaped, so "[...]" in them is text, not rich markup.
    err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def _guard(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except UserError as exc:
        raise _fail(exc, 2) from None
    except SelfCheckError as exc:
        raise _fail(exc, 3) from None
    except StorageError as exc:
        raise _fail(exc, 4) from None
    except OSError as exc:  # the machine's, not the user's: a full disk, a vanished mount
        raise _fail(exc, 4) from None


@app.command()
def generate(
    out_dir: Annotated[Path, typer.Argument(help="directory to write refdata/ and trades/ into")],
    trades: Annotated[int, typer.Option(help="trade rows to write (bad rows and cancellations included)")] = 5000,
    seed: Annotated[int, typer.Option(help="random seed: same seed, same files")] = 0,
    accounts: Annotated[int, typer.Option()] = 2000,
    securities: Annotated[int, typer.Option()] = 200,
    participants: Annotated[int, typer.Option()] = 20,
    days: Annotated[int, typer.Option(help="trading days")] = 10,
    start: Annotated[str, typer.Option(help="first calendar day, YYYY-MM-DD")] = "2023-08-21",
    holdings: Annotated[int | None, typer.Option(help="opening holdings rows")] = None,
    fmt: Annotated[str, typer.Option("--format", help="parquet or csv")] = "parquet",
    bad_rate: Annotated[float, typer.Option(help="fraction of rows that trip a quarantine reason")] = 0.0,
    cancel_rate: Annotated[float, typer.Option(help="fraction of rows that are cancellations (X)")] = 0.0,
) -> None:
    """Write a synthetic market: reference data and trade files (SPEC §1-2)."""
    from settle_arrow.generate import MarketSpec, generate_market

    try:
        start_date = datetime.date.fromisoformat(start)
        spec = MarketSpec(
            trades=trades, seed=seed, accounts=accounts, securities=securities, participants=participants,
            days=days, start_date=start_date, holdings=holdings, fmt=fmt, bad_rate=bad_rate, cancel_rate=cancel_rate,
        )
        summary = generate_market(out_dir, spec)
    except ValueError as exc:
        raise _fail(exc, 2) from None
    out.print(
        f"wrote {summary.rows:,} trades ({summary.bad_rows:,} bad, {summary.cancel_rows:,} cancellations) "
        f"in {len(summary.trade_files)} file(s) to {summary.out_dir} in {summary.seconds:.1f}s; "
        f"reference data in {summary.refdata_dir}"
    )


def _print_report(r: ReplayReport) -> None:
    t = Table(title=f"replay into {escape(r.target)}", show_header=False)
    t.add_row("rows already committed (skipped)", f"{r.rows_skipped:,}")
    t.add_row("rows read", f"{r.rows_read:,}")
    t.add_row("rows accepted", f"{r.rows_accepted:,}")
    t.add_row("rows quarantined", f"{r.rows_quarantined:,}")
    for reason, n in r.by_reason.items():
        t.add_row(f"  {reason}", f"{n:,}")
    t.add_row("read = accepted + quarantined", "yes" if r.rows_read == r.rows_accepted + r.rows_quarantined else "NO")
    t.add_row("windows committed", f"{r.windows:,}")
    t.add_row("seconds", f"{r.seconds:.2f}")
    t.add_row("trades/s", f"{r.trades_per_s:,.0f}")
    t.add_row("self-check", r.self_check)
    out.print(t)


@app.command("replay")
def replay_cmd(
    paths: Annotated[list[str], typer.Argument(help="trade files, directories, globs or fsspec URLs")],
    refdata: Annotated[str, typer.Option(help="reference data directory")],
    db: Annotated[str, typer.Option(help=TARGET_HELP)],
    window: Annotated[int, typer.Option(help="rows per streaming window")] = WINDOW_ROWS_DEFAULT,
    batch: Annotated[bool, typer.Option("--batch", help="the whole input as one end-of-day window")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="no progress bar")] = False,
    pace: Annotated[float | None, typer.Option(
        help="replay as a live feed of this many trades/s (windows cut as their rows arrive)")] = None,
) -> None:
    """Validate, clear and register trade files into TARGET, exactly once."""
    progress = Progress(
        TextColumn("[bold]replay"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]} rows/s"),
        TimeElapsedColumn(), console=err, disable=quiet or not err.is_terminal,
    )
    task = progress.add_task("replay", total=None, rate="-")

    def on_start(sources: tuple[SourceFile, ...]) -> None:
        progress.start()

    def on_window(rows: int, windows: int) -> None:
        elapsed = progress.tasks[0].elapsed or 1e-9
        progress.update(task, completed=rows, rate=f"{rows / elapsed:,.0f}")

    try:
        report = _guard(replay, paths, refdata, db, window_rows=window, batch=batch, on_window=on_window, on_start=on_start,
                        pace_trades_per_s=pace)
    finally:
        progress.stop()
    _print_report(report)


@app.command()
def export(
    table: Annotated[str, typer.Argument(help="trades, quarantine, obligations_securities, obligations_cash, holdings, exceptions, checkpoints")],
    db: Annotated[str, typer.Option(help=TARGET_HELP)],
    out_file: Annotated[str, typer.Option("--out", help="output file, .parquet or .csv")],
) -> None:
    """Write one table to Parquet or CSV, sorted by its key (SPEC §6)."""

    def run() -> int:
        with open_target(db) as target:
            return target.export(table, out_file)

    n = _guard(run)
    out.print(f"wrote {n:,} rows of {escape(table)} to {escape(out_file)}")


@app.command()
def status(
    db: Annotated[str, typer.Option(help=TARGET_HELP)],
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
    digest: Annotated[bool, typer.Option("--digest", help="also a content digest per table, equal on every backend")] = False,
) -> None:
    """Checkpoints, row counts per table and the last self-check of TARGET."""

    def run():
        with open_target(db) as target, target.snapshot():
            return target.status(), (target.digest() if digest else {})

    s, digests = _guard(run)
    if as_json:
        body = dict(s.__dict__, **({"digests": digests} if digest else {}))
        sys.stdout.write(json.dumps(body, default=str, indent=2) + "\n")
        return
    t = Table(title=f"status of {escape(s.target)}", show_header=False)
    t.add_row("windows committed", f"{s.windows:,}")
    if s.last_window:
        lw = s.last_window
        t.add_row("last window", f"#{lw['window_id']} {escape(lw['source'])} @ row {lw['offset']:,} ({lw['committed_at']})")
    for name, n in s.row_counts.items():
        t.add_row(f"rows in {name}", f"{n:,}")
    for src in s.sources:
        t.add_row("source", f"{escape(src['source'])}: {src['rows_done']:,} rows committed")
    chk = s.last_self_check
    t.add_row("last self-check", f"{chk['status']} at {chk['checked_at']} {escape(chk['detail'] or '')}" if chk else "never")
    for name, d in digests.items():
        t.add_row(f"digest of {name}", d)
    out.print(t)


@app.command()
def copy(
    src: Annotated[str, typer.Option("--from", help="TARGET to copy")],
    dst: Annotated[str, typer.Option("--to", help="new or empty TARGET to copy into")],
    verify: Annotated[bool, typer.Option(help="compare the content digests of both afterwards")] = True,
) -> None:
    """Copy a TARGET to another backend (DuckDB <-> PostgreSQL): every table, one transaction."""

    def run():
        rows = copy_target(src, dst)
        if not verify:
            return rows, None
        with open_target(src) as a, open_target(dst) as b:
            da, db_ = a.digest(), b.digest()
        bad = [n for n in da if da[n] != db_[n]]
        if bad:
            raise StorageError(f"copy finished but the digest of {bad[0]} differs between {src} and {dst}")
        return rows, da

    rows, digests = _guard(run)
    out.print(f"copied {sum(rows.values()):,} rows in {len(rows)} tables from {escape(src)} to {escape(dst)}"
              + (f"; the digests of all {len(digests)} tables match" if digests else ""))


@app.command()
def bench(
    trades: Annotated[int, typer.Option(help="trades to generate")] = 5_000_000,
    accounts: Annotated[int, typer.Option()] = 1_000_000,
    securities: Annotated[int, typer.Option()] = 2_000,
    holdings: Annotated[int, typer.Option(help="opening holdings rows (state size)")] = 10_000_000,
    window: Annotated[list[int] | None, typer.Option(help="window sizes to replay (repeatable)")] = None,
    batch: Annotated[bool, typer.Option("--batch/--no-batch", help="also replay the whole input as one window")] = True,
    restart: Annotated[bool, typer.Option("--restart/--no-restart", help="SIGKILL a replay halfway, time its restart")]
    = True,
    paced: Annotated[bool, typer.Option("--paced/--no-paced", help="the smallest window size again, as a live feed "
                                        "at half its full-speed rate: the latency a feed the engine keeps up with sees")]
    = True,
    quick: Annotated[bool, typer.Option("--quick", help="a small scale that finishes in well under a minute")] = False,
    out_dir: Annotated[str, typer.Option(help="scratch directory")] = "bench_out",
    db_kind: Annotated[str, typer.Option(help="replay into duckdb (a file) or postgresql (a new database)")] = "duckdb",
    pg_url: Annotated[str, typer.Option(help="PostgreSQL server for --db-kind postgresql (a new database is made there)")]
    = "postgresql://postgres@127.0.0.1:5432/test",
) -> None:
    """Benchmark: trades/s per window size and --batch, window latency, peak RSS, DuckDB floor, storage alone."""
    import os
    import platform

    from settle_arrow.bench import BenchSpec
    from settle_arrow.bench import run as run_bench
    from settle_arrow.bench import targets as bench_targets

    if db_kind not in ("duckdb", "postgresql"):
        raise _fail(UserError(f"unknown --db-kind {db_kind!r} (duckdb or postgresql)"), 2)
    kind = {"db_kind": db_kind, "pg_url": pg_url, "batch": batch, "restart": restart, "paced": paced,
            **({"windows": tuple(window)} if window else {})}
    if any(w < 1 for w in window or ()):
        raise _fail(UserError("--window must be at least 1 row"), 2)
    spec = BenchSpec.quick(out_dir, **kind) if quick else BenchSpec(
        trades=trades, accounts=accounts, securities=securities, holdings=holdings, out_dir=out_dir, **kind)
    out.print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
              f"{spec.trades:,} trades, {spec.accounts:,} accounts, {spec.securities:,} securities")
    results = _guard(run_bench, spec, echo=out.print)
    t = Table(title="settle-arrow bench")
    cols = ("mode", "trades", "wall s", "trades/s", "x floor", "steady trades/s", "latency p50/p99 ms",
            "commit p50/p99 ms", "commit to commit p50/p99 ms", "start-up s", "peak RSS MB", "CPU us/trade")
    for col in cols:
        t.add_column(col, justify="right")
    for r in results:
        t.add_row(r["mode"], f"{r['rows']:,}", f"{r['seconds']:.2f}", f"{r['trades_per_s']:,.0f}", f"{r['floor_ratio']:.1f}",
                  f"{r['steady_trades_per_s']:,.0f}" if "steady_trades_per_s" in r else "",
                  *[f"{r[f'{m}_p50_ms']:.0f} / {r[f'{m}_p99_ms']:.0f}" if f"{m}_p50_ms" in r else ""
                    for m in ("latency", "commit", "window")],
                  f"{r['startup_s']:.1f}" if "startup_s" in r else "", f"{r.get('peak_rss_mb', 0):,.0f}",
                  f"{r['cpu_us_per_trade']:.2f}" if "cpu_us_per_trade" in r else "")
    goals = Table(title="targets (VISION.md, issue 4)")
    for col in ("target", "goal", "measured", "met"):
        goals.add_column(col, justify="right" if col != "target" else "left")
    for g in bench_targets(results):
        goals.add_row(g["target"], g["goal"], g["measured"],
                      "n/a at this scale" if g["met"] is None else "yes" if g["met"] else "no")
    # Benchmark output is mostly captured to logs: keep the tables whole at any width.
    wide = Console(width=max(out.width, 200))
    wide.print(t)
    wide.print(goals)


if __name__ == "__main__":
    app()
