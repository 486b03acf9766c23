"""StringIndex: exact string -> id lookups (hash table + string comparison)."""

import numpy as np
import polars as pl
from hypothesis import given
from hypothesis import strategies as st

from settle_arrow.refdata import StringIndex


@given(ref=st.lists(st.text(max_size=6), unique=True, max_size=60), probes=st.lists(st.text(max_size=6), max_size=60))
def test_lookup_matches_a_dict(ref, probes):
    idx = StringIndex(pl.Series(ref, dtype=pl.String))
    want = {s: i for i, s in enumerate(ref)}
    got = idx.lookup(pl.Series([*probes, *ref, None], dtype=pl.String))
    assert got.tolist() == [want.get(p, -1) for p in [*probes, *ref]] + [-1]


def test_million_keys_roundtrip():
    vals = pl.Series([f"A{i:09d}" for i in range(300_000)])
    idx = StringIndex(vals)
    assert (idx.lookup(vals) == np.arange(len(vals))).all()
    assert (idx.lookup(pl.Series(["A", "A0000000001", "B000000001"])) == -1).all()
