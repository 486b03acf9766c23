"""Opening holdings (refdata `holdings`) end to end, on every storage backend.

Pins down:
  * bad opening holdings (undefined account or security, quantity <= 0, duplicate key) are a
    one-line RefDataError at `replay`, although RefData loads them lazily; once the file is
    fixed, the same TARGET starts normally;
  * a restart over the very same holdings file resumes (the file sha256 shortcut);
  * a restart over the same rows in another order, or in another file format (other bytes,
    same content), is accepted, also when the row fingerprint differs and the engine has to
    compare exactly;
  * a restart over holdings that really differ (a quantity, a row more, a row less) is refused
    with "differ from the opening holdings" and commits nothing;
  * the `holdings` table is opening holdings plus the trades' legs (hand-checked values).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from market import T1, trade, write_refdata, write_trades

from settle_arrow import engine, open_target, recovery, replay, schema
from settle_arrow import refdata as refdata_module
from settle_arrow.refdata import RefDataError, load_refdata

OPENING = [
    ("A1", "XSHG", "600000", 5000),
    ("A2", "XSHG", "600001", 700),
    ("A3", "XSHG", "600000", 250),
]
FIRST = [
    trade(1, "A3", "A1", 1000, "10.00"),               # A1 600000 -1000, A3 +1000
    trade(2, "A1", "A2", 700, "20.00", "600001"),      # A2 600001 -700 (to zero), A1 +700
]
SECOND = [
    trade(1, "A2", "A1", 300, "10.10", trade_date=T1),  # A1 600000 -300, A2 +300
    trade(2, "A9", "A3", 50, "10.20", trade_date=T1),   # A3 600000 -50, A9 +50
]
# opening + FIRST
AFTER_FIRST = {
    ("A1", "600000"): 4000, ("A3", "600000"): 1250, ("A1", "600001"): 700,
}
# opening + FIRST + SECOND (A2's 600001 went to zero: no row)
AFTER_SECOND = {
    ("A1", "600000"): 3700, ("A3", "600000"): 1200, ("A1", "600001"): 700, ("A2", "600000"): 300,
    ("A9", "600000"): 50,
}


# --- helpers --------------------------------------------------------------------------


def holdings_parquet(ref: Path, rows) -> None:
    _remove_holdings(ref)
    table = pa.Table.from_pylist([dict(zip(schema.REFDATA["holdings"].names, r, strict=True)) for r in rows],
                                 schema=schema.REFDATA["holdings"])
    pq.write_table(table, ref / "holdings.parquet")


def holdings_csv(ref: Path, rows) -> None:
    _remove_holdings(ref)
    with open(ref / "holdings.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(schema.REFDATA["holdings"].names)
        w.writerows(rows)


def _remove_holdings(ref: Path) -> None:
    for ext in (".parquet", ".arrow", ".feather", ".csv"):
        (ref / f"holdings{ext}").unlink(missing_ok=True)


def holdings(db: str) -> dict[tuple[str, str], int]:
    with open_target(db) as t:
        h = t.table("holdings")
    assert set(h["market"].to_list()) <= {"XSHG"}
    keys = list(zip(h["account_id"].to_list(), h["security_id"].to_list(), strict=True))
    assert len(keys) == len(set(keys)), "one row per position"
    return dict(zip(keys, h["quantity"].to_list(), strict=True))


def trade_count(db: str) -> int:
    with open_target(db) as t:
        return t.table("trades").height


@pytest.fixture
def started(tmp_path, new_target):
    """A TARGET started with OPENING (Parquet) and FIRST; returns (ref dir, trade files, TARGET)."""
    ref = write_refdata(tmp_path, holdings=OPENING)
    t1 = write_trades(tmp_path / "trades" / "t1.parquet", FIRST)
    t2 = write_trades(tmp_path / "trades" / "t2.parquet", SECOND)
    db = new_target()
    report = replay([str(t1)], str(ref), db, window_rows=1)
    assert report.rows_accepted == 2
    assert holdings(db) == AFTER_FIRST
    return ref, (t1, t2), db


# --- bad opening holdings -------------------------------------------------------------


BAD = [
    pytest.param([("A1", "XSHG", "600000", 100), ("A7", "XSHG", "600000", 100)],
                 "holdings: account 'A7' is not defined", id="undefined-account"),
    pytest.param([("A1", "XSHG", "600000", 100), ("A2", "XSHG", "699999", 100)],
                 "holdings: security XSHG/699999 is not defined", id="undefined-security"),
    pytest.param([("A1", "XSHG", "600000", 100), ("A2", "XSHE", "600000", 100)],
                 "holdings: security XSHE/600000 is not defined", id="security-of-another-market"),
    pytest.param([("A1", "XSHG", "600000", 100), ("A2", "XSHG", "600000", 0)],
                 "holdings: opening quantity must be > 0", id="zero-quantity"),
    pytest.param([("A1", "XSHG", "600000", -5), ("A2", "XSHG", "600000", 100)],
                 "holdings: opening quantity must be > 0", id="negative-quantity"),
    pytest.param([("A1", "XSHG", "600000", 100), ("A2", "XSHG", "600001", 100), ("A1", "XSHG", "600000", 7)],
                 "holdings: duplicate key A1/XSHG/600000", id="duplicate-key"),
]


@pytest.mark.parametrize("rows,message", BAD)
def test_bad_opening_holdings_fail_replay(tmp_path, backend, rows, message):
    ref = write_refdata(tmp_path, holdings=rows)
    f = write_trades(tmp_path / "trades" / "t.parquet", [trade(1, "A1", "A2", 100, "10.00")])
    # Holdings load lazily: loading the reference data alone does not look at them ...
    load_refdata(str(ref))
    # ... but a replay into a new TARGET does, before any trade is committed.
    db = backend.new(tmp_path)
    with pytest.raises(RefDataError) as err:
        replay([str(f)], str(ref), db)
    assert str(err.value) == message
    assert "trade_facts" not in backend.tables(db) or _count(db, "trade_facts") == 0
    assert "opening_holdings" not in backend.tables(db) or _count(db, "opening_holdings") == 0

    # The TARGET was never started with these holdings: with the file fixed it starts normally.
    holdings_parquet(ref, [("A1", "XSHG", "600000", 100)])
    report = replay([str(f)], str(ref), db)
    assert report.rows_accepted == 1
    assert holdings(db) == {("A1", "600000"): 200, ("A2", "600000"): -100}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(keys=st.lists(st.tuples(st.sampled_from(["A1", "A2", "A3", "A9"]), st.sampled_from(["600000", "600001"])),
                     unique=True, min_size=1, max_size=8),
       order=st.sampled_from(["account", "security", "as drawn"]), sample_rows=st.sampled_from([1, 2, 65_536]),
       undefined=st.sampled_from([None, "account", "security"]), chunk_rows=st.sampled_from([None, 1, 2, 3]))
def test_opening_load_ignores_row_order(tmp_path_factory, monkeypatch, keys, order, sample_rows, undefined,
                                        chunk_rows):
    """Looked up per run of equal keys when a column is sorted, row by row when not (judged on
    a leading sample of `sample_rows`), runs found chunk by chunk of the file's read
    (`chunk_rows` a chunk): either way every row gets its own account and security, and an
    undefined one is named."""
    monkeypatch.setattr(refdata_module, "RUNS_SAMPLE_ROWS", sample_rows)
    if chunk_rows:
        load_table = refdata_module._load_table

        def in_chunks(dir_url: str, name: str) -> pl.DataFrame:
            frame = load_table(dir_url, name)
            if name != "holdings":
                return frame
            return pl.concat([frame.slice(at, chunk_rows) for at in range(0, frame.height, chunk_rows)] or [frame],
                             rechunk=False)

        monkeypatch.setattr(refdata_module, "_load_table", in_chunks)
    rows = [(a, "XSHG", s, 100 + i) for i, (a, s) in enumerate(keys)]
    if undefined == "account":
        rows.append(("A7", "XSHG", "600000", 1))
    elif undefined == "security":
        rows.append(("A1", "XSHG", "699999", 1))
    if order != "as drawn":
        rows.sort(key=(lambda r: (r[0], r[2])) if order == "account" else (lambda r: (r[2], r[0])))
    ref = write_refdata(tmp_path_factory.mktemp("opening"), holdings=rows)
    loaded = load_refdata(str(ref))
    if undefined:
        what = "account 'A7'" if undefined == "account" else "security XSHG/699999"
        with pytest.raises(RefDataError, match=f"^holdings: {what} is not defined$"):
            loaded.opening  # noqa: B018
        return
    opening = loaded.opening
    accounts = loaded.account_index.values(opening["acct_idx"].to_numpy()).to_list()
    securities = loaded.securities["security_id"].gather(opening["sec_idx"]).to_list()
    got = list(zip(accounts, securities, opening["quantity"].to_list(), strict=True))
    assert sorted(got) == sorted((a, s, q) for a, _, s, q in rows)
    # In key order, whatever the file's: the TARGET stores it so (a deterministic layout).
    keys = list(zip(opening["acct_idx"].to_list(), opening["sec_idx"].to_list(), strict=True))
    assert keys == sorted(keys)


def _count(db: str, name: str) -> int:
    from settle_arrow.storage import open_storage

    storage = open_storage(db, read_only=True)
    try:
        return storage.count(name)
    finally:
        storage.close()


def test_bad_opening_holdings_from_csv(tmp_path, new_target):
    ref = write_refdata(tmp_path)
    holdings_csv(ref, [("A1", "XSHG", "600000", 100), ("A1", "XSHG", "600000", 100)])
    f = write_trades(tmp_path / "trades" / "t.parquet", [trade(1, "A1", "A2", 100, "10.00")])
    with pytest.raises(RefDataError, match="^holdings: duplicate key A1/XSHG/600000$"):
        replay([str(f)], str(ref), new_target())


# --- holdings = opening + trades ------------------------------------------------------


def test_holdings_are_opening_plus_trades(tmp_path, new_target):
    ref = write_refdata(tmp_path, holdings=OPENING)
    f = write_trades(tmp_path / "trades" / "t.parquet", FIRST + [
        trade(3, "A2", "A1", 300, "10.10", trade_date=T1),
        trade(4, "A9", "A3", 50, "10.20", trade_date=T1),
        # a cancelled trade moves nothing
        trade(5, "A2", "A3", 40, "10.00", trade_date=T1),
        trade(6, "A2", "A3", 40, "10.00", trade_date=T1, record_type="X", ref_trade_id=5),
    ])
    db = new_target()
    replay([str(f)], str(ref), db, window_rows=2)
    assert holdings(db) == AFTER_SECOND


def test_opening_holdings_alone(tmp_path, new_target):
    """No trades at all: the holdings table is the opening holdings."""
    ref = write_refdata(tmp_path, holdings=OPENING)
    f = write_trades(tmp_path / "trades" / "t.parquet", [])
    db = new_target()
    replay([str(f)], str(ref), db)
    assert holdings(db) == {(a, s): q for a, _m, s, q in OPENING}


# --- restarts -------------------------------------------------------------------------


def test_restart_same_file_resumes(started):
    ref, (t1, t2), db = started
    report = replay([str(t1), str(t2)], str(ref), db, window_rows=1)
    assert report.rows_accepted == 2  # t1 was done already
    assert trade_count(db) == 4
    assert holdings(db) == AFTER_SECOND


def test_restart_same_file_does_not_load_holdings(started, monkeypatch):
    """The stored sha256 of the holdings file matches: the holdings are not loaded again."""
    ref, (t1, t2), db = started

    def boom(*args, **kwargs):
        raise AssertionError("holdings loaded although the file is the one the TARGET started with")

    monkeypatch.setattr("settle_arrow.refdata._load_opening", boom)
    replay([str(t1), str(t2)], str(ref), db, window_rows=1)
    assert holdings(db) == AFTER_SECOND


@pytest.mark.parametrize("rewrite", [
    pytest.param(lambda ref: holdings_parquet(ref, OPENING[::-1]), id="parquet-reordered"),
    pytest.param(lambda ref: holdings_csv(ref, OPENING), id="csv-same-order"),
    pytest.param(lambda ref: holdings_csv(ref, [OPENING[1], OPENING[2], OPENING[0]]), id="csv-reordered"),
    # Reference rows in another order: acct_idx changes, the stored ids do not.
    pytest.param(lambda ref: (_reverse_rows(ref / "accounts.parquet"), holdings_parquet(ref, OPENING[::-1])),
                 id="accounts-reordered"),
])
def test_restart_same_rows_other_bytes_accepted(started, rewrite, monkeypatch):
    """Accepted on the fingerprint alone: no exact comparison with the stored rows."""
    ref, (t1, t2), db = started
    before = (ref / "holdings.parquet").read_bytes()
    rewrite(ref)
    now = next(p for p in ref.iterdir() if p.stem == "holdings")
    assert now.read_bytes() != before  # the sha256 shortcut does not apply

    def exact(_self):
        raise AssertionError("the fingerprint of the same rows differed")

    monkeypatch.setattr(engine.Engine, "_same_opening", exact)
    replay([str(t1), str(t2)], str(ref), db, window_rows=1)
    assert trade_count(db) == 4
    assert holdings(db) == AFTER_SECOND


def _reverse_rows(path: Path) -> None:
    table = pq.read_table(path)
    pq.write_table(table.take(list(range(table.num_rows))[::-1]), path)


def _fingerprint_differs(monkeypatch) -> None:
    """Make the row fingerprint disagree with the stored one (as after a Polars upgrade that
    changes row hashes), so the engine must compare the rows exactly."""
    monkeypatch.setattr(engine, "opening_fingerprint", lambda ids: "0" * 64)


def test_restart_exact_comparison_accepts_same_rows(started, monkeypatch):
    ref, (t1, t2), db = started
    holdings_csv(ref, OPENING[::-1])
    _fingerprint_differs(monkeypatch)
    replay([str(t1), str(t2)], str(ref), db, window_rows=1)
    assert holdings(db) == AFTER_SECOND


CHANGED = {
    "quantity": [("A1", "XSHG", "600000", 5001), OPENING[1], OPENING[2]],
    "security": [("A1", "XSHG", "600001", 5000), OPENING[1], OPENING[2]],
    "account": [("A9", "XSHG", "600000", 5000), OPENING[1], OPENING[2]],
    "row-removed": OPENING[:2],
    "row-added": [*OPENING, ("A9", "XSHG", "600001", 1)],
    "empty": [],
}


@pytest.mark.parametrize("rows,exact", [
    *[pytest.param(rows, False, id=f"{name}-fingerprint") for name, rows in CHANGED.items()],
    *[pytest.param(CHANGED[name], True, id=f"{name}-exact") for name in ("quantity", "account", "row-removed", "row-added")],
])
def test_restart_changed_holdings_refused(started, monkeypatch, rows, exact):
    ref, (t1, t2), db = started
    holdings_parquet(ref, rows)
    if exact:
        _fingerprint_differs(monkeypatch)
    with pytest.raises(RefDataError, match="differ from the opening holdings"):
        replay([str(t1), str(t2)], str(ref), db, window_rows=1)
    # Nothing of t2 committed, and the holdings are still the original ones.
    assert trade_count(db) == 2
    assert holdings(db) == AFTER_FIRST

    # Back to the original rows (in CSV now): the restart goes on.
    holdings_csv(ref, OPENING)
    replay([str(t1), str(t2)], str(ref), db, window_rows=1)
    assert holdings(db) == AFTER_SECOND


def test_restart_changed_quantity_csv_refused(started):
    ref, (t1, t2), db = started
    holdings_csv(ref, [OPENING[0], ("A2", "XSHG", "600001", 701), OPENING[2]])
    with pytest.raises(RefDataError, match="^reference holdings differ from the opening holdings .* was started with$"):
        replay([str(t1), str(t2)], str(ref), db, window_rows=1)
    assert trade_count(db) == 2


def test_restart_without_holdings_file_refused(started):
    """Removing the holdings file is a change too (no file = no opening holdings)."""
    ref, (t1, t2), db = started
    (ref / "holdings.parquet").unlink()
    with pytest.raises(RefDataError, match="differ from the opening holdings"):
        replay([str(t1), str(t2)], str(ref), db, window_rows=1)
    assert trade_count(db) == 2


def test_start_without_holdings_then_empty_file_accepted(tmp_path, new_target):
    """A TARGET started with no holdings file accepts an empty holdings file later."""
    ref = write_refdata(tmp_path)
    (ref / "holdings.parquet").unlink()
    t1 = write_trades(tmp_path / "trades" / "t1.parquet", [trade(1, "A1", "A2", 100, "10.00")])
    t2 = write_trades(tmp_path / "trades" / "t2.parquet", [trade(2, "A1", "A2", 100, "10.00")])
    db = new_target()
    replay([str(t1)], str(ref), db)
    holdings_csv(ref, [])
    replay([str(t1), str(t2)], str(ref), db)
    assert holdings(db) == {("A1", "600000"): 200, ("A2", "600000"): -200}



def test_restart_remembers_the_new_bytes_of_the_same_rows(started, monkeypatch):
    """After one exact comparison accepts other bytes, the next start skips the load."""
    ref, (t1, t2), db = started
    holdings_csv(ref, OPENING[::-1])
    replay([str(t1)], str(ref), db, window_rows=1)

    def no_load(*_args, **_kw):
        raise AssertionError("opening holdings loaded although their bytes were seen before")

    monkeypatch.setattr("settle_arrow.refdata._load_opening", no_load)
    replay([str(t1), str(t2)], str(ref), db, window_rows=1)
    assert holdings(db) == AFTER_SECOND


@pytest.mark.parametrize("dropped", ["account", "security"])
def test_restart_refused_when_a_held_key_left_the_reference_data(started, dropped):
    """The holdings file is unchanged (the load is skipped) but A2 / 600001, still held in
    the TARGET, were removed from the reference data: a one-line RefDataError, not an assert."""
    ref, (t1, t2), db = started
    if dropped == "account":
        table = pq.read_table(ref / "accounts.parquet")
        pq.write_table(table.filter(pa.compute.not_equal(table["account_id"], "A3")), ref / "accounts.parquet")
    else:
        table = pq.read_table(ref / "securities.parquet")
        pq.write_table(table.filter(pa.compute.not_equal(table["security_id"], "600001")), ref / "securities.parquet")
    with pytest.raises(RefDataError, match="no longer defines that account or security"):
        replay([str(t1), str(t2)], str(ref), db, window_rows=1)
    assert holdings(db) == AFTER_FIRST


@given(data=st.data(), n=st.integers(0, 12), shuffled=st.booleans())
def test_recovery_maps_stored_ids_to_reference_rows(data, n, shuffled):
    """Recovery's id map (database id -> reference row, -1 for an id past the reference
    data): the same answers whether the ids follow reference order (no gather; the ids
    themselves when all are known) or not."""
    inverse = np.array(data.draw(st.permutations(range(n))) if shuffled else range(n), dtype=np.int64)
    ids = np.array(data.draw(st.lists(st.integers(0, 2 * n + 1), max_size=20)), dtype=np.int32)
    got = recovery._to_ref(inverse)(ids)
    assert got.tolist() == [int(inverse[i]) if i < n else -1 for i in ids.tolist()]


@pytest.mark.parametrize("file_order", ["by security", "by account"])
def test_opening_stored_in_key_order(tmp_path, new_target, file_order):
    """Whatever the file's row order, the opening holdings (the base until the first
    snapshot) are stored in key order: the TARGET does not depend on the file's row order."""
    rows = [("A3", "XSHG", "600000", 1), ("A1", "XSHG", "600001", 2), ("A2", "XSHG", "600000", 3),
            ("A1", "XSHG", "600000", 4)]
    rows.sort(key=(lambda r: (r[2], r[0])) if file_order == "by security" else (lambda r: (r[0], r[2])))
    ref = write_refdata(tmp_path, holdings=rows)
    target = new_target()
    replay([str(write_trades(tmp_path / "t.parquet", []))], str(ref), target)
    from settle_arrow.storage import open_storage

    storage = open_storage(target, read_only=True)
    try:
        snap = storage.query("SELECT acct_id, sec_id FROM holdings_base").to_pylist()
    finally:
        storage.close()
    keys = [(r["acct_id"], r["sec_id"]) for r in snap]
    assert len(keys) == 4 and keys == sorted(keys)


