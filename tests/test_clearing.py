"""Clearing's regimes (stages/clearing.py): each row's regime names exactly its security's
market, type and cycles and its trade date, and no regime appears twice, whether the
window's dates are dense (presence table) or far apart (sorted unique)."""

from __future__ import annotations

import datetime
from pathlib import Path

import numpy as np
import polars as pl
from hypothesis import given, settings
from hypothesis import strategies as st

from settle_arrow.refdata import load_refdata
from settle_arrow.stages.clearing import _regimes

REF = load_refdata(str(Path(__file__).parents[1] / "data" / "samples" / "refdata"))
COLS = ["market", "security_type", "securities_cycle", "cash_cycle"]


@settings(max_examples=150, deadline=None)
@given(rows=st.lists(st.tuples(st.integers(0, REF.securities.height - 1),
                               st.one_of(st.integers(-3, 3), st.integers(-40_000, 40_000))), max_size=60))
def test_each_row_finds_its_own_regime(rows):
    sec_idx = np.array([r[0] for r in rows], dtype=np.int32)
    day0 = datetime.date(2024, 1, 2)
    dates = pl.Series([day0 + datetime.timedelta(days=r[1]) for r in rows], dtype=pl.Date)
    regime, regimes = _regimes(REF, sec_idx, dates)
    assert regimes.select(COLS + ["trade_date"]).is_duplicated().sum() == 0
    want = REF.securities.select(COLS)[sec_idx].with_columns(dates.alias("trade_date"))
    assert regimes.select(COLS + ["trade_date"])[regime].equals(want)
