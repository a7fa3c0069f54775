"""Shared test set-up.

Without a GPU, Triton kernels run in the interpreter on CPU tensors: TRITON_INTERPRET must be set
before any Triton kernel module is imported, so it is set here, at collection time.
"""

import os
import subprocess

import pytest


def _nvidia_gpu_present() -> bool:
    try:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


if not _nvidia_gpu_present():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

import rlfuse  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


def kernel_backends(device: str = "cpu") -> list[str]:
    """Every backend that can run on tensors of ``device`` here."""
    return rlfuse.available_backends(device)


@pytest.fixture
def generator():
    """A fresh random stream per test (seeded so a failure reproduces)."""
    return torch.Generator().manual_seed(1234)


# (device, backend) pairs: every backend on every device present; GPU ones skip without a GPU.
TARGETS = [pytest.param(("cpu", b), id=f"cpu-{b}") for b in kernel_backends("cpu")] + [
    pytest.param(("cuda", b), id=f"cuda-{b}", marks=pytest.mark.gpu)
    for b in (kernel_backends("cuda") if HAS_CUDA else ["cuda", "triton"])
]


@pytest.fixture(params=TARGETS)
def target(request):
    """A (device, backend) pair to run on; GPU pairs skip without a GPU."""
    device, backend = request.param
    if device == "cuda" and not HAS_CUDA:
        pytest.skip("needs a CUDA device")
    return request.param
