# fleetd: `make run` starts the example fleet, `make test` runs the whole suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint demo chaos bench bench-quick clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	cd config && ../$(BIN)/fleetd start -c example.toml

# Byte-compiled first: each of the hundreds of processes the tests start would otherwise
# compile fleetd's modules again where the environment writes no bytecode.
test: $(STAMP)
	$(BIN)/python -m compileall -q fleetd supervisor worker ctl examples tests > /dev/null
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check fleetd supervisor worker ctl tests bench examples
	$(BIN)/ruff format --check fleetd supervisor worker ctl tests bench examples
	$(BIN)/mypy fleetd supervisor worker ctl
	$(BIN)/lint-imports

demo: $(STAMP)
	$(BIN)/python -m examples.demo

chaos: $(STAMP)
	$(BIN)/python -m tests.chaos --tasks 6000 --duration 180

bench: $(STAMP)
	$(BIN)/python -m bench --full

bench-quick: $(STAMP)
	$(BIN)/python -m bench --quick

clean:
	rm -rf $(VENV) .bench-venv .bench-fleetd-venv .pytest_cache .mypy_cache .ruff_cache config/state config/queue.db*
