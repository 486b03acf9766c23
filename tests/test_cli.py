"""The `settle-arrow` command line as a user runs it: a subprocess, exit codes, output files;
every command that touches a TARGET runs on each backend (DuckDB file, PostgreSQL schema)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from old_targets import as_version_5
from snapshots import TABLES, assert_same_tables, snapshot

from settle_arrow import open_target, schema
from settle_arrow.io.files import file_sha256
from settle_arrow.storage import open_storage

BIN = Path(sys.executable).parent / "settle-arrow"


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    cmd = [str(BIN)] if BIN.exists() else [sys.executable, "-m", "settle_arrow.cli"]
    return subprocess.run([*cmd, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=120)


def ok(res: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert res.returncode == 0, f"exit {res.returncode}\n{res.stdout}\n{res.stderr}"
    return res


def user_error(res: subprocess.CompletedProcess, pattern: str) -> str:
    """Exit 2, exactly one line `error: ...` on stderr, no traceback anywhere."""
    assert res.returncode == 2, f"exit {res.returncode}\n{res.stdout}\n{res.stderr}"
    assert "Traceback" not in res.stderr + res.stdout
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("error: "), lines[0]
    assert re.search(pattern, lines[0]), lines[0]
    return lines[0]


def report_rows(stdout: str) -> dict[str, str]:
    """`label -> value` of the replay report table."""
    rows = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in re.split(r"[│|]", line) if c.strip()]
        if len(cells) == 2:
            rows[cells[0]] = cells[1]
    return rows


def num(s: str) -> int:
    return int(s.replace(",", ""))


@pytest.fixture(scope="module")
def market(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "market"
    res = ok(cli("generate", out, "--trades", 3000, "--seed", 11, "--days", 3, "--bad-rate", 0.05, "--cancel-rate", 0.05))
    assert "3,000 trades" in res.stdout
    assert {p.name for p in (out / "refdata").iterdir()} >= {f"{n}.parquet" for n in schema.REFDATA_REQUIRED}
    assert len(list((out / "trades").glob("*.parquet"))) == 3
    return out


@pytest.fixture(scope="module")
def db(market, backend, tmp_path_factory) -> str:
    path = backend.new(tmp_path_factory.mktemp(f"run-{backend.name}"), "run")
    res = ok(cli("replay", market / "trades", "--refdata", market / "refdata", "--db", path, "--window", 400))
    market.joinpath(f"replay-{backend.name}.out").write_text(res.stdout)
    return path


def test_generate_is_deterministic(market, tmp_path):
    again = tmp_path / "again"
    ok(cli("generate", again, "--trades", 3000, "--seed", 11, "--days", 3, "--bad-rate", 0.05, "--cancel-rate", 0.05))
    for f in sorted((market / "trades").iterdir()):
        assert (again / "trades" / f.name).read_bytes() == f.read_bytes(), f.name


def test_replay_report(market, db, backend):
    rows = report_rows((market / f"replay-{backend.name}.out").read_text())
    with open_target(db) as t:
        trades, quarantine = t.table("trades"), t.table("quarantine")
        windows = t.table("checkpoints").filter(pl.col("window_id") > 0).height
    total = sum(pq.ParquetFile(f).metadata.num_rows for f in (market / "trades").iterdir())
    assert num(rows["rows read"]) == total
    assert num(rows["rows accepted"]) == trades.height
    assert num(rows["rows quarantined"]) == quarantine.height
    assert num(rows["rows accepted"]) + num(rows["rows quarantined"]) == total
    assert rows["read = accepted + quarantined"] == "yes"
    by_reason = dict(quarantine.group_by("reason").len().iter_rows())
    assert len(by_reason) >= 8
    assert {r: num(rows[r]) for r in schema.QUARANTINE_REASONS if r in rows} == by_reason
    assert num(rows["windows committed"]) == windows == -(-total // 400)
    assert num(rows["trades/s"]) > 0
    assert rows["self-check"] == "OK"


def test_replay_again_and_batch(market, db, new_target):
    # Same command again: nothing read, everything skipped.
    res = ok(cli("replay", market / "trades", "--refdata", market / "refdata", "--db", db, "--quiet"))
    rows = report_rows(res.stdout)
    assert num(rows["rows read"]) == 0 and num(rows["windows committed"]) == 0
    assert num(rows["rows already committed (skipped)"]) > 0
    # The whole input as one end-of-day window: same tables.
    batch_db = new_target("batch")
    res = ok(cli("replay", market / "trades", "--refdata", market / "refdata", "--db", batch_db, "--batch"))
    rows = report_rows(res.stdout)
    assert num(rows["windows committed"]) == 1 and rows["self-check"] == "OK"
    assert_same_tables(snapshot(batch_db), snapshot(db))
    # As a live feed (3,000 trades at 20,000 a second): same tables, and at least its feed's time.
    paced_db = new_target("paced")
    res = ok(cli("replay", market / "trades", "--refdata", market / "refdata", "--db", paced_db, "--window", 400,
                 "--pace", 20_000))
    rows = report_rows(res.stdout)
    assert num(rows["windows committed"]) == 8 and float(rows["seconds"]) >= 3_000 / 20_000
    assert_same_tables(snapshot(paced_db), snapshot(db))


def test_a_full_disk_during_a_replay_is_one_error_line(market, db, new_target):
    """A write the machine refuses during a run (a full disk, here at a frozen state run's
    file) prints one `error:` line and exits 4, no traceback; the same command run again
    continues where the database stands, to the tables of an uninterrupted run."""
    script = ("import sys\n"
              "from settle_arrow import state\n"
              "state.SEEN_FROZEN_ROWS = state.ACCEPTED_FROZEN_ROWS = 500\n"
              "def full(*args): raise OSError(28, 'No space left on device')\n"
              "state._spill = full\n"
              "from settle_arrow.cli import app\n"
              "app(prog_name='settle-arrow')\n")
    target = new_target("full")
    args = ["replay", str(market / "trades"), "--refdata", str(market / "refdata"), "--db", target, "--window", "400",
            "--quiet"]
    res = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=120)
    assert res.returncode == 4, f"exit {res.returncode}\n{res.stdout}\n{res.stderr}"
    assert "Traceback" not in res.stderr + res.stdout
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and re.match(r"error: .*No space left on device", lines[0]), res.stderr
    ok(cli(*args))
    assert_same_tables(snapshot(target), snapshot(db))


@pytest.mark.parametrize("table", TABLES)
def test_export_parquet_and_csv(db, tmp_path, table):
    want = schema.OUTPUT[table]
    keys = list(schema.KEYS[table])
    with open_target(db) as t:
        expected = t.arrow(table)
    assert expected.num_rows > 0, f"the market should fill {table}"

    pq_out = tmp_path / f"{table}.parquet"
    res = ok(cli("export", table, "--db", db, "--out", pq_out))
    assert f"{expected.num_rows:,} rows" in res.stdout
    got = pq.read_table(pq_out)
    assert got.schema.names == want.names  # exactly these columns, in this order
    assert got.schema.equals(want), f"{got.schema}\n!=\n{want}"
    assert got.equals(expected)
    frame = pl.from_arrow(got)
    assert frame.equals(frame.sort(keys, nulls_last=True), null_equal=True), "sorted by key"
    assert frame.select(keys).is_unique().all(), "keys identify rows"

    csv_out = tmp_path / f"{table}.csv"
    ok(cli("export", table, "--db", db, "--out", csv_out))
    header = csv_out.read_text(encoding="utf-8").splitlines()[0]
    assert [c.strip('"') for c in header.split(",")] == want.names
    back = pacsv.read_csv(
        csv_out,
        convert_options=pacsv.ConvertOptions(
            column_types=want, strings_can_be_null=True, quoted_strings_can_be_null=False
        ),
    )
    assert back.schema.names == want.names
    assert back.cast(want).equals(expected), "CSV reads back to the same values"


def test_export_creates_nothing_on_error(db, tmp_path, new_target):
    user_error(cli("export", "trades", "--db", db, "--out", tmp_path / "t.json"), r"\.parquet or \.csv")
    user_error(cli("export", "trades", "--db", db, "--out", tmp_path / "no" / "t.csv"), "does not exist")
    user_error(cli("export", "ledger", "--db", db, "--out", tmp_path / "t.csv"), "unknown table 'ledger'")
    user_error(cli("export", "trades", "--db", new_target("none"), "--out", tmp_path / "t.csv"),
               "does not exist|holds no settle_arrow data")
    assert list(tmp_path.iterdir()) == []


def test_status_text_and_json(db):
    res = ok(cli("status", "--db", db))
    rows = report_rows(res.stdout)
    with open_target(db) as t:
        counts = {name: t.storage.count(name) for name in schema.OUTPUT}
    assert num(rows["windows committed"]) == counts["checkpoints"]
    for name, n in counts.items():
        assert num(rows[f"rows in {name}"]) == n
    assert rows["last self-check"].startswith("OK")

    s = json.loads(ok(cli("status", "--db", db, "--json")).stdout)
    assert s["target"] == db
    assert s["row_counts"] == counts
    assert s["windows"] == counts["checkpoints"]
    assert s["last_window"]["window_id"] == counts["checkpoints"] - 1  # window 0: opening holdings
    assert s["last_self_check"]["status"] == "OK"
    assert len(s["sources"]) == 3 and all(src["rows_done"] > 0 for src in s["sources"])


# --- user mistakes: exit 2, one line, no traceback, nothing written ----------------------


def _replay(market: Path, db: Path | str, *extra, paths=None, refdata=None):
    return cli("replay", *(paths or [market / "trades"]), "--refdata", refdata or market / "refdata", "--db", db, *extra)


def test_replay_user_mistakes(market, tmp_path):
    db = tmp_path / "x.duckdb"
    user_error(_replay(market, db, paths=[tmp_path / "missing.parquet"]), "no input file matches .*missing.parquet")
    user_error(_replay(market, db, paths=[tmp_path / "nothing-*.parquet"]), "no input file matches")
    user_error(_replay(market, db, refdata=tmp_path / "no-refdata"), "reference data directory not found")
    partial = tmp_path / "refdata"
    partial.mkdir()
    for f in (market / "refdata").iterdir():
        if f.name != "securities.parquet":
            (partial / f.name).write_bytes(f.read_bytes())
    user_error(_replay(market, db, refdata=partial), "securities")
    user_error(_replay(market, db, "--window", 0), "window")
    user_error(_replay(market, db, "--window", -3), "window")
    user_error(_replay(market, db, "--pace", 0), "pace must be above 0")
    user_error(_replay(market, db, "--pace", "nan"), "pace must be above 0")
    user_error(_replay(market, db, "--pace", 1000, "--batch"), "live feed: it needs streaming windows")
    user_error(_replay(market, tmp_path / "no-dir" / "x.duckdb"), "does not exist")
    user_error(_replay(market, tmp_path), "DuckDB|directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["refdata"], "no TARGET created by a failed replay"


def test_bad_target_files_are_not_touched(market, tmp_path):
    """A TARGET that is not a DuckDB file (text, or a trade file given by mistake) is refused
    and left byte-for-byte as it was."""
    text = tmp_path / "notes.duckdb"
    text.write_text("not a database\n" * 100)
    trade_file = tmp_path / "t.parquet"
    trade_file.write_bytes(next((market / "trades").iterdir()).read_bytes())
    for target in (text, trade_file):
        before = target.read_bytes()
        user_error(_replay(market, target), "DuckDB")
        user_error(cli("status", "--db", target), "DuckDB")
        user_error(cli("export", "trades", "--db", target, "--out", tmp_path / "o.csv"), "DuckDB")
        assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.duckdb", "t.parquet"]


def test_status_user_mistakes(tmp_path):
    user_error(cli("status", "--db", tmp_path / "nope.duckdb"), "nope.duckdb does not exist")
    user_error(cli("status", "--db", tmp_path / "nope.duckdb", "--json"), "does not exist")
    assert list(tmp_path.iterdir()) == []
    import duckdb

    duckdb.connect(str(tmp_path / "other.duckdb")).close()  # a DuckDB file, not ours
    user_error(cli("status", "--db", tmp_path / "other.duckdb"), "no settle_arrow data")


def test_messages_are_text_not_markup(market, db, tmp_path):
    """Brackets in paths and names are printed as they are (not eaten as rich markup, no crash)."""
    line = user_error(_replay(market, tmp_path / "x.duckdb", paths=["/nonexistent/[/x]/t.parquet"]), "no input")
    assert line.endswith("/nonexistent/[/x]/t.parquet")
    line = user_error(cli("export", "[bold]t", "--db", db, "--out", tmp_path / "o.csv"), "unknown table")
    assert "'[bold]t'" in line



def test_target_in_use(market, db, backend):
    """While another process writes the TARGET, a replay says so (exit 2); so does status on
    DuckDB (one writing process, no readers beside it), while PostgreSQL serves readers."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from settle_arrow.storage import open_storage; "
         f"s = open_storage({db!r}); print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        if backend.name == "duckdb":
            line = user_error(cli("status", "--db", db), "in use by another process")
            assert "postgresql://" in line, "the message names the alternative"
            user_error(cli("export", "trades", "--db", db, "--out", "/tmp/never.csv"), "in use by another process")
        else:
            ok(cli("status", "--db", db))
        user_error(_replay(market, db), "in use by another process")
    finally:
        holder.kill()
        holder.wait()
    ok(cli("status", "--db", db))


