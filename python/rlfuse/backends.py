"""Kernel backends and the ``backend="auto"`` rule (docs/ARCHITECTURE.md).

``cpu`` (C++ kernels in ``rlfuse._C``), ``cuda`` (CUDA kernels in ``rlfuse._C``, when built with
nvcc), ``triton`` (``rlfuse.triton_kernels``; on CPU tensors only under ``TRITON_INTERPRET=1``)
and ``torch`` (the plain-PyTorch reference, always available).
"""

from __future__ import annotations

import importlib
import importlib.util
import os

import torch

BACKENDS = ("auto", "triton", "cuda", "cpu", "torch")

# Preferred kernel for CUDA tensors, per op, first available wins. The Triton kernels' numerics are
# tested in CI (interpreter); the CUDA kernels are only compiled there and have not run on a GPU
# yet, so Triton leads until `make gpu-check` results (bench/results/) say otherwise.
CUDA_PREFERENCE = {
    op: ("triton", "cuda", "torch")
    for op in ("token_logprobs", "policy_loss", "kl_div", "row_topk", "sample")
}


def _import_extension():
    try:
        return importlib.import_module("rlfuse._C"), None
    except ImportError as error:
        return None, str(error)


# Resolved once at import: backend choice must be a constant for torch.compile to trace through.
_EXTENSION, _EXTENSION_ERROR = _import_extension()
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
# Triton decides between GPU and interpreter kernels when its kernel modules are imported.
_TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def compiled_extension():
    """``rlfuse._C``, or None when the package was not built (e.g. a source checkout)."""
    return _EXTENSION


def extension_import_error() -> str | None:
    return _EXTENSION_ERROR


def triton_installed() -> bool:
    return _TRITON_INSTALLED


def triton_interpreting() -> bool:
    return _TRITON_INTERPRET


def cuda_kernels_built() -> bool:
    return bool(_EXTENSION is not None and _EXTENSION.cuda_compiled)


def available_backends(device: torch.device | str) -> list[str]:
    """Kernel backends that can run on tensors of ``device`` (``"torch"`` always last)."""
    device = torch.device(device)
    names = []
    if device.type == "cuda":
        if cuda_kernels_built():
            names.append("cuda")
        if _TRITON_INSTALLED and not _TRITON_INTERPRET:
            names.append("triton")
    elif device.type == "cpu":
        if _EXTENSION is not None:
            names.append("cpu")
        if _TRITON_INSTALLED and _TRITON_INTERPRET:
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
