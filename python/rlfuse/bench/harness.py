"""The shared machinery of ``rlfuse bench``: cases and contenders and their shared builders, timing
(CUDA events, or the host clock on CPU), peak memory (fwd+bwd, over a baseline taken before the inputs
exist: ``max_memory_allocated`` on CUDA, VmHWM reset through ``/proc/self/clear_refs`` on CPU, also in
units of the logits), the rlfuse kernels' bandwidth (their minimum traffic as a share of the measured
copy bandwidth), running a case, and the table, CSV, PNG and environment JSON."""

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
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}

# Size of the buffers used to measure the copy bandwidth.
_COPY_BYTES = {"cpu": 256 << 20, "cuda": 2 << 30}

LOGIT_STD = 2.0


# -- What is benchmarked: cases and contenders -----------------------------------------------------


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
# Defaults of an op that override the device's (e.g. sample: a decode step's batch on every device).
CASE_DEFAULTS: dict[str, dict] = {}


def register_case(op: str, **defaults) -> Callable[[CaseBuilder], CaseBuilder]:
    """Register ``builder(args, device) -> Case`` as the benchmark of ``op``; ``defaults`` (tokens, vocab,
    dtypes) replace the device's defaults for this op."""

    def decorator(builder: CaseBuilder) -> CaseBuilder:
        CASE_BUILDERS[op] = builder
        CASE_DEFAULTS[op] = defaults
        return builder

    return decorator


# -- The shared builders of the cases --------------------------------------------------------------


def split_list(values: Sequence[str] | None) -> list[str]:
    out: list[str] = []
    for value in values or ():
        out += [v.strip() for v in value.split(",") if v.strip()]
    return out


def rlfuse_backends(args: argparse.Namespace, device: torch.device, notes: list[str]) -> list[str]:
    """The rlfuse kernel backends to benchmark: the available ones minus "torch", optionally
    restricted by ``--backends``."""
    try:
        from rlfuse.backends import available_backends

        names = [b for b in available_backends(device) if b != "torch"]
    except Exception as exc:  # the compiled part may be missing: still benchmark the baselines
        notes.append(f"rlfuse backends unavailable: {short_error(exc)}")
        names = []
    if args.backends:
        wanted = split_list(args.backends)
        for name in wanted:
            if name not in names:
                notes.append(f"backend {name!r} requested but not available on {device.type}")
        names = [b for b in names if b in wanted]
    return names


def _outputs(out) -> Sequence[torch.Tensor]:
    """A function's outputs as the sequence to backpropagate from (one tensor becomes ``[tensor]``)."""
    return [out] if isinstance(out, torch.Tensor) else out


def torch_contenders(args: argparse.Namespace, device: torch.device, fn: Callable,
                     names: Sequence[str]) -> list[Contender]:
    """"torch eager" (``fn`` on the named input tensors) and, unless --no-compile, "torch.compile" of it."""

    def contender_for(function: Callable) -> Callable[[torch.dtype], Forward]:
        return lambda dtype: (lambda inp: _outputs(function(*(inp.tensors[k] for k in names))))

    contenders = [Contender("torch eager", contender_for(fn))]
    if not args.no_compile:
        hint = "up to a minute on CPU" if device.type == "cpu" else "can take a minute"
        # Compiled lazily, once per dtype, when the contender is first made.
        contenders.append(Contender(
            "torch.compile", lambda dtype: contender_for(torch.compile(fn, dynamic=False))(dtype),
            slow_first_call=True, first_call_hint=hint))
    return contenders


def rlfuse_contender(backend: str, call: Callable[[dict, str], object], label: str = "") -> Contender:
    """rlfuse on ``backend``: ``call(tensors, backend)`` returns the output(s) to backpropagate from."""
    name = f"rlfuse {backend} {label}".rstrip()
    return Contender(name, lambda dtype: (lambda inp: _outputs(call(inp.tensors, backend))), is_rlfuse=True,
                     slow_first_call=backend == "triton", first_call_hint="Triton JIT")


