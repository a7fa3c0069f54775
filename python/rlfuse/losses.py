"""``rlfuse.policy_loss``: the PPO/GRPO family from raw logits, in one call (docs/SPEC.md sections 3-6).

Token-local variants (ppo, dapo, gppo, cispo, sapo, pspo, spo, cpgd, reinforce, with KL, entropy bonus,
rollout correction and any aggregation; with BAPO / HAPO bounds, ERC, CHORD and LUFFY after a no-grad
pre-pass) take the fused path: one kernel per row computes the loss and writes the gradient.
Everything else (gspo, gspo_token, gmpo, clip_cov, kl_cov, the high-entropy mask) takes the general
path: fused ``token_logprobs`` for the log-probs and entropy, then the per-token math of
``rlfuse.reference`` on ``[N]``-sized tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor

from . import _schema
from . import _validation as check
from . import reference as ref
from . import mixed_policy, troll
from ._layout import inplace_layout
from .backends import resolve_backend
from .config import DETACHED_WEIGHT_LOSSES, LossConfig
from .ops._launch import split_temperature
from .ops.generator import generator_draws
from .ops.policy_loss import _PARAM_FIELDS, FusedPolicyLoss, TokenLossParams, _param_from_config
from .ops.token_logprobs import token_logprobs_fwd
from .reference.adaptive_clip import (ClipBounds, bapo_search, cpgd_drift, dcpo_bounds, entropy_ratio, erc_keep,
                                      hapo_bounds)
from .reference.policy_loss import _covariance, ppo_term
from .source import is_source

# Every other loss weighs tokens by their ratio to the old policy, so it needs old_logprobs (a new
# variant is safe by default: forgetting old_logprobs is an error, never a silent ratio to 0).
LOSSES_WITHOUT_RATIO = ("reinforce",)
PPO_CLIPPED = ("ppo", "gppo", "clip_cov", "gspo_token", "cpgd")  # clip fractions of r (CPGD: of log r)


@dataclass
class LossOutput:
    loss: Tensor  # scalar, differentiable
    logprobs: Tensor  # per token, fp32, detached
    entropy: Tensor  # per token, fp32, detached
    metrics: dict = field(default_factory=dict)  # detached scalars; metrics["path"] is a string


class _Aggregation(NamedTuple):
    aggregation: str
    norm_tokens: float | None
    norm_length: float | None


@dataclass
class _Batch:
    """Inputs flattened to tokens [N] plus the sequence structure."""

    logits: Tensor  # [..., V] as given (padded [B, T, V] or packed [N, V])
    tokens: Tensor  # as given
    cu_seqlens: Tensor  # [S + 1] int64, on the logits' device
    mask: Tensor  # [N] fp32
    advantages: Tensor  # [N] fp32
    old: Tensor | None
    ref: Tensor | None
    rollout: Tensor | None
    norm_length: float | None
    expert: Tensor | None = None  # [N] bool: CHORD / LUFFY expert tokens
    temperature: float | Tensor | None = None  # policy_loss(temperature=): a number or per token [N] float64
    clip_low: Tensor | None = None  # per token [N] fp32 clip bounds (_clip_inputs); None: the config's number
    clip_high: Tensor | None = None
    dual_clip: Tensor | None = None
    # The fused path's no-grad pre-pass: (logp, entropy) fp32 [N], 0 at masked tokens (None: not read).
    pre_pass: tuple[Tensor, Tensor] | None = None


def policy_loss(
    logits: Tensor,
    tokens: Tensor,
    advantages: Tensor,
    old_logprobs: Tensor | None = None,
    ref_logprobs: Tensor | None = None,
    rollout_logprobs: Tensor | None = None,
    mask: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    config: LossConfig | None = None,
    old_topk=None,
    backend: str = "auto",
    inplace_backward: bool = False,
    path: str = "auto",
    ref_logits: Tensor | None = None,
    teacher=None,
    teacher_logprobs: Tensor | None = None,
    old_entropy: Tensor | None = None,
    expert_mask: Tensor | None = None,
    temperature: float | Tensor | None = None,
) -> LossOutput:
    """One policy-loss computation from logits. See README.md for the variants and conventions.

    Args:
        logits: padded ``[B, T, V]`` (with ``mask [B, T]``) or packed ``[N, V]`` (with
            ``cu_seqlens [S + 1]`` and optionally ``mask [N]``), or a logits source of that shape
            (``LinearLogits``: fused path through its chunks, masked tokens never reach a GEMM;
            ``ShardedLogits``: the general path).
        tokens: chosen ids, ``logits.shape[:-1]``.
        advantages: per token (``logits.shape[:-1]``) or per sequence (``[B]`` / ``[S]``).
        old_logprobs / ref_logprobs / rollout_logprobs: per-token log-probs of the behaviour policy,
            the reference policy (for ``config.kl``) and the inference engine (for
            ``config.rollout_correction``).
        config: a ``LossConfig`` (default ``LossConfig.dapo()``).
        backend: kernel backend, as for ``token_logprobs``.
        inplace_backward: write the logits' gradient into the logits buffer (no ``[N, V]`` memory).
        path: ``"auto"`` (fused for token-local variants on kernel backends), ``"fused"`` or
            ``"general"``.
        ref_logits: the reference policy's logits (same shape as ``logits``), for the full-vocabulary
            KL penalty ``config.kl_full_coef``; when given, ``metrics["kl_full"]`` reports it.
        teacher / teacher_logprobs: a teacher for the distillation term ``config.distill_coef`` (as
            ``rlfuse.distill.distill_loss`` takes them, for ``config.distill_kind``; no gradient to
            the teacher); when given, ``metrics["distill"]`` reports the term's mean.
        old_entropy: the old policy's per-token entropy, the tokens' shape (``token_logprobs(old_logits,
            tokens, return_entropy=True)``): required by ERC (``config.erc_beta_low`` / ``erc_beta_high``).
        expert_mask: bool, the tokens' shape: the off-policy expert tokens of CHORD
            (``config.chord_mu``) or LUFFY (``config.luffy_gamma``), docs/SPEC.md section 11.
        temperature: overrides ``config.temperature``: a number, or a float tensor of the tokens'
            shape (one T per token, e.g. rollouts sampled at varying temperature; README "Per-token
            temperature"), on every path, backend and logits source, TROLL and a distillation
            teacher's term included. The temperature gets no gradient (a tensor that requires grad
            is a ``ValueError``).
    """
    config = LossConfig.dapo() if config is None else config
    if not isinstance(config, LossConfig):
        raise TypeError(f"config must be a rlfuse.LossConfig, got {type(config).__name__}")
    if config.loss == "troll" and old_topk is None:
        raise ValueError("old_topk is required by loss='troll': pass rlfuse.sparse_logprobs(old_logits, tokens)")
    if config.loss != "troll" and old_topk is not None:
        raise ValueError("old_topk is only used by loss='troll'")
    if path not in ("auto", "fused", "general"):
        raise ValueError(f"path must be 'auto', 'fused' or 'general', got {path!r}")
    if path == "fused" and not config.token_local:
        raise ValueError(f"loss={config.loss!r} (entropy_quantile={config.entropy_quantile}) has no fused path")
    # Data checks (token ids, cu_seqlens, old_topk) are gathered and read back once, before any kernel.
    checks = check.DataChecks(logits)  # split over a group: every rank raises if one does
    batch = _prepare(logits, tokens, advantages, old_logprobs, ref_logprobs, rollout_logprobs, mask, cu_seqlens,
                     config, checks)
    _clip_inputs(batch, config, tokens, old_entropy, checks)  # per-token clip bounds, ERC's old entropy
    batch.temperature = _checked_temperature(temperature, tokens, checks)
    source = is_source(logits)
    if inplace_backward:
        if source:
            raise ValueError("inplace_backward applies to a logits tensor; a logits source never stores its logits")
        inplace_layout(logits)
    resolved = resolve_backend(backend, logits.device, "policy_loss",
                               logits.compute_dtype() if source else logits.dtype)
    if path == "fused" and resolved == "torch":
        raise ValueError("the fused path needs a kernel backend; backend='torch' is the general path")
    if path == "fused" and source and not logits.fused_path:
        raise ValueError(f"{type(logits).__name__} has no fused path (its rows span ranks): use path='general'")
    if config.kl_full_coef != 0 and ref_logits is None:
        raise ValueError("ref_logits is required by kl_full_coef != 0")
    if inplace_backward and ref_logits is not None:
        raise ValueError("inplace_backward cannot be combined with ref_logits (the KL reads the logits again)")
    has_teacher = teacher is not None or teacher_logprobs is not None
    if config.distill_coef != 0 and not has_teacher:
        raise ValueError("teacher (or teacher_logprobs for distill_kind='sampled_reverse_kl') is required by "
                         "distill_coef != 0")
    if inplace_backward and has_teacher:
        raise ValueError("inplace_backward cannot be combined with a teacher (the distillation term reads the "
                         "logits again)")
    if config.loss == "troll":
        if inplace_backward and not troll.has_fused_kernel(resolved):
            raise ValueError(f"inplace_backward with loss='troll' needs a fused TROLL kernel (backend={resolved!r} "
                             "has none)")
        old_topk = troll.checked_old_topk(old_topk, tokens, logits.shape[-1], batch.mask.view(tokens.shape) > 0,
                                          checks)
    checks.run()
    mixed_policy.prepare(batch, expert_mask, config, inplace_backward)  # CHORD / LUFFY / Lp-Reg inputs

    # The aggregation settings with the batch's norm_length (not config.replace: under torch.compile
    # with dynamic shapes norm_length may be symbolic, and LossConfig validates its fields as numbers).
    settings = _Aggregation(config.aggregation, config.norm_tokens, batch.norm_length)
    # The rollout weights (and their batch normalisation) see the caller's mask; rejected tokens then
    # leave the mask itself, so the loss and every normaliser skip them (verl's response mask).
    caller_mask = batch.mask
    rollout_w = None
    if config.rollout_correction is not None:
        rollout_w = ref.rollout_correction_weights(batch.old, batch.rollout, batch.mask, batch.cu_seqlens, config)
    if config.rollout_rejection is not None:
        batch.mask = batch.mask * ref.rollout_rejection_mask(batch.old, batch.rollout, batch.mask, batch.cu_seqlens,
                                                             config)
    use_fused = (config.token_local and path != "general" and resolved != "torch"
                 and (not source or logits.fused_path))
    if (config.empg_k is not None or (use_fused and _fused_needs_pre_pass(config))
            or (config.needs_current_logprobs and config.loss == "troll")):
        # What depends on the current log-probs or entropy (detached) must be known before the kernel
        # writes the gradient: one forward read of the logits, without gradient, shared by every user.
        with torch.no_grad():
            current, entropy_now = _token_logprobs(batch, _temperature(batch, config), resolved, False)
        valid = batch.mask > 0
        pre_pass = (_masked(current.reshape(-1).float(), valid), _masked(entropy_now.reshape(-1).float(), valid))
        if use_fused:  # the fused path's batch rules (BAPO, HAPO, ERC) and expert terms read it
            batch.pre_pass = pre_pass
    mixed_metrics = {}
    if config.empg_k is not None:  # EMPG: advantages modulated by the entropy
        mixed_metrics = mixed_policy.apply_empg(batch, config, pre_pass[1])
    aggregation = ref.aggregation_weights(batch.mask, batch.cu_seqlens, settings)
    policy_weight = mixed_policy.on_policy_weights(aggregation, rollout_w, batch, settings, config)
    if config.needs_current_logprobs and (use_fused or config.loss == "troll"):
        policy_weight = policy_weight * current_policy_factor(pre_pass[0], batch, config)
    troll_terms = None
    if config.loss == "troll":
        loss, logp, entropy, troll_terms = _troll(batch, old_topk, policy_weight, aggregation, config, resolved,
                                                  inplace_backward)
    elif use_fused:
        loss, logp, entropy = _fused(batch, policy_weight, aggregation, config, resolved, inplace_backward)
    else:
        loss, logp, entropy = _general(batch, policy_weight, aggregation, config, resolved, inplace_backward)
    metrics = _metrics(batch, logp.detach(), entropy.detach(), config, rollout_w)
    metrics.update(_off_policy_metrics(batch, caller_mask, logp.detach(), config, rollout_w))
    if troll_terms is not None:
        metrics.update(_troll_metrics(troll_terms, batch.mask > 0))
    if ref_logits is not None:
        kl_full = _full_kl(logits, ref_logits, config, resolved, _temperature(batch, config, tokens.shape))
        if config.kl_full_coef != 0:
            loss = loss + config.kl_full_coef * ref.weighted(kl_full, aggregation).sum()
        valid = batch.mask > 0
        metrics["kl_full"] = torch.where(valid, kl_full.detach(), 0.0).sum() / valid.sum().clamp(min=1)
    if has_teacher:
        distill = _distill(logits, teacher, teacher_logprobs, batch, config, resolved)
        if config.distill_coef != 0:
            loss = loss + config.distill_coef * ref.weighted(distill, aggregation).sum()
        valid = batch.mask > 0
        metrics["distill"] = torch.where(valid, distill.detach(), 0.0).sum() / valid.sum().clamp(min=1)
    if config.lp_reg_coef != 0:
        lp_reg, lp_reg_metrics = mixed_policy.lp_reg_loss(logits, batch, logp.detach(), aggregation, config,
                                                          _temperature(batch, config), resolved)
        loss = loss + lp_reg
        mixed_metrics.update(lp_reg_metrics)
    metrics.update(mixed_metrics, **mixed_policy.expert_metrics(batch, logp.detach(), config))
    # TROLL reports the path of its own term: "fused" when its fused kernel ran.
    fused = use_fused if troll_terms is None else troll_terms.fused
    metrics["path"] = "fused" if fused else "general"
    shape = tokens.shape
    return LossOutput(loss, logp.detach().view(shape), entropy.detach().view(shape), metrics)


def _troll(batch, old_topk, policy_weight, weight, config, backend, inplace_backward=False):
    """TROLL (docs/SPEC.md section 7): projection on the sparse support; KL / entropy terms as usual.
    A kernel backend with a fused TROLL kernel runs it in one kernel per row, with the token-local
    penalties (KL estimators, entropy bonus) in the same kernel; the others (a bias-corrected KL) take
    one more token_logprobs pass (the two-kernel path)."""
    has_penalties = (config.kl is not None and config.kl_coef != 0) or config.entropy_coef != 0
    temperature = _temperature(batch, config)
    if not is_source(batch.logits) and troll.has_fused_kernel(backend):
        in_kernel = troll.kernel_penalties(config)
        if inplace_backward and has_penalties and not in_kernel:
            raise ValueError("inplace_backward with loss='troll' cannot be combined with kl_bias_correction (its "
                             "KL penalty reads the logits again)")
        loss, logp, entropy, terms = troll.fused_troll_loss(
            batch.logits, batch.tokens, batch.advantages, batch.old, old_topk, batch.ref, policy_weight, weight,
            config, backend, inplace_backward, penalties=in_kernel, temperature=temperature)
        if in_kernel or not has_penalties:
            return loss, logp, entropy, terms
    else:
        args = (batch.tokens, batch.advantages, batch.old, old_topk, config, backend, batch.mask > 0)
        if is_source(batch.logits):
            terms = batch.logits._troll_token_loss(*args, temperature=temperature)
        else:
            terms = troll.troll_token_loss(batch.logits, *args, temperature=temperature)
        loss = ref.weighted(terms.loss, policy_weight).sum()
        logp, entropy = terms.logp, terms.entropy
    if has_penalties:
        # The penalties need differentiable log-probs / entropy: one more fused pass.
        logp, entropy = _token_logprobs(batch, temperature, backend, False)
        logp, entropy = logp.reshape(-1), entropy.reshape(-1)
        valid = batch.mask > 0
        penalties = ref.penalty_terms(_masked(logp, valid), _masked(entropy, valid), batch.ref, weight, config,
                                      batch.old, batch.mask, batch.cu_seqlens)
        loss = loss + penalties.sum()
    return loss, logp, entropy, terms


def _troll_metrics(terms, valid) -> dict:
    count = valid.sum().clamp(min=1).float()

    def mean(values):
        return torch.where(valid, values.float(), 0.0).sum() / count

    return {
        "troll_projected_frac": mean(terms.eta > 0),
        "troll_eta_mean": mean(terms.eta),
        "troll_kl_before": mean(terms.kl_before),
        "troll_kl_after": mean(terms.kl_after),
        "troll_support_mean": mean(terms.support),
    }


def _full_kl(logits, ref_logits, config, backend, temperature):
    """Per-token full-vocabulary KL to the reference logits, flattened to [N] (no gradient to them).
    ``temperature``: the validated number or per-token tensor of the call."""
    from .functional import check_logits_pair, checked_kl_divergence

    check_logits_pair(logits, ref_logits, "ref_logits")
    with torch.set_grad_enabled(torch.is_grad_enabled() and config.kl_full_coef != 0):
        kl = checked_kl_divergence(logits, ref_logits.detach(), config.kl_full_direction, temperature, None, backend)
    return kl.reshape(-1)


def _distill(logits, teacher, teacher_logprobs, batch, config, backend):
    """Per-token distillation term to the (detached) teacher, flattened to [N]. A per-token
    temperature (validated with the call's checks) divides each row of both sides by its T."""
    from .distill import checked_distill_term

    if isinstance(teacher, Tensor) or is_source(teacher):
        teacher = teacher.detach()
    with torch.set_grad_enabled(torch.is_grad_enabled() and config.distill_coef != 0):
        return checked_distill_term(logits, teacher, batch.tokens, kind=config.distill_kind, beta=config.distill_beta,
                                    temperature=_temperature(batch, config, batch.tokens.shape),
                                    mask=batch.mask.view(batch.tokens.shape), backend=backend,
                                    teacher_logprobs=teacher_logprobs)


def _fused_needs_pre_pass(config) -> bool:
    """True when the fused kernel's inputs depend on the current log-probs or entropy (detached): the
    current-policy factors, BAPO's / HAPO's bounds, and the detached-weight route (:func:`_fused`)."""
    return (config.needs_current_logprobs or config.adaptive_clip in ("bapo", "hapo")
            or _detached_weight_route(config))


def _detached_weight_route(config) -> bool:
    """ERC and CHORD / LUFFY: a policy term whose form varies per token (dropped gradient, expert term)."""
    return config.entropy_ratio_clip or config.mixes_expert_tokens


def _fused(batch, policy_weight, weight, config, backend, inplace_backward):
    """The fused kernel: the configured term with per-token bound rows; or, on the detached-weight route
    (ERC, CHORD, LUFFY: the kernel runs one term per call), the kernel's REINFORCE term ``-A logp`` with
    ``A = -dJ/dlogp``, ``J`` the general path's policy objective (:func:`_policy_objective`) at the detached
    pre-pass log-probs, plus the detached value ``J - sum dJ/dlogp logp`` (docs/SPEC.md section 11)."""
    advantages, reinforce, correction = batch.advantages, config.loss in DETACHED_WEIGHT_LOSSES, None
    if not _detached_weight_route(config):
        clip_rows = _clip_rows(batch, config)
    else:
        current, entropy = batch.pre_pass
        bounds = _adaptive_bounds(None, None, batch, config)

        def objective(logp):
            return _policy_objective(logp, entropy, batch, policy_weight, weight, config, bounds)

        # torch.func, not torch.autograd.grad: it traces under torch.compile(fullgraph=True).
        gradient, value = torch.func.grad_and_value(objective)(current)
        correction = (value - (gradient * current).sum()).detach()
        advantages, policy_weight, reinforce, clip_rows = -gradient, batch.mask, True, (None, None, None)
    zeros = torch.zeros_like(batch.advantages)
    per_token = (
        advantages.contiguous(),
        batch.old if batch.old is not None else zeros,
        batch.ref if batch.ref is not None else zeros,
        policy_weight.contiguous(),
        weight.contiguous(),
    )
    params = _kernel_params(config, reinforce)
    if is_source(batch.logits):
        loss, logp, entropy = batch.logits._fused_policy_loss(batch.tokens, per_token, _temperature(batch, config),
                                                              params, backend, batch.mask, clip_rows)
    else:
        loss, logp, entropy = FusedPolicyLoss.apply(batch.logits, batch.tokens, per_token, _temperature(batch, config),
                                                    params, backend, bool(inplace_backward), clip_rows)
    return (loss if correction is None else loss + correction), logp, entropy


def _clip_rows(batch, config) -> tuple:
    """The kernel's per-token bound rows (None: the config's number): the given or DCPO's tensors, or
    BAPO's / HAPO's bounds from the pre-pass."""
    if config.adaptive_clip not in ("bapo", "hapo"):
        return batch.clip_low, batch.clip_high, batch.dual_clip
    bounds = _adaptive_bounds(None, None, batch, config)
    low, high = (torch.as_tensor(bound).float().expand_as(batch.mask).contiguous() for bound in bounds[:2])
    return low, high, batch.dual_clip


def _kernel_params(config, reinforce=False) -> TokenLossParams:
    """The fused kernel's parameters; ``reinforce``: the kernel's REINFORCE term (TOPR: its detached weight
    is in policy_weight, current_policy_factor; the detached-weight route of :func:`_fused`); a per-token
    bound tensor is 0 here (the kernel reads its rows, batch.clip_*). No LossConfig.replace: it validates
    its fields as numbers, which torch.compile cannot trace."""
    def value(field):
        if field.name == "policy" and reinforce:
            return _schema.enum(field.enum)["reinforce"]
        if isinstance(getattr(config, field.source or field.name, None), Tensor):
            return 0.0
        return _param_from_config(field, config)

    return TokenLossParams(*[value(field) for field in _PARAM_FIELDS])


def _general(batch, policy_weight, weight, config, backend, inplace_backward):
    if config.sampler_filters:  # log-probs on the sampler's support (README), differentiable
        if inplace_backward:
            raise ValueError("inplace_backward is not available with LossConfig top_k / top_p / min_p")
        from .filtered import filtered_token_logprobs

        temperature = _temperature(batch, config, batch.tokens.shape)
        logp, entropy = filtered_token_logprobs(batch.logits, batch.tokens, temperature, config.top_k, config.top_p,
                                                config.min_p, backend)
    else:
        logp, entropy = _token_logprobs(batch, _temperature(batch, config), backend, inplace_backward)
    raw_logp, raw_entropy = logp.reshape(-1), entropy.reshape(-1)
    # Every formula below sees 0 at masked positions, never their (possibly NaN) values: then the
    # gradient there is an exact 0, not 0 x NaN, and the kernels write those rows as zeros.
    valid = batch.mask > 0
    logp, entropy = _masked(raw_logp, valid), _masked(raw_entropy, valid)
    if config.entropy_quantile is not None:
        policy_weight = policy_weight * entropy_minority_mask(entropy, batch.mask, config.entropy_quantile)
    if config.needs_current_logprobs:
        policy_weight = policy_weight * current_policy_factor(logp.detach(), batch, config)
    a, old, mask, cu = batch.advantages, batch.old, batch.mask, batch.cu_seqlens
    bounds = _adaptive_bounds(logp, entropy, batch, config)
    penalties = ref.penalty_terms(logp, entropy, batch.ref, weight, config, old, mask, cu).sum()
    if config.loss == "gspo":
        return ref.gspo_loss(logp, old, a, mask, cu, config) + penalties, raw_logp, raw_entropy
    if config.loss == "gmpo":
        return ref.gmpo_loss(logp, old, a, mask, cu, config, bounds) + penalties, raw_logp, raw_entropy
    objective = _policy_objective(logp, entropy, batch, policy_weight, weight, config, bounds)
    return objective + penalties, raw_logp, raw_entropy


def _policy_objective(logp, entropy, batch, policy_weight, weight, config, bounds) -> Tensor:
    """The weighted per-token policy terms plus the expert tokens' term (no penalties) from ``logp`` /
    ``entropy`` ([N], 0 at masked tokens): the general path's, and the fused path's detached-weight
    route evaluates it at the pre-pass."""
    a, old, mask = batch.advantages, batch.old, batch.mask
    if config.loss == "gspo_token":
        term = ref.gspo_token_term(logp, old, a, mask, batch.cu_seqlens, config, bounds)
    elif config.loss == "clip_cov":
        term = clip_cov_term(logp, old, a, mask, config, bounds)
    elif config.loss == "kl_cov":
        term = kl_cov_term(logp, old, a, mask, config)
    elif config.loss == "topr":
        term = -a * logp  # TOPR's detached weight is in policy_weight (current_policy_factor), as on the fused path
    else:
        term = ref.policy_term(logp, old, a, config, bounds)
    if config.entropy_ratio_clip:  # ERC: tokens out of the entropy-ratio band keep their value, not their gradient
        term = torch.where(erc_keep(entropy, batch.old_entropy, config), term, term.detach())
    expert = mixed_policy.expert_loss(logp, batch, weight, config)  # CHORD / LUFFY: the expert tokens' term
    return ref.weighted(term, policy_weight).sum() + expert


def current_policy_factor(logp: Tensor, batch, config) -> Tensor:
    """The detached per-token factor of the policy term that depends on the current log-probs
    ``logp`` ([N], 0 at masked positions): the product of :func:`current_policy_factors`."""
    factor = torch.ones_like(batch.mask)
    for value in current_policy_factors(logp, batch, config).values():
        factor = factor * value
    return factor


def current_policy_factors(logp: Tensor, batch, config) -> dict:
    """Each detached per-token factor of the policy term that depends on the current log-probs, by
    name (docs/SPEC.md section 4): the off-policy sequence mask (``"opsm"``), M2PO's second-moment
    mask (``"m2po"``), prime-rl's probability trust region (``"prob_trust_region"``: DPPO and / or
    IPO) and TOPR's weight (``"topr"``). The masks compare ``logp`` with the behaviour log-probs
    (rollout when given, else old), over the tokens of ``batch.mask``."""
    factors = {}
    behaviour = behaviour_logprobs(batch)
    if config.off_policy_mask_threshold is not None:
        factors["opsm"] = ref.off_policy_sequence_mask(logp, behaviour, batch.advantages, batch.mask,
                                                       batch.cu_seqlens, config.off_policy_mask_threshold)
    if config.m2po_threshold is not None:
        factors["m2po"] = ref.m2po_mask(logp, behaviour, batch.mask, config.m2po_threshold)
    if any(getattr(config, name) is not None for name in ("dppo_mask_low", "dppo_mask_high", "ipo_threshold")):
        factors["prob_trust_region"] = ref.prob_trust_region_mask(logp, behaviour, batch.advantages, config)
    if config.loss == "topr":
        factors["topr"] = ref.topr_weights(logp, batch.old, batch.advantages, config)
    return factors


def _off_policy_metrics(batch, caller_mask, logp, config, rollout_w) -> dict:
    """Trainer-vs-engine diagnostics (whenever old and rollout log-probs are both given) and the
    fractions of valid tokens each off-policy filter drops."""
    metrics = {}
    caller_valid = caller_mask > 0
    caller_count = caller_valid.sum().clamp(min=1).float()
    if batch.old is not None and batch.rollout is not None:
        metrics.update(ref.mismatch_metrics(batch.old, batch.rollout, caller_mask, batch.cu_seqlens))
    if rollout_w is not None:
        if config.rollout_is_batch_normalize:
            raw = ref.rollout_correction_weights(batch.old, batch.rollout, caller_mask, batch.cu_seqlens,
                                                 config.replace(rollout_is_batch_normalize=False))
            metrics["rollout_batch_norm_factor"] = ref.rollout_weight_batch_mean(raw, caller_mask, batch.cu_seqlens,
                                                                                 config.rollout_correction)
        else:
            raw = rollout_w
        w = raw.clamp(min=0.0, max=config.rollout_cap)
        mean_w = torch.where(caller_valid, w, 0.0).sum() / caller_count
        normalised = w / (mean_w + 1e-8)
        ess = 1.0 / (torch.where(caller_valid, normalised * normalised, 0.0).sum() / caller_count)
        metrics["rollout_ess"] = torch.where(caller_valid.any(), ess, torch.zeros_like(ess))  # 0 without tokens
    if config.rollout_rejection is not None:
        metrics["rollout_rejected_frac"] = (caller_valid & (batch.mask == 0)).sum() / caller_count
    if config.needs_current_logprobs:
        valid = batch.mask > 0
        count = valid.sum().clamp(min=1).float()
        current = _masked(logp.reshape(-1).float(), valid)
        factors = current_policy_factors(current, batch, config)

        def frac(selected):
            return (valid & selected).sum() / count

        if "opsm" in factors:
            metrics["off_policy_masked_frac"] = frac(factors["opsm"] == 0)
        if "m2po" in factors:
            kept = valid & (factors["m2po"] > 0)
            m2 = (current.double() - behaviour_logprobs(batch).double()) ** 2
            metrics["m2po_masked_frac"] = frac(~kept)
            metrics["m2po_m2"] = (torch.where(valid, m2, 0.0).sum() / count).float()
            metrics["m2po_m2_kept"] = (torch.where(kept, m2, 0.0).sum() / kept.sum().clamp(min=1)).float()
        if "prob_trust_region" in factors:
            violations = ref.prob_trust_region_violations(current, behaviour_logprobs(batch), batch.advantages, config)
            if "dppo" in violations:
                dppo, a = violations["dppo"], batch.advantages
                metrics["dppo_masked_frac"] = frac(dppo)  # prime-rl is_masked (A = 0 on the low side)
                metrics["dppo_masked_high_frac"] = frac(dppo & (a > 0))
                metrics["dppo_masked_low_frac"] = frac(dppo & (a < 0))
            if "ipo" in violations:
                metrics["ipo_masked_frac"] = frac(violations["ipo"])
        if "topr" in factors:
            r = ref.ratio(current, batch.old)
            negative = batch.advantages < 0
            metrics["topr_negative_frac"] = frac(negative)
            metrics["topr_truncated_frac"] = frac(negative & (r < 1.0))  # weight r < 1 (else capped at 1)
    return metrics


def behaviour_logprobs(batch) -> Tensor:
    """The behaviour policy's log-probs of the off-policy masks: rollout when given, else old."""
    return batch.rollout if batch.rollout is not None else batch.old


def _token_logprobs(batch, temperature, backend, inplace_backward):
    """(logp, entropy) through the token_logprobs op: the ids were validated with the call's checks,
    the temperature by LossConfig or ``_checked_temperature`` (not again here: under torch.compile
    with dynamic=True it may be a symbolic float, which no host check can read; a per-token tensor
    was read with the call's checks). A source skips the masked rows."""
    logits, tokens = batch.logits, batch.tokens
    if is_source(logits):
        return logits._token_logprobs(tokens, temperature, backend, batch.mask)
    if inplace_backward:
        inplace_layout(logits)
    scalar, temperatures = split_temperature(temperature)
    logp, entropy, _ = token_logprobs_fwd(logits, tokens, scalar, backend, bool(inplace_backward), temperatures)
    return logp, entropy


def _checked_temperature(temperature, tokens, checks):
    """``policy_loss``'s ``temperature`` argument: None (``config.temperature`` applies), a number,
    or a per-token tensor (flattened to [N] float64; its range a data check of the call)."""
    if temperature is None:
        return None
    if isinstance(temperature, Tensor):
        return check.check_temperature(temperature, tokens, checks).reshape(-1)
    return check.check_temperature(temperature)


def _temperature(batch, config, shape=None):
    """The call's temperature: ``policy_loss(temperature=)`` when given, else ``config.temperature``;
    a per-token tensor flat [N], or of ``shape`` when given."""
    temperature = config.temperature if batch.temperature is None else batch.temperature
    if shape is not None and isinstance(temperature, Tensor):
        return temperature.view(shape)
    return temperature


def _masked(values: Tensor, valid: Tensor) -> Tensor:
    """``values`` with masked positions replaced by 0 (a select: their gradient is exactly 0)."""
    return torch.where(valid, values, torch.zeros_like(values))


# --- token selections of the general path, without host synchronisation -------------------------
#
# docs/SPEC.md section 4 defines these selections by counts that depend on the data (the number of valid
# tokens, of Clip-Cov candidates). They are computed here with a shape fixed by the number of
# tokens N (known on the host) and the data-dependent count kept on the device as a mask, so no
# value is read back. (rlfuse.reference.policy_loss has the same functions in their direct form.)


def entropy_minority_mask(entropy: Tensor, mask: Tensor, rho: float) -> Tensor:
    """1 for valid tokens whose entropy is at least the (1 - rho)-quantile over valid tokens:
    ``torch.quantile(entropy[valid].double(), 1 - rho)`` (linear interpolation; NaN if a valid
    entropy is NaN) written out over a sort of all N tokens with the masked ones last."""
    if entropy.numel() == 0:
        return torch.zeros_like(entropy)
    valid = mask > 0
    h = entropy.detach()
    ordered = torch.sort(torch.where(valid, h.double(), torch.inf)).values
    last = (valid.sum() - 1).clamp(min=0).double()  # the last valid position
    rank = (1.0 - rho) * last
    below, above = rank.long().reshape(1), rank.ceil().long().reshape(1)  # as torch.quantile: truncation, ceil
    threshold = torch.lerp(ordered.gather(0, below), ordered.gather(0, above), rank - below)[0]
    threshold = torch.where((torch.isnan(h) & valid).any(), torch.nan, threshold)
    return ((h >= threshold.to(h.dtype)) & valid).to(entropy.dtype)


def kl_cov_term(logp, old_logp, advantages, mask, config) -> Tensor:
    """KL-Cov: unclipped ``-A r``, plus ``kl_cov_coef |logp - old|`` on the
    ``min(max(1, floor(cov_ratio N_valid)), N_valid)`` valid tokens of largest covariance. The top
    ``min(max(1, floor(cov_ratio N)), N)`` (a bound fixed by the shape) are taken, the first
    ``count`` of them kept on the device."""
    loss = -advantages * ref.ratio(logp, old_logp)
    n = loss.numel()
    bound = min(max(1, int(config.cov_ratio * n)), n)
    if bound == 0:
        return loss
    cov, valid = _covariance(logp, advantages, mask)
    n_valid = valid.sum().double()
    count = torch.minimum(torch.floor(config.cov_ratio * n_valid).clamp(min=1.0), n_valid)
    top = torch.topk(cov.masked_fill(~valid, -torch.inf), bound).indices
    picked = torch.zeros(n, dtype=torch.bool, device=loss.device)
    picked[top] = torch.arange(bound, device=loss.device) < count
    return loss + torch.where(picked, config.kl_cov_coef * (logp - old_logp).abs(), torch.zeros_like(loss))


def clip_cov_term(logp, old_logp, advantages, mask, config, bounds=None) -> Tensor:
    """Clip-Cov: the PPO loss with ``count = min(max(1, floor(cov_ratio N_valid)), #candidates)``
    candidates (valid, unclipped, ``cov_lb < cov < cov_ub``, in token order) detached (loss 0):
    those at positions ``torch.randperm(#candidates, generator=manual_seed(seed))[:count]``,
    reproduced on the device by :func:`_randperm_prefix` without reading ``#candidates``. ``bounds``: the
    clip bounds (``ClipBounds``; default the config's)."""
    bounds = ClipBounds.of(config) if bounds is None else bounds
    loss = ppo_term(logp, old_logp, advantages, config, bounds=bounds)
    n = loss.numel()
    bound = min(max(1, int(config.cov_ratio * n)), n)
    if bound == 0:
        return loss
    cov, valid = _covariance(logp, advantages, mask)
    r = ref.ratio(logp, old_logp).detach()
    unclipped = ~(((advantages > 0) & (r > 1.0 + bounds.high)) | ((advantages < 0) & (r < 1.0 - bounds.low)))
    candidate = valid & unclipped & (cov > config.cov_lb) & (cov < config.cov_ub)
    n_candidates = candidate.sum()
    count = torch.minimum(torch.floor(config.cov_ratio * valid.sum().double()).clamp(min=1.0), n_candidates.double())
    if not _RANDPERM_REPRODUCED or n >= _RANDPERM_SMALL_N:  # not expected: the direct form (host syncs)
        return ref.clip_cov_term(logp, old_logp, advantages, mask, config, bounds)
    order = _randperm_prefix(n_candidates, bound, config.seed)  # candidate ranks, [bound]
    chosen_rank = torch.zeros(n + 1, dtype=torch.bool, device=loss.device)
    chosen_rank[torch.where(torch.arange(bound, device=loss.device) < count, order, n)] = True
    rank = torch.cumsum(candidate, 0) - 1
    chosen = candidate & chosen_rank[rank.clamp(min=0)]
    return loss * torch.where(chosen, 0.0, 1.0).to(loss.dtype)


# torch.randperm(n) on the CPU generator is a Fisher-Yates shuffle for n < 2^32 / 20: step i swaps
# r[i] and r[i + (u_i mod (n - i))], u_i the generator's i-th 32-bit draw, which does not depend
# on n. Checked against torch.randperm when this module loads (else the direct form is used).
_RANDPERM_SMALL_N = (2**32 - 1) // 20


def _randperm_prefix(n: Tensor, bound: int, seed: int) -> Tensor:
    """``torch.randperm(int(n), generator=torch.Generator().manual_seed(seed))[:bound]`` (entries
    past ``n`` unspecified) for an int64 device scalar ``n``, without reading ``n``.

    Step i puts in slot i the content of slot ``t_i = i + u_i mod (n - i)`` (``t_i = i`` once
    ``i >= n - 1``), and a slot's content before step i is that of the latest earlier step that
    wrote it (step k writes the content slot k held before it into slot ``t_k``), else its own
    index. So ``out_i = held[k]`` for the latest ``k < i`` with ``t_k = t_i``, else ``t_i``, where
    ``held[j]`` (slot j before step j) is ``held[k]`` for the latest ``k < j`` with ``t_k = j``,
    else j: "latest earlier step with that target" is a search in the sorted (target, step) keys,
    and the chains of ``held`` resolve by pointer doubling."""
    device = n.device
    draws = generator_draws(n.reshape(1), seed, bound)
    step = torch.arange(bound, device=device)
    span = n - step  # n - i
    target = torch.where(span > 1, step + torch.remainder(draws, span.clamp(min=1)), step)
    keys, _ = torch.sort(target * bound + step)

    def latest_before(wanted: Tensor, before: Tensor) -> Tensor:
        """The latest step k < ``before`` with t_k == ``wanted`` (elementwise), or -1."""
        position = torch.searchsorted(keys, wanted * bound + before - 1, right=True) - 1
        key = keys[position.clamp(min=0)]
        found = (position >= 0) & (key // bound == wanted) & (before > 0)
        return torch.where(found, key % bound, -1)

    parent = latest_before(step, step)  # held[j] = held[parent[j]] when parent[j] >= 0
    root = torch.where(parent >= 0, parent, step)
    for _ in range(max(1, bound - 1).bit_length()):
        root = root[root]
    source = latest_before(target, step)
    return torch.where(source >= 0, root[source.clamp(min=0)], target)


def _randperm_reproduced() -> bool:
    for seed in (0, 1, 2**40 + 7):
        for n in (1, 2, 3, 7, 40):
            expected = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
            got = _randperm_prefix(torch.tensor(n), n, seed)
            if not torch.equal(got, expected):
                return False
    return True


_RANDPERM_REPRODUCED = _randperm_reproduced()


def _prepare(logits, tokens, advantages, old, ref_lp, rollout, mask, cu_seqlens, config, checks) -> _Batch:
    if not is_source(logits):
        check.check_logits(logits)
    check.check_tokens(tokens, logits, checks)
    device = logits.device
    if logits.dim() == 3:
        if cu_seqlens is not None:
            raise ValueError("cu_seqlens is for packed [N, V] logits; padded [B, T, V] logits take mask [B, T]")
        batch_size, seq_len = tokens.shape
        cu = torch.arange(batch_size + 1, device=device, dtype=torch.int64) * seq_len
        # Dr. GRPO's constant length defaults to T (1 when T = 0: there is no token to normalise).
        norm_length = config.norm_length if config.norm_length is not None else float(max(seq_len, 1))
    elif logits.dim() == 2:
        n = tokens.shape[0]
        cu = _check_cu_seqlens(cu_seqlens, n, device, checks)
        norm_length = config.norm_length
    else:
        raise ValueError(f"logits must be padded [B, T, V] or packed [N, V], got shape {tuple(logits.shape)}")
    if config.aggregation == "seq-mean-token-sum-norm" and norm_length is None:
        raise ValueError("aggregation='seq-mean-token-sum-norm' with packed inputs needs config.norm_length")
    n_tokens, n_seqs = tokens.numel(), cu.numel() - 1
    flat_mask = _per_token("mask", mask, tokens, required=False)
    flat_mask = torch.ones(n_tokens, device=device) if flat_mask is None else (flat_mask != 0).float()
    valid = flat_mask > 0

    adv = _as_tensor("advantages", advantages, device)
    if adv.shape == tokens.shape:
        flat_adv = adv.reshape(-1).float()
    elif adv.dim() == 1 and adv.shape[0] == n_seqs:
        flat_adv = torch.repeat_interleave(adv.float(), cu.diff(), output_size=n_tokens)
    else:
        raise ValueError(
            f"advantages must be per token {tuple(tokens.shape)} or per sequence ({n_seqs},), got {tuple(adv.shape)}"
        )
    needs_rollout = config.rollout_correction is not None or config.rollout_rejection is not None
    behaviour_from_old = bool(config.behaviour_masks) and rollout is None
    needs_old = (config.loss not in LOSSES_WITHOUT_RATIO or needs_rollout or config.kl_bias_correction
                 or behaviour_from_old)
    needs_ref = config.kl is not None and config.kl_coef != 0

    def per_token(name, value, required, reason=""):
        values = _per_token(name, value, tokens, required, reason)
        return None if values is None else _masked(values, valid).contiguous()

    # Masked positions hold 0 in every per-token input: whatever the caller left there (NaN
    # included) never reaches a loss, a metric or a gradient.
    return _Batch(
        logits=logits, tokens=tokens, cu_seqlens=cu, mask=flat_mask, advantages=_masked(flat_adv, valid).contiguous(),
        old=per_token("old_logprobs", old, needs_old,
                      f"{', '.join(config.behaviour_masks)} (the behaviour log-probs, without rollout_logprobs)"
                      if behaviour_from_old and config.loss in LOSSES_WITHOUT_RATIO else f"loss={config.loss!r}"),
        ref=per_token("ref_logprobs", ref_lp, needs_ref, f"kl={config.kl!r}"),
        rollout=per_token("rollout_logprobs", rollout, needs_rollout,
                          f"rollout_correction={config.rollout_correction!r} / "
                          f"rollout_rejection={config.rollout_rejection!r}"),
        norm_length=norm_length,
    )


def _as_tensor(name, value, device):
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.device != device:
        raise ValueError(f"{name} is on {value.device} but logits are on {device}")
    return value


def _per_token(name, value, tokens, required, reason=""):
    """A per-token tensor flattened to fp32 [N]; None when not given (an error if required)."""
    if value is None:
        if required:
            raise ValueError(f"{name} is required by {reason}")
        return None
    value = _as_tensor(name, value, tokens.device)
    if value.shape != tokens.shape:
        raise ValueError(f"{name} must have the tokens' shape {tuple(tokens.shape)}, got {tuple(value.shape)}")
    return value.detach().reshape(-1).float().contiguous()


def _check_cu_seqlens(cu_seqlens, n_tokens, device, checks):
    """cu_seqlens as int64 [S + 1]; its values (0 first, N last, non-decreasing) are data checks."""
    if cu_seqlens is None:
        return torch.arange(2, device=device, dtype=torch.int64) * n_tokens  # [0, N], no host-to-device copy
    cu = _as_tensor("cu_seqlens", cu_seqlens, device)
    if cu.dtype not in (torch.int32, torch.int64) or cu.dim() != 1 or cu.numel() < 2:
        raise ValueError("cu_seqlens must be a 1-D int32/int64 tensor [S + 1] of sequence offsets")
    cu = cu.to(torch.int64)
    checks.add(lambda: (cu[0] != 0) | (cu[-1] != n_tokens), lambda: ValueError(
        f"cu_seqlens must start at 0 and end at N = {n_tokens}, got {int(cu[0])} ... {int(cu[-1])}"))
    checks.add(lambda: cu.diff() < 0, lambda: ValueError("cu_seqlens must be non-decreasing"))
    return cu


def _metrics(batch, logp, entropy, config, rollout_w) -> dict:
    """Detached scalar diagnostics over valid tokens (no host synchronisation)."""
    valid = batch.mask > 0
    count = valid.sum()
    denominator = count.clamp(min=1).float()

    def mean(values):
        return torch.where(valid, values.float(), 0.0).sum() / denominator

    metrics = {"valid_tokens": count.float(), "entropy": mean(entropy)}
    if config.sampler_filters:  # chosen tokens outside the sampler's kept set: log-prob -inf, no gradient
        metrics["outside_support_frac"] = mean(logp == float("-inf"))
    if batch.old is not None:
        r = ref.ratio(logp, batch.old)
        metrics["approx_kl"] = mean(batch.old - logp)
        metrics["ratio_mean"] = mean(r)
        metrics["ratio_min"] = _masked_extreme(r, valid, count, "min")
        metrics["ratio_max"] = _masked_extreme(r, valid, count, "max")
        bounds = _adaptive_bounds(logp, entropy, batch, config)
        if config.loss in PPO_CLIPPED and bounds.low is not None:
            a = batch.advantages
            metrics["clip_frac_low"] = mean((a < 0) & (r < 1.0 - bounds.low))
            metrics["clip_frac_high"] = mean((a > 0) & (r > 1.0 + bounds.high))
            if bounds.dual is not None:
                metrics["clip_frac_dual"] = mean((a < 0) & (r > bounds.dual))
        metrics.update(_adaptive_clip_metrics(batch, logp, entropy, config, bounds, mean))
    if batch.ref is not None and config.kl is not None:
        metrics["kl_ref"] = mean(ref.kl_term(logp, batch.ref, config.kl))
    if config.rollout_correction is not None:
        w = rollout_w
        metrics["rollout_weight_mean"] = mean(w)
        metrics["rollout_weight_min"] = _masked_extreme(w, valid, count, "min")
        metrics["rollout_weight_max"] = _masked_extreme(w, valid, count, "max")
        metrics["rollout_dropped_frac"] = mean(w == 0)
    return metrics


# --- adaptive clipping (issue 18, docs/SPEC.md section 12) -------------------------------------------


def _clip_inputs(batch, config, tokens, old_entropy, checks) -> None:
    """Sets ``batch.clip_low`` / ``clip_high`` / ``dual_clip`` (fp32 [N], 0 at masked tokens; None: the
    config's float) from the config's per-token tensors or DCPO's rule, and ``batch.old_entropy`` (ERC).
    The tensors' values are data checks over the valid tokens: finite and >= 0 (dual clip and SPO's
    eps: > 1 and > 0; CPGD's eps_low: < 1 too)."""
    valid = batch.mask > 0
    resolved = {}
    for name in ("clip_low", "clip_high", "dual_clip"):
        value = getattr(config, name)
        resolved[name] = None
        if not isinstance(value, Tensor):
            continue
        if not value.is_floating_point():
            raise TypeError(f"LossConfig.{name} must be a float or a float tensor, got a {value.dtype} tensor")
        flat = _masked(_per_token(f"LossConfig.{name}", value, tokens, required=True), valid)
        low = 1.0 if name == "dual_clip" else 0.0
        if name == "dual_clip" or (name == "clip_high" and config.loss == "spo"):
            _check_values(checks, f"LossConfig.{name}", flat, valid, lambda x, low=low: x > low, f"> {low}")
        elif name == "clip_low" and config.loss == "cpgd":  # CPGD clips the log-ratio at log(1 - eps_low)
            _check_values(checks, f"LossConfig.{name}", flat, valid, lambda x: (x >= 0) & (x < 1), "in [0, 1)")
        else:
            _check_values(checks, f"LossConfig.{name}", flat, valid, lambda x: x >= 0, ">= 0")
        resolved[name] = flat
    if config.adaptive_clip == "dcpo":  # bounds from the old probabilities: known before any kernel
        resolved["clip_low"], resolved["clip_high"] = dcpo_bounds(batch.old, config.clip_low, config.clip_high,
                                                                  config.dcpo_ratio_cap)
    batch.clip_low, batch.clip_high, batch.dual_clip = resolved.values()  # in field order
    batch.old_entropy = None
    if not config.entropy_ratio_clip:
        if old_entropy is not None:
            raise ValueError("old_entropy is only used by ERC (LossConfig.erc_beta_low / erc_beta_high)")
        return
    if old_entropy is None:
        raise ValueError("old_entropy is required by ERC (LossConfig.erc_beta_low / erc_beta_high): pass the old "
                         "policy's rlfuse.token_logprobs(old_logits, tokens, return_entropy=True)[1]")
    flat = _masked(_per_token("old_entropy", old_entropy, tokens, required=True), valid)
    _check_values(checks, "old_entropy", flat, valid, lambda x: x >= 0, ">= 0")
    batch.old_entropy = flat


def _check_values(checks, name, values, valid, ok, requirement) -> None:
    """A data check: every valid token's value is finite and ``ok`` (a ValueError naming ``name`` else)."""
    def bad():
        return valid & ~(torch.isfinite(values) & ok(values))

    checks.add(bad, lambda: ValueError(f"{name} must be finite and {requirement} on every valid token, got "
                                       f"{values[bad()][:4].tolist()}"))


def _bounds(batch, config) -> ClipBounds:
    """The clip bounds known before the kernels: per-token tensors (given or DCPO's), else the config's."""
    return ClipBounds.of(config, batch.clip_low, batch.clip_high, batch.dual_clip)


def _rule_inputs(logp, entropy, batch) -> tuple:
    """The detached log-probs and entropy the batch rules (BAPO, HAPO, ERC) read: the fused path's
    pre-pass (what its kernel used), else the given ones of the same pass."""
    return batch.pre_pass if batch.pre_pass is not None else (logp, entropy)


def _adaptive_bounds(logp, entropy, batch, config) -> ClipBounds:
    """The call's clip bounds: :func:`_bounds`, or BAPO's batch-level pair (from the detached ratios) or
    HAPO's entropy-dependent ones (from the detached entropy), both from :func:`_rule_inputs`."""
    bounds = _bounds(batch, config)
    logp, entropy = _rule_inputs(logp, entropy, batch)
    if config.adaptive_clip == "bapo":
        c_low, c_high, _ = bapo_search(logp, batch.old, batch.advantages, batch.mask, config)
        return bounds._replace(low=1.0 - c_low, high=c_high - 1.0)
    if config.adaptive_clip == "hapo":
        low, high = hapo_bounds(entropy, batch.mask, config)
        return bounds._replace(low=low, high=high)
    return bounds


def _adaptive_clip_metrics(batch, logp, entropy, config, bounds, mean) -> dict:
    """The bounds' means (when not the config's floats), BAPO's chosen ratio bounds and positive share,
    ERC's dropped fraction and mean entropy ratio, CPGD's mean drift."""
    metrics = {}
    logp, entropy = _rule_inputs(logp, entropy, batch)
    if bounds.per_token:
        metrics["clip_low_mean"] = mean(torch.as_tensor(bounds.low).expand_as(batch.mask))
        metrics["clip_high_mean"] = mean(torch.as_tensor(bounds.high).expand_as(batch.mask))
    if config.adaptive_clip == "bapo":
        c_low, c_high, share = bapo_search(logp, batch.old, batch.advantages, batch.mask, config)
        metrics.update(bapo_clip_low=c_low, bapo_clip_high=c_high, bapo_positive_share=share)
    if config.entropy_ratio_clip:
        metrics["erc_masked_frac"] = mean(~erc_keep(entropy, batch.old_entropy, config))
        metrics["entropy_ratio_mean"] = mean(entropy_ratio(entropy, batch.old_entropy))
    if config.loss == "cpgd":
        metrics["cpgd_drift"] = mean(cpgd_drift(logp, batch.old, config.cpgd_drift_cap))
    return metrics


def _masked_extreme(values: Tensor, valid: Tensor, count: Tensor, kind: str) -> Tensor:
    """min or max of ``values`` over valid tokens; NaN when there is none (also for zero tokens)."""
    fill = float("inf") if kind == "min" else float("-inf")
    padded = torch.cat([values.float().masked_fill(~valid, fill), values.new_full((1,), fill, dtype=torch.float32)])
    extreme = padded.amin() if kind == "min" else padded.amax()
    return torch.where(count > 0, extreme, torch.full_like(extreme, float("nan")))
