"""Every Triton kernel compiles ahead of time for sm_80, sm_90 and sm_100, without spilling.

No GPU needed: triton_kernels/aot.py compiles each registry entry and reads the cubins with the
cuobjdump shipped inside triton. It runs in a subprocess because kernels imported under
TRITON_INTERPRET=1 (as the interpreter tests do) cannot be compiled. `pytest -s` shows the table.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ARCHS = {"sm_80", "sm_90", "sm_100"}
AOT_SCRIPT = Path(__file__).resolve().parents[1] / "triton_kernels" / "aot.py"


def _aot_command():
    if AOT_SCRIPT.exists():  # a checkout
        return [sys.executable, str(AOT_SCRIPT)]
    return [sys.executable, "-m", "rlfuse.triton_kernels.aot"]  # an installed package


@pytest.fixture(scope="module")
def aot_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot") / "aot.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(_aot_command() + ["--json", str(out)], env=env,
                          capture_output=True, text=True, timeout=600)
    print("\n" + proc.stdout)
    assert out.exists(), f"AOT compile failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
    return json.loads(out.read_text())


def test_every_kernel_compiles_for_every_arch(aot_results):
    archs_by_kernel = {}
    for r in aot_results:
        archs_by_kernel.setdefault(r["kernel"], set()).add(r["arch"])
    assert any(k.startswith("token_logprobs_fwd") for k in archs_by_kernel)
    assert any(k.startswith("token_logprobs_bwd") for k in archs_by_kernel)
    for kernel, archs in archs_by_kernel.items():
        assert archs == ARCHS, kernel


def test_no_register_spills(aot_results):
    spills = [f"{r['kernel']} {r['arch']}: stack {r['stack']} B, local {r['local']} B"
              for r in aot_results if r["stack"] > 0 or r["local"] > 0]
    assert not spills, "register spills:\n" + "\n".join(spills)
