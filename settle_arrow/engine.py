"""The engine (control plane): windows in, stages through, one atomic commit per window.

Data model: ordered SourceFiles -> windows (a window is `window_rows` consecutive input
rows, possibly spanning files; `batch` makes the whole input one window) -> pieces of at
most PIECE_ROWS_MAX rows (a window is one piece unless larger) -> stages' prepare (reader
thread; in a replay that is not paced, the row-wise part once for several pieces, up to
PREPARE_ROWS_MAX rows) -> stages' process -> state effects -> stages' finish, self-checks
and digests, once for the pieces handed to the commit lane together (a replay's group of
windows: on the lane; else in this thread) -> storage.stage_window per piece that ends no
window; storage.commit_windows for a window's last piece, together with the windows
processed while the commit before them ran (group commit; commit lane), which then adds
the windows' securities obligations to its sums since the last fold (obligations.py) and
writes any snapshot or fold that came due; a run ends with a fold.

Invariants:
  * one Python iteration per piece, never per row;
  * a window's outputs (all its pieces), its checkpoint and the new source offsets commit
    in one transaction, in window order, on the commit lane (pipeline.py) while the next
    piece is processed; a transaction holds one or more whole windows; in-memory state
    runs ahead of the database by at most the windows held for the lane and the group it
    commits, and is rebuilt from it after any failed commit or self-check; on restart the offsets say
    where to resume and recovery rebuilds the state, so every input row is processed
    exactly once whatever moment the process dies at;
  * a window whose self-checks fail is not committed and stops the run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import math
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import polars as pl
import pyarrow as pa

from settle_arrow import checks, schema
from settle_arrow.dims import (
    DimIds,
    holdings_ids,
    in_reference_order,
    opening_fingerprint,
    opening_ids,
    sync_dims,
    trade_facts,
    with_sources,
)
from settle_arrow.errors import SelfCheckError, UserError
from settle_arrow.io.files import SourceError, SourceFile, discover, read_frames, read_schema, with_sha256
from settle_arrow.io.parse import ColumnTypeError, coerce, to_text
from settle_arrow.kernel_loader import load_in_background
from settle_arrow.obligations import SinceFold
from settle_arrow.pages import small_pages
from settle_arrow.pipeline import CommitLane, prefetch
from settle_arrow.recovery import recover
from settle_arrow.refdata import RefData, RefDataError, load_refdata
from settle_arrow.stages.base import Stage, StageContext, Window, stacked
from settle_arrow.stages.clearing import Clear
from settle_arrow.stages.registration import Register
from settle_arrow.stages.validate import Validate
from settle_arrow.state import KEPT_SETS, EngineState, split_holding_keys
from settle_arrow.storage import Storage, open_storage
from settle_arrow.storage.base import KeptRun, SourceOffset, WindowMark

WINDOW_ROWS_DEFAULT = 100_000
WINDOW_ROWS_MAX = 50_000_000
# A window larger than this (a --batch, say) is processed in pieces of this many rows
# inside its one transaction: memory is bounded by the piece, not by the window, and the
# window still commits atomically (measured, 20 M trades: --batch 314,757 trades/s in
# 3.3 GB; 100 k-row windows 216,466 trades/s; the whole 5 M-trade batch at once took 6.4 GB).
PIECE_ROWS_MAX = 500_000
# A delta table is folded when it has grown by this factor over its last folded size; the
# holdings snapshot is rewritten, and the securities obligations folded, when the trade legs
# since it outnumber its rows by SNAPSHOT_GROWTH. Both keep the cost amortised O(1) per row
# and the views' read cost O(state).
COMPACT_GROWTH = 2
COMPACT_ROWS_MIN = 2_000_000
# Recovery groups and applies every leg since the snapshot, so this factor bounds restart
# time. Measured, 20 M trades killed halfway: 1 → restart 6.8 s (was 10.1 s with 2), same
# throughput, 100 k-window p99 1.6 s (was 1.0 s: twice the snapshot rewrites on the lane).
SNAPSHOT_GROWTH = 1
# The snapshot's positions are encoded and appended this many at a time: its copy of the
# state is 12 bytes a position, where encoding all at once took ~50 (100 M trades: peak RSS
# 3.1 -> 5.5 GB, measured).
SNAPSHOT_PIECE_ROWS = 1_000_000
# A group commit (see Engine.run) is handed to the commit lane once it holds this many
# windows or input rows: bounds the memory of windows waiting and the latency the first of
# them sees. A window of the rows bound commits alone: at 100,000-row windows pairs
# gained no rate (a commit's fixed cost is a tenth of such a window's) and cost latency
# (p50 475 -> 540 ms, measured); at 10,000-row windows groups cut CPU 43-46 -> 37-43 s a
# 5 M-trade replay.
COMMIT_GROUP_WINDOWS_MAX = 16
COMMIT_GROUP_ROWS_MAX = 100_000
# While windows are held for a busy commit lane, the processing thread waiting for input
# looks this often whether the lane went idle, and hands them over then: else they waited
# for the next piece to arrive and be processed (a live feed's, a window's interval away:
# the slowest windows waited 100-200 ms after processing, measured).
HAND_OVER_POLL_S = 0.001
# A replay's reader prepares its pieces in batches up to these bounds: the stages' row-wise
# work (prepare_rows) then runs once over all of them. A 10,000-row window's validation
# costs ~2.5x its share of a 100,000-row one's (fixed costs of its queries, measured);
# windows of 100,000 rows or more, and a live feed's (paced) pieces, go one by one.
PREPARE_ROWS_MAX = 100_000
PREPARE_PIECES_MAX = 16
STAGES: tuple[Stage, ...] = (Validate(), Clear(), Register())
# A paced replay (a live feed) faster than this is a full-speed one in all but name.
PACE_TRADES_PER_S_MAX = 1_000_000_000


@dataclasses.dataclass(frozen=True)
class ReplayReport:
    target: str
    sources: int
    rows_skipped: int  # committed by an earlier run: exactly-once skip
    rows_read: int
    rows_accepted: int
    rows_quarantined: int
    by_reason: dict[str, int]
    windows: int
    seconds: float
    self_check: str

    @property
    def trades_per_s(self) -> float:
        return self.rows_read / self.seconds if self.seconds > 0 else 0.0


@dataclasses.dataclass(frozen=True)
class WindowTiming:
    """When one committed window's input was complete (the reader cut its last piece; a live
    feed's: its last row's arrival), when
    the commit job of that last piece began on the commit lane (a window in pieces staged
    the earlier ones before), and when its commit returned (durable); all
    time.perf_counter() seconds of the replaying process."""

    window_id: int
    rows: int
    input_complete_s: float
    commit_started_s: float
    committed_s: float

    @property
    def latency_s(self) -> float:
        """Input complete to committed: what a reader of the TARGET waits for a window."""
        return self.committed_s - self.input_complete_s

    @property
    def commit_s(self) -> float:
        """The commit's own time (its outputs built, written and committed)."""
        return self.committed_s - self.commit_started_s


