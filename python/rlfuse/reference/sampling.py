"""Plain-PyTorch sampling (docs/SPEC.md section 8): sort-based filtering, the same counter-based random
numbers as the kernels (row_math.h rng_bits), Gumbel-max. The test oracle and the ``torch`` backend."""

from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF


def _mix32(h: torch.Tensor) -> torch.Tensor:
    """lowbias32 on int64 tensors holding uint32 values."""
    h = h ^ (h >> 16)
    h = (h * 0x7FEB352D) & MASK32
    h = h ^ (h >> 15)
    h = (h * 0x846CA68B) & MASK32
    return h ^ (h >> 16)


def rng_uniform(seed: torch.Tensor, num_samples: int, vocab: int) -> torch.Tensor:
    """u[row, sample, j] in (0, 1) for per-row int64 seeds, bit-exact with the kernels' rng_uniform."""
    seed = seed.to(torch.int64)
    low, high = seed & MASK32, (seed >> 32) & MASK32
    key = _mix32(_mix32(low ^ 0x9E3779B9) ^ high)
    samples = torch.arange(num_samples, dtype=torch.int64, device=seed.device)
    key = _mix32(key.unsqueeze(-1) ^ samples)  # [rows, S]
    j = torch.arange(vocab, dtype=torch.int64, device=seed.device)
    bits = _mix32((key.unsqueeze(-1) + j * 0x9E3779B9) & MASK32)
    return ((bits >> 9).to(torch.float32) + 0.5) * 1.1920928955078125e-7  # exact: never 0 or 1


