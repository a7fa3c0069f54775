"""policy_loss / LossConfig reject bad input with a clear error naming the argument."""

import pytest
import torch

import rlfuse
from rlfuse import LossConfig


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    return dict(logits=torch.randn(2, 4, 11, generator=g), tokens=torch.randint(0, 11, (2, 4), generator=g),
                advantages=torch.randn(2, 4, generator=g), old_logprobs=torch.randn(2, 4, generator=g) - 3)


@pytest.mark.parametrize("field, value, match", [
    ("loss", "ppo2", "LossConfig.loss must be one of"),
    ("aggregation", "mean", "LossConfig.aggregation must be one of"),
    ("clip_low", -0.1, "LossConfig.clip_low must be >= 0"),
    ("clip_high", -0.1, "LossConfig.clip_high must be >= 0"),
    ("kl", "k4", "LossConfig.kl must be one of"),
    ("cispo_mode", "both", "LossConfig.cispo_mode must be one of"),
    ("rollout_correction", "truncate", "LossConfig.rollout_correction must be one of"),
    ("dual_clip", 0.5, "LossConfig.dual_clip must be > 1"),
    ("temperature", 0.0, "LossConfig.temperature must be > 0"),
    ("entropy_quantile", 1.5, "LossConfig.entropy_quantile"),
    ("clip_low", None, "LossConfig.clip_low must be a finite number"),
    ("kl_coef", float("nan"), "LossConfig.kl_coef must be a finite number"),
])
def test_bad_config_values(field, value, match):
    with pytest.raises(ValueError, match=match):
        LossConfig(**{field: value})


def test_cispo_accepts_no_lower_bound():
    assert LossConfig.cispo().clip_low is None


def test_config_is_frozen():
    with pytest.raises(Exception):
        LossConfig().clip_low = 0.3


def test_missing_old_logprobs(batch):
    del batch["old_logprobs"]
    with pytest.raises(ValueError, match="old_logprobs is required by loss='ppo'"):
        rlfuse.policy_loss(**batch)


def test_reinforce_needs_no_old_logprobs(batch):
    del batch["old_logprobs"]
    out = rlfuse.policy_loss(**batch, config=LossConfig(loss="reinforce"))
    assert torch.isfinite(out.loss)


def test_missing_ref_logprobs_for_kl(batch):
    with pytest.raises(ValueError, match="ref_logprobs is required by kl='k3'"):
        rlfuse.policy_loss(**batch, config=LossConfig.grpo())


def test_missing_rollout_logprobs(batch):
    with pytest.raises(ValueError, match="rollout_logprobs is required"):
        rlfuse.policy_loss(**batch, config=LossConfig(rollout_correction="token_truncate"))


def test_advantages_that_broadcast_to_neither(batch):
    batch["advantages"] = torch.randn(3)
    with pytest.raises(ValueError, match=r"advantages must be per token \(2, 4\) or per sequence \(2,\)"):
        rlfuse.policy_loss(**batch)


def test_mask_shape_mismatch(batch):
    with pytest.raises(ValueError, match="mask must have the tokens' shape"):
        rlfuse.policy_loss(**batch, mask=torch.ones(2, 5, dtype=torch.bool))


def test_cu_seqlens_not_increasing(batch):
    packed = {k: v.reshape(8, -1).squeeze(-1) if k != "logits" else v.reshape(8, 11) for k, v in batch.items()}
    with pytest.raises(ValueError, match="cu_seqlens must be non-decreasing"):
        rlfuse.policy_loss(**packed, cu_seqlens=torch.tensor([0, 5, 3, 8]))


def test_cu_seqlens_not_ending_at_n(batch):
    packed = {k: v.reshape(8, -1).squeeze(-1) if k != "logits" else v.reshape(8, 11) for k, v in batch.items()}
    with pytest.raises(ValueError, match="cu_seqlens must start at 0 and end at N = 8"):
        rlfuse.policy_loss(**packed, cu_seqlens=torch.tensor([0, 3, 7]))


def test_cu_seqlens_with_padded_logits(batch):
    with pytest.raises(ValueError, match="cu_seqlens is for packed"):
        rlfuse.policy_loss(**batch, cu_seqlens=torch.tensor([0, 4, 8]))


def test_packed_dr_grpo_needs_norm_length(batch):
    packed = {k: v.reshape(8, -1).squeeze(-1) if k != "logits" else v.reshape(8, 11) for k, v in batch.items()}
    with pytest.raises(ValueError, match="needs config.norm_length"):
        rlfuse.policy_loss(**packed, config=LossConfig.dr_grpo())


def test_fused_path_for_a_sequence_level_loss(batch):
    with pytest.raises(ValueError, match="has no fused path"):
        rlfuse.policy_loss(**batch, config=LossConfig.gspo(), path="fused")


def test_config_of_wrong_type(batch):
    with pytest.raises(TypeError, match="config must be a rlfuse.LossConfig"):
        rlfuse.policy_loss(**batch, config={"loss": "ppo"})


def test_troll_needs_old_topk(batch):
    with pytest.raises(ValueError, match="old_topk is required"):
        rlfuse.policy_loss(**batch, config=LossConfig.troll())


def test_old_topk_only_with_troll(batch):
    old_topk = rlfuse.sparse_logprobs(batch["logits"], batch["tokens"], k=4)
    with pytest.raises(ValueError, match="old_topk is only used"):
        rlfuse.policy_loss(**batch, old_topk=old_topk)


def test_token_ids_out_of_range(batch):
    batch["tokens"][0, 0] = 11
    with pytest.raises(ValueError, match="tokens must lie in"):
        rlfuse.policy_loss(**batch)


@pytest.mark.parametrize("overrides, field", [
    (dict(loss="gspo_token", clip_low=0.02, clip_high=0.03, dual_clip=3.0), "dual_clip"),
    (dict(loss="cispo", delta=1.5), "delta"),
    (dict(loss="gspo_token", clip_low=0.02, clip_high=0.03, delta=1.5), "delta"),
    (dict(loss="gspo", aggregation="token-sum"), "aggregation"),
    (dict(loss="gmpo", aggregation="seq-mean-token-sum-norm", norm_length=8.0), "aggregation"),
    (dict(loss="gspo", rollout_correction="token_truncate"), "rollout_correction"),
    (dict(loss="gmpo", entropy_quantile=0.2), "entropy_quantile"),
    (dict(loss="troll", entropy_quantile=0.2), "entropy_quantile"),
])
def test_knobs_a_loss_would_ignore_are_errors(overrides, field):
    """A config knob the chosen loss does not implement is an error, never a silent no-op."""
    with pytest.raises(ValueError, match=f"LossConfig.{field}"):
        LossConfig(**overrides)


@pytest.mark.parametrize("temperature", [1e-39, 1e39])
def test_config_temperature_needs_a_normal_fp32_reciprocal(temperature):
    """1/T overflows (or underflows) in fp32: the kernels would return NaN."""
    with pytest.raises(ValueError, match="LossConfig.temperature"):
        LossConfig(temperature=temperature)
