# cellmap-auto3dseg: see README.md. `make setup`, `make test`, `make demo`, `make bench`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.setup-stamp
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: setup test test-fast demo bench clean help
.DEFAULT_GOAL := help

help:
	@echo "make setup   create $(VENV) and install everything (CPU torch first)"
	@echo "make test    run the whole test suite (slow tests included)"
	@echo "make demo    run the whole chain on a synthetic CellMap-like dataset, on CPU"
	@echo "make bench   run the benchmarks; JSON under bench/results/"
	@grep -h '^## ' mk/*.mk 2>/dev/null | sed 's/^## /make /' || true

setup: $(STAMP)

# torch==2.13.0 first: any other torch request may pull a multi-GB CUDA build.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q -c constraints.txt -e '.[all,dev]'
	touch $@

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

demo: setup
	$(PY) -m tools.demo --work-dir demo_work --data-root demo_data

bench: setup
	$(PY) -m bench.run --out bench/results

clean:
	rm -rf demo_work demo_data bench/results bench/work

-include mk/*.mk
