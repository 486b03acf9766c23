"""The stage interface (stages/base.py): `prepare` is an optimisation, never required.

Pins down: on a generated market with every quarantine reason, cancellations and negative
positions, running each window's stages with their `prepare` first (as the engine does, one
window ahead) or without it gives the same frames, frame by frame, and the same state."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
from hypothesis import given, settings
from hypothesis import strategies as st

from settle_arrow.engine import STAGES, _windows
from settle_arrow.generate import MarketSpec, generate_market
from settle_arrow.io.files import discover
from settle_arrow.refdata import load_refdata
from settle_arrow.stages.base import StageContext, Window
from settle_arrow.stages.validate import _first_occurrence, _in_key_order
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
        for stage in STAGES:
            window = stage.finish([window], ref)[0] if hasattr(stage, "finish") else window
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


@settings(max_examples=300, deadline=None)
@given(keys=st.lists(st.one_of(st.integers(0, 6), st.integers(0, (1 << 64) - 1)), max_size=60),
       data=st.data())
def test_one_sort_of_the_window_keys_answers_first_occurrence_and_key_order(keys, data):
    """Validation's single sort of the packed keys, whatever order it leaves equal keys in:
    the first occurrence of each key among the packable rows is Polars' is_first_distinct
    (rows that do not pack stay True), and any accepted rows come out in key order, or in
    their own order (for the state to sort) when one of them did not pack."""
    n = len(keys)
    k = np.array(keys, dtype=np.uint64)
    packable = np.array(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)), dtype=bool)
    rows = np.flatnonzero(packable)
    # Any order of equal keys: a stable sort of the keys with their rows shuffled first.
    shuffled = rows[np.array(data.draw(st.permutations(range(len(rows)))), dtype=np.int64)] if len(rows) else rows
    by_key = shuffled[np.argsort(k[shuffled], kind="stable")]
    want = np.ones(n, dtype=bool)
    want[packable] = pl.Series(k[packable]).is_first_distinct().to_numpy()
    assert np.array_equal(_first_occurrence(k, by_key, n), want)

    seq = np.array(sorted(data.draw(st.sets(st.integers(0, max(n - 1, 0)), max_size=n))) if n else [], dtype=np.int64)
    at = _in_key_order(seq, by_key, n)
    if packable[seq].all():
        assert sorted(at.tolist()) == list(range(len(seq)))  # each accepted row once
        assert (np.diff(k[seq][at].astype(object)) >= 0).all()  # in key order
    else:
        assert at == slice(None)
