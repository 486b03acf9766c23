"""Keyed in-memory state kept between windows: sorted runs of integer keys (a small LSM).

Data model:
  SortedRuns   key (int64/uint64) -> optional payload columns (numpy arrays), keys unique
               across runs; each run sorted; run sizes shrink geometrically so a lookup
               costs O(log n) searchsorted calls and an insert is amortised O(log n).
  EngineState  everything a window needs to know about the past:
                 seen       trade keys (market, trade_date, trade_id) of every parsed row
                 odd_seen   the same for keys that do not pack into 64 bits (rare, exact)
                 accepted   key of each accepted N trade -> its matching fields
                 cancelled  keys of N trades an accepted X row already reversed
                 holdings   (acct_idx * n_sec + sec_idx) -> quantity
                 reported   NEGATIVE_HOLDING keys already raised

Invariants: state changes only through the windows' effects, applied in window order once
a window passed its self-checks and at most one window ahead of the database (its commit
runs meanwhile); a window that fails its checks leaves state exactly as the database has
it, and after a failed commit the engine rebuilds state from the database (recovery.py),
so state is always rebuildable from the database.
"""

from __future__ import annotations

import dataclasses
import datetime

import numpy as np
import polars as pl

from settle_arrow import schema

DAY0 = (datetime.date(1990, 1, 1) - datetime.date(1970, 1, 1)).days
TRADE_ID_BITS = 46
DAY_BITS = 16
MARKET_CODES = schema.MARKET_CODES


def market_codes(market: pl.Series) -> np.ndarray:
    """MARKET_CODES of each value; -1 for any other market or null."""
    return market.replace_strict(MARKET_CODES, default=-1, return_dtype=pl.Int64).fill_null(-1).to_numpy()


def trade_keys(market: pl.Series, trade_date: pl.Series, trade_id: pl.Series) -> tuple[np.ndarray, np.ndarray]:
    """Pack (market, trade_date, trade_id) into uint64: (keys, packable mask).

    Layout: 2 bits market | 16 bits days since 1990-01-01 | 46 bits trade_id. A key outside
    those ranges (unknown market, far-off date, huge id) is not packable and is kept exactly
    in EngineState.odd_seen instead; the mask says which rows those are.
    """
    return pack_keys(market_codes(market), trade_date, trade_id)


def pack_keys(code: np.ndarray, trade_date: pl.Series, trade_id: pl.Series) -> tuple[np.ndarray, np.ndarray]:
    """trade_keys with the market already as MARKET_CODES (-1: none)."""
    day = trade_date.cast(pl.Int32).fill_null(-1).to_numpy().astype(np.int64) - DAY0
    tid = trade_id.fill_null(-1).to_numpy().astype(np.int64)
    ok = (
        (code >= 0)
        & (day >= 0)
        & (day < (1 << DAY_BITS))
        & (tid >= 0)
        & (tid < (1 << TRADE_ID_BITS))
        & trade_date.is_not_null().to_numpy()
    )
    code, day, tid = (np.where(ok, a, 0).astype(np.uint64) for a in (code, day, tid))
    keys = (code << np.uint64(62)) | (day << np.uint64(TRADE_ID_BITS)) | tid
    return keys, ok


def unique_sorted(keys: np.ndarray) -> np.ndarray:
    """Sorted distinct keys (np.unique hashes first: ~10x slower on millions of uint64)."""
    keys = np.sort(keys)
    return keys[np.concatenate(([True], keys[1:] != keys[:-1]))] if len(keys) else keys


