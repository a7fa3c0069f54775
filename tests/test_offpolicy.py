"""Off-policy corrections (issue 17): every knob x backend x path vs the float64 oracle, and parity
with the peers' own code where it is importable (TRL's GRPOTrainer.get_off_policy_mask and its
bias-corrected KL; verl's rollout_corr_helper), else with the peer's formula transcribed here (M2PO:
AReaL's _get_m2po_loss_mask; DPPO / IPO: prime-rl's default_loss_fn / ipo_loss_fn; TOPR: ROLL's
_compute_topr_loss)."""

from __future__ import annotations

import math

import pytest
import torch

import rlfuse
from rlfuse import LossConfig
from rlfuse import reference as ref
from _policy_batch import assert_matches, check_against_oracle, oracle, run
from _policy_batch import make_batch as _make_batch
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



def make_batch(generator, batch=4, seq=9, vocab=257, per_sequence_adv=True, spread=0.3, peak=0.0):
    return _make_batch(generator, batch, seq, vocab, per_sequence_adv=per_sequence_adv, old_spread=0.3,
                       rollout_spread=spread, mask_drop=0.2, peak=peak)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", sorted(FUSED))
def test_fused_corrections_match_the_oracle(name, backend, generator):
    batch = make_batch(generator, per_sequence_adv=not name.startswith("opsm"))
    check_against_oracle(batch, FUSED[name], backend, "fused")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", sorted(GENERAL))
def test_general_corrections_match_the_oracle(name, backend, generator):
    batch = make_batch(generator)
    check_against_oracle(batch, GENERAL[name], backend, "general")


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


# --- M2PO, prime-rl's DPPO / IPO masks, TOPR (issue 17 item 4) ----------------------------------

# name -> (config, make_batch options). Token-local: the fused path on kernel backends (the masks and
# TOPR's weight are detached factors of the current log-probs, computed by a no-grad pre-pass).
MASKS_FUSED = {
    "m2po_preset": (C.m2po(), {}),
    "m2po_dapo_rejection": (C.dapo(m2po_threshold=0.1, rollout_rejection="token_k2", rollout_rejection_threshold=0.3,
                                   kl="k3", kl_coef=0.05), {}),
    "m2po_without_rollout": (C(m2po_threshold=0.02, aggregation="seq-mean-token-sum"), {"rollout_logprobs": None}),
    "dppo_preset": (C.dppo(), {"peak": 12.0}),
    "dppo_one_sided_k2": (C.dapo(dppo_mask_high=0.05, kl="k2", kl_coef=0.1, entropy_coef=0.01),
                          {"peak": 12.0, "per_sequence_adv": False}),
    "ipo_preset": (C.ipo(aggregation="seq-mean-token-mean"), {"peak": 12.0}),
    "topr_preset": (C.topr(), {"per_sequence_adv": False}),
    "topr_weights_rollout": (C.topr(topr_positive_weight=2.0, topr_negative_weight=0.5,
                                    rollout_correction="token_truncate", rollout_cap=1.5, kl="k3", kl_coef=0.05), {}),
    "all_masks_cispo": (C.cispo(m2po_threshold=0.08, dppo_mask_low=0.1, dppo_mask_high=0.15, ipo_threshold=0.3,
                                off_policy_mask_threshold=0.02), {"peak": 12.0, "per_sequence_adv": False}),
}
MASKS_GENERAL = {
    "topr_entropy_quantile": (C.topr(entropy_quantile=0.5), {}),
    "m2po_clip_cov": (C.clip_cov(cov_ratio=0.1, cov_lb=0.0, cov_ub=50.0, m2po_threshold=0.05), {}),
    "dppo_kl_bias": (C.dppo(kl="k3", kl_coef=0.1, kl_bias_correction=True), {"peak": 12.0}),
    "ipo_gspo_token": (C(loss="gspo_token", clip_low=0.02, clip_high=0.03, aggregation="seq-mean-token-mean",
                         ipo_threshold=0.05), {"peak": 12.0}),
}


def _masks_batch(generator, options):
    options = dict(options)
    overrides = {k: options.pop(k) for k in ("rollout_logprobs",) if k in options}
    batch = make_batch(generator, **options)
    batch.update(overrides)
    return batch


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", sorted(MASKS_FUSED))
def test_m2po_dppo_ipo_topr_fused_match_the_oracle(name, backend, generator):
    config, options = MASKS_FUSED[name]
    batch = _masks_batch(generator, options)
    out, grad = run(batch, config, backend)
    assert out.metrics["path"] == ("general" if backend == "torch" else "fused")
    assert_matches(out, grad, *oracle(batch, config))


