# Two commands on a fresh machine: `make run` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
NPROC ?= 4
export OMP_NUM_THREADS ?= 1

.PHONY: setup test run lint format clean

setup: $(STAMP)

# torch is installed first, pinned, so that nothing later resolves a plain `torch` to another build.
$(STAMP): setup.py constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt torch
	$(PY) -m pip install -q --prefer-binary -c constraints.txt -e '.[test]'
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q

# The main job: train the default config on the embedded corpus, NPROC CPU ranks, adaptive planner.
run: setup
	$(VENV)/bin/torchrun --standalone --nproc-per-node $(NPROC) -m paradyse.train \
		--config launch/configs/cpu_tiny.toml --metrics runs/cpu_tiny/metrics.jsonl

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
