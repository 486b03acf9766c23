"""Read side of a TARGET, for notebooks and the CLI: tables as Polars frames, status, export,
content digests, and copying a TARGET between backends.

Data model: Target wraps one open Storage; `table(name)` is the logical table of SPEC §6 in
its output schema, sorted by key; `status()` is checkpoints, row counts and the last
self-check; `digest()` is one backend-neutral content hash per table (digest.py).

Invariants: `snapshot()` makes every read inside it see the same committed windows
(PostgreSQL: one REPEATABLE READ transaction; DuckDB: one MVCC transaction); status and
digest read inside one. `copy_target` writes the destination in one transaction.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from settle_arrow import schema
from settle_arrow.digest import table_digest
from settle_arrow.errors import UserError
from settle_arrow.storage import Storage, open_storage
from settle_arrow.storage.base import conform


@dataclasses.dataclass(frozen=True)
class Status:
    target: str
    windows: int
    last_window: dict | None
    row_counts: dict[str, int]
    sources: list[dict]
    last_self_check: dict | None


class Target:
    """An open TARGET (DuckDB file or PostgreSQL). Use as a context manager."""

    def __init__(self, target: str, read_only: bool = True):
        self.storage: Storage = open_storage(target, read_only=read_only)
        self._snapshots = 0
        try:
            self.storage.require_initialised()
        except Exception:
            self.storage.close()
            raise

    def __enter__(self) -> Target:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.storage.close()

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[Target]:
        """Reads inside see one state of the TARGET: the windows committed when it began."""
        if self._snapshots:
            yield self
            return
        self.storage._begin()
        self._snapshots += 1
        try:
            yield self
        finally:
            self._snapshots -= 1
            self.storage._rollback()  # a read-only transaction: nothing to keep

    def arrow(self, name: str) -> pa.Table:
        return self.storage.table(name)

    def table(self, name: str) -> pl.DataFrame:
        frame = pl.from_arrow(self.arrow(name))
        assert isinstance(frame, pl.DataFrame)
        return frame

    def status(self) -> Status:
        with self.snapshot():
            return self._status()

    def digest(self, names: tuple[str, ...] | None = None) -> dict[str, str]:
        """Content digest of each logical table (all of SPEC §6 by default); see digest.py.
        Equal on DuckDB and PostgreSQL for equal contents."""
        for name in names or ():
            if name not in schema.OUTPUT:
                raise UserError(f"unknown table {name!r} (one of {', '.join(schema.OUTPUT)})")
        with self.snapshot():
            return {name: table_digest(name, self.arrow(name)) for name in names or tuple(schema.OUTPUT)}

    def _status(self) -> Status:
        s = self.storage
        cps = s.query("SELECT * FROM checkpoints ORDER BY window_id DESC LIMIT 1").to_pylist()
        checks = s.query("SELECT * FROM self_checks ORDER BY checked_at DESC LIMIT 1").to_pylist()
        return Status(
            target=s.url,
            windows=s.count("checkpoints"),
            last_window=cps[0] if cps else None,
            row_counts={name: s.count(name) for name in schema.OUTPUT},
            sources=s.query("SELECT source, rows_done, window_id FROM sources ORDER BY source").to_pylist(),
            last_self_check=checks[0] if checks else None,
        )

    def export(self, name: str, out: str) -> int:
        """Write table `name` to `out` (.parquet or .csv); returns rows written."""
        suffix = Path(out).suffix.lower()
        if suffix not in (".parquet", ".csv"):
            raise UserError(f"cannot tell the format of {out}: use a .parquet or .csv file name")
        if not Path(out).resolve().parent.is_dir():
            raise UserError(f"directory of {out} does not exist")
        data = self.arrow(name)
        if suffix == ".parquet":
            pq.write_table(data, out)
        else:
            pacsv.write_csv(data, out)
        return data.num_rows


def open_target(target: str) -> Target:
    """Open TARGET read-only. PostgreSQL: safe beside a running replay (sees committed windows).
    DuckDB: another process cannot read a file a replay is writing (a one-line TargetError);
    in the replay's own process it can (see README, "Reading a TARGET while a replay writes")."""
    return Target(target, read_only=True)


COPY_CHUNK_ROWS = 1_000_000


def _chunks(storage: Storage, name: str) -> Iterator[pa.Table]:
    """Physical table `name` in pieces of about COPY_CHUNK_ROWS rows (by window_id ranges)."""
    target = schema.STORAGE[name]
    cols = ", ".join(f'"{c}"' for c in target.names)
    if "window_id" not in target.names:
        yield storage.query(f"SELECT {cols} FROM {name}")
        return
    counts = storage.query(f"SELECT window_id, COUNT(*) AS n FROM {name} GROUP BY window_id ORDER BY window_id")
    lo, rows = None, 0
    for w, n in zip(counts["window_id"].to_pylist(), counts["n"].to_pylist(), strict=True):
        if w is None:
            yield storage.query(f"SELECT {cols} FROM {name} WHERE window_id IS NULL")
            continue
        lo = w if lo is None else lo
        rows += n
        if rows >= COPY_CHUNK_ROWS:
            yield storage.query(f"SELECT {cols} FROM {name} WHERE window_id BETWEEN ? AND ?", (lo, w))
            lo, rows = None, 0
    if lo is not None:
        yield storage.query(f"SELECT {cols} FROM {name} WHERE window_id >= ?", (lo,))


def copy_target(src: str, dst: str) -> dict[str, int]:
    """Copy every physical table of TARGET `src` into `dst` (DuckDB <-> PostgreSQL), exactly,
    in one transaction on `dst`; `dst` must be new or hold no settle_arrow tables.
    Returns rows copied per table. Prove it with `Target.digest()` on both."""
    copied: dict[str, int] = {}
    with open_target(src) as source:
        version = source.storage.meta().get("schema_version")
        if version != str(schema.SCHEMA_VERSION):
            # A reader reads an older TARGET as it is, in tables this version no longer has.
            raise UserError(f"{source.storage.url} is of schema version {version}; copy reads version "
                            f"{schema.SCHEMA_VERSION}: a replay into it (even of files it has done) brings it up")
        dest = open_storage(dst)
        try:
            present = sorted(dest._table_names() & set(schema.STORAGE))
            if present:
                raise UserError(f"{dest.url} is not empty (it has table {present[0]}): copy needs a new TARGET")
            with source.snapshot():
                with dest.transaction():
                    dest._create_schema()
                    dest._execute("DELETE FROM meta")  # the source's meta comes whole
                    for name, target in schema.STORAGE.items():
                        copied[name] = 0
                        for piece in _chunks(source.storage, name):
                            if piece.num_rows:
                                dest._append(name, conform(piece, target))
                                copied[name] += piece.num_rows
                    dest._snapshot_views()  # meta came whole, not through _put_meta
        finally:
            dest.close()
    return copied
