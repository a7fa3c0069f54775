"""``--op token_logprobs`` (the default): per-token log-probs + entropy vs log-softmax, gather, entropy."""

from __future__ import annotations

import argparse

import torch

import rlfuse
from rlfuse.reference import token_logprobs_reference

from .harness import Case, Draws, Inputs, kernels_vs_torch, register_case


@register_case("token_logprobs")
def _token_logprobs_case(args: argparse.Namespace, device: torch.device) -> Case:
    def make_inputs(dtype: torch.dtype) -> Inputs:
        draw = Draws(args, device)
        logits, tokens = draw.logits(dtype), draw.tokens()
        g_logp, g_entropy = draw.normal(args.tokens), draw.normal(args.tokens)
        return Inputs({"logits": logits, "tokens": tokens}, [logits], [g_logp, g_entropy])

    def call(t: dict, backend: str):
        return rlfuse.token_logprobs(t["logits"], t["tokens"], return_entropy=True, backend=backend)

    # fwd reads the logits once; bwd reads them again and writes a gradient of the same dtype.
    return kernels_vs_torch("token_logprobs", "token_logprobs + entropy", args, device, make_inputs, call,
                            token_logprobs_reference, ("logits", "tokens"), {"fwd": 1, "bwd": 2, "fwd+bwd": 3})
