"""policy_loss: every variant x backend x path vs the float64 oracle, plus the edge cases."""

from __future__ import annotations

import pytest
import torch

import rlfuse
from rlfuse import LossConfig
from rlfuse import reference as ref
from _policy_batch import assert_matches, check_against_oracle, make_batch, oracle, run
from _policy_oracle import oracle_policy_loss
from conftest import kernel_backends

C = LossConfig
TOKEN_LOCAL = {
    "ppo": C(),
    "dapo": C.dapo(),
    "grpo_k3": C.grpo(),
    "dr_grpo": C.dr_grpo(),
    "gppo": C.gppo(gppo_beta_low=0.7, gppo_beta_high=1.3),
    "cispo_upper": C.cispo(),
    "cispo_two_sided": C(loss="cispo", cispo_mode="two_sided", clip_low=0.2, clip_high=0.28),
    "cispo_cap": C(loss="cispo", cispo_mode="cap", clip_low=None, clip_high=1.5),
    "sapo": C.sapo(),
    "pspo": C.pspo(),
    "spo": C.spo(),
    "spo_k3_entropy": C.spo(clip_high=0.3, kl="k3", kl_coef=0.05, entropy_coef=0.01),
    "reinforce": C(loss="reinforce", aggregation="token-sum"),
    "ppo_dual_clip": C(dual_clip=1.5),
    "ppo_delta": C(delta=1.3),
    "k1_entropy": C.dapo(kl="k1", kl_coef=0.1, entropy_coef=0.03),
    "k2": C.dapo(kl="k2", kl_coef=0.2),
    "k3+": C.dapo(kl="k3+", kl_coef=0.2),
    "abs": C.dapo(kl="abs", kl_coef=0.2, aggregation="seq-mean-token-sum"),
    "token_truncate": C.dapo(rollout_correction="token_truncate", rollout_cap=1.5),
    "token_mask": C.dapo(rollout_correction="token_mask", rollout_cap=1.5),
    "seq_truncate": C.dapo(rollout_correction="seq_truncate", rollout_cap=1.5),
    "seq_mask": C.dapo(rollout_correction="seq_mask", rollout_cap=3.0, rollout_cap_low=0.5),
    "norm_tokens": C.dapo(norm_tokens=37.0),
    "temperature": C.dapo(temperature=0.7),
}
GENERAL = {
    "gspo": C.gspo(clip_low=0.02, clip_high=0.03),
    "gspo_token": C(loss="gspo_token", clip_low=0.02, clip_high=0.03, aggregation="seq-mean-token-mean"),
    "gmpo": C.gmpo(),
    "clip_cov": C.clip_cov(cov_ratio=0.1, cov_lb=0.0, cov_ub=50.0),
    "kl_cov": C.kl_cov(cov_ratio=0.1),
    "entropy_minority": C.dapo(entropy_quantile=0.3),
    "gspo_k3_entropy": C.gspo(kl="k3", kl_coef=0.05, entropy_coef=0.01),
}
CPU_BACKENDS = kernel_backends("cpu")
KERNEL_BACKENDS = [b for b in CPU_BACKENDS if b != "torch"]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", sorted(TOKEN_LOCAL))
def test_token_local_variants(name, backend, generator):
    batch = make_batch(generator, per_sequence_adv=name.startswith("grpo"))
    check_against_oracle(batch, TOKEN_LOCAL[name], backend, "fused")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", sorted(GENERAL))
def test_sequence_and_batch_level_variants(name, backend, generator):
    batch = make_batch(generator, per_sequence_adv=name.startswith("gspo"))
    check_against_oracle(batch, GENERAL[name], backend, "general")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("aggregation", ["token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum",
                                         "seq-mean-token-sum-norm"])
