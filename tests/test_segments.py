"""DuckDB keeps the trade detail (schema.SEGMENTED) as Parquet segment files beside its
database file, each committed by a catalog row in its window's transaction
(storage/duckdb.py). These tests pin down what that must never change: readers see exactly
the committed windows; a rolled-back or killed window leaves no visible rows and, after the
next writer's open, no file; a TARGET moved with its directory still reads. The last test
pins, on both backends, the holdings views' snapshot window, which DuckDB writes in as a
constant so that its segment scans skip older windows. (Real SIGKILLs at every point of a
commit: test_exactly_once.py, on both backends.)"""

from __future__ import annotations

import contextlib
import datetime as dt
import shutil
import threading
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from settle_arrow import copy_target, open_target, replay, schema
from settle_arrow.generate import MarketSpec, generate_market
from settle_arrow.storage import duckdb as duckdb_storage
from settle_arrow.storage import open_storage
from settle_arrow.storage.duckdb import COMMITTED_MACRO, SEGMENTS_DIR_SUFFIX, DuckDBStorage, remove_target

FACTS = schema.STORAGE["trade_facts"]


def _facts(rows: int, first_trade_id: int = 1) -> pa.Table:
    """`rows` trade_facts rows (no window_id: the storage adds it)."""
    def value(f: pa.Field):
        if pa.types.is_decimal(f.type):
            return Decimal("1.5")
        if pa.types.is_date(f.type):
            return dt.date(2025, 1, 2)
        return dt.time(10) if pa.types.is_time(f.type) else 1

    cols = {f.name: pa.array([value(f)] * rows, f.type) for f in FACTS if f.name not in ("window_id", "trade_id")}
    cols["trade_id"] = pa.array(range(first_trade_id, first_trade_id + rows), pa.int64())
    cols["ref_trade_id"] = pa.nulls(rows, pa.int64())
    return pa.table(cols)


def _with(t: pa.Table, **values: int) -> pa.Table:
    """`t` with each named column set to one value on every row."""
    for name, v in values.items():
        t = t.set_column(t.schema.get_field_index(name), name, pa.array([v] * t.num_rows, t.schema.field(name).type))
    return t


def _checkpoint(rows: int) -> dict:
    return {"source": "test", "offset": rows, "rows": rows, "digest": ""}


def _segments(db: Path) -> list[str]:
    return sorted(p.name for p in Path(f"{db.resolve()}{SEGMENTS_DIR_SUFFIX}").iterdir())


def _count(db: Path) -> int:
    con = duckdb.connect(str(db), read_only=True)  # a plain reader, as another process would be
    try:
        return con.execute("SELECT COUNT(*) FROM trade_facts").fetchall()[0][0]
    finally:
        con.close()


def test_committed_windows_are_files_in_the_catalog(tmp_path):
    db = tmp_path / "t.duckdb"
    storage = open_storage(str(db))
    try:
        storage.ensure_schema()
        storage.commit_window(1, {"trade_facts": _facts(300)}, _checkpoint(300), ())
        storage.stage_window(2, {"trade_facts": _facts(200, 1000)})  # a window in two pieces
        storage.commit_window(2, {"trade_facts": _facts(100, 2000)}, _checkpoint(300), ())
        catalog = storage.query("SELECT file, window_id_min, window_id_max, rows FROM segments "
                                "WHERE table_name = 'trade_facts' ORDER BY file")
        files = storage.query("SELECT file FROM segments")["file"].to_pylist()
    finally:
        storage.close()
    assert _segments(db) == sorted(files)
    assert catalog["rows"].to_pylist() == [0, 300, 200, 100]  # the first, empty one: the view's types
    assert catalog["window_id_max"].to_pylist() == [0, 1, 2, 2]
    assert _count(db) == 600
    with open_target(str(db)) as t:  # the library's reader: same rows, same types
        assert t.storage.query("SELECT SUM(trade_id) AS s FROM trade_facts")["s"][0].as_py() == sum(
            [*range(1, 301), *range(1000, 1200), *range(2000, 2100)])


