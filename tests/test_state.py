"""SortedRuns (state.py) against a dict: any sequence of inserts, with runs frozen and
spilled at any size, finds and gathers exactly as the dict does; packed trade keys are
day-major and distinct."""

from __future__ import annotations

import contextlib
import datetime
from unittest import mock

import numpy as np
import polars as pl
from hypothesis import given, settings
from hypothesis import strategies as st

from settle_arrow import state
from settle_arrow.state import SortedRuns, pack_keys, stable_sort

batches = st.lists(st.lists(st.integers(0, 400), max_size=60), max_size=25)


@settings(max_examples=200, deadline=None)
@given(batches=batches, frozen=st.one_of(st.none(), st.integers(1, 50)), spill=st.booleans(),
       probe=st.lists(st.integers(-5, 405), max_size=80),
       sampled=st.one_of(st.none(), st.tuples(st.integers(1, 40), st.sampled_from([1, 2, 3, 4, 8]))))
def test_sorted_runs_behave_as_a_dict(tmp_path_factory, batches, frozen, spill, probe, sampled):
    """`sampled`: (SAMPLED_RUN_ROWS_MIN, SAMPLE_STRIDE) small enough, and no minimum of
    keys per probe, so that probes of these runs go through the sampled search."""
    with contextlib.ExitStack() as patches:
        if sampled is not None:
            patches.enter_context(mock.patch.object(state, "SAMPLED_RUN_ROWS_MIN", sampled[0]))
            patches.enter_context(mock.patch.object(state, "SAMPLED_RUN_PROBE_RATIO", 0))
            patches.enter_context(mock.patch.object(state, "SAMPLE_STRIDE", sampled[1]))
        _behave_as_a_dict(tmp_path_factory, batches, frozen, spill, probe)