def test_init_opening_sorts_an_unsorted_opening(new_target):
    """The storage stores the opening in key order also when handed rows out of it, as the
    holdings base with no snapshot of its own."""
    from settle_arrow.storage import open_storage

    storage = open_storage(new_target())
    try:
        storage.ensure_schema()
        opening = pa.table({"acct_id": [2, 1, 2, 1], "sec_id": [1, 9, 0, 3], "quantity": [5, 6, 7, 8]},
                           schema=schema.HOLDINGS_IDS)
        storage.init_opening(opening, "d" * 64, "f" * 64)
        base = storage.query("SELECT acct_id, sec_id, quantity FROM holdings_base").to_pylist()
        stored = storage.query("SELECT acct_id, sec_id, quantity FROM opening_holdings").to_pylist()
        snapshots = storage.count("holdings_snapshot")
    finally:
        storage.close()
    assert [tuple(r.values()) for r in base] == [(1, 3, 8), (1, 9, 6), (2, 0, 7), (2, 1, 5)]
    assert stored == base and snapshots == 0


def test_fresh_start_state_equals_the_recovered_state(tmp_path, new_target):
    """A TARGET's first start keeps the opening it just stored as its state instead of
    reading it back: that state equals what recovery builds from the TARGET."""

    from settle_arrow.engine import Engine
    from settle_arrow.recovery import recover
    from settle_arrow.storage import open_storage

    rows = [("A3", "XSHG", "600000", 7), ("A1", "XSHG", "600001", 2), ("A2", "XSHG", "600000", 3),
            ("A1", "XSHG", "600000", 4)]
    ref = load_refdata(str(write_refdata(tmp_path, holdings=rows)))
    storage = open_storage(new_target())

    def content(runs) -> dict:
        keys, cols = runs.items()
        return {int(k): tuple(int(cols[c][i]) for c in sorted(cols)) for i, k in enumerate(keys)}

    try:
        engine = Engine(storage, ref)
        rebuilt = recover(storage, ref, engine.dims)
        for name in ("holdings", "seen", "accepted", "cancelled", "reported"):
            assert content(getattr(engine.state, name)) == content(getattr(rebuilt, name)), name
        assert len(engine.state.holdings) == 4
        assert engine.state.odd_seen.equals(rebuilt.odd_seen)
    finally:
        storage.close()


