"""inplace_backward=True on any view of the logits: the gradient is right, or a clear ValueError.

Property, over random views (row slices and steps, transposed leading dims, a strided vocabulary,
expanded / stride-0 rows, extra leading dims): the backward writes the float64-correct gradient
into the view's own elements and nowhere else in the buffer — or the call raises a ValueError that
names inplace_backward before anything runs. It never writes outside the view (the old crash) and
never returns a silently wrong gradient (the old strided case).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rlfuse
from _oracle import grad_tolerance, oracle
from _policy_oracle import oracle_policy_loss
from conftest import kernel_backends

VIEWS = ["contiguous", "drop_last_step", "row_step", "transpose", "select_middle", "vocab_step", "vocab_slice",
         "expand_rows", "expand_middle", "row_step_transpose"]
# Views whose elements each have their own memory and whose rows are addressable by two strides:
# these must work in place (the others may raise).
MUST_WORK = {"contiguous", "drop_last_step", "row_step", "transpose", "select_middle", "vocab_slice",
             "row_step_transpose"}


def _view(kind, buffer):
    """A [B', T', V'] view of ``buffer`` ([B, T + 1, 2 V])."""
    b, t1, v2 = buffer.shape
    v = v2 // 2
    if kind == "contiguous":
        return buffer[:, :-1]
    if kind == "drop_last_step":
        return buffer[:, :-1, :v]
    if kind == "row_step":
        return buffer[:, ::2, :v]
    if kind == "transpose":
        return buffer[:, :-1, :v].transpose(0, 1)
    if kind == "select_middle":
        return buffer[:, 1:, v:]
    if kind == "vocab_step":
        return buffer[:, :-1, ::2]
    if kind == "vocab_slice":
        return buffer[:, :-1, 3:v + 3]
    if kind == "expand_rows":
        return buffer[:1, :1, :v].expand(b, t1 - 1, v)  # every row is one row
    if kind == "expand_middle":
        return buffer[:, :1, :v].expand(b, t1 - 1, v)
    if kind == "row_step_transpose":
        return buffer[::2, ::2, :v].transpose(0, 1)
    raise AssertionError(kind)


def _run(op, view, tokens, backend, grad_weights):
    if op == "token_logprobs":
        logp, entropy = rlfuse.token_logprobs(view, tokens, return_entropy=True, backend=backend,
                                              inplace_backward=True)
        torch.autograd.backward([logp, entropy], list(grad_weights))
        return
    old = grad_weights[0]
    config = rlfuse.LossConfig.dapo() if op == "fused" else rlfuse.LossConfig.gspo()
    out = rlfuse.policy_loss(view, tokens, grad_weights[1], old_logprobs=old, config=config, backend=backend,
                             inplace_backward=True)
    out.loss.backward()


def _expected(op, values, tokens, grad_weights):
    if op == "token_logprobs":
        return oracle(values, tokens, *grad_weights)[2]
    config = rlfuse.LossConfig.dapo() if op == "fused" else rlfuse.LossConfig.gspo()
    return oracle_policy_loss(values, tokens, grad_weights[1], old=grad_weights[0], config=config)[1]


@pytest.mark.parametrize("backend", kernel_backends("cpu"))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31 - 1), kind=st.sampled_from(VIEWS),
       op=st.sampled_from(["token_logprobs", "fused", "general"]),
       sizes=st.tuples(st.integers(1, 3), st.integers(2, 5), st.sampled_from([5, 64, 133])),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_inplace_backward_writes_only_the_view(backend, seed, kind, op, sizes, dtype):
    if op == "fused" and backend == "torch":
        op = "general"  # the torch backend has no fused path
    b, t, v = sizes
    g = torch.Generator().manual_seed(seed)
    shape = (b, t + 1, 2 * v)
    buffer = (torch.randn(shape, generator=g) * 2).to(dtype)
    original = buffer.clone()
    # Which buffer elements the view covers: the same view of an index tensor.
    index = torch.arange(buffer.numel()).reshape(shape)
    covered = torch.zeros(buffer.numel(), dtype=torch.bool)
    covered[_view(kind, index).reshape(-1)] = True

    view = _view(kind, buffer)
    values = view.clone()
    tokens = torch.randint(0, view.shape[-1], view.shape[:-1], generator=g)
    grad_weights = (torch.randn(view.shape[:-1], generator=g) - 2.0, torch.randn(view.shape[:-1], generator=g))
    leaf = view.requires_grad_(True)
    try:
        _run(op, leaf, tokens, backend, grad_weights)
    except ValueError as error:
        assert "inplace_backward" in str(error)
        assert kind not in MUST_WORK, f"{kind} must work in place: {error}"
        assert torch.equal(buffer, original), "a rejected call must not have written anything"
        return
    assert kind in MUST_WORK, f"{kind} was accepted"
    expected = _expected(op, values, tokens, grad_weights)
    torch.testing.assert_close(leaf.grad.double(), expected, **grad_tolerance(dtype, expected))
    # The gradient went into the view's own elements, and nothing else in the buffer moved.
    torch.testing.assert_close(view.detach().double(), expected, **grad_tolerance(dtype, expected))
    assert torch.equal(buffer.reshape(-1)[~covered], original.reshape(-1)[~covered])


def test_overlapping_view_is_a_clear_error_not_a_crash():
    """The issue's repro: an expanded, then strided, non-leaf view."""
    base = torch.randn(1, 2048, requires_grad=True)
    x = (base * 1).expand(4096, 2048)[:, ::2]
    n = x.shape[0]
    with pytest.raises(ValueError, match="inplace_backward"):
        rlfuse.policy_loss(x, torch.zeros(n, dtype=torch.long), torch.randn(n), old_logprobs=torch.zeros(n),
                           inplace_backward=True, backend="cpu")
    y = (base * 1).expand(64, 2048)
    with pytest.raises(ValueError, match="share memory"):
        rlfuse.token_logprobs(y, torch.zeros(64, dtype=torch.long), inplace_backward=True, backend="cpu")
