"""Distillation losses over the vocabulary (docs/distillation.md, issue 19).

``distill_loss(student, teacher, ...)`` trains a student's logits towards a teacher's:

* ``"jsd"``: TRL's generalised Jensen-Shannon divergence JSD(beta) (GKD's
  ``generalized_jsd_loss``): ``beta KL(t || m) + (1 - beta) KL(s || m)``, ``m = (1 - beta) s + beta t``;
  ``beta = 0`` is ``KL(t || s)`` and ``beta = 1`` ``KL(s || t)``, as TRL defines them. The JSD runs
  on its own row kernels (``rlfuse::jsd_fwd`` / ``_bwd``), the two KLs on ``rlfuse::kl_div_*``.
* ``"forward_kl"`` ``KL(t || s)`` and ``"reverse_kl"`` ``KL(s || t)`` over the full vocabulary.
* ``"sparse_kl"``: the teacher given as its top-k (``SparseLogprobs`` or ``(ids, logprobs)``): the
  KL ``(t || s)`` on the teacher's support, TRL's tail-bucket convention or verl's (``sparse_convention``).
* ``"sampled_reverse_kl"``: only the teacher's log-prob of each sampled token (``teacher_logprobs``):
  the k1 / k3 estimators of ``KL(s || t)``.

``s = softmax(student / T)``; ``t = softmax(teacher / T)`` for logits teachers (sparse and sampled
teachers' log-probs are used as given). ``T`` is a number or one value per token (a float tensor of
the student's leading shape: each row's student and teacher logits divided by that row's T).
Gradients reach the student, and the teacher's logits when they require grad. ``distill_term``
returns the per-token values for other losses to combine.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from . import _validation as check
from .backends import resolve_backend
from .ops._launch import split_temperature
from .ops.distill import jsd_fwd
from .ops.kl_div import DIRECTIONS, kl_div_fwd
from .ops.token_logprobs import token_logprobs_bwd, token_logprobs_fwd
from .reference.distill import sampled_kl_terms, sparse_kl_terms
from .reference.token_logprobs import row_divisor
from .source import is_source
from .troll import SparseLogprobs

KINDS = ("jsd", "forward_kl", "reverse_kl", "sparse_kl", "sampled_reverse_kl")
AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "sum", "token-sum")
SPARSE_CONVENTIONS = ("tail", "verl", "renorm")
ESTIMATORS = ("k1", "k3")
MIN_BETA = float(torch.finfo(torch.float32).tiny)  # 0 < beta < 1 must keep beta and 1 - beta normal fp32


@dataclass
class DistillOutput:
    """``loss`` (scalar, differentiable); ``per_token`` (fp32, ``student.shape[:-1]``, differentiable,
    0 at masked positions); ``metrics`` (detached scalars, plus ``kind`` and ``backend`` strings)."""

    loss: Tensor
    per_token: Tensor
    metrics: dict = field(default_factory=dict)


# --- the student's log-probs at a sparse support ------------------------------------------------


class SupportLogprobs(torch.autograd.Function):
    """The student's full-vocabulary log-probs at ``ids`` ([..., K]; the ``valid`` ones distinct).

    Forward: one ``token_logprobs`` pass for the row statistics, with the first id as anchor, so
    ``log s_k = (x_k - x_a) + log s_a`` is exact for the probable ids (no rounded lse; x_k - lse
    where the anchor logit is -inf). Backward: ``dL/dz_j = (g_j - G s_j) / T`` (g on the support,
    ``G = sum g``): the dense ``-G s_j / T`` from the ``token_logprobs`` gradient kernel with no
    target, then the support's entries written exactly (fp32) over it. ``temperature``: a number or
    a float64 tensor of one T per row (``logits.shape[:-1]``)."""

    @staticmethod
    def forward(ctx, logits, ids, valid, temperature, backend):
        vocab = logits.shape[-1]
        safe_ids = torch.where(valid, ids.long(), 0).clamp(0, vocab - 1)
        anchor = safe_ids[..., 0].contiguous()
        scalar, temperatures = split_temperature(temperature)
        logp_a, entropy, lse = token_logprobs_fwd(logits, anchor, scalar, backend, False, temperatures)
        compute = torch.float64 if logits.dtype == torch.float64 else torch.float32
        inv_temp = inverse_temperature(temperature, logits.shape[:-1], compute)
        x = logits.gather(-1, safe_ids).to(compute) * inv_temp
        x_a = logits.gather(-1, anchor.unsqueeze(-1)).to(compute) * inv_temp
        logs = support_logprobs(x, x_a, logp_a.to(compute), lse.to(compute), valid)
        ctx.save_for_backward(logits, safe_ids, valid, lse, entropy, logs)
        ctx.temperature, ctx.backend = temperature, backend
        return logs

    @staticmethod
    def backward(ctx, grad_logs):
        logits, ids, valid, lse, entropy, logs = ctx.saved_tensors
        temperature, backend = ctx.temperature, ctx.backend
        g = torch.where(valid, grad_logs, 0.0)
        total = g.sum(-1)
        no_target = torch.full_like(ids[..., 0], -1)
        scalar, temperatures = split_temperature(temperature)
        grad = token_logprobs_bwd(logits, no_target, lse, entropy, total.float(), torch.zeros_like(lse),
                                  scalar, backend, temperatures)
        return write_support_gradient(grad, ids, g, logs, valid, valid, temperature), None, None, None, None


def inverse_temperature(temperature, rows, dtype):
    """What the support's logits are multiplied by: ``1 / T`` as the number path takes it (a Python
    float, which torch rounds to ``dtype``), or per row (``temperature`` a float64 tensor of ``rows``
    values) the float64 ``1 / T`` rounded once to ``dtype``, shape ``[*rows, 1]``: the same bits where
    the tensor is constant (the kernels' fp32(1 / T) convention, ``ops._launch.inv_temps``)."""
    if not isinstance(temperature, Tensor):
        return 1.0 / temperature
    inverse = torch.reciprocal(temperature.to(torch.float64)).to(dtype)
    return inverse.reshape(*rows, 1)


def support_logprobs(x, x_a, logp_a, lse, valid):
    """``log s_k`` on a support from its scaled logits ``x [..., K]``, the anchor's ``x_a [..., 1]`` and
    log-prob ``logp_a``: ``(x_k - x_a) + log s_a``, exact for the probable ids (no rounded lse), or
    ``x_k - lse`` where the anchor logit is -inf; -inf outside ``valid``."""
    exact = (x - x_a) + logp_a.unsqueeze(-1)
    rounded = x - lse.unsqueeze(-1)
    return torch.where(valid, torch.where(torch.isfinite(x_a), exact, rounded), float("-inf"))


def write_support_gradient(grad, ids, g, logs, valid, written, temperature):
    """``grad`` (the dense ``-G s_j / T``) with the support's entries written exactly:
    ``(g_k - G s_k) / T``, ``G = sum g``, ``s_k = 0`` where ``log s_k = -inf``. Only the slots in
    ``written`` are written (a shard: the ids it owns, local); the others repeat the row's first
    written slot (same index, same value: deterministic), and a row without one rewrites entry 0
    with what it holds. ``temperature``: a number or one T per row (a tensor of ``g.shape[:-1]`` values)."""
    probs = torch.where(valid, logs.exp(), 0.0)
    values = g - g.sum(-1, keepdim=True) * probs
    values = values / row_divisor(temperature, values)
    first = written.to(torch.int8).argmax(-1, keepdim=True)
    has_any = written.any(-1, keepdim=True)
    fill_idx = torch.where(has_any, ids.gather(-1, first), 0)
    fill_val = torch.where(has_any, values.gather(-1, first), grad[..., :1].to(values.dtype))
    idx = torch.where(written, ids, fill_idx)
    val = torch.where(written, values, fill_val)
    return grad.scatter(-1, idx, val.to(grad.dtype))


# --- validation -----------------------------------------------------------------------------------


def _check_mask(mask, shape, device):
    if mask is None:
        return None
    if not isinstance(mask, Tensor) or tuple(mask.shape) != tuple(shape):
        raise ValueError(f"mask must be a tensor of shape {tuple(shape)} (the student's leading dimensions)")
    return mask.to(device=device) != 0


def _check_beta(beta) -> float:
    if isinstance(beta, bool) or not isinstance(beta, (int, float)):
        raise TypeError(f"beta must be a number in [0, 1], got {beta!r}")
    beta = float(beta)
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if 0.0 < beta < MIN_BETA or 0.0 < 1.0 - beta < MIN_BETA:
        raise ValueError(f"beta and 1 - beta must be 0 or at least {MIN_BETA:.8g}, got beta = {beta!r}")
    return beta


def _sparse_teacher(teacher, student):
    if isinstance(teacher, SparseLogprobs):
        ids, logprobs = teacher.ids, teacher.logprobs
        if teacher.vocab != student.shape[-1]:
            raise ValueError(f"the sparse teacher was taken over {teacher.vocab} ids, the student has "
                             f"V = {student.shape[-1]}")
    elif isinstance(teacher, (tuple, list)) and len(teacher) == 2:
        ids, logprobs = teacher
    else:
        raise TypeError("kind='sparse_kl' takes the teacher as rlfuse.SparseLogprobs or a tuple (ids, logprobs)")
    if not isinstance(ids, Tensor) or not isinstance(logprobs, Tensor):
        raise TypeError("the sparse teacher's ids and logprobs must be tensors")
    if ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"the sparse teacher's ids must be int32 or int64, got {ids.dtype}")
    if not logprobs.is_floating_point():
        raise TypeError(f"the sparse teacher's logprobs must be floating point, got {logprobs.dtype}")
    lead = tuple(student.shape[:-1])
    if ids.dim() != len(lead) + 1 or tuple(ids.shape[:-1]) != lead or ids.shape != logprobs.shape or ids.shape[-1] < 1:
        raise ValueError(f"the sparse teacher's ids and logprobs must both have shape {lead + ('K',)} with K >= 1, "
                         f"got {tuple(ids.shape)} and {tuple(logprobs.shape)}")
    if ids.device != student.device or logprobs.device != student.device:
        raise ValueError("the sparse teacher must be on the student's device")
    return ids, logprobs


