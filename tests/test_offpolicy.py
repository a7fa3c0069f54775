"""Off-policy corrections (issue 17): every knob x backend x path vs the float64 oracle, and parity
with the peers' own code where it is importable (TRL's GRPOTrainer.get_off_policy_mask and its
bias-corrected KL; verl's rollout_corr_helper)."""

from __future__ import annotations

import math

import pytest
import torch

import rlfuse
from rlfuse import LossConfig
from rlfuse import reference as ref
from _policy_oracle import oracle_policy_loss
from conftest import kernel_backends

C = LossConfig
CPU_BACKENDS = kernel_backends("cpu")
KERNEL_BACKENDS = [b for b in CPU_BACKENDS if b != "torch"]

# Token-local configurations: the fused path on kernel backends.
FUSED = {
    "opsm": C.dapo(off_policy_mask_threshold=0.02),
    "opsm_grpo_k3": C.grpo(off_policy_mask_threshold=0.0),
    "seq_mask_tis": C.dapo(rollout_correction="seq_mask_tis", rollout_cap=1.3, rollout_cap_low=0.9),
    "token_truncate_batch_norm": C.dapo(rollout_correction="token_truncate", rollout_cap=1.5,
                                        rollout_is_batch_normalize=True),
    "seq_truncate_batch_norm": C(rollout_correction="seq_truncate", rollout_cap=1.5, rollout_is_batch_normalize=True,
                                 aggregation="seq-mean-token-mean"),
    "icepop_batch_norm": C.dapo(rollout_correction="token_mask", rollout_cap=1.3, rollout_cap_low=0.8,
                                rollout_is_batch_normalize=True),
    "reject_token_k1": C.dapo(rollout_rejection="token_k1", rollout_rejection_threshold="0.7_1.4"),
    "reject_token_k2_k3": C.dapo(rollout_rejection="token_k2,token_k3", rollout_rejection_threshold="0.08,0.05",
                                 kl="k3", kl_coef=0.1, entropy_coef=0.01),
    "reject_seq_sum_k1": C.dapo(rollout_rejection="seq_sum_k1", rollout_rejection_threshold=2.0),
    "reject_seq_mean_k3": C(rollout_rejection="seq_mean_k3", rollout_rejection_threshold=0.04,
                            aggregation="seq-mean-token-mean"),
    "reject_seq_max_k2_chained": C.dapo(rollout_correction="token_truncate", rollout_cap=1.5,
                                        rollout_rejection="seq_max_k2,token_k1", rollout_rejection_threshold="0.2,1.6"),
    "everything": C.cispo(rollout_correction="seq_mask_tis", rollout_cap=2.0, rollout_cap_low=0.5,
                          rollout_is_batch_normalize=True, rollout_rejection="token_k3",
                          rollout_rejection_threshold=0.1, off_policy_mask_threshold=0.01, kl="k2", kl_coef=0.05),
}
# The KL bias correction's ratio carries a gradient: the general path.
GENERAL = {
    "kl_bias_k3": C.grpo(kl_bias_correction=True),
    "kl_bias_k1_entropy": C.dapo(kl="k1", kl_coef=0.2, entropy_coef=0.02, kl_bias_correction=True),
    "kl_bias_gspo": C.gspo(clip_low=0.02, clip_high=0.03, kl="k3", kl_coef=0.1, kl_bias_correction=True),
    "kl_bias_gspo_token": C(loss="gspo_token", clip_low=0.02, clip_high=0.03, aggregation="seq-mean-token-mean",
                            kl="k3", kl_coef=0.1, kl_bias_correction=True),
    "gspo_rejection": C.gspo(clip_low=0.02, clip_high=0.03, rollout_rejection="seq_mean_k2",
                             rollout_rejection_threshold=0.04),
    "clip_cov_opsm": C.clip_cov(cov_ratio=0.1, cov_lb=0.0, cov_ub=50.0, off_policy_mask_threshold=0.02),
}


