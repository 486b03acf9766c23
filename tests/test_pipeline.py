"""settle_arrow.pipeline: `prefetch` and `CommitLane`, the two threads a replay runs beside
its main one.

Pins down:
  prefetch    items in order; a producer's error raised in the consumer after the items made
              before it, and only then; a consumer that stops early (break, close, its own
              exception) neither hangs nor leaves the thread running, a producer waiting on the
              caller's stop event included; on_wait runs in the consumer's thread while it
              waits, its error raised there; the producer is never more than depth + 1 items
              ahead of the consumer.
  CommitLane  jobs run in submission order in one background thread, never two at once, and
              never a job before the previous one returned; on_done runs in the caller's
              thread, in order, at the next submit/drain, after a failed job too (it may have
              committed part of its work), before its error is raised at that submit/drain
              (the next job is not run; an error of that on_done is not the one raised); leaving the `with` normally drains (raising the error),
              leaving it on an exception waits for the job in flight and raises only the
              original exception; no thread outlives its `with`.

Every wait has a timeout, so a regression fails instead of hanging; sleeps are used only to
give a broken implementation the chance to run ahead.
"""

from __future__ import annotations

import itertools
import threading
import time

import pytest

from settle_arrow import pipeline
from settle_arrow.pipeline import CommitLane, prefetch

WAIT = 2.0  # seconds: a timeout that only a broken implementation reaches


class Boom(Exception):
    pass


def raiser(exc: BaseException):
    def job():
        raise exc
    return job