@settings(max_examples=60, deadline=None)
@given(rows=st.dictionaries(st.tuples(st.integers(0, 40), st.integers(0, 9)), st.integers(1, 10**12), max_size=30),
       seed=st.randoms(use_true_random=False))
def test_opening_fingerprint_is_the_rows_not_their_order(rows, seed):
    """The fingerprint hashes the rows in key order, so any row order gives the same one,
    and the key-order check agrees with sorting; another quantity gives another one."""
    import numpy as np

    from settle_arrow.dims import opening_fingerprint
    from settle_arrow.storage.base import ids_in_key_order

    def frame(items: list) -> pl.DataFrame:
        return pl.DataFrame({"acct_id": [a for (a, _), _ in items], "sec_id": [s for (_, s), _ in items],
                             "quantity": [q for _, q in items]},
                            schema={"acct_id": pl.Int32, "sec_id": pl.Int32, "quantity": pl.Int64})

    ordered = sorted(rows.items())
    shuffled = list(ordered)
    seed.shuffle(shuffled)
    a, b = frame(ordered), frame(shuffled)
    assert opening_fingerprint(a) == opening_fingerprint(b)
    keys = [k for k, _ in shuffled]
    assert ids_in_key_order(b["acct_id"].to_numpy(), b["sec_id"].to_numpy()) == (keys == sorted(keys))
    assert ids_in_key_order(np.array([3, 3], np.int32), np.array([2, 1], np.int32)) is False
    if ordered:
        changed = [(ordered[0][0], ordered[0][1] + 1), *ordered[1:]]
        assert opening_fingerprint(frame(changed)) != opening_fingerprint(a)