# --- per-token terms ------------------------------------------------------------------------------


def _terms(student, teacher, tokens, kind, beta, temperature, valid, backend, teacher_logprobs, estimator,
           sparse_convention):
    """(per-token fp32 values of shape student.shape[:-1], 0 where not valid; resolved backend).
    ``temperature``: a number, or a validated float64 tensor of one T per row."""
    scalar, temperatures = split_temperature(temperature)
    if kind in ("jsd", "forward_kl", "reverse_kl"):
        check.check_logits(teacher, "teacher")
        if teacher.shape != student.shape:
            raise ValueError(f"teacher must have the student's shape {tuple(student.shape)}, got {tuple(teacher.shape)}")
        if teacher.dtype != student.dtype:
            raise TypeError(f"teacher must have the student's dtype {student.dtype}, got {teacher.dtype}")
        if teacher.device != student.device:
            raise ValueError(f"teacher is on {teacher.device} but student is on {student.device}")
        resolved = resolve_backend(backend, student.device, "kl_div", student.dtype)
        if kind == "jsd" and 0.0 < beta < 1.0:
            values = jsd_fwd(student, teacher, scalar, beta, resolved, temperatures)[0]
        else:
            # KL(t || s) is the reverse direction of (student, teacher); KL(s || t) the forward one.
            reverse = kind == "forward_kl" or (kind == "jsd" and beta == 0.0)
            direction = DIRECTIONS["reverse" if reverse else "forward"]
            values = kl_div_fwd(student, teacher, scalar, direction, resolved, temperatures)[0]
    elif kind == "sparse_kl":
        ids, logprobs = _sparse_teacher(teacher, student)
        resolved = resolve_backend(backend, student.device, "token_logprobs", student.dtype)
        vocab = student.shape[-1]
        slot_valid = (ids >= 0) & (ids < vocab) & (logprobs > float("-inf"))
        if valid is not None:
            slot_valid = slot_valid & valid.unsqueeze(-1)
        compute = torch.float64 if student.dtype == torch.float64 else torch.float32
        student_logs = SupportLogprobs.apply(student, ids, slot_valid, temperature, resolved)
        teacher_logs = torch.where(slot_valid, logprobs.to(compute), float("-inf"))
        values = sparse_kl_terms(student_logs, teacher_logs, slot_valid, sparse_convention)
    elif kind == "sampled_reverse_kl":
        if tokens is None:
            raise ValueError("kind='sampled_reverse_kl' needs the sampled tokens")
        if not isinstance(teacher_logprobs, Tensor) or tuple(teacher_logprobs.shape) != tuple(student.shape[:-1]):
            raise ValueError(f"kind='sampled_reverse_kl' needs teacher_logprobs of shape {tuple(student.shape[:-1])}")
        resolved = resolve_backend(backend, student.device, "token_logprobs", student.dtype)
        logp = token_logprobs_fwd(student, tokens, scalar, resolved, False, temperatures)[0]
        teacher_lp = teacher_logprobs.to(device=student.device, dtype=logp.dtype)
        if valid is not None:  # masked positions see zeros (docs/SPEC.md section 9)
            logp = torch.where(valid, logp, 0.0)
            teacher_lp = torch.where(valid, teacher_lp, 0.0)
        values = sampled_kl_terms(logp, teacher_lp, estimator)
    else:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    values = values.float()
    if valid is not None:
        values = torch.where(valid, values, 0.0)
    return values, resolved


