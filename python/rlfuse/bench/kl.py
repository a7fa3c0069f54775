"""``--op kl``: full-vocabulary forward KL with gradients for both inputs vs two log-softmaxes in torch."""

from __future__ import annotations

import argparse

import torch

import rlfuse
from rlfuse.reference import kl_divergence_reference

from .harness import Case, Draws, Inputs, kernels_vs_torch, register_case


@register_case("kl")
def _kl_case(args: argparse.Namespace, device: torch.device) -> Case:
    def make_inputs(dtype: torch.dtype) -> Inputs:
        draw = Draws(args, device)
        logits, other = draw.logits(dtype), draw.logits(dtype)
        return Inputs({"logits": logits, "other": other}, [logits, other], [draw.normal(args.tokens)])

    def call(t: dict, backend: str):
        return rlfuse.kl_divergence(t["logits"], t["other"], backend=backend)

    # Forward reads both inputs; backward reads both again and writes both gradients.
    return kernels_vs_torch("kl", "kl_divergence (forward, both gradients)", args, device, make_inputs, call,
                            kl_divergence_reference, ("logits", "other"), {"fwd": 2, "bwd": 4, "fwd+bwd": 6})
