"""Self-checks (SPEC §4-5, engine invariants): a faulty stage makes a window fail its
self-check; nothing of that window is committed, the failure is recorded, and a sound engine
on the same TARGET resumes and ends with the right tables."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import polars as pl
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from snapshots import RESULT_TABLES, TABLES, assert_same_tables, snapshot

from settle_arrow import SelfCheckError, checks, pipeline, replay
from settle_arrow import engine as engine_module
from settle_arrow.engine import STAGES, Engine
from settle_arrow.io.files import discover
from settle_arrow.refdata import load_refdata
from settle_arrow.stages.base import Window
from settle_arrow.stages.clearing import Clear
from settle_arrow.stages.registration import Register
from settle_arrow.stages.validate import Validate
from settle_arrow.storage import open_storage
from settle_arrow.storage.duckdb import DuckDBStorage

WINDOW = 500
FAIL_AT = 4  # window id the faulty stage breaks (window 0 is the opening holdings)


@pytest.fixture(scope="module")
def market(tmp_path_factory) -> Path:
    from settle_arrow.generate import MarketSpec, generate_market

    out = tmp_path_factory.mktemp("selfcheck")
    generate_market(out, MarketSpec(trades=4000, seed=5, days=3, bad_rate=0.05, cancel_rate=0.05))
    return out


@pytest.fixture(scope="module")
def reference(market, tmp_path_factory) -> dict:
    db = str(tmp_path_factory.mktemp("ref") / "ref.duckdb")
    replay([str(market / "trades")], str(market / "refdata"), db, window_rows=WINDOW)
    return snapshot(db)


def _replace(window: Window, **frames: pl.DataFrame) -> Window:
    return dataclasses.replace(window, frames={**window.frames, **frames})


def _first_nonzero(frame: pl.DataFrame, col: str) -> int:
    return int(frame.with_row_index("i").filter(pl.col(col) != 0)["i"][0])


def _share_from_thin_air(window: Window) -> Window:
    """Registers one share out of thin air."""
    h = window.frames["holdings_delta"]
    return _replace(window, holdings_delta=h.with_columns(
        pl.when(pl.int_range(pl.len()) == 0).then(pl.col("quantity") + 1).otherwise("quantity").alias("quantity")
    ))


def _leg_dropped(window: Window) -> Window:
    """Loses one participant's securities leg."""
    sec = window.frames["obligations_securities_delta"]
    i = _first_nonzero(sec, "net_quantity")
    return _replace(window, obligations_securities_delta=pl.concat([sec[:i], sec[i + 1:]]))


def _fen_lost(window: Window) -> Window:
    """Pays one participant a fen too much."""
    cash = window.frames["obligations_cash_delta"]
    one_fen = pl.lit(1, dtype=pl.Int64).cast(cash.schema["net_amount"]) / 100
    fixed = cash.with_columns(
        pl.when(pl.int_range(pl.len()) == 0).then(pl.col("net_amount") + one_fen).otherwise("net_amount")
        .cast(cash.schema["net_amount"]).alias("net_amount")
    )
    assert fixed["net_amount"].sum() != cash["net_amount"].sum()
    return _replace(window, obligations_cash_delta=fixed)


def _row_lost(window: Window) -> Window:
    """Neither accepts nor quarantines the last input row."""
    return _replace(window, accepted=window.frames["accepted"][:-1])


@dataclasses.dataclass(frozen=True)
class Faulty:
    """`stage` with `fault` applied to its output in window FAIL_AT."""

    stage: object
    fault: Callable[[Window], Window]

    @property
    def name(self) -> str:
        return f"faulty {self.stage.name}"

    def process(self, window, ctx):
        window = self.stage.process(window, ctx)
        return window if hasattr(self.stage, "finish") else self._faulted(window)

    def finish(self, windows, ref):
        """The fault in the stage's last output: its finish's where it has one."""
        return [self._faulted(w) for w in self.stage.finish(windows, ref)] if hasattr(self.stage, "finish") else windows

    def _faulted(self, window):
        return self.fault(window) if window.window_id == FAIL_AT else window


FAULTS = {
    "holdings": ((Validate(), Clear(), Faulty(Register(), _share_from_thin_air)), r"holdings not conserved"),
    "securities_leg": ((Validate(), Faulty(Clear(), _leg_dropped), Register()), r"net securities do not sum to zero"),
    "cash_fen": ((Validate(), Faulty(Clear(), _fen_lost), Register()), r"net cash != -fees"),
    "lost_row": ((Faulty(Validate(), _row_lost), Clear(), Register()),
                 r"rows read \d+ != accepted \d+ \+ quarantined \d+"),
}


