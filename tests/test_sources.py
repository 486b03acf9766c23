"""Inputs through fsspec: memory:// URLs, globs and directories give the same tables as local files."""

from pathlib import Path

import fsspec
import pytest

from settle_arrow import open_target, replay
from settle_arrow.generate import MarketSpec, generate_market
from settle_arrow.io.files import discover

TABLES = ["trades", "quarantine", "obligations_securities", "obligations_cash", "holdings", "exceptions"]


@pytest.fixture
def mem_market(tmp_path):
    s = generate_market(tmp_path / "m", MarketSpec(trades=400, seed=2, bad_rate=0.05, cancel_rate=0.05, days=3))
    fs = fsspec.filesystem("memory")
    root = f"/settle-test-{tmp_path.name}"
    for sub in ("trades", "refdata"):
        for f in sorted((tmp_path / "m" / sub).iterdir()):
            fs.pipe(f"{root}/{sub}/{f.name}", f.read_bytes())
    yield s, root
    fs.rm(root, recursive=True)


def test_memory_urls_match_local_files(mem_market, new_target):
    s, root = mem_market
    mem_db, loc_db = new_target("mem"), new_target("loc")
    replay([f"memory://{root}/trades"], f"memory://{root}/refdata", mem_db, window_rows=64)
    replay([str(Path(s.refdata_dir).parent / "trades" / "*.parquet")], s.refdata_dir, loc_db, window_rows=101)
    with open_target(mem_db) as a, open_target(loc_db) as b:
        for t in TABLES:
            fa, fb = a.table(t), b.table(t)
            if "source" in fa.columns:  # same rows, different URLs
                fa, fb = fa.drop("source"), fb.drop("source")
            assert fa.equals(fb), t
        assert a.table("trades")["source"][0].startswith("memory://")


def test_discovery_orders_files_by_name_and_keeps_argument_order(tmp_path):
    for name in ("b.parquet", "a.parquet", "c.csv", "notes.txt"):
        (tmp_path / "d" / name).parent.mkdir(exist_ok=True)
        (tmp_path / "d" / name).write_bytes(b"")
    (tmp_path / "z.csv").write_bytes(b"")
    found = discover([str(tmp_path / "z.csv"), str(tmp_path / "d")])
    assert [Path(f.url).name for f in found] == ["z.csv", "a.parquet", "b.parquet", "c.csv"]
    assert [f.fmt for f in found] == ["csv", "parquet", "parquet", "csv"]


def _trades_parquet(path: Path, rows: int, row_group_rows: int, **kw) -> Path:
    import datetime as dt
    from decimal import Decimal

    import pyarrow as pa
    import pyarrow.parquet as pq

    from settle_arrow import schema

    table = pa.table({
        "trade_id": pa.array(range(rows), pa.int64()),
        "market": ["XSHG"] * rows,
        "trade_date": [dt.date(2025, 6, 16)] * rows,
        "trade_time": pa.array([dt.time(10, 0, i % 60) for i in range(rows)], pa.time64("us")),
        "security_id": [f"{600000 + i % 7}" for i in range(rows)],
        "price": pa.array([Decimal(f"{i % 50}.125") for i in range(rows)], pa.decimal128(12, 3)),
        "quantity": pa.array([100 * (i % 9) for i in range(rows)], pa.int64()),
        "buy_account": [f"A{i % 13}" for i in range(rows)],
        "note": ["ignored"] * rows,  # not a trade column: never read
    })
    assert set(table.column_names) - {"note"} <= set(schema.INPUT_TRADE.names)
    pq.write_table(table, path, row_group_size=row_group_rows, **kw)
    return path


