"""A small hand-written market for exact-value tests (DOMAIN.md §10 examples)."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from settle_arrow import schema

D = Decimal
T = dt.date(2025, 6, 16)  # a Monday
T1 = dt.date(2025, 6, 17)


def business_days(start: dt.date, n: int, skip: tuple[dt.date, ...] = ()) -> list[dt.date]:
    out, d = [], start
    while len(out) < n:
        if d.weekday() < 5 and d not in skip:
            out.append(d)
        d += dt.timedelta(days=1)
    return out


FEES = [
    # fee_code, market, security_type, side, rate, from, to
    ("STAMP_DUTY", "XSHG", "A_SHARE", "SELL", D("0.00100000"), dt.date(2008, 9, 19), dt.date(2023, 8, 27)),
    ("STAMP_DUTY", "XSHG", "A_SHARE", "SELL", D("0.00050000"), dt.date(2023, 8, 28), None),
    ("HANDLING", "XSHG", "*", "BOTH", D("0.00004870"), dt.date(2015, 1, 1), dt.date(2023, 8, 27)),
    ("HANDLING", "XSHG", "*", "BOTH", D("0.00003410"), dt.date(2023, 8, 28), None),
    ("MANAGEMENT", "XSHG", "*", "BOTH", D("0.00002000"), dt.date(2015, 1, 1), None),
    ("TRANSFER", "XSHG", "*", "BOTH", D("0.00002000"), dt.date(2015, 8, 1), dt.date(2022, 4, 28)),
    ("TRANSFER", "XSHG", "*", "BOTH", D("0.00001000"), dt.date(2022, 4, 29), None),
]


def write_refdata(root: Path, fees=FEES, holdings=(), start: dt.date = dt.date(2023, 8, 1)) -> Path:
    """Three participants P1..P3, one unit each (U0001..U0003), accounts A1..A3 (one per
    participant, A9 individual of P1), securities A=600000 and B=600001 on XSHG."""
    ref = root / "refdata"
    ref.mkdir(parents=True, exist_ok=True)
    days = business_days(start, 800)
    tables = {
        "securities": [
            {"market": "XSHG", "security_id": "600000", "name": "A", "security_type": "A_SHARE", "currency": "CNY",
             "board_lot": 100, "securities_cycle": 0, "cash_cycle": 1},
            {"market": "XSHG", "security_id": "600001", "name": "B", "security_type": "A_SHARE", "currency": "CNY",
             "board_lot": 100, "securities_cycle": 0, "cash_cycle": 1},
        ],
        "participants": [{"participant_id": f"P{i}", "name": f"Participant {i}", "reserve_balance": D("1000000.00")}
                         for i in (1, 2, 3)],
        "trading_units": [{"unit_id": f"U000{i}", "participant_id": f"P{i}"} for i in (1, 2, 3)],
        "accounts": [{"account_id": f"A{i}", "holder_type": "INSTITUTION", "participant_id": f"P{i}"} for i in (1, 2, 3)]
        + [{"account_id": "A9", "holder_type": "INDIVIDUAL", "participant_id": "P1"}],
        "holdings": [dict(zip(("account_id", "market", "security_id", "quantity"), h, strict=False)) for h in holdings],
        "calendar": [{"market": "XSHG", "business_date": d} for d in days],
        "fees": [dict(zip(("fee_code", "market", "security_type", "side", "rate", "effective_from", "effective_to"), f, strict=False))
                 for f in fees],
    }
    for name, rows in tables.items():
        pq.write_table(pa.Table.from_pylist(rows, schema=schema.REFDATA[name]), ref / f"{name}.parquet")
    return ref


UNIT_OF = {"A1": "U0001", "A2": "U0002", "A3": "U0003", "A9": "U0001"}


def trade(trade_id, buy_account, sell_account, quantity, price, security_id="600000", trade_date=T,
          record_type="N", ref_trade_id=None, buy_unit=None, sell_unit=None, market="XSHG"):
    return {
        "trade_id": trade_id, "market": market, "trade_date": trade_date, "trade_time": dt.time(10, 0),
        "security_id": security_id, "price": D(price), "quantity": quantity,
        "buy_account": buy_account, "sell_account": sell_account,
        "buy_unit": buy_unit or UNIT_OF.get(buy_account, "U0009"), "sell_unit": sell_unit or UNIT_OF.get(sell_account, "U0009"),
        "record_type": record_type, "ref_trade_id": ref_trade_id,
    }


def write_trades(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema.INPUT_TRADE), path)
    return path
