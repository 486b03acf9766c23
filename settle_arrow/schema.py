"""Arrow schemas of every table settle_arrow reads or writes: the single source of truth.

Data model owned here (table name -> pa.Schema):
  * INPUT_TRADE: one matched trade per row, both sides on the row (SPEC §1).
  * REFDATA[name]: the reference tables of SPEC §2 (+ §9 cash_movements).
  * OUTPUT[name]: the logical output tables of SPEC §6, columns in export order.
  * KEYS[name]: key columns of each output table; exports sort by them, ascending.

Invariants:
  * money is decimal128 with scale 2 (fen) in every output; never a float anywhere.
  * quarantine keeps every original input column as text, so any bad value survives.
  * storage backends derive their DDL from these schemas; nothing else declares columns.
"""

from __future__ import annotations

import pyarrow as pa

# 4: holdings_base (the opening is no snapshot copy); 5: sources.sha256; 6: securities
# obligations read from the trade rows since a folded snapshot (no per-window delta rows).
SCHEMA_VERSION = 6
# Statements that bring a TARGET of an older schema version to the next, run in order in
# one transaction by ensure_schema, after it created the tables of STORAGE the TARGET lacks
# and before it remakes every view of sql/views.sql; versions without an entry are refused.
MIGRATIONS = {
    4: ("ALTER TABLE sources ADD COLUMN sha256 VARCHAR",),
    # The deltas of every committed window, folded into the snapshot as of the last one:
    # the trade rows after it are what the view adds.
    5: (
        "DROP VIEW IF EXISTS obligations_securities",
        "INSERT INTO obligations_securities_snapshot "
        "SELECT d.trade_date, d.securities_settle_date, p.id, s.id, CAST(SUM(d.net_quantity) AS BIGINT), "
        "CAST(SUM(d.buy_quantity) AS BIGINT), CAST(SUM(d.sell_quantity) AS BIGINT), "
        "(SELECT MAX(window_id) FROM checkpoints) "
        "FROM obligations_securities_delta d "
        "JOIN dim_security s ON s.market = d.market AND s.security_id = d.security_id "
        "JOIN dim_participant p ON p.participant_id = d.participant_id "
        "GROUP BY d.trade_date, d.securities_settle_date, p.id, s.id "
        "HAVING SUM(d.net_quantity) <> 0 OR SUM(d.buy_quantity) <> 0 OR SUM(d.sell_quantity) <> 0",
        "DELETE FROM meta WHERE key = 'obligations_snapshot_window'",
        "INSERT INTO meta (key, value) SELECT 'obligations_snapshot_window', "
        "CAST(COALESCE(MAX(window_id), -1) AS VARCHAR) FROM checkpoints",
        "DROP TABLE obligations_securities_delta",
    ),
}

PRICE = pa.decimal128(12, 3)
MONEY = pa.decimal128(18, 2)
RATE = pa.decimal128(12, 8)
PER_SHARE = pa.decimal128(18, 6)

MARKETS = ("XSHG", "XSHE")
# Dense market codes (the 2-bit market field of packed trade keys, see state.trade_keys).
MARKET_CODES = {m: i for i, m in enumerate(MARKETS)}
RECORD_TYPES = ("N", "X")
SECURITY_TYPES = ("A_SHARE", "STAR", "FUND", "ETF", "BOND")
FEE_CODES = ("STAMP_DUTY", "HANDLING", "MANAGEMENT", "TRANSFER")
# Output column per fee code (SPEC §4 names them this way in obligations_cash).
FEE_COLUMNS = {
    "STAMP_DUTY": "stamp_duty",
    "HANDLING": "handling_fee",
    "MANAGEMENT": "management_fee",
    "TRANSFER": "transfer_fee",
}

QUARANTINE_REASONS = (
    "SCHEMA",
    "BAD_QUANTITY",
    "BAD_PRICE",
    "UNKNOWN_SECURITY",
    "UNKNOWN_UNIT",
    "UNKNOWN_ACCOUNT",
    "NOT_BUSINESS_DAY",
    "DUPLICATE_TRADE",
    "UNKNOWN_REF",
    "REF_MISMATCH",
    "ALREADY_CANCELLED",
)

