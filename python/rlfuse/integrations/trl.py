"""``RLFuseGRPOTrainer``: TRL's ``GRPOTrainer`` with the loss computed by rlfuse from the logits.

Usage (the same arguments as ``trl.GRPOTrainer``)::

    from rlfuse.integrations.trl import RLFuseGRPOTrainer
    trainer = RLFuseGRPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(...), train_dataset=...)
    trainer.train()

With ``RLFuseGRPOTrainer(..., rlfuse_from_hidden=True)`` (or the class attribute) the logits are never
built: the decoder's last hidden states and the lm_head weight go to every rlfuse call as a
``rlfuse.LinearLogits`` (chunked GEMMs; ``[B, C, V]`` logits exist neither in the forward nor in the
backward), for every loss type, with the entropy metrics and the high-entropy mask. Under autocast the
hidden states are cast to the lm_head's dtype and the logits made in that dtype (the logits path makes
them under autocast: bf16-sized differences, as noted below).

What changes: in the update step the model's logits go to ``rlfuse.policy_loss`` (the fused path
for the token-level losses: one kernel reads each logit row, computes the token's loss and writes
its gradient) instead of TRL's log-prob / entropy head followed by the loss in PyTorch. Generation,
rewards, advantages, old / reference log-probs and logging are TRL's own.

How TRL's options map (``GRPOConfig`` field -> rlfuse):

- ``loss_type`` grpo / bnpo / dr_grpo / dapo / luspo -> ``loss="ppo"`` (``delta`` -> ``delta``);
  cispo -> ``loss="cispo", cispo_mode="cap", clip_high=epsilon_high``; sapo -> ``loss="sapo"``
  with TRL's temperatures; vespo -> ``loss="reinforce"`` with the (detached) gamma weights folded
  into the advantages.
- ``importance_sampling_level="sequence"``: grpo -> ``loss="gspo"``; bnpo / dr_grpo / dapo / luspo
  -> ``loss="gspo_token"`` (same value and gradient as TRL's whenever the per-token weights are
  constant within a sequence, which is always the case without token-level vLLM correction).
- Aggregation: grpo / sapo -> seq-mean-token-mean; bnpo -> token-mean over the local tokens;
  dr_grpo -> token-mean over ``B * max_completion_length``; dapo / cispo / vespo -> token-mean over
  TRL's global normaliser (``num_items_in_batch``); luspo -> seq-mean-token-sum; each scaled for
  gradient accumulation exactly as TRL does (rlfuse skips fully masked sequences in its sequence
  means, TRL counts them: the loss is rescaled by the ratio, so the result is TRL's).
- ``off_policy_mask_threshold`` -> ``LossConfig(off_policy_mask_threshold=...)`` with TRL's
  ``sampling_per_token_logps`` as ``rollout_logprobs`` (the same formula as
  ``GRPOTrainer.get_off_policy_mask``); with ``loss="gspo"`` (no per-token policy weight) it is folded.
- Other detached per-token weights that multiply TRL's policy term (vLLM importance-sampling ratio in
  every ``vllm_importance_sampling_mode``, the high-entropy mask of ``top_entropy_quantile``) are
  folded into the advantages: every rlfuse policy term is positively homogeneous in the advantage,
  so this is exact.
- ``beta`` (k3 KL, with or without ``use_bias_correction_kl``) and the entropy bonus
  (``entropy_coef``, adaptive or not) use TRL's exact formulas and normalisers on rlfuse's
  differentiable ``token_logprobs`` (one more fused pass over the logits; rlfuse's own ``kl="k3"``
  clamps k3 at 10 as verl does, TRL does not, so it is not used here).

Known numerical conventions that differ only in degenerate cases: rlfuse clamps log-ratios to
[-20, 20] before ``exp`` (a ratio above e^20 ~ 5e8), and ``gspo_token`` clamps the log sequence
ratio at 10. Options that cannot be honoured raise ``ValueError`` at construction: MoE auxiliary
loss, multimodal processors, ``delta`` with sequence-level importance sampling, sequence-level
cispo / sapo, sequence-level bnpo / dr_grpo / dapo / luspo with token-level vLLM correction,
``delta < 1 + epsilon_high``, and TRL versions this module was not checked against.
"""

