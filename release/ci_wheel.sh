#!/usr/bin/env bash
# CI: build the CUDA 13 release wheel with the machine's nvcc (sm_80, sm_90a, sm_100a + compute_100
# PTX, static CUDA/C++ runtimes, manylinux_2_28, auditwheel-checked) and smoke-test it in a fresh
# venv (tests/test_wheel.py, run by build_wheel.py). Sets up .venv itself (make wheel); sized for
# the 2-core CI machine. The wheel goes to build/ci-wheel/, not dist/, so the main suite's
# tests/test_wheel.py keeps skipping.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
out=build/ci-wheel
rm -rf "$out"
make wheel WHEEL_JOBS="${WHEEL_JOBS:-2}" WHEEL_OUT="$out"
wheel=$(ls "$out"/rlfuse-*+cu*.whl)
echo "ci_wheel: $(basename "$wheel") ($(du -k "$wheel" | cut -f1) KiB): built, checked and smoke-tested in $(($(date +%s) - start)) s"