INPUT_TRADE = pa.schema(
    [
        ("trade_id", pa.int64()),
        ("market", pa.string()),
        ("trade_date", pa.date32()),
        ("trade_time", pa.time64("us")),
        ("security_id", pa.string()),
        ("price", PRICE),
        ("quantity", pa.int64()),
        ("buy_account", pa.string()),
        ("sell_account", pa.string()),
        ("buy_unit", pa.string()),
        ("sell_unit", pa.string()),
        ("record_type", pa.string()),
        ("ref_trade_id", pa.int64()),
    ]
)
# ref_trade_id is nullable for N rows; every other input column is required.
INPUT_REQUIRED = tuple(n for n in INPUT_TRADE.names if n != "ref_trade_id")

REFDATA = {
    "securities": pa.schema(
        [
            ("market", pa.string()),
            ("security_id", pa.string()),
            ("name", pa.string()),
            ("security_type", pa.string()),
            ("currency", pa.string()),
            ("board_lot", pa.int64()),
            ("securities_cycle", pa.int32()),
            ("cash_cycle", pa.int32()),
        ]
    ),
    "participants": pa.schema(
        [
            ("participant_id", pa.string()),
            ("name", pa.string()),
            ("reserve_balance", MONEY),
        ]
    ),
    "trading_units": pa.schema([("unit_id", pa.string()), ("participant_id", pa.string())]),
    "accounts": pa.schema(
        [
            ("account_id", pa.string()),
            ("holder_type", pa.string()),
            ("participant_id", pa.string()),
        ]
    ),
    "holdings": pa.schema(
        [
            ("account_id", pa.string()),
            ("market", pa.string()),
            ("security_id", pa.string()),
            ("quantity", pa.int64()),
        ]
    ),
    "calendar": pa.schema([("market", pa.string()), ("business_date", pa.date32())]),
    "fees": pa.schema(
        [
            ("fee_code", pa.string()),
            ("market", pa.string()),
            ("security_type", pa.string()),
            ("side", pa.string()),
            ("rate", RATE),
            ("effective_from", pa.date32()),
            ("effective_to", pa.date32()),
        ]
    ),
    "corporate_actions": pa.schema(
        [
            ("ca_id", pa.string()),
            ("market", pa.string()),
            ("security_id", pa.string()),
            ("ca_type", pa.string()),
            ("record_date", pa.date32()),
            ("ex_date", pa.date32()),
            ("pay_date", pa.date32()),
            ("cash_per_share", PER_SHARE),
            ("shares_per_share", PER_SHARE),
        ]
    ),
    "cash_movements": pa.schema(
        [
            ("participant_id", pa.string()),
            ("value_date", pa.date32()),
            ("amount", MONEY),
        ]
    ),
}
# Tables a replay cannot run without; the rest are optional (empty when absent).
REFDATA_REQUIRED = ("securities", "participants", "trading_units", "accounts", "calendar", "fees")
# Columns that may be null in a reference table; every other column must be filled.
REFDATA_NULLABLE = {
    "fees": ("effective_to",),
    "corporate_actions": ("cash_per_share", "shares_per_share"),
    "securities": ("name",),
    "participants": ("name",),
}

_SIDE_FEES = [
    (f"{side}_{col}", MONEY) for side in ("buy", "sell") for col in FEE_COLUMNS.values()
]

OUTPUT = {
    "trades": pa.schema(
        [
            ("market", pa.string()),
            ("trade_date", pa.date32()),
            ("trade_id", pa.int64()),
            ("record_type", pa.string()),
            ("ref_trade_id", pa.int64()),
            ("trade_time", pa.time64("us")),
            ("security_id", pa.string()),
            ("security_type", pa.string()),
            ("price", PRICE),
            ("quantity", pa.int64()),
            ("buy_account", pa.string()),
            ("sell_account", pa.string()),
            ("buy_unit", pa.string()),
            ("sell_unit", pa.string()),
            ("buy_participant", pa.string()),
            ("sell_participant", pa.string()),
            # Signed as cleared: an X row carries the negated amount and fees of its trade.
            ("amount", MONEY),
            *_SIDE_FEES,
            ("securities_settle_date", pa.date32()),
            ("cash_settle_date", pa.date32()),
            ("source", pa.string()),
            ("source_row", pa.int64()),
        ]
    ),
    "quarantine": pa.schema(
        [(name, pa.string()) for name in INPUT_TRADE.names]
        + [
            ("reason", pa.string()),
            ("detail", pa.string()),
            ("source", pa.string()),
            ("source_row", pa.int64()),
        ]
    ),
    "obligations_securities": pa.schema(
        [
            ("market", pa.string()),
            ("trade_date", pa.date32()),
            ("securities_settle_date", pa.date32()),
            ("participant_id", pa.string()),
            ("security_id", pa.string()),
            ("net_quantity", pa.int64()),
            ("buy_quantity", pa.int64()),
            ("sell_quantity", pa.int64()),
        ]
    ),
    "obligations_cash": pa.schema(
        [
            ("market", pa.string()),
            ("trade_date", pa.date32()),
            ("cash_settle_date", pa.date32()),
            ("participant_id", pa.string()),
            ("currency", pa.string()),
            ("net_amount", MONEY),
            ("buy_amount", MONEY),
            ("sell_amount", MONEY),
            *[(col, MONEY) for col in FEE_COLUMNS.values()],
        ]
    ),
    "holdings": pa.schema(
        [
            ("account_id", pa.string()),
            ("market", pa.string()),
            ("security_id", pa.string()),
            ("quantity", pa.int64()),
        ]
    ),
    "exceptions": pa.schema(
        [
            ("code", pa.string()),
            ("market", pa.string()),
            ("security_id", pa.string()),
            ("account_id", pa.string()),
            ("participant_id", pa.string()),
            ("trade_date", pa.date32()),
            ("detail", pa.string()),
        ]
    ),
    "checkpoints": pa.schema(
        [
            ("window_id", pa.int64()),
            ("source", pa.string()),
            ("offset", pa.int64()),
            ("rows", pa.int64()),
            ("committed_at", pa.timestamp("us", tz="UTC")),
            ("digest", pa.string()),
        ]
    ),
}

