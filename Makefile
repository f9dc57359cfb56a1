# The two commands of the README:
#   make quickstart   set up a fresh machine, run scenarios/quickstart.yaml
#   make test         set up a fresh machine, run the whole test suite (what CI runs)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: setup quickstart test test-fast lint bench bench-setup bench-peers clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# The set-up runs once: its stamp is newer than what it depends on, so `make quickstart` and
# `make test` on a set-up machine go straight to their work (the steps cost ~20 s even as no-ops).
STAMP  := $(VENV)/.fedsim-setup
SETUP_INPUTS := pyproject.toml Makefile scripts/install-models.sh scripts/install-data.sh \
                scenarios/quickstart.yaml

setup: $(STAMP)

# torch first and pinned: the CPU build lies on the machine's disk; an open range would pull CUDA.
$(STAMP): $(BIN)/python $(SETUP_INPUTS)
	$(BIN)/python -m pip install --disable-pip-version-check -q --upgrade pip
	$(BIN)/python -m pip install --disable-pip-version-check -q "torch==2.13.0"
	$(BIN)/python -m pip install --disable-pip-version-check -q -e ".[dev,notebooks,ray]"
	PATH="$(CURDIR)/$(BIN):$$PATH" bash scripts/install-models.sh
	PATH="$(CURDIR)/$(BIN):$$PATH" bash scripts/install-data.sh
	# The quickstart's data, models, fitted projection maps and server probe, cached (75 s once
	# here): its first run then starts warm. Other scenarios fit theirs on first use (or: fedsim prepare FILE).
	HF_HUB_OFFLINE=1 $(BIN)/fedsim prepare scenarios/quickstart.yaml --quiet
	touch $@

quickstart: setup
	HF_HUB_OFFLINE=1 $(BIN)/fedsim run scenarios/quickstart.yaml

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q $(PYTEST_ARGS)

# Developers' inner loop: tiny models only (the real-model tests are marked slow).
test-fast:
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

lint:
	$(BIN)/ruff check fedsim tests benchmarks

bench:
	$(BIN)/python benchmarks/bench_engine.py

# Flower in a venv of its own (.venv-bench): flwr[simulation] pins Ray and protobuf versions the
# default install does not use. Then: make bench-peers (or pytest there: the --smoke test runs).
bench-setup:
	$(MAKE) setup VENV=.venv-bench
	.venv-bench/bin/python -m pip install --disable-pip-version-check -q -e ".[bench]"

bench-peers:
	HF_HUB_OFFLINE=1 .venv-bench/bin/python benchmarks/bench_peers.py

clean:
	rm -rf $(VENV) .venv-bench runs sweeps .pytest_cache .ruff_cache
