"""NumPy's transparent huge pages, turned off while a replay starts.

Data model: one process-wide switch of NumPy's (it asks the kernel for huge pages,
madvise(MADV_HUGEPAGE), for each array of 4 MB or more), and `_users`: how many
`small_pages()` blocks are open. Invariant: the switch is off while any block is open and
back as it was found once the last one closes, whatever the threads' interleaving.

Why: a start-up allocates hundreds of fresh arrays of 40-240 MB for a moment each (the
opening's keys, sorts and gathers, the holdings table); where the kernel compacts memory
to serve a huge-page fault (THP defrag "madvise", as on the machines this was measured
on), those faults cost more system time than ordinary pages' twice as many do. Measured
(AMD EPYC, Linux THP enabled=madvise, defrag=madvise; 10 M holdings, 5 M trades), the
switch off for start-up: a fresh TARGET's start-up 4.34 -> 3.89 s of wall, 2.65 -> 1.95 s
of system CPU (six alternating pairs), lower in each of seven replay pairs (3.2-4.1
against 4.1-6.0 s); whole replays faster in three of four pairs at 100,000-row windows,
two of three at 10,000. Off for a whole replay instead: no better at 10,000-row windows'
steady rate, and peak RSS ~0.1 GB higher; so the switch is restored before the first
window (start-up's peak RSS rose ~0.06 GB; a long replay's peak comes later, with the
switch back).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import numpy as np

_lock = threading.Lock()
_users = 0
_before: bool | None = None


def _setter():  # noqa: ANN202 (a NumPy internal: None where this NumPy has none)
    return getattr(getattr(getattr(np, "_core", None), "multiarray", None), "_set_madvise_hugepage", None)


@contextlib.contextmanager
def small_pages() -> Iterator[None]:
    """NumPy's arrays without huge pages inside the block (a no-op where NumPy cannot)."""
    global _users, _before
    setter = _setter()
    if setter is None:
        yield
        return
    with _lock:
        if _users == 0:
            _before = bool(setter(False))
        _users += 1
    try:
        yield
    finally:
        with _lock:
            _users -= 1
            if _users == 0:
                setter(_before)
