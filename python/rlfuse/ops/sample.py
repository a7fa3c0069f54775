"""``rlfuse::sample``: temperature / top-k / top-p / min-p sampling over ``[..., V]`` logits (docs/SPEC.md
section 8), one pass over each row (kernels.h SampleArgs).

Every per-row parameter is a tensor of one value per row (``rlfuse.sample`` builds them from
scalars or tensors and validates them); ``seeds`` holds each row's int64 key ``seed_r``. Outputs:
``tokens`` (int64), ``logprobs`` and ``raw_logprobs`` (fp32) of shape ``[..., num_samples]``, and
the per-row ``entropy`` ``[...]``. No gradient. The op reads nothing back to the host: rows that
cannot be sampled (NaN, +inf, no finite entry, overflow at the temperature) come back with a NaN
entropy, which ``rlfuse.sample`` turns into its ``ValueError``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import reference
from .._layout import as_rows
from ._fake import ROW, out_op, per_row
from ._launch import kernels


@out_op("rlfuse::sample", per_row("num_samples", torch.int64), per_row("num_samples"), per_row("num_samples"), ROW)
def sample(logits: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor, min_p: Tensor, seeds: Tensor,
           num_samples: int, adaptive: list[float] | None, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    lead, vocab = logits.shape[:-1], logits.shape[-1]
    rows = math.prod(lead)
    device = logits.device
    if backend == "torch":
        tokens, logprobs, raw, entropy = reference.sample_reference(
            logits.reshape(rows, vocab), temperature, top_k, top_p, min_p, seeds, num_samples,
            None if adaptive is None else tuple(adaptive))
    else:
        tokens = torch.empty(rows, num_samples, dtype=torch.int64, device=device)
        logprobs = torch.empty(rows, num_samples, dtype=torch.float32, device=device)
        raw = torch.empty(rows, num_samples, dtype=torch.float32, device=device)
        entropy = torch.empty(rows, dtype=torch.float32, device=device)
        if rows:
            rows_view, layout = as_rows(logits)
            t_min, t_max, h_low, h_high = adaptive or (0.0, 0.0, 0.0, 0.0)
            kernels(backend, "sample").sample(
                logits=rows_view, layout=layout, vocab=vocab, temperature=temperature.contiguous(),
                top_k=top_k.contiguous(), top_p=top_p.contiguous(), min_p=min_p.contiguous(), seed=seeds.contiguous(),
                num_samples=num_samples, adaptive=adaptive is not None, t_min=t_min, t_max=t_max, h_low=h_low,
                h_high=h_high, tokens=tokens, logprobs=logprobs, raw_logprobs=raw, entropy=entropy,
            )
    shape = (*lead, num_samples)
    return tokens.reshape(shape), logprobs.reshape(shape), raw.reshape(shape), entropy.reshape(lead)