@dataclasses.dataclass(frozen=True)
class _Timing:
    """A window's progress when it was processed (for the callbacks after its commit), when
    its input was complete, and `stamps`: its commit job's start and the commit's return,
    appended by that job."""

    rows_read: int  # by the run, this window included
    windows: int  # of the run, this one included
    rows_in_window: int
    input_complete_s: float
    stamps: list[float] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class _RawWindow:
    """One piece of a window: the whole window, or a part of one larger than PIECE_ROWS_MAX
    (`final` marks the piece that ends its window). Progress fields are cumulative over the
    window up to the end of this piece."""

    frame: pl.DataFrame
    progress: tuple[SourceOffset, ...]  # of the files it touched
    last_source: str
    last_offset: int
    final: bool = True


@dataclasses.dataclass(frozen=True)
class _Processed:
    """A processed piece on its way to the commit lane: `mark` and `timing` are None for a
    piece that does not end its window; `snapshot` holds the state's non-zero positions
    right after a window that made a holdings snapshot due (HoldingsTable.positions)."""

    window: Window
    raw: _RawWindow
    mark: WindowMark | None
    timing: _Timing | None
    snapshot: tuple[np.ndarray, np.ndarray] | None = None
    digest: str | None = None  # of its content, once checked (_checked)


def _check_columns(src: SourceFile) -> None:
    """Refuse, before any window, a file with none of the trade columns or a column whose type
    cannot hold its values (a float price): per file, so windowing cannot change the answer."""
    found = read_schema(src)
    cols = [c for c in schema.INPUT_TRADE.names if c in found.names]
    if not cols:
        raise SourceError(f"{src.url} has none of the trade columns (found: {', '.join(found.names[:8]) or 'nothing'})")
    twice = [c for c in cols if found.names.count(c) > 1]
    if twice:
        raise SourceError(f"{src.url} has column {twice[0]} more than once")
    wide = [c for c in cols if pa.types.is_decimal256(found.field(c).type)]  # Polars has no decimal256
    if wide:
        raise ColumnTypeError(f"{src.url}: column {wide[0]} has type {found.field(wide[0]).type}, "
                              f"expected {schema.INPUT_TRADE.field(wide[0]).type}")
    empty = pl.from_arrow(found.empty_table().select(cols))
    assert isinstance(empty, pl.DataFrame)
    try:
        coerce(empty, schema.INPUT_TRADE)
    except ColumnTypeError as exc:
        raise ColumnTypeError(f"{src.url}: {exc}") from None


def _batch_frame(frame: pl.DataFrame, src: SourceFile, first_row: int) -> pl.DataFrame:
    assert frame.width, f"{src.url}: _check_columns lets no file without trade columns through"
    return frame.with_columns(
        pl.lit(src.url).alias("source"),
        pl.int_range(first_row, first_row + frame.height, dtype=pl.Int64).alias("source_row"),
    )


def _concat(frames: list[pl.DataFrame]) -> pl.DataFrame:
    if not frames:
        return pl.from_arrow(schema.INPUT_TRADE.empty_table()).with_columns(
            pl.lit(None, dtype=pl.String).alias("source"), pl.lit(None, dtype=pl.Int64).alias("source_row")
        )
    # One chunk per column: an eager select over columns of unequal chunking realigns the
    # whole frame first, and validation adds single-chunk columns beside these (measured,
    # 100 k rows of 3 batches: 2 ms a select against 0.08 ms; validation's CPU -20%).
    if len({tuple(f.schema.items()) for f in frames}) == 1:
        return pl.concat(frames, rechunk=True)
    # Files of different formats (text CSV, typed Parquet) meet in one window: fall back
    # to text, which the validator parses strictly either way.
    texts = [f.with_columns(to_text(c, t) for c, t in f.schema.items() if c != "source_row") for f in frames]
    return pl.concat(texts, how="diagonal", rechunk=True)


def _check_unchanged(src: SourceFile, done: SourceOffset | None, target: str) -> None:
    """Refuse a file that is not the one whose rows `done` says were committed (its rows
    after them would continue another file)."""
    assert src.sha256 is not None, "hashed before the run"
    if done is None:
        return
    changed = f"{src.url} changed since it was replayed into {target}"
    if done.size_bytes != src.size_bytes:
        raise SourceError(f"{changed} ({done.size_bytes} -> {src.size_bytes} bytes)")
    # A TARGET of schema version 4 recorded sizes only: its files are checked by size.
    if done.sha256 is not None and done.sha256 != src.sha256:
        raise SourceError(f"{changed} (same size, other bytes: sha256 {done.sha256[:12]}... -> {src.sha256[:12]}...)")


