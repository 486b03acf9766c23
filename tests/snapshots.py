"""Whole-TARGET snapshots for exact comparisons (SPEC §6 tables through the read API)."""

from __future__ import annotations

import polars as pl
from polars.testing import assert_frame_equal

from settle_arrow import open_target, schema

TABLES = tuple(schema.OUTPUT)  # every table of SPEC §6, checkpoints included
RESULT_TABLES = tuple(n for n in TABLES if n != "checkpoints")


def snapshot(db: str, names: tuple[str, ...] = TABLES) -> dict[str, pl.DataFrame]:
    with open_target(db) as t:
        return {name: t.table(name) for name in names}


def canonical(frame: pl.DataFrame) -> pl.DataFrame:
    """Rows in a total order (all columns), so equal contents compare equal."""
    return frame.sort(frame.columns, nulls_last=True) if frame.height else frame


def assert_same_tables(got: dict[str, pl.DataFrame], want: dict[str, pl.DataFrame]) -> None:
    assert got.keys() == want.keys()
    for name in want:
        g, w = got[name], want[name]
        if name == "checkpoints":
            # SPEC §8: every checkpoints column is bookkeeping; only the schema must agree.
            assert g.schema == w.schema, name
            continue
        assert g.height == w.height, f"{name}: {g.height} rows, want {w.height}"
        try:
            assert_frame_equal(canonical(g), canonical(w), check_exact=True)
        except AssertionError as exc:
            raise AssertionError(f"table {name} differs: {exc}") from None
