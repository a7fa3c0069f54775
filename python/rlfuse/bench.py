"""Benchmarks of rlfuse ops against plain PyTorch: ``rlfuse bench`` / ``python -m rlfuse.bench``.

For one op (``--op``, default ``token_logprobs``) and each dtype, every contender is timed in three
phases, each the median of ``--repeats`` runs after ``--warmup`` untimed fwd+bwd calls:

- ``fwd``: the forward pass, recording autograd as in training;
- ``bwd``: ``torch.autograd.backward(outputs, upstream_grads)`` only, on a fresh untimed forward;
- ``fwd+bwd``: both together.

Contenders are the rlfuse kernel backends available on the device (``cpu``, ``triton``, ``cuda``),
the plain-PyTorch reference ("torch eager", the baseline of the speed-ups) and ``torch.compile`` of
that same reference; ``sample`` adds FlashInfer and ``policy_loss`` Liger-Kernel's Triton GRPO loss
where importable on a GPU (Liger on CPU with ``--liger``, under the Triton interpreter). For the
fwd+bwd phase the peak memory is reported as bytes over a baseline taken before the inputs were
created, and in units of the logits size: a fused backward that writes one gradient buffer peaks at
"2.00x logits" (the logits themselves plus their gradient). On CUDA this is ``max_memory_allocated``;
on CPU it is the peak resident set size (VmHWM, reset through ``/proc/self/clear_refs``). For the
rlfuse kernels the achieved bandwidth is reported as a percentage of the device's measured copy
bandwidth, counting the minimum traffic of a fused kernel (``token_logprobs``: the forward reads the
logits once, the backward reads them and writes the gradient).

Results go to stdout as a table, and to ``--out`` as a CSV, a PNG bar plot and a JSON describing
the environment. New ops plug in through :func:`register_case`: a builder that returns a
:class:`Case` (how to make inputs, the contenders, the bytes moved).

The exit status is 0 when every rlfuse contender ran, 1 when one of them raised (the failure is also
reported in the table) or when another library's kernel checked against rlfuse computed a different
loss (``policy_loss``'s Liger contender: reported invalid, not timed), 2 for unusable arguments. A
failing baseline (e.g. ``torch.compile`` without a working C++ compiler, or Liger raising) is reported
but does not change the exit status.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import gc
import json
import os
import platform
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

PHASES = ("fwd", "bwd", "fwd+bwd")

_DTYPE_ALIASES = {
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
}
_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()

# Default problem sizes and repetition counts per device type.
_DEFAULTS = {
    "cpu": dict(tokens=2048, vocab=32768, dtypes=("fp32", "bf16"), repeats=5, warmup=1),
    "cuda": dict(tokens=16384, vocab=151936, dtypes=("bf16",), repeats=20, warmup=3),
}
_QUICK = dict(tokens=256, vocab=4096, repeats=1, warmup=1)
# Ops whose default shape is the same on every device (sampling: a decode step's batch).
_OP_DEFAULTS = {"sample": dict(tokens=256, vocab=151936, dtypes=("fp32", "bf16"))}

# Size of the buffers used to measure the copy bandwidth.
_COPY_BYTES = {"cpu": 256 << 20, "cuda": 2 << 30}

LOGIT_STD = 2.0


# --------------------------------------------------------------------------------------------------
# What is benchmarked: cases and contenders
# --------------------------------------------------------------------------------------------------


@dataclass
class Inputs:
    """One set of inputs for a case.

    ``leaves`` are the tensors that receive gradients (their ``.grad`` is cleared before every
    call); ``upstream`` are the gradients fed to ``torch.autograd.backward`` for the contender's
    outputs, in the same order as the outputs.
    """

    tensors: dict[str, torch.Tensor]
    leaves: list[torch.Tensor]
    upstream: list[torch.Tensor]


# A contender's forward: takes the inputs, returns the differentiable outputs.
Forward = Callable[[Inputs], Sequence[torch.Tensor]]


@dataclass
class Agreement:
    """A contender's loss against rlfuse's on the same inputs, checked before the contender is timed."""

    against: str  # the rlfuse computation compared with, e.g. "rlfuse cpu dapo"
    value: float  # the contender's loss
    reference: float  # rlfuse's loss
    tolerance: float

    @property
    def max_abs_diff(self) -> float:
        return abs(self.value - self.reference)

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance  # False for NaN


@dataclass
class Contender:
    name: str
    make: Callable[[torch.dtype], Forward]  # called once per dtype (e.g. to compile)
    is_rlfuse: bool = False  # bandwidth figures are reported for rlfuse kernels only
    slow_first_call: bool = False  # the first call compiles: announce it and report its time
    first_call_hint: str = ""
    # A contender that must compute what rlfuse computes (another library's kernel): checked once per
    # dtype, on the warm-up inputs and before any timing; one that disagrees is reported invalid, not timed.
    check: Callable[[Inputs, torch.dtype], Agreement] | None = None


@dataclass
class Case:
    op: str
    title: str  # e.g. "token_logprobs + entropy, N=2048 V=32768"
    shape: dict[str, int]
    make_inputs: Callable[[torch.dtype], Inputs]
    contenders: list[Contender]
    unit_name: str  # the vocabulary-sized input that memory is reported against, e.g. "logits"
    unit_bytes: Callable[[torch.dtype], int]
    bytes_moved: Callable[[torch.dtype], dict[str, int]]  # minimum traffic per phase
    baseline: str = "torch eager"
    notes: list[str] = field(default_factory=list)


CaseBuilder = Callable[[argparse.Namespace, torch.device], Case]
CASE_BUILDERS: dict[str, CaseBuilder] = {}


def register_case(op: str) -> Callable[[CaseBuilder], CaseBuilder]:
    """Register ``builder(args, device) -> Case`` as the benchmark of ``op``."""

    def decorator(builder: CaseBuilder) -> CaseBuilder:
        CASE_BUILDERS[op] = builder
        return builder

    return decorator


def _rlfuse_backends(args: argparse.Namespace, device: torch.device, notes: list[str]) -> list[str]:
    """The rlfuse kernel backends to benchmark: the available ones minus "torch", optionally
    restricted by ``--backends``."""
    try:
        from rlfuse.backends import available_backends

        names = [b for b in available_backends(device) if b != "torch"]
    except Exception as exc:  # the compiled part may be missing: still benchmark the baselines
        notes.append(f"rlfuse backends unavailable: {_short_error(exc)}")
        names = []
    if args.backends:
        wanted = _split_list(args.backends)
        for name in wanted:
            if name not in names:
                notes.append(f"backend {name!r} requested but not available on {device.type}")
        names = [b for b in names if b in wanted]
    return names


def _torch_contenders(args: argparse.Namespace, device: torch.device, fn: Callable, names: Sequence[str],
                      wrap: Callable = lambda out: out) -> list[Contender]:
    """"torch eager" (``fn`` on the named input tensors) and, unless --no-compile, "torch.compile" of it."""

    def contender_for(function: Callable) -> Callable[[torch.dtype], Forward]:
        return lambda dtype: (lambda inp: wrap(function(*(inp.tensors[k] for k in names))))

    contenders = [Contender("torch eager", contender_for(fn))]
    if not args.no_compile:
        hint = "up to a minute on CPU" if device.type == "cpu" else "can take a minute"
        # Compiled lazily, once per dtype, when the contender is first made.
        contenders.append(Contender(
            "torch.compile", lambda dtype: contender_for(torch.compile(fn, dynamic=False))(dtype),
            slow_first_call=True, first_call_hint=hint))
    return contenders


def _rlfuse_contender(backend: str, call: Callable[[dict, str], list], label: str = "") -> Contender:
    """rlfuse on ``backend``: ``call(tensors, backend)`` returns the outputs to backpropagate from."""
    name = f"rlfuse {backend} {label}".rstrip()
    return Contender(name, lambda dtype: (lambda inp: call(inp.tensors, backend)), is_rlfuse=True,
                     slow_first_call=backend == "triton", first_call_hint="Triton JIT")


def _logits_case(op: str, title: str, args: argparse.Namespace, make_inputs: Callable[[torch.dtype], Inputs],
                 contenders: list[Contender], traffic: dict[str, int], notes: list[str],
                 baseline: str = "torch eager") -> Case:
    """A case over [N, V] logits: memory is reported in units of the logits, and ``traffic`` gives the
    minimum bytes moved per phase as multiples of the logits' size."""
    n, v = args.tokens, args.vocab

    def unit_bytes(dtype: torch.dtype) -> int:
        return n * v * dtype.itemsize

    return Case(op=op, title=f"{title}, N={n} V={v}", shape={"tokens": n, "vocab": v}, make_inputs=make_inputs,
                contenders=contenders, unit_name="logits", unit_bytes=unit_bytes,
                bytes_moved=lambda dtype: {phase: k * unit_bytes(dtype) for phase, k in traffic.items()},
                baseline=baseline, notes=notes)


