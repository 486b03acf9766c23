"""Each compiled kernel (kernels.py) equals the numpy expression it replaces, on any input
it accepts, for every dtype it is called with; and refuses the inputs it does not accept."""

from __future__ import annotations

from unittest import mock

import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from settle_arrow import money
from settle_arrow.kernels import (
    dense_ranks,
    fees_fen,
    find_in_run,
    gather_found,
    key_runs,
    net_cash,
    net_quantities,
    pairs_sorted,
    probe_slots,
    running_positions,
)

U64_MAX = (1 << 64) - 1


def _numpy_find(run, probe, lo, hi, r, run_of, pos_of):
    """find_in_run's definition in numpy."""
    run_of, pos_of = run_of.copy(), pos_of.copy()
    pos = np.searchsorted(run, probe)
    hit = np.zeros(len(probe), dtype=bool)
    if len(run):
        hit = run[np.minimum(pos, len(run) - 1)] == probe
    hit &= (np.arange(len(probe)) >= lo) & (np.arange(len(probe)) < hi) & (run_of < 0)
    run_of[hit], pos_of[hit] = r, pos[hit]
    return run_of, pos_of


@settings(max_examples=300, deadline=None)
@given(keys=st.sets(st.one_of(st.integers(0, 60), st.integers(0, U64_MAX)), max_size=300),
       probe=st.lists(st.one_of(st.integers(0, 65), st.integers(0, U64_MAX)), max_size=100),
       stride=st.one_of(st.none(), st.sampled_from([1, 2, 5, 16, 32, 64])),
       dtype=st.sampled_from([np.int64, np.uint64]), data=st.data())
def test_find_in_run_is_searchsorted(keys, probe, stride, dtype, data):
    """Galloping, through a sample or not, equals searchsorted-and-compare for sorted probes
    inside the run or not, repeated or not, within any probe range, skipping probes an
    earlier run answered: signed keys (holdings) over the whole int64 range, unsigned ones
    (trade keys) over the whole uint64 range."""
    shift = -(1 << 63) if dtype is np.int64 else 0  # maps 0..2^64-1 onto int64's range
    run = np.array(sorted(k + shift for k in keys), dtype=dtype)
    p = np.array(sorted(k + shift for k in probe), dtype=dtype)
    lo = data.draw(st.integers(0, len(p)))
    hi = data.draw(st.integers(lo, len(p)))
    earlier = np.array(data.draw(st.lists(st.sampled_from([-1, 0]), min_size=len(p), max_size=len(p))), dtype=np.int64)
    run_of, pos_of = earlier.copy(), np.zeros(len(p), dtype=np.int64)
    sample = None if stride is None else run[::stride].copy()
    find_in_run(run, p, lo, hi, 3, run_of, pos_of, sample, stride or 1)
    want_run, want_pos = _numpy_find(run, p, lo, hi, 3, earlier, np.zeros(len(p), dtype=np.int64))
    assert np.array_equal(run_of, want_run) and np.array_equal(pos_of, want_pos)


def test_find_in_run_refuses_unsorted_probes_and_mixed_dtypes():
    run = np.arange(0, 100, 3, dtype=np.int64)
    out = np.full(2, -1, dtype=np.int64), np.zeros(2, dtype=np.int64)
    with pytest.raises(ValueError, match="sorted"):
        find_in_run(run, np.array([5, 4], dtype=np.int64), 0, 2, 0, *out)
    with pytest.raises(ValueError, match="sorted"):
        find_in_run(run, np.array([5, 4], dtype=np.int64), 0, 2, 0, *out, run[::4].copy(), 4)
    with pytest.raises(AssertionError, match="dtype"):
        find_in_run(run, np.array([5, 6], dtype=np.uint64), 0, 2, 0, *out)
    with pytest.raises(AssertionError, match="sample"):
        find_in_run(run, np.array([5, 6], dtype=np.int64), 0, 2, 0, *out, run[::4].copy(), 3)


