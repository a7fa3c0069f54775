"""rlfuse in verl: drop-in log-prob / entropy helpers, and rlfuse's extra losses in verl's registry.

Helpers (same signatures as ``verl.utils.torch_functional``)::

    from rlfuse.integrations import verl as rlfuse_verl
    rlfuse_verl.patch_torch_functional()      # verl_F.logprobs_from_logits / entropy_from_logits -> rlfuse
    # or call rlfuse_verl.logprobs_from_logits(logits, labels) / entropy_from_logits(logits) directly
    rlfuse_verl.patch_fused_kernels()         # use_fused_kernels: log-probs + entropy from hidden states,
                                              # rlfuse.LinearLogits behind verl's linear_cross_entropy /
                                              # FusedLinearForPPO (the logits are never stored)

Losses (``actor_rollout_ref.actor.policy_loss.loss_mode``)::

    rlfuse_verl.register_policy_losses()      # adds "troll", "gppo", "pspo" to verl's POLICY_LOSS_REGISTRY

``gppo`` and ``pspo`` work from verl's log-probs like verl's own losses. ``troll`` needs the logits
and the old policy's top tokens (``rlfuse.sparse_logprobs`` of the old logits, stored where the old
log-probs are computed), which verl's stock actor does not pass to a loss function: the actor wraps
its loss call in ``with rlfuse_verl.troll_inputs(logits, tokens, old_topk): ...``. Knobs are read
from ``config.policy_loss`` when present (``troll_eps``, ``troll_alpha``, ``troll_k``,
``troll_threshold``, ``gppo_beta_low``, ``gppo_beta_high``, ``pspo_alpha``), else rlfuse's defaults.
"""

from __future__ import annotations

import contextlib
import threading

import torch

from .. import functional as F
from .. import reference as ref
from ..config import LossConfig
from ..linear import LinearLogits
from ..losses import policy_loss

try:
    from verl.trainer.ppo import core_algos
except ImportError as error:  # pragma: no cover - exercised only without verl
    raise ImportError("rlfuse.integrations.verl needs verl: pip install 'rlfuse[verl]'") from error


# --- helpers ---------------------------------------------------------------------------------------


def logprobs_from_logits(logits, labels, inplace_backward=True):
    """verl's ``logprobs_from_logits``: log-prob of ``labels`` under ``softmax(logits)``, fp32.

    ``inplace_backward`` is accepted for signature compatibility and ignored: verl computes the
    entropy from the same logits, so writing the gradient into them would be unsafe here.
    """
    del inplace_backward
    return F.token_logprobs(logits, labels)


def logprobs_from_logits_v2(logits, labels):
    return F.token_logprobs(logits, labels)


def entropy_from_logits(logits):
    """verl's ``entropy_from_logits``: entropy of ``softmax(logits)`` per row, fp32, differentiable."""
    return F.entropy(logits)


def entropy_from_logits_with_chunking(logits, chunk_size: int = 2048):
    del chunk_size  # rlfuse never materialises a [rows, vocab] intermediate; no chunking needed
    return F.entropy(logits)


HELPERS = {
    "logprobs_from_logits": logprobs_from_logits,
    "logprobs_from_logits_v2": logprobs_from_logits_v2,
    "logprobs_from_logits_naive": logprobs_from_logits_v2,
    "entropy_from_logits": entropy_from_logits,
    "entropy_from_logits_with_chunking": entropy_from_logits_with_chunking,
}


def linear_cross_entropy(hidden, weight, labels, temperature: float = 1.0, reduction: str = "none",
                         dist_process_group=None):
    """``verl.utils.kernel.linear_cross_entropy`` (verl's ``use_fused_kernels`` path): the log-probs of
    ``labels`` and the entropy from ``hidden [..., D]`` and the lm_head ``weight [V, D]``, through
    ``rlfuse.LinearLogits`` (chunked GEMMs, the ``[N, V]`` logits never stored). Only verl's
    ``reduction="none"`` (per-token outputs of ``labels``' shape) and no vocabulary-parallel group."""
    if reduction.lower() != "none":
        raise ValueError(f"reduction={reduction!r}: rlfuse's drop-in returns per-token values only ('none')")
    if dist_process_group is not None:
        raise ValueError("dist_process_group: the vocabulary-parallel lm_head is not supported by this drop-in")
    src = LinearLogits(hidden, weight)
    return F.token_logprobs(src, labels.to(torch.int64), temperature=float(temperature), return_entropy=True)


class FusedLinearForPPO(torch.nn.Module):
    """``verl.utils.experimental.torch_functional.FusedLinearForPPO``: ``forward(hidden_states,
    vocab_weights, input_ids, temperature) -> (log_probs, entropy)`` from hidden states, through
    ``rlfuse.LinearLogits``. ``chunk_size`` is the tokens per chunk; ``impl_backend`` is accepted
    for signature compatibility (rlfuse picks its kernel backend itself)."""

    def __init__(self, chunk_size: int = 512, impl_backend: str = "torch"):
        super().__init__()
        self.chunk_size = chunk_size
        self.impl_backend = impl_backend

    def forward(self, hidden_states, vocab_weights, input_ids, temperature: float = 1.0):
        src = LinearLogits(hidden_states, vocab_weights, chunk_tokens=self.chunk_size)
        return F.token_logprobs(src, input_ids.to(torch.int64), temperature=float(temperature), return_entropy=True)


