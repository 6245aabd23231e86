# Set-up and common commands. `make train` and `make test` do all set-up on a fresh machine.
#   TORCH_SPEC: what `pip install` gets for torch before the project. The default is the CPU
#   build (on this kind of machine it installs from local disk); GPU users pass their CUDA build:
#   make setup TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
PYTHON ?= python3
VENV ?= .venv
DEFAULT_SPEC := torch==2.13.0
TORCH_SPEC ?= $(DEFAULT_SPEC)
PY := $(VENV)/bin/python
# One stamp per torch spec (named by its checksum, holding the spec). Only a TORCH_SPEC given on the command
# line or in the environment makes set-up follow a new spec; any other target (and set-up without one) takes the
# set-up that exists, whatever its spec: `make train` after a CUDA set-up keeps the CUDA torch. `.installed`
# (the stamp of versions before specs had stamps, empty) is a set-up with the default spec.
stamp_of = $(VENV)/.installed-$(shell printf '%s' '$(1)' | cksum | cut -d' ' -f1)
same = $(and $(findstring x$(1),x$(2)),$(findstring x$(2),x$(1)))
INSTALLED := $(firstword $(wildcard $(VENV)/.installed*))
INSTALLED_SPEC := $(if $(INSTALLED),$(or $(shell cat '$(INSTALLED)'),$(DEFAULT_SPEC)))
ifneq ($(filter command line environment,$(origin TORCH_SPEC)),)
STAMP := $(call stamp_of,$(TORCH_SPEC))
else
STAMP := $(or $(INSTALLED),$(call stamp_of,$(TORCH_SPEC)))
TORCH_SPEC := $(or $(INSTALLED_SPEC),$(TORCH_SPEC))
endif

.PHONY: setup train test test-fast bench clean clean-outputs

# The old stamp goes first, so that a failed install leaves none. A set-up with another spec then removes its
# torch: pip keeps an installed torch that satisfies the new spec's version (2.13.0+cpu satisfies torch==2.13.0
# from a CUDA index).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	rm -f $(VENV)/.installed*
	$(if $(INSTALLED_SPEC),$(if $(call same,$(INSTALLED_SPEC),$(TORCH_SPEC)),,$(PY) -m pip uninstall --quiet --yes torch))
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e ".[dev]"
	printf '%s\n' '$(TORCH_SPEC)' > $(call stamp_of,$(TORCH_SPEC))

setup: $(STAMP)

# MLM_MAKE_TARGET: a stop line then gives the resume command as `make train ARGS="... hydra.run.dir=<dir>"`
train: $(STAMP)   ## the default job, offline: pretrained MiniLM on the Wikipedia sample
	MLM_MAKE_TARGET=train $(PY) run.py $(ARGS)

test: $(STAMP)    ## the whole suite: fast tests and the slow end-to-end ones
	$(PY) -m pytest -q -m "slow or not slow"

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

bench: $(STAMP)
	$(PY) benchmarks/train_throughput.py --json benchmarks/results/train_throughput.json
	$(PY) benchmarks/grouping.py --json benchmarks/results/grouping.json
	$(PY) benchmarks/preprocess.py --json benchmarks/results/preprocess.json

clean:            ## caches only; runs stay (outputs/: make clean-outputs CONFIRM=1)
	rm -rf .pytest_cache
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

clean-outputs:    ## deletes every run and sweep in outputs/ (checkpoints included)
	@test "$(CONFIRM)" = 1 || { echo "this deletes every run and sweep in outputs/, checkpoints included; to do it: make clean-outputs CONFIRM=1"; exit 2; }
	rm -rf outputs

.PHONY: gpu-check
gpu-check: $(STAMP)   ## on a CUDA machine: every GPU row in one call (budget 8 min), the table to paste in benchmarks/results/gpu_check.md
	$(PY) benchmarks/gpu_check.py --budget-minutes 8 --json benchmarks/results/gpu_check.json --md benchmarks/results/gpu_check.md
