"""settle_arrow: Arrow-native securities clearing, registration and settlement.

Library API (the CLI is a thin layer over these):
  replay(paths, refdata, target, window_rows=100_000, batch=False) -> ReplayReport
  open_target(target) -> Target   (tables as Polars frames, status, export, digest)
  copy_target(src, dst) -> rows per table   (DuckDB <-> PostgreSQL, one transaction)
  generate_market(out_dir, MarketSpec(...)) -> GenerateSummary
"""

import os

# Polars sizes its thread pool once, when it is first imported. The engine already keeps
# both cores busy with its own threads (reading, processing, committing: pipeline.py), and
# a second pool of Polars workers on the same cores mostly adds synchronisation on
# windows' small frames (measured, 5 M trades, two pairs each: 10,000-row windows +8% and
# +13% trades/s with 10% less CPU; 100,000-row windows and --batch within noise; restart
# 0.3 s slower). So a process that imports settle_arrow before Polars gets a one-thread
# pool, unless POLARS_MAX_THREADS says otherwise; one that imported Polars first keeps its own.
os.environ.setdefault("POLARS_MAX_THREADS", "1")

from settle_arrow.engine import ReplayReport, replay
from settle_arrow.errors import SelfCheckError, StorageError, UserError
from settle_arrow.target import Target, copy_target, open_target

__all__ = [
    "ReplayReport", "SelfCheckError", "StorageError", "Target", "UserError", "copy_target", "open_target", "replay",
]