@register_case("token_logprobs")
def _token_logprobs_case(args: argparse.Namespace, device: torch.device) -> Case:
    import rlfuse
    from rlfuse.reference import token_logprobs_reference

    n, v = args.tokens, args.vocab
    notes: list[str] = []
    backends = _rlfuse_backends(args, device, notes)

    def make_inputs(dtype: torch.dtype) -> Inputs:
        gen = torch.Generator(device=device).manual_seed(args.seed)
        logits = torch.randn(n, v, generator=gen, device=device, dtype=dtype)
        logits.mul_(LOGIT_STD).requires_grad_()
        tokens = torch.randint(0, v, (n,), generator=gen, device=device)
        g_logp = torch.randn(n, generator=gen, device=device)
        g_entropy = torch.randn(n, generator=gen, device=device)
        return Inputs({"logits": logits, "tokens": tokens}, [logits], [g_logp, g_entropy])

    def call(t: dict, backend: str):
        return rlfuse.token_logprobs(t["logits"], t["tokens"], return_entropy=True, backend=backend)

    contenders = [_rlfuse_contender(b, call) for b in backends]
    contenders += _torch_contenders(args, device, token_logprobs_reference, ("logits", "tokens"))
    # fwd reads the logits once; bwd reads them again and writes a gradient of the same dtype.
    return _logits_case("token_logprobs", "token_logprobs + entropy", args, make_inputs, contenders,
                        {"fwd": 1, "bwd": 2, "fwd+bwd": 3}, notes)


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
        notes.append(f"Liger-Kernel not benchmarked: {_short_error(exc)}")
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


