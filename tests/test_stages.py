"""The stage interface (stages/base.py): `prepare` is an optimisation, never required.

Pins down: on a generated market with every quarantine reason, cancellations and negative
positions, running each window's stages with their `prepare` first (as the engine does, one
window ahead) or without it gives the same frames, frame by frame, and the same state."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from settle_arrow.engine import STAGES, _windows
from settle_arrow.generate import MarketSpec, generate_market
from settle_arrow.io.files import discover
from settle_arrow.refdata import load_refdata
from settle_arrow.stages.base import StageContext, Window
from settle_arrow.state import EngineState

OUTPUTS = ("accepted", "quarantine", "cleared", "obligations_securities_delta", "obligations_cash_delta",
           "holdings_delta", "exceptions")


def _run(ref, sources, prepared: bool) -> tuple[list[dict[str, pl.DataFrame]], EngineState]:
    state = EngineState(n_sec=ref.securities.height)
    ctx = StageContext(refdata=ref, state=state)
    out = []
    for i, raw in enumerate(_windows(sources, {}, 700)):
        window = Window(window_id=i, frames={"input": raw.frame})
        if prepared:
            for stage in STAGES:
                window = stage.prepare(window, ref) if hasattr(stage, "prepare") else window
        for stage in STAGES:
            window = stage.process(window, ctx)
        for effect in window.effects:
            effect()
        out.append({name: window.frames[name] for name in OUTPUTS})
    return out, state


def test_prepare_changes_nothing(tmp_path: Path):
    root = tmp_path / "m"
    generate_market(root, MarketSpec(trades=5000, seed=11, bad_rate=0.08, cancel_rate=0.08))
    ref = load_refdata(str(root / "refdata"))
    sources = discover([str(root / "trades")])
    with_prepare, state_a = _run(ref, sources, prepared=True)
    without, state_b = _run(ref, sources, prepared=False)
    assert len(with_prepare) == len(without) > 5
    for a, b in zip(with_prepare, without, strict=True):
        for name in OUTPUTS:
            assert a[name].equals(b[name]), name
    reasons = pl.concat([w["quarantine"] for w in without])["reason"].unique().to_list()
    assert len(reasons) >= 8, reasons  # the comparison covers most quarantine paths
    assert sum(w["exceptions"].height for w in without) > 0
    for part in ("holdings", "seen", "accepted", "cancelled", "reported"):
        assert np.array_equal(_contents(getattr(state_a, part)), _contents(getattr(state_b, part))), part


def _contents(runs) -> np.ndarray:
    """Keys (and payload columns) of a state set in key order, as one 2-D array."""
    keys, cols = runs.items()
    return np.stack([keys.astype(np.int64), *[cols[c].astype(np.int64) for c in sorted(cols)]])
