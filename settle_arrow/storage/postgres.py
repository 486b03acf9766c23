"""PostgreSQL backend through ADBC: a TARGET `postgresql://user@host:port/db[?schema=NAME]`.

Data model: the tables of schema.STORAGE and the views of sql/views.sql in one PostgreSQL
schema: the `schema` query parameter (created on first write), else the connection's
search_path (normally `public`). Other query parameters go to libpq unchanged.

Invariants:
  * the connection runs in autocommit mode and the base class brackets a window with
    explicit BEGIN/COMMIT, so the window's COPYs (ADBC ingest) and statements are one
    transaction: a crash or a dropped connection leaves nothing of an uncommitted window
    (no statement binds a datetime, which would end it early: _bound);
  * Arrow in bulk both ways: writes are `adbc_ingest` (COPY), never row-by-row INSERT;
    reads are Arrow tables; NUMERIC arrives as text and is parsed exactly into decimal128
    (precision and scale from the column's type modifier), never through a float;
  * text columns use the "C" collation, so ORDER BY sorts by code point as DuckDB does;
  * one writer per schema (a session advisory lock, released when the connection ends);
    readers run REPEATABLE READ, READ ONLY transactions and see committed windows only.
"""

from __future__ import annotations

import datetime
import itertools
import re
from collections.abc import Iterator
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import adbc_driver_manager
import pyarrow as pa
import pyarrow.compute as pc
from adbc_driver_postgresql import dbapi as pg_dbapi

from settle_arrow.errors import StorageError
from settle_arrow.storage.base import Storage, TargetError, sql_type

# First key of the two-key advisory lock a writer holds on its schema ("SA" in ASCII).
WRITER_LOCK_CLASS = 0x5341
APPLICATION_NAME = {False: "settle_arrow writer", True: "settle_arrow reader"}

