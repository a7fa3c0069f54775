"""``rlfuse::sample``: temperature / top-k / top-p / min-p sampling over ``[..., V]`` logits (docs/SPEC.md
section 8), one pass over each row (kernels.h SampleArgs).

Every per-row parameter is a tensor of one value per row (``rlfuse.sample`` builds them from
scalars or tensors and validates them); ``seeds`` holds each row's int64 key ``seed_r``. Outputs:
``tokens`` (int64), ``logprobs`` and ``raw_logprobs`` (fp32) of shape ``[..., num_samples]``, and
the per-row ``entropy`` ``[...]``. No gradient. The op reads nothing back to the host: rows that
cannot be sampled (NaN, +inf, no finite entry, overflow at the temperature) come back with a NaN
entropy, which ``rlfuse.sample`` turns into its ``ValueError``.

``rlfuse::sample_score`` runs the same kernel in score mode (docs/SPEC.md section 8, "Scoring"): the
given tokens instead of draws, and the row's kept-set threshold.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import reference
from ..reference.sampling import score_reference
from .._layout import as_rows
from ._fake import ROW, out_op, per_row
from ._launch import kernels


def _launch(backend, logits, temperature, top_k, top_p, min_p, seeds, num_samples, adaptive, outputs, **score):
    """The sample kernel on 2-D ``outputs`` (tokens, logprobs, raw_logprobs, entropy); ``score``: the
    optional score_tokens / kept_min pointers."""
    rows_view, layout = as_rows(logits)
    if layout[0] == 0:
        return
    t_min, t_max, h_low, h_high = adaptive or (0.0, 0.0, 0.0, 0.0)
    tokens, logprobs, raw, entropy = outputs
    kernels(backend, "sample").sample(
        logits=rows_view, layout=layout, vocab=logits.shape[-1], temperature=temperature.contiguous(),
        top_k=top_k.contiguous(), top_p=top_p.contiguous(), min_p=min_p.contiguous(), seed=seeds.contiguous(),
        num_samples=num_samples, adaptive=adaptive is not None, t_min=t_min, t_max=t_max, h_low=h_low,
        h_high=h_high, tokens=tokens, logprobs=logprobs, raw_logprobs=raw, entropy=entropy, **score,
    )


def _row_outputs(rows, num_samples, device):
    """Empty (tokens, logprobs, raw_logprobs [rows, num_samples], entropy [rows])."""
    def empty(*shape, dtype=torch.float32):
        return torch.empty(shape, dtype=dtype, device=device)
    return (empty(rows, num_samples, dtype=torch.int64), empty(rows, num_samples), empty(rows, num_samples),
            empty(rows))


@out_op("rlfuse::sample", per_row("num_samples", torch.int64), per_row("num_samples"), per_row("num_samples"), ROW)
def sample(logits: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor, min_p: Tensor, seeds: Tensor,
           num_samples: int, adaptive: list[float] | None, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    lead, vocab = logits.shape[:-1], logits.shape[-1]
    rows = math.prod(lead)
    if backend == "torch":
        tokens, logprobs, raw, entropy = reference.sample_reference(
            logits.reshape(rows, vocab), temperature, top_k, top_p, min_p, seeds, num_samples,
            None if adaptive is None else tuple(adaptive))
    else:
        tokens, logprobs, raw, entropy = outputs = _row_outputs(rows, num_samples, logits.device)
        _launch(backend, logits, temperature, top_k, top_p, min_p, seeds, num_samples, adaptive, outputs)
    shape = (*lead, num_samples)
    return tokens.reshape(shape), logprobs.reshape(shape), raw.reshape(shape), entropy.reshape(lead)


@out_op("rlfuse::sample_score", ROW, ROW, ROW, ROW)
def sample_score(logits: Tensor, tokens: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor, min_p: Tensor,
                 adaptive: list[float] | None, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The sampler in score mode (kernels.h SampleArgs score_tokens): ``tokens`` [...] (int64, one per
    row) are scored instead of drawn. Returns ``(logprobs, raw_logprobs, entropy, kept_min)`` [...]:
    the log-prob a draw of the token gets (bit for bit on the same backend; -inf outside the kept
    set, NaN for an id outside [0, V)), the unfiltered one, the unfiltered entropy and the row's
    threshold on x (-inf: nothing filtered; greedy rows: the maximum)."""
    lead, vocab = logits.shape[:-1], logits.shape[-1]
    rows = math.prod(lead)
    flat_tokens = tokens.reshape(rows).to(torch.int64).contiguous()
    if backend == "torch":
        logprobs, raw, entropy, kept_min = score_reference(
            logits.reshape(rows, vocab), flat_tokens, temperature, top_k, top_p, min_p,
            None if adaptive is None else tuple(adaptive))
    else:
        outputs = _row_outputs(rows, 1, logits.device)
        _, logprobs, raw, entropy = outputs
        kept_min = torch.empty(rows, dtype=torch.float32, device=logits.device)
        seeds = torch.zeros(rows, dtype=torch.int64, device=logits.device)  # no draw: never read for randomness
        _launch(backend, logits, temperature, top_k, top_p, min_p, seeds, 1, adaptive, outputs,
                score_tokens=flat_tokens, kept_min=kept_min)
    return logprobs.reshape(lead), raw.reshape(lead), entropy.reshape(lead), kept_min.reshape(lead)
