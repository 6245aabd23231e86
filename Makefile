# Set-up and common commands. `make train` and `make test` do all set-up on a fresh machine.
#   TORCH_SPEC: what `pip install` gets for torch before the project. The default is the CPU
#   build (on this kind of machine it installs from local disk); GPU users pass their CUDA build:
#   make setup TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup train test test-fast bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

train: $(STAMP)   ## the default job, offline: pretrained MiniLM on the Wikipedia sample
	$(PY) run.py $(ARGS)

test: $(STAMP)    ## the whole suite: fast tests and the slow end-to-end ones
	$(PY) -m pytest -q -m "slow or not slow"

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

bench: $(STAMP)
	$(PY) benchmarks/train_throughput.py --json benchmarks/results/train_throughput.json
	$(PY) benchmarks/grouping.py --json benchmarks/results/grouping.json
	$(PY) benchmarks/preprocess.py --json benchmarks/results/preprocess.json

clean:
	rm -rf outputs .pytest_cache

.PHONY: gpu-check
gpu-check: $(STAMP)   ## on a CUDA machine: every GPU row in one call (budget 8 min), the table to paste in benchmarks/results/gpu_check.md
	$(PY) benchmarks/gpu_check.py --budget-minutes 8 --json benchmarks/results/gpu_check.json --md benchmarks/results/gpu_check.md
