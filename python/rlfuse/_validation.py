"""Argument checks shared by the public functions: clear errors before any kernel runs."""

from __future__ import annotations

import math
import numbers

import torch

LOGITS_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
TOKEN_DTYPES = (torch.int32, torch.int64)


def check_logits(logits, name: str = "logits") -> None:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dtype not in LOGITS_DTYPES:
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {logits.dtype}")
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"{name} must have shape [..., V] with V >= 1, got {tuple(logits.shape)}")


def check_temperature(temperature) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"temperature must be a positive number, got {temperature!r}")
    temperature = float(temperature)
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be positive and finite, got {temperature}")
    return temperature


def check_tokens(tokens, logits: torch.Tensor) -> None:
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(f"tokens must be a torch.Tensor, got {type(tokens).__name__}")
    if tokens.dtype not in TOKEN_DTYPES:
        raise TypeError(f"tokens must be int32 or int64, got {tokens.dtype}")
    if tokens.shape != logits.shape[:-1]:
        raise ValueError(
            f"tokens must have shape logits.shape[:-1] = {tuple(logits.shape[:-1])}, got {tuple(tokens.shape)}"
        )
    if tokens.device != logits.device:
        raise ValueError(f"tokens are on {tokens.device} but logits are on {logits.device}")
    # A data-dependent check needs a host sync (and breaks a compiled graph); under torch.compile
    # the kernels' own guard applies instead: an out-of-range id yields NaN, never a wild read.
    if tokens.numel() and not torch.compiler.is_compiling():
        vocab = logits.shape[-1]
        low, high = int(tokens.min()), int(tokens.max())
        if low < 0 or high >= vocab:
            bad = low if low < 0 else high
            raise ValueError(f"tokens must lie in [0, V) = [0, {vocab}), found id {bad}")