@pytest.mark.parametrize("backend", ["torch", KERNEL_BACKENDS[0]] if KERNEL_BACKENDS else ["torch"])
@pytest.mark.parametrize("name", sorted(MASKS_GENERAL))
def test_m2po_dppo_ipo_topr_general_match_the_oracle(name, backend, generator):
    config, options = MASKS_GENERAL[name]
    batch = _masks_batch(generator, options)
    out, grad = run(batch, config, backend)
    assert out.metrics["path"] == "general"
    assert_matches(out, grad, *oracle(batch, config))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_masks_fused_and_general_paths_agree(backend, generator):
    batch = make_batch(generator, per_sequence_adv=False, peak=12.0)
    for name in ("all_masks_cispo", "topr_weights_rollout"):
        config = MASKS_FUSED[name][0]
        fused, fused_grad = run(batch, config, backend, path="fused")
        general, general_grad = run(batch, config, backend, path="general")
        torch.testing.assert_close(fused.loss, general.loss, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(fused_grad, general_grad, atol=1e-7, rtol=1e-5)
        for key in fused.metrics:
            if key.startswith(("m2po", "dppo", "ipo", "topr", "off_policy")):
                torch.testing.assert_close(fused.metrics[key], general.metrics[key])


def test_masks_bite_and_are_reported(generator):
    """The test settings really mask something, and the metrics count it."""
    batch = make_batch(generator, per_sequence_adv=False, peak=12.0)
    out, _ = run(batch, MASKS_FUSED["all_masks_cispo"][0], "torch")
    for key in ("m2po_masked_frac", "dppo_masked_frac", "dppo_masked_high_frac", "dppo_masked_low_frac",
                "ipo_masked_frac", "off_policy_masked_frac"):
        assert 0.0 < float(out.metrics[key]) < 1.0, key
    assert float(out.metrics["m2po_m2_kept"]) <= 0.08 < float(out.metrics["m2po_m2"])
    for name in ("m2po_preset", "dppo_preset", "ipo_preset"):
        config, options = MASKS_FUSED[name]
        out, _ = run(_masks_batch(generator, options), config, "torch")
        key = {"m2po_preset": "m2po_masked_frac", "dppo_preset": "dppo_masked_frac", "ipo_preset": "ipo_masked_frac"}
        assert 0.0 < float(out.metrics[key[name]]) < 1.0, name
    out, _ = run(batch, C.topr(), "torch")
    assert 0.0 < float(out.metrics["topr_truncated_frac"]) < float(out.metrics["topr_negative_frac"]) < 1.0


def _m2_values(generator, n, scale=0.3):
    return (scale * torch.randn(n, generator=generator, dtype=torch.float64)) ** 2


def test_m2po_mask_is_the_largest_kept_prefix(generator):
    """Kept second moment <= threshold, and keeping the smallest dropped token too would exceed it."""
    for n, threshold in ((50, 0.04), (7, 0.01), (200, 0.09), (1, 0.5)):
        logp = 0.3 * torch.randn(n, generator=generator, dtype=torch.float64)
        mask = (torch.rand(n, generator=generator) > 0.2).float()
        keep = ref.m2po_mask(logp, torch.zeros(n, dtype=torch.float64), mask, threshold)
        m2, valid = logp**2, mask > 0
        kept, dropped = valid & (keep > 0), valid & (keep == 0)
        assert bool((keep[~valid] == 1).all())
        if kept.any():
            assert float(m2[kept].mean()) <= threshold
            assert float(m2[kept].max()) <= float(m2[dropped].min()) if dropped.any() else True
        if dropped.any():
            extra = torch.cat([m2[kept], m2[dropped].min().reshape(1)])
            assert float(extra.mean()) > threshold


def test_m2po_mask_edge_cases():
    mask = torch.ones(4)
    zeros = torch.zeros(4)
    # every token above the threshold on its own: all masked (the paper's loop empties the batch)
    assert ref.m2po_mask(torch.full((4,), 0.5), zeros, mask, 0.1).tolist() == [0.0] * 4
    # NaN / -inf current log-probs are the largest second moments: masked first
    logp = torch.tensor([float("nan"), -0.1, -float("inf"), 0.1])
    assert ref.m2po_mask(logp, zeros, mask, 0.04).tolist() == [0.0, 1.0, 0.0, 1.0]
    # ties: the later position leaves first; mean of the kept <= threshold (at most, not below)
    logp = torch.tensor([0.25, 0.25, 0.25, 0.0])  # M2 = 1/16 (exact in binary)
    assert ref.m2po_mask(logp, zeros, mask, 1 / 32).tolist() == [1.0, 0.0, 0.0, 1.0]
    assert ref.m2po_mask(torch.tensor([0.25, 0.25]), torch.zeros(2), torch.ones(2), 1 / 16).tolist() == [1.0, 1.0]
    assert ref.m2po_mask(torch.zeros(0), torch.zeros(0), torch.zeros(0), 0.04).numel() == 0


def _areal_get_m2po_loss_mask(sorted_m2, m2_threshold):
    """AReaL areal/trainer/ppo/actor.py _get_m2po_loss_mask (transcribed): sorted descending; mask
    the first k so that the mean of the rest is < threshold (else keep one)."""
    n = sorted_m2.numel()
    suffix_sums = sorted_m2.flip(0).cumsum(0).flip(0)
    counts = torch.arange(n, 0, -1, dtype=sorted_m2.dtype)
    below = torch.where(suffix_sums / counts < m2_threshold)[0]
    num_to_mask = below[0].item() if len(below) > 0 else n - 1
    loss_mask = torch.ones_like(sorted_m2, dtype=torch.bool)
    loss_mask[:num_to_mask] = False
    return loss_mask


def _areal_apply_m2po_masking(old_logp, prox_logp, loss_mask, m2_threshold):
    delta = old_logp - prox_logp
    m2 = delta * delta
    mask_flat = loss_mask.view(-1)
    m2_selected = m2.view(-1)[mask_flat]
    sorted_m2, indices = torch.sort(m2_selected, descending=True)
    restored = torch.argsort(indices)
    selected_mask = _areal_get_m2po_loss_mask(sorted_m2, m2_threshold)[restored]
    full = torch.zeros_like(mask_flat)
    full[mask_flat] = selected_mask
    return full.view_as(loss_mask)


def test_m2po_mask_matches_areal(generator):
    """AReaL's M2PO (its trainer, not importable here; transcribed above). Same masks whenever no
    prefix mean equals the threshold exactly and some token is below it (AReaL: strict <, and it keeps
    one token when none is: the paper's loop keeps none)."""
    for _ in range(20):
        b, t = 6, 13
        behaviour = torch.randn(b, t, generator=generator, dtype=torch.float64)
        current = behaviour + 0.3 * torch.randn(b, t, generator=generator, dtype=torch.float64)
        loss_mask = torch.rand(b, t, generator=generator) > 0.25
        expected = _areal_apply_m2po_masking(behaviour, current, loss_mask, 0.04)
        got = ref.m2po_mask(current.reshape(-1), behaviour.reshape(-1), loss_mask.reshape(-1).float(), 0.04)
        assert torch.equal((got > 0).view(b, t) & loss_mask, expected)


def test_m2po_paper_objective(generator):
    """The paper's objective with its mask: -(1 / sum |o_i|) sum M_t r_t A_t (no clip; the masked
    tokens stay in the normaliser), M2 between the current policy and the behaviour policy."""
    batch = make_batch(generator, per_sequence_adv=True)
    x = batch["logits"].detach().clone().requires_grad_(True)
    logps = torch.log_softmax(x, -1).gather(-1, batch["tokens"][..., None])[..., 0]
    mask = batch["mask"]
    behaviour = batch["rollout_logprobs"]
    m2 = (logps.detach().double() - behaviour.double()) ** 2
    # the paper's Algorithm 1: drop the token of largest M2 while the batch M2 exceeds tau
    keep = mask.clone()
    while keep.any() and float(m2[keep].mean()) > 0.04:
        flat = torch.where(keep, m2, -1.0).reshape(-1)
        keep.view(-1)[int(torch.argmax(flat))] = False
    ratio = torch.exp(logps - batch["old_logprobs"])
    loss = -(keep * ratio * batch["advantages"][:, None]).sum() / mask.sum()
    loss.backward()
    for backend in CPU_BACKENDS:
        out, grad = run(batch, C.m2po(), backend)
        torch.testing.assert_close(out.loss, loss, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(grad, x.grad, atol=1e-7, rtol=1e-4)
        assert float(out.metrics["m2po_masked_frac"]) == pytest.approx(float((mask & ~keep).sum() / mask.sum()))


def _prime_rl_loss(trainer_logprobs, inference_logprobs, advantages, loss_mask, kind, low=0.2, high=0.2,
                   ipo_threshold=0.1, adv_tau=1.0, kl_tau=1e-3):
    """prime-rl src/prime_rl/trainer/rl/loss.py default_loss_fn (DPPO+KL) / ipo_loss_fn, transcribed:
    the per-sample sum (compute_loss divides by the global loss-mask token count)."""
    log_importance_ratio = trainer_logprobs - inference_logprobs
    importance_ratio = torch.exp(log_importance_ratio)
    probs_diff = torch.exp(trainer_logprobs) - torch.exp(inference_logprobs)
    if kind == "dppo":
        invalid_high = probs_diff > high
        invalid_low = probs_diff < -low
        is_masked = torch.where(advantages > 0, invalid_high, invalid_low)
        metrics = {"is_masked_high": (advantages > 0) & invalid_high, "is_masked_low": (advantages < 0) & invalid_low}
    else:
        is_masked = torch.abs(probs_diff) > ipo_threshold
        metrics = {}
    metrics["is_masked"] = is_masked
    keep_mask = loss_mask & ~is_masked
    pg_loss = keep_mask * adv_tau * advantages * importance_ratio
    kl_loss = loss_mask * log_importance_ratio**2
    per_token_loss = -pg_loss + kl_tau * kl_loss
    return per_token_loss.sum(), {k: (v & loss_mask).sum() / loss_mask.sum().clamp(min=1) for k, v in metrics.items()}


@pytest.mark.parametrize("kind", ["dppo", "ipo"])
def test_dppo_ipo_match_prime_rl_formula(kind, generator):
    """prime-rl (not importable here): its loss functions transcribed above, on its conventions: the
    inference log-probs are the ratio's denominator (old_logprobs) and the KL's reference
    (kl_tau (logp - inference)^2 = k2 with kl_coef 2 kl_tau), token-mean over the loss mask."""
    batch = make_batch(generator, per_sequence_adv=False, peak=12.0)
    inference = batch["rollout_logprobs"]
    mask = batch["mask"]
    x = batch["logits"].detach().clone().requires_grad_(True)
    logps = torch.log_softmax(x, -1).gather(-1, batch["tokens"][..., None])[..., 0]
    loss, metrics = _prime_rl_loss(logps, inference, batch["advantages"], mask, kind)
    loss = loss / mask.sum()
    loss.backward()
    preset = C.dppo if kind == "dppo" else C.ipo
    config = preset(kl="k2", kl_coef=2e-3)
    assert metrics["is_masked"] > 0
    for backend in CPU_BACKENDS:
        out, grad = run(batch, config, backend, old_logprobs=inference, ref_logprobs=inference, rollout_logprobs=None)
        torch.testing.assert_close(out.loss, loss, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(grad, x.grad, atol=1e-7, rtol=1e-4)
        names = {"is_masked": f"{kind}_masked_frac", "is_masked_high": "dppo_masked_high_frac",
                 "is_masked_low": "dppo_masked_low_frac"}
        for name, value in metrics.items():
            assert float(out.metrics[names[name]]) == pytest.approx(float(value)), name


def _roll_topr_loss(ratio, log_probs, advantages, scores, positive_weight=1.0, negative_weight=1.0):
    """ROLL roll/pipeline/agentic/agentic_actor_pg_worker.py _compute_topr_loss, transcribed."""
    positive_token_mask = (scores > 0).float().unsqueeze(-1).expand_as(log_probs)
    negative_token_mask = (scores <= 0).float().unsqueeze(-1).expand_as(log_probs)
    positive_loss = -advantages * log_probs * positive_token_mask
    clipped_ratio = torch.clamp(ratio, min=0.0, max=1.0).detach()
    negative_loss = -clipped_ratio * advantages * log_probs * negative_token_mask
    return positive_weight * positive_loss + negative_weight * negative_loss


@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.5, 0.5)])
def test_topr_matches_roll_formula(weights, generator):
    """ROLL (not importable here): its TOPR loss transcribed above, splitting by the episode score; here
    the score is the sequence's advantage (TOPR's T+ / T-), token-mean (ROLL's agg_loss)."""
    batch = make_batch(generator, per_sequence_adv=True)
    mask = batch["mask"].float()
    x = batch["logits"].detach().clone().requires_grad_(True)
    logps = torch.log_softmax(x, -1).gather(-1, batch["tokens"][..., None])[..., 0]
    ratio = torch.exp(logps - batch["old_logprobs"])
    adv = batch["advantages"]
    per_token = _roll_topr_loss(ratio, logps, adv[:, None].expand_as(logps), adv, *weights)
    loss = (per_token * mask).sum() / mask.sum()
    loss.backward()
    config = C.topr(topr_positive_weight=weights[0], topr_negative_weight=weights[1])
    for backend in CPU_BACKENDS:
        out, grad = run(batch, config, backend)
        torch.testing.assert_close(out.loss, loss, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(grad, x.grad, atol=1e-7, rtol=1e-4)


def test_masks_and_topr_config_validation(generator):
    assert C.m2po().m2po_threshold == 0.04 and C.m2po().loss == "pspo" and C.m2po().pspo_alpha == 0.0
    assert (C.dppo().dppo_mask_low, C.dppo().dppo_mask_high, C.ipo().ipo_threshold) == (0.2, 0.2, 0.1)
    assert C.topr().token_local and C.topr().needs_current_logprobs and C.m2po().needs_current_logprobs
    for name in ("m2po_threshold", "dppo_mask_low", "dppo_mask_high", "ipo_threshold"):
        for bad in (-0.1, float("nan"), float("inf"), "0.1", True):
            with pytest.raises(ValueError, match=f"LossConfig.{name}"):
                C(**{name: bad})
        with pytest.raises(ValueError, match=f"LossConfig.{name} is not supported by loss='gspo'"):
            C.gspo(**{name: 0.1})
        with pytest.raises(ValueError, match=f"LossConfig.{name} is not supported by loss='gmpo'"):
            C.gmpo(**{name: 0.1})
    for name in ("topr_positive_weight", "topr_negative_weight"):
        with pytest.raises(ValueError, match=f"LossConfig.{name} applies to loss='topr'"):
            C.dapo(**{name: 0.5})
        with pytest.raises(ValueError, match=f"LossConfig.{name} must be >= 0"):
            C.topr(**{name: -1.0})
    with pytest.raises(ValueError, match="dual_clip"):
        C.topr(dual_clip=3.0)
    batch = make_batch(generator)
    with pytest.raises(ValueError, match="no fused path"):
        run(batch, C.topr(entropy_quantile=0.5), "cpu", path="fused")
    with pytest.raises(ValueError, match="old_logprobs is required by loss='topr'"):
        run(batch, C.topr(), "torch", old_logprobs=None)
    with pytest.raises(ValueError, match="old_logprobs is required by m2po_threshold"):
        run(batch, C(loss="reinforce", m2po_threshold=0.04), "torch", old_logprobs=None, rollout_logprobs=None)
    out, _ = run(batch, C(loss="reinforce", dppo_mask_high=0.1), "torch", old_logprobs=None)  # rollout suffices
    assert "dppo_masked_frac" in out.metrics


@pytest.mark.parametrize("backend", [b for b in ("cpu", "torch") if b in CPU_BACKENDS])
def test_masks_and_topr_never_read_the_host(backend, generator, monkeypatch):
    from rlfuse.ops import policy_loss as policy_ops
    from test_host_syncs import count_host_reads

    monkeypatch.setattr(policy_ops, "DEVICE_RESCALE_ON_CPU", True, raising=False)
    batch = make_batch(generator, per_sequence_adv=False, peak=12.0)
    previous = rlfuse.set_validation(False)
    try:
        for config in (MASKS_FUSED["all_masks_cispo"][0], C.topr(kl="k3", kl_coef=0.1), C.m2po()):
            with count_host_reads() as reads:
                out, _ = run(batch, config, backend)
            assert reads == [], (config, reads)
            assert torch.isfinite(out.loss)
    finally:
        rlfuse.set_validation(previous)


@pytest.mark.parametrize("backend", [b for b in ("cpu", "torch") if b in CPU_BACKENDS])
def test_masks_and_topr_compile_fullgraph(backend, generator):
    """torch.compile(fullgraph=True) through the pre-pass, the sort of M2PO and TOPR's weight."""
    batch = make_batch(generator, per_sequence_adv=False, peak=12.0)
    kwargs = {k: v for k, v in batch.items() if k != "logits"}
    for config in (MASKS_FUSED["all_masks_cispo"][0], C.topr(kl="k3", kl_coef=0.1)):
        def loss_fn(logits):
            out = rlfuse.policy_loss(logits, config=config, backend=backend, **kwargs)
            return out.loss, out.metrics.get("m2po_masked_frac", out.metrics["entropy"])

        results = []
        for fn in (loss_fn, torch.compile(loss_fn, fullgraph=True, backend="aot_eager")):
            x = batch["logits"].detach().clone().requires_grad_(True)
            loss, metric = fn(x)
            loss.backward()
            results.append((loss.detach(), metric, x.grad))
        for eager, compiled in zip(*results):
            torch.testing.assert_close(compiled, eager)
