"""Clearing (SPEC §4): amounts, fees, participants and settlement dates per trade, then netting.

Data model:
  prepare_rows  frames["validation_rows"] (row-wise, several windows' inputs at once) ->
           frames["clearing_rows"]: _PER_TRADE row-aligned with them, null for the rows
           that failed a stateless check
  prepare  frames["validation_prepared"] rows that passed the stateless checks (+ the
           window's slice of frames["clearing_rows"] where the engine made them) ->
           frames["clearing_prepared"]: seq -> the per-trade columns (_PER_TRADE), unsigned;
           settlement dates null past a calendar's end
  in   frames["accepted"] (+ frames["clearing_prepared"] when prepare ran)
  out  frames["cleared"]: accepted + security info, participants, int fen amount and fees
       (signed: an X row carries the negation of its trade), settlement dates
  finish  frames["cleared"] ->
       frames["obligations_securities_delta"], frames["obligations_cash_delta"]: this
       window's contribution per obligation key (output rows: the self-checks and the
       window's digest); the cash table is their sum (a storage view)
       frames["obligations_securities_idx"]: the securities rows keyed by reference row
       indices, which the engine adds up into the stored snapshot (engine.py, obligations.py)

Invariants: fees are computed per trade, per side, per matching fee row on the rounded
amount and then added per fee code; per window Σ net_quantity = 0 per (market, trade_date,
security) and Σ net_amount = −Σ fees per (market, trade_date) (checked in checks.py).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import numpy as np
import polars as pl

from settle_arrow import money, schema
from settle_arrow.errors import UserError
from settle_arrow.refdata import RefData
from settle_arrow.stages.base import StageContext, Window
from settle_arrow.stages.validate import passed_stateless

FEE_COLS = list(schema.FEE_COLUMNS.values())
# Largest product of radices a packed netting key may have (int64 with room to spare).
PACKED_KEY_MAX = 1 << 62
# The fee columns of a cleared trade, in the order of _fee_rates' second axis.
_FEE_OUT = [f"{side}_{col}" for side in ("buy", "sell") for col in FEE_COLS]
_MONEY_COLS = ["net_amount", "buy_amount", "sell_amount", *FEE_COLS]
_QUANTITY_COLS = ("net_quantity", "buy_quantity", "sell_quantity")
# frames["obligations_securities_idx"]: the securities obligations keyed by reference row
# indices (participant row, sec_idx), as the commit lane adds them up between folds.
_IDX_COLUMNS = ("trade_date", "securities_settle_date", "part_idx", "sec_idx", *_QUANTITY_COLS)
# Regimes whose fee rates ref.memo keeps at most (a class per market, type and cycles times
# the trade dates seen): the memo is emptied when it would outgrow this.
REGIME_RATES_MAX = 100_000
# Netting adds legs into one slot per possible key when the keys span at most this many
# slots per leg (or DENSE_GROUPS_MIN): memory and the scan of the slots stay O(legs);
# wider key spans (many days or participants in one piece) hash-group instead.
DENSE_GROUPS_PER_LEG = 4
DENSE_GROUPS_MIN = 1 << 16


class CalendarError(UserError):
    """A settlement date falls beyond the end of a market's calendar (reference data gap)."""


def _matching_fees(ref: RefData, regimes: pl.DataFrame) -> pl.DataFrame:
    """(regime, side, fee column, rate units) of each fee row that applies to a regime."""
    fees = ref.fees.with_columns(
        pl.when(pl.col("side") == "BOTH").then(pl.lit(["BUY", "SELL"])).otherwise(pl.concat_list("side")).alias("side")
    ).explode("side")
    m = regimes.join(fees, on="market", how="inner").filter(
        ((pl.col("security_type_right") == "*") | (pl.col("security_type_right") == pl.col("security_type")))
        & (pl.col("trade_date") >= pl.col("effective_from"))
        & (pl.col("effective_to").is_null() | (pl.col("trade_date") <= pl.col("effective_to")))
    )
    return m.select(
        "regime",
        "side",
        pl.col("fee_code").replace_strict(schema.FEE_COLUMNS).alias("fee_col"),
        "rate_units",
    )


