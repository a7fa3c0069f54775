"""rlfuse.sample: statistical tests against the exact filtered distribution, plus exact outputs."""

from __future__ import annotations

import math

import pytest
import torch

import rlfuse
from rlfuse._layout import as_rows
from rlfuse.ops._launch import kernels
from rlfuse.reference.sampling import kept_mask
from conftest import kernel_backends

BACKENDS = kernel_backends("cpu")
DRAWS = 100_000
requires_cpu_and_triton = pytest.mark.skipif(
    not {"cpu", "triton"} <= set(BACKENDS), reason="needs the CPU kernels and Triton (interpreter)")

MODES = {
    "temperature": dict(temperature=0.7),
    "top_k": dict(temperature=1.0, top_k=5),
    "top_p": dict(temperature=1.2, top_p=0.8),
    "min_p": dict(temperature=0.9, min_p=0.05),
    "combined": dict(temperature=0.8, top_k=8, top_p=0.9, min_p=0.02),
    "adaptive": dict(adaptive_temperature=(0.5, 1.5, 1.0, 2.5)),
}


def _row(generator, vocab=12):
    return torch.randn(1, vocab, generator=generator) * 1.5


def exact_distribution(logits, temperature=1.0, top_k=None, top_p=None, min_p=None, adaptive_temperature=None):
    """Filtered, renormalised probabilities of one row, float64, from a sort-based computation."""
    x = logits.double()
    if adaptive_temperature is not None:
        t_min, t_max, h_low, h_high = adaptive_temperature
        p1 = torch.softmax(x, -1)
        h = -(p1 * p1.log()).sum(-1)
        temperature = t_min + (t_max - t_min) * float(((h - h_low) / (h_high - h_low)).clamp(0, 1))
    x = x / temperature
    rows = x.shape[0]
    keep = kept_mask(x, torch.full((rows,), top_k or 0), torch.full((rows,), top_p or 1.0),
                     torch.full((rows,), min_p or 0.0))
    return torch.softmax(x.masked_fill(~keep, float("-inf")), -1)[0], torch.log_softmax(x, -1)[0], temperature


