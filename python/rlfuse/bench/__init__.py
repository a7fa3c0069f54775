"""Benchmarks of rlfuse ops against plain PyTorch: ``rlfuse bench`` / ``python -m rlfuse.bench``. What is
measured, the options and the latest results: bench/README.md.

For one op (``--op``, default ``token_logprobs``) and each dtype, every contender (the rlfuse kernel
backends available on the device, the plain-PyTorch reference "torch eager", the baseline of the
speed-ups, and ``torch.compile`` of it; for ``sample`` FlashInfer and for ``policy_loss`` Liger-Kernel
where they can run) is timed in three phases, each the median of ``--repeats`` runs after ``--warmup``
untimed fwd+bwd calls: ``fwd`` (recording autograd as in training), ``bwd`` (``torch.autograd.backward``
only, on a fresh untimed forward) and ``fwd+bwd``. Results go to stdout as a table, and to ``--out`` as
a CSV, a PNG bar plot and a JSON describing the environment.

The package: :mod:`.harness` (cases, contenders, timing, memory, results) and one module per op
(``token_logprobs``, ``policy_loss``, ``kl``, ``troll``, ``sample``), each registering through
:func:`register_case` a builder that returns a :class:`Case`; a new op is a new module imported below.

The exit status is 0 when every rlfuse contender ran, 1 when one of them raised (the failure is also
reported in the table) or when another library's kernel checked against rlfuse computed a different
loss (``policy_loss``'s Liger contender: reported invalid, not timed), 2 for unusable arguments. A
failing baseline (e.g. ``torch.compile`` without a working C++ compiler, or Liger raising) is reported
but does not change the exit status.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

import torch

from . import distill, kl, linear, policy_loss, sample, token_logprobs, troll  # noqa: F401  (each registers its case)
from .harness import (CASE_BUILDERS, CASE_DEFAULTS, DTYPE_NAMES, PHASES, Agreement, Case, Contender, Inputs,
                      MemoryProbe, Progress, Result, environment, format_results, log, measure_copy_bandwidth,
                      register_case, report, run_case, split_list, write_csv, write_plot)

__all__ = ["CASE_BUILDERS", "PHASES", "Agreement", "Case", "Contender", "Inputs", "MemoryProbe", "Progress",
           "Result", "add_arguments", "environment", "format_results", "main", "measure_copy_bandwidth",
           "register_case", "run", "run_case", "write_csv", "write_plot"]

_DTYPE_ALIASES = {
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
}

# Default problem sizes and repetition counts per device type (an op's own, register_case(op, ...), win).
_DEFAULTS = {
    "cpu": dict(tokens=2048, vocab=32768, dtypes=("fp32", "bf16"), repeats=5, warmup=1),
    "cuda": dict(tokens=16384, vocab=151936, dtypes=("bf16",), repeats=20, warmup=3),
}
_QUICK = dict(tokens=256, vocab=4096, repeats=1, warmup=1)


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
    parser.add_argument("--hidden-dim", "-D", type=int, default=None,
                        help="hidden size of the linear_* ops (default: cpu 256, cuda 4096)")
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
                        help="torch.set_num_threads before running (CPU); with --vocab-parallel, per process "
                             "(default there: cpu_count // ranks)")
    parser.add_argument("--vocab-parallel", type=int, default=None, metavar="W",
                        help="token_logprobs with the logits split over the vocabulary across W spawned ranks "
                             "(rlfuse.ShardedLogits; gloo on CPU, NCCL on W GPUs): time per rank and bytes "
                             "communicated, next to the unsharded op (bench/vocab_parallel.py)")
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
    op_defaults = CASE_DEFAULTS[args.op]  # its own defaults, for every device or per device type
    defaults.update({k: v for k, v in op_defaults.items() if k not in _DEFAULTS})
    defaults.update(op_defaults.get(device.type, {}))
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
    names = split_list(args.dtype) or list(defaults["dtypes"])
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
    if args.vocab_parallel is not None:
        from . import vocab_parallel

        return vocab_parallel.run(args, device)

    case = CASE_BUILDERS[args.op](args, device)
    env = environment(device, args)
    device_label = (env["device_name"] if device.type == "cuda"
                    else f"cpu: {env['cpu_model']}, {env['torch_threads']} threads")
    log(f"rlfuse bench: {case.title} on {device_label}; "
        f"dtypes {', '.join(DTYPE_NAMES[d] for d in args.dtypes)}; "
        f"contenders: {', '.join(c.name for c in case.contenders)}")
    for note in case.notes:
        log(f"note: {note}")

    log("measuring the copy bandwidth ...", end="")
    copy_bw = measure_copy_bandwidth(device)
    env["copy_bandwidth_GBps"] = copy_bw / 1e9
    log(f" {copy_bw / 1e9:.1f} GB/s")

    results = run_case(case, args.dtypes, device, args)
    report(case, results, copy_bw, env, device, device_label, args)

    failed = [r for r in results if r.error]
    if failed:
        log(f"{len(failed)} measurement(s) failed: "
            + "; ".join(f"{r.contender} {r.dtype}" for r in failed))
    # A contender that disagrees with rlfuse on the same inputs is a correctness signal, not a slow baseline.
    return 1 if any(r.is_rlfuse or r.invalid for r in failed) else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m rlfuse.bench",
        description="Benchmark rlfuse ops against torch eager and torch.compile.")
    add_arguments(parser)
    return run(parser.parse_args(argv))
