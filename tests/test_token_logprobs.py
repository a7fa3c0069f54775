"""token_logprobs / entropy on every backend vs the float64 oracle: values and gradients."""

from __future__ import annotations

import pytest
import torch

import rlfuse
from _oracle import grad_tolerance, oracle, value_tolerance
from conftest import kernel_backends

BACKENDS = kernel_backends("cpu")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _rows_for(backend: str, vocab: int) -> int:
    # The Triton interpreter runs a kernel row by row in Python: keep its work small.
    if backend == "triton":
        return 3 if vocab > 5000 else 5
    return 9


def _random_case(generator, shape, vocab, dtype, scale=3.0):
    logits = (torch.randn(*shape, vocab, generator=generator) * scale).to(dtype)
    tokens = torch.randint(0, vocab, shape, generator=generator)
    grad_logp = torch.randn(shape, generator=generator)
    grad_entropy = torch.randn(shape, generator=generator)
    return logits, tokens, grad_logp, grad_entropy


def _run(logits, tokens, grad_logp, grad_entropy, backend, temperature=1.0, **kwargs):
    leaf = logits.detach().clone().requires_grad_(True)
    logp, entropy = rlfuse.token_logprobs(
        leaf, tokens, temperature=temperature, return_entropy=True, backend=backend, **kwargs
    )
    torch.autograd.backward([logp, entropy], [grad_logp, grad_entropy])
    return logp.detach(), entropy.detach(), leaf.grad


def _check(logits, tokens, grad_logp, grad_entropy, backend, temperature=1.0):
    logp, entropy, grad = _run(logits, tokens, grad_logp, grad_entropy, backend, temperature)
    ref_logp, ref_entropy, ref_grad = oracle(logits, tokens, grad_logp, grad_entropy, temperature)
    assert logp.dtype == entropy.dtype == torch.float32
    assert grad.dtype == logits.dtype and grad.shape == logits.shape
    tol = value_tolerance(logits.shape[-1])
    torch.testing.assert_close(logp.double(), ref_logp, **tol)
    torch.testing.assert_close(entropy.double(), ref_entropy, **tol)
    torch.testing.assert_close(grad.double(), ref_grad, **grad_tolerance(logits.dtype, ref_grad))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("vocab", [1, 7, 1000, 4096 + 17])
def test_matches_oracle(backend, dtype, vocab, generator):
    case = _random_case(generator, (_rows_for(backend, vocab),), vocab, dtype)
    _check(*case, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_vocab_not_multiple_of_block(backend, generator):
    case = _random_case(generator, (2,), 32768 + 17, torch.bfloat16)
    _check(*case, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [0.6, 1.7])
def test_temperature(backend, temperature, generator):
    case = _random_case(generator, (4,), 777, torch.float32)
    _check(*case, backend, temperature=temperature)


@pytest.mark.parametrize("backend", BACKENDS)
def test_minus_inf_logits(backend, generator):
    """Masked vocabulary entries (-inf) contribute nothing and get exactly zero gradient."""
    logits, tokens, g_logp, g_h = _random_case(generator, (5,), 1500, torch.float32)
    masked = torch.rand(logits.shape, generator=generator) < 0.3
    masked[:, 1400:] = True  # a whole trailing chunk of -inf
    masked[torch.arange(5), tokens] = False  # the chosen tokens stay finite
    logits = logits.masked_fill(masked, float("-inf"))
    _check(logits, tokens, g_logp, g_h, backend)
    _, _, grad = _run(logits, tokens, g_logp, g_h, backend)
    assert torch.all(grad[masked] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_row_and_leading_shapes(backend, generator):
    _check(*_random_case(generator, (1,), 300, torch.float32), backend)
    _check(*_random_case(generator, (2, 3), 300, torch.bfloat16), backend)
    _check(*_random_case(generator, (), 300, torch.float32), backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_view_is_read_in_place(backend, generator):
    """logits[:, :-1] of a [B, T, V] tensor (the usual next-token shift) without a copy."""
    full, tokens, g_logp, g_h = _random_case(generator, (2, 4), 513, torch.bfloat16)
    view = full[:, :-1]
    assert not view.is_contiguous()
    _check(view, tokens[:, :-1], g_logp[:, :-1], g_h[:, :-1], backend)
    # Transposed leading dims (two non-mergeable strides) are addressed directly as well.
    _check(full.transpose(0, 1), tokens.T, g_logp.T, g_h.T, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_int32_tokens(backend, generator):
    logits, tokens, g_logp, g_h = _random_case(generator, (4,), 100, torch.float32)
    _check(logits, tokens.int(), g_logp, g_h, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_backward_writes_gradient_into_logits(backend, generator):
    logits, tokens, g_logp, g_h = _random_case(generator, (2, 3), 600, torch.bfloat16)
    _, _, expected = _run(logits, tokens, g_logp, g_h, backend)

    hidden = logits.float().requires_grad_(True)  # the logits come out of an upstream op
    produced = hidden.to(torch.bfloat16)
    storage = produced.data_ptr()
    logp, entropy = rlfuse.token_logprobs(produced, tokens, return_entropy=True, backend=backend,
                                          inplace_backward=True)
    torch.autograd.backward([logp, entropy], [g_logp, g_h])
    assert produced.data_ptr() == storage
    torch.testing.assert_close(produced, expected, atol=0, rtol=0)  # the buffer now holds the gradient
    torch.testing.assert_close(hidden.grad, expected.float(), atol=0, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_entropy_function(backend, generator):
    logits, tokens, _, g_h = _random_case(generator, (3,), 2000, torch.float32)
    leaf = logits.clone().requires_grad_(True)
    entropy = rlfuse.entropy(leaf, temperature=0.8, backend=backend)
    entropy.backward(g_h)
    _, ref_entropy, ref_grad = oracle(logits, tokens, torch.zeros(3), g_h, 0.8)
    torch.testing.assert_close(entropy.double(), ref_entropy, **value_tolerance(2000))
    torch.testing.assert_close(leaf.grad.double(), ref_grad, **grad_tolerance(torch.float32, ref_grad))


@pytest.mark.parametrize("backend", BACKENDS)
def test_logp_only_backward(backend, generator):
    logits, tokens, g_logp, _ = _random_case(generator, (4,), 900, torch.float32)
    leaf = logits.clone().requires_grad_(True)
    rlfuse.token_logprobs(leaf, tokens, backend=backend).backward(g_logp)
    _, _, ref_grad = oracle(logits, tokens, g_logp, torch.zeros(4))
    torch.testing.assert_close(leaf.grad.double(), ref_grad, **grad_tolerance(torch.float32, ref_grad))


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_row_gives_nan_outputs_only_there(backend, generator):
    logits, tokens, g_logp, g_h = _random_case(generator, (3,), 300, torch.float32)
    logits[1, 17] = float("nan")
    logp, entropy, grad = _run(logits, tokens, g_logp, g_h, backend)
    assert logp[1].isnan() and entropy[1].isnan() and grad[1].isnan().all()
    assert torch.isfinite(logp[[0, 2]]).all() and torch.isfinite(grad[[0, 2]]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic(backend, generator):
    case = _random_case(generator, (4,), 3000, torch.bfloat16)
    first = _run(*case, backend)
    second = _run(*case, backend)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_empty_batch(generator):
    logits = torch.randn(0, 50, generator=generator, requires_grad=True)
    logp = rlfuse.token_logprobs(logits, torch.zeros(0, dtype=torch.long))
    logp.sum().backward()
    assert logp.shape == (0,) and logits.grad.shape == (0, 50)