def test_find_in_run_reads_read_only_runs():
    """Frozen runs are spilled and mapped read-only: the kernel takes them as they are."""
    run = np.arange(0, 1000, 7, dtype=np.uint64)
    run.flags.writeable = False
    p = np.array([0, 6, 7, 8, 994, 5000], dtype=np.uint64)
    run_of, pos_of = np.full(len(p), -1, dtype=np.int64), np.zeros(len(p), dtype=np.int64)
    find_in_run(run, p, 0, len(p), 0, run_of, pos_of)
    assert run_of.tolist() == [0, -1, 0, -1, 0, -1] and pos_of.tolist() == [0, 0, 1, 0, 142, 0]


@settings(max_examples=300, deadline=None)
@given(amounts=st.lists(st.one_of(st.integers(0, 10**15), st.sampled_from([0, 1, 49, 50, 10**8 - 1, 10**8, 10**15])),
                        max_size=60),
       shape=st.tuples(st.integers(1, 5), st.integers(1, 8), st.integers(1, 3)), data=st.data())
def test_fees_fen_is_a_sum_of_fee_fen(amounts, shape, data):
    """One pass over the trades equals money.fee_fen per fee row (slot), added per column:
    every half-fen tie, the largest amount and rate, absent rows (rate 0) included."""
    rate = st.one_of(st.integers(0, money.RATE_SCALE), st.sampled_from([0, 1, 5, 50_000, money.RATE_SCALE]))
    rates = np.array(data.draw(st.lists(rate, min_size=int(np.prod(shape)), max_size=int(np.prod(shape)))),
                     dtype=np.int64).reshape(shape)
    amount = np.array(amounts, dtype=np.int64)
    regime = np.array(data.draw(st.lists(st.integers(0, shape[0] - 1), min_size=len(amount), max_size=len(amount))),
                      dtype=np.int64)
    want = np.zeros((shape[1], len(amount)), dtype=np.int64)
    for c in range(shape[1]):
        for s in range(shape[2]):
            want[c] += money.fee_fen(amount, rates[regime, c, s])
    assert np.array_equal(fees_fen(amount, regime, rates), want)


def test_fees_fen_refuses_what_would_not_stay_exact():
    one, rates = np.ones(1, dtype=np.int64), np.ones((1, 1, 1), dtype=np.int64)
    with pytest.raises(AssertionError, match="amount"):
        fees_fen(one * (10**15 + 1), one - 1, rates)
    with pytest.raises(AssertionError, match="rate"):
        fees_fen(one, one - 1, rates * (money.RATE_SCALE + 1))
    with pytest.raises(AssertionError, match="regime"):
        fees_fen(one, one, rates)


def test_warm_loads_every_type_the_state_passes(tmp_path):
    """After kernels.warm(), finds over hot and spilled (read-only) runs of signed and
    unsigned keys, sampled or not, compile nothing more: the background load at start-up
    covers them all, so no window waits on a compile."""
    from unittest import mock

    from settle_arrow import kernels, state
    from settle_arrow.state import SortedRuns

    kernels.warm()
    loaded = set(kernels._find_in_run.signatures)
    for dtype in (np.int64, np.uint64):
        runs = SortedRuns(dtype, frozen_rows_min=4, spill_dir=str(tmp_path))
        runs.insert(np.arange(0, 40, 2, dtype=dtype))  # frozen and spilled: read-only
        runs.wait_written()
        runs.insert(np.arange(1, 4, 2, dtype=dtype))  # hot: writable
        assert runs.n_frozen == 1 and not runs.runs[0][0].flags.writeable
        probe = np.arange(0, 40, dtype=dtype)
        for ratio in (state.SAMPLED_RUN_PROBE_RATIO, 0):
            with mock.patch.object(state, "SAMPLED_RUN_ROWS_MIN", 1), \
                    mock.patch.object(state, "SAMPLED_RUN_PROBE_RATIO", ratio):
                run_of, _ = runs.find(probe)
                assert (run_of >= 0).sum() == 22
    assert set(kernels._find_in_run.signatures) == loaded
    fees = set(kernels._fees_fen.signatures)
    fees_fen(np.arange(3, dtype=np.int64), np.zeros(3, dtype=np.int64), np.ones((1, 8, 2), dtype=np.int64))
    assert fees and set(kernels._fees_fen.signatures) == fees