@register_case("policy_loss")
def _policy_loss_case(args: argparse.Namespace, device: torch.device) -> Case:
    """The fused dapo loss (and gspo, through the general path) vs the same loss in torch eager, and
    Liger-Kernel's Triton GRPO loss where available (see :func:`_liger_grpo_contender`)."""
    import rlfuse
    from rlfuse import LossConfig
    from rlfuse.reference import token_logprobs_reference

    n, v = args.tokens, args.vocab
    seq_len = 128
    notes: list[str] = [f"rlfuse dapo takes the fused path; rlfuse gspo the general path (one sequence per {seq_len} "
                        "tokens, one advantage per sequence, its last position masked: no next token)"]
    backends = _rlfuse_backends(args, device, notes)
    dapo, gspo = LossConfig.dapo(), LossConfig.gspo()
    with_liger = False  # set below, once the contenders are known

    def make_inputs(dtype: torch.dtype) -> Inputs:
        gen = torch.Generator(device=device).manual_seed(args.seed)
        logits = torch.randn(n, v, generator=gen, device=device, dtype=dtype)
        logits.mul_(LOGIT_STD).requires_grad_()
        tokens = torch.randint(0, v, (n,), generator=gen, device=device)
        with torch.no_grad():
            old = token_logprobs_reference(logits, tokens)[0] + 0.1 * torch.randn(n, generator=gen, device=device)
        cu_seqlens = torch.arange(0, n + 1, seq_len, device=device)
        if cu_seqlens[-1] != n:
            cu_seqlens = torch.cat([cu_seqlens, torch.tensor([n], device=device)])
        lengths = cu_seqlens.diff()
        advantages = torch.randn(len(lengths), generator=gen, device=device).repeat_interleave(lengths)
        mask = torch.rand(n, generator=gen, device=device) > 0.1
        mask[cu_seqlens[1:] - 1] = False
        tensors = {"logits": logits, "tokens": tokens, "old": old, "advantages": advantages, "mask": mask,
                   "cu_seqlens": cu_seqlens}
        if with_liger:
            tensors.update(_liger_layout(tensors, seq_len))
        return Inputs(tensors, [logits], [torch.ones((), device=device)])

    def loss_with(config):
        def call(t: dict, backend: str):
            return [rlfuse.policy_loss(t["logits"], t["tokens"], t["advantages"], old_logprobs=t["old"],
                                       mask=t["mask"], cu_seqlens=t["cu_seqlens"], config=config,
                                       backend=backend).loss]
        return call

    def eager_dapo(logits, tokens, advantages, old, mask):
        # What a trainer writes by hand: log-softmax, gather, clipped ratio, token mean.
        logp, _ = token_logprobs_reference(logits, tokens)
        ratio = torch.exp(torch.clamp(logp - old, -20.0, 20.0))
        clipped = torch.clamp(ratio, 1.0 - dapo.clip_low, 1.0 + dapo.clip_high)
        losses = torch.maximum(-advantages * ratio, -advantages * clipped)
        return (losses * mask).sum() / mask.sum().clamp(min=1)

    contenders = [_rlfuse_contender(b, loss_with(dapo), "dapo") for b in backends]
    contenders += [_rlfuse_contender(b, loss_with(gspo), "gspo") for b in backends]
    contenders += _torch_contenders(args, device, eager_dapo, ("logits", "tokens", "advantages", "old", "mask"),
                                    wrap=lambda loss: [loss])
    # Liger is checked against the first rlfuse dapo contender (rlfuse's torch reference without one).
    check_backend = backends[0] if backends else "torch"
    liger = _liger_grpo_contender(args, device, seq_len, dapo,
                                  lambda t: loss_with(dapo)(t, check_backend)[0], f"rlfuse {check_backend} dapo", notes)
    with_liger = bool(liger)
    contenders += liger
    # The floor of a fused loss: read the logits once, write the gradient once (DESIGN.md's 4 B/elem
    # for bf16). The forward already does both; the backward moves nothing when grad_output is 1.
    return _logits_case("policy_loss", "policy_loss (dapo fused, gspo general)", args, make_inputs, contenders,
                        {"fwd": 2, "fwd+bwd": 2}, notes)


@register_case("kl")
def _kl_case(args: argparse.Namespace, device: torch.device) -> Case:
    """Full-vocabulary forward KL with gradients for both inputs vs two log-softmaxes in torch."""
    import rlfuse
    from rlfuse.reference import kl_divergence_reference

    n, v = args.tokens, args.vocab
    notes: list[str] = []
    backends = _rlfuse_backends(args, device, notes)

    def make_inputs(dtype: torch.dtype) -> Inputs:
        gen = torch.Generator(device=device).manual_seed(args.seed)
        logits = torch.randn(n, v, generator=gen, device=device, dtype=dtype).mul_(LOGIT_STD).requires_grad_()
        other = torch.randn(n, v, generator=gen, device=device, dtype=dtype).mul_(LOGIT_STD).requires_grad_()
        upstream = torch.randn(n, generator=gen, device=device)
        return Inputs({"logits": logits, "other": other}, [logits, other], [upstream])

    def call(t: dict, backend: str):
        return [rlfuse.kl_divergence(t["logits"], t["other"], backend=backend)]

    contenders = [_rlfuse_contender(b, call) for b in backends]
    contenders += _torch_contenders(args, device, kl_divergence_reference, ("logits", "other"),
                                    wrap=lambda kl: [kl])
    # Forward reads both inputs; backward reads both again and writes both gradients.
    return _logits_case("kl", "kl_divergence (forward, both gradients)", args, make_inputs, contenders,
                        {"fwd": 2, "bwd": 4, "fwd+bwd": 6}, notes)


