"""Fees equal an exact decimal.Decimal computation; netting sums to zero; holdings conserved."""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from decimal import ROUND_HALF_UP, Decimal

import numpy as np
import polars as pl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from market import FEES, business_days, trade, write_refdata, write_trades

from settle_arrow import money, open_target, replay, schema

CENT = Decimal("0.01")
DAYS = business_days(dt.date(2023, 8, 21), 10)  # straddles the 2023-08-28 rate change
ACCOUNTS = ["A1", "A2", "A3", "A9"]


def _half_up(x: Decimal) -> Decimal:
    return x.quantize(CENT, rounding=ROUND_HALF_UP)


def expected_fees(amount: Decimal, day: dt.date, side: str) -> dict[str, Decimal]:
    out: dict[str, Decimal] = defaultdict(Decimal)
    for code, _market, sec_type, fee_side, rate, start, end in FEES:
        if sec_type in ("*", "A_SHARE") and fee_side in (side, "BOTH") and start <= day and (end is None or day <= end):
            out[schema.FEE_COLUMNS[code]] += _half_up(amount * rate)
    return out


trades_strategy = st.lists(
    st.tuples(
        st.sampled_from(ACCOUNTS),
        st.sampled_from(ACCOUNTS),
        st.integers(1, 2_000_000),
        st.decimals(min_value=Decimal("0.001"), max_value=Decimal("99999.999"), places=3),
        st.sampled_from(DAYS),
        st.sampled_from(["600000", "600001"]),
    ),
    min_size=1,
    max_size=40,
)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=trades_strategy, window=st.sampled_from([1, 3, 1000]))
def test_fees_match_decimal_and_netting_balances(tmp_path_factory, backend, rows, window):
    root = tmp_path_factory.mktemp("fees")
    ref = write_refdata(root, holdings=[("A1", "XSHG", "600000", 5000), ("A2", "XSHG", "600001", 700)])
    trades = [trade(i + 1, b, s, q, str(p), sec, day) for i, (b, s, q, p, day, sec) in enumerate(rows)]
    f = write_trades(root / "t.parquet", trades)
    db = backend.new(root)
    report = replay([str(f)], str(ref), db, window_rows=window)
    assert report.rows_accepted == len(rows)
    with open_target(db) as t:
        got = t.table("trades")
        cash = t.table("obligations_cash")
        sec = t.table("obligations_securities")
        hold = t.table("holdings")

    fee_cols = list(schema.FEE_COLUMNS.values())
    for r in got.iter_rows(named=True):
        amount = _half_up(r["price"] * r["quantity"])
        assert r["amount"] == amount
        for side in ("buy", "sell"):
            want = expected_fees(amount, r["trade_date"], side.upper())
            for c in fee_cols:
                assert r[f"{side}_{c}"] == want.get(c, Decimal(0)), (side, c, r)

    # Netting: per (market, trade_date, security) net quantities sum to zero; cash nets to -fees.
    assert sec.group_by("trade_date", "security_id").agg(pl.col("net_quantity").sum())["net_quantity"].to_list() == [0] * (
        sec.select("trade_date", "security_id").n_unique())
    per_day = cash.group_by("trade_date").agg(pl.col("net_amount").sum(), pl.sum_horizontal(fee_cols).sum().alias("fees"))
    for net, fees in per_day.select("net_amount", "fees").iter_rows():
        assert net == -fees
    # Exact participant cash from the trades themselves.
    want_net: dict[str, Decimal] = defaultdict(Decimal)
    for r in got.iter_rows(named=True):
        want_net[r["buy_participant"]] -= r["amount"] + sum(r[f"buy_{c}"] for c in fee_cols)
        want_net[r["sell_participant"]] += r["amount"] - sum(r[f"sell_{c}"] for c in fee_cols)
    have_net = cash.group_by("participant_id").agg(pl.col("net_amount").sum())
    assert {p: n for p, n in have_net.iter_rows() if n} == {p: n for p, n in want_net.items() if n}
    # Holdings conserved per security: opening + trades.
    totals = dict(hold.group_by("security_id").agg(pl.col("quantity").sum()).iter_rows())
    assert totals.get("600000", 0) == 5000 and totals.get("600001", 0) == 700


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=-(10**18) + 1, max_value=10**18 - 1), max_size=50))
def test_money_series_is_the_exact_decimal_of_fen(fen):
    """money_series (built from the integer's words) is fen / 100 exactly, at the
    decimal(18,2) bounds too."""
    fast = money.money_series("x", np.array(fen, dtype=np.int64))
    assert fast.dtype == pl.Decimal(18, 2)
    assert fast.to_list() == [Decimal(v) / 100 for v in fen]