from __future__ import annotations

import os

import torch

from .. import functional as F
from ..config import LossConfig
from ..linear import LinearLogits
from ..losses import policy_loss

try:
    import trl
    from trl import GRPOTrainer
except ImportError as error:  # pragma: no cover - exercised only without trl
    raise ImportError("rlfuse.integrations.trl needs TRL: pip install 'rlfuse[trl]'") from error

# GRPOTrainer._compute_loss versions whose conventions this module reproduces (checked by the tests).
TESTED_TRL = ("1.16",)
PPO_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
KNOWN_TYPES = PPO_TYPES + ("cispo", "sapo", "vespo")


class RLFuseGRPOTrainer(GRPOTrainer):
    """``trl.GRPOTrainer`` whose loss is ``rlfuse.policy_loss`` on the model's logits.

    Takes exactly ``GRPOTrainer``'s arguments. The kernel backend is the class attribute
    ``rlfuse_backend`` (``"auto"``); subclass or set it on the instance to force one.
    """

    rlfuse_backend = "auto"
    rlfuse_from_hidden = False

    def __init__(self, *args, rlfuse_from_hidden: bool | None = None, **kwargs):
        _check_trl_version()
        super().__init__(*args, **kwargs)
        if rlfuse_from_hidden is not None:
            self.rlfuse_from_hidden = bool(rlfuse_from_hidden)
        self._rlfuse_check_supported()

    # --- construction-time checks ---------------------------------------------------------------

    def _rlfuse_check_supported(self):
        args = self.args

        def fail(message):
            raise ValueError(f"RLFuseGRPOTrainer cannot honour this GRPOConfig: {message}")

        if self.loss_type not in KNOWN_TYPES:
            fail(f"loss_type={self.loss_type!r} is not one rlfuse maps (supported: {', '.join(KNOWN_TYPES)})")
        sequence = self.importance_sampling_level == "sequence"
        if self.importance_sampling_level not in ("token", "sequence"):
            fail(f"importance_sampling_level={self.importance_sampling_level!r}")
        if sequence and self.loss_type in ("cispo", "sapo"):
            fail(f"importance_sampling_level='sequence' with loss_type={self.loss_type!r} (no sequence-level "
                 "form in rlfuse); use importance_sampling_level='token' or loss_type='grpo'")
        if args.delta is not None:
            if sequence and self.loss_type in PPO_TYPES:
                fail("delta with importance_sampling_level='sequence' (rlfuse's GSPO has no two-sided clip)")
            if args.delta < 1.0 + self.epsilon_high:
                fail(f"delta={args.delta} below 1 + epsilon_high={1.0 + self.epsilon_high} (rlfuse caps the ratio "
                     "before clipping it; the two orders agree only for delta >= 1 + epsilon_high)")
        token_is = (self.use_vllm and self.vllm_importance_sampling_correction
                    and self.vllm_importance_sampling_mode in ("token_truncate", "token_mask"))
        if sequence and token_is and self.loss_type in ("bnpo", "dr_grpo", "dapo", "luspo"):
            fail(f"importance_sampling_level='sequence' with loss_type={self.loss_type!r} and token-level vLLM "
                 "importance sampling (gspo_token's gradient differs when weights vary within a sequence); use "
                 "loss_type='grpo' or a sequence_* vllm_importance_sampling_mode")
        if self.aux_loss_enabled:
            fail("MoE router auxiliary loss (router_aux_loss_coef != 0 on a model with output_router_logits); set "
                 "router_aux_loss_coef=0.0")
        try:
            from transformers import ProcessorMixin
        except ImportError:  # pragma: no cover
            ProcessorMixin = ()
        if isinstance(self.processing_class, ProcessorMixin):
            fail("multimodal processors (vision inputs are not forwarded to the logits call)")

    # --- the loss ---------------------------------------------------------------------------------

    def _rlfuse_logits(self, model, input_ids, attention_mask, logits_to_keep, inputs):
        """[B, C, V] logits predicting the completion tokens (a view; no copy), or with
        ``rlfuse_from_hidden`` a ``rlfuse.LinearLogits`` standing for them."""
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
        for name in ("token_type_ids", "mm_token_type_ids"):
            if inputs.get(name) is not None:
                kwargs[name] = inputs[name]
        if self.rlfuse_from_hidden:
            return self._rlfuse_linear_logits(model, kwargs, logits_to_keep)
        with self.accelerator.autocast():
            logits = model(**kwargs, logits_to_keep=logits_to_keep + 1).logits
        return logits[:, -(logits_to_keep + 1):-1]

    def _rlfuse_linear_logits(self, model, kwargs, logits_to_keep):
        """The decoder's last hidden states at the completion-predicting positions and the lm_head
        (``get_output_embeddings()``, with the model's logit scale and final soft-cap) as a LinearLogits:
        the ``[B, C, V]`` logits are never built, in the forward or the backward."""
        unwrapped = self.accelerator.unwrap_model(model)
        if hasattr(unwrapped, "get_base_model"):  # PEFT: the adapters live inside the base model's modules
            unwrapped = unwrapped.get_base_model()
        text_config = unwrapped.config.get_text_config()
        with self.accelerator.autocast():
            hidden = unwrapped.base_model(**kwargs).last_hidden_state
        lm_head = unwrapped.get_output_embeddings()
        hidden = hidden[:, -(logits_to_keep + 1):-1].to(lm_head.weight.device)
        if hidden.dtype != lm_head.weight.dtype:  # autocast made the hidden states in its dtype
            hidden = hidden.to(lm_head.weight.dtype)
        return LinearLogits(hidden, lm_head.weight, lm_head.bias, scale=_logit_scale(text_config),
                            softcap=getattr(text_config, "final_logit_softcapping", None))

    def _compute_loss(self, model, inputs):
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        logits_to_keep = completion_ids.size(1)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        mask = mask.float()
        tokens = completion_ids
        batch = tokens.size(0)
        mode = "train" if self.model.training else "eval"
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        backend = self.rlfuse_backend
        temperature = self.temperature

        logits = self._rlfuse_logits(model, input_ids, attention_mask, logits_to_keep, inputs)

        advantages = inputs["advantages"]
        if advantages.dim() == 1:
            advantages = advantages.unsqueeze(1)
        advantages = advantages.float()
        old = inputs.get("old_per_token_logps")
        config, scale, policy_metric_scale = self._rlfuse_config(inputs, mask, batch, accumulation, mode)
        opsm = self.off_policy_mask_threshold
        fold_opsm = opsm is not None and config.loss == "gspo"  # a mean over sequences: no per-token weight
        if opsm is not None and not fold_opsm:
            config = config.replace(off_policy_mask_threshold=float(opsm))
        needs_current = old is None or self.top_entropy_quantile < 1.0 or fold_opsm or self.loss_type == "vespo"
        current_logps = current_entropy = None
        if needs_current:
            # Values the loss needs before it is computed (detached): one forward read of the logits.
            with torch.no_grad():
                current_logps, current_entropy = F.token_logprobs(logits.detach(), tokens, temperature=temperature,
                                                                  return_entropy=True, backend=backend)
            current_logps = current_logps * mask
            current_entropy = current_entropy * mask
        if old is None:
            old = current_logps

        entropy_mask = None
        if self.top_entropy_quantile < 1.0:
            entropy_mask = self.get_high_entropy_mask(current_entropy, mask, 1 - self.top_entropy_quantile)

        # Detached per-token factors of TRL's policy term, folded into the advantages.
        weight = torch.ones_like(mask)
        if fold_opsm:
            sampling = inputs.get("sampling_per_token_logps", old)
            weight = weight * self.get_off_policy_mask(advantages, current_logps, sampling, mask, opsm)
        if entropy_mask is not None:
            weight = weight * entropy_mask
        if self.use_vllm and self.vllm_importance_sampling_correction and self.loss_type != "vespo":
            weight = weight * inputs["importance_sampling_ratio"]
        phi_seq = None
        if self.loss_type == "vespo":
            phi_seq = self.get_gamma_weights(
                advantages=advantages, log_ratio_per_token=current_logps - old, mask=mask,
                importance_sampling_ratio=inputs.get("importance_sampling_ratio"), k_pos=self.args.vespo_k_pos,
                lambda_pos=self.args.vespo_lambda_pos, k_neg=self.args.vespo_k_neg,
                lambda_neg=self.args.vespo_lambda_neg)
            weight = weight * phi_seq
        folded = (advantages * weight).expand_as(mask).contiguous()

        sampling = inputs.get("sampling_per_token_logps") if config.off_policy_mask_threshold is not None else None
        out = policy_loss(logits, tokens, folded, old_logprobs=old.detach(), mask=mask, config=config,
                          backend=backend, rollout_logprobs=None if sampling is None else sampling.detach())
        loss = out.loss * scale if scale != 1.0 else out.loss
        per_token_logps = out.logprobs
        entropies = out.entropy

        # KL to the reference (TRL's unclamped k3, optionally bias-corrected) and the entropy bonus,
        # on differentiable log-probs / entropies: one more fused pass.
        entropy_bonus = self._entropy_bonus_enabled
        per_token_kl = None
        if self.beta != 0.0 or entropy_bonus:
            logps, entropy = F.token_logprobs(logits, tokens, temperature=temperature, return_entropy=True,
                                             backend=backend)
            if self.beta != 0.0:
                ref = inputs["ref_per_token_logps"]
                per_token_kl = torch.exp(ref - logps) - (ref - logps) - 1
                if self.args.use_bias_correction_kl:
                    per_token_kl = per_token_kl * torch.exp(self._log_importance_weights(logps, old, mask))
                loss = loss + self._trl_aggregate(self.beta * per_token_kl, mask, inputs, accumulation, mode)
                per_token_kl = per_token_kl.detach()
        policy_loss_value = loss.detach() * policy_metric_scale

        if entropy_bonus:
            effective_mask = mask if entropy_mask is None else mask * entropy_mask
            entropy_loss = (entropy * effective_mask).sum() / effective_mask.sum().clamp(min=1.0) / accumulation
            if self.use_adaptive_entropy:
                apply_coef = self.entropy_coef if self._last_world_entropy <= self.args.entropy_target else 0.0
            else:
                apply_coef = self.entropy_coef
            loss = loss - apply_coef * entropy_loss
            self._metrics[mode]["policy_loss"].append(self.accelerator.gather(policy_loss_value).nanmean().item())
            if self.use_adaptive_entropy and mode == "train":
                self._rlfuse_adaptive_entropy(entropies, effective_mask)
            if mode == "train" and self.accelerator.sync_gradients:
                self._metrics[mode]["entropy_coef"].append(self.entropy_coef)

        self._rlfuse_log_metrics(mode, mask, advantages, per_token_logps, old, entropies, per_token_kl, phi_seq)
        return loss

    def _log_importance_weights(self, logps, old, mask):
        log_ratio = logps - old
        if self.importance_sampling_level == "token":
            return log_ratio
        return ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)

    def _trl_normaliser(self, inputs, mode):
        normaliser = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
        if mode == "train":
            normaliser = normaliser * self.current_gradient_accumulation_steps / self.args.steps_per_generation
        return normaliser

    def _trl_aggregate(self, per_token, mask, inputs, accumulation, mode):
        """TRL's aggregation of a per-token term for the configured loss_type (GRPOTrainer._compute_loss)."""
        if self.loss_type in ("grpo", "sapo"):
            return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean() / accumulation
        if self.loss_type == "bnpo":
            return (per_token * mask).sum() / mask.sum().clamp(min=1.0) / accumulation
        if self.loss_type == "dr_grpo":
            return (per_token * mask).sum() / (per_token.size(0) * self.max_completion_length) / accumulation
        if self.loss_type in ("cispo", "dapo", "vespo"):
            return (per_token * mask).sum() / self._trl_normaliser(inputs, mode)
        return (per_token * mask).sum(-1).mean() / accumulation  # luspo

    def _rlfuse_config(self, inputs, mask, batch, accumulation, mode):
        """LossConfig for this micro-batch, the factor on its loss, and the factor to TRL's policy_loss metric."""
        loss_type, sequence = self.loss_type, self.importance_sampling_level == "sequence"
        fields = {"temperature": float(self.temperature)}
        if loss_type == "cispo":
            fields.update(loss="cispo", cispo_mode="cap", clip_low=None, clip_high=float(self.epsilon_high))
        elif loss_type in PPO_TYPES:
            if sequence:
                fields["loss"] = "gspo" if loss_type == "grpo" else "gspo_token"
            else:
                fields.update(loss="ppo", delta=None if self.args.delta is None else float(self.args.delta))
            fields.update(clip_low=float(self.epsilon_low), clip_high=float(self.epsilon_high))
        elif loss_type == "sapo":
            fields.update(loss="sapo", sapo_tau_pos=float(self.args.sapo_temperature_pos),
                          sapo_tau_neg=float(self.args.sapo_temperature_neg))
        else:  # vespo: -phi A logp, phi folded into the advantages
            fields["loss"] = "reinforce"

        scale, metric_scale = 1.0, accumulation
        if loss_type in ("grpo", "sapo", "luspo"):
            # rlfuse's sequence means skip fully masked sequences; TRL divides by all B (and by the accumulation).
            nonempty = int((mask.sum(-1) > 0).sum())
            fields["aggregation"] = "seq-mean-token-sum" if loss_type == "luspo" else "seq-mean-token-mean"
            scale = max(nonempty, 1) / (batch * accumulation)
        elif loss_type == "bnpo":
            fields.update(aggregation="token-mean", norm_tokens=max(float(mask.sum()), 1.0) * accumulation)
        elif loss_type == "dr_grpo":
            fields.update(aggregation="token-mean", norm_tokens=float(batch * self.max_completion_length * accumulation))
        else:  # cispo, dapo, vespo: TRL's global token normaliser, no accumulation division
            fields.update(aggregation="token-mean", norm_tokens=float(self._trl_normaliser(inputs, mode)))
            metric_scale = 1.0
        return LossConfig(**fields), scale, metric_scale

    def _rlfuse_adaptive_entropy(self, entropies, effective_mask):
        """TRL's adaptive entropy-coefficient controller (same window statistics and update)."""
        stats = torch.stack([(entropies * effective_mask).sum(), effective_mask.sum()]).detach()
        self._entropy_window_stats = stats if self._entropy_window_stats is None else self._entropy_window_stats + stats
        if self.accelerator.sync_gradients:
            window = self.accelerator.reduce(self._entropy_window_stats, reduction="sum")
            world_entropy = (window[0] / window[1].clamp(min=1.0)).item()
            if world_entropy <= self.args.entropy_target:
                self.entropy_coef = min(self.entropy_coef + self.args.entropy_coef_delta, self.args.entropy_coef_max)
            else:
                self.entropy_coef = max(self.entropy_coef - self.args.entropy_coef_delta, self.args.entropy_coef_min)
            self._last_world_entropy = world_entropy
            self._entropy_window_stats = None

    def _rlfuse_log_metrics(self, mode, mask, advantages, per_token_logps, old, entropies, per_token_kl, phi_seq):
        """The metrics GRPOTrainer logs, from rlfuse's detached log-probs and entropies."""
        from trl.trainer.utils import nanmax, nanmin

        def masked_seq_mean(x):
            if x.shape[1] == 1:
                return x.squeeze(1)
            return (x * mask).sum(-1) / mask.sum(-1)

        def global_masked_mean(x):
            if x.shape[1] == 1:
                local_sum, local_count = x.sum(), torch.tensor(float(x.shape[0]), device=x.device)
            else:
                local_sum, local_count = (x * mask).sum(), mask.sum().float()
            totals = self.accelerator.reduce(torch.stack([local_sum, local_count]), reduction="sum")
            return (totals[0] / totals[1].clamp(min=1.0)).item()

        metrics = self._metrics[mode]
        if per_token_kl is not None:
            metrics["kl"].append(global_masked_mean(per_token_kl))
        metrics["entropy"].append(global_masked_mean(entropies * mask))
        coef_1 = torch.exp(self._log_importance_weights(per_token_logps * mask, old, mask))
        if self.loss_type in PPO_TYPES:
            is_low = (coef_1 < 1 - self.epsilon_low) & (advantages < 0)
            is_high = (coef_1 > 1 + self.epsilon_high) & (advantages > 0)
            metrics["clip_ratio/low_mean"].append(global_masked_mean(is_low.float()))
            metrics["clip_ratio/high_mean"].append(global_masked_mean(is_high.float()))
            metrics["clip_ratio/region_mean"].append(global_masked_mean((is_low | is_high).float()))
            metrics["clip_ratio/low_min"].append(nanmin(self.accelerator.gather(masked_seq_mean(is_low.float()))).item())
            metrics["clip_ratio/high_max"].append(
                nanmax(self.accelerator.gather(masked_seq_mean(is_high.float()))).item())
        elif self.loss_type == "cispo":
            clipped = (coef_1 > self.epsilon_high) & (advantages > 0)
            metrics["cispo_clip_ratio"].append(global_masked_mean(clipped.float()))
        elif self.loss_type == "vespo":
            metrics["vespo/phi_seq_mean"].append(global_masked_mean(phi_seq))


