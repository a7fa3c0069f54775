"""Mixed on-/off-policy losses and token re-weightings of ``rlfuse.policy_loss`` (docs/SPEC.md section 11).

* CHORD and LUFFY: ``policy_loss(..., expert_mask=...)`` marks off-policy expert tokens; CHORD adds
  its SFT term on them (global ``chord_mu``, token weight ``p (1 - p)``), LUFFY its shaped
  ``-A p / (p + gamma)``; the configured loss covers the other (on-policy) tokens. Two per-token
  forms in one batch: fused by the detached-weight route of ``losses._fused`` (the kernel has one
  policy form per call), docs/SPEC.md section 11.
* EMPG: the advantages modulated by the entropy (a no-grad pre-pass), any path.
* Lp-Reg: ``KL(proxy || pi)`` to the min-p filtered proxy on the lowest-probability negative tokens,
  a term added to any path from the few selected rows: on a kernel backend the sampler's kept set and
  two token_logprobs reads of those rows (``rlfuse.filtered.min_p_logprobs``).

The math is in ``rlfuse.reference.mixed_policy`` (the torch backend's code and the kernels' oracle);
this module validates inputs, applies the weights and reports the metrics.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .filtered import min_p_logprobs
from .reference import mixed_policy as mixed
from .reference.policy_loss import aggregation_weights, weighted
from .source import is_source


def chord_mu_schedule(step: int, warmup_steps: int = 0, decay_steps: int = 0, peak: float = 0.1,
                      valley: float = 0.1) -> float:
    """CHORD's global coefficient at a training step (Trinity-RFT ``mu_schedule_function``): a linear
    warm-up to ``peak`` over ``warmup_steps``, a cosine decay to ``valley`` over ``decay_steps``, then
    ``valley``. Pass the value as ``LossConfig(chord_mu=...)`` each step; the defaults are the
    constant 0.1 of Trinity-RFT's ``mix_chord``."""
    if step < warmup_steps:
        return step / warmup_steps * peak
    if step >= warmup_steps + decay_steps:
        return valley
    progress = (step - warmup_steps) / decay_steps
    return (peak - valley) * 0.5 * (1.0 + math.cos(math.pi * progress)) + valley


def expert_positions(expert_mask, tokens: Tensor, config) -> Tensor | None:
    """``expert_mask`` checked and flattened to bool ``[N]`` (None when not given)."""
    mixes = config.mixes_expert_tokens
    if expert_mask is None:
        if mixes:
            raise ValueError("expert_mask is required by chord_mu / luffy_gamma (it marks the off-policy expert "
                             "tokens)")
        return None
    if not mixes:
        raise ValueError("expert_mask is only used by chord_mu (CHORD) or luffy_gamma (LUFFY); set one of them")
    if not isinstance(expert_mask, Tensor):
        raise TypeError(f"expert_mask must be a torch.Tensor, got {type(expert_mask).__name__}")
    if expert_mask.dtype != torch.bool:
        raise TypeError(f"expert_mask must be a bool tensor, got {expert_mask.dtype}")
    if expert_mask.device != tokens.device:
        raise ValueError(f"expert_mask is on {expert_mask.device} but tokens are on {tokens.device}")
    if expert_mask.shape != tokens.shape:
        raise ValueError(f"expert_mask must have the tokens' shape {tuple(tokens.shape)}, "
                         f"got {tuple(expert_mask.shape)}")
    return expert_mask.reshape(-1)


def prepare(batch, expert_mask, config, inplace_backward: bool) -> None:
    """Checks this module's inputs before any kernel runs and sets ``batch.expert``. The expert
    tokens' old / rollout log-probs (the expert's behaviour policy: no loss term reads them) are
    replaced by 0, as masked ones, so that a NaN left there cannot reach the on-policy weights."""
    if config.lp_reg_coef != 0:
        if is_source(batch.logits):
            raise ValueError("lp_reg_coef needs a logits tensor (its KL reads the selected rows of the logits)")
        if inplace_backward:
            raise ValueError("inplace_backward cannot be combined with lp_reg_coef (its KL reads the logits again)")
    batch.expert = expert_positions(expert_mask, batch.tokens, config)
    if batch.expert is not None:
        for name in ("old", "rollout"):
            values = getattr(batch, name)
            if values is not None:
                setattr(batch, name, torch.where(batch.expert, 0.0, values).contiguous())


