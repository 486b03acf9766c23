-- Logical output tables (SPEC §4, §5) over append-only deltas, snapshots and trade rows.
-- Portable SQL: the same text runs on DuckDB and PostgreSQL.
-- Each view sums its parts per key; rows whose every sum is zero are dropped.

-- Securities obligations by dimension ids: the snapshot (folded as of a window, none before
-- the first fold) plus both legs of every trade row committed after it, netted per key
-- exactly as clearing nets a window (stages/clearing.py: buy leg +signed quantity, sell leg
-- its negation). Both legs come from one scan of the trade rows, crossed with the two
-- sides (two scans cost DuckDB a second read of every segment's footer: 152 -> 122 ms,
-- 2 M legs, measured). :obligations_snapshot_window stands for the snapshot's window as
-- :holdings_snapshot_window does for the holdings' (see below).
CREATE OR REPLACE VIEW obligations_securities_ids AS
SELECT trade_date, securities_settle_date, part_id, sec_id,
       CAST(SUM(net_quantity) AS BIGINT) AS net_quantity,
       CAST(SUM(buy_quantity) AS BIGINT) AS buy_quantity,
       CAST(SUM(sell_quantity) AS BIGINT) AS sell_quantity
FROM (
  SELECT trade_date, securities_settle_date, part_id, sec_id, net_quantity, buy_quantity, sell_quantity
  FROM obligations_securities_snapshot
  UNION ALL
  SELECT trade_date, securities_settle_date,
         CASE WHEN side.buy = 1 THEN buy_participant_id ELSE sell_participant_id END,
         sec_id,
         CASE WHEN side.buy = 1 THEN sign * quantity ELSE -(sign * quantity) END,
         CASE WHEN side.buy = 1 THEN sign * quantity ELSE 0 END,
         CASE WHEN side.buy = 1 THEN 0 ELSE sign * quantity END
  FROM trade_facts CROSS JOIN (VALUES (1), (0)) AS side (buy)
  WHERE window_id > :obligations_snapshot_window
) o
GROUP BY trade_date, securities_settle_date, part_id, sec_id
HAVING SUM(net_quantity) <> 0 OR SUM(buy_quantity) <> 0 OR SUM(sell_quantity) <> 0;

CREATE OR REPLACE VIEW obligations_securities AS
SELECT s.market, o.trade_date, o.securities_settle_date, p.participant_id, s.security_id,
       o.net_quantity, o.buy_quantity, o.sell_quantity
FROM obligations_securities_ids o
JOIN dim_security s ON s.id = o.sec_id
JOIN dim_participant p ON p.id = o.part_id;

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

-- Holdings by dimension ids: the base (the last snapshot; before the first, the opening
-- holdings themselves) plus both legs of every trade committed after it (holdings_legs).
-- The engine writes the snapshot from its own holdings table, as of a window, in no order,
-- when the legs since it outnumber the positions (no per-window writes); recovery reads
-- the base and the legs apart: neither touches strings.
-- :holdings_snapshot_window stands for the snapshot's window (meta; -1 before the first): a
-- subquery of meta, or on DuckDB a constant remade in the transaction that moves it
-- (storage/base.py), since DuckDB's Parquet scan skips older windows only for a constant
-- (20 M trades of segments: 0.63 s for no row through the subquery, measured). The opening
-- is no snapshot's copy: a first start stores its ten million rows once, not twice.
CREATE OR REPLACE VIEW holdings_legs AS
SELECT acct_id, sec_id, CAST(SUM(quantity) AS BIGINT) AS quantity
FROM (
  SELECT buy_account_id AS acct_id, sec_id, sign * quantity AS quantity
  FROM trade_facts
  WHERE window_id > :holdings_snapshot_window
  UNION ALL
  SELECT sell_account_id, sec_id, -(sign * quantity)
  FROM trade_facts
  WHERE window_id > :holdings_snapshot_window
) l
GROUP BY acct_id, sec_id;

CREATE OR REPLACE VIEW holdings_base AS
SELECT acct_id, sec_id, quantity FROM holdings_snapshot
UNION ALL
SELECT acct_id, sec_id, quantity FROM opening_holdings WHERE :holdings_snapshot_window < 0;

CREATE OR REPLACE VIEW holdings_ids AS
SELECT acct_id, sec_id, CAST(SUM(quantity) AS BIGINT) AS quantity
FROM (
  SELECT acct_id, sec_id, quantity FROM holdings_base
  UNION ALL
  SELECT acct_id, sec_id, quantity FROM holdings_legs
) h
GROUP BY acct_id, sec_id
HAVING SUM(quantity) <> 0;

-- Holdings (SPEC §5): strings joined once per position.
CREATE OR REPLACE VIEW holdings AS
SELECT a.account_id, s.market, s.security_id, h.quantity
FROM holdings_ids h
JOIN dim_account a ON a.id = h.acct_id
JOIN dim_security s ON s.id = h.sec_id;

-- Trades: integer-keyed facts with their strings joined back from the dimensions.
CREATE OR REPLACE VIEW trades AS
SELECT s.market, f.trade_date, f.trade_id,
       CASE WHEN f.sign = 1 THEN 'N' ELSE 'X' END AS record_type,
       f.ref_trade_id, f.trade_time, s.security_id, s.security_type, f.price, f.quantity,
       ba.account_id AS buy_account, sa.account_id AS sell_account,
       bu.unit_id AS buy_unit, su.unit_id AS sell_unit,
       bp.participant_id AS buy_participant, sp.participant_id AS sell_participant,
       f.amount,
       f.buy_stamp_duty, f.buy_handling_fee, f.buy_management_fee, f.buy_transfer_fee,
       f.sell_stamp_duty, f.sell_handling_fee, f.sell_management_fee, f.sell_transfer_fee,
       f.securities_settle_date, f.cash_settle_date, src.source, f.source_row, f.window_id,
       f.sec_id, f.buy_account_id, f.sell_account_id
FROM trade_facts f
JOIN dim_security s ON s.id = f.sec_id
JOIN dim_account ba ON ba.id = f.buy_account_id
JOIN dim_account sa ON sa.id = f.sell_account_id
JOIN dim_unit bu ON bu.id = f.buy_unit_id
JOIN dim_unit su ON su.id = f.sell_unit_id
JOIN dim_participant bp ON bp.id = f.buy_participant_id
JOIN dim_participant sp ON sp.id = f.sell_participant_id
JOIN dim_source src ON src.id = f.source_id;