def test_segment_files_carry_min_max_and_read_back_with_the_schemas_types(tmp_path):
    """Every column of a segment file has min/max statistics, so scans bounded by window,
    date or security skip files; the files' own encodings (int64 decimals, nanosecond
    times) read back through the view as schema.STORAGE's types, to the microsecond."""
    db = tmp_path / "t.duckdb"
    facts = _facts(50)
    facts = facts.set_column(facts.schema.get_field_index("trade_time"), "trade_time",
                             pa.array([dt.time(9, 30, 1, 123456)] * 50, pa.time64("us")))
    storage = open_storage(str(db))
    try:
        storage.ensure_schema()
        storage.commit_window(1, {"trade_facts": _with(facts, sec_id=7)}, _checkpoint(50), ())
        back = storage.query("SELECT * FROM trade_facts")
    finally:
        storage.close()
    (name,) = [n for n in _segments(db) if n.startswith("trade_facts-") and not n.startswith("trade_facts-000000000000-")]
    meta = pq.ParquetFile(Path(f"{db.resolve()}{SEGMENTS_DIR_SUFFIX}") / name).metadata
    stats = {meta.schema.column(i).name: meta.row_group(0).column(i).statistics for i in range(meta.num_columns)}
    assert set(stats) == set(FACTS.names)
    assert all(st is not None and st.has_min_max for c, st in stats.items() if c != "ref_trade_id")  # all null
    assert (stats["window_id"].min, stats["window_id"].max, stats["sec_id"].max) == (1, 1, 7)
    # int8 reads as SMALLINT, the SQL type both backends give it (storage/base.sql_type)
    assert back.schema == pa.schema([f.with_type(pa.int16()) if f.type == pa.int8() else f for f in FACTS])
    assert back["trade_time"][0].as_py() == dt.time(9, 30, 1, 123456)
    assert back["amount"][0].as_py() == Decimal("1.50")


def test_rolled_back_windows_leave_no_rows_and_no_files(tmp_path, monkeypatch):
    db = tmp_path / "t.duckdb"
    storage = open_storage(str(db))
    try:
        storage.ensure_schema()
        storage.commit_window(1, {"trade_facts": _facts(50)}, _checkpoint(50), ())
        before = _segments(db)
        storage.stage_window(2, {"trade_facts": _facts(40, 100)})
        storage._wait_writes(0)
        assert len(_segments(db)) == len(before) + 1  # written before the commit...
        storage.abort_window()
        assert _segments(db) == before  # ...and gone with the rollback
        # A COMMIT that fails takes its window's files with it.
        monkeypatch.setattr(type(storage), "_put_meta", lambda self, values: (_ for _ in ()).throw(OSError("disk")))
        with pytest.raises(OSError, match="disk"):
            storage.commit_window(2, {"trade_facts": _facts(40, 100)}, _checkpoint(40), (), meta={"k": "v"})
        assert _segments(db) == before
        monkeypatch.undo()
        storage.commit_window(2, {"trade_facts": _facts(40, 100)}, _checkpoint(40), ())
    finally:
        storage.close()
    assert _count(db) == 90


def _slow_writes(monkeypatch, seconds: float, fail: str | None = None) -> list[str]:
    """Segment files written by the writer thread `seconds` late (or, with `fail`, an
    OSError of that text after a partial file, as a full disk would leave it); the list
    fills with each file's name as its write ends."""
    real, done = duckdb_storage._write_file, []

    def write(data: pa.Table, partial: Path, path: Path) -> None:
        time.sleep(seconds)
        if fail:
            partial.write_bytes(b"PAR1 half a file")
            raise OSError(fail)
        real(data, partial, path)
        done.append(path.name)

    monkeypatch.setattr(duckdb_storage, "_write_file", write)
    return done


@contextlib.contextmanager
def _new_storage(tmp_path: Path) -> Iterator[tuple[Path, DuckDBStorage]]:
    """A new TARGET's file and its writing storage, closed after the block."""
    db = tmp_path / "t.duckdb"
    storage = open_storage(str(db))
    try:
        storage.ensure_schema()
        yield db, storage
    finally:
        storage.close()


def test_a_commit_waits_for_its_segment_writes(tmp_path, monkeypatch):
    """The files are written beside the transaction's other statements, and complete,
    renamed and durable before its COMMIT: a reader sees the rows as the commit returns."""
    with _new_storage(tmp_path) as (db, storage):
        before = _segments(db)
        done = _slow_writes(monkeypatch, 0.3)
        storage.commit_window(1, {"trade_facts": _facts(30)}, _checkpoint(30), ())
        assert len(done) == 1 and _segments(db) == sorted([*before, *done])
        assert _count_beside(storage) == 30
    assert _count(db) == 30


def _count_beside(storage: DuckDBStorage) -> int:
    reader = storage.reader()
    try:
        return reader.count("trade_facts")
    finally:
        reader.close()


