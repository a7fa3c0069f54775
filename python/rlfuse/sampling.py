"""``rlfuse.sample``: temperature / top-k / top-p / min-p sampling with log-probs and entropy in
the same pass over each row (docs/SPEC.md section 8)."""

from __future__ import annotations

import math
import numbers
import struct
from dataclasses import dataclass

import torch
from torch import Tensor

from . import _validation as check
from .backends import resolve_backend
from .ops.sample import sample as sample_op
from .ops.sample import sample_score as score_op
from .source import is_source


@dataclass
class SampleOutput:
    tokens: Tensor  # int64 [...] (or [..., num_samples])
    logprobs: Tensor  # log-prob under the filtered, renormalised distribution (0 for greedy rows)
    raw_logprobs: Tensor  # log-prob under the unfiltered temperature-T distribution (T = 1 when greedy)
    entropy: Tensor  # entropy of the unfiltered distribution, per row


def _fp32(value: float) -> float:
    """``value`` rounded to fp32, as a Python float (+-inf past the fp32 range)."""
    try:
        return struct.unpack("f", struct.pack("f", value))[0]
    except OverflowError:
        return math.copysign(math.inf, value)


def _per_row(name, value, rows, device, check_value, checks):
    """Per-row fp32 values. A number is checked here (as fp32, as the kernels see it); a tensor's
    values are a data check added to ``checks``."""
    if isinstance(value, Tensor):
        if value.shape != (rows,) and value.numel() != rows:
            raise ValueError(f"{name} must be a scalar or one value per row ({rows}), got shape {tuple(value.shape)}")
        tensor = value.reshape(rows).to(device=device, dtype=torch.float32)
        checks.add(lambda: ~check_value(tensor),
                   lambda: ValueError(f"{name} has values out of range: {tensor[~check_value(tensor)][:4].tolist()}"))
        return tensor
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        value = _fp32(float(value))
        if not check_value(value):
            raise ValueError(f"{name} has values out of range: {[value]}")
        return torch.full((rows,), value, dtype=torch.float32, device=device)
    raise TypeError(f"{name} must be a number or a tensor, got {type(value).__name__}")


def _temperature_ok(t):
    return (t == 0) | ((t >= check.MIN_TEMPERATURE) & (t <= check.MAX_TEMPERATURE))


def _temperature_error(values) -> ValueError:
    return ValueError(
        f"temperature has values out of range: {values} (each must be 0, for greedy, or in "
        f"{check.TEMPERATURE_RANGE}, where T and 1 / T are normal fp32 numbers: the kernels scale by 1 / T)")


def _temperature(value, rows, device, checks):
    """Per-row fp32 temperatures: each 0 (greedy) or in [2^-126, 2^126], where T and 1 / T are
    normal fp32 numbers (the kernels scale by 1 / T in fp32: 1e-39 would make it +inf; see
    _validation.MIN_TEMPERATURE). Checked on the value as given (in float64), so a positive T that
    rounds to 0 in fp32 is an error, not a silent switch to greedy. A number is checked here, a
    tensor's values are a data check added to ``checks``."""
    if isinstance(value, Tensor):
        if value.shape != (rows,) and value.numel() != rows:
            raise ValueError(f"temperature must be a scalar or one value per row ({rows}), got shape "
                             f"{tuple(value.shape)}")
        if value.dtype == torch.bool or value.is_complex():
            raise TypeError(f"temperature must be a real number or a real tensor, got {value.dtype}")
        given = value.reshape(rows).to(device=device)
        wide = given.to(torch.float64)
        checks.add(lambda: ~_temperature_ok(wide),
                   lambda: _temperature_error(wide[~_temperature_ok(wide)][:4].tolist()))
        return given.to(torch.float32).abs()  # -0.0 -> 0.0
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        value = float(value)
        if not _temperature_ok(value):
            raise _temperature_error([value])
        return torch.full((rows,), abs(value), dtype=torch.float32, device=device)
    raise TypeError(f"temperature must be a number or a tensor, got {type(value).__name__}")


