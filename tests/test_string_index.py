"""StringIndex: exact string -> id lookups (hash table + string comparison)."""

import numpy as np
import polars as pl
import pytest
from hypothesis import given
from hypothesis import strategies as st

from settle_arrow import refdata
from settle_arrow.refdata import StringIndex


@pytest.mark.parametrize("small_max", [0, 4096], ids=["hash-table", "small-domain"])
@given(ref=st.lists(st.text(max_size=6), unique=True, max_size=60), probes=st.lists(st.text(max_size=6), max_size=60))
def test_lookup_matches_a_dict(small_max, ref, probes):
    idx = StringIndex(pl.Series(ref, dtype=pl.String), small_max=small_max)
    want = {s: i for i, s in enumerate(ref)}
    got = idx.lookup(pl.Series([*probes, *ref, None], dtype=pl.String))
    assert got.tolist() == [want.get(p, -1) for p in [*probes, *ref]] + [-1]


@pytest.mark.parametrize("chunk_keys", [1, 7, 1_000_000])
@given(ref=st.lists(st.text(max_size=4), unique=True, min_size=1, max_size=40),
       probes=st.lists(st.text(max_size=4), max_size=80))
def test_lookup_in_chunks_matches_one_pass(chunk_keys, ref, probes):
    """Many keys are looked up in chunks by several threads: same ids, in the keys' order."""
    idx = StringIndex(pl.Series(ref, dtype=pl.String), small_max=0)
    keys = pl.Series([*probes, None, *ref], dtype=pl.String)
    whole = idx.lookup(keys)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(refdata, "LOOKUP_CHUNK_KEYS", chunk_keys)
        assert idx.lookup(keys).tolist() == whole.tolist()


def test_million_keys_roundtrip():
    vals = pl.Series([f"A{i:09d}" for i in range(300_000)])
    idx = StringIndex(vals)
    assert (idx.lookup(vals) == np.arange(len(vals))).all()
    assert (idx.lookup(pl.Series(["A", "A0000000001", "B000000001"])) == -1).all()
