# Two commands on a fresh machine:
#   make demo   set everything up, then run the main job on the embedded default
#   make test   set everything up, then run the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.vitatlas-setup

.PHONY: setup demo test test-portability bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup.sh
	PYTHON=$(PYTHON) VENV=$(VENV) bash scripts/setup.sh
	touch $@

demo: setup
	$(BIN)/python scripts/demo.py

test: setup
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/python -m pytest -q

# the suite with two intra-op threads and with one OpenMP thread: catches tests that depend on summation order
test-portability: setup
	VITATLAS_TEST_THREADS=2 $(BIN)/python -m pytest -q
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python benchmarks/extract.py --quick
	$(BIN)/python benchmarks/dictionary_learning.py --quick
	$(BIN)/python benchmarks/sae.py --quick
	$(BIN)/python benchmarks/intervene.py --tiny
	$(BIN)/python benchmarks/explore.py --quick

clean:
	rm -rf $(VENV) demo-out .pytest_cache