def _regimes(ref: RefData, sec_idx: np.ndarray, trade_date: pl.Series) -> tuple[np.ndarray, pl.DataFrame]:
    """(regime of each row, the regimes with their class `cls`): a regime is a (security
    class, trade date), all that fees and settlement dates depend on besides the amount.
    Integer keys and no join (measured, 100 k rows: a unique and a join on the strings
    took 16 ms)."""
    cls_of_sec, classes = ref.security_classes
    day = trade_date.cast(pl.Int32).to_numpy().astype(np.int64)
    if not len(day):
        return np.zeros(0, np.int64), classes.clear().with_columns(
            pl.lit(None, dtype=pl.Int64).alias("cls"), pl.lit(None, dtype=pl.Date).alias("trade_date"))
    day_min = int(day.min())
    span = int(day.max()) - day_min + 1
    key = cls_of_sec[sec_idx] * span + (day - day_min)
    if classes.height * span <= 4 * len(key):  # dense: a presence table, no sort
        present = np.zeros(classes.height * span, dtype=bool)
        present[key] = True
        keys = np.flatnonzero(present)
        rank = np.cumsum(present) - 1
        regime = rank[key]
    else:
        keys, regime = np.unique(key, return_inverse=True)
    regimes = classes[keys // span].hstack([  # hstack: no query's fixed cost
        pl.Series("cls", keys // span, dtype=pl.Int64),
        _dates("trade_date", keys % span + day_min),
    ])
    return regime, regimes


def _fee_rates(ref: RefData, regimes: pl.DataFrame) -> np.ndarray:
    """rates[regime, fee column (_FEE_OUT), slot]: the rate units of each fee row that
    matches the regime (0 past its last). Reference data never change under a RefData, so
    a regime's rates are computed once, on its first window, and kept in ref.memo (the fee
    schedule's join cost 3.5 ms a window, measured)."""
    memo = ref.memo.setdefault("fee_rates", {})
    keys = list(zip(regimes["cls"].to_list(), regimes["trade_date"].cast(pl.Int32).to_list(), strict=True))
    # A local copy of what is needed: another thread may clear the memo meanwhile.
    got = {k: memo.get(k) for k in keys}
    missing = [i for i, k in enumerate(keys) if got[k] is None]
    if missing:
        rows: list[list[list[int]]] = [[[] for _ in _FEE_OUT] for _ in missing]
        matching = _matching_fees(ref, regimes[missing].with_row_index("regime"))
        # One iteration per matching fee row of the new regimes (the schedule's shape).
        for j, side, col, rate in matching.iter_rows():
            rows[j][_FEE_OUT.index(f"{side.lower()}_{col}")].append(rate)
        if len(memo) + len(missing) > REGIME_RATES_MAX:
            memo.clear()
        for j, i in enumerate(missing):
            got[keys[i]] = memo[keys[i]] = tuple(tuple(r) for r in rows[j])
    width = max((len(r) for k in keys for r in got[k]), default=0)
    rates = np.zeros((len(keys), len(_FEE_OUT), max(1, width)), dtype=np.int64)
    for g, k in enumerate(keys):
        for c, r in enumerate(got[k]):
            rates[g, c, : len(r)] = r
    return rates


def _fees(ref: RefData, regimes: pl.DataFrame, regime: np.ndarray, amount: np.ndarray) -> dict[str, np.ndarray]:
    """Each fee column (_FEE_OUT) of each trade, in fen."""
    # Imported here: numba loads in a background thread at start-up (kernel_loader), off
    # the restart's path.
    from settle_arrow.kernels import fees_fen

    if not len(amount):
        return {name: np.zeros(0, dtype=np.int64) for name in _FEE_OUT}
    out = fees_fen(amount, regime.astype(np.int64, copy=False), _fee_rates(ref, regimes))
    return dict(zip(_FEE_OUT, out, strict=True))


def _settle_dates(ref: RefData, regimes: pl.DataFrame) -> dict[str, np.ndarray]:
    """Securities/cash settlement date (days since 1970) of each regime; -1 where the
    market's calendar ends first (raised as CalendarError only for a trade that is
    accepted: see Clear.process)."""
    days = regimes["trade_date"].cast(pl.Int32).to_numpy()
    cycle_of = {"securities_settle_date": "securities_cycle", "cash_settle_date": "cash_cycle"}
    dates = {name: np.full(regimes.height, -1, np.int32) for name in cycle_of}
    markets = regimes["market"].to_numpy()
    for m in np.unique(markets):
        cal = ref.business_days(m)
        sel = markets == m
        base = np.searchsorted(cal, days[sel])
        for name, out in dates.items():
            idx = base + regimes[cycle_of[name]].to_numpy()[sel]
            inside = idx < len(cal)
            out[np.flatnonzero(sel)[inside]] = cal[idx[inside]]
    return dates


