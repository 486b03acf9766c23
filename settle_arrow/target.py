"""Read side of a TARGET, for notebooks and the CLI: tables as Polars frames, status, export.

Data model: Target wraps one open Storage; `table(name)` is the logical table of SPEC §6 in
its output schema, sorted by key; `status()` is checkpoints, row counts and the last
self-check.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from settle_arrow import schema
from settle_arrow.errors import UserError
from settle_arrow.storage import Storage, open_storage


@dataclasses.dataclass(frozen=True)
class Status:
    target: str
    windows: int
    last_window: dict | None
    row_counts: dict[str, int]
    sources: list[dict]
    last_self_check: dict | None


class Target:
    """An open TARGET (DuckDB file; PostgreSQL later). Use as a context manager."""

    def __init__(self, target: str, read_only: bool = True):
        self.storage: Storage = open_storage(target, read_only=read_only)
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

    def arrow(self, name: str) -> pa.Table:
        return self.storage.table(name)

    def table(self, name: str) -> pl.DataFrame:
        frame = pl.from_arrow(self.arrow(name))
        assert isinstance(frame, pl.DataFrame)
        return frame

    def status(self) -> Status:
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
    """Open TARGET read-only (safe beside a running replay on PostgreSQL; DuckDB: see README)."""
    return Target(target, read_only=True)
