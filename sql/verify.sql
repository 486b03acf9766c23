-- Whole-table self-checks (SPEC §4, §5), run at the end of every replay and by `status`.
-- Each query returns the rows that break its invariant: an empty result is a pass.
-- name: net_securities_sum_to_zero
SELECT market, trade_date, security_id, SUM(net_quantity) AS total
FROM obligations_securities GROUP BY market, trade_date, security_id
HAVING SUM(net_quantity) <> 0;
-- name: net_cash_equals_minus_fees
SELECT market, trade_date, SUM(net_amount) AS net,
       SUM(stamp_duty + handling_fee + management_fee + transfer_fee) AS fees
FROM obligations_cash GROUP BY market, trade_date
HAVING SUM(net_amount) <> -SUM(stamp_duty + handling_fee + management_fee + transfer_fee);
-- name: holdings_conserved
-- Holdings are the base (the snapshot, or the opening before the first) plus both legs of
-- each trade since it (views.sql). The two legs of a trade carry the same security and
-- opposite quantities, so per security they sum to zero by construction: what can break
-- conservation is the snapshot, checked here against the opening positions without
-- scanning the trades.
SELECT sec_id, SUM(quantity) AS now, SUM(opening) AS opening
FROM (
  SELECT sec_id, quantity, 0 AS opening FROM holdings_base
  UNION ALL
  SELECT sec_id, 0 AS quantity, quantity AS opening FROM opening_holdings
) t GROUP BY sec_id
HAVING SUM(quantity) <> SUM(opening);
-- name: trades_match_obligations
SELECT a.q AS trades_quantity, b.q AS obligations_buy_quantity
FROM (SELECT COALESCE(SUM(sign * quantity), 0) AS q FROM trade_facts) a,
     (SELECT COALESCE(SUM(buy_quantity), 0) AS q FROM obligations_securities) b
WHERE a.q <> b.q;
