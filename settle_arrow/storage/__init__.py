"""TARGET strings -> storage backends (SPEC §7)."""

from __future__ import annotations

from settle_arrow.storage.base import Storage, TargetError

PG_SCHEMES = ("postgresql://", "postgres://")


def is_postgres(target: str) -> bool:
    return target.startswith(PG_SCHEMES)


def open_storage(target: str, read_only: bool = False) -> Storage:
    """A path or `duckdb://path` is embedded DuckDB; `postgresql://` (or `postgres://`) is
    PostgreSQL through ADBC, optionally `?schema=NAME` for one TARGET per schema."""
    if not target:
        raise TargetError("no TARGET given")
    if is_postgres(target):
        from settle_arrow.storage.postgres import PostgresStorage

        return PostgresStorage(target, read_only=read_only)
    if "://" in target and not target.startswith("duckdb://"):
        raise TargetError(f"unknown TARGET scheme in {target!r} (a file path or postgresql://…)")
    from settle_arrow.storage.duckdb import DuckDBStorage

    return DuckDBStorage(target.removeprefix("duckdb://"), read_only=read_only)


__all__ = ["Storage", "TargetError", "is_postgres", "open_storage"]
