"""HoldingsTable (holdings.py) and its kernels (kernels.table_find, table_insert) against
a dict: any sequence of adds and inserts, through growth and the widening past 32-bit
keys, finds exactly what the dict holds; a stale `found` is not trusted; a key put in
twice is refused."""

from __future__ import annotations

from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from settle_arrow import holdings
from settle_arrow.holdings import INT64_EMPTY, UINT32_EMPTY, HoldingsTable
from settle_arrow.kernels import table_add, table_find, table_insert

# Narrow keys near the top of uint32 as well as small ones: a key hashing to the last
# slot wraps round to slot 0.
narrow_keys = st.one_of(st.integers(0, 300), st.integers(UINT32_EMPTY - 40, UINT32_EMPTY - 1))
wide_keys = st.one_of(narrow_keys, st.integers(UINT32_EMPTY, (1 << 63) - 1))


@settings(max_examples=300, deadline=None)
@given(data=st.data(), wide=st.booleans(), spare=st.integers(1, 8))
def test_table_kernels_behave_as_a_dict(data, wide, spare):
    """table_insert then table_find equal d[key] = value then d.get(key, 0), whether every
    probe starts at its home by start=None or by start=-1; a probe of an absent key ends on
    a free slot, from which its insert lands there."""
    keys = data.draw(st.lists(wide_keys if wide else narrow_keys, unique=True, max_size=40))
    empty, key_type = (INT64_EMPTY, np.int64) if wide else (UINT32_EMPTY, np.uint32)
    slot_keys = np.full(len(keys) + spare, empty, dtype=key_type)
    slot_values = np.zeros(len(slot_keys), dtype=np.int64)
    cut = data.draw(st.integers(0, len(keys)))
    held = {k: data.draw(st.integers(-(1 << 62), 1 << 62)) for k in keys[:cut]}
    put = np.array(list(held), dtype=np.int64)
    start = None if data.draw(st.booleans()) else np.full(len(put), -1, dtype=np.int64)
    table_insert(slot_keys, slot_values, empty, put, np.array(list(held.values()), dtype=np.int64), start)
    probe = np.array(keys, dtype=np.int64)
    slots, values = table_find(slot_keys, slot_values, empty, probe)
    assert values.tolist() == [held.get(k, 0) for k in keys]
    assert ((slots >= 0) == np.array([k in held for k in keys], dtype=bool)).all()
    assert (slot_keys[slots[slots >= 0]].astype(np.int64) == probe[slots >= 0]).all()
    free = -1 - slots[slots < 0]
    assert (slot_keys[free] == key_type(empty)).all()
    # The rest go in from where their probes ended: one at a time, since each insert may
    # take the free slot another's probe ended on.
    for k in keys[cut:]:
        (slot,), _ = table_find(slot_keys, slot_values, empty, np.array([k], dtype=np.int64))
        table_insert(slot_keys, slot_values, empty, np.array([k], dtype=np.int64), np.array([k % 7], dtype=np.int64),
                     np.array([-1 - slot], dtype=np.int64))
        held[k] = k % 7
    _, values = table_find(slot_keys, slot_values, empty, probe)
    assert values.tolist() == [held[k] for k in keys]
    if keys:
        with pytest.raises(ValueError, match="already"):
            table_insert(slot_keys, slot_values, empty, probe[:1], np.zeros(1, dtype=np.int64))


@settings(max_examples=300, deadline=None)
@given(data=st.data(), capacity=st.integers(1, 30))
def test_table_add_is_a_fancy_index_add_of_the_hits(data, capacity):
    """table_add adds each found slot's delta in place and answers the positions of the
    probes not found (slot < 0: -1 - a free slot), in order, as numpy's masked add."""
    hits = data.draw(st.lists(st.integers(0, capacity - 1), unique=True, max_size=capacity))
    misses = data.draw(st.lists(st.integers(-capacity, -1), max_size=20))
    slots = np.array(data.draw(st.permutations(hits + misses)), dtype=np.int64)
    delta = np.array(data.draw(st.lists(st.integers(-(1 << 40), 1 << 40), min_size=len(slots), max_size=len(slots))),
                     dtype=np.int64)
    values = np.array(data.draw(st.lists(st.integers(-(1 << 40), 1 << 40), min_size=capacity, max_size=capacity)),
                      dtype=np.int64)
    expected = values.copy()
    found = slots >= 0
    expected[slots[found]] += delta[found]
    missed = table_add(values, slots, delta)
    assert values.tolist() == expected.tolist()
    assert missed.tolist() == np.flatnonzero(~found).tolist()


steps = st.lists(st.tuples(st.sampled_from(["add", "add_found", "add_stale", "insert"]),
                           st.lists(st.tuples(wide_keys, st.integers(-1000, 1000)), max_size=30)), max_size=12)


