"""Overlap of a window's three phases on two cores: read the next window, process this one,
commit the previous one.

Data model:
  prefetch(items)  an iterator run one step ahead in a background thread (input decoding);
  CommitLane       one background thread that runs commit jobs strictly in submission
                   order, at most one in flight.

Invariants: commits happen in window order and a job is submitted only after the one before
it returned, so the database always holds a prefix of the windows and a crash loses only
uncommitted ones (which replay again on restart: exactly once). Every error of
a background thread is raised in the caller's thread; no thread outlives its `with`.
Parquet decoding, Polars, numpy sorts and DuckDB release the GIL, which is why threads
rather than processes suffice here (measured: see README, performance).
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
_DONE = object()
_POLL_S = 0.05  # how often a blocked producer checks whether its consumer has gone, and a consumer for Ctrl-C


def prefetch(items: Iterator[T], depth: int = 1, stop: threading.Event | None = None,
             on_wait: Callable[[], None] | None = None, wait_s: Callable[[], float] | None = None) -> Iterator[T]:
    """Yield `items`, produced up to `depth` ahead in a background thread. `stop` (made here
    when not given) is set once the consumer has gone: a producer that waits for something
    other than this queue (a paced feed) waits on it, so the consumer's exit, which joins
    the thread, never waits out the producer's wait. `on_wait` runs in the consumer's
    thread every `wait_s()` seconds (asked before each wait; _POLL_S when not given, at
    most _POLL_S) it waits for an item; its error is raised to the consumer."""
    assert depth >= 1
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = stop if stop is not None else threading.Event()

    def put(entry: tuple) -> bool:
        while not stop.is_set():
            try:
                slots.put(entry, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def pump() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    return
            put((_DONE, None))
        except BaseException as exc:  # handed to the consumer, raised there
            put((_DONE, exc))

    thread = threading.Thread(target=pump, name="settle-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            try:
                # Timed: Polars' SIGINT handler restarts a lock's untimed wait, so Ctrl-C would
                # wait for the next item (pola-rs/polars#21739; a paced feed's, seconds away).
                item, exc = slots.get(timeout=min(_POLL_S, wait_s()) if wait_s is not None else _POLL_S)
            except queue.Empty:
                if on_wait is not None:
                    on_wait()
                continue
            if item is _DONE:
                if exc is not None:
                    raise exc
                return
            yield item
    finally:
        stop.set()
        thread.join()


class CommitLane:
    """Runs commit jobs one at a time, in order, beside the caller (see module doc)."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="settle-commit")
        self._pending: Future | None = None
        self._on_done: Callable[[], None] | None = None
        self.failed = False  # a job raised: the lane's error is the run's (Engine.run)

    def submit(self, job: Callable[[], None], on_done: Callable[[], None] | None = None) -> None:
        """Wait for the previous job (raising its error), then start `job`. `on_done` runs in
        the caller's thread once `job` has ended, at the next submit or drain: after an
        error too (a job may commit part of its work before it fails), before it is raised."""
        self.drain()
        self._pending, self._on_done = self._pool.submit(job), on_done

    def busy(self) -> bool:
        """Whether the job last submitted is still running."""
        return self._pending is not None and not self._pending.done()

    def drain(self) -> None:
        """Wait for the job in flight; run its `on_done`; raise its error."""
        pending, on_done = self._pending, self._on_done
        self._pending = self._on_done = None
        if pending is not None:
            try:
                pending.result()
            except BaseException:
                self.failed = True
                if on_done is not None:
                    with contextlib.suppress(Exception):  # the job's error is the one raised
                        on_done()
                raise
            if on_done is not None:
                on_done()

    def __enter__(self) -> CommitLane:
        return self

    def __exit__(self, *exc_info: object) -> None:
        # On an error elsewhere the job in flight still finishes (never close a connection
        # under a running commit); its own error, if any, is secondary and not raised.
        try:
            if exc_info[0] is None:
                self.drain()
        finally:
            self._pool.shutdown(wait=True)