# --- GKD / distillation -------------------------------------------------------------------------


def generalized_jsd_loss(student_logits, teacher_logits, labels=None, beta=0.5, temperature=1.0,
                         reduction="batchmean", num_items_in_batch=None):
    """``trl.experimental.gkd.GKDTrainer.generalized_jsd_loss`` on rlfuse's JSD kernels: the same value
    and gradients (both logits), without TRL's ``[B, T, V]`` log-softmaxes and mixture. Either logits
    argument may be a ``rlfuse.LinearLogits``. TRL's reductions: ``batchmean`` (over the tokens whose
    label is not -100, or over the batch without labels), ``sum``, ``mean`` (over every element),
    ``num_items_in_batch``; ``reduction="none"`` (per vocabulary element) has no rlfuse form."""
    from ..distill import distill_loss

    mask = None if labels is None else labels != -100
    total = distill_loss(student_logits, teacher_logits, kind="jsd", beta=beta, temperature=temperature, mask=mask,
                         aggregation="sum").loss
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch
    if reduction == "sum":
        return total
    if reduction == "batchmean":
        return total / (mask.sum().clamp_min(1) if mask is not None else max(student_logits.shape[0], 1))
    if reduction == "mean":
        rows = mask.sum() if mask is not None else student_logits.shape[:-1].numel()
        return total / (rows * student_logits.shape[-1])
    raise ValueError(f"reduction={reduction!r}: rlfuse computes per-token values; use 'batchmean', 'sum' or 'mean'")


