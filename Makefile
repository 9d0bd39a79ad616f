# The two commands a newcomer needs: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test test-fast tools lint typecheck pytest fmt bench clean screenshots topology

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

## Run the server on embedded defaults (embedded PostgreSQL, in-process broker, demo data).
run: $(STAMP)
	$(BIN)/slotcast serve --demo

## The whole scaled-out topology locally: N instances behind HAProxy, a Redis Cluster,
## a PostgreSQL primary and a replica (docs/operating.md); Ctrl-C removes it all.
## HAProxy and redis-server 7 are installed with apt-get when missing (as root).
N ?= 2
topology: $(STAMP)
	$(BIN)/python -m testkit.topology --instances $(N)

## System tools some tests need: HAProxy, Chromium, promtool and redis-server 7, installed with apt-get when missing (as root).
## The deployment tests' too: PostgreSQL 15 (Debian's), openssl, systemd-analyze, jq.
tools: $(STAMP)
	$(BIN)/python -c 'import sys; from testkit.tools import ensure_deploy_tools; r = ensure_deploy_tools(); print("\n".join(r) or "deployment tools: all present", file=sys.stderr)'
	$(BIN)/python -c 'import sys; from testkit.tools import ensure_haproxy; r = []; p = ensure_haproxy(r); print(p or "haproxy unavailable (its test will skip): " + r[0], file=sys.stderr)'
	$(BIN)/python -c 'import sys; from testkit.tools import ensure_chromium; r = []; p = ensure_chromium(r); print(p or "chromium unavailable (the browser tests will skip): " + r[0], file=sys.stderr)'
	$(BIN)/python -c 'import sys; from testkit.tools import ensure_promtool; r = []; p = ensure_promtool(r); print(p or "promtool unavailable (the alert rules test will skip): " + r[0], file=sys.stderr)'

## Lint, type-check and run the whole suite (starts its own PostgreSQL and Redis).
test: $(STAMP) tools
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/pytest

## The fast loop: tests/unit only, which starts no PostgreSQL, Redis or server (a few seconds).
test-fast: $(STAMP)
	$(BIN)/pytest tests/unit

## docs/screenshots/*.png: a demo server with a little activity, photographed with Chromium.
screenshots: $(STAMP) tools
	$(BIN)/python -m testkit.screenshots

fmt: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