def _source_terms(student, teacher, tokens, kind, beta, temperature, valid, backend, teacher_logprobs, estimator,
                  sparse_convention):
    """``_terms`` where the student or the teacher is a logits source (docs/distillation.md, "Logits
    sources"). Vocabulary-split sources (``ShardedLogits``, ``LinearLogits(group=...)``) run every kind
    with rlfuse.sharded's collectives (the KLs through ``checked_kl_divergence``, JSD through ``sharded_jsd``,
    ``sparse_kl`` through ``sharded_support_logprobs``); an unsplit LinearLogits runs the tensor terms a
    chunk of rows at a time (masked rows never reach a GEMM)."""
    from .linear import LinearLogits, chunk_temperature, map_rows, temperature_rows
    from .sharded import _is_split

    lead = tuple(student.shape[:-1])
    resolved = resolve_backend(backend, student.device, "kl_div", _dtype(student))
    if kind == "sampled_reverse_kl":
        if not is_source(student):
            raise TypeError("kind='sampled_reverse_kl' takes no teacher logits")
        if tokens is None or not isinstance(teacher_logprobs, Tensor) or tuple(teacher_logprobs.shape) != lead:
            raise ValueError(f"kind='sampled_reverse_kl' needs tokens and teacher_logprobs of shape {lead}")
        logp = student._token_logprobs(tokens, temperature, backend, valid)[0]
        teacher_lp = teacher_logprobs.to(device=student.device, dtype=logp.dtype)
        if valid is not None:
            logp, teacher_lp = torch.where(valid, logp, 0.0), torch.where(valid, teacher_lp, 0.0)
        return sampled_kl_terms(logp, teacher_lp, estimator).float(), resolved
    if kind == "sparse_kl":
        per_row = list(_sparse_teacher(teacher, student))
    else:
        if not is_source(teacher):
            check.check_logits(teacher, "teacher")
        if tuple(teacher.shape) != tuple(student.shape):
            raise ValueError(f"teacher must have the student's shape {tuple(student.shape)}, got "
                             f"{tuple(teacher.shape)}")
        if _dtype(teacher) != _dtype(student):
            raise TypeError(f"teacher must have the student's dtype {_dtype(student)}, got {_dtype(teacher)}")
        if teacher.device != student.device:
            raise ValueError(f"teacher is on {teacher.device} but student is on {student.device}")
    if _is_split(student) or (kind != "sparse_kl" and _is_split(teacher)):
        return _split_terms(student, teacher, per_row if kind == "sparse_kl" else None, kind, beta, temperature,
                            valid, backend, sparse_convention), resolved
    if any(isinstance(x, LinearLogits) for x in (student, teacher)):
        sources = [student] if kind == "sparse_kl" else [student, teacher]
        before = 2 if kind == "sparse_kl" else 1  # the chunk's teacher: (ids, logprobs) or its logits

        def chunk_terms(s, *rest):
            t = tuple(rest[:before]) if kind == "sparse_kl" else rest[0]
            chunk_t = chunk_temperature(temperature, rest[before:])
            return (_terms(s, t, None, kind, beta, chunk_t, None, backend, None, estimator, sparse_convention)[0],)

        rows = (per_row if kind == "sparse_kl" else []) + temperature_rows(temperature)
        return map_rows(chunk_terms, sources, rows, mask=valid)[0].reshape(lead), resolved
    raise NotImplementedError(f"kind={kind!r} is not available for {type(student).__name__} / "
                              f"{type(teacher).__name__}")


