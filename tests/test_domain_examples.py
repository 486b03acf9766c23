"""DOMAIN.md §10 worked examples A and B, as exact expected values."""

from decimal import Decimal as D

import polars as pl
from market import T1, T, trade, write_refdata, write_trades

from settle_arrow import open_target, replay


def _run(tmp_path, new_target, rows, **kw):
    ref = write_refdata(tmp_path)
    f = write_trades(tmp_path / "trades" / "t.parquet", rows)
    db = new_target()
    replay([str(f)], str(ref), db, **kw)
    return open_target(db)


def test_example_a_fees_and_participant_nets(tmp_path, new_target):
    rows = [
        trade(1, "A1", "A2", 1000, "10.00"),  # P1 buys 1,000 @ 10.00
        trade(2, "A2", "A3", 1000, "10.50"),  # P3 sells 1,000 @ 10.50
    ]
    with _run(tmp_path, new_target, rows) as t:
        trades = t.table("trades")
        cash = t.table("obligations_cash")
    buy = trades.filter(pl.col("trade_id") == 1).row(0, named=True)
    assert buy["amount"] == D("10000.00")
    assert (buy["buy_handling_fee"], buy["buy_management_fee"], buy["buy_transfer_fee"], buy["buy_stamp_duty"]) == (
        D("0.34"), D("0.20"), D("0.10"), D("0.00"))
    sell = trades.filter(pl.col("trade_id") == 2).row(0, named=True)
    assert sell["amount"] == D("10500.00")
    assert (sell["sell_stamp_duty"], sell["sell_handling_fee"], sell["sell_management_fee"], sell["sell_transfer_fee"]) == (
        D("5.25"), D("0.36"), D("0.21"), D("0.11"))
    nets = dict(cash.select("participant_id", "net_amount").iter_rows())
    assert nets["P1"] == D("-10000.64")
    assert nets["P3"] == D("10494.07")
    p1 = cash.filter(pl.col("participant_id") == "P1").row(0, named=True)
    assert p1["cash_settle_date"] == T1 and p1["trade_date"] == T
    assert p1["buy_amount"] == D("10000.00") and p1["sell_amount"] == D("0.00")


# Example B without fees: a fee schedule with no rows.
def test_example_b_multilateral_net(tmp_path, new_target):
    write_refdata(tmp_path, fees=[])
    rows = [
        trade(1, "A1", "A2", 1000, "10.00", "600000"),
        trade(2, "A3", "A1", 400, "10.05", "600000"),
        trade(3, "A2", "A3", 200, "50.00", "600001"),
        trade(4, "A1", "A2", 100, "50.10", "600001"),
    ]
    f = write_trades(tmp_path / "trades" / "t.parquet", rows)
    db = new_target()
    replay([str(f)], str(tmp_path / "refdata"), db, window_rows=3)
    with open_target(db) as t:
        cash = dict(t.table("obligations_cash").select("participant_id", "net_amount").iter_rows())
        sec = {(p, s): q for p, s, q in t.table("obligations_securities").select(
            "participant_id", "security_id", "net_quantity").iter_rows()}
    assert cash == {"P1": D("-10990.00"), "P2": D("5010.00"), "P3": D("5980.00")}
    assert sum(cash.values()) == 0
    assert sec == {
        ("P1", "600000"): 600, ("P2", "600000"): -1000, ("P3", "600000"): 400,
        ("P1", "600001"): 100, ("P2", "600001"): 100, ("P3", "600001"): -200,
    }


def test_cancellation_reverses_everything(tmp_path, new_target):
    rows = [
        trade(1, "A1", "A2", 1000, "10.00"),
        trade(2, "A1", "A2", 1000, "10.00", record_type="X", ref_trade_id=1),
    ]
    with _run(tmp_path, new_target, rows, window_rows=1) as t:
        assert t.table("obligations_cash").height == 0
        assert t.table("obligations_securities").height == 0
        assert t.table("holdings").height == 0
        trades = t.table("trades")
    x = trades.filter(pl.col("record_type") == "X").row(0, named=True)
    assert x["amount"] == D("-10000.00") and x["buy_handling_fee"] == D("-0.34")
    assert x["cash_settle_date"] == T1
