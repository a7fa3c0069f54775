"""Masked tokens never contribute (README promise), on every variant, path and backend.

Property: whatever a masked position holds — NaN, +-inf or huge values in its logits row, its
advantage, its old / reference / rollout log-probs or its old top-k — the loss, the metrics and the
gradient equal those of the same call with clean values there, and the masked rows' gradient is
exactly zero. The clean call is the oracle (its own correctness against float64 math is
tests/test_policy_loss.py's job): this checks the masking itself, independently of the formulas.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rlfuse
from rlfuse import LossConfig as C
from conftest import kernel_backends

CONFIGS = {
    "dapo": C.dapo(),
    "grpo_k3": C.grpo(),
    "gppo": C.gppo(),
    "cispo": C.cispo(),
    "sapo": C.sapo(),
    "reinforce_k2_entropy": C(loss="reinforce", kl="k2", kl_coef=0.1, entropy_coef=0.01),
    "seq_mask": C.dapo(rollout_correction="seq_mask", rollout_cap=3.0),
    "token_truncate": C.dapo(rollout_correction="token_truncate"),
    "gspo": C.gspo(kl="k3", kl_coef=0.05),
    "gspo_token": C(loss="gspo_token", clip_low=0.02, clip_high=0.03, aggregation="seq-mean-token-mean"),
    "gmpo": C.gmpo(),
    "clip_cov": C.clip_cov(cov_ratio=0.2, cov_lb=0.0, cov_ub=50.0),
    "kl_cov": C.kl_cov(cov_ratio=0.2),
    "entropy_minority": C.dapo(entropy_quantile=0.5),
    "troll": C.troll(troll_k=4),
    "troll_k1_entropy": C.troll(troll_k=4, kl="k1", kl_coef=0.1, entropy_coef=0.01),
}
POISONS = [float("nan"), float("inf"), float("-inf"), 3e38, -3e38]


def _inputs(seed, batch, seq, vocab, dtype):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(batch, seq, vocab, generator=g) * 2).to(dtype)
    tokens = torch.randint(0, vocab, (batch, seq), generator=g)
    current = torch.log_softmax(logits.double(), -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1).float()
    per_token = {
        "advantages": torch.randn(batch, seq, generator=g),
        "old_logprobs": current + 0.3 * torch.randn(batch, seq, generator=g),
        "ref_logprobs": current + 0.3 * torch.randn(batch, seq, generator=g),
        "rollout_logprobs": current + 0.3 * torch.randn(batch, seq, generator=g),
    }
    old_logits = logits.float() + 0.5 * torch.randn(logits.shape, generator=g)
    return logits, tokens, per_token, old_logits


def _run(logits, tokens, per_token, old_topk, mask, config, backend, path):
    leaf = logits.clone().requires_grad_(True)
    out = rlfuse.policy_loss(leaf, tokens, mask=mask, config=config, backend=backend, path=path,
                             old_topk=old_topk if config.loss == "troll" else None, **per_token)
    out.loss.backward()
    return out, leaf.grad


@pytest.mark.parametrize("backend", kernel_backends("cpu"))
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**31 - 1),
    shape=st.tuples(st.integers(1, 3), st.integers(1, 5), st.sampled_from([3, 17, 130])),
    name=st.sampled_from(sorted(CONFIGS)),
    path=st.sampled_from(["auto", "general"]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    poison=st.sampled_from(POISONS),
    poison_logits=st.sampled_from(["row", "token", "none"]),
    data=st.data(),
)
def test_masked_positions_never_contribute(backend, seed, shape, name, path, dtype, poison, poison_logits, data):
    batch, seq, vocab = shape
    config = CONFIGS[name]
    if config.loss == "troll" and backend == "torch" and dtype == torch.bfloat16:
        dtype = torch.float32
    logits, tokens, per_token, old_logits = _inputs(seed, batch, seq, vocab, dtype)
    flat_mask = data.draw(st.lists(st.booleans(), min_size=batch * seq, max_size=batch * seq))
    mask = torch.tensor(flat_mask).reshape(batch, seq)
    masked = ~mask
    old_topk = rlfuse.sparse_logprobs(old_logits, tokens, k=4, backend="torch")

    clean_out, clean_grad = _run(logits, tokens, per_token, old_topk, mask, config, backend, path)

    dirty_logits = logits.clone()
    if poison_logits == "row":
        dirty_logits[masked] = poison
    elif poison_logits == "token":
        dirty_logits[masked.nonzero(as_tuple=True) + (tokens[masked],)] = poison
    dirty = {k: torch.where(masked, torch.full_like(v, poison), v) for k, v in per_token.items()}
    dirty_ids = torch.where(masked.unsqueeze(-1), torch.full_like(old_topk.ids, vocab + 7), old_topk.ids)
    dirty_lp = torch.where(masked.unsqueeze(-1), torch.full_like(old_topk.logprobs, math.nan), old_topk.logprobs)
    dirty_topk = rlfuse.troll.SparseLogprobs(dirty_ids, dirty_lp, old_topk.count, vocab)
    out, grad = _run(dirty_logits, tokens, dirty, dirty_topk, mask, config, backend, path)

    assert torch.isfinite(out.loss), out.loss
    assert torch.isfinite(grad).all()
    assert (grad[masked] == 0).all()
    torch.testing.assert_close(out.loss, clean_out.loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, clean_grad, rtol=1e-6, atol=1e-7)
    for key, value in clean_out.metrics.items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(out.metrics[key], value, rtol=1e-6, atol=1e-7, equal_nan=True, msg=key)
    valid = mask
    torch.testing.assert_close(out.logprobs[valid], clean_out.logprobs[valid])


@pytest.mark.parametrize("backend", kernel_backends("cpu"))
def test_masked_nan_row_with_full_vocabulary_kl(backend):
    """The full-vocabulary KL penalty (ref_logits) masks the same way."""
    logits, tokens, per_token, _ = _inputs(7, 2, 4, 33, torch.float32)
    ref_logits = logits + 0.3
    mask = torch.tensor([[1, 1, 0, 1], [0, 1, 1, 1]], dtype=torch.bool)
    config = C.dapo(kl_full_coef=0.1)
    results = []
    for poison in (None, float("nan")):
        lg, rl = logits.clone(), ref_logits.clone()
        if poison is not None:
            lg[~mask] = poison
            rl[~mask] = poison
        leaf = lg.requires_grad_(True)
        out = rlfuse.policy_loss(leaf, tokens, per_token["advantages"], old_logprobs=per_token["old_logprobs"],
                                 mask=mask, config=config, backend=backend, ref_logits=rl)
        out.loss.backward()
        results.append((out.loss.detach(), leaf.grad, out.metrics["kl_full"]))
    (clean_loss, clean_grad, clean_kl), (loss, grad, kl) = results
    assert torch.isfinite(grad).all() and (grad[~mask] == 0).all()
    torch.testing.assert_close(loss, clean_loss)
    torch.testing.assert_close(grad, clean_grad)
    torch.testing.assert_close(kl, clean_kl)


@pytest.mark.parametrize("backend", kernel_backends("cpu"))
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), rows=st.integers(1, 6), vocab=st.sampled_from([2, 17, 130]),
       poison=st.sampled_from(POISONS), data=st.data())
def test_zero_upstream_gradient_rows_are_zero(backend, seed, rows, vocab, poison, data):
    """token_logprobs / entropy backward: a row whose upstream gradients are both 0 gets exactly 0,
    whatever its logits hold (the kernel-level half of the masking contract)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=g)
    zero_rows = torch.tensor(data.draw(st.lists(st.booleans(), min_size=rows, max_size=rows)))
    logits[zero_rows] = poison
    tokens = torch.randint(0, vocab, (rows,), generator=g)
    leaf = logits.requires_grad_(True)
    logp, entropy = rlfuse.token_logprobs(leaf, tokens, return_entropy=True, backend=backend)
    g_logp = torch.where(zero_rows, 0.0, torch.randn(rows, generator=g))
    g_entropy = torch.where(zero_rows, 0.0, torch.randn(rows, generator=g))
    torch.autograd.backward([logp, entropy], [g_logp, g_entropy])
    assert (leaf.grad[zero_rows] == 0).all()
    assert torch.isfinite(leaf.grad[~zero_rows]).all()