def _require_settle_dates(accepted: pl.DataFrame, per_trade: pl.DataFrame) -> None:
    """CalendarError for the first trade whose settlement date is past its calendar's end
    (`per_trade`'s rows are `accepted`'s)."""
    if not (per_trade["securities_settle_date"].null_count() or per_trade["cash_settle_date"].null_count()):
        return  # the usual window: two counts the columns keep, not a filter (0.3 ms, measured)
    t = pl.concat([accepted.select("market", "trade_date"), per_trade], how="horizontal")
    past = t.filter(pl.col("securities_settle_date").is_null() | pl.col("cash_settle_date").is_null())
    if past.height:
        row = past.row(0, named=True)
        cycle = "securities cycle" if row["securities_settle_date"] is None else "cash cycle"
        raise CalendarError(
            f"calendar of {row['market']} ends before the {cycle} of trade date {row['trade_date']}: extend it"
        )


def _net_securities(c: pl.DataFrame, ref: RefData) -> pl.DataFrame:
    """Securities obligations (window, _IDX_COLUMNS) grouped on (window, trade_date, sec_idx,
    part) as columns: the path for keys too wide to pack (see _net_securities_packed)."""
    sq = pl.col("quantity") * pl.col("sign")
    zero = pl.lit(0, dtype=pl.Int64)
    legs = pl.concat(
        [
            c.select("window", "trade_date", "sec_idx", "securities_settle_date",
                     pl.col(f"{side}_part_idx").alias("part_idx"),
                     net.alias("net_quantity"), buy.alias("buy_quantity"), sell.alias("sell_quantity"))
            for side, net, buy, sell in (("buy", sq, sq, zero), ("sell", -sq, zero, sq))
        ]
    )
    sec = legs.group_by("window", "trade_date", "sec_idx", "part_idx").agg(
        pl.col("securities_settle_date").first(), pl.col("net_quantity", "buy_quantity", "sell_quantity").sum()
    )
    # Sorted as the key (market, trade_date, settlement date, participant_id, security_id)
    # through integers ordered alike: securities are sorted by (market, security_id) and
    # participants by participant_id, so their row numbers order them (measured, 21 k rows:
    # 3 against 7 ms on the strings).
    sec = sec.with_columns(pl.Series("market_rank", ref.market_rank[sec["sec_idx"].to_numpy()])).sort(
        "window", "market_rank", "trade_date", "securities_settle_date", "part_idx", "sec_idx")
    return sec.select("window", *_IDX_COLUMNS[:2], pl.col(*_IDX_COLUMNS[2:4]).cast(pl.Int32), *_QUANTITY_COLS)


