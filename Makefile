# `make run` and `make test` work on a fresh clone: both create/reuse .venv and install what they need.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test test-fast lint bench-quick clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "protoswarm needs Python >= 3.11")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, pinned: 2.13.0 is the CPU build on this machine's disk (no multi-GB CUDA download).
	$(BIN)/python -m pip install --quiet "torch==2.13.0"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

# Again after a stop it resumes the same run (the identity's last run, its checkpoint in runs/node);
# `make run ARGS=--new` starts a new swarm. It listens on TCP 31337 (docs/networking.md).
run: $(STAMP)
	$(BIN)/node start $(ARGS)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q --durations=15 tests

# Unit tests only (tests/unit without the `slow` mark): about a minute and a quarter on 2 cores.
test-fast: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -m "not slow" tests/unit

lint: $(STAMP)
	$(BIN)/ruff check .

bench-quick: $(STAMP)
	$(BIN)/python bench/subspace.py --quick
	$(BIN)/python bench/convergence.py --quick

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache runs bench/out