def on_policy_weights(aggregation: Tensor, rollout_weights, batch, settings, config) -> Tensor:
    """The policy term's per-token weights: the aggregation weights (CHORD: ``(1 - mu)`` times those
    of the on-policy tokens alone; LUFFY: 0 on expert tokens, whose term is :func:`expert_loss`),
    times the rollout correction."""
    weights = aggregation
    if batch.expert is not None:
        on_policy = batch.mask * (~batch.expert).to(batch.mask.dtype)
        if config.chord_mu is not None:
            weights = (1.0 - config.chord_mu) * aggregation_weights(on_policy, batch.cu_seqlens, settings)
        else:
            weights = torch.where(batch.expert, torch.zeros_like(aggregation), aggregation)
    return weights if rollout_weights is None else weights * rollout_weights


def _expert_weights(batch, aggregation: Tensor, config) -> Tensor:
    """CHORD: ``mu`` over the token-mean of the expert tokens; LUFFY: the aggregation weights."""
    expert = batch.expert & (batch.mask > 0)
    if config.chord_mu is not None:
        return config.chord_mu * expert.float() / expert.sum().clamp(min=1)
    return torch.where(expert, aggregation, torch.zeros_like(aggregation))


def expert_loss(logp: Tensor, batch, aggregation: Tensor, config):
    """The expert tokens' terms, summed with their weights (0 without an expert mask). ``logp`` is
    differentiable, 0 at masked positions."""
    if batch.expert is None:
        return 0.0
    if config.chord_mu is not None:
        term = mixed.chord_sft_term(logp, config.chord_phi)
    else:
        term = mixed.luffy_term(logp, batch.advantages, config.luffy_gamma)
    return weighted(term, _expert_weights(batch, aggregation, config)).sum()


def apply_empg(batch, config, entropy: Tensor) -> dict:
    """EMPG: replaces ``batch.advantages`` by the entropy-modulated ones (``entropy`` detached, [N])
    and returns its metrics."""
    valid = batch.mask > 0
    entropy = torch.where(valid, entropy.reshape(-1).float(), 0.0)
    g, _ = mixed.empg_components(entropy, batch.mask, config.empg_k, config.empg_k_future)
    batch.advantages = mixed.empg_advantages(entropy, batch.advantages, batch.mask, batch.cu_seqlens,
                                             config.empg_k, config.empg_k_future, config.empg_zeta).contiguous()
    return {"empg_scale_min": _valid_extreme(g, valid, "min"), "empg_scale_max": _valid_extreme(g, valid, "max")}


def _valid_extreme(values: Tensor, valid: Tensor, kind: str) -> Tensor:
    """min or max over the valid tokens, fp32; NaN without one."""
    fill = math.inf if kind == "min" else -math.inf
    padded = torch.cat([torch.where(valid, values.float(), fill), values.new_full((1,), fill, dtype=torch.float32)])
    extreme = padded.amin() if kind == "min" else padded.amax()
    return torch.where(valid.any(), extreme, math.nan)


def _proxy_kl(rows: Tensor, tokens: Tensor, temperature, min_p: float, backend: str) -> tuple[Tensor, Tensor]:
    """``(KL(proxy || pi), kept)`` per row (docs/SPEC.md section 11; ``temperature`` a number or one
    value per row): the reference on ``backend='torch'``; else ``log proxy(y) - log pi(y)`` from the
    kernels (0 where ``y`` is outside the kept set, whose rows get no weight)."""
    if backend == "torch":
        return mixed.filtered_proxy_kl(rows, tokens, temperature, min_p)
    kept_logp, logp = min_p_logprobs(rows, tokens, temperature, min_p, backend)
    kept = kept_logp.detach() > -math.inf
    return torch.where(kept, kept_logp - logp, 0.0), kept


