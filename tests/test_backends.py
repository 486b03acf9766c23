"""SPEC §7: the same command gives the same tables on DuckDB and PostgreSQL. Content digests
prove it cheaply (`status --digest`), `copy` moves a TARGET between backends exactly, and
every stored Arrow type round-trips exactly through each backend."""

from __future__ import annotations

import datetime as dt
import json
import random
from decimal import Decimal
from pathlib import Path

import polars as pl
import pyarrow as pa
import pytest
from test_cli import cli, ok, user_error

from settle_arrow import copy_target, open_target, replay, schema
from settle_arrow.digest import table_digest
from settle_arrow.generate import MarketSpec, generate_market
from settle_arrow.storage import open_storage
from settle_arrow.storage.base import conform
from settle_arrow.storage.postgres import pg_placeholders


@pytest.fixture(scope="module")
def market(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("backends")
    generate_market(out, MarketSpec(trades=6000, seed=77, days=4, bad_rate=0.05, cancel_rate=0.05))
    return out


@pytest.fixture(scope="module")
def both(market, pg_backend, tmp_path_factory) -> dict[str, str]:
    """The same replay (same windows) into a DuckDB file and into a PostgreSQL schema."""
    root = tmp_path_factory.mktemp("both")
    targets = {"duckdb": str(root / "run.duckdb"), "postgres": pg_backend.new(root, "run")}
    for db in targets.values():
        replay([str(market / "trades")], str(market / "refdata"), db, window_rows=700)
    return targets


def physical(db: str) -> dict[str, pl.DataFrame]:
    """Every physical table of schema.STORAGE, rows in a total order."""
    storage = open_storage(db, read_only=True)
    try:
        out = {}
        for name, s in schema.STORAGE.items():
            cols = ", ".join(f'"{c}"' for c in s.names)
            frame = pl.from_arrow(conform(storage.query(f"SELECT {cols} FROM {name}"), s))
            assert isinstance(frame, pl.DataFrame)
            out[name] = frame.sort(frame.columns, nulls_last=True) if frame.height else frame
        return out
    finally:
        storage.close()


def digests(db: str) -> dict[str, str]:
    with open_target(db) as t:
        return t.digest()


def test_same_replay_same_digests_and_tables(both):
    a, b = digests(both["duckdb"]), digests(both["postgres"])
    assert set(a) == set(schema.OUTPUT)
    assert a == b  # every table, checkpoints too (same windows; committed_at is left out)
    with open_target(both["duckdb"]) as x, open_target(both["postgres"]) as y:
        for name in schema.OUTPUT:
            tx, ty = x.arrow(name), y.arrow(name)
            if name == "checkpoints":
                tx, ty = tx.drop_columns(["committed_at"]), ty.drop_columns(["committed_at"])
            assert tx.schema.equals(ty.schema), name
            assert tx.equals(ty), f"{name}: same rows in the same (key) order"


def test_status_digest_cli_equal_on_both(both):
    got = {}
    for kind, db in both.items():
        s = json.loads(ok(cli("status", "--db", db, "--digest", "--json")).stdout)
        got[kind] = s["digests"]
        text = ok(cli("status", "--db", db, "--digest")).stdout
        assert got[kind]["trades"][:20] in text.replace("\n", "")
    assert got["duckdb"] == got["postgres"] == digests(both["duckdb"])


@pytest.mark.parametrize("direction", ["duckdb->postgres", "postgres->duckdb"])
def test_copy_between_backends_is_exact(market, both, pg_backend, tmp_path, direction):
    src_kind, dst_kind = direction.split("->")
    src = both[src_kind]
    dst = str(tmp_path / "copy.duckdb") if dst_kind == "duckdb" else pg_backend.new(tmp_path, "copy")
    rows = copy_target(src, dst)
    assert set(rows) == set(schema.STORAGE)
    want, got = physical(src), physical(dst)
    for name in schema.STORAGE:
        assert got[name].equals(want[name], null_equal=True), name
        assert rows[name] == want[name].height
    assert digests(dst) == digests(src)
    # Round trip back to the first backend: still the same content.
    back = str(tmp_path / "back.duckdb") if src_kind == "duckdb" else pg_backend.new(tmp_path, "back")
    res = ok(cli("copy", "--from", dst, "--to", back))
    assert f"digests of all {len(schema.OUTPUT)} tables match" in res.stdout.replace("\n", " ")
    assert digests(back) == digests(src)
    # The copy is a working TARGET, exactly-once bookkeeping included: the same input again adds nothing.
    again = replay([str(market / "trades")], str(market / "refdata"), back, window_rows=700)
    assert again.rows_read == 0 and again.rows_skipped > 0
    assert digests(back) == digests(src)


def test_copy_refuses_a_target_in_use_or_not_empty(both, pg_backend, tmp_path):
    for dst in both.values():
        user_error(cli("copy", "--from", both["duckdb"], "--to", dst), "is not empty|open read-only in this process")
    user_error(cli("copy", "--from", str(tmp_path / "none.duckdb"), "--to", str(tmp_path / "x.duckdb")), "does not exist")
    user_error(cli("copy", "--from", pg_backend.new(tmp_path, "never"), "--to", str(tmp_path / "y.duckdb")),
               "holds no settle_arrow data")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing created by a refused copy


def test_copy_is_one_transaction(both, pg_backend, tmp_path, monkeypatch):
    """A copy that fails half-way leaves nothing in the destination."""
    from settle_arrow.storage.postgres import PostgresStorage

    real, calls = PostgresStorage._append, []

    def failing(self, table, data):
        calls.append(table)
        if len(calls) == 6:
            raise RuntimeError("disk full (injected)")
        real(self, table, data)

    monkeypatch.setattr(PostgresStorage, "_append", failing)
    dst = pg_backend.new(tmp_path, "half")
    with pytest.raises(RuntimeError, match="injected"):
        copy_target(both["duckdb"], dst)
    monkeypatch.setattr(PostgresStorage, "_append", real)
    assert pg_backend.tables(dst) == set()
    copy_target(both["duckdb"], dst)  # and the same copy again succeeds
    assert digests(dst) == digests(both["duckdb"])


# --- digests ------------------------------------------------------------------------


def test_digest_ignores_row_order_and_chunking_but_not_values(both):
    with open_target(both["duckdb"]) as t:
        for name in ("trades", "obligations_cash", "checkpoints"):
            data = t.arrow(name)
            d = table_digest(name, data)
            rng = random.Random(1)
            order = list(range(data.num_rows))
            rng.shuffle(order)
            shuffled = data.take(pa.array(order, pa.int64()))
            chunked = pa.Table.from_batches(shuffled.to_batches(max_chunksize=97))
            assert table_digest(name, chunked) == d
            assert table_digest(name, data.select(list(reversed(data.column_names)))) == d
            changed = data.slice(1)
            assert table_digest(name, changed) != d
        cash = t.arrow("obligations_cash")
        col = cash.column_names.index("net_amount")
        bumped = cash.set_column(col, "net_amount", pa.array(
            [cash["net_amount"][0].as_py() + Decimal("0.01"), *cash["net_amount"].to_pylist()[1:]], schema.MONEY))
        assert table_digest("obligations_cash", bumped) != table_digest("obligations_cash", cash)
        # checkpoints: committed_at (wall-clock time) does not count
        cps = t.arrow("checkpoints")
        later = cps.set_column(cps.column_names.index("committed_at"), "committed_at",
                               pa.array([dt.datetime(2030, 1, 1, tzinfo=dt.UTC)] * cps.num_rows, cps.schema.field("committed_at").type))
        assert table_digest("checkpoints", later) == table_digest("checkpoints", cps)


def test_digest_nulls_and_empty_strings_differ():
    s = schema.OUTPUT["exceptions"]
    row = {"code": "X", "market": "XSHG", "security_id": "1", "account_id": None, "participant_id": "P1",
           "trade_date": dt.date(2025, 6, 16), "detail": ""}
    a = pa.Table.from_pylist([row], schema=s)
    b = pa.Table.from_pylist([dict(row, account_id="")], schema=s)
    c = pa.Table.from_pylist([dict(row, detail=None)], schema=s)
    assert len({table_digest("exceptions", t) for t in (a, b, c)}) == 3
    assert table_digest("exceptions", s.empty_table()) != table_digest("quarantine", schema.OUTPUT["quarantine"].empty_table())


# --- exact round trips of every stored type ------------------------------------------


def _extremes(t: pa.DataType, rng: random.Random, n: int) -> list:
    if pa.types.is_decimal(t):
        top = 10 ** (t.precision - t.scale) - Decimal(1) / 10 ** t.scale
        fixed = [top, -top, Decimal(0), Decimal(1) / 10 ** t.scale, -Decimal(1) / 10 ** t.scale]
        rand = [Decimal(rng.randrange(-10 ** t.precision + 1, 10 ** t.precision)) / 10 ** t.scale for _ in range(n)]
        return fixed + rand
    if pa.types.is_integer(t):
        bits = t.bit_width
        lo, hi = (0, 2**bits - 1) if pa.types.is_unsigned_integer(t) else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
        return [lo, hi, 0, 1] + [rng.randint(lo, hi) for _ in range(n + 1)]
    if pa.types.is_date(t):
        return [dt.date(1, 1, 1), dt.date(9999, 12, 31), dt.date(1970, 1, 1), dt.date(2000, 2, 29)] + [
            dt.date(1900, 1, 1) + dt.timedelta(days=rng.randrange(80000)) for _ in range(n + 1)]
    if pa.types.is_time(t):
        return [dt.time(0), dt.time(23, 59, 59, 999999), dt.time(9, 30, 0, 1), dt.time(12)] + [
            dt.time(rng.randrange(24), rng.randrange(60), rng.randrange(60), rng.randrange(10**6)) for _ in range(n + 1)]
    if pa.types.is_timestamp(t):
        base = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
        return [base, dt.datetime(2262, 4, 11, tzinfo=dt.UTC), dt.datetime(1900, 1, 1, 0, 0, 0, 1, tzinfo=dt.UTC),
                dt.datetime(2025, 6, 16, 9, 30, tzinfo=dt.UTC)] + [
            base + dt.timedelta(microseconds=rng.randrange(-(10**15), 10**16)) for _ in range(n + 1)]
    if pa.types.is_string(t):
        return ["", "a'b\"c?", "中文 証券", "x" * 300, "tab\tnew\nline"] + [str(rng.random()) for _ in range(n)]
    if pa.types.is_boolean(t):
        return [True, False] + [rng.random() < 0.5 for _ in range(n + 3)]
    raise AssertionError(f"no extremes for {t}")


def test_every_stored_type_round_trips_exactly(new_target):
    """Each physical table gets extreme values of each of its column types (and nulls),
    written through the backend's bulk path and read back: exactly equal."""
    rng = random.Random(5)
    storage = open_storage(new_target())
    try:
        storage.ensure_schema()
        for name, s in schema.STORAGE.items():
            if name == "meta":
                continue  # holds the schema version; strings are covered by every other table
            cols = {}
            for f in s:
                values = _extremes(f.type, rng, 20)
                values[rng.randrange(len(values))] = None
                rng.shuffle(values)
                cols[f.name] = pa.array(values[:25], f.type)
            data = pa.table(cols, schema=s)
            with storage.transaction():
                if name in schema.SEGMENTED:
                    # Rows of committed windows (a backend may keep them as segment files shown up
                    # to the last checkpoint): a window id each, and a checkpoint past them.
                    data = data.set_column(s.get_field_index("window_id"), "window_id",
                                           pa.array(range(1, data.num_rows + 1), pa.int64()))
                    storage._append("checkpoints", pa.Table.from_pylist(
                        [{"window_id": data.num_rows, "source": "s", "offset": 0, "rows": 0, "digest": ""}],
                        schema=schema.STORAGE["checkpoints"]))
                elif name not in storage.file_tables:  # a backend's file tables start empty
                    storage._execute(f"DELETE FROM {name}")
                storage._append(name, data)
            names = ", ".join(f'"{c}"' for c in s.names)
            back = conform(storage.query(f"SELECT {names} FROM {name}"), s)
            order = [(c, "ascending", "at_end") for c in s.names]
            assert back.sort_by(order).equals(data.sort_by(order)), name
    finally:
        storage.close()


def test_transaction_commits_whole_or_not_at_all(new_target):
    """Storage.transaction, every backend: the block commits when it ends; anything it
    raises (an interrupt too) rolls all of it back, and the storage goes on working."""
    storage = open_storage(new_target())
    try:
        storage.ensure_schema()
        with storage.transaction():
            storage._put_meta({"a": "1"})
        for raised in (ValueError("bad"), KeyboardInterrupt()):
            with pytest.raises(type(raised)):
                with storage.transaction():
                    storage._put_meta({"a": "2", "b": "3"})
                    assert storage.meta()["b"] == "3"  # seen inside the transaction
                    raise raised
            assert {k: v for k, v in storage.meta().items() if k in "ab"} == {"a": "1"}
        storage.set_meta({"b": "4"})
        assert storage.meta()["b"] == "4"
    finally:
        storage.close()


def test_pg_binds_no_datetime_which_would_end_the_transaction(pg_backend, tmp_path):
    """The ADBC PostgreSQL driver commits the open transaction when a statement binds a
    timezone-aware datetime (apache/arrow-adbc#2410): the storage refuses to bind one,
    while times appended through Arrow stay inside the transaction."""
    storage = open_storage(pg_backend.new(tmp_path))
    try:
        storage.ensure_schema()
        now = dt.datetime.now(dt.UTC)
        with pytest.raises(AssertionError, match="bind no datetime"):
            storage._execute("SELECT CAST(? AS TIMESTAMPTZ)", (now,))
        with pytest.raises(RuntimeError, match="disk full"):
            with storage.transaction():
                storage._put_meta({"a": "1"})
                storage._append("checkpoints", pa.Table.from_pylist(
                    [{"window_id": 1, "source": "s", "offset": 0, "rows": 0, "committed_at": now, "digest": ""}],
                    schema=schema.STORAGE["checkpoints"]))
                raise RuntimeError("disk full")
        assert "a" not in storage.meta() and storage.count("checkpoints") == 0
    finally:
        storage.close()


def test_pg_placeholders():
    assert pg_placeholders("SELECT ? , ?") == "SELECT $1 , $2"
    assert pg_placeholders("SELECT '?', \"a?\" FROM t WHERE x = ? AND y = 'it''s?'") == (
        "SELECT '?', \"a?\" FROM t WHERE x = $1 AND y = 'it''s?'")
