"""``--op troll``: TROLL (K = 64) forward+backward against rlfuse's fused dapo loss on the same inputs."""

from __future__ import annotations

import argparse

import torch

import rlfuse
from rlfuse import LossConfig

from .harness import Case, Draws, Inputs, logits_case, register_case, rlfuse_backends, rlfuse_contender
from .policy_loss import loss_call


@register_case("troll")
def _troll_case(args: argparse.Namespace, device: torch.device) -> Case:
    notes: list[str] = ["old_topk (sparse_logprobs of the old logits) is precomputed, as a trainer stores it"]
    backends = rlfuse_backends(args, device, notes)
    troll, dapo = LossConfig.troll(), LossConfig.dapo()

    def make_inputs(dtype: torch.dtype) -> Inputs:
        draw = Draws(args, device)
        logits, tokens = draw.logits(dtype, requires_grad=False), draw.tokens()
        old_logits = logits + 0.3 * draw.normal(args.tokens, args.vocab, dtype=dtype)
        old_topk = rlfuse.sparse_logprobs(old_logits, tokens, k=troll.troll_k)
        old = rlfuse.token_logprobs(old_logits, tokens)
        del old_logits
        logits.requires_grad_()
        tensors = {"logits": logits, "tokens": tokens, "old": old, "advantages": draw.normal(args.tokens),
                   "old_topk": old_topk}
        return Inputs(tensors, [logits], [torch.ones((), device=device)])

    contenders = []
    for backend in backends:
        contenders += [rlfuse_contender(backend, loss_call(troll, old_logprobs="old", old_topk="old_topk"), "troll"),
                       rlfuse_contender(backend, loss_call(dapo, old_logprobs="old"), "dapo")]
    baseline = f"rlfuse {backends[0]} dapo" if backends else "torch eager"
    if not backends:
        notes.append("no rlfuse kernel backend available: nothing to compare")
    return logits_case("troll", "policy_loss troll (K=64) vs fused dapo", args, make_inputs, contenders,
                       {"fwd+bwd": 2}, notes, baseline=baseline)