def _bookkeeping(storage) -> dict[str, pl.DataFrame]:
    out = {}
    for name in ("sources", "self_checks", "meta"):
        frame = pl.from_arrow(storage.query(f"SELECT * FROM {name}"))
        assert isinstance(frame, pl.DataFrame)
        out[name] = frame.sort(frame.columns)
    return out


@pytest.mark.parametrize(("group", "pace"), [(1, None), (2, None), (2, engine_module.PACE_TRADES_PER_S_MAX)],
                         ids=["alone", "grouped", "grouped_feed"])
@pytest.mark.parametrize("resume", ["new_engine", "same_engine"])
@pytest.mark.parametrize("fault", list(FAULTS))
def test_faulty_stage_fails_window_and_commits_nothing(market, reference, new_target, fault, resume, group, pace,
                                                       monkeypatch):
    """Alone, a window is checked on the processing thread; grouped, on the commit lane,
    unless the run is a live feed (pace); each way the windows before it commit."""
    stages, invariant = FAULTS[fault]
    if group > 1:
        # Group commits of `group` windows: the window before the faulty one is held when
        # the check fails, and still commits.
        monkeypatch.setattr(pipeline.CommitLane, "busy", lambda self: True)
        monkeypatch.setattr(engine_module, "COMMIT_GROUP_WINDOWS_MAX", group)
    db = new_target()
    sources = discover([str(market / "trades")])
    ref = load_refdata(str(market / "refdata"))
    storage = open_storage(db)
    try:
        engine = Engine(storage, ref, stages=stages)
        after: list[tuple[dict, dict]] = []  # committed state after each window

        def on_window(rows: int, windows: int) -> None:
            after.append(({n: storage.table(n) for n in TABLES}, _bookkeeping(storage)))

        with pytest.raises(SelfCheckError, match=rf"window {FAIL_AT} not committed: {invariant}"):
            engine.run(sources, WINDOW, on_window, pace_trades_per_s=pace)
        assert len(after) == FAIL_AT - 1, "windows before the faulty one committed"
        tables_before, books_before = after[-1]

        # Nothing of the failing window: every table, checkpoints and source offsets as they
        # were after the previous window.
        now = {n: storage.table(n) for n in TABLES}
        for name in TABLES:
            assert now[name].equals(tables_before[name]), name
        assert storage.max_window_id() == FAIL_AT - 1
        books = _bookkeeping(storage)
        assert books["sources"].equals(books_before["sources"])
        assert books["meta"].equals(books_before["meta"])
        # ... except the record of the failed check (where the window before it came in the
        # same group, the job that committed it recorded the failure before its callback ran).
        failed = books["self_checks"].filter(pl.col("status") == "FAILED")
        assert failed.height == 1 and books["self_checks"].height == 1
        assert books_before["self_checks"].filter(pl.col("status") != "FAILED").height == 0
        row = failed.row(0, named=True)
        assert row["window_id"] == FAIL_AT
        assert pl.Series([row["detail"]]).str.contains(invariant).all(), row["detail"]

        # A sound engine on the same TARGET resumes at the failed window and finishes.
        if resume == "same_engine":  # in-memory state must not have moved either
            engine.stages = STAGES
        else:
            engine = Engine(storage, ref)
        report = engine.run(sources, WINDOW)
        assert report.self_check == "OK"
        assert report.rows_skipped == (FAIL_AT - 1) * WINDOW
        assert storage.max_window_id() == reference["checkpoints"]["window_id"].max()
        checks = _bookkeeping(storage)["self_checks"]
        assert checks.filter(pl.col("status") == "FAILED").height == 1
        last = pl.from_arrow(storage.query("SELECT status FROM self_checks ORDER BY checked_at DESC LIMIT 1"))
        assert last["status"].to_list() == ["OK"]
    finally:
        storage.close()
    got = snapshot(db)
    assert_same_tables({n: got[n] for n in RESULT_TABLES}, {n: reference[n] for n in RESULT_TABLES})
    # Same windows as the uninterrupted run, so even the checkpoint digests agree.
    cols = ["window_id", "source", "offset", "rows", "digest"]
    assert got["checkpoints"].select(cols).equals(reference["checkpoints"].select(cols))


