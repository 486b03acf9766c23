"""Tests of settle_arrow.generate: schema conformance, determinism and realism of the market.

The quarantine checks replay SPEC §3 with a small independent reference validator written
here (pure Python, row by row), so they do not depend on the engine.
"""

from __future__ import annotations

import dataclasses
import datetime
import filecmp
from collections import Counter
from decimal import Decimal, InvalidOperation
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from settle_arrow import schema
from settle_arrow.generate import GenerateSummary, MarketSpec, generate_market

SMALL = MarketSpec(trades=3000, accounts=400, securities=60, participants=6, days=6)
BAD = dataclasses.replace(SMALL, trades=4000, bad_rate=0.15, cancel_rate=0.10)


# --------------------------------------------------------------------------------------------
# helpers


def read_table(path: str | Path, sch: pa.Schema) -> pa.Table:
    """Read a generated file with its schema types (CSV: parsed with the schema's types)."""
    path = Path(path)
    if path.suffix == ".parquet":
        return pq.read_table(path)
    opts = pacsv.ConvertOptions(column_types=sch, strings_can_be_null=True)
    return pacsv.read_csv(path, convert_options=opts)


def read_text(path: str | Path) -> pa.Table:
    """Read a trade file as text columns (nulls -> None), whatever its format."""
    path = Path(path)
    if path.suffix == ".parquet":
        t = pq.read_table(path)
        return pa.table({n: t.column(n).cast(pa.string()) for n in t.column_names})
    types = {n: pa.string() for n in schema.INPUT_TRADE.names}
    opts = pacsv.ConvertOptions(column_types=types, strings_can_be_null=True)
    return pacsv.read_csv(path, convert_options=opts)


def refdata(summary: GenerateSummary, name: str) -> pa.Table:
    fmt = Path(summary.trade_files[0]).suffix
    return read_table(Path(summary.refdata_dir) / f"{name}{fmt}", schema.REFDATA[name])


def all_trades(summary: GenerateSummary) -> pa.Table:
    parts = []
    for f in summary.trade_files:
        t = pq.read_table(f)
        parts.append(t.append_column("file", pa.array([Path(f).name] * t.num_rows)))
    return pa.concat_tables(parts)


def expected(out: Path) -> dict[tuple[str, int], str]:
    t = pq.read_table(out / "expected" / "quarantine.parquet").to_pylist()
    return {(r["file"], r["source_row"]): r["reason"] for r in t}


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[Path, GenerateSummary]:
    out = tmp_path_factory.mktemp("small")
    return out, generate_market(out, SMALL)


@pytest.fixture(scope="module", params=["parquet", "csv"])
def bad(request, tmp_path_factory) -> tuple[Path, GenerateSummary]:
    out = tmp_path_factory.mktemp(f"bad_{request.param}")
    return out, generate_market(out, dataclasses.replace(BAD, fmt=request.param))


# --------------------------------------------------------------------------------------------
# reference validator (SPEC §3)


def _parse(row: dict[str, str | None]):
    """Typed values of one text row, or None when SPEC §3 calls it SCHEMA."""
    if any(row[c] is None for c in schema.INPUT_REQUIRED):
        return None
    if row["record_type"] not in schema.RECORD_TYPES:
        return None
    try:
        v = dict(row)
        v["trade_id"] = int(row["trade_id"])
        v["trade_date"] = datetime.date.fromisoformat(row["trade_date"])
        v["trade_time"] = datetime.time.fromisoformat(row["trade_time"])
        v["price"] = Decimal(row["price"])
        v["quantity"] = int(row["quantity"])
        v["ref_trade_id"] = None if row["ref_trade_id"] is None else int(row["ref_trade_id"])
    except (ValueError, InvalidOperation):
        return None
    if not v["price"].is_finite():
        return None
    return v


def _key_parses(row: dict[str, str | None]) -> tuple | None:
    try:
        return (row["market"], datetime.date.fromisoformat(row["trade_date"]),
                int(row["trade_id"]))
    except (TypeError, ValueError):
        return None


