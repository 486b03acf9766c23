"""The benchmark runs end to end at a tiny scale (speed itself is never asserted here)."""

from settle_arrow.bench import BenchSpec, run


def test_bench_reports_every_mode(tmp_path):
    spec = BenchSpec(trades=3_000, accounts=400, securities=20, days=1, windows=(500, 3_000), out_dir=str(tmp_path))
    results = run(spec, echo=lambda *_: None)
    modes = [r["mode"] for r in results]
    assert modes[0].startswith("floor") and len(modes) == 4 and modes[-1].startswith("replay --batch")
    for r in results:
        assert r["rows"] == 3_000 and r["seconds"] > 0 and r["trades_per_s"] > 0 and r["floor_ratio"] > 0
    for r in results[1:]:
        assert r["peak_rss_mb"] > 0 and r["window_p99_ms"] >= r["window_p50_ms"] > 0 and r["steady_trades_per_s"] > 0