def _behave_as_a_dict(tmp_path_factory, batches, frozen, spill, probe):
    spill_dir = str(tmp_path_factory.mktemp("spill")) if spill and frozen else None
    runs = SortedRuns(np.int64, {"v": np.int64}, frozen_rows_min=frozen, spill_dir=spill_dir)
    oracle: dict[int, int] = {}
    for i, batch in enumerate(batches):
        # Probes between inserts: spilled runs are released and touched again in turn.
        some = np.array(batch[: len(batch) // 2] + [i * 17], dtype=np.int64)
        r, p = runs.find(some)
        assert list(runs.gather("v", r, p, fill=-1)) == [oracle.get(int(k), -1) for k in some]
        keys = np.array(sorted(set(batch) - set(oracle)), dtype=np.int64)[::-1 if i % 2 else 1]
        runs.insert(keys, {"v": keys * 3 + i})
        oracle.update({int(k): int(k) * 3 + i for k in keys})
    assert len(runs) == len(oracle)
    assert all(len(k) >= frozen for k, _ in runs.runs[: runs.n_frozen]) if frozen else runs.n_frozen == 0
    p = np.array(probe, dtype=np.int64)
    every = np.array(sorted(oracle), dtype=np.int64)
    # Twice each: answers do not depend on what earlier finds built (samples) or released.
    for _ in range(2):
        run_of, pos_of = runs.find(p)
        assert list(run_of >= 0) == [k in oracle for k in probe]
        assert list(runs.gather("v", run_of, pos_of, fill=-1)) == [oracle.get(k, -1) for k in probe]
        run_of, pos_of = runs.find(every)
        assert list(runs.gather("v", run_of, pos_of, fill=-1)) == [oracle[int(k)] for k in every]
    if spill_dir:
        # Runs written in the background are mapped from then on, with the same answers.
        runs.wait_written()
        assert all(k.base is not None and not k.flags.writeable for k, _ in runs.runs[: runs.n_frozen] if len(k))
        run_of, pos_of = runs.find(every)
        assert list(runs.gather("v", run_of, pos_of, fill=-1)) == [oracle[int(k)] for k in every]


@settings(max_examples=300, deadline=None)
@given(keys=st.sets(st.integers(0, 10**6), max_size=200), data=st.data(), blocks_max=st.sampled_from([0, 4, 1000]))
def test_merge_equals_a_sort_of_both_runs(keys, data, blocks_max):
    """_merge of two runs with disjoint keys (any split, blocks or scattered, whichever
    run is larger) equals sorting both together, payload moved with its key."""
    keys = sorted(keys)
    mine = data.draw(st.lists(st.booleans(), min_size=len(keys), max_size=len(keys)))
    k1 = np.array([k for k, m in zip(keys, mine, strict=True) if m], dtype=np.int64)
    k2 = np.array([k for k, m in zip(keys, mine, strict=True) if not m], dtype=np.int64)
    with mock.patch.object(state, "MERGE_BLOCKS_MAX", blocks_max):
        merged, cols = state._merge(k1, {"v": k1 * 7, "w": -k1}, k2, {"v": k2 * 7, "w": -k2})
    assert merged.tolist() == keys
    assert cols["v"].tolist() == [k * 7 for k in keys] and cols["w"].tolist() == [-k for k in keys]


def test_trade_keys_are_day_major_and_distinct():
    days = [datetime.date(2024, 1, 2), datetime.date(2024, 1, 3)]
    rows = [(code, d, tid) for d in days for code in (1, 0) for tid in (1, 2**46 - 1)]
    keys, ok = pack_keys(np.array([r[0] for r in rows]), pl.Series([r[1] for r in rows]),
                         pl.Series([r[2] for r in rows], dtype=pl.Int64))
    assert ok.all() and len(set(keys.tolist())) == len(rows)
    # Every key of the earlier day sorts below every key of the later one, whatever the market.
    assert keys[:4].max() < keys[4:].min()


@settings(max_examples=200, deadline=None)
@given(keys=st.lists(st.one_of(st.integers(0, 40), st.integers(0, (1 << 63) - 1), st.integers(-(1 << 63), -1)),
                     max_size=300),
       narrow=st.booleans(), consume=st.booleans(), writable=st.booleans())
def test_stable_sort_equals_a_stable_argsort(keys, narrow, consume, writable):
    """Narrow non-negative keys go through the packed sort, wide or negative ones through the
    stable argsort; either way the order equals a stable argsort's, ties in input order, and
    the caller's keys are untouched unless it gave up writable ones."""
    a = np.array([k % 41 for k in keys] if narrow else keys, dtype=np.int64)
    given_keys = a.copy()
    given_keys.flags.writeable = writable
    order, ordered = stable_sort(given_keys, consume=consume)
    assert np.array_equal(order, np.argsort(a, kind="stable"))
    assert np.array_equal(ordered, a[order])
    if not (consume and writable):
        assert np.array_equal(given_keys, a)


@given(pairs=st.lists(st.tuples(st.integers(0, 1_000_000), st.integers(0, 1999)), max_size=50),
       n_sec=st.sampled_from([2000, 2001]), narrow=st.booleans(), consume=st.booleans())
def test_split_holding_keys_inverts_holding_keys(pairs, n_sec, narrow, consume):
    """Any key type, given up or not: the (account, security) the key was made of; keys the
    caller keeps are left as they were."""
    acct = np.array([a for a, _ in pairs], dtype=np.int64)
    sec = np.array([s for _, s in pairs], dtype=np.int64)
    keys = state.holding_keys(acct, sec, n_sec)
    given_keys = keys.astype(np.uint32) if narrow else keys.copy()
    got_acct, got_sec = state.split_holding_keys(given_keys, n_sec, consume=consume)
    assert got_acct.dtype == np.int64 and got_sec.dtype == np.int32
    assert got_acct.tolist() == acct.tolist() and got_sec.tolist() == sec.tolist()
    if not consume or narrow:
        assert given_keys.astype(np.int64).tolist() == keys.tolist()


@given(markets=st.lists(st.one_of(st.none(), st.sampled_from(["XSHG", "XSHE", "xshg", "XNYS", "", "XSHG "])),
                        max_size=30))
def test_market_codes_are_the_dense_codes_of_known_markets(markets):
    """Exactly the MICs of schema.MARKET_CODES get their code; anything else, null included, -1."""
    got = state.market_codes(pl.Series(markets, dtype=pl.String))
    assert got.dtype == np.int64
    assert got.tolist() == [state.MARKET_CODES.get(m, -1) if m is not None else -1 for m in markets]