def _windows(sources: tuple[SourceFile, ...], done: dict[str, SourceOffset], window_rows: int | None,
             piece_rows: int | None = None) -> Iterator[_RawWindow]:
    """Cut the remaining input into windows (`window_rows=None`: one window), each handed
    out in pieces of at most `piece_rows` rows (PIECE_ROWS_MAX)."""
    piece_rows = piece_rows or PIECE_ROWS_MAX
    done = dict(done)  # updated as windows are handed out: the run's own progress
    frames: list[pl.DataFrame] = []
    touched: dict[str, SourceOffset] = {}
    rows = piece = 0  # rows in the open window, rows in the open piece
    last = ("", 0)

    def cut(final: bool) -> _RawWindow:
        return _RawWindow(_concat(frames), tuple(touched.values()), *last, final=final)

    def offset(src: SourceFile, rows_done: int) -> SourceOffset:
        return SourceOffset(src.url, src.size_bytes, src.sha256, rows_done)

    for src in sources:
        pos = done[src.url].rows_done if src.url in done else 0
        touched.setdefault(src.url, offset(src, pos))
        for part in read_frames(src, list(schema.INPUT_TRADE.names), start_row=pos):
            while part.height:
                room = piece_rows - piece if window_rows is None else min(window_rows - rows, piece_rows - piece)
                take = min(part.height, room)
                frames.append(_batch_frame(part.slice(0, take), src, pos))
                pos += take
                rows += take
                piece += take
                part = part.slice(take)
                touched[src.url] = offset(src, pos)
                last = (src.url, pos)
                if window_rows is not None and rows == window_rows:
                    yield cut(final=True)
                    done.update(touched)
                    frames, rows, piece = [], 0, 0
                    touched = {src.url: offset(src, pos)}
                elif piece == piece_rows:
                    yield cut(final=False)
                    frames, piece = [], 0
    fresh = any(done.get(u) != o for u, o in touched.items())
    if rows or fresh:
        # The tail window also records files that turned out empty, so a re-run skips them
        # (and the bytes of finished files a TARGET of schema version 4 has no sha256 of);
        # a re-run over finished input yields nothing, so it commits nothing (exactly once).
        # After pieces of an open window this final piece may be empty: it commits them.
        yield cut(final=True)


def prepare_rows_together(stages: tuple[Stage, ...], ref: RefData,
                          frames: list[pl.DataFrame]) -> list[dict[str, pl.DataFrame]]:
    """Each stage's row-wise prepare (`prepare_rows`, given the row frames the stages
    before it made) run once over consecutive frames of one schema, sliced back per frame:
    a query's fixed cost paid once for them all (ten 10,000-row windows' validation: 9.7 ->
    ~4 ms of CPU a window; clearing's per-trade columns 0.73-0.88 -> 0.43-0.53 ms,
    measured). Nothing for
    one frame (its own prepare runs them), nor where the frames together fail: each
    frame's prepare then runs them itself and raises its error after the frames before it
    went on, as one at a time did."""
    if len(frames) < 2:
        return [{} for _ in frames]
    together = pl.concat(frames, rechunk=True)  # one chunk a column (see _concat)
    starts = np.cumsum([0, *(f.height for f in frames)]).tolist()
    out: list[dict[str, pl.DataFrame]] = [{} for _ in frames]
    rows: dict[str, pl.DataFrame] = {}  # made so far, of all of `together`
    for stage in stages:
        prepare_rows = getattr(stage, "prepare_rows", None)
        if prepare_rows is None:
            continue
        try:
            made = prepare_rows(together, ref, rows)
        except Exception:
            return [{} for _ in frames]
        assert not set(made) & set(rows), f"{stage.name}: row frames already made"
        rows.update(made)
        for name, f in made.items():
            assert f.height == together.height, f"{name}: prepare_rows gave other rows"
            for own, lo, hi in zip(out, starts[:-1], starts[1:], strict=True):
                own[name] = f.slice(lo, hi - lo)
    return out


def _prepared_together(batch: list[_RawWindow], piece: _RawWindow) -> bool:
    """Whether `piece` joins `batch` (pieces to prepare together): one schema (frames of
    different formats are never concatenated) and the rows' bound."""
    return (sum(r.frame.height for r in batch) + piece.frame.height <= PREPARE_ROWS_MAX
            and batch[0].frame.schema == piece.frame.schema)


def _digests(windows: Sequence[Window]) -> list[str]:
    """Each window's content digest (its deltas' row hashes summed, per table), for its
    checkpoint: one hash_rows call per table over the windows at once. A row's hash is its
    values' alone, so a window's digest does not depend on the windows it commits with."""
    hashers = [hashlib.sha256() for _ in windows]
    for name in ("obligations_securities_delta", "obligations_cash_delta", "holdings_delta"):
        frames = [w.frames[name] for w in windows]
        rows = [f for f in frames if f.height]
        hashes = pl.concat(rows).hash_rows().to_numpy() if rows else np.empty(0, dtype=np.uint64)
        heights = np.array([f.height for f in frames], dtype=np.int64)
        running = np.concatenate([np.zeros(1, dtype=np.uint64), np.cumsum(hashes, dtype=np.uint64)])
        ends = np.cumsum(heights)
        sums = running[ends] - running[ends - heights]  # uint64 arrays: modulo 2^64, as the sums
        for h, f, total in zip(hashers, frames, sums.tolist(), strict=True):
            h.update(f"{name}:{f.height}:".encode())
            h.update(total.to_bytes(8, "little", signed=False) if f.height else b"")
    return [h.hexdigest()[:16] for h in hashers]