_TOKENS = re.compile(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|\?")


def pg_placeholders(sql: str) -> str:
    """`?` placeholders (the base class's neutral form) -> PostgreSQL's `$1, $2, ...`;
    a `?` inside a string literal or a quoted identifier is left alone."""
    n = itertools.count(1)
    return _TOKENS.sub(lambda m: f"${next(n)}" if m.group() == "?" else m.group(), sql)


def _bound(params: tuple) -> tuple | None:
    """A statement's parameters as the driver takes them. No datetime among them: the ADBC
    PostgreSQL driver (1.13) ends the open transaction with a bare COMMIT when it binds a
    timezone-aware one (apache/arrow-adbc#2410; the crash tests caught it in a change that
    bound the checkpoint's time), so the rows a window wrote before it would commit
    without the rest. Times go in through Arrow appends (COPY), which keep the transaction."""
    assert not any(isinstance(p, datetime.datetime) for p in params), "bind no datetime (see _bound)"
    return tuple(params) or None


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def split_target(target: str) -> tuple[str, str | None, str]:
    """TARGET -> (libpq URI, schema or None, the TARGET for messages, password hidden)."""
    parts = urlsplit(target)
    query = parse_qsl(parts.query, keep_blank_values=True)
    schemas = [v for k, v in query if k == "schema"]
    rest = [(k, v) for k, v in query if k != "schema"]
    if len(schemas) > 1 or (schemas and not schemas[0]):
        raise TargetError(f"give one non-empty schema= in {target!r}")
    uri = urlunsplit(parts._replace(query=urlencode(rest)))
    shown = re.sub(r"^([a-z]+://[^:/@?#]*):[^@/?#]*@", r"\1:***@", target) if parts.password is not None else target
    return uri, (unquote(schemas[0]) if schemas else None), shown


def _reason(exc: BaseException) -> str:
    """libpq's message in one line, without ADBC's status prefix."""
    text = str(exc)
    text = re.sub(r"^[A-Z_]+: ", "", text)
    text = re.sub(r"^\[libpq\] (Failed to connect: )?", "", text)
    text = text.split("\n\nQuery was:")[0]
    lines = [re.sub(r"^(FATAL|ERROR):\s+", "", ln.strip()) for ln in text.splitlines()]
    return "; ".join(ln for ln in lines if ln) or type(exc).__name__


def _decimal_type(field: pa.Field, text: pa.ChunkedArray) -> pa.DataType:
    """decimal128(p, s) of a NUMERIC column: from its type modifier, else from its values."""
    typmod = int((field.metadata or {}).get(b"POSTGRESQL:typmod", b"-1"))
    if typmod >= 4:  # PostgreSQL packs NUMERIC(p, s) as ((p << 16) | s) + 4
        return pa.decimal128((typmod - 4) >> 16, (typmod - 4) & 0xFFFF)
    if text.null_count == len(text):
        return pa.decimal128(38, 0)
    digits = pc.replace_substring(text, "-", "")
    dot = pc.find_substring(digits, ".")
    length = pc.utf8_length(digits)
    has_dot = pc.greater_equal(dot, 0)
    scale = pc.max(pc.if_else(has_dot, pc.subtract(pc.subtract(length, dot), 1), 0)).as_py() or 0
    whole = pc.max(pc.if_else(has_dot, dot, length)).as_py() or 0
    precision = max(whole + scale, 1)
    return pa.decimal128(precision, scale) if precision <= 38 else pa.decimal256(min(precision, 76), scale)


def _normalise(table: pa.Table) -> pa.Table:
    """Plain Arrow types, no driver metadata: NUMERIC text -> exact decimals."""
    fields, columns = [], []
    for field, col in zip(table.schema, table.columns, strict=True):
        t = field.type
        if isinstance(t, pa.BaseExtensionType):
            col = pa.chunked_array([c.storage for c in col.chunks], type=t.storage_type)
            if (field.metadata or {}).get(b"POSTGRESQL:type") == b"numeric":
                col = col.cast(_decimal_type(field, col))  # exact: refuses anything lossy
        fields.append(pa.field(field.name, col.type))
        columns.append(col)
    return pa.Table.from_arrays(columns, schema=pa.schema(fields))


class PostgresStorage(Storage):
    def __init__(self, target: str, read_only: bool = False):
        uri, schema_name, self.url = split_target(target)
        self._target = target
        self.read_only = read_only
        try:
            self.con = pg_dbapi.connect(uri, autocommit=True)
        except adbc_driver_manager.Error as exc:
            raise TargetError(f"cannot connect to {self.url}: {_reason(exc)}") from None
        self.cur = self.con.cursor()
        try:
            self._setup(schema_name)
        except BaseException:
            self.close()
            raise

    def _setup(self, schema_name: str | None) -> None:
        self._execute(f"SET application_name = '{APPLICATION_NAME[self.read_only]}'")
        # Fresh tables have no statistics yet: the planner's guesses for the views' joins run
        # to billions of rows and trigger JIT compilation (~0.4 s a query, measured), for
        # queries that take milliseconds.
        self._execute("SET jit = off")
        if schema_name is not None:
            if not self.read_only:
                self._execute(f"CREATE SCHEMA IF NOT EXISTS {quote_ident(schema_name)}")
            self._execute(f"SET search_path TO {quote_ident(schema_name)}")
        if self.read_only:
            # Every transaction of a reader is one consistent snapshot of committed windows.
            self._execute("SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            return
        if self._query("SELECT current_schema() AS s")["s"][0].as_py() is None:
            raise TargetError(f"{self.url}: no schema to write into (check search_path or schema=)")
        got = self._query(
            f"SELECT pg_try_advisory_lock({WRITER_LOCK_CLASS}, hashtext(current_schema())) AS ok"
        )["ok"][0].as_py()
        if not got:
            raise TargetError(f"{self.url} is in use by another process (a replay writing it?)")

    # --- primitives -----------------------------------------------------------------
    def _run(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (adbc_driver_manager.OperationalError, adbc_driver_manager.InternalError) as exc:
            reason = _reason(exc)
            lost = re.search(r"no connection to the server|server closed the connection|terminating connection|"
                             r"connection (?:to server )?.*(?:lost|closed|refused)", reason, re.I)
            what = "lost the connection to" if lost else "database error on"
            raise StorageError(f"{what} {self.url}: {reason}") from None

    def _execute(self, sql: str, params: tuple = ()) -> None:
        self._run(self.cur.execute, pg_placeholders(sql), _bound(params))

    def _query(self, sql: str, params: tuple = ()) -> pa.Table:
        self._run(self.cur.execute, pg_placeholders(sql), _bound(params))
        return _normalise(self._run(self.cur.fetch_arrow_table))

    def _query_batches(self, sql: str, rows: int) -> Iterator[pa.RecordBatch]:
        # The driver streams the result (COPY) in batches of its own size; `rows` is a hint.
        self._run(self.cur.execute, pg_placeholders(sql))
        reader = self._run(self.cur.fetch_record_batch)
        try:
            for batch in reader:
                yield from _normalise(pa.Table.from_batches([batch])).to_batches()
        finally:
            reader.close()

    def _append(self, table: str, data: pa.Table) -> None:
        self._run(self.cur.adbc_ingest, table, data, mode="append")

    def _begin(self) -> None:
        self._execute("BEGIN")

    def _commit(self) -> None:
        self._execute("COMMIT")

    def _rollback(self) -> None:
        try:
            self.cur.execute("ROLLBACK")
        except adbc_driver_manager.Error:
            pass  # no transaction open, or the connection is gone (the server rolled back)

    def _table_names(self) -> set[str]:
        t = self._query("SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()")
        return set(t["table_name"].to_pylist())

    def _column_type(self, t: pa.DataType) -> str:
        if pa.types.is_string(t) or pa.types.is_large_string(t):
            return 'VARCHAR COLLATE "C"'  # code-point order, as DuckDB sorts
        return sql_type(t)

    def reader(self) -> PostgresStorage:
        return PostgresStorage(self._target, read_only=True)

    def close(self) -> None:
        for obj in (self.cur, self.con):
            try:
                obj.close()
            except Exception:  # noqa: BLE001 - closing a dead connection: nothing to keep
                pass


# --- databases, for tests and the benchmark ------------------------------------------


def with_database(url: str, database: str, schema_name: str | None = None) -> str:
    """`url` pointing at another database (and optionally ?schema=)."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "schema"]
    if schema_name is not None:
        query.append(("schema", schema_name))
    return urlunsplit(parts._replace(path=f"/{database}", query=urlencode(query)))


def admin(url: str, *statements: str) -> None:
    """Run statements outside any transaction (CREATE/DROP DATABASE) on the server of `url`."""
    uri, _, shown = split_target(url)
    try:
        with pg_dbapi.connect(uri, autocommit=True) as con, con.cursor() as cur:
            for stmt in statements:
                cur.execute(stmt)
    except adbc_driver_manager.Error as exc:
        raise TargetError(f"{shown}: {_reason(exc)}") from None


def create_database(url: str, name: str) -> str:
    """A new empty database `name` on the server of `url`; returns its URL."""
    admin(url, f"CREATE DATABASE {quote_ident(name)} TEMPLATE template0 ENCODING 'UTF8'")
    return with_database(url, name)


def drop_database(url: str, name: str) -> None:
    admin(url, f"DROP DATABASE IF EXISTS {quote_ident(name)} WITH (FORCE)")
