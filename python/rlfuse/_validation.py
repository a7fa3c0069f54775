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


# Temperatures T > 0 must have both T and 1 / T normal fp32 numbers: T in [2^-126, 2^126] =
# [1.1754944e-38, 8.507059e37]. The kernels scale logits by 1 / T in fp32, which must be finite
# (1e-39 gives +inf) and must not flush to 0 (T = 1e46 made it 0, and -inf padding * 0 = NaN);
# subnormal T or 1 / T are out too, since GPU code may flush them (CUDA's rcp.approx.ftz).
MIN_TEMPERATURE = float(torch.finfo(torch.float32).tiny)  # 2^-126
MAX_TEMPERATURE = 1.0 / MIN_TEMPERATURE  # 2^126
TEMPERATURE_RANGE = f"[{MIN_TEMPERATURE:.8g}, {MAX_TEMPERATURE:.8g}]"


def check_temperature(temperature) -> float:
    """A positive temperature with T and 1 / T normal fp32 numbers (the kernels take 1 / T as fp32)."""
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"temperature must be a positive number, got {temperature!r}")
    temperature = float(temperature)
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be positive and finite, got {temperature}")
    if not MIN_TEMPERATURE <= temperature <= MAX_TEMPERATURE:
        raise ValueError(
            f"temperature {temperature!r} is out of range: it must lie in {TEMPERATURE_RANGE}, so that T and "
            f"1 / T (by which the kernels scale the logits in fp32) are normal fp32 numbers"
        )
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