@register_case("troll")
def _troll_case(args: argparse.Namespace, device: torch.device) -> Case:
    """TROLL (K = 64) forward+backward against the fused dapo loss on the same inputs."""
    import rlfuse
    from rlfuse import LossConfig

    n, v = args.tokens, args.vocab
    notes: list[str] = ["old_topk (sparse_logprobs of the old logits) is precomputed, as a trainer stores it"]
    backends = _rlfuse_backends(args, device, notes)
    troll, dapo = LossConfig.troll(), LossConfig.dapo()

    def make_inputs(dtype: torch.dtype) -> Inputs:
        gen = torch.Generator(device=device).manual_seed(args.seed)
        logits = torch.randn(n, v, generator=gen, device=device, dtype=dtype).mul_(LOGIT_STD)
        tokens = torch.randint(0, v, (n,), generator=gen, device=device)
        old_logits = logits + 0.3 * torch.randn(n, v, generator=gen, device=device, dtype=dtype)
        old_topk = rlfuse.sparse_logprobs(old_logits, tokens, k=troll.troll_k)
        old = rlfuse.token_logprobs(old_logits, tokens)
        del old_logits
        logits.requires_grad_()
        tensors = {"logits": logits, "tokens": tokens, "old": old, "advantages": torch.randn(n, generator=gen,
                                                                                           device=device)}
        return Inputs(dict(tensors, old_topk=old_topk), [logits], [torch.ones((), device=device)])

    def loss_with(config):
        def call(t: dict, backend: str):
            old_topk = t["old_topk"] if config.loss == "troll" else None
            return [rlfuse.policy_loss(t["logits"], t["tokens"], t["advantages"], old_logprobs=t["old"],
                                       old_topk=old_topk, config=config, backend=backend).loss]
        return call

    contenders = []
    for backend in backends:
        contenders += [_rlfuse_contender(backend, loss_with(troll), "troll"),
                       _rlfuse_contender(backend, loss_with(dapo), "dapo")]
    baseline = f"rlfuse {backends[0]} dapo" if backends else "torch eager"
    if not backends:
        notes.append("no rlfuse kernel backend available: nothing to compare")
    return _logits_case("troll", "policy_loss troll (K=64) vs fused dapo", args, make_inputs, contenders,
                        {"fwd+bwd": 2}, notes, baseline=baseline)


def _flashinfer_contender(device: torch.device, temperature: float, top_k: int, top_p: float,
                          notes: list[str]) -> list[Contender]:
    """FlashInfer's sorting-free top-k/top-p sampler, on a GPU where it is importable (tokens only)."""
    if device.type != "cuda":
        return []
    try:
        from flashinfer.sampling import top_k_top_p_sampling_from_logits
    except Exception as exc:  # not installed, or built for another torch / CUDA
        notes.append(f"FlashInfer not benchmarked: {_short_error(exc)}")
        return []
    notes.append("flashinfer returns tokens only (no log-probs or entropy)")

    def forward(inp: Inputs):
        return [top_k_top_p_sampling_from_logits(inp.tensors["logits"] / temperature, top_k, top_p)]

    return [Contender("flashinfer", lambda dtype: forward)]


@register_case("sample")
def _sample_case(args: argparse.Namespace, device: torch.device) -> Case:
    """top-k 50 + top-p 0.9 sampling with log-probs: rlfuse vs torch's sort-based sampler."""
    import rlfuse

    n, v = args.tokens, args.vocab
    top_k, top_p, temperature = 50, 0.9, 0.8
    notes: list[str] = [f"temperature {temperature}, top_k {top_k}, top_p {top_p}; forward only (no backward)"]
    backends = _rlfuse_backends(args, device, notes)

    def make_inputs(dtype: torch.dtype) -> Inputs:
        gen = torch.Generator(device=device).manual_seed(args.seed)
        logits = torch.randn(n, v, generator=gen, device=device, dtype=dtype).mul_(LOGIT_STD)
        return Inputs({"logits": logits}, [], [])

    def call(t: dict, backend: str):
        out = rlfuse.sample(t["logits"], temperature=temperature, top_k=top_k, top_p=top_p, seed=0,
                            backend=backend)
        return [out.tokens, out.logprobs]

    def torch_sort_sampler(logits):
        # The usual PyTorch sampler (HF / vLLM style): full sort, cumulative softmax, multinomial.
        x = logits.float() / temperature
        values, ids = torch.sort(x, dim=-1, descending=True)
        values[..., top_k:] = float("-inf")
        probs = torch.softmax(values, -1)
        outside = probs.cumsum(-1) - probs > top_p
        values = values.masked_fill(outside, float("-inf"))
        choice = torch.multinomial(torch.softmax(values, -1), 1)
        tokens = ids.gather(-1, choice).squeeze(-1)
        logprobs = torch.log_softmax(values, -1).gather(-1, choice).squeeze(-1)
        return [tokens, logprobs]

    contenders = [_rlfuse_contender(b, call) for b in backends]
    contenders += _torch_contenders(args, device, torch_sort_sampler, ("logits",))
    contenders += _flashinfer_contender(device, temperature, top_k, top_p, notes)
    return _logits_case("sample", f"sample (top-k {top_k}, top-p {top_p}) with log-probs", args, make_inputs,
                        contenders, {"fwd": 1, "fwd+bwd": 1}, notes)