def within(fn, timeout=WAIT):
    """fn() run in a daemon thread: its result, or its exception raised here; a failure,
    not a hang, when it has not returned after `timeout` seconds."""
    out: dict = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as exc:
            out["error"] = exc

    t = threading.Thread(target=run, name="test-within", daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"{getattr(fn, '__name__', fn)} did not return within {timeout}s (hangs)"
    if "error" in out:
        raise out["error"]
    return out["value"]


def _alive(prefix: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(prefix) and t.is_alive()]


@pytest.fixture(autouse=True)
def no_leaked_threads():
    before = set(_alive("settle-"))
    yield
    assert set(_alive("settle-")) <= before, "a pipeline thread outlived its test"


# --- prefetch -------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [1, 2, 5])
@pytest.mark.parametrize("n", [0, 1, 3, 50])
def test_prefetch_preserves_order(n, depth):
    assert list(prefetch(iter(range(n)), depth=depth)) == list(range(n))


def test_prefetch_runs_producer_in_another_thread():
    threads = []

    def items():
        for i in range(3):
            threads.append(threading.current_thread())
            yield i

    assert list(prefetch(items())) == [0, 1, 2]
    assert threads and all(t is not threading.current_thread() for t in threads)


def test_prefetch_passes_none_and_falsy_items():
    items = [None, 0, "", (), False, None]
    assert list(prefetch(iter(items), depth=2)) == items


def test_prefetch_is_lazy():
    """Nothing runs (no thread, no item made) before the first item is asked for."""
    made = []

    def items():
        made.append(1)
        yield 1

    it = prefetch(items())
    time.sleep(0.05)
    assert made == [] and not _alive("settle-prefetch")
    assert list(it) == [1]


@pytest.mark.parametrize("depth", [1, 3])
def test_prefetch_error_raised_after_the_items_before_it(depth):
    err = Boom("bad window")

    def items():
        yield from range(4)
        raise err

    got = []
    it = prefetch(items(), depth=depth)
    with pytest.raises(Boom) as caught:
        for x in it:
            got.append(x)
    assert got == [0, 1, 2, 3]
    assert caught.value is err


def test_prefetch_error_at_first_item():
    def items():
        raise Boom("no input")
        yield  # pragma: no cover

    with pytest.raises(Boom, match="no input"):
        next(prefetch(items()))


def test_prefetch_error_not_raised_early():
    """The error comes after the consumer took every item before it, even when the producer
    has already hit it (it is queued, not raised ahead)."""
    failed = threading.Event()

    def items():
        yield 0
        yield 1
        failed.set()
        raise Boom

    it = prefetch(items(), depth=3)
    assert next(it) == 0
    assert failed.wait(WAIT)  # the producer has failed already ...
    assert next(it) == 1      # ... the consumer still gets the item made before it
    with pytest.raises(Boom):
        next(it)
    with pytest.raises(StopIteration):
        next(it)


def test_prefetch_base_exception_handed_over():
    def items():
        yield 1
        raise KeyboardInterrupt

    it = prefetch(items())
    assert next(it) == 1
    with pytest.raises(KeyboardInterrupt):
        next(it)


@pytest.mark.parametrize("depth", [1, 2, 4])
def test_prefetch_producer_at_most_depth_plus_one_ahead(depth):
    """With the consumer holding item 0, the producer makes depth + 1 more items (depth
    queued, one in hand) and then waits; it keeps that bound while the consumer goes on."""
    made = 0
    taken = 0
    lock = threading.Lock()
    reached = threading.Event()

    def items():
        nonlocal made
        for i in range(30):
            with lock:
                made += 1
            if made == depth + 2:
                reached.set()
            yield i

    it = prefetch(items(), depth=depth)
    try:
        assert next(it) == 0
        assert reached.wait(WAIT)
        time.sleep(0.2)  # room for a producer that does not stop to run ahead
        with lock:
            assert made == depth + 2, f"producer is {made - 1} items ahead, depth {depth}"
        got = [0]
        for x in it:
            got.append(x)
            with lock:
                taken += 1  # items received after item 0; the consumer now holds item `taken`
                assert made - taken <= depth + 2, f"producer is {made - 1 - taken} items ahead, depth {depth}"
        assert got == list(range(30))
    finally:
        it.close()


@pytest.mark.parametrize("depth", [1, 3])
def test_prefetch_break_does_not_hang(depth):
    """An endless producer, blocked on a full queue: breaking out ends its thread."""
    def consume():
        got = []
        for x in prefetch(itertools.count(), depth=depth):
            got.append(x)
            if x == 5:
                break
        return got

    assert within(consume) == list(range(6))
    assert not _alive("settle-prefetch")


def test_prefetch_close_stops_producer():
    made = []

    def items():
        for i in itertools.count():
            made.append(i)
            yield i

    it = prefetch(items(), depth=2)
    assert next(it) == 0
    within(it.close)
    assert not _alive("settle-prefetch")
    n = len(made)
    time.sleep(0.1)
    assert len(made) == n <= 1 + 2 + 1  # nothing made after close, never more than depth + 1 ahead


def test_prefetch_stop_ends_a_producer_waiting_on_it():
    """A producer that waits on the caller's stop event (a paced feed waiting for its next
    rows' arrival) ends as soon as the consumer leaves, not when its wait would have."""
    stop = threading.Event()

    def items():
        yield 0
        stop.wait(60)
        yield 1

    it = prefetch(items(), stop=stop)
    assert next(it) == 0
    within(it.close)  # joins the producer's thread: only a stop event it waits on ends it early
    assert stop.is_set() and not _alive("settle-prefetch")


def test_prefetch_on_wait_runs_in_the_consumer_while_it_waits():
    """on_wait runs in the consumer's thread while no item is ready (never when one is),
    and its error is the consumer's."""
    waits: list[threading.Thread] = []
    ready = threading.Event()

    def items():
        yield 0
        ready.wait(WAIT)  # item 1 comes once the consumer has waited a while
        yield 1

    def on_wait() -> None:
        waits.append(threading.current_thread())
        if len(waits) == 3:
            ready.set()

    assert within(lambda: list(prefetch(items(), on_wait=on_wait))) == [0, 1]
    assert len(waits) >= 3 and all(t is waits[0] and t.name != "settle-prefetch" for t in waits)

    def fails() -> None:
        raise Boom("idle work")

    stop = threading.Event()

    def waiting():
        stop.wait(60)
        yield 1

    with pytest.raises(Boom):
        within(lambda: list(prefetch(waiting(), stop=stop, on_wait=fails)))
    assert not _alive("settle-prefetch")


def test_prefetch_on_wait_runs_as_often_as_wait_s_asks(monkeypatch):
    """wait_s, asked before each wait, sets how long the consumer waits before on_wait runs
    (the engine asks for 1 ms while windows wait for its commit lane); never longer than
    the poll: the consumer still sees Ctrl-C and a gone producer as before."""
    monkeypatch.setattr(pipeline, "_POLL_S", 5.0)  # a wait of the default poll would outlast the test
    waits: list[float] = []
    ready = threading.Event()

    def items():
        yield 0
        ready.wait(WAIT)
        yield 1

    def on_wait() -> None:
        waits.append(time.perf_counter())
        if len(waits) == 10:
            ready.set()

    started = time.perf_counter()
    assert within(lambda: list(prefetch(items(), on_wait=on_wait, wait_s=lambda: 0.001))) == [0, 1]
    # Ten waits of 1 ms, where the poll's would have taken 50 s.
    assert len(waits) >= 10 and time.perf_counter() - started < 2.5


def test_prefetch_consumer_exception_does_not_hang():
    def consume():
        for x in prefetch(itertools.count(), depth=2):
            if x == 3:
                raise Boom

    with pytest.raises(Boom):
        within(consume)
    assert not _alive("settle-prefetch")


def test_prefetch_consumer_exception_wins_over_producer_error():
    """The consumer's own exception is the one raised, even if the producer failed too."""
    failed = threading.Event()

    def items():
        yield 1
        failed.set()
        raise Boom("producer")

    def consume():
        for _ in prefetch(items(), depth=2):
            assert failed.wait(WAIT)
            raise ValueError("consumer")

    with pytest.raises(ValueError, match="consumer"):
        within(consume)
    assert not _alive("settle-prefetch")


# --- CommitLane -----------------------------------------------------------------------


class Recorder:
    """Jobs that log start/end and check that no two of them ever overlap."""

    def __init__(self):
        self.log: list[tuple] = []
        self.lock = threading.Lock()
        self.running = 0
        self.overlap = False
        self.threads: set[threading.Thread] = set()

    def job(self, name, work=None):
        def run():
            with self.lock:
                self.running += 1
                self.overlap |= self.running > 1
                self.log.append(("start", name))
                self.threads.add(threading.current_thread())
            try:
                if work:
                    work()
            finally:
                with self.lock:
                    self.log.append(("end", name))
                    self.running -= 1
        return run

    def done(self, name):
        def on_done():
            self.log.append(("done", name, threading.current_thread()))
        return on_done


def test_lane_jobs_in_order_one_at_a_time():
    r = Recorder()
    with CommitLane() as lane:
        for i in range(20):
            lane.submit(r.job(i, lambda: time.sleep(0.002)))
    assert not r.overlap
    assert r.log == [e for i in range(20) for e in (("start", i), ("end", i))]
    assert len(r.threads) == 1 and threading.current_thread() not in r.threads
    assert not _alive("settle-commit")


def test_lane_next_job_waits_for_previous():
    """submit() does not start job 2 while job 1 runs: it blocks until job 1 returned."""
    r = Recorder()
    started, release = threading.Event(), threading.Event()

    def slow():
        started.set()
        assert release.wait(WAIT)

    with CommitLane() as lane:
        lane.submit(r.job(1, slow))
        assert started.wait(WAIT)
        second = threading.Thread(target=lane.submit, args=(r.job(2),))
        second.start()
        time.sleep(0.05)
        assert ("start", 2) not in r.log  # still waiting for job 1
        release.set()
        second.join(WAIT)
        assert not second.is_alive()
    assert r.log == [("start", 1), ("end", 1), ("start", 2), ("end", 2)]
    assert not r.overlap


def test_lane_submit_returns_while_job_runs():
    """The caller goes on beside the job (that is the point of the lane)."""
    release = threading.Event()
    with CommitLane() as lane:
        lane.submit(lambda: release.wait(WAIT))
        assert not release.is_set()  # submit returned although the job is still waiting
        release.set()


def test_lane_on_done_in_caller_thread_in_order():
    r = Recorder()
    me = threading.current_thread()
    finished = threading.Event()
    with CommitLane() as lane:
        lane.submit(r.job(1, finished.set), r.done(1))
        assert finished.wait(WAIT)
        time.sleep(0.02)
        assert not [e for e in r.log if e[0] == "done"]  # job 1 is over, but on_done waits for the caller
        lane.submit(r.job(2), r.done(2))
        assert ("done", 1, me) in r.log and ("done", 2, me) not in r.log
        lane.submit(r.job(3))  # no on_done
        lane.submit(r.job(4), r.done(4))
        lane.drain()
        assert r.log[-1] == ("done", 4, me)
        lane.drain()  # nothing in flight: a no-op
    dones = [e for e in r.log if e[0] == "done"]
    assert dones == [("done", 1, me), ("done", 2, me), ("done", 4, me)]
    # Each on_done after its own job ended.
    for name in (1, 2, 4):
        assert r.log.index(("end", name)) < r.log.index(("done", name, me))


def test_lane_on_done_at_exit():
    r = Recorder()
    me = threading.current_thread()
    with CommitLane() as lane:
        lane.submit(r.job(1), r.done(1))
    assert r.log[-1] == ("done", 1, me)


def test_lane_error_raised_at_next_submit():
    r = Recorder()
    err = Boom("commit failed")
    with CommitLane() as lane:
        lane.submit(r.job(1, raiser(err)), r.done(1))
        with pytest.raises(Boom) as caught:
            lane.submit(r.job(2), r.done(2))
        assert caught.value is err
        assert ("start", 2) not in r.log  # the next job did not start
        assert [e[:2] for e in r.log if e[0] == "done"] == [("done", 1)]  # the failed job's on_done ran
        # The error is raised once; the lane can go on.
        lane.submit(r.job(3), r.done(3))
    assert [e[:2] for e in r.log] == [("start", 1), ("end", 1), ("done", 1), ("start", 3), ("end", 3), ("done", 3)]


def test_lane_failed_job_raises_its_error_not_its_on_done_s():
    with CommitLane() as lane:
        lane.submit(raiser(Boom("the job's")), raiser(RuntimeError("the callback's")))
        with pytest.raises(Boom, match="the job's"):
            lane.drain()
        assert lane.failed


def test_lane_error_raised_at_drain():
    with CommitLane() as lane:
        lane.submit(lambda: None, raiser(Boom("a caller's callback")))
        with pytest.raises(Boom, match="callback"):
            lane.drain()
        assert not lane.failed, "the job itself succeeded"
        lane.submit(raiser(Boom("at drain")))
        with pytest.raises(Boom, match="at drain"):
            lane.drain()
        assert lane.failed  # the engine commits nothing more after it (Engine.run)
        lane.drain()  # raised once


def test_lane_error_raised_at_normal_exit():
    ran = []
    with pytest.raises(Boom, match="last job"):
        with CommitLane() as lane:
            lane.submit(raiser(Boom("last job")), lambda: ran.append(1))
    assert ran == [1]  # before the error was raised
    assert not _alive("settle-commit")


def test_lane_exit_on_exception_waits_for_job_in_flight():
    started, release = threading.Event(), threading.Event()
    finished = []
    done = []

    def job():
        started.set()
        assert release.wait(WAIT)
        time.sleep(0.02)
        finished.append(time.perf_counter())

    timer = threading.Timer(0.1, release.set)
    with pytest.raises(RuntimeError, match="window failed"):
        with CommitLane() as lane:
            lane.submit(job, lambda: done.append(1))
            assert started.wait(WAIT)
            timer.start()
            raise RuntimeError("window failed")
    left = time.perf_counter()
    timer.join()
    assert finished and finished[0] <= left  # the job ended before the `with` was left
    assert done == []  # on_done is not run on the way out after an error
    assert not _alive("settle-commit")


def test_lane_exit_on_exception_hides_job_error():
    """On the way out after an error the job's own error is secondary: not raised."""
    started, release = threading.Event(), threading.Event()

    def job():
        started.set()
        assert release.wait(WAIT)
        raise Boom("secondary")

    timer = threading.Timer(0.05, release.set)
    with pytest.raises(RuntimeError, match="primary"):
        with CommitLane() as lane:
            lane.submit(job)
            assert started.wait(WAIT)
            timer.start()
            raise RuntimeError("primary")
    timer.join()
    assert not _alive("settle-commit")


def test_lane_with_nothing_submitted():
    with CommitLane() as lane:
        lane.drain()
    assert not _alive("settle-commit")
