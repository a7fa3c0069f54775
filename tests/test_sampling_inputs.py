"""rlfuse.sample on hostile input (issue 13, items 3 and 4): +inf logits, logits that overflow at the
temperature, temperatures whose 1 / T is not finite in fp32, top_k that is not an integer or does
not fit in int32; and the kernels themselves, which must return a token in [0, V) whatever they
are given.

Every expectation is computed here, in numpy: which rows and arguments are invalid (fp32 rules,
with np.float32), and, for valid input, the distribution at T in float64 (never rlfuse.reference).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import rlfuse
from rlfuse._layout import as_rows
from rlfuse.ops._launch import kernels
from conftest import kernel_backends

BACKENDS = kernel_backends("cpu")
KERNEL_BACKENDS = [b for b in BACKENDS if b != "torch"]
NAN, INF = float("nan"), float("inf")
F32_MAX = float(np.finfo(np.float32).max)
F32_TINY = float(np.finfo(np.float32).tiny)  # 2^-126, the smallest normal fp32: the smallest T > 0
T_MAX = 1 / F32_TINY  # 2^126: the largest T whose 1 / T is a normal fp32
ROW_ERROR = "contain NaN or have no finite entry"
PROPERTY = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --- the oracle ----------------------------------------------------------------------------------

def inv_temperature(t) -> np.float32:
    """1 / T as the kernels form it: the fp32 reciprocal of fp32(T) (1 for greedy rows)."""
    t = np.float32(t)
    if t == 0:
        return np.float32(1.0)
    with np.errstate(all="ignore"):
        return np.float32(1.0) / t


def temperature_is_valid(t) -> bool:
    """0 (greedy), or T and 1 / T both normal fp32 numbers: 2^-126 <= T <= 2^126."""
    t = float(t)
    return t == 0 or (F32_TINY <= t <= T_MAX)


def row_is_valid(row: np.ndarray, t) -> bool:
    """No NaN, no +inf, a finite entry, and max(row) / T finite in fp32 (as z * fp32(1 / T))."""
    row = row.astype(np.float32)
    if np.isnan(row).any() or (row == np.inf).any() or not np.isfinite(row).any():
        return False
    with np.errstate(all="ignore"):
        return bool(np.isfinite(np.float32(row.max()) * inv_temperature(t)))


def scaled_row(row: np.ndarray, t) -> np.ndarray:
    """x = fp32(z * fp32(1 / T)), the values every backend samples from, as float64."""
    with np.errstate(all="ignore"):
        return (row.astype(np.float32) * inv_temperature(t)).astype(np.float64)


def log_softmax64(x: np.ndarray) -> np.ndarray:
    m = x[np.isfinite(x)].max()
    with np.errstate(divide="ignore"):
        return (x - m) - np.log(np.exp(x - m).sum())


def entropy64(x: np.ndarray) -> float:
    log_p = log_softmax64(x)
    p = np.exp(log_p)
    return float(-(p[p > 0] * log_p[p > 0]).sum())


def top_k_kept(x: np.ndarray, k: int) -> np.ndarray:
    """Top-k with ties at the threshold kept; k = 0 or k >= V keeps everything."""
    if 0 < k < x.size:
        return x >= np.sort(x)[::-1][k - 1]
    return np.ones_like(x, dtype=bool)


def check_draws(out, logits: np.ndarray, temperatures, top_k=None):
    """Tokens in [0, V) on entries with probability, log-probs and entropy against float64 math."""
    rows, vocab = logits.shape
    tokens = out.tokens.reshape(rows, -1).numpy()
    logprobs = out.logprobs.reshape(rows, -1).double().numpy()
    raw = out.raw_logprobs.reshape(rows, -1).double().numpy()
    for r in range(rows):
        t = float(temperatures[r])
        greedy = t == 0
        x = scaled_row(logits[r], 1.0 if greedy else t)
        log_p = log_softmax64(x)
        assert ((tokens[r] >= 0) & (tokens[r] < vocab)).all(), tokens[r]
        assert np.isfinite(x[tokens[r]]).all(), "drew a -inf entry"
        np.testing.assert_allclose(raw[r], log_p[tokens[r]], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(float(out.entropy.reshape(-1)[r]), entropy64(x), rtol=1e-5, atol=1e-5)
        if greedy:
            assert (tokens[r] == int(np.argmax(x))).all()  # the first maximum
            assert (logprobs[r] == 0).all()
            continue
        kept = top_k_kept(x, 0 if top_k is None else int(top_k[r]))
        assert kept[tokens[r]].all(), "drew a token outside the top-k set"
        kept_log_p = log_softmax64(np.where(kept, x, -np.inf))
        np.testing.assert_allclose(logprobs[r], kept_log_p[tokens[r]], rtol=1e-5, atol=1e-5)


# --- regressions ---------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("row, temperature, reason", [
    ([INF, INF, INF, INF], 1.0, "a \\+inf logit"),  # cpu returned token -1 after reading x[-1]
    ([0.0, INF, 1.0, 2.0], 1.0, "a \\+inf logit"),  # backends disagreed, log-probs NaN
    ([0.0, INF, 1.0, 2.0], 0.0, "a \\+inf logit"),
    ([0.0, 3e38, 1.0, 2.0], 0.5, "overflows fp32 once divided by the temperature"),
    ([F32_MAX, 0.0, 0.0, 0.0], 0.9, "overflows fp32 once divided by the temperature"),
    ([-3e38, -3e38, -INF, -INF], 0.5, "overflows fp32 once divided by the temperature"),
    ([-INF, -INF, -INF, -INF], 1.0, "no finite entry"),
    ([0.0, NAN, 1.0, 2.0], 0.0, "NaN"),
], ids=["all +inf", "one +inf", "+inf greedy", "3e38 at T=0.5", "fp32 max at T=0.9", "-3e38 at T=0.5", "all -inf",
        "NaN"])
def test_rows_with_inf_nan_or_overflow_raise(backend, row, temperature, reason):
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0], row, [3.0, 2.0, 1.0, 0.0]])
    with pytest.raises(ValueError, match=rf"rows \[1\] {ROW_ERROR}.*row 1: .*{reason}"):
        rlfuse.sample(logits, temperature=temperature, seed=0, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_overflow_is_judged_per_row_temperature(backend):
    logits = torch.tensor([[0.0, 3e38, 1.0], [0.0, 3e38, 1.0], [0.0, 1.0, 2.0]])
    # Greedy rows divide by nothing; T = 1 keeps 3e38 finite; T = 0.5 does not.
    out = rlfuse.sample(logits[:2], temperature=torch.tensor([0.0, 1.0]), seed=0, backend=backend)
    assert out.tokens.tolist() == [1, 1]
    torch.testing.assert_close(out.raw_logprobs, torch.zeros(2))
    with pytest.raises(ValueError, match=r"rows \[1\] .*overflows fp32 once divided by the temperature"):
        rlfuse.sample(logits, temperature=torch.tensor([0.0, 0.5, 0.5]), seed=0, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_entropy_of_huge_valid_logits(backend):
    """A row max above ~1e31 after scaling is valid (finite): the Triton statistics started each
    lane at -FLT_MAX, so max - (-FLT_MAX) overflowed and 0 * -inf made the entropy NaN."""
    logits = torch.tensor([[0.0] * 7 + [3e38], [0.0] * 7 + [7.0], [1e31, 1e31] + [0.0] * 6])
    temperature = torch.tensor([1.0, 6.5e-31, 1.0])
    out = rlfuse.sample(logits, temperature=temperature, seed=0, num_samples=2, backend=backend)
    check_draws(out, logits.numpy(), temperature.tolist())
    torch.testing.assert_close(out.entropy, torch.tensor([0.0, 0.0, math.log(2)]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_adaptive_temperature_overflow_uses_t_min(backend):
    logits = torch.tensor([[0.0, 2e38, 1.0]])  # finite at T >= 0.59, +inf below
    out = rlfuse.sample(logits, adaptive_temperature=(0.6, 2.0, 0.0, 1.0), seed=0, backend=backend)
    assert out.tokens.tolist() == [1]
    with pytest.raises(ValueError, match=ROW_ERROR):
        rlfuse.sample(logits, adaptive_temperature=(0.5, 2.0, 0.0, 1.0), seed=0, backend=backend)
    # t_min = 0 as a step (h_low == h_high): greedy or t_max, never a tiny T.
    out = rlfuse.sample(logits, adaptive_temperature=(0.0, 0.6, 1.0, 1.0), seed=0, backend=backend)
    assert out.tokens.tolist() == [1]
    with pytest.raises(ValueError, match=ROW_ERROR):
        rlfuse.sample(logits, adaptive_temperature=(0.0, 0.5, 1.0, 1.0), seed=0, backend=backend)


def test_bad_adaptive_temperature_raises():
    x = torch.randn(2, 8)
    for bad in [(0.0, 1.0, 0.0, 1.0), (1e-39, 1.0, 0.0, 1.0), (0.5, INF, 0.0, 1.0), (0.5, 1e39, 0.0, 1.0),
                (0.5, 1.0, NAN, 1.0), (0.5, 1.0, 0.0, INF), (1.0, 0.5, 0.0, 1.0), (0.5, 1.0, 2.0, 1.0), (0.5, 1.0)]:
        with pytest.raises(ValueError, match="adaptive_temperature"):
            rlfuse.sample(x, adaptive_temperature=bad, seed=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_top_k_beyond_int32_means_no_filtering(backend, generator):
    logits = torch.randn(3, 16, generator=generator)
    plain = rlfuse.sample(logits, seed=4, num_samples=20, backend=backend)
    for top_k in (torch.full((3,), 2**32 + 1), 2**32 + 1, 2**80, torch.tensor([2**63 - 1] * 3),
                  torch.tensor([2**64 - 1] * 3, dtype=torch.uint64), torch.tensor([255] * 3, dtype=torch.uint8)):
        out = rlfuse.sample(logits, top_k=top_k, seed=4, num_samples=20, backend=backend)
        assert torch.equal(out.tokens, plain.tokens), top_k  # 2**32 + 1 used to wrap to top_k = 1
    one = rlfuse.sample(logits, top_k=torch.tensor([1, 1, 1], dtype=torch.int16), seed=4, num_samples=20,
                        backend=backend)
    assert torch.equal(one.tokens, logits.argmax(-1, keepdim=True).expand(3, 20))


@pytest.mark.parametrize("bad", [2.5, 2.0, True, np.float64(3.0), "3", torch.tensor([2.5, 2.0]),
                                 torch.tensor([2.0, 3.0], dtype=torch.float64), torch.tensor([True, False])])
def test_top_k_must_be_an_integer(bad):
    with pytest.raises(TypeError, match="top_k must be an int or an integer tensor"):
        rlfuse.sample(torch.randn(2, 8), top_k=bad, seed=0)


@pytest.mark.parametrize("bad", [-1, torch.tensor([3, -1]), torch.tensor([-2**40, 1])])
def test_negative_top_k_raises(bad):
    with pytest.raises(ValueError, match="top_k has values out of range"):
        rlfuse.sample(torch.randn(2, 8), top_k=bad, seed=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [1e-39, 1e-45, 5e-324, 1e-50, 1e-38, -1e-50, 1e38, 1e39, INF, NAN,
                                         torch.tensor([1.0, 1e-39]), torch.tensor([1e-50, 1.0], dtype=torch.float64)])
def test_temperature_without_normal_fp32_reciprocal_raises(backend, temperature):
    # 1e-39 passed and returned NaN / -inf; 1e-50 (float64) would have rounded to 0 and gone greedy.
    with pytest.raises(ValueError, match="temperature has values out of range"):
        rlfuse.sample(torch.tensor([[0.0, 1.0, 2.0], [2.0, 1.0, 0.0]]), temperature=temperature, seed=0,
                      backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_smallest_temperature_samples_the_argmax(backend):
    logits = torch.tensor([[0.0, 1e-30, 2e-30], [3e-30, 1e-30, 0.0]])
    out = rlfuse.sample(logits, temperature=F32_TINY, seed=0, num_samples=3, backend=backend)
    check_draws(out, logits.numpy(), [F32_TINY] * 2)
    assert out.tokens.tolist() == [[2, 2, 2], [0, 0, 0]]


@pytest.mark.parametrize("op", ["token_logprobs", "entropy", "kl_divergence", "sparse_logprobs"])
@pytest.mark.parametrize("temperature", [1e-39, 1e-45, 5e-324, 1e-50, 1e38, 1e46])
def test_other_ops_reject_temperatures_without_normal_fp32_reciprocal(op, temperature):
    # 1e-39: 1 / T = +inf in fp32; 1e46: 1 / T = 0 in fp32, and Triton's -inf padding * 0 gave NaN.
    logits = torch.randn(2, 8)
    tokens = torch.zeros(2, dtype=torch.int64)
    with pytest.raises(ValueError, match="temperature"):
        if op == "token_logprobs":
            rlfuse.token_logprobs(logits, tokens, temperature=temperature)
        elif op == "entropy":
            rlfuse.entropy(logits, temperature=temperature)
        elif op == "kl_divergence":
            rlfuse.kl_divergence(logits, logits + 1, temperature=temperature)
        else:
            rlfuse.sparse_logprobs(logits, tokens, temperature=temperature)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_kernels_never_return_minus_one(backend):
    """Straight to the kernel (no Python checks): an all +inf row made the CPU kernel return -1
    after reading x[-1]; NaN and overflowing rows too. Every token must lie in [0, V)."""
    rows = torch.tensor([[INF, INF, INF, INF], [0.0, INF, 1.0, 2.0], [NAN, NAN, NAN, NAN], [1.0, NAN, 3.0, 0.0],
                         [-INF, -INF, -INF, -INF], [0.0, 3e38, 1.0, 2.0], [NAN, -INF, 1.0, 1.0]])
    for temperature in (1.0, 0.5, 0.0, 1e-39):
        tokens = kernel_draws(backend, rows, temperature, top_k=[0, 2, 0, 1, 0, 3, 0], top_p=0.9, min_p=0.1)
        assert ((tokens >= 0) & (tokens < 4)).all(), (temperature, tokens)
    # Where no entry can win (every score NaN), the CPU kernel falls back to the first maximum.
    if backend == "cpu":
        hopeless = torch.tensor([[NAN, INF, INF, 1.0], [NAN, -INF, 5.0, NAN], [NAN, NAN, NAN, NAN]])
        for temperature in (1.0, 0.0):
            assert kernel_draws(backend, hopeless, temperature).tolist() == [[1] * 3, [2] * 3, [0] * 3]


# --- kernels on anything -------------------------------------------------------------------------

def kernel_draws(backend, logits, temperature, top_k=None, top_p=1.0, min_p=0.0, num_samples=3, adaptive=None):
    rows_view, layout = as_rows(logits)
    rows, vocab = logits.shape
    tokens = torch.full((rows, num_samples), -7, dtype=torch.int64)
    logprobs, raw, entropy = torch.empty(rows, num_samples), torch.empty(rows, num_samples), torch.empty(rows)
    top_k = torch.zeros(rows, dtype=torch.int32) if top_k is None else torch.tensor(top_k, dtype=torch.int32)
    kernels(backend, "sample").sample(
        rows_view, layout, vocab, torch.full((rows,), float(np.float32(temperature))), top_k,
        torch.full((rows,), float(top_p)), torch.full((rows,), float(min_p)), torch.arange(rows) * 7 + 1,
        num_samples, adaptive is not None, *(adaptive or (0.0, 0.0, 0.0, 0.0)), tokens, logprobs, raw, entropy)
    return tokens


SPECIALS = [NAN, INF, -INF, 3e38, -3e38, 1e38, F32_MAX, -F32_MAX, 0.0, 1e-40, 1e4]


@st.composite
def hostile_rows(draw, max_rows=3, max_vocab=9):
    """Rows of ordinary logits with a few entries replaced by special values."""
    rows = draw(st.integers(1, max_rows))
    vocab = draw(st.integers(1, max_vocab))
    flat = draw(st.lists(st.floats(-20, 20, width=32), min_size=rows * vocab, max_size=rows * vocab))
    edits = draw(st.lists(st.tuples(st.integers(0, rows * vocab - 1),
                                    st.one_of(st.sampled_from(SPECIALS), st.floats(width=32))), max_size=4))
    for position, value in edits:
        flat[position] = value
    return np.array(flat, dtype=np.float32).reshape(rows, vocab)


TEMPERATURES = st.one_of(
    st.just(0.0), st.floats(0.05, 5.0), st.floats(0.0, 1e-30),
    st.sampled_from([1e-39, 1e-45, F32_TINY, 1.2e-38, 1e-38, -0.0, -1.0, NAN, INF, T_MAX, 1e38, 3e38, 1e39,
                     5e-324]))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@PROPERTY
@given(logits=hostile_rows(), temperature=st.sampled_from([0.0, 1.0, 0.5, 1e-3, 1e-39]),
       top_k=st.integers(0, 10), top_p=st.sampled_from([1.0, 0.9, 1e-6]), min_p=st.sampled_from([0.0, 0.2]),
       adaptive=st.sampled_from([None, (0.5, 1.5, 0.5, 2.0), (0.0, 1.0, 1.0, 1.0)]))
def test_property_kernels_return_tokens_in_range(backend, logits, temperature, top_k, top_p, min_p, adaptive):
    """Whatever the row holds (the Python checks bypassed), no token is -1 or >= V."""
    rows, vocab = logits.shape
    tokens = kernel_draws(backend, torch.from_numpy(logits), temperature, top_k=[top_k] * rows, top_p=top_p,
                          min_p=min_p, adaptive=adaptive)
    assert ((tokens >= 0) & (tokens < vocab)).all(), tokens


@pytest.mark.parametrize("backend", BACKENDS)
@PROPERTY
@given(logits=hostile_rows(), temperature=st.one_of(TEMPERATURES, st.lists(TEMPERATURES, min_size=3, max_size=3)),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_property_sample_rejects_exactly_the_invalid_input(backend, logits, temperature, dtype):
    """Every row and temperature the fp32 rules reject is a ValueError naming the bad rows; all
    other input samples correctly (tokens with probability, log-probs and entropy in float64)."""
    rows = logits.shape[0]
    if isinstance(temperature, list):
        argument = torch.tensor(temperature[:rows], dtype=dtype)
        temperatures = argument.double().tolist()  # the values the tensor holds (fp32: rounded)
    else:
        temperatures = [temperature] * rows
        argument = temperature
    if not all(temperature_is_valid(t) for t in temperatures):
        with pytest.raises(ValueError, match="temperature has values out of range"):
            rlfuse.sample(torch.from_numpy(logits), temperature=argument, seed=3, backend=backend)
        return
    bad_rows = [r for r in range(rows) if not row_is_valid(logits[r], temperatures[r])]
    if bad_rows:
        with pytest.raises(ValueError, match=rf"rows \[{', '.join(map(str, bad_rows[:4]))}\] {ROW_ERROR}"):
            rlfuse.sample(torch.from_numpy(logits), temperature=argument, seed=3, backend=backend)
        return
    event("valid input")
    out = rlfuse.sample(torch.from_numpy(logits), temperature=argument, seed=3, num_samples=4, backend=backend)
    check_draws(out, logits, temperatures)


INTEGER_DTYPES = [torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.uint16, torch.uint32,
                  torch.uint64]


@st.composite
def top_k_arguments(draw, rows):
    """(argument, the int values it holds): Python ints of any size or integer tensors."""
    if draw(st.booleans()):
        value = draw(st.one_of(st.integers(0, 12), st.integers(0, 2**70)))
        return value, [value] * rows
    dtype = draw(st.sampled_from(INTEGER_DTYPES))
    info = torch.iinfo(dtype)
    values = draw(st.lists(st.one_of(st.integers(0, 12), st.integers(0, info.max)), min_size=rows, max_size=rows))
    return torch.tensor(values, dtype=dtype), values


@pytest.mark.parametrize("backend", BACKENDS)
@PROPERTY
@given(data=st.data(), rows=st.integers(1, 3), vocab=st.integers(1, 12))
def test_property_integer_top_k_filters_exactly(backend, data, rows, vocab):
    """Any non-negative integer top_k, of any size and integer dtype, keeps the k largest (ties
    kept), or everything when k = 0 or k >= V: never a wrapped-around value."""
    logits = np.array(data.draw(st.lists(st.floats(-8, 8, width=32), min_size=rows * vocab,
                                         max_size=rows * vocab)), dtype=np.float32).reshape(rows, vocab)
    argument, values = data.draw(top_k_arguments(rows))
    temperature = data.draw(st.sampled_from([1.0, 0.7]))
    out = rlfuse.sample(torch.from_numpy(logits), temperature=temperature, top_k=argument, seed=5, num_samples=6,
                        backend=backend)
    check_draws(out, logits, [temperature] * rows, top_k=[min(v, vocab) for v in values])


@PROPERTY
@given(value=st.one_of(st.floats(allow_nan=True), st.booleans(),
                       st.lists(st.floats(0, 100), min_size=2, max_size=2).map(torch.tensor)))
def test_property_non_integer_top_k_is_a_type_error(value):
    with pytest.raises(TypeError, match="top_k"):
        rlfuse.sample(torch.randn(2, 8), top_k=value, seed=0)


@PROPERTY
@given(temperature=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.floats(0, 1e-36),
                             st.floats(1e36, 1e40), st.sampled_from([F32_TINY, T_MAX, 1e-39, 5e-324, 1e-45, 1e46])))
def test_property_check_temperature_of_the_other_ops(temperature):
    """token_logprobs (and every op through _validation.check_temperature): 2^-126 <= T <= 2^126,
    where T and 1 / T are normal fp32 numbers, or a ValueError; accepted temperatures give finite
    outputs on every backend."""
    logits = torch.tensor([[0.0, 1e-30, -2e-30, 5e-31]])
    tokens = torch.tensor([1])
    valid = temperature > 0 and F32_TINY <= temperature <= T_MAX
    if not valid:
        with pytest.raises(ValueError, match="temperature"):
            rlfuse.token_logprobs(logits, tokens, temperature=temperature, backend="cpu")
        return
    for backend in BACKENDS:
        logp, entropy = rlfuse.token_logprobs(logits, tokens, temperature=temperature, return_entropy=True,
                                               backend=backend)
        assert torch.isfinite(logp).all() and torch.isfinite(entropy).all(), (backend, temperature, logp, entropy)


# --- validation off (rlfuse.set_validation(False)): no host read, and still nothing out of range ----

@pytest.mark.parametrize("backend", BACKENDS)
def test_without_validation_bad_rows_come_back_nan_with_tokens_in_range(backend):
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0], [0.0, NAN, 1.0, 2.0], [INF, 0.0, 1.0, 2.0], [-INF] * 4,
                           [0.0, 3e38, 1.0, 2.0]])
    previous = rlfuse.set_validation(False)
    try:
        out = rlfuse.sample(logits, temperature=0.5, seed=0, num_samples=3, backend=backend)
        bad_parameter = rlfuse.sample(logits[:1], temperature=torch.tensor([-1.0]), top_p=torch.tensor([2.0]),
                                      seed=0, backend=backend)
    finally:
        rlfuse.set_validation(previous)
    assert ((out.tokens >= 0) & (out.tokens < 4)).all()
    assert torch.isfinite(out.entropy[0]) and torch.isnan(out.entropy[1:]).all()
    assert torch.isnan(out.raw_logprobs[1:]).all()
    assert ((bad_parameter.tokens >= 0) & (bad_parameter.tokens < 4)).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_validation_reports_parameters_before_rows(backend):
    """One read covers both; a bad parameter tensor is reported first (as before, when it was
    checked before the rows)."""
    logits = torch.tensor([[0.0, NAN], [1.0, 2.0]])
    with pytest.raises(ValueError, match="top_p has values out of range"):
        rlfuse.sample(logits, top_p=torch.tensor([0.5, 0.0]), seed=0, backend=backend)
    with pytest.raises(ValueError, match=rf"rows \[0\] {ROW_ERROR}"):
        rlfuse.sample(logits, top_p=torch.tensor([0.5, 1.0]), seed=0, backend=backend)