def validate(summary: GenerateSummary) -> tuple[dict[tuple[str, int], str], list[dict]]:
    """(file, row) -> reason for quarantined rows, and the accepted rows in input order."""
    secs = {(r["market"], r["security_id"]) for r in refdata(summary, "securities").to_pylist()}
    units = set(refdata(summary, "trading_units").column("unit_id").to_pylist())
    accts = set(refdata(summary, "accounts").column("account_id").to_pylist())
    cal = {(r["market"], r["business_date"]) for r in refdata(summary, "calendar").to_pylist()}
    seen: set[tuple] = set()
    accepted_n: dict[tuple, dict] = {}
    cancelled: set[tuple] = set()
    reasons: dict[tuple[str, int], str] = {}
    accepted: list[dict] = []
    same = ("security_id", "price", "quantity", "buy_account", "sell_account",
            "buy_unit", "sell_unit")
    for f in summary.trade_files:
        name = Path(f).name
        for i, row in enumerate(read_text(f).to_pylist()):
            key = _key_parses(row)
            v = _parse(row)
            reason = None
            if v is None:
                reason = "SCHEMA"
            elif v["quantity"] <= 0:
                reason = "BAD_QUANTITY"
            elif v["price"] <= 0:
                reason = "BAD_PRICE"
            elif (v["market"], v["security_id"]) not in secs:
                reason = "UNKNOWN_SECURITY"
            elif v["buy_unit"] not in units or v["sell_unit"] not in units:
                reason = "UNKNOWN_UNIT"
            elif v["buy_account"] not in accts or v["sell_account"] not in accts:
                reason = "UNKNOWN_ACCOUNT"
            elif (v["market"], v["trade_date"]) not in cal:
                reason = "NOT_BUSINESS_DAY"
            elif key in seen:
                reason = "DUPLICATE_TRADE"
            elif v["record_type"] == "X":
                ref = (v["market"], v["trade_date"], v["ref_trade_id"])
                target = accepted_n.get(ref)
                if target is None:
                    reason = "UNKNOWN_REF"
                elif any(target[c] != v[c] for c in same):
                    reason = "REF_MISMATCH"
                elif ref in cancelled:
                    reason = "ALREADY_CANCELLED"
                else:
                    cancelled.add(ref)
            if key is not None:
                seen.add(key)
            if reason is None:
                v["file"], v["row"] = name, i
                accepted.append(v)
                if v["record_type"] == "N":
                    accepted_n[key] = v
            else:
                reasons[(name, i)] = reason
    return reasons, accepted


# --------------------------------------------------------------------------------------------
# tests


def test_layout_and_summary(small):
    out, s = small
    assert s.rows == SMALL.trades and s.bad_rows == 0 and s.cancel_rows == 0
    assert s.refdata_dir == str(out / "refdata")
    assert sorted(p.name for p in (out / "refdata").iterdir()) == sorted(
        f"{n}.parquet" for n in schema.REFDATA
    )
    names = [Path(f).name for f in s.trade_files]
    assert names == sorted(names) and len(names) == SMALL.days
    assert sorted(p.name for p in (out / "trades").iterdir()) == names
    assert sum(pq.read_metadata(f).num_rows for f in s.trade_files) == SMALL.trades


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_deterministic_per_seed(tmp_path, fmt):
    spec = dataclasses.replace(SMALL, trades=800, fmt=fmt, bad_rate=0.1, cancel_rate=0.1)
    a = generate_market(tmp_path / "a", spec)
    b = generate_market(tmp_path / "b", spec)
    assert (a.rows, a.bad_rows, a.cancel_rows) == (b.rows, b.bad_rows, b.cancel_rows)
    files = [Path(f).relative_to(tmp_path / "a") for f in a.trade_files]
    files += [Path("refdata") / f"{n}.{fmt}" for n in schema.REFDATA]
    for rel in files:
        assert filecmp.cmp(tmp_path / "a" / rel, tmp_path / "b" / rel, shallow=False), rel
    c = generate_market(tmp_path / "c", dataclasses.replace(spec, seed=1))
    assert any(
        not filecmp.cmp(x, y, shallow=False)
        for x, y in zip(a.trade_files, c.trade_files, strict=True)
    )


def test_parquet_schemas_exact(small):
    out, s = small
    for f in s.trade_files:
        assert pq.read_schema(f).remove_metadata() == schema.INPUT_TRADE
        assert max(pq.read_metadata(f).row_group(i).num_rows
                   for i in range(pq.read_metadata(f).num_row_groups)) <= 1_000_000
    for name, sch in schema.REFDATA.items():
        t = pq.read_table(out / "refdata" / f"{name}.parquet")
        assert t.schema.remove_metadata() == sch, name
        for col in sch.names:
            if col not in schema.REFDATA_NULLABLE.get(name, ()):
                assert t.column(col).null_count == 0, (name, col)