def _net_securities_packed(c: pl.DataFrame, ref: RefData) -> pl.DataFrame | None:
    """Securities obligations (window, _IDX_COLUMNS) through one int64 key per leg, packed
    from (window, market rank, trade date, settlement offset, participant, security) in the
    output's sort order: one integer group-by, one integer sort, and the fields decoded
    from the groups (100,000 trades: 17 ms CPU, against 3-column grouping and a 5-column
    sort). The settlement date follows from trade date and security, so the groups are
    those of (window, trade_date, sec_idx, part). None when the key would not fit."""
    if not c.height:
        return None
    sec_idx = c["sec_idx"].to_numpy().astype(np.int64)
    day = c["trade_date"].cast(pl.Int32).to_numpy().astype(np.int64)
    offset = c["securities_settle_date"].cast(pl.Int32).to_numpy().astype(np.int64) - day
    market_rank = ref.market_rank
    day_min = int(day.min())
    window = c["window"].to_numpy().astype(np.int64)
    radices = [int(window.max()) + 1, int(market_rank.max()) + 1, int(day.max()) - day_min + 1, int(offset.max()) + 1,
               max(1, ref.participants.height), ref.n_sec]
    keys = [_packed(list(zip([window, market_rank[sec_idx], day - day_min, offset, c[f"{side}_part_idx"].to_numpy(),
                              sec_idx], radices, strict=True))) for side in ("buy", "sell")]
    if any(k is None for k in keys):
        return None
    sq = (c["quantity"] * c["sign"]).to_numpy()
    buy_key, sell_key = keys
    low = min(int(buy_key.min()), int(sell_key.min()))
    span = max(int(buy_key.max()), int(sell_key.max())) - low + 1
    if _few_slots(span, len(sq)):
        # Few possible keys (a day's participants x securities): the keys used, in key
        # order, from a mark per possible key, and one compiled pass adds each leg into
        # its key's sums.
        from settle_arrow.kernels import dense_ranks, net_quantities

        buy_rank, sell_rank, used = dense_ranks(buy_key - low, sell_key - low, span)
        sums = net_quantities(buy_rank, sell_rank, sq, len(used))
        key = used + low
        groups = [pl.Series(name, sums[i]) for i, name in enumerate(_QUANTITY_COLS)]
    else:
        zero = np.zeros(len(sq), dtype=np.int64)
        legs = pl.DataFrame({"k": np.concatenate(keys), "net_quantity": np.concatenate([sq, -sq]),
                             "buy_quantity": np.concatenate([sq, zero]), "sell_quantity": np.concatenate([zero, sq])})
        grouped = legs.group_by("k").agg(pl.all().sum()).sort("k")
        key = grouped["k"].to_numpy()
        groups = [grouped[name] for name in _QUANTITY_COLS]
    window, _, day, offset, part, sec = _unpacked(key, radices)
    day += day_min
    # Column by column, not by queries (see _cash_rows).
    return pl.DataFrame([
        pl.Series("window", window, dtype=pl.Int32),
        _dates("trade_date", day),
        _dates("securities_settle_date", day + offset),
        pl.Series("part_idx", part, dtype=pl.Int32),
        pl.Series("sec_idx", sec, dtype=pl.Int32),
        *groups,
    ])


def _named(by_idx: pl.DataFrame, ref: RefData) -> pl.DataFrame:
    """Obligations by reference indices (window, _IDX_COLUMNS) as the output's rows (and
    their window), same order."""
    sec, part = by_idx["sec_idx"].to_numpy(), by_idx["part_idx"].to_numpy()
    return pl.DataFrame([
        by_idx["window"],
        ref.securities["market"][sec],
        by_idx["trade_date"],
        by_idx["securities_settle_date"],
        ref.participants["participant_id"][part],
        ref.securities["security_id"][sec],
        *by_idx.select(_QUANTITY_COLS).get_columns(),
    ])


def _few_slots(span: int, trades: int) -> bool:
    """Whether netting `trades` (two legs each) into a slot per key of `span` pays."""
    return span <= max(DENSE_GROUPS_MIN, DENSE_GROUPS_PER_LEG * 2 * trades)


def _packed(fields: list[tuple[np.ndarray, int]]) -> np.ndarray | None:
    """One int64 per row from non-negative `fields` ((values, radix), most significant
    first), ordered as the tuples of the fields are; None when a value lies outside its
    radix or the radices' product exceeds PACKED_KEY_MAX."""
    if math.prod(radix for _, radix in fields) > PACKED_KEY_MAX:
        return None
    key = np.zeros(len(fields[0][0]), dtype=np.int64)
    for values, radix in fields:
        if len(values) and (int(values.min()) < 0 or int(values.max()) >= radix):
            return None
        key *= radix
        key += values
    return key


def _unpacked(key: np.ndarray, radices: list[int]) -> list[np.ndarray]:
    """The fields _packed packed into `key`, most significant first."""
    fields = []
    for radix in reversed(radices):
        fields.append(key % radix)
        key = key // radix
    return fields[::-1]


def _obligations(c: pl.DataFrame, ref: RefData) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """Net per (window, obligation key): securities by reference indices and as output
    rows, cash; each frame's first column `window` (Int32), rows in (window, key) order.
    `c`: cleared trades, of several windows where its column `window` (0, 1, ...) says
    whose (else all of window 0). Grouping runs on integer ids (~3x faster than on the
    strings, measured); the strings are attached to the few aggregated rows afterwards."""
    if "window" not in c.columns:
        c = c.hstack([pl.Series("window", np.zeros(c.height, dtype=np.int32))])
    sec = _net_securities_packed(c, ref)
    if sec is None:
        sec = _net_securities(c, ref)
    pair_of_sec, pairs = ref.cash_pairs
    agg = _net_cash_dense(c, pair_of_sec, len(pairs), ref.participants.height)
    if agg is None:
        agg = _net_cash_legs(c, pair_of_sec, len(pairs), ref.participants.height)
    return sec, _named(sec, ref), _cash_rows(agg, ref)


