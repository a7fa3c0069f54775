#!/usr/bin/env bash
# `make gpu-check`: the whole GPU round on a lent GPU machine, offline. Builds with the machine's
# own python3 packages (no index), runs every test (GPU ones included), compute-sanitizer over the
# CUDA kernels, then the benchmarks. Everything lands in bench/results/gpu-check-<device>-<date>/.
set -uo pipefail
PY=${1:-python3}
cd "$(dirname "$0")/.."

device=$($PY -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no-gpu')" \
         | tr -c 'A-Za-z0-9_.-\n' '_')
out="${RLFUSE_RESULTS:-bench/results}/gpu-check-${device}-$(date -u +%Y%m%dT%H%M)"
mkdir -p "$out"
status=0
step() {  # step NAME CMD...: runs CMD, tees its output to $out/NAME.log, records failure
  local name=$1; shift
  echo "=== $name: $*"
  if "$@" >"$out/$name.log" 2>&1; then echo "    ok"; else echo "    FAILED (see $out/$name.log)"; status=1; fi
  tail -n 5 "$out/$name.log" | sed 's/^/    /'
}

nvidia-smi >"$out/nvidia-smi.txt" 2>&1 || true
step build $PY -m pip install --no-build-isolation --no-deps -v .
step info $PY -m rlfuse.cli info
# Run from tests/ so the installed package (not ./python) is imported.
step tests bash -c "cd tests && $PY -m pytest -q -rs -p no:cacheprovider ."
sanitizer=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
if [ -x "$sanitizer" ]; then
  for tool in memcheck racecheck initcheck synccheck; do
    # No caching allocator: out-of-bounds accesses inside a cached block would go unseen.
    step "sanitizer-$tool" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$sanitizer" --tool "$tool" --error-exitcode 1 $PY bench/sanitize_cuda.py
  done
else
  echo "compute-sanitizer not found" | tee "$out/sanitizer-missing.log"; status=1
fi
step bench $PY -m rlfuse.cli bench --device cuda --out "$out"
echo "results in $out (status $status)"
exit $status