def test_csv_matches_parquet(tmp_path, small):
    _, sp = small
    sc = generate_market(tmp_path, dataclasses.replace(SMALL, fmt="csv"))
    for name, sch in schema.REFDATA.items():
        got = read_table(Path(sc.refdata_dir) / f"{name}.csv", sch)
        assert got.equals(pq.read_table(Path(sp.refdata_dir) / f"{name}.parquet")), name
    for fc, fp in zip(sc.trade_files, sp.trade_files, strict=True):
        assert Path(fc).stem == Path(fp).stem
        got = read_table(fc, schema.INPUT_TRADE)
        assert got.schema == schema.INPUT_TRADE
        assert got.equals(pq.read_table(fp))
    first = Path(sc.trade_files[0]).read_text(encoding="utf-8").splitlines()
    assert first[0] == ",".join(schema.INPUT_TRADE.names)
    fields = first[1].split(",")
    assert fields[-1] == "" and fields[-2] == "N"  # null ref_trade_id is an empty field
    assert len(fields[5].split(".")[1]) == 3  # price keeps its scale: 10.500
    assert len(fields[3]) == len("09:30:00.000000")


def test_every_quarantine_reason_matches_reference_validator(bad):
    out, s = bad
    reasons, _ = validate(s)
    assert reasons == expected(out)
    counts = Counter(reasons.values())
    assert set(counts) == set(schema.QUARANTINE_REASONS), counts
    n_bad, n_cancel = round(BAD.trades * BAD.bad_rate), round(BAD.trades * BAD.cancel_rate)
    assert s.bad_rows == n_bad and s.cancel_rows == n_cancel
    for reason in schema.QUARANTINE_REASONS[:8]:  # bad rows: an even split
        assert counts[reason] in (n_bad // 8, n_bad // 8 + 1), (reason, counts)
    for reason in schema.QUARANTINE_REASONS[8:]:  # invalid cancellations: 5% each
        assert counts[reason] == round(n_cancel * 0.05), (reason, counts)


def test_bad_rows_by_construction(tmp_path):
    """Properties visible without any validator (Parquet keeps every bad value typed)."""
    s = generate_market(tmp_path, BAD)
    t = all_trades(s).to_pylist()
    secs = {(r["market"], r["security_id"]) for r in refdata(s, "securities").to_pylist()}
    cal = {(r["market"], r["business_date"]) for r in refdata(s, "calendar").to_pylist()}
    weekend = [r for r in t if r["trade_date"] and r["trade_date"].weekday() >= 5]
    holiday = [r for r in t if r["trade_date"] and (r["market"], r["trade_date"]) not in cal]
    assert weekend and len(holiday) >= len(weekend)
    assert any(r["quantity"] == 0 for r in t) and any((r["quantity"] or 1) < 0 for r in t)
    assert any(r["price"] == 0 for r in t) and any((r["price"] or 1) < 0 for r in t)
    assert any(r["security_id"] and (r["market"], r["security_id"]) not in secs for r in t)
    assert any(r["record_type"] == "Z" for r in t)
    assert any(r[c] is None for r in t for c in schema.INPUT_REQUIRED)
    keys = Counter((r["market"], r["trade_date"], r["trade_id"]) for r in t
                   if None not in (r["market"], r["trade_date"], r["trade_id"]))
    assert sum(n - 1 for n in keys.values()) >= BAD.trades * BAD.bad_rate / 8 - 1
    n_ids = {(r["market"], r["trade_date"], r["trade_id"]) for r in t if r["record_type"] == "N"}
    xs = [r for r in t if r["record_type"] == "X"]
    assert all(r["ref_trade_id"] is not None for r in xs)
    assert any((r["market"], r["trade_date"], r["ref_trade_id"]) not in n_ids for r in xs)
    assert all(r["ref_trade_id"] is None for r in t if r["record_type"] == "N")


def test_csv_only_unparseable_values(tmp_path):
    s = generate_market(tmp_path, dataclasses.replace(BAD, fmt="csv", bad_rate=0.3))
    text = "".join(Path(f).read_text(encoding="utf-8") for f in s.trade_files)
    for bad_text in (",abc,", "-02-30,", ",100x,", ",25:61:00.000000,", ",Z,"):
        assert bad_text in text, bad_text


def test_good_rows_on_business_days_and_units_match_accounts(bad):
    out, s = bad
    _, accepted = validate(s)
    acct_part = {r["account_id"]: r["participant_id"] for r in refdata(s, "accounts").to_pylist()}
    unit_part = {r["unit_id"]: r["participant_id"] for r in refdata(s, "trading_units").to_pylist()}
    cal = {(r["market"], r["business_date"]) for r in refdata(s, "calendar").to_pylist()}
    for v in accepted:
        file_date = datetime.datetime.strptime(v["file"][7:15], "%Y%m%d").date()
        assert v["trade_date"] == file_date
        assert (v["market"], v["trade_date"]) in cal
        assert unit_part[v["buy_unit"]] == acct_part[v["buy_account"]]
        assert unit_part[v["sell_unit"]] == acct_part[v["sell_account"]]
        assert v["buy_account"] != v["sell_account"]
        t = v["trade_time"]
        assert (datetime.time(9, 30) <= t < datetime.time(11, 30)
                or datetime.time(13) <= t < datetime.time(15)), t


def test_ids_times_and_cancellation_order(small, tmp_path):
    s = generate_market(tmp_path, dataclasses.replace(SMALL, cancel_rate=0.2))
    for f in s.trade_files:
        rows = pq.read_table(f).to_pylist()
        for m in schema.MARKETS:
            mine = [r for r in rows if r["market"] == m]
            ids = [r["trade_id"] for r in mine]
            assert ids == list(range(1, len(ids) + 1))
            times = [r["trade_time"] for r in mine]
            assert times == sorted(times)
            pos = {r["trade_id"]: i for i, r in enumerate(mine)}
            for i, r in enumerate(mine):
                if r["record_type"] == "X" and r["ref_trade_id"] in pos:
                    assert pos[r["ref_trade_id"]] < i
                elif r["record_type"] == "X":  # UNKNOWN_REF points past every real id
                    assert r["ref_trade_id"] > len(mine)
        times = [r["trade_time"] for r in rows]
        assert times == sorted(times)  # both markets interleaved by time
        assert {r["market"] for r in rows} <= set(schema.MARKETS)


def test_calendars(small):
    _, s = small
    cal = refdata(s, "calendar").to_pylist()
    by = {m: sorted(r["business_date"] for r in cal if r["market"] == m) for m in schema.MARKETS}
    assert all(d.weekday() < 5 for m in by for d in by[m])
    shg, she = set(by["XSHG"]), set(by["XSHE"])
    days = [datetime.datetime.strptime(Path(f).stem[7:], "%Y%m%d").date() for f in s.trade_files]
    assert set(days) <= shg and (shg - she) & set(days)  # XSHE closed one XSHG trading day
    assert datetime.date(2023, 8, 28) in days and datetime.date(2023, 8, 25) in days
    assert by["XSHG"][0] <= days[0] - datetime.timedelta(days=30)
    assert by["XSHG"][-1] >= days[-1] + datetime.timedelta(days=60)
    assert datetime.date(2023, 9, 29) not in shg and datetime.date(2023, 10, 4) not in shg
    closed = sorted(shg - she)
    t = all_trades(s)
    assert not [r for r in t.to_pylist() if r["market"] == "XSHE" and r["trade_date"] in closed]


def test_securities_prices_and_quantities(small):
    _, s = small
    secs = refdata(s, "securities").to_pylist()
    kinds = Counter(r["security_type"] for r in secs)
    assert kinds == {"A_SHARE": 42, "STAR": 6, "ETF": 7, "BOND": 5}
    prefix = {("A_SHARE", "XSHG"): ("600", "601", "603"), ("A_SHARE", "XSHE"): ("000", "002", "300"),
              ("STAR", "XSHG"): ("688",), ("ETF", "XSHG"): ("510",), ("ETF", "XSHE"): ("159",),
              ("BOND", "XSHG"): ("019",), ("BOND", "XSHE"): ("10",)}
    for r in secs:
        assert r["security_id"].startswith(prefix[(r["security_type"], r["market"])])
        assert len(r["security_id"]) == 6 and r["currency"] == "CNY"
        assert (r["securities_cycle"], r["cash_cycle"]) == (0, 1)
    assert len({(r["market"], r["security_id"]) for r in secs}) == len(secs)
    stype = {(r["market"], r["security_id"]): r["security_type"] for r in secs}
    lot = {(r["market"], r["security_id"]): r["board_lot"] for r in secs}
    t = all_trades(s).to_pylist()
    odd = 0
    for r in t:
        k = (r["market"], r["security_id"])
        milli = int(r["price"] * 1000)
        assert milli > 0 and r["price"].as_tuple().exponent == -3
        if stype[k] != "ETF":
            assert milli % 10 == 0
        if stype[k] == "BOND":
            assert Decimal(85) < r["price"] < Decimal(125)
        assert 0 < r["quantity"] <= 1_000_000
        if stype[k] == "STAR":
            assert r["quantity"] >= 200
        odd += r["quantity"] % lot[k] != 0
    assert 0 < odd < 0.05 * len(t)
    assert any(r["price"] * 1000 % 10 for r in t if stype[(r["market"], r["security_id"])] == "ETF")


def test_activity_is_zipf_skewed(small):
    _, s = small
    per_sec = Counter(all_trades(s).column("security_id").to_pylist())
    counts = sorted(per_sec.values(), reverse=True)
    assert counts[0] > 10 * counts[len(counts) // 2]


def test_parties_and_holdings(small):
    _, s = small
    parts = refdata(s, "participants").to_pylist()
    assert [p["participant_id"] for p in parts] == [f"P{i:04d}" for i in range(1, 7)]
    assert all(Decimal("1e7") <= p["reserve_balance"] <= Decimal("5e8") for p in parts)
    units = refdata(s, "trading_units").to_pylist()
    assert Counter(u["participant_id"] for u in units) == {p["participant_id"]: 3 for p in parts}
    assert all(len(u["unit_id"]) == 5 and u["unit_id"].isdigit() for u in units)
    accts = refdata(s, "accounts").to_pylist()
    assert [a["account_id"] for a in accts] == [f"A{i:09d}" for i in range(1, 401)]
    individual = sum(a["holder_type"] == "INDIVIDUAL" for a in accts) / len(accts)
    assert 0.75 < individual < 0.95
    hold = refdata(s, "holdings").to_pylist()
    assert len(hold) == 800
    assert {(h["market"], h["security_id"]) for h in hold} == {
        (r["market"], r["security_id"]) for r in refdata(s, "securities").to_pylist()
    }
    assert len({(h["account_id"], h["market"], h["security_id"]) for h in hold}) == len(hold)
    assert all(h["quantity"] > 0 for h in hold)
    # Replay positions: sellers mostly hold what they sell, a few go negative.
    pos = Counter({(h["account_id"], h["market"], h["security_id"]): h["quantity"] for h in hold})
    negative = set()
    for r in all_trades(s).to_pylist():
        k = (r["market"], r["security_id"])
        pos[(r["buy_account"], *k)] += r["quantity"]
        pos[(r["sell_account"], *k)] -= r["quantity"]
        if pos[(r["sell_account"], *k)] < 0:
            negative.add((r["sell_account"], *k))
    assert len(negative) < 0.01 * SMALL.trades


def test_fees_table(small):
    _, s = small
    fees = refdata(s, "fees").to_pylist()
    d = datetime.date
    for m in schema.MARKETS:
        mine = [f for f in fees if f["market"] == m]

        def rows(code, stype, mine=mine):
            return sorted(((f["side"], f["rate"], f["effective_from"], f["effective_to"])
                           for f in mine if f["fee_code"] == code and f["security_type"] == stype),
                          key=lambda row: row[2])

        for st in ("A_SHARE", "STAR"):
            sd = rows("STAMP_DUTY", st)
            assert [(x[0], x[1], x[3]) for x in sd] == [
                ("SELL", Decimal("0.00100000"), d(2023, 8, 27)),
                ("SELL", Decimal("0.00050000"), None),
            ]
            assert sd[1][2] == d(2023, 8, 28)
            h = rows("HANDLING", st)
            assert [(x[1], x[3]) for x in h] == [(Decimal("0.00004870"), d(2023, 8, 27)),
                                                 (Decimal("0.00003410"), None)]
            assert h[1][2] == d(2023, 8, 28) and {x[0] for x in h} == {"BOTH"}
        for st in ("ETF", "BOND", "FUND"):
            assert rows("STAMP_DUTY", st) == []
        assert rows("MANAGEMENT", "*") == [("BOTH", Decimal("0.00002000"), d(2012, 9, 1), None)]
        assert rows("TRANSFER", "*") == [
            ("BOTH", Decimal("0.00002000"), d(2015, 8, 1), d(2022, 4, 28)),
            ("BOTH", Decimal("0.00001000"), d(2022, 4, 29), None),
        ]
    assert {f["fee_code"] for f in fees} == set(schema.FEE_CODES)


def test_corporate_actions_and_cash_movements(small):
    _, s = small
    cal = refdata(s, "calendar").to_pylist()
    days = [datetime.datetime.strptime(Path(f).stem[7:], "%Y%m%d").date() for f in s.trade_files]
    secs = {(r["market"], r["security_id"]): r["security_type"]
            for r in refdata(s, "securities").to_pylist()}
    cas = refdata(s, "corporate_actions").to_pylist()
    assert {c["ca_type"] for c in cas} == {"CASH_DIVIDEND", "BONUS_SHARES"}
    for c in cas:
        bus = sorted(r["business_date"] for r in cal if r["market"] == c["market"])
        assert secs[(c["market"], c["security_id"])] in ("A_SHARE", "STAR")
        assert days[0] <= c["record_date"] < c["ex_date"] == c["pay_date"] <= days[-1]
        assert bus[bus.index(c["record_date"]) + 1] == c["ex_date"]
        if c["ca_type"] == "CASH_DIVIDEND":
            assert c["cash_per_share"] > 0 and c["shares_per_share"] is None
        else:
            assert c["shares_per_share"] > 0 and c["cash_per_share"] is None
    moves = refdata(s, "cash_movements").to_pylist()
    assert moves and all(m["amount"] != 0 for m in moves)


@pytest.mark.parametrize(
    "change",
    [
        {"trades": -1},
        {"accounts": 0},
        {"securities": 0},
        {"securities": 20_000},
        {"participants": 0},
        {"units_per_participant": 0},
        {"days": 0},
        {"fmt": "json"},
        {"bad_rate": -0.1},
        {"cancel_rate": 1.5},
        {"bad_rate": 0.6, "cancel_rate": 0.6},
        {"bad_rate": 0.0, "cancel_rate": 0.9},
        {"holdings": -5},
        {"holdings": 400 * 60 + 1},
        {"start_date": "2023-08-21"},
    ],
)
def test_nonsense_specs_raise(tmp_path, change):
    with pytest.raises(ValueError, match="invalid MarketSpec"):
        generate_market(tmp_path, dataclasses.replace(SMALL, **change))
    assert not (tmp_path / "trades").exists()


def test_edge_sizes(tmp_path):
    s = generate_market(tmp_path / "zero", dataclasses.replace(SMALL, trades=0, days=1))
    assert len(s.trade_files) == 1 and pq.read_metadata(s.trade_files[0]).num_rows == 0
    s = generate_market(tmp_path / "one", MarketSpec(trades=50, accounts=2, securities=1,
                                                     participants=1, units_per_participant=1,
                                                     days=2, holdings=0))
    assert s.rows == 50
    dense = generate_market(tmp_path / "dense", dataclasses.replace(SMALL, accounts=10,
                                                                    securities=5, holdings=50))
    assert pq.read_metadata(Path(dense.refdata_dir) / "holdings.parquet").num_rows == 50


def test_rerun_replaces_stale_files(tmp_path):
    generate_market(tmp_path, dataclasses.replace(SMALL, trades=100, days=8))
    s = generate_market(tmp_path, dataclasses.replace(SMALL, trades=100, days=3, fmt="csv"))
    assert sorted(str(p) for p in (tmp_path / "trades").iterdir()) == sorted(s.trade_files)
    assert all(p.suffix == ".csv" for p in (tmp_path / "refdata").iterdir())


def test_no_floats(small):
    """Money and rates are decimals, never floats, in every table."""
    _, s = small
    for name, sch in schema.REFDATA.items():
        assert not any(pa.types.is_floating(f.type) for f in sch), name
    t = all_trades(s)
    assert t.schema.field("price").type == schema.PRICE
    assert isinstance(np.asarray(t.column("quantity"))[0], np.int64)