def test_warm_covers_every_kernel_a_replay_calls(tmp_path):
    """After kernels.warm(), replaying the bundled sample in small windows (new and spilled
    state, X rows, netting, lookups) compiles no kernel for another argument type."""
    from pathlib import Path

    from settle_arrow import engine, kernels, state

    kernels.warm()
    dispatchers = [getattr(kernels, n) for n in dir(kernels) if isinstance(getattr(kernels, n), numba.core.registry.CPUDispatcher)]
    loaded = {d: set(d.signatures) for d in dispatchers}
    sample = Path(__file__).parents[1] / "data" / "samples"
    with mock.patch.object(state, "ACCEPTED_FROZEN_ROWS", 40), mock.patch.object(state, "SPILL_DIR", str(tmp_path)):
        engine.replay([str(sample / "trades")], str(sample / "refdata"), str(tmp_path / "t.duckdb"), window_rows=37)
    assert {d: set(d.signatures) for d in dispatchers} == loaded


def _linear_probing_table(hashes: list[int], mask: int) -> np.ndarray:
    """(hash, id) slots as StringIndex places them, one key at a time: each at the first
    empty slot at or after its home (hash & mask), the table grown past the end as needed."""
    slots = np.zeros((mask + 1, 2), dtype=np.uint64)
    for i, h in enumerate(hashes):
        s = h & mask
        while s < len(slots) and slots[s, 0]:
            s += 1
        if s == len(slots):
            slots = np.vstack([slots, np.zeros((1, 2), dtype=np.uint64)])
        slots[s] = (h, i)
    return slots


@settings(max_examples=300, deadline=None)
@given(keys=st.lists(st.integers(0, U64_MAX >> 1), unique=True, max_size=60),
       probe=st.lists(st.integers(0, U64_MAX >> 1), max_size=60), bits=st.integers(0, 7), pad=st.integers(0, 3))
def test_probe_slots_is_a_dict_lookup(keys, probe, bits, pad):
    """Every stored hash finds its id and any other hash -1, through chains of collisions
    (a mask of a few bits packs clusters) that may run to the table's last slot."""
    hashes = [2 * k + 1 for k in keys]
    slots = _linear_probing_table(hashes, (1 << bits) - 1)
    slots = np.vstack([slots, np.zeros((pad, 2), dtype=np.uint64)])
    ids = {h: i for i, h in enumerate(hashes)}
    asked = [*hashes, *(2 * p + 1 for p in probe)]
    got = probe_slots(slots, np.array(asked, dtype=np.uint64), np.uint64((1 << bits) - 1))
    assert got.tolist() == [ids.get(h, -1) for h in asked]


def test_probe_slots_refuses_even_hashes():
    with pytest.raises(AssertionError, match="odd"):
        probe_slots(np.zeros((4, 2), dtype=np.uint64), np.array([3, 4], dtype=np.uint64), np.uint64(3))


legs = st.integers(0, 40).flatmap(lambda n: st.tuples(
    st.integers(1, 6),
    st.lists(st.integers(-(10**12), 10**12), min_size=n, max_size=n),
    st.lists(st.integers(0, 5), min_size=n, max_size=n),
    st.lists(st.integers(0, 5), min_size=n, max_size=n),
    st.lists(st.lists(st.integers(-(10**9), 10**9), min_size=n, max_size=n), min_size=2, max_size=2),
))


