"""Clearing (SPEC §4): amounts, fees, participants and settlement dates per trade, then netting.

Data model:
  prepare  frames["validation_prepared"] rows that passed the stateless checks ->
           frames["clearing_prepared"]: seq -> the per-trade columns (_PER_TRADE), unsigned;
           settlement dates null past a calendar's end
  in   frames["accepted"] (+ frames["clearing_prepared"] when prepare ran)
  out  frames["cleared"]: accepted + security info, participants, int fen amount and fees
       (signed: an X row carries the negation of its trade), settlement dates
       frames["obligations_securities_delta"], frames["obligations_cash_delta"]: this
       window's contribution per obligation key; the tables are their sums (storage views)

Invariants: fees are computed per trade, per side, per matching fee row on the rounded
amount and then added per fee code; per window Σ net_quantity = 0 per (market, trade_date,
security) and Σ net_amount = −Σ fees per (market, trade_date) (checked in checks.py).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import polars as pl

from settle_arrow import money, schema
from settle_arrow.errors import UserError
from settle_arrow.refdata import RefData
from settle_arrow.stages.base import StageContext, Window

FEE_COLS = list(schema.FEE_COLUMNS.values())
# Largest product of radices a packed netting key may have (int64 with room to spare).
PACKED_KEY_MAX = 1 << 62


class CalendarError(UserError):
    """A settlement date falls beyond the end of a market's calendar (reference data gap)."""


def _fee_slots(ref: RefData, regimes: pl.DataFrame) -> pl.DataFrame:
    """Per (regime, side, fee column, slot): the rate units of each matching fee row."""
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
    ).with_columns(pl.int_range(pl.len()).over("regime", "side", "fee_col").alias("slot"))


def _regimes(ref: RefData, sec_idx: np.ndarray, trade_date: pl.Series) -> tuple[np.ndarray, pl.DataFrame]:
    """(regime of each row, the regimes): a regime is a (security class, trade date), all
    that fees and settlement dates depend on besides the amount. Integer keys and no join
    (measured, 100 k rows: a unique and a join on the strings took 16 ms)."""
    cls_of_sec, classes = ref.security_classes
    day = trade_date.cast(pl.Int32).to_numpy().astype(np.int64)
    if not len(day):
        return np.zeros(0, np.int64), classes.clear().with_columns(pl.lit(None, dtype=pl.Date).alias("trade_date"))
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
    regimes = classes[keys // span].with_columns(
        pl.Series("trade_date", (keys % span + day_min).astype(np.int32)).cast(pl.Date)
    )
    return regime, regimes


def _fees(ref: RefData, regimes: pl.DataFrame, regime: np.ndarray, amount: np.ndarray) -> dict[str, np.ndarray]:
    slots = _fee_slots(ref, regimes.with_row_index("regime"))
    out = {f"{side}_{col}": np.zeros(len(regime), dtype=np.int64) for side in ("buy", "sell") for col in FEE_COLS}
    n_regimes = regimes.height
    # One vectorised pass per (side, fee code, slot): the loop is over the fee schedule's
    # shape (a handful of entries), never over trades.
    for (side, col, _slot), g in slots.group_by("side", "fee_col", "slot"):
        rate_of_regime = np.zeros(n_regimes, dtype=np.int64)
        rate_of_regime[g["regime"].to_numpy()] = g["rate_units"].to_numpy()
        out[f"{side.lower()}_{col}"] += money.fee_fen(amount, rate_of_regime[regime])
    return out


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


def _require_settle_dates(t: pl.DataFrame) -> None:
    """CalendarError for the first trade whose settlement date is past its calendar's end."""
    past = t.filter(pl.col("securities_settle_date").is_null() | pl.col("cash_settle_date").is_null())
    if past.height:
        row = past.row(0, named=True)
        cycle = "securities cycle" if row["securities_settle_date"] is None else "cash cycle"
        raise CalendarError(
            f"calendar of {row['market']} ends before the {cycle} of trade date {row['trade_date']}: extend it"
        )


