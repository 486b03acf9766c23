"""Embedded DuckDB backend: a TARGET that is a file path (or `duckdb://path`).

Data model: one DuckDB file holding the tables of schema.STORAGE and the views of
sql/views.sql, except the rows of FILE_TABLES (the trade detail of schema.SEGMENTED, and the
opening holdings): those live in immutable Parquet files in the directory `<file>.segments/`
beside it, one per window (or piece of one), each committed by its row in `segments`
(schema.SEGMENTS) inside that window's transaction; the table itself is a view of the
committed files. The opening's rows belong to no window: its file carries the window of the
opening's own checkpoint (the first), so the view shows it once that commits. The same
directory holds the engine's kept state runs (`<set>-<run>-<column>.bin`, catalogued in
`state_runs`, schema.STATE_RUNS, by the first commit after their files were written, of
the window whose state froze them or a later one; fsynced before it). A TARGET is the
file and that directory: copy or move them together.

Segment invariants: a file is complete before it has a name the view reads (written as
`.tmp`, fsynced, renamed), and its directory entry is durable before the COMMIT that
catalogs it (a window's files are written by the storage's writer thread while its
transaction inserts the rest; COMMIT and ROLLBACK first wait for every write it started);
the view shows only rows of windows up to the last checkpoint (a macro, COMMITTED_MACRO,
re-made in the same transaction by every append of checkpoints), so a file of a window not
committed yet, rolled back or killed is invisible, and the next writer deletes every file
no committed row names. So readers see exactly the committed windows, as they do for rows.

Readers: DuckDB admits one process at a time while one writes (its file lock). Another
process gets a one-line TargetError while a replay writes. Inside the writing process a
reader shares the writer's database instance (the in-memory one that ATTACHed the file,
_Instance) through its own cursor (DuckDB's MVCC):
`open_target` there, e.g. from a notebook thread beside `replay`, sees committed windows
only. With no writer anywhere, any number of processes read the file read-only.
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from settle_arrow import schema
from settle_arrow.state import RUN_FILE_SUFFIX
from settle_arrow.storage.base import KeptRun, Storage, TargetError

CHECKPOINT_THRESHOLD = "128MB"
# DuckDB's buffer pool defaults to 80% of RAM and keeps what a long replay touched cached:
# a bound keeps a replay's memory state-bound (larger operations spill to disk).
MEMORY_LIMIT = "1GB"
# Segment files: LZ4 Parquet (5 M trade rows in 2.1 s of CPU, where DuckDB's append of the
# same rows takes 4.2-5.1 s and zstd 3.0 s), written by Polars' writer: a 100,000-row
# trade_facts file costs 35 ms of CPU against pyarrow's 40 ms with statistics on window_id
# alone (measured 2026-11-23), and has min/max on every column, so scans filtered by date,
# security or account skip files too (money columns are stored as int64 decimals).
SEGMENT_COMPRESSION = "lz4"
SEGMENTS_DIR_SUFFIX = ".segments"
# The last committed window, as a scalar macro the segment views filter by: DuckDB expands
# it at bind time, so scans still skip files by a constant (a scalar subquery there costs
# every scan 2.5x: 5 M rows 0.15 -> 0.39 s, measured), and each commit replaces the macro
# (0.4-0.6 ms) instead of the view, whose DDL binds read_parquet over every segment file
# (5-7 ms at 500 files, growing with them; measured).
COMMITTED_MACRO = "settle_arrow_committed_window"
SEGMENT_SUFFIX = ".parquet"
PARTIAL_SUFFIX = ".tmp"
# The opening holdings too: ten million rows written once, at a TARGET's first start, where
# DuckDB's compressed insert of them took 0.7-1.1 s of CPU against the Parquet file's 0.3
# (a first start 0.2 s shorter, median of five pairs, measured). TARGETs made before keep
# their table.
FILE_TABLES = (*schema.SEGMENTED, "opening_holdings")
# A window's segment files are written in a thread of their own while its transaction
# inserts the other tables and runs its statements (a lone 10,000-row window's commit
# 32-34 -> 25 ms, its latency p99 140-151 -> 110-114 ms in a live feed at 60,000 trades/s,
# three alternating pairs; 100,000-row windows' commits 143-155 -> 112-133 ms, measured).
# Each write in flight holds its table: at most this many are, a further one waits for the
# oldest (bounds the memory of a --batch, whose pieces come faster than they are written).
SEGMENT_WRITES_PENDING_MAX = 2


_ALIAS = "target"


class _Instance:
    """The in-memory DuckDB instance that ATTACHed one file for writing in this process;
    every writer and in-process reader of that file works through a cursor of it (DuckDB's
    MVCC between them), so the file's lock is taken once."""

    def __init__(self, path: Path):
        self.root = duckdb.connect()
        try:
            self.root.execute(f"ATTACH {_quote(str(path))} AS {_ALIAS}")
            # The default 16 MB threshold checkpoints every few windows inside COMMIT (~100 ms
            # each, measured); a larger WAL keeps commits small but is replayed on restart
            # (~1.3 s for 470 MB, measured): 128 MB bounds that and the checkpoint pause,
            # which the commit lane takes off the processing thread anyway.
            self.root.execute(f"SET checkpoint_threshold = '{CHECKPOINT_THRESHOLD}'")
            self.root.execute(f"SET memory_limit = '{MEMORY_LIMIT}'")
        except BaseException:
            self.root.close()
            raise
        self.users = 0

    def cursor(self) -> duckdb.DuckDBPyConnection:
        con = self.root.cursor()
        con.execute(f"USE {_ALIAS}")
        return con


