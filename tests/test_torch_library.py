"""The ops are proper torch.library ops: opcheck, fake tensors, torch.compile(fullgraph=True)."""

import pytest
import torch

import rlfuse
from rlfuse.ops import token_logprobs as ops
from conftest import kernel_backends

BACKENDS = kernel_backends("cpu")


def _inputs(dtype=torch.float32, requires_grad=True):
    generator = torch.Generator().manual_seed(7)
    logits = torch.randn(2, 3, 37, generator=generator).to(dtype).requires_grad_(requires_grad)
    tokens = torch.randint(0, 37, (2, 3), generator=generator)
    return logits, tokens


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_forward(backend):
    logits, tokens = _inputs()
    torch.library.opcheck(ops.token_logprobs_fwd, (logits, tokens, 0.9, backend, False))


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_backward_ops(backend):
    logits, tokens = _inputs(requires_grad=False)
    logp, entropy, lse = ops.token_logprobs_fwd(logits, tokens, 0.9, backend, False)
    grads = (torch.randn(2, 3), torch.randn(2, 3))
    args = (tokens, lse, entropy, *grads, 0.9, backend)
    torch.library.opcheck(ops.token_logprobs_bwd, (logits, *args))
    torch.library.opcheck(ops.token_logprobs_bwd_inplace, (logits.clone(), *args))


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("inplace_backward", [False, True])
def test_compile_fullgraph_matches_eager(backend, inplace_backward):
    def loss_fn(logits, tokens):
        logp, entropy = rlfuse.token_logprobs(
            logits, tokens, temperature=0.7, return_entropy=True, backend=backend,
            inplace_backward=inplace_backward,
        )
        return -(logp * 2.0).mean() - 0.01 * entropy.mean()

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (loss_fn, compiled):
        hidden, tokens = _inputs()
        hidden.grad = None
        logits = hidden * 1.0  # a non-leaf, as in a model
        loss = fn(logits, tokens)
        loss.backward()
        results.append((loss.detach(), hidden.grad))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])


def test_compile_inductor_fullgraph():
    """The default inductor backend also traces the op without graph breaks."""
    def loss_fn(logits, tokens):
        return -rlfuse.token_logprobs(logits, tokens, backend="cpu").sum()

    logits, tokens = _inputs()
    eager_loss = loss_fn(logits, tokens)
    (eager_grad,) = torch.autograd.grad(eager_loss, logits)
    compiled_loss = torch.compile(loss_fn, fullgraph=True)(logits, tokens)
    (compiled_grad,) = torch.autograd.grad(compiled_loss, logits)
    torch.testing.assert_close(compiled_loss, eager_loss)
    torch.testing.assert_close(compiled_grad, eager_grad)


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        logits = torch.empty(5, 7, 11, dtype=torch.bfloat16)
        tokens = torch.empty(5, 7, dtype=torch.int64)
        logp, entropy, lse = ops.token_logprobs_fwd(logits, tokens, 1.0, "cpu", False)
    assert logp.shape == entropy.shape == lse.shape == (5, 7)
    assert logp.dtype == torch.float32