def _cash_rows(agg: pl.DataFrame, ref: RefData) -> pl.DataFrame:
    """The obligations_cash rows (and their window), in (window, key) order, of cash sums
    per (window, trade_date, cash_settle_date, pair, part) in integer fen (int64; int128
    from the leg path). Built column by column, not by queries: a window has a few dozen
    such rows, and each eager Polars query costs ~0.1 ms whatever its size (with the
    securities' rows built alike and the decimal check on Series: clearing's process
    7.4-8.1 -> 4.8-5.1 ms a 10,000-row window, measured)."""
    money.check_decimal18(agg, _MONEY_COLS, "obligations_cash")
    _, pairs = ref.cash_pairs
    market_rank, currency_rank = ref.cash_pair_ranks
    pair = agg["pair"].to_numpy().astype(np.int64)
    part = agg["part"].to_numpy().astype(np.int64)
    day = agg["trade_date"].cast(pl.Int32).to_numpy()
    settle_day = agg["cash_settle_date"].cast(pl.Int32).to_numpy()
    # The key (market, trade_date, cash_settle_date, participant_id, currency) through
    # integers ordered alike: participants are sorted by participant_id, so their row
    # numbers order them; pairs carry their market's and their currency's rank.
    window = agg["window"].to_numpy()
    order = np.lexsort((currency_rank[pair], part, settle_day, day, market_rank[pair], window))
    pair, part = pair[order], part[order]
    return pl.DataFrame([
        pl.Series("window", window[order], dtype=pl.Int32),
        pairs["market"][pair],
        _dates("trade_date", day[order]),
        _dates("cash_settle_date", settle_day[order]),
        ref.participants["participant_id"][part],
        pairs["currency"][pair],
        *[money.money_series(c, agg[c].cast(pl.Int64).to_numpy()[order]) for c in _MONEY_COLS],
    ])


def _net_cash_dense(c: pl.DataFrame, pair_of_sec: np.ndarray, n_pairs: int, n_parts: int) -> pl.DataFrame | None:
    """Cash obligations (window, trade_date, cash_settle_date, pair, part, money columns) in one
    compiled pass over the trades, each leg added into its packed key's sums (100,000
    trades: 2 against ~10 ms through 200,000 leg rows and a hash group-by, measured); None
    where the keys are too many for slots or a sum could leave int64 (the leg path sums
    in int128)."""
    if not c.height:
        return None
    amount = c["amount_fen"].to_numpy()
    fees = {side: np.stack([c[f"{side}_{f}"].to_numpy() for f in FEE_COLS]) for side in ("buy", "sell")}
    # |net| of a leg is at most |amount| plus its fees: the largest times the legs bounds every sum.
    largest = int(np.abs(amount).max()) + max(int(np.abs(f).sum(axis=0).max()) for f in fees.values())
    if largest * 2 * c.height >= 1 << 63:
        return None
    fields, day_min, radices = _cash_key_radices(c["window"], c["trade_date"], c["cash_settle_date"], n_pairs, n_parts)
    pair = pair_of_sec[c["sec_idx"].to_numpy()].astype(np.int64)
    keys = [_packed(list(zip([*fields, pair, c[f"{side}_part_idx"].to_numpy()], radices, strict=True)))
            for side in ("buy", "sell")]
    span = math.prod(radices)
    if any(k is None for k in keys) or not _few_slots(span, c.height):
        return None
    from settle_arrow.kernels import dense_ranks, net_cash

    buy_rank, sell_rank, used = dense_ranks(keys[0], keys[1], span)
    sums = net_cash(buy_rank, sell_rank, amount, fees["buy"], fees["sell"], len(used))
    return pl.DataFrame([*_cash_key_columns(used, day_min, radices),
                         *[pl.Series(name, sums[i]) for i, name in enumerate(_MONEY_COLS)]])