# --------------------------------------------------------------------------------------------------
# Measuring: time, memory, bandwidth
# --------------------------------------------------------------------------------------------------


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _collect_garbage(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def _timed_ms(device: torch.device, body: Callable[[], object]) -> float:
    """Milliseconds spent by ``body`` on the device (CUDA events) or the host clock (CPU)."""
    if device.type == "cuda":
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        body()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    start_s = time.perf_counter()
    body()
    return (time.perf_counter() - start_s) * 1e3


def _backward(outputs, inp: Inputs) -> None:
    """Backward of a contender's outputs; forward-only ops (no upstream gradients) have none."""
    if inp.upstream:
        torch.autograd.backward(list(outputs), inp.upstream)


def _run_once(phase: str, forward: Forward, inp: Inputs, device: torch.device) -> float:
    """Run one phase once and return its time in ms; only the phase itself is timed."""
    for leaf in inp.leaves:
        leaf.grad = None
    if phase == "fwd":
        kept = []  # the outputs (and their graph) are freed after the timed region
        return _timed_ms(device, lambda: kept.append(forward(inp)))
    if phase == "bwd":
        outputs = forward(inp)
        _synchronize(device)
        return _timed_ms(device, lambda: _backward(outputs, inp))
    if phase == "fwd+bwd":
        return _timed_ms(device, lambda: _backward(forward(inp), inp))
    raise ValueError(f"unknown phase {phase!r}")


class MemoryProbe:
    """Current and peak memory of the device: CUDA allocator statistics, or on Linux CPUs the
    resident set size of this process (VmRSS, peak VmHWM reset through /proc/self/clear_refs).
    Every method returns None when the figure cannot be read."""

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "cuda allocated" if device.type == "cuda" else "process RSS"
        self.available = device.type == "cuda" or self._cpu_probe_works()

    @staticmethod
    def _status_kib(key: str) -> int | None:
        try:
            with open("/proc/self/status") as status:
                for line in status:
                    if line.startswith(key + ":"):
                        return int(line.split()[1])
        except (OSError, ValueError, IndexError):
            pass
        return None

    def _cpu_probe_works(self) -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            return False
        return self._status_kib("VmHWM") is not None and self._status_kib("VmRSS") is not None

    def current(self) -> int | None:
        if not self.available:
            return None
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        kib = self._status_kib("VmRSS")
        return None if kib is None else kib * 1024

    def reset_peak(self) -> None:
        if not self.available:
            return
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
        except OSError:
            self.available = False

    def peak(self) -> int | None:
        if not self.available:
            return None
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        kib = self._status_kib("VmHWM")
        return None if kib is None else kib * 1024


def measure_copy_bandwidth(device: torch.device, repeats: int = 10) -> float:
    """Bytes per second of ``dst.copy_(src)`` on a large buffer (counting the read and the write)."""
    nbytes = _COPY_BYTES[device.type]
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        nbytes = min(nbytes, free // 4)
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    for _ in range(2):
        dst.copy_(src)
    _synchronize(device)
    ms = statistics.median(_timed_ms(device, lambda: dst.copy_(src)) for _ in range(repeats))
    del src, dst
    _collect_garbage(device)
    return 2 * nbytes / (ms * 1e-3)


# --------------------------------------------------------------------------------------------------
# Running a case
# --------------------------------------------------------------------------------------------------


@dataclass
class Result:
    contender: str
    dtype: str
    is_rlfuse: bool
    ms: dict[str, float] = field(default_factory=dict)  # phase -> median ms
    samples: dict[str, list[float]] = field(default_factory=dict)  # phase -> every timed run, ms
    peak_extra_bytes: int | None = None
    unit_bytes: int = 0
    bytes_moved: dict[str, int] = field(default_factory=dict)
    first_call_s: float | None = None
    error: str | None = None
    speedup: float | None = None  # baseline fwd+bwd time / this fwd+bwd time
    agreement: Agreement | None = None  # the contender's check against rlfuse, if it has one

    @property
    def invalid(self) -> bool:
        """Checked against rlfuse and found to compute something else (so it was not timed)."""
        return self.agreement is not None and not self.agreement.ok

    @property
    def peak_units(self) -> float | None:
        if self.peak_extra_bytes is None or not self.unit_bytes:
            return None
        return self.peak_extra_bytes / self.unit_bytes

    def bandwidth(self, phase: str) -> float | None:
        """Achieved bytes per second of the phase, for rlfuse kernels."""
        if not self.is_rlfuse or phase not in self.ms or phase not in self.bytes_moved:
            return None
        return self.bytes_moved[phase] / (self.ms[phase] * 1e-3)


class Progress:
    def __init__(self, total: int):
        self.total = total
        self.done = 0

    def start(self, label: str) -> None:
        self.done += 1
        _log(f"[{self.done}/{self.total}] {label} ...", end="")

    def finish(self, text: str) -> None:
        _log(f" {text}")


def _log(message: str, end: str = "\n") -> None:
    print(message, end=end, file=sys.stderr, flush=True)


def _short_error(exc: BaseException, limit: int = 160) -> str:
    text = str(exc).strip().splitlines()
    message = f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
    return message if len(message) <= limit else message[: limit - 3] + "..."


class _Invalid(Exception):
    """A contender computes something other than rlfuse's op on the same inputs."""


def _measure(case: Case, contender: Contender, dtype: torch.dtype, device: torch.device,
             args: argparse.Namespace, probe: MemoryProbe, progress: Progress) -> Result:
    dname = _DTYPE_NAMES[dtype]
    result = Result(contender.name, dname, contender.is_rlfuse,
                    unit_bytes=case.unit_bytes(dtype), bytes_moved=case.bytes_moved(dtype))
    label = f"{contender.name} {dname}"
    _collect_garbage(device)

    # Warm-up (compilation happens here), then one fwd+bwd on fresh inputs for the peak memory.
    # Errors are handled after the `except` block, once the traceback (and the tensors its frames
    # hold) is gone, so that the memory can really be freed.
    forward = inp = None
    try:
        forward = contender.make(dtype)
        inp = case.make_inputs(dtype)
        if contender.check is not None:  # before any timing: a different computation is not timed
            agreement = result.agreement = contender.check(inp, dtype)
            _log(f"      {label}: loss {agreement.value:.8g} vs {agreement.against} {agreement.reference:.8g}: "
                 f"|diff| {agreement.max_abs_diff:.3g} (tolerance {agreement.tolerance:.3g})")
            if not agreement.ok:
                raise _Invalid(f"invalid, not timed: its loss differs from {agreement.against}'s by "
                                   f"{agreement.max_abs_diff:.3g} > {agreement.tolerance:.3g}")
        for i in range(max(1, args.warmup)):
            if i == 0 and contender.slow_first_call:
                hint = f"; {contender.first_call_hint}" if contender.first_call_hint else ""
                _log(f"      {label}: first call compiles{hint} ...", end="")
                start_s = time.perf_counter()
                _run_once("fwd+bwd", forward, inp, device)
                _synchronize(device)
                result.first_call_s = time.perf_counter() - start_s
                _log(f" {result.first_call_s:.1f} s")
            else:
                _run_once("fwd+bwd", forward, inp, device)
        inp = None
        _collect_garbage(device)

        baseline = probe.current()  # before the inputs exist
        inp = case.make_inputs(dtype)
        _synchronize(device)
        probe.reset_peak()
        _run_once("fwd+bwd", forward, inp, device)
        _synchronize(device)
        peak = probe.peak()
        if baseline is not None and peak is not None:
            result.peak_extra_bytes = max(0, peak - baseline)
    except _Invalid as exc:
        result.error = str(exc)
    except Exception as exc:
        result.error = _short_error(exc)
    if result.error:
        inp = forward = None
        _collect_garbage(device)
        _log(f"      {label}: error: {result.error}")
        why = "invalid: disagrees with rlfuse" if result.invalid else "failed in warm-up"
        for phase in PHASES:
            progress.start(f"{label} {phase}")
            progress.finish(f"skipped ({why})")
        return result

    for phase in PHASES:
        progress.start(f"{label} {phase}")
        error = None
        try:
            times = [_run_once(phase, forward, inp, device) for _ in range(args.repeats)]
        except Exception as exc:
            error = _short_error(exc)
        if error:
            _collect_garbage(device)
            result.error = result.error or f"{phase}: {error}"
            progress.finish(f"error: {error}")
            continue
        result.samples[phase] = times
        result.ms[phase] = statistics.median(times)
        text = f"{result.ms[phase]:.3f} ms"
        if phase == "fwd+bwd" and result.peak_units is not None:
            text += f", peak {_format_peak(result, case.unit_name)}"
        progress.finish(text)

    inp = forward = None
    _collect_garbage(device)
    return result


def run_case(case: Case, dtypes: Sequence[torch.dtype], device: torch.device,
             args: argparse.Namespace) -> list[Result]:
    probe = MemoryProbe(device)
    if not probe.available:
        _log("note: peak memory cannot be measured here (reported as n/a)")
    progress = Progress(len(case.contenders) * len(dtypes) * len(PHASES))
    results = []
    for dtype in dtypes:
        for contender in case.contenders:
            results.append(_measure(case, contender, dtype, device, args, probe, progress))
    for result in results:
        base = next((r for r in results
                     if r.contender == case.baseline and r.dtype == result.dtype), None)
        if base and "fwd+bwd" in base.ms and "fwd+bwd" in result.ms:
            result.speedup = base.ms["fwd+bwd"] / result.ms["fwd+bwd"]
    return results


# --------------------------------------------------------------------------------------------------
# Reporting: table, CSV, PNG, environment JSON
# --------------------------------------------------------------------------------------------------


def _format_bytes(nbytes: float) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(nbytes) >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{int(nbytes)} B"


def _format_peak(result: Result, unit_name: str = "") -> str:
    """E.g. "+512.00 MiB (2.00x logits)"."""
    if result.peak_extra_bytes is None:
        return "n/a"
    unit = f" {unit_name}" if unit_name else ""
    return f"+{_format_bytes(result.peak_extra_bytes)} ({result.peak_units:.2f}x{unit})"


def _format_table(rows: list[list[str]], headers: list[str], right: Sequence[int]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        parts = [c.rjust(w) if i in right else c.ljust(w)
                 for i, (c, w) in enumerate(zip(cells, widths))]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule] + [line(r) for r in rows])


def format_results(case: Case, results: list[Result], copy_bw: float | None) -> str:
    baseline = case.baseline.replace("torch ", "")
    headers = ["contender", "dtype", "fwd ms", "bwd ms", "fwd+bwd ms", f"vs {baseline}",
               f"peak extra ({case.unit_name})", "% copy BW fwd/bwd/f+b"]
    show_errors = any(r.error or r.agreement for r in results)
    if show_errors:
        headers.append("note")
    rows = []
    for r in results:
        if r.error and not r.ms:
            note = r.error if r.invalid else f"error: {r.error}"
            rows.append([r.contender, r.dtype] + [""] * (len(headers) - 3) + [note])
            continue
        cells = [r.contender, r.dtype]
        cells += [f"{r.ms[p]:.3f}" if p in r.ms else "error" for p in PHASES]
        cells.append(f"{r.speedup:.2f}x" if r.speedup is not None else "-")
        cells.append(_format_peak(r))
        if r.is_rlfuse and copy_bw:
            pcts = [f"{100 * r.bandwidth(p) / copy_bw:.0f}" if r.bandwidth(p) else "-" for p in PHASES]
            cells.append(" / ".join(pcts))
        else:
            cells.append("-")
        if show_errors:
            notes = [f"error: {r.error}"] if r.error else []
            if r.agreement:
                notes.append(f"loss = {r.agreement.against}'s, |diff| {r.agreement.max_abs_diff:.2g}")
            cells.append("; ".join(notes))
        rows.append(cells)
    return _format_table(rows, headers, right={2, 3, 4, 5, 6, 7})


def _csv_rows(case: Case, results: list[Result], env: dict) -> list[dict]:
    copy_bw = env.get("copy_bandwidth_GBps")
    rows = []
    for r in results:
        row = {
            "op": case.op, "device": env["device"], "device_name": env["device_name"],
            **case.shape, "dtype": r.dtype, "contender": r.contender,
            "repeats": env["repeats"],
        }
        for p in PHASES:
            row[f"{p}_ms"] = _round(r.ms.get(p))
            row[f"{p}_ms_min"] = _round(min(r.samples[p]) if p in r.samples else None)
            row[f"{p}_ms_max"] = _round(max(r.samples[p]) if p in r.samples else None)
        row["speedup_vs_eager_fwd+bwd"] = _round(r.speedup)
        row["peak_extra_bytes"] = r.peak_extra_bytes if r.peak_extra_bytes is not None else ""
        row[f"peak_extra_x_{case.unit_name}"] = _round(r.peak_units)
        row[f"{case.unit_name}_bytes"] = r.unit_bytes
        for p in PHASES:
            bw = r.bandwidth(p)
            row[f"{p}_GBps"] = _round(bw / 1e9 if bw else None)
            row[f"{p}_pct_copy_bw"] = _round(100 * bw / 1e9 / copy_bw if bw and copy_bw else None)
        row["copy_bandwidth_GBps"] = _round(copy_bw)
        row["first_call_s"] = _round(r.first_call_s)
        # A contender checked against rlfuse before timing (Liger): what with, and how close its loss was.
        row["checked_against"] = r.agreement.against if r.agreement else ""
        row["check_max_abs_diff"] = f"{r.agreement.max_abs_diff:.3g}" if r.agreement else ""
        row["check_tolerance"] = f"{r.agreement.tolerance:.3g}" if r.agreement else ""
        row["error"] = r.error or ""
        rows.append(row)
    return rows


def _round(x: float | None, digits: int = 4) -> object:
    return "" if x is None else round(x, digits)


def write_csv(path: str, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        writer.writeheader()
        writer.writerows(rows)


def write_plot(path: str, case: Case, results: list[Result], device_label: str) -> bool:
    """Grouped bar plot of the fwd+bwd time per contender and dtype. False if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _log("note: matplotlib is not installed; skipping the PNG plot")
        return False

    from matplotlib.patches import Patch
    from matplotlib.transforms import blended_transform_factory

    dtypes = list(dict.fromkeys(r.dtype for r in results))
    contenders = list(dict.fromkeys(r.contender for r in results))
    by_key = {(r.contender, r.dtype): r for r in results}
    width = 0.8 / max(1, len(contenders))
    fig, ax = plt.subplots(figsize=(max(6.0, 2.0 + 0.9 * len(dtypes) * len(contenders)), 4.5))
    bottom = blended_transform_factory(ax.transData, ax.transAxes)  # x in data, y in axes units
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    times, legend = [], []
    for i, name in enumerate(contenders):
        color = colors[i % len(colors)]
        xs, heights, labels = [], [], []
        for j, dname in enumerate(dtypes):
            r = by_key.get((name, dname))
            x = j + (i - (len(contenders) - 1) / 2) * width
            if r is None:
                continue
            if "fwd+bwd" not in r.ms:
                ax.text(x, 0.02, "failed", transform=bottom, rotation=90, ha="center",
                        va="bottom", fontsize=8, color=color)
                continue
            ms = r.ms["fwd+bwd"]
            xs.append(x)
            heights.append(ms)
            labels.append((f"{ms:.0f}" if ms >= 100 else f"{ms:.3g}")
                          + (f"\n{r.speedup:.1f}x" if r.speedup is not None else ""))
        times += heights
        bars = ax.bar(xs, heights, width, color=color)
        ax.bar_label(bars, labels=labels, fontsize=7, padding=2)
        legend.append(Patch(color=color, label=name))
    if times and max(times) / max(min(times), 1e-9) > 30:
        ax.set_yscale("log")
    ax.set_xticks(range(len(dtypes)), dtypes)
    ax.set_ylabel("fwd+bwd time (ms, lower is better)")
    ax.set_title(f"{case.title}\n{device_label}", fontsize=10)
    ax.margins(y=0.2)
    ax.legend(handles=legend, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


def _sanitize(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_") or "device"


def environment(device: torch.device, args: argparse.Namespace) -> dict:
    env = {
        "device": device.type,
        "device_name": _device_name(device),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "seed": args.seed,
    }
    for module in ("triton", "rlfuse"):
        try:
            env[module] = getattr(__import__(module), "__version__", "unknown")
        except Exception:
            env[module] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["gpu_capability"] = f"{props.major}.{props.minor}"
        env["gpu_memory_bytes"] = props.total_memory
        env["gpu_multiprocessors"] = props.multi_processor_count
    return env


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def _split_list(values: Sequence[str] | None) -> list[str]:
    out: list[str] = []
    for value in values or ():
        out += [v.strip() for v in value.split(",") if v.strip()]
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``rlfuse bench`` options to ``parser``."""
    parser.add_argument("--op", default="token_logprobs", choices=sorted(CASE_BUILDERS),
                        help="op to benchmark (default: token_logprobs)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="auto = cuda if available, else cpu")
    parser.add_argument("--tokens", "-N", type=int, default=None,
                        help="number of token positions (default: cpu 2048, cuda 16384)")
    parser.add_argument("--vocab", "-V", type=int, default=None,
                        help="vocabulary size (default: cpu 32768, cuda 151936)")
    parser.add_argument("--dtype", action="append", default=None, metavar="DTYPE",
                        help="logits dtype: fp32, bf16, fp16; repeatable or comma separated "
                             "(default: cpu fp32,bf16; cuda bf16)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed runs per phase, the median is reported (default: cpu 5, cuda 20)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed fwd+bwd calls first, at least 1 (default: cpu 1, cuda 3)")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke test: N={_QUICK['tokens']} V={_QUICK['vocab']}, 1 repeat "
                             "(explicit --tokens/--vocab/--repeats still win)")
    parser.add_argument("--backends", action="append", default=None, metavar="NAME",
                        help="only these rlfuse backends (cpu, triton, cuda); repeatable or comma "
                             "separated (default: all available)")
    parser.add_argument("--no-compile", action="store_true",
                        help="skip the torch.compile contender (its compilation is slow on CPU)")
    liger = parser.add_mutually_exclusive_group()
    liger.add_argument("--liger", action="store_true",
                       help="policy_loss: include Liger-Kernel's Triton GRPO loss on CPU too (it runs under "
                            "the Triton interpreter there: small shapes only); on a GPU it is included "
                            "whenever liger_kernel imports")
    liger.add_argument("--no-liger", action="store_true",
                       help="policy_loss: leave out Liger-Kernel's GRPO loss")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads before running (CPU)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    parser.add_argument("--out", default=os.path.join("bench", "results"),
                        help="directory for the CSV, PNG and environment JSON "
                             "(default: bench/results)")
    parser.add_argument("--no-save", action="store_true",
                        help="print the table only; write no files")


def _resolve(args: argparse.Namespace) -> torch.device:
    """Pick the device and fill in the device-dependent defaults (in place)."""
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    defaults = dict(_DEFAULTS[device.type])
    defaults.update(_OP_DEFAULTS.get(args.op, {}))
    if args.quick:
        defaults.update(_QUICK)
    for name in ("tokens", "vocab", "repeats", "warmup"):
        if getattr(args, name) is None:
            setattr(args, name, defaults[name])
    for name in ("tokens", "vocab", "repeats"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be at least 1")
    if args.warmup < 0:
        raise ValueError("--warmup must not be negative")
    names = _split_list(args.dtype) or list(defaults["dtypes"])
    unknown = [n for n in names if n.lower() not in _DTYPE_ALIASES]
    if unknown:
        raise ValueError(f"unknown dtype(s) {unknown}; use fp32, bf16 or fp16")
    args.dtypes = list(dict.fromkeys(_DTYPE_ALIASES[n.lower()] for n in names))
    return device


def run(args: argparse.Namespace) -> int:
    """Run the benchmark described by parsed ``args``; returns the exit status."""
    try:
        device = _resolve(args)
    except ValueError as exc:
        print(f"rlfuse bench: {exc}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)

    case = CASE_BUILDERS[args.op](args, device)
    env = environment(device, args)
    device_label = (env["device_name"] if device.type == "cuda"
                    else f"cpu: {env['cpu_model']}, {env['torch_threads']} threads")
    _log(f"rlfuse bench: {case.title} on {device_label}; "
         f"dtypes {', '.join(_DTYPE_NAMES[d] for d in args.dtypes)}; "
         f"contenders: {', '.join(c.name for c in case.contenders)}")
    for note in case.notes:
        _log(f"note: {note}")

    _log("measuring the copy bandwidth ...", end="")
    copy_bw = measure_copy_bandwidth(device)
    env["copy_bandwidth_GBps"] = copy_bw / 1e9
    _log(f" {copy_bw / 1e9:.1f} GB/s")

    results = run_case(case, args.dtypes, device, args)

    sizes = ", ".join(f"{_DTYPE_NAMES[d]} {_format_bytes(case.unit_bytes(d))}" for d in args.dtypes)
    print(f"{case.title}  |  {device_label}")
    print(f"median of {args.repeats} runs; copy bandwidth {copy_bw / 1e9:.1f} GB/s; "
          f"{case.unit_name}: {sizes}; peak = {MemoryProbe(device).kind} over the baseline "
          f"before the inputs existed")
    print()
    print(format_results(case, results, copy_bw))
    for note in case.notes:
        print(f"note: {note}")

    if not args.no_save:
        os.makedirs(args.out, exist_ok=True)
        stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H%M%S")
        stem = os.path.join(args.out, f"{case.op}_{_sanitize(env['device_name'])}_{stamp}")
        env.update(op=case.op, shape=case.shape, dtypes=[_DTYPE_NAMES[d] for d in args.dtypes],
                   contenders=[c.name for c in case.contenders], notes=case.notes,
                   command=sys.argv)
        write_csv(stem + ".csv", _csv_rows(case, results, env))
        written = [stem + ".csv"]
        if write_plot(stem + ".png", case, results, device_label):
            written.append(stem + ".png")
        with open(stem + "_env.json", "w") as f:
            json.dump(env, f, indent=2, default=str)
        written.append(stem + "_env.json")
        print()
        print("wrote " + ", ".join(written))

    failed = [r for r in results if r.error]
    if failed:
        _log(f"{len(failed)} measurement(s) failed: "
             + "; ".join(f"{r.contender} {r.dtype}" for r in failed))
    # A contender that disagrees with rlfuse on the same inputs is a correctness signal, not a slow baseline.
    return 1 if any(r.is_rlfuse or r.invalid for r in failed) else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m rlfuse.bench",
        description="Benchmark rlfuse ops against torch eager and torch.compile.")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
