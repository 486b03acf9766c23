import functools
import os
import secrets
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from targets import BACKENDS, PG_URL, REQUIRE_PG, Backend  # noqa: E402


@pytest.fixture
def market_dir(tmp_path):
    from market import write_refdata

    write_refdata(tmp_path)
    return tmp_path


@pytest.fixture(scope="session")
def pg_database():
    """URL of a database made for this test session on the PostgreSQL server (dropped after)."""
    from settle_arrow.storage import TargetError
    from settle_arrow.storage.postgres import create_database, drop_database

    name = f"settle_test_{os.getpid()}_{secrets.token_hex(3)}"
    try:
        url = create_database(PG_URL, name)
    except TargetError as exc:
        if REQUIRE_PG:
            pytest.fail(f"SETTLE_ARROW_REQUIRE_PG=1 but PostgreSQL is unreachable: {exc}", pytrace=False)
        pytest.skip(f"PostgreSQL unreachable (set SETTLE_ARROW_REQUIRE_PG=1 to fail instead): {exc}")
    yield url
    drop_database(PG_URL, name)


@pytest.fixture(scope="session", params=BACKENDS)
def backend(request) -> Backend:
    """Every storage test runs once per backend (ibis/dlt style)."""
    if request.param == "postgres":
        return Backend("postgres", request.getfixturevalue("pg_database"))
    return Backend("duckdb")


@pytest.fixture(scope="session")
def pg_backend(pg_database) -> Backend:
    """For the tests about PostgreSQL alone (dropped connections, concurrent readers)."""
    return Backend("postgres", pg_database)


@pytest.fixture
def new_target(backend, tmp_path):
    """`new_target(name="db") -> TARGET`: a fresh, empty TARGET of this test's backend."""
    return functools.partial(backend.new, tmp_path)


@pytest.fixture(scope="session")
def small_market(tmp_path_factory):
    """A generated market of 3,000 trades with bad rows and cancellations, for replays that
    vary how the engine groups, snapshots or folds them (generated once a session)."""
    from settle_arrow.generate import MarketSpec, generate_market

    return generate_market(tmp_path_factory.mktemp("small_market"),
                           MarketSpec(trades=3000, seed=21, accounts=80, securities=15, participants=4, days=3,
                                      bad_rate=0.05, cancel_rate=0.05))


@pytest.fixture(scope="session")
def small_market_tables(small_market, tmp_path_factory):
    """The output tables (checkpoints aside) of one DuckDB batch replay of small_market: its
    6,000 legs stay below every folding and snapshot threshold, so none happened but the
    obligations' fold that ends every run."""
    from settle_arrow import open_target, replay, schema

    db = str(tmp_path_factory.mktemp("small_market_ref") / "batch.duckdb")
    replay(list(small_market.trade_files), small_market.refdata_dir, db, batch=True)
    with open_target(db) as t:
        return {name: t.table(name) for name in schema.OUTPUT if name != "checkpoints"}
