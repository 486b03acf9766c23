"""Compiled data-plane kernels (numba): loops over rows that no numpy call expresses
without extra passes over memory.

Data model: pure functions of numpy arrays, no state; each writes its answer into an
`out` array the caller allocates, releases the GIL (the commit lane and the reader thread
run meanwhile) and is compiled once per argument types, cached on disk beside this file.

Invariants: every kernel equals a plain numpy expression, named in its docstring, on all
inputs it accepts (tests/test_kernels.py checks each against it), or for the hash table's
(table_find, table_insert) a dict (tests/test_holdings.py).
"""

from __future__ import annotations

import numba
import numpy as np

from settle_arrow.money import RATE_SCALE


@numba.njit(cache=True, nogil=True)
def _lower_bound_in(run, p, lo, hi):  # noqa: ANN001, ANN202 (numba infers the types)
    while lo < hi:
        mid = (lo + hi) >> 1
        if run[mid] < p:
            lo = mid + 1
        else:
            hi = mid
    return lo


@numba.njit(cache=True, nogil=True)
def _find_in_run(run, sample, stride, probe, lo, hi, r, run_of, pos_of):  # noqa: ANN001, ANN202
    # Each probe's search starts where the previous one ended and doubles its step from
    # there: a probe costs O(log gap) reads, all near the last one, instead of a bisection
    # whose every level misses cache. It gallops over the sample (every stride-th key of
    # the run; the run itself when stride is 1), then bisects inside its block of the run.
    m, n = sample.shape[0], run.shape[0]
    j = 0
    for i in range(lo, hi):
        p = probe[i]
        if i > lo and p < probe[i - 1]:
            raise ValueError("probes must be sorted ascending")
        if run_of[i] >= 0:
            continue  # found in an earlier run: keys are unique across runs
        if j < m and sample[j] < p:
            below, step, top = j, 1, j + 1  # sample[below] < p throughout
            while top < m and sample[top] < p:
                below, step = top, 2 * step
                top = below + step
            j = _lower_bound_in(sample, p, below + 1, min(top, m))
        # sample[j - 1] < p <= sample[j]: the key's place lies in ((j - 1) * stride, j * stride].
        first = (j - 1) * stride + 1 if j > 0 else 0
        pos = _lower_bound_in(run, p, first, j * stride if j < m else n)
        if pos < n and run[pos] == p:
            run_of[i] = r
            pos_of[i] = pos


