"""rlfuse.LinearLogits (issue 15): log-probs, entropy and the fused policy loss from hidden states.

Every backend that runs here is compared with the float64 oracle: the logits made with torch ops in
float64 from the *same* (dtype-rounded) hidden / weight / bias, then the float64 reference (or the
independent policy-loss oracle), with float64 autograd back to hidden / weight / bias.

Tolerances, per dtype ``u`` (unit roundoff: fp32 2^-24, bf16 2^-9):

* The kernels compute in fp32; the chunk's logits are one GEMM (fp32 accumulation over D terms, one
  rounding to the compute dtype) plus softcap. A logit's error is <= ``u |z| + D 2^-24 sum|h w|``,
  so a log-prob / entropy (a difference of logits and a log-sum-exp, divided by T) is off by at most
  a few times ``u max|z| / T``: values get ``atol = 8 u max|z| / T + value_tolerance(V)``.
* Gradients: dL/dlogits is stored in the compute dtype (relative ``u``) and computed from logits
  that carry the error above (``p`` relative error ``~ max|z| u / T``); the GEMMs add one more
  rounding. So ``atol = c u (1 + max|z| / T) max|grad|`` with c = 8 (fp32's term is dominated by the
  fp32 kernels' own rounding, hence a floor of 2e-6 relative as tests/_oracle.py).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rlfuse
from rlfuse import LossConfig
from rlfuse import reference as ref
from rlfuse.linear import (LinearLogits, default_chunk_tokens, linear_entropy, linear_fused_policy_loss,
                           linear_token_logprobs)
from rlfuse.ops.policy_loss import TokenLossParams
from _oracle import value_tolerance
from _policy_oracle import oracle_policy_loss
from conftest import kernel_backends

BACKENDS = kernel_backends("cpu")
KERNEL_BACKENDS = [b for b in BACKENDS if b != "torch"]
UNIT = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-9, torch.float16: 2.0**-12, torch.float64: 2.0**-53}


# --- cases and oracle -----------------------------------------------------------------------------


def make_case(generator, lead=(11,), dim=13, vocab=37, dtype=torch.float32, bias=True, hidden_scale=1.0):
    hidden = (torch.randn(*lead, dim, generator=generator) * hidden_scale).to(dtype)
    weight = (torch.randn(vocab, dim, generator=generator) / math.sqrt(max(dim, 1)) * 2).to(dtype)
    b = (torch.randn(vocab, generator=generator) * 0.5).to(dtype) if bias else None
    tokens = torch.randint(0, vocab, lead, generator=generator)
    return hidden, weight, b, tokens


def leaves(hidden, weight, bias, requires=(True, True, True)):
    out = []
    for t, r in zip((hidden, weight, bias), requires):
        out.append(None if t is None else t.detach().clone().requires_grad_(r))
    return out


def oracle_logits(hidden, weight, bias, scale=None, softcap=None):
    """float64 logits (with autograd) from the same inputs, with plain torch ops."""
    h, w, b = leaves(*(None if t is None else t.double() for t in (hidden, weight, bias)))
    src = LinearLogits(h, w, b, scale=scale, softcap=softcap)
    return src.materialize(), (h, w, b)


def tolerances(dtype, logits64, expected, temperature, g_logp, g_entropy, leaves64, scale):
    """(value tolerance, [gradient tolerance per leaf]); see the module docstring."""
    u = max(UNIT[dtype], 2.0**-24)
    t = temperature
    z = logits64.detach()
    zmax = z.abs().max().item() if z.numel() else 1.0
    value = value_tolerance(z.shape[-1])
    value = dict(atol=value["atol"] + 8 * u * zmax / t, rtol=value["rtol"])
    rel = max(8 * u * (1 + zmax / t), 2e-6)
    # The kernels' dL/dlogits row carries an absolute error (summed over the row) of about
    # u_row * (|g_logp| + |g_H| (2 + H)) / T, u_row = (2^-24 + u)(1 + (max|z| + |lse| T) / T): p_j comes
    # from exp(x_j - lse) in fp32, so a row with p_y ~ 1 loses (1 - p_y) to cancellation. That error
    # goes through the GEMMs with |scale| and |W| (hidden), |h| (weight), 1 (bias).
    extra = [0.0, 0.0, 0.0]
    if z.numel():
        x = z / t
        lse = torch.logsumexp(x, -1)
        _, entropy = ref.token_logprobs_reference(z, torch.zeros(z.shape[:-1], dtype=torch.int64), t)
        u_row = (2.0**-24 + u) * (1 + (z.abs().amax(-1) + lse.abs() * t) / t)
        err = 8 * u_row * (g_logp.double().abs() + g_entropy.double().abs() * (2 + entropy.abs())) / t
        err = err.reshape(-1)
        s = abs(1.0 if scale is None else scale)
        h, w = leaves64[0].detach(), leaves64[1].detach()
        hmax = h.abs().max().item() if h.numel() else 0.0
        extra = [s * err.max().item() * w.abs().max().item(), s * hmax * err.sum().item(), s * err.sum().item()]
    grad = [None if g is None else dict(atol=rel * (g.abs().max().item() if g.numel() else 1.0) + e + 1e-9, rtol=rel)
            for g, e in zip(expected, extra)]
    return value, grad


def assert_grads(got, expected, tols):
    for name, g, e, tol in zip(("hidden", "weight", "bias"), got, expected, tols):
        if e is None:
            assert g is None, name
            continue
        assert g is not None, f"no gradient for {name}"
        torch.testing.assert_close(g.double(), e, **tol, msg=lambda m: f"grad {name}: {m}")


def check_token_logprobs(hidden, weight, bias, tokens, backend, *, temperature=1.0, scale=None, softcap=None,
                         chunk_tokens=None, mask=None, requires=(True, True, True), generator=None):
    g = generator or torch.Generator().manual_seed(7)
    g_logp = torch.randn(tokens.shape, generator=g)
    g_entropy = torch.randn(tokens.shape, generator=g)
    # Oracle: float64 logits from the same inputs, reference log-softmax, masked positions 0.
    logits64, leaves64 = oracle_logits(hidden, weight, bias, scale, softcap)
    lp64, h64 = ref.token_logprobs_reference(logits64, tokens, temperature)
    valid = torch.ones(tokens.shape, dtype=torch.bool) if mask is None else mask.bool()
    lp64, h64 = torch.where(valid, lp64, 0.0), torch.where(valid, h64, 0.0)
    wanted = [t for t, r in zip(leaves64, requires) if t is not None and r]
    objective = (lp64 * g_logp.double() + h64 * g_entropy.double()).sum()
    grads = torch.autograd.grad(objective, wanted, allow_unused=True, materialize_grads=True) if wanted else []
    it = iter(grads)
    expected = [next(it) if (t is not None and r) else None for t, r in zip(leaves64, requires)]

    h, w, b = leaves(hidden, weight, bias, requires)
    src = LinearLogits(h, w, b, scale=scale, softcap=softcap, chunk_tokens=chunk_tokens)
    logp, ent = linear_token_logprobs(src, tokens, temperature, True, backend, mask=mask)
    assert logp.dtype == ent.dtype == torch.float32 and logp.shape == ent.shape == tokens.shape
    if any(requires):
        torch.autograd.backward([logp, ent], [g_logp, g_entropy])
    got = [None if t is None or not t.requires_grad else t.grad for t in (h, w, b)]
    vtol, gtol = tolerances(hidden.dtype, logits64, expected, temperature, g_logp, g_entropy, leaves64, scale)
    torch.testing.assert_close(logp.double(), lp64.detach(), **vtol)
    torch.testing.assert_close(ent.double(), h64.detach(), **vtol)
    assert_grads(got, expected, gtol)
    if mask is not None and h.requires_grad:
        assert torch.all(h.grad[~valid] == 0)
    return logp, ent, got


# --- construction and validation ------------------------------------------------------------------


def test_properties_and_materialize(generator):
    hidden, weight, bias, _ = make_case(generator, lead=(2, 5), dim=6, vocab=9)
    src = LinearLogits(hidden, weight, bias, scale=0.5, softcap=2.0, chunk_tokens=3)
    assert src.shape == torch.Size([2, 5, 9]) and src.vocab == 9 and src.hidden_dim == 6
    assert src.dtype == torch.float32 and src.device == hidden.device and src.num_tokens == 10 and src.dim() == 3
    expected = 2.0 * torch.tanh(0.5 * (hidden @ weight.T + bias) / 2.0)
    torch.testing.assert_close(src.materialize(), expected)
    assert "LinearLogits(shape=(2, 5, 9)" in repr(src)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert src.compute_dtype() == torch.bfloat16
    assert src.compute_dtype() == torch.float32


def test_default_chunk_rule():
    # chunk * V * 4 bytes <= 32 MiB on CPU, a multiple of 64 when >= 128, clamped to [1, N].
    assert default_chunk_tokens(32768, "cpu", None) == 256
    assert default_chunk_tokens(32768, "cpu", 30.0) == 128  # softcap: an fp32 tanh buffer too
    assert default_chunk_tokens(151936, "cuda", None) == 384  # 256 MiB / (151936 * 4) = 441 -> 384
    assert default_chunk_tokens(1 << 30, "cpu", None) == 1
    w = torch.zeros(32768, 4)
    assert LinearLogits(torch.zeros(1000, 4), w).resolved_chunk_tokens() == 256
    assert LinearLogits(torch.zeros(10, 4), w).resolved_chunk_tokens() == 10
    assert LinearLogits(torch.zeros(0, 4), w).resolved_chunk_tokens() == 1
    assert LinearLogits(torch.zeros(10, 4), w, batch_invariant=True).resolved_chunk_tokens() == 256
    assert LinearLogits(torch.zeros(10, 4), w, chunk_tokens=4).resolved_chunk_tokens() == 4


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(hidden=[1.0]), TypeError, "hidden must be a torch.Tensor"),
    (dict(hidden=torch.zeros(3, 4, dtype=torch.int64)), TypeError, "hidden must be float32"),
    (dict(hidden=torch.zeros(())), ValueError, "hidden must have shape [..., D]"),
    (dict(weight=torch.zeros(5, 3)), ValueError, "weight must have shape [V, D] with D = hidden.shape[-1] = 4"),
    (dict(weight=torch.zeros(5, 4, 1)), ValueError, "weight must have shape [V, D]"),
    (dict(weight=torch.zeros(0, 4)), ValueError, "V >= 1"),
    (dict(weight=torch.zeros(5, 4, dtype=torch.bfloat16)), TypeError, "weight must have hidden's dtype"),
    (dict(weight=torch.zeros(5, 4, device="meta")), ValueError, "weight is on meta"),
    (dict(bias=torch.zeros(4)), ValueError, "bias must have shape [V] = (5,)"),
    (dict(bias=torch.zeros(5, dtype=torch.float64)), TypeError, "bias must have hidden's dtype"),
    (dict(bias=torch.zeros(5, device="meta")), ValueError, "bias is on meta"),
    (dict(bias=3.0), TypeError, "bias must be a torch.Tensor"),
    (dict(scale=float("nan")), ValueError, "scale must be finite"),
    (dict(scale=float("inf")), ValueError, "scale must be finite"),
    (dict(scale="2"), TypeError, "scale must be a real number"),
    (dict(softcap=0.0), ValueError, "softcap must be > 0"),
    (dict(softcap=-1.0), ValueError, "softcap must be > 0"),
    (dict(softcap=float("inf")), ValueError, "softcap must be finite"),
    (dict(chunk_tokens=0), ValueError, "chunk_tokens must be a positive int"),
    (dict(chunk_tokens=-3), ValueError, "chunk_tokens must be a positive int"),
    (dict(chunk_tokens=2.5), TypeError, "chunk_tokens must be a positive int"),
    (dict(chunk_tokens=True), TypeError, "chunk_tokens must be a positive int"),
    (dict(batch_invariant=1), TypeError, "batch_invariant must be a bool"),
])
def test_bad_arguments_name_the_argument(kwargs, error, words):
    args = dict(hidden=torch.zeros(3, 4), weight=torch.zeros(5, 4), bias=None)
    args.update(kwargs)
    hidden, weight, bias = args.pop("hidden"), args.pop("weight"), args.pop("bias")
    with pytest.raises(error) as info:
        LinearLogits(hidden, weight, bias, **args)
    assert words in str(info.value)


def test_bad_call_arguments(generator):
    hidden, weight, bias, tokens = make_case(generator, lead=(2, 3), dim=4, vocab=5)
    src = LinearLogits(hidden, weight, bias)
    with pytest.raises(ValueError, match=r"tokens must have shape logits.shape\[:-1\] = \(2, 3\)"):
        linear_token_logprobs(src, tokens[:, :2])
    with pytest.raises(ValueError, match=r"tokens must lie in \[0, V\) = \[0, 5\)"):
        linear_token_logprobs(src, tokens + 5)
    with pytest.raises(TypeError, match="tokens must be int32 or int64"):
        linear_token_logprobs(src, tokens.float())
    with pytest.raises(ValueError, match="temperature must be positive"):
        linear_token_logprobs(src, tokens, temperature=0.0)
    with pytest.raises(ValueError, match="mask must have the tokens' shape"):
        linear_token_logprobs(src, tokens, mask=torch.ones(5))
    with pytest.raises(ValueError, match="backend must be one of"):
        linear_token_logprobs(src, tokens, backend="gpu")
    with pytest.raises(TypeError, match="expected a rlfuse.LinearLogits"):
        linear_token_logprobs(hidden, tokens)
    with pytest.raises(ValueError, match="the fused path needs a kernel backend"):
        params = TokenLossParams.from_config(LossConfig.dapo())
        linear_fused_policy_loss(src, tokens, [torch.zeros(6)] * 5, 1.0, params, "torch")


# --- general path: values and gradients vs the float64 oracle --------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunk", [1, 4, 11, 64], ids=lambda c: f"chunk{c}")
def test_token_logprobs_chunking(backend, chunk, generator):
    """N = 11 tokens in chunks of 1, 4 (last chunk 3), exactly N, and more than N."""
    case = make_case(generator, lead=(11,), dim=13, vocab=37)
    check_token_logprobs(*case, backend, chunk_tokens=chunk)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("options", [
    dict(), dict(scale=0.37), dict(softcap=2.5), dict(scale=1.9, softcap=4.0, temperature=0.7),
    dict(temperature=1.6, bias=False), dict(scale=-0.5, bias=False, softcap=1.0),
], ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()) or "plain")
def test_token_logprobs_options(backend, options, generator):
    options = dict(options)
    use_bias = options.pop("bias", True)
    hidden, weight, bias, tokens = make_case(generator, lead=(3, 5), dim=24, vocab=129, bias=use_bias,
                                             hidden_scale=2.0)
    check_token_logprobs(hidden, weight, bias, tokens, backend, chunk_tokens=4, **options)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_token_logprobs_low_precision(backend, dtype, generator):
    case = make_case(generator, lead=(2, 7), dim=40, vocab=301, dtype=dtype)
    check_token_logprobs(*case, backend, chunk_tokens=5, scale=0.8, softcap=6.0, temperature=0.9)


def test_token_logprobs_float64_on_torch(generator):
    case = make_case(generator, lead=(9,), dim=7, vocab=23, dtype=torch.float64)
    check_token_logprobs(*case, "torch", chunk_tokens=4, softcap=3.0, scale=2.0)
    src = LinearLogits(*case[:3])
    with pytest.raises(TypeError, match="float64"):
        linear_token_logprobs(src, case[3], backend="cpu")


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_tokens_never_reach_a_gemm(backend, generator):
    hidden, weight, bias, tokens = make_case(generator, lead=(3, 6), dim=10, vocab=53)
    mask = torch.rand(3, 6, generator=generator) > 0.4
    mask[1] = False  # a whole sequence of padding
    hidden = hidden.clone()
    hidden[~mask] = float("nan")  # whatever sits at masked positions is never read
    logp, ent, grads = check_token_logprobs(hidden.nan_to_num(0.0), weight, bias, tokens, backend,
                                            chunk_tokens=4, mask=mask)
    assert torch.all(logp[~mask] == 0) and torch.all(ent[~mask] == 0)
    # NaN hidden rows at masked positions: identical results (they are dropped before the GEMM).
    h, w, b = leaves(hidden, weight, bias)
    lp2, en2 = linear_token_logprobs(LinearLogits(h, w, b, chunk_tokens=4), tokens, 1.0, True, backend, mask=mask)
    torch.testing.assert_close(lp2, logp, rtol=0, atol=0)
    (lp2.sum() + en2.sum()).backward()
    assert torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all() and torch.all(h.grad[~mask] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_tokens(backend, generator):
    for lead, mask in (((0,), None), ((2, 0), None), ((4,), torch.zeros(4, dtype=torch.bool))):
        hidden, weight, bias, tokens = make_case(generator, lead=lead, dim=5, vocab=8)
        h, w, b = leaves(hidden, weight, bias)
        logp, ent = linear_token_logprobs(LinearLogits(h, w, b), tokens, 1.0, True, backend, mask=mask)
        assert logp.shape == ent.shape == tokens.shape and torch.all(logp == 0) and torch.all(ent == 0)
        (logp.sum() + ent.sum()).backward()
        assert torch.all(h.grad == 0) and torch.all(w.grad == 0) and torch.all(b.grad == 0)
        assert h.grad.shape == h.shape and w.grad.shape == w.shape


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("requires", [(True, False, False), (False, True, True), (False, False, True)],
                         ids=["frozen-lm-head", "frozen-hidden", "bias-only"])
def test_only_the_inputs_that_require_grad(backend, requires, generator, monkeypatch):
    case = make_case(generator, lead=(9,), dim=12, vocab=33)
    calls = []
    import rlfuse.linear as linear

    original = linear._mm_accumulate_
    monkeypatch.setattr(linear, "_mm_accumulate_", lambda *a: (calls.append(1), original(*a)))
    _, _, got = check_token_logprobs(*case, backend, chunk_tokens=4, requires=requires)
    assert [g is not None for g in got] == list(requires)
    assert bool(calls) == requires[1]  # no weight-gradient GEMM for a frozen lm_head


@pytest.mark.parametrize("backend", BACKENDS)
def test_hidden_view_and_tied_embedding(backend, generator):
    """hidden = a view (``[:, :-1]``) of activations computed from the embedding that is also the
    lm_head (tied weights): the weight gets both gradients, as through materialised logits."""
    vocab, dim = 45, 14
    weight = torch.randn(vocab, dim, generator=generator) / 3
    mix = torch.randn(dim, dim, generator=generator) / 3
    ids = torch.randint(0, vocab, (2, 6), generator=generator)
    tokens = ids[:, 1:]
    g_logp = torch.randn(tokens.shape, generator=generator)

    def run(w, make):
        w = w.clone().requires_grad_(True)
        hidden = torch.tanh(w[ids] @ mix.to(w.dtype))[:, :-1]
        logp = make(hidden, w)
        (logp * g_logp.to(logp.dtype)).sum().backward()
        return logp.detach(), w.grad

    logp, grad = run(weight, lambda h, w: linear_token_logprobs(LinearLogits(h, w, chunk_tokens=3), tokens,
                                                                backend=backend))
    ref_logp, ref_grad = run(weight.double(), lambda h, w: ref.token_logprobs_reference(h @ w.T, tokens)[0])
    torch.testing.assert_close(logp.double(), ref_logp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad.double(), ref_grad, atol=1e-5 * ref_grad.abs().max().item(), rtol=1e-5)


def test_entropy_and_autocast(generator):
    hidden, weight, bias, tokens = make_case(generator, lead=(6,), dim=16, vocab=77)
    h, w, b = leaves(hidden, weight, bias)
    src = LinearLogits(h, w, b, chunk_tokens=4)
    ent = linear_entropy(src)
    _, expected = ref.token_logprobs_reference(src.materialize().double(), tokens)
    torch.testing.assert_close(ent.double(), expected.detach(), **value_tolerance(77))
    # Autocast: the logits are made in bf16 as F.linear would be under autocast; fp32 gradients.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logp = linear_token_logprobs(src, tokens)
        reference = rlfuse.token_logprobs(torch.nn.functional.linear(h, w, b), tokens)
    assert torch.nn.functional.linear(h, w, b).dtype == torch.float32  # autocast is over
    torch.testing.assert_close(logp, reference.detach(), atol=0.05, rtol=0.01)
    assert not torch.equal(logp, linear_token_logprobs(src, tokens).detach())  # it did compute in bf16
    logp.sum().backward()
    assert h.grad.dtype == w.grad.dtype == b.grad.dtype == torch.float32
    h2, w2, b2 = leaves(hidden, weight, bias)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rlfuse.token_logprobs(torch.nn.functional.linear(h2, w2, b2), tokens).sum().backward()
    for got, expected in ((h.grad, h2.grad), (w.grad, w2.grad), (b.grad, b2.grad)):
        torch.testing.assert_close(got, expected, atol=0.02 * expected.abs().max().item(), rtol=0.02)


# --- fused path ----------------------------------------------------------------------------------


FUSED_CONFIGS = {
    "dapo": LossConfig.dapo(),
    "grpo_k3": LossConfig.grpo(),
    "ppo_dual_clip": LossConfig(dual_clip=1.5),
    "cispo": LossConfig.cispo(),
    "sapo": LossConfig.sapo(),
    "gppo": LossConfig.gppo(gppo_beta_low=0.7, gppo_beta_high=1.3),
    "k1_entropy_temperature": LossConfig.dapo(kl="k1", kl_coef=0.1, entropy_coef=0.03, temperature=0.7),
    "seq_mask": LossConfig.dapo(rollout_correction="seq_mask", rollout_cap=3.0, rollout_cap_low=0.5),
    "dr_grpo": LossConfig.dr_grpo(),
}


# log-ratio boundaries where a token-local loss's gradient jumps (PPO clips 0.8 / 1.2 / 1.28, dual clip
# 1.5 and 10): a token whose log-ratio is within the logits' rounding error of one may legitimately
# take the other branch, so the generated old log-probs keep a margin from them.
CLIP_LOG_RATIOS = torch.tensor([0.8, 1.2, 1.28, 1.5, 10.0], dtype=torch.float64).log()


def loss_inputs(generator, hidden, weight, bias, tokens, scale=None, softcap=None, temperature=1.0, margin=1e-4):
    """Old / ref / rollout log-probs near the current ones (some ratios clip, none within ``margin`` of a
    clip boundary), advantages, a mask."""
    with torch.no_grad():
        logits = LinearLogits(hidden.double(), weight.double(), None if bias is None else bias.double(),
                              scale=scale, softcap=softcap).materialize()
        current, _ = ref.token_logprobs_reference(logits, tokens, temperature)
    shape = tokens.shape
    old = current + 0.4 * torch.randn(shape, generator=generator, dtype=torch.float64)
    for _ in range(64):  # step the near ones up until they clear every boundary
        near = ((current - old).unsqueeze(-1) - CLIP_LOG_RATIOS).abs().lt(margin).any(-1)
        old = torch.where(near, old + margin, old)
    old = old.float()
    ref_lp = (current + 0.3 * torch.randn(shape, generator=generator, dtype=torch.float64)).float()
    rollout = (old + 0.3 * torch.randn(shape, generator=generator)).float()
    advantages = torch.randn(shape, generator=generator)
    mask = torch.rand(shape, generator=generator) > 0.25
    if mask.numel():
        mask.view(-1)[0] = True
    return dict(advantages=advantages, old_logprobs=old, ref_logprobs=ref_lp, rollout_logprobs=rollout, mask=mask)


def fused_arguments(src, tokens, inputs, config):
    """What ``losses._fused`` passes for these inputs (padded [B, T] or one packed sequence [N]):
    per-token inputs with 0 at masked positions, aggregation and rollout weights (rlfuse.reference),
    the params, the mask. Written out here rather than through losses' private helpers."""
    n = tokens.numel()
    mask = (inputs["mask"].reshape(-1) != 0).float()
    valid = mask > 0
    if tokens.dim() == 2:
        b, t = tokens.shape
        cu = torch.arange(b + 1, dtype=torch.int64) * t
        norm_length = config.norm_length if config.norm_length is not None else float(max(t, 1))
    else:
        cu = torch.tensor([0, n], dtype=torch.int64)
        norm_length = config.norm_length
    advantages = inputs["advantages"]
    if advantages.shape != tokens.shape:  # per sequence
        advantages = torch.repeat_interleave(advantages.float(), cu.diff(), output_size=n)

    def masked(values):
        return torch.where(valid, values.reshape(-1).float(), 0.0).contiguous()

    advantages, old, ref_lp, rollout = (masked(inputs[k]) if k != "advantages" else masked(advantages)
                                        for k in ("advantages", "old_logprobs", "ref_logprobs", "rollout_logprobs"))
    aggregation = ref.aggregation_weights(mask, cu, config.replace(norm_length=norm_length))
    policy_weight = aggregation
    if config.rollout_correction is not None:
        policy_weight = policy_weight * ref.rollout_correction_weights(old, rollout, mask, cu, config)
    per_token = (advantages, old, ref_lp, policy_weight.contiguous(), aggregation.contiguous())
    return per_token, TokenLossParams.from_config(config), mask


