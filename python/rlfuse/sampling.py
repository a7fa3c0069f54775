"""``rlfuse.sample``: temperature / top-k / top-p / min-p sampling with log-probs and entropy in
the same pass over each row (SPEC.md section 8)."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
from torch import Tensor

from . import _validation as check
from . import reference
from ._layout import as_rows
from .backends import resolve_backend
from .ops._launch import kernels


@dataclass
class SampleOutput:
    tokens: Tensor  # int64 [...] (or [..., num_samples])
    logprobs: Tensor  # log-prob under the filtered, renormalised distribution (0 for greedy rows)
    raw_logprobs: Tensor  # log-prob under the unfiltered temperature-T distribution (T = 1 when greedy)
    entropy: Tensor  # entropy of the unfiltered distribution, per row


def _per_row(name, value, rows, dtype, device, check_value):
    if value is None:
        return None
    if isinstance(value, Tensor):
        if value.shape != (rows,) and value.numel() != rows:
            raise ValueError(f"{name} must be a scalar or one value per row ({rows}), got shape {tuple(value.shape)}")
        tensor = value.reshape(rows).to(device=device, dtype=dtype)
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        tensor = torch.full((rows,), value, dtype=dtype, device=device)
    else:
        raise TypeError(f"{name} must be a number or a tensor, got {type(value).__name__}")
    if not bool(check_value(tensor).all()):
        raise ValueError(f"{name} has values out of range: {tensor[~check_value(tensor)][:4].tolist()}")
    return tensor


def _seeds(seed, generator, rows, device):
    if seed is not None and generator is not None:
        raise ValueError("pass seed or generator, not both")
    if isinstance(seed, Tensor):
        if seed.numel() != rows or seed.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"a seed tensor must hold one int64 per row ({rows})")
        return seed.reshape(rows).to(device=device, dtype=torch.int64).contiguous()
    if seed is None:
        base = int(torch.randint(0, 2**62, (1,), generator=generator).item())
    elif isinstance(seed, int) and not isinstance(seed, bool):
        base = seed
    else:
        raise TypeError(f"seed must be an int, a per-row int64 tensor or None, got {type(seed).__name__}")
    # Row r of a scalar seed draws with key mix(seed) + r: a deterministic function of seed and row.
    start = (base * 0x9E3779B97F4A7C15) % 2**62
    return torch.arange(rows, device=device, dtype=torch.int64) + start


def sample(logits: Tensor, temperature=1.0, top_k=None, top_p=None, min_p=None, seed=None,
           generator: torch.Generator | None = None, adaptive_temperature=None, backend: str = "auto",
           num_samples: int = 1) -> SampleOutput:
    """Draw tokens from ``softmax(logits / T)`` filtered by top-k, then top-p, then min-p.

    Every parameter is a scalar or one value per row; ``temperature=0`` is greedy. ``seed`` (int or
    per-row int64 tensor) or ``generator`` pick the counter-based random stream: a row's draw
    depends only on its own key, never on the rest of the batch. ``adaptive_temperature=(t_min,
    t_max, h_low, h_high)`` maps each row's entropy (at T = 1) linearly, clamped, to its temperature.
    ``num_samples > 1`` draws several tokens per row (a trailing dimension on the outputs).
    """
    check.check_logits(logits)
    if logits.dtype == torch.float64:
        logits = logits.float()
    lead = logits.shape[:-1]
    vocab = logits.shape[-1]
    rows = math.prod(lead)
    device = logits.device
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
    temperature = _per_row("temperature", temperature, rows, torch.float32, device,
                           lambda t: torch.isfinite(t) & (t >= 0))
    top_k = _per_row("top_k", 0 if top_k is None else top_k, rows, torch.int32, device, lambda k: k >= 0)
    top_p = _per_row("top_p", 1.0 if top_p is None else top_p, rows, torch.float32, device,
                     lambda p: (p > 0) & (p <= 1))
    min_p = _per_row("min_p", 0.0 if min_p is None else min_p, rows, torch.float32, device,
                     lambda p: (p >= 0) & (p < 1))
    adaptive = None
    if adaptive_temperature is not None:
        adaptive = tuple(float(v) for v in adaptive_temperature)
        if len(adaptive) != 4 or not (0 <= adaptive[0] <= adaptive[1]) or adaptive[3] < adaptive[2]:
            raise ValueError("adaptive_temperature must be (t_min, t_max, h_low, h_high) with "
                             "0 <= t_min <= t_max and h_low <= h_high")
    seeds = _seeds(seed, generator, rows, device)
    flat = logits.reshape(rows, vocab) if rows else logits.reshape(0, vocab)
    finite_rows = (flat > float("-inf")).any(-1)
    if rows and (bool(torch.isnan(flat).any()) or not bool(finite_rows.all())):
        bad = torch.nonzero(torch.isnan(flat).any(-1) | ~finite_rows).flatten()[:4].tolist()
        raise ValueError(f"logits rows {bad} contain NaN or have no finite entry: nothing to sample from")
    resolved = resolve_backend(backend, device, "sample", logits.dtype)

    if resolved == "torch":
        tokens, logprobs, raw, entropy = reference.sample_reference(flat, temperature, top_k, top_p, min_p, seeds,
                                                                    num_samples, adaptive)
    else:
        rows_view, layout = as_rows(logits)
        tokens = torch.empty(rows, num_samples, dtype=torch.int64, device=device)
        logprobs = torch.empty(rows, num_samples, dtype=torch.float32, device=device)
        raw = torch.empty_like(logprobs)
        entropy = torch.empty(rows, dtype=torch.float32, device=device)
        if rows:
            kernels(resolved, "sample").sample(
                rows_view, layout, vocab, temperature.contiguous(), top_k.contiguous(), top_p.contiguous(),
                min_p.contiguous(), seeds, num_samples, adaptive is not None, *(adaptive or (0.0, 0.0, 0.0, 0.0)),
                tokens, logprobs, raw, entropy,
            )
    shape = tuple(lead) if num_samples == 1 else tuple(lead) + (num_samples,)
    return SampleOutput(tokens.reshape(shape), logprobs.reshape(shape), raw.reshape(shape), entropy.reshape(lead))