def _top_k(value, rows, vocab, device, checks):
    """Per-row int32 top-k: integers >= 0 (0 = no filtering); values >= V mean no filtering too
    and are clamped to V in int64 before the int32 conversion, so nothing wraps around. A tensor's
    sign is a data check added to ``checks``."""
    if isinstance(value, Tensor):
        if value.shape != (rows,) and value.numel() != rows:
            raise ValueError(f"top_k must be a scalar or one value per row ({rows}), got shape {tuple(value.shape)}")
        if value.dtype == torch.bool or value.is_floating_point() or value.is_complex():
            raise TypeError(f"top_k must be an int or an integer tensor, got a {value.dtype} tensor")
        given = value.reshape(rows).to(device=device)
        if given.dtype == torch.uint64:  # few uint64 ops: reinterpret; values >= 2^63 are >= V
            given = given.view(torch.int64)
            given = torch.where(given < 0, torch.full_like(given, vocab), given)
        given = given.to(torch.int64)
        checks.add(lambda: given < 0, lambda: ValueError(
            f"top_k has values out of range (must be >= 0): {given[given < 0][:4].tolist()}"))
        return given.clamp(max=vocab).to(torch.int32)
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = int(value)
        if value < 0:
            raise ValueError(f"top_k has values out of range (must be >= 0): [{value}]")
        return torch.full((rows,), min(value, vocab), dtype=torch.int32, device=device)
    raise TypeError(f"top_k must be an int or an integer tensor, got {type(value).__name__} {value!r}")


def _check_temperature_scale(adaptive):
    """The temperature a row's overflow is judged at, under adaptive temperature: the smallest
    positive T the map can give (t_min; t_max when t_min = 0, a step to greedy)."""
    t_min, t_max = adaptive[0], adaptive[1]
    return t_min if t_min > 0 else t_max


def _inverse_temperatures(temperature, adaptive, device):
    """Per-row fp32 1 / T the rows are judged at: 1 for greedy rows; with adaptive temperature the
    reciprocal of ``_check_temperature_scale`` (1 when that is 0: every row greedy)."""
    rows = temperature.shape[0]
    if adaptive is not None:
        t_low = _check_temperature_scale(adaptive)
        inv = torch.reciprocal(torch.full((), t_low if t_low > 0 else 1.0, dtype=torch.float32, device=device))
        return inv.expand(rows)
    ones = torch.ones_like(temperature)
    return torch.reciprocal(torch.where(temperature == 0, ones, temperature))


def _rows_error(logits, bad, inv) -> ValueError:
    """The ValueError for the rows flagged in ``bad`` (bool [rows]), naming up to four with the
    reason read from their maximum (the call fails: reading those rows again costs nothing)."""
    vocab = logits.shape[-1]
    bad_rows = torch.nonzero(bad).flatten()[:4].tolist()
    reasons = []
    for row in bad_rows:
        value = float(logits.reshape(-1, vocab)[row].amax().float())
        if math.isnan(value):
            reasons.append(f"row {row}: NaN")
        elif value == math.inf:
            reasons.append(f"row {row}: a +inf logit (in fp32)")
        elif value == -math.inf:
            reasons.append(f"row {row}: no finite entry")
        else:
            reasons.append(f"row {row}: max logit {value:.6g} overflows fp32 once divided by the temperature "
                           f"(1 / T = {float(inv[row]):.6g})")
    return ValueError(
        f"logits rows {bad_rows} contain NaN or have no finite entry, or contain +inf or a logit that "
        f"overflows fp32 at the temperature: nothing to sample from ({'; '.join(reasons)})")


def _rows_flagged_by_max(logits, inv):
    """Rows whose max is NaN, +inf or -inf, or overflows fp32 once scaled by ``inv``: a second
    read of the logits (one max per row), needed only with a varying adaptive temperature."""
    row_max = logits.amax(-1).reshape(-1).float()  # NaN propagates; no copy of a strided view
    return ~(torch.isfinite(row_max) & torch.isfinite(row_max * inv))


def _adaptive(values):
    """(t_min, t_max, h_low, h_high), finite in fp32 (the kernels take them as fp32), with
    0 <= t_min <= t_max and h_low <= h_high. Positive t_min and t_max must lie in [2^-126, 2^126]
    (as every temperature); t_min = 0 is allowed only as a step to greedy (h_low == h_high, or
    t_max = 0): a linear map from 0 gives arbitrarily small temperatures, whose 1 / T overflows fp32."""
    usage = ("adaptive_temperature must be (t_min, t_max, h_low, h_high) with 0 <= t_min <= t_max and "
             "h_low <= h_high, all finite")
    try:
        adaptive = tuple(float(v) for v in values)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{usage}, got {values!r}") from error
    if len(adaptive) != 4:
        raise ValueError(f"{usage}, got {values!r}")
    t_min, t_max, h_low, h_high = adaptive
    if not all(math.isfinite(_fp32(v)) for v in adaptive) or not (0 <= t_min <= t_max) or h_high < h_low:
        raise ValueError(f"{usage}, got {values!r}")
    for name, value in (("t_min", t_min), ("t_max", t_max)):
        if value != 0 and not check.MIN_TEMPERATURE <= value <= check.MAX_TEMPERATURE:
            raise ValueError(f"adaptive_temperature's {name} = {value!r} is out of range: 0 or in "
                             f"{check.TEMPERATURE_RANGE} (T and 1 / T normal fp32 numbers)")
    if t_min == 0 and t_max > 0:
        if h_high > h_low:
            raise ValueError(
                "adaptive_temperature with t_min = 0 and h_low < h_high maps entropies just above h_low to "
                "arbitrarily small temperatures, whose 1 / T overflows fp32: use t_min > 0, or h_low == h_high "
                "for a step between greedy and t_max")
    return adaptive


