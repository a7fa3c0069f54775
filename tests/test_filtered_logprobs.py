"""Log-probs on the sampler's filtered support (docs/SPEC.md section 8, "Scoring"; issue 17):
``rlfuse.sampling.score`` and ``rlfuse.filtered.filtered_token_logprobs``.

Sampling then scoring the samples must give ``sample``'s logprobs bit for bit on each backend; values
and gradients are compared with a float64 filtered softmax written here from SPEC section 8 (the
kept set found by walking the sorted values, not by rlfuse.reference)."""

from __future__ import annotations

import math

import pytest
import torch

import rlfuse
from rlfuse.filtered import filtered_token_logprobs
from rlfuse.ops import sample as sample_ops
from rlfuse.sampling import score
from rlfuse.source import LogitsSource
from conftest import kernel_backends

BACKENDS = kernel_backends("cpu")
FAST_BACKENDS = [b for b in BACKENDS if b != "triton"]  # the interpreter: only where it adds coverage
DTYPES = [torch.float32, torch.bfloat16]
# The filters of each row (rows past the list repeat it): every knob alone, combined, and none.
FILTERS = [dict(top_k=5, top_p=1.0, min_p=0.0), dict(top_k=0, top_p=0.8, min_p=0.0),
           dict(top_k=0, top_p=1.0, min_p=0.05), dict(top_k=7, top_p=0.9, min_p=0.01),
           dict(top_k=0, top_p=1.0, min_p=0.0)]


def _logits(rows, vocab, dtype, generator, masked=True):
    z = (torch.randn(rows, vocab, generator=generator) * 2.0).to(dtype)
    if masked and vocab > 3:
        z[0, 1::3] = float("-inf")  # a masked vocabulary in one row
    return z


def _filters(rows):
    per = [FILTERS[r % len(FILTERS)] for r in range(rows)]
    return (torch.tensor([f["top_k"] for f in per]), torch.tensor([f["top_p"] for f in per]),
            torch.tensor([f["min_p"] for f in per]))


def _inv_temp(temperature):
    """fp32(1 / fp32(T)) per row, as every rlfuse kernel scales."""
    t = torch.as_tensor(temperature, dtype=torch.float32)
    return torch.reciprocal(t)


