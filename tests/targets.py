"""Fresh TARGETs on every storage backend, for the parametrised storage suite.

Each test that touches storage takes the `backend` parameter ("duckdb", "postgres") and
asks `new_target()` for empty TARGETs: DuckDB a new file under the test's tmp dir;
PostgreSQL a new schema (`?schema=tN`) in one database made for this test session
(`settle_test_<pid>_<random>`, from the server of SETTLE_ARROW_PG_URL, default
postgresql://postgres@127.0.0.1:5432/test) and dropped at its end.

An unreachable server skips the postgres parameters, unless SETTLE_ARROW_REQUIRE_PG=1
(CI), which makes it a failure.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import re
from pathlib import Path

import adbc_driver_postgresql.dbapi as pg_dbapi

from settle_arrow import schema
from settle_arrow.storage.postgres import split_target

PG_URL = os.environ.get("SETTLE_ARROW_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
REQUIRE_PG = os.environ.get("SETTLE_ARROW_REQUIRE_PG") == "1"
BACKENDS = ("duckdb", "postgres")

_schemas = itertools.count(1)
_issued: set[str] = set()


@dataclasses.dataclass(frozen=True)
class Backend:
    name: str
    pg_url: str | None = None  # the session's database (postgres only)

    def new(self, root: Path, name: str = "db") -> str:
        """A new, empty TARGET (nothing is created until something writes it)."""
        if self.name == "duckdb":
            path = root / f"{name}.duckdb"
            for i in itertools.count(2):
                if not path.exists() and str(path) not in _issued:
                    break
                path = root / f"{name}{i}.duckdb"
            _issued.add(str(path))
            return str(path)
        assert self.pg_url
        return f"{self.pg_url}?schema=t{next(_schemas)}_{re.sub(r'[^a-z0-9_]', '_', name.lower())}"

    def tables(self, target: str) -> set[str]:
        """settle_arrow tables present in TARGET (empty: nothing was ever written)."""
        if self.name == "duckdb":
            import duckdb

            if not Path(target).exists():
                return set()
            with duckdb.connect(target, read_only=True) as con:
                return {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
        uri, schema_name, _ = split_target(target)
        with pg_dbapi.connect(uri, autocommit=True) as con, con.cursor() as cur:
            cur.execute("SELECT table_name FROM information_schema.tables WHERE table_schema = $1", (schema_name,))
            return {r[0] for r in cur.fetchall()} & set(schema.STORAGE)

    def terminate_writers(self) -> int:
        """pg_terminate_backend every settle_arrow writer connected to the session database."""
        assert self.pg_url
        uri, _, _ = split_target(self.pg_url)
        with pg_dbapi.connect(uri, autocommit=True) as con, con.cursor() as cur:
            cur.execute(
                "SELECT COUNT(pg_terminate_backend(pid)) AS n FROM pg_stat_activity "
                "WHERE datname = current_database() AND application_name = 'settle_arrow writer'"
            )
            return int(cur.fetchall()[0][0])