class _SelectedRows(torch.autograd.Function):
    """The rows ``positions`` (flat over the leading dims) of ``x [..., V]``, whose backward returns a
    sparse COO gradient of ``x``: autograd adds the few rows into the loss's dense gradient instead of
    a zero ``x``-sized buffer and a dense add (Lp-Reg selects about ``rho`` = 1% of the rows)."""

    @staticmethod
    def forward(ctx, x, positions):
        ctx.save_for_backward(positions)
        ctx.shape = x.shape
        return x.reshape(-1, x.shape[-1])[positions]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_rows):
        (positions,) = ctx.saved_tensors
        indices = torch.stack(torch.unravel_index(positions, ctx.shape[:-1]))
        return torch.sparse_coo_tensor(indices, grad_rows, ctx.shape, check_invariants=False), None


def selected_rows(x: Tensor, positions: Tensor) -> Tensor:
    """The rows ``positions`` (flat over the leading dims) of ``x [..., V]``, differentiable; under
    ``torch.compile`` plain indexing (AOTAutograd traces no sparse gradients)."""
    if torch.compiler.is_compiling() or not x.requires_grad:
        return x.reshape(-1, x.shape[-1])[positions]
    return _SelectedRows.apply(x, positions)


def lp_reg_loss(logits, batch, logp: Tensor, aggregation: Tensor, config, temperature,
                backend: str) -> tuple[Tensor, dict]:
    """Lp-Reg: ``lp_reg_coef * sum_t w_t KL_t(proxy || pi)`` over the regularised tokens (the
    ``max(1, floor(rho n_neg))`` lowest-probability valid tokens with ``A < 0`` whose token the
    min-p proxy keeps), ``w`` the aggregation weights; from those rows only (``logp`` detached).
    ``temperature``: the call's (a number or a flat per-token tensor, README "Per-token
    temperature"); ``backend``: the resolved one."""
    valid = batch.mask > 0
    logp = torch.where(valid, logp.reshape(-1).float(), 0.0)
    positions, live = mixed.lp_reg_candidates(logp, batch.advantages, batch.mask, config.lp_reg_rho)
    vocab = logits.shape[-1]
    # Rows not regularised (masked ones included) read as zeros: whatever they hold, no NaN reaches
    # the gradient through their zero weight.
    rows = torch.where(live[:, None], selected_rows(logits, positions), 0.0)
    chosen = batch.tokens.reshape(-1)[positions].clamp(0, vocab - 1)
    if isinstance(temperature, Tensor):  # the selected rows keep their own T
        temperature = temperature.reshape(-1)[positions]
    kl, kept = _proxy_kl(rows, chosen, temperature, config.lp_reg_min_p, backend)
    selected = live & kept
    loss = config.lp_reg_coef * weighted(kl, torch.where(selected, aggregation[positions], 0.0)).sum()
    regularised = selected & (kl.detach() > 0)
    count = regularised.sum()
    metrics = {"lp_reg_frac": count / valid.sum().clamp(min=1),
               "lp_reg_kl": torch.where(regularised, kl.detach(), 0.0).sum() / count.clamp(min=1)}
    return loss, metrics


def expert_metrics(batch, logp: Tensor, config) -> dict:
    """CHORD / LUFFY diagnostics over the valid expert tokens (0 without one)."""
    if batch.expert is None:
        return {}
    valid = batch.mask > 0
    expert = batch.expert & valid
    count = expert.sum().clamp(min=1)
    p = torch.exp(torch.where(expert, logp.reshape(-1).float(), 0.0))
    metrics = {"expert_frac": expert.sum() / valid.sum().clamp(min=1)}
    if config.chord_mu is not None:
        metrics["chord_mu"] = batch.mask.new_tensor(float(config.chord_mu))
        metrics["chord_phi_mean"] = torch.where(expert, p * (1.0 - p), 0.0).sum() / count
    else:
        metrics["luffy_shaped_mean"] = torch.where(expert, p / (p + config.luffy_gamma), 0.0).sum() / count
    return metrics