def test_a_failed_segment_write_rolls_its_window_back(tmp_path, monkeypatch):
    """A write that fails in the writer thread (a full disk) fails its window's commit:
    nothing of the window shows, the half file goes at the next writer's open, and the
    same storage commits the window once the disk has room again."""
    with _new_storage(tmp_path) as (db, storage):
        storage.commit_window(1, {"trade_facts": _facts(30)}, _checkpoint(30), ())
        committed = _segments(db)
        _slow_writes(monkeypatch, 0.0, fail="No space left on device")
        with pytest.raises(OSError, match="No space left"):
            storage.commit_window(2, {"trade_facts": _facts(5, 100)}, _checkpoint(5), ())
        assert storage.max_window_id() == 1 and _count_beside(storage) == 30
        assert [n for n in _segments(db) if not n.endswith(".tmp")] == committed
        monkeypatch.undo()
        storage.commit_window(2, {"trade_facts": _facts(5, 100)}, _checkpoint(5), ())
    assert _count(db) == 35
    open_storage(str(db)).close()  # the next writer's open sweeps the half file
    assert not [n for n in _segments(db) if n.endswith(".tmp")]


def test_a_rollback_waits_for_the_writes_in_flight(tmp_path, monkeypatch):
    """A window whose transaction fails while its file is still being written: the file
    is deleted once written, never left behind for a later open to find."""
    with _new_storage(tmp_path) as (db, storage):
        before = _segments(db)
        done = _slow_writes(monkeypatch, 0.3)
        monkeypatch.setattr(type(storage), "_put_meta", lambda self, values: (_ for _ in ()).throw(OSError("disk")))
        with pytest.raises(OSError, match="disk"):
            storage.commit_window(1, {"trade_facts": _facts(30)}, _checkpoint(30), (), meta={"k": "v"})
        assert len(done) == 1  # written to the end before its file was deleted
        assert _segments(db) == before
        time.sleep(0.1)
        assert _segments(db) == before


def test_a_window_in_pieces_bounds_its_writes_in_flight(tmp_path, monkeypatch):
    """Each write in flight holds its piece: a window handed over in pieces faster than
    they are written waits, so at most SEGMENT_WRITES_PENDING_MAX pieces are held; the
    writer thread ends with the storage."""
    with _new_storage(tmp_path) as (db, storage):
        done = _slow_writes(monkeypatch, 0.05)
        for piece in range(5):
            storage.stage_window(1, {"trade_facts": _facts(10, 100 * piece)})
            assert len(storage._writes) <= duckdb_storage.SEGMENT_WRITES_PENDING_MAX
        storage.commit_window(1, {}, _checkpoint(50), ())
        assert len(done) == 5 and _count_beside(storage) == 50
        assert any(t.name.startswith("settle-segments") for t in threading.enumerate())
    assert not any(t.name.startswith("settle-segments") for t in threading.enumerate())


def test_a_killed_windows_files_are_invisible_then_swept(tmp_path):
    """What SIGKILL leaves between a segment's rename and its COMMIT (a finished file of a
    window with no checkpoint) and during its write (a partial `.tmp`)."""
    db = tmp_path / "t.duckdb"
    storage = open_storage(str(db))
    try:
        storage.ensure_schema()
        storage.commit_window(1, {"trade_facts": _facts(30)}, _checkpoint(30), ())
    finally:
        storage.close()
    seg = Path(f"{db.resolve()}{SEGMENTS_DIR_SUFFIX}")
    committed = _segments(db)
    window1 = pq.read_table(seg / committed[-1])
    orphan = window1.set_column(FACTS.get_field_index("window_id"), "window_id", pa.array([2] * 30, pa.int64()))
    pq.write_table(orphan, seg / "trade_facts-000000000002-000000.parquet")
    (seg / "trade_facts-000000000002-000001.parquet.tmp").write_bytes(b"PAR1 half a file")
    assert _count(db) == 30  # readers before any writer comes back: window 2 never committed
    storage = open_storage(str(db))  # the next writer
    try:
        assert _segments(db) == committed
        storage.ensure_schema()
        storage.commit_window(2, {"trade_facts": _facts(5, 100)}, _checkpoint(5), ())
    finally:
        storage.close()
    assert _count(db) == 35


