"""TROLL: trust-region projection of the new policy onto a KL ball around the old one, on a sparse
support of each token's most probable tokens (docs/SPEC.md section 7, arXiv 2510.03817).

* :func:`sparse_logprobs` extracts what a trainer stores for the old policy, next to its old
  log-probs: per token, the most probable ids and their (full-vocabulary) log-probs.
* :func:`troll_token_loss` is the per-token loss used by ``policy_loss(config=LossConfig.troll())``.

The support is small (at most 2k + 1 ids per token), so the projection itself runs in float64 on
``[N, 2k + 1]`` tensors; the only vocabulary-sized work is the one-pass top-k kernel and the gather
of the support's logits, whose gradient is a sparse scatter (logits outside the support get none).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from . import _validation as check
from . import _schema
from .backends import resolve_backend
from .ops._launch import empty_buffer, split_temperature
from .ops.policy_loss import TokenLossParams, _param_from_config
from .ops.row_topk import row_topk
from .ops.troll import fused_troll
from .reference.token_logprobs import row_divisor
from .source import is_source

LOG_FLOOR = math.log(1e-12)  # old log-prob of support tokens the old policy did not keep
NEWTON_STEPS = 32  # fixed (no host read to stop early); typically 6-15 are needed, 31 in the worst measured case
NEWTON_TOLERANCE = 1e-10  # relative error in KL(q || b) = eps (float64) ...
NEWTON_ABS_TOLERANCE = 1e-13  # ... or absolute: below this the KL sum's own rounding dominates (tiny eps)


@dataclass(frozen=True)
class SparseLogprobs:
    """A policy's most probable tokens per position: ``ids`` (int32, -1 past ``count``),
    ``logprobs`` (float32, full-vocabulary normalised, -inf past ``count``) of shape ``[..., k]``,
    ``count`` (int32 ``[...]``) and the ``vocab`` size they were taken from."""

    ids: Tensor
    logprobs: Tensor
    count: Tensor
    vocab: int

    def to(self, device) -> "SparseLogprobs":
        return SparseLogprobs(self.ids.to(device), self.logprobs.to(device), self.count.to(device), self.vocab)


def _kept(values: Tensor, ids: Tensor, lse: Tensor, threshold: float):
    """Keep the sorted top entries until their cumulative probability reaches 1 - threshold:
    (ids, log-probs, count), with -1 / -inf past ``count``."""
    logprobs = values - lse.unsqueeze(-1)
    cumulative_before = torch.cumsum(logprobs.exp(), -1) - logprobs.exp()
    keep = (ids >= 0) & (cumulative_before < 1.0 - threshold)
    ids = torch.where(keep, ids, torch.full_like(ids, -1))
    logprobs = torch.where(keep, logprobs, torch.full_like(logprobs, float("-inf")))
    return ids, logprobs, keep.sum(-1)


def sparse_logprobs(logits: Tensor, tokens: Tensor, k: int = 64, threshold: float = 1e-5,
                    temperature: float | Tensor = 1.0, backend: str = "auto") -> SparseLogprobs:
    """Per position, the most probable tokens until ``k`` or cumulative probability >= 1 - threshold,
    with their log-probs. One pass over each row (a streaming top-k; no sort of the vocabulary). No
    gradient. The chosen token is not inserted: TROLL takes its old log-prob from ``old_logprobs``,
    so it never displaces one of the ``k`` most probable tokens (SPEC section 7). ``logits`` may be a
    logits source (``LinearLogits``, ``ShardedLogits``); the ids are then global vocabulary ids.
    ``temperature``: a number or one value per token (the tokens' shape; README "Per-token
    temperature"); the ids and a temperature tensor are checked with one host read."""
    source = is_source(logits)
    if not source:
        check.check_logits(logits)
    checks = check.DataChecks(logits)
    check.check_tokens(tokens, logits, checks)
    temperature = check.check_temperature(temperature, tokens, checks)
    checks.run()
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {threshold!r}")
    if source:
        return logits._sparse_logprobs(tokens, k, threshold, temperature, backend)
    resolved = resolve_backend(backend, logits.device, "row_topk", logits.dtype)
    with torch.no_grad():
        scalar, temperatures = split_temperature(temperature)
        ids, values, _, _, lse = row_topk(logits.detach(), tokens, scalar, k, resolved, temperatures)
        ids, logprobs, count = _kept(values, ids, lse, threshold)
    return SparseLogprobs(ids, logprobs, count.to(torch.int32), logits.shape[-1])


# --- the projection --------------------------------------------------------------------------------


def _masked_log_softmax(values: Tensor, valid: Tensor) -> Tensor:
    return torch.log_softmax(values.masked_fill(~valid, float("-inf")), -1).masked_fill(~valid, float("-inf"))


def _expectation(log_q: Tensor, values: Tensor, valid: Tensor) -> Tensor:
    return torch.where(valid, log_q.exp() * values.masked_fill(~valid, 0.0), 0.0).sum(-1)


def kl_on_support(log_a: Tensor, log_b: Tensor, valid: Tensor) -> Tensor:
    """KL(a || b) over the valid entries of log-distributions on the support."""
    return _expectation(log_a, log_a - log_b, valid)


def _project(a: Tensor, b: Tensor, valid: Tensor, eta: Tensor) -> Tensor:
    return _project_s(a, b, valid, 1.0 / (1.0 + eta))


def _project_s(a: Tensor, b: Tensor, valid: Tensor, s: Tensor) -> Tensor:
    """log q for s = 1 / (1 + eta): log_softmax(s a + (1 - s) b) = log_softmax((a + eta b) / (1 + eta))."""
    return _masked_log_softmax(b + s.unsqueeze(-1) * (a - b), valid)


def solve_eta(a: Tensor, b: Tensor, valid: Tensor, eps: float) -> Tensor:
    """eta per row: 0 where KL(a || b) <= eps, else the root of KL(q_eta || b) = eps.

    Safeguarded Newton in s = 1 / (1 + eta) in (0, 1]: with d = a - b, KL(s) = s E_q[d] - log E_b[e^(s d)]
    increases from 0 at s = 0 to KL(a || b) at s = 1 with slope s Var_q(d), so [0, 1] brackets the root;
    a Newton step that leaves the current bracket is replaced by bisection. Converges quadratically
    (a handful of steps to float64 precision instead of ~50 bisection passes).

    A fixed ``NEWTON_STEPS`` steps, so that nothing is read back to the host (no synchronisation);
    a row stops moving once ``|KL - eps| <= max(1e-10 eps, 1e-13)``. Measured on random supports
    (3 to 129 ids, logits of scale 0.1 to 100, eps 1e-8 to 3): 6 to 15 steps typically, 31 at most."""
    d = torch.where(valid, a - b, 0.0)
    b_on_support = torch.where(valid, b, -math.inf)
    tolerance = max(NEWTON_TOLERANCE * eps, NEWTON_ABS_TOLERANCE)
    s_low = torch.zeros_like(a[..., 0])  # KL(s_low) <= eps
    s_high = torch.ones_like(s_low)  # KL(s_high) > eps on active rows
    s = s_high.clone()
    active = None
    for step in range(NEWTON_STEPS):
        # q = softmax(w), w = b + s d; with b normalised, log E_b[e^(s d)] = logsumexp(w).
        w = b_on_support + s.unsqueeze(-1) * d
        top = w.amax(-1, keepdim=True)
        e = torch.exp(w - top)  # 0 off the support
        total = e.sum(-1)
        mean = (e * d).sum(-1) / total
        variance = (e * (d - mean.unsqueeze(-1)) ** 2).sum(-1) / total
        residual = s * mean - (top.squeeze(-1) + torch.log(total)) - eps  # KL(s) - eps
        if step == 0:  # s = 1 is q = a: the first residual is KL(a || b) - eps
            active = residual > 0
        s_low = torch.where(residual <= 0, s, s_low)
        s_high = torch.where(residual > 0, s, s_high)
        newton = s - residual / (s * variance).clamp(min=1e-300)
        inside = (newton >= s_low) & (newton <= s_high)
        moving = active & (residual.abs() > tolerance)  # converged rows stay where they are
        s = torch.where(moving, torch.where(inside, newton, 0.5 * (s_low + s_high)), s)
    return torch.where(active, 1.0 / s - 1.0, torch.zeros_like(s))


class TrollProjection(torch.autograd.Function):
    """log q = projection of log-distribution ``a`` onto {KL(q || b) <= eps}, with the closed-form
    implicit gradient of docs/SPEC.md section 7 step 5. Float64 in, float64 out; ``b`` gets no gradient."""

    @staticmethod
    def forward(ctx, a, b, valid, eps):
        eta = solve_eta(a, b, valid, eps)
        log_q = _project(a, b, valid, eta)
        ctx.save_for_backward(log_q, a - b, valid, eta)
        ctx.mark_non_differentiable(eta)
        return log_q, eta

    @staticmethod
    def backward(ctx, grad_log_q, _grad_eta):
        log_q, d, valid, eta = ctx.saved_tensors
        q = torch.where(valid, log_q.exp(), 0.0)
        g = torch.where(valid, grad_log_q, 0.0)
        d = torch.where(valid, d, 0.0)
        d_centered = d - (q * d).sum(-1, keepdim=True)
        variance = (q * d_centered**2).sum(-1, keepdim=True)
        implicit = torch.where(
            (eta > 0).unsqueeze(-1) & (variance > 0),
            q * d_centered * (g * d_centered).sum(-1, keepdim=True) / variance.clamp(min=1e-300),
            0.0,
        )
        grad_a = (g - q * g.sum(-1, keepdim=True) - implicit) / (1.0 + eta.unsqueeze(-1))
        return torch.where(valid, grad_a, 0.0), None, None, None


class SparseGather(torch.autograd.Function):
    """``logits.gather(-1, ids)`` where the ``valid`` entries of each row are distinct ids (the rest
    get no gradient). The backward writes the dense gradient into a fresh buffer from
    :func:`empty_buffer` (huge pages on CPU), zeroed once, and stores the valid entries by flat index
    (invalid ones go to a spare trailing slot, so no boolean indexing and no host sync): torch's
    gather backward faults in a zero ``[N, V]`` tensor and scatter-adds (slow in bf16 on CPU)."""

    @staticmethod
    def forward(ctx, logits, ids, valid):
        ctx.save_for_backward(ids, valid)
        ctx.logits_meta = (logits.shape, logits.dtype, logits.device)
        return logits.gather(-1, ids)

    @staticmethod
    def backward(ctx, grad_values):
        ids, valid = ctx.saved_tensors
        shape, dtype, device = ctx.logits_meta
        numel = math.prod(shape)
        grad = empty_buffer((numel + 1,), dtype, device).zero_()
        rows = torch.arange(ids[..., 0].numel(), device=device).reshape(ids.shape[:-1] + (1,))
        # Valid entries are distinct, so the stores need no accumulation.
        flat = torch.where(valid, rows * shape[-1] + ids, numel)
        grad[flat.reshape(-1)] = grad_values.reshape(-1).to(dtype)
        return grad[:numel].view(shape), None, None


# --- the loss -------------------------------------------------------------------------------------


@dataclass
class TrollTerms:
    loss: Tensor  # [N] per-token TROLL loss (unweighted), differentiable in the logits
    eta: Tensor  # [N]
    kl_before: Tensor  # [N] KL(a || b)
    kl_after: Tensor  # [N] KL(q || b)
    support: Tensor  # [N] support size
    logp: Tensor  # [N] log-prob of the chosen token (full vocabulary), detached
    entropy: Tensor  # [N], detached
    fused: bool = False  # computed by a fused TROLL kernel (metrics["path"] = "fused")

    def tensors(self) -> tuple:
        """The per-token tensors, in field order (what a chunked caller concatenates)."""
        return (self.loss, self.eta, self.kl_before, self.kl_after, self.support, self.logp, self.entropy)


def checked_old_topk(old_topk, tokens: Tensor, vocab: int, valid: Tensor,
                     checks: check.DataChecks | None = None) -> SparseLogprobs:
    """``old_topk`` validated on the valid tokens (``valid``: bool, the tokens' shape), with the
    masked tokens' entries emptied (ids -1), so whatever they hold never reaches the loss. Its
    values (ids in range, finite log-probs, no repeats) are data checks added to ``checks`` (the
    caller runs them) or, without ``checks``, run here with one host synchronisation."""
    if not isinstance(old_topk, SparseLogprobs):
        raise TypeError("old_topk must be the rlfuse.sparse_logprobs(...) of the old policy")
    if old_topk.vocab != vocab:
        raise ValueError(f"old_topk was built for a vocabulary of {old_topk.vocab}, the logits have {vocab}")
    if old_topk.ids.shape[:-1] != tokens.shape or old_topk.logprobs.shape != old_topk.ids.shape:
        raise ValueError(
            f"old_topk must have shape tokens.shape + (k,) = {tuple(tokens.shape)} + (k,), "
            f"got ids {tuple(old_topk.ids.shape)} and logprobs {tuple(old_topk.logprobs.shape)}"
        )
    if old_topk.ids.device != tokens.device:
        raise ValueError(f"old_topk is on {old_topk.ids.device} but the tokens are on {tokens.device}")
    if old_topk.ids.dtype not in (torch.int32, torch.int64) or not old_topk.logprobs.is_floating_point():
        raise TypeError(f"old_topk must hold integer ids and floating-point log-probs, got {old_topk.ids.dtype} "
                        f"and {old_topk.logprobs.dtype}")
    valid = valid.unsqueeze(-1)
    ids = torch.where(valid, old_topk.ids, torch.full_like(old_topk.ids, -1))
    used = ids >= 0
    logprobs = torch.where(used, old_topk.logprobs, torch.full_like(old_topk.logprobs, float("-inf")))
    own = checks is None
    checks = check.DataChecks() if own else checks
    if ids.numel():
        # Few ops, and on CPU on row blocks below torch's parallel grain (32768 elements): each
        # parallel region costs a thread wake-up, which on a loaded machine costs milliseconds (a
        # [2048, 64] sort took 17 ms of CPU with 2 threads under load, 3 ms in blocks). The ids get a
        # min / max reduction, the log-probs one max (NaN and +inf both fail "< inf"; unused slots
        # hold -inf) and repeats one sort per block and one comparison of neighbours (unused slots,
        # -1, sort first and are excluded by keeping the larger id of each equal pair: -1 for them,
        # the id otherwise). The element-wise masks below are only built for the error message.
        bad_id_at = lambda: (ids < -1) | (ids >= vocab)  # noqa: E731
        bad_logprob_at = lambda: used & (torch.isnan(logprobs) | (logprobs == float("inf")))  # noqa: E731
        k = ids.shape[-1]
        blocks = [ids.reshape(-1, k)]
        if ids.device.type == "cpu":
            blocks = blocks[0].split(max(1, 32768 // k))

        def bad_id():
            low, high = ids.aminmax()
            return (low < -1) | (high >= vocab)

        def bad_logprob():
            return ~(logprobs.amax() < float("inf"))

        def repeated(block):
            ordered = block.sort(-1).values
            following = ordered[..., 1:]
            return torch.where(following == ordered[..., :-1], following, -1).amax()

        def duplicate():
            if k < 2:
                return torch.zeros((), dtype=torch.bool, device=ids.device)
            return torch.stack([repeated(block) for block in blocks]) >= 0

        checks.add(bad_id, lambda: ValueError(
            f"old_topk.ids must lie in [0, V) = [0, {vocab}), or be -1 for an empty slot; found "
            f"{ids[bad_id_at()][:4].tolist()}"))
        checks.add(bad_logprob, lambda: ValueError(
            "old_topk.logprobs must be finite (or -inf) for every used slot; found "
            f"{logprobs[bad_logprob_at()][:4].tolist()}"))
        checks.add(duplicate, lambda: ValueError("old_topk.ids must not repeat an id within a token's slots"))
    if own:
        checks.run()
    return SparseLogprobs(ids, logprobs, old_topk.count, old_topk.vocab)


def troll_token_loss(logits, tokens, advantages, old_logprobs, old_topk, config, backend, valid_tokens=None,
                     temperature=None) -> TrollTerms:
    """Per-token TROLL loss on flattened tokens (advantages / old_logprobs are float32 [N]). Tokens
    outside ``valid_tokens`` (bool [N]) see zero logits on their support: a finite loss and an exact zero
    gradient, whatever their logits hold. ``temperature``: the call's validated number or per-token
    float64 tensor (README "Per-token temperature"); None: ``config.temperature``."""
    temperature = config.temperature if temperature is None else temperature
    scalar, temperatures = split_temperature(temperature)
    new_ids, new_values, logp, entropy, new_lse = row_topk(logits.detach(), tokens, scalar, config.troll_k,
                                                           backend, temperatures)

    def support_logits(safe_ids, valid):  # differentiable; each row at its own T
        x = SparseGather.apply(logits, safe_ids.to(logits.device), valid).double()
        return x / row_divisor(temperature, x)

    return troll_terms(support_logits, _kept(new_values, new_ids, new_lse, config.troll_threshold)[0], logp,
                       entropy, tokens, advantages, old_logprobs, old_topk, config, logits.shape[-1], valid_tokens)


def troll_terms(support_logits, new_ids, logp, entropy, tokens, advantages, old_logprobs, old_topk, config, vocab,
                valid_tokens=None) -> TrollTerms:
    """TROLL's per-token terms once the new kept ids (``new_ids``, -1 for none) and the token's log-prob
    and entropy are known; ``support_logits(safe_ids, valid)`` returns the support's scaled logits as
    float64 with a gradient. Shared by the single-device path and ``ShardedLogits`` (which gathers the
    logits from their owners)."""
    lead = tokens.shape
    old_ids = old_topk.ids.to(torch.int64).reshape(*lead, old_topk.ids.shape[-1])
    old_lp = old_topk.logprobs.double().reshape(*lead, old_topk.ids.shape[-1])
    token_ids = tokens.to(torch.int64).unsqueeze(-1)
    # Candidates in priority order: the chosen token (old_logprobs, as every other variant's ratio
    # uses), old kept (their stored log-prob), new kept (floor). A stable sort groups duplicates
    # with the highest-priority copy first.
    candidates = torch.cat([token_ids, old_ids, new_ids.to(torch.int64)], -1)
    old_values = torch.cat([
        old_logprobs.double().reshape(lead).unsqueeze(-1),
        old_lp,
        torch.full(new_ids.shape, LOG_FLOOR, dtype=torch.float64, device=new_ids.device),
    ], -1)
    support_ids, order = torch.sort(candidates, dim=-1, stable=True)
    b_raw = old_values.gather(-1, order)
    first = torch.ones_like(support_ids, dtype=torch.bool)
    first[..., 1:] = support_ids[..., 1:] != support_ids[..., :-1]
    valid = first & (support_ids >= 0) & (support_ids < vocab)

    x = support_logits(torch.where(valid, support_ids, 0), valid)
    if valid_tokens is not None:
        x = torch.where(valid_tokens.reshape(lead).unsqueeze(-1), x, torch.zeros_like(x))
    # A support entry whose logit is -inf carries no probability under a or q (for eta < inf) and
    # gets no gradient: it stays in b's normalisation and in the support size, nowhere else.
    live = valid & (x != -math.inf)
    a = _masked_log_softmax(x, live)
    # A NaN old log-prob of a valid token makes its loss NaN, as in every other variant.
    b = _masked_log_softmax(torch.where(valid, b_raw, 0.0), valid)
    log_q, eta = TrollProjection.apply(a, b, live, config.troll_eps)

    at_token = valid & (support_ids == token_ids)
    log_q_y = torch.where(at_token, log_q, 0.0).sum(-1)  # -inf for a -inf chosen logit: no policy term
    b_y = torch.where(at_token, b, 0.0).sum(-1)
    adv = advantages.double().reshape(lead)
    policy = -adv * torch.exp(log_q_y - b_y)
    trust = kl_on_support(a, log_q.detach(), live)
    loss = policy + config.troll_alpha * trust
    with torch.no_grad():
        kl_before = kl_on_support(a, b, live)
        kl_after = kl_on_support(log_q, b, live)
    return TrollTerms(loss.float().reshape(-1), eta.float().reshape(-1), kl_before.float().reshape(-1),
                      kl_after.float().reshape(-1), valid.sum(-1).float().reshape(-1), logp.reshape(-1),
                      entropy.reshape(-1))


# --- the fused kernels ------------------------------------------------------------------------------


def has_fused_kernel(backend: str) -> bool:
    """Whether ``backend`` runs TROLL as one fused kernel per row (schema.h ``TrollArgs``); the
    ``torch`` backend (and any backend without one) takes the composition above."""
    if backend in ("cpu", "cuda"):
        return True
    if backend == "triton":
        from .triton_kernels import troll as triton_troll

        return triton_troll.IMPLEMENTED
    return False


def kernel_penalties(config) -> bool:
    """Whether the fused kernel can compute ``config``'s KL / entropy penalties (the token-local ones
    of the fused policy loss: not a bias-corrected KL, whose ratio carries a gradient)."""
    return not getattr(config, "kl_bias_correction", False)


def _penalty_params(config, penalties: bool) -> TokenLossParams:
    """TokenLossParams of ``config``'s penalties (the policy field is not read by the TROLL kernel);
    all off without ``penalties``."""
    params = TokenLossParams(*[0 if f.name == "policy" else _param_from_config(f, config)
                               for f in _schema.TOKEN_LOSS_PARAMS.fields])
    if not penalties:
        params = params._replace(kl=_schema.KL_KIND["none"], kl_coef=0.0, entropy_coef=0.0)
    return params


def fused_troll_loss(logits, tokens, advantages, old_logprobs, old_topk, ref_logprobs, policy_weight, weight, config,
                     backend, inplace=False, penalties=True, temperature=None):
    """TROLL with its KL / entropy penalties in one kernel per row: (loss, logp, entropy, terms).
    ``loss`` is the weighted scalar (``policy_weight`` on the TROLL term, ``weight`` on the penalties);
    ``penalties=False`` leaves the KL / entropy terms out (the caller adds them). ``old_topk`` as from
    :func:`checked_old_topk`; ``temperature`` as :func:`troll_token_loss`'s."""
    zeros = torch.zeros_like(advantages)
    per_token = (advantages.contiguous(), (zeros if old_logprobs is None else old_logprobs).contiguous(),
                 (zeros if ref_logprobs is None else ref_logprobs).contiguous(), policy_weight.contiguous(),
                 weight.contiguous())
    loss, logp, entropy, eta, kl_before, kl_after, support = fused_troll(
        logits, tokens, per_token, old_topk.ids, old_topk.logprobs, config, _penalty_params(config, penalties), backend, inplace,
        temperature)
    terms = TrollTerms(loss.detach().new_zeros(0), eta, kl_before, kl_after, support, logp.reshape(-1),
                       entropy.reshape(-1), fused=True)
    return loss, logp.reshape(-1), entropy.reshape(-1), terms