def _split_terms(student, teacher, sparse, kind, beta, temperature, valid, backend, sparse_convention):
    """Per-token values (fp32, 0 where not valid) with a vocabulary-split source (docs/sharded.md,
    "Distillation"): every rank gets the same values, and each rank the gradient of its own columns."""
    from .sharded import sharded_jsd, sharded_support_logprobs

    if kind in ("forward_kl", "reverse_kl") or (kind == "jsd" and beta in (0.0, 1.0)):
        from .functional import checked_kl_divergence

        forward = kind == "reverse_kl" or (kind == "jsd" and beta == 1.0)  # KL(s || t), else KL(t || s)
        return checked_kl_divergence(student, teacher, "forward" if forward else "reverse", temperature, valid,
                                     backend)
    if kind == "jsd":
        return sharded_jsd(student, teacher, beta, temperature, backend, valid)
    ids, logprobs = sparse
    vocab = student.shape[-1]
    slot_valid = (ids >= 0) & (ids < vocab) & (logprobs > float("-inf"))
    if valid is not None:
        slot_valid = slot_valid & valid.unsqueeze(-1)
    compute = torch.float64 if _dtype(student) == torch.float64 else torch.float32
    student_logs = sharded_support_logprobs(student, ids.long(), slot_valid, temperature, backend, valid)
    teacher_logs = torch.where(slot_valid, logprobs.to(compute), float("-inf"))
    values = sparse_kl_terms(student_logs, teacher_logs, slot_valid, sparse_convention).float()
    return values if valid is None else torch.where(valid, values, 0.0)


