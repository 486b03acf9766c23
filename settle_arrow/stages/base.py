"""The one interface every business stage implements, and the window it works on.

Data model:
  Window   window_id -> frames: name -> pl.DataFrame (inputs, intermediates and outputs),
           effects: state changes to apply once the window has committed.
  Stage    `process(window) -> window`: pure with respect to storage and state; it reads
           `EngineState` and reference data, never writes them. A stage may also define
           `prepare(window, refdata) -> window`: the part of its work that reads no state
           (types, reference lookups); the engine runs it one window ahead in its reader
           thread. `process` must give the same result when `prepare` did not run. And
           `prepare_rows(frame, refdata) -> {name: frame}`: the part of `prepare` that
           depends on each row alone, row-aligned with `frame`; the engine may run it over
           several windows' inputs at once and give each window its slices, which its
           `prepare` must use as it would its own (and make them itself when absent).

Invariants: a stage adds frames, never mutates one it received; every frame whose name is
a storage table is appended by the engine in the window's single transaction; effects run
in order, once the window passed its self-checks, before that transaction commits (the
engine rebuilds state from the database if it fails).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Protocol

import polars as pl

from settle_arrow.refdata import RefData
from settle_arrow.state import EngineState

Effect = Callable[[], None]


@dataclasses.dataclass(frozen=True)
class Window:
    window_id: int
    frames: Mapping[str, pl.DataFrame]
    effects: tuple[Effect, ...] = ()

    def add(self, effects: tuple[Effect, ...] = (), **frames: pl.DataFrame) -> Window:
        clash = set(frames) & set(self.frames)
        assert not clash, f"frames already produced: {sorted(clash)}"
        return dataclasses.replace(self, frames={**self.frames, **frames}, effects=self.effects + effects)


@dataclasses.dataclass(frozen=True)
class StageContext:
    refdata: RefData
    state: EngineState


class Stage(Protocol):
    name: str

    def process(self, window: Window, ctx: StageContext) -> Window: ...
