"""``--op policy_loss``: the fused dapo loss (and gspo, through the general path) vs the same loss as a
trainer writes it in torch, and Liger-Kernel's Triton GRPO loss where it can run (checked against
rlfuse's dapo before it is timed). :func:`loss_call` is shared with ``--op troll``."""

from __future__ import annotations

import argparse
import os
from typing import Callable

import torch

import rlfuse
from rlfuse import LossConfig
from rlfuse.reference import token_logprobs_reference

from .harness import (Agreement, Case, Contender, Draws, Inputs, logits_case, register_case, rlfuse_backends,
                      rlfuse_contender, short_error, torch_contenders)

SEQ_LEN = 128  # one sequence (and one advantage) per 128 tokens, its last position masked

# Liger's GRPO kernels launch a (sequences, completion length L) grid and CUDA caps the second dimension
# at 65535, so its Triton GRPO loss fails for L >= 65536 (documented in Liger-Kernel PR #1294).
_LIGER_MAX_COMPLETION = 65535
# Liger and rlfuse both compute the per-token log-probs, ratios and the token mean in fp32 from the same
# logits (upcast from any dtype), so their losses agree to fp32 rounding: a few ulps of the log-sum-exp
# per token (|lse| < 32: ulp <= 4e-6, averaged over the tokens) and of the mean. 2e-5 relative to
# max(1, |loss|) is well above that (measured ~1e-8) and well below what a different computation gives
# (clip_high 0.2 instead of 0.28, or a per-sequence mean instead of the token mean: 2e-4 to 6e-4).
_LIGER_LOSS_RTOL = 2e-5


def _liger_grpo_contender(args: argparse.Namespace, device: torch.device, seq_len: int, config,
                          reference: Callable[[dict], torch.Tensor], reference_name: str,
                          notes: list[str]) -> list[Contender]:
    """Liger-Kernel's Triton GRPO loss (``triton_grpo_loss``, loss_type "dapo") on a GPU where it is
    importable; on CPU only with ``--liger`` (it then runs under the Triton interpreter, slowly).

    Liger takes padded ``[B, L + 1, V]`` logits (the last position of each sequence has no next token),
    per-sequence advantages and ``[B, L]`` ids, old log-probs and mask: the case's packed ``[N, V]``
    logits are viewed (no copy) as ``[N / seq_len, seq_len, V]``, whose last position per sequence the
    case masks for every contender, and the small ``[B, L]`` tensors are made with the inputs
    (``liger_*``). ``reference(tensors)`` is rlfuse's loss on the same inputs: Liger's loss must match it
    (checked once per dtype) or Liger is reported invalid and not timed.
    """
    if getattr(args, "no_liger", False) or (device.type != "cuda" and not getattr(args, "liger", False)):
        return []
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        notes.append("Liger-Kernel not benchmarked: on CPU it needs the Triton interpreter (TRITON_INTERPRET=1)")
        return []
    try:
        from liger_kernel.transformers.grpo_loss import triton_grpo_loss
    except Exception as exc:  # not installed, or built for another torch / triton
        notes.append(f"Liger-Kernel not benchmarked: {short_error(exc)}")
        return []
    n, v = args.tokens, args.vocab
    if n % seq_len:
        notes.append(f"Liger-Kernel not benchmarked: N={n} is not a multiple of the sequence length {seq_len} "
                     "(its logits are [B, L + 1, V])")
        return []
    if seq_len - 1 > _LIGER_MAX_COMPLETION:
        notes.append(f"Liger-Kernel not benchmarked: its kernel fails for completions of more than "
                     f"{_LIGER_MAX_COMPLETION} positions (CUDA grid limit), here L={seq_len - 1}")
        return []
    try:
        from importlib.metadata import version

        liger_version = version("liger-kernel")
    except Exception:
        liger_version = "unknown version"
    batch = n // seq_len
    notes.append(f"liger: Liger-Kernel {liger_version} triton_grpo_loss(loss_type='dapo', beta=0, temperature="
                 f"{config.temperature}, eps {config.clip_low}/{config.clip_high}, inplace=False) on [B={batch}, "
                 f"L+1={seq_len}, V] views; its loss is checked against {reference_name} before timing")

    def loss(t: dict) -> torch.Tensor:
        value, _ = triton_grpo_loss(
            t["logits"].view(batch, seq_len, v), t["liger_old"], None, t["liger_ids"], t["liger_advantages"],
            t["liger_mask"], temperature=config.temperature, beta=0.0, eps_low=config.clip_low,
            eps_high=config.clip_high, inplace=False, loss_type="dapo", reduce=True)
        return value

    def check(inp: Inputs, dtype: torch.dtype) -> Agreement:
        with torch.no_grad():
            value = float(loss(inp.tensors))
            expected = float(reference(inp.tensors))
        return Agreement(reference_name, value, expected, _LIGER_LOSS_RTOL * max(1.0, abs(expected)))

    return [Contender("liger dapo", lambda dtype: (lambda inp: [loss(inp.tensors)]), slow_first_call=True,
                      first_call_hint="Triton JIT" if device.type == "cuda" else "Triton interpreter",
                      check=check)]