def _counted_at_commit(monkeypatch, reader: DuckDBStorage, table: str) -> list[int]:
    """The rows of `table` that `reader` sees as each later COMMIT starts (list filled then)."""
    seen: list[int] = []
    real = DuckDBStorage._commit

    def commit(self: DuckDBStorage) -> None:
        seen.append(reader.count(table))
        real(self)

    monkeypatch.setattr(DuckDBStorage, "_commit", commit)
    return seen


def test_a_window_stays_invisible_to_readers_until_its_commit(tmp_path, monkeypatch):
    """Just before COMMIT (segment file, catalog row, checkpoint and the views' bound all
    written) a reader beside the writer still sees the windows committed before."""
    db = tmp_path / "t.duckdb"
    storage = open_storage(str(db))
    try:
        storage.ensure_schema()
        storage.commit_window(1, {"trade_facts": _facts(30)}, _checkpoint(30), ())
        reader = storage.reader()  # a cursor of the writer's instance, as open_target is there
        seen = _counted_at_commit(monkeypatch, reader, "trade_facts")
        storage.commit_window(2, {"trade_facts": _facts(5, 100)}, _checkpoint(5), ())
        assert seen == [30] and reader.count("trade_facts") == 35
        reader.close()
    finally:
        storage.close()


def _opening() -> pa.Table:
    return pa.table({"acct_id": [1, 2, 3], "sec_id": [7, 7, 8], "quantity": [100, 50, 5]}, schema=schema.HOLDINGS_IDS)


def _plain(db: Path, sql: str) -> list[tuple]:
    con = duckdb.connect(str(db), read_only=True)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def test_the_opening_is_a_file_shown_once_its_checkpoint_commits(tmp_path, monkeypatch):
    """DuckDB keeps the opening holdings as a segment file too (FILE_TABLES): a failed
    commit leaves neither rows nor a file, a reader beside the writer sees the rows only
    after COMMIT, and a plain reader of the closed file reads them back exactly."""
    db = tmp_path / "t.duckdb"
    storage = open_storage(str(db))
    try:
        storage.ensure_schema()
        empty = _segments(db)
        monkeypatch.setattr(type(storage), "_put_meta", lambda self, values: (_ for _ in ()).throw(OSError("disk")))
        with pytest.raises(OSError, match="disk"):
            storage.init_opening(_opening(), "d" * 64, "f" * 64)
        monkeypatch.undo()
        assert _segments(db) == empty and storage.count("opening_holdings") == 0
        reader = storage.reader()
        seen = _counted_at_commit(monkeypatch, reader, "opening_holdings")
        storage.init_opening(_opening(), "d" * 64, "f" * 64)
        assert seen == [0] and reader.count("opening_holdings") == 3
        reader.close()
        (opening_file,) = [n for n in _segments(db) if n not in empty]
        assert opening_file.startswith("opening_holdings-")
    finally:
        storage.close()
    assert _plain(db, "SELECT acct_id, sec_id, quantity FROM opening_holdings ORDER BY acct_id") == [
        (1, 7, 100), (2, 7, 50), (3, 8, 5)]
    assert _plain(db, "SELECT COUNT(*) FROM holdings_ids") == [(3,)]


def test_a_target_whose_opening_is_a_table_keeps_it(tmp_path):
    """A TARGET made while the opening was a table (no view, no file) keeps writing it there."""
    db = tmp_path / "t.duckdb"
    storage = open_storage(str(db))
    try:
        storage.ensure_schema()
        with storage.transaction():
            storage._execute("DROP VIEW opening_holdings")
            storage._execute("CREATE TABLE opening_holdings (acct_id INTEGER, sec_id INTEGER, quantity BIGINT)")
            storage._execute("DELETE FROM segments WHERE table_name = 'opening_holdings'")
        files = _segments(db)
        storage.init_opening(_opening(), "d" * 64, "f" * 64)
        assert storage.count("opening_holdings") == 3 and _segments(db) == files  # no file written
    finally:
        storage.close()
    open_storage(str(db)).close()  # the next writer sweeps the empty file no row names now
    assert not any(n.startswith("opening_holdings-") for n in _segments(db))
    assert _plain(db, "SELECT table_type FROM information_schema.tables WHERE table_name = 'opening_holdings'") == [
        ("BASE TABLE",)]
    assert _plain(db, "SELECT SUM(quantity) FROM holdings_ids") == [(155,)]


