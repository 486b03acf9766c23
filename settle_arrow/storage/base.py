"""The storage adapter: one interface, backends as small plugins (DuckDB, PostgreSQL).

Data model: a TARGET holds the physical tables of schema.STORAGE plus the views of
sql/views.sql; `meta` maps key -> value (schema_version, opening_digest); `sources` maps
an input file's url -> how far it has been committed and which file that was (size,
sha256 of its bytes). A TARGET of an older schema version is brought up by its next
writer through schema.MIGRATIONS; readers read it as it is.

A backend implements five primitives (`_execute`, `_query`, `_append`, transactions
(`_begin`/`_commit`/`_rollback`; the writes here end theirs through `transaction()`),
`close`) and a type map, and may refine two points: `_create_table` (DuckDB keeps the
tables of its `file_tables` as files) and `inline_snapshot_window`; everything else (DDL from
schema.py, the window commit, exports, compaction, verification) is written once here, so
both backends behave identically.

Invariants: `commit_window` writes a window's appends (with those of its earlier pieces,
which `stage_window` put in the same open transaction), its checkpoint row and source
offsets in one transaction, or nothing; `commit_windows` does so for several consecutive
windows at once (group commit), each with its own checkpoint row; readers see only
committed windows.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import datetime
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from settle_arrow import schema
from settle_arrow.errors import UserError

# sql/ sits at the repository top (the design card's layout); wheels carry it inside the
# package (pyproject force-include), source checkouts and editable installs read it in place.
_PKG = Path(__file__).resolve().parents[1]
SQL_DIR = _PKG / "sql" if (_PKG / "sql").is_dir() else _PKG.parent / "sql"


class TargetError(UserError):
    """A TARGET cannot be opened or does not hold a settle_arrow database (user mistake)."""


# Placeholders in views.sql -> the meta key of the snapshot window each stands for (see
# Storage._snapshot_views).
SNAPSHOT_PLACEHOLDERS = {
    ":holdings_snapshot_window": schema.HOLDINGS_SNAPSHOT_KEY,
    ":obligations_snapshot_window": schema.OBLIGATIONS_SNAPSHOT_KEY,
}


def sql_text(name: str) -> str:
    return (SQL_DIR / name).read_text(encoding="utf-8")


def statements(name: str) -> list[str]:
    """The SQL statements of a .sql file, comment lines removed."""
    text = "\n".join(line for line in sql_text(name).splitlines() if not line.lstrip().startswith("--"))
    return [stmt.strip() for stmt in text.split(";") if stmt.strip()]


def named_queries(name: str) -> dict[str, str]:
    """`-- name: X` sections of a .sql file."""
    parts = re.split(r"^-- name: (\w+)\s*$", sql_text(name), flags=re.M)
    return {parts[i]: parts[i + 1].strip().rstrip(";") for i in range(1, len(parts), 2)}


def sql_type(t: pa.DataType) -> str:
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "VARCHAR"
    if pa.types.is_int64(t):
        return "BIGINT"
    if pa.types.is_int32(t):
        return "INTEGER"
    if pa.types.is_int16(t) or pa.types.is_int8(t):
        return "SMALLINT"
    if pa.types.is_boolean(t):
        return "BOOLEAN"
    if pa.types.is_date32(t):
        return "DATE"
    if pa.types.is_time64(t):
        return "TIME"
    if pa.types.is_timestamp(t):
        return "TIMESTAMPTZ" if t.tz else "TIMESTAMP"
    if pa.types.is_decimal(t):
        return f"DECIMAL({t.precision},{t.scale})"
    raise AssertionError(f"no SQL type for {t}")


def conform(table: pa.Table, target: pa.Schema) -> pa.Table:
    """Cast `table` to exactly `target` (column order, types); refuses lossy casts."""
    have = set(table.column_names)  # a set: column_names builds a new list per call
    missing = [n for n in target.names if n not in have]
    assert not missing, f"columns missing before write: {missing}"
    table = table.select(target.names)
    # Already exact (every window's trade rows): a cast would still check every value (1 ms
    # per 100,000 rows of trade_facts, measured).
    return table if table.schema.equals(target) else table.cast(target, safe=True)


def ids_in_key_order(acct_id: np.ndarray, sec_id: np.ndarray) -> bool:
    """Whether holdings rows of these dimension ids come sorted by (acct_id, sec_id)."""
    from settle_arrow.kernels import pairs_sorted  # numba loads in the background (kernel_loader)

    return pairs_sorted(acct_id, sec_id)


def _with_window_id(data: pa.Table, window_id: int) -> pa.Table:
    # numpy fill, not a Python list of num_rows ints (pieces hold 500 k rows)
    return data.append_column("window_id", pa.array(np.full(data.num_rows, window_id, dtype=np.int64)))


@dataclasses.dataclass(frozen=True)
class KeptRun:
    """One frozen run of a key set kept as files (see schema.STATE_RUNS)."""

    set_name: str
    run_no: int
    files: Mapping[str, str]  # column -> file name in Storage.state_dir
    covered_window: int


def _migration(version: str | None) -> tuple[str, ...] | None:
    """The statements that bring a TARGET of schema `version` to SCHEMA_VERSION (none when
    it is current); None when no chain of schema.MIGRATIONS leads there."""
    if version is None or not version.isdigit():
        return None
    steps: list[str] = []
    at = int(version)
    while at < schema.SCHEMA_VERSION and at in schema.MIGRATIONS:
        steps += schema.MIGRATIONS[at]
        at += 1
    return tuple(steps) if at == schema.SCHEMA_VERSION else None


class SourceOffset(NamedTuple):
    """How far one input file has been committed, and which file it was: its size and the
    sha256 of its bytes (None in rows of TARGETs written before schema version 5)."""

    source: str
    size_bytes: int
    sha256: str | None
    rows_done: int


@dataclasses.dataclass(frozen=True)
class WindowMark:
    """What commits with a window beside its rows: its checkpoint row (less window_id and
    committed_at), its sources' offsets and the state runs kept since the last commit."""

    window_id: int
    checkpoint: Mapping[str, object]
    sources: tuple[SourceOffset, ...] = ()
    state_runs: tuple[KeptRun, ...] = ()