def test_fused_and_general_paths_agree_on_every_aggregation(aggregation, backend, generator):
    batch = make_batch(generator)
    config = C.dapo(aggregation=aggregation, kl="k3", kl_coef=0.1, entropy_coef=0.01)
    fused, fused_grad = run(batch, config, backend, path="fused")
    general, general_grad = run(batch, config, backend, path="general")
    torch.testing.assert_close(fused.loss, general.loss, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(fused_grad, general_grad, atol=1e-7, rtol=1e-5)
    assert_matches(fused, fused_grad, *oracle(batch, config))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_bf16_and_inplace_backward(backend, generator):
    batch = make_batch(generator, dtype=torch.bfloat16)
    config = C.dapo(kl="k3", kl_coef=0.05, entropy_coef=0.01)
    expected = oracle(batch, config)
    out, grad = run(batch, config, backend, inplace=True)
    assert_matches(out, grad, *expected, eps=8e-3)
    out2, grad2 = run(batch, config, backend)
    assert torch.equal(grad, grad2)  # in-place and out-of-place write the same gradient


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_padded_and_packed_inputs_agree(backend, generator):
    batch = make_batch(generator)
    config = C.dapo(aggregation="seq-mean-token-mean", kl="k2", kl_coef=0.1)
    padded, padded_grad = run(batch, config, backend)
    b, t, v = batch["logits"].shape
    packed = {k: (val.reshape(b * t, v) if k == "logits" else val.reshape(b * t)) for k, val in batch.items()}
    packed["cu_seqlens"] = torch.arange(b + 1) * t
    out, grad = run(packed, config, backend)
    torch.testing.assert_close(out.loss, padded.loss, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(grad.reshape(b, t, v), padded_grad, atol=1e-7, rtol=1e-5)
    torch.testing.assert_close(out.logprobs.reshape(b, t), padded.logprobs)


def test_packed_sequences_of_different_lengths(generator):
    vocab = 97
    lengths = [5, 1, 9, 3]
    n = sum(lengths)
    logits = torch.randn(n, vocab, generator=generator)
    tokens = torch.randint(0, vocab, (n,), generator=generator)
    cu = torch.tensor([0, 5, 6, 15, 18])
    old = torch.randn(n, generator=generator) - 4.5
    adv = torch.randn(len(lengths), generator=generator)
    for config in [C.sapo(), C.gspo(clip_low=0.1, clip_high=0.1), C.dr_grpo(norm_length=12.0)]:
        leaf = logits.clone().requires_grad_(True)
        out = rlfuse.policy_loss(leaf, tokens, adv, old_logprobs=old, cu_seqlens=cu, config=config)
        out.loss.backward()
        expected_loss, expected_grad = oracle_policy_loss(logits, tokens, adv, old, cu_seqlens=cu, config=config)
        assert_matches(out, leaf.grad, expected_loss, expected_grad)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_all_tokens_masked_gives_zero_loss_and_gradient(backend, generator):
    batch = make_batch(generator)
    batch["mask"] = torch.zeros_like(batch["mask"])
    batch["old_logprobs"][0, 0] = float("nan")  # garbage under the mask must not leak
    for config in [C.dapo(kl="k3", kl_coef=0.1), C.gspo(), C(aggregation="seq-mean-token-mean")]:
        out, grad = run(batch, config, backend)
        assert out.loss.item() == 0.0
        assert torch.all(grad == 0)
        assert out.metrics["valid_tokens"].item() == 0


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_sequence_without_valid_tokens_is_skipped(backend, generator):
    batch = make_batch(generator)
    batch["mask"][1] = False
    config = C.sapo()  # seq-mean-token-mean: the empty sequence must not count in the mean
    out, grad = run(batch, config, backend)
    assert_matches(out, grad, *oracle(batch, config))
    assert torch.all(grad[1] == 0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_zero_advantages(backend, generator):
    batch = make_batch(generator)
    batch["advantages"] = torch.zeros_like(batch["advantages"])
    out, grad = run(batch, C.dapo(), backend)
    assert out.loss.item() == 0.0 and torch.all(grad == 0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", ["ppo", "gppo", "cispo_upper", "sapo", "pspo", "spo", "k3+"])
def test_extreme_log_ratios_are_clamped_never_nan(name, backend, generator):
    batch = make_batch(generator)
    logp, _ = ref.token_logprobs_reference(batch["logits"].double(), batch["tokens"])
    batch["old_logprobs"] = (logp - 50.0).float()
    batch["old_logprobs"][:, ::2] = (logp[:, ::2] + 50.0).float()
    batch["ref_logprobs"] = batch["old_logprobs"]
    config = TOKEN_LOCAL[name]
    out, grad = run(batch, config, backend)
    assert torch.isfinite(out.loss) and torch.isfinite(grad).all()
    assert_matches(out, grad, *oracle(batch, config))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_spo_closed_form(backend, generator):
    """SPO (Xie et al. 2025), written out in float64: L = -(A r - |A| (r - 1)^2 / (2 eps)),
    dL/dlogp = -(A r - |A| (r - 1) r / eps), eps = clip_high; token-mean over valid tokens, and
    dL/dlogits_j = dL/dlogp (1[j = y] - p_j)."""
    batch = make_batch(generator, dtype=torch.float32)
    eps = 0.2
    out, grad = run(batch, C.spo(clip_high=eps), backend)
    logp_all = torch.log_softmax(batch["logits"].double(), -1)
    logp = logp_all.gather(-1, batch["tokens"][..., None])[..., 0]
    r = torch.exp(logp - batch["old_logprobs"].double())
    a = batch["advantages"].double()
    w = batch["mask"].double() / batch["mask"].sum()
    loss = (w * -(a * r - a.abs() * (r - 1.0) ** 2 / (2.0 * eps))).sum()
    g_logp = w * -(a * r - a.abs() * (r - 1.0) * r / eps)
    onehot = torch.nn.functional.one_hot(batch["tokens"], logp_all.shape[-1]).double()
    expected_grad = g_logp[..., None] * (onehot - logp_all.exp())
    assert_matches(out, grad, loss, expected_grad)
    assert out.metrics["path"] == ("general" if backend == "torch" else "fused")


def test_spo_needs_a_positive_eps_and_old_logprobs(generator):
    with pytest.raises(ValueError, match="clip_high"):
        C.spo(clip_high=0.0)
    batch = make_batch(generator)
    batch.pop("old_logprobs")
    with pytest.raises(ValueError, match="old_logprobs"):
        run(batch, C.spo(), "torch")


def test_ratio_on_the_clip_boundary_is_unclipped():
    """Documented: r exactly 1 + eps_high (A > 0) is not clipped and keeps its full gradient."""
    log_ratio = torch.tensor([0.25], dtype=torch.float64)
    r = torch.exp(log_ratio)
    config = C(clip_high=float(r - 1.0))
    assert 1.0 + config.clip_high == r.item()
    logp = log_ratio.clone().requires_grad_(True)
    loss = ref.policy_term(logp, torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64), config)
    loss.backward()
    torch.testing.assert_close(logp.grad, -r)


STOP_GRADIENT = ("gppo", "cispo_upper", "cispo_two_sided", "cispo_cap", "k3+")


@pytest.mark.parametrize("name", sorted(set(TOKEN_LOCAL) - set(STOP_GRADIENT)))
def test_reference_token_terms_gradcheck(name, generator):
    fn, args = _reference_token_loss(TOKEN_LOCAL[name], generator, 12, -3.0)
    torch.autograd.gradcheck(fn, args)


def _reference_token_loss(config, generator, n, mean_logp):
    """ref.token_loss as a function of (logp, entropy) on random float64 inputs, and those inputs."""
    logp = (mean_logp + torch.randn(n, generator=generator, dtype=torch.float64)).requires_grad_(True)
    entropy = torch.rand(n, generator=generator, dtype=torch.float64).requires_grad_(True)
    old = logp.detach() + 0.3 * torch.randn(n, generator=generator, dtype=torch.float64)
    ref_lp = logp.detach() + 0.3 * torch.randn(n, generator=generator, dtype=torch.float64)
    adv = torch.randn(n, generator=generator, dtype=torch.float64)
    weights = torch.rand(n, generator=generator, dtype=torch.float64)
    return (lambda lp, h: ref.token_loss(lp, h, old, ref_lp, adv, weights, weights, config)), (logp, entropy)


def test_metrics(generator):
    batch = make_batch(generator)
    config = C.dapo(dual_clip=3.0, kl="k3", kl_coef=0.1, rollout_correction="token_truncate")
    out, _ = run(batch, config, "cpu" if "cpu" in CPU_BACKENDS else "torch")
    m = batch["mask"]
    r = torch.exp(out.logprobs - batch["old_logprobs"])[m]
    a = batch["advantages"][m]
    torch.testing.assert_close(out.metrics["clip_frac_high"], ((a > 0) & (r > 1.28)).float().mean())
    torch.testing.assert_close(out.metrics["clip_frac_low"], ((a < 0) & (r < 0.8)).float().mean())
    torch.testing.assert_close(out.metrics["clip_frac_dual"], ((a < 0) & (r > 3.0)).float().mean())
    torch.testing.assert_close(out.metrics["ratio_max"], r.max())
    torch.testing.assert_close(out.metrics["entropy"], out.entropy[m].mean())
    assert out.metrics["valid_tokens"].item() == m.sum().item()
    for key in ("approx_kl", "ratio_mean", "ratio_min", "kl_ref", "rollout_weight_mean", "rollout_weight_max"):
        assert key in out.metrics and out.metrics[key].requires_grad is False


def test_nn_module(generator):
    batch = make_batch(generator)
    module = rlfuse.nn.PolicyLoss(C.dapo(kl="k1", kl_coef=0.1))
    out = module(batch["logits"], batch["tokens"], batch["advantages"], old_logprobs=batch["old_logprobs"],
                 ref_logprobs=batch["ref_logprobs"], mask=batch["mask"])
    expected, _ = oracle(batch, C.dapo(kl="k1", kl_coef=0.1))
    torch.testing.assert_close(out.loss.double(), expected, atol=2e-5, rtol=2e-5)


def test_clip_cov_is_seeded(generator):
    batch = make_batch(generator)
    config = GENERAL["clip_cov"]
    first, _ = run(batch, config, "torch")
    second, _ = run(batch, config, "torch")
    other, _ = run(batch, config.replace(seed=1), "torch")
    assert torch.equal(first.loss, second.loss)
    assert not torch.equal(first.loss, other.loss)


def test_stop_gradient_variants_follow_the_spec_table(generator):
    """Where a stop-gradient makes gradcheck inapplicable, check docs/SPEC.md's dL/dlogp column directly."""
    n = 64
    logp = (-3 + torch.randn(n, generator=generator, dtype=torch.float64)).requires_grad_(True)
    old = logp.detach() + 0.5 * torch.randn(n, generator=generator, dtype=torch.float64)
    ref_lp = logp.detach() + 0.5 * torch.randn(n, generator=generator, dtype=torch.float64)
    adv = torch.randn(n, generator=generator, dtype=torch.float64)
    r = torch.exp(logp.detach() - old)

    def grad_of(config, ref_logp=ref_lp):
        (g,) = torch.autograd.grad(ref.token_loss(logp, torch.zeros_like(logp), old, ref_logp, adv,
                                                  torch.ones_like(adv), torch.ones_like(adv), config).sum(), logp)
        return g

    gppo = C.gppo(gppo_beta_low=0.7, gppo_beta_high=1.3, dual_clip=None)
    high, low = (adv > 0) & (r > 1.28), (adv < 0) & (r < 0.8)
    expected = torch.where(high, -1.3 * 1.28 * adv, torch.where(low, -0.7 * 0.8 * adv, -adv * r))
    assert high.any() and low.any()
    torch.testing.assert_close(grad_of(gppo), expected)
    torch.testing.assert_close(grad_of(C.cispo()), -torch.clamp(r, max=1.28) * adv)
    torch.testing.assert_close(grad_of(C(loss="cispo", cispo_mode="two_sided")), -torch.clamp(r, 0.8, 1.2) * adv)
    torch.testing.assert_close(grad_of(C(loss="cispo", cispo_mode="cap", clip_low=None, clip_high=1.5)),
                               -torch.clamp(r, max=1.5) * adv)
    k3plus = C(loss="reinforce", kl="k3+", kl_coef=1.0)
    torch.testing.assert_close(grad_of(k3plus), -adv + (logp.detach() - ref_lp))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_fused_masked_rows_with_garbage_logits_get_zero_gradient(backend, generator):
    """Masked tokens' rows are written as zeros, whatever their logits hold (padding may be garbage)."""
    batch = make_batch(generator)
    batch["mask"][0, 3] = False
    batch["logits"][0, 3, 5] = float("nan")
    out, grad = run(batch, C.dapo(), backend, path="fused")
    assert torch.isfinite(out.loss)
    assert torch.all(grad[0, 3] == 0)
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_full_vocabulary_kl_penalty(direction, backend, generator):
    batch = make_batch(generator)
    ref_logits = batch["logits"] + 0.5 * torch.randn(batch["logits"].shape, generator=generator)
    config = C.dapo(kl_full_coef=0.3, kl_full_direction=direction)
    logits = batch["logits"].clone().requires_grad_(True)
    kwargs = {k: v for k, v in batch.items() if k != "logits"}
    out = rlfuse.policy_loss(logits, config=config, backend=backend, ref_logits=ref_logits, **kwargs)
    out.loss.backward()
    assert out.metrics["path"] == "general"
    # Oracle: the dapo loss plus 0.3 * token-mean of the float64 KL.
    base_loss, base_grad = oracle(batch, C.dapo())
    x = batch["logits"].double().requires_grad_(True)
    kl = rlfuse.reference.kl_divergence_reference(x, ref_logits.double(), direction)
    m = batch["mask"].double()
    penalty = 0.3 * (kl * m).sum() / m.sum()
    penalty.backward()
    assert_matches(out, logits.grad, base_loss + penalty.detach(), base_grad + x.grad)
    torch.testing.assert_close(out.metrics["kl_full"].double(), (kl * m).sum().detach() / m.sum(),
                               atol=1e-5, rtol=1e-5)


def test_kl_full_metric_without_penalty_and_missing_ref_logits(generator):
    batch = make_batch(generator)
    out = rlfuse.policy_loss(**batch, ref_logits=batch["logits"].clone())
    assert out.metrics["path"] == "fused" and out.metrics["kl_full"].item() == 0.0
    with pytest.raises(ValueError, match="ref_logits is required by kl_full_coef"):
        rlfuse.policy_loss(**batch, config=C.dapo(kl_full_coef=0.1))


@pytest.mark.parametrize("kind", rlfuse._schema.POLICY_KIND.names)
def test_every_kernel_variant_has_a_differentiable_reference_token_loss(kind):
    """The fused path's reference (ref.token_loss) for every kernel variant, with a KL penalty, under
    gradcheck: a variant whose per-token math needs an input the reference does not forward (CPGD's
    drift needs old_logp) fails here, whichever variant it is."""
    config = LossConfig(loss=kind, kl="k3", kl_coef=0.1, entropy_coef=0.01)
    fn, args = _reference_token_loss(config, torch.Generator().manual_seed(len(kind)), 9, -2.0)
    assert torch.isfinite(fn(*args)).all()
    if kind not in ("gppo", "cispo"):  # stop-gradient weights by design (STOP_GRADIENT above)
        torch.autograd.gradcheck(fn, args)