KEYS = {
    "trades": ("market", "trade_date", "trade_id"),
    "quarantine": ("source", "source_row"),
    "obligations_securities": (
        "market",
        "trade_date",
        "securities_settle_date",
        "participant_id",
        "security_id",
    ),
    "obligations_cash": ("market", "trade_date", "cash_settle_date", "participant_id", "currency"),
    "holdings": ("account_id", "market", "security_id"),
    "exceptions": ("code", "market", "security_id", "account_id", "trade_date"),
    "checkpoints": ("window_id",),
}


def empty(schema: pa.Schema) -> pa.Table:
    """A zero-row table of `schema`: the typed answer for 'nothing here'."""
    return schema.empty_table()


def _with_window(s: pa.Schema) -> pa.Schema:
    return s.append(pa.field("window_id", pa.int64()))


# Physical tables of a TARGET. Cash obligations are stored as append-only per-window deltas;
# holdings and securities obligations as a periodic snapshot plus the legs of the trades
# committed after it (a window writes nothing for them but its trade rows); all are read
# through the views in sql/views.sql. `window_id` ties every appended row to the
# window that wrote it (for holdings_snapshot: the window the snapshot is as of).
# Trade detail is the bulk of what a window writes: it is stored with every string key
# dictionary-encoded to an integer id (dim_* tables, append-only, ids never reused), which
# cuts a window's write ~4x (measured); the `trades` view joins the strings back.
_FEE_FIELDS = [(f"{side}_{col}", MONEY) for side in ("buy", "sell") for col in FEE_COLUMNS.values()]
HOLDINGS_IDS = pa.schema([("acct_id", pa.int32()), ("sec_id", pa.int32()), ("quantity", pa.int64())])
# Securities obligations by dimension ids (part_id -> dim_participant.id, sec_id ->
# dim_security.id): the snapshot's rows, and what the engine folds into it (obligations.py).
OBLIGATIONS_IDS = pa.schema(
    [
        ("trade_date", pa.date32()),
        ("securities_settle_date", pa.date32()),
        ("part_id", pa.int32()),
        ("sec_id", pa.int32()),
        ("net_quantity", pa.int64()),
        ("buy_quantity", pa.int64()),
        ("sell_quantity", pa.int64()),
    ]
)
STORAGE = {
    "trade_facts": pa.schema(
        [
            ("trade_date", pa.date32()),
            ("trade_id", pa.int64()),
            ("sign", pa.int8()),  # +1 N, -1 X
            ("ref_trade_id", pa.int64()),
            ("trade_time", pa.time64("us")),
            ("sec_id", pa.int32()),
            ("price", PRICE),
            ("quantity", pa.int64()),
            ("buy_account_id", pa.int32()),
            ("sell_account_id", pa.int32()),
            ("buy_unit_id", pa.int32()),
            ("sell_unit_id", pa.int32()),
            ("buy_participant_id", pa.int32()),
            ("sell_participant_id", pa.int32()),
            ("amount", MONEY),
            *_FEE_FIELDS,
            ("securities_settle_date", pa.date32()),
            ("cash_settle_date", pa.date32()),
            ("source_id", pa.int32()),
            ("source_row", pa.int64()),
            ("window_id", pa.int64()),
        ]
    ),
    "dim_account": pa.schema([("id", pa.int32()), ("account_id", pa.string())]),
    "dim_unit": pa.schema([("id", pa.int32()), ("unit_id", pa.string())]),
    "dim_participant": pa.schema([("id", pa.int32()), ("participant_id", pa.string())]),
    "dim_security": pa.schema(
        [
            ("id", pa.int32()),
            ("market", pa.string()),
            ("security_id", pa.string()),
            ("security_type", pa.string()),
            ("currency", pa.string()),
        ]
    ),
    "dim_source": pa.schema([("id", pa.int32()), ("source", pa.string())]),
    "quarantine": _with_window(OUTPUT["quarantine"]),
    "exceptions": _with_window(OUTPUT["exceptions"]),
    "obligations_cash_delta": _with_window(OUTPUT["obligations_cash"]),
    # Holdings state keyed by dimension ids (acct_id -> dim_account.id, sec_id ->
    # dim_security.id): recovery, snapshots and the conservation check never touch strings.
    "holdings_snapshot": _with_window(HOLDINGS_IDS),
    # Securities obligations folded as of window_id (meta OBLIGATIONS_SNAPSHOT_KEY); the
    # view adds both legs of every trade row of a later window. Where a window wrote ~0.2 delta
    # rows a trade, the database's log grew by them and its checkpoint paused a commit
    # (0.7 s every ~3 M trades, measured).
    "obligations_securities_snapshot": _with_window(OBLIGATIONS_IDS),
    "opening_holdings": HOLDINGS_IDS,
    "checkpoints": OUTPUT["checkpoints"],
    # Exactly-once bookkeeping: how far each input file has been committed.
    "sources": pa.schema(
        [
            ("source", pa.string()),
            ("size_bytes", pa.int64()),
            ("rows_done", pa.int64()),
            ("window_id", pa.int64()),
            # Of the file's bytes when first read; null in rows of TARGETs before version 5.
            ("sha256", pa.string()),
        ]
    ),
    "self_checks": pa.schema(
        [
            ("checked_at", pa.timestamp("us", tz="UTC")),
            ("window_id", pa.int64()),
            ("status", pa.string()),
            ("detail", pa.string()),
        ]
    ),
    "meta": pa.schema([("key", pa.string()), ("value", pa.string())]),
}
# Tables a backend may keep as immutable segment files rather than as rows in the database,
# each file committed by a SEGMENTS row in the window's own transaction (the DuckLake /
# Iceberg pattern): DuckDB does, for the trade detail that is the bulk of every window (a
# Parquet write costs half its append, measured); PostgreSQL keeps rows.
SEGMENTED = ("trade_facts",)
SEGMENTS = pa.schema(
    [
        ("table_name", pa.string()),
        ("file", pa.string()),  # a name inside the TARGET's segment directory
        ("window_id_min", pa.int64()),  # a copy (target.copy_target) writes several windows per file
        ("window_id_max", pa.int64()),
        ("rows", pa.int64()),
    ]
)
# The frozen runs of the engine's key sets (state.KEPT_SETS) a backend may keep as files
# beside its segments, one catalogue row per file, committed with the window whose state
# froze the run: a restart maps them instead of rebuilding them from the whole history.
# `covered_window`: every key of windows up to it is in this run or an earlier one of its set.
STATE_RUNS = pa.schema(
    [
        ("set_name", pa.string()),
        ("run_no", pa.int32()),
        ("column_name", pa.string()),
        ("file", pa.string()),  # a name inside the TARGET's segment directory
        ("covered_window", pa.int64()),
        ("window_id", pa.int64()),  # the window whose commit catalogued it
    ]
)
# Tables whose rows each window appends (as opposed to bookkeeping the engine rewrites).
WINDOW_APPENDS = (
    "trade_facts",
    "quarantine",
    "exceptions",
    "obligations_cash_delta",
)
# meta keys naming the window holdings_snapshot / obligations_securities_snapshot is as of
# (read by their views).
HOLDINGS_SNAPSHOT_KEY = "holdings_snapshot_window"
OBLIGATIONS_SNAPSHOT_KEY = "obligations_snapshot_window"
# Delta table -> (key columns, summed columns), for compaction.
DELTAS = {
    "obligations_cash_delta": (
        KEYS["obligations_cash"],
        ("net_amount", "buy_amount", "sell_amount", *FEE_COLUMNS.values()),
    ),
}
