"""Clearing (stages/clearing.py): each row's regime names exactly its security's market,
type and cycles and its trade date, and no regime appears twice, whether the window's
dates are dense (presence table) or far apart (sorted unique); the fee rates remembered
per regime are the schedule's, and the memo stays bounded; cash netting is exact in int64
and, where sums could leave int64, in int128, and refuses what decimal(18,2) cannot hold;
netting by packed keys equals grouping on the columns; windows netted at once get what
each gets alone."""

from __future__ import annotations

import dataclasses
import datetime
from pathlib import Path
from unittest import mock

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from settle_arrow.engine import STAGES, _windows
from settle_arrow.errors import UserError
from settle_arrow.io.files import discover
from settle_arrow.money import FEN_DECIMAL18_MAX
from settle_arrow.refdata import load_refdata
from settle_arrow.stages import clearing
from settle_arrow.stages.base import StageContext, Window
from settle_arrow.stages.clearing import _FEE_OUT, FEE_COLS, _fee_rates, _matching_fees, _obligations, _regimes
from settle_arrow.state import EngineState

SAMPLE = Path(__file__).parents[1] / "data" / "samples"
REF = load_refdata(str(SAMPLE / "refdata"))
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


@settings(max_examples=60, deadline=None)
@given(rows=st.lists(st.tuples(st.integers(0, REF.securities.height - 1), st.integers(-400, 400)),
                     min_size=1, max_size=40),
       bound=st.integers(1, 6))