def patch_fused_kernels():
    """Point verl's fused-kernel path (``use_fused_kernels``: log-probs and entropy from hidden
    states) at rlfuse: ``verl.utils.kernel.linear_cross_entropy.linear_cross_entropy`` and
    ``verl.utils.experimental.torch_functional.FusedLinearForPPO``. verl's model code imports them
    when called, so the patch reaches it. Returns a function that undoes the patch."""
    import importlib

    targets = [("verl.utils.kernel.linear_cross_entropy", "linear_cross_entropy", linear_cross_entropy),
               ("verl.utils.experimental.torch_functional", "FusedLinearForPPO", FusedLinearForPPO)]
    originals = []
    for module_name, name, replacement in targets:
        module = importlib.import_module(module_name)
        originals.append((module, name, getattr(module, name)))
        setattr(module, name, replacement)

    def undo():
        for module, name, original in originals:
            setattr(module, name, original)

    return undo


def patch_torch_functional():
    """Replace verl's log-prob / entropy helpers in ``verl.utils.torch_functional`` with rlfuse's.

    Returns a function that undoes the patch. Modules that imported a helper by name before the
    patch keep the original.
    """
    import verl.utils.torch_functional as verl_F

    originals = {name: getattr(verl_F, name) for name in HELPERS if hasattr(verl_F, name)}
    for name in originals:
        setattr(verl_F, name, HELPERS[name])

    def undo():
        for name, fn in originals.items():
            setattr(verl_F, name, fn)

    return undo


# --- losses ----------------------------------------------------------------------------------------

