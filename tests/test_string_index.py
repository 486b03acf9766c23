"""Reference lookups: StringIndex, exact string -> id (hash table + string comparison, or
an Enum cast for a small domain), and RefData.sec_idx, (market, security_id) -> sec_idx."""

import dataclasses
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from settle_arrow import refdata, schema
from settle_arrow.refdata import StringIndex, load_refdata
from settle_arrow.state import market_codes

SAMPLE_REF = load_refdata(str(Path(__file__).resolve().parents[1] / "data" / "samples" / "refdata"))


@pytest.mark.parametrize("small_max", [0, 4096], ids=["hash-table", "small-domain"])
@settings(deadline=None)  # the first example loads the probe kernel (numba's cache): ~0.4 s
@given(ref=st.lists(st.text(max_size=6), unique=True, max_size=60), probes=st.lists(st.text(max_size=6), max_size=60))
def test_lookup_matches_a_dict(small_max, ref, probes):
    idx = StringIndex(pl.Series(ref, dtype=pl.String), small_max=small_max)
    want = {s: i for i, s in enumerate(ref)}
    got = idx.lookup(pl.Series([*probes, *ref, None], dtype=pl.String))
    assert got.tolist() == [want.get(p, -1) for p in [*probes, *ref]] + [-1]


@pytest.mark.parametrize("chunk_keys", [1, 7, 1_000_000])
@settings(deadline=None)  # as above
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


security_ids = st.sampled_from(["600000", "600001", "000001", "000002", ""])
markets = st.sampled_from([*schema.MARKETS, "XNAS"])


@settings(deadline=None)  # the first example also builds the reference side (sec_idx's Enum and table)
@given(listed=st.lists(st.tuples(st.sampled_from(schema.MARKETS), security_ids), unique=True, max_size=8),
       probes=st.lists(st.tuples(st.none() | markets, st.none() | security_ids), max_size=30),
       codes_given=st.booleans())
def test_sec_idx_matches_a_dict(listed, probes, codes_given):
    """The same id listed in both markets, or in one, an unknown market, nulls: sec_idx is
    the listed row's, null where (market, security_id) is not listed."""
    securities = pl.DataFrame({"market": [m for m, _ in listed], "security_id": [i for _, i in listed]},
                              schema={"market": pl.String, "security_id": pl.String})
    ref = dataclasses.replace(SAMPLE_REF, securities=securities.with_row_index("sec_idx").with_columns(pl.col("sec_idx").cast(pl.Int32)))
    keys = pl.DataFrame({"market": [m for m, _ in probes], "security_id": [i for _, i in probes]},
                        schema={"market": pl.String, "security_id": pl.String})
    want = {key: i for i, key in enumerate(listed)}
    got = ref.sec_idx(keys, market_codes(keys["market"]) if codes_given else None)
    assert got.dtype == pl.Int32
    assert got.to_list() == [want.get(p) for p in probes]
