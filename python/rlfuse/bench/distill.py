"""``--op distill``: TRL's generalised JSD (beta = 0.5) between student and teacher logits, forward and
both gradients: rlfuse's JSD kernels vs the two log-softmaxes in torch (eager, torch.compile) and
Liger-Kernel's JSD loss function (``LigerFusedLinearJSDFunction.distillation_loss_fn``, plain torch on
logits, checked against rlfuse before it is timed). Every contender returns the summed loss."""

from __future__ import annotations

import argparse

import torch

from rlfuse.reference import jsd_reference

from .harness import (Agreement, Case, Contender, Draws, Inputs, kernels_vs_torch, register_case, short_error)

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
    case.contenders += _liger_contender(case.notes)
    return case
