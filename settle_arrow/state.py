"""Keyed in-memory state kept between windows: sorted runs of integer keys (a small LSM)
for the trade keys, a hash table for the holdings (holdings.py).

Data model:
  SortedRuns   key (int64/uint64) -> optional payload columns (numpy arrays), keys unique
               across runs; each run sorted; run sizes shrink geometrically so a lookup
               costs O(log n) searchsorted calls and an insert is amortised O(log n).
               Optionally runs freeze at a size (never merged again: bounded merge copies)
               and spill to files mapped read-only (written by a background thread, the
               run in memory until then), so the trade history costs disk, and
               memory only for the runs today's probes touch; those files may stay, as a
               TARGET's durable copy of the frozen runs (`keep_as`), and be mapped back.
  EngineState  everything a window needs to know about the past:
                 seen       trade keys (market, trade_date, trade_id) of every parsed row
                 odd_seen   the same for keys that do not pack into 64 bits (rare, exact)
                 accepted   key of each accepted N trade -> its matching fields
                 cancelled  keys of N trades an accepted X row already reversed
                 holdings   (acct_idx * n_sec + sec_idx) -> quantity (holdings.HoldingsTable)
                 reported   NEGATIVE_HOLDING keys already raised

Invariants: state changes only through the windows' effects, applied in window order once
a window passed its self-checks, ahead of the database by at most the windows waiting for
or in a commit (engine.COMMIT_GROUP_WINDOWS_MAX and the group committing); a window that fails its checks leaves state exactly as the database has
it, and after a failed commit the engine rebuilds state from the database (recovery.py),
so state is always rebuildable from the database. A frozen run's arrays never change (a
kept run's files are immutable once named), so a writer thread may write them, and a
commit make them durable, while later windows go on.
"""

from __future__ import annotations

import dataclasses
import datetime
import mmap
import os
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import polars as pl

from settle_arrow import schema
from settle_arrow.holdings import HoldingsTable