class SortedRuns:
    """Unique sorted keys with payload columns, as a few sorted runs (see module doc)."""

    def __init__(self, dtype: type = np.uint64, payload: dict[str, type] | None = None):
        self.dtype = dtype
        self.payload_types = dict(payload or {})
        self.runs: list[tuple[np.ndarray, dict[str, np.ndarray]]] = []
        # Bumped on every change: positions found at one version stay valid until the next.
        self.version = 0

    def __len__(self) -> int:
        return sum(len(k) for k, _ in self.runs)

    def find(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(run index or -1, position in run) for each key."""
        keys = np.asarray(keys, dtype=self.dtype)
        run_of = np.full(len(keys), -1, dtype=np.int64)
        pos_of = np.zeros(len(keys), dtype=np.int64)
        if not len(keys):
            return run_of, pos_of
        # Sorted probes walk the run in cache order (PERF_NOTES: ~5x faster than random);
        # probes that come sorted (registration, recovery) skip the sort.
        if bool((keys[1:] >= keys[:-1]).all()):
            order, probe = np.arange(len(keys)), keys
        else:
            order = np.argsort(keys, kind="stable")
            probe = keys[order]
        for r, (run_keys, _) in enumerate(self.runs):
            if not len(run_keys):
                continue
            pos = np.minimum(np.searchsorted(run_keys, probe), len(run_keys) - 1)
            hit = run_keys[pos] == probe
            run_of[order[hit]] = r
            pos_of[order[hit]] = pos[hit]
        return run_of, pos_of

    def contains(self, keys: np.ndarray) -> np.ndarray:
        return self.find(keys)[0] >= 0

    def gather(self, column: str, run_of: np.ndarray, pos_of: np.ndarray, fill=0) -> np.ndarray:
        """Payload `column` at found positions; `fill` where not found."""
        out = np.full(len(run_of), fill, dtype=self.payload_types[column])
        for r, (_, cols) in enumerate(self.runs):
            sel = run_of == r
            if sel.any():
                out[sel] = cols[column][pos_of[sel]]
        return out

    def add_at(self, column: str, run_of: np.ndarray, pos_of: np.ndarray, delta: np.ndarray) -> None:
        """payload[column] += delta at found positions (keys unique, so no collisions)."""
        self.version += 1
        for r, (_, cols) in enumerate(self.runs):
            sel = run_of == r
            if sel.any():
                cols[column][pos_of[sel]] += delta[sel]

    def insert(self, keys: np.ndarray, payload: dict[str, np.ndarray] | None = None) -> None:
        """Add keys that are not present yet (caller guarantees uniqueness)."""
        keys = np.asarray(keys, dtype=self.dtype)
        if not len(keys):
            return
        payload = payload or {}
        assert set(payload) == set(self.payload_types), "payload columns must match"
        self.version += 1
        if bool((keys[1:] > keys[:-1]).all()):  # already sorted (recovery reads in key order): no sort
            # Copies: payload columns are updated in place later; inputs may be read-only views.
            run = (keys.copy(), {c: np.array(v, dtype=self.payload_types[c]) for c, v in payload.items()})
        else:
            order = np.argsort(keys, kind="stable")
            run = (keys[order], {c: np.asarray(v, dtype=self.payload_types[c])[order] for c, v in payload.items()})
            assert bool((run[0][1:] > run[0][:-1]).all()), "keys must be unique"
        self.runs.append(run)
        while len(self.runs) >= 2 and len(self.runs[-2][0]) <= 2 * len(self.runs[-1][0]):
            (k2, c2), (k1, c1) = self.runs.pop(), self.runs.pop()
            merged = np.concatenate([k1, k2])
            # Two sorted runs: timsort ('stable') merges them in linear time.
            order = np.argsort(merged, kind="stable")
            self.runs.append((merged[order], {c: np.concatenate([c1[c], c2[c]])[order] for c in c1}))



ACCEPTED_PAYLOAD = {
    "sec_idx": np.int32,
    "price_milli": np.int64,
    "quantity": np.int64,
    # int32 ids: this payload is kept for every accepted trade (cancellation matching), so
    # it is most of the state's memory per trade (44 bytes with the key).
    "buy_acct_idx": np.int32,
    "sell_acct_idx": np.int32,
    "buy_unit_idx": np.int32,
    "sell_unit_idx": np.int32,
}

ODD_KEY_SCHEMA = {"market": pl.String, "trade_date": pl.Date, "trade_id": pl.Int64}


@dataclasses.dataclass
class EngineState:
    n_sec: int
    seen: SortedRuns = dataclasses.field(default_factory=SortedRuns)
    odd_seen: pl.DataFrame = dataclasses.field(default_factory=lambda: pl.DataFrame(schema=ODD_KEY_SCHEMA))
    accepted: SortedRuns = dataclasses.field(default_factory=lambda: SortedRuns(np.uint64, ACCEPTED_PAYLOAD))
    cancelled: SortedRuns = dataclasses.field(default_factory=SortedRuns)
    holdings: SortedRuns = dataclasses.field(default_factory=lambda: SortedRuns(np.int64, {"quantity": np.int64}))
    reported: SortedRuns = dataclasses.field(default_factory=lambda: SortedRuns(np.int64))

    def holding_keys(self, acct_idx: np.ndarray, sec_idx: np.ndarray) -> np.ndarray:
        return acct_idx.astype(np.int64) * self.n_sec + sec_idx.astype(np.int64)

    def positions(self, keys: np.ndarray) -> tuple[np.ndarray, tuple[int, np.ndarray, np.ndarray]]:
        """Quantities held at `keys` (0 where none), and where they were found, which
        apply_holdings may reuse while holdings have not changed since."""
        run_of, pos_of = self.holdings.find(keys)
        return self.holdings.gather("quantity", run_of, pos_of), (self.holdings.version, run_of, pos_of)

    def apply_holdings(self, keys: np.ndarray, delta: np.ndarray,
                       found: tuple[int, np.ndarray, np.ndarray] | None = None) -> None:
        """Add per-key deltas (keys unique) to holdings, creating new keys as needed."""
        if found is not None and found[0] == self.holdings.version:
            run_of, pos_of = found[1], found[2]
        else:
            run_of, pos_of = self.holdings.find(keys)
        missing = run_of < 0
        self.holdings.add_at("quantity", run_of, pos_of, delta)
        self.holdings.insert(keys[missing], {"quantity": delta[missing]})