class Draws:
    """The random tensors of one set of a case's inputs, drawn in order from one generator seeded with
    ``--seed``: every call of ``make_inputs`` gets the same draws."""

    def __init__(self, args: argparse.Namespace, device: torch.device):
        self.n, self.v, self.device = args.tokens, args.vocab, device
        self.gen = torch.Generator(device=device).manual_seed(args.seed)

    def normal(self, *shape: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen, device=self.device, dtype=dtype)

    def logits(self, dtype: torch.dtype, requires_grad: bool = True) -> torch.Tensor:
        """[N, V] logits ~ N(0, LOGIT_STD²)."""
        return self.normal(self.n, self.v, dtype=dtype).mul_(LOGIT_STD).requires_grad_(requires_grad)

    def tokens(self) -> torch.Tensor:
        """N token ids, uniform over the vocabulary."""
        return torch.randint(0, self.v, (self.n,), generator=self.gen, device=self.device)


def logits_case(op: str, title: str, args: argparse.Namespace, make_inputs: Callable[[torch.dtype], Inputs],
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


def kernels_vs_torch(op: str, title: str, args: argparse.Namespace, device: torch.device,
                     make_inputs: Callable[[torch.dtype], Inputs], call: Callable[[dict, str], object],
                     reference: Callable, names: Sequence[str], traffic: dict[str, int],
                     notes: list[str] | None = None) -> Case:
    """The usual logits case: rlfuse's ``call`` on every benchmarked backend against torch eager and
    torch.compile of ``reference`` (on the input tensors ``names``)."""
    notes = [] if notes is None else notes
    backends = rlfuse_backends(args, device, notes)
    contenders = [rlfuse_contender(b, call) for b in backends] + torch_contenders(args, device, reference, names)
    return logits_case(op, title, args, make_inputs, contenders, traffic, notes)


# -- Measuring: time, memory, bandwidth ------------------------------------------------------------


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
        self.cuda = device.type == "cuda"
        self.kind = "cuda allocated" if self.cuda else "process RSS"
        self.available = self.cuda or (self._reset_hwm()
                                        and None not in map(self._status_bytes, ("VmHWM", "VmRSS")))

    @staticmethod
    def _status_bytes(key: str) -> int | None:
        try:
            with open("/proc/self/status") as status:
                for line in status:
                    if line.startswith(key + ":"):
                        return int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            pass
        return None

    @staticmethod
    def _reset_hwm() -> bool:
        """Reset VmHWM to the current RSS; False where /proc does not allow it."""
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            return False
        return True

    def current(self) -> int | None:
        """The baseline a peak is measured from. On CPU this also starts the measuring mode: glibc
        keeps freed blocks of up to 32 MiB (its dynamic mmap threshold) in the heap, so after a
        warm-up a call's buffers would be reused unseen by VmHWM; until ``peak()``, every block over
        128 KiB is a fresh mmap (counted when touched, returned when freed), and the heap is trimmed."""
        if not self.available:
            return None
        if self.cuda:
            return torch.cuda.memory_allocated(self.device)
        _set_mmap_threshold(128 << 10)
        return self._status_bytes("VmRSS")

    def reset_peak(self) -> None:
        if self.available and self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.available and not self._reset_hwm():
            self.available = False

    def peak(self) -> int | None:
        if not self.available:
            return None
        if self.cuda:
            return torch.cuda.max_memory_allocated(self.device)
        peak = self._status_bytes("VmHWM")
        _set_mmap_threshold(32 << 20)  # glibc's steady state (the dynamic threshold's maximum) for the timings
        return peak


def _set_mmap_threshold(nbytes: int) -> None:
    """glibc's ``mallopt(M_MMAP_THRESHOLD, nbytes)`` and ``malloc_trim(0)``; nothing elsewhere."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, nbytes)  # M_MMAP_THRESHOLD
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


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


# -- Running a case --------------------------------------------------------------------------------


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
        log(f"[{self.done}/{self.total}] {label} ...", end="")

    def finish(self, text: str) -> None:
        log(f" {text}")


def log(message: str, end: str = "\n") -> None:
    print(message, end=end, file=sys.stderr, flush=True)


def short_error(exc: BaseException, limit: int = 160) -> str:
    text = str(exc).strip().splitlines()
    message = f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
    return message if len(message) <= limit else message[: limit - 3] + "..."


class _Invalid(Exception):
    """A contender computes something other than rlfuse's op on the same inputs."""


def _measure(case: Case, contender: Contender, dtype: torch.dtype, device: torch.device,
             args: argparse.Namespace, probe: MemoryProbe, progress: Progress) -> Result:
    dname = DTYPE_NAMES[dtype]
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
            log(f"      {label}: loss {agreement.value:.8g} vs {agreement.against} {agreement.reference:.8g}: "
                f"|diff| {agreement.max_abs_diff:.3g} (tolerance {agreement.tolerance:.3g})")
            if not agreement.ok:
                raise _Invalid(f"invalid, not timed: its loss differs from {agreement.against}'s by "
                               f"{agreement.max_abs_diff:.3g} > {agreement.tolerance:.3g}")
        for i in range(max(1, args.warmup)):
            if i == 0 and contender.slow_first_call:
                hint = f"; {contender.first_call_hint}" if contender.first_call_hint else ""
                log(f"      {label}: first call compiles{hint} ...", end="")
                start_s = time.perf_counter()
                _run_once("fwd+bwd", forward, inp, device)
                _synchronize(device)
                result.first_call_s = time.perf_counter() - start_s
                log(f" {result.first_call_s:.1f} s")
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
        result.error = short_error(exc)
    if result.error:
        inp = forward = None
        _collect_garbage(device)
        log(f"      {label}: error: {result.error}")
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
            error = short_error(exc)
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
        log("note: peak memory cannot be measured here (reported as n/a)")
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


# -- Reporting: table, CSV, PNG, environment JSON --------------------------------------------------


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
        log("note: matplotlib is not installed; skipping the PNG plot")
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


def _sanitize(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_") or "device"


def environment(device: torch.device, args: argparse.Namespace) -> dict:
    env = {
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
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



def report(case: Case, results: list[Result], copy_bw: float, env: dict, device: torch.device,
           device_label: str, args: argparse.Namespace) -> None:
    """The table on stdout, then (unless --no-save) the CSV, PNG and environment JSON in --out."""
    sizes = ", ".join(f"{DTYPE_NAMES[d]} {_format_bytes(case.unit_bytes(d))}" for d in args.dtypes)
    print(f"{case.title}  |  {device_label}")
    print(f"median of {args.repeats} runs; copy bandwidth {copy_bw / 1e9:.1f} GB/s; "
          f"{case.unit_name}: {sizes}; peak = {MemoryProbe(device).kind} over the baseline "
          f"before the inputs existed")
    print()
    print(format_results(case, results, copy_bw))
    for note in case.notes:
        print(f"note: {note}")
    if args.no_save:
        return
    os.makedirs(args.out, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H%M%S")
    stem = os.path.join(args.out, f"{case.op}_{_sanitize(env['device_name'])}_{stamp}")
    env.update(op=case.op, shape=case.shape, dtypes=[DTYPE_NAMES[d] for d in args.dtypes],
               contenders=[c.name for c in case.contenders], notes=case.notes, command=sys.argv)
    write_csv(stem + ".csv", _csv_rows(case, results, env))
    written = [stem + ".csv"]
    if write_plot(stem + ".png", case, results, device_label):
        written.append(stem + ".png")
    with open(stem + "_env.json", "w") as f:
        json.dump(env, f, indent=2, default=str)
    written.append(stem + "_env.json")
    print()
    print("wrote " + ", ".join(written))
