"""Securities obligations as a folded snapshot plus the trade rows after it (schema
version 6): every fold (Storage.fold_obligations on the commit lane) holds exactly the
obligations as of its window, folds come with the holdings snapshots (across a restart
too), the tables a replay leaves do not depend on when folds came, and a TARGET of schema version
5 (per-window delta rows) is read as it is and migrated by its next writer. On every backend."""

from __future__ import annotations

import polars as pl
import pyarrow as pa
import pytest
from old_targets import KEY, LEGS, NONZERO, SUMS, as_version_5

from settle_arrow import engine, open_target, pipeline, replay, schema
from settle_arrow.errors import UserError
from settle_arrow.storage.base import Storage
from settle_arrow.target import copy_target

TABLES = [t for t in schema.OUTPUT if t != "checkpoints"]

# Obligations as of window {w} from the trade rows alone (no snapshot involved).
AS_OF = f"SELECT {', '.join(KEY)}, {SUMS} FROM ({LEGS}) o WHERE window_id <= {{w}} GROUP BY {', '.join(KEY)} {NONZERO}"


def _rows(t: pa.Table) -> pl.DataFrame:
    return pl.from_arrow(t.select([*KEY, "net_quantity", "buy_quantity", "sell_quantity"])).sort(KEY)


def _tables(db: str) -> dict[str, pl.DataFrame]:
    with open_target(db) as t:
        return {name: t.table(name) for name in TABLES}


@pytest.mark.parametrize("grouped", [False, True], ids=["window-by-window", "grouped"])
def test_every_fold_is_the_obligations_as_of_its_window(small_market, small_market_tables, new_target, monkeypatch,
                                                        grouped):
    monkeypatch.setattr(engine, "COMPACT_ROWS_MIN", 400)  # a fold with each holdings snapshot,
    monkeypatch.setattr(engine, "SNAPSHOT_GROWTH", 0)  # every ~200 trades
    if grouped:  # a lane that is always busy: groups of 5 windows, folds after whole groups
        monkeypatch.setattr(pipeline.CommitLane, "busy", lambda self: True)
        monkeypatch.setattr(engine, "COMMIT_GROUP_WINDOWS_MAX", 5)
    else:
        monkeypatch.setattr(engine, "COMMIT_GROUP_WINDOWS_MAX", 1)
    folds: list[tuple[int, int]] = []  # (fold's window, its rows)
    fold = Storage.fold_obligations

    def checked(self: Storage) -> int:
        rows = fold(self)
        w = self.max_window_id()
        stored = self.query("SELECT * FROM obligations_securities_snapshot")
        assert set(stored["window_id"].to_pylist()) <= {w} and stored.num_rows == rows
        assert _rows(stored).equals(_rows(self.query(AS_OF.format(w=w)))), f"fold as of window {w} is not the obligations then"
        assert self.meta()[schema.OBLIGATIONS_SNAPSHOT_KEY] == str(w)
        folds.append((w, rows))
        return rows

    monkeypatch.setattr(Storage, "fold_obligations", checked)
    db = new_target()
    replay(list(small_market.trade_files), small_market.refdata_dir, db, window_rows=70)
    assert len(folds) >= 3 and all(rows for _, rows in folds)
    got = _tables(db)
    for name in TABLES:
        assert got[name].equals(small_market_tables[name]), f"{name} differs"


def test_folds_come_with_the_holdings_snapshots_across_a_restart(small_market, small_market_tables, new_target,
                                                                monkeypatch):
    """The fold runs in the commit job that writes a holdings snapshot, as of the window the
    job committed last: a restart, which takes up the snapshot's count of legs from the
    TARGET, takes up the folds' with it."""
    monkeypatch.setattr(engine, "COMPACT_ROWS_MIN", 1000)
    monkeypatch.setattr(engine, "SNAPSHOT_GROWTH", 0)
    monkeypatch.setattr(engine, "COMMIT_GROUP_WINDOWS_MAX", 1)  # each snapshot as of its job's last window
    files = list(small_market.trade_files)
    db = new_target()
    snapshots: list[int] = []
    folds: list[int] = []
    replace, fold = Storage.replace_holdings_snapshot, Storage.fold_obligations

    def snapshot_noted(self: Storage, window_id: int, positions) -> None:
        replace(self, window_id, positions)
        snapshots.append(window_id)

    def fold_noted(self: Storage) -> int:
        folds.append(self.max_window_id())
        return fold(self)

    monkeypatch.setattr(Storage, "replace_holdings_snapshot", snapshot_noted)
    monkeypatch.setattr(Storage, "fold_obligations", fold_noted)
    for part in (files[: len(files) // 2], files):
        replay(part, small_market.refdata_dir, db, window_rows=100)
    assert len(folds) >= 4 and folds == snapshots
    with open_target(db) as t:
        assert t.storage.meta()[schema.OBLIGATIONS_SNAPSHOT_KEY] == str(folds[-1])
    got = _tables(db)
    for name in TABLES:
        assert got[name].equals(small_market_tables[name]), f"{name} differs"


def test_a_version_5_target_is_read_as_it_is_and_migrated(small_market, small_market_tables, new_target, tmp_path):
    """Read as it is (not copied: a copy writes this version's tables), then migrated by the
    next replay: its deltas folded as of its last window, the tables a fresh replay gives."""
    files = list(small_market.trade_files)
    db = new_target()
    replay(files[:1], small_market.refdata_dir, db, window_rows=300)
    before = _tables(db)["obligations_securities"]
    with open_target(db) as t:
        first_run = t.storage.max_window_id()
    as_version_5(db)
    with open_target(db) as t:  # a reader does not migrate
        assert t.storage.meta()["schema_version"] == "5"
        assert t.storage.count("obligations_securities_delta") > before.height, "deltas of several windows a key"
        assert t.table("obligations_securities").equals(before)
    with pytest.raises(UserError, match="of schema version 5; copy reads version 6: a replay into it"):
        copy_target(db, str(tmp_path / "copy.duckdb"))
    assert not (tmp_path / "copy.duckdb").exists()
    replay(files, small_market.refdata_dir, db, window_rows=300)
    with open_target(db) as t:
        meta, names = t.storage.meta(), t.storage._table_names()
    assert meta["schema_version"] == str(schema.SCHEMA_VERSION)
    assert "obligations_securities_delta" not in names
    assert int(meta[schema.OBLIGATIONS_SNAPSHOT_KEY]) == first_run  # the deltas' last window
    got = _tables(db)
    for name in TABLES:
        assert got[name].equals(small_market_tables[name]), f"{name} differs"
