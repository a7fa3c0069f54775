"""Kernel backends and the ``backend="auto"`` rule (DESIGN.md).

``cpu`` (C++ kernels in ``rlfuse._C``), ``cuda`` (CUDA kernels in ``rlfuse._C``, when built with
nvcc), ``triton`` (``rlfuse.triton_kernels``; on CPU tensors only under ``TRITON_INTERPRET=1``)
and ``torch`` (the plain-PyTorch reference, always available).
"""

from __future__ import annotations

import functools
import importlib
import os

import torch

BACKENDS = ("auto", "triton", "cuda", "cpu", "torch")

# Preferred kernel for CUDA tensors, per op, first available wins. Update from `make gpu-check`
# benchmarks (bench/results/); until a GPU run says otherwise the CUDA C++ kernel comes first.
CUDA_PREFERENCE = {"token_logprobs": ("cuda", "triton", "torch")}


@functools.cache
def compiled_extension():
    """``rlfuse._C``, or None when the package was not built (e.g. a source checkout)."""
    try:
        return importlib.import_module("rlfuse._C")
    except ImportError:
        return None


def extension_import_error() -> str | None:
    try:
        importlib.import_module("rlfuse._C")
    except ImportError as error:
        return str(error)
    return None


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def triton_kernels():
    """``rlfuse.triton_kernels``, or None when Triton is not installed."""
    try:
        return importlib.import_module("rlfuse.triton_kernels")
    except ImportError:
        return None


def cuda_kernels_built() -> bool:
    ext = compiled_extension()
    return bool(ext is not None and ext.cuda_compiled)


def available_backends(device: torch.device | str) -> list[str]:
    """Kernel backends that can run on tensors of ``device`` (``"torch"`` always last)."""
    device = torch.device(device)
    names = []
    if device.type == "cuda":
        if cuda_kernels_built():
            names.append("cuda")
        if triton_kernels() is not None and not triton_interpreting():
            names.append("triton")
    elif device.type == "cpu":
        if compiled_extension() is not None:
            names.append("cpu")
        if triton_interpreting() and triton_kernels() is not None:
            names.append("triton")
    names.append("torch")
    return names


def resolve_backend(backend: str, device: torch.device, op: str, dtype: torch.dtype) -> str:
    """The concrete backend for ``backend`` on ``device``; raises ValueError if unavailable."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    available = available_backends(device)
    if backend == "auto":
        if dtype == torch.float64:
            return "torch"  # the kernels compute in fp32; float64 is served by the reference
        if device.type == "cuda":
            return next(name for name in CUDA_PREFERENCE[op] if name in available)
        return "cpu" if "cpu" in available else "torch"
    if backend not in available:
        raise ValueError(
            f"backend={backend!r} is not available for {device.type} tensors "
            f"(available: {available}); see `rlfuse info`"
        )
    if backend != "torch" and dtype == torch.float64:
        raise TypeError(f"backend={backend!r} takes float32, float16 or bfloat16 logits, got float64")
    return backend