def find_in_run(run: np.ndarray, probe: np.ndarray, lo: int, hi: int, r: int, run_of: np.ndarray,
                pos_of: np.ndarray, sample: np.ndarray | None = None, stride: int = 1) -> None:
    """For each probe i in [lo, hi) with run_of[i] < 0 whose key is in `run`: run_of[i] = r,
    pos_of[i] = its position, i.e. with pos = np.searchsorted(run, probe), where
    run[pos] == probe. Probes sorted ascending (equal ones allowed), run sorted and unique.
    With `sample` = run[::stride] the search goes through the sample: faster when probes
    are sparse in the run (measured, 10 M keys: 20 k probes 6.4 -> 2.6 ms; 200 k probes
    11.6 ms without it, 15.6 with it; numpy's searchsorted 8.4 and 38 ms)."""
    assert run.dtype == probe.dtype, "keys and probes must share a dtype (mixed signs compare wrongly)"
    assert 0 <= lo <= hi <= len(probe) and len(run_of) == len(pos_of) == len(probe)
    assert run_of.dtype == pos_of.dtype == np.int64
    if sample is None:
        sample, stride = run, 1
    assert stride > 0 and len(sample) == -(-len(run) // stride), "sample must be run[::stride]"
    if lo < hi and len(run):
        _find_in_run(run, sample, stride, probe, lo, hi, r, run_of, pos_of)


@numba.njit(cache=True, nogil=True)
def _fees_fen(amount, regime, rates, out):  # noqa: ANN001, ANN202
    for i in range(amount.shape[0]):
        high = amount[i] // RATE_SCALE
        low = amount[i] - high * RATE_SCALE
        g = regime[i]
        for c in range(rates.shape[1]):
            total = 0
            for s in range(rates.shape[2]):
                r = rates[g, c, s]
                if r:
                    total += high * r + (low * r + RATE_SCALE // 2) // RATE_SCALE
            out[c, i] = total


def fees_fen(amount: np.ndarray, regime: np.ndarray, rates: np.ndarray) -> np.ndarray:
    """out[c, i] = sum over s of money.fee_fen(amount[i], rates[regime[i], c, s]): each fee
    row's fee rounded on its own, then added (DOMAIN §4), for every fee column in one pass
    over the trades where numpy makes one pass per column and slot, each with temporaries
    (measured, 100,000 trades, 8 columns: 6 against 19 ms). amount in [0, 10^15] fen, rates in
    [0, RATE_SCALE] units, regime indexing rates' first axis."""
    assert amount.dtype == regime.dtype == rates.dtype == np.int64 and rates.ndim == 3
    assert len(amount) == len(regime)
    assert not len(amount) or (0 <= amount.min() and amount.max() <= 10**15), "amount out of range"
    assert not rates.size or (0 <= rates.min() and rates.max() <= RATE_SCALE), "rate out of range"
    assert not len(regime) or (0 <= regime.min() and regime.max() < len(rates)), "regime out of range"
    out = np.empty((rates.shape[1], len(amount)), dtype=np.int64)
    if len(amount):
        _fees_fen(amount, regime, rates, out)
    return out


@numba.njit(cache=True, nogil=True)
def _probe_slots(slots, hashes, mask, out):  # noqa: ANN001, ANN202
    n = slots.shape[0]
    for i in range(hashes.shape[0]):
        h = hashes[i]
        s = np.int64(h & mask)
        while s < n:
            seen = slots[s, 0]
            if seen == h:
                out[i] = np.int64(slots[s, 1])
                break
            if seen == 0:
                break
            s += 1


def probe_slots(slots: np.ndarray, hashes: np.ndarray, mask: np.uint64) -> np.ndarray:
    """out[i] = the id stored beside hashes[i] in `slots`, -1 where absent: a linear-probing
    table of (hash, id) rows, each hash placed at or after its home slot hash & mask with no
    empty slot between (0 marks one; hashes are odd), padded so no probe runs off the end.
    As numpy: slots[home + k] for k = 0, 1, ... until the hash or an empty slot turns up,
    one fancy-indexing pass per k over the keys still pending: ten passes at a million
    entries (measured, 200,000 account ids: StringIndex.lookup 12.6 -> 8.3 ms)."""
    assert slots.dtype == hashes.dtype == np.uint64 and slots.ndim == 2 and slots.shape[1] == 2
    assert not len(hashes) or bool((hashes & np.uint64(1)).all()), "hashes must be odd (0 marks an empty slot)"
    out = np.full(len(hashes), -1, dtype=np.int64)
    if len(hashes) and len(slots):
        _probe_slots(slots, hashes, np.uint64(mask), out)
    return out


# Fibonacci hashing: the key times 2^64 / golden ratio spreads consecutive keys (one
# account's securities) over the whole table; its top 32 bits, scaled to the capacity by a
# multiply and a shift, pick the home slot of any capacity below 2^32 (no power of two, so
# the table grows by the size it needs, not by doubling).
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


@numba.njit(cache=True, nogil=True)
def _home(key, capacity):  # noqa: ANN001, ANN202
    h = (np.uint64(key) * _GOLDEN) >> np.uint64(32)
    return np.int64((h * np.uint64(capacity)) >> np.uint64(32))


# table_find reads the home slots of this many probes before it resolves any: loads with
# no branch between them overlap in memory, where a probe whose branches wait on its slot
# stalls the next (measured, 200,000 probes of a 10 M-key table: 26-30 -> 15-16 ms).
_PROBE_GROUP = 16


@numba.njit(cache=True, nogil=True)
def _table_find(slot_keys, slot_values, empty, keys, slot_out, value_out):  # noqa: ANN001, ANN202
    cap = slot_keys.shape[0]
    n = keys.shape[0]
    home = np.empty(_PROBE_GROUP, dtype=np.int64)
    first = np.empty(_PROBE_GROUP, dtype=np.int64)
    touched = slot_values[0]
    for g in range(0, n, _PROBE_GROUP):
        m = min(n - g, _PROBE_GROUP)
        for j in range(m):
            s = _home(keys[g + j], cap)
            home[j] = s
            first[j] = np.int64(slot_keys[s])
            touched += slot_values[s]  # its line too (a hit reads it), kept so no compiler drops the load
        for j in range(m):
            i = g + j
            k, s, t = keys[i], home[j], first[j]
            while t != k and t != empty:
                s += 1
                if s == cap:
                    s = 0
                t = np.int64(slot_keys[s])
            if t == k:
                slot_out[i] = s
                value_out[i] = slot_values[s]
            else:
                slot_out[i] = -1 - s
                value_out[i] = 0
    return touched


def table_find(slot_keys: np.ndarray, slot_values: np.ndarray, empty: int, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(slot, value) of each key in a linear-probing table (keys at or after their home
    slot, _home, with no empty slot between; `empty` marks a free slot): slot >= 0 where
    found, else -1 - the free slot its probe ended on (where an insert of it may start);
    value 0 where absent. As Python: a dict lookup, d.get(key, 0). Keys in [0, empty) for
    unsigned slot keys, >= 0 for signed ones (empty = -1); the table has a free slot."""
    assert keys.dtype == np.int64 and len(slot_keys) == len(slot_values) and 0 < len(slot_keys) < 1 << 32
    slot_out = np.empty(len(keys), dtype=np.int64)
    value_out = np.empty(len(keys), dtype=slot_values.dtype)
    if len(keys):
        _table_find(slot_keys, slot_values, empty, keys, slot_out, value_out)
    return slot_out, value_out


@numba.njit(cache=True, nogil=True)
def _table_insert(slot_keys, slot_values, empty, keys, values, start):  # noqa: ANN001, ANN202
    cap = slot_keys.shape[0]
    from_home = start.shape[0] == 0
    for i in range(keys.shape[0]):
        k = keys[i]
        s = _home(k, cap) if from_home or start[i] < 0 else start[i]
        while True:
            t = np.int64(slot_keys[s])
            if t == empty:
                slot_keys[s] = k
                slot_values[s] = values[i]
                break
            if t == k:
                raise ValueError("key already in the table")
            s += 1
            if s == cap:
                s = 0


def table_insert(slot_keys: np.ndarray, slot_values: np.ndarray, empty: int, keys: np.ndarray, values: np.ndarray,
                 start: np.ndarray | None = None) -> None:
    """Put absent, distinct `keys` with their `values` into the table table_find reads
    (as Python: d[key] = value for keys not in d; ValueError for a key present). Each
    probe starts at start[i] where >= 0 (a free slot table_find ended on for that key: the
    slots from its home to there hold other keys, as they still do), else at its home;
    every probe at its home where `start` is None (an insert of ten million opening
    positions then fills no 80 MB array of -1 first). Keys int64, or uint32 as a narrow
    table holds them (a rehash moves them so). The caller leaves room: at least one slot
    stays free."""
    start = np.empty(0, dtype=np.int64) if start is None else start  # empty: from home (_table_insert)
    assert keys.dtype in (np.int64, np.uint32) and len(keys) == len(values) and start.dtype == np.int64
    assert len(start) in (0, len(keys)) and len(slot_keys) == len(slot_values) and 0 < len(slot_keys) < 1 << 32
    if len(keys):
        _table_insert(slot_keys, slot_values, empty, keys, values, start)


@numba.njit(cache=True, nogil=True)
def _table_add(slot_values, slots, delta, missed):  # noqa: ANN001, ANN202
    n_missed = 0
    for i in range(slots.shape[0]):
        s = slots[i]
        if s >= 0:
            slot_values[s] += delta[i]
        else:
            missed[n_missed] = i
            n_missed += 1
    return n_missed


def table_add(slot_values: np.ndarray, slots: np.ndarray, delta: np.ndarray) -> np.ndarray:
    """slot_values[slots[i]] += delta[i] where slots[i] >= 0 (distinct slots, as
    table_find answers for distinct keys); the positions i of the others (slot < 0), in
    order. As numpy: a fancy-index add of the hits, whose mask, gather, add and scatter
    each pass over them (a 100,000-trade window's 198,000 keys, 10 M positions held: 6.8
    -> 2.2 ms, measured)."""
    assert slots.dtype == delta.dtype == np.int64 and len(slots) == len(delta)
    missed = np.empty(len(slots), dtype=np.int64)
    return missed[:_table_add(slot_values, slots, delta, missed)]


@numba.njit(cache=True, nogil=True)
def _key_runs(keys, delta, uniq, sums):  # noqa: ANN001, ANN202
    g = -1
    for i in range(keys.shape[0]):
        if i == 0 or keys[i] != keys[i - 1]:
            if i > 0 and keys[i] < keys[i - 1]:
                raise ValueError("keys must be sorted ascending")
            g += 1
            uniq[g] = keys[i]
            sums[g] = 0
        sums[g] += delta[i]
    return g + 1


def key_runs(keys: np.ndarray, delta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the key of each run of equal keys, the sum of its deltas) over sorted `keys`
    (ValueError for unsorted ones). As numpy: starts = np.flatnonzero(np.r_[True, keys[1:]
    != keys[:-1]]); keys[starts], np.add.reduceat(delta, starts): a comparison, a mask, two
    gathers and a reduceat that each pass over the keys. int64 sums wrap as numpy's do."""
    assert keys.dtype == delta.dtype == np.int64 and len(keys) == len(delta)
    uniq, sums = np.empty(len(keys), dtype=np.int64), np.empty(len(keys), dtype=np.int64)
    runs = _key_runs(keys, delta, uniq, sums)
    return uniq[:runs], sums[:runs]


@numba.njit(cache=True, nogil=True)
def _running_positions(keys, delta, before, out):  # noqa: ANN001, ANN202
    g = -1
    position = 0
    for i in range(keys.shape[0]):
        if i == 0 or keys[i] != keys[i - 1]:
            if i > 0 and keys[i] < keys[i - 1]:
                raise ValueError("keys must be sorted ascending")
            g += 1
            if g == before.shape[0]:
                raise ValueError("more runs than starting positions")
            position = before[g]
        position += delta[i]
        out[i] = position
    return g + 1


def running_positions(keys: np.ndarray, delta: np.ndarray, before: np.ndarray) -> np.ndarray:
    """The position after each entry of sorted `keys`: the run's starting position
    (before[r] for the r-th run of equal keys) plus the deltas of the run up to and
    including this entry (ValueError for unsorted keys or a count of runs other than
    len(before)). As numpy: a cumsum of the deltas, less the cumsum at each run's
    start, plus before repeated over each run (a repeat, two gathers and three passes)."""
    assert keys.dtype == delta.dtype == before.dtype == np.int64 and len(keys) == len(delta)
    out = np.empty(len(keys), dtype=np.int64)
    if _running_positions(keys, delta, before, out) != len(before):
        raise ValueError("fewer runs than starting positions")
    return out


@numba.njit(cache=True, nogil=True)
def _dense_ranks(buy_key, sell_key, rank, keys_out, buy_rank, sell_rank):  # noqa: ANN001, ANN202
    for i in range(buy_key.shape[0]):
        rank[buy_key[i]] = 1
        rank[sell_key[i]] = 1
    g = 0
    for k in range(rank.shape[0]):
        if rank[k]:
            keys_out[g] = k
            g += 1
            rank[k] = g
    for i in range(buy_key.shape[0]):
        buy_rank[i] = rank[buy_key[i]] - 1
        sell_rank[i] = rank[sell_key[i]] - 1
    return g


def dense_ranks(buy_key: np.ndarray, sell_key: np.ndarray, span: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rank of each buy key, of each sell key, the distinct keys): a key's rank is its
    position among the distinct keys of both, ascending. As numpy: keys, inverse =
    np.unique(np.concatenate([buy_key, sell_key]), return_inverse=True), whose sort of the
    2n keys costs more than two passes over them and one over a mark per possible key
    0..span-1, 4 bytes each (netting in a slot per possible key and column, 32 bytes a key,
    took 3.7 ms for a ten-window group's 800,000 possible keys, against 1.2 ms through
    these ranks, measured)."""
    assert buy_key.dtype == sell_key.dtype == np.int64 and len(buy_key) == len(sell_key)
    assert not len(buy_key) or (0 <= min(buy_key.min(), sell_key.min())
                                and max(buy_key.max(), sell_key.max()) < span), "key out of range"
    assert span < 1 << 31, "ranks are int32 marks"
    rank = np.zeros(span, dtype=np.int32)
    keys = np.empty(min(span, 2 * len(buy_key)), dtype=np.int64)
    buy_rank, sell_rank = np.empty(len(buy_key), dtype=np.int64), np.empty(len(sell_key), dtype=np.int64)
    g = _dense_ranks(buy_key, sell_key, rank, keys, buy_rank, sell_rank) if len(buy_key) else 0
    return buy_rank, sell_rank, keys[:g]


@numba.njit(cache=True, nogil=True)
def _net_quantities(buy_group, sell_group, quantity, out):  # noqa: ANN001, ANN202
    for i in range(quantity.shape[0]):
        q = quantity[i]
        b = buy_group[i]
        out[0, b] += q
        out[1, b] += q
        s = sell_group[i]
        out[0, s] -= q
        out[2, s] += q


def net_quantities(buy_group: np.ndarray, sell_group: np.ndarray, quantity: np.ndarray,
                   groups: int) -> np.ndarray:
    """Securities netting of trades whose legs fall in dense groups 0..groups-1: out[:, g] =
    (net, bought, sold) over the buy legs (+quantity, bought) and sell legs (-quantity, sold)
    in group g (the groups in use come from dense_ranks, so no leg count marks them). As numpy: np.add.at of each leg's contribution, one call per column
    (the engine's alternative, a hash group-by of the 2n legs, cost 9.7 ms at 100,000
    trades, measured). int64 sums wrap as numpy's do; callers bound them."""
    assert buy_group.dtype == sell_group.dtype == quantity.dtype == np.int64
    assert len(buy_group) == len(sell_group) == len(quantity)
    assert not len(quantity) or (0 <= min(buy_group.min(), sell_group.min())
                                 and max(buy_group.max(), sell_group.max()) < groups), "group out of range"
    out = np.zeros((3, groups), dtype=np.int64)
    if len(quantity):
        _net_quantities(buy_group, sell_group, quantity, out)
    return out


@numba.njit(cache=True, nogil=True)
def _net_cash(buy_group, sell_group, amount, buy_fees, sell_fees, out):  # noqa: ANN001, ANN202
    fees = out.shape[0] - 3
    for i in range(amount.shape[0]):
        a = amount[i]
        b = buy_group[i]
        s = sell_group[i]
        paid = 0
        got = 0
        for f in range(fees):
            out[3 + f, b] += buy_fees[f, i]
            paid += buy_fees[f, i]
            out[3 + f, s] += sell_fees[f, i]
            got += sell_fees[f, i]
        out[0, b] += -a - paid
        out[1, b] += a
        out[0, s] += a - got
        out[2, s] += a


def net_cash(buy_group: np.ndarray, sell_group: np.ndarray, amount: np.ndarray, buy_fees: np.ndarray,
             sell_fees: np.ndarray, groups: int) -> np.ndarray:
    """Cash netting of trades whose legs fall in dense groups 0..groups-1: out[:, g] = (net,
    bought, sold, each fee column) over the buy legs (net -amount - their fees, bought
    amount) and the sell legs (net amount - their fees, sold amount) in group g, fees[f, i]
    the f-th fee of trade i on that side. As numpy: np.add.at of each leg's contribution,
    one call per column. int64 sums wrap: callers bound |amount| + its fees times the legs
    below 2^63."""
    assert buy_group.dtype == sell_group.dtype == amount.dtype == buy_fees.dtype == sell_fees.dtype == np.int64
    assert len(buy_group) == len(sell_group) == len(amount) == buy_fees.shape[1] == sell_fees.shape[1]
    assert buy_fees.shape[0] == sell_fees.shape[0]
    assert not len(amount) or (0 <= min(buy_group.min(), sell_group.min())
                               and max(buy_group.max(), sell_group.max()) < groups), "group out of range"
    out = np.zeros((3 + buy_fees.shape[0], groups), dtype=np.int64)
    if len(amount):
        _net_cash(buy_group, sell_group, amount, buy_fees, sell_fees, out)
    return out


@numba.njit(cache=True, nogil=True)
def _pairs_sorted(major, minor):  # noqa: ANN001, ANN202
    for i in range(1, major.shape[0]):
        if major[i] < major[i - 1] or (major[i] == major[i - 1] and minor[i] < minor[i - 1]):
            return False
    return True


def pairs_sorted(major: np.ndarray, minor: np.ndarray) -> bool:
    """Whether the rows (major[i], minor[i]) come in ascending order. As numpy:
    ((np.diff(major) > 0) | ((np.diff(major) == 0) & (np.diff(minor) >= 0))).all(), whose
    differences and masks are five temporaries (ten million int32 rows: ~130 MB of fresh
    memory and 0.03-0.1 s, twice a start) where this reads each row once and stops at the
    first row out of order. int32 columns, as holdings' dimension ids are."""
    assert major.dtype == minor.dtype == np.int32 and len(major) == len(minor)
    return bool(_pairs_sorted(major, minor))


@numba.njit(cache=True, nogil=True)
def _in_column(p, n):  # noqa: ANN001, ANN202
    if p < 0 or p >= n:
        raise IndexError("position out of range")
    return p


@numba.njit(cache=True, nogil=True)
def _gather_found(column, run_of, pos_of, r, out):  # noqa: ANN001, ANN202
    for i in range(run_of.shape[0]):
        if run_of[i] == r:
            out[i] = column[_in_column(pos_of[i], column.shape[0])]


def gather_found(column: np.ndarray, run_of: np.ndarray, pos_of: np.ndarray, r: int, out: np.ndarray) -> None:
    """out[i] = column[pos_of[i]] where run_of[i] == r: as numpy, sel = run_of == r;
    out[sel] = column[pos_of[sel]], whose mask and index temporaries cost more than the
    gather (200,000 positions of a 10 M-row run: 5.3 -> 1.9 ms, measured). IndexError for a
    selected position outside the column."""
    assert len(run_of) == len(pos_of) == len(out) and column.dtype == out.dtype
    assert run_of.dtype == pos_of.dtype == np.int64
    _gather_found(column, run_of, pos_of, r, out)


def _flagged(a: np.ndarray, writable: bool) -> np.ndarray:
    a.flags.writeable = writable
    return a


def warm() -> None:
    """Load every kernel for each argument type the engine passes (signed holding keys,
    unsigned trade keys, writable or spilled read-only runs, probes and columns that
    Polars hands over read-only): each loads once, from the on-disk cache or compiled on a
    first run, so no window waits on a compile (tests/test_kernels.py replays to check)."""
    zeros = np.zeros(1, dtype=np.int64)
    for dtype in (np.int64, np.uint64):
        for run_writable in (True, False):
            for probe_writable in (True, False):
                run = _flagged(np.arange(4, dtype=dtype), run_writable)
                probe = _flagged(np.arange(2, dtype=dtype), probe_writable)
                for sample, stride in ((None, 1), (run[::2].copy(), 2)):
                    find_in_run(run, probe, 0, 2, 0, np.full(2, -1, dtype=np.int64), np.zeros(2, dtype=np.int64),
                                sample, stride)
    fees_fen(zeros, zeros, np.zeros((1, 1, 1), dtype=np.int64))
    probe_slots(np.zeros((2, 2), dtype=np.uint64), np.ones(1, dtype=np.uint64), np.uint64(1))
    for dtype in (np.int32, np.int64):  # payload columns (state.ACCEPTED_PAYLOAD)
        for writable in (True, False):  # spilled runs are mapped read-only
            gather_found(_flagged(np.zeros(1, dtype=dtype), writable), zeros, zeros, 0, np.zeros(1, dtype=dtype))
    for writable in (True, False):  # quantities and amounts straight from Polars are read-only
        values = _flagged(np.zeros(1, dtype=np.int64), writable)
        key_runs(values, values)
        running_positions(values, values, values)
        net_quantities(zeros, zeros, values, 1)
        dense_ranks(values, values, 1)
        net_cash(zeros, zeros, values, *(np.zeros((1, 1), dtype=np.int64),) * 2, 1)
    for writable in (True, False):  # holdings' dimension ids, from Polars or Arrow (read-only)
        ids = _flagged(np.zeros(2, dtype=np.int32), writable)
        pairs_sorted(ids, ids)
    for key_type, empty in ((np.uint32, (1 << 32) - 1), (np.int64, -1)):  # holdings.HoldingsTable narrow, wide
        for keys_writable in (True, False):  # probes, and opening quantities, may come from Polars read-only
            keys = _flagged(np.zeros(1, dtype=np.int64), keys_writable)
            table_find(np.full(4, empty, dtype=key_type), np.zeros(4, dtype=np.int64), empty, keys)
            table_add(np.zeros(4, dtype=np.int64), np.zeros(1, dtype=np.int64), keys)  # deltas, as probes
            for values_writable in (True, False):
                values = _flagged(np.zeros(1, dtype=np.int64), values_writable)
                for k in (keys, np.zeros(1, dtype=np.uint32)):  # uint32: a rehash's keys, as a narrow table held them
                    table_insert(np.full(4, empty, dtype=key_type), np.zeros(4, dtype=np.int64), empty, k, values,
                                 np.full(1, -1, dtype=np.int64))
