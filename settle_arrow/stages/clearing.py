"""Clearing (SPEC §4): amounts, fees, participants and settlement dates per trade, then netting.

Data model:
  in   frames["accepted"]
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
import datetime

import numpy as np
import polars as pl

from settle_arrow import money, schema
from settle_arrow.errors import UserError
from settle_arrow.refdata import RefData
from settle_arrow.stages.base import StageContext, Window

FEE_COLS = list(schema.FEE_COLUMNS.values())


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


def _fees(ref: RefData, t: pl.DataFrame, amount: np.ndarray) -> dict[str, np.ndarray]:
    regimes = t.select("market", "security_type", "trade_date").unique(maintain_order=True).with_row_index("regime")
    regime = t.join(regimes, on=["market", "security_type", "trade_date"], how="left", maintain_order="left")[
        "regime"
    ].to_numpy()
    slots = _fee_slots(ref, regimes)
    out = {f"{side}_{col}": np.zeros(len(t), dtype=np.int64) for side in ("buy", "sell") for col in FEE_COLS}
    n_regimes = regimes.height
    # One vectorised pass per (side, fee code, slot): the loop is over the fee schedule's
    # shape (a handful of entries), never over trades.
    for (side, col, _slot), g in slots.group_by("side", "fee_col", "slot"):
        rate_of_regime = np.zeros(n_regimes, dtype=np.int64)
        rate_of_regime[g["regime"].to_numpy()] = g["rate_units"].to_numpy()
        out[f"{side.lower()}_{col}"] += money.fee_fen(amount, rate_of_regime[regime])
    return out


def _settle_dates(ref: RefData, t: pl.DataFrame) -> pl.DataFrame:
    combos = t.select("market", "trade_date", "securities_cycle", "cash_cycle").unique()
    days = combos["trade_date"].cast(pl.Int32).to_numpy()
    ssd = np.zeros(combos.height, dtype=np.int32)
    csd = np.zeros(combos.height, dtype=np.int32)
    markets = combos["market"].to_numpy()
    for m in np.unique(markets):
        cal = ref.business_days(m)
        sel = markets == m
        base = np.searchsorted(cal, days[sel])
        for out, cycle in ((ssd, "securities_cycle"), (csd, "cash_cycle")):
            idx = base + combos[cycle].to_numpy()[sel]
            if (idx >= len(cal)).any():
                day = int(days[sel][np.argmax(idx >= len(cal))])
                raise CalendarError(
                    f"calendar of {m} ends before the {cycle.replace('_', ' ')} of trade date "
                    f"{datetime.date(1970, 1, 1) + datetime.timedelta(days=day)}: extend it"
                )
            out[sel] = cal[idx]
    combos = combos.with_columns(
        pl.Series("securities_settle_date", ssd).cast(pl.Date), pl.Series("cash_settle_date", csd).cast(pl.Date)
    )
    return t.join(combos, on=["market", "trade_date", "securities_cycle", "cash_cycle"], how="left", maintain_order="left")


def _obligations(c: pl.DataFrame, ref: RefData) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Net per obligation key. Grouping runs on integer ids (~3x faster than on the
    strings, measured); the strings are attached to the few aggregated rows afterwards."""
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
    names = ref.securities.select("market", "security_id")[sec["sec_idx"].to_numpy()]
    key = list(schema.KEYS["obligations_securities"])
    sec = pl.concat(
        [sec, names, ref.participants.select("participant_id")[sec["part"].to_numpy()]], how="horizontal"
    ).select(schema.OUTPUT["obligations_securities"].names).sort(key)

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
    agg = legs.group_by("trade_date", "cash_settle_date", "pair", "part").agg(pl.col(money_cols).cast(pl.Int128).sum())
    agg = pl.concat(
        [agg, pairs[agg["pair"].to_numpy()], ref.participants.select("participant_id")[agg["part"].to_numpy()]],
        how="horizontal",
    )
    ckey = list(schema.KEYS["obligations_cash"])
    cash = agg.select(*ckey, *money_cols).sort(ckey)
    money.check_decimal18(cash, money_cols, "obligations_cash")
    cash = cash.with_columns(pl.col(money_cols).cast(pl.Int64)).select(schema.OUTPUT["obligations_cash"].names)
    return sec, cash


@dataclasses.dataclass(frozen=True)
class Clear:
    name: str = "clearing"

    def process(self, window: Window, ctx: StageContext) -> Window:
        ref = ctx.refdata
        a = window.frames["accepted"]
        info = ref.securities.select("security_type", "currency", "securities_cycle", "cash_cycle")
        t = pl.concat([a, info[a["sec_idx"].to_numpy()] if a.height else info.clear()], how="horizontal")
        amount = money.amount_fen(t["price_milli"].to_numpy(), t["quantity"].to_numpy()) if t.height else np.zeros(0, np.int64)
        fees = _fees(ref, t, amount) if t.height else {}
        sign = t["sign"].cast(pl.Int64).to_numpy()
        parts = ref.participants["participant_id"]
        buy_part = ref.unit_participant[t["buy_unit_idx"].to_numpy()]
        sell_part = ref.unit_participant[t["sell_unit_idx"].to_numpy()]
        t = t.with_columns(
            pl.Series("amount_fen", amount * sign),
            *[pl.Series(k, v * sign) for k, v in fees.items()],
            pl.Series("buy_part_idx", buy_part), pl.Series("sell_part_idx", sell_part),
            parts.gather(buy_part).alias("buy_participant"),
            parts.gather(sell_part).alias("sell_participant"),
        )
        if not t.height:
            t = t.with_columns(
                pl.lit(0, dtype=pl.Int64).alias("amount_fen"),
                *[pl.lit(0, dtype=pl.Int64).alias(f"{s}_{f}") for s in ("buy", "sell") for f in FEE_COLS],
            )
        t = _settle_dates(ref, t)
        sec, cash = _obligations(t, ref)
        cash = cash.with_columns(money.to_money(pl.col(c)) for c in cash.columns if cash.schema[c] == pl.Int64)
        return window.add(cleared=t, obligations_securities_delta=sec, obligations_cash_delta=cash)
