-- Logical output tables over append-only delta tables (SPEC §4, §5).
-- Portable SQL: the same text runs on DuckDB and PostgreSQL.
-- Each view is the sum of its deltas per key; rows whose every sum is zero are dropped.

CREATE OR REPLACE VIEW obligations_securities AS
SELECT market, trade_date, securities_settle_date, participant_id, security_id,
       CAST(SUM(net_quantity) AS BIGINT) AS net_quantity,
       CAST(SUM(buy_quantity) AS BIGINT) AS buy_quantity,
       CAST(SUM(sell_quantity) AS BIGINT) AS sell_quantity
FROM obligations_securities_delta
GROUP BY market, trade_date, securities_settle_date, participant_id, security_id
HAVING SUM(net_quantity) <> 0 OR SUM(buy_quantity) <> 0 OR SUM(sell_quantity) <> 0;

CREATE OR REPLACE VIEW obligations_cash AS
SELECT market, trade_date, cash_settle_date, participant_id, currency,
       CAST(SUM(net_amount) AS DECIMAL(18,2)) AS net_amount,
       CAST(SUM(buy_amount) AS DECIMAL(18,2)) AS buy_amount,
       CAST(SUM(sell_amount) AS DECIMAL(18,2)) AS sell_amount,
       CAST(SUM(stamp_duty) AS DECIMAL(18,2)) AS stamp_duty,
       CAST(SUM(handling_fee) AS DECIMAL(18,2)) AS handling_fee,
       CAST(SUM(management_fee) AS DECIMAL(18,2)) AS management_fee,
       CAST(SUM(transfer_fee) AS DECIMAL(18,2)) AS transfer_fee
FROM obligations_cash_delta
GROUP BY market, trade_date, cash_settle_date, participant_id, currency
HAVING SUM(net_amount) <> 0 OR SUM(buy_amount) <> 0 OR SUM(sell_amount) <> 0
    OR SUM(stamp_duty) <> 0 OR SUM(handling_fee) <> 0 OR SUM(management_fee) <> 0
    OR SUM(transfer_fee) <> 0;

-- Holdings: the last snapshot plus both legs of every trade committed after it. The
-- engine rewrites the snapshot when the trades since it outgrow it (no per-window writes).
CREATE OR REPLACE VIEW holdings AS
SELECT account_id, market, security_id, CAST(SUM(quantity) AS BIGINT) AS quantity
FROM (
  SELECT account_id, market, security_id, quantity FROM holdings_snapshot
  UNION ALL
  SELECT buy_account, market, security_id,
         CASE WHEN record_type = 'N' THEN quantity ELSE -quantity END
  FROM trades
  WHERE window_id > (SELECT CAST(value AS BIGINT) FROM meta WHERE key = 'holdings_snapshot_window')
  UNION ALL
  SELECT sell_account, market, security_id,
         CASE WHEN record_type = 'N' THEN -quantity ELSE quantity END
  FROM trades
  WHERE window_id > (SELECT CAST(value AS BIGINT) FROM meta WHERE key = 'holdings_snapshot_window')
) h
GROUP BY account_id, market, security_id
HAVING SUM(quantity) <> 0;
