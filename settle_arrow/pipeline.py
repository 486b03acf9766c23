"""Overlap of a window's three phases on two cores: read the next window, process this one,
commit the previous one.

Data model:
  Prefetch(items)  an iterator run ahead in a background thread (input decoding and the
                   stages' stateless work); prefetch(items) the same as a lazy generator;
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

import collections
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Generic, TypeVar

T = TypeVar("T")
_DONE = object()
_POLL_S = 0.05  # how often a blocked producer checks whether its consumer has gone, and a consumer for Ctrl-C


class Prefetch(Generic[T]):
    """`items` produced ahead in a background thread from `with` on: up to `depth` items
    ahead of the consumer, or `depth_first` until the consumer takes its first one (a
    caller with other work before it consumes, such as building its state, lets the
    producer fill an otherwise idle core meanwhile). `stop` (made here when not given) is
    set once the consumer has gone: a producer that waits for something other than this
    buffer (a paced feed) waits on it, so leaving the `with`, which joins the thread, never
    waits out the producer's wait. Iterating yields the items; a producer's error is raised
    to the consumer after the items made before it. `on_wait` runs in the consumer's thread
    every _POLL_S it waits for an item; its error is raised to the consumer."""

    def __init__(self, items: Iterator[T], depth: int = 1, stop: threading.Event | None = None,
                 on_wait: Callable[[], None] | None = None, depth_first: int | None = None):
        assert depth >= 1 and (depth_first is None or depth_first >= 1)
        self._items, self._on_wait = items, on_wait
        self._depth, self._depth_first = depth, depth_first or depth
        self._stop = stop if stop is not None else threading.Event()
        self._buffer: collections.deque[tuple] = collections.deque()
        self._changed = threading.Condition()
        self._taken = False  # whether the consumer took an item: `depth` bounds from then on
        self._thread = threading.Thread(target=self._pump, name="settle-prefetch", daemon=True)

    def __enter__(self) -> Prefetch[T]:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def _put(self, entry: tuple) -> bool:
        with self._changed:
            while len(self._buffer) >= (self._depth if self._taken else self._depth_first):
                if self._stop.is_set():
                    return False
                self._changed.wait(_POLL_S)  # timed: the stop event does not notify
            if self._stop.is_set():
                return False
            self._buffer.append(entry)
            self._changed.notify_all()
        return True

    def _pump(self) -> None:
        try:
            for item in self._items:
                if not self._put((item, None)):
                    return
            self._put((_DONE, None))
        except BaseException as exc:  # handed to the consumer, raised there
            self._put((_DONE, exc))

    def __iter__(self) -> Iterator[T]:
        assert self._thread.is_alive() or self._thread.ident is not None, "iterated inside its `with`"
        while True:
            with self._changed:
                # Timed: Polars' SIGINT handler restarts a lock's untimed wait, so Ctrl-C
                # would wait for the next item (pola-rs/polars#21739; a paced feed's,
                # seconds away).
                if not self._buffer:
                    self._changed.wait(_POLL_S)
                entry = self._buffer.popleft() if self._buffer else None
                if entry is not None:
                    self._taken = True
                    self._changed.notify_all()
            if entry is None:
                if self._on_wait is not None:
                    self._on_wait()
                continue
            item, exc = entry
            if item is _DONE:
                if exc is not None:
                    raise exc
                return
            yield item


def prefetch(items: Iterator[T], depth: int = 1, stop: threading.Event | None = None,
             on_wait: Callable[[], None] | None = None) -> Iterator[T]:
    """Prefetch's items, its thread started at the first item asked for and joined when the
    consumer has gone (finished, closed, or its own exception)."""
    with Prefetch(items, depth, stop, on_wait) as ahead:
        yield from ahead


class CommitLane:
    """Runs commit jobs one at a time, in order, beside the caller (see module doc)."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="settle-commit")
        self._pending: Future | None = None
        self._on_done: Callable[[], None] | None = None

    def submit(self, job: Callable[[], None], on_done: Callable[[], None] | None = None) -> None:
        """Wait for the previous job (raising its error), then start `job`. `on_done` runs in
        the caller's thread once `job` has returned, at the next submit or drain."""
        self.drain()
        self._pending, self._on_done = self._pool.submit(job), on_done

    def busy(self) -> bool:
        """Whether the job last submitted is still running."""
        return self._pending is not None and not self._pending.done()

    def drain(self) -> None:
        """Wait for the job in flight; raise its error; run its `on_done`."""
        pending, on_done = self._pending, self._on_done
        self._pending = self._on_done = None
        if pending is not None:
            pending.result()
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
