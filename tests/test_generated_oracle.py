"""The engine's quarantine equals what the generator built each bad row to trip (an
independent oracle), on the bundled sample and on generated Parquet and CSV markets."""

from pathlib import Path

import polars as pl
import pytest

from settle_arrow import open_target, replay
from settle_arrow.generate import MarketSpec, generate_market

SAMPLE = Path(__file__).parents[1] / "data" / "samples"


def _check(root: Path, db: str, window: int) -> None:
    report = replay([str(root / "trades")], str(root / "refdata"), db, window_rows=window)
    expected = pl.read_parquet(root / "expected" / "quarantine.parquet").sort("file", "source_row")
    with open_target(db) as t:
        q = t.table("quarantine")
    got = q.select(pl.col("source").str.split("/").list.last().alias("file"), "source_row", "reason").sort(
        "file", "source_row")
    assert got.equals(expected.select("file", "source_row", "reason"))
    assert report.rows_read == report.rows_accepted + report.rows_quarantined
    assert report.rows_quarantined == expected.height


def test_bundled_sample(new_target):
    _check(SAMPLE, new_target("s"), 1000)


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_generated_market(tmp_path, new_target, fmt):
    generate_market(tmp_path / "m", MarketSpec(trades=4000, seed=5, bad_rate=0.06, cancel_rate=0.06, fmt=fmt))
    _check(tmp_path / "m", new_target("g"), 700)
