"""settle_arrow: Arrow-native securities clearing, registration and settlement.

Library API (the CLI is a thin layer over these):
  replay(paths, refdata, target, window_rows=100_000, batch=False) -> ReplayReport
      (on_window / on_commit callbacks: progress, and a WindowTiming per committed window)
  open_target(target) -> Target   (tables as Polars frames, status, export, digest)
  copy_target(src, dst) -> rows per table   (DuckDB <-> PostgreSQL, one transaction)
  generate_market(out_dir, MarketSpec(...)) -> GenerateSummary
"""

from settle_arrow.engine import ReplayReport, WindowTiming, replay
from settle_arrow.errors import SelfCheckError, StorageError, UserError
from settle_arrow.target import Target, copy_target, open_target

__all__ = [
    "ReplayReport", "SelfCheckError", "StorageError", "Target", "UserError", "WindowTiming", "copy_target", "open_target",
    "replay",
]
