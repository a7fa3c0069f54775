"""Argument checks shared by the public functions: clear errors before any kernel runs.

Checks of types, shapes, devices and Python numbers read no tensor data and cost nothing. Checks
that need tensor *values* (token ids in range, ``cu_seqlens`` monotone, ``old_topk`` ids, sampling
parameters given as tensors, rows that cannot be sampled) need a host synchronisation: each public
call gathers all of its data checks in one :class:`DataChecks` and reads them back with a single
synchronisation (README "Host synchronisation"). They are skipped under ``torch.compile`` and when
validation is switched off with :func:`set_validation` or ``RLFUSE_VALIDATE=0``; the kernels never
read out of bounds either way (an out-of-range token id gives NaN).
"""

from __future__ import annotations

import math
import numbers
import os
from typing import Callable

import torch

LOGITS_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
TOKEN_DTYPES = (torch.int32, torch.int64)

_validation = os.environ.get("RLFUSE_VALIDATE", "1").strip().lower() not in ("0", "false", "no", "off")


def set_validation(enabled: bool) -> bool:
    """Switch the data-dependent input checks (the one host synchronisation a call may make for
    them) on or off for the whole process; returns the previous setting. Off, nothing is read back
    for validation: invalid data gives NaN or unspecified values instead of a ``ValueError``.
    The initial setting is on unless the environment variable ``RLFUSE_VALIDATE`` is ``0``."""
    global _validation
    if not isinstance(enabled, bool):
        raise TypeError(f"set_validation takes a bool, got {type(enabled).__name__}")
    previous, _validation = _validation, enabled
    return previous


def validation_enabled() -> bool:
    """Whether data checks run now: switched on and not tracing under ``torch.compile``."""
    return _validation and not torch.compiler.is_compiling()


class DataChecks:
    """The data-dependent checks of one call, read back with one host synchronisation.

    ``add(bad, error)`` registers a check: ``bad()`` returns a boolean tensor (the check fails if any
    element is true), ``error()`` the exception to raise then. Neither is called when validation is
    off. ``run()`` reads every flag in one transfer and raises the first failing check's error
    (in the order they were added); ``error()`` may read more data, since the call fails anyway.

    ``logits``: the call's logits (tensor or source). A source split over a process group (its
    ``collective_group`` is not None: ``ShardedLogits``, ``LinearLogits(..., group=...)``) makes
    ``run()`` agree over the group (``rlfuse.sharded.agree``: one all-reduce of one number, also when
    no check was added): a check failing on one rank raises there and a ValueError naming that rank on
    every other rank, so no rank goes on into a collective the failing one never joins. Every rank must
    then call ``run()`` at the same point with validation switched the same way.
    """

    def __init__(self, logits=None):
        self.enabled = validation_enabled()
        self._flags: list[torch.Tensor] = []
        self._errors: list[Callable[[], Exception]] = []
        self.group = getattr(logits, "collective_group", None) if logits is not None else None
        self.device = logits.device if self.group is not None else None

    def add(self, bad: Callable[[], torch.Tensor], error: Callable[[], Exception]) -> None:
        if self.enabled:
            self._flags.append(bad().any().reshape(1))
            self._errors.append(error)

    def run(self) -> None:
        if self.group is not None and self.enabled:
            from .sharded import agree

            agree(self.group, self.device, self._run_local)
            return
        self._run_local()

    def _run_local(self) -> None:
        flags, errors = self._flags, self._errors
        self._flags, self._errors = [], []
        if not flags:
            return
        device = flags[0].device
        failed = torch.cat([f.to(device) for f in flags]).tolist()  # the one host synchronisation
        for fail, error in zip(failed, errors):
            if fail:
                raise error()


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


PER_TOKEN_TEMPERATURE_OPS = "token_logprobs, entropy, kl_divergence, sparse_logprobs, distill_loss and policy_loss"


def check_temperature(temperature, tokens: torch.Tensor | None = None, checks: DataChecks | None = None,
                      logits=None):
    """A positive temperature with T and 1 / T normal fp32 numbers (the kernels take 1 / T as fp32).

    A number comes back as a float. A tensor (README "Per-token temperature") is accepted where the
    caller passes the rows it applies to, ``tokens`` or else the call's ``logits`` (tensor or source,
    rows ``logits.shape[:-1]``): one value per row (that shape, or a 0-dim tensor broadcast to it), a
    float dtype, on their device, without gradient (the temperature gets none); it comes back as a
    contiguous float64 tensor of that shape. Its values obey the number's range, as a data check
    added to ``checks`` (the caller runs it) or, without ``checks``, run here (one host
    synchronisation, agreed over ``logits``' group for a split source)."""
    if isinstance(temperature, torch.Tensor):
        return _check_temperature_tensor(temperature, tokens, checks, logits)
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


def _check_temperature_tensor(temperature, tokens, checks, logits):
    if tokens is None and logits is None:
        raise TypeError(f"temperature must be a positive number here; a per-token temperature tensor is taken by "
                        f"{PER_TOKEN_TEMPERATURE_OPS}")
    if not temperature.dtype.is_floating_point:
        raise TypeError(f"temperature must be a float tensor, got {temperature.dtype}")
    if temperature.requires_grad:
        raise ValueError("temperature gets no gradient (only the logits do): pass temperature.detach()")
    rows, device = (tuple(tokens.shape), tokens.device) if tokens is not None else (tuple(logits.shape[:-1]),
                                                                                       logits.device)
    if temperature.device != device:
        raise ValueError(f"temperature is on {temperature.device} but logits are on {device}")
    if temperature.shape != rows and temperature.dim() != 0:
        raise ValueError(f"temperature must be a number, a 0-dim tensor or a tensor of the tokens' shape "
                         f"{rows}, got shape {tuple(temperature.shape)}")
    per_token = temperature.to(torch.float64).expand(rows).contiguous()
    own = checks is None
    checks = DataChecks(logits) if own else checks

    def out_of_range():
        bad = per_token[~((per_token >= MIN_TEMPERATURE) & (per_token <= MAX_TEMPERATURE))]
        return ValueError(f"temperature values must lie in {TEMPERATURE_RANGE} (T and 1 / T normal fp32 numbers), "
                          f"found {float(bad[0])!r}")

    if per_token.numel():
        checks.add(lambda: ~((per_token >= MIN_TEMPERATURE) & (per_token <= MAX_TEMPERATURE)), out_of_range)
    if own:
        checks.run()
    return per_token


def check_tokens(tokens, logits: torch.Tensor, checks: DataChecks | None = None) -> None:
    """Type, shape and device of ``tokens``; their range [0, V) as a data check, added to ``checks``
    (the caller runs it) or, without ``checks``, run here (one host synchronisation)."""
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
    own = checks is None
    checks = DataChecks(logits) if own else checks
    vocab = logits.shape[-1]

    def out_of_range():
        low, high = int(tokens.min()), int(tokens.max())
        return ValueError(f"tokens must lie in [0, V) = [0, {vocab}), found id {low if low < 0 else high}")

    if tokens.numel():
        checks.add(lambda: (tokens < 0) | (tokens >= vocab), out_of_range)
    if own:
        checks.run()
