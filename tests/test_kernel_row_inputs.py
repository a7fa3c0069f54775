"""The optional per-row kernel inputs of the schema (python/rlfuse/_schema.py), launcher by launcher.

- ``inv_temps``: a per-row fp32(1/T) on every kernel that scales logits (docs/SPEC.md section 1 with
  one temperature per row): values and gradients against float64 oracles written here (TROLL: each
  row against a run of the same kernel at that row's scalar temperature, whose float64 oracle is
  tests/test_troll.py's).
- ``clip_low_rows`` / ``clip_high_rows`` / ``dual_clip_rows`` on the fused policy loss: per-token
  bounds of docs/SPEC.md section 3, against tests/_policy_oracle.py's token formulas.
- ``kept_min`` on token_logprobs: the row restricted to {x >= kept_min} with x = fp32(z * inv_temp)
  (the sampler's kept set, docs/SPEC.md section 8): lse and entropy over the kept set, logp -inf for
  a token outside it, an exactly zero gradient outside it.

The launchers are called directly (``rlfuse.ops._launch.kernels``), as the ops do, on the "cpu" and
"triton" backends (Triton through the interpreter here). The scalar ``inv_temp`` passed next to
``inv_temps`` is deliberately wrong: it must be ignored.
"""

from __future__ import annotations

import math
import types

import pytest
import torch

from rlfuse import LossConfig
from rlfuse.ops._launch import kernels
from rlfuse.ops.policy_loss import TokenLossParams
from _oracle import grad_tolerance, value_tolerance
from _policy_oracle import _kl, _logprob_and_entropy, _token_local_term

BACKENDS = ["cpu", "triton"]
# Below the vector lanes, below one chunk (Triton interpreter 1024, CPU 2048), above both.
VOCABS = [7, 1000, 2500]
DTYPES = [torch.float32, torch.bfloat16]
IGNORED_INV_TEMP = 0.3  # the scalar next to inv_temps: a kernel that reads it fails every test
F64 = torch.float64


def _layout(rows: int, vocab: int) -> tuple:
    return (rows, rows, 0, vocab)  # contiguous [rows, vocab]


def _empty(rows: int) -> torch.Tensor:
    return torch.full((rows,), float("nan"), dtype=torch.float32)


def _logits(generator, rows: int, vocab: int, dtype, scale: float = 3.0) -> torch.Tensor:
    """Fresh logits with -inf entries (masked vocabulary) in row 0 when the row is long enough."""
    z = torch.randn(rows, vocab, generator=generator) * scale
    if vocab >= 3:
        z[0, 1::3] = float("-inf")
    return z.to(dtype)


def _inv_temps(generator, rows: int) -> torch.Tensor:
    """fp32(1/T) per row, T in [0.4, 2.5]: every row its own temperature."""
    temperature = 0.4 + 2.1 * torch.rand(rows, generator=generator, dtype=F64)
    return (1.0 / temperature).float()


def _tokens(generator, z: torch.Tensor) -> torch.Tensor:
    """A finite-logit token per row."""
    scores = torch.rand(z.shape, generator=generator).masked_fill(torch.isinf(z.float()), -1.0)
    return scores.argmax(-1)


def _x64(z: torch.Tensor, inv_temps: torch.Tensor) -> torch.Tensor:
    """x = z * (1/T) in float64, differentiable in z (a leaf is returned with it)."""
    z64 = z.detach().to(F64).requires_grad_(True)
    return z64, z64 * inv_temps.to(F64)[:, None]


def _row_statistics64(x: torch.Tensor, tokens: torch.Tensor):
    """(logp, entropy, lse) of each float64 row of x, differentiable (0 log 0 := 0)."""
    lse = torch.logsumexp(x, -1)
    log_p = x - lse[:, None]
    p = log_p.exp()
    entropy = -(p * torch.where(p > 0, log_p, torch.zeros_like(log_p))).sum(-1)
    return log_p.gather(1, tokens[:, None]).squeeze(1), entropy, lse


def _assert_values(actual, expected, vocab):
    torch.testing.assert_close(actual.to(F64), expected.detach(), **value_tolerance(vocab), equal_nan=True)


def _assert_grad(actual, expected, dtype):
    torch.testing.assert_close(actual.to(F64), expected, **grad_tolerance(dtype, expected), equal_nan=True)


# ---- token_logprobs: per-row temperature and the kept set ------------------------------------------


