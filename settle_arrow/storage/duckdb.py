"""Embedded DuckDB backend: a TARGET that is a file path (or `duckdb://path`).

Data model: one DuckDB file holding the tables of schema.STORAGE and the views of
sql/views.sql.

Readers: DuckDB admits one process at a time while one writes (its file lock). Another
process gets a one-line TargetError while a replay writes. Inside the writing process a
reader shares the writer's database instance (the in-memory one that ATTACHed the file,
_Instance) through its own cursor (DuckDB's MVCC):
`open_target` there, e.g. from a notebook thread beside `replay`, sees committed windows
only. With no writer anywhere, any number of processes read the file read-only.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import duckdb
import pyarrow as pa

from settle_arrow.storage.base import Storage, TargetError

CHECKPOINT_THRESHOLD = "128MB"
# DuckDB's buffer pool defaults to 80% of RAM and keeps what a long replay touched cached:
# a bound keeps a replay's memory state-bound (larger operations spill to disk).
MEMORY_LIMIT = "1GB"
# DuckDB writes an append of at least one full row group straight into the file during the
# transaction ("optimistic write"); a smaller one goes through the WAL or a checkpoint at
# COMMIT, which encodes the rows a second time. A writer whose windows are smaller than the
# default row group (122,880 rows) attaches the file with half of it, so a 100,000-row window
# takes the first path: append + commit CPU 7.0 -> 4.6 s for 5 M trade rows, replay +6-15%
# (measured; the file grows ~10%). Whole-table and --batch appends fill default row groups
# anyway, and the smaller ones cost them ~9% (20 M-trade --batch, measured): they keep the
# default. Only ATTACH takes the option.
ROW_GROUP_ROWS_DEFAULT = 122_880
ROW_GROUP_ROWS_SMALL = 65_536


def row_group_rows(window_rows: int | None) -> int:
    """The row group size a writer appending windows of `window_rows` attaches with."""
    small = window_rows is not None and window_rows < ROW_GROUP_ROWS_DEFAULT
    return ROW_GROUP_ROWS_SMALL if small else ROW_GROUP_ROWS_DEFAULT


_ALIAS = "target"


class _Instance:
    """The in-memory DuckDB instance that ATTACHed one file for writing in this process;
    every writer and in-process reader of that file works through a cursor of it (DuckDB's
    MVCC between them), so the file's lock is taken once."""

    def __init__(self, path: Path, row_group_rows: int):
        self.root = duckdb.connect()
        try:
            quoted = str(path).replace("'", "''")
            self.root.execute(f"ATTACH '{quoted}' AS {_ALIAS} (ROW_GROUP_SIZE {int(row_group_rows)})")
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
    def __init__(self, path: str, read_only: bool = False, window_rows: int | None = None):
        self.url = path
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
        self._instance: _Instance | None = None
        try:
            with _INSTANCES_LOCK:
                # A reader in the process that writes the file shares the writer's instance
                # (a second open of the file would be refused by its lock).
                if not read_only or self._key in _INSTANCES:
                    if self._key not in _INSTANCES:
                        # The first opener's size holds while the instance lives.
                        _INSTANCES[self._key] = _Instance(p, row_group_rows(window_rows))
                    self._instance = _INSTANCES[self._key]
                    self._instance.users += 1
                    try:
                        self.con = self._instance.cursor()
                    except BaseException:
                        self._release()
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
        # Not register + INSERT + unregister: the dropped view keeps its Arrow table alive
        # until COMMIT, so a window appended in pieces held every piece in memory (measured:
        # +120 MB per 500 k rows of 31 columns, 7.7 GB for a 20 M-trade --batch).
        self.con.from_arrow(data).insert_into(table)

    def _begin(self) -> None:
        self.con.execute("BEGIN TRANSACTION")

    def _commit(self) -> None:
        self.con.execute("COMMIT")

    def _rollback(self) -> None:
        try:
            self.con.execute("ROLLBACK")
        except duckdb.Error:
            pass  # no transaction open: nothing to undo

    def _table_names(self) -> set[str]:
        return {r[0] for r in self.con.execute("SELECT table_name FROM information_schema.tables").fetchall()}

    def reader(self) -> DuckDBStorage:
        # A writer's process shares its instance: this is another cursor of it (DuckDB's MVCC).
        return DuckDBStorage(self.url, read_only=True)

    def close(self) -> None:
        try:
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


def _is_duckdb_file(p: Path) -> bool:
    """A DuckDB database file starts with an 8-byte checksum and the magic bytes `DUCK`."""
    with p.open("rb") as f:
        return f.read(12)[8:12] == b"DUCK"