# Resolved path -> its instance, while any writer (or a reader beside one) has it open.
_INSTANCES: dict[str, _Instance] = {}
_INSTANCES_LOCK = threading.RLock()  # _release runs under it when a cursor fails


class DuckDBStorage(Storage):
    inline_snapshot_window = True
    file_tables = FILE_TABLES

    def __init__(self, path: str, read_only: bool = False):
        self.url = path
        self.read_only = read_only
        p = Path(path)
        if read_only and not p.exists():
            raise TargetError(f"{path} does not exist")
        if not read_only and not p.parent.exists():
            raise TargetError(f"directory of {path} does not exist")
        if p.is_file() and p.stat().st_size and not _is_duckdb_file(p):
            # DuckDB opens an existing Parquet or CSV file as a read-only in-memory database:
            # a replay "into" it would succeed and keep nothing. Only real DuckDB files pass.
            raise TargetError(f"cannot open {path} as a DuckDB database: it is not a DuckDB file")
        self._key = str(p.resolve())
        self._segments = Path(self._key + SEGMENTS_DIR_SUFFIX)
        # The engine's frozen state runs stay beside the segments (see schema.STATE_RUNS).
        self.state_dir = None if read_only else str(self._segments)
        # Segment files this open transaction wrote: made durable at COMMIT, deleted at ROLLBACK.
        self._staged: list[Path] = []
        self._leftover: str | None = None  # a rolled-back window's file that would not delete
        self._writer: ThreadPoolExecutor | None = None  # made by the first write in the background
        self._writes: list[Future] = []  # this transaction's segment writes, oldest first
        self._instance: _Instance | None = None
        try:
            with _INSTANCES_LOCK:
                # A reader in the process that writes the file shares the writer's instance
                # (a second open of the file would be refused by its lock).
                if not read_only or self._key in _INSTANCES:
                    first = self._key not in _INSTANCES
                    if first:
                        _INSTANCES[self._key] = _Instance(p)
                    self._instance = _INSTANCES[self._key]
                    self._instance.users += 1
                    try:
                        self.con = self._instance.cursor()
                    except BaseException:
                        self._release()
                        raise
                    if first and not read_only:
                        # No transaction of this file is open anywhere: whatever no committed
                        # row names is a dead window's leftover.
                        try:
                            self._sweep_segments()
                        except BaseException:
                            self.close()
                            raise
                else:
                    self.con = duckdb.connect(str(p), read_only=True)
        except duckdb.Error as exc:
            raise _open_error(path, str(exc).splitlines()[0], read_only) from None

    def _release(self) -> None:
        with _INSTANCES_LOCK:
            instance, self._instance = self._instance, None
            if instance is not None:
                instance.users -= 1
                if not instance.users:
                    del _INSTANCES[self._key]
                    instance.root.close()

    def _execute(self, sql: str, params: tuple = ()) -> None:
        self.con.execute(sql, list(params))

    def _query(self, sql: str, params: tuple = ()) -> pa.Table:
        return self.con.sql(sql, params=list(params) or None).to_arrow_table()

    def _query_batches(self, sql: str, rows: int) -> Iterator[pa.RecordBatch]:
        reader = self.con.sql(sql).to_arrow_reader(rows)
        try:
            yield from reader
        finally:
            reader.close()

    def _append(self, table: str, data: pa.Table) -> None:
        if table in schema.SEGMENTED or (table in FILE_TABLES and self._stored_view(table) is not None):
            if "window_id" not in data.column_names:
                # The opening's rows: the window its checkpoint takes (the first of the
                # TARGET: max_window_id, as init_opening gives it), which commits after them.
                opening_window = max(0, self._last_checkpoint())
                data = data.append_column("window_id", pa.array(np.full(data.num_rows, opening_window), pa.int64()))
            assert data.num_rows and not data["window_id"].null_count, "segment rows belong to windows"
            window = pc.min_max(data["window_id"])
            self._write_segment(table, data, window["min"].as_py(), window["max"].as_py(), background=True)
            return
        self._insert(table, data)
        if table == "checkpoints":
            # Checkpoints come in window order, so the last is the one just inserted.
            self._execute(self._committed_macro(pc.max(data["window_id"]).as_py()))

    def _insert(self, table: str, data: pa.Table) -> None:
        # Not register + INSERT + unregister: the dropped view keeps its Arrow table alive
        # until COMMIT, so a window appended in pieces held every piece in memory (measured:
        # +120 MB per 500 k rows of 31 columns, 7.7 GB for a 20 M-trade --batch).
        self.con.from_arrow(data).insert_into(table)

    def _begin(self) -> None:
        assert not self._staged, "segments of a transaction that never ended"
        if self._leftover:
            # A later commit of the same window would show this file's rows: only a new
            # open, whose sweep deletes it first, may write again.
            raise TargetError(f"{self.url}: could not delete segment {self._leftover} of a rolled-back "
                              "window; close and reopen the TARGET")
        self.con.execute("BEGIN TRANSACTION")

    def _commit(self) -> None:
        self._wait_writes(0)  # an error here is the transaction's: transaction() rolls it back
        if self._staged:
            _fsync(self._segments)  # the renames are durable before the rows naming them
        self.con.execute("COMMIT")
        self._staged.clear()

    def _rollback(self) -> None:
        # Every write done or failed before its file is deleted: none lands after the unlink.
        writes, self._writes = self._writes, []
        for write in writes:
            write.exception()
        try:
            self.con.execute("ROLLBACK")
        except duckdb.Error:
            pass  # no transaction open: nothing to undo
        staged, self._staged = self._staged, []
        for path in staged:
            try:
                path.unlink(missing_ok=True)
            except OSError:
                self._leftover = str(path)

    # --- segments -------------------------------------------------------------------
    def _create_table(self, name: str, s: pa.Schema) -> None:
        if name not in FILE_TABLES:
            super()._create_table(name, s)
            return
        super()._create_table("segments", schema.SEGMENTS)
        # An empty first segment: the view's glob always matches a file (DuckDB refuses an
        # empty glob), and the view has its types from the start.
        self._write_segment(name, _segment_schema(name).empty_table(), 0, 0)
        self._execute(self._committed_macro(None))
        self._execute(self._segment_view(name, temporary=False))

    def _stored_view(self, table: str) -> str | None:
        """The DDL of the view `table` this TARGET stores; None where it stores none (or a
        table: FILE_TABLES beyond schema.SEGMENTED are, in TARGETs made before they were files)."""
        stored = self.con.execute(
            "SELECT sql FROM duckdb_views() WHERE view_name = ? AND NOT temporary AND database_name = current_database()",
            [table]).fetchall()
        return stored[0][0] if stored else None

    def _wait_writes(self, pending_max: int) -> None:
        """Wait until at most `pending_max` segment writes are in flight; the first failed
        write's error raises (the transaction then rolls back)."""
        while len(self._writes) > pending_max:
            self._writes.pop(0).result()

    def _write_segment(self, table: str, data: pa.Table, window_min: int, window_max: int,
                       background: bool = False) -> None:
        """One segment file and its catalog row, inside the open transaction; the file
        written by the writer thread where `background` (done by the transaction's end)."""
        assert data.schema.equals(_segment_schema(table)), f"{table} segment schema"
        assert 0 <= window_min <= window_max
        name = f"{table}-{int(window_min):012d}-{len(self._staged):06d}{SEGMENT_SUFFIX}"
        path = self._segments / name
        partial = path.with_name(name + PARTIAL_SUFFIX)
        self._segments.mkdir(exist_ok=True)
        self._staged.append(path)  # before the write: a failed one is removed at ROLLBACK
        if background:
            if self._writer is None:
                self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="settle-segments")
            self._wait_writes(SEGMENT_WRITES_PENDING_MAX - 1)
            self._writes.append(self._writer.submit(_write_file, data, partial, path))
        else:  # a file a statement of this transaction reads at once (a view's first segment)
            _write_file(data, partial, path)
        row = {"table_name": table, "file": name, "window_id_min": int(window_min), "window_id_max": int(window_max),
               "rows": data.num_rows}
        assert list(row) == schema.SEGMENTS.names
        # A plain statement: a one-row Arrow insert costs DuckDB about twice as much.
        self._execute(f"INSERT INTO segments ({', '.join(f'{chr(34)}{n}{chr(34)}' for n in row)}) "
                      f"VALUES ({', '.join('?' * len(row))})", tuple(row.values()))

    def _put_state_runs(self, window_id: int, runs: tuple[KeptRun, ...]) -> None:
        rows: dict[str, list] = {name: [] for name in schema.STATE_RUNS.names}
        for run in runs:
            for column, file in run.files.items():
                path = self._segments / file
                _fsync(path)  # complete on disk before the COMMIT that names it
                # A rolled-back window's runs go (its state is rebuilt from the database).
                self._staged.append(path)
                for name, value in zip(schema.STATE_RUNS.names, (run.set_name, run.run_no, column, file,
                                                                  run.covered_window, window_id), strict=True):
                    rows[name].append(value)
        self._insert("state_runs", pa.table(rows, schema=schema.STATE_RUNS))

    def _segment_view(self, table: str, temporary: bool) -> str:
        """The view of a FILE_TABLES table: the files in this TARGET's directory, rows of
        windows up to the last checkpoint this transaction sees. A file of a window not
        committed yet, rolled back or killed holds only rows past it: never shown. The
        stored view reads that bound from COMMITTED_MACRO; a reader's temporary view (a
        TARGET moved, or made before the macro) takes it as a constant: it never writes."""
        bound = f"{COMMITTED_MACRO}()" if not temporary else str(self._last_checkpoint())
        cols = ", ".join(f'CAST("{f.name}" AS {self._column_type(f.type)}) AS "{f.name}"'
                         for f in schema.STORAGE[table])
        return (f"CREATE OR REPLACE {'TEMP ' if temporary else ''}VIEW {table} AS SELECT {cols} "
                f"FROM read_parquet({self._segment_files(table)}) WHERE window_id <= {bound}")

    def _committed_macro(self, last: int | None) -> str:
        """DDL of COMMITTED_MACRO: `last`, or the last checkpoint this transaction sees."""
        return f"CREATE OR REPLACE MACRO {COMMITTED_MACRO}() AS {int(self._last_checkpoint() if last is None else last)}"

    def _last_checkpoint(self) -> int:
        return int(self.con.execute("SELECT COALESCE(MAX(window_id), -1) FROM checkpoints").fetchall()[0][0])

    def _segment_files(self, table: str) -> str:
        """The quoted glob of a SEGMENTED table's files (quoted: a path that merely ends
        with it, the TARGET's old place, is not it)."""
        return _quote(str(self._segments / f"{table}-*{SEGMENT_SUFFIX}"))

    def ensure_schema(self) -> None:
        super().ensure_schema()
        if not self.read_only and "state_runs" not in self._table_names():
            # Not in schema.STORAGE: a catalogue of this backend's files (TARGETs made before
            # it get it here, empty: their restarts rebuild the state from the history once).
            with self.transaction():
                super()._create_table("state_runs", schema.STATE_RUNS)
        # A TARGET moved since its views were made names its segment directory by the old
        # path, and one made before COMMITTED_MACRO bounds its views by a constant: a writer
        # re-makes the stored views (and the macro), a reader shadows them with its own
        # (temporary views take precedence, inside other views too).
        for table in FILE_TABLES:
            stored = self._stored_view(table)
            if stored is not None and not (self._segment_files(table) in stored and COMMITTED_MACRO in stored):
                if self.read_only:
                    self._execute(self._segment_view(table, temporary=True))
                else:
                    with self.transaction():
                        self._execute(self._committed_macro(None))
                        self._execute(self._segment_view(table, temporary=False))

    def _sweep_segments(self) -> None:
        """Delete the segment files no committed row names (a writer's first open only)."""
        if not self._segments.is_dir():
            return
        live = set()
        for catalogue in {"segments", "state_runs"} & self._table_names():
            live |= {r[0] for r in self.con.execute(f"SELECT file FROM {catalogue}").fetchall()}
        for path in self._segments.iterdir():
            if path.name not in live and path.name.endswith((SEGMENT_SUFFIX, PARTIAL_SUFFIX, RUN_FILE_SUFFIX)):
                path.unlink()

    def _table_names(self) -> set[str]:
        return {r[0] for r in self.con.execute("SELECT table_name FROM information_schema.tables").fetchall()}

    def reader(self) -> DuckDBStorage:
        # A writer's process shares its instance: this is another cursor of it (DuckDB's MVCC).
        return DuckDBStorage(self.url, read_only=True)

    def close(self) -> None:
        try:
            if self._writer is not None:  # after any write still in flight (a transaction left open)
                self._writer.shutdown(wait=True)
            self.con.close()
        finally:
            self._release()