def _kept_case(generator, z, inv_temps, tokens):
    """kept_min per row and the kept mask, as the kernel must compare: fp32(z * inv_temp) >= kept_min.

    Row 0 keeps everything (-inf); row 1 keeps its top 3 with the threshold exactly on the 3rd value
    (a tie at the threshold is kept) and its token moved outside; the rest keep a random top share
    (at least the maximum).
    """
    x32 = z.float() * inv_temps[:, None]
    ordered = x32.sort(-1, descending=True).values
    rows, vocab = z.shape
    kept_min = torch.empty(rows)
    kept_min[0] = float("-inf")
    for row in range(1, rows):
        count = 3 if row == 1 else 1 + int(torch.randint(vocab, (1,), generator=generator))
        kept_min[row] = ordered[row, min(count, vocab) - 1]
    kept = x32 >= kept_min[:, None]
    if rows > 1 and not kept[1].all():
        tokens = tokens.clone()
        tokens[1] = int((~kept[1]).nonzero()[0])
    return kept_min, kept, tokens


def _run_token_logprobs(backend, z, tokens, inv_temps, grad_logp, grad_entropy, kept_min=None,
                        inv_temp=IGNORED_INV_TEMP):
    launch = kernels(backend, "token_logprobs")
    rows, vocab = z.shape
    logp, entropy, lse = _empty(rows), _empty(rows), _empty(rows)
    launch.token_logprobs_fwd(z, _layout(rows, vocab), vocab, tokens, inv_temp, logp, entropy, lse,
                              inv_temps=inv_temps, kept_min=kept_min)
    grad = torch.full_like(z, float("nan"))
    launch.token_logprobs_bwd(z, _layout(rows, vocab), vocab, tokens, inv_temp, lse, entropy, grad_logp,
                              grad_entropy, grad, _layout(rows, vocab), inv_temps=inv_temps, kept_min=kept_min)
    return logp, entropy, lse, grad


def _token_oracle(z, tokens, inv_temps, grad_logp, grad_entropy, kept=None):
    """logp, entropy, lse and d(sum g_logp logp + g_H H)/dz in float64, over the kept set if given.

    A token outside the kept set has logp = -inf; its upstream term differentiates as -lse (the
    token's own x is not in the distribution): -g_logp p_j on the kept set, 0 elsewhere.
    """
    z64, x = _x64(z, inv_temps)
    if kept is not None:
        x = x.masked_fill(~kept, float("-inf"))
    logp, entropy, lse = _row_statistics64(x, tokens)
    logp_term = torch.where(torch.isinf(logp), -lse, logp)
    (grad,) = torch.autograd.grad((grad_logp.to(F64) * logp_term + grad_entropy.to(F64) * entropy).sum(), z64)
    return logp.detach(), entropy.detach(), lse.detach(), grad


