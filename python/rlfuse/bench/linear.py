"""``--op linear_policy_loss`` and ``--op linear_token_logprobs``: from hidden states and the lm_head
weight (``rlfuse.LinearLogits``, issue 15) vs materialised logits, torch eager and Liger-Kernel's
chunked fused-linear GRPO loss, with the three GEMMs alone as the time floor.

Shapes: ``N`` tokens as ``B = 8`` sequences of ``N / 8``, hidden size ``--hidden-dim`` (CPU 256,
GPU 4096), vocabulary ``V``; hidden and weight both require grad. Memory is reported in units of the
fp32 logits (what a trainer's upcast makes), the quantity that fused-linear losses exist to avoid.
"""

from __future__ import annotations

import argparse

import torch

import rlfuse
from rlfuse import LinearLogits, LossConfig
from rlfuse.reference import token_logprobs_reference

from .harness import (Agreement, Case, Contender, Inputs, register_case, rlfuse_backends, rlfuse_contender,
                      short_error)

SEQUENCES = 8
_DEFAULTS = dict(cpu=dict(tokens=4096, vocab=32768, dtypes=("fp32",), repeats=3),
                 cuda=dict(tokens=16384, vocab=151936, dtypes=("bf16",), repeats=10))
_HIDDEN = {"cpu": 256, "cuda": 4096}
# Liger's loss and rlfuse's are the same dapo token mean from the same GEMMs in fp32: rounding only.
_LIGER_RTOL = 1e-4


class _ThreeGemms(torch.autograd.Function):
    """The floor of any linear loss: ``h @ W.T`` forward, ``G @ W`` and ``G.T @ h`` backward, with the
    logits' gradient ``G`` a preallocated buffer (no loss, no row work)."""

    @staticmethod
    def forward(ctx, hidden, weight, g_buffer):
        ctx.save_for_backward(hidden, weight, g_buffer)
        logits = hidden @ weight.t()
        return logits[0, 0].float()

    @staticmethod
    def backward(ctx, _grad):
        hidden, weight, g = ctx.saved_tensors
        return g @ weight, g.t() @ hidden, None


