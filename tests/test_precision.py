"""Precision at large logits (issue 13, item 7): log-probs, entropies, KL and their gradients of
``offset + randn`` rows, fp32, with offsets up to +-1e4, against float64 math written here.

An fp32 lse is rounded at its own scale (half an ulp of 1e4 is ~5e-4), so ``logp = x_y - lse``
lost ~4e-4 at |z| = 1e4; the exact form is ``(x_y - max) - log_sum``. The tolerances below are
relative to the quantity (a few fp32 ulps of |logp|, H, the KL terms, the gradient), never to the
offset. Temperatures are powers of two, so x = z / T is exact in fp32 on every backend (each
backend rounds z / T its own way otherwise, an error of the offset's own scale).

The backward kernels (cpu, triton) receive the forward's lse as one fp32 number per row (the ops'
saved state), so their gradients carry its rounding, relative |lse| * 2^-24 of each p_j: tested
within that allowance here, and against the strict bound as a known limitation (xfail).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rlfuse
from conftest import kernel_backends

BACKENDS = kernel_backends("cpu")
KERNEL_BACKENDS = [b for b in BACKENDS if b != "torch"]
EPS = 2.0**-24  # fp32 unit roundoff
RTOL = 4e-6  # ~70 ulps of the quantity: summing <= 48 exponentials, each a few ulps off
ATOL = 1e-6  # log(sum) of a sum near 1 is off by ~eps absolute, whatever the offset
PROPERTY = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --- float64 oracle ------------------------------------------------------------------------------

def log_softmax64(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    m = x.max(-1, keepdim=True).values
    return (x - m) - (x - m).exp().sum(-1, keepdim=True).log()


def entropy64(log_p: torch.Tensor) -> torch.Tensor:
    return -(log_p.exp() * log_p).sum(-1)


def assert_close_relative(got, expected, rtol=RTOL, atol=ATOL, allowance=None, what=""):
    got, expected = got.double(), expected.double()
    bound = rtol * expected.abs() + atol
    if allowance is not None:
        bound = bound + allowance
    excess = (got - expected).abs() - bound
    assert excess.max() <= 0, (
        f"{what}: worst error {float((got - expected).abs().max()):.3g} exceeds the bound by {float(excess.max()):.3g}")


@st.composite
def offset_rows(draw, max_rows=3, max_vocab=48):
    """fp32 logits offset + scale * randn, the offset per row in [-1e4, 1e4]."""
    rows = draw(st.integers(1, max_rows))
    vocab = draw(st.integers(2, max_vocab))
    seed = draw(st.integers(0, 2**32 - 1))
    offsets = draw(st.lists(st.one_of(st.floats(-1e4, 1e4), st.sampled_from([1e4, -1e4, 9999.5, 0.0])),
                            min_size=rows, max_size=rows))
    scale = draw(st.sampled_from([0.1, 1.0, 3.0, 8.0]))
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((rows, vocab)) * scale
    logits = torch.from_numpy((np.array(offsets)[:, None] + noise).astype(np.float32))
    tokens = torch.from_numpy(rng.integers(0, vocab, rows))
    other = torch.from_numpy((np.array(offsets)[:, None] + rng.standard_normal((rows, vocab)) * scale
                              ).astype(np.float32))
    return logits, other, tokens, rng


TEMPERATURES = st.sampled_from([1.0, 0.5, 2.0])


# --- regression ----------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_logprob_at_1e4_is_exact(backend):
    """cpu and torch gave -0.34863 (x_y - lse with an fp32 lse); exact: -0.3490122."""
    logits = torch.tensor([[1e4, 1e4 - 1, 1e4 - 3, 0, -5]])
    logp, entropy = rlfuse.token_logprobs(logits, torch.tensor([0]), return_entropy=True, backend=backend)
    log_p = log_softmax64(logits)
    assert abs(float(logp) - -0.34901221676818633) < 1e-6
    assert_close_relative(logp, log_p[:, 0], what="logp")
    assert_close_relative(entropy, entropy64(log_p), what="entropy")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_kl_at_1e4_is_exact(backend, direction):
    logits = torch.tensor([[1e4, 1e4 - 1, 1e4 - 3, 1e4 - 0.5]])
    other = torch.tensor([[1e4 - 2, 1e4, 1e4 - 1, 1e4 - 0.25]])
    log_p, log_q = log_softmax64(logits), log_softmax64(other)
    a, b = (log_p, log_q) if direction == "forward" else (log_q, log_p)
    expected = (a.exp() * (a - b)).sum(-1)
    kl = rlfuse.kl_divergence(logits, other, direction, backend=backend)
    assert_close_relative(kl, expected, what="kl")


@pytest.mark.parametrize("backend", BACKENDS)
def test_sample_logprobs_at_1e4_are_exact(backend):
    logits = torch.tensor([[1e4, 1e4 - 1, 1e4 - 3, 0, -5]])
    out = rlfuse.sample(logits, top_k=2, seed=0, num_samples=16, backend=backend)
    log_p = log_softmax64(logits)[0]
    kept = log_softmax64(logits[:, :2])[0]
    assert_close_relative(out.raw_logprobs[0], log_p[out.tokens[0]], what="raw_logprobs")
    assert_close_relative(out.logprobs[0], kept[out.tokens[0]], what="logprobs")
    assert_close_relative(out.entropy, entropy64(log_p[None]), what="entropy")


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_backend_gradient_at_1e4_is_exact(backend):
    """The torch backend formed log p = x - lse in its backward too; the kernels get the fp32 lse
    from the forward (see the module docstring), so they are held to this only on 'torch'."""
    logits = torch.tensor([[1e4, 1e4 - 1, 1e4 - 3, 1e4 - 0.5]])
    tokens, a, b = torch.tensor([1]), torch.tensor([1.0]), torch.tensor([0.5])
    grad = _logprob_gradient(logits, tokens, 1.0, backend, a, b)
    expected = _logprob_gradient64(logits, tokens, 1.0, a, b)
    terms = _logprob_gradient_terms(logits, tokens, 1.0, a, b)
    _check_gradient(grad, expected, terms, None if backend == "torch" else _lse_digits(1.0, logits))


@pytest.mark.parametrize("backend", [pytest.param(b, marks=pytest.mark.xfail(
    strict=True, reason="the backward kernels receive the forward's lse as one fp32 per row (ops' saved "
                        "state: cpu row_kernels.h row_gradient, triton_kernels token_logprobs/kl_div), whose "
                        "rounding (|lse| * 2^-24) reaches every p_j")) for b in KERNEL_BACKENDS])
def test_kernel_gradient_at_1e4_known_limitation(backend):
    logits = torch.tensor([[1e4, 1e4 - 1, 1e4 - 3, 1e4 - 0.5]])
    tokens, a, b = torch.tensor([1]), torch.tensor([1.0]), torch.tensor([0.5])
    grad = _logprob_gradient(logits, tokens, 1.0, backend, a, b)
    expected = _logprob_gradient64(logits, tokens, 1.0, a, b)
    _check_gradient(grad, expected, _logprob_gradient_terms(logits, tokens, 1.0, a, b))


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_logprobs_entropy_of_huge_logits(backend):
    """Valid fp32 rows whose max is above ~1e31 (the sampler's statistics had the same NaN)."""
    logits = torch.tensor([[0.0] * 7 + [3e38], [1e31, 1e31] + [0.0] * 6, [-3e38] * 7 + [3e38]])
    logp, entropy = rlfuse.token_logprobs(logits, torch.tensor([7, 0, 7]), return_entropy=True, backend=backend)
    torch.testing.assert_close(logp, torch.tensor([0.0, -float(np.log(2)), 0.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(entropy, torch.tensor([0.0, float(np.log(2)), 0.0]), atol=1e-6, rtol=0)


# --- properties ----------------------------------------------------------------------------------

def _logprob_gradient(logits, tokens, temperature, backend, a, b):
    x = logits.clone().requires_grad_(True)
    logp, entropy = rlfuse.token_logprobs(x, tokens, temperature=temperature, return_entropy=True, backend=backend)
    (a * logp + b * entropy).sum().backward()
    return x.grad


def _logprob_gradient64(logits, tokens, temperature, a, b):
    x = logits.double().requires_grad_(True)
    log_p = log_softmax64(x / temperature)
    logp = log_p.gather(-1, tokens[:, None])[:, 0]
    (a.double() * logp + b.double() * entropy64(log_p)).sum().backward()
    return x.grad


def _lse_digits(temperature, *rows):
    """Relative rounding of one saved fp32 lse per row and distribution: sum |lse| * 2^-24."""
    return sum(torch.logsumexp(r.double() / temperature, -1).abs() for r in rows)[:, None] * EPS


def _logprob_gradient_terms(logits, tokens, temperature, a, b):
    """Per entry, the size of the terms the gradient a (1[j=y] - p_j) - b p_j (log p_j + H),
    divided by T, is made of: the scale of its fp32 rounding, free of the offset."""
    log_p = log_softmax64(logits.double() / temperature)
    p, h = log_p.exp(), entropy64(log_p)[:, None]
    target = torch.zeros_like(p).scatter_(-1, tokens[:, None], 1.0)
    a, b = a.double()[:, None].abs(), b.double()[:, None].abs()
    return (a * (target + p) + b * p * (log_p.abs() + h + 1)) / temperature


def _check_gradient(got, expected, terms, lse_digits=None, what="gradient"):
    """|error_j| <= RTOL * terms_j (+ the saved lse's rounding, relative, for the kernels); 1e-30
    absolute for entries whose p_j is below fp32's range."""
    allowance = 1e-30 if lse_digits is None else 1e-30 + 4 * lse_digits * terms
    assert_close_relative(got, expected, rtol=0, atol=RTOL * terms, allowance=allowance, what=what)


@pytest.mark.parametrize("backend", BACKENDS)
@PROPERTY
@given(case=offset_rows(), temperature=TEMPERATURES)
def test_property_logprobs_entropy_and_gradient(backend, case, temperature):
    logits, _, tokens, rng = case
    log_p = log_softmax64(logits.double() / temperature)
    logp, entropy = rlfuse.token_logprobs(logits, tokens, temperature=temperature, return_entropy=True,
                                          backend=backend)
    assert_close_relative(logp, log_p.gather(-1, tokens[:, None])[:, 0], what="logp")
    assert_close_relative(entropy, entropy64(log_p), what="entropy")

    rows = logits.shape[0]
    a = torch.from_numpy(rng.uniform(-2, 2, rows).astype(np.float32))
    b = torch.from_numpy(rng.uniform(-2, 2, rows).astype(np.float32))
    grad = _logprob_gradient(logits, tokens, temperature, backend, a, b)
    expected = _logprob_gradient64(logits, tokens, temperature, a, b)
    terms = _logprob_gradient_terms(logits, tokens, temperature, a, b)
    _check_gradient(grad, expected, terms, None if backend == "torch" else _lse_digits(temperature, logits))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("direction", ["forward", "reverse"])
@PROPERTY
@given(case=offset_rows(), temperature=TEMPERATURES)
def test_property_kl_and_gradients(backend, direction, case, temperature):
    """p and q rows share their offset (policy and reference logits of one position)."""
    logits, other, _, rng = case
    log_p, log_q = log_softmax64(logits.double() / temperature), log_softmax64(other.double() / temperature)
    a, b = (log_p, log_q) if direction == "forward" else (log_q, log_p)
    expected = (a.exp() * (a - b)).sum(-1)
    # The terms an fp32 KL is made of, free of the offset when p and q share it: E_a|x - y|, the
    # difference of the maxima and the two log sums.
    xs, ys = logits.double() / temperature, other.double() / temperature
    max_x, max_y = xs.amax(-1), ys.amax(-1)
    terms = ((a.exp() * (xs - ys).abs()).sum(-1) + (max_x - max_y).abs() + (log_p + max_x[:, None] - xs).abs()[:, 0]
             + (log_q + max_y[:, None] - ys).abs()[:, 0] + 1)
    x = logits.clone().requires_grad_(True)
    y = other.clone().requires_grad_(True)
    kl = rlfuse.kl_divergence(x, y, direction, temperature=temperature, backend=backend)
    assert_close_relative(kl, expected, rtol=0, atol=RTOL * terms, what="kl")

    upstream = torch.from_numpy(rng.uniform(-2, 2, logits.shape[0]).astype(np.float32))
    kl.backward(upstream)
    x64, y64 = logits.double().requires_grad_(True), other.double().requires_grad_(True)
    lp, lq = log_softmax64(x64 / temperature), log_softmax64(y64 / temperature)
    la, lb = (lp, lq) if direction == "forward" else (lq, lp)
    ((la.exp() * (la - lb)).sum(-1) * upstream.double()).sum().backward()
    # Term sizes: the averaged-over distribution's gradient g a_j (log a_j - log b_j - K), the
    # other's g (a_j - b_j); divided by T.
    g = upstream.double()[:, None].abs() / temperature
    p, q = log_p.exp(), log_q.exp()
    log_terms = log_p.abs() + log_q.abs() + expected.abs()[:, None] + 1
    averaged = g * (p if direction == "forward" else q) * log_terms
    difference = g * (p + q)
    terms_x, terms_y = (averaged, difference) if direction == "forward" else (difference, averaged)
    lse_digits = None if backend == "torch" else _lse_digits(temperature, logits, other)
    checks = ((x.grad, x64.grad, terms_x, "grad logits"), (y.grad, y64.grad, terms_y, "grad other"))
    for got, want, terms, name in checks:
        _check_gradient(got, want, terms, lse_digits, what=name)


@pytest.mark.parametrize("backend", BACKENDS)
@PROPERTY
@given(case=offset_rows(max_vocab=24), temperature=TEMPERATURES, top_k=st.integers(0, 6))
def test_property_sample_logprobs_and_entropy(backend, case, temperature, top_k):
    logits, _, _, _ = case
    out = rlfuse.sample(logits, temperature=temperature, top_k=top_k, seed=1, num_samples=4, backend=backend)
    x = logits.double() / temperature
    log_p = log_softmax64(x)
    assert_close_relative(out.entropy, entropy64(log_p), what="entropy")
    for r in range(x.shape[0]):
        keep = torch.ones_like(x[r], dtype=torch.bool)
        if 0 < top_k < x.shape[1]:
            keep = x[r] >= x[r].sort(descending=True).values[top_k - 1]
        kept = log_softmax64(x[r].masked_fill(~keep, float("-inf"))[None])[0]
        tokens = out.tokens[r]
        assert keep[tokens].all()
        assert_close_relative(out.raw_logprobs[r], log_p[r, tokens], what="raw_logprobs")
        assert_close_relative(out.logprobs[r], kept[tokens], what="logprobs")
