# One command each: `make demo` (set up + run the main job on the bundled sample),
# `make test` (set up + the whole test suite), `make bench` (the benchmark).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	rm -f out/sample.duckdb out/sample.duckdb.wal
	mkdir -p out
	$(BIN)/settle-arrow replay data/samples/trades --refdata data/samples/refdata --db out/sample.duckdb --window 1000
	$(BIN)/settle-arrow status --db out/sample.duckdb
	$(BIN)/settle-arrow export obligations_cash --db out/sample.duckdb --out out/obligations_cash.csv

# One worker per core (pytest-xdist): the suite is 11 min serial, 6 min on two workers on
# the 2-core machine (measured 2026-11-23); each worker makes its own PostgreSQL database.
test: $(STAMP)
	$(BIN)/pytest -n auto

bench: $(STAMP)
	$(BIN)/settle-arrow bench

clean:
	rm -rf out bench_out .pytest_cache .hypothesis