def _combine(digests: list[str]) -> str:
    """A window's digest from its pieces' digests, in order."""
    return hashlib.sha256(":".join(digests).encode()).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class _Checked:
    """A group's outcome before its commit: `passed`, the pieces before the first that
    failed, finished and each with its digest (a window's checkpoint with its window's);
    that one's self-check `problems`, or the `error` its stages' finish raised."""

    passed: tuple[_Processed, ...]
    problems: list[str]
    error: Exception | None


def _finished(group: tuple[_Processed, ...], finish: Callable[[Sequence[Window]], list[Window]],
              ) -> tuple[list[_Processed], Exception | None]:
    """`group`'s pieces through `finish` (the stages' finish) at once; where that raises,
    one by one: those before the piece that raises, and its error (amounts too large to
    net, say), so the windows before it still commit."""
    try:
        windows = finish([p.window for p in group])
    except Exception as exc:
        if len(group) == 1:
            return [], exc
        together = exc
    else:
        return [dataclasses.replace(p, window=w) for p, w in zip(group, windows, strict=True)], None
    finished: list[_Processed] = []
    for p in group:
        try:
            finished.append(dataclasses.replace(p, window=finish([p.window])[0]))
        except Exception as exc:
            return finished, exc
    raise AssertionError("finish failed for the pieces together, not for any alone") from together


def _checked(group: tuple[_Processed, ...], finish: Callable[[Sequence[Window]], list[Window]],
             earlier: Sequence[str] = ()) -> _Checked:
    """`group`'s pieces finished (_finished), then self-checked and digested over the
    group at once (see _Checked). `earlier`: the digests of the earlier pieces of the
    window `group`'s first piece belongs to (then alone)."""
    assert not earlier or len(group) == 1
    finished, error = _finished(group, finish)
    windows = [p.window for p in finished]
    problems = checks.violations(windows)
    failed = next((i for i, found in enumerate(problems) if found), len(finished))
    passed = []
    for p, digest in zip(finished[:failed], _digests(windows[:failed]), strict=True):
        mark = p.mark
        if mark is not None:
            whole = _combine([*earlier, digest]) if earlier else digest
            mark = dataclasses.replace(mark, checkpoint={**mark.checkpoint, "digest": whole})
        passed.append(dataclasses.replace(p, mark=mark, digest=digest))
    if failed < len(finished):
        return _Checked(tuple(passed), problems[failed], None)
    return _Checked(tuple(passed), [], error)