def test_schema_version_mismatch(market, new_target):
    """A TARGET written by another schema version is refused with one clear line, every command."""
    db = new_target("old")
    ok(_replay(market, db, "--window", 5000))
    w = open_storage(db)  # pretend another settle_arrow version wrote it
    try:
        with w.transaction():
            w._execute("DELETE FROM meta WHERE key = ?", ("schema_version",))
            w._append("meta", pa.table({"key": ["schema_version"], "value": ["999"]}))
    finally:
        w.close()
    pattern = rf"written by schema version 999; this settle_arrow uses {schema.SCHEMA_VERSION}"
    user_error(cli("status", "--db", db), pattern)
    user_error(_replay(market, db), pattern)
    user_error(cli("export", "trades", "--db", db, "--out", "/tmp/never.csv"), pattern)


def test_schema_version_4_target_is_migrated(market, new_target):
    """A TARGET of schema version 4 (sources without sha256, obligations as deltas) is read as
    it is, and its next replay migrates it and records the sha256 of every file it names, with the tables a
    replay into a fresh TARGET gives."""
    files = sorted((market / "trades").glob("*.parquet"))
    db = new_target("v4")
    ok(_replay(market, db, "--window", 5000, paths=files[:1]))
    as_version_5(db)
    w = open_storage(db)  # as schema version 4 left it
    try:
        with w.transaction():
            w._execute("ALTER TABLE sources DROP COLUMN sha256")
            w._put_meta({"schema_version": "4"})
    finally:
        w.close()

    def stored() -> tuple[str, dict[str, str]]:
        r = open_storage(db)
        try:
            cols = set(r.query("SELECT * FROM sources LIMIT 0").column_names)
            sha = r.query("SELECT source, sha256 FROM sources").to_pylist() if "sha256" in cols else []
            return r.meta()["schema_version"], {x["source"]: x["sha256"] for x in sha}
        finally:
            r.close()

    assert json.loads(ok(cli("status", "--db", db, "--json")).stdout)["sources"]
    assert stored() == ("4", {})
    ok(_replay(market, db, "--window", 5000))
    version, sha = stored()
    assert version == str(schema.SCHEMA_VERSION)
    assert {Path(s.removeprefix("file://")): d for s, d in sha.items()} == {f: file_sha256(str(f)) for f in files}
    fresh = new_target("fresh")
    ok(_replay(market, fresh, "--window", 5000))
    assert_same_tables(snapshot(db), snapshot(fresh))