def _open_error(path: str, msg: str, read_only: bool) -> TargetError:
    if "lock" in msg.lower():
        if read_only:
            return TargetError(
                f"{path} is in use by another process (a replay writing it?): DuckDB lets no other process "
                "read it meanwhile; read it after the run, from the replay's own process, or replay into a "
                "postgresql:// TARGET"
            )
        return TargetError(f"{path} is in use by another process (a replay writing it?)")
    if "different configuration" in msg or "already attached" in msg:
        return TargetError(f"{path} is open read-only in this process: close its readers (open_target) before writing it")
    return TargetError(f"cannot open {path} as a DuckDB database: {msg}")


def remove_target(path: str | Path) -> None:
    """Delete a DuckDB TARGET that no one has open: its file, WAL and segment directory."""
    p = Path(path)
    p.unlink(missing_ok=True)
    Path(f"{p}.wal").unlink(missing_ok=True)
    shutil.rmtree(f"{p.resolve()}{SEGMENTS_DIR_SUFFIX}", ignore_errors=True)


def _segment_schema(table: str) -> pa.Schema:
    """The columns of `table`'s segment files: its own, with the window its rows belong to."""
    s = schema.STORAGE[table]
    return s if "window_id" in s.names else s.append(pa.field("window_id", pa.int64()))


def _write_file(data: pa.Table, partial: Path, path: Path) -> None:
    """`data` as the segment file `path`: complete and fsynced under `partial`, then renamed."""
    frame = pl.from_arrow(data)
    assert isinstance(frame, pl.DataFrame) and frame.height == data.num_rows
    frame.write_parquet(partial, compression=SEGMENT_COMPRESSION, statistics=True)
    _fsync(partial)
    os.replace(partial, path)


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _is_duckdb_file(p: Path) -> bool:
    """A DuckDB database file starts with an 8-byte checksum and the magic bytes `DUCK`."""
    with p.open("rb") as f:
        return f.read(12)[8:12] == b"DUCK"
