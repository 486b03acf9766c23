"""settle_arrow: Arrow-native securities clearing, registration and settlement.

Library API (the CLI is a thin layer over these):
  replay(paths, refdata, target, window_rows=100_000, batch=False) -> ReplayReport
  open_target(target) -> Target   (tables as Polars frames, status, export)
  generate_market(out_dir, MarketSpec(...)) -> GenerateSummary
"""

from settle_arrow.engine import ReplayReport, replay
from settle_arrow.errors import SelfCheckError, UserError
from settle_arrow.target import Target, open_target

__all__ = ["ReplayReport", "SelfCheckError", "Target", "UserError", "open_target", "replay"]