def patch_gkd_trainer():
    """Make TRL's ``GKDTrainer`` (and subclasses that do not override it) compute its loss with
    :func:`generalized_jsd_loss`. Returns a function that undoes the patch."""
    from trl.experimental.gkd import GKDTrainer

    original = GKDTrainer.__dict__["generalized_jsd_loss"]
    GKDTrainer.generalized_jsd_loss = staticmethod(generalized_jsd_loss)

    def undo():
        GKDTrainer.generalized_jsd_loss = original

    return undo


def _logit_scale(text_config):
    """The factor a model's lm_head output is multiplied by before any soft-cap (None: 1): Cohere's
    ``logit_scale``, Falcon-H1's ``lm_head_multiplier``, Granite's / MiniCPM3's ``1 / logits_scaling``."""
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        if getattr(text_config, name, None) is not None:
            return getattr(text_config, name)
    scaling = getattr(text_config, "logits_scaling", None)
    if scaling is not None:
        return scaling if text_config.model_type == "hyperclovax" else 1.0 / scaling
    return None


def _check_trl_version():
    version = ".".join(trl.__version__.split(".")[:2])
    if version not in TESTED_TRL and os.environ.get("RLFUSE_TRL_UNTESTED") != "1":
        raise ImportError(
            f"RLFuseGRPOTrainer reproduces GRPOTrainer's loss conventions of TRL {', '.join(TESTED_TRL)}; TRL "
            f"{trl.__version__} is installed. Install a tested TRL (pip install 'rlfuse[trl]'), or set "
            "RLFUSE_TRL_UNTESTED=1 to try anyway (then verify with tests/test_integration_trl.py)."
        )


__all__ = ["RLFuseGRPOTrainer"]
