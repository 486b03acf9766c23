"""Embedded DuckDB backend: a TARGET that is a file path (or `duckdb://path`).

Data model: one DuckDB file holding the tables of schema.STORAGE and the views of
sql/views.sql.

Readers: DuckDB admits one process at a time while one writes (its file lock). Another
process gets a one-line TargetError while a replay writes. Inside the writing process a
reader shares the writer's database instance through its own connection (DuckDB's MVCC):
`open_target` there, e.g. from a notebook thread beside `replay`, sees committed windows
only. With no writer anywhere, any number of processes read the file read-only.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import duckdb
import pyarrow as pa

from settle_arrow.storage.base import Storage, TargetError

CHECKPOINT_THRESHOLD = "128MB"
# DuckDB's buffer pool defaults to 80% of RAM and keeps what a long replay touched cached:
# a bound keeps a replay's memory state-bound (larger operations spill to disk).
MEMORY_LIMIT = "1GB"
# Resolved path -> writer connections open in this process (readers here share their instance).
_WRITERS: dict[str, int] = {}


class DuckDBStorage(Storage):
    def __init__(self, path: str, read_only: bool = False):
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
        # A reader in the process that writes the file opens it with the writer's settings, so
        # DuckDB hands it the same database instance (a read-only open would be refused).
        shared = read_only and _WRITERS.get(self._key, 0) > 0
        self._writer = not read_only
        if self._writer:  # registered before connecting: a reader racing this open shares it
            _WRITERS[self._key] = _WRITERS.get(self._key, 0) + 1
        try:
            self.con = duckdb.connect(str(p), read_only=read_only and not shared)
        except duckdb.Error as exc:
            self._unregister()
            raise _open_error(path, str(exc).splitlines()[0], read_only) from None
        except BaseException:
            self._unregister()
            raise
        if not read_only:
            # The default 16 MB threshold checkpoints every few windows inside COMMIT (~100 ms
            # each, measured); a larger WAL keeps commits small but is replayed on restart
            # (~1.3 s for 470 MB, measured): 128 MB bounds that and the checkpoint pause,
            # which the commit lane takes off the processing thread anyway.
            self.con.execute(f"SET checkpoint_threshold = '{CHECKPOINT_THRESHOLD}'")
            self.con.execute(f"SET memory_limit = '{MEMORY_LIMIT}'")

    def _unregister(self) -> None:
        if self._writer:
            self._writer = False
            _WRITERS[self._key] -= 1

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

    def close(self) -> None:
        self._unregister()
        self.con.close()


def _open_error(path: str, msg: str, read_only: bool) -> TargetError:
    if "lock" in msg.lower():
        if read_only:
            return TargetError(
                f"{path} is in use by another process (a replay writing it?): DuckDB lets no other process "
                "read it meanwhile; read it after the run, from the replay's own process, or replay into a "
                "postgresql:// TARGET"
            )
        return TargetError(f"{path} is in use by another process (a replay writing it?)")
    if "different configuration" in msg:
        return TargetError(f"{path} is open read-only in this process: close its readers (open_target) before writing it")
    return TargetError(f"cannot open {path} as a DuckDB database: {msg}")


def _is_duckdb_file(p: Path) -> bool:
    """A DuckDB database file starts with an 8-byte checksum and the magic bytes `DUCK`."""
    with p.open("rb") as f:
        return f.read(12)[8:12] == b"DUCK"