def per_row_seeds(seed, generator, rows, device) -> Tensor:
    """The int64 ``[rows]`` keys of the random streams for ``sample``'s ``seed`` / ``generator``."""
    if seed is not None and generator is not None:
        raise ValueError("pass seed or generator, not both")
    if isinstance(seed, Tensor):
        if seed.numel() != rows or seed.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"a seed tensor must hold one int64 per row ({rows})")
        return seed.reshape(rows).to(device=device, dtype=torch.int64).contiguous()
    if seed is None:
        base = int(torch.randint(0, 2**62, (1,), generator=generator).item())
    elif isinstance(seed, int) and not isinstance(seed, bool):
        base = seed
    else:
        raise TypeError(f"seed must be an int, a per-row int64 tensor or None, got {type(seed).__name__}")
    # Row r of a scalar seed draws with key mix(seed) + r: a deterministic function of seed and row.
    start = (base * 0x9E3779B97F4A7C15) % 2**62
    return torch.arange(rows, device=device, dtype=torch.int64) + start


def sample(logits: Tensor, temperature=1.0, top_k=None, top_p=None, min_p=None, seed=None,
           generator: torch.Generator | None = None, adaptive_temperature=None, backend: str = "auto",
           num_samples: int = 1) -> SampleOutput:
    """Draw tokens from ``softmax(logits / T)`` filtered by top-k, then top-p, then min-p.

    Every parameter is a scalar or one value per row; ``temperature=0`` is greedy. ``seed`` (int or
    per-row int64 tensor) or ``generator`` pick the counter-based random stream: a row's draw
    depends only on its own key, never on the rest of the batch. ``adaptive_temperature=(t_min,
    t_max, h_low, h_high)`` maps each row's entropy (at T = 1) linearly, clamped, to its temperature.
    ``num_samples > 1`` draws several tokens per row (a trailing dimension on the outputs).

    Arguments are checked (``ValueError``, ``TypeError`` for a wrong type), never silently changed.
    Numbers and shapes are checked before anything runs; the values of tensor arguments and the
    rows that cannot be sampled are checked from the sampling pass's own results with one host
    synchronisation, and nothing is returned for a call that fails (README "Host synchronisation";
    ``rlfuse.set_validation(False)`` skips that synchronisation, as does ``torch.compile``):

    * ``temperature`` is 0 (greedy) or in [2^-126, 2^126] = [1.1754944e-38, 8.507059e37], where
      T and 1 / T are normal fp32 numbers (the kernels scale by 1 / T in fp32; 1e-39 is an error,
      not NaN, and a positive T that rounds to 0 in fp32 is an error, not greedy).
    * ``top_k`` is an int or an integer tensor (floats and bools are a ``TypeError``), >= 0; 0 and
      values >= V mean no filtering (clamped to V before the int32 conversion: no wrap-around).
    * ``adaptive_temperature`` needs finite values, positive temperatures in the range above, and
      ``t_min > 0``, or ``t_min = 0`` only as a step to greedy (``h_low == h_high``).
    * A logits row is rejected if it contains NaN or +inf, has no finite entry, or if its largest
      logit overflows fp32 once divided by the row's temperature (3e38 at T = 0.5; with adaptive
      temperature, at the smallest positive T the map can give; greedy rows are not divided).
      The sampling pass finds all four: such a row's entropy is NaN. (With an adaptive temperature
      whose t_min < t_max, a row's T is not known before the pass, so one max per row is taken
      first: the only case that reads the logits twice.)

    ``logits`` may be a logits source (``LinearLogits``, ``ShardedLogits``): the same tokens are drawn
    as from the materialised logits with the same seed (a row's draw depends only on its key).
    """
    if is_source(logits):
        return logits._sample(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed,
                              generator=generator, adaptive_temperature=adaptive_temperature, backend=backend,
                              num_samples=num_samples)
    params = _sampling_params(logits, temperature, top_k, top_p, min_p, adaptive_temperature, backend, "sample")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
    seeds = per_row_seeds(seed, generator, params.rows, params.logits.device)
    tokens, logprobs, raw, entropy = sample_op(params.logits.detach(), *params.op_args(), seeds, num_samples,
                                               params.adaptive_list(), params.backend)
    params.check_rows(entropy)
    if num_samples == 1:
        tokens, logprobs, raw = tokens.squeeze(-1), logprobs.squeeze(-1), raw.squeeze(-1)
    return SampleOutput(tokens, logprobs, raw, entropy)


