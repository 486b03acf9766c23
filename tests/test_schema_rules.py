"""Validation's SCHEMA rules: leaving out the rules a column shows cannot fire (no parse
failure, no null) names the same first failing rule for every row as evaluating them all."""

from __future__ import annotations

import polars as pl
from hypothesis import given, settings
from hypothesis import strategies as st

from settle_arrow import schema
from settle_arrow.io.parse import coerce
from settle_arrow.stages import validate

# Per column: a good text, a text that does not parse, or nothing.
GOOD = {
    "trade_id": "17", "market": "XSHG", "trade_date": "2024-03-04", "trade_time": "09:30:00",
    "security_id": "600000", "buy_unit": "U1", "sell_unit": "U2", "buy_account": "A1", "sell_account": "A2",
    "quantity": "100", "price": "10.5", "record_type": "N", "ref_trade_id": "",
}
ODD = {"trade_id": "x", "trade_date": "2024-13-40", "trade_time": "25:61", "quantity": "1e", "price": "p",
       "record_type": "Z", "ref_trade_id": "-3", "market": "XNYS"}
value = st.sampled_from(["good", "odd", "none"])


@settings(max_examples=150, deadline=None)
@given(rows=st.lists(st.fixed_dictionaries({c: value for c in schema.INPUT_TRADE.names}), min_size=1, max_size=12))
def test_gated_rules_name_what_every_rule_names(rows):
    assert set(GOOD) == set(schema.INPUT_TRADE.names)
    text = {c: [GOOD[c] if r[c] == "good" else ODD.get(c, "") if r[c] == "odd" else None for r in rows]
            for c in schema.INPUT_TRADE.names}
    typed = coerce(pl.DataFrame(text, schema={c: pl.String for c in text}), schema.INPUT_TRADE)
    gated = validate._schema_detail(typed)
    every = validate._may_fire
    try:
        validate._may_fire = lambda typed, gate: True
        ungated = validate._schema_detail(typed)
    finally:
        validate._may_fire = every
    assert gated.to_list() == ungated.to_list()
