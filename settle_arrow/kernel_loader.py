"""Loads the compiled kernels (kernels.py) in a background thread, once per process.

Data model: one flag (started or not). Importing numba and loading each kernel's cached
machine code for every argument type it is called with takes ~0.8 s, mostly in Python; the
start of a replay (reference data, recovery) is mostly Polars, Arrow and DuckDB work that
releases the GIL, so the load overlaps it instead of delaying a restart's first window.
Kept apart from kernels.py so that asking for the load imports no numba.
"""

from __future__ import annotations

import threading

_started = threading.Event()


def load_in_background() -> None:
    """Start loading the kernels (idempotent); a first use before the load ends waits on
    Python's import lock, then on numba's dispatcher: never an error, only a wait."""
    if _started.is_set():
        return
    _started.set()
    threading.Thread(target=_load, name="settle-arrow-kernels", daemon=True).start()


def _load() -> None:
    from settle_arrow import kernels

    kernels.warm()
