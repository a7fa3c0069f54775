"""token_logprobs / entropy on every backend vs the float64 oracle: values and gradients."""

from __future__ import annotations

import pytest
import torch

import rlfuse
from _oracle import grad_tolerance, oracle, value_tolerance
from conftest import HAS_CUDA, kernel_backends

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _rows_for(target, vocab: int) -> int:
    # The Triton interpreter runs a kernel row by row in Python: keep its work small.
    if target == ("cpu", "triton"):
        return 3 if vocab > 5000 else 5
    return 9


def _random_case(generator, shape, vocab, dtype, scale=3.0):
    logits = (torch.randn(*shape, vocab, generator=generator) * scale).to(dtype)
    tokens = torch.randint(0, vocab, shape, generator=generator)
    grad_logp = torch.randn(shape, generator=generator)
    grad_entropy = torch.randn(shape, generator=generator)
    return logits, tokens, grad_logp, grad_entropy


def _run(logits, tokens, grad_logp, grad_entropy, target, temperature=1.0, **kwargs):
    """Runs on the target device and returns logp, entropy, grad on the CPU."""
    device, backend = target
    leaf = logits.detach().to(device).requires_grad_(True)
    logp, entropy = rlfuse.token_logprobs(
        leaf, tokens.to(device), temperature=temperature, return_entropy=True, backend=backend, **kwargs
    )
    torch.autograd.backward([logp, entropy], [grad_logp.to(device), grad_entropy.to(device)])
    return logp.detach().cpu(), entropy.detach().cpu(), leaf.grad.cpu()


def _check(logits, tokens, grad_logp, grad_entropy, target, temperature=1.0):
    logp, entropy, grad = _run(logits, tokens, grad_logp, grad_entropy, target, temperature)
    ref_logp, ref_entropy, ref_grad = oracle(logits, tokens, grad_logp, grad_entropy, temperature)
    assert logp.dtype == entropy.dtype == torch.float32
    assert grad.dtype == logits.dtype and grad.shape == logits.shape
    tol = value_tolerance(logits.shape[-1])
    torch.testing.assert_close(logp.double(), ref_logp, **tol)
    torch.testing.assert_close(entropy.double(), ref_entropy, **tol)
    torch.testing.assert_close(grad.double(), ref_grad, **grad_tolerance(logits.dtype, ref_grad))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("vocab", [1, 7, 1000, 4096 + 17])
def test_matches_oracle(target, dtype, vocab, generator):
    case = _random_case(generator, (_rows_for(target, vocab),), vocab, dtype)
    _check(*case, target)


def test_large_vocab_not_multiple_of_block(target, generator):
    case = _random_case(generator, (2,), 32768 + 17, torch.bfloat16)
    _check(*case, target)


@pytest.mark.parametrize("temperature", [0.6, 1.7])
def test_temperature(target, temperature, generator):
    case = _random_case(generator, (4,), 777, torch.float32)
    _check(*case, target, temperature=temperature)


def test_minus_inf_logits(target, generator):
    """Masked vocabulary entries (-inf) contribute nothing and get exactly zero gradient."""
    logits, tokens, g_logp, g_h = _random_case(generator, (5,), 1500, torch.float32)
    masked = torch.rand(logits.shape, generator=generator) < 0.3
    masked[:, 1400:] = True  # a whole trailing chunk of -inf
    masked[torch.arange(5), tokens] = False  # the chosen tokens stay finite
    logits = logits.masked_fill(masked, float("-inf"))
    _check(logits, tokens, g_logp, g_h, target)
    _, _, grad = _run(logits, tokens, g_logp, g_h, target)
    assert torch.all(grad[masked] == 0)


def test_single_row_and_leading_shapes(target, generator):
    _check(*_random_case(generator, (1,), 300, torch.float32), target)
    _check(*_random_case(generator, (2, 3), 300, torch.bfloat16), target)
    _check(*_random_case(generator, (), 300, torch.float32), target)


def test_strided_view_is_read_in_place(target, generator):
    """logits[:, :-1] of a [B, T, V] tensor (the usual next-token shift) without a copy."""
    full, tokens, g_logp, g_h = _random_case(generator, (2, 4), 513, torch.bfloat16)
    view = full[:, :-1]
    assert not view.is_contiguous()
    _check(view, tokens[:, :-1], g_logp[:, :-1], g_h[:, :-1], target)
    # Transposed leading dims (two non-mergeable strides) are addressed directly as well.
    _check(full.transpose(0, 1), tokens.T, g_logp.T, g_h.T, target)


def test_int32_tokens(target, generator):
    logits, tokens, g_logp, g_h = _random_case(generator, (4,), 100, torch.float32)
    _check(logits, tokens.int(), g_logp, g_h, target)