class Engine:
    """Runs stages over windows into one TARGET; owns state, commits, metrics, errors."""

    def __init__(self, storage: Storage, refdata: RefData, stages: tuple[Stage, ...] = STAGES):
        self.storage = storage
        self.refdata = refdata
        self.stages = stages
        storage.ensure_schema()
        self.dims = sync_dims(storage, refdata)
        started = self._init_opening()
        # A TARGET that has just stored its opening holds nothing else, so its state is the
        # opening, in memory and in key order already: no read back of ten million rows.
        self._set_state(started if started is not None else recover(storage, refdata, self.dims))
        self._delta_rows = {name: storage.count(name) for name in schema.DELTAS}
        self._folded_rows = dict(self._delta_rows)
        self._state_ahead = False

    def _init_opening(self) -> EngineState | None:
        """Store or check the opening holdings; the state when this start stored them into a
        TARGET that had committed nothing (else None: recovery builds it)."""
        try:
            return self._check_opening()
        finally:
            self.refdata.release_opening()

    def _check_opening(self) -> EngineState | None:
        meta = self.storage.meta()
        digest = meta.get("opening_digest")
        ref = self.refdata
        if digest is None:
            empty = self.storage.count("checkpoints") == 0
            ids = opening_ids(ref, self.dims)
            # A TARGET that committed nothing starts from the opening: its holdings table is
            # built in another thread while the storage writes the rows (numba, DuckDB and
            # hashlib release the GIL).
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="settle-opening") as pool:
                state = pool.submit(self._opening_state) if empty else None
                self.storage.init_opening(ids.to_arrow(), opening_fingerprint(ids), ref.opening_file_sha256)
            return state.result() if state is not None else None
        elif meta.get("opening_file_sha256") == ref.opening_file_sha256:
            return None  # the very file the TARGET was started with: nothing to load or compare
        elif digest != opening_fingerprint(opening_ids(ref, self.dims)) and not self._same_opening():
            raise RefDataError(
                f"reference holdings differ from the opening holdings {self.storage.url} was started with"
            )
        else:  # same rows in other bytes: remember these bytes, the next start skips the load
            self.storage.set_meta({"opening_file_sha256": ref.opening_file_sha256})
        return None

    def _opening_state(self) -> EngineState:
        """The state of a TARGET that holds the opening alone."""
        ref = self.refdata
        state = EngineState(n_sec=ref.n_sec, run_dir=self.storage.state_dir if in_reference_order(self.dims) else None)
        o = ref.opening
        state.holdings.insert(state.holding_keys(o["acct_idx"].to_numpy(), o["sec_idx"].to_numpy()),
                              o["quantity"].to_numpy())
        return state

    def _set_state(self, state: EngineState) -> None:
        """Take `state` (a fresh start's or recovered) and the bookkeeping of its kept runs:
        those frozen before now but not catalogued yet (during recovery: they cover no
        window beyond their set's catalogued runs) go with the next commit."""
        self.state = state
        # Trade legs the state holds beyond the stored snapshot (see SNAPSHOT_GROWTH).
        self._legs_since_snapshot = 2 * self.storage.trade_rows_since_snapshot()
        # The commit lane adds up the securities obligations after the stored snapshot from
        # here on; it can, for a fold, only if no committed trade row lies after it yet.
        self._obligations = (self._nothing_since_fold()
                             if self.storage.trade_rows_since_snapshot(schema.OBLIGATIONS_SNAPSHOT_KEY) == 0
                             else None)
        catalogued = self.storage.state_runs()
        self._runs_noted = {name: 0 for name in KEPT_SETS}
        # Each with its write (SortedRuns.kept_written): a run is catalogued once written.
        self._runs_pending: list[tuple[KeptRun, Future]] = []
        for name in KEPT_SETS:
            mine = [r for r in catalogued if r.set_name == name]
            assert [r.run_no for r in mine] == list(range(len(mine))), f"{name}: runs catalogued in order"
            self._runs_noted[name] = len(mine)
            self._note_runs(name, mine[-1].covered_window if mine else -1)

    def _note_runs(self, name: str, covered_window: int) -> None:
        """Queue the runs `name` froze since last noted, as covering up to `covered_window`."""
        runs = getattr(self.state, name)
        self._runs_pending += [(KeptRun(name, run, runs.kept[run], covered_window), runs.kept_written[run])
                               for run in range(self._runs_noted[name], len(runs.kept))]
        self._runs_noted[name] = len(runs.kept)

    def _written_runs(self, wait: bool = False) -> tuple[KeptRun, ...]:
        """The pending runs whose files are written (all of them with `wait`), taken off the
        queue: a prefix, as one thread writes them in the order they froze, so each set's
        runs are still catalogued in order. A failed write is raised here."""
        n = 0
        while n < len(self._runs_pending) and (wait or self._runs_pending[n][1].done()):
            self._runs_pending[n][1].result()
            n += 1
        written, self._runs_pending = self._runs_pending[:n], self._runs_pending[n:]
        return tuple(run for run, _ in written)

    def _same_opening(self) -> bool:
        """Exact comparison with the stored opening holdings (when the fingerprint differs);
        dimension ids never change meaning, so equal ids are equal keys."""
        cols = list(schema.HOLDINGS_IDS.names)
        stored = pl.from_arrow(self.storage.query(f"SELECT {', '.join(cols)} FROM opening_holdings"))
        assert isinstance(stored, pl.DataFrame)
        return stored.sort(cols).equals(opening_ids(self.refdata, self.dims).sort(cols))

    def prepare(self, window_id: int, frame: pl.DataFrame, rows: Mapping[str, pl.DataFrame] | None = None) -> Window:
        """The stages' stateless work on one window (see stages/base.py): safe to run ahead,
        in another thread, while earlier windows are processed. `rows`: the stages'
        row-wise frames of this window, where prepare_rows_together made them with other windows'."""
        window = Window(window_id=window_id, frames={"input": frame, **(rows or {})})
        for stage in self.stages:
            prepare = getattr(stage, "prepare", None)
            if prepare is not None:
                window = prepare(window, self.refdata)
        return window

    def process(self, window: Window) -> Window:
        """Run the stages over one prepared window (no I/O, no state change)."""
        ctx = StageContext(refdata=self.refdata, state=self.state)
        for stage in self.stages:
            window = stage.process(window, ctx)
        return window

    def finish(self, windows: Sequence[Window]) -> list[Window]:
        """The stages' finish over processed windows handed over together, their effects
        applied (see stages/base.py)."""
        out = list(windows)
        for stage in self.stages:
            finish = getattr(stage, "finish", None)
            if finish is not None:
                out = finish(out, self.refdata)
                assert [w.window_id for w in out] == [w.window_id for w in windows], f"{stage.name}: finish kept its windows"
        return out

    def run(
        self,
        sources: tuple[SourceFile, ...],
        window_rows: int | None = WINDOW_ROWS_DEFAULT,
        on_window: Callable[[int, int], None] | None = None,
        on_commit: Callable[[WindowTiming], None] | None = None,
        pace_trades_per_s: float | None = None,
    ) -> ReplayReport:
        """Replay `sources` (see module doc). After each window commits, in window order and
        in this thread: on_window(rows read so far, windows so far) and on_commit(its timing);
        the windows of one group commit get theirs one after another once it committed (so
        the TARGET may already hold windows after the one called for).
        `pace_trades_per_s`: the input as a live feed of that many rows a second from the
        run's first window on; a piece is cut, and its input complete, no earlier than its
        last row's arrival (the latency a feed below the engine's rate sees, not a backlog's)."""
        assert pace_trades_per_s is None or (math.isfinite(pace_trades_per_s) and pace_trades_per_s > 0)
        started = time.perf_counter()
        done = self.storage.source_progress()
        if any(s.sha256 is None for s in sources):
            sources = with_sha256(sources)
        for src in sources:
            _check_unchanged(src, done.get(src.url), self.storage.url)
        skipped = sum(done[s.url].rows_done for s in sources if s.url in done)
        reasons: Counter[str] = Counter()
        read = accepted = windows = 0
        window_id = self.storage.max_window_id()
        self.dims = with_sources(self.storage, self.dims, [s.url for s in sources])
        if self._state_ahead:  # an earlier run stopped with state past its last commit
            self._set_state(recover(self.storage, self.refdata, self.dims))
            self._state_ahead = False
        # Reading, decoding and each stage's stateless work run one piece ahead in the
        # reader thread; window ids are assigned there, in order.
        reader_stop = threading.Event()  # set when the processing loop has gone

        # Pieces the reader has cut (their input complete) and pieces processed here: more
        # cut than processed means the next piece's input is waiting already.
        pieces_cut = pieces_processed = 0

        def ahead() -> Iterator[tuple[_RawWindow, Window, float]]:
            nonlocal pieces_cut
            next_id = window_id + 1
            arrived, feed_started_s = 0, time.perf_counter()
            batch: list[tuple[_RawWindow, float]] = []  # cut (input complete), not prepared yet

            def prepare_batch() -> Iterator[tuple[_RawWindow, Window, float]]:
                nonlocal next_id
                rows = prepare_rows_together(self.stages, self.refdata, [raw.frame for raw, _ in batch])
                for (raw, cut_s), own in zip(batch, rows, strict=True):
                    yield raw, self.prepare(next_id, raw.frame, own), cut_s
                    next_id += raw.final
                batch.clear()

            for raw in _windows(sources, done, window_rows):
                arrived += raw.frame.height
                if pace_trades_per_s is not None:
                    due_s = feed_started_s + arrived / pace_trades_per_s
                    if reader_stop.wait(max(0.0, due_s - time.perf_counter())):
                        return
                if batch and not _prepared_together([r for r, _ in batch], raw):
                    yield from prepare_batch()
                # The piece's input is complete: a feed's when its last row arrived, even where
                # the reader comes to it later (busy, or its queue full): that wait is latency too.
                cut_s = due_s if pace_trades_per_s is not None else time.perf_counter()
                pieces_cut += 1
                batch.append((raw, cut_s))
                # A live feed's pieces go one by one, as they arrive: where a late reader
                # batched the two or three due meanwhile, the first waited for the others
                # (p99 152-212 against 94-113 ms at 230,000 trades/s in pairs, measured).
                if (pace_trades_per_s is not None or len(batch) == PREPARE_PIECES_MAX
                        or sum(r.frame.height for r, _ in batch) >= PREPARE_ROWS_MAX):
                    yield from prepare_batch()
            yield from prepare_batch()

        pieces_in_window = rows_in_window = 0  # of the open window, so far
        piece_digests: list[str] = []  # of the open window's pieces handed over so far (hand_over)
        held: list[_Processed] = []  # processed, not yet handed to the commit lane

        def hand_over() -> None:
            """Submit the held pieces as one commit job (waits for the job before it), once
            finished and checked (_checked): a replay's groups of windows on the commit lane
            (Engine._commit_job), a window or piece alone, or a live feed's, here, where one
            that fails its checks (SelfCheckError) or its finish stops the run after the
            windows before it commit."""
            nonlocal piece_digests
            if not held:
                return
            group = tuple(held)
            held.clear()
            report = functools.partial(self._report, group, on_window, on_commit)
            if len(group) > 1 and pace_trades_per_s is None:
                # Windows held while the lane was busy, the replay behind its input: their
                # finish, checks and digests run on the lane, off this thread, whose work sets
                # the rate (10,000-row windows at full speed, four alternating pairs, the
                # checks and digests: 13.9-14.6 against 14.6-15.7 s, steady rate +3-19%, CPU
                # -1.0-1.4 s, measured; the same checks batched here gained nothing).
                lane.submit(self._commit_job(group, checked=False), report)
                return
            # Here, a lone window's commit job is the commit alone, and a live feed's stays so
            # as it catches up: its latency, not the rate, counts (every check on the lane, at
            # 230,000 trades/s: p99 113-251 against 99-124 ms in five pairs, measured).
            out = _checked(group, self.finish, piece_digests)
            if out.passed:
                piece_digests = [*piece_digests, out.passed[0].digest] if out.passed[-1].mark is None else []
                lane.submit(self._commit_job(out.passed), report)
            if out.problems or out.error:
                lane.drain()  # the windows before this one commit
                self._abort_window()  # and none of this one's pieces
                piece_digests = []
                raise out.error or self._refused(group[len(out.passed)].window.window_id, out.problems)

        def idle() -> None:
            """While the reader has no piece ready (a live feed's next rows have not
            arrived): an idle lane takes the held windows now and reports what it
            committed, not when the next piece comes, which may be seconds away."""
            if not lane.busy():
                if held:
                    hand_over()  # drains the job before, running its callbacks
                else:
                    lane.drain()

        def idle_poll_s() -> float:
            """How soon a wait for input looks again whether the lane is idle: soon while
            windows wait for it, which it takes the moment it is (a live feed: the next
            piece may be a window's interval away, and those windows would wait for it)."""
            return HAND_OVER_POLL_S if held else math.inf

        # Prepared pieces wait here, up to a batch's worth (the reader prepares the next batch meanwhile).
        depth = max(1, min(PREPARE_PIECES_MAX, PREPARE_ROWS_MAX // window_rows)) if window_rows else 1
        try:
            with CommitLane() as lane:
                try:
                    for raw, prepared, cut_s in prefetch(ahead(), depth=depth, stop=reader_stop,
                                                         on_wait=idle, wait_s=idle_poll_s):
                        pieces_processed += 1
                        window_id = prepared.window_id
                        window = self.process(prepared)
                        # State runs ahead of the database by the windows held and committing, so
                        # the next piece is processed meanwhile; if a commit fails, or a window's
                        # self-check as it is handed over, the run stops and the state is rebuilt
                        # from the database before any further run.
                        self._state_ahead = True
                        for effect in window.effects:
                            effect()
                        self._legs_since_snapshot += 2 * window.frames["cleared"].height
                        for name in KEPT_SETS:
                            # A run frozen in a window's last piece holds all of it; in an
                            # earlier piece, part (recovery skips the keys it already holds).
                            self._note_runs(name, window_id if raw.final else window_id - 1)
                        q = window.frames["quarantine"]
                        reasons.update(dict(q.group_by("reason").len().iter_rows()) if q.height else {})
                        read += raw.frame.height
                        accepted += window.frames["accepted"].height
                        rows_in_window += raw.frame.height
                        pieces_in_window += 1
                        if not raw.final:
                            # A piece of a window too large to hold at once: staged in the
                            # window's open transaction, after whatever is held.
                            hand_over()
                            held.append(_Processed(window, raw, None, None))
                            hand_over()
                            continue
                        windows += 1
                        # Its digest is added as it is handed over (hand_over).
                        checkpoint = {"source": raw.last_source, "offset": raw.last_offset, "rows": rows_in_window}
                        # A run frozen by this window or one before it whose files are still being
                        # written goes with a later commit, with the window it covers.
                        mark = WindowMark(window_id, checkpoint, raw.progress, self._written_runs())
                        in_pieces = pieces_in_window > 1
                        held.append(_Processed(window, raw, mark, _Timing(read, windows, rows_in_window, cut_s),
                                               self._snapshot_if_due()))
                        pieces_in_window = rows_in_window = 0
                        # Group commit: while the lane commits, the windows processed meanwhile
                        # wait and then commit together, sharing one transaction's fixed cost
                        # (~24 ms of CPU a commit, measured); an idle lane takes each window at
                        # once, so grouping costs no latency when commits keep up. Behind its
                        # input (the next piece's input complete already: a replay of files, a
                        # feed catching up) the engine holds windows for an idle lane too, up to
                        # the group's bounds: there the windows' CPU, not a window's wait, sets
                        # when the input is done (10,000-row windows at full speed: ~20% more
                        # trades/s, ~17% less CPU, latency p99 ~1.6x, measured).
                        behind = pieces_cut > pieces_processed
                        if ((not lane.busy() and not behind) or in_pieces or len(held) >= COMMIT_GROUP_WINDOWS_MAX
                                or sum(h.raw.frame.height for h in held) >= COMMIT_GROUP_ROWS_MAX):
                            hand_over()
                except Exception:
                    # An error reading or processing a window (a bad input, a calendar too short)
                    # stops the run after the windows before it, which commit as they would have:
                    # held for a group, they are processed and checked. Not after a failed commit,
                    # whose error is the run's; nor may a second failure hide the first.
                    if held and not lane.failed:
                        with contextlib.suppress(Exception):
                            hand_over()
                            lane.drain()
                    raise
                hand_over()
        except BaseException:
            self._abort_window()  # pieces of an unfinished window never commit
            raise
        self._state_ahead = False
        if self._runs_pending:  # written after the last commit: a restart maps them, not replays
            self.storage.catalogue_state_runs(self.storage.max_window_id(), self._written_runs(wait=True))
        if self._obligations is None or self._obligations.rows:
            # The TARGET ends each run folded: its obligations are read from the snapshot
            # alone (the self-checks below read them twice: 5 M trades, 0.45 s a read of
            # the view netting the trade rows, measured). So does a run that committed
            # nothing after one that stopped before its fold (None: rows after the fold).
            self._fold_obligations()
        problems = self.storage.verify()
        self.storage.record_self_check(window_id, problems)
        if problems:
            raise SelfCheckError(f"whole-table self-check failed: {problems[0]}")
        return ReplayReport(
            target=self.storage.url,
            sources=len(sources),
            rows_skipped=skipped,
            rows_read=read,
            rows_accepted=accepted,
            rows_quarantined=read - accepted,
            by_reason={r: reasons[r] for r in schema.QUARANTINE_REASONS if reasons[r]},
            windows=windows,
            seconds=time.perf_counter() - started,
            self_check="OK",
        )

    def _nothing_since_fold(self) -> SinceFold:
        return SinceFold(self.dims.participant, self.dims.security)

    def _abort_window(self) -> None:
        """Abandon the open window's staged pieces (the lane is idle or gone)."""
        self.storage.abort_window()
        if self._obligations is not None:
            self._obligations.abort()

    def _fold_obligations(self) -> None:
        """Fold the securities obligations as of the last committed window (on the commit
        lane, or after it closed): by the sums the lane keeps, or, where this engine has not
        seen every window since the snapshot (after a restart), by the view's netting of the
        trade rows (100 M trades: 0.7-3.1 s a fold that way, 0.03-0.13 s from the sums,
        measured). Either way nothing is pending after it."""
        since = self._obligations
        self.storage.fold_obligations(since.table() if since is not None else None)
        self._obligations = self._nothing_since_fold()

    def _snapshot_if_due(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The state's positions when the legs since the stored snapshot outgrow the state
        (called right after a window's last piece, so they are as of that window)."""
        holdings = self.state.holdings
        if self._legs_since_snapshot <= max(COMPACT_ROWS_MIN, SNAPSHOT_GROWTH * len(holdings)):
            return None
        self._legs_since_snapshot = 0
        # Copied here, between windows, not read back by SQL on the commit lane: summing the
        # base and the legs there took 4.5-6.5 s of that thread per snapshot of 14 M
        # positions, while this copy costs ~0.1 s and writing it ~2 s (measured).
        return holdings.positions()

    def _commit_job(self, group: tuple[_Processed, ...], checked: bool = True) -> Callable[[], None]:
        """The commit lane's job for `group`: one piece of a window in pieces (staged in its
        open transaction), or windows that commit in one transaction (the last of them may
        end a window in pieces), then any compaction or snapshot that makes due. Not
        `checked` yet (a group of whole windows), its windows are finished and checked first
        (_checked): those before one that fails commit, then the job raises (a failed check
        recorded first). Jobs run one at a time in window order, so the row counters they
        keep are only ever touched by the job running. Each committed window's timing gets
        the job's start and the commit's return (perf_counter seconds)."""
        assert group and (group[-1].mark is not None or len(group) == 1), "a piece that ends no window goes alone"
        assert checked or all(p.mark is not None for p in group), "pieces are checked as they are handed over"

        def job() -> None:
            started_s = time.perf_counter()
            out = _Checked(group, [], None) if checked else _checked(group, self.finish)
            if out.passed:
                self._commit(out.passed, started_s)
            if out.problems:
                raise self._refused(group[len(out.passed)].window.window_id, out.problems)
            if out.error:
                raise out.error

        return job

    def _refused(self, window_id: int, problems: list[str]) -> SelfCheckError:
        """Record window `window_id`'s failed self-check; the error that stops the run."""
        self.storage.record_self_check(window_id, problems)
        return SelfCheckError(f"window {window_id} not committed: {problems[0]}")

    def _commit(self, group: tuple[_Processed, ...], started_s: float) -> None:
        """The commit of checked `group` (see _commit_job), on the commit lane."""
        dims, ref, storage = self.dims, self.refdata, self.storage
        for name in schema.DELTAS:
            self._delta_rows[name] += sum(p.window.frames[name].height for p in group)
        if group[-1].mark is None:
            piece = group[0].window
            appends = {n: piece.frames[n].to_arrow() for n in schema.WINDOW_APPENDS if n != "trade_facts"}
            appends["trade_facts"] = trade_facts(piece.frames["cleared"], ref, dims)
            storage.stage_window(piece.window_id, appends)
            if self._obligations is not None:
                self._obligations.stage(piece.frames["obligations_securities_idx"])
            return
        due = [name for name in schema.DELTAS
               if self._delta_rows[name] > max(COMPACT_ROWS_MIN, COMPACT_GROWTH * self._folded_rows[name])]
        storage.commit_windows([p.mark for p in group if p.mark is not None], _group_appends(group, ref, dims))
        for p in group:
            if p.timing is not None:
                p.timing.stamps.extend((started_s, time.perf_counter()))
        if self._obligations is not None:  # only once they are durable
            self._obligations.commit([p.window.frames["obligations_securities_idx"] for p in group])
        for name in due:
            self._folded_rows[name] = self._delta_rows[name] = storage.compact(name)
        snapshots = [p for p in group if p.snapshot is not None]
        if snapshots:  # the last: as of a committed window, so the view stays the same
            keys, quantity = snapshots[-1].snapshot

            def pieces() -> Iterator[pa.Table]:
                for lo in range(0, len(keys), SNAPSHOT_PIECE_ROWS):
                    acct_idx, sec_idx = split_holding_keys(keys[lo:lo + SNAPSHOT_PIECE_ROWS], ref.n_sec)
                    yield holdings_ids(acct_idx, sec_idx, quantity[lo:lo + SNAPSHOT_PIECE_ROWS], dims).to_arrow()

            storage.replace_holdings_snapshot(snapshots[-1].window.window_id, pieces())
            # The securities obligations fold when the holdings snapshot moves: one pause
            # of the lane for both, and the legs either view adds stay bounded alike.
            self._fold_obligations()

    @staticmethod
    def _report(group: tuple[_Processed, ...], on_window: Callable[[int, int], None] | None,
                on_commit: Callable[[WindowTiming], None] | None) -> None:
        """The callbacks of the windows `group` committed (each one's commit stamped its
        timing: a job that failed its checks committed the windows before the one that
        did), in window order."""
        for p in group:
            t = p.timing
            if t is None or not t.stamps:
                continue
            if on_window:
                on_window(t.rows_read, t.windows)
            if on_commit:
                on_commit(WindowTiming(p.window.window_id, t.rows_in_window, t.input_complete_s, *t.stamps))


def _group_appends(group: tuple[_Processed, ...], ref: RefData, dims: DimIds) -> dict[str, pa.Table]:
    """The WINDOW_APPENDS rows of `group`'s pieces, each with its window_id: one Arrow table
    per table for the whole group, so the group pays each append's fixed cost once."""
    windows = [p.window for p in group]
    cleared = stacked(windows, "cleared")
    appends = {name: stacked(windows, name).to_arrow() for name in schema.WINDOW_APPENDS if name != "trade_facts"}
    appends["trade_facts"] = trade_facts(cleared, ref, dims).append_column("window_id", cleared["window_id"].to_arrow())
    return appends


def replay(
    paths: list[str] | tuple[str, ...],
    refdata: str,
    target: str,
    window_rows: int = WINDOW_ROWS_DEFAULT,
    batch: bool = False,
    on_window: Callable[[int, int], None] | None = None,
    on_start: Callable[[tuple[SourceFile, ...]], None] | None = None,
    on_commit: Callable[[WindowTiming], None] | None = None,
    pace_trades_per_s: float | None = None,
) -> ReplayReport:
    """Replay trade files into TARGET (the library call the CLI `replay` wraps);
    `pace_trades_per_s`: as a live feed at that rate (Engine.run)."""
    if not batch and not 1 <= window_rows <= WINDOW_ROWS_MAX:
        raise UserError(f"window size must be between 1 and {WINDOW_ROWS_MAX:,} rows")
    if pace_trades_per_s is not None:
        if batch:
            raise UserError("a paced replay is a live feed: it needs streaming windows, not --batch")
        if not (math.isfinite(pace_trades_per_s) and 0 < pace_trades_per_s <= PACE_TRADES_PER_S_MAX):
            raise UserError(f"pace must be above 0 and at most {PACE_TRADES_PER_S_MAX:,} trades/s")
    load_in_background()  # the compiled kernels load while reference data and state do
    sources = discover(paths)
    for src in sources:
        _check_columns(src)
    # The files' bytes are hashed while reference data and state load (hashlib releases
    # the GIL): 87 MB of trades take ~40 ms alone, 1.6 GB (100 M trades) 1.1 s of CPU.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="settle-hash") as pool:
        hashed = pool.submit(with_sha256, sources)
        with small_pages():  # start-up's large transient arrays (see pages.py)
            ref = load_refdata(refdata)
            storage = open_storage(target)
        try:
            with small_pages():
                engine = Engine(storage, ref)
            sources = hashed.result()
            if on_start:
                on_start(sources)
            return engine.run(sources, None if batch else window_rows, on_window, on_commit, pace_trades_per_s)
        finally:
            storage.close()