@settings(max_examples=200, deadline=None)
@given(legs=legs)
def test_net_quantities_is_add_at(legs):
    """Each buy leg adds (q, q, 0) to its group, each sell leg (-q, 0, q) to its own."""
    groups, q, buy, sell, _ = legs
    buy, sell, q = (np.array([g % groups for g in buy], dtype=np.int64), np.array([g % groups for g in sell], dtype=np.int64),
                    np.array(q, dtype=np.int64))
    want = np.zeros((3, groups), dtype=np.int64)
    for group, values in ((buy, (q, q, 0 * q)), (sell, (-q, 0 * q, q))):
        for c, v in enumerate(values):
            np.add.at(want[c], group, v)
    assert np.array_equal(net_quantities(buy, sell, q, groups), want)


@settings(max_examples=200, deadline=None)
@given(legs=legs)
def test_net_cash_is_add_at(legs):
    """Each buy leg adds (-amount - its fees, amount, 0, its fees) to its group, each sell
    leg (amount - its fees, 0, amount, its fees) to its own."""
    groups, amount, buy, sell, fee_lists = legs
    buy, sell = (np.array([g % groups for g in side], dtype=np.int64) for side in (buy, sell))
    a = np.array(amount, dtype=np.int64)
    # Two fee columns per side, different on each side.
    fees = {"buy": np.array([fee_lists[0], fee_lists[1]], dtype=np.int64).reshape(2, len(a)),
            "sell": np.array([fee_lists[1], fee_lists[0]], dtype=np.int64).reshape(2, len(a)) * 3}
    want = np.zeros((5, groups), dtype=np.int64)
    for group, side, net, bought, sold in ((buy, "buy", -a - fees["buy"].sum(axis=0), a, 0 * a),
                                          (sell, "sell", a - fees["sell"].sum(axis=0), 0 * a, a)):
        for c, v in enumerate((net, bought, sold, *fees[side])):
            np.add.at(want[c], group, v)
    assert np.array_equal(net_cash(buy, sell, a, fees["buy"], fees["sell"], groups), want)


@settings(max_examples=200, deadline=None)
@given(span=st.integers(1, 50), data=st.data())
def test_dense_ranks_is_unique_inverse(span, data):
    """The distinct keys of both sides ascending, each key's rank among them: np.unique's."""
    n = data.draw(st.integers(0, 40))
    buy, sell = (np.array(data.draw(st.lists(st.integers(0, span - 1), min_size=n, max_size=n)), dtype=np.int64)
                 for _ in range(2))
    keys, inverse = np.unique(np.concatenate([buy, sell]), return_inverse=True)
    buy_rank, sell_rank, got = dense_ranks(buy, sell, span)
    assert np.array_equal(got, keys)
    assert np.array_equal(np.concatenate([buy_rank, sell_rank]), inverse.ravel())


def test_netting_kernels_refuse_groups_out_of_range():
    one = np.ones(1, dtype=np.int64)
    with pytest.raises(AssertionError, match="group"):
        net_quantities(one, one, one, 1)
    with pytest.raises(AssertionError, match="group"):
        net_cash(one, one, one, one.reshape(1, 1), one.reshape(1, 1), 1)
    with pytest.raises(AssertionError, match="key"):
        dense_ranks(one, one, 1)


@settings(max_examples=200, deadline=None)
@given(column=st.lists(st.integers(-(2**31), 2**31 - 1), min_size=1, max_size=30), data=st.data(),
       dtype=st.sampled_from([np.int32, np.int64]), writable=st.booleans())
def test_gather_found_is_masked_fancy_indexing(column, data, dtype, writable):
    """Only the rows found in run r read the column; the others keep their fill."""
    n = data.draw(st.integers(0, 40))
    run_of = np.array(data.draw(st.lists(st.integers(-1, 2), min_size=n, max_size=n)), dtype=np.int64)
    pos_of = np.array(data.draw(st.lists(st.integers(0, len(column) - 1), min_size=n, max_size=n)), dtype=np.int64)
    col = np.array(column, dtype=dtype)
    col.flags.writeable = writable
    out = np.full(n, 7, dtype=dtype)
    gather_found(col, run_of, pos_of, 1, out)
    want = np.full(n, 7, dtype=dtype)
    want[run_of == 1] = col[pos_of[run_of == 1]]
    assert np.array_equal(out, want)