def _kept_set(x: torch.Tensor, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """SPEC section 8 for one row of scaled logits x (fp32, as the kernels see them), in float64:
    t_k the k-th largest, t_p the largest value v with mass{x >= max(v, t_k)} >= p mass{x >= t_k},
    t_m = max + log(min_p); kept = x >= max of the three (ties kept)."""
    vocab = x.numel()
    values = sorted(set(x[torch.isfinite(x)].tolist()), reverse=True)
    descending = sorted(x.tolist(), reverse=True)
    t_k = descending[top_k - 1] if 0 < top_k < vocab else -math.inf
    x64 = x.double()
    p = torch.softmax(x64, 0)
    if top_p < 1.0:
        total = float(p[x64 >= t_k].sum())
        t_p = next(v for v in values if v >= t_k and float(p[x64 >= v].sum()) >= top_p * total)
    else:
        t_p = -math.inf
    t_m = float(x.max()) + math.log(min_p) if min_p > 0 else -math.inf
    return x64 >= max(t_k, t_p, t_m)


def oracle(logits, tokens, temperature, top_k, top_p, min_p):
    """(logp, entropy, kept) in float64 with autograd on a float64 copy of the logits."""
    z = logits.detach().double().requires_grad_(True)
    x32 = logits.float() * _inv_temp(temperature).reshape(-1, 1)
    kept = torch.stack([_kept_set(x32[r], int(top_k[r]), float(top_p[r]), float(min_p[r]))
                        for r in range(logits.shape[0])])
    x = z * _inv_temp(temperature).double().reshape(-1, 1)
    log_p = torch.log_softmax(x.masked_fill(~kept, float("-inf")), -1)
    logp = log_p.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    kept_log_p = torch.where(kept, log_p, 0.0)  # 0 * log 0 := 0, without a NaN gradient
    entropy = -(kept_log_p.exp() * kept_log_p).masked_fill(~kept, 0.0).sum(-1)
    return z, logp, entropy, kept


def _tolerance(dtype):
    # Values are fp32 arithmetic on exact inputs (bf16 logits are exact in fp32): a few fp32 ulps
    # of |log p| <= ~30. Gradients are rounded to the logits' dtype: 2^-8 relative for bf16.
    return dict(value=2e-5, grad_rtol=1e-4 if dtype == torch.float32 else 8e-3,
                grad_atol=1e-6 if dtype == torch.float32 else 2e-3)


# (backend, rows, vocab, per-token temperature): the Triton interpreter is slow, so one small case.
CASES = [pytest.param(b, rows, vocab, per_token, id=f"{b}-{rows}x{vocab}-{'per_token' if per_token else 'scalar'}")
         for b in BACKENDS
         for rows, vocab, per_token in ([(5, 37, True)] if b == "triton" else
                                        [(1, 7, False), (6, 37, True), (5, 1000, False), (7, 1000, True)])]


@pytest.mark.parametrize("backend, rows, vocab, per_token", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_sample_score_and_filtered_logprobs(backend, rows, vocab, per_token, dtype, generator):
    logits = _logits(rows, vocab, dtype, generator)
    top_k, top_p, min_p = _filters(rows)
    temperature = torch.tensor([0.7, 1.0, 1.3, 0.5, 2.0, 0.9, 1.1][:rows]) if per_token else 0.8
    # Sampling, then scoring the samples: the sampler's logprobs bit for bit.
    drawn = rlfuse.sample(logits, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=5,
                          backend=backend)
    scored = score(logits, drawn.tokens, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                   backend=backend)
    assert torch.equal(scored.logprobs, drawn.logprobs)
    assert torch.equal(scored.raw_logprobs, drawn.raw_logprobs)
    assert torch.equal(scored.entropy, drawn.entropy)
    # Filtered log-probs of the samples in even rows and of random ids (often filtered out) in odd
    # rows, with gradients; the per-token temperature given in the tokens' shape.
    tokens = drawn.tokens.clone()
    tokens[1::2] = torch.randint(0, vocab, (rows // 2,), generator=generator)
    x = logits.clone().requires_grad_(True)
    logp, entropy = filtered_token_logprobs(x, tokens, temperature, top_k, top_p, min_p, backend=backend)
    assert torch.equal(logp[::2], drawn.logprobs[::2])
    z, want_logp, want_entropy, kept = oracle(logits, tokens, temperature, top_k, top_p, min_p)
    tol = _tolerance(dtype)
    outside = torch.isneginf(want_logp)
    assert torch.equal(torch.isneginf(logp), outside)
    torch.testing.assert_close(logp[~outside].double(), want_logp[~outside].detach(), rtol=0, atol=tol["value"])
    torch.testing.assert_close(entropy.double(), want_entropy.detach(), rtol=0, atol=tol["value"])
    # Upstream gradients: random for logp where it is finite (a -inf log-prob is masked by any
    # user), random for the entropy everywhere.
    g_logp = torch.randn(rows, generator=generator).masked_fill(outside, 0.0)
    g_entropy = torch.randn(rows, generator=generator)
    (torch.where(outside, 0.0, logp * g_logp).sum() + (entropy * g_entropy).sum()).backward()
    (torch.where(outside, 0.0, want_logp * g_logp.double()).sum() + (want_entropy * g_entropy.double()).sum()).backward()
    assert x.grad.dtype == dtype
    assert torch.all(x.grad[~kept] == 0)  # exactly 0 outside the kept set
    scale = z.grad.abs().max()
    torch.testing.assert_close(x.grad.double(), z.grad, rtol=tol["grad_rtol"], atol=tol["grad_atol"] * scale)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_a_token_outside_the_kept_set_is_minus_inf_with_zero_gradient(backend, generator):
    logits = _logits(3, 50, torch.float32, generator, masked=False)
    tokens = logits.argmin(-1)  # never in a top-5 set
    x = logits.clone().requires_grad_(True)
    logp, entropy = filtered_token_logprobs(x, tokens, 1.0, top_k=5, backend=backend)
    assert torch.isneginf(logp).all() and torch.isfinite(entropy).all()
    logp.sum().backward()
    assert torch.all(x.grad == 0)
    scored = score(logits, tokens, top_k=5, backend=backend)
    assert torch.isneginf(scored.logprobs).all() and torch.isfinite(scored.raw_logprobs).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_at_the_threshold_are_all_kept(backend, generator):
    # Integer logits: many ties. Row 0's 2nd..4th largest tie, so top_k=2 keeps 4 entries.
    logits = torch.randint(-6, 3, (4, 33), generator=generator).float()
    logits[0, :5] = torch.tensor([9.0, 7.0, 7.0, 7.0, 5.0])
    logits[0, 5:] = logits[0, 5:].clamp(max=4.0)
    top_k, top_p, min_p = torch.tensor([2, 3, 0, 6]), torch.tensor([1.0, 1.0, 0.6, 0.9]), torch.zeros(4)
    tokens = torch.tensor([3, 0, 1, 2])
    z, want_logp, want_entropy, kept = oracle(logits, tokens, 1.0, top_k, top_p, min_p)
    scored = score(logits, tokens, top_k=top_k, top_p=top_p, min_p=min_p, backend=backend)
    assert int(kept[0].sum()) == 4 and float(scored.kept_min[0]) == 7.0
    assert torch.equal(logits >= scored.kept_min.unsqueeze(-1), kept)  # kept_min describes the kept set
    logp, entropy = filtered_token_logprobs(logits, tokens, 1.0, top_k, top_p, min_p, backend=backend)
    torch.testing.assert_close(logp.double(), want_logp.detach(), rtol=0, atol=2e-5)
    torch.testing.assert_close(entropy.double(), want_entropy.detach(), rtol=0, atol=2e-5)
    # Every tied entry scores the same.
    tied = score(logits[:1].expand(3, -1), torch.tensor([1, 2, 3]), top_k=2, backend=backend).logprobs
    assert torch.isfinite(tied).all() and (tied == tied[0]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_rows_keep_the_first_maximum(backend):
    logits = torch.tensor([[1.0, 3.0, 3.0, -2.0], [0.5, -1.0, 2.0, 2.0]])
    for token, want in ((1, 0.0), (2, -math.inf), (0, -math.inf)):
        scored = score(logits[:1], torch.tensor([token]), temperature=0.0, backend=backend)
        assert float(scored.logprobs[0]) == want
        assert float(scored.kept_min[0]) == 3.0
    drawn = rlfuse.sample(logits, temperature=0.0, seed=1, backend=backend)
    assert torch.equal(score(logits, drawn.tokens, temperature=0.0, backend=backend).logprobs, drawn.logprobs)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_kept_min_is_minus_inf_without_filtering(backend, generator):
    logits = _logits(3, 40, torch.float32, generator)
    tokens = torch.zeros(3, dtype=torch.int64)
    assert torch.isneginf(score(logits, tokens, backend=backend).kept_min).all()
    filtered = score(logits, tokens, top_k=4, backend=backend).kept_min
    assert torch.equal((logits >= filtered.unsqueeze(-1)).sum(-1), torch.full((3,), 4))


def test_bad_input_names_the_argument(generator):
    logits = _logits(2, 10, torch.float32, generator)
    with pytest.raises(ValueError, match="tokens"):
        score(logits, torch.tensor([0, 10]))
    with pytest.raises(ValueError, match="tokens"):
        filtered_token_logprobs(logits, torch.tensor([-1, 0]), 1.0, top_k=3)
    with pytest.raises(ValueError, match="temperature"):
        filtered_token_logprobs(logits, torch.tensor([0, 1]), 0.0, top_k=3)
    with pytest.raises(ValueError, match="top_p"):
        filtered_token_logprobs(logits, torch.tensor([0, 1]), 1.0, top_p=1.5)
    with pytest.raises(TypeError, match="top_k"):
        score(logits, torch.tensor([0, 1]), top_k=2.5)


def test_linear_logits_match_the_materialised_logits(generator):
    hidden = torch.randn(2, 5, 16, generator=generator)
    weight = torch.randn(77, 16, generator=generator) * 0.5
    source = rlfuse.LinearLogits(hidden.clone().requires_grad_(True), weight, chunk_tokens=4)
    tokens = torch.randint(0, 77, (2, 5), generator=generator)
    logp, entropy = filtered_token_logprobs(source, tokens, 0.9, top_k=9, top_p=0.95)
    h = hidden.clone().requires_grad_(True)
    want_logp, want_entropy = filtered_token_logprobs(h @ weight.T, tokens, 0.9, top_k=9, top_p=0.95)
    finite = torch.isfinite(want_logp)
    assert torch.equal(torch.isfinite(logp), finite)
    torch.testing.assert_close(logp[finite], want_logp[finite])
    torch.testing.assert_close(entropy, want_entropy)
    (entropy.sum() + logp[finite].sum()).backward()
    (want_entropy.sum() + want_logp[finite].sum()).backward()
    torch.testing.assert_close(source.hidden.grad, h.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_opcheck_sample_score(backend, generator):
    logits = _logits(4, 37, torch.float32, generator).reshape(2, 2, 37)
    top_k, top_p, min_p = _filters(4)
    args = (logits, torch.randint(0, 37, (2, 2), generator=generator), torch.full((4,), 0.8),
            top_k.to(torch.int32), top_p.float(), min_p.float(), None, backend)
    torch.library.opcheck(sample_ops.sample_score, args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_of_range_ids_score_nan_in_the_op(backend, generator):
    # rlfuse.sampling.score rejects them; the op itself (validation off) returns NaN, reads nothing.
    logits = _logits(3, 20, torch.float32, generator, masked=False)
    tokens = torch.tensor([-1, 20, 2**40])
    for temperature in (0.0, 0.9):
        logprobs, raw, _, _ = sample_ops.sample_score(
            logits, tokens, torch.full((3,), temperature), torch.full((3,), 3, dtype=torch.int32), torch.ones(3),
            torch.zeros(3), None, backend)
        assert torch.isnan(logprobs).all() and torch.isnan(raw).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_threshold_entry_stays_kept_at_any_temperature(backend, generator):
    # Logits where z / T rounds below z * fp32(1 / T) (the sampler's x): the threshold is such an
    # entry's x, so a log-prob pass that divided would drop the very entry that sets the threshold.
    temperature = 0.7
    inv = _inv_temp(temperature)
    candidates = torch.randn(4096, generator=generator) * 3
    rounds_below = candidates[candidates / torch.tensor(temperature) < candidates * inv][:4]
    assert rounds_below.numel() == 4  # about a quarter of all values
    logits = torch.randn(4, 29, generator=generator) - 12.0
    logits[:, 0] = rounds_below
    logits[:, 1], logits[:, 2] = rounds_below + 1.0, rounds_below + 2.0
    tokens = torch.zeros(4, dtype=torch.int64)
    scored = score(logits, tokens, temperature=temperature, top_k=3, backend=backend)
    assert torch.equal(scored.kept_min, logits[:, 0] * inv)
    logp, entropy = filtered_token_logprobs(logits, tokens, temperature, top_k=3, backend=backend)
    assert torch.isfinite(logp).all() and torch.equal(logp, scored.logprobs)
    _, _, want_entropy, _ = oracle(logits, tokens, temperature, torch.full((4,), 3), torch.ones(4), torch.zeros(4))
    torch.testing.assert_close(entropy.double(), want_entropy.detach(), rtol=0, atol=2e-5)


def test_sources_other_than_linear_logits_are_a_clear_error():
    class RowShards(LogitsSource):  # stands in for ShardedLogits: no whole rows
        shape, device = torch.Size((2, 10)), torch.device("cpu")

    with pytest.raises(ValueError, match="logits: .*RowShards"):
        filtered_token_logprobs(RowShards(), torch.zeros(2, dtype=torch.int64), 1.0, top_k=3)


def test_compiles_fullgraph_with_the_eager_results(generator):
    logits = _logits(4, 37, torch.float32, generator)
    tokens = logits.argmax(-1)

    def filtered(x):
        return filtered_token_logprobs(x, tokens, 0.8, top_k=5, top_p=0.9, backend="cpu")

    compiled = torch.compile(filtered, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(logits), filtered(logits)):
        assert torch.equal(got, want)
