"""A policy-loss batch, one rlfuse.policy_loss call with its gradient, and the comparison with the
float64 oracle: shared by the policy-loss test modules."""

from __future__ import annotations

import torch

import rlfuse
from rlfuse import reference as ref
from _policy_oracle import oracle_policy_loss


def make_batch(generator, batch=3, seq=7, vocab=301, dtype=torch.float32, per_sequence_adv=False, old_spread=0.4,
               rollout_spread=0.3, mask_drop=0.25, peak=0.0):
    """Random logits and tokens; old / reference / rollout log-probs near the current ones (so some
    ratios clip and some don't); a mask that keeps every sequence's first token. ``peak``: chosen
    tokens made up to ~0.9 likely."""
    logits = (torch.randn(batch, seq, vocab, generator=generator) * 2).to(dtype)
    tokens = torch.randint(0, vocab, (batch, seq), generator=generator)
    if peak:
        logits.scatter_add_(-1, tokens[..., None], peak * torch.rand(batch, seq, 1, generator=generator))
    with torch.no_grad():
        current, _ = ref.token_logprobs_reference(logits.double(), tokens)
    old = (current + old_spread * torch.randn(batch, seq, generator=generator, dtype=torch.float64)).float()
    ref_lp = (current + 0.3 * torch.randn(batch, seq, generator=generator, dtype=torch.float64)).float()
    rollout = (old + rollout_spread * torch.randn(batch, seq, generator=generator)).float()
    advantages = torch.randn(batch if per_sequence_adv else (batch, seq), generator=generator)
    mask = torch.rand(batch, seq, generator=generator) > mask_drop
    mask[:, 0] = True
    return dict(logits=logits, tokens=tokens, advantages=advantages, old_logprobs=old, ref_logprobs=ref_lp,
                rollout_logprobs=rollout, mask=mask)


def run(batch, config, backend, path="auto", inplace=False, **overrides):
    """``policy_loss`` on a copy of the batch's logits (None entries left out), then its backward:
    (output, logits gradient)."""
    logits = batch["logits"].detach().clone().requires_grad_(True)
    source = logits * 1.0 if inplace else logits  # in-place needs a non-leaf buffer
    kwargs = {"inplace_backward": inplace, **batch, **overrides}
    kwargs = {k: v for k, v in kwargs.items() if k != "logits" and v is not None}
    out = rlfuse.policy_loss(source, config=config, backend=backend, path=path, **kwargs)
    out.loss.backward()
    return out, logits.grad


def oracle(batch, config, **overrides):
    b = {**batch, **overrides}
    return oracle_policy_loss(b["logits"], b["tokens"], b["advantages"], b["old_logprobs"], b["ref_logprobs"],
                              b["rollout_logprobs"], b["mask"], config=config)


def assert_matches(out, grad, expected_loss, expected_grad, eps=2e-6, floor=1e-8):
    """The loss to 2e-5; the gradient to ``eps`` relative (fp32: a few ulp of the log-softmax; bf16:
    8e-3) of its largest entry."""
    torch.testing.assert_close(out.loss.double(), expected_loss, atol=2e-5, rtol=2e-5)
    scale = expected_grad.abs().max().item()
    torch.testing.assert_close(grad.double(), expected_grad, atol=eps * scale + floor, rtol=eps)


def check_against_oracle(batch, config, backend, path):
    """``policy_loss`` takes ``path`` ("fused": the fused path on a kernel backend, the general one on
    backend="torch") and matches the oracle."""
    out, grad = run(batch, config, backend)
    assert out.metrics["path"] == ("general" if backend == "torch" else path)
    assert_matches(out, grad, *oracle(batch, config))


def dapo_k3_problem(dtype, seed=0, rows=6, vocab=41):
    """DAPO with a k3 KL on ``rows`` random packed rows: (logits, tokens, advantages, the other
    ``policy_loss`` arguments, the oracle's logits gradient)."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, vocab, generator=g) * 2).to(dtype)
    tokens = torch.randint(0, vocab, (rows,), generator=g)
    advantages = torch.randn(rows, generator=g)
    old = torch.log_softmax(logits.double(), -1).gather(-1, tokens[:, None]).squeeze(-1).float() + 0.3 * torch.randn(
        rows, generator=g)
    config = rlfuse.LossConfig.dapo(kl="k3", kl_coef=0.1)
    kwargs = dict(old_logprobs=old, ref_logprobs=old - 0.1, config=config)
    _, expected = oracle_policy_loss(logits, tokens, advantages, old=old, ref_lp=old - 0.1, config=config)
    return logits, tokens, advantages, kwargs, expected
