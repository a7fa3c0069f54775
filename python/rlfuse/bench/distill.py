"""``--op distill``: TRL's generalised JSD (beta = 0.5) between student and teacher logits, forward and
both gradients: rlfuse's JSD kernels vs the two log-softmaxes in torch (eager, torch.compile) and
Liger-Kernel's JSD loss function (``LigerFusedLinearJSDFunction.distillation_loss_fn``, plain torch on
logits, checked against rlfuse before it is timed). Every contender returns the summed loss.

``--op linear_distill``: the same JSD from hidden states (student hidden + lm_head requiring grad, a frozen
teacher's hidden + lm_head): rlfuse's ``distill_loss`` on two ``LinearLogits`` vs materialised logits +
rlfuse vs torch eager / torch.compile vs Liger-Kernel's ``LigerFusedLinearJSDLoss`` (checked against rlfuse
before it is timed)."""

from __future__ import annotations

import argparse

import torch

from rlfuse.reference import jsd_reference

from .harness import (Agreement, Case, Contender, Draws, Inputs, kernels_vs_torch, register_case, rlfuse_backends,
                      rlfuse_contender, short_error, torch_contenders)

BETA = 0.5
_LIGER_RTOL = 1e-4  # fp32 sums over N tokens of V terms; bf16 inputs are upcast by both


def _call(tensors: dict, backend: str):
    from rlfuse.distill import distill_loss

    return distill_loss(tensors["student"], tensors["teacher"], kind="jsd", beta=BETA, aggregation="sum",
                        backend=backend).loss


def _reference(student, teacher):
    return jsd_reference(student, teacher, BETA).sum()


def _liger_contender(notes: list[str]) -> list[Contender]:
    try:
        from liger_kernel.chunked_loss.jsd_loss import LigerFusedLinearJSDFunction
    except Exception as exc:  # noqa: BLE001 - an optional contender
        notes.append(f"Liger-Kernel not benchmarked: {short_error(exc)}")
        return []
    loss_fn = LigerFusedLinearJSDFunction.distillation_loss_fn
    notes.append("liger: LigerFusedLinearJSDFunction.distillation_loss_fn on the logits (its per-chunk loss, "
                 "plain torch; the fused-linear wrapper needs hidden states)")

    def loss(t: dict):
        return loss_fn(t["student"].float(), t["teacher"].float(), beta=BETA)

    def check(inp: Inputs, dtype: torch.dtype) -> Agreement:
        with torch.no_grad():
            value = float(loss(inp.tensors))
            expected = float(_reference(inp.tensors["student"].double(), inp.tensors["teacher"].double()))
        return Agreement("float64 reference", value, expected, _LIGER_RTOL * max(1.0, abs(expected)))

    return [Contender("liger jsd", lambda dtype: (lambda inp: [loss(inp.tensors)]), check=check)]


@register_case("distill")
def _distill_case(args: argparse.Namespace, device: torch.device) -> Case:
    def make_inputs(dtype: torch.dtype) -> Inputs:
        draw = Draws(args, device)
        student = draw.logits(dtype)
        teacher = (student.detach() + 0.5 * draw.normal(args.tokens, args.vocab, dtype=dtype)).requires_grad_()
        return Inputs({"student": student, "teacher": teacher}, [student, teacher], [torch.ones((), device=device)])

    notes: list[str] = []
    case = kernels_vs_torch("distill", f"distill jsd (beta={BETA}, both gradients)", args, device, make_inputs,
                            _call, _reference, ("student", "teacher"),
                            # Forward reads both rows twice; backward reads both, writes both gradients.
                            {"fwd": 4, "bwd": 4, "fwd+bwd": 8}, notes)
    if not getattr(args, "no_liger", False):
        case.contenders += _liger_contender(case.notes)
    return case


# --- --op linear_distill: from hidden states (LinearLogits) vs Liger's fused-linear JSD ------------------

SEQUENCES = 8
_LINEAR_DEFAULTS = dict(cpu=dict(tokens=2048, vocab=32768, dtypes=("fp32",), repeats=3),
                        cuda=dict(tokens=16384, vocab=151936, dtypes=("bf16",), repeats=10))
_HIDDEN = {"cpu": 256, "cuda": 4096}