def fused_policy_loss(src, tokens, inputs, config, backend, drop_masked=True):
    per_token, params, mask = fused_arguments(src, tokens, inputs, config)
    return linear_fused_policy_loss(src, tokens, per_token, config.temperature, params, backend,
                                    valid=mask if drop_masked else None)


def fused_upstream(logits64, tokens, inputs, config, src):
    """Per-token dL/dlogp and dL/dH of the fused loss in float64 (rlfuse.reference's token_loss: used
    only to size the gradient tolerance, never as the expected value)."""
    per_token, _, mask = fused_arguments(src, tokens, inputs, config)
    logp, entropy = ref.token_logprobs_reference(logits64.detach(), tokens, config.temperature)
    valid = mask.view(tokens.shape) > 0
    logp = torch.where(valid, logp, 0.0).reshape(-1).requires_grad_(True)
    entropy = torch.where(valid, entropy, 0.0).reshape(-1).requires_grad_(True)
    adv, old, ref_lp, policy_weight, weight = (p.double() for p in per_token)
    if logp.numel() == 0:
        return torch.zeros(tokens.shape), torch.zeros(tokens.shape)
    total = ref.token_loss(logp, entropy, old, ref_lp, adv, policy_weight, weight, config).sum()
    g_logp, g_entropy = torch.autograd.grad(total, (logp, entropy), allow_unused=True, materialize_grads=True)
    return g_logp.view(tokens.shape), g_entropy.view(tokens.shape)