def test_inplace_backward_writes_gradient_into_logits(target, generator):
    logits, tokens, g_logp, g_h = _random_case(generator, (2, 3), 600, torch.bfloat16)
    _, _, expected = _run(logits, tokens, g_logp, g_h, target)

    device, backend = target
    hidden = logits.float().to(device).requires_grad_(True)  # the logits come out of an upstream op
    produced = hidden.to(torch.bfloat16)
    storage = produced.data_ptr()
    logp, entropy = rlfuse.token_logprobs(produced, tokens.to(device), return_entropy=True, backend=backend,
                                          inplace_backward=True)
    torch.autograd.backward([logp, entropy], [g_logp.to(device), g_h.to(device)])
    assert produced.data_ptr() == storage
    torch.testing.assert_close(produced.cpu(), expected, atol=0, rtol=0)  # the buffer holds the gradient
    torch.testing.assert_close(hidden.grad.cpu(), expected.float(), atol=0, rtol=0)


def test_entropy_function(target, generator):
    logits, tokens, _, g_h = _random_case(generator, (3,), 2000, torch.float32)
    device, backend = target
    leaf = logits.to(device).requires_grad_(True)
    entropy = rlfuse.entropy(leaf, temperature=0.8, backend=backend)
    entropy.backward(g_h.to(device))
    _, ref_entropy, ref_grad = oracle(logits, tokens, torch.zeros(3), g_h, 0.8)
    torch.testing.assert_close(entropy.cpu().double(), ref_entropy, **value_tolerance(2000))
    torch.testing.assert_close(leaf.grad.cpu().double(), ref_grad, **grad_tolerance(torch.float32, ref_grad))


def test_logp_only_backward(target, generator):
    logits, tokens, g_logp, _ = _random_case(generator, (4,), 900, torch.float32)
    device, backend = target
    leaf = logits.to(device).requires_grad_(True)
    rlfuse.token_logprobs(leaf, tokens.to(device), backend=backend).backward(g_logp.to(device))
    _, _, ref_grad = oracle(logits, tokens, g_logp, torch.zeros(4))
    torch.testing.assert_close(leaf.grad.cpu().double(), ref_grad, **grad_tolerance(torch.float32, ref_grad))


def test_nan_row_gives_nan_outputs_only_there(target, generator):
    logits, tokens, g_logp, g_h = _random_case(generator, (3,), 300, torch.float32)
    logits[1, 17] = float("nan")
    logp, entropy, grad = _run(logits, tokens, g_logp, g_h, target)
    assert logp[1].isnan() and entropy[1].isnan() and grad[1].isnan().all()
    assert torch.isfinite(logp[[0, 2]]).all() and torch.isfinite(grad[[0, 2]]).all()


def test_deterministic(target, generator):
    case = _random_case(generator, (4,), 3000, torch.bfloat16)
    first = _run(*case, target)
    second = _run(*case, target)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_empty_batch(target, generator):
    device, backend = target
    logits = torch.randn(0, 50, generator=generator).to(device).requires_grad_(True)
    logp = rlfuse.token_logprobs(logits, torch.zeros(0, dtype=torch.long, device=device), backend=backend)
    logp.sum().backward()
    assert logp.shape == (0,) and logits.grad.shape == (0, 50)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_many_rows_and_64bit_offsets(backend):
    """More rows than one grid dimension holds, and N*V > 2^31 (32-bit offsets would wrap)."""
    if backend not in kernel_backends("cuda"):
        pytest.skip(f"{backend} not available")
    rows, vocab = 70_000, 30_730  # 2.15e9 elements, 4.3 GB in bf16
    generator = torch.Generator(device="cuda").manual_seed(3)
    logits = torch.randn(rows, vocab, device="cuda", dtype=torch.bfloat16, generator=generator)
    tokens = torch.randint(0, vocab, (rows,), device="cuda", generator=generator)
    logp, entropy = rlfuse.token_logprobs(logits, tokens, return_entropy=True, backend=backend)
    check_rows = torch.tensor([0, 1, 65_535, 65_536, rows - 2, rows - 1], device="cuda")
    ref_logp, ref_entropy = rlfuse.reference.token_logprobs_reference(
        logits[check_rows].double(), tokens[check_rows])
    tol = value_tolerance(vocab)
    torch.testing.assert_close(logp[check_rows].double(), ref_logp, **tol)
    torch.testing.assert_close(entropy[check_rows].double(), ref_entropy, **tol)


def test_float64_logits_backward():
    """float64 logits (the torch backend) take fp32 upstream gradients in their backward."""
    x = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    tokens = torch.tensor([1, 2, 3])
    logp, entropy = rlfuse.token_logprobs(x, tokens, return_entropy=True)
    (logp.sum() + entropy.sum()).backward()
    y = x.detach().clone().requires_grad_(True)
    log_p = torch.log_softmax(y, -1)
    (log_p.gather(-1, tokens[:, None]).sum() - (log_p.exp() * log_p).sum()).backward()
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-6, atol=1e-7)