def _upstream(generator, rows, masked_row=None):
    grad_logp, grad_entropy = torch.randn(rows, generator=generator), torch.randn(rows, generator=generator)
    if masked_row is not None:
        grad_logp[masked_row] = grad_entropy[masked_row] = 0.0
    return grad_logp, grad_entropy


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_token_logprobs_per_row_temperature(backend, vocab, dtype, generator):
    rows = 5
    z = _logits(generator, rows, vocab, dtype)
    tokens, inv_temps = _tokens(generator, z), _inv_temps(generator, rows)
    grad_logp, grad_entropy = _upstream(generator, rows, masked_row=rows - 1)
    z[rows - 1] = float("nan")  # a masked row's garbage never reaches its (zero) gradient
    logp, entropy, lse, grad = _run_token_logprobs(backend, z, tokens, inv_temps, grad_logp, grad_entropy)
    want_logp, want_entropy, want_lse, want_grad = _token_oracle(z, tokens, inv_temps, grad_logp, grad_entropy)
    _assert_values(logp, want_logp, vocab)
    _assert_values(entropy, want_entropy, vocab)
    _assert_values(lse, want_lse, vocab)
    assert torch.equal(grad[rows - 1], torch.zeros_like(grad[rows - 1]))
    _assert_grad(grad[:-1], want_grad[:-1], dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("per_row_temperature", [False, True], ids=["scalar_T", "row_T"])
def test_token_logprobs_kept_set(backend, vocab, dtype, per_row_temperature, generator):
    rows = 6
    z = _logits(generator, rows, vocab, dtype)
    inv_temps = _inv_temps(generator, rows) if per_row_temperature else torch.full((rows,), 1.0 / 0.7)
    kept_min, kept, tokens = _kept_case(generator, z, inv_temps, _tokens(generator, z))
    grad_logp, grad_entropy = _upstream(generator, rows)
    # Scalar temperature: inv_temps null and the kernel's inv_temp is every row's.
    logp, entropy, lse, grad = _run_token_logprobs(
        backend, z, tokens, inv_temps if per_row_temperature else None, grad_logp, grad_entropy, kept_min,
        inv_temp=IGNORED_INV_TEMP if per_row_temperature else float(inv_temps[0]))
    want_logp, want_entropy, want_lse, want_grad = _token_oracle(z, tokens, inv_temps, grad_logp, grad_entropy, kept)
    outside = tokens.lt(0) | ~kept.gather(1, tokens[:, None]).squeeze(1)
    if vocab > 3:
        assert outside[1], "row 1 must test a token outside its kept set"
    assert torch.all(logp[outside] == float("-inf"))
    _assert_values(logp[~outside], want_logp[~outside], vocab)
    _assert_values(entropy, want_entropy, vocab)
    _assert_values(lse, want_lse, vocab)
    assert torch.all(grad.float()[~kept] == 0), "outside the kept set the gradient is exactly 0"
    _assert_grad(grad, want_grad, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_logprobs_kept_set_nan_row_stays_nan(backend, generator):
    rows, vocab = 2, 40
    z = _logits(generator, rows, vocab, torch.float32)
    z[1, 5] = float("nan")
    tokens, inv_temps = _tokens(generator, z), _inv_temps(generator, rows)
    kept_min = torch.tensor([-1.0, 0.0])
    logp, entropy, lse, grad = _run_token_logprobs(backend, z, tokens, inv_temps, *_upstream(generator, rows),
                                                   kept_min)
    assert logp[1].isnan() and entropy[1].isnan() and lse[1].isnan() and grad[1].isnan().any()
    assert not grad[0].isnan().any()


# ---- fused policy loss: per-row temperature and per-token clip bounds -------------------------------

# Per-token bounds: clip_low (< 0: no lower bound, cispo), clip_high, dual_clip (0: off).
POLICY_CASES = {
    "ppo_dual_clip": LossConfig(loss="ppo", dual_clip=3.0, entropy_coef=0.01),
    "gppo_k3": LossConfig.gppo(kl="k3", kl_coef=0.05),
    "cispo_two_sided": LossConfig(loss="cispo", cispo_mode="two_sided", clip_low=0.2, clip_high=0.3,
                                  entropy_coef=0.02),
}


def _per_token_bounds(generator, rows, config):
    clip_low = 0.05 + 0.4 * torch.rand(rows, generator=generator)
    clip_high = 0.05 + 0.4 * torch.rand(rows, generator=generator)
    dual_clip = torch.where(torch.rand(rows, generator=generator) < 0.3, 0.0,
                            1.5 + 3.0 * torch.rand(rows, generator=generator))
    if config.loss == "cispo":
        clip_low[::3] = -1.0  # no lower bound on these tokens
    return clip_low, clip_high, dual_clip


def _token_config(config, clip_low, clip_high, dual_clip):
    """The LossConfig fields the oracle reads, with one token's bounds."""
    return types.SimpleNamespace(
        loss=config.loss, cispo_mode=config.cispo_mode, delta=None,
        gppo_beta_low=config.gppo_beta_low, gppo_beta_high=config.gppo_beta_high,
        clip_low=None if clip_low < 0 else clip_low, clip_high=clip_high,
        dual_clip=dual_clip if dual_clip > 0 else None,
    )


def _policy_oracle(z, tokens, inv_temps, advantages, old, ref, policy_weight, weight, config, bounds):
    """Per-token weighted loss, logp, entropy and d(sum loss)/dz in float64, one row at a time."""
    z64 = z.detach().to(F64).requires_grad_(True)
    losses, logps, entropies = [], [], []
    for row in range(z.shape[0]):
        temperature = 1.0 / float(inv_temps[row])
        logp, entropy = _logprob_and_entropy(z64[row], int(tokens[row]), temperature)
        token_config = _token_config(config, *(float(b[row]) for b in bounds))
        term = _token_local_term(logp, float(old[row]), float(advantages[row]), token_config)
        loss = policy_weight[row].item() * term
        if config.kl is not None and config.kl_coef:
            loss = loss + weight[row].item() * config.kl_coef * _kl(logp, float(ref[row]), config.kl)
        loss = loss - weight[row].item() * config.entropy_coef * entropy
        losses.append(loss)
        logps.append(logp.detach())
        entropies.append(entropy.detach())
    total = torch.stack(losses)
    (grad,) = torch.autograd.grad(total.sum(), z64)
    return total.detach(), torch.stack(logps), torch.stack(entropies), grad


def _run_policy(backend, z, tokens, inv_temps, per_token, params, bounds):
    rows, vocab = z.shape
    loss, logp, entropy = _empty(rows), _empty(rows), _empty(rows)
    grad = torch.full_like(z, float("nan"))
    clip_low, clip_high, dual_clip = bounds
    kernels(backend, "policy_loss").policy_loss_fused(
        z, _layout(rows, vocab), vocab, tokens, IGNORED_INV_TEMP, *per_token, params, loss, logp, entropy, grad,
        _layout(rows, vocab), inv_temps=inv_temps, clip_low_rows=clip_low, clip_high_rows=clip_high,
        dual_clip_rows=dual_clip)
    return loss, logp, entropy, grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(POLICY_CASES))
@pytest.mark.parametrize("vocab", [7, 1100])
@pytest.mark.parametrize("dtype", DTYPES)
def test_policy_loss_per_token_clip_bounds_and_temperature(backend, case, vocab, dtype, generator):
    config = POLICY_CASES[case]
    rows = 12
    z = _logits(generator, rows, vocab, dtype)
    tokens, inv_temps = _tokens(generator, z), _inv_temps(generator, rows)
    current, _, _ = _row_statistics64(_x64(z, inv_temps)[1].detach(), tokens)
    # Ratios on both sides of every bound: old = logp - N(0, 0.5).
    old = (current - 0.5 * torch.randn(rows, generator=generator, dtype=F64)).float()
    ref = (current + 0.3 * torch.randn(rows, generator=generator, dtype=F64)).float()
    advantages = torch.randn(rows, generator=generator)
    policy_weight = torch.rand(rows, generator=generator) + 0.1
    weight = torch.rand(rows, generator=generator) + 0.1
    policy_weight[-1] = weight[-1] = 0.0  # a masked token
    bounds = _per_token_bounds(generator, rows, config)
    per_token = (advantages, old, ref, policy_weight, weight)
    loss, logp, entropy, grad = _run_policy(backend, z, tokens, inv_temps, per_token,
                                            TokenLossParams.from_config(config), bounds)
    want_loss, want_logp, want_entropy, want_grad = _policy_oracle(z, tokens, inv_temps, *per_token, config, bounds)
    _assert_values(logp, want_logp, vocab)
    _assert_values(entropy, want_entropy, vocab)
    # A loss is a few O(1) factors times logp: the log-prob tolerance, relative to its scale.
    torch.testing.assert_close(loss.to(F64), want_loss, **value_tolerance(vocab))
    assert torch.equal(grad[-1], torch.zeros_like(grad[-1]))
    _assert_grad(grad, want_grad, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_policy_loss_per_token_bounds_change_the_clip(backend, generator):
    """The same token clipped or not only by its own bound: ppo with A > 0 and r = e^0.2 ~ 1.22."""
    rows, vocab = 2, 16
    z = _logits(generator, rows, vocab, torch.float32)
    tokens, inv_temps = _tokens(generator, z), torch.ones(rows)
    current, _, _ = _row_statistics64(z.to(F64), tokens)
    old = (current - 0.2).float()
    ones = torch.ones(rows)
    per_token = (ones, old, None, ones, torch.zeros(rows))
    clip_high = torch.tensor([0.1, 0.5])  # row 0 clipped (r > 1.1), row 1 not (r < 1.5)
    bounds = (torch.full((rows,), 0.2), clip_high, torch.zeros(rows))
    loss, _, _, grad = _run_policy(backend, z, tokens, inv_temps, per_token,
                                   TokenLossParams.from_config(LossConfig(loss="ppo")), bounds)
    assert loss[0].item() == pytest.approx(-1.1, rel=1e-6)
    assert torch.equal(grad[0], torch.zeros_like(grad[0]))
    assert loss[1].item() == pytest.approx(-math.exp(0.2), rel=1e-5)
    assert grad[1].abs().max() > 0


# ---- full-vocabulary KL and JSD: per-row temperature ------------------------------------------------


def _kl_rows(log_a, log_b):
    """KL(a || b) per row in float64; entries with a = 0 add 0 (also to the gradient: no 0 * inf)."""
    live = log_a > float("-inf")
    return (log_a.exp() * torch.where(live, log_a - log_b, torch.zeros_like(log_a))).sum(-1)


def _pair_case(generator, rows, vocab, dtype):
    z = _logits(generator, rows, vocab, dtype)
    w = (z.float() + 0.8 * torch.randn(rows, vocab, generator=generator)).to(dtype)  # -inf where z is
    return z, w


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_kl_div_per_row_temperature(backend, direction, vocab, dtype, generator):
    rows = 4
    z, w = _pair_case(generator, rows, vocab, dtype)
    inv_temps = _inv_temps(generator, rows)
    grad_kl = torch.randn(rows, generator=generator)
    grad_kl[-1] = 0.0
    launch = kernels(backend, "kl_div")
    layout, direction_tag = _layout(rows, vocab), ["forward", "reverse"].index(direction)
    kl, lse, other_lse = _empty(rows), _empty(rows), _empty(rows)
    launch.kl_div_fwd(z, layout, w, layout, vocab, IGNORED_INV_TEMP, direction_tag, kl, lse, other_lse,
                      inv_temps=inv_temps)
    grad_z, grad_w = torch.full_like(z, float("nan")), torch.full_like(w, float("nan"))
    launch.kl_div_bwd(z, layout, w, layout, vocab, IGNORED_INV_TEMP, direction_tag, kl, lse, other_lse, grad_kl,
                      grad_z, layout, grad_w, layout, inv_temps=inv_temps)

    z64, x = _x64(z, inv_temps)
    w64, y = _x64(w, inv_temps)
    log_p, log_q = x.log_softmax(-1), y.log_softmax(-1)
    want_kl = _kl_rows(log_p, log_q) if direction == "forward" else _kl_rows(log_q, log_p)
    want_grad_z, want_grad_w = torch.autograd.grad((want_kl * grad_kl.to(F64)).sum(), (z64, w64))
    _assert_values(kl, want_kl, vocab)
    _assert_values(lse, torch.logsumexp(x, -1), vocab)
    _assert_values(other_lse, torch.logsumexp(y, -1), vocab)
    _assert_grad(grad_z, want_grad_z, dtype)
    _assert_grad(grad_w, want_grad_w, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_jsd_per_row_temperature(backend, vocab, dtype, generator):
    rows, beta = 4, 0.3
    z, w = _pair_case(generator, rows, vocab, dtype)
    inv_temps = _inv_temps(generator, rows)
    grad_jsd = torch.randn(rows, generator=generator)
    grad_jsd[-1] = 0.0
    launch = kernels(backend, "distill")
    layout = _layout(rows, vocab)
    jsd, kl_p, kl_q, lse, other_lse = (_empty(rows) for _ in range(5))
    launch.jsd_fwd(z, layout, w, layout, vocab, IGNORED_INV_TEMP, beta, jsd, kl_p, kl_q, lse, other_lse,
                   inv_temps=inv_temps)
    grad_z, grad_w = torch.full_like(z, float("nan")), torch.full_like(w, float("nan"))
    launch.jsd_bwd(z, layout, w, layout, vocab, IGNORED_INV_TEMP, beta, kl_p, kl_q, lse, other_lse, grad_jsd,
                   grad_z, layout, grad_w, layout, inv_temps=inv_temps)

    z64, x = _x64(z, inv_temps)
    w64, y = _x64(w, inv_temps)
    log_p, log_q = x.log_softmax(-1), y.log_softmax(-1)
    m = (1.0 - beta) * log_p.exp() + beta * log_q.exp()
    log_m = torch.log(torch.where(m > 0, m, torch.ones_like(m)))  # m = 0 only where p = q = 0
    want_kl_p, want_kl_q = _kl_rows(log_p, log_m), _kl_rows(log_q, log_m)
    want_jsd = beta * want_kl_q + (1.0 - beta) * want_kl_p
    want_grad_z, want_grad_w = torch.autograd.grad((want_jsd * grad_jsd.to(F64)).sum(), (z64, w64))
    _assert_values(jsd, want_jsd, vocab)
    _assert_values(kl_p, want_kl_p, vocab)
    _assert_values(kl_q, want_kl_q, vocab)
    _assert_grad(grad_z, want_grad_z, dtype)
    _assert_grad(grad_w, want_grad_w, dtype)


# ---- row top-k and TROLL: per-row temperature ----------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("vocab", VOCABS[:2])  # the selection spans chunks in tests/test_troll.py
@pytest.mark.parametrize("dtype", DTYPES)
def test_row_topk_per_row_temperature(backend, vocab, dtype, generator):
    rows, k = 4, 5
    z = _logits(generator, rows, vocab, dtype)
    tokens, inv_temps = _tokens(generator, z), _inv_temps(generator, rows)
    ids, values = torch.full((rows, k), -7, dtype=torch.int32), torch.full((rows, k), float("nan"))
    logp, entropy, lse = _empty(rows), _empty(rows), _empty(rows)
    kernels(backend, "row_topk").row_topk(z, _layout(rows, vocab), vocab, tokens, IGNORED_INV_TEMP, k, ids, values,
                                          logp, entropy, lse, inv_temps=inv_temps)
    # The top k of x = fp32(z * inv_temp), descending, ties to the lower id; -1 / -inf past the finite entries.
    x32 = z.float() * inv_temps[:, None]
    order = x32.sort(dim=-1, descending=True, stable=True)
    finite = torch.isfinite(x32).sum(-1, keepdim=True)
    slots = torch.arange(k)[None, :]
    padded = torch.cat([order.indices, torch.full((rows, k), -1)], -1)[:, :k]
    padded_values = torch.cat([order.values, torch.full((rows, k), float("-inf"))], -1)[:, :k]
    assert torch.equal(ids.long(), torch.where(slots < finite, padded, -1))
    assert torch.equal(values, torch.where(slots < finite, padded_values, float("-inf")))
    want_logp, want_entropy, want_lse = _row_statistics64(_x64(z, inv_temps)[1].detach(), tokens)
    _assert_values(logp, want_logp, vocab)
    _assert_values(entropy, want_entropy, vocab)
    _assert_values(lse, want_lse, vocab)


def _run_troll(backend, z, tokens, inv_temp, inv_temps, per_token, params, old_ids, old_logprobs, k):
    rows, vocab = z.shape
    outputs = [_empty(rows) for _ in range(7)]  # loss, logp, entropy, eta, kl_before, kl_after, support
    grad = torch.full_like(z, float("nan"))
    kernels(backend, "troll").troll(
        z, _layout(rows, vocab), vocab, tokens, inv_temp, *per_token, params, old_ids, old_logprobs,
        old_ids.shape[1], k, 1e-5, 0.05, 1.0, *outputs, grad, _layout(rows, vocab), inv_temps=inv_temps)
    return (*outputs, grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("vocab", "dtype"), [(7, torch.bfloat16), (1000, torch.float32)])
def test_troll_per_row_temperature(backend, vocab, dtype, generator):
    """Each row with inv_temps equals the same kernel run on that row alone at its scalar temperature
    (the scalar kernel is checked against a float64 oracle by tests/test_troll.py), and the row
    statistics match the float64 oracle here."""
    rows, k, old_k = 3, 4, 3
    z = _logits(generator, rows, vocab, dtype)
    tokens, inv_temps = _tokens(generator, z), _inv_temps(generator, rows)
    old_z = z.float() + 0.5 * torch.randn(rows, vocab, generator=generator)
    old_logp_all = old_z.log_softmax(-1)
    old_ids = old_z.topk(old_k, -1).indices.to(torch.int32)
    old_logprobs = old_logp_all.gather(1, old_ids.long()).float()
    per_token = (torch.randn(rows, generator=generator), old_logp_all.gather(1, tokens[:, None]).squeeze(1),
                 None, torch.rand(rows, generator=generator) + 0.1, torch.rand(rows, generator=generator) + 0.1)
    params = TokenLossParams.from_config(LossConfig(loss="ppo", entropy_coef=0.01))
    together = _run_troll(backend, z, tokens, IGNORED_INV_TEMP, inv_temps, per_token, params, old_ids,
                          old_logprobs, k)
    for row in range(rows):
        one = slice(row, row + 1)
        alone = _run_troll(backend, z[one], tokens[one], float(inv_temps[row]), None,
                           tuple(t if t is None else t[one] for t in per_token), params, old_ids[one],
                           old_logprobs[one], k)
        for got, want in zip(together, alone):
            torch.testing.assert_close(got[one], want, rtol=1e-6, atol=1e-7, equal_nan=True)
    want_logp, want_entropy, _ = _row_statistics64(_x64(z, inv_temps)[1].detach(), tokens)
    _assert_values(together[1], want_logp, vocab)
    _assert_values(together[2], want_entropy, vocab)
