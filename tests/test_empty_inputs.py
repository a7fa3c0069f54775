"""Zero tokens: every op returns well-defined empty results (a zero loss), never an obscure error.

Property, over every shape with a zero-sized leading dimension and every backend: outputs have the
shapes the same call has with tokens, the loss is exactly 0 and differentiable, the backward gives
an empty gradient, and metrics are defined (counts 0, means 0, extremes NaN).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import rlfuse
from rlfuse import LossConfig as C
from conftest import kernel_backends

BACKENDS = kernel_backends("cpu")
LEADS = st.sampled_from([(0,), (0, 3), (2, 0), (0, 0)])


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=12, deadline=None)
@given(lead=LEADS, vocab=st.sampled_from([1, 7, 300]), dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_row_ops_on_zero_rows(backend, lead, vocab, dtype):
    logits = torch.randn(*lead, vocab).to(dtype).requires_grad_(True)
    other = torch.randn(*lead, vocab).to(dtype)
    tokens = torch.zeros(lead, dtype=torch.long)
    logp, entropy = rlfuse.token_logprobs(logits, tokens, return_entropy=True, backend=backend)
    assert logp.shape == entropy.shape == lead and logp.dtype == torch.float32
    kl = rlfuse.kl_divergence(logits, other, backend=backend)
    assert kl.shape == lead
    (logp.sum() + entropy.sum() + kl.sum() + rlfuse.entropy(logits, backend=backend).sum()).backward()
    assert logits.grad.shape == logits.shape
    top = rlfuse.sparse_logprobs(logits.detach(), tokens, k=4, backend=backend)
    assert top.ids.shape == lead + (4,) and top.count.shape == lead
    drawn = rlfuse.sample(logits.detach(), top_k=3, top_p=0.9, seed=1, backend=backend)
    assert drawn.tokens.shape == drawn.logprobs.shape == drawn.entropy.shape == lead


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", [C.dapo(), C.grpo(), C.gspo(), C.gmpo(), C.clip_cov(), C.kl_cov(),
                                    C.dapo(entropy_quantile=0.2), C.dapo(rollout_correction="seq_mask"),
                                    C.dr_grpo(), C.troll(troll_k=4)], ids=["dapo", "grpo", "gspo", "gmpo", "clip_cov", "kl_cov", "entropy_minority", "seq_mask", "dr_grpo", "troll"])
@pytest.mark.parametrize("lead", [(0,), (0, 5), (3, 0)], ids=str)
def test_policy_loss_on_zero_tokens(backend, config, lead):
    vocab = 11
    logits = torch.randn(*lead, vocab, requires_grad=True)
    tokens = torch.zeros(lead, dtype=torch.long)
    zeros = torch.zeros(lead)
    extra = {"old_topk": rlfuse.sparse_logprobs(logits.detach(), tokens, k=4)} if config.loss == "troll" else {}
    if config.aggregation == "seq-mean-token-sum-norm" and len(lead) == 1:
        config = config.replace(norm_length=16.0)
    out = rlfuse.policy_loss(logits, tokens, zeros, old_logprobs=zeros, ref_logprobs=zeros, rollout_logprobs=zeros,
                             config=config, backend=backend, **extra)
    assert out.loss.shape == () and out.loss.item() == 0.0
    assert out.logprobs.shape == out.entropy.shape == lead
    out.loss.backward()
    assert logits.grad is None or (logits.grad.shape == logits.shape)
    assert out.metrics["valid_tokens"].item() == 0
    for name, value in out.metrics.items():
        if isinstance(value, torch.Tensor):
            assert value.shape == (), name
            if name.startswith(("ratio_min", "ratio_max", "rollout_weight_min", "rollout_weight_max")):
                assert math.isnan(value.item()), name
            else:
                assert value.item() == 0.0, name