def test_gather_found_refuses_positions_outside_the_column():
    col, found = np.zeros(3, dtype=np.int64), np.zeros(1, dtype=np.int64)
    with pytest.raises(IndexError, match="out of range"):
        gather_found(col, found, np.array([3]), 0, np.zeros(1, dtype=np.int64))
    with pytest.raises(IndexError, match="out of range"):
        gather_found(col, found, np.array([-1]), 0, np.zeros(1, dtype=np.int64))


def _numpy_runs(keys: np.ndarray, delta: np.ndarray, before: np.ndarray) -> tuple[np.ndarray, ...]:
    """key_runs and running_positions as registration computed them in numpy."""
    if not len(keys):
        return keys, delta, delta
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    csum = np.cumsum(delta)
    group = np.repeat(np.arange(len(starts)), np.diff(np.r_[starts, len(keys)]))
    offset = csum[starts] - delta[starts]
    return keys[starts], np.add.reduceat(delta, starts), before[group] + csum - offset[group]


@settings(max_examples=300, deadline=None)
@given(keys=st.lists(st.integers(-(1 << 63), (1 << 63) - 1) | st.integers(0, 5), max_size=80), data=st.data())
def test_key_runs_and_running_positions_are_their_numpy(keys, data):
    """Runs of equal keys, any signed key, deltas and starting positions near int64's
    limits (sums wrap as numpy's): the same runs, sums and positions as numpy's passes."""
    k = np.array(sorted(keys), dtype=np.int64)
    big = st.integers(-(1 << 62), 1 << 62)
    delta = np.array(data.draw(st.lists(big, min_size=len(k), max_size=len(k))), dtype=np.int64)
    uniq, sums = key_runs(k, delta)
    before = np.array(data.draw(st.lists(big, min_size=len(uniq), max_size=len(uniq))), dtype=np.int64)
    with np.errstate(over="ignore"):
        want = _numpy_runs(k, delta, before)
    got = (uniq, sums, running_positions(k, delta, before))
    assert all(np.array_equal(g, w) and g.dtype == np.int64 for g, w in zip(got, want, strict=True))


def test_key_runs_and_running_positions_refuse_what_they_cannot_answer():
    one, unsorted = np.ones(2, dtype=np.int64), np.array([2, 1], dtype=np.int64)
    with pytest.raises(ValueError, match="sorted"):
        key_runs(unsorted, one)
    with pytest.raises(ValueError, match="sorted"):
        running_positions(unsorted, one, one)
    with pytest.raises(ValueError, match="more runs"):
        running_positions(np.array([1, 2], dtype=np.int64), one, one[:1])
    with pytest.raises(ValueError, match="fewer runs"):
        running_positions(np.array([1, 1], dtype=np.int64), one, one)


@settings(max_examples=300, deadline=None)
@given(rows=st.lists(st.tuples(st.integers(0, 3), st.integers(-(1 << 31), (1 << 31) - 1)), max_size=30),
       sort=st.booleans())
def test_pairs_sorted_is_the_neighbour_comparison(rows, sort):
    """pairs_sorted equals numpy's comparison of neighbours' differences (in int64, so the
    extremes of int32 cannot wrap), sorted rows or not, equal rows or not; int32 only."""
    rows = sorted(rows) if sort else rows
    major = np.array([r[0] for r in rows], dtype=np.int32)
    minor = np.array([r[1] for r in rows], dtype=np.int32)
    step_major, step_minor = np.diff(major.astype(np.int64)), np.diff(minor.astype(np.int64))
    assert pairs_sorted(major, minor) == bool(((step_major > 0) | ((step_major == 0) & (step_minor >= 0))).all())
    assert pairs_sorted(major, minor) == (rows == sorted(rows))
    with pytest.raises(AssertionError):
        pairs_sorted(major.astype(np.int64), minor.astype(np.int64))
