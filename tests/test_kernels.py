"""Each compiled kernel (kernels.py) equals the numpy expression it replaces, on any input
it accepts, for every dtype it is called with; and refuses the inputs it does not accept."""

from __future__ import annotations

from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from settle_arrow import state
from settle_arrow.kernels import lower_bound_sorted
from settle_arrow.state import SortedRuns

U64_MAX = (1 << 64) - 1


@settings(max_examples=300, deadline=None)
@given(keys=st.sets(st.one_of(st.integers(0, 60), st.integers(0, U64_MAX)), max_size=300),
       probe=st.lists(st.one_of(st.integers(0, 65), st.integers(0, U64_MAX)), max_size=100),
       stride=st.one_of(st.none(), st.sampled_from([1, 2, 5, 16, 32, 64])),
       dtype=st.sampled_from([np.int64, np.uint64]))
def test_lower_bound_sorted_is_searchsorted(keys, probe, stride, dtype):
    """Galloping, through a sample or not, equals np.searchsorted for sorted probes inside
    the run or not, repeated or not: signed keys (holdings) take the whole int64 range,
    unsigned ones (trade keys) the whole uint64 range."""
    shift = -(1 << 63) if dtype is np.int64 else 0  # maps 0..2^64-1 onto int64's range
    run = np.array(sorted(k + shift for k in keys), dtype=dtype)
    p = np.array(sorted(k + shift for k in probe), dtype=dtype)
    sample = None if stride is None else run[::stride].copy()
    got = lower_bound_sorted(run, p, sample, stride or 0)
    assert np.array_equal(got, np.searchsorted(run, p))


@settings(max_examples=100, deadline=None)
@given(keys=st.sets(st.integers(-(2**40), 2**40), min_size=1, max_size=300),
       probe=st.lists(st.integers(-(2**40) - 5, 2**40 + 5), max_size=100),
       stride=st.sampled_from([1, 3, 32]))
def test_sorted_runs_lower_bound_takes_either_path(keys, probe, stride):
    """SortedRuns._lower_bound equals searchsorted through the sampled path too (the rule
    that picks it patched so that these small runs take it)."""
    run = np.array(sorted(keys), dtype=np.int64)
    p = np.sort(np.array(probe, dtype=np.int64))
    runs = SortedRuns(np.int64)
    assert np.array_equal(runs._lower_bound(0, run, p), np.searchsorted(run, p))
    with mock.patch.object(state, "SAMPLED_RUN_ROWS_MIN", 1), mock.patch.object(state, "SAMPLED_RUN_PROBE_RATIO", 0), \
            mock.patch.object(state, "SAMPLE_STRIDE", stride):
        assert np.array_equal(runs._lower_bound(0, run, p), np.searchsorted(run, p))


def test_lower_bound_sorted_refuses_unsorted_probes_and_mixed_dtypes():
    run = np.arange(0, 100, 3, dtype=np.int64)
    with pytest.raises(ValueError, match="sorted"):
        lower_bound_sorted(run, np.array([5, 4], dtype=np.int64))
    with pytest.raises(ValueError, match="sorted"):
        lower_bound_sorted(run, np.array([5, 4], dtype=np.int64), run[::4].copy(), 4)
    with pytest.raises(AssertionError, match="dtype"):
        lower_bound_sorted(run, np.array([5], dtype=np.uint64))


def test_lower_bound_sorted_reads_read_only_runs():
    """Frozen runs are spilled and mapped read-only: the kernel takes them as they are."""
    run = np.arange(0, 1000, 7, dtype=np.uint64)
    run.flags.writeable = False
    p = np.array([0, 6, 7, 8, 999, 5000], dtype=np.uint64)
    assert np.array_equal(lower_bound_sorted(run, p), np.searchsorted(run, p))