def check_fused(generator, config, backend, *, lead=(3, 7), dim=19, vocab=301, dtype=torch.float32, bias=True,
                scale=None, softcap=None, chunk_tokens=4, requires=(True, True, True), drop_masked=True,
                batch_invariant=False):
    hidden, weight, b, tokens = make_case(generator, lead=lead, dim=dim, vocab=vocab, dtype=dtype, bias=bias,
                                          hidden_scale=1.5)
    # bf16 logits (|z| up to ~10 here) move a log-prob by up to ~0.1: keep log-ratios that far from a clip.
    margin = 0.15 if dtype == torch.bfloat16 else 1e-4
    inputs = loss_inputs(generator, hidden, weight, b, tokens, scale, softcap, config.temperature, margin)
    logits64, leaves64 = oracle_logits(hidden, weight, b, scale, softcap)
    loss64, dlogits64 = oracle_policy_loss(logits64.detach(), tokens, inputs["advantages"], inputs["old_logprobs"],
                                           inputs["ref_logprobs"], inputs["rollout_logprobs"], inputs["mask"],
                                           config=config)
    wanted = [t for t, r in zip(leaves64, requires) if t is not None and r]
    grads = torch.autograd.grad(logits64, wanted, dlogits64) if wanted else []
    it = iter(grads)
    expected = [next(it) if (t is not None and r) else None for t, r in zip(leaves64, requires)]

    h, w, bb = leaves(hidden, weight, b, requires)
    src = LinearLogits(h, w, bb, scale=scale, softcap=softcap, chunk_tokens=chunk_tokens,
                       batch_invariant=batch_invariant)
    loss, logp, ent = fused_policy_loss(src, tokens, inputs, config, backend, drop_masked)
    assert loss.dim() == 0 and logp.shape == ent.shape == tokens.shape and not logp.requires_grad
    if any(requires):
        loss.backward()
    got = [None if t is None or not t.requires_grad else t.grad for t in (h, w, bb)]
    g_logp, g_entropy = fused_upstream(logits64, tokens, inputs, config, src)
    vtol, gtol = tolerances(dtype, logits64, expected, config.temperature, g_logp, g_entropy, leaves64, scale)
    # The loss moves by sum_t |dL/dlogp_t| |error of logp_t| (+ the same for H).
    loss_atol = 2e-5 + 2 * vtol["atol"] * (g_logp.abs().sum() + g_entropy.abs().sum()).item()
    torch.testing.assert_close(loss.double(), loss64, atol=loss_atol, rtol=2e-5)
    assert_grads(got, expected, gtol)
    valid = inputs["mask"]
    lp64, _ = ref.token_logprobs_reference(logits64.detach(), tokens, config.temperature)
    torch.testing.assert_close(logp[valid].double(), lp64[valid], **vtol)
    if drop_masked:
        assert torch.all(logp[~valid] == 0) and torch.all(ent[~valid] == 0)
    return src, loss, got


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("name", sorted(FUSED_CONFIGS))
def test_fused_policy_loss_variants(name, backend, generator):
    check_fused(generator, FUSED_CONFIGS[name], backend, chunk_tokens=4 if backend == "cpu" else 8)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("options", [
    dict(chunk_tokens=1, lead=(5,)), dict(chunk_tokens=64), dict(scale=0.6, softcap=3.0),
    dict(bias=False, drop_masked=False), dict(dtype=torch.bfloat16, scale=1.3, softcap=8.0),
    dict(requires=(False, True, False)), dict(requires=(True, False, False), batch_invariant=True),
], ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_fused_policy_loss_options(backend, options, generator):
    check_fused(generator, LossConfig.dapo(kl="k3", kl_coef=0.05), backend, **options)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_fused_zero_tokens_and_all_masked(backend, generator):
    config = LossConfig.dapo()
    for lead, all_masked in (((0,), False), ((2, 0), False), ((3, 4), True)):
        hidden, weight, bias, tokens = make_case(generator, lead=lead, dim=6, vocab=11)
        inputs = loss_inputs(generator, hidden, weight, bias, tokens)
        if all_masked:
            inputs["mask"] = torch.zeros(lead, dtype=torch.bool)
        h, w, b = leaves(hidden, weight, bias)
        loss, logp, _ = fused_policy_loss(LinearLogits(h, w, b), tokens, inputs, config, backend)
        assert loss.item() == 0.0
        loss.backward()
        assert torch.all(h.grad == 0) and torch.all(w.grad == 0) and torch.all(b.grad == 0)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_fused_backward_rescales_like_fused_policy_loss(backend, generator):
    """grad_output 1: the gradients as made; other values rescale (in place), repeatedly; 0: none."""
    hidden, weight, bias, tokens = make_case(generator, lead=(2, 5), dim=9, vocab=41)
    inputs = loss_inputs(generator, hidden, weight, bias, tokens)
    h, w, b = leaves(hidden, weight, bias)
    loss, _, _ = fused_policy_loss(LinearLogits(h, w, b, chunk_tokens=3), tokens, inputs, LossConfig.dapo(), backend)
    # clone: the first backward returns the saved gradients themselves, which later ones rescale in place
    base = [t.detach().clone() for t in torch.autograd.grad(loss, (h, w, b), retain_graph=True)]
    for factor in (1.0, 2.5, -0.75, 1.0, 3.0):
        got = torch.autograd.grad(loss, (h, w, b), torch.tensor(factor), retain_graph=True)
        for g, e in zip(got, base):
            torch.testing.assert_close(g, e * factor, rtol=1e-6, atol=1e-9)
    got = torch.autograd.grad(loss, (h, w, b), torch.tensor(0.0), retain_graph=True, allow_unused=True,
                              materialize_grads=True)
    assert all(torch.all(g == 0) for g in got)
    (2.0 * loss).backward()
    torch.testing.assert_close(h.grad, base[0] * 2.0)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_fused_matches_materialised_rlfuse_policy_loss(backend, generator):
    """Same loss and gradients as rlfuse.policy_loss on the materialised logits (same backend)."""
    hidden, weight, bias, tokens = make_case(generator, lead=(2, 9), dim=20, vocab=257)
    inputs = loss_inputs(generator, hidden, weight, bias, tokens, softcap=5.0)
    config = LossConfig.grpo()
    h, w, b = leaves(hidden, weight, bias)
    loss, logp, ent = fused_policy_loss(LinearLogits(h, w, b, softcap=5.0, chunk_tokens=5), tokens, inputs,
                                        config, backend)
    loss.backward()
    h2, w2, b2 = leaves(hidden, weight, bias)
    out = rlfuse.policy_loss(LinearLogits(h2, w2, b2, softcap=5.0).materialize(), tokens, config=config,
                             backend=backend, **inputs)
    out.loss.backward()
    assert out.metrics["path"] == "fused"
    torch.testing.assert_close(loss, out.loss, rtol=1e-5, atol=1e-6)
    valid = inputs["mask"]
    torch.testing.assert_close(logp[valid], out.logprobs[valid], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent[valid], out.entropy[valid], rtol=1e-5, atol=1e-5)
    for got, expected in ((h.grad, h2.grad), (w.grad, w2.grad), (b.grad, b2.grad)):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())