@pytest.fixture(scope="module")
def processed(market, tmp_path_factory) -> list[Window]:
    """Every processed window of a replay of the market, as they are checked (in groups)."""
    seen: list[Window] = []
    real = checks.violations

    def recorded(windows):
        seen.extend(windows)
        return real(windows)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(checks, "violations", recorded)
        replay([str(market / "trades")], str(market / "refdata"), str(tmp_path_factory.mktemp("seen") / "t.duckdb"),
               window_rows=WINDOW)
    assert [w.window_id for w in seen] == list(range(1, len(seen) + 1)) and len(seen) >= 8
    return seen


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_a_group_s_checks_and_digests_are_each_window_s_alone(processed, data):
    """A group commit's windows are checked and digested at once: each window's
    messages and digest are those it gets alone, whatever windows it comes with, and only
    broken windows have messages."""
    faults = [None, _share_from_thin_air, _leg_dropped, _fen_lost, _row_lost]
    chosen = data.draw(st.lists(st.sampled_from(faults), min_size=len(processed), max_size=len(processed)))
    windows = [fault(w) if fault else w for w, fault in zip(processed, chosen, strict=True)]
    lo = data.draw(st.integers(0, len(windows) - 1))
    group = windows[lo:data.draw(st.integers(lo + 1, len(windows)))]
    alone = [checks.violations([w])[0] for w in group]
    assert checks.violations(group) == alone
    assert [bool(found) for found in alone] == [f is not None for f in chosen[lo:lo + len(group)]]
    digests = engine_module._digests(group)
    assert digests == [engine_module._digests([w])[0] for w in group]
    # A digest tells a window's content: a broken window's differs from its sound one's.
    for w, fault, digest in zip(processed[lo:], chosen[lo:], digests, strict=False):
        if fault in (_share_from_thin_air, _leg_dropped, _fen_lost):
            assert digest != engine_module._digests([w])[0]
    assert engine_module._digests([]) == [] and checks.violations([]) == []


@dataclasses.dataclass(frozen=True)
class LatePieceBrokenRegister:
    """Registers a share out of thin air in the second piece of window FAIL_AT, after the
    first piece's effects have already moved the in-memory state."""

    pieces: list = dataclasses.field(default_factory=list)  # window ids of pieces seen
    name: str = "late-piece broken registration"

    def process(self, window, ctx):
        self.pieces.append(window.window_id)
        if self.pieces.count(FAIL_AT) != 2:
            return Register().process(window, ctx)
        return _share_from_thin_air(Register().process(window, ctx))


def test_fault_in_a_later_piece_commits_nothing_of_its_window(market, reference, new_target, monkeypatch):
    from settle_arrow import engine as engine_module

    monkeypatch.setattr(engine_module, "PIECE_ROWS_MAX", 200)  # windows of 500 rows: 3 pieces
    db = new_target()
    sources = discover([str(market / "trades")])
    ref = load_refdata(str(market / "refdata"))
    storage = open_storage(db)
    try:
        engine = Engine(storage, ref, stages=(Validate(), Clear(), LatePieceBrokenRegister()))
        with pytest.raises(SelfCheckError, match=rf"window {FAIL_AT} not committed: holdings not conserved"):
            engine.run(sources, WINDOW)
        assert storage.max_window_id() == FAIL_AT - 1
        assert storage.count("trades") + storage.count("quarantine") == (FAIL_AT - 1) * WINDOW
        # The same engine goes on: its state, moved by the first piece, is rebuilt first.
        engine.stages = STAGES
        assert engine.run(sources, WINDOW).self_check == "OK"
    finally:
        storage.close()
    got = snapshot(db)
    assert_same_tables({n: got[n] for n in RESULT_TABLES}, {n: reference[n] for n in RESULT_TABLES})
    cols = ["window_id", "source", "offset", "rows"]  # digests of windows in pieces combine theirs
    assert got["checkpoints"].select(cols).equals(reference["checkpoints"].select(cols))


def test_cli_exit_3_on_failed_self_check(market, reference, new_target):
    """The CLI turns a failed self-check into exit 3 and one `error:` line naming it."""
    db = new_target()
    script = textwrap.dedent(
        f"""
        import sys
        from settle_arrow import checks
        from settle_arrow.cli import app

        real = checks.violations
        checks.violations = lambda ws: [["injected: books do not balance"] if w.window_id == 2 else found
                                        for w, found in zip(ws, real(ws))]
        sys.argv = ["settle-arrow", "replay", {str(market / "trades")!r}, "--refdata", {str(market / "refdata")!r},
                    "--db", {str(db)!r}, "--window", "{WINDOW}"]
        app()
        """
    )
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert res.returncode == 3, res.stderr
    assert "Traceback" not in res.stderr + res.stdout
    assert res.stderr.strip().splitlines() == ["error: window 2 not committed: injected: books do not balance"]
    # Then the real CLI resumes and completes.
    res = subprocess.run(
        [sys.executable, "-m", "settle_arrow.cli", "replay", str(market / "trades"), "--refdata",
         str(market / "refdata"), "--db", str(db), "--window", str(WINDOW)],
        capture_output=True, text=True, timeout=120,
    )
    assert res.returncode == 0, res.stderr
    got = snapshot(str(db))
    assert_same_tables({n: got[n] for n in RESULT_TABLES}, {n: reference[n] for n in RESULT_TABLES})