def _dtype(logits) -> torch.dtype:
    return logits.compute_dtype() if is_source(logits) else logits.dtype


def _prepare(student, teacher, tokens, kind, beta, temperature, mask, estimator, sparse_convention,
             inputs_checked=False):
    """Validated (beta, temperature, valid). ``temperature``: a number, or a float tensor of the
    student's leading shape (or 0-dim), checked as ``token_logprobs`` checks it and returned as
    float64 of that shape. Its range and the sampled tokens' ids are data checks, read together (one
    host read). ``inputs_checked``: the caller (``policy_loss``, with its own checks) validated a
    temperature tensor and the tokens, which are taken as they are."""
    if not is_source(student):
        check.check_logits(student, "student")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    beta = _check_beta(beta)
    checks = check.DataChecks(student)
    read = False  # whether any data check was added (a split source's run() is a collective)
    if not (inputs_checked and isinstance(temperature, Tensor)):
        read = isinstance(temperature, Tensor)
        temperature = check.check_temperature(temperature, checks=checks, logits=student)
    if kind == "sampled_reverse_kl" and tokens is not None and not inputs_checked:
        check.check_tokens(tokens, student, checks)
        read = True
    if read:
        checks.run()
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if sparse_convention not in SPARSE_CONVENTIONS:
        raise ValueError(f"sparse_convention must be one of {SPARSE_CONVENTIONS}, got {sparse_convention!r}")
    if kind != "sampled_reverse_kl" and teacher is None:
        raise ValueError(f"kind={kind!r} needs a teacher")
    valid = _check_mask(mask, student.shape[:-1], student.device)
    return beta, temperature, valid


def distill_term(student: Tensor, teacher=None, tokens: Tensor | None = None, *, kind: str = "jsd",
                 beta: float = 0.5, temperature: float | Tensor = 1.0, mask: Tensor | None = None,
                 backend: str = "auto", teacher_logprobs: Tensor | None = None, estimator: str = "k1",
                 sparse_convention: str = "tail") -> Tensor:
    """Per-token distillation values, fp32 ``[N]`` (N = ``student.shape[:-1].numel()``, row-major),
    differentiable (student, and teacher logits that require grad), exactly 0 at masked positions,
    which also get exactly zero gradient. Arguments as :func:`distill_loss`. The loss of a caller
    is ``sum_t w_t term_t`` with its own weights."""
    return checked_distill_term(student, teacher, tokens, kind=kind, beta=beta, temperature=temperature, mask=mask,
                                backend=backend, teacher_logprobs=teacher_logprobs, estimator=estimator,
                                sparse_convention=sparse_convention, inputs_checked=False)