def make_batch(generator, batch=4, seq=9, vocab=257, per_sequence_adv=True, spread=0.3):
    logits = torch.randn(batch, seq, vocab, generator=generator) * 2
    tokens = torch.randint(0, vocab, (batch, seq), generator=generator)
    with torch.no_grad():
        current, _ = ref.token_logprobs_reference(logits.double(), tokens)
    old = (current + 0.3 * torch.randn(batch, seq, generator=generator, dtype=torch.float64)).float()
    ref_lp = (current + 0.3 * torch.randn(batch, seq, generator=generator, dtype=torch.float64)).float()
    rollout = (old + spread * torch.randn(batch, seq, generator=generator)).float()
    advantages = torch.randn(batch if per_sequence_adv else (batch, seq), generator=generator)
    mask = torch.rand(batch, seq, generator=generator) > 0.2
    mask[:, 0] = True
    return dict(logits=logits, tokens=tokens, advantages=advantages, old_logprobs=old, ref_logprobs=ref_lp,
                rollout_logprobs=rollout, mask=mask)


def run(batch, config, backend, path="auto", **overrides):
    logits = batch["logits"].detach().clone().requires_grad_(True)
    kwargs = {k: v for k, v in batch.items() if k != "logits"}
    kwargs.update(overrides)
    out = rlfuse.policy_loss(logits, config=config, backend=backend, path=path, **kwargs)
    out.loss.backward()
    return out, logits.grad


def oracle(batch, config, **overrides):
    b = {**batch, **overrides}
    return oracle_policy_loss(b["logits"], b["tokens"], b["advantages"], b["old_logprobs"], b["ref_logprobs"],
                              b["rollout_logprobs"], b["mask"], config=config)