class Storage(abc.ABC):
    url: str
    read_only: bool
    # A directory where the engine's frozen state runs stay as files the commits catalogue
    # (schema.STATE_RUNS), or None where the backend keeps none (recovery then rebuilds
    # them from the history).
    state_dir: str | None = None
    # Whether views name a snapshot's window (SNAPSHOT_PLACEHOLDERS) as a constant, remade
    # in the transaction that moves it (DuckDB: its Parquet scans skip older windows only
    # so), or read it from meta by a subquery (PostgreSQL: no DDL per snapshot, so no reader
    # ever waits on a view's lock).
    inline_snapshot_window = False
    # Tables of schema.STORAGE whose rows the backend keeps outside its tables, as files
    # (DuckDB: segments); their DDL comes after every other table's.
    file_tables: tuple[str, ...] = ()
    # The window whose pieces stage_window appended in the transaction still open (None:
    # no transaction open across calls).
    _open_window: int | None = None

    # --- backend primitives -------------------------------------------------------
    @abc.abstractmethod
    def _execute(self, sql: str, params: tuple = ()) -> None: ...

    @abc.abstractmethod
    def _query(self, sql: str, params: tuple = ()) -> pa.Table: ...

    @abc.abstractmethod
    def _append(self, table: str, data: pa.Table) -> None: ...

    @abc.abstractmethod
    def _query_batches(self, sql: str, rows: int) -> Iterator[pa.RecordBatch]:
        """The result streamed in batches of about `rows` rows; no other statement may run
        on this storage until the iterator is exhausted or closed."""

    @abc.abstractmethod
    def _begin(self) -> None: ...

    @abc.abstractmethod
    def _commit(self) -> None: ...

    @abc.abstractmethod
    def _rollback(self) -> None: ...

    @abc.abstractmethod
    def _table_names(self) -> set[str]: ...

    @contextlib.contextmanager
    def transaction(self, begun: bool = False) -> Iterator[None]:
        """The block as one transaction: committed when it ends, rolled back when it raises
        anything (an interrupt too: no reader or restart ever sees half of it). `begun`: the
        transaction is already open (a window's staged pieces)."""
        if not begun:
            self._begin()
        try:
            yield
            self._commit()
        except BaseException:
            self._rollback()
            raise

    @abc.abstractmethod
    def close(self) -> None: ...

    @abc.abstractmethod
    def reader(self) -> Storage:
        """Another read-only handle on this TARGET, usable from another thread while this one
        works (recovery reads holdings and trades at once); it sees committed data only."""

    # --- schema -------------------------------------------------------------------
    def is_initialised(self) -> bool:
        return "meta" in self._table_names()

    def ensure_schema(self) -> None:
        """Create missing tables and views; refuse a database of another schema version."""
        existing = self._table_names()
        if "meta" in existing:
            version = self.meta().get("schema_version")
            steps = _migration(version)
            if steps is None:
                raise TargetError(
                    f"{self.url} was written by schema version {version}; this settle_arrow "
                    f"uses {schema.SCHEMA_VERSION}"
                )
            # A reader of an older TARGET reads it as it is (no migration adds what a read
            # needs); its next writer migrates it.
            if steps and not self.read_only:
                with self.transaction():
                    self._create_missing_tables(existing)
                    for stmt in steps:
                        self._execute(stmt)
                    self._create_views()
                    self._put_meta({"schema_version": str(schema.SCHEMA_VERSION)})
            return
        with self.transaction():
            self._create_schema()

    def _create_schema(self) -> None:
        """Tables, views and the schema_version row, inside the caller's transaction."""
        self._create_missing_tables(set())
        self._create_views()
        self._append("meta", pa.table({"key": ["schema_version"], "value": [str(schema.SCHEMA_VERSION)]}))

    def _create_missing_tables(self, existing: set[str]) -> None:
        # Tables kept as files last: a backend's view of one may read the others (DuckDB's
        # reads checkpoints).
        for name in sorted(schema.STORAGE, key=lambda n: n in self.file_tables):
            if name not in existing:
                self._create_table(name, schema.STORAGE[name])

    def _create_views(self, only_snapshots: bool = False) -> None:
        """(Re)make the views of views.sql, or only those naming a snapshot's window, inside
        the caller's transaction."""
        windows = {p: self._snapshot_window_sql(key) for p, key in SNAPSHOT_PLACEHOLDERS.items()}
        for stmt in statements("views.sql"):
            named = [p for p in windows if p in stmt]
            if named or not only_snapshots:
                for p in named:
                    stmt = stmt.replace(p, windows[p])
                self._execute(stmt)

    def _snapshot_window(self, key: str) -> int:
        """The window of the snapshot meta `key` names; -1 before the first: every window counts."""
        v = self._query("SELECT value FROM meta WHERE key = ?", (key,))["value"]
        return int(v[0].as_py()) if len(v) else -1

    def _snapshot_window_sql(self, key: str) -> str:
        if self.inline_snapshot_window:
            return str(self._snapshot_window(key))
        return f"COALESCE((SELECT CAST(value AS BIGINT) FROM meta WHERE key = '{key}'), -1)"

    def _snapshot_views(self) -> None:
        """Remake the views that name a snapshot's window as a constant, inside the caller's
        transaction: whatever changes such a meta value calls this in the same transaction
        (no-op where the views read it from meta)."""
        if self.inline_snapshot_window:
            self._create_views(only_snapshots=True)

    def _create_table(self, name: str, s: pa.Schema) -> None:
        """DDL of one stored table; a backend may keep a SEGMENTED table otherwise (DuckDB)."""
        cols = ", ".join(f'"{f.name}" {self._column_type(f.type)}' for f in s)
        self._execute(f"CREATE TABLE IF NOT EXISTS {name} ({cols})")

    def _column_type(self, t: pa.DataType) -> str:
        """DDL type of a stored column; a backend may refine it (PostgreSQL: byte-order collation)."""
        return sql_type(t)

    def require_initialised(self) -> None:
        if not self.is_initialised():
            raise TargetError(f"{self.url} holds no settle_arrow data (run replay first)")
        self.ensure_schema()

    # --- reads --------------------------------------------------------------------
    def meta(self) -> dict[str, str]:
        t = self._query("SELECT key, value FROM meta")
        return dict(zip(t["key"].to_pylist(), t["value"].to_pylist(), strict=True))

    def query(self, sql: str, params: tuple = ()) -> pa.Table:
        return self._query(sql, params)

    def query_batches(self, sql: str, rows: int) -> Iterator[pa.RecordBatch]:
        """A result too large to hold at once (recovery's scan of every trade), in batches."""
        assert rows > 0
        return self._query_batches(sql, rows)

    def table(self, name: str) -> pa.Table:
        """Logical table `name` (SPEC §6) in its output schema, sorted by its key."""
        if name not in schema.OUTPUT:
            raise TargetError(f"unknown table {name!r} (one of {', '.join(schema.OUTPUT)})")
        target = schema.OUTPUT[name]
        cols = ", ".join(f'"{c}"' for c in target.names)
        order = ", ".join(f'"{c}"' for c in schema.KEYS[name])
        return conform(self._query(f"SELECT {cols} FROM {name} ORDER BY {order}"), target)

    def count(self, name: str) -> int:
        return int(self._query(f"SELECT COUNT(*) AS n FROM {name}")["n"][0].as_py())

    def max_window_id(self) -> int:
        v = self._query("SELECT MAX(window_id) AS w FROM checkpoints")["w"][0].as_py()
        return int(v or 0)

    def source_progress(self) -> dict[str, SourceOffset]:
        """source url -> its committed offset."""
        t = self._query("SELECT source, size_bytes, sha256, rows_done FROM sources")
        return {row[0]: SourceOffset(*row) for row in zip(*(t[c].to_pylist() for c in SourceOffset._fields), strict=True)}

    # --- writes -------------------------------------------------------------------
    def stage_window(self, window_id: int, appends: Mapping[str, pa.Table]) -> None:
        """Appends of one piece of a window too large to hold at once, inside the transaction
        that commit_window of the same window ends: no reader ever sees part of a window."""
        if self._open_window is None:
            self._begin()
            self._open_window = window_id
        assert self._open_window == window_id, "pieces of one window at a time"
        try:
            self._window_appends(window_id, appends)
        except BaseException:
            self.abort_window()
            raise

    def abort_window(self) -> None:
        """Roll back the pieces staged for a window that will not commit (none: no-op)."""
        if self._open_window is not None:
            self._open_window = None
            self._rollback()

    def _window_appends(self, window_id: int, appends: Mapping[str, pa.Table]) -> None:
        self._appends_with_ids({name: _with_window_id(data, window_id) for name, data in appends.items()})

    def _appends_with_ids(self, appends: Mapping[str, pa.Table]) -> None:
        # The backend's file tables first: their files are written while the rest go in.
        for name, data in sorted(appends.items(), key=lambda item: item[0] not in self.file_tables):
            assert name in schema.WINDOW_APPENDS, name
            if data.num_rows:
                self._append(name, conform(data, schema.STORAGE[name]))

    def commit_window(
        self,
        window_id: int,
        appends: Mapping[str, pa.Table],
        checkpoint: Mapping[str, object],
        sources: Iterable[SourceOffset],
        meta: Mapping[str, str] | None = None,
        extra: Mapping[str, pa.Table] | None = None,
        statements: tuple[str, ...] = (),
        state_runs: tuple[KeptRun, ...] = (),
    ) -> None:
        """One transaction (with the window's staged pieces, if any): appends (+window_id),
        state runs kept since the last commit, checkpoint row, source offsets, meta.
        Windows commit in order: `window_id` is at least that of every committed window."""
        mark = WindowMark(window_id, checkpoint, tuple(sources), state_runs)
        self._commit_marks((mark,), {name: _with_window_id(data, window_id) for name, data in appends.items()},
                           meta, extra, statements)

    def commit_windows(self, marks: Sequence[WindowMark], appends: Mapping[str, pa.Table]) -> None:
        """Several consecutive windows in one transaction (group commit: a commit's fixed
        cost shared by the windows that queued while the one before it ran); `appends` hold
        the rows of all of them, each row with its window_id. Each window still commits
        whole or not at all, so a reader or a restart sees a prefix of the windows."""
        ids = [m.window_id for m in marks]
        assert ids and all(a < b for a, b in zip(ids, ids[1:], strict=False)), f"windows in order: {ids}"
        assert self._open_window is None or len(ids) == 1, "a window in pieces commits alone"
        for name, data in appends.items():
            if data.num_rows:
                span = pc.min_max(data["window_id"])
                assert ids[0] <= span["min"].as_py() and span["max"].as_py() <= ids[-1], f"{name}: rows of other windows"
        self._commit_marks(tuple(marks), appends)

    def _commit_marks(self, marks: tuple[WindowMark, ...], appends: Mapping[str, pa.Table],
                      meta: Mapping[str, str] | None = None, extra: Mapping[str, pa.Table] | None = None,
                      statements: tuple[str, ...] = ()) -> None:
        """The transaction of commit_window and commit_windows (appends with window_id)."""
        assert self._open_window in (None, marks[0].window_id), "a window's pieces commit with that window"
        begun, self._open_window = self._open_window is not None, None
        with self.transaction(begun):
            self._appends_with_ids(appends)
            for name, data in (extra or {}).items():
                if data.num_rows:
                    self._append(name, conform(data, schema.STORAGE[name]))
            for stmt in statements:
                self._execute(stmt)
            for mark in marks:
                if mark.state_runs:
                    self._put_state_runs(mark.window_id, mark.state_runs)
            # Each source's row as of the last window that read it.
            offsets = {o.source: (o, mark.window_id) for mark in marks for o in mark.sources}
            for src, (o, window_id) in offsets.items():
                # Plain statements: an Arrow insert of one row costs DuckDB twice as much.
                self._execute("DELETE FROM sources WHERE source = ?", (src,))
                self._execute("INSERT INTO sources (source, size_bytes, sha256, rows_done, window_id) "
                              "VALUES (?, ?, ?, ?, ?)", (src, int(o.size_bytes), o.sha256, int(o.rows_done), int(window_id)))
            self._put_meta(meta or {})
            now = datetime.datetime.now(datetime.UTC)
            rows = [dict(m.checkpoint, window_id=m.window_id, committed_at=now) for m in marks]
            self._append("checkpoints", pa.Table.from_pylist(rows, schema=schema.STORAGE["checkpoints"]))

    # --- kept state runs (backends with a state_dir) ----------------------------------
    def catalogue_state_runs(self, window_id: int, runs: tuple[KeptRun, ...]) -> None:
        """Catalogue `runs`, written after the commit of window `window_id` (the last one),
        in a transaction of their own."""
        assert window_id == self.max_window_id(), "runs catalogued after the last commit"
        if not runs:
            return
        with self.transaction():
            self._put_state_runs(window_id, runs)

    def _put_state_runs(self, window_id: int, runs: tuple[KeptRun, ...]) -> None:
        """Make `runs`' files durable and catalogue them, inside the open transaction."""
        raise AssertionError(f"{type(self).__name__} keeps no state runs (state_dir is None)")

    def state_runs(self) -> list[KeptRun]:
        """The catalogued state runs, by set and run number (none where state_dir is None)."""
        if self.state_dir is None or "state_runs" not in self._table_names():
            return []
        t = self._query("SELECT set_name, run_no, column_name, file, covered_window FROM state_runs "
                        "ORDER BY set_name, run_no, column_name")
        runs: dict[tuple[str, int], tuple[dict[str, str], int]] = {}
        for name, run, column, file, covered in zip(*(t[c].to_pylist() for c in t.column_names), strict=True):
            runs.setdefault((name, run), ({}, covered))[0][column] = file
        return [KeptRun(name, run, files, covered) for (name, run), (files, covered) in runs.items()]

    def forget_state_runs(self, set_name: str | None = None) -> None:
        """Drop the catalogue rows of `set_name`'s runs (None: of every set), in a transaction
        of their own: recovery rebuilds such a set from the history, and its files no longer
        say anything (later commits catalogue new ones; unnamed files are swept)."""
        if not self.state_runs():
            return
        with self.transaction():
            if set_name is None:
                self._execute("DELETE FROM state_runs")
            else:
                self._execute("DELETE FROM state_runs WHERE set_name = ?", (set_name,))

    def compact(self, name: str) -> int:
        """Fold a delta table into one row per key (same view contents); returns rows left."""
        keys, sums = schema.DELTAS[name]
        target = schema.STORAGE[name]
        k = ", ".join(f'"{c}"' for c in keys)
        s = ", ".join(f'CAST(SUM("{c}") AS {sql_type(target.field(c).type)}) AS "{c}"' for c in sums)
        nonzero = " OR ".join(f'SUM("{c}") <> 0' for c in sums)
        with self.transaction():
            folded = self._query(
                f"SELECT {k}, {s}, MAX(window_id) AS window_id FROM {name} GROUP BY {k} HAVING {nonzero}"
            )
            self._execute(f"DELETE FROM {name}")
            self._append(name, conform(folded, target))
        return folded.num_rows

    def append_tables(self, tables: Mapping[str, pa.Table]) -> None:
        """Append rows to several tables in one transaction (nothing when all are empty)."""
        if not any(t.num_rows for t in tables.values()):
            return
        with self.transaction():
            for name, data in tables.items():
                if data.num_rows:
                    self._append(name, conform(data, schema.STORAGE[name]))

    def init_opening(self, opening: pa.Table, digest: str, file_sha256: str) -> None:
        """One transaction: opening holdings (dimension ids, stored in key order), checkpoint
        0. No snapshot: until the first, the holdings views and recovery read the opening as
        the base (views.sql), so its rows are written once (10 M rows: 0.45 s for the
        snapshot's copy saved, measured)."""
        if not ids_in_key_order(opening["acct_id"].to_numpy(), opening["sec_id"].to_numpy()):
            # Stored in the order the reference data hands it (refdata.py: key order), so a
            # caller's row order never shows in the TARGET (recovery itself takes any order).
            opening = opening.take(pc.sort_indices(opening, [("acct_id", "ascending"), ("sec_id", "ascending")]))
        self.commit_window(
            window_id=self.max_window_id(),
            appends={},
            checkpoint={"source": "(opening holdings)", "offset": 0, "rows": opening.num_rows, "digest": digest[:16]},
            sources=(),
            meta={"opening_digest": digest, "opening_file_sha256": file_sha256},
            extra={"opening_holdings": opening},
        )

    def replace_holdings_snapshot(self, window_id: int, positions: Iterable[pa.Table]) -> None:
        """Make `positions` (pieces in schema.HOLDINGS_IDS, unique keys across them, any
        order) holdings_snapshot as of committed window `window_id`, in one transaction:
        the caller hands exactly the holdings_ids view as of that window (zero positions
        may be left out), so the view's contents stay the same. Pieces, so that tens of
        millions of positions never sit in memory in this encoding at once."""
        assert 0 <= window_id <= self.max_window_id(), f"a snapshot as of uncommitted window {window_id}"
        with self.transaction():
            self._execute("DELETE FROM holdings_snapshot")
            for piece in positions:
                piece = conform(piece, schema.HOLDINGS_IDS)
                assert not any(piece[c].null_count for c in piece.column_names), "positions without nulls"
                if piece.num_rows:
                    self._append("holdings_snapshot", _with_window_id(piece, window_id))
            self._put_meta({schema.HOLDINGS_SNAPSHOT_KEY: str(window_id)})

    def trade_rows_since_snapshot(self, key: str = schema.HOLDINGS_SNAPSHOT_KEY) -> int:
        """Trade rows of the windows after the snapshot whose window meta `key` names."""
        # A constant, not a subquery: the scan then skips the windows before the snapshot.
        return int(self._query("SELECT COUNT(*) AS n FROM trade_facts WHERE window_id > ?",
                               (self._snapshot_window(key),))["n"][0].as_py())

    def fold_obligations(self, since_snapshot: pa.Table | None = None) -> int:
        """Make obligations_securities_snapshot the securities obligations as of the last
        committed window, in one transaction (the view's contents stay the same: it then adds
        no trade row); returns its rows. `since_snapshot` (schema.OBLIGATIONS_IDS): the
        obligations of every window committed after the snapshot, as the caller netted them,
        added to it instead of the view's netting of the trade rows (None: the view's)."""
        cols = ", ".join(schema.OBLIGATIONS_IDS.names)
        with self.transaction():
            window_id = self.max_window_id()
            if since_snapshot is not None:
                rows = conform(since_snapshot, schema.OBLIGATIONS_IDS)
                assert not any(rows[c].null_count for c in rows.column_names), "obligations without nulls"
                if rows.num_rows:
                    self._append("obligations_securities_snapshot", _with_window_id(rows, window_id))
                # The view now sums the snapshot and these rows, and adds no trade row.
                self._put_meta({schema.OBLIGATIONS_SNAPSHOT_KEY: str(window_id)})
            folded = self._query(f"SELECT {cols} FROM obligations_securities_ids")
            self._execute("DELETE FROM obligations_securities_snapshot")
            if folded.num_rows:
                self._append("obligations_securities_snapshot", conform(
                    _with_window_id(folded, window_id), schema.STORAGE["obligations_securities_snapshot"]))
            if since_snapshot is None:
                self._put_meta({schema.OBLIGATIONS_SNAPSHOT_KEY: str(window_id)})
        return folded.num_rows

    def _put_meta(self, values: Mapping[str, str]) -> None:
        """Replace meta keys inside the caller's transaction."""
        for k, v in values.items():
            self._execute("DELETE FROM meta WHERE key = ?", (k,))
            self._append("meta", pa.table({"key": [k], "value": [v]}))
        if set(values) & set(SNAPSHOT_PLACEHOLDERS.values()):
            self._snapshot_views()

    def set_meta(self, values: Mapping[str, str]) -> None:
        """Set meta keys, in one transaction."""
        with self.transaction():
            self._put_meta(values)

    def record_self_check(self, window_id: int, problems: list[str]) -> None:
        row = {
            "checked_at": datetime.datetime.now(datetime.UTC),
            "window_id": window_id,
            "status": "FAILED" if problems else "OK",
            "detail": "; ".join(problems)[:4000],
        }
        with self.transaction():
            self._append("self_checks", pa.Table.from_pylist([row], schema=schema.STORAGE["self_checks"]))

    def verify(self) -> list[str]:
        """Whole-table invariants (sql/verify.sql): one message per broken invariant."""
        problems = []
        for name, q in named_queries("verify.sql").items():
            bad = self._query(q)
            if bad.num_rows:
                problems.append(f"{name}: {bad.slice(0, 3).to_pylist()}")
        return problems