def _linear_inputs(args, device, dtype) -> dict:
    """Student hidden [B, T, D] and lm_head [V, D] (both require grad), a frozen teacher's hidden and lm_head
    (the teacher's logits ~ the student's plus noise), 10% masked positions."""
    gen = torch.Generator(device=device).manual_seed(args.seed)
    n, v, d = args.tokens, args.vocab, args.hidden_dim
    hidden = torch.randn(SEQUENCES, n // SEQUENCES, d, generator=gen, device=device)
    weight = torch.randn(v, d, generator=gen, device=device) * (2.0 / d**0.5)
    t_hidden = hidden + 0.5 * torch.randn(hidden.shape, generator=gen, device=device)
    t_weight = weight + 0.5 * torch.randn(weight.shape, generator=gen, device=device) * (2.0 / d**0.5)
    mask = torch.rand(hidden.shape[:-1], generator=gen, device=device) > 0.1
    return {"hidden": hidden.to(dtype).requires_grad_(True), "weight": weight.to(dtype).requires_grad_(True),
            "t_hidden": t_hidden.to(dtype), "t_weight": t_weight.to(dtype), "mask": mask}


def _linear_loss(student, teacher, t: dict, backend: str):
    from rlfuse.distill import distill_loss

    return distill_loss(student, teacher, kind="jsd", beta=BETA, mask=t["mask"], backend=backend).loss


def _linear_eager(hidden, weight, t_hidden, t_weight, mask):
    """What a trainer writes: both logits, fp32 upcast, TRL's generalised JSD per row, masked token mean."""
    student = torch.nn.functional.linear(hidden, weight).float()
    teacher = torch.nn.functional.linear(t_hidden, t_weight).float()
    per_token = jsd_reference(student, teacher, BETA)
    m = mask.float()
    return (per_token * m).sum() / m.sum().clamp(min=1)


def _liger_linear_contender(args, reference, notes: list[str]) -> list[Contender]:
    """Liger-Kernel's ``LigerFusedLinearJSDLoss`` (chunked, pure PyTorch + torch.compile: runs on CPU too)
    with only the soft loss (``weight_hard_loss=0``, ``weight_soft_loss=1``: the masked token mean of the
    JSD), checked against rlfuse's loss before it is timed. It computes the student's gradients inside
    its forward (``torch.func.grad_and_value`` per chunk): its "fwd" holds its backward too."""
    if getattr(args, "no_liger", False):
        return []
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
    except Exception as exc:  # noqa: BLE001 - an optional contender
        notes.append(f"Liger-Kernel not benchmarked: {short_error(exc)}")
        return []
    compiled = not args.no_compile
    module = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=BETA, compiled=compiled)
    notes.append(f"liger: LigerFusedLinearJSDLoss(weight_hard_loss=0, weight_soft_loss=1, beta={BETA}, "
                 f"compiled={compiled}, chunk_size=1024) on flattened [N, D] inputs, labels -100 at masked "
                 "positions; it computes its gradients in the forward, so its fwd includes them and its bwd is a "
                 "copy; checked against rlfuse's LinearLogits loss before timing")

    def loss(t: dict):
        d = t["hidden"].shape[-1]
        labels = torch.where(t["mask"], 0, -100).reshape(-1)
        return module(t["hidden"].reshape(-1, d), t["weight"], t["t_hidden"].reshape(-1, d), t["t_weight"], labels)

    def check(inp: Inputs, dtype: torch.dtype) -> Agreement:
        with torch.no_grad():
            value, expected = float(loss(inp.tensors)), float(reference(inp.tensors))
        tolerance = (_LIGER_RTOL if dtype == torch.float32 else 2e-2) * max(1.0, abs(expected))
        return Agreement("rlfuse LinearLogits", value, expected, tolerance)

    return [Contender("liger fused-linear jsd", lambda dtype: (lambda inp: [loss(inp.tensors)]),
                      slow_first_call=compiled, first_call_hint="torch.compile", check=check)]


@register_case("linear_distill", **_LINEAR_DEFAULTS)
def _linear_distill_case(args: argparse.Namespace, device: torch.device) -> Case:
    from rlfuse import LinearLogits

    args.hidden_dim = getattr(args, "hidden_dim", None) or _HIDDEN[device.type]
    if args.tokens % SEQUENCES:
        raise ValueError(f"--tokens must be a multiple of {SEQUENCES} (the sequences)")
    notes = [f"{SEQUENCES} sequences of {args.tokens // SEQUENCES} tokens, 10% masked; student hidden and lm_head "
             "require grad, the teacher's (hidden, lm_head) are frozen; token-mean JSD(beta=0.5); peak memory "
             "includes the inputs"]
    backends = rlfuse_backends(args, device, notes)

    def make_inputs(dtype: torch.dtype) -> Inputs:
        t = _linear_inputs(args, device, dtype)
        return Inputs(t, [t["hidden"], t["weight"]], [torch.ones((), device=device)])

    def from_hidden(t, backend):
        return _linear_loss(LinearLogits(t["hidden"], t["weight"]), LinearLogits(t["t_hidden"], t["t_weight"]), t,
                            backend)

    def materialised(t, backend):
        linear = torch.nn.functional.linear
        return _linear_loss(linear(t["hidden"], t["weight"]), linear(t["t_hidden"], t["t_weight"]), t, backend)

    contenders = [rlfuse_contender(b, from_hidden, "LinearLogits") for b in backends]
    contenders += [rlfuse_contender(b, materialised, "materialised") for b in backends]
    contenders += torch_contenders(args, device, _linear_eager, ("hidden", "weight", "t_hidden", "t_weight", "mask"))
    contenders += _liger_linear_contender(args, lambda t: from_hidden(t, backends[0] if backends else "torch"), notes)
    n, v = args.tokens, args.vocab
    return Case(op="linear_distill", title=f"distill jsd (beta={BETA}) from hidden states, N={n} D={args.hidden_dim} "
                f"V={v}", shape={"tokens": n, "hidden": args.hidden_dim, "vocab": v}, make_inputs=make_inputs,
                contenders=contenders, unit_name="fp32 logits", unit_bytes=lambda dtype: n * v * 4,
                bytes_moved=lambda dtype: {}, notes=notes)