def _inputs(args, device, dtype, hidden_dim):
    gen = torch.Generator(device=device).manual_seed(args.seed)
    n, v = args.tokens, args.vocab
    hidden = torch.randn(SEQUENCES, n // SEQUENCES, hidden_dim, generator=gen, device=device).to(dtype)
    weight = (torch.randn(v, hidden_dim, generator=gen, device=device) * (2.0 / hidden_dim**0.5)).to(dtype)
    tokens = torch.randint(0, v, hidden.shape[:-1], generator=gen, device=device)
    with torch.no_grad():
        current = rlfuse.token_logprobs(LinearLogits(hidden, weight), tokens)
    old = current + 0.3 * torch.randn(tokens.shape, generator=gen, device=device)
    advantages = torch.randn(SEQUENCES, generator=gen, device=device)
    mask = torch.rand(tokens.shape, generator=gen, device=device) > 0.1  # prompt / padding positions
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    return {"hidden": hidden, "weight": weight, "tokens": tokens, "old": old, "advantages": advantages,
            "mask": mask}


def _case(op, title, args, device, contenders, make_inputs, notes, baseline="3 GEMMs") -> Case:
    n, v = args.tokens, args.vocab
    return Case(op=op, title=f"{title}, N={n} D={args.hidden_dim} V={v}",
                shape={"tokens": n, "hidden": args.hidden_dim, "vocab": v}, make_inputs=make_inputs,
                contenders=contenders, unit_name="fp32 logits", unit_bytes=lambda dtype: n * v * 4,
                bytes_moved=lambda dtype: {}, baseline=baseline, notes=notes)


def _gemms_contender() -> Contender:
    def forward(inp):
        t = inp.tensors
        hidden = t["hidden"].reshape(-1, t["hidden"].shape[-1])
        if "g_buffer" not in t:  # made once per set of inputs, outside the timed calls that follow
            t["g_buffer"] = torch.randn(hidden.shape[0], t["weight"].shape[0], dtype=hidden.dtype, device=hidden.device)
        out = _ThreeGemms.apply(hidden, t["weight"], t["g_buffer"])
        return [out.expand(u.shape) for u in inp.upstream]  # one output per upstream gradient of the case

    return Contender("3 GEMMs", lambda dtype: forward)


class _ThreeGemmsChunked(torch.autograd.Function):
    """The same three GEMMs a chunk of ``chunk`` tokens at a time into one reused ``[chunk, V]`` buffer,
    the way LinearLogits runs them (its default chunk): the floor of a chunked linear loss."""

    @staticmethod
    def forward(ctx, hidden, weight, g_buffer, chunk):
        ctx.save_for_backward(hidden, weight, g_buffer)
        ctx.chunk = chunk
        buf = hidden.new_empty(min(chunk, hidden.shape[0]), weight.shape[0])
        for r0 in range(0, hidden.shape[0], chunk):
            h = hidden[r0:r0 + chunk]
            torch.mm(h, weight.t(), out=buf[: h.shape[0]])
        return buf[0, 0].float()

    @staticmethod
    def backward(ctx, _grad):
        hidden, weight, g = ctx.saved_tensors
        grad_h = torch.empty_like(hidden)
        grad_w = torch.zeros_like(weight)
        for r0 in range(0, hidden.shape[0], ctx.chunk):
            gc = g[: min(ctx.chunk, hidden.shape[0] - r0)]
            torch.mm(gc, weight, out=grad_h[r0:r0 + gc.shape[0]])
            grad_w.addmm_(gc.t(), hidden[r0:r0 + gc.shape[0]])
        return grad_h, grad_w, None, None


def _gemms_chunked_contender() -> Contender:
    def forward(inp):
        t = inp.tensors
        hidden = t["hidden"].reshape(-1, t["hidden"].shape[-1])
        chunk = LinearLogits(t["hidden"], t["weight"]).resolved_chunk_tokens()
        if "g_chunk" not in t:
            t["g_chunk"] = torch.randn(chunk, t["weight"].shape[0], dtype=hidden.dtype, device=hidden.device)
        out = _ThreeGemmsChunked.apply(hidden, t["weight"], t["g_chunk"], chunk)
        return [out.expand(u.shape) for u in inp.upstream]

    return Contender("3 GEMMs chunked", lambda dtype: forward)


def _setup(args, device):
    args.hidden_dim = getattr(args, "hidden_dim", None) or _HIDDEN[device.type]
    if args.tokens % SEQUENCES:
        raise ValueError(f"--tokens must be a multiple of {SEQUENCES} (the sequences)")
    notes = [f"{SEQUENCES} sequences of {args.tokens // SEQUENCES} tokens, 10% masked (prompt / padding); "
             "hidden and weight require grad; '3 GEMMs' = h @ W.T, G @ W, G.T @ h alone at full size (the time floor "
             "of a materialising loss), '3 GEMMs chunked' = the same a LinearLogits chunk at a time (the floor of a "
             "chunked one); peak memory includes the inputs hidden and weight"]
    return notes, rlfuse_backends(args, device, notes)


@register_case("linear_policy_loss", **_DEFAULTS)
def _linear_policy_loss_case(args: argparse.Namespace, device: torch.device) -> Case:
    notes, backends = _setup(args, device)
    config = LossConfig.dapo()

    def make_inputs(dtype):
        t = _inputs(args, device, dtype, args.hidden_dim)
        return Inputs(t, [t["hidden"], t["weight"]], [torch.ones((), device=device)])

    def loss(logits, t, backend):
        return rlfuse.policy_loss(logits, t["tokens"], t["advantages"], old_logprobs=t["old"], mask=t["mask"],
                                  config=config, backend=backend).loss

    def from_hidden(t, backend):
        return loss(LinearLogits(t["hidden"], t["weight"]), t, backend)

    def materialised(t, backend):
        return loss(torch.nn.functional.linear(t["hidden"], t["weight"]), t, backend)

    def eager(t):
        # What a trainer writes: logits, fp32 upcast, log-softmax, gather, clipped ratio, token mean.
        logits = torch.nn.functional.linear(t["hidden"], t["weight"]).float()
        logp, _ = token_logprobs_reference(logits, t["tokens"])
        ratio = torch.exp(logp - t["old"])
        clipped = torch.clamp(ratio, 1 - config.clip_low, 1 + config.clip_high)
        adv = t["advantages"][:, None]
        per_token = torch.maximum(-adv * ratio, -adv * clipped)
        mask = t["mask"].float()
        return (per_token * mask).sum() / mask.sum().clamp(min=1)

    contenders = [_gemms_contender(), _gemms_chunked_contender()]
    contenders += [rlfuse_contender(b, from_hidden, "LinearLogits") for b in backends]
    contenders += [rlfuse_contender(b, materialised, "materialised") for b in backends]
    contenders.append(Contender("torch eager", lambda dtype: (lambda inp: [eager(inp.tensors)])))
    contenders += _liger(args, device, config, lambda t: from_hidden(t, backends[0] if backends else "torch"), notes)
    return _case("linear_policy_loss", "policy_loss (dapo) from hidden states", args, device, contenders,
                 make_inputs, notes)


def _liger(args, device, config, reference, notes) -> list[Contender]:
    """Liger-Kernel's chunked fused-linear GRPO loss (pure PyTorch + torch.compile: runs on CPU too), as
    users run it (compiled), checked against rlfuse's loss before it is timed."""
    if getattr(args, "no_liger", False):
        return []
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
    except Exception as exc:
        notes.append(f"Liger-Kernel not benchmarked: {short_error(exc)}")
        return []
    module = LigerFusedLinearGRPOLoss(beta=0.0, compiled=not args.no_compile, use_ref_model=False, loss_type="dapo",
                                      epsilon_low=config.clip_low, epsilon_high=config.clip_high)
    notes.append(f"liger: LigerFusedLinearGRPOLoss(loss_type='dapo', beta=0, compiled={not args.no_compile}), "
                 "checked against rlfuse's loss before timing")

    def loss(t):
        out = module(t["hidden"], t["weight"], t["tokens"], t["mask"].to(torch.int64), t["advantages"],
                     old_per_token_logps=t["old"])
        return out[0] if isinstance(out, tuple) else out

    def check(inp, dtype):
        with torch.no_grad():
            value, expected = float(loss(inp.tensors)), float(reference(inp.tensors))
        return Agreement("rlfuse LinearLogits", value, expected, _LIGER_RTOL * max(1.0, abs(expected)))

    return [Contender("liger fused-linear dapo", lambda dtype: (lambda inp: [loss(inp.tensors)]),
                      slow_first_call=not args.no_compile, first_call_hint="torch.compile", check=check)]


@register_case("linear_token_logprobs", **_DEFAULTS)
def _linear_token_logprobs_case(args: argparse.Namespace, device: torch.device) -> Case:
    notes, backends = _setup(args, device)

    def make_inputs(dtype):
        t = _inputs(args, device, dtype, args.hidden_dim)
        gen = torch.Generator(device=device).manual_seed(args.seed + 1)
        upstream = [torch.randn(t["tokens"].shape, generator=gen, device=device) for _ in range(2)]
        return Inputs(t, [t["hidden"], t["weight"]], upstream)

    def from_hidden(t, backend):
        return rlfuse.token_logprobs(LinearLogits(t["hidden"], t["weight"]), t["tokens"], return_entropy=True,
                                     backend=backend)

    def materialised(t, backend):
        logits = torch.nn.functional.linear(t["hidden"], t["weight"])
        return rlfuse.token_logprobs(logits, t["tokens"], return_entropy=True, backend=backend)

    def eager(t):
        logits = torch.nn.functional.linear(t["hidden"], t["weight"]).float()
        return token_logprobs_reference(logits, t["tokens"])

    contenders = [_gemms_contender(), _gemms_chunked_contender()]
    contenders += [rlfuse_contender(b, from_hidden, "LinearLogits") for b in backends]
    contenders += [rlfuse_contender(b, materialised, "materialised") for b in backends]
    contenders.append(Contender("torch eager", lambda dtype: (lambda inp: list(eager(inp.tensors)))))
    return _case("linear_token_logprobs", "token_logprobs + entropy from hidden states", args, device, contenders,
                 make_inputs, notes)
