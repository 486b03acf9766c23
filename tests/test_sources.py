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