def _cash_key_radices(window: pl.Series, trade_date: pl.Series, cash_settle_date: pl.Series, n_pairs: int,
                      n_parts: int) -> tuple[list[np.ndarray], int, list[int]]:
    """The cash key's leading fields (window, days since the earliest trade date,
    settlement offset), that earliest day, and the radices of (window, day, offset, pair,
    part) for _packed."""
    window_at = window.to_numpy().astype(np.int64)
    day = trade_date.cast(pl.Int32).to_numpy().astype(np.int64)
    offset = cash_settle_date.cast(pl.Int32).to_numpy().astype(np.int64) - day
    day_min = int(day.min())
    radices = [int(window_at.max()) + 1, int(day.max()) - day_min + 1, int(offset.max()) + 1, max(1, n_pairs),
               max(1, n_parts)]
    return [window_at, day - day_min, offset], day_min, radices


def _cash_key_columns(key: np.ndarray, day_min: int, radices: list[int]) -> list[pl.Series]:
    """window, trade_date, cash_settle_date, pair and part decoded from packed cash keys."""
    window, day, offset, pair, part = _unpacked(key, radices)
    day += day_min
    return [pl.Series("window", window, dtype=pl.Int32), _dates("trade_date", day),
            _dates("cash_settle_date", day + offset), pl.Series("pair", pair.astype(np.uint32)),
            pl.Series("part", part)]


def _net_cash_legs(c: pl.DataFrame, pair_of_sec: np.ndarray, n_pairs: int, n_parts: int) -> pl.DataFrame:
    """_net_cash_dense through a row per leg and a group-by, for any keys and sums."""
    zero = pl.lit(0, dtype=pl.Int64)
    cash_legs = []
    for side in ("buy", "sell"):
        fees_total = pl.sum_horizontal([pl.col(f"{side}_{f}") for f in FEE_COLS])
        net = (-pl.col("amount_fen") if side == "buy" else pl.col("amount_fen")) - fees_total
        cash_legs.append(
            c.select(
                "window", "trade_date", "cash_settle_date", "sec_idx", pl.col(f"{side}_part_idx").alias("part"),
                net.alias("net_amount"),
                (pl.col("amount_fen") if side == "buy" else zero).alias("buy_amount"),
                (pl.col("amount_fen") if side == "sell" else zero).alias("sell_amount"),
                *[pl.col(f"{side}_{f}").alias(f) for f in FEE_COLS],
            )
        )
    # Market and currency follow from the security: group on a small code for the pair
    # (one pass over the legs, few groups), attach the strings to the aggregated rows.
    legs = pl.concat(cash_legs)
    legs = legs.with_columns(pl.Series("pair", pair_of_sec[legs["sec_idx"].to_numpy()], dtype=pl.UInt32))
    # int64 sums where none can leave int64 (the largest |amount| times the legs), else int128.
    biggest = legs.select(pl.max_horizontal(pl.col(_MONEY_COLS).abs().max())).item() if legs.height else 0
    total = pl.col(_MONEY_COLS) if biggest * legs.height < 1 << 63 else pl.col(_MONEY_COLS).cast(pl.Int128)
    return _group_cash(legs, n_pairs, n_parts, total.sum())


def _group_cash(legs: pl.DataFrame, n_pairs: int, n_parts: int, sums: pl.Expr) -> pl.DataFrame:
    """`sums` per (window, trade_date, cash_settle_date, pair, part) of the cash legs,
    through one packed int64 key where it fits (200,000 legs: one integer column hashed,
    not five); the key columns are decoded from the few groups."""
    cols = ["window", "trade_date", "cash_settle_date", "pair", "part"]
    if not legs.height:
        return legs.group_by(cols).agg(sums)
    fields, day_min, radices = _cash_key_radices(legs["window"], legs["trade_date"], legs["cash_settle_date"],
                                                 n_pairs, n_parts)
    key = _packed(list(zip([*fields, legs["pair"].to_numpy(), legs["part"].to_numpy()], radices, strict=True)))
    if key is None:
        return legs.group_by(cols).agg(sums)
    agg = legs.with_columns(pl.Series("k", key)).group_by("k").agg(sums)
    keys = _cash_key_columns(agg["k"].to_numpy(), day_min, radices)
    # The legs' types from the schema, not a select: that would realign all 200,000 legs (4 ms).
    return pl.DataFrame([*[k.cast(legs.schema[k.name]) for k in keys], *agg.drop("k").get_columns()])