# --- batch invariance ----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_batch_invariance_general_path(backend, generator):
    """A sequence alone vs inside a larger batch (at another position, with masked padding around it):
    bitwise the same log-probs, entropies and hidden-gradient rows. grad_weight / grad_bias are sums
    over every token of the batch and cannot be."""
    # D = 160: large enough that this machine's BLAS rounds a row differently with the number of rows
    # (without batch_invariant the same comparison is not bitwise equal here).
    dim, vocab, seq = 160, 97, 6
    batch_hidden, weight, bias, batch_tokens = make_case(generator, lead=(4, seq), dim=dim, vocab=vocab)
    mask = torch.rand(4, seq, generator=generator) > 0.3
    mask[2] = True
    g = torch.Generator().manual_seed(3)
    g_logp, g_ent = torch.randn(4, seq, generator=g), torch.randn(4, seq, generator=g)

    def run(hidden, tokens, m, gl, ge):
        h = hidden.detach().clone().requires_grad_(True)
        src = LinearLogits(h, weight, bias, softcap=3.0, scale=0.9, chunk_tokens=8, batch_invariant=True)
        logp, ent = linear_token_logprobs(src, tokens, 0.8, True, backend, mask=m)
        torch.autograd.backward([logp, ent], [gl, ge])
        return logp.detach(), ent.detach(), h.grad

    full = run(batch_hidden, batch_tokens, mask, g_logp, g_ent)
    alone = run(batch_hidden[2:3], batch_tokens[2:3], mask[2:3], g_logp[2:3], g_ent[2:3])
    for a, f in zip(alone, full):
        assert torch.equal(a[0], f[2])
    # The same sequence unmasked and first in another batch.
    other = torch.cat([batch_hidden[2:3], batch_hidden[:2]])
    shifted = run(other, torch.cat([batch_tokens[2:3], batch_tokens[:2]]), None,
                  torch.cat([g_logp[2:3], g_logp[:2]]), torch.cat([g_ent[2:3], g_ent[:2]]))
    for a, s in zip(alone, shifted):
        assert torch.equal(a[0], s[0])


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_batch_invariance_fused_path(backend, generator):
    """token-sum (a token's weight does not depend on the batch): per-token log-probs and hidden
    gradient rows bitwise the same alone and inside a batch."""
    hidden, weight, bias, tokens = make_case(generator, lead=(3, 5), dim=160, vocab=61)
    inputs = loss_inputs(generator, hidden, weight, bias, tokens)
    inputs["mask"][1] = True
    config = LossConfig.dapo(aggregation="token-sum", kl="k3", kl_coef=0.1)

    def run(sl):
        h = hidden[sl].detach().clone().requires_grad_(True)
        src = LinearLogits(h, weight, bias, chunk_tokens=4, batch_invariant=True)
        loss, logp, _ = fused_policy_loss(src, tokens[sl], {k: v[sl] for k, v in inputs.items()}, config, backend)
        loss.backward()
        return logp, h.grad

    full_logp, full_grad = run(slice(None))
    alone_logp, alone_grad = run(slice(1, 2))
    assert torch.equal(alone_logp[0], full_logp[1]) and torch.equal(alone_grad[0], full_grad[1])