def kept_threshold(x: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """The threshold ``tau = max(t_k, t_p, t_m)`` of docs/SPEC.md section 8 on scaled logits x [rows, V]:
    the kept set is ``{j : x_j >= tau}`` (ties at thresholds kept)."""
    vocab = x.shape[-1]
    minus_inf = torch.full(x.shape[:-1], float("-inf"), dtype=x.dtype, device=x.device)
    values = torch.sort(x, dim=-1, descending=True).values
    k = top_k.to(torch.int64)
    use_k = (k > 0) & (k < vocab)
    t_k = values.gather(-1, (k.clamp(1, vocab) - 1).unsqueeze(-1)).squeeze(-1)
    t_k = torch.where(use_k, t_k, minus_inf)
    # top-p over the survivors: the smallest prefix of the sorted survivors with mass >= p * their mass.
    probs = torch.softmax(values.double(), -1)
    surviving = values >= t_k.unsqueeze(-1)
    mass = torch.where(surviving, probs, 0.0)
    cumulative = mass.cumsum(-1)
    total = mass.sum(-1, keepdim=True)
    needed = cumulative >= top_p.double().unsqueeze(-1) * total
    first = torch.where(needed.any(-1), needed.int().argmax(-1), torch.zeros_like(k))
    t_p = values.gather(-1, first.unsqueeze(-1)).squeeze(-1)
    t_p = torch.where(top_p < 1.0, t_p, minus_inf)
    t_min = x.max(-1).values + torch.log(min_p.clamp(min=1e-38))
    t_min = torch.where(min_p > 0, t_min, minus_inf)
    return torch.maximum(torch.maximum(t_k, t_p), t_min)


def kept_mask(x: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """The kept set of docs/SPEC.md section 8 on scaled logits x [rows, V] (ties at thresholds kept)."""
    return x >= kept_threshold(x, top_k, top_p, min_p).unsqueeze(-1)


def _entropy(log_p: torch.Tensor) -> torch.Tensor:
    """Entropy per row of log-probabilities; -inf entries contribute 0 (0 * -inf := 0), NaN (a row
    with NaN, +inf or no finite entry) propagates, as docs/SPEC.md section 1 says: ``rlfuse.sample``
    rejects the rows whose entropy is NaN."""
    return -(torch.where(torch.isneginf(log_p), 0.0, log_p.exp() * log_p)).sum(-1)


def row_temperature(logits, temperature, adaptive):
    if adaptive is None:
        return temperature
    t_min, t_max, h_low, h_high = adaptive
    h1 = _entropy(torch.log_softmax(logits.float(), -1))
    w = ((h1 - h_low) / (h_high - h_low)).clamp(0.0, 1.0) if h_high > h_low else (h1 >= h_high).float()
    return t_min + (t_max - t_min) * w


def _filtered(logits, temperature, top_k, top_p, min_p, adaptive):
    """What a draw and a score share: (x, greedy [rows], log p, entropy, tau [rows], kept log p)."""
    temperature = row_temperature(logits, temperature, adaptive)
    greedy = temperature == 0
    scale = torch.where(greedy, torch.ones_like(temperature), temperature)
    # x = z * (1 / T) with 1 / T rounded once to fp32, as the kernels (and sample()'s overflow check).
    x = logits.float() * torch.reciprocal(scale.float()).unsqueeze(-1)
    log_p = torch.log_softmax(x, -1)
    tau = kept_threshold(x, top_k, top_p, min_p)
    kept_log_p = torch.log_softmax(x.masked_fill(~(x >= tau.unsqueeze(-1)), float("-inf")), -1)
    return x, greedy, log_p, _entropy(log_p), tau, kept_log_p


def sample_reference(logits, temperature, top_k, top_p, min_p, seed, num_samples=1, adaptive=None):
    """(tokens [rows, S], logprobs, raw_logprobs [rows, S], entropy [rows]) for 2-D logits and per-row
    parameter tensors."""
    x, greedy, log_p, entropy, tau, kept_log_p = _filtered(logits, temperature, top_k, top_p, min_p, adaptive)
    keep = x >= tau.unsqueeze(-1)
    gumbel = -torch.log(-torch.log(rng_uniform(seed, num_samples, x.shape[-1])))  # [rows, S, V]
    drawn = torch.argmax((x.unsqueeze(1) + gumbel).masked_fill(~keep.unsqueeze(1), float("-inf")), -1)
    drawn = torch.where(greedy.unsqueeze(-1), torch.argmax(x, -1, keepdim=True), drawn)  # [rows, S]
    logprobs = torch.where(greedy.unsqueeze(-1), 0.0, kept_log_p.gather(-1, drawn))
    return drawn, logprobs, log_p.gather(-1, drawn), entropy


def score_reference(logits, tokens, temperature, top_k, top_p, min_p, adaptive=None):
    """Score mode of the sampler (kernels.h SampleArgs score_tokens) for 2-D logits and per-row
    tokens: (logprobs, raw_logprobs, entropy, kept_min) [rows]. A token gets the log-prob a draw of
    it would get, -inf outside the kept set (greedy rows: the first maximum alone), NaN when out of
    range; kept_min is tau, -inf when it filters nothing, the maximum for greedy rows."""
    x, greedy, log_p, entropy, tau, kept_log_p = _filtered(logits, temperature, top_k, top_p, min_p, adaptive)
    vocab = x.shape[-1]
    tokens = tokens.to(torch.int64)
    in_range = (tokens >= 0) & (tokens < vocab)
    index = tokens.clamp(0, vocab - 1).unsqueeze(-1)
    first_max = torch.argmax(x, -1)
    greedy_logprob = torch.where(tokens == first_max, 0.0, float("-inf"))
    logprobs = torch.where(greedy, greedy_logprob, kept_log_p.gather(-1, index).squeeze(-1))
    nan = torch.full_like(logprobs, float("nan"))
    raw = log_p.gather(-1, index).squeeze(-1)
    smallest = x.masked_fill(~torch.isfinite(x), float("inf")).amin(-1)
    row_max = x.amax(-1)
    kept_min = torch.where(greedy, row_max, torch.where(tau > smallest, tau, float("-inf")))
    return torch.where(in_range, logprobs, nan), torch.where(in_range, raw, nan), entropy, kept_min