DAY0 = (datetime.date(1990, 1, 1) - datetime.date(1970, 1, 1)).days
TRADE_ID_BITS = 46
DAY_BITS = 16
MARKET_CODES = schema.MARKET_CODES
assert len(MARKET_CODES) <= 1 << (64 - DAY_BITS - TRADE_ID_BITS), "market codes must fit their bits"
# Up to this many keys argsort_keys orders them with NumPy, above with Polars: a Polars
# call costs ~0.4 ms alone and, inside a replay, waits for the GIL it released while the
# other pipeline threads run Python (registration's probe of its few dozen reported keys:
# 1.1 ms of wall a 10,000-row window, measured), where NumPy's argsort of 10,000 keys takes
# 0.35 ms. Above ~30,000 keys Polars' parallel arg_sort is the faster on a machine without
# AVX-512 (AVX2, NumPy 2.4: 100 k keys 4.7 against 3.4 ms, 2 M 125 against 72 ms), NumPy's
# with it (200 k: 3.3 against 6.9 ms), measured. Plain sorts are NumPy's np.sort at every
# size: NumPy 2.4's SIMD sort beats Polars' with AVX2 alone (int64: 100 k keys 1.5 against
# 2.3 ms, 10 M 0.17 against 0.21 s) and by 2x with AVX-512, measured.
ARGSORT_NUMPY_KEYS_MAX = 32_768
# A large run (SAMPLED_RUN_ROWS_MIN keys or more) holding SAMPLED_RUN_PROBE_RATIO keys per
# probe is searched through a sample of every SAMPLE_STRIDE-th key (kernels.find_in_run):
# sparse probes then search the sample, which stays in cache between windows, and miss
# cache only inside their block; denser probes gallop through the run itself (measured,
# 10 M keys: 200 k probes 11.6 ms plain against 15.6 sampled; 20 k probes 6.4 against
# 2.6). The sample costs 1/SAMPLE_STRIDE of the keys' memory. (Bucket tables, an index
# for evenly spread keys, went with the holdings' runs: trade keys are day-major, a day's
# keys one narrow band of a wide range, and crowd any bucketing of it.)
SAMPLED_RUN_ROWS_MIN = 1 << 16
SAMPLED_RUN_PROBE_RATIO = 128
SAMPLE_STRIDE = 32
# _merge copies a new run that lands in at most this many blocks of the old one as
# slices (one loop iteration per block and column: control plane), and scatters it otherwise.
MERGE_BLOCKS_MAX = 32
# Freeze sizes (see SortedRuns): merges copy at most ~2x these many keys at any stream length.
SEEN_FROZEN_ROWS = 8_000_000  # 64 MB of keys per frozen run
# 22 MB of keys and payload per frozen run. Each key is copied by about log2(freeze size /
# window rows) merges before its run freezes, and only X rows probe `accepted`, so more,
# smaller frozen runs cost their probes little (measured, serial, 100,000-row windows: the
# effects' CPU 37-39 ms a window at 2 M against 30 at 500,000; 10,000-row: 4.5-4.9 -> 3.7-4.1).
ACCEPTED_FROZEN_ROWS = 500_000
# Cancelled keys are one per accepted X row: few, but as old as the history, so they freeze
# too (and a TARGET keeps them, see EngineState.run_dir).
CANCELLED_FROZEN_ROWS = 500_000
# Frozen runs live in files here when the TARGET keeps none (see EngineState.run_dir): the
# memory they cost is that of the runs probed now (today's keys), not that of the history.
SPILL_DIR = os.environ.get("SETTLE_ARROW_SPILL_DIR") or tempfile.gettempdir()
# Frozen runs are written to their files (a kept run's also fsynced) by one thread, in the
# order they froze, while the run stays in memory until written: a 500,000-key `accepted`
# run (22 MB) took the processing thread 16-62 ms to write and the commit lane 17-20 ms to
# fsync, the live feed's slowest windows (measured, 10,000-row windows at 240,000 trades/s).
_WRITER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="settle-spill")
# The sets whose frozen runs a TARGET may keep, and the file name of each run's column:
# `<set>-<run:06d>-<column>.bin`, the keys' column named KEY_COLUMN.
KEPT_SETS = ("seen", "accepted", "cancelled")
KEY_COLUMN = "key"
RUN_FILE_SUFFIX = ".bin"


def market_codes(market: pl.Series) -> np.ndarray:
    """MARKET_CODES of each value; -1 for any other market or null."""
    # One comparison per market, not a replace_strict (10,000 rows: 1.2 -> 0.3 ms; 100,000:
    # 3.9 -> 1.6 ms, measured): there are two markets.
    code = np.full(len(market), -1, dtype=np.int64)
    for name, value in MARKET_CODES.items():
        code[market.eq_missing(name).to_numpy()] = value
    return code


def trade_keys(market: pl.Series, trade_date: pl.Series, trade_id: pl.Series) -> tuple[np.ndarray, np.ndarray]:
    """Pack (market, trade_date, trade_id) into uint64: (keys, packable mask).

    Layout: 16 bits days since 1990-01-01 | 2 bits market | 46 bits trade_id. Day-major, so
    the keys of past days sort below today's and SortedRuns skips their frozen runs. A key outside
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
    keys = (day << np.uint64(64 - DAY_BITS)) | (code << np.uint64(TRADE_ID_BITS)) | tid
    return keys, ok


def holding_keys(acct_idx: np.ndarray, sec_idx: np.ndarray, n_sec: int) -> np.ndarray:
    """Key of EngineState.holdings: account-major, so one account's holdings are adjacent."""
    # In place, one new array: fresh 80 MB temporaries cost their page faults (10 M keys:
    # 0.18 -> 0.06 s, measured).
    keys = acct_idx.astype(np.int64)
    keys *= n_sec
    keys += sec_idx
    return keys


