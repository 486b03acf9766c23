"""Reference data (SPEC §2): loaded once per run, checked, and encoded to dense integer ids.

Data model (all immutable after `load_refdata`):
  securities   (market, security_id) -> sec_idx, security_type, cycles, currency
  trading_units unit_id -> unit_idx, participant_id
  accounts     account_id -> acct_idx, holder_type, participant_id
  calendars    market -> sorted int32 day numbers (date32) of business days
  fees         typed fee rows, rate_units = rate x 10^8 as int64
  opening      (acct_idx, sec_idx) -> quantity > 0, keys unique, rows in key order

Invariants checked on load (a violation is a `RefDataError` naming table and row):
  * keys unique, foreign keys resolve, required columns non-null, values parse exactly;
  * fee rates in [0, 1], sides in BUY/SELL/BOTH, effective ranges ordered;
  * opening holdings positive.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import hashlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import fsspec
import numpy as np
import polars as pl
import pyarrow as pa

from settle_arrow import schema
from settle_arrow.errors import UserError
from settle_arrow.io.files import SourceError, file_sha256, read_frame
from settle_arrow.io.parse import ColumnTypeError, coerce
from settle_arrow.state import MARKET_CODES, holding_keys, market_codes, split_holding_keys, stable_sort

RATE_SCALE = 10**8
SMALL_DOMAIN_MAX = 4096  # StringIndex: up to this many values, look up by a cast to an Enum of them
RUNS_SAMPLE_ROWS = 65_536  # rows _by_runs looks at to decide
# StringIndex.lookup splits more keys than this into chunks looked up by LOOKUP_THREADS
# threads: its temporaries then stay small and both cores work (10 M account ids of the
# opening holdings: 1.7 s -> 0.73 s wall, 1.78 -> 1.40 s CPU, measured). A window's
# lookups (200,000 keys) stay on their calling thread, which has other work beside it.
LOOKUP_CHUNK_KEYS = 1_000_000
LOOKUP_THREADS = 2
_HASH_SEEDS = {"seed": 0x5E77}


class RefDataError(UserError):
    """Reference data is missing or inconsistent (user mistake)."""


class StringIndex:
    """Exact string -> dense id lookup: an open-addressing hash table in numpy, then a
    string comparison.

    Cheaper than a hash join against a million-row frame per window and than a sorted
    search (no sort of the probes; measured ~3x), and exact: a hash match only nominates a
    candidate, the strings themselves must be equal.
    """

    def __init__(self, values: pl.Series, small_max: int = SMALL_DOMAIN_MAX):
        assert values.null_count() == 0
        # One chunk: a gather across the 16 chunks a streamed read leaves costs ~15x more.
        self._values = values.cast(pl.String).rename("v").rechunk()
        # A small domain (trading units) is cheaper through a cast to an Enum of its values,
        # whose physical codes are the ids, than through the hash table (measured: ~2x at 60
        # values, 200 k keys) or Polars' exact replace (200,000 keys: 3.4 -> 2.4 ms).
        self._enum = pl.Enum(self._values) if len(values) <= small_max else None
        hashes = self._values.hash(**_HASH_SEEDS).to_numpy() | np.uint64(1)  # 0 marks an empty slot
        # Two reference strings sharing a hash would hide one of them: exact joins instead.
        ordered = np.sort(hashes)
        self._exact_only = bool((ordered[1:] == ordered[:-1]).any())
        # Distinct hashes are distinct values: only shared ones need the strings counted
        # (a million account ids: 0.12 s a start, measured; load_refdata checks its keys).
        assert not self._exact_only or self._values.n_unique() == len(values), "StringIndex values must be unique"
        capacity = 1 << max(4, int(2 * max(1, len(hashes)) - 1).bit_length())  # load <= 1/2
        self._mask = np.uint64(capacity - 1)
        # Linear probing without wrap-around, placed in one pass: in home-slot order each key
        # takes the first free slot at or after its home, i.e. a running maximum.
        home = (hashes & self._mask).astype(np.int64)
        order, _ = stable_sort(home)
        rank = np.arange(len(order))
        home_sorted = home[order]
        pos = np.maximum.accumulate(home_sorted - rank) + rank if len(order) else rank
        self._probes_max = int((pos - home_sorted).max()) + 1 if len(pos) else 0
        # Padding past the last home slot keeps every probe (home + k < probes_max) in range.
        size = max(capacity, int(pos[-1]) + 1 if len(pos) else 0) + self._probes_max
        # A slot is (hash, id) side by side: a probe reads one cache line, not one in each
        # of two arrays, and np.take gathers such rows ~3x faster than two fancy indexings
        # (200,000 probes of 2 M slots: 2.9 against 9.2 ms, measured). An empty slot is
        # (0, -1 as uint64).
        self._slots = np.zeros((size, 2), dtype=np.uint64)
        self._slots[:, 1] = np.uint64(0xFFFF_FFFF_FFFF_FFFF)
        self._slots[pos, 0] = hashes[order]
        self._slots[pos, 1] = order.astype(np.uint64)

    def lookup(self, keys: pl.Series) -> np.ndarray:
        """ids of `keys` (int64), -1 where absent or null."""
        keys = keys.cast(pl.String)
        if len(keys) > LOOKUP_CHUNK_KEYS:
            starts = range(0, len(keys), LOOKUP_CHUNK_KEYS)
            with ThreadPoolExecutor(LOOKUP_THREADS, thread_name_prefix="settle-lookup") as pool:
                parts = list(pool.map(lambda at: self._lookup(keys.slice(at, LOOKUP_CHUNK_KEYS)), starts))
            return np.concatenate(parts)
        return self._lookup(keys)

    def _lookup(self, keys: pl.Series) -> np.ndarray:
        if len(self._values) == 0 or len(keys) == 0:
            return np.full(len(keys), -1, dtype=np.int64)
        if self._enum is not None:
            return _enum_codes(keys, self._enum)
        if self._exact_only:
            ref = pl.DataFrame({"v": self._values, "id": np.arange(len(self._values))})
            out = pl.DataFrame({"v": keys}).join(ref, on="v", how="left", maintain_order="left")
            return out["id"].fill_null(-1).to_numpy().astype(np.int64)
        # Imported here: numba loads in the background at start-up (kernel_loader).
        from settle_arrow.kernels import probe_slots

        cand = probe_slots(self._slots, keys.hash(**_HASH_SEEDS).to_numpy() | np.uint64(1), self._mask)
        found = cand >= 0
        same = np.zeros(len(keys), dtype=bool)
        same[found] = (self._values.gather(cand[found]) == keys.filter(pl.Series(found))).fill_null(False).to_numpy()
        return np.where(same, cand, -1)

    def values(self, ids: np.ndarray) -> pl.Series:
        return self._values.gather(ids)


def _enum_codes(values: pl.Series, enum: pl.Enum) -> np.ndarray:
    """The position of each value among `enum`'s categories (int64), -1 for a value outside
    them or null: a cast that is not strict makes those null."""
    return values.cast(enum, strict=False).to_physical().cast(pl.Int64).fill_null(-1).to_numpy()


@dataclasses.dataclass(frozen=True)
class RefData:
    securities: pl.DataFrame  # sorted by (market, security_id); sec_idx = row number
    units: pl.DataFrame
    accounts: pl.DataFrame
    participants: pl.DataFrame
    fees: pl.DataFrame
    calendars: dict[str, np.ndarray]
    calendar_keys: np.ndarray  # sorted (market code << 32 | day) of every business day
    unit_index: StringIndex
    account_index: StringIndex
    unit_participant: np.ndarray  # unit_idx -> participant string position in participants
    tables: dict[str, pl.DataFrame]  # typed tables as loaded (all but holdings), for later stages
    dir_url: str
    # sha256 of the holdings file's bytes: equal bytes are equal opening holdings, so a
    # restart need not load, check and encode ten million rows it already checked once.
    opening_file_sha256: str
    # Values the stages derive from these tables and keep for later windows (clearing's fee
    # rates per regime): valid as long as this RefData, which never changes.
    memo: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    @functools.cached_property
    def _opening(self) -> pl.DataFrame:
        return _load_opening(self)

    def release_opening(self) -> None:
        """Drop the loaded opening holdings (the next use loads them again): once a TARGET
        has them stored, a long replay need not keep ten million rows in memory."""
        self.__dict__.pop("_opening", None)

    @property
    def opening(self) -> pl.DataFrame:
        """Opening holdings: acct_idx, sec_idx, quantity (> 0, keys unique, in key order); loaded and
        checked on first use."""
        return self._opening

    @property
    def n_sec(self) -> int:
        """The base of holding keys (acct_idx * n_sec + sec_idx): EngineState's and
        the opening holdings' uniqueness check's."""
        return max(1, self.securities.height)

    @functools.cached_property
    def security_classes(self) -> tuple[np.ndarray, pl.DataFrame]:
        """(class of each sec_idx, the classes): securities that share market, security
        type and both settlement cycles are charged and settled alike, so clearing computes
        fees and dates per (class, trade date) instead of per trade."""
        cols = ["market", "security_type", "securities_cycle", "cash_cycle"]
        classes = self.securities.select(cols).unique(maintain_order=True).with_row_index("cls")
        of_sec = self.securities.select(cols).join(classes, on=cols, how="left", maintain_order="left")["cls"]
        assert of_sec.null_count() == 0
        return of_sec.to_numpy().astype(np.int64), classes.drop("cls")

    @functools.cached_property
    def market_rank(self) -> np.ndarray:
        """Rank of each sec_idx's market among the markets (0 first), int64: clearing orders
        securities obligations by market through it."""
        return self.securities["market"].rank("dense").to_numpy().astype(np.int64) - 1

    @functools.cached_property
    def cash_pairs(self) -> tuple[np.ndarray, pl.DataFrame]:
        """(pair of each sec_idx, the (market, currency) pairs): clearing nets cash per pair."""
        pairs = self.securities.select("market", "currency").unique(maintain_order=True)
        of_sec = self.securities.join(pairs.with_row_index("pair"), on=["market", "currency"], how="left",
                                      maintain_order="left")["pair"]
        assert of_sec.null_count() == 0
        return of_sec.to_numpy(), pairs

    @functools.cached_property
    def cash_pair_ranks(self) -> tuple[np.ndarray, np.ndarray]:
        """(rank of each cash pair's market, rank of its currency), int64, 0 first: clearing
        orders cash obligations by market and by currency through them."""
        pairs = self.cash_pairs[1]
        return tuple(pairs[c].rank("dense").to_numpy().astype(np.int64) - 1 for c in ("market", "currency"))

    def sec_idx(self, keys: pl.DataFrame, code: np.ndarray | None = None) -> pl.Series:
        """sec_idx (Int32) of each (market, security_id) row of `keys`, in order; null where
        unknown. `code`: the rows' state.market_codes, where the caller has them. Through a
        cast of the ids to an Enum and a (market code, Enum code) table, not a join on two
        string columns, which hashes a window's rows into a table of its own (100,000 rows:
        3.0 -> 2.0 ms, and a run's page faults of that table, measured)."""
        ids, table = self._security_lookup
        code = market_codes(keys["market"]) if code is None else code
        at = _enum_codes(keys["security_id"], ids)
        known = (code >= 0) & (at >= 0)
        idx = table[np.where(known, code, 0), np.where(known, at, 0)]
        known &= idx >= 0
        return pl.Series("sec_idx", pa.array(idx, mask=~known))

    @functools.cached_property
    def _security_lookup(self) -> tuple[pl.Enum, np.ndarray]:
        """(an Enum of every security_id, sec_idx by [market code, its Enum code] or -1):
        sec_idx's reference side, once, not per window."""
        sec = self.securities
        ids = pl.Enum(sec["security_id"].unique(maintain_order=True))
        # One column at least: sec_idx reads column 0 for every row it does not find.
        table = np.full((len(MARKET_CODES), max(1, len(ids.categories))), -1, dtype=np.int32)
        # Every securities row's market is one of MARKET_CODES (checked at load).
        table[market_codes(sec["market"]), sec["security_id"].cast(ids).to_physical().cast(pl.Int64).to_numpy()] = (
            sec["sec_idx"].to_numpy())
        return ids, table

    def business_days(self, market: str) -> np.ndarray:
        return self.calendars.get(market, np.empty(0, dtype=np.int32))


def _find(dir_url: str, name: str) -> str | None:
    fs, _, (root,) = fsspec.get_fs_token_paths(dir_url)
    for ext in (".parquet", ".arrow", ".feather", ".csv"):
        path = f"{root.rstrip('/')}/{name}{ext}"
        if fs.exists(path):
            return fs.unstrip_protocol(path)
    return None


def _load_table(dir_url: str, name: str) -> pl.DataFrame:
    target = schema.REFDATA[name]
    url = _find(dir_url, name)
    if url is None:
        if name in schema.REFDATA_REQUIRED:
            raise RefDataError(f"reference table {name} not found in {dir_url} (.parquet or .csv)")
        return pl.from_arrow(target.empty_table())
    try:
        raw = read_frame(url)
    except SourceError as exc:
        raise RefDataError(str(exc)) from None
    missing = [n for n in target.names if n not in raw.columns]
    optional = set(schema.REFDATA_NULLABLE.get(name, ()))
    if [m for m in missing if m not in optional]:
        raise RefDataError(f"{url}: missing column(s) {', '.join(missing)}")
    try:
        typed = coerce(raw, target)
    except ColumnTypeError as exc:
        raise RefDataError(f"{url}: {exc}") from None
    for field in target:
        bad = typed[f"{field.name}__bad"]
        if bad.any():
            row = int(bad.arg_true()[0])
            raise RefDataError(
                f"{url} row {row}: {field.name}={raw[field.name][row]!r} is not a valid {field.type}"
            )
        if field.name not in optional and typed[field.name].null_count():
            row = int(typed[field.name].is_null().arg_true()[0])
            raise RefDataError(f"{url} row {row}: {field.name} is empty")
    return typed.select(target.names)


def _unique(frame: pl.DataFrame, keys: list[str], table: str) -> None:
    if frame.n_unique(subset=keys) != frame.height:  # counting first: the mask only to name one
        dup = frame.filter(frame.select(keys).is_duplicated())
        raise RefDataError(f"{table}: duplicate key {dict(zip(keys, dup.row(0), strict=False))}")


def _require_in(values: pl.Series, allowed: pl.Series, what: str) -> None:
    missing = values.filter(~values.is_in(allowed.implode()))
    if len(missing):
        raise RefDataError(f"{what} {missing[0]!r} is not defined")


def _check_choice(frame: pl.DataFrame, col: str, allowed: tuple[str, ...], table: str) -> None:
    bad = frame.filter(~pl.col(col).is_in(list(allowed)))
    if len(bad):
        raise RefDataError(f"{table}: {col}={bad[col][0]!r} is not one of {', '.join(allowed)}")


def load_refdata(dir_url: str) -> RefData:
    """Load, check and encode the reference data directory `dir_url` (any fsspec URL)."""
    fs, _, (root,) = fsspec.get_fs_token_paths(dir_url)
    if not fs.isdir(root):
        raise RefDataError(f"reference data directory not found: {dir_url}")
    # Holdings, the one big table, load on first use (RefData.opening).
    # Contiguous: later gathers by id are random, and a gather across chunks costs ~15x more.
    tables = {name: _load_table(dir_url, name).rechunk() for name in schema.REFDATA if name != "holdings"}

    sec = tables["securities"].sort("market", "security_id")
    _unique(sec, ["market", "security_id"], "securities")
    _check_choice(sec, "security_type", schema.SECURITY_TYPES, "securities")
    # Trade keys pack the market into 2 bits (state.trade_keys): only these MICs exist.
    _check_choice(sec, "market", schema.MARKETS, "securities")
    if sec.filter((pl.col("securities_cycle") < 0) | (pl.col("cash_cycle") < 0)).height:
        raise RefDataError("securities: settlement cycles must be >= 0")
    sec = sec.with_row_index("sec_idx").with_columns(pl.col("sec_idx").cast(pl.Int32))

    parts = tables["participants"].sort("participant_id")
    _unique(parts, ["participant_id"], "participants")
    units = tables["trading_units"]
    _unique(units, ["unit_id"], "trading_units")
    _require_in(units["participant_id"], parts["participant_id"], "trading_units: participant")
    accounts = tables["accounts"]
    _unique(accounts, ["account_id"], "accounts")
    _check_choice(accounts, "holder_type", ("INDIVIDUAL", "INSTITUTION"), "accounts")
    _require_in(accounts["participant_id"], parts["participant_id"], "accounts: participant")

    fees = tables["fees"]
    _check_choice(fees, "fee_code", schema.FEE_CODES, "fees")
    _check_choice(fees, "side", ("BUY", "SELL", "BOTH"), "fees")
    rate_units = (fees["rate"] * RATE_SCALE).cast(pl.Int64)
    if len(fees) and (rate_units.min() < 0 or rate_units.max() > RATE_SCALE):
        raise RefDataError("fees: rate must be between 0 and 1")
    if fees.filter(pl.col("effective_to") < pl.col("effective_from")).height:
        raise RefDataError("fees: effective_to before effective_from")
    fees = fees.with_columns(rate_units.alias("rate_units"))

    cal = tables["calendar"].unique().sort("market", "business_date")
    lo, hi = datetime.date(1990, 1, 1), datetime.date(2169, 12, 31)
    if cal.height and (cal["business_date"].min() < lo or cal["business_date"].max() > hi):
        raise RefDataError(f"calendar: business dates must lie between {lo} and {hi}")
    calendars = {
        m: g["business_date"].cast(pl.Int32).to_numpy()
        for (m,), g in cal.group_by("market", maintain_order=True)
    }

    unit_index = StringIndex(units["unit_id"])
    account_index = StringIndex(accounts["account_id"])
    part_pos = {p: i for i, p in enumerate(parts["participant_id"].to_list())}
    unit_participant = np.array([part_pos[p] for p in units["participant_id"].to_list()], dtype=np.int32)

    return RefData(
        securities=sec,
        units=units,
        accounts=accounts,
        participants=parts,
        fees=fees,
        calendars=calendars,
        calendar_keys=np.sort(np.concatenate([
            (np.int64(code) << 32) | calendars[m].astype(np.int64)
            for m, code in schema.MARKET_CODES.items() if m in calendars
        ] or [np.empty(0, np.int64)])),
        unit_index=unit_index,
        account_index=account_index,
        unit_participant=unit_participant,
        tables=tables,
        dir_url=dir_url,
        opening_file_sha256=_file_sha256(_find(dir_url, "holdings")),
    )


def _file_sha256(url: str | None) -> str:
    return file_sha256(url) if url is not None else hashlib.sha256().hexdigest()


def _by_runs(frame: pl.DataFrame, cols: list[str], lookup: Callable[[pl.DataFrame], np.ndarray]) -> np.ndarray:
    """lookup(frame[cols]) row by row, computed once per run of equal keys: a holdings file
    comes sorted by account or by security (the generated one by security: 10 M rows, 2,000
    runs), so its sorted column is looked up in thousands of rows, not ten million (sec_idx
    0.66 s -> 0.1 s, measured). Whether runs pay is judged on a leading sample: the
    comparison of every row costs 0.3 s on an unsorted column of 10 M strings."""
    keys = frame.select(cols)

    def heads_of(part: pl.DataFrame) -> np.ndarray:
        head = pl.any_horizontal(pl.col(c).ne_missing(pl.col(c).shift(1)) for c in cols).fill_null(True)
        out = part.select(head.alias("h"))["h"].to_numpy().copy()
        out[:1] = True
        return out

    if 2 * int(heads_of(keys.head(RUNS_SAMPLE_ROWS)).sum()) > min(keys.height, RUNS_SAMPLE_ROWS):
        return lookup(keys)
    # Chunk by chunk: a shift across the chunks a Parquet read leaves costs 2-4x more (10 M
    # rows in 10 chunks: 0.08-0.19 -> 0.04 s, measured). Each chunk's first row counts as a
    # head: a run split there is looked up twice, with the same answer.
    bounds = np.cumsum([0, *keys[cols[0]].chunk_lengths()])
    heads = [heads_of(keys.slice(lo, hi - lo)) for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]
    starts = np.flatnonzero(np.concatenate(heads or [np.ones(0, dtype=bool)]))
    # Each run's answer repeated over its length: a gather through cumsum(heads) cost
    # 0.2-0.3 s on 10 M rows, this ~0.02 s (measured).
    return np.repeat(lookup(keys[starts]), np.diff(starts, append=keys.height))


def _load_opening(ref: RefData) -> pl.DataFrame:
    """Load and check the holdings table; the opening in key order."""
    hold = _load_table(ref.dir_url, "holdings")
    if hold.filter(pl.col("quantity") <= 0).height:
        raise RefDataError("holdings: opening quantity must be > 0")
    acct_idx = _by_runs(hold, ["account_id"], lambda heads: ref.account_index.lookup(heads["account_id"]))
    if (acct_idx < 0).any():
        raise RefDataError(f"holdings: account {hold['account_id'][int(np.argmax(acct_idx < 0))]!r} is not defined")
    sec_idx = _by_runs(hold, ["market", "security_id"], lambda heads: ref.sec_idx(heads).fill_null(-1).to_numpy())
    if (sec_idx < 0).any():
        row = hold.row(int(np.argmax(sec_idx < 0)), named=True)
        raise RefDataError(f"holdings: security {row['market']}/{row['security_id']} is not defined")
    # Key order, as EngineState and the stored snapshot keep holdings; uniqueness is then a
    # comparison of neighbours (the sort replaces a hash count of the same cost). The keys
    # sort with their positions packed in (stable_sort) and the quantities follow by a
    # gather: 10 M rows 0.58 -> 0.41 s alone against Polars' sort of both columns, and the
    # whole load (with the in-place split below) 2.6 -> 2.05 s of wall, 3.7 -> 2.7 s of
    # CPU (Polars' sort ran on both cores; measured, five alternating pairs; a numpy
    # argsort and gathers took 1.2 s, a stable counting sort by account 0.43-0.63 s).
    key = holding_keys(acct_idx, sec_idx, ref.n_sec)
    quantity = hold["quantity"].to_numpy()
    # The file's strings (~0.5 GB at 10 M rows) go before the sort allocates: the peak
    # holds one or the other, not both (the opening's load peaked at 1.62 GB, then
    # 1.44-1.51, measured).
    del hold, acct_idx, sec_idx
    order, sorted_key = stable_sort(key, consume=True)
    quantity = quantity[order]
    del order
    twice = np.flatnonzero(sorted_key[1:] == sorted_key[:-1])
    if len(twice):
        acct, sec = divmod(int(sorted_key[twice[0]]), ref.n_sec)
        security = ref.securities.row(sec, named=True)
        raise RefDataError(f"holdings: duplicate key {ref.account_index.values(np.array([acct]))[0]}/"
                           f"{security['market']}/{security['security_id']}")
    acct_idx, sec_idx = split_holding_keys(sorted_key, ref.n_sec, consume=True)
    return pl.DataFrame(
        {"acct_idx": acct_idx, "sec_idx": sec_idx, "quantity": quantity},
        schema={"acct_idx": pl.Int64, "sec_idx": pl.Int32, "quantity": pl.Int64},
    )