def _net_securities(c: pl.DataFrame, ref: RefData) -> pl.DataFrame:
    """Securities obligations grouped on (trade_date, sec_idx, part) as columns: the path
    for keys too wide to pack (see _net_securities_packed)."""
    sq = pl.col("quantity") * pl.col("sign")
    zero = pl.lit(0, dtype=pl.Int64)
    legs = pl.concat(
        [
            c.select("trade_date", "sec_idx", "securities_settle_date", pl.col(f"{side}_part_idx").alias("part"),
                     net.alias("net_quantity"), buy.alias("buy_quantity"), sell.alias("sell_quantity"))
            for side, net, buy, sell in (("buy", sq, sq, zero), ("sell", -sq, zero, sq))
        ]
    )
    sec = legs.group_by("trade_date", "sec_idx", "part").agg(
        pl.col("securities_settle_date").first(), pl.col("net_quantity", "buy_quantity", "sell_quantity").sum()
    )
    # Sorted as the key (market, trade_date, settlement date, participant_id, security_id)
    # through integers ordered alike: securities are sorted by (market, security_id) and
    # participants by participant_id, so their row numbers order them (measured, 21 k rows:
    # 3 against 7 ms on the strings).
    market_rank = ref.securities["market"].rank("dense").to_numpy()
    sec = sec.with_columns(pl.Series("market_rank", market_rank[sec["sec_idx"].to_numpy()])).sort(
        "market_rank", "trade_date", "securities_settle_date", "part", "sec_idx")
    names = ref.securities.select("market", "security_id")[sec["sec_idx"].to_numpy()]
    sec = pl.concat(
        [sec, names, ref.participants.select("participant_id")[sec["part"].to_numpy()]], how="horizontal"
    ).select(schema.OUTPUT["obligations_securities"].names)
    return sec


def _net_securities_packed(c: pl.DataFrame, ref: RefData) -> pl.DataFrame | None:
    """Securities obligations through one int64 key per leg, packed from (market rank,
    trade date, settlement offset, participant, security) in the output's sort order: one
    integer group-by, one integer sort, and the fields decoded from the groups (100,000
    trades: 17 ms CPU, against 3-column grouping and a 5-column sort). The settlement date
    follows from trade date and security, so the groups are those of (trade_date, sec_idx,
    part). None when the key would not fit."""
    if not c.height:
        return None
    sec_idx = c["sec_idx"].to_numpy().astype(np.int64)
    day = c["trade_date"].cast(pl.Int32).to_numpy().astype(np.int64)
    offset = c["securities_settle_date"].cast(pl.Int32).to_numpy().astype(np.int64) - day
    market_rank = ref.securities["market"].rank("dense").to_numpy().astype(np.int64) - 1
    day_min = int(day.min())
    radices = [int(market_rank.max()) + 1, int(day.max()) - day_min + 1, int(offset.max()) + 1,
               max(1, ref.participants.height), ref.n_sec]
    keys = [_packed(list(zip([market_rank[sec_idx], day - day_min, offset, c[f"{side}_part_idx"].to_numpy(), sec_idx],
                             radices, strict=True))) for side in ("buy", "sell")]
    if any(k is None for k in keys):
        return None
    sq = (c["quantity"] * c["sign"]).to_numpy()
    zero = np.zeros(len(sq), dtype=np.int64)
    legs = pl.DataFrame({"k": np.concatenate(keys), "net_quantity": np.concatenate([sq, -sq]),
                         "buy_quantity": np.concatenate([sq, zero]), "sell_quantity": np.concatenate([zero, sq])})
    groups = legs.group_by("k").agg(pl.all().sum()).sort("k")
    _, day, offset, part, sec = _unpacked(groups["k"].to_numpy(), radices)
    day += day_min
    dates = pl.DataFrame({"trade_date": day.astype(np.int32), "securities_settle_date": (day + offset).astype(np.int32)})
    return pl.concat(
        [dates.cast(pl.Date), ref.securities.select("market", "security_id")[sec],
         ref.participants.select("participant_id")[part], groups.drop("k")],
        how="horizontal",
    ).select(schema.OUTPUT["obligations_securities"].names)


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