# --- property tests -------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(0, 12), dim=st.integers(1, 9), vocab=st.integers(1, 40), chunk=st.integers(1, 13),
       bias=st.booleans(), scale=st.sampled_from([None, 0.5, -1.25, 3.0]), softcap=st.sampled_from([None, 0.75, 5.0]),
       temperature=st.sampled_from([1.0, 0.6, 1.7]), masked=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 2**31 - 1))
def test_property_token_logprobs(n, dim, vocab, chunk, bias, scale, softcap, temperature, masked, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    case = make_case(g, lead=(n,), dim=dim, vocab=vocab, bias=bias, hidden_scale=2.0, dtype=dtype)
    mask = (torch.rand(n, generator=g) > 0.5) if masked else None
    check_token_logprobs(*case, "cpu", chunk_tokens=chunk, scale=scale, softcap=softcap, temperature=temperature,
                         mask=mask, generator=g)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(b=st.integers(1, 3), t=st.integers(1, 6), dim=st.integers(1, 8), vocab=st.integers(2, 50),
       chunk=st.integers(1, 9), softcap=st.sampled_from([None, 2.0]), invariant=st.booleans(),
       name=st.sampled_from(sorted(FUSED_CONFIGS)), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       seed=st.integers(0, 2**31 - 1))
def test_property_fused(b, t, dim, vocab, chunk, softcap, invariant, name, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    check_fused(g, FUSED_CONFIGS[name], "cpu", lead=(b, t), dim=dim, vocab=vocab, softcap=softcap,
                chunk_tokens=chunk, batch_invariant=invariant, dtype=dtype)