# What clearing computes per trade from the row and reference data alone; the money ones
# unsigned (process signs them: an X row carries the negation of its trade).
_SIGNED = ("amount_fen", *[f"{side}_{f}" for side in ("buy", "sell") for f in FEE_COLS])
_PER_TRADE = ("security_type", "currency", "securities_cycle", "cash_cycle", *_SIGNED,
              "buy_part_idx", "sell_part_idx", "buy_participant", "sell_participant",
              "securities_settle_date", "cash_settle_date")
# What they are computed from.
_INPUTS = ("seq", "sec_idx", "price_milli", "quantity", "buy_unit_idx", "sell_unit_idx", "market", "trade_date")


def _per_trade(ref: RefData, t: pl.DataFrame) -> pl.DataFrame:
    """_PER_TRADE, plus seq, for rows (columns _INPUTS) that passed every stateless check."""
    info = ref.securities[["security_type", "currency", "securities_cycle", "cash_cycle"]]
    sec_idx = t["sec_idx"].to_numpy()
    info = info[sec_idx] if t.height else info.clear()
    amount = money.amount_fen(t["price_milli"].to_numpy(), t["quantity"].to_numpy()) if t.height else np.zeros(0, np.int64)
    regime, regimes = _regimes(ref, sec_idx, t["trade_date"])
    fees = _fees(ref, regimes, regime, amount)
    dates = _settle_dates(ref, regimes)
    parts = ref.participants["participant_id"]
    buy_part = ref.unit_participant[t["buy_unit_idx"].to_numpy()]
    sell_part = ref.unit_participant[t["sell_unit_idx"].to_numpy()]
    # Column by column, not by queries (see _cash_rows): three a window before.
    columns = {
        "seq": t["seq"],
        **{c.name: c for c in info.get_columns()},
        "amount_fen": pl.Series("amount_fen", amount, dtype=pl.Int64),
        **{k: pl.Series(k, v, dtype=pl.Int64) for k, v in fees.items()},
        "buy_part_idx": pl.Series("buy_part_idx", buy_part),
        "sell_part_idx": pl.Series("sell_part_idx", sell_part),
        "buy_participant": parts[buy_part].alias("buy_participant"),
        "sell_participant": parts[sell_part].alias("sell_participant"),
        **{name: _settle_dates_series(name, d[regime]) for name, d in dates.items()},
    }
    return pl.DataFrame([columns[name] for name in ("seq", *_PER_TRADE)])


def _dates(name: str, days: np.ndarray) -> pl.Series:
    """Days since 1970 as a Date column."""
    return pl.Series(name, np.asarray(days, dtype=np.int32)).cast(pl.Date)


def _settle_dates_series(name: str, days: np.ndarray) -> pl.Series:
    """_settle_dates' days as dates, null where -1 (past a calendar's end)."""
    out = _dates(name, days)
    return out if bool((days >= 0).all()) else out.scatter(np.flatnonzero(days < 0), None)


# The cleared columns _obligations reads.
_NETTING_INPUTS = ("trade_date", "securities_settle_date", "cash_settle_date", "sec_idx", "buy_part_idx",
                   "sell_part_idx", "quantity", "sign", "amount_fen", *_FEE_OUT)


def _by_window(frame: pl.DataFrame, windows: int) -> list[pl.DataFrame]:
    """Each window's rows of an _obligations frame (rows in window order), without the
    `window` column: zero-copy slices."""
    window = frame["window"].to_numpy()
    assert bool((window[1:] >= window[:-1]).all()) and (not len(window) or 0 <= window[0] <= window[-1] < windows)
    bounds = np.searchsorted(window, np.arange(windows + 1)).tolist()
    rest = pl.DataFrame(frame.get_columns()[1:])  # not drop(): a query, ~0.1 ms
    return [rest.slice(lo, hi - lo) for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]