def assert_matches(out, grad, expected_loss, expected_grad):
    torch.testing.assert_close(out.loss.double(), expected_loss, atol=2e-5, rtol=2e-5)
    scale = expected_grad.abs().max().item()
    torch.testing.assert_close(grad.double(), expected_grad, atol=2e-6 * scale + 1e-8, rtol=2e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", sorted(FUSED))
def test_fused_corrections_match_the_oracle(name, backend, generator):
    batch = make_batch(generator, per_sequence_adv=not name.startswith("opsm"))
    config = FUSED[name]
    out, grad = run(batch, config, backend)
    assert out.metrics["path"] == ("general" if backend == "torch" else "fused")
    assert_matches(out, grad, *oracle(batch, config))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", sorted(GENERAL))
def test_general_corrections_match_the_oracle(name, backend, generator):
    batch = make_batch(generator)
    config = GENERAL[name]
    out, grad = run(batch, config, backend)
    assert out.metrics["path"] == "general"
    assert_matches(out, grad, *oracle(batch, config))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_fused_and_general_paths_agree(backend, generator):
    batch = make_batch(generator, per_sequence_adv=False)
    config = FUSED["everything"]
    fused, fused_grad = run(batch, config, backend, path="fused")
    general, general_grad = run(batch, config, backend, path="general")
    torch.testing.assert_close(fused.loss, general.loss, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(fused_grad, general_grad, atol=1e-7, rtol=1e-5)
    for key in ("off_policy_masked_frac", "rollout_rejected_frac", "rollout_ess", "chi2_token"):
        torch.testing.assert_close(fused.metrics[key], general.metrics[key])


def test_filters_bite_and_are_reported(generator):
    """The test thresholds really drop something (else the oracle tests prove little)."""
    batch = make_batch(generator, per_sequence_adv=False)
    fractions = {}
    for name in ("opsm", "reject_token_k1", "reject_seq_mean_k3", "reject_seq_max_k2_chained"):
        out, _ = run(batch, FUSED[name], "torch")
        key = "off_policy_masked_frac" if name.startswith("opsm") else "rollout_rejected_frac"
        fractions[name] = float(out.metrics[key])
    assert all(0.0 < f < 1.0 for f in fractions.values()), fractions
    out, _ = run(batch, FUSED["seq_mask_tis"], "torch")
    assert 0.0 < float(out.metrics["rollout_dropped_frac"]) < 1.0


def test_opsm_behaviour_is_old_without_rollout(generator):
    batch = make_batch(generator, per_sequence_adv=False)
    config = C.dapo(off_policy_mask_threshold=0.0)
    out, grad = run(batch, config, "torch", rollout_logprobs=None)
    assert_matches(out, grad, *oracle(batch, config, rollout_logprobs=None))
    with pytest.raises(ValueError, match="old_logprobs"):
        rlfuse.policy_loss(batch["logits"], batch["tokens"], batch["advantages"], mask=batch["mask"],
                           config=C(loss="reinforce", off_policy_mask_threshold=0.0))


def test_opsm_ignores_nan_behaviour_and_keeps_positive_advantages():
    """A NaN behaviour log-prob counts as 0 (TRL); A >= 0 is always kept."""
    logp = torch.tensor([-1.0, -1.0, -1.0, -1.0])
    behaviour = torch.tensor([float("nan"), 0.0, -0.5, -0.5])
    mask = torch.ones(4)
    cu = torch.tensor([0, 2, 4])
    adv = torch.tensor([-1.0, -1.0, 0.0, 0.0])
    keep = ref.off_policy_sequence_mask(logp, behaviour, adv, mask, cu, 0.4)
    # sequence 0: mean(0, 1) = 0.5 > 0.4 and A < 0 -> dropped; sequence 1: A = 0 -> kept
    assert keep.tolist() == [0.0, 0.0, 1.0, 1.0]


def test_config_validation():
    with pytest.raises(ValueError, match="rollout_rejection"):
        C(rollout_rejection="token_k4", rollout_rejection_threshold=1.0)
    with pytest.raises(ValueError, match="rollout_rejection"):
        C(rollout_rejection="token_k2", rollout_rejection_threshold="0.1_0.2")
    with pytest.raises(ValueError, match="rollout_rejection"):
        C(rollout_rejection="token_k1,token_k2", rollout_rejection_threshold="1.5,0.1,0.2")
    with pytest.raises(ValueError, match="rollout_rejection"):
        C(rollout_rejection="token_k1", rollout_rejection_threshold="2.0_1.5")
    with pytest.raises(ValueError, match="rollout_rejection_threshold"):
        C(rollout_rejection_threshold=1.0)
    with pytest.raises(ValueError, match="kl_bias_correction"):
        C(kl_bias_correction=True)
    with pytest.raises(ValueError, match="rollout_is_batch_normalize"):
        C(rollout_is_batch_normalize=True)
    with pytest.raises(ValueError, match="off_policy_mask_threshold"):
        C.gspo(off_policy_mask_threshold=0.1)
    assert not C(kl="k3", kl_coef=0.1, kl_bias_correction=True).token_local
    assert rlfuse.config.parse_rollout_rejection("token_k1, seq_max_k3,token_k1", "2.0") == (
        ("token_k1", 0.5, 2.0), ("seq_max_k3", None, 2.0))


def test_missing_rollout_logprobs_raise(generator):
    batch = make_batch(generator)
    with pytest.raises(ValueError, match="no fused path"):
        run(batch, GENERAL["kl_bias_k3"], "cpu", path="fused")
    config = C.dapo(rollout_rejection="token_k2", rollout_rejection_threshold=0.1)
    with pytest.raises(ValueError, match="rollout_logprobs"):
        run(batch, config, "torch", rollout_logprobs=None)


# --- peer parity: TRL --------------------------------------------------------------------------


def _trl():
    pytest.importorskip("trl")
    from trl import GRPOTrainer

    return GRPOTrainer


@pytest.mark.parametrize("with_rollout", [True, False])
def test_opsm_matches_trl_get_off_policy_mask(with_rollout, generator):
    GRPOTrainer = _trl()
    batch = make_batch(generator, per_sequence_adv=True)
    logits, tokens, mask = batch["logits"], batch["tokens"], batch["mask"].float()
    logp = torch.log_softmax(logits.double(), -1).gather(-1, tokens[..., None])[..., 0].float()
    behaviour = batch["rollout_logprobs"] if with_rollout else batch["old_logprobs"]
    adv = batch["advantages"].unsqueeze(1)
    for threshold in (-0.1, 0.0, 0.02, 0.1):
        expected = GRPOTrainer.get_off_policy_mask(adv, logp, behaviour, mask, threshold).expand_as(mask) * mask
        cu = torch.arange(mask.shape[0] + 1) * mask.shape[1]
        flat_mask = mask.reshape(-1)
        got = ref.off_policy_sequence_mask(torch.where(flat_mask > 0, logp.reshape(-1), 0.0),
                                           torch.where(flat_mask > 0, behaviour.reshape(-1), 0.0),
                                           adv.expand_as(mask).reshape(-1), flat_mask, cu, threshold) * flat_mask
        assert torch.equal(got.view_as(mask), expected), threshold

    # Loss level: TRL's dapo-style loss with the mask, written as in GRPOTrainer._compute_loss.
    config = C(loss="ppo", clip_low=0.2, clip_high=0.28, off_policy_mask_threshold=0.02)
    overrides = {} if with_rollout else {"rollout_logprobs": None}
    out, grad = run(batch, config, "torch", **overrides)
    x = batch["logits"].detach().clone().requires_grad_(True)
    per_token_logps = torch.log_softmax(x, -1).gather(-1, tokens[..., None])[..., 0]
    old = batch["old_logprobs"]
    opsm = GRPOTrainer.get_off_policy_mask(adv, per_token_logps, behaviour, mask, 0.02)
    coef_1 = torch.exp(per_token_logps - old)
    coef_2 = torch.clamp(coef_1, 1 - 0.2, 1 + 0.28)
    per_token_loss = -torch.min(coef_1 * adv, coef_2 * adv) * opsm
    loss = (per_token_loss * mask).sum() / mask.sum()
    loss.backward()
    torch.testing.assert_close(out.loss, loss, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grad, x.grad, atol=1e-7, rtol=1e-4)


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_kl_bias_correction_matches_trl_formula(level, generator):
    _trl()
    batch = make_batch(generator, per_sequence_adv=True)
    tokens, mask = batch["tokens"], batch["mask"].float()
    old, ref_lp = batch["old_logprobs"], batch["ref_logprobs"]
    beta = 0.1
    # GRPOTrainer._compute_loss (TRL 1.16), grpo loss type: k3 KL times coef_1 (not detached), the
    # clipped policy term, per-sequence token means averaged over sequences.
    x = batch["logits"].detach().clone().requires_grad_(True)
    logps = torch.log_softmax(x, -1).gather(-1, tokens[..., None])[..., 0]
    log_ratio = logps - old
    if level == "token":
        log_iw = log_ratio
        eps_low, eps_high = 0.2, 0.2
        config = C.grpo(kl_coef=beta, kl_bias_correction=True)
    else:
        log_iw = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
        eps_low, eps_high = 0.03, 0.04
        config = C.gspo(clip_low=eps_low, clip_high=eps_high, kl="k3", kl_coef=beta, kl_bias_correction=True)
    coef_1 = torch.exp(log_iw)
    per_token_kl = (torch.exp(ref_lp - logps) - (ref_lp - logps) - 1) * coef_1
    coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
    adv = batch["advantages"].unsqueeze(1)
    per_token_loss = -torch.min(coef_1 * adv, coef_2 * adv) + beta * per_token_kl
    loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    loss.backward()
    out, grad = run(batch, config, "torch")
    torch.testing.assert_close(out.loss, loss, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grad, x.grad, atol=1e-7, rtol=1e-4)


# --- peer parity: verl --------------------------------------------------------------------------


def _verl():
    return pytest.importorskip("verl.trainer.ppo.rollout_corr_helper")


VERL_CASES = [
    # (verl rollout_is, rollout_is_threshold, batch_normalize, rollout_rs, rollout_rs_threshold) -> LossConfig
    (("token", 1.5, False, None, None), C.dapo(rollout_correction="token_truncate", rollout_cap=1.5)),
    (("token", "0.8_1.3", True, None, None),
     C.dapo(rollout_correction="token_mask", rollout_cap=1.3, rollout_cap_low=0.8, rollout_is_batch_normalize=True)),
    (("sequence", 2.0, True, None, None),
     C.dapo(rollout_correction="seq_truncate", rollout_cap=2.0, rollout_is_batch_normalize=True)),
    (("sequence", "0.5_3.0", False, "token_k1", "0.7_1.4"),
     C.dapo(rollout_correction="seq_mask", rollout_cap=3.0, rollout_cap_low=0.5, rollout_rejection="token_k1",
            rollout_rejection_threshold="0.7_1.4")),
    (("token", 2.0, False, "seq_sum_k1,seq_mean_k2,seq_max_k3", "2.5,0.05,0.3"),
     C.dapo(rollout_correction="token_truncate", rollout_cap=2.0, rollout_rejection="seq_sum_k1,seq_mean_k2,seq_max_k3",
            rollout_rejection_threshold="2.5,0.05,0.3")),
    ((None, None, False, "token_k2,token_k3,seq_sum_k2,seq_sum_k3,seq_mean_k1,seq_mean_k3,seq_max_k2",
      "0.2,0.2,0.6,0.6,0.8_1.25,0.06,0.15"),
     C.dapo(rollout_rejection="token_k2,token_k3,seq_sum_k2,seq_sum_k3,seq_mean_k1,seq_mean_k3,seq_max_k2",
            rollout_rejection_threshold="0.2,0.2,0.6,0.6,0.8_1.25,0.06,0.15")),
]


@pytest.mark.parametrize("case", range(len(VERL_CASES)))
def test_rollout_correction_matches_verl(case, generator):
    helper = _verl()
    (rollout_is, is_threshold, normalize, rs, rs_threshold), config = VERL_CASES[case]
    batch = make_batch(generator, batch=6, seq=11, per_sequence_adv=False)
    old, rollout, mask = batch["old_logprobs"], batch["rollout_logprobs"], batch["mask"].float()
    weights, verl_mask, verl_metrics = helper.compute_rollout_correction_and_rejection_mask(
        old, rollout, mask, rollout_is=rollout_is, rollout_is_threshold=is_threshold,
        rollout_is_batch_normalize=normalize, rollout_rs=rs, rollout_rs_threshold=rs_threshold)
    b, t = mask.shape
    cu = torch.arange(b + 1) * t
    flat = mask.reshape(-1)
    masked_old = torch.where(flat > 0, old.reshape(-1), 0.0)
    masked_rollout = torch.where(flat > 0, rollout.reshape(-1), 0.0)
    if rs is not None:
        keep = ref.rollout_rejection_mask(masked_old, masked_rollout, flat, cu, config)
        assert torch.equal(keep.view(b, t), verl_mask.float()), "rejection mask"
    if rollout_is is not None:
        w = ref.rollout_correction_weights(masked_old, masked_rollout, flat, cu, config) * flat
        torch.testing.assert_close(w.view(b, t), weights.batch["rollout_is_weights"] * mask, rtol=1e-5, atol=1e-6)

    # The loss: verl's per-token PPO term times the IS weights, token-mean over the rejected mask.
    out, grad = run(batch, config, "torch")
    x = batch["logits"].detach().clone().requires_grad_(True)
    logps = torch.log_softmax(x, -1).gather(-1, batch["tokens"][..., None])[..., 0]
    ratio = torch.exp(logps - old)
    adv = batch["advantages"]
    pg = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1 - config.clip_low, 1 + config.clip_high))
    if rollout_is is not None:
        pg = pg * weights.batch["rollout_is_weights"]
    loss = (pg * verl_mask).sum() / verl_mask.sum()
    loss.backward()
    torch.testing.assert_close(out.loss, loss, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grad, x.grad, atol=1e-7, rtol=1e-4)

    # Diagnostics (verl names -> rlfuse names).
    names = {"kl": "mismatch_kl", "k3_kl": "mismatch_k3_kl", "training_ppl": "training_ppl",
             "training_log_ppl": "training_log_ppl", "rollout_ppl": "rollout_ppl", "rollout_log_ppl": "rollout_log_ppl",
             "log_ppl_diff": "log_ppl_diff", "log_ppl_abs_diff": "log_ppl_abs_diff",
             "log_ppl_diff_max": "log_ppl_diff_max", "log_ppl_diff_min": "log_ppl_diff_min", "ppl_ratio": "ppl_ratio",
             "chi2_token": "chi2_token", "chi2_seq": "chi2_seq"}
    if rollout_is is not None:
        names["rollout_is_eff_sample_size"] = "rollout_ess"
        if normalize:
            names["rollout_is_batch_norm_factor"] = "rollout_batch_norm_factor"
    for verl_name, name in names.items():
        expected = verl_metrics[f"rollout_corr/{verl_name}"]
        assert float(out.metrics[name]) == pytest.approx(expected, rel=1e-4, abs=1e-5), name
    if rs is not None:
        assert float(out.metrics["rollout_rejected_frac"]) == pytest.approx(
            verl_metrics["rollout_corr/rollout_rs_masked_fraction"], rel=1e-5, abs=1e-6)


def test_mismatch_metrics_are_finite_without_valid_tokens(generator):
    batch = make_batch(generator)
    out, grad = run(batch, C.dapo(rollout_correction="token_truncate"), "torch",
                    mask=torch.zeros_like(batch["mask"]))
    assert float(out.loss) == 0.0 and float(grad.abs().sum()) == 0.0
    for key in ("mismatch_kl", "chi2_token", "training_ppl", "rollout_ess"):
        assert not math.isnan(float(out.metrics[key])), key
