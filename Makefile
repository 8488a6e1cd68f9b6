# Two commands on a fresh machine:
#   make demo   set everything up, then run the main job on the embedded default
#   make test   set everything up, then run the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.vitatlas-setup

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup.sh
	PYTHON=$(PYTHON) VENV=$(VENV) bash scripts/setup.sh
	touch $@

demo: setup
	$(BIN)/python scripts/demo.py

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python benchmarks/extract.py --quick
	$(BIN)/python benchmarks/dictionary_learning.py --quick
	$(BIN)/python benchmarks/sae.py --quick

clean:
	rm -rf $(VENV) demo-out .pytest_cache