def checked_distill_term(student, teacher, tokens, *, kind, beta, temperature, mask, backend, teacher_logprobs,
                         estimator="k1", sparse_convention="tail", inputs_checked=True) -> Tensor:
    """:func:`distill_term` for a caller that validated a per-token ``temperature`` tensor and the
    tokens itself (``policy_loss``, with the call's other checks), so the term makes no second host
    read for them; a number is checked as always."""
    beta, temperature, valid = _prepare(student, teacher, tokens, kind, beta, temperature, mask, estimator,
                                        sparse_convention, inputs_checked)
    values, _ = _any_terms(student, teacher, tokens, kind, beta, temperature, valid, backend, teacher_logprobs,
                           estimator, sparse_convention)
    return values.reshape(-1)


def _any_terms(student, teacher, *args):
    """``_terms`` for logits tensors, ``_source_terms`` when either side is a logits source."""
    if is_source(student) or is_source(teacher):
        return _source_terms(student, teacher, *args)
    return _terms(student, teacher, *args)


def _weights(valid, shape, aggregation, device):
    """Per-token aggregation weights (docs/SPEC.md section 6) and the valid-token count."""
    ones = torch.ones(shape, dtype=torch.bool, device=device)
    valid = ones if valid is None else valid
    v = valid.float()
    count = v.sum()
    if aggregation == "token-mean":
        return v / count.clamp(min=1), count
    if aggregation in ("sum", "token-sum"):
        return v, count
    if len(shape) != 2:
        raise ValueError(f"aggregation='seq-mean-token-mean' needs padded [B, T] inputs, got leading shape {tuple(shape)}")
    per_seq = v.sum(-1, keepdim=True)
    sequences = (per_seq > 0).float().sum().clamp(min=1)
    return v / (per_seq.clamp(min=1) * sequences), count


def distill_loss(student: Tensor, teacher=None, tokens: Tensor | None = None, *, kind: str = "jsd",
                 beta: float = 0.5, temperature: float | Tensor = 1.0, mask: Tensor | None = None,
                 aggregation: str = "token-mean", backend: str = "auto", teacher_logprobs: Tensor | None = None,
                 estimator: str = "k1", sparse_convention: str = "tail") -> DistillOutput:
    """Distillation loss between student logits ``[..., V]`` and a teacher (docs/distillation.md).

    ``teacher``: logits of the student's shape and dtype (``jsd``, ``forward_kl``, ``reverse_kl``),
    ``rlfuse.SparseLogprobs`` or ``(ids, logprobs)`` of shape ``[..., K]`` (``sparse_kl``), or None
    (``sampled_reverse_kl``, which takes ``tokens`` and ``teacher_logprobs`` of shape ``[...]``).
    ``beta``: JSD's mixture weight (0: ``KL(t || s)``, 1: ``KL(s || t)``). ``temperature`` divides
    the student's and the teacher's logits: a number, or a float tensor of the student's leading shape
    ``[...]`` (one T per token, both sides of that row; a 0-dim tensor applies to every token; no
    gradient, so one that requires grad is a ``ValueError``; its range is checked as a data check, one
    host read). ``mask`` (``[...]``, nonzero = valid). ``aggregation``:
    ``token-mean``, ``seq-mean-token-mean`` (padded ``[B, T]``) or ``sum``. ``estimator``: ``k1`` or
    ``k3`` (``sampled_reverse_kl``). ``sparse_convention``: ``tail`` (TRL), ``verl`` or ``renorm``.
    """
    beta, temperature, valid = _prepare(student, teacher, tokens, kind, beta, temperature, mask, estimator,
                                        sparse_convention)
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    values, resolved = _any_terms(student, teacher, tokens, kind, beta, temperature, valid, backend,
                                  teacher_logprobs, estimator, sparse_convention)
    weights, count = _weights(valid, tuple(student.shape[:-1]), aggregation, student.device)
    loss = (weights * values).sum()
    detached = values.detach()
    valid_f = torch.ones_like(detached) if valid is None else valid.float()
    metrics = {
        "distill_mean": (detached * valid_f).sum() / count.clamp(min=1),
        "valid_tokens": count,
        "kind": kind,
        "backend": resolved,
    }
    return DistillOutput(loss=loss, per_token=values, metrics=metrics)


__all__ = ["DistillOutput", "distill_loss", "distill_term", "SupportLogprobs", "KINDS", "AGGREGATIONS"]