@pytest.mark.parametrize("start_row", [0, 1, 6, 7, 23, 24, 40])
def test_parquet_slices_read_like_pyarrow_batches(tmp_path, monkeypatch, start_row):
    """A local Parquet file is read by Polars in slices; the frames, joined, are the file's
    rows from the resume row on and equal pyarrow's batches of the same file from the same
    row (the path every other source takes), across row groups of 7, 7, 7 and 3 rows."""
    import polars as pl

    from settle_arrow import schema
    from settle_arrow.io import files

    monkeypatch.setattr(files, "PARQUET_SLICE_ROWS", 5)
    f = _trades_parquet(tmp_path / "t.parquet", rows=24, row_group_rows=7)
    src = files.SourceFile(str(f), "parquet", f.stat().st_size)
    cols = list(schema.INPUT_TRADE.names)
    sliced = list(files.read_frames(src, cols, start_row))
    assert all(part.height <= 5 for part in sliced)
    want = [pl.from_arrow(pa_batch.select([c for c in cols if c in pa_batch.schema.names]))
            for pa_batch in files.read_batches(src, start_row)]
    got = pl.concat(sliced) if sliced else None
    if start_row >= 24:
        assert got is None and not want
        return
    # From the resume row to the end, each row once (a short last row group once made the
    # pyarrow path skip it and repeat earlier rows).
    assert got["trade_id"].to_list() == list(range(start_row, 24))
    assert got.equals(pl.concat(want))
    assert "note" not in got.columns


def test_parquet_read_by_polars_only_where_types_agree(tmp_path, monkeypatch):
    """A date64 column (stored with its Arrow type) is a Date through pyarrow but a Datetime
    through Polars' reader: such a file takes pyarrow's path, and gives pyarrow's types."""
    import datetime as dt

    import polars as pl
    import pyarrow as pa
    import pyarrow.parquet as pq

    from settle_arrow import schema
    from settle_arrow.io import files

    f = _trades_parquet(tmp_path / "t.parquet", rows=10, row_group_rows=4)
    table = pq.read_table(f)
    table = table.set_column(2, "trade_date", pa.array([dt.date(2025, 6, 16)] * 10, pa.date64()))
    pq.write_table(table, f)
    scanned, scan = [], pl.scan_parquet
    monkeypatch.setattr(pl, "scan_parquet", lambda *a, **k: scanned.append(a) or scan(*a, **k))
    src = files.SourceFile(str(f), "parquet", f.stat().st_size)
    got = pl.concat(list(files.read_frames(src, list(schema.INPUT_TRADE.names))))
    assert scanned, "the types were compared"
    assert scan(f).collect_schema()["trade_date"] != pl.Date  # what Polars alone would give
    assert got.schema["trade_date"] == pl.Date
    assert got["trade_date"].to_list() == [dt.date(2025, 6, 16)] * 10


def test_corrupt_parquet_pages_are_a_source_error(tmp_path):
    """Data pages destroyed (footer intact) fail the read with the file named, not a
    traceback from the decoder."""
    from settle_arrow import schema
    from settle_arrow.io import files

    f = _trades_parquet(tmp_path / "t.parquet", rows=5000, row_group_rows=5000, compression="zstd")
    data = bytearray(f.read_bytes())
    footer_bytes = int.from_bytes(data[-8:-4], "little") + 8
    data[4:len(data) - footer_bytes] = bytes(len(data) - footer_bytes - 4)  # every page zeroed
    f.write_bytes(bytes(data))
    src = files.SourceFile(str(f), "parquet", f.stat().st_size)
    with pytest.raises(files.SourceError, match="^cannot read .*t.parquet"):
        list(files.read_frames(src, list(schema.INPUT_TRADE.names)))


def test_names_with_glob_characters_read_as_themselves(tmp_path, new_target):
    """A reference directory and a trade file whose names hold glob characters are read as
    the very files named (Polars' reader would otherwise expand them as patterns)."""
    import shutil

    s = generate_market(tmp_path / "m", MarketSpec(trades=300, seed=3, bad_rate=0.05, days=2))
    odd = tmp_path / "odd[1]"
    shutil.copytree(tmp_path / "m" / "refdata", odd / "refdata")
    (odd / "trades").mkdir()
    for i, f in enumerate(sorted((tmp_path / "m" / "trades").iterdir())):
        shutil.copy(f, odd / "trades" / f"t[{i}]*.parquet")
    plain_db, odd_db = new_target("plain"), new_target("odd")
    replay([str(tmp_path / "m" / "trades")], str(tmp_path / "m" / "refdata"), plain_db, window_rows=64)
    replay([str(odd / "trades")], str(odd / "refdata"), odd_db, window_rows=64)
    with open_target(plain_db) as a, open_target(odd_db) as b:
        for name in ("obligations_securities", "obligations_cash", "holdings", "exceptions"):
            assert a.table(name).equals(b.table(name)), name
        assert a.table("trades").height == b.table("trades").height == s.rows - b.table("quarantine").height
