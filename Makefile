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

$(VENV)/.deps: $(PY) requirements-dev.txt requirements-verl.txt
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps -r requirements-verl.txt
	touch $@

install: $(VENV)/.deps
	$(PY) -m pip install -q --no-build-isolation -e .

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

bench: install
	$(VENV)/bin/rlfuse bench

# The GPU round in one command of at most 8 minutes (bench/README.md, "GPU round"): build for the
# local GPU with the machine's own packages, GPU tests, compute-sanitizer, headline benchmarks, then
# what time is left for; RLFUSE_GPU_BUDGET_S, RLFUSE_RESULTS, RLFUSE_GPU_STEPS tune it. Without a GPU
# every step is skipped and it exits 0.
GPU_PY ?= $(or $(RLFUSE_GPU_CHECK_PY),python3)
gpu-check:
	bash bench/gpu_check.sh $(GPU_PY)

clean:
	rm -rf build $(VENV) .pytest_cache

# --- Release wheels and sdist (release/README.md) ----------------------------------------------
# `make wheel`: CUDA wheel for the release architectures (RLFUSE_CUDA_ARCHS' default) built with
# $(CUDA_HOME)'s nvcc; CUDA runtime and libstdc++/libgcc static, linked by zig against glibc 2.28,
# checked by auditwheel (manylinux_2_28), local version +cu<major>, written to $(WHEEL_OUT), then
# smoke-tested (tests/test_wheel.py: fresh venv, CPU kernels vs torch, architectures read from the
# binary; WHEEL_ARGS=--no-test skips it). Works from a fresh clone: it sets up .venv like `make test`.
# `make wheels`: the matrix, every CUDA toolkit in WHEEL_CUDA_HOMES x every Python in WHEEL_PYTHONS.
# `make sdist`: source distribution, then a CPU-only wheel built from it (RLFUSE_CUDA=OFF) and
# smoke-tested. `make wheel-test`: tests/test_wheel.py on $(RLFUSE_WHEEL) or the newest dist/ wheel.
CUDA_HOME ?= /usr/local/cuda
CUDA12_HOME ?= $(lastword $(wildcard /usr/local/cuda-12.8 /usr/local/cuda-12.9))
WHEEL_CUDA_HOMES ?= $(sort $(realpath $(CUDA_HOME) $(CUDA12_HOME)))
WHEEL_PYTHONS ?= $(PY)
WHEEL_JOBS ?= $(shell nproc 2>/dev/null || echo 2)
WHEEL_OUT ?= dist
WHEEL_ARGS ?=
RELEASE_DEPS := $(VENV)/.release-deps

.PHONY: wheel wheels sdist wheel-test

$(RELEASE_DEPS): $(VENV)/.deps release/requirements.txt
	$(PY) -m pip install -q -r release/requirements.txt
	touch $@

wheel: $(RELEASE_DEPS)
	$(PY) release/build_wheel.py --cuda-home $(CUDA_HOME) --jobs $(WHEEL_JOBS) --out $(WHEEL_OUT) $(WHEEL_ARGS)

wheels: $(RELEASE_DEPS)
	@test -n "$(CUDA12_HOME)" || echo "make wheels: no CUDA 12.8+ toolkit at /usr/local/cuda-12.{8,9}: no cu12 wheel (set CUDA12_HOME, see release/README.md)"
	set -e; for cuda in $(WHEEL_CUDA_HOMES); do for py in $(WHEEL_PYTHONS); do \
	  $(PY) release/build_wheel.py --cuda-home $$cuda --python $$py --jobs $(WHEEL_JOBS) --out $(WHEEL_OUT) $(WHEEL_ARGS); \
	done; done
	ls -l $(WHEEL_OUT)/*.whl

sdist: $(RELEASE_DEPS)
	rm -rf $(WHEEL_OUT)/rlfuse-*.tar.gz build/sdist-check
	$(PY) -m build --sdist --no-isolation --outdir $(WHEEL_OUT) .
	RLFUSE_CUDA=OFF CMAKE_BUILD_PARALLEL_LEVEL=$(WHEEL_JOBS) $(PY) -m pip wheel --no-deps --no-build-isolation \
	  -w build/sdist-check $(WHEEL_OUT)/rlfuse-*.tar.gz
	RLFUSE_WHEEL=$$(ls build/sdist-check/rlfuse-*.whl) $(PY) -m pytest tests/test_wheel.py -q -p no:cacheprovider --noconftest -rs
	ls -l $(WHEEL_OUT)/rlfuse-*.tar.gz

wheel-test: $(RELEASE_DEPS)
	$(PY) -m pytest tests/test_wheel.py -q -p no:cacheprovider --noconftest -rs
