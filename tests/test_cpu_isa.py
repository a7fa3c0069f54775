"""Every CPU instruction-set variant of the C++ kernels passes the CPU-backend tests.

The extension holds the row kernels once per instruction set (base, AVX2, AVX-512 on x86-64) and
picks the best one this CPU runs, once per process; the rest of the suite therefore tests only that
one. Here each other variant this CPU can run is pinned with RLFUSE_CPU_ISA and the CPU-backend
tests run again in a subprocess.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import rlfuse._C as C

TESTS = Path(__file__).parent
CPU_TEST_FILES = ["test_token_logprobs.py", "test_policy_loss.py", "test_kl_div.py", "test_troll.py",
                  "test_sampling.py", "test_layout.py", "test_kernel_row_inputs.py", "test_distill.py",
                  "test_filtered_logprobs.py", "test_token_temperature.py", "test_sampling_inputs.py",
                  "test_masking.py", "test_offpolicy.py", "test_adaptive_clip.py"]
# The cpu-backend cases: "cpu" also names the device of the Triton-interpreter cases, which run no C++.
SELECTION = "cpu and not triton"


def _isa_in_subprocess(isa: str) -> str:
    env = dict(os.environ, RLFUSE_CPU_ISA=isa)
    out = subprocess.run([sys.executable, "-c", "import rlfuse._C as C; print(C.cpu_isa())"], env=env,
                         capture_output=True, text=True, check=True)
    return out.stdout.strip()


@pytest.mark.parametrize("isa", ["base", "avx2", "avx512"])
def test_cpu_backend_tests_pass_on_each_isa(isa):
    if isa == C.cpu_isa():
        pytest.skip(f"{isa} is this process's variant: the rest of the suite tests it")
    if _isa_in_subprocess(isa) != isa:
        pytest.skip(f"this CPU (or build) cannot run the {isa} variant")
    env = dict(os.environ, RLFUSE_CPU_ISA=isa)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-p", "no:warnings", "-k", SELECTION,
         *CPU_TEST_FILES],
        cwd=TESTS, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"CPU tests fail with RLFUSE_CPU_ISA={isa}:\n{result.stdout[-4000:]}"
