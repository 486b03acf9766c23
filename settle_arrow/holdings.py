"""The holdings state between windows: one open-addressing hash table of positions.

Data model:
  HoldingsTable  holding key (state.holding_keys: acct_idx * n_sec + sec_idx, >= 0) ->
                 quantity (int64), in two parallel slot arrays probed linearly from each
                 key's home slot (kernels.table_find). Keys are uint32 while every key fits
                 below UINT32_EMPTY (a million accounts times 2,000 securities do), else
                 int64; a free slot holds the key type's EMPTY. A position back at zero
                 stays (it reads 0 like an absent one): nothing is ever deleted.

Invariants: keys unique; len <= LOAD_MAX * capacity, so every probe ends (a slot stays
free); `version` changes with every change, and slots found at one version stay valid
until the next.

Why a hash table, not sorted runs: registration probes ~2 keys per trade, spread over
every account, and creates ~0.8 new positions per trade. Sorted runs cost two cache misses
a probe in the 10 M-key base run and more in the runs of new positions, and merge those
runs as they grow (~50 ms a 100,000-trade window, measured); a probe here is about one
miss and a new position one store, with no merges. Memory: 12 bytes a slot with uint32
keys, at most twice the keys' count (the sorted runs held 16 bytes a key, and twice a run
while merging it).
"""

from __future__ import annotations

import numpy as np

UINT32_EMPTY = (1 << 32) - 1
INT64_EMPTY = -1
# Grown when an insert would fill more than LOAD_MAX of the slots, to LOAD_AFTER_GROWTH
# (a linear probe's expected length for an absent key is ~(1 + 1 / (1 - load)^2) / 2
# slots: 8.5 at 0.75, 2.5 at 0.5; 4-byte keys put 16 slots in a cache line).
LOAD_MAX = 0.75
LOAD_AFTER_GROWTH = 0.5
CAPACITY_MIN = 1024
# kernels._home scales 32 hash bits to the capacity.
CAPACITY_MAX = (1 << 32) - 1


class HoldingsTable:
    def __init__(self) -> None:
        self._keys = np.full(CAPACITY_MIN, UINT32_EMPTY, dtype=np.uint32)
        self._quantity = np.zeros(CAPACITY_MIN, dtype=np.int64)
        self._empty = UINT32_EMPTY
        self._count = 0
        self.version = 0

    def __len__(self) -> int:
        return self._count

    @property
    def capacity(self) -> int:
        return len(self._keys)

    def items(self) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(keys in key order, {"quantity": theirs}), as SortedRuns.items: a full scan, for checks."""
        held = self._keys != self._empty
        keys, quantity = self._keys[held].astype(np.int64), self._quantity[held]
        order = np.argsort(keys)
        return keys[order], {"quantity": quantity[order]}

    def positions(self) -> tuple[np.ndarray, np.ndarray]:
        """(keys, quantities) of every non-zero position, in slot order (none a caller may
        rely on), keys as the table holds them (uint32 or int64: 12 bytes a position while
        narrow): copies, so the table may change while a commit writes them."""
        # A free slot's quantity is 0 (slots start at 0 and nothing is deleted), so one
        # comparison over the quantities finds the held non-zero positions.
        held = self._quantity != 0
        return self._keys[held], self._quantity[held]

    def find(self, keys: np.ndarray) -> tuple[np.ndarray, tuple[int, np.ndarray]]:
        """Quantity held at each key (0 where none), and where each was found (slot >= 0)
        or would go (-1 - free slot), which `add` may reuse at this version."""
        from settle_arrow.kernels import table_find  # numba loads in the background (kernel_loader)

        keys = self._checked(keys)
        if self._empty == UINT32_EMPTY and len(keys) and int(keys.max()) >= UINT32_EMPTY:
            # Keys this narrow table cannot hold are absent (their insert widens it, and
            # probes from home then: their free slot here is never used).
            narrow = keys < UINT32_EMPTY
            slots, quantity = np.full(len(keys), -1, dtype=np.int64), np.zeros(len(keys), dtype=np.int64)
            slots[narrow], quantity[narrow] = table_find(self._keys, self._quantity, self._empty, keys[narrow])
        else:
            slots, quantity = table_find(self._keys, self._quantity, self._empty, keys)
        return quantity, (self.version, slots)

    def add(self, keys: np.ndarray, delta: np.ndarray, found: tuple[int, np.ndarray] | None = None) -> None:
        """quantity[key] += delta for distinct `keys`, a new position where none is held;
        `found` is find's answer for these keys, used while this table has not changed."""
        from settle_arrow.kernels import table_add

        keys = self._checked(keys)
        delta = np.asarray(delta, dtype=np.int64)
        assert len(delta) == len(keys)
        slots = found[1] if found is not None and found[0] == self.version else self.find(keys)[1][1]
        assert len(slots) == len(keys), "found answers other keys"
        self.version += 1
        # Distinct keys, so distinct slots: each hit adds into a slot of its own.
        new = table_add(self._quantity, slots, delta)
        if len(new):
            self._insert(keys[new], delta[new], -1 - slots[new])

    def insert(self, keys: np.ndarray, quantity: np.ndarray) -> None:
        """Add positions for distinct keys not held yet (ValueError for one held: a caller's bug,
        after which the table is not to be used)."""
        keys = self._checked(keys)
        self.version += 1
        self._insert(keys, np.asarray(quantity, dtype=np.int64), None)

    def _insert(self, keys: np.ndarray, quantity: np.ndarray, start: np.ndarray | None) -> None:
        """table_insert with room made first; `start` as table_insert's (None: from home)."""
        from settle_arrow.kernels import table_insert

        if not len(keys):
            return
        wide = int(keys.max()) >= UINT32_EMPTY and self._empty == UINT32_EMPTY
        if wide or self._count + len(keys) > LOAD_MAX * self.capacity:
            # Slots move, so the free slots found before (start) no longer hold.
            self._rehash(self._count + len(keys), np.int64 if wide else self._keys.dtype)
            start = None
        table_insert(self._keys, self._quantity, self._empty, keys, quantity, start)
        self._count += len(keys)

    def _rehash(self, count: int, key_type: type) -> None:
        """Move every position into new slot arrays sized for `count` keys at LOAD_AFTER_GROWTH."""
        from settle_arrow.kernels import table_insert

        capacity = max(CAPACITY_MIN, int(count / LOAD_AFTER_GROWTH) + 1)
        if capacity > CAPACITY_MAX:
            raise MemoryError(f"{count} holdings exceed the table's {CAPACITY_MAX} slots")
        held = self._keys != self._empty
        # Keys in the old table's own width, and the old arrays dropped before the new ones
        # are made: the peak holds the new table and 12 bytes a position (16 with wide
        # keys), e.g. 36 bytes a position growing from LOAD_MAX to LOAD_AFTER_GROWTH.
        keys, quantity = self._keys[held], self._quantity[held]
        del held
        self._empty = UINT32_EMPTY if key_type == np.uint32 else INT64_EMPTY
        self._keys = self._quantity = None  # type: ignore[assignment]
        self._keys = np.full(capacity, self._empty, dtype=key_type)
        self._quantity = np.zeros(capacity, dtype=np.int64)
        table_insert(self._keys, self._quantity, self._empty, keys, quantity)
        assert int((self._keys != self._empty).sum()) == self._count, "a rehash lost or duplicated a position"

    @staticmethod
    def _checked(keys: np.ndarray) -> np.ndarray:
        keys = np.asarray(keys, dtype=np.int64)
        assert not len(keys) or int(keys.min()) >= 0, "holding keys are non-negative"
        return keys
