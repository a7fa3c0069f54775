"""Every LossConfig preset, and the knobs of a policy_loss call, with the inputs each needs: the cases
that test_torch_library (torch.compile) and test_host_syncs (no host read) run over."""

import torch

import rlfuse
from rlfuse import LossConfig

# The knobs' LossConfig overrides on DAPO (the per-token temperature is an argument of the call).
KNOBS = {"per-token temperature": {}, "top_k top_p filter": dict(top_k=8, top_p=0.9),
         "distill teacher": dict(distill_coef=0.2),
         "rollout seq_mask_tis": dict(rollout_correction="seq_mask_tis", rollout_cap=3.0)}


def preset_case(name, generator, b=3, t=6, vocab=41):
    """A LossConfig preset (or a knob on dapo) and the inputs it needs."""
    logits = torch.randn(b, t, vocab, generator=generator)
    tokens = torch.randint(0, vocab, (b, t), generator=generator)
    old = torch.log_softmax(logits, -1).gather(-1, tokens[..., None])[..., 0] + 0.2 * torch.randn(b, t)
    kwargs = dict(advantages=torch.randn(b, t, generator=generator), old_logprobs=old, ref_logprobs=old + 0.1,
                  rollout_logprobs=old - 0.1, mask=torch.rand(b, t, generator=generator) > 0.2)
    if name in KNOBS:
        config = LossConfig.dapo(**KNOBS[name])
        if name == "per-token temperature":
            kwargs["temperature"] = torch.rand(b, t, generator=generator) + 0.5
    else:
        config = getattr(LossConfig, name)()
    if config.distill_coef:
        kwargs["teacher"] = logits + 0.3 * torch.randn(b, t, vocab, generator=generator)
    if config.loss == "troll":
        kwargs["old_topk"] = rlfuse.sparse_logprobs(logits + 0.2, tokens, k=6)
    if config.entropy_ratio_clip:
        kwargs["old_entropy"] = torch.rand(b, t, generator=generator) * 2
    if config.mixes_expert_tokens:
        kwargs["expert_mask"] = torch.rand(b, t, generator=generator) > 0.5
    return logits, tokens, config, kwargs


PRESETS = sorted(name for name, value in vars(LossConfig).items() if isinstance(value, classmethod))
# Every preset, then a knob of a policy_loss call on DAPO (preset_case)
PRESET_CASES = PRESETS + sorted(KNOBS)
