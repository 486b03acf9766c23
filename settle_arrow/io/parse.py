"""Strict conversion of raw columns (text or near-miss Arrow types) to the types of schema.py.

Data model: a raw Polars frame (any column types) -> a typed frame whose columns carry the
target Arrow types, plus a boolean `<col>__bad` column per converted column that is True
where a non-null raw value did not parse.

Invariants:
  * a value either converts exactly or is marked bad: no silent rounding, truncation or
    wrap-around (Polars' own decimal cast rounds `1.2345` to `1.234`; we refuse it).
  * money never passes through a float: a float column where a decimal is expected is a
    user error (`ColumnTypeError`), not a parse failure.
"""

from __future__ import annotations

import functools

import polars as pl
import pyarrow as pa

from settle_arrow.errors import UserError


class ColumnTypeError(UserError):
    """A column's physical type cannot be a value of the expected type (user mistake)."""


_INT_RE = r"^[+-]?[0-9]{1,19}$"
_DATE_RE = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$"
_TIME_RE = r"^[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,6}0*)?$"


def _decimal_re(precision: int, scale: int) -> str:
    whole = precision - scale
    # Trailing zeros beyond the scale change nothing (10.1000 is exactly 10.100): a decimal
    # column of a wider scale, as databases export, keeps its exact values.
    frac = rf"(\.[0-9]{{1,{scale}}}0*)?" if scale else ""
    return rf"^[+-]?[0-9]{{1,{whole}}}{frac}$"


@functools.cache  # called per column per window; Arrow types are few, immutable and hashable
def polars_dtype(arrow_type: pa.DataType) -> pl.DataType:
    """Polars dtype that round-trips to `arrow_type` (string views become large strings)."""
    return pl.from_arrow(pa.array([], type=arrow_type)).dtype


def _parse_text(col: pl.Expr, arrow_type: pa.DataType) -> tuple[pl.Expr, pl.Expr]:
    """(typed value or null, accepted-by-grammar) for a text column."""
    text = col.str.strip_chars()
    if pa.types.is_integer(arrow_type):
        ok = text.str.contains(_INT_RE)
        return text.cast(polars_dtype(arrow_type), strict=False), ok
    if pa.types.is_decimal(arrow_type):
        ok = text.str.contains(_decimal_re(arrow_type.precision, arrow_type.scale))
        return text.cast(polars_dtype(arrow_type), strict=False), ok
    if pa.types.is_date32(arrow_type):
        ok = text.str.contains(_DATE_RE)
        return text.str.to_date("%Y-%m-%d", strict=False), ok
    if pa.types.is_time64(arrow_type):
        ok = text.str.contains(_TIME_RE)
        return text.str.to_time("%H:%M:%S%.f", strict=False), ok
    if pa.types.is_string(arrow_type):
        return col, pl.lit(True)
    raise AssertionError(f"no text grammar for {arrow_type}")


def _is_text(dtype: pl.DataType) -> bool:
    return dtype in (pl.String, pl.Categorical) or isinstance(dtype, pl.Enum)


def coerce_column(frame: pl.DataFrame, name: str, arrow_type: pa.DataType) -> tuple[pl.Expr, pl.Expr]:
    """Expressions (typed value, bad flag) converting frame[name] to `arrow_type`."""
    src = frame.schema[name]
    target = polars_dtype(arrow_type)
    col = pl.col(name)
    if src == pl.Time and pa.types.is_time64(arrow_type) and arrow_type.unit == "us":
        # Polars times carry nanoseconds; a sub-microsecond part does not fit time64[us].
        bad = col.is_not_null() & (col.cast(pl.Int64) % 1000 != 0)
        return pl.when(bad).then(None).otherwise(col), bad
    if src == target:
        return col, pl.lit(False)
    if src == pl.Null:
        return pl.lit(None, dtype=target), pl.lit(False)
    if _is_text(src):
        value, ok = _parse_text(col.cast(pl.String), arrow_type)
        # A value that fits the grammar but still fails (2023-02-30, int overflow) is bad too.
        bad = col.is_not_null() & (~ok.fill_null(False) | value.is_null())
        return pl.when(bad).then(None).otherwise(value), bad
    if pa.types.is_integer(arrow_type) and src.is_integer():
        value = col.cast(target, strict=False)
        return value, col.is_not_null() & value.is_null()
    if pa.types.is_time64(arrow_type) and src == pl.Time:
        return col, pl.lit(False)
    raise ColumnTypeError(f"column {name} has type {src}, expected {arrow_type}")


def to_text(name: str, dtype: pl.DataType) -> pl.Expr:
    """Column `name` as text that parses back to the same value (a plain cast to string
    drops a time's fraction of a second: 10:00:00.123456 would become 10:00:00)."""
    if dtype == pl.Time:
        return pl.col(name).dt.to_string("%H:%M:%S%.f")
    return pl.col(name).cast(pl.String)


def coerce(frame: pl.DataFrame, schema: pa.Schema) -> pl.DataFrame:
    """Typed columns of `schema` plus `<col>__bad` flags; missing columns come back all null."""
    # Decimals of another precision/scale (or integers where a decimal is due) go through
    # text so that excess digits are refused instead of rounded.
    to_text = [
        f.name
        for f in schema
        if f.name in frame.columns
        and pa.types.is_decimal(f.type)
        and frame.schema[f.name] != polars_dtype(f.type)
        and (isinstance(frame.schema[f.name], pl.Decimal) or frame.schema[f.name].is_integer())
    ]
    if to_text:
        frame = frame.with_columns(pl.col(to_text).cast(pl.String))
    exprs: list[pl.Expr] = []
    for field in schema:
        if field.name in frame.columns:
            value, bad = coerce_column(frame, field.name, field.type)
        else:
            value = pl.repeat(None, frame.height, dtype=polars_dtype(field.type))
            bad = pl.repeat(False, frame.height)
        exprs.append(value.alias(field.name))
        exprs.append(bad.alias(f"{field.name}__bad"))
    return frame.select(exprs)