def chi_square_critical(df: int, alpha_z: float = 3.72) -> float:
    """Upper quantile of chi-square(df) at p ~ 1e-4 (Wilson-Hilferty approximation)."""
    return df * (1 - 2 / (9 * df) + alpha_z * math.sqrt(2 / (9 * df))) ** 3


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", sorted(MODES))
def test_frequencies_match_the_filtered_distribution(backend, mode, generator):
    logits = _row(generator)
    params = MODES[mode]
    out = rlfuse.sample(logits, seed=11, num_samples=DRAWS, backend=backend, **params)
    probs, _, _ = exact_distribution(logits, **params)
    counts = torch.bincount(out.tokens.reshape(-1), minlength=logits.shape[-1]).double()
    assert counts[probs == 0].sum() == 0, "drew a token outside the filtered set"
    kept = probs > 0
    expected = probs[kept] * DRAWS
    statistic = ((counts[kept] - expected) ** 2 / expected).sum().item()
    df = max(int(kept.sum()) - 1, 1)
    assert statistic < chi_square_critical(df), (statistic, counts[kept], expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", sorted(MODES))
def test_returned_logprobs_and_entropy_are_exact(backend, mode, generator):
    logits = _row(generator, 40).repeat(3, 1)
    params = MODES[mode]
    out = rlfuse.sample(logits, seed=5, num_samples=7, backend=backend, **params)
    probs, raw_log_probs, temperature = exact_distribution(logits[:1], **params)
    tokens = out.tokens[0]
    torch.testing.assert_close(out.logprobs[0].double(), probs.log()[tokens], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(out.raw_logprobs[0].double(), raw_log_probs[tokens], atol=2e-5, rtol=1e-5)
    p = raw_log_probs.exp()
    torch.testing.assert_close(out.entropy[0].double(), -(p * raw_log_probs).sum(), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_seed_same_tokens_and_rows_independent_of_batch(backend, generator):
    logits = torch.randn(6, 300, generator=generator) * 2
    seeds = torch.tensor([3, 99, 7, 12, 5, 1])
    first = rlfuse.sample(logits, top_p=0.9, seed=seeds, num_samples=4, backend=backend)
    again = rlfuse.sample(logits, top_p=0.9, seed=seeds, num_samples=4, backend=backend)
    assert torch.equal(first.tokens, again.tokens)
    alone = rlfuse.sample(logits[3:4], top_p=0.9, seed=seeds[3:4], num_samples=4, backend=backend)
    assert torch.equal(alone.tokens[0], first.tokens[3])
    other = rlfuse.sample(logits, top_p=0.9, seed=seeds + 1, num_samples=4, backend=backend)
    assert not torch.equal(other.tokens, first.tokens)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kernel_matches_reference_draws(backend, generator):
    """Same counter-based random numbers: the kernels' tokens equal the reference's."""
    logits = (torch.randn(5, 257, generator=generator) * 2).bfloat16()
    kwargs = dict(temperature=torch.tensor([0.5, 1.0, 1.3, 0.8, 1.0]), top_k=torch.tensor([0, 10, 300, 3, 50]),
                  top_p=0.95, min_p=0.01, seed=42, num_samples=6)
    ours = rlfuse.sample(logits, backend=backend, **kwargs)
    ref = rlfuse.sample(logits, backend="torch", **kwargs)
    assert (ours.tokens == ref.tokens).float().mean() > 0.99  # Gumbel vs race may flip exact near-ties
    torch.testing.assert_close(ours.entropy, ref.entropy, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_edge_parameters(backend, generator):
    logits = torch.randn(4, 30, generator=generator) * 2
    plain = rlfuse.sample(logits, seed=1, num_samples=20, backend=backend)
    for kwargs in (dict(top_k=30), dict(top_k=1000), dict(top_p=1.0), dict(min_p=0.0)):
        out = rlfuse.sample(logits, seed=1, num_samples=20, backend=backend, **kwargs)
        assert torch.equal(out.tokens, plain.tokens), kwargs
    argmax = logits.argmax(-1, keepdim=True).expand(4, 20)
    assert torch.equal(rlfuse.sample(logits, top_p=1e-6, seed=1, num_samples=20, backend=backend).tokens, argmax)
    greedy = rlfuse.sample(logits, temperature=0.0, seed=1, num_samples=20, backend=backend)
    assert torch.equal(greedy.tokens, argmax) and torch.all(greedy.logprobs == 0)
    torch.testing.assert_close(greedy.raw_logprobs[:, 0], torch.log_softmax(logits, -1).gather(-1, argmax[:, :1])[:, 0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_at_the_threshold_are_all_kept(backend):
    logits = torch.tensor([[3.0, 1.0, 1.0, 1.0, -2.0]])
    out = rlfuse.sample(logits, top_k=2, seed=0, num_samples=4000, backend=backend)
    counts = torch.bincount(out.tokens.reshape(-1), minlength=5)
    assert counts[4] == 0 and (counts[1:4] > 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_minus_inf_entries_never_drawn(backend, generator):
    logits = torch.randn(3, 64, generator=generator)
    logits[:, ::3] = float("-inf")
    out = rlfuse.sample(logits, seed=2, num_samples=500, top_p=0.99, backend=backend)
    assert torch.all(out.tokens % 3 != 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_or_empty_rows_raise(backend):
    for bad in ([[0.0, float("nan")], [1.0, 2.0]], [[0.0, 1.0], [float("-inf"), float("-inf")]]):
        with pytest.raises(ValueError, match="contain NaN or have no finite entry"):
            rlfuse.sample(torch.tensor(bad), seed=0, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_rows_match_contiguous(backend, generator):
    """A [3, 4, V] view with permuted leading dims (row layout without a copy) draws as its copy."""
    base = torch.randn(3, 2, 40, generator=generator) * 2
    view = base.transpose(0, 1)
    seeds = torch.arange(6) * 7 + 1
    kwargs = dict(top_k=torch.tensor([0, 5, 0, 0, 60, 0]), seed=seeds, num_samples=3, backend=backend)
    out = rlfuse.sample(view, **kwargs)
    ref = rlfuse.sample(view.contiguous(), **kwargs)
    assert out.tokens.shape == (2, 3, 3)
    assert torch.equal(out.tokens, ref.tokens)
    torch.testing.assert_close(out.entropy, ref.entropy)


# Triton against the CPU kernel, at the kernel level (launch overrides exercise multi-chunk rows
# and partial draw blocks). Same counter-based random numbers and thresholds: equal tokens except
# at float near-ties, which these seeded inputs do not have.
def _kernel_draws(backend, logits, temperature, top_k, top_p, min_p, seeds, num_samples, adaptive=None,
                  **overrides):
    rows_view, layout = as_rows(logits)
    rows, vocab = layout[0], logits.shape[-1]
    tokens = torch.empty(rows, num_samples, dtype=torch.int64)
    logprobs = torch.empty(rows, num_samples)
    raw = torch.empty(rows, num_samples)
    entropy = torch.empty(rows)
    kernels(backend, "sample").sample(
        rows_view, layout, vocab, temperature.float(), top_k.int(), top_p.float(), min_p.float(), seeds, num_samples,
        adaptive is not None, *(adaptive or (0.0, 0.0, 0.0, 0.0)), tokens, logprobs, raw, entropy, **overrides)
    return tokens, logprobs, raw, entropy


def _mixed_rows(generator, dtype, vocab=200):
    logits = torch.randn(8, vocab, generator=generator) * 2.5
    logits[2, ::5] = float("-inf")
    logits[4, 100:] = float("-inf")  # top_k 150 > #finite entries: every finite one kept
    logits[3, 17] = logits[3, 60] = logits[3].max() + 1  # greedy tie: the lower id
    params = dict(
        temperature=torch.tensor([1.0, 0.7, 1.3, 0.0, 1.0, 0.9, 1.1, 0.8]),
        top_k=torch.tensor([0, 5, 0, 3, 150, 20, 1, 0]),
        top_p=torch.tensor([1.0, 1.0, 0.8, 0.5, 0.9, 0.95, 1.0, 1e-6]),
        min_p=torch.tensor([0.0, 0.0, 0.0, 0.1, 0.05, 0.02, 0.0, 0.3]),
        seeds=torch.arange(8, dtype=torch.int64) * 1_000_003 - 4,  # negative seeds too
    )
    return logits.to(dtype), params


def _assert_same_draws(ours, ref):
    assert torch.equal(ours[0], ref[0])
    for a, b in zip(ours[1:], ref[1:]):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)


@requires_cpu_and_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_tokens_equal_cpu_tokens(dtype, generator):
    logits, params = _mixed_rows(generator, dtype)
    ref = _kernel_draws("cpu", logits, num_samples=5, **params)
    assert torch.equal(ref[0][3], torch.full((5,), 17))
    _assert_same_draws(_kernel_draws("triton", logits, num_samples=5, **params), ref)


@requires_cpu_and_triton
@pytest.mark.parametrize("block_v, s_block", [(64, 1), (64, 4)])
def test_triton_launch_configs_equal_cpu(block_v, s_block, generator):
    """Multi-chunk rows (V = 200 over 64-wide chunks), one draw per pass (the GPU path for large
    vocabularies) and a partial last draw block (5 draws, 4 per pass)."""
    logits, params = _mixed_rows(generator, torch.float32)
    ref = _kernel_draws("cpu", logits, num_samples=5, **params)
    _assert_same_draws(_kernel_draws("triton", logits, num_samples=5, block_v=block_v, s_block=s_block, **params),
                       ref)


@requires_cpu_and_triton
@pytest.mark.parametrize("adaptive", [(0.5, 1.5, 1.0, 2.5), (0.0, 2.0, 3.0, 3.0)])
def test_triton_adaptive_temperature_equals_cpu(adaptive, generator):
    """Including h_low == h_high (a step at h_high) and t_min = 0 (greedy below it)."""
    logits = torch.randn(6, 50, generator=generator) * torch.tensor([0.1, 0.5, 1.0, 2.0, 4.0, 8.0])[:, None]
    zeros = torch.zeros(6)
    params = dict(temperature=torch.ones(6), top_k=torch.zeros(6, dtype=torch.int32), top_p=torch.ones(6),
                  min_p=zeros, seeds=torch.arange(6, dtype=torch.int64) + 9, adaptive=adaptive)
    ref = _kernel_draws("cpu", logits, num_samples=4, **params)
    _assert_same_draws(_kernel_draws("triton", logits, num_samples=4, **params), ref)


def test_bad_input():
    x = torch.randn(2, 10)
    with pytest.raises(ValueError, match="contain NaN or have no finite entry"):
        rlfuse.sample(torch.tensor([[0.0, float("nan")], [1.0, 2.0]]))
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        rlfuse.sample(torch.tensor([[0.0, 1.0], [float("-inf"), float("-inf")]]))
    with pytest.raises(ValueError, match="temperature has values out of range"):
        rlfuse.sample(x, temperature=-1.0)
    with pytest.raises(ValueError, match="top_p has values out of range"):
        rlfuse.sample(x, top_p=0.0)
    with pytest.raises(ValueError, match="min_p has values out of range"):
        rlfuse.sample(x, min_p=1.0)
    with pytest.raises(ValueError, match="top_k has values out of range"):
        rlfuse.sample(x, top_k=-2)
    with pytest.raises(ValueError, match="one value per row"):
        rlfuse.sample(x, temperature=torch.ones(3))
    with pytest.raises(ValueError, match="adaptive_temperature"):
        rlfuse.sample(x, adaptive_temperature=(1.0, 0.5, 0.0, 1.0))
    with pytest.raises(ValueError, match="seed or generator"):
        rlfuse.sample(x, seed=1, generator=torch.Generator())
    with pytest.raises(ValueError, match="num_samples"):
        rlfuse.sample(x, num_samples=0)


def test_generator_seeding_is_reproducible():
    x = torch.randn(3, 20)
    a = rlfuse.sample(x, generator=torch.Generator().manual_seed(5), num_samples=10)
    b = rlfuse.sample(x, generator=torch.Generator().manual_seed(5), num_samples=10)
    assert torch.equal(a.tokens, b.tokens)
