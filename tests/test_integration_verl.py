"""rlfuse vs verl's own code (verl.trainer.ppo.core_algos, verl.utils.torch_functional) on CPU.

verl's real ``compute_policy_loss_*`` functions run on log-probs from verl's own helper; rlfuse's
``policy_loss`` runs on the logits with ``loss_config_from_verl``: losses and logit gradients agree.
The drop-in helpers agree with verl's; the registered losses run through verl's registry.
"""

from __future__ import annotations

import pytest

pytest.importorskip("verl", reason="verl is not installed (pip install 'rlfuse[verl]'; see requirements-dev.txt)")

import torch  # noqa: E402

import rlfuse  # noqa: E402

core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")
verl_F = pytest.importorskip("verl.utils.torch_functional")
rv = pytest.importorskip("rlfuse.integrations.verl")

B, T, V = 4, 9, 97


def _actor_config(**overrides):
    from verl.workers.config import ActorConfig

    fields = dict(strategy="fsdp", clip_ratio=0.2, clip_ratio_low=0.2, clip_ratio_high=0.28,
                  ppo_micro_batch_size_per_gpu=1, rollout_n=1)
    fields.update(overrides)
    return ActorConfig(**fields)


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g) * 2
    tokens = torch.randint(0, V, (B, T), generator=g)
    with torch.no_grad():
        current = torch.log_softmax(logits, -1).gather(-1, tokens[..., None])[..., 0]
    old = current + 0.3 * torch.randn(B, T, generator=g)
    mask = (torch.arange(T)[None] < torch.tensor([9, 6, 3, 7])[:, None]).float()
    advantages = torch.randn(B, generator=g)[:, None].expand(B, T).contiguous()
    return logits, tokens, old, mask, advantages


CASES = [
    ("vanilla", "token-mean"), ("vanilla", "seq-mean-token-mean"), ("vanilla", "seq-mean-token-sum"),
    ("vanilla", "seq-mean-token-sum-norm"), ("vanilla", "token-sum"), ("gspo", "seq-mean-token-mean"),
    ("gspo", "token-mean"), ("sapo", "seq-mean-token-mean"), ("cispo", "token-mean"), ("geo_mean", "token-mean"),
    ("gpg", "token-mean"),
]


@pytest.mark.parametrize("loss_mode, agg", CASES)
def test_policy_loss_matches_verl(loss_mode, agg):
    config = _actor_config(tau_pos=1.0, tau_neg=1.05) if loss_mode == "sapo" else _actor_config()
    logits, tokens, old, mask, advantages = _inputs()
    # verl: its own log-prob helper, then its registered loss function
    verl_logits = logits.clone().requires_grad_(True)
    log_prob = verl_F.logprobs_from_logits(verl_logits, tokens)
    verl_loss, _ = core_algos.get_policy_loss_fn(loss_mode)(old, log_prob, advantages, mask, agg, config, None)
    verl_loss.backward()
    # rlfuse: straight from the logits
    our_logits = logits.clone().requires_grad_(True)
    cfg = rv.loss_config_from_verl(config, loss_mode, agg, response_length=T, response_mask=mask)
    out = rlfuse.policy_loss(our_logits, tokens, advantages, old_logprobs=old, mask=mask, config=cfg)
    out.loss.backward()
    torch.testing.assert_close(out.loss, verl_loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(our_logits.grad, verl_logits.grad, rtol=1e-4, atol=1e-6)
    assert verl_logits.grad.abs().max() > 0


def test_helpers_match_verl():
    logits, tokens, _, _, _ = _inputs(1)
    for ours, theirs in ((rv.logprobs_from_logits, verl_F.logprobs_from_logits),
                         (rv.logprobs_from_logits_v2, verl_F.logprobs_from_logits_v2)):
        a, b = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
        x, y = ours(a, tokens), theirs(b, tokens)
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
        (x * torch.linspace(-1, 1, x.numel()).view_as(x)).sum().backward()
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)
    for ours, theirs in ((rv.entropy_from_logits, verl_F.entropy_from_logits),
                         (rv.entropy_from_logits_with_chunking, verl_F.entropy_from_logits_with_chunking)):
        a, b = logits.view(-1, V).clone().requires_grad_(True), logits.view(-1, V).clone().requires_grad_(True)
        x, y = ours(a), theirs(b)
        torch.testing.assert_close(x, y.float(), rtol=1e-5, atol=1e-5)
        x.sum().backward()
        y.sum().backward()
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)