PG_MISTAKES = {
    # what is wrong: (TARGET with {db} = the session database's URL, expected message)
    "server down": ("postgresql://postgres@127.0.0.1:1/test", r"cannot connect to postgresql://postgres@127\.0\.0\.1:1/test: .*refused"),
    "password hidden": ("postgresql://postgres:secret@127.0.0.1:1/test", r"postgres:\*\*\*@"),
    "unknown role": ("postgresql://nobody_here@127.0.0.1:5432/test", r'role "nobody_here" does not exist'),
    "unknown host": ("postgresql://postgres@no-such-host.invalid/test", r"cannot connect to .*no-such-host"),
    "unknown database": ("{server}/settle_no_such_db", r'database "settle_no_such_db" does not exist'),
    "bad parameter": ("{db}?bogus=1", r"invalid URI query parameter"),
    "two schemas": ("{db}?schema=a&schema=b", r"one non-empty schema="),
    "empty schema": ("{db}?schema=never_written", r"holds no settle_arrow data"),
}


@pytest.mark.parametrize("mistake", list(PG_MISTAKES))
def test_postgres_target_mistakes(market, pg_backend, tmp_path, mistake):
    """Unreachable server, unknown role or database, bad URI: one line, exit 2, every command."""
    template, pattern = PG_MISTAKES[mistake]
    db = pg_backend.pg_url
    target = template.format(db=db, server=db.rsplit("/", 1)[0])
    line = user_error(cli("status", "--db", target), pattern)
    assert "secret" not in line
    user_error(cli("export", "trades", "--db", target, "--out", tmp_path / "t.csv"), pattern)
    if mistake != "empty schema":  # (a replay would simply write it)
        user_error(_replay(market, target), pattern)
    assert list(tmp_path.iterdir()) == []