def split_holding_keys(keys: np.ndarray, n_sec: int, consume: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(acct_idx int64, sec_idx int32) of holding keys (any integer type): holding_keys'
    inverse. `consume`: the caller gives up `keys`, which, if writable int64, become
    acct_idx in place (the opening's 10 M keys: no fresh 80 MB array beside sec_idx's)."""
    wide = keys.astype(np.int64, copy=False)
    sec_idx = np.remainder(wide, n_sec, out=np.empty(len(wide), dtype=np.int32), casting="unsafe")
    in_place = consume and wide is keys and keys.flags.writeable
    return np.floor_divide(wide, n_sec, out=wide if in_place else None), sec_idx


def argsort_keys(keys: np.ndarray) -> np.ndarray:
    """An order that sorts integer `keys`, for keys that are unique or whose order among
    equals does not matter (see ARGSORT_NUMPY_KEYS_MAX)."""
    if len(keys) <= ARGSORT_NUMPY_KEYS_MAX:
        return np.argsort(keys)
    return pl.Series(keys).arg_sort().to_numpy()


def stable_sort(keys: np.ndarray, consume: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(order, keys[order]) for integer keys, stable: equal keys keep their input order.
    Where the keys are non-negative and leave room, each carries its position in its low
    bits and one unstable sort of those composites does the work (200 k leg keys: 16 -> 4 ms
    against argsort(kind="stable"); 10 M opening keys with their quantities gathered: 0.41
    against 0.58 s for Polars' sort of both, measured), in place on one copy of the keys:
    every fresh array is a page fault per 4 KB (~80 MB at 10 M keys); wider keys take the
    stable argsort. `consume`: the caller gives up `keys`, which, if writable int64, are
    sorted in place instead of a copy."""
    n = len(keys)
    bits = max(1, n.bit_length())
    if n and int(keys.min()) >= 0 and int(keys.max()) < (1 << (63 - bits)):
        packed = keys.astype(np.int64, copy=not (consume and keys.flags.writeable))
        packed <<= bits
        order = np.arange(n, dtype=np.int64)
        packed |= order
        packed.sort()
        np.bitwise_and(packed, (1 << bits) - 1, out=order)  # the positions' buffer reused
        packed >>= bits
        return order, packed
    order = np.argsort(keys, kind="stable")
    return order, keys[order]


def unique_sorted(keys: np.ndarray) -> np.ndarray:
    """Sorted distinct keys (np.unique hashes first: ~10x slower on millions of uint64)."""
    keys = np.sort(keys)
    return keys[np.concatenate(([True], keys[1:] != keys[:-1]))] if len(keys) else keys


class SortedRuns:
    """Unique sorted keys with payload columns, as a few sorted runs (see module doc).

    `frozen_rows_min`: a run that grows to this many keys is frozen: never merged again,
    so a merge never copies more than about twice that many keys (peak memory stays
    bounded at any stream length) and a probe skips each frozen run whose key range it
    misses (trade keys are day-major, so old days' runs are skipped by two comparisons).
    `spill_dir`: frozen runs move to files there, mapped read-only: their pages cost
    memory only while probed (cancellations of old trades are rare).
    `keep_as`: the spill files stay, named `<keep_as>-<run:06d>-<column>.bin` (listed in
    `kept`, one dict column -> file name per frozen run, and `kept_written`, the write of
    each: done once its files are complete and fsynced), for a TARGET to catalogue as its
    durable state; otherwise each is unlinked once mapped. A run is written in the
    background (_WRITER) and swapped for its mapping by the first find or insert after.
    """

    def __init__(self, dtype: type = np.uint64, payload: dict[str, type] | None = None,
                 frozen_rows_min: int | None = None, spill_dir: str | None = None, keep_as: str | None = None):
        assert frozen_rows_min is None or frozen_rows_min > 0
        assert spill_dir is None or frozen_rows_min is not None, "only frozen runs spill"
        assert keep_as is None or spill_dir is not None, "only spilled runs are kept"
        assert KEY_COLUMN not in (payload or {}), "the keys' file name"
        self.dtype = dtype
        self.payload_types = dict(payload or {})
        self.frozen_rows_min = frozen_rows_min
        self.spill_dir = spill_dir
        self.keep_as = keep_as
        self.kept: list[dict[str, str]] = []  # per frozen run, with keep_as: column -> file name
        self.kept_written: list[Future] = []  # per kept run, its write (see class doc)
        self.runs: list[tuple[np.ndarray, dict[str, np.ndarray]]] = []
        self.n_frozen = 0  # runs[:n_frozen] are frozen, runs[n_frozen:] merge as an LSM
        # Spilled run index -> its mappings, and the spilled runs whose pages the last find
        # touched (they count in this process's memory until released).
        self._maps: dict[int, list[mmap.mmap]] = {}
        self._resident: set[int] = set()
        # Run index -> the search indexes built for that run's keys (see _search).
        self._indexes: dict[int, _RunIndex] = {}
        # Frozen run index -> its write to files, until swapped for the mapping (_take_written).
        self._writing: dict[int, Future] = {}

    def __len__(self) -> int:
        return sum(len(k) for k, _ in self.runs)

    def find(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(run index or -1, position in run) for each key."""
        keys = np.asarray(keys, dtype=self.dtype)
        run_of = np.full(len(keys), -1, dtype=np.int64)
        pos_of = np.zeros(len(keys), dtype=np.int64)
        if not len(keys):
            return run_of, pos_of
        self._take_written()
        # Sorted probes walk the run in cache order (PERF_NOTES: ~5x faster than random);
        # probes that come sorted (registration, recovery) skip the sort.
        if bool((keys[1:] >= keys[:-1]).all()):
            order, probe = None, keys
        else:
            # Answers go back by position, so the order among equal probes does not matter.
            order = argsort_keys(keys)
            probe = keys[order]
        # Answers in the probes' sorted order first, moved to the keys' order at the end.
        run_s = run_of if order is None else np.full(len(keys), -1, dtype=np.int64)
        pos_s = pos_of if order is None else np.zeros(len(keys), dtype=np.int64)
        for r, (run_keys, _) in enumerate(self.runs):
            if not len(run_keys):
                continue
            # Only the probes inside the run's key range can hit it.
            lo = int(np.searchsorted(probe, run_keys[0], "left"))
            hi = int(np.searchsorted(probe, run_keys[-1], "right"))
            if lo == hi:
                if r in self._resident:
                    # Not probed now (an older day's run, typically): hand its pages back to
                    # the page cache, and drop its indexes, so memory stays bounded by the
                    # runs in use.
                    for m in self._maps[r]:
                        m.madvise(mmap.MADV_DONTNEED)
                    self._resident.discard(r)
                    self._indexes.pop(r, None)
                continue
            if r in self._maps:
                self._resident.add(r)
            self._search(r, run_keys, probe, lo, hi, run_s, pos_s)
        if order is not None:
            run_of[order], pos_of[order] = run_s, pos_s
        return run_of, pos_of

    def _search(self, r: int, run_keys: np.ndarray, probe: np.ndarray, lo: int, hi: int, run_of: np.ndarray,
                pos_of: np.ndarray) -> None:
        """find_in_run over run r, through its sample where that is cheaper (see
        SAMPLED_RUN_ROWS_MIN)."""
        # Imported here, not with this module: numba and the compiled code load in a
        # background thread at start-up (kernel_loader.load_in_background), off the restart's path.
        from settle_arrow.kernels import find_in_run

        index = self._indexes.get(r)
        if index is None or index.keys is not run_keys:
            index = self._indexes[r] = _RunIndex(run_keys)
        if len(run_keys) >= max(SAMPLED_RUN_ROWS_MIN, SAMPLED_RUN_PROBE_RATIO * (hi - lo)):
            if index.sample is None:
                index.sample = run_keys[::SAMPLE_STRIDE].copy()
            find_in_run(run_keys, probe, lo, hi, r, run_of, pos_of, index.sample, SAMPLE_STRIDE)
        else:
            find_in_run(run_keys, probe, lo, hi, r, run_of, pos_of)

    def items(self) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(every key, in key order; payload column -> its values in that order): a copy, for checks."""
        if not self.runs:
            return np.empty(0, dtype=self.dtype), {c: np.empty(0, dtype=t) for c, t in self.payload_types.items()}
        keys = np.concatenate([k for k, _ in self.runs])
        order = np.argsort(keys, kind="stable")
        return keys[order], {c: np.concatenate([v[c] for _, v in self.runs])[order] for c in self.payload_types}

    def contains(self, keys: np.ndarray) -> np.ndarray:
        return self.find(keys)[0] >= 0

    def gather(self, column: str, run_of: np.ndarray, pos_of: np.ndarray, fill=0) -> np.ndarray:
        """Payload `column` at found positions; `fill` where not found."""
        from settle_arrow.kernels import gather_found  # numba loads in the background (see find)

        out = np.full(len(run_of), fill, dtype=self.payload_types[column])
        for r, (_, cols) in enumerate(self.runs):
            gather_found(cols[column], run_of, pos_of, r, out)
        return out

    def insert(self, keys: np.ndarray, payload: dict[str, np.ndarray] | None = None) -> None:
        """Add keys that are not present yet (caller guarantees uniqueness)."""
        keys = np.asarray(keys, dtype=self.dtype)
        if not len(keys):
            return
        self._take_written()
        payload = payload or {}
        assert set(payload) == set(self.payload_types), "payload columns must match"
        if bool((keys[1:] > keys[:-1]).all()):  # already sorted (recovery reads in key order): no sort
            # Copies: a run outlives the window, whose arrays (or views of its buffers) the caller may reuse.
            run = (keys.copy(), {c: np.array(v, dtype=self.payload_types[c]) for c, v in payload.items()})
        else:
            if payload:
                order = argsort_keys(keys)  # the keys are unique
                run = (keys[order], {c: np.asarray(v, dtype=self.payload_types[c])[order] for c, v in payload.items()})
            else:  # keys alone: a sort, no order to gather by (100 k keys: 2.6 against 5.8 ms)
                run = (np.sort(keys), {})
            assert bool((run[0][1:] > run[0][:-1]).all()), "keys must be unique"
        self.runs.append(run)
        while len(self.runs) - self.n_frozen >= 2 and len(self.runs[-2][0]) <= 2 * len(self.runs[-1][0]):
            (k2, c2), (k1, c1) = self.runs.pop(), self.runs.pop()
            self.runs.append(_merge(k1, c1, k2, c2))
        if self.frozen_rows_min is not None and len(self.runs[-1][0]) >= self.frozen_rows_min:
            # Hot runs shrink geometrically, so any hot run before this one would be larger,
            # hence frozen already: the frozen runs stay a prefix.
            assert len(self.runs) == self.n_frozen + 1, "a run reached the freeze size behind larger hot runs"
            if self.spill_dir is not None:
                names = self._file_names(self.n_frozen) if self.keep_as is not None else None
                # A frozen run's arrays never change, so the writer reads them while probes do.
                written = _WRITER.submit(_spill, self.spill_dir, *self.runs[-1], names)
                self._writing[len(self.runs) - 1] = written
                if names is not None:
                    self.kept.append(names)
                    self.kept_written.append(written)
            self.n_frozen += 1
        # Indexes of runs that merges replaced would keep those arrays alive: drop them.
        self._indexes = {r: x for r, x in self._indexes.items() if r < len(self.runs) and x.keys is self.runs[r][0]}

    def wait_written(self) -> None:
        """Wait for this set's frozen runs to be written, and take them (_take_written)."""
        for written in list(self._writing.values()):
            written.exception()
        self._take_written()

    def _take_written(self) -> None:
        """Swap each run written by now for its read-only mapping (its memory freed); a
        failed write is raised here."""
        for run, written in list(self._writing.items()):
            if written.done():
                del self._writing[run]
                keys, cols, maps = written.result()
                assert len(keys) == len(self.runs[run][0]), "a run's file holds the run"
                self.runs[run] = (keys, cols)
                self._maps[run] = maps
                self._indexes.pop(run, None)

    def _file_names(self, run: int) -> dict[str, str]:
        return {c: f"{self.keep_as}-{run:06d}-{c}{RUN_FILE_SUFFIX}" for c in (KEY_COLUMN, *self.payload_types)}

    def adopt(self, names: dict[str, str]) -> None:
        """Append, as the next frozen run, one this set kept earlier (files in spill_dir, named
        as `kept` lists them), mapped read-only: a restart's state costs no copy of the
        history. Refuses files that are not such a run (OSError/ValueError)."""
        assert self.keep_as is not None and len(self.runs) == self.n_frozen, "frozen runs come first"
        if names != self._file_names(self.n_frozen):
            raise ValueError(f"{sorted(names.values())} are not run {self.n_frozen} of {self.keep_as}")
        assert self.spill_dir is not None
        types = {KEY_COLUMN: self.dtype, **self.payload_types}
        maps: list[mmap.mmap] = []
        arrays = {c: _map_file(os.path.join(self.spill_dir, f), np.dtype(types[c]), maps) for c, f in names.items()}
        keys = arrays.pop(KEY_COLUMN)
        if not len(keys) or any(len(v) != len(keys) for v in arrays.values()) or not bool((keys[1:] > keys[:-1]).all()):
            raise ValueError(f"{names[KEY_COLUMN]}: not a run of sorted unique keys with its columns")
        self.runs.append((keys, arrays))
        self._maps[self.n_frozen] = maps
        self.kept.append(names)
        self.kept_written.append(_done())
        self.n_frozen += 1


@dataclasses.dataclass
class _RunIndex:
    """What SortedRuns._search built for one run's keys (`keys`, the very array)."""

    keys: np.ndarray
    sample: np.ndarray | None = None  # keys[::SAMPLE_STRIDE]


def _done() -> Future:
    written: Future = Future()
    written.set_result(None)
    return written


def _map_file(path: str, dtype: np.dtype, maps: list[mmap.mmap]) -> np.ndarray:
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if not size or size % dtype.itemsize:
            raise ValueError(f"{path}: {size} bytes is no whole number of {dtype} values")
        m = mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ)
    maps.append(m)
    return np.frombuffer(m, dtype=dtype)


def _merge(k1: np.ndarray, c1: dict[str, np.ndarray], k2: np.ndarray,
           c2: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One sorted run from two with disjoint keys, in linear time. With payload, scattered
    into place: 2x faster than concatenate-and-argsort (measured, 30 M keys) and holds no
    permutation or concatenated copies at the peak."""
    if not c1:  # keys only: timsort merges the two runs of the concatenation in place (fastest)
        merged = np.concatenate([k1, k2])
        merged.sort(kind="stable")
        return merged, {}
    if len(k1) < len(k2):
        k1, c1, k2, c2 = k2, c2, k1, c1
    at = np.searchsorted(k1, k2)
    # A window's trade keys land in k1 in a few blocks (one per market and day: ids rise
    # through a day), each between two neighbours of k1: then the merged run is slices of
    # the two runs copied whole, not scattered (400,000 + 100,000 keys in two blocks, 7
    # columns: 22 -> 14 ms, measured).
    cuts = np.flatnonzero(at[1:] != at[:-1]) + 1
    if len(k2) and len(cuts) < MERGE_BLOCKS_MAX:
        return _merge_blocks(k1, c1, k2, c2, at, cuts)
    # Where each key of the smaller run lands in the merged run: its rank in k1 plus the
    # keys of k2 before it (keys are unique across runs, so no ties).
    at += np.arange(len(k2), dtype=at.dtype)
    from_k1 = np.ones(len(k1) + len(k2), dtype=bool)
    from_k1[at] = False
    # The larger run's places as indices, found once for every column: a boolean-mask
    # assignment scans the mask again per column (400 k + 200 k keys, 7 columns: 41 -> 24 ms).
    at1 = np.flatnonzero(from_k1)
    del from_k1

    def interleave(a1: np.ndarray, a2: np.ndarray) -> np.ndarray:
        out = np.empty(len(a1) + len(a2), dtype=a1.dtype)
        out[at] = a2
        out[at1] = a1
        return out

    return interleave(k1, k2), {c: interleave(c1[c], c2[c]) for c in c1}


def _merge_blocks(k1: np.ndarray, c1: dict[str, np.ndarray], k2: np.ndarray, c2: dict[str, np.ndarray],
                  at: np.ndarray, cuts: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """_merge when k2 is a few blocks of keys, each block's keys sharing one place in k1
    (`at` = searchsorted(k1, k2); `cuts`: where in k2 that place changes)."""
    starts = np.concatenate(([0], cuts))
    ends = np.concatenate((cuts, [len(k2)]))
    places = at[starts]

    def interleave(a1: np.ndarray, a2: np.ndarray) -> np.ndarray:
        parts, done = [], 0
        for place, start, end in zip(places.tolist(), starts.tolist(), ends.tolist(), strict=True):
            parts += [a1[done:place], a2[start:end]]
            done = place
        parts.append(a1[done:])
        return np.concatenate(parts)

    return interleave(k1, k2), {c: interleave(c1[c], c2[c]) for c in c1}


def _spill(spill_dir: str, keys: np.ndarray, cols: dict[str, np.ndarray],
           names: dict[str, str] | None = None) -> tuple[np.ndarray, dict[str, np.ndarray], list[mmap.mmap]]:
    """The run's arrays written to files under spill_dir and mapped back read-only (keys,
    columns, the mappings). Without `names` each file is unlinked once mapped, so nothing
    is left behind however the process ends (the mapping keeps its data); with them
    (column -> file name, KEY_COLUMN for the keys) the files stay, each complete and
    fsynced before it has its name (the TARGET that catalogues them fsyncs them again, and
    its directory: a clean file's fsync costs ~0.2 ms)."""
    assert len(keys), "frozen runs are never empty"
    os.makedirs(spill_dir, exist_ok=True)
    maps: list[mmap.mmap] = []

    def one(column: str, a: np.ndarray) -> np.ndarray:
        if not a.nbytes:
            return a
        fd, path = tempfile.mkstemp(prefix="settle_arrow_run_", suffix=".tmp", dir=spill_dir)
        try:
            with os.fdopen(fd, "wb", closefd=False) as f:
                a.tofile(f)
            if names is not None:
                os.fsync(fd)
            m = mmap.mmap(fd, a.nbytes, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
            if names is None:
                os.unlink(path)
            else:
                os.replace(path, os.path.join(spill_dir, names[column]))
        maps.append(m)
        mapped = np.frombuffer(m, dtype=a.dtype)
        assert len(mapped) == len(a)
        return mapped

    return one(KEY_COLUMN, keys), {c: one(c, v) for c, v in cols.items()}, maps


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
    """`run_dir`: the frozen runs of KEPT_SETS go to files there that stay (a TARGET's
    durable state, catalogued by its commits: see Storage.state_runs); without it they
    spill to SPILL_DIR and vanish with the process."""

    n_sec: int
    run_dir: str | None = None
    odd_seen: pl.DataFrame = dataclasses.field(default_factory=lambda: pl.DataFrame(schema=ODD_KEY_SCHEMA))
    holdings: HoldingsTable = dataclasses.field(default_factory=HoldingsTable)
    reported: SortedRuns = dataclasses.field(default_factory=lambda: SortedRuns(np.int64))
    seen: SortedRuns = dataclasses.field(init=False)
    accepted: SortedRuns = dataclasses.field(init=False)
    cancelled: SortedRuns = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        for name in KEPT_SETS:
            self.reset(name)

    def reset(self, name: str) -> None:
        """Make KEPT_SETS member `name` empty."""
        payload, frozen = {"seen": (None, SEEN_FROZEN_ROWS), "accepted": (ACCEPTED_PAYLOAD, ACCEPTED_FROZEN_ROWS),
                           "cancelled": (None, CANCELLED_FROZEN_ROWS)}[name]
        runs = SortedRuns(np.uint64, payload, frozen, self.run_dir or SPILL_DIR, name if self.run_dir else None)
        setattr(self, name, runs)

    def holding_keys(self, acct_idx: np.ndarray, sec_idx: np.ndarray) -> np.ndarray:
        return holding_keys(acct_idx, sec_idx, self.n_sec)