def test_a_target_whose_views_predate_the_bound_macro(tmp_path):
    """A TARGET whose segment view bounds windows by a constant (the layout before
    COMMITTED_MACRO): readers see its committed windows, and a writer re-makes the view so
    that later windows show."""
    db = tmp_path / "t.duckdb"
    storage = open_storage(str(db))
    try:
        storage.ensure_schema()
        storage.commit_window(1, {"trade_facts": _facts(30)}, _checkpoint(30), ())
        view = storage.query("SELECT sql FROM duckdb_views() WHERE view_name = 'trade_facts'")["sql"][0].as_py()
        storage._execute(view.replace("CREATE VIEW", "CREATE OR REPLACE VIEW").replace(f"{COMMITTED_MACRO}()", "1"))
        storage._execute(f"DROP MACRO {COMMITTED_MACRO}")
    finally:
        storage.close()
    assert _count(db) == 30
    with open_target(str(db)) as t:
        assert t.storage.count("trade_facts") == 30
    storage = open_storage(str(db))
    try:
        storage.ensure_schema()
        storage.commit_window(2, {"trade_facts": _facts(5, 100)}, _checkpoint(5), ())
    finally:
        storage.close()
    assert _count(db) == 35


def test_a_moved_target_reads_and_writes_at_its_new_place(tmp_path):
    market = tmp_path / "market"
    generate_market(market, MarketSpec(trades=1500, seed=3, days=2))
    old, new = tmp_path / "old" / "t.duckdb", tmp_path / "new" / "t.duckdb"
    old.parent.mkdir()
    replay([str(market / "trades")], str(market / "refdata"), str(old), window_rows=500)
    with open_target(str(old)) as t:
        digests, trades = t.digest(), t.storage.count("trade_facts")
    new.parent.mkdir()
    shutil.move(old, new)
    shutil.move(f"{old}{SEGMENTS_DIR_SUFFIX}", f"{new}{SEGMENTS_DIR_SUFFIX}")
    with open_target(str(new)) as t:  # read-only, before any writer re-pointed the view
        assert t.digest() == digests
    replay([str(market / "trades")], str(market / "refdata"), str(new), window_rows=500)  # nothing new
    assert _count(new) == trades  # a plain reader too, once a writer re-pointed the stored view
    remove_target(new)
    assert not new.exists() and not Path(f"{new}{SEGMENTS_DIR_SUFFIX}").exists()


def test_holdings_are_the_snapshot_plus_the_legs_since_it(new_target, tmp_path):
    """On both backends: a snapshot rewrite changes what holdings_legs counts (only windows
    after the snapshot) but never what holdings_ids shows, and later windows add to it; a
    copy into DuckDB (whose views take the snapshot's window as a constant) shows the same."""
    source = new_target()
    storage = open_storage(source)

    def holdings() -> dict[tuple[int, int], int]:
        t = storage.query("SELECT acct_id, sec_id, quantity FROM holdings_ids")
        return {(a, s): q for a, s, q in zip(*(t[c].to_pylist() for c in ("acct_id", "sec_id", "quantity")), strict=True)}

    def legs() -> int:
        return storage.query("SELECT COUNT(*) AS n FROM holdings_legs WHERE quantity <> 0")["n"][0].as_py()

    try:
        storage.ensure_schema()
        opening = pa.table({"acct_id": [1, 2], "sec_id": [7, 7], "quantity": [100, 50]}, schema=schema.HOLDINGS_IDS)
        storage.init_opening(opening, "d" * 64, "f" * 64)
        # One share of security 7: account 1 buys it from account 2 (_facts: every id is 1).
        storage.commit_window(1, {"trade_facts": _with(_facts(1), sec_id=7, sell_account_id=2)}, _checkpoint(1), ())
        assert holdings() == {(1, 7): 101, (2, 7): 49} and legs() == 2
        storage.replace_holdings_snapshot(1, [storage.query("SELECT acct_id, sec_id, quantity FROM holdings_ids")])
        assert holdings() == {(1, 7): 101, (2, 7): 49} and legs() == 0
        storage.commit_window(2, {"trade_facts": _with(_facts(1, 10), sec_id=7)}, _checkpoint(1), ())
        assert holdings() == {(1, 7): 101, (2, 7): 49}  # account 1 bought from itself
        assert storage.trade_rows_since_snapshot() == 1
    finally:
        storage.close()
    copy = str(tmp_path / "copy.duckdb")
    copy_target(source, copy)
    storage = open_storage(copy, read_only=True)
    try:
        assert holdings() == {(1, 7): 101, (2, 7): 49} and legs() == 0  # only window 2: it nets out
    finally:
        storage.close()