@dataclass
class ScoreOutput:
    logprobs: Tensor  # log-prob under the filtered, renormalised distribution; -inf outside the kept set
    raw_logprobs: Tensor  # log-prob under the unfiltered temperature-T distribution (T = 1 when greedy)
    kept_min: Tensor  # the row's kept set is {j : x_j >= kept_min}, x = z * fp32(1 / T); -inf: nothing filtered
    entropy: Tensor  # entropy of the unfiltered distribution, per row


def score(logits: Tensor, tokens: Tensor, temperature=1.0, top_k=None, top_p=None, min_p=None,
          adaptive_temperature=None, backend: str = "auto") -> ScoreOutput:
    """Score given ``tokens`` (ids of shape ``logits.shape[:-1]``) as ``sample`` with the same
    arguments would have drawn them (docs/SPEC.md section 8, "Scoring"): the same temperature and
    kept set (same thresholds, same tie rule), so scoring the tokens ``sample`` returned gives its
    ``logprobs`` bit for bit on the same backend. A token outside the kept set gets ``-inf``; on a
    greedy row (T = 0) only the first maximum is kept (log-prob 0). No gradient (see
    ``rlfuse.token_logprobs(..., top_k=, top_p=, min_p=)``). Arguments are checked as in ``sample``;
    ids outside [0, V) are a ``ValueError`` (checked with the rows' data, one host synchronisation).
    """
    if is_source(logits):
        raise ValueError("score: logits must be a tensor (logits sources are not supported here)")
    params = _sampling_params(logits, temperature, top_k, top_p, min_p, adaptive_temperature, backend, "sample")
    check.check_tokens(tokens, params.logits, params.checks)
    logprobs, raw, entropy, kept_min = score_op(params.logits.detach(), tokens, *params.op_args(),
                                                params.adaptive_list(), params.backend)
    params.check_rows(entropy)
    return ScoreOutput(logprobs, raw, kept_min, entropy)


@dataclass
class _SamplingParams:
    """The validated per-row parameters shared by ``sample`` and ``score``."""
    logits: Tensor
    rows: int
    checks: check.DataChecks
    temperature: Tensor
    top_k: Tensor
    top_p: Tensor
    min_p: Tensor
    adaptive: tuple | None
    backend: str
    flagged: Tensor | None

    def op_args(self):
        return self.temperature, self.top_k, self.top_p, self.min_p

    def adaptive_list(self):
        return None if self.adaptive is None else list(self.adaptive)

    def check_rows(self, entropy):
        """Adds the rows check and runs every data check (the call's one host synchronisation)."""
        if self.rows:
            # A row that cannot be sampled has a NaN entropy (docs/SPEC.md section 1): no second read.
            flagged = self.flagged
            bad = (lambda: flagged) if flagged is not None else (lambda: ~torch.isfinite(entropy.reshape(self.rows)))
            self.checks.add(bad, lambda: _rows_error(self.logits, bad(), _inverse_temperatures(
                self.temperature, self.adaptive, self.logits.device)))
        self.checks.run()


def _sampling_params(logits, temperature, top_k, top_p, min_p, adaptive_temperature, backend, op,
                     checks: check.DataChecks | None = None) -> _SamplingParams:
    """Checks ``sample``'s arguments (its docstring) and makes them per-row tensors; the data checks
    join ``checks`` (a new set if None), run by ``check_rows``."""
    check.check_logits(logits)
    if logits.dtype == torch.float64:
        logits = logits.float()
    lead = logits.shape[:-1]
    vocab = logits.shape[-1]
    rows = math.prod(lead)
    device = logits.device
    checks = check.DataChecks() if checks is None else checks
    temperature = _temperature(temperature, rows, device, checks)
    top_k = _top_k(0 if top_k is None else top_k, rows, vocab, device, checks)
    top_p = _per_row("top_p", 1.0 if top_p is None else top_p, rows, device, lambda p: (p > 0) & (p <= 1), checks)
    min_p = _per_row("min_p", 0.0 if min_p is None else min_p, rows, device, lambda p: (p >= 0) & (p < 1), checks)
    adaptive = None if adaptive_temperature is None else _adaptive(adaptive_temperature)
    resolved = resolve_backend(backend, device, op, logits.dtype)
    flagged = None
    if checks.enabled and rows and adaptive is not None and adaptive[0] != adaptive[1]:
        flagged = _rows_flagged_by_max(logits, _inverse_temperatures(temperature, adaptive, device))
    return _SamplingParams(logits, rows, checks, temperature, top_k, top_p, min_p, adaptive, resolved, flagged)
