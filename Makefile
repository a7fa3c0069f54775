# rlfuse developer entry points. `make test` and `make bench` set everything up in .venv first;
# `make gpu-check` runs on a GPU machine with its own python3 (torch, triton, build tools
# preinstalled, no package index) and writes its results under bench/results/.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: test bench install gpu-check clean

$(PY):
	python3 -m venv --system-site-packages $(VENV)

$(VENV)/.deps: $(PY) requirements-dev.txt
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

install: $(VENV)/.deps
	$(PY) -m pip install -q --no-build-isolation -e .

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

bench: install
	$(VENV)/bin/rlfuse bench

# The whole GPU round in one command: build with the machine's own packages, every test (GPU ones
# included), compute-sanitizer over the CUDA kernels, then the benchmarks.
GPU_PY ?= python3
gpu-check:
	bash bench/gpu_check.sh $(GPU_PY)

clean:
	rm -rf build $(VENV) .pytest_cache
