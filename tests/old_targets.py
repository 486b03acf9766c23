"""TARGETs as older schema versions left them, made from a current one (for the tests of
their migration): the rows they held are derived from what the current layout holds."""

from __future__ import annotations

import pyarrow as pa

from settle_arrow import schema
from settle_arrow.storage import open_storage

KEY = ("trade_date", "securities_settle_date", "part_id", "sec_id")
# Both legs of every trade row, netted as clearing nets a window: the buy leg +signed
# quantity, the sell leg its negation.
LEGS = """
SELECT window_id, trade_date, securities_settle_date, buy_participant_id AS part_id, sec_id,
       sign * quantity AS n, sign * quantity AS b, 0 AS s FROM trade_facts
UNION ALL
SELECT window_id, trade_date, securities_settle_date, sell_participant_id, sec_id,
       -(sign * quantity), 0, sign * quantity FROM trade_facts
"""
SUMS = "CAST(SUM(n) AS BIGINT) AS net_quantity, CAST(SUM(b) AS BIGINT) AS buy_quantity, CAST(SUM(s) AS BIGINT) AS sell_quantity"
NONZERO = "HAVING SUM(n) <> 0 OR SUM(b) <> 0 OR SUM(s) <> 0"
# Each window's own obligations (the delta rows schema version 5 stored).
BY_WINDOW = f"SELECT window_id, {', '.join(KEY)}, {SUMS} FROM ({LEGS}) o GROUP BY window_id, {', '.join(KEY)} {NONZERO}"


# The securities obligations of schema version 5: one delta row per key and window.
V5_DELTA = pa.schema([
    ("market", pa.string()), ("trade_date", pa.date32()), ("securities_settle_date", pa.date32()),
    ("participant_id", pa.string()), ("security_id", pa.string()), ("net_quantity", pa.int64()),
    ("buy_quantity", pa.int64()), ("sell_quantity", pa.int64()), ("window_id", pa.int64()),
])
V5_VIEW = """
CREATE VIEW obligations_securities AS
SELECT market, trade_date, securities_settle_date, participant_id, security_id,
       CAST(SUM(net_quantity) AS BIGINT) AS net_quantity, CAST(SUM(buy_quantity) AS BIGINT) AS buy_quantity,
       CAST(SUM(sell_quantity) AS BIGINT) AS sell_quantity
FROM obligations_securities_delta
GROUP BY market, trade_date, securities_settle_date, participant_id, security_id
HAVING SUM(net_quantity) <> 0 OR SUM(buy_quantity) <> 0 OR SUM(sell_quantity) <> 0
"""


def as_version_5(db: str) -> None:
    """Rewrite a TARGET as schema version 5 left it: the delta rows each window wrote (from its
    trade rows, one row per key and window), no snapshot table, the old view."""
    w = open_storage(db)
    try:
        with w.transaction():
            w._create_table("obligations_securities_delta", V5_DELTA)
            w._execute(f"""
                INSERT INTO obligations_securities_delta
                SELECT s.market, o.trade_date, o.securities_settle_date, p.participant_id, s.security_id,
                       o.net_quantity, o.buy_quantity, o.sell_quantity, o.window_id
                FROM ({BY_WINDOW}) o JOIN dim_security s ON s.id = o.sec_id JOIN dim_participant p ON p.id = o.part_id""")
            w._execute("DROP VIEW obligations_securities")
            w._execute("DROP VIEW obligations_securities_ids")
            w._execute("DROP TABLE obligations_securities_snapshot")
            w._execute(V5_VIEW)
            w._execute("DELETE FROM meta WHERE key = ?", (schema.OBLIGATIONS_SNAPSHOT_KEY,))
            w._put_meta({"schema_version": "5"})
    finally:
        w.close()