@settings(max_examples=200, deadline=None)
@given(steps=steps, probe=st.lists(wide_keys, max_size=40))
def test_holdings_table_behaves_as_a_dict(steps, probe):
    """Adds (with find's answer, a stale one or none) and inserts of new keys, from a tiny
    table so that it grows, and widens where a key reaches UINT32_EMPTY."""
    with mock.patch.object(holdings, "CAPACITY_MIN", 2):
        table = HoldingsTable()
    oracle: dict[int, int] = {}
    for op, pairs in steps:
        pairs = list(dict(pairs).items())  # distinct keys, as the callers pass
        keys = np.array([k for k, _ in pairs], dtype=np.int64)
        delta = np.array([d for _, d in pairs], dtype=np.int64)
        if op == "insert":
            new = [(k, d) for k, d in pairs if k not in oracle]
            if len(new) < len(pairs):
                with pytest.raises(ValueError, match="already"):
                    table.insert(keys, delta)
                # A refused insert may have placed the keys before the held one: start again.
                table = _rebuilt(oracle)
                continue
            table.insert(keys, delta)
            oracle.update(new)
            continue
        found = None
        if op == "add_found":
            found = table.find(keys)[1]
        elif op == "add_stale":
            found = table.find(keys)[1]
            # Enough new positions to grow the table: every slot found before moves.
            filler = np.arange(1_000_000, 1_000_000 + table.capacity, dtype=np.int64)
            table.add(filler, np.ones(len(filler), dtype=np.int64))
            for k in filler.tolist():
                oracle[k] = oracle.get(k, 0) + 1
        table.add(keys, delta, found)
        for k, d in pairs:
            oracle[k] = oracle.get(k, 0) + d
        assert len(table) == len(oracle) and len(table) <= holdings.LOAD_MAX * table.capacity
    quantity, (_, slots) = table.find(np.array(probe, dtype=np.int64))
    assert quantity.tolist() == [oracle.get(k, 0) for k in probe]
    assert ((slots >= 0).tolist() == [k in oracle for k in probe]) or max(probe, default=0) >= UINT32_EMPTY
    keys, payload = table.items()
    assert keys.tolist() == sorted(oracle) and payload["quantity"].tolist() == [oracle[k] for k in sorted(oracle)]
    held, quantity = table.positions()
    assert len(set(held.tolist())) == len(held)
    assert dict(zip(held.tolist(), quantity.tolist(), strict=True)) == {k: q for k, q in oracle.items() if q}
    if any(k >= UINT32_EMPTY for k in oracle):
        assert table._empty == INT64_EMPTY


def _rebuilt(oracle: dict[int, int]) -> HoldingsTable:
    table = HoldingsTable()
    table.insert(np.array(list(oracle), dtype=np.int64), np.array(list(oracle.values()), dtype=np.int64))
    return table


def test_growth_keeps_the_load_bounded_and_the_positions():
    """Ten thousand new positions a window, for twenty windows: the table grows at
    LOAD_MAX, to LOAD_AFTER_GROWTH, and holds every position's running sum."""
    rng = np.random.default_rng(4)
    table, oracle_keys, oracle_qty = HoldingsTable(), np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
    for _ in range(20):
        keys = np.unique(rng.integers(0, 2_000_000_000, 10_000, dtype=np.int64))
        delta = rng.integers(-5, 5, len(keys), dtype=np.int64)
        table.add(keys, delta, table.find(keys)[1])
        oracle_keys, at = np.unique(np.concatenate([oracle_keys, keys]), return_inverse=True)
        oracle_qty = _summed(at, np.concatenate([oracle_qty, delta]), len(oracle_keys))
        assert len(table) == len(oracle_keys) and len(table) <= holdings.LOAD_MAX * table.capacity
    keys, payload = table.items()
    assert (keys == oracle_keys).all() and (payload["quantity"] == oracle_qty).all()


def test_positions_are_a_copy_the_table_does_not_change():
    """The engine hands positions() to the commit lane while later windows change the table."""
    table = HoldingsTable()
    table.insert(np.array([3, 5, 8], dtype=np.int64), np.array([1, 0, -2], dtype=np.int64))
    keys, quantity = table.positions()
    # Grown and changed after: the copy still says what the table held when taken.
    table.add(np.arange(10, 5000, dtype=np.int64), np.ones(4990, dtype=np.int64))
    table.add(np.array([3, 5], dtype=np.int64), np.array([6, 7], dtype=np.int64))
    assert sorted(zip(keys.tolist(), quantity.tolist(), strict=True)) == [(3, 1), (8, -2)]


def _summed(at: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
    out = np.zeros(n, dtype=np.int64)
    np.add.at(out, at, values)
    return out


def test_negative_keys_are_refused():
    with pytest.raises(AssertionError, match="non-negative"):
        HoldingsTable().add(np.array([-1], dtype=np.int64), np.array([1], dtype=np.int64))
