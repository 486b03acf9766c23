"""Synthetic market generator: a realistic, seeded, fully vectorised trade feed plus reference data.

Data model written under OUT (every table cast to its schema.py schema before writing):

  OUT/refdata/<table>.<fmt>   one file per table of schema.REFDATA:
    securities        both markets, ~70% A_SHARE, 10% STAR (XSHG only), 12% ETF, 8% BOND, 6-digit
                      codes in the real prefix ranges (600/601/603, 000/002/300, 688, 510/159,
                      019/10x); board_lot 100, BOND 10, STAR 1 (STAR orders are >= 200 shares in
                      steps of 1, so 1 is the lot that divides every legal quantity);
                      securities_cycle 0 and cash_cycle 1 for every security.
    participants      P0001..; reserve_balance 10-500 million CNY in exact fen.
    trading_units     5-digit unit ids 10001..; exactly units_per_participant units each,
                      assigned in shuffled order (unit id ranges do not encode the participant).
    accounts          A000000001..; ~85% INDIVIDUAL; each designated to one participant.
    holdings          unique (account, market, security), quantity > 0, Zipf-ish over
                      securities, ordered by (market, security_id, account_id); every security
                      has a holder when securities <= holdings <= accounts*securities/2.
    calendar          weekdays minus Chinese exchange holidays (2021-2025 tabulated, other years
                      New Year / Labour Day / National Day only), per market, from 45 days before
                      the first to 90 days after the last trading day. XSHE has one extra
                      closure (a "typhoon day") on an XSHG trading day mid-range.
    fees              DOMAIN §4 schedule with effective dates, both markets (see _fees_table).
    corporate_actions a few CASH_DIVIDEND / BONUS_SHARES on the most active held A_SHARE/STAR
                      securities, record date inside the range, ex = pay = record + 1 business day.
    cash_movements    up to 4 reserve top-ups / withdrawals on cash settlement days of the range.

  OUT/trades/trades-YYYYMMDD.<fmt>   one file per XSHG trading day (names sort in input order),
                      schema.INPUT_TRADE columns in order; rows of both markets interleaved by
                      match time (sessions 09:30-11:30, 13:00-15:00, U-shaped intraday).
                      trade_id starts at 1 per (market, trade_date) and increases in file order
                      (ids of rows whose trade_id/market/trade_date is nulled are skipped);
                      N rows have a null ref_trade_id.

  OUT/expected/quarantine.parquet   not an engine input: file, source_row (0-based) and the
                      SPEC §3 reason of every row built to be quarantined; all other rows must
                      be accepted.

Rows (bad = round(trades*bad_rate), cancellations = round(trades*cancel_rate), rest good N):
  * good N: activity per security Zipf (p ~ rank^-1.1), price = the security's daily level
    (random walk inside the daily limit) +- intraday noise on the tick grid (ETF 0.001, else
    0.01), heavy-tailed size in board lots capped at 1,000,000 (STAR 100,000), ~1% odd-lot
    sells. The seller is a holder of the security and opening holdings cover everything each
    holding sells, except ~0.2% of sells by a random account: the only NEGATIVE_HOLDING cases.
    buy/sell units are units of the buy/sell account's participant; buyer != seller.
  * bad rows, split evenly over the 8 reasons before the X checks; each fails exactly its own
    check of SPEC §3 and none earlier:
      SCHEMA            one required column null, or record_type "Z"; CSV only, also
                        trade_date "<year>-02-30", price "abc", quantity "100x" or
                        trade_time "25:61:00.000000". Own fresh trade_id.
      BAD_QUANTITY      quantity 0 or minus the original.    BAD_PRICE  price 0 or negated.
      UNKNOWN_SECURITY  a 9xxxxx code, or a code listed only on the other market.
      UNKNOWN_UNIT      buy or sell unit "0xxxx".   UNKNOWN_ACCOUNT  buy or sell A-number
                        above the last account.
      NOT_BUSINESS_DAY  trade_date a non-business day of the row's market (weekends/holidays
                        from 10 days before the first trading day, or XSHE's typhoon day), in
                        the file of the day it was drawn for; ids count from 1 per date.
      DUPLICATE_TRADE   an exact copy (every column, trade_time included) of an earlier good N
                        row, later in the same file, or (25%) in the next day's file.
  * X rows: 85% valid cancellations of distinct good N rows (every field repeated, own new
    trade_id, later time, same file); 5% UNKNOWN_REF (ref_trade_id >= 9,000,000,000), 5%
    REF_MISMATCH (quantity + 1 lot or price + 1 tick), 5% ALREADY_CANCELLED (repeat of a valid X
    with a newer trade_id). Bad rows are never cancelled.
  trade_time never decreases in file order except at DUPLICATE_TRADE rows.

Formats: Parquet zstd, row groups <= 1M rows. CSV: header, UTF-8, nothing quoted, nulls are
empty fields (an empty field is always a null: no value is an empty string), ISO dates,
HH:MM:SS.ffffff times, decimals with their scale (10.500).

Same spec -> byte-identical files: every random draw comes from numpy.random.default_rng(seed)
(through spawned child generators, so one component's draws do not shift another's).
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from settle_arrow.schema import (
    INPUT_REQUIRED,
    INPUT_TRADE,
    MARKETS,
    MONEY,
    PER_SHARE,
    PRICE,
    QUARANTINE_REASONS,
    RATE,
    REFDATA,
)
from settle_arrow.state import unique_sorted

__all__ = ["GenerateSummary", "MarketSpec", "generate_market", "KIND_NAMES"]


@dataclasses.dataclass(frozen=True)
class MarketSpec:
    trades: int = 5000  # total trade rows to write, including bad rows and cancellations
    seed: int = 0
    accounts: int = 2000
    securities: int = 200
    participants: int = 20
    units_per_participant: int = 3
    days: int = 10  # trading days (business days of XSHG) covered by the trade files
    start_date: datetime.date = datetime.date(2023, 8, 21)
    holdings: int | None = None  # opening holdings rows; None -> ~2 per account
    fmt: str = "parquet"  # "parquet" or "csv"
    bad_rate: float = 0.0  # fraction of rows that are deliberately bad
    cancel_rate: float = 0.0  # fraction of rows that are cancellation (X) rows


@dataclasses.dataclass(frozen=True)
class GenerateSummary:
    out_dir: str
    trade_files: tuple[str, ...]
    refdata_dir: str
    rows: int
    bad_rows: int
    cancel_rows: int
    seconds: float


# --------------------------------------------------------------------------------------------
# constants

_FMTS = ("parquet", "csv")
_ROW_GROUP = 1_000_000

_TYPES = ("A_SHARE", "STAR", "ETF", "BOND")
_TYPE_SHARE = (0.70, 0.10, 0.12, 0.08)
_T_ASHARE, _T_STAR, _T_ETF, _T_BOND = range(4)
# Share of each type listed on XSHG; the rest go to XSHE (STAR exists only in Shanghai).
_TYPE_XSHG_SHARE = (0.5, 1.0, 0.5, 0.5)
_BOARD_LOT = np.array([100, 1, 100, 10], dtype=np.int64)
# ETFs quote in 0.001 CNY, everything else in whole fen; prices are held in milli-yuan.
_TICK_MILLI = np.array([10, 10, 1, 10], dtype=np.int64)
_MAX_QTY = np.array([1_000_000, 100_000, 1_000_000, 1_000_000], dtype=np.int64)
_DAILY_VOL = np.array([0.02, 0.03, 0.012, 0.002])
_INTRADAY_VOL = np.array([0.006, 0.008, 0.003, 0.0005])
_LIMIT = np.array([0.10, 0.20, 0.10, 0.10])
# Order size: (base + floor(lognormal(mu, sigma))) board lots; medians ~400 shares (A),
# ~500 (STAR, in shares from 200), ~1000 ETF units, ~50 bonds.
_QTY_MU = np.log(np.array([3.0, 300.0, 10.0, 5.0], dtype=np.float32))
_QTY_SIGMA = np.array([1.25, 1.2, 1.25, 1.5], dtype=np.float32)
_QTY_BASE = np.array([1, 200, 1, 1], dtype=np.int64)

# (type, market) -> half-open code ranges actually used by the exchanges for that product.
_CODE_RANGES: dict[tuple[int, int], tuple[tuple[int, int], ...]] = {
    (_T_ASHARE, 0): ((600000, 602000), (603000, 604000)),
    (_T_ASHARE, 1): ((1, 1000), (2000, 3000), (300000, 301000)),
    (_T_STAR, 0): ((688000, 689000),),
    (_T_STAR, 1): (),
    (_T_ETF, 0): ((510000, 511000),),
    (_T_ETF, 1): ((159000, 160000),),
    (_T_BOND, 0): ((19000, 20000),),
    (_T_BOND, 1): ((100000, 110000),),
}

# Row kinds; KIND_NAMES[k] is the SPEC §3 reason of kind k, except GOOD and X_VALID (accepted).
K_GOOD, K_SCHEMA, K_BAD_QTY, K_BAD_PRICE, K_UNK_SEC, K_UNK_UNIT, K_UNK_ACCT, K_NBD, K_DUP = range(9)
K_X_VALID, K_X_UNKNOWN, K_X_MISMATCH, K_X_ALREADY = range(9, 13)
# SPEC §3 orders the row checks before the cancellation checks, as the kinds are here.
KIND_NAMES = ("GOOD", *QUARANTINE_REASONS[:8], "X_VALID", *QUARANTINE_REASONS[8:])
assert KIND_NAMES[K_DUP] == "DUPLICATE_TRADE" and KIND_NAMES[K_X_ALREADY] == "ALREADY_CANCELLED"
_BAD_KINDS = (K_SCHEMA, K_BAD_QTY, K_BAD_PRICE, K_UNK_SEC, K_UNK_UNIT, K_UNK_ACCT, K_NBD, K_DUP)

# SCHEMA variants: 0..11 null one required column; 12 record_type 'Z'; 13.. CSV-only text.
_SCHEMA_NULL_VARIANTS = len(INPUT_REQUIRED)
_SCHEMA_Z = _SCHEMA_NULL_VARIANTS
_CSV_TEXT = {  # variant -> (column, unparseable text)
    _SCHEMA_Z + 1: ("trade_date", None),  # text filled in per run: "<year>-02-30"
    _SCHEMA_Z + 2: ("price", "abc"),
    _SCHEMA_Z + 3: ("quantity", "100x"),
    _SCHEMA_Z + 4: ("trade_time", "25:61:00.000000"),
}

_SESSION_US = 7_200_000_000  # one 2-hour session
_DAY_US = 2 * _SESSION_US
_MORNING_OPEN_US = (9 * 3600 + 30 * 60) * 1_000_000
_AFTERNOON_OPEN_US = 13 * 3600 * 1_000_000
_NEGATIVE_SELL_RATE = 0.002
_ODD_LOT_RATE = 0.01
_UNKNOWN_REF_BASE = 9_000_000_000  # never reached by a day's trade numbers
_N_UNKNOWN = 64  # unknown security codes / units / accounts available to bad rows

# SSE/SZSE closures (weekdays only matter). Years not listed fall back to _FALLBACK_HOLIDAYS.
_HOLIDAY_RANGES: dict[int, tuple[tuple[str, str], ...]] = {
    2021: (("01-01", "01-01"), ("02-11", "02-17"), ("04-05", "04-05"), ("05-03", "05-05"),
           ("06-14", "06-14"), ("09-20", "09-21"), ("10-01", "10-07")),
    2022: (("01-03", "01-03"), ("01-31", "02-04"), ("04-04", "04-05"), ("05-02", "05-04"),
           ("06-03", "06-03"), ("09-12", "09-12"), ("10-03", "10-07")),
    2023: (("01-02", "01-02"), ("01-23", "01-27"), ("04-05", "04-05"), ("05-01", "05-03"),
           ("06-22", "06-23"), ("09-29", "09-29"), ("10-02", "10-06")),
    2024: (("01-01", "01-01"), ("02-09", "02-16"), ("04-04", "04-05"), ("05-01", "05-03"),
           ("06-10", "06-10"), ("09-16", "09-17"), ("10-01", "10-07")),
    2025: (("01-01", "01-01"), ("01-28", "02-04"), ("04-04", "04-04"), ("05-01", "05-05"),
           ("06-02", "06-02"), ("10-01", "10-08")),
}
_FALLBACK_HOLIDAYS = (("01-01", "01-01"), ("05-01", "05-03"), ("10-01", "10-07"))

_NAME_HEAD = ("华", "中", "东方", "国", "海", "新", "金", "长江", "浦", "招", "申", "恒", "天",
              "宝", "万", "云", "光", "京", "沪", "粤", "深", "江", "浙", "川")
_NAME_TAIL = ("银行", "科技", "电子", "医药", "能源", "证券", "地产", "汽车", "化工", "传媒",
              "电力", "钢铁", "食品", "通信", "材料", "机械", "环保", "农业", "航空", "软件")
_STAR_TAIL = ("微电子", "半导体", "生物", "智能", "芯片", "光电", "新材", "精密")
_ETF_INDEX = ("上证50", "沪深300", "中证500", "中证1000", "创业板", "科创50", "红利", "医药",
              "半导体", "证券", "黄金", "国债", "新能源", "消费", "深证100")
_BROKERS = ("华泰", "中信", "国泰君安", "招商", "广发", "海通", "申万宏源", "银河", "东方",
            "兴业", "光大", "平安", "国信", "长江", "安信", "方正", "东吴", "财通", "浙商", "华西")


# --------------------------------------------------------------------------------------------
# small helpers


def _decimal(values: np.ndarray, typ: pa.DataType, valid: np.ndarray | None = None) -> pa.Array:
    """Decimal128 array from integers already scaled to typ.scale (exact, no float round trip)."""
    v = np.ascontiguousarray(values, dtype=np.int64)
    data = np.empty((len(v), 2), dtype=np.int64)
    data[:, 0] = v
    data[:, 1] = v >> 63  # sign-extend into the high 64 bits of the 128-bit two's complement
    validity, nulls = None, 0
    if valid is not None and not valid.all():
        validity = pa.py_buffer(np.packbits(valid, bitorder="little"))
        nulls = int(len(v) - np.count_nonzero(valid))
    return pa.Array.from_buffers(typ, len(v), [validity, pa.py_buffer(data)], null_count=nulls)


def _take(dictionary: pa.Array, idx: np.ndarray, valid: np.ndarray | None = None) -> pa.Array:
    mask = None if valid is None or valid.all() else ~valid
    return pc.take(dictionary, pa.array(idx, mask=mask))


def _ids(prefix: str, start: int, n: int, width: int) -> pa.Array:
    nums = pa.array(np.arange(start, start + n, dtype=np.int64)).cast(pa.string())
    return pc.binary_join_element_wise(prefix, pc.utf8_lpad(nums, width=width, padding="0"), "")


def _code_strings(codes: np.ndarray) -> pa.Array:
    return pc.utf8_lpad(pa.array(codes.astype(np.int64)).cast(pa.string()), width=6, padding="0")


def _zipf_p(n: int, exponent: float, rng: np.random.Generator) -> np.ndarray:
    ranks = rng.permutation(n) + 1.0
    w = ranks**-exponent
    return w / w.sum()


def _pick(rng: np.random.Generator, cdf: np.ndarray, n: int) -> np.ndarray:
    """Inverse-CDF sampling of n indices (= searchsorted(cdf, u, "right")); cdf is
    non-decreasing with cdf[-1] the total weight."""
    total = cdf[-1]
    u = rng.random(n) * total
    # A binary search per draw is slow for 10^7 draws. Cut [0, total) into many more buckets
    # than cdf points: most buckets hold no cdf point, so one table lookup answers them; the
    # few draws in a bucket holding one (or next to one, against float rounding) search.
    grid_n = max(1 << 20, 64 * len(cdf))
    edges = np.arange(grid_n + 1) * (total / grid_n)
    at = np.searchsorted(cdf, edges, side="right")
    amb = at[:-1] != at[1:]
    amb[1:] |= amb[:-1].copy()
    amb[:-1] |= amb[1:].copy()
    b = np.minimum((u * (grid_n / total)).astype(np.int64), grid_n - 1)
    idx = at[b]
    hard = np.flatnonzero(amb[b])
    idx[hard] = np.searchsorted(cdf, u[hard], side="right")
    return np.minimum(idx, len(cdf) - 1).astype(np.int32)


def _largest_remainder(total: int, shares: Sequence[float]) -> np.ndarray:
    raw = np.asarray(shares, dtype=np.float64) * total
    out = np.floor(raw).astype(np.int64)
    rest = total - int(out.sum())
    if rest:
        out[np.argsort(-(raw - out), kind="stable")[:rest]] += 1
    return out


def _cumcount(keys: np.ndarray) -> np.ndarray:
    """0-based position of each element among the earlier elements with the same key."""
    order = np.argsort(keys, kind="stable")
    sk = keys[order]
    starts = np.flatnonzero(np.r_[True, sk[1:] != sk[:-1]])
    run = np.repeat(starts, np.diff(np.r_[starts, len(sk)]))
    out = np.empty(len(keys), dtype=np.int64)
    out[order] = np.arange(len(keys)) - run
    return out


# --------------------------------------------------------------------------------------------
# validation


def _validate(spec: MarketSpec) -> None:
    def bad(msg: str) -> None:
        raise ValueError(f"invalid MarketSpec: {msg}")

    for name in ("trades", "seed", "accounts", "securities", "participants",
                 "units_per_participant", "days"):
        v = getattr(spec, name)
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            bad(f"{name} must be an int, got {v!r}")
    if spec.trades < 0:
        bad(f"trades must be >= 0, got {spec.trades}")
    if spec.seed < 0:
        bad(f"seed must be >= 0, got {spec.seed}")
    if spec.accounts < 2:
        bad(f"accounts must be >= 2 (buyer and seller differ), got {spec.accounts}")
    if spec.accounts > 999_000_000:
        bad(f"accounts must fit A + 9 digits with room for unknown ids, got {spec.accounts}")
    if spec.securities < 1:
        bad(f"securities must be >= 1, got {spec.securities}")
    if not 1 <= spec.participants <= 9999:
        bad(f"participants must be in 1..9999, got {spec.participants}")
    if spec.units_per_participant < 1:
        bad(f"units_per_participant must be >= 1, got {spec.units_per_participant}")
    if spec.participants * spec.units_per_participant > 89_999:
        bad("participants * units_per_participant exceeds the 5-digit unit id space (89999)")
    if not 1 <= spec.days <= 2000:
        bad(f"days must be in 1..2000, got {spec.days}")
    if not isinstance(spec.start_date, datetime.date) or isinstance(
        spec.start_date, datetime.datetime
    ):
        bad(f"start_date must be a datetime.date, got {spec.start_date!r}")
    if spec.fmt not in _FMTS:
        bad(f"fmt must be one of {_FMTS}, got {spec.fmt!r}")
    for name in ("bad_rate", "cancel_rate"):
        v = getattr(spec, name)
        if not isinstance(v, (int, float)) or not 0.0 <= float(v) <= 1.0:
            bad(f"{name} must be in [0, 1], got {v!r}")
    if spec.bad_rate + spec.cancel_rate > 1.0:
        bad(f"bad_rate + cancel_rate must be <= 1, got {spec.bad_rate + spec.cancel_rate}")
    if spec.holdings is not None:
        if isinstance(spec.holdings, bool) or not isinstance(spec.holdings, (int, np.integer)):
            bad(f"holdings must be an int or None, got {spec.holdings!r}")
        if spec.holdings < 0:
            bad(f"holdings must be >= 0, got {spec.holdings}")
        if spec.holdings > spec.accounts * spec.securities:
            bad(f"holdings={spec.holdings} exceeds accounts*securities "
                f"({spec.accounts * spec.securities} distinct keys)")
    type_counts = _largest_remainder(spec.securities, _TYPE_SHARE)
    for t, n in enumerate(type_counts):
        for m, k in enumerate(_market_split(t, int(n))):
            cap = sum(hi - lo for lo, hi in _CODE_RANGES[(t, m)])
            if k > cap:
                bad(f"securities={spec.securities} needs {k} {_TYPES[t]} codes on "
                    f"{MARKETS[m]} but only {cap} exist")
    counts = _row_counts(spec)
    n_good = counts[K_GOOD]
    needs_source = counts[K_DUP] + counts[K_X_VALID:].sum()
    if needs_source and n_good == 0:
        bad("bad_rate + cancel_rate leave no good trade to duplicate or cancel")
    if counts[K_X_VALID] > n_good:
        bad(f"cancel_rate too high: {counts[K_X_VALID]} valid cancellations need as many "
            f"distinct good trades, only {n_good} exist")


def _market_split(t: int, n: int) -> tuple[int, int]:
    g = int(np.floor(n * _TYPE_XSHG_SHARE[t] + 0.5))
    return g, n - g


def _row_counts(spec: MarketSpec) -> np.ndarray:
    """Rows per kind (indexed by K_*); they sum to spec.trades."""
    counts = np.zeros(len(KIND_NAMES), dtype=np.int64)
    n_bad = int(np.floor(spec.trades * spec.bad_rate + 0.5))
    n_cancel = int(np.floor(spec.trades * spec.cancel_rate + 0.5))
    n_cancel = min(n_cancel, spec.trades - n_bad)
    counts[list(_BAD_KINDS)] = n_bad // len(_BAD_KINDS)
    counts[list(_BAD_KINDS[: n_bad % len(_BAD_KINDS)])] += 1
    minor = int(np.floor(n_cancel * 0.05 + 0.5))
    counts[K_X_UNKNOWN] = counts[K_X_MISMATCH] = counts[K_X_ALREADY] = minor
    counts[K_X_VALID] = n_cancel - 3 * minor
    if counts[K_X_VALID] < 0:  # tiny n_cancel: keep it simple, all valid
        counts[K_X_UNKNOWN:] = 0
        counts[K_X_VALID] = n_cancel
    if counts[K_X_VALID] == 0 and counts[K_X_ALREADY]:
        counts[K_X_VALID] += counts[K_X_ALREADY]
        counts[K_X_ALREADY] = 0
    counts[K_GOOD] = spec.trades - n_bad - n_cancel
    return counts


# --------------------------------------------------------------------------------------------
# calendar


def _holidays(years: range) -> np.ndarray:
    out = []
    for y in years:
        for lo, hi in _HOLIDAY_RANGES.get(y, _FALLBACK_HOLIDAYS):
            a = np.datetime64(f"{y}-{lo}")
            b = np.datetime64(f"{y}-{hi}")
            out.append(np.arange(a, b + 1, dtype="datetime64[D]"))
    return np.concatenate(out) if out else np.array([], dtype="datetime64[D]")


@dataclasses.dataclass
class _Calendar:
    trading_days: np.ndarray  # XSHG business days with trade files (datetime64[D])
    xshe_closed: np.ndarray  # bool per trading day: XSHE does not trade that day
    business: list[np.ndarray]  # per market: sorted business dates over the calendar range
    non_business: list[np.ndarray]  # per market: non-business dates near the trading range


def _make_calendar(spec: MarketSpec) -> _Calendar:
    start = np.datetime64(spec.start_date, "D")
    years = range(spec.start_date.year - 1, spec.start_date.year + spec.days // 200 + 3)
    hol = _holidays(years)
    first = np.busday_offset(start, 0, roll="forward", holidays=hol)
    trading = np.busday_offset(first, np.arange(spec.days + 1), holidays=hol)
    after, trading = trading[-1], trading[:-1]
    # Shenzhen closes for a typhoon on one day Shanghai trades (mid-range, or just after a
    # 1-day range) so the two calendars differ where it matters.
    typhoon = trading[(spec.days - 1) // 2] if spec.days >= 2 else after
    cal_lo = trading[0] - np.timedelta64(45, "D")
    cal_hi = trading[-1] + np.timedelta64(90, "D")
    span = np.arange(cal_lo, cal_hi + 1, dtype="datetime64[D]")
    shg = np.is_busday(span, holidays=hol)
    she = shg & (span != typhoon)
    near = (span >= trading[0] - np.timedelta64(10, "D")) & (span <= trading[-1])
    return _Calendar(
        trading_days=trading,
        xshe_closed=trading == typhoon,
        business=[span[shg], span[she]],
        non_business=[span[near & ~shg], span[near & ~she]],
    )


# --------------------------------------------------------------------------------------------
# reference data


@dataclasses.dataclass
class _Securities:
    market: np.ndarray  # int8 0 XSHG / 1 XSHE
    code: np.ndarray  # int
    stype: np.ndarray  # int8 index into _TYPES
    ids: pa.Array  # 6-digit strings
    table: pa.Table
    p_trade: np.ndarray  # activity probability (Zipf)
    p_hold: np.ndarray  # holding probability (flatter Zipf, same ranking)
    level: np.ndarray  # float (S, days): daily reference price
    prev_close: np.ndarray  # float (S, days)


def _make_securities(spec: MarketSpec, rng: np.random.Generator) -> _Securities:
    type_counts = _largest_remainder(spec.securities, _TYPE_SHARE)
    markets, codes, types = [], [], []
    for t, n in enumerate(type_counts):
        for m, k in enumerate(_market_split(t, int(n))):
            if k == 0:
                continue
            pool = np.concatenate([np.arange(lo, hi) for lo, hi in _CODE_RANGES[(t, m)]])
            codes.append(np.sort(rng.choice(pool, k, replace=False)))
            markets.append(np.full(k, m, dtype=np.int8))
            types.append(np.full(k, t, dtype=np.int8))
    market, code, stype = (np.concatenate(a) for a in (markets, codes, types))
    order = np.lexsort((code, market))
    market, code, stype = market[order], code[order], stype[order]
    s = len(code)

    head = np.array(_NAME_HEAD)[rng.integers(0, len(_NAME_HEAD), s)]
    tail = np.array(_NAME_TAIL)[rng.integers(0, len(_NAME_TAIL), s)]
    star = np.array(_STAR_TAIL)[rng.integers(0, len(_STAR_TAIL), s)]
    etf = np.char.add(np.array(_ETF_INDEX)[rng.integers(0, len(_ETF_INDEX), s)], "ETF")
    bond = np.char.add(
        np.char.add(rng.integers(18, 24, s).astype(str), "国债"),
        np.char.zfill(rng.integers(1, 31, s).astype(str), 2),
    )
    names = np.where(
        stype == _T_ASHARE,
        np.char.add(head, tail),
        np.where(stype == _T_STAR, np.char.add(head, star), np.where(stype == _T_ETF, etf, bond)),
    )
    ids = _code_strings(code)
    table = pa.table(
        {
            "market": pa.array(np.array(MARKETS)[market]),
            "security_id": ids,
            "name": pa.array(names.tolist(), pa.string()),
            "security_type": pa.array(np.array(_TYPES)[stype]),
            "currency": pa.array(np.full(s, "CNY")),
            "board_lot": pa.array(_BOARD_LOT[stype]),
            "securities_cycle": pa.array(np.zeros(s, dtype=np.int32)),
            "cash_cycle": pa.array(np.ones(s, dtype=np.int32)),
        }
    ).cast(REFDATA["securities"])

    ranks = rng.permutation(s) + 1.0
    p_trade = ranks**-1.1
    p_trade /= p_trade.sum()
    p_hold = ranks**-0.8
    p_hold /= p_hold.sum()

    base = np.select(
        [stype == _T_ASHARE, stype == _T_STAR, stype == _T_ETF],
        [
            np.clip(np.exp(rng.normal(np.log(12.0), 0.8, s)), 2.0, 300.0),
            np.clip(np.exp(rng.normal(np.log(35.0), 0.7, s)), 5.0, 500.0),
            np.clip(np.exp(rng.normal(np.log(1.5), 0.6, s)), 0.3, 8.0),
        ],
        np.clip(100.0 * np.exp(rng.normal(0.0, 0.03, s)), 90.0, 115.0),
    )
    steps = rng.normal(0.0, 1.0, (s, spec.days)) * _DAILY_VOL[stype][:, None]
    lim = 0.9 * _LIMIT[stype][:, None]
    level = base[:, None] * np.exp(np.cumsum(np.clip(steps, np.log1p(-lim), np.log1p(lim)), 1))
    prev_close = np.concatenate([base[:, None], level[:, :-1]], axis=1)
    return _Securities(market, code, stype, ids, table, p_trade, p_hold, level, prev_close)


@dataclasses.dataclass
class _Parties:
    account_part: np.ndarray  # int32 participant index per account
    units_of: np.ndarray  # int32 (participants, upp): unit index
    unit_ids: pa.Array
    account_ids: pa.Array
    tables: dict[str, pa.Table]


def _make_parties(spec: MarketSpec, rng: np.random.Generator) -> _Parties:
    p, upp, a = spec.participants, spec.units_per_participant, spec.accounts
    base = np.array(_BROKERS)[np.arange(p) % len(_BROKERS)]
    series = np.where(np.arange(p) < len(_BROKERS), "", (np.arange(p) // len(_BROKERS) + 1).astype(str))
    pnames = np.char.add(np.char.add(base, series), "证券股份有限公司")
    reserve_fen = np.rint(np.exp(rng.uniform(np.log(1e7), np.log(5e8), p)) * 100).astype(np.int64)
    participants = pa.table(
        {
            "participant_id": _ids("P", 1, p, 4),
            "name": pa.array(pnames.tolist(), pa.string()),
            "reserve_balance": _decimal(reserve_fen, MONEY),
        }
    )
    # Units are spread over participants in shuffled order so unit id ranges do not encode
    # the participant; each participant still gets exactly `upp` units.
    unit_part = rng.permutation(np.repeat(np.arange(p, dtype=np.int32), upp))
    units_of = np.argsort(unit_part, kind="stable").astype(np.int32).reshape(p, upp)
    pids = participants.column("participant_id").combine_chunks()
    unit_ids = _ids("", 10001, p * upp, 5)
    trading_units = pa.table({"unit_id": unit_ids, "participant_id": pids.take(unit_part)})

    account_part = _pick(rng, np.cumsum(_zipf_p(p, 0.9, rng)), a)
    individual = rng.random(a) < 0.85
    account_ids = _ids("A", 1, a, 9)
    accounts = pa.table(
        {
            "account_id": account_ids,
            "holder_type": _take(pa.array(["INSTITUTION", "INDIVIDUAL"]), individual.astype(np.int8)),
            "participant_id": pids.take(pa.array(account_part)),
        }
    )
    tables = {"participants": participants, "trading_units": trading_units, "accounts": accounts}
    tables = {k: v.cast(REFDATA[k]) for k, v in tables.items()}
    return _Parties(account_part, units_of, unit_ids, account_ids, tables)


def _holding_keys(spec: MarketSpec, sec: _Securities, rng: np.random.Generator) -> np.ndarray:
    """Sorted unique keys security*accounts + account: security-major, so each security's
    holders form one contiguous run."""
    a, s = spec.accounts, len(sec.code)
    h = spec.holdings if spec.holdings is not None else min(2 * a, a * s)
    total = a * s
    if h == 0:
        return np.zeros(0, dtype=np.int64)
    if 2 * h > total:  # dense: rejection sampling would stall, draw the keys directly
        return np.sort(rng.choice(total, h, replace=False)).astype(np.int64)
    cdf = np.cumsum(sec.p_hold)
    # One holder per security first, so every security can be sold by someone who owns it.
    k0 = min(s, h)
    seeds = np.arange(k0, dtype=np.int64) * a + rng.integers(0, a, k0)
    keys = seeds
    for attempt in range(64):
        need = h - len(keys)
        if need <= 0:
            break
        m = int(need * 1.25) + 64
        # After a few rounds only saturated top securities keep colliding: go uniform.
        s_idx = _pick(rng, cdf, m) if attempt < 4 else rng.integers(0, s, m)
        new = s_idx.astype(np.int64) * a + rng.integers(0, a, m)
        keys = unique_sorted(np.concatenate([keys, new]))
    if len(keys) > h:
        keep = np.zeros(len(keys), dtype=bool)
        keep[np.searchsorted(keys, seeds)] = True  # the one-holder-per-security seeds stay
        spare = np.flatnonzero(~keep)
        keys = np.delete(keys, spare[rng.choice(len(spare), len(keys) - h, replace=False)])
    return keys


# --------------------------------------------------------------------------------------------
# trades


@dataclasses.dataclass
class _Rows:
    """Column arrays of every trade row, in final file order once _order() ran."""

    file_day: np.ndarray  # int16 index into trading days
    # int64 µs of session time since the morning open; it is the row's trade_time too, except
    # for DUPLICATE_TRADE rows, which carry their source's time (see _trade_table).
    sort_time: np.ndarray
    date: np.ndarray  # int32 days since epoch
    market: np.ndarray  # int8
    sec: np.ndarray  # int32 index into the extended security-id dictionary
    price: np.ndarray  # int64 milli-yuan
    qty: np.ndarray  # int64
    buyer: np.ndarray  # int32 index into the extended account dictionary
    seller: np.ndarray
    bunit: np.ndarray  # int32 index into the extended unit dictionary
    sunit: np.ndarray
    rtype: np.ndarray  # int8 0 N / 1 X / 2 Z
    ref: np.ndarray  # int64, -1 = null
    trade_id: np.ndarray  # int64, filled by _assign_ids
    kind: np.ndarray  # int8 K_*
    src: np.ndarray  # int64 row this one copies (derived rows), -1 otherwise
    variant: np.ndarray  # int8 SCHEMA variant, -1 otherwise

    def take(self, idx: np.ndarray) -> _Rows:
        return _Rows(**{f.name: getattr(self, f.name)[idx] for f in dataclasses.fields(self)})

    @staticmethod
    def concat(parts: Sequence[_Rows]) -> _Rows:
        return _Rows(
            **{
                f.name: np.concatenate([getattr(p, f.name) for p in parts])
                for f in dataclasses.fields(_Rows)
            }
        )


def _intraday_cdf() -> tuple[np.ndarray, np.ndarray]:
    """CDF of match times over the trading day (fraction of session time): 70% uniform, 15%
    in a burst after the open and 15% before the close (exponential, 15-minute scale)."""
    x = np.linspace(0.0, 1.0, 4097)
    b = 15.0 / 240.0
    norm = 1.0 - np.exp(-1.0 / b)
    f = 0.70 * x + 0.15 * (1.0 - np.exp(-x / b)) / norm
    f += 0.15 * (np.exp(-(1.0 - x) / b) - np.exp(-1.0 / b)) / norm
    return f / f[-1], x


def _intraday(rng: np.random.Generator, n: int, *, sorted_: bool = False) -> np.ndarray:
    """n match times (µs of session time); sorted_ gives them in increasing order without a
    sort: cumulated exponential spacings are sorted uniforms, and the inverse CDF is monotone."""
    if sorted_:
        u = np.cumsum(rng.standard_exponential(n + 1))
        u = u[:-1] / u[-1]
    else:
        u = rng.random(n)
    f, x = _intraday_cdf()
    t = np.interp(u, f, x) * _DAY_US
    return np.minimum(t.astype(np.int64), _DAY_US - 1)


def _clock(offset: np.ndarray) -> np.ndarray:
    return np.where(
        offset < _SESSION_US,
        _MORNING_OPEN_US + offset,
        _AFTERNOON_OPEN_US + offset - _SESSION_US,
    )


def _primary_rows(
    spec: MarketSpec,
    cal: _Calendar,
    sec: _Securities,
    parties: _Parties,
    hold_sec: np.ndarray,
    hold_acct: np.ndarray,
    counts: np.ndarray,
    rng: np.random.Generator,
) -> tuple[_Rows, np.ndarray, np.ndarray]:
    """Good N rows and all bad rows except duplicates, sorted by (day, time).

    Returns the rows, the holding each sell came from (-1: a random seller) and the board
    lot of each row."""
    a, s, days = spec.accounts, len(sec.code), spec.days
    n = int(counts[K_GOOD] + sum(counts[k] for k in _BAD_KINDS if k != K_DUP))
    p_shg = float(sec.p_trade[sec.market == 0].sum())
    day_w = np.exp(rng.normal(0.0, 0.15, days)) * np.where(cal.xshe_closed, p_shg, 1.0)
    per_day = rng.multinomial(n, day_w / day_w.sum()) if n else np.zeros(days, dtype=np.int64)
    file_day = np.repeat(np.arange(days, dtype=np.int16), per_day)
    sort_time = np.empty(n, dtype=np.int64)
    bounds = np.r_[0, np.cumsum(per_day)]
    for d in range(days):
        sort_time[bounds[d] : bounds[d + 1]] = _intraday(rng, int(per_day[d]), sorted_=True)

    cdf_all = np.cumsum(sec.p_trade)
    si = _pick(rng, cdf_all, n)
    # XSHG always lists at least half of every type (see _market_split), so it is never empty.
    closed = cal.xshe_closed[file_day] & (sec.market[si] == 1)
    if closed.any():
        shg = np.flatnonzero(sec.market == 0)
        si[closed] = shg[_pick(rng, np.cumsum(sec.p_trade[shg]), int(closed.sum()))]
    st = sec.stype[si]
    market = sec.market[si]

    # price: the day's level with intraday noise, inside the daily limit, on the tick grid
    cell = si.astype(np.int64) * days + file_day
    noise = np.exp(rng.standard_normal(n, dtype=np.float32) * _INTRADAY_VOL[st].astype(np.float32))
    prev = sec.prev_close.ravel()[cell]
    lim = _LIMIT[st]
    lvl = np.clip(sec.level.ravel()[cell] * noise, prev * (1 - lim), prev * (1 + lim))
    del noise, prev, lim, cell
    tick = _TICK_MILLI[st]
    price = np.maximum(np.rint(lvl * (1000 / tick)).astype(np.int64), 1) * tick
    del lvl

    # quantity: heavy-tailed number of lots (STAR: shares from 200), capped per order
    lot = _BOARD_LOT[st]
    z = rng.standard_normal(n, dtype=np.float32)
    e = np.exp(_QTY_MU[st] + _QTY_SIGMA[st] * z)
    qty = np.minimum((_QTY_BASE[st] + np.floor(e).astype(np.int64)) * lot, _MAX_QTY[st])
    del z, e
    odd = np.flatnonzero((rng.random(n, dtype=np.float32) < _ODD_LOT_RATE) & (lot == 100))
    qty[odd] += rng.integers(1, 100, len(odd)) - 100

    # sellers: a holder of the security, picked uniformly in its run of holdings
    run_lo = np.searchsorted(hold_sec, np.arange(s))
    run_n = np.searchsorted(hold_sec, np.arange(s), side="right") - run_lo
    n_run = run_n[si]
    hidx = run_lo[si] + np.minimum((rng.random(n) * n_run).astype(np.int64), np.maximum(n_run - 1, 0))
    has_holder = (n_run > 0) & (rng.random(n, dtype=np.float32) >= _NEGATIVE_SELL_RATE)
    del n_run
    hidx[~has_holder] = -1
    # Active accounts trade far more often: rank ~ A*u^2 over a shuffled account order.
    acct_perm = rng.permutation(a).astype(np.int32)
    seller = acct_perm[np.minimum((a * rng.random(n) ** 2).astype(np.int64), a - 1)]
    if len(hold_acct):
        seller[has_holder] = hold_acct[hidx[has_holder]]
    buyer = acct_perm[np.minimum((a * rng.random(n) ** 2).astype(np.int64), a - 1)]
    clash = np.flatnonzero(buyer == seller)
    buyer[clash] = (buyer[clash] + 1) % a

    upp = spec.units_per_participant
    bunit = parties.units_of[parties.account_part[buyer], rng.integers(0, upp, n)]
    sunit = parties.units_of[parties.account_part[seller], rng.integers(0, upp, n)]

    # Bad kinds land on random rows; shuffling 10^7 kind codes would cost more.
    bad = np.concatenate([np.full(counts[k], k, dtype=np.int8) for k in _BAD_KINDS if k != K_DUP])
    kinds = np.zeros(n, dtype=np.int8)
    kinds[rng.choice(n, len(bad), replace=False)] = rng.permutation(bad)
    day_num = (cal.trading_days.astype(np.int64)).astype(np.int32)
    rows = _Rows(
        file_day=file_day,
        sort_time=sort_time,
        date=day_num[file_day],
        market=market,
        sec=si,
        price=price,
        qty=qty,
        buyer=buyer,
        seller=seller,
        bunit=bunit,
        sunit=sunit,
        rtype=np.zeros(n, dtype=np.int8),
        ref=np.full(n, -1, dtype=np.int64),
        trade_id=np.zeros(n, dtype=np.int64),
        kind=kinds,
        src=np.full(n, -1, dtype=np.int64),
        variant=np.full(n, -1, dtype=np.int8),
    )
    return rows, hidx, lot


@dataclasses.dataclass
class _Extras:
    """Dictionary entries appended after the real ids, used only by bad rows."""

    sec_ids: pa.Array
    unit_ids: pa.Array
    account_ids: pa.Array


def _make_extras(spec: MarketSpec, sec: _Securities, parties: _Parties,
                 rng: np.random.Generator) -> _Extras:
    k = _N_UNKNOWN
    # 9xxxxx is neither a listed code in our universe nor in any range we draw from.
    unk_sec = _code_strings(900000 + rng.choice(100000, k, replace=False))
    # Real units are 10001..99999, so a leading 0 is never a known unit.
    unit_nums = pa.array(rng.choice(10000, k, replace=False)).cast(pa.string())
    unk_unit = pc.binary_join_element_wise("0", pc.utf8_lpad(unit_nums, 4, "0"), "")
    hi = 999_999_999
    acct_nums = spec.accounts + 1 + rng.choice(hi - spec.accounts, k, replace=False)
    unk_acct = pc.binary_join_element_wise(
        "A", pc.utf8_lpad(pa.array(acct_nums).cast(pa.string()), 9, "0"), ""
    )
    return _Extras(
        sec_ids=pa.concat_arrays([sec.ids, unk_sec]),
        unit_ids=pa.concat_arrays([parties.unit_ids, unk_unit]),
        account_ids=pa.concat_arrays([parties.account_ids, unk_acct]),
    )


def _apply_bad_rows(spec: MarketSpec, rows: _Rows, cal: _Calendar, sec: _Securities,
                    parties: _Parties, rng: np.random.Generator) -> None:
    """Turn rows of each bad kind into rows that fail exactly that check of SPEC §3.

    Every mutation leaves the fields of the earlier checks valid: a BAD_PRICE row keeps its
    positive quantity, an UNKNOWN_ACCOUNT row keeps known security and units, etc."""
    s = len(sec.code)
    n_units = len(parties.unit_ids)

    i = np.flatnonzero(rows.kind == K_SCHEMA)
    n_var = _SCHEMA_Z + 1 + (len(_CSV_TEXT) if spec.fmt == "csv" else 0)
    rows.variant[i] = rng.integers(0, n_var, len(i))
    rows.rtype[i[rows.variant[i] == _SCHEMA_Z]] = 2

    i = np.flatnonzero(rows.kind == K_BAD_QTY)
    zero = rng.random(len(i)) < 0.5
    rows.qty[i] = np.where(zero, 0, -rows.qty[i])

    i = np.flatnonzero(rows.kind == K_BAD_PRICE)
    zero = rng.random(len(i)) < 0.5
    rows.price[i] = np.where(zero, 0, -rows.price[i])

    i = np.flatnonzero(rows.kind == K_UNK_SEC)
    # Half use a code listed on the *other* market, so only (market, security_id) exposes it.
    other = [np.flatnonzero(sec.market == 1), np.flatnonzero(sec.market == 0)]
    cross = rng.random(len(i)) < 0.5
    new = s + rng.integers(0, _N_UNKNOWN, len(i))
    for m in (0, 1):
        sel = cross & (rows.market[i] == m)
        if len(other[m]) and sel.any():
            new[sel] = rng.choice(other[m], int(sel.sum()))
    rows.sec[i] = new.astype(np.int32)

    i = np.flatnonzero(rows.kind == K_UNK_UNIT)
    side = rng.random(len(i)) < 0.5
    unk = (n_units + rng.integers(0, _N_UNKNOWN, len(i))).astype(np.int32)
    rows.bunit[i] = np.where(side, unk, rows.bunit[i])
    rows.sunit[i] = np.where(side, rows.sunit[i], unk)

    i = np.flatnonzero(rows.kind == K_UNK_ACCT)
    side = rng.random(len(i)) < 0.5
    unk = (spec.accounts + rng.integers(0, _N_UNKNOWN, len(i))).astype(np.int32)
    rows.buyer[i] = np.where(side, unk, rows.buyer[i])
    rows.seller[i] = np.where(side, rows.seller[i], unk)

    i = np.flatnonzero(rows.kind == K_NBD)
    for m in (0, 1):
        sel = i[rows.market[i] == m]
        cands = cal.non_business[m]
        rows.date[sel] = cands[rng.integers(0, len(cands), len(sel))].astype(np.int64)


def _derived_rows(rows: _Rows, counts: np.ndarray, days: int, rng: np.random.Generator,
                  lot: np.ndarray, tick: np.ndarray) -> _Rows:
    """Cancellations and duplicates, each copying an earlier good N row (or a valid X)."""
    good = np.flatnonzero(rows.kind == K_GOOD)
    n_prim = len(rows.kind)
    parts: list[_Rows] = []

    def copy(src: np.ndarray, kind: int) -> _Rows:
        r = rows.take(src)
        r.kind = np.full(len(src), kind, dtype=np.int8)
        r.src = src.astype(np.int64)
        r.variant = np.full(len(src), -1, dtype=np.int8)
        return r

    def later(t: np.ndarray) -> np.ndarray:
        return np.minimum(t + 1 + rng.exponential(20 * 60e6, len(t)).astype(np.int64), _DAY_US - 1)

    xv_src = rng.choice(good, int(counts[K_X_VALID]), replace=False) if len(good) else good[:0]
    xv = copy(xv_src, K_X_VALID)
    xv.rtype[:] = 1
    xv.sort_time = later(xv.sort_time)
    parts.append(xv)

    def pick(k: int) -> np.ndarray:
        return rng.choice(good, k) if k else good[:0]

    unk = copy(pick(int(counts[K_X_UNKNOWN])), K_X_UNKNOWN)
    unk.rtype[:] = 1
    unk.ref = _UNKNOWN_REF_BASE + rng.integers(0, 1_000_000_000, len(unk.ref))
    unk.sort_time = later(unk.sort_time)
    parts.append(unk)

    mm_src = pick(int(counts[K_X_MISMATCH]))
    mm = copy(mm_src, K_X_MISMATCH)
    mm.rtype[:] = 1
    bump_qty = rng.random(len(mm_src)) < 0.5
    mm.qty = np.where(bump_qty, mm.qty + lot[mm_src], mm.qty)
    mm.price = np.where(bump_qty, mm.price, mm.price + tick[mm_src])
    mm.sort_time = later(mm.sort_time)
    parts.append(mm)

    dup_src = pick(int(counts[K_DUP]))
    dup = copy(dup_src, K_DUP)
    # A quarter are yesterday's trades re-sent in today's file; the rest re-sent same day.
    next_day = (rng.random(len(dup_src)) < 0.25) & (dup.file_day < days - 1)
    dup.file_day = np.where(next_day, dup.file_day + 1, dup.file_day).astype(np.int16)
    dup.sort_time = np.where(next_day, _intraday(rng, len(dup_src)), later(dup.sort_time))
    parts.append(dup)

    # ALREADY_CANCELLED repeats a valid X; it is appended after every X so equal times keep
    # it behind its first cancellation in the stable sort.
    k = int(counts[K_X_ALREADY])
    pos = rng.choice(len(xv_src), k) if k else np.zeros(0, dtype=np.int64)
    alr = xv.take(pos)
    alr.kind = np.full(k, K_X_ALREADY, dtype=np.int8)
    alr.src = (n_prim + pos).astype(np.int64)  # index of the valid X in concat order
    alr.sort_time = later(alr.sort_time)
    parts.append(alr)
    return _Rows.concat(parts)


def _merge(prim: _Rows, der: _Rows) -> _Rows:
    """Rows in file order: by (file day, time), copies after every row with an equal key.

    prim is already in that order; der (usually small) is sorted and slotted in, which is
    much cheaper than sorting all rows. der.src indexes prim, or der itself when >= len(prim)."""
    n_p, n_d = len(prim.kind), len(der.kind)
    pkey = (prim.file_day.astype(np.int64) << 36) | prim.sort_time
    dkey = (der.file_day.astype(np.int64) << 36) | der.sort_time
    dord = np.argsort(dkey, kind="stable")
    der = der.take(dord)
    dpos = np.searchsorted(pkey, dkey[dord], side="right") + np.arange(n_d)
    del pkey, dkey
    is_der = np.zeros(n_p + n_d, dtype=bool)
    is_der[dpos] = True
    is_prim = ~is_der
    ppos = np.flatnonzero(is_prim)
    dinv = np.empty(n_d, dtype=np.int64)
    dinv[dord] = np.arange(n_d)
    src = der.src.copy()
    fp = (der.src >= 0) & (der.src < n_p)
    src[fp] = ppos[der.src[fp]]
    fd = der.src >= n_p
    src[fd] = dpos[dinv[der.src[fd] - n_p]]
    der.src = src
    merged = {}
    for f in dataclasses.fields(_Rows):
        a, b = getattr(prim, f.name), getattr(der, f.name)
        out = np.empty(n_p + n_d, dtype=a.dtype)
        out[is_prim] = a
        out[is_der] = b
        merged[f.name] = out
        setattr(prim, f.name, None)  # free the primary column as soon as it is copied
    return _Rows(**merged)


def _assign_ids(rows: _Rows, days: int) -> None:
    fresh = (rows.kind != K_DUP) & (rows.kind != K_NBD)
    bounds = np.searchsorted(rows.file_day, np.arange(days + 1))
    for d in range(days):
        lo, hi = bounds[d], bounds[d + 1]
        f = fresh[lo:hi]
        m = rows.market[lo:hi]
        for mk in (0, 1):
            sel = f & (m == mk)
            rows.trade_id[lo:hi][sel] = np.cumsum(sel)[sel]
    nbd = np.flatnonzero(rows.kind == K_NBD)
    if len(nbd):
        key = rows.market[nbd].astype(np.int64) * 1_000_000 + rows.date[nbd]
        rows.trade_id[nbd] = _cumcount(key) + 1
    # Copies take their ids from their source: a good N row with a fresh id, or for
    # ALREADY_CANCELLED a valid X whose ref is set just before.
    dup = np.flatnonzero(rows.kind == K_DUP)
    rows.trade_id[dup] = rows.trade_id[rows.src[dup]]
    x = np.flatnonzero((rows.kind == K_X_VALID) | (rows.kind == K_X_MISMATCH))
    rows.ref[x] = rows.trade_id[rows.src[x]]
    again = np.flatnonzero(rows.kind == K_X_ALREADY)
    rows.ref[again] = rows.ref[rows.src[again]]


# --------------------------------------------------------------------------------------------
# writers


def _write(table: pa.Table, path: Path, fmt: str, name: str) -> None:
    if fmt == "parquet":
        pq.write_table(table, path, compression="zstd", row_group_size=_ROW_GROUP, **_parquet_options(name))
    else:
        cols = [c.cast(pa.string()) for c in table.columns]
        _write_csv_text(pa.table(cols, names=table.column_names), path)


# Every value is plain text without separators, so no quoting at all: numbers stay bare and
# nulls are empty fields. The writer raises if a value ever needs quotes.
_CSV_OPTS = pacsv.WriteOptions(quoting_style="none", quoting_header="none")


def _write_csv_text(table: pa.Table, path: Path) -> None:
    pacsv.write_csv(table, path, write_options=_CSV_OPTS)


def _trade_table(rows: _Rows, lo: int, hi: int, ext: _Extras) -> tuple[pa.Table, np.ndarray]:
    sl = slice(lo, hi)
    variant = rows.variant[sl]
    cols = {}
    valid = {name: variant != j for j, name in enumerate(INPUT_REQUIRED)}
    cols["trade_id"] = pa.array(rows.trade_id[sl], pa.int64(), mask=~valid["trade_id"])
    cols["market"] = _take(pa.array(list(MARKETS)), rows.market[sl], valid["market"])
    cols["trade_date"] = pa.array(rows.date[sl], pa.date32(), mask=~valid["trade_date"])
    tt = rows.sort_time[sl].copy()
    dup = np.flatnonzero(rows.kind[sl] == K_DUP)
    tt[dup] = rows.sort_time[rows.src[sl][dup]]
    cols["trade_time"] = pa.array(_clock(tt), pa.time64("us"), mask=~valid["trade_time"])
    cols["security_id"] = _take(ext.sec_ids, rows.sec[sl], valid["security_id"])
    cols["price"] = _decimal(rows.price[sl], PRICE, valid["price"])
    cols["quantity"] = pa.array(rows.qty[sl], pa.int64(), mask=~valid["quantity"])
    cols["buy_account"] = _take(ext.account_ids, rows.buyer[sl], valid["buy_account"])
    cols["sell_account"] = _take(ext.account_ids, rows.seller[sl], valid["sell_account"])
    cols["buy_unit"] = _take(ext.unit_ids, rows.bunit[sl], valid["buy_unit"])
    cols["sell_unit"] = _take(ext.unit_ids, rows.sunit[sl], valid["sell_unit"])
    cols["record_type"] = _take(pa.array(["N", "X", "Z"]), rows.rtype[sl], valid["record_type"])
    ref = rows.ref[sl]
    cols["ref_trade_id"] = pa.array(ref, pa.int64(), mask=ref < 0)
    return pa.table(cols, schema=INPUT_TRADE), variant


def _write_trade_file(rows: _Rows, lo: int, hi: int, ext: _Extras, path: Path, fmt: str,
                      year: int) -> None:
    table, variant = _trade_table(rows, lo, hi, ext)
    if fmt == "parquet":
        pq.write_table(table, path, compression="zstd", row_group_size=_ROW_GROUP,
                       **_parquet_options("trades"))
        return
    cols = {name: table.column(name).cast(pa.string()) for name in table.column_names}
    for v, (name, text) in _CSV_TEXT.items():
        hit = variant == v
        if hit.any():
            lit = text if text is not None else f"{year}-02-30"
            cols[name] = pc.if_else(pa.array(hit), pa.scalar(lit), cols[name])
    _write_csv_text(pa.table(cols), path)


# --------------------------------------------------------------------------------------------
# remaining reference tables


def _fees_table() -> pa.Table:
    d = datetime.date
    rows = []  # (code, type, side, rate in 1e-8, from, to)
    for t, since in (("A_SHARE", d(2008, 9, 19)), ("STAR", d(2019, 7, 22))):
        rows += [
            ("STAMP_DUTY", t, "SELL", 100_000, since, d(2023, 8, 27)),
            ("STAMP_DUTY", t, "SELL", 50_000, d(2023, 8, 28), None),
            ("HANDLING", t, "BOTH", 4_870, d(2012, 9, 1), d(2023, 8, 27)),
            ("HANDLING", t, "BOTH", 3_410, d(2023, 8, 28), None),
        ]
    rows += [
        # ETFs and bonds have their own exchange handling rates and pay no stamp duty.
        ("HANDLING", "ETF", "BOTH", 4_000, d(2012, 9, 1), None),
        ("HANDLING", "BOND", "BOTH", 100, d(2012, 9, 1), None),
        ("MANAGEMENT", "*", "BOTH", 2_000, d(2012, 9, 1), None),
        ("TRANSFER", "*", "BOTH", 2_000, d(2015, 8, 1), d(2022, 4, 28)),
        ("TRANSFER", "*", "BOTH", 1_000, d(2022, 4, 29), None),
    ]
    full = [(c, m, t, side, r, f, to) for m in MARKETS for (c, t, side, r, f, to) in rows]
    cols = list(zip(*full, strict=True))
    return pa.table(
        {
            "fee_code": pa.array(cols[0]),
            "market": pa.array(cols[1]),
            "security_type": pa.array(cols[2]),
            "side": pa.array(cols[3]),
            "rate": _decimal(np.array(cols[4], dtype=np.int64), RATE),
            "effective_from": pa.array(cols[5], pa.date32()),
            "effective_to": pa.array(cols[6], pa.date32()),
        }
    ).cast(REFDATA["fees"])


def _calendar_table(cal: _Calendar) -> pa.Table:
    markets = np.concatenate([np.full(len(b), m, dtype=np.int8) for m, b in enumerate(cal.business)])
    dates = np.concatenate(cal.business).astype(np.int64).astype(np.int32)
    return pa.table(
        {"market": _take(pa.array(list(MARKETS)), markets), "business_date": pa.array(dates, pa.date32())}
    ).cast(REFDATA["calendar"])


def _corporate_actions(cal: _Calendar, sec: _Securities, hold_sec: np.ndarray,
                       rng: np.random.Generator) -> pa.Table:
    trading = cal.trading_days
    held = np.zeros(len(sec.code), dtype=bool)
    held[hold_sec] = True
    eligible = np.flatnonzero(np.isin(sec.stype, (_T_ASHARE, _T_STAR)) & held)
    n = int(np.clip(len(sec.code) // 40, 2, 8))
    chosen = eligible[np.argsort(-sec.p_trade[eligible], kind="stable")][: 2 * n]
    recs = []  # (sec index, record, ex/pay)
    for s_i in chosen:
        m = int(sec.market[s_i])
        bus = cal.business[m]
        days_m = bus[(bus >= trading[0]) & (bus <= trading[-1])]
        if len(days_m) < 2:
            continue
        r = days_m[rng.integers(0, len(days_m) - 1)]
        recs.append((s_i, r, bus[np.searchsorted(bus, r, side="right")]))
        if len(recs) == n:
            break
    k = len(recs)
    si = np.array([r[0] for r in recs], dtype=np.int64)
    rec = np.array([r[1] for r in recs], dtype="datetime64[D]").astype(np.int64).astype(np.int32)
    exd = np.array([r[2] for r in recs], dtype="datetime64[D]").astype(np.int64).astype(np.int32)
    is_cash = np.arange(k) % 2 == 0
    # Issuers announce per 10 shares (e.g. 2.85 CNY / 10 -> 0.285); some per share to 5 places.
    micro_cash = np.where(
        rng.random(k) < 0.5,
        rng.integers(5, 1500, k) * 1000,
        rng.integers(1000, 150_000, k) * 10,
    )
    micro_bonus = np.array([100_000, 200_000, 300_000, 400_000, 500_000, 1_000_000])[
        rng.integers(0, 6, k)
    ]
    return pa.table(
        {
            "ca_id": _ids("CA", 1, k, 8),
            "market": _take(pa.array(list(MARKETS)), sec.market[si].astype(np.int8)),
            "security_id": sec.ids.take(pa.array(si)),
            "ca_type": pa.array(np.where(is_cash, "CASH_DIVIDEND", "BONUS_SHARES")),
            "record_date": pa.array(rec, pa.date32()),
            "ex_date": pa.array(exd, pa.date32()),
            "pay_date": pa.array(exd, pa.date32()),
            "cash_per_share": _decimal(micro_cash, PER_SHARE, is_cash),
            "shares_per_share": _decimal(micro_bonus, PER_SHARE, ~is_cash),
        },
    ).cast(REFDATA["corporate_actions"])


def _cash_movements(cal: _Calendar, participants: pa.Table, rng: np.random.Generator) -> pa.Table:
    p = participants.num_rows
    k = min(p, 4)
    who = np.sort(rng.choice(p, k, replace=False))
    # Value dates are cash settlement days (T+1 of a trading day) on the XSHG calendar.
    bus = cal.business[0]
    settle = bus[np.searchsorted(bus, cal.trading_days, side="right")]
    when = settle[rng.integers(0, len(settle), k)].astype(np.int64).astype(np.int32)
    amount = rng.integers(1_000_000, 50_000_000, k) * 100 + rng.integers(0, 100, k)
    amount = np.where(np.arange(k) % 3 == 2, -amount // 10, amount)  # every 3rd a withdrawal
    return pa.table(
        {
            "participant_id": participants.column("participant_id").take(pa.array(who)),
            "value_date": pa.array(when, pa.date32()),
            "amount": _decimal(amount, MONEY),
        }
    ).cast(REFDATA["cash_movements"])


# --------------------------------------------------------------------------------------------
# entry point


def _clean(directory: Path, names: Sequence[str]) -> None:
    """Drop files a previous run with another fmt or day count left behind: loaders take
    every matching file, so stale ones would be read as input."""
    for name in names:
        for fmt in _FMTS:
            for old in directory.glob(f"{name}.{fmt}"):
                old.unlink()


def _parquet_options(name: str) -> dict:
    if name == "trades":
        low = ("trade_date", "market", "security_id", "buy_unit", "sell_unit", "record_type")
        stats = [n for n in INPUT_TRADE.names if not n.endswith(("_account", "_unit"))]
    elif name == "holdings":
        low, stats = ("market", "security_id"), ["market", "security_id", "quantity"]
    else:
        return {}
    # Dictionary-encoding and min/max of million-valued account ids cost time and buy nothing.
    return {"use_dictionary": list(low), "write_statistics": stats}


def _holdings_table(spec: MarketSpec, sec: _Securities, parties: _Parties, hold_sec: np.ndarray,
                    hold_acct: np.ndarray, sold: np.ndarray, rng: np.random.Generator) -> pa.Table:
    # Opening positions cover everything each holding sells in good trades, so the only
    # negative positions come from the deliberate random sellers.
    hst = sec.stype[hold_sec]
    hlot = _BOARD_LOT[hst]
    z = rng.standard_normal(len(hold_sec), dtype=np.float32)
    base = (_QTY_BASE[hst] + np.floor(np.exp(np.log(np.float32(10.0)) + 1.3 * z)).astype(np.int64)) * hlot
    odd = np.flatnonzero((rng.random(len(hold_sec), dtype=np.float32) < 0.08) & (hlot == 100))
    base[odd] += rng.integers(1, 100, len(odd))  # odd lots left over from bonus shares
    return pa.table(
        {
            "account_id": parties.account_ids.take(pa.array(hold_acct)),
            "market": _take(pa.array(list(MARKETS)), sec.market[hold_sec]),
            "security_id": sec.ids.take(pa.array(hold_sec)),
            "quantity": pa.array(base + sold),
        }
    ).cast(REFDATA["holdings"])


def generate_market(out_dir: str | os.PathLike, spec: MarketSpec) -> GenerateSummary:
    """Write refdata and trade files for `spec` under out_dir; see the module docstring."""
    t0 = time.perf_counter()
    _validate(spec)
    out = Path(out_dir)
    ref_dir, trade_dir, exp_dir = out / "refdata", out / "trades", out / "expected"
    for d in (ref_dir, trade_dir, exp_dir):
        d.mkdir(parents=True, exist_ok=True)
    _clean(ref_dir, list(REFDATA))
    _clean(trade_dir, ["trades-*"])

    root = np.random.default_rng(spec.seed)
    g_sec, g_party, g_hold, g_trade, g_bad, g_derived, g_ref, g_extra = root.spawn(8)
    # Files are written by background threads while the main thread keeps generating; Arrow
    # and most numpy kernels release the GIL, so the two overlap on a 2-core machine.
    pool = ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1)))
    jobs = []

    def write_ref(name: str, table: pa.Table) -> None:
        table = table.select(REFDATA[name].names)
        jobs.append(pool.submit(_write, table, ref_dir / f"{name}.{spec.fmt}", spec.fmt, name))

    try:
        cal = _make_calendar(spec)
        sec = _make_securities(spec, g_sec)
        parties = _make_parties(spec, g_party)
        write_ref("securities", sec.table)
        for name, table in parties.tables.items():
            write_ref(name, table)
        write_ref("calendar", _calendar_table(cal))
        write_ref("fees", _fees_table())

        hold_keys = _holding_keys(spec, sec, g_hold)
        hold_sec = (hold_keys // spec.accounts).astype(np.int32)
        hold_acct = (hold_keys % spec.accounts).astype(np.int32)
        del hold_keys
        counts = _row_counts(spec)
        ext = _make_extras(spec, sec, parties, g_extra)
        prim, hidx, lot = _primary_rows(spec, cal, sec, parties, hold_sec, hold_acct, counts, g_trade)

        good = np.flatnonzero((prim.kind == K_GOOD) & (hidx >= 0))
        sold = np.bincount(hidx[good], weights=prim.qty[good], minlength=len(hold_sec))
        del good, hidx
        write_ref("holdings", _holdings_table(spec, sec, parties, hold_sec, hold_acct,
                                              np.rint(sold).astype(np.int64), g_hold))
        write_ref("corporate_actions", _corporate_actions(cal, sec, hold_sec, g_ref))
        write_ref("cash_movements", _cash_movements(cal, parties.tables["participants"], g_ref))
        del sold, hold_acct

        _apply_bad_rows(spec, prim, cal, sec, parties, g_bad)
        tick = _TICK_MILLI[sec.stype[np.minimum(prim.sec, len(sec.code) - 1)]]
        derived = _derived_rows(prim, counts, spec.days, g_derived, lot, tick)
        del lot, tick
        rows = _merge(prim, derived)
        del prim, derived
        _assign_ids(rows, spec.days)

        bounds = np.searchsorted(rows.file_day, np.arange(spec.days + 1))
        names = [f"trades-{d.astype(datetime.date):%Y%m%d}.{spec.fmt}" for d in cal.trading_days]
        paths = [trade_dir / n for n in names]
        year = int(cal.trading_days[0].astype(datetime.date).year)
        for d in range(spec.days):
            jobs.append(pool.submit(_write_trade_file, rows, int(bounds[d]), int(bounds[d + 1]),
                                    ext, paths[d], spec.fmt, year))

        flagged = np.flatnonzero((rows.kind != K_GOOD) & (rows.kind != K_X_VALID))
        fday = rows.file_day[flagged]
        manifest = pa.table(
            {
                "file": pa.array(np.array(names, dtype=object)[fday].tolist(), pa.string()),
                "source_row": pa.array(flagged - bounds[fday], pa.int64()),
                "reason": pa.array(np.array(KIND_NAMES, dtype=object)[rows.kind[flagged]].tolist(),
                                   pa.string()),
            }
        )
        pq.write_table(manifest, exp_dir / "quarantine.parquet")
        for j in jobs:
            j.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return GenerateSummary(
        out_dir=str(out),
        trade_files=tuple(str(p) for p in paths),
        refdata_dir=str(ref_dir),
        rows=len(rows.kind),
        bad_rows=int(counts[list(_BAD_KINDS)].sum()),
        cancel_rows=int(counts[K_X_VALID:].sum()),
        seconds=time.perf_counter() - t0,
    )