def _obligations(c: pl.DataFrame, ref: RefData) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Net per obligation key. Grouping runs on integer ids (~3x faster than on the
    strings, measured); the strings are attached to the few aggregated rows afterwards."""
    sec = _net_securities_packed(c, ref)
    if sec is None:
        sec = _net_securities(c, ref)
    zero = pl.lit(0, dtype=pl.Int64)
    cash_legs = []
    for side in ("buy", "sell"):
        fees_total = pl.sum_horizontal([pl.col(f"{side}_{f}") for f in FEE_COLS])
        net = (-pl.col("amount_fen") if side == "buy" else pl.col("amount_fen")) - fees_total
        cash_legs.append(
            c.select(
                "trade_date", "cash_settle_date", "sec_idx", pl.col(f"{side}_part_idx").alias("part"),
                net.alias("net_amount"),
                (pl.col("amount_fen") if side == "buy" else zero).alias("buy_amount"),
                (pl.col("amount_fen") if side == "sell" else zero).alias("sell_amount"),
                *[pl.col(f"{side}_{f}").alias(f) for f in FEE_COLS],
            )
        )
    money_cols = ["net_amount", "buy_amount", "sell_amount", *FEE_COLS]
    # Market and currency follow from the security: group on a small code for the pair
    # (one pass over the legs, few groups), attach the strings to the aggregated rows.
    pairs = ref.securities.select("market", "currency").unique(maintain_order=True)
    pair_of_sec = ref.securities.join(pairs.with_row_index("pair"), on=["market", "currency"], how="left",
                                      maintain_order="left")["pair"].to_numpy()
    legs = pl.concat(cash_legs)
    legs = legs.with_columns(pl.Series("pair", pair_of_sec[legs["sec_idx"].to_numpy()], dtype=pl.UInt32))
    # int64 sums where none can leave int64 (the largest |amount| times the legs), else int128.
    biggest = legs.select(pl.max_horizontal(pl.col(money_cols).abs().max())).item() if legs.height else 0
    total = pl.col(money_cols) if biggest * legs.height < 1 << 63 else pl.col(money_cols).cast(pl.Int128)
    agg = _group_cash(legs, len(pairs), ref.participants.height, total.sum())
    agg = pl.concat(
        [agg, pairs[agg["pair"].to_numpy()], ref.participants.select("participant_id")[agg["part"].to_numpy()]],
        how="horizontal",
    )
    ckey = list(schema.KEYS["obligations_cash"])
    cash = agg.select(*ckey, *money_cols).sort(ckey)
    money.check_decimal18(cash, money_cols, "obligations_cash")
    cash = cash.with_columns(pl.col(money_cols).cast(pl.Int64)).select(schema.OUTPUT["obligations_cash"].names)
    return sec, cash


def _group_cash(legs: pl.DataFrame, n_pairs: int, n_parts: int, sums: pl.Expr) -> pl.DataFrame:
    """`sums` per (trade_date, cash_settle_date, pair, part) of the cash legs, through one
    packed int64 key where it fits (200,000 legs: one integer column hashed, not four);
    the key columns are decoded from the few groups."""
    cols = ["trade_date", "cash_settle_date", "pair", "part"]
    if not legs.height:
        return legs.group_by(cols).agg(sums)
    day = legs["trade_date"].cast(pl.Int32).to_numpy().astype(np.int64)
    offset = legs["cash_settle_date"].cast(pl.Int32).to_numpy().astype(np.int64) - day
    day_min = int(day.min())
    radices = [int(day.max()) - day_min + 1, int(offset.max()) + 1, max(1, n_pairs), max(1, n_parts)]
    key = _packed(list(zip([day - day_min, offset, legs["pair"].to_numpy(), legs["part"].to_numpy()], radices,
                           strict=True)))
    if key is None:
        return legs.group_by(cols).agg(sums)
    agg = legs.with_columns(pl.Series("k", key)).group_by("k").agg(sums)
    day, offset, pair, part = _unpacked(agg["k"].to_numpy(), radices)
    day += day_min
    keys = pl.DataFrame({"trade_date": day.astype(np.int32), "cash_settle_date": (day + offset).astype(np.int32),
                         "pair": pair.astype(np.uint32), "part": part}).with_columns(pl.col("trade_date", "cash_settle_date").cast(pl.Date))
    return pl.concat([keys.cast(legs.select(cols).schema), agg.drop("k")], how="horizontal")


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
    info = ref.securities.select("security_type", "currency", "securities_cycle", "cash_cycle")
    sec_idx = t["sec_idx"].to_numpy()
    t = pl.concat([t, info[sec_idx] if t.height else info.clear()], how="horizontal")
    amount = money.amount_fen(t["price_milli"].to_numpy(), t["quantity"].to_numpy()) if t.height else np.zeros(0, np.int64)
    regime, regimes = _regimes(ref, sec_idx, t["trade_date"])
    fees = _fees(ref, regimes, regime, amount)
    dates = _settle_dates(ref, regimes)
    parts = ref.participants["participant_id"]
    buy_part = ref.unit_participant[t["buy_unit_idx"].to_numpy()]
    sell_part = ref.unit_participant[t["sell_unit_idx"].to_numpy()]
    t = t.with_columns(
        pl.Series("amount_fen", amount, dtype=pl.Int64),
        *[pl.Series(k, v, dtype=pl.Int64) for k, v in fees.items()],
        pl.Series("buy_part_idx", buy_part), pl.Series("sell_part_idx", sell_part),
        parts.gather(buy_part).alias("buy_participant"),
        parts.gather(sell_part).alias("sell_participant"),
        *[pl.Series(name, d[regime]) for name, d in dates.items()],
    ).with_columns(pl.when(pl.col(name) >= 0).then(pl.col(name).cast(pl.Date)).alias(name) for name in dates)
    return t.select("seq", *_PER_TRADE)


@dataclasses.dataclass(frozen=True)
class Clear:
    name: str = "clearing"

    def prepare(self, window: Window, ref: RefData) -> Window:
        """Amounts, fees, participants and settlement dates of every row that passed the
        stateless checks (a superset of the rows `process` will find accepted): they depend
        on the row alone, so they run one window ahead in the reader thread."""
        if "validation_prepared" not in window.frames:
            return window
        t = window.frames["validation_prepared"].filter(pl.col("reason0").is_null())
        return window.add(clearing_prepared=_per_trade(ref, t.select(_INPUTS)))

    def process(self, window: Window, ctx: StageContext) -> Window:
        ref = ctx.refdata
        a = window.frames["accepted"]
        if "clearing_prepared" in window.frames:  # prepare is an optimisation, never required
            p = window.frames["clearing_prepared"]
            row_of_seq = np.full(window.frames["input"].height, -1, dtype=np.int64)
            row_of_seq[p["seq"].to_numpy()] = np.arange(p.height)
            rows = row_of_seq[a["seq"].to_numpy()]
            assert (rows >= 0).all(), "an accepted row was not prepared"
            per_trade = p.drop("seq")[rows]
        else:
            per_trade = _per_trade(ref, a.select(_INPUTS)).drop("seq")
        _require_settle_dates(pl.concat([a.select("market", "trade_date"), per_trade], how="horizontal"))
        t = pl.concat([a, per_trade], how="horizontal").with_columns(pl.col(_SIGNED) * pl.col("sign").cast(pl.Int64))
        sec, cash = _obligations(t, ref)
        cash = cash.with_columns(money.to_money(pl.col(c)) for c in cash.columns if cash.schema[c] == pl.Int64)
        return window.add(cleared=t, obligations_securities_delta=sec, obligations_cash_delta=cash)
