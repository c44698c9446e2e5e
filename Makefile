# The two commands of the README: `make demo` (main job) and `make test` (tests). Both set up the venv first.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# The CPU wheel of torch on these machines; on a GPU box: make install TORCH="torch==2.13.0 --index-url <cuda index>"
TORCH  ?= torch==2.13.0
export WANDB_MODE ?= offline
export HF_HUB_OFFLINE ?= 1

.PHONY: install test test-slow test-all demo bench gpu-check clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)          # first: otherwise pip pulls a multi-GB CUDA build
	$(PY) -m pip install -q -e ".[dev,peers,real]"
	$(PY) -m pip install -q --no-deps $$($(PY) -c 'import tomllib; x = tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]; print(" ".join(x["peers-nodeps"] + x["real-nodeps"]))')
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)          ## the default run: every test but the minutes-long `slow` ones (under 15 min on 2 cores)
	$(VENV)/bin/pytest -m "not slow"

test-slow: $(STAMP)     ## the slow integration tests (SLURM ones need scripts/slurm-up.sh); CI runs them after `test`
	$(VENV)/bin/pytest -m slow

test-all: $(STAMP)      ## both in one pytest run
	$(VENV)/bin/pytest

demo: $(STAMP)          ## the embedded tau x divergence study end to end, then its report
	$(VENV)/bin/distill-demo

gpu-check: $(STAMP)     ## the CUDA paths on this machine's GPU(s), <= 8 minutes; exits 2 without CUDA
	timeout 480 $(PY) scripts/gpu_check.py

bench: $(STAMP)
	$(PY) -m benchmarks.bench_losses
	$(PY) -m benchmarks.bench_train
	$(PY) -m benchmarks.bench_peers

clean:
	rm -rf outputs .pytest_cache
