"""Content digests of output tables: equal on every backend for the same contents.

Definition (version `settle_arrow digest v1`), for one logical table of SPEC §6:
  1. the table in its output schema (schema.OUTPUT), minus DIGEST_EXCLUDE columns;
  2. rows sorted by the table's key (schema.KEYS), then by every other column, ascending,
     nulls last, text by code point (byte order of UTF-8);
  3. every value as canonical text: integers in decimal; decimals with exactly their
     scale's digits ("-0.34", "10.00"); dates ISO-8601 ("2025-06-16"); times as
     microseconds since midnight; timestamps as microseconds since 1970-01-01 UTC;
     booleans "true"/"false"; text as it is;
  4. per column, two SHA-256 streams over the rows in that order: the values' UTF-8 byte
     lengths as little-endian int64 (-1 for null), and the values' UTF-8 bytes concatenated;
  5. digest = SHA-256 hex of "settle_arrow digest v1\\n" + "<table>\\n<rows>\\n", then per
     column "<name> <SQL type>\\n" + its length hash + its bytes hash (raw 32 bytes each).
Nothing depends on the backend, on how rows are stored or chunked, or on row order.

`checkpoints` leaves out committed_at (wall-clock time); its other columns describe the
windows, so two TARGETs agree there only when they were cut into the same windows (SPEC §8
exempts checkpoints from the any-windowing rule; every other table must agree always).
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from settle_arrow import schema
from settle_arrow.storage.base import sql_type

VERSION = "settle_arrow digest v1"
DIGEST_EXCLUDE = {"checkpoints": ("committed_at",)}
_SLICE = 1 << 20


def canonical_text(col: pa.ChunkedArray) -> pa.ChunkedArray:
    t = col.type
    if pa.types.is_time(t) or pa.types.is_timestamp(t):
        col = col.cast(pa.int64())
    if pa.types.is_boolean(t):
        col = pc.if_else(col, "true", "false")
    return col.cast(pa.large_string())


def table_digest(name: str, data: pa.Table) -> str:
    """Digest of logical table `name` holding `data` (any column order, any row order)."""
    target = schema.OUTPUT[name]
    cols = [c for c in target.names if c not in DIGEST_EXCLUDE.get(name, ())]
    data = data.select(target.names).cast(target).select(cols)
    keys = [c for c in schema.KEYS[name] if c in cols]
    order = [(c, "ascending", "at_end") for c in keys + [c for c in cols if c not in keys]]
    if data.num_rows:
        data = data.take(pc.sort_indices(data, sort_keys=order))
    h = hashlib.sha256(f"{VERSION}\n{name}\n{data.num_rows}\n".encode())
    for c in cols:
        lengths, body = hashlib.sha256(), hashlib.sha256()
        text = canonical_text(data[c])
        for start in range(0, max(data.num_rows, 1), _SLICE):
            part = text.slice(start, _SLICE).combine_chunks()
            if not len(part):
                break
            nulls = part.is_null().to_numpy(zero_copy_only=False) if part.null_count else None
            part = pc.fill_null(part, "") if part.null_count else part  # null slots: no bytes
            _, offsets_buf, data_buf = part.buffers()
            offsets = np.frombuffer(offsets_buf, dtype=np.int64)[part.offset: part.offset + len(part) + 1]
            n = np.diff(offsets)
            if nulls is not None:
                n = np.where(nulls, -1, n)
            lengths.update(n.astype("<i8").tobytes())
            if data_buf is not None:
                body.update(memoryview(data_buf)[offsets[0]: offsets[-1]])
        h.update(f"{c} {sql_type(target.field(c).type)}\n".encode())
        h.update(lengths.digest())
        h.update(body.digest())
    return h.hexdigest()