AGGREGATIONS = ("token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
_context = threading.local()


@contextlib.contextmanager
def troll_inputs(logits, tokens, old_topk):
    """Make the logits ([B, T, V], predicting ``tokens``) and ``old_topk`` visible to the ``troll`` loss."""
    previous = getattr(_context, "troll", None)
    _context.troll = (logits, tokens, old_topk)
    try:
        yield
    finally:
        _context.troll = previous


def _knob(config, name, default):
    policy = getattr(config, "policy_loss", None)
    value = None
    if policy is not None:
        value = policy.get(name, None) if hasattr(policy, "get") else getattr(policy, name, None)
    return default if value is None else value


def _clips(config):
    low = config.clip_ratio_low if config.clip_ratio_low is not None else config.clip_ratio
    high = config.clip_ratio_high if config.clip_ratio_high is not None else config.clip_ratio
    return float(low), float(high)


def _aggregate(loss_mat, mask, loss_agg_mode, config):
    info = dict(getattr(config, "global_batch_info", None) or {})
    return core_algos.agg_loss(loss_mat=loss_mat, loss_mask=mask, loss_agg_mode=loss_agg_mode, **info)


def _metrics(old_log_prob, log_prob, mask, advantages, low, high):
    r = ref.ratio(log_prob.detach(), old_log_prob)
    valid = mask > 0
    count = valid.sum().clamp(min=1)
    return {
        "actor/ppo_kl": float(((old_log_prob - log_prob.detach()) * valid).sum() / count),
        "actor/pg_clipfrac": float(((((advantages > 0) & (r > 1 + high)) | ((advantages < 0) & (r < 1 - low)))
                                    & valid).sum() / count),
        "actor/pg_clipfrac_lower": 0.0,
    }


def compute_policy_loss_gppo(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
                             config=None, rollout_is_weights=None):
    """GPPO (Klear-Reasoner) from verl's log-probs: PPO value, bounded gradients on clipped tokens."""
    low, high = _clips(config)
    cfg = LossConfig(loss="gppo", clip_low=low, clip_high=high, dual_clip=float(_knob(config, "clip_ratio_c", 10.0)),
                     gppo_beta_low=float(_knob(config, "gppo_beta_low", 1.0)),
                     gppo_beta_high=float(_knob(config, "gppo_beta_high", 1.0)))
    losses = ref.policy_term(log_prob, old_log_prob, advantages, cfg)
    if rollout_is_weights is not None:
        losses = losses * rollout_is_weights
    loss = _aggregate(losses, response_mask, loss_agg_mode, config)
    return loss, _metrics(old_log_prob, log_prob, response_mask, advantages, low, high)


def compute_policy_loss_pspo(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
                             config=None, rollout_is_weights=None):
    """PSPO from verl's log-probs: ratio smoothed towards 1 (``pspo_alpha``, default 0.1)."""
    cfg = LossConfig(loss="pspo", pspo_alpha=float(_knob(config, "pspo_alpha", 0.1)))
    losses = ref.policy_term(log_prob, old_log_prob, advantages, cfg)
    if rollout_is_weights is not None:
        losses = losses * rollout_is_weights
    loss = _aggregate(losses, response_mask, loss_agg_mode, config)
    low, high = _clips(config)
    return loss, _metrics(old_log_prob, log_prob, response_mask, advantages, low, high)


def compute_policy_loss_troll(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
                              config=None, rollout_is_weights=None):
    """TROLL on the logits given by ``troll_inputs``; ``log_prob`` is only used for metrics."""
    inputs = getattr(_context, "troll", None)
    if inputs is None:
        raise RuntimeError("loss_mode='troll' needs the logits: wrap the loss call in "
                           "rlfuse.integrations.verl.troll_inputs(logits, tokens, old_topk)")
    if rollout_is_weights is not None:
        raise ValueError("loss_mode='troll' does not take rollout_is_weights (use rlfuse's rollout_correction)")
    if loss_agg_mode not in AGGREGATIONS:
        raise ValueError(f"loss_agg_mode {loss_agg_mode!r} is not one of {AGGREGATIONS}")
    if dict(getattr(config, "global_batch_info", None) or {}):
        raise ValueError("loss_mode='troll' aggregates per micro-batch; global_batch_info is not supported")
    logits, tokens, old_topk = inputs
    cfg = LossConfig.troll(troll_eps=float(_knob(config, "troll_eps", 0.05)),
                           troll_alpha=float(_knob(config, "troll_alpha", 1.0)),
                           troll_k=int(_knob(config, "troll_k", 64)),
                           troll_threshold=float(_knob(config, "troll_threshold", 1e-5)),
                           aggregation=loss_agg_mode, norm_length=float(response_mask.shape[-1]))
    out = policy_loss(logits, tokens, advantages, old_logprobs=old_log_prob, mask=response_mask, config=cfg,
                      old_topk=old_topk)
    metrics = {f"actor/{k}": float(v) for k, v in out.metrics.items() if k.startswith("troll_")}
    metrics["actor/ppo_kl"] = float(out.metrics["approx_kl"])
    metrics["actor/pg_clipfrac"] = 0.0
    metrics["actor/pg_clipfrac_lower"] = 0.0
    return out.loss, metrics


LOSSES = {"troll": compute_policy_loss_troll, "gppo": compute_policy_loss_gppo, "pspo": compute_policy_loss_pspo}


def register_policy_losses(prefix: str = ""):
    """Register rlfuse's losses in verl's ``POLICY_LOSS_REGISTRY`` (``prefix`` avoids name clashes)."""
    for name, fn in LOSSES.items():
        key = prefix + name
        if key in core_algos.POLICY_LOSS_REGISTRY and core_algos.POLICY_LOSS_REGISTRY[key] is not fn:
            raise ValueError(f"verl already has a policy loss named {key!r}; pass a prefix")
        core_algos.register_policy_loss(key)(fn)
    return [prefix + name for name in LOSSES]


def loss_config_from_verl(config, loss_mode: str = "vanilla", loss_agg_mode: str = "token-mean",
                          response_length: int | None = None, response_mask=None) -> LossConfig:
    """The ``LossConfig`` that reproduces one of verl's own losses with ``rlfuse.policy_loss`` on logits.

    Supported: vanilla (with verl's dual clip ``clip_ratio_c``), gspo (as ``gspo_token``, verl's
    form), sapo, cispo (two-sided), geo_mean (GMPO), gpg (REINFORCE). Others raise ``ValueError``.
    ``seq-mean-token-sum-norm`` uses verl's horizon (``response_length``, else the width of
    ``response_mask``) as ``norm_length`` unless the caller passes neither (then rlfuse's default, the
    padded length of the logits, which is the same thing for padded inputs).
    """
    if loss_agg_mode not in AGGREGATIONS:
        raise ValueError(f"loss_agg_mode {loss_agg_mode!r} is not one of {AGGREGATIONS}")
    low, high = _clips(config)
    fields = {"aggregation": loss_agg_mode}
    if loss_agg_mode == "seq-mean-token-sum-norm":
        if response_length is not None:
            fields["norm_length"] = float(response_length)
        elif response_mask is not None:
            fields["norm_length"] = float(response_mask.shape[-1])
    if loss_mode == "vanilla":
        fields.update(loss="ppo", clip_low=low, clip_high=high, dual_clip=float(config.get("clip_ratio_c", 3.0)))
    elif loss_mode == "gspo":
        fields.update(loss="gspo_token", clip_low=low, clip_high=high)
    elif loss_mode == "sapo":
        fields.update(loss="sapo", aggregation="seq-mean-token-mean",  # verl's sapo ignores loss_agg_mode
                      sapo_tau_pos=float(config.tau_pos), sapo_tau_neg=float(config.tau_neg))
    elif loss_mode == "cispo":
        fields.update(loss="cispo", cispo_mode="two_sided", clip_low=low, clip_high=high)
    elif loss_mode == "geo_mean":
        fields.update(loss="gmpo", clip_low=low, clip_high=high)
    elif loss_mode == "gpg":
        fields.update(loss="reinforce")
    else:
        raise ValueError(f"verl loss_mode {loss_mode!r} has no rlfuse mapping here")
    return LossConfig(**fields)


__all__ = ["logprobs_from_logits", "entropy_from_logits", "entropy_from_logits_with_chunking", "patch_torch_functional",
           "register_policy_losses", "troll_inputs", "loss_config_from_verl"]