def test_fee_rates_kept_per_regime_are_the_schedules(rows, bound):
    """Whatever regimes earlier windows left in the memo (or pushed out of it), each
    regime's rates are exactly the matching fee rows of the schedule, per fee column; the
    memo holds at most its bound or the regimes of one window (the largest so far: a window
    that needs nothing new leaves what an earlier, larger one put there)."""
    ref = dataclasses.replace(REF, memo={})
    day0 = datetime.date(2024, 1, 2)
    most = 0
    with mock.patch.object(clearing, "REGIME_RATES_MAX", bound):
        for chunk in (rows[: len(rows) // 2], rows[len(rows) // 2 :], rows, rows[: len(rows) // 2]):
            if not chunk:
                continue
            sec_idx = np.array([r[0] for r in chunk], dtype=np.int32)
            dates = pl.Series([day0 + datetime.timedelta(days=r[1]) for r in chunk], dtype=pl.Date)
            _, regimes = _regimes(ref, sec_idx, dates)
            rates = _fee_rates(ref, regimes)
            want: dict[tuple[int, int], list[int]] = {}
            for g, side, col, rate in _matching_fees(REF, regimes.with_row_index("regime")).iter_rows():
                want.setdefault((g, _FEE_OUT.index(f"{side.lower()}_{col}")), []).append(rate)
            for g in range(regimes.height):
                for c in range(len(_FEE_OUT)):
                    got = sorted(int(r) for r in rates[g, c] if r)
                    assert got == sorted(r for r in want.get((g, c), []) if r)
            most = max(most, regimes.height)
            assert len(ref.memo["fee_rates"]) <= max(bound, most)


def _cleared() -> pl.DataFrame:
    """The sample market (5,000 trades) as one window, through every stage."""
    raw = next(_windows(discover([str(SAMPLE / "trades")]), {}, 8000))
    window = Window(window_id=1, frames={"input": raw.frame})
    ctx = StageContext(refdata=REF, state=EngineState(n_sec=REF.n_sec))
    for stage in STAGES:
        window = stage.process(window, ctx)
    return window.frames["cleared"]


def _net_amount_by_python(c: pl.DataFrame) -> dict[tuple, int]:
    out: dict[tuple, int] = {}
    for r in c.iter_rows(named=True):
        for side, sign in (("buy", -1), ("sell", 1)):
            key = (r["market"], r["trade_date"], r["cash_settle_date"], r[f"{side}_participant"], r["currency"])
            fees = sum(r[f"{side}_{f}"] for f in FEE_COLS)
            out[key] = out.get(key, 0) + sign * r["amount_fen"] - fees
    return out


@pytest.mark.parametrize("huge_rows", [1, 0])
def test_cash_netting_is_exact_when_sums_could_leave_int64(huge_rows):
    """One trade of 10^15 fen among the sample's makes max |amount| x legs exceed 2^63, so the sums
    run in int128; without it they run in int64. Either way they equal Python's integers."""
    c = _cleared()
    assert c.height * 2 * 10**15 >= 1 << 63
    c = c.with_columns(pl.when(pl.int_range(pl.len()) < huge_rows).then(pl.lit(10**15)).otherwise("amount_fen")
                       .alias("amount_fen"))
    *_, cash = _obligations(c, REF)
    got = {(r["market"], r["trade_date"], r["cash_settle_date"], r["participant_id"], r["currency"]):
           int(r["net_amount"] * 100) for r in cash.iter_rows(named=True)}
    assert got == _net_amount_by_python(c)


def test_cash_netting_refuses_sums_beyond_decimal18():
    c = _cleared()
    c = c.with_columns(pl.lit(10**17, dtype=pl.Int64).alias("amount_fen"))
    assert c.height * 10**17 > 100 * FEN_DECIMAL18_MAX  # > 10^18 fen per key, with up to 100 keys
    with pytest.raises(UserError, match="decimal"):
        _obligations(c, REF)


def test_cash_netting_never_wraps():
    """Four trades of 2^62 fen on one key sum to 2^64, which int64 would wrap to 0 (and pass
    the decimal(18,2) check); int128 sums see it and refuse it."""
    c = _cleared().head(4)
    first = c.row(0, named=True)
    c = c.with_columns(
        *[pl.lit(first[col], dtype=c.schema[col]).alias(col)
          for col in ("trade_date", "cash_settle_date", "securities_settle_date", "sec_idx", "market", "currency")],
        pl.lit(first["buy_part_idx"], dtype=c.schema["buy_part_idx"]).alias("sell_part_idx"),
        pl.lit(first["buy_part_idx"], dtype=c.schema["buy_part_idx"]).alias("buy_part_idx"),
        pl.lit(1 << 62, dtype=pl.Int64).alias("amount_fen"),
        *[pl.lit(0, dtype=pl.Int64).alias(f"{side}_{f}") for side in ("buy", "sell") for f in FEE_COLS],
    )
    with pytest.raises(UserError, match="decimal"):
        _obligations(c, REF)


_CLEARED = _cleared()
_QUANTITY = ("net_quantity", "buy_quantity", "sell_quantity")


@settings(max_examples=40, deadline=None)
@given(picks=st.lists(st.tuples(st.integers(0, _CLEARED.height - 1), st.integers(0, 20_000)), max_size=80),
       cycles=st.integers(1, 9))
def test_netting_by_packed_keys_equals_grouping_on_columns(picks, cycles):
    """Securities and cash obligations through one packed int64 key per leg, summed in a
    slot per key or hash-grouped, equal the same grouped on the key columns (the path for
    keys too wide to pack) and Python's sums, rows in key order, for windows spanning up to
    20,000 days and settlement offsets up to 8 days."""
    import datetime as dt

    rows = [i for i, _ in picks]
    shift = pl.Series([dt.timedelta(days=d) for _, d in picks], dtype=pl.Duration("ms"))
    # Settlement follows from security and trade date, as the calendar makes it (a function
    # of the shifted date: two rows of a security shifted onto one date settle alike).
    c = _CLEARED[rows].with_columns((pl.col("trade_date") + shift).alias("trade_date")) if rows else _CLEARED.clear()
    late = pl.duration(days=(pl.col("sec_idx") + pl.col("trade_date").cast(pl.Int32)) % cycles)
    c = c.with_columns((pl.col("trade_date") + late).alias("securities_settle_date"),
                       (pl.col("trade_date") + late).alias("cash_settle_date"))
    # Packed keys summed in slots (however wide the span), packed keys hash-grouped, and the
    # key columns grouped (packing refused).
    with mock.patch.object(clearing, "DENSE_GROUPS_MIN", 1 << 40):
        packed = _obligations(c, REF)
    with mock.patch.object(clearing, "DENSE_GROUPS_MIN", 0), mock.patch.object(clearing, "DENSE_GROUPS_PER_LEG", 0):
        hashed = _obligations(c, REF)
    with mock.patch.object(clearing, "PACKED_KEY_MAX", 0):
        columns = _obligations(c, REF)
    for other in (hashed, columns):
        assert all(a.equals(b) for a, b in zip(packed, other, strict=True))
    by_idx, sec, _ = packed
    # The rows by reference indices (what the engine adds up between folds) are the output
    # rows, key for key.
    part_row = {p: i for i, p in enumerate(REF.participants["participant_id"].to_list())}
    assert by_idx["part_idx"].to_list() == [part_row[p] for p in sec["participant_id"].to_list()]
    assert by_idx["sec_idx"].to_list() == REF.sec_idx(sec).to_list()
    assert by_idx.select("trade_date", "securities_settle_date", *_QUANTITY).equals(
        sec.select("trade_date", "securities_settle_date", *_QUANTITY))
    keys = ["market", "trade_date", "securities_settle_date", "participant_id", "security_id"]
    assert sec.select(keys).rows() == sorted(sec.select(keys).rows())
    want: dict[tuple, int] = {}
    for r in c.iter_rows(named=True):
        for side, sign in (("buy", 1), ("sell", -1)):
            k = (r["market"], r["trade_date"], r["securities_settle_date"], r[f"{side}_participant"], r["security_id"])
            want[k] = want.get(k, 0) + sign * r["quantity"] * r["sign"]
    assert {tuple(r[:5]): r[5] for r in sec.select(*keys, "net_quantity").rows()} == want


@given(data=st.data(), radices=st.lists(st.integers(1, 1000), min_size=1, max_size=5))
def test_packed_keys_order_as_their_fields_and_unpack(data, radices):
    """_packed orders rows as the tuples of their fields and _unpacked gives the fields
    back; a value outside its radix, or radices too wide together, give None."""
    from settle_arrow.stages.clearing import PACKED_KEY_MAX, _packed, _unpacked

    rows = data.draw(st.lists(st.tuples(*[st.integers(0, r - 1) for r in radices]), min_size=1, max_size=30))
    cols = [np.array([row[i] for row in rows], dtype=np.int64) for i in range(len(radices))]
    key = _packed(list(zip(cols, radices, strict=True)))
    assert key is not None
    assert sorted(range(len(rows)), key=lambda i: (key[i], i)) == sorted(range(len(rows)), key=lambda i: (rows[i], i))
    assert [c.tolist() for c in _unpacked(key, radices)] == [c.tolist() for c in cols]
    assert _packed([(cols[0] + radices[0], radices[0]), *zip(cols[1:], radices[1:], strict=True)]) is None
    assert _packed([(cols[0], PACKED_KEY_MAX + 1)]) is None


def _processed_windows(rows: int) -> list[Window]:
    """The sample market in windows of `rows`, processed through every stage (not finished)."""
    ctx = StageContext(refdata=REF, state=EngineState(n_sec=REF.n_sec))
    out = []
    for i, raw in enumerate(_windows(discover([str(SAMPLE / "trades")]), {}, rows)):
        window = Window(window_id=i + 1, frames={"input": raw.frame})
        for stage in STAGES:
            window = stage.process(window, ctx)
        for effect in window.effects:
            effect()
        out.append(window)
    return out


_PROCESSED = _processed_windows(317)
_NETTED = ("obligations_securities_idx", "obligations_securities_delta", "obligations_cash_delta")


@settings(max_examples=30, deadline=None)
@given(data=st.data(), path=st.sampled_from(["dense", "hashed", "columns"]))
def test_a_group_is_netted_as_each_window_alone(data, path):
    """Clear.finish nets the windows handed over together at once: each window gets exactly
    the frames it gets alone, whatever windows come with it (some empty of trades), on every
    netting path (packed keys ranked densely or hash-grouped, key columns)."""
    lo = data.draw(st.integers(0, len(_PROCESSED) - 1))
    group = _PROCESSED[lo:data.draw(st.integers(lo + 1, min(len(_PROCESSED), lo + 8)))]
    empty = data.draw(st.booleans())
    if empty:  # a window whose rows were all quarantined clears nothing
        w = group[0]
        group = [dataclasses.replace(w, frames={**w.frames, "cleared": w.frames["cleared"].clear()}), *group[1:]]
    patches = {"dense": {"DENSE_GROUPS_MIN": 1 << 40}, "hashed": {"DENSE_GROUPS_MIN": 0, "DENSE_GROUPS_PER_LEG": 0},
               "columns": {"PACKED_KEY_MAX": 0}}[path]
    with mock.patch.multiple(clearing, **patches):
        together = clearing.Clear().finish(group, REF)
        alone = [clearing.Clear().finish([w], REF)[0] for w in group]
    assert [w.window_id for w in together] == [w.window_id for w in group]
    for a, b in zip(together, alone, strict=True):
        for name in _NETTED:
            assert a.frames[name].equals(b.frames[name]), name
            assert "window" not in a.frames[name].columns
    # A window's netting is its own cleared trades' (the sample spans several trade dates).
    first = alone[0].frames["obligations_securities_delta"]
    assert first.height == 0 if empty else first["net_quantity"].abs().sum() > 0