@dataclasses.dataclass(frozen=True)
class Clear:
    name: str = "clearing"

    def prepare_rows(self, frame: pl.DataFrame, ref: RefData, rows: Mapping[str, pl.DataFrame]) -> dict[str, pl.DataFrame]:
        """_PER_TRADE of each row of `frame` that passed the stateless checks (null for the
        others), from validation's row frame: once for the windows the reader prepares
        together, each window's prepare then gathering its passed rows (10,000-row windows:
        0.73-0.88 ms a window alone, 0.43-0.53 ms each of ten together, measured)."""
        checked = rows.get("validation_rows")
        if checked is None:
            return {}
        passed = checked["reason0"].is_null().to_numpy()
        seq = np.flatnonzero(passed)
        t = checked[list(_INPUTS[1:])]
        per_trade = _per_trade(ref, (t if len(seq) == len(t) else t[seq]).hstack([pl.Series("seq", seq)]))
        per_trade = per_trade[[c for c in per_trade.columns if c != "seq"]]  # not drop(): a query
        if len(seq) < len(t):  # the usual frame has no bad row: no gather
            at = np.full(len(t), -1, dtype=np.int64)
            at[seq] = np.arange(len(seq))
            per_trade = per_trade[pl.Series(at).set(pl.Series(~passed), None).cast(pl.UInt32)]
        return {"clearing_rows": per_trade}

    def prepare(self, window: Window, ref: RefData) -> Window:
        """Amounts, fees, participants and settlement dates of every row that passed the
        stateless checks (a superset of the rows `process` will find accepted): they depend
        on the row alone, so they run one window ahead in the reader thread, from the
        window's slice of `prepare_rows` where the engine made them together."""
        if "validation_prepared" not in window.frames:
            return window
        passed = passed_stateless(window.frames["validation_prepared"], _INPUTS)
        rows = window.frames.get("clearing_rows")
        if rows is None:
            return window.add(clearing_prepared=_per_trade(ref, passed))
        assert rows.height == window.frames["input"].height, "clearing's row frame is of other rows"
        seq = passed["seq"]
        mine = rows if len(seq) == rows.height else rows[seq.to_numpy()]
        return window.add(clearing_prepared=pl.DataFrame([seq, *mine.get_columns()]))

    def process(self, window: Window, ctx: StageContext) -> Window:
        ref = ctx.refdata
        a = window.frames["accepted"]
        if "clearing_prepared" in window.frames:  # prepare is an optimisation, never required
            p = window.frames["clearing_prepared"]
            row_of_seq = np.full(window.frames["input"].height, -1, dtype=np.int64)
            row_of_seq[p["seq"].to_numpy()] = np.arange(p.height)
            rows = row_of_seq[a["seq"].to_numpy()]
            assert (rows >= 0).all(), "an accepted row was not prepared"
            per_trade = p[[c for c in p.columns if c != "seq"]]  # not drop(): a query, ~0.1 ms
            # Where every prepared row was accepted (the usual window: no duplicate, no failed
            # cancellation) the rows are the prepared ones in order: no gather of the ~20
            # columns (100,000 rows: 2.4 -> 0.2 ms, measured).
            if len(rows) != p.height or (rows != np.arange(len(rows))).any():
                per_trade = per_trade[rows]
        else:
            per_trade = _per_trade(ref, a.select(_INPUTS)).drop("seq")
        _require_settle_dates(a, per_trade)
        t = pl.concat([a, per_trade], how="horizontal").with_columns(pl.col(_SIGNED) * pl.col("sign").cast(pl.Int64))
        return window.add(cleared=t)

    def finish(self, windows: Sequence[Window], ref: RefData) -> list[Window]:
        """Netting: each window's obligations of its cleared trades, which no later stage
        reads. Netted at once for the windows handed over together, a window's rows told
        apart by the leading key field `window`: the fixed costs of its ~60 array and frame
        operations paid once (10,000-row windows: 1.4 ms each alone, 0.8 ms each of ten at
        once; off the processing thread for a replay's groups, measured)."""
        heights = [w.frames["cleared"].height for w in windows]
        # The columns netting reads, in one chunk each: one rechunk, not a copy in every
        # to_numpy of a column in as many chunks as windows (each Polars call here waits for
        # the GIL the other threads hold: a ten-window group's netting 33.8 -> 19.1 ms of wall in
        # a replay, measured).
        c = pl.concat([w.frames["cleared"] for w in windows])[list(_NETTING_INPUTS)].rechunk().hstack(
            [pl.Series("window", np.repeat(np.arange(len(windows), dtype=np.int32), heights))])
        by_idx, sec, cash = (_by_window(f, len(windows)) for f in _obligations(c, ref))
        return [w.add(obligations_securities_idx=b, obligations_securities_delta=s, obligations_cash_delta=m)
                for w, b, s, m in zip(windows, by_idx, sec, cash, strict=True)]