def _tamper_trade_quantities(storage) -> None:
    """One more share on each N trade of the first window: an UPDATE where trade_facts is a
    table, a rewrite of that window's segment file where it is segments (DuckDB)."""
    if isinstance(storage, DuckDBStorage):
        file = storage.query("SELECT file FROM segments WHERE table_name = 'trade_facts' AND rows > 0 "
                             "ORDER BY window_id_min LIMIT 1")["file"][0]
        path = storage._segments / file.as_py()
        table = pq.read_table(path)
        sign, quantity = table["sign"], table["quantity"]
        bumped = pc.if_else(pc.equal(sign, 1), pc.add(quantity, 1), quantity)
        pq.write_table(table.set_column(table.schema.get_field_index("quantity"), "quantity", bumped), path)
        return
    storage._execute("UPDATE trade_facts SET quantity = quantity + 1 WHERE sign = 1 AND window_id = "
                     "(SELECT MIN(window_id) FROM trade_facts)")


def test_whole_table_checks_name_each_broken_invariant(market, new_target):
    """storage.verify (sql/verify.sql) over a finished TARGET: each tampering breaks exactly
    the invariant it should, and the check names it."""
    db = new_target()
    replay([str(market / "trades")], str(market / "refdata"), db, window_rows=WINDOW)
    storage = open_storage(db)
    # A snapshot to tamper with: before the first, the opening is the base and conserved
    # by construction.
    storage.replace_holdings_snapshot(storage.max_window_id(),
                                      [storage.query("SELECT acct_id, sec_id, quantity FROM holdings_ids")])
    # And securities obligations folded: the trade rows of the windows after it are what their
    # view adds, so the tampered trade rows below (of the first window) do not reach it.
    storage.fold_obligations()
    tamper = [
        ("holdings_conserved",
         "UPDATE holdings_snapshot SET quantity = quantity + 1 WHERE acct_id = (SELECT MIN(acct_id) FROM holdings_snapshot)"),
        ("net_securities_sum_to_zero",
         "UPDATE obligations_securities_snapshot SET net_quantity = net_quantity + 1 "
         "WHERE part_id = (SELECT MIN(part_id) FROM obligations_securities_snapshot)"),
        ("net_cash_equals_minus_fees",
         "UPDATE obligations_cash_delta SET net_amount = net_amount + 0.01 "
         "WHERE window_id = (SELECT MIN(window_id) FROM obligations_cash_delta)"),
        # Both legs of a trade move together, so holdings stay conserved; the obligations do not.
        ("trades_match_obligations", _tamper_trade_quantities),
    ]
    try:
        assert storage.verify() == []
        broken = []
        for name, sql in tamper:
            sql(storage) if callable(sql) else storage._execute(sql)
            broken.append(name)
            assert {p.split(":")[0] for p in storage.verify()} == set(broken)
    finally:
        storage.close()


def test_holdings_conservation_names_each_unbalanced_security():
    """The per-security sum is exact int64 arithmetic over a sparse security index: only the
    securities whose deltas do not cancel are named, an empty window has nothing to name."""
    from settle_arrow.checks import _unconserved

    big = (1 << 63) - 1  # int64's limit: exact, no float on the way
    delta = pl.DataFrame({
        "acct_idx": [1, 2, 3, 4, 5, 6, 7],
        "sec_idx": pl.Series([7, 7, 1999, 1999, 3, 3, 3], dtype=pl.Int32),
        "quantity": [big, -big, 5, -4, 10, -10, -big],
    })
    assert _unconserved(delta) == [
        f"holdings not conserved: {{'sec_idx': 3, 'quantity': {-big}}}; {{'sec_idx': 1999, 'quantity': 1}}"
    ]
    assert _unconserved(delta.filter(~pl.col("sec_idx").is_in([3, 1999]))) == []
    assert _unconserved(delta.clear()) == []
