"""TARGET strings -> storage backends (SPEC §7)."""

from __future__ import annotations

from settle_arrow.storage.base import Storage, TargetError


def open_storage(target: str, read_only: bool = False) -> Storage:
    """A path or `duckdb://path` is embedded DuckDB; `postgresql://` is PostgreSQL."""
    if not target:
        raise TargetError("no TARGET given")
    if target.startswith(("postgresql://", "postgres://")):
        raise TargetError("PostgreSQL targets are not available in this version yet; use a DuckDB file path")
    if "://" in target and not target.startswith("duckdb://"):
        raise TargetError(f"unknown TARGET scheme in {target!r} (a file path or postgresql://…)")
    from settle_arrow.storage.duckdb import DuckDBStorage

    return DuckDBStorage(target.removeprefix("duckdb://"), read_only=read_only)


__all__ = ["Storage", "TargetError", "open_storage"]