def test_patch_torch_functional():
    original = verl_F.entropy_from_logits
    undo = rv.patch_torch_functional()
    try:
        assert verl_F.entropy_from_logits is rv.entropy_from_logits
        assert verl_F.logprobs_from_logits is rv.logprobs_from_logits
    finally:
        undo()
    assert verl_F.entropy_from_logits is original


@pytest.mark.parametrize("shape, temperature", [((2, 9), 1.0), ((13,), 0.7)])
def test_fused_linear_matches_verl_fused_linear_for_ppo(shape, temperature):
    """rlfuse's FusedLinearForPPO / linear_cross_entropy vs verl's own FusedLinearForPPO (its torch
    implementation runs on CPU): log-probs, entropy and the gradients of hidden and weight."""
    from verl.utils.experimental.torch_functional import FusedLinearForPPO as VerlFusedLinear

    gen = torch.Generator().manual_seed(3)
    dim, vocab = 24, 301
    hidden = torch.randn(*shape, dim, generator=gen)
    weight = torch.randn(vocab, dim, generator=gen) * 0.4
    ids = torch.randint(0, vocab, shape, generator=gen)
    g_logp, g_entropy = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    results = []
    for module in (VerlFusedLinear(chunk_size=4), rv.FusedLinearForPPO(chunk_size=4), None):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        if module is None:
            logp, entropy = rv.linear_cross_entropy(h, w, ids, temperature)
        else:
            logp, entropy = module(h, w, ids, temperature)
        torch.autograd.backward([logp, entropy], [g_logp, g_entropy])
        results.append((logp.detach(), entropy.detach().float(), h.grad, w.grad))
    expected = results[0]
    for got in results[1:]:
        for a, b, name in zip(got, expected, ("log_probs", "entropy", "grad hidden", "grad weight")):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_patch_fused_kernels():
    import verl.utils.experimental.torch_functional as verl_exp
    import verl.utils.kernel.linear_cross_entropy as verl_lce

    original = verl_lce.linear_cross_entropy
    undo = rv.patch_fused_kernels()
    try:
        assert verl_lce.linear_cross_entropy is rv.linear_cross_entropy
        assert verl_exp.FusedLinearForPPO is rv.FusedLinearForPPO
    finally:
        undo()
    assert verl_lce.linear_cross_entropy is original
    with pytest.raises(ValueError, match="reduction"):
        rv.linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4), torch.zeros(3, dtype=torch.int64),
                                reduction="mean")


def test_registered_losses():
    names = rv.register_policy_losses(prefix="rlfuse_")
    assert set(names) <= set(core_algos.POLICY_LOSS_REGISTRY)
    logits, tokens, old, mask, advantages = _inputs(2)
    config = _actor_config()
    # gppo from log-probs == rlfuse.policy_loss(gppo) from logits
    for mode, cfg in (("rlfuse_gppo", rlfuse.LossConfig.gppo(clip_low=0.2, clip_high=0.28, dual_clip=3.0)),
                      ("rlfuse_pspo", rlfuse.LossConfig.pspo())):
        a, b = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
        loss, metrics = core_algos.get_policy_loss_fn(mode)(old, verl_F.logprobs_from_logits(a, tokens), advantages,
                                                            mask, "token-mean", config, None)
        loss.backward()
        out = rlfuse.policy_loss(b, tokens, advantages, old_logprobs=old, mask=mask, config=cfg)
        out.loss.backward()
        torch.testing.assert_close(loss.detach(), out.loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)
        assert "actor/ppo_kl" in metrics
    # troll through the registry, with the logits given by the context
    old_logits = logits + 0.3 * torch.randn(logits.shape, generator=torch.Generator().manual_seed(3))
    old_lp = rlfuse.token_logprobs(old_logits, tokens)
    old_topk = rlfuse.sparse_logprobs(old_logits, tokens, k=16)
    fn = core_algos.get_policy_loss_fn("rlfuse_troll")
    with pytest.raises(RuntimeError, match="troll_inputs"):
        fn(old_lp, old_lp, advantages, mask, "token-mean", config, None)
    a = logits.clone().requires_grad_(True)
    with rv.troll_inputs(a, tokens, old_topk):
        loss, metrics = fn(old_lp, rlfuse.token_logprobs(a, tokens).detach(), advantages, mask, "token-mean", config,
                           None)
    loss.backward()
    expected = rlfuse.policy_loss(logits, tokens, advantages, old_logprobs=old_lp, mask=mask, old_topk=old_topk,
                                  config=rlfuse.LossConfig.troll())
    torch.testing.assert_close(loss.detach(), expected.loss, rtol=1e-6, atol=1e-7)
    assert a.grad.abs().max() > 0 and "actor/troll_projected_frac" in metrics