def _liger_layout(tensors: dict, seq_len: int) -> dict:
    """The ``[B, L]`` inputs of Liger's GRPO loss, L = seq_len - 1 (the logits are viewed, not copied)."""
    def rows(x: torch.Tensor) -> torch.Tensor:
        return x.view(-1, seq_len)[:, :-1].contiguous()

    return {"liger_ids": rows(tensors["tokens"]), "liger_old": rows(tensors["old"]),
            "liger_mask": rows(tensors["mask"]).to(torch.int32),  # TRL's completion_mask dtype
            "liger_advantages": tensors["advantages"].view(-1, seq_len)[:, 0].contiguous()}


def loss_call(config: LossConfig, **inputs: str) -> Callable[[dict, str], torch.Tensor]:
    """``call(tensors, backend)``: rlfuse's policy loss of the case's logits, tokens and advantages, each
    keyword argument of ``inputs`` taken from the tensor it names (e.g. ``old_logprobs="old"``)."""

    def call(t: dict, backend: str) -> torch.Tensor:
        return rlfuse.policy_loss(t["logits"], t["tokens"], t["advantages"], config=config, backend=backend,
                                  **{name: t[key] for name, key in inputs.items()}).loss

    return call


@register_case("policy_loss")
def _policy_loss_case(args: argparse.Namespace, device: torch.device) -> Case:
    """The fused dapo loss (and gspo, through the general path) vs the same loss in torch eager, and
    Liger-Kernel's Triton GRPO loss where available (see :func:`_liger_grpo_contender`)."""
    n, seq_len = args.tokens, SEQ_LEN
    notes: list[str] = [f"rlfuse dapo takes the fused path; rlfuse gspo the general path (one sequence per {seq_len} "
                        "tokens, one advantage per sequence, its last position masked: no next token)"]
    backends = rlfuse_backends(args, device, notes)
    dapo, gspo = LossConfig.dapo(), LossConfig.gspo()
    with_liger = False  # set below, once the contenders are known

    def make_inputs(dtype: torch.dtype) -> Inputs:
        draw = Draws(args, device)
        logits, tokens = draw.logits(dtype), draw.tokens()
        with torch.no_grad():
            old = token_logprobs_reference(logits, tokens)[0] + 0.1 * draw.normal(n)
        cu_seqlens = torch.arange(0, n + 1, seq_len, device=device)
        if cu_seqlens[-1] != n:
            cu_seqlens = torch.cat([cu_seqlens, torch.tensor([n], device=device)])
        lengths = cu_seqlens.diff()
        advantages = draw.normal(len(lengths)).repeat_interleave(lengths)
        mask = torch.rand(n, generator=draw.gen, device=device) > 0.1
        mask[cu_seqlens[1:] - 1] = False
        tensors = {"logits": logits, "tokens": tokens, "old": old, "advantages": advantages, "mask": mask,
                   "cu_seqlens": cu_seqlens}
        if with_liger:
            tensors.update(_liger_layout(tensors, seq_len))
        return Inputs(tensors, [logits], [torch.ones((), device=device)])

    def loss_with(config: LossConfig) -> Callable[[dict, str], torch.Tensor]:
        return loss_call(config, old_logprobs="old", mask="mask", cu_seqlens="cu_seqlens")

    def eager_dapo(logits, tokens, advantages, old, mask):
        # What a trainer writes by hand: log-softmax, gather, clipped ratio, token mean.
        logp, _ = token_logprobs_reference(logits, tokens)
        ratio = torch.exp(torch.clamp(logp - old, -20.0, 20.0))
        clipped = torch.clamp(ratio, 1.0 - dapo.clip_low, 1.0 + dapo.clip_high)
        losses = torch.maximum(-advantages * ratio, -advantages * clipped)
        return (losses * mask).sum() / mask.sum().clamp(min=1)

    contenders = [rlfuse_contender(b, loss_with(dapo), "dapo") for b in backends]
    contenders += [rlfuse_contender(b, loss_with(gspo), "gspo") for b in backends]
    contenders += torch_contenders(args, device, eager_dapo, ("logits", "tokens", "advantages", "old", "mask"))
    # Liger is checked against the first rlfuse dapo contender (rlfuse's torch reference without one).
    check_backend = backends[0] if backends else "torch"
    liger = _liger_grpo_contender(args, device, seq_len, dapo, lambda t: loss_with(dapo)(t, check_backend),
                                  f"rlfuse {check_backend} dapo", notes)
    with_liger = bool(liger)
    contenders += liger
    # The floor of a fused loss: read the logits once, write the gradient once (docs/ARCHITECTURE.md's 4 B/elem
    # for bf16). The forward already does both; the backward moves nothing when grad_output is 1.
    return logits_case("policy_loss", "policy_loss (dapo fused, gspo general)", args, make_inputs, contenders,
                       {"fwd": 2, "fwd+bwd": 2}, notes)
