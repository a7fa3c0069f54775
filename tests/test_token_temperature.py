"""Per-token temperature (issue 17): ``temperature`` as a tensor of the tokens' shape in every op.

Every backend against float64 oracles written here from the definition (``softmax(z / T)`` with one
T per row), values and gradients with respect to the logits; a constant tensor gives bit for bit the
scalar's results (the kernels get fp32(1 / T) rounded from the float64 T, as the scalar path);
masks, -inf logits, V below and above one Triton block (1024 when interpreting), one row;
``LinearLogits`` chunks; bad tensors; distillation (``distill_loss`` every kind, and
``policy_loss(teacher=...)``: each row's student and teacher at that row's T). ShardedLogits:
``tests/_sharded_worker.py`` (``per_token_temperature``, ``distill_per_token_temperature``).

Tolerances (fp32 accumulation in every kernel): with T in [0.25, 4] and |z| <~ 16, |x| = |z / T| <= 64,
so a log-prob or entropy carries a few ulp of 64 (7.6e-6): atol 5e-5, rtol 1e-5. Gradients are
p_j (...) / T with |.| <~ 4 / 0.25, each p_j with a relative error ~1e-6: atol 2e-5, rtol 1e-4. A
wrong temperature anywhere (the scalar instead of the row's, a chunk's rows shifted) moves values by
O(1).
"""

from __future__ import annotations

import pytest
import torch

import rlfuse
from rlfuse import ops
from rlfuse.distill import distill_loss, distill_term

BACKENDS = rlfuse.available_backends("cpu")
VALUES = dict(rtol=1e-5, atol=5e-5)
GRADS = dict(rtol=1e-4, atol=2e-5)
NEG_INF = float("-inf")


def inputs(lead, vocab, seed, dtype=torch.float32, neg_inf=True):
    """(logits, tokens, per-token T in [0.25, 4]); every 5th entry from 1 is -inf (never a chosen id)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(*lead, vocab, generator=g) * 4.0
    if neg_inf and vocab > 2:
        z[..., 1::5] = NEG_INF
    tokens = torch.randint(0, vocab, lead, generator=g)
    if neg_inf and vocab > 2:
        tokens = torch.where(tokens % 5 == 1, tokens - 1, tokens)
    temperature = 0.25 + 3.75 * torch.rand(lead, generator=g)
    return z.to(dtype), tokens, temperature


def oracle(z, tokens, temperature):
    """float64 (logp, entropy) of softmax(z / T), T one value per row."""
    log_p = torch.log_softmax(z.double() / temperature.double().unsqueeze(-1), -1)
    p = log_p.exp()
    logp = log_p.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)
    return logp, -(p * torch.where(p > 0, log_p, 0.0)).sum(-1)


def oracle_kl(z, other, temperature, direction):
    t = temperature.double().unsqueeze(-1)
    log_p, log_q = torch.log_softmax(z.double() / t, -1), torch.log_softmax(other.double() / t, -1)
    if direction == "reverse":
        log_p, log_q = log_q, log_p
    p = log_p.exp()
    return (p * torch.where(p > 0, log_p - log_q, 0.0)).sum(-1)


def same_bits(got, want) -> bool:
    """Bit for bit, NaN where the other has NaN (a masked row of NaN logits)."""
    nan = torch.isnan(want)
    return torch.equal(torch.isnan(got), nan) and torch.equal(got[~nan], want[~nan])


def upstream(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("vocab,lead", [(37, (3, 5)), (1100, (4,)), (7, (1,))])
def test_token_logprobs_and_entropy(backend, vocab, lead):
    z, tokens, temperature = inputs(lead, vocab, seed=vocab)
    x = z.clone().requires_grad_()
    logp, entropy = rlfuse.token_logprobs(x, tokens, temperature, return_entropy=True, backend=backend)
    ref = z.double().requires_grad_()
    ref_logp, ref_entropy = oracle(ref, tokens, temperature)
    torch.testing.assert_close(logp.double(), ref_logp.detach(), **VALUES)
    torch.testing.assert_close(entropy.double(), ref_entropy.detach(), **VALUES)
    a, b = upstream(lead, 5)
    (logp * a + entropy * b).sum().backward()
    (ref_logp * a + ref_entropy * b).sum().backward()
    torch.testing.assert_close(x.grad.double(), ref.grad, **GRADS)
    assert torch.all(x.grad[z == NEG_INF] == 0)
    h = rlfuse.entropy(z, temperature, backend=backend)
    torch.testing.assert_close(h.double(), ref_entropy.detach(), **VALUES)


def test_float64_and_bf16_logits():
    """float64 runs on the reference in float64 (T as given); bf16 upcasts right after the load."""
    z, tokens, temperature = inputs((2, 3), 50, seed=3)
    z64 = z.double().requires_grad_()
    logp = rlfuse.token_logprobs(z64, tokens, temperature.double())
    ref = z.double().requires_grad_()
    ref_logp, _ = oracle(ref, tokens, temperature.double())
    torch.testing.assert_close(logp.double(), ref_logp.detach(), **VALUES)
    logp.sum().backward()
    ref_logp.sum().backward()
    torch.testing.assert_close(z64.grad, ref.grad, rtol=1e-6, atol=1e-7)  # float64 throughout but fp32 logp
    for backend in BACKENDS:
        zb = z.bfloat16().requires_grad_()
        logp = rlfuse.token_logprobs(zb, tokens, temperature, backend=backend)
        ref = zb.detach().double().requires_grad_()
        ref_logp, _ = oracle(ref, tokens, temperature)
        torch.testing.assert_close(logp.double(), ref_logp.detach(), **VALUES)
        logp.sum().backward()
        ref_logp.sum().backward()
        # the gradient is stored in bf16: one bf16 ulp (2^-8 relative) of its largest entries
        torch.testing.assert_close(zb.grad.double(), ref.grad, rtol=8e-3, atol=8e-3 * ref.grad.abs().max().item())


@pytest.mark.parametrize("backend", BACKENDS)
def test_constant_tensor_is_the_scalar_bit_for_bit(backend):
    z, tokens, _ = inputs((2, 3), 40, seed=4)
    for value in (0.7,) if backend == "triton" else (0.7, 1.3):  # (the interpreter is slow)
        constant = torch.full(tokens.shape, value)
        outs = []
        for temperature in (value, constant, torch.tensor(value)):
            x = z.clone().requires_grad_()
            logp, entropy = rlfuse.token_logprobs(x, tokens, temperature, return_entropy=True, backend=backend)
            (logp * 0.3 + entropy).sum().backward()
            kl = rlfuse.kl_divergence(z, z.flip(-1), temperature=temperature, backend=backend)
            sparse = rlfuse.sparse_logprobs(z, tokens, 5, temperature=temperature, backend=backend)
            outs.append((logp, entropy, x.grad, kl, sparse.ids, sparse.logprobs))
        for other in outs[1:]:
            for got, want in zip(other, outs[0]):
                assert torch.equal(got, want), f"T = {value}: a constant tensor differs from the scalar"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_kl_divergence(backend, direction):
    z, _, temperature = inputs((3, 4), 1100 if backend != "triton" else 37, seed=6, neg_inf=False)
    other = z + torch.randn(z.shape, generator=torch.Generator().manual_seed(7))
    x, y = z.clone().requires_grad_(), other.clone().requires_grad_()
    mask = torch.ones(temperature.shape, dtype=torch.bool)
    mask[1, 2] = False
    kl = rlfuse.kl_divergence(x, y, direction, temperature, mask=mask, backend=backend)
    rx, ry = z.double().requires_grad_(), other.double().requires_grad_()
    ref = torch.where(mask, oracle_kl(rx, ry, temperature, direction), 0.0)
    torch.testing.assert_close(kl.double(), ref.detach(), **VALUES)
    g = upstream(temperature.shape, 8)[0]
    (kl * g).sum().backward()
    (ref * g).sum().backward()
    torch.testing.assert_close(x.grad.double(), rx.grad, **GRADS)
    torch.testing.assert_close(y.grad.double(), ry.grad, **GRADS)
    assert torch.all(x.grad[1, 2] == 0) and torch.all(y.grad[1, 2] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_logprobs(backend):
    z, tokens, temperature = inputs((2, 3), 40 if backend == "triton" else 300, seed=9)
    out = rlfuse.sparse_logprobs(z, tokens, 6, threshold=1e-4, temperature=temperature, backend=backend)
    log_p = torch.log_softmax(z.double() / temperature.double().unsqueeze(-1), -1)
    top = log_p.topk(6)
    kept = out.ids >= 0
    assert torch.equal(out.ids[kept].long(), top.indices[kept])
    torch.testing.assert_close(out.logprobs[kept].double(), top.values[kept], **VALUES)


def _dapo_oracle(z, tokens, temperature, adv, old, mask, entropy_coef):
    """token-mean of PPO's clipped loss (clip 0.2 / 0.28) minus entropy_coef * H, float64."""
    logp, entropy = oracle(z, tokens, temperature)
    r = torch.exp((logp - old.double()).clamp(-20, 20))
    a = adv.double()
    loss = torch.maximum(-a * r, -a * r.clamp(0.8, 1.28)) - entropy_coef * entropy
    m = mask.double()
    return (torch.where(mask > 0, loss, 0.0) * m).sum() / m.sum()


def _policy_inputs(lead, vocab, seed):
    z, tokens, temperature = inputs(lead, vocab, seed)
    g = torch.Generator().manual_seed(seed + 1)
    adv = torch.randn(lead, generator=g)
    old = oracle(z, tokens, temperature)[0].float() + 0.3 * torch.randn(lead, generator=g)
    mask = (torch.rand(lead, generator=g) > 0.25).float()
    mask.view(-1)[0] = 0.0
    z.view(-1, vocab)[0] = float("nan")  # a masked row whose logits are NaN: no effect anywhere
    return z, tokens, temperature, adv, old, mask


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("path", ["fused", "general"])
def test_policy_loss(backend, path):
    if backend == "torch" and path == "fused":
        pytest.skip("the torch backend is the general path")
    z, tokens, temperature, adv, old, mask = _policy_inputs((3, 5), 37 if backend == "triton" else 1100, 10)
    config = rlfuse.LossConfig.dapo(entropy_coef=0.01, temperature=2.0)  # overridden by temperature=
    x = z.clone().requires_grad_()
    out = rlfuse.policy_loss(x, tokens, adv, old_logprobs=old, mask=mask, config=config, backend=backend, path=path,
                             temperature=temperature)
    assert out.metrics["path"] == path
    ref = z.double().requires_grad_()
    ref_loss = _dapo_oracle(ref, tokens, temperature, adv, old, mask, 0.01)
    torch.testing.assert_close(out.loss.double(), ref_loss.detach(), **VALUES)
    valid = mask > 0
    torch.testing.assert_close(out.logprobs[valid].double(), oracle(z, tokens, temperature)[0][valid], **VALUES)
    out.loss.backward()
    ref_loss.backward()
    assert torch.all(x.grad[~valid] == 0)
    torch.testing.assert_close(x.grad[valid].double(), ref.grad[valid], **GRADS)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
def test_policy_loss_constant_tensor_is_the_scalar(backend):
    z, tokens, _, adv, old, mask = _policy_inputs((2, 4), 40, 11)
    config = rlfuse.LossConfig.dapo(kl="k3", kl_coef=0.05)
    results = []
    for temperature in (0.8, torch.full(tokens.shape, 0.8)):
        x = z.clone().requires_grad_()
        out = rlfuse.policy_loss(x, tokens, adv, old_logprobs=old, ref_logprobs=old - 0.1, mask=mask, config=config,
                                 backend=backend, temperature=temperature)
        out.loss.backward()
        results.append((out.loss, out.logprobs, out.entropy, x.grad))
    for got, want in zip(*results):
        assert same_bits(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_logits(backend):
    """Chunks of 4 valid rows take their rows' temperatures (masked rows never reach a GEMM)."""
    g = torch.Generator().manual_seed(12)
    n, dim, vocab = 11, 6, 53
    hidden, weight = torch.randn(n, dim, generator=g), torch.randn(vocab, dim, generator=g)
    tokens = torch.randint(0, vocab, (n,), generator=g)
    temperature = 0.25 + 3.75 * torch.rand(n, generator=g)
    adv, old = torch.randn(n, generator=g), torch.randn(n, generator=g) - 3.0
    mask = (torch.rand(n, generator=g) > 0.3).float()
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    src = rlfuse.LinearLogits(h, w, chunk_tokens=4)
    rh, rw = hidden.double().requires_grad_(), weight.double().requires_grad_()
    ref_logp, ref_entropy = oracle(rh @ rw.T, tokens, temperature)
    logp, entropy = rlfuse.token_logprobs(src, tokens, temperature, return_entropy=True, backend=backend)
    torch.testing.assert_close(logp.double(), ref_logp.detach(), **VALUES)
    a, b = upstream(n, 13)
    (logp * a + entropy * b).sum().backward()
    (ref_logp * a + ref_entropy * b).sum().backward()
    torch.testing.assert_close(h.grad.double(), rh.grad, **GRADS)
    torch.testing.assert_close(w.grad.double(), rw.grad, **GRADS)
    for tensor in (h, w, rh, rw):
        tensor.grad = None
    config = rlfuse.LossConfig.dapo(entropy_coef=0.01)
    out = rlfuse.policy_loss(src, tokens, adv, old_logprobs=old, mask=mask, cu_seqlens=torch.tensor([0, n]),
                             config=config, backend=backend, temperature=temperature)
    assert out.metrics["path"] == ("general" if backend == "torch" else "fused")
    ref_loss = _dapo_oracle(rh @ rw.T, tokens, temperature, adv, old, mask, 0.01)
    torch.testing.assert_close(out.loss.double(), ref_loss.detach(), **VALUES)
    out.loss.backward()
    ref_loss.backward()
    torch.testing.assert_close(h.grad.double(), rh.grad, **GRADS)
    torch.testing.assert_close(w.grad.double(), rw.grad, **GRADS)
    kl = rlfuse.kl_divergence(src, torch.randn(n, vocab, generator=g), temperature=temperature, backend=backend)
    assert kl.shape == (n,) and torch.isfinite(kl).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_kept_min_restricts_the_support(backend):
    """The token_logprobs ops' kept_min (the sampler's kept set, rlfuse.filtered): statistics over
    {j : x_j >= kept_min}, -inf for a chosen token outside, zero gradient outside."""
    z, tokens, temperature = inputs((2, 5), 64, seed=14, neg_inf=False)
    x_ref = z.double() / temperature.double().unsqueeze(-1)
    # The 8 largest entries per row: a threshold halfway between the 8th and 9th (no entry near it,
    # so fp32 rounding of x or of the threshold cannot move an entry across).
    ordered = x_ref.sort(-1, descending=True).values
    kept_min = ((ordered[..., 7] + ordered[..., 8]) / 2).float()
    kept_min.view(-1)[3] = NEG_INF  # a row without filtering
    pick = torch.randint(0, 8, (*tokens.shape, 1), generator=torch.Generator().manual_seed(0))
    tokens = x_ref.topk(8).indices.gather(-1, pick).squeeze(-1)  # chosen tokens inside the kept set ...
    tokens.view(-1)[1] = int(x_ref.view(-1, 64)[1].argmin())  # ... but one outside it
    x = z.clone().requires_grad_()
    logp, entropy, _ = ops.token_logprobs.token_logprobs_fwd(x, tokens, 1.0, backend, False, temperature.double(),
                                                             kept_min)
    ref = z.double().requires_grad_()
    scaled = ref / temperature.double().unsqueeze(-1)
    kept = scaled >= kept_min.double().unsqueeze(-1)
    log_p = torch.log_softmax(torch.where(kept, scaled, NEG_INF), -1)
    p = log_p.exp()
    ref_logp = log_p.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    ref_entropy = -(p * torch.where(p > 0, log_p, 0.0)).sum(-1)
    assert logp.view(-1)[1] == NEG_INF
    finite = torch.isfinite(ref_logp)
    torch.testing.assert_close(logp[finite].double(), ref_logp[finite].detach(), **VALUES)
    torch.testing.assert_close(entropy.double(), ref_entropy.detach(), **VALUES)
    (torch.where(finite, logp, 0.0) + entropy).sum().backward()
    (torch.where(finite, ref_logp, 0.0) + ref_entropy).sum().backward()
    assert torch.all(x.grad[~kept] == 0)
    torch.testing.assert_close(x.grad.double(), ref.grad, **GRADS)


def test_top_k_is_the_filtered_support():
    """token_logprobs / entropy with top_k / top_p / min_p are rlfuse.filtered.filtered_token_logprobs."""
    from rlfuse.filtered import filtered_token_logprobs

    z, tokens, temperature = inputs((2, 3), 50, seed=15)
    logp, entropy = rlfuse.token_logprobs(z, tokens, temperature, return_entropy=True, top_k=5, top_p=0.9)
    want = filtered_token_logprobs(z, tokens, temperature, 5, 0.9, None)
    assert torch.equal(logp, want[0]) and torch.equal(entropy, want[1])
    zeros = torch.zeros_like(tokens)
    assert torch.equal(rlfuse.entropy(z, temperature, min_p=0.1),
                       filtered_token_logprobs(z, zeros, temperature, None, None, 0.1)[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_backward(backend):
    """The in-place gradient (written into the logits) takes each row's T as the out-of-place one."""
    z, tokens, temperature = inputs((3, 4), 37, seed=18)
    x = z.clone().requires_grad_()
    rlfuse.token_logprobs(x, tokens, temperature, backend=backend).sum().backward()
    y = z.clone().requires_grad_()
    inplace = y * 1.0  # a non-leaf whose memory the backward may overwrite
    rlfuse.token_logprobs(inplace, tokens, temperature, backend=backend, inplace_backward=True).sum().backward()
    assert torch.equal(x.grad, y.grad)


def test_policy_loss_filters_use_the_sampler_support():
    """LossConfig top_k / top_p / min_p: the general path's log-probs are filtered_token_logprobs'."""
    from rlfuse.filtered import filtered_token_logprobs

    z, tokens, temperature, adv, old, mask = _policy_inputs((2, 5), 60, 19)
    z.view(-1, 60)[0] = 0.0  # (the NaN row of _policy_inputs would fail the sampler's row check)
    config = rlfuse.LossConfig.dapo(top_k=8, min_p=0.05)
    out = rlfuse.policy_loss(z, tokens, adv, old_logprobs=old, mask=mask, config=config, temperature=temperature)
    want = filtered_token_logprobs(z, tokens, temperature, 8, None, 0.05)[0]
    valid = mask > 0
    assert out.metrics["path"] == "general"
    assert torch.equal(out.logprobs[valid], want[valid])


@pytest.mark.parametrize("backend", BACKENDS)
def test_policy_loss_reports_tokens_outside_the_sampler_support(backend):
    """A chosen token outside the kept set: log-prob -inf, no gradient from it, and a metric."""
    g = torch.Generator().manual_seed(5)
    z = torch.randn(2, 6, 50, generator=g)
    ranked = z.argsort(-1, descending=True)
    tokens = ranked[..., 0].clone()
    outside = torch.zeros(2, 6, dtype=torch.bool)
    outside[0, 1] = outside[1, 4] = outside[1, 5] = True
    tokens[outside] = ranked[..., 10][outside]  # the 11th most likely: outside top_k=4
    mask = torch.ones(2, 6)
    mask[1, 5] = 0
    old = torch.log_softmax(z, -1).gather(-1, tokens[..., None])[..., 0] - 0.1
    leaf = z.clone().requires_grad_(True)
    out = rlfuse.policy_loss(leaf, tokens, torch.randn(2, 6, generator=g), old_logprobs=old, mask=mask,
                             config=rlfuse.LossConfig.dapo(top_k=4), backend=backend)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(leaf.grad).all()
    assert torch.equal(out.logprobs == float("-inf"), outside)
    assert out.metrics["outside_support_frac"].item() == pytest.approx(2 / 11)  # masked token not counted
    assert torch.all(leaf.grad[outside] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_scores_what_sample_drew(backend):
    """Sample at one temperature per row, then score the samples: the unfiltered log-probs and entropy
    are sample's raw_logprobs / entropy (bit for bit on the kernels: both scale by fp32(1 / T); the
    torch reference divides by T, a rounding apart), and with top_k the filtered ones its logprobs."""
    z, _, temperature = inputs((5,), 300, seed=20, neg_inf=False)
    drawn = rlfuse.sample(z, temperature=temperature, seed=3, backend=backend)
    logp, entropy = rlfuse.token_logprobs(z, drawn.tokens, temperature, return_entropy=True, backend=backend)
    if backend == "torch":
        torch.testing.assert_close(logp, drawn.raw_logprobs, **VALUES)
        torch.testing.assert_close(entropy, drawn.entropy, **VALUES)
    else:
        assert torch.equal(logp, drawn.raw_logprobs) and torch.equal(entropy, drawn.entropy)
    drawn = rlfuse.sample(z, temperature=temperature, top_k=20, seed=4, backend=backend)
    assert torch.equal(rlfuse.token_logprobs(z, drawn.tokens, temperature, top_k=20, backend=backend),
                       drawn.logprobs)


def test_one_host_read_for_the_checks():
    """A temperature tensor's range is read with the ids (README "Host synchronisation"): one read per
    call with validation on, none in the forward and backward with it off."""
    from test_host_syncs import count_host_reads

    z, tokens, temperature = inputs((2, 5), 40, seed=21)
    adv, old = torch.randn(2, 5), torch.randn(2, 5) - 3.0
    calls = [lambda x: rlfuse.token_logprobs(x, tokens, temperature, backend="cpu").sum(),
             lambda x: rlfuse.kl_divergence(x, z, temperature=temperature, backend="cpu").sum(),
             lambda x: rlfuse.policy_loss(x, tokens, adv, old_logprobs=old, temperature=temperature, backend="cpu",
                                          path="general").loss]
    for call in calls:
        with count_host_reads() as reads:
            call(z)
        assert reads == ["Tensor.tolist"], reads
    with count_host_reads() as reads:
        rlfuse.sparse_logprobs(z, tokens, 4, temperature=temperature, backend="cpu")
    assert reads == ["Tensor.tolist"], reads
    previous = rlfuse.set_validation(False)
    try:
        for call in calls:
            x = z.clone().requires_grad_()
            with count_host_reads() as reads:
                call(x).backward()
            assert reads == [], reads
    finally:
        rlfuse.set_validation(previous)


def test_bad_temperature_tensors():
    z, tokens, temperature = inputs((2, 3), 20, seed=16)
    cases = [
        (temperature[:, :2], ValueError, "temperature must be a number, a 0-dim tensor or a tensor of the tokens"),
        (temperature.clone().requires_grad_(), ValueError, "temperature gets no gradient"),
        (torch.ones(2, 3, dtype=torch.int64), TypeError, "temperature must be a float tensor"),
    ]
    for bad_value in (0.0, -1.0, float("nan"), float("inf"), 1e-39):
        t = temperature.detach().clone()
        t[1, 2] = bad_value
        cases.append((t, ValueError, "temperature values must lie in"))
    cases.append((temperature.to("meta"), ValueError, "temperature is on meta but logits are on cpu"))
    for value, error, words in cases:
        for call in (lambda: rlfuse.token_logprobs(z, tokens, value),
                     lambda: rlfuse.entropy(z, value),
                     lambda: rlfuse.kl_divergence(z, z, temperature=value),
                     lambda: rlfuse.sparse_logprobs(z, tokens, 3, temperature=value),
                     lambda: rlfuse.policy_loss(z, tokens, torch.ones(2), old_logprobs=torch.zeros(2, 3),
                                                temperature=value),
                     lambda: rlfuse.policy_loss(z, tokens, torch.ones(2), old_logprobs=torch.zeros(2, 3),
                                                teacher=z.flip(-1), temperature=value),
                     lambda: distill_loss(z, z.flip(-1), temperature=value),
                     lambda: distill_term(z, rlfuse.sparse_logprobs(z, tokens, 3), kind="sparse_kl",
                                          temperature=value),
                     lambda: distill_loss(z, None, tokens, kind="sampled_reverse_kl",
                                          teacher_logprobs=torch.zeros(2, 3), temperature=value)):
            with pytest.raises(error, match=words):
                call()
    t = temperature.detach()
    with pytest.raises(ValueError, match="temperature must be a number, a 0-dim tensor or a tensor of the tokens"):
        distill_loss(z, z.flip(-1), temperature=t.reshape(-1))  # [N] for a [B, T, V] student


# --- distillation: distill_loss / distill_term and policy_loss(teacher=...) ------------------------------

# (kind, beta, sparse_convention, estimator): every kind of rlfuse.distill, JSD at both KL ends too.
DISTILL_CASES = [("jsd", 0.3, None, None), ("jsd", 0.0, None, None), ("jsd", 1.0, None, None),
                 ("forward_kl", 0.5, None, None), ("reverse_kl", 0.5, None, None),
                 ("sparse_kl", 0.5, "tail", None), ("sparse_kl", 0.5, "verl", None), ("sparse_kl", 0.5, "renorm", None),
                 ("sampled_reverse_kl", 0.5, None, "k1"), ("sampled_reverse_kl", 0.5, None, "k3")]
DISTILL_IDS = ["-".join(str(part) for part in case if part is not None) for case in DISTILL_CASES]


def _logs(z, temperature):
    """float64 log softmax(z / T), T one value per row."""
    return torch.log_softmax(z.double() / temperature.double().unsqueeze(-1), -1)


def _kl_rows(log_a, log_b):
    """sum_j a_j (log a_j - log b_j) per row, the a_j = 0 terms dropped (no -inf - -inf)."""
    a = log_a.exp()
    keep = a > 0
    return torch.where(keep, a * (torch.where(keep, log_a, 0.0) - torch.where(keep, log_b, 0.0)), 0.0).sum(-1)


def distill_oracle(student, teacher, kind, beta, temperature, convention=None, tokens=None, estimator=None):
    """float64 per-token values from the definitions (docs/distillation.md), s = softmax(student / T_row),
    t = softmax(teacher / T_row); ``teacher`` is (ids, logprobs) for sparse_kl and the teacher's log-probs
    of ``tokens`` for sampled_reverse_kl. For k1 the value is D = log s - log t and its gradient D d log s
    (the score function), so the result is a surrogate whose value and gradient are the estimator's."""
    log_s = _logs(student, temperature)
    if kind == "sampled_reverse_kl":
        logp = log_s.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        d = logp - teacher.double()
        if estimator == "k1":
            return d.detach() + d.detach() * (logp - logp.detach())
        u = (-d).clamp(-20.0, 20.0)  # docs/SPEC.md section 5's k3, with its clamps
        return (u.exp() - u - 1.0).clamp(-10.0, 10.0)
    if kind == "sparse_kl":
        ids, logprobs = teacher
        valid = (ids >= 0) & (logprobs > NEG_INF)
        s_k = torch.where(valid, log_s.gather(-1, ids.clamp(min=0)), NEG_INF)
        t_k = torch.where(valid, logprobs.double(), NEG_INF)
        if convention == "tail":
            def with_tail(lp):
                mass = lp.exp().sum(-1).clamp(max=torch.tensor(-1e-7, dtype=torch.float64).exp())
                return torch.cat([lp, torch.log1p(-mass).unsqueeze(-1)], -1)
            s_k, t_k = with_tail(s_k), with_tail(t_k)
        else:
            t_k = t_k - torch.logsumexp(t_k, -1, keepdim=True)
            if convention == "renorm":
                s_k = s_k - torch.logsumexp(s_k, -1, keepdim=True)
        return _kl_rows(t_k, s_k)
    log_t = _logs(teacher, temperature)
    if kind == "forward_kl" or (kind == "jsd" and beta == 0.0):
        return _kl_rows(log_t, log_s)
    if kind == "reverse_kl" or (kind == "jsd" and beta == 1.0):
        return _kl_rows(log_s, log_t)
    m = (1.0 - beta) * log_s.exp() + beta * log_t.exp()
    log_m = torch.where(m > 0, torch.log(torch.where(m > 0, m, 1.0)), NEG_INF)  # (-inf entries: no NaN gradient)
    return beta * _kl_rows(log_t, log_m) + (1.0 - beta) * _kl_rows(log_s, log_m)


def distill_inputs(lead, vocab, seed, kind):
    """(student, teacher, tokens, T, mask, teacher_logprobs): T in [0.25, 4] per token, two masked
    tokens, -inf entries (the same in both rows); the sparse teacher its top-6 at each row's T with two
    empty slots in one row; the sampled teacher's log-probs the student's plus noise; V odd."""
    z, tokens, temperature = inputs(lead, vocab, seed)
    g = torch.Generator().manual_seed(seed + 1)
    other = z + 1.5 * torch.randn(z.shape, generator=g)
    mask = torch.ones(lead, dtype=torch.bool)
    mask.view(-1)[1] = mask.view(-1)[-2] = False
    student_lp = _logs(z, temperature).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    teacher_logprobs = (student_lp + 0.5 * torch.randn(lead, generator=g, dtype=torch.float64)).float()
    if kind == "sparse_kl":
        values, ids = _logs(other, temperature).float().topk(6)
        ids.view(-1, 6)[2, 4:] = -1
        values.view(-1, 6)[2, 4:] = NEG_INF
        other = (ids, values)
    elif kind == "sampled_reverse_kl":
        other = None  # (the teacher's log-probs of the tokens only)
    return z, other, tokens, temperature, mask, teacher_logprobs


def _distill_kwargs(kind, beta, convention, estimator, tokens, teacher_logprobs):
    kwargs = dict(kind=kind, beta=beta)
    if kind == "sparse_kl":
        kwargs["sparse_convention"] = convention
    if kind == "sampled_reverse_kl":
        kwargs.update(tokens=tokens, teacher_logprobs=teacher_logprobs, estimator=estimator)
    return kwargs


def _distill_oracle_loss(z, teacher, case, temperature, mask, tokens, teacher_logprobs):
    """(per-token values, token-mean loss) of the oracle; masked rows' logits replaced (not its business)."""
    kind, beta, convention, estimator = case
    z = torch.where(mask.unsqueeze(-1), z.double(), 0.0) if not z.requires_grad else z
    target = teacher_logprobs if kind == "sampled_reverse_kl" else teacher
    values = torch.where(mask, distill_oracle(z, target, kind, beta, temperature, convention, tokens, estimator), 0.0)
    return values, values.sum() / mask.sum()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", DISTILL_CASES, ids=DISTILL_IDS)
def test_distill_matches_the_oracle(backend, case):
    """Values and student gradients (and the teacher's, logits teachers) at one T per token, masked
    tokens exactly 0 with exactly zero gradient; V = 301."""
    kind, beta, convention, estimator = case
    z, teacher, tokens, temperature, mask, teacher_lp = distill_inputs((3, 5), 301, 30, kind)
    logits_teacher = isinstance(teacher, torch.Tensor)
    x = z.clone().requires_grad_()
    y = teacher.clone().requires_grad_() if logits_teacher else teacher
    kwargs = _distill_kwargs(kind, beta, convention, estimator, tokens, teacher_lp)
    out = distill_loss(x, y, temperature=temperature, mask=mask, backend=backend, **kwargs)
    rx = torch.where(mask.unsqueeze(-1), z, 0.0).double().requires_grad_()
    ry = teacher.double().requires_grad_() if logits_teacher else teacher
    ref_values, ref_loss = _distill_oracle_loss(rx, ry, case, temperature, mask, tokens, teacher_lp)
    torch.testing.assert_close(out.per_token.double(), ref_values.detach(), **VALUES)
    torch.testing.assert_close(out.loss.double(), ref_loss.detach(), **VALUES)
    assert torch.all(out.per_token[~mask] == 0)
    out.loss.backward()
    ref_loss.backward()
    # (the oracle's masked rows are not compared: its student row is zeros there, with KL(s || t) = inf)
    torch.testing.assert_close(x.grad[mask].double(), rx.grad[mask], **GRADS)
    assert torch.all(x.grad[~mask] == 0)
    if logits_teacher:
        torch.testing.assert_close(y.grad[mask].double(), ry.grad[mask], **GRADS)
        assert torch.all(y.grad[~mask] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_distill_constant_tensor_is_the_scalar_bit_for_bit(backend):
    """Every kind: a constant tensor (and a 0-dim one) gives the number's values and gradients bit for bit."""
    for case in DISTILL_CASES:
        kind, beta, convention, estimator = case
        z, teacher, tokens, _, mask, teacher_lp = distill_inputs((2, 3), 45, 31, kind)
        kwargs = _distill_kwargs(kind, beta, convention, estimator, tokens, teacher_lp)
        results = []
        for temperature in (0.7, torch.full(mask.shape, 0.7), torch.tensor(0.7)):
            x = z.clone().requires_grad_()
            y = teacher.clone().requires_grad_() if isinstance(teacher, torch.Tensor) else teacher
            out = distill_loss(x, y, temperature=temperature, mask=mask, backend=backend, **kwargs)
            out.loss.backward()
            results.append((out.per_token, out.loss, x.grad) + ((y.grad,) if isinstance(y, torch.Tensor) else ()))
        for other in results[1:]:
            for got, want in zip(other, results[0]):
                assert torch.equal(got, want), f"{case}: a constant tensor differs from the scalar"


@pytest.mark.parametrize("backend", BACKENDS)
def test_distill_linear_logits(backend):
    """An unsplit LinearLogits student (chunks of 4 valid rows, masked rows never computed) hands each
    chunk its rows' temperatures: jsd against a LinearLogits teacher, sparse_kl, sampled_reverse_kl."""
    g = torch.Generator().manual_seed(32)
    n, dim, vocab = 11, 6, 53
    hidden, weight = torch.randn(n, dim, generator=g), torch.randn(vocab, dim, generator=g)
    t_hidden, t_weight = torch.randn(n, dim, generator=g), torch.randn(vocab, dim, generator=g)
    temperature = 0.25 + 3.75 * torch.rand(n, generator=g)
    tokens = torch.randint(0, vocab, (n,), generator=g)
    mask = torch.rand(n, generator=g) > 0.3
    t_logits = t_hidden @ t_weight.T
    values, ids = _logs(t_logits, temperature).float().topk(5)
    teacher_lp = _logs(hidden @ weight.T, temperature).gather(-1, tokens.unsqueeze(-1)).squeeze(-1).float() + 0.3
    for case, teacher in ((("jsd", 0.3, None, None), rlfuse.LinearLogits(t_hidden, t_weight, chunk_tokens=3)),
                          (("sparse_kl", 0.5, "tail", None), (ids, values)),
                          (("sampled_reverse_kl", 0.5, None, "k3"), None)):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        kwargs = _distill_kwargs(*case, tokens, teacher_lp)
        out = distill_loss(rlfuse.LinearLogits(h, w, chunk_tokens=4), teacher, temperature=temperature, mask=mask,
                           backend=backend, **kwargs)
        rh, rw = hidden.double().requires_grad_(), weight.double().requires_grad_()
        ref_teacher = t_logits.double() if case[0] == "jsd" else (ids, values)
        ref_values, ref_loss = _distill_oracle_loss(rh @ rw.T, ref_teacher, case, temperature, mask, tokens,
                                                    teacher_lp)
        torch.testing.assert_close(out.per_token.double(), ref_values.detach(), **VALUES)
        out.loss.backward()
        ref_loss.backward()
        torch.testing.assert_close(h.grad.double(), rh.grad, **GRADS)
        torch.testing.assert_close(w.grad.double(), rw.grad, **GRADS)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("path", ["fused", "general"])
@pytest.mark.parametrize("kind", ["jsd", "sparse_kl"])
def test_policy_loss_with_a_teacher(backend, path, kind):
    """policy_loss(temperature=T, teacher=...) = the DAPO oracle + distill_coef x the distillation
    oracle's token-mean, both at each token's T; the NaN masked row gets no gradient."""
    if backend == "torch" and path == "fused":
        pytest.skip("the torch backend is the general path")
    z, tokens, temperature, adv, old, mask = _policy_inputs((3, 5), 301, 33)
    teacher = z + 1.5 * torch.randn(z.shape, generator=torch.Generator().manual_seed(34))
    case = ("jsd", 0.4, None, None) if kind == "jsd" else ("sparse_kl", 0.5, "tail", None)
    if kind == "sparse_kl":
        values, ids = _logs(teacher.nan_to_num(), temperature).float().topk(6)
        teacher = (ids, values)
    config = rlfuse.LossConfig.dapo(entropy_coef=0.01, temperature=2.0, distill_coef=0.3, distill_kind=kind,
                                    distill_beta=case[1])
    x = z.clone().requires_grad_()
    out = rlfuse.policy_loss(x, tokens, adv, old_logprobs=old, mask=mask, config=config, backend=backend, path=path,
                             temperature=temperature, teacher=teacher)
    assert out.metrics["path"] == path
    valid = mask > 0
    ref = z.double().requires_grad_()
    ref_teacher = teacher.double() if kind == "jsd" else teacher
    term = torch.where(valid, distill_oracle(ref, ref_teacher, kind, case[1], temperature, case[2]), 0.0)
    ref_term = term.sum() / valid.sum()
    ref_loss = _dapo_oracle(ref, tokens, temperature, adv, old, mask, 0.01) + 0.3 * ref_term
    torch.testing.assert_close(out.loss.double(), ref_loss.detach(), **VALUES)
    torch.testing.assert_close(out.metrics["distill"].double(), ref_term.detach(), **VALUES)
    out.loss.backward()
    ref_loss.backward()
    assert torch.all(x.grad[~valid] == 0)
    torch.testing.assert_close(x.grad[valid].double(), ref.grad[valid], **GRADS)


@pytest.mark.parametrize("backend", BACKENDS)
def test_policy_loss_with_a_teacher_constant_tensor_is_the_scalar(backend):
    z, tokens, _, adv, old, mask = _policy_inputs((2, 4), 40, 35)
    teacher = z.flip(-1).nan_to_num()
    config = rlfuse.LossConfig.dapo(distill_coef=0.2, distill_kind="jsd", distill_beta=0.3)
    results = []
    for temperature in (0.8, torch.full(tokens.shape, 0.8)):
        x = z.clone().requires_grad_()
        out = rlfuse.policy_loss(x, tokens, adv, old_logprobs=old, mask=mask, config=config, backend=backend,
                                 temperature=temperature, teacher=teacher)
        out.loss.backward()
        results.append((out.loss, out.metrics["distill"], out.logprobs, x.grad))
    for got, want in zip(*results):
        assert same_bits(got, want)


def test_distill_one_host_read():
    """A temperature tensor's range is read once per call: distill_loss (with a logits teacher: its only
    read) and policy_loss with a teacher (read with the call's other checks, not again by the term)."""
    from test_host_syncs import count_host_reads

    z, tokens, temperature = inputs((2, 5), 40, seed=36, neg_inf=False)
    adv, old = torch.randn(2, 5), torch.randn(2, 5) - 3.0
    with count_host_reads() as reads:
        distill_loss(z, z.flip(-1), temperature=temperature, backend="cpu")
    assert reads == ["Tensor.tolist"], reads
    with count_host_reads() as reads:
        rlfuse.policy_loss(z, tokens, adv, old_logprobs=old, temperature=temperature, teacher=z.flip(-1),
                           backend="cpu", path="general")
    assert reads == ["Tensor.tolist"], reads


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    z, tokens, temperature = inputs((2, 3), 33, seed=17)
    temps, kept_min = temperature.double(), torch.full(tokens.shape, -2.0)
    torch.library.opcheck(ops.token_logprobs.token_logprobs_fwd, (z, tokens, 1.0, backend, False, temps, kept_min))
    lse = torch.zeros(tokens.shape)
    torch.library.opcheck(ops.token_logprobs.token_logprobs_bwd,
                          (z, tokens, lse, lse, lse + 1.0, lse + 0.5, 1.0, backend, temps, kept_min))
    torch.library.opcheck(ops.kl_div.kl_div_fwd, (z, z.flip(-1), 1.0, 0, backend, temps))
    if backend != "triton":  # (the interpreted top-k is slow; its values are tested above)
        torch.library.opcheck(ops.row_topk.row_topk, (z, tokens, 1.0, 4, backend, temps))
    if backend != "torch":
        params = ops.policy_loss.TokenLossParams.from_config(rlfuse.LossConfig.dapo())
        n = tokens.numel()
        per_token = (torch.randn(n), torch.randn(n) - 3.0, torch.zeros(n), torch.full((n,), 1.0 / n),
                     torch.full((n,), 1.0 / n))
        temperature_arg, kwargs = ops.policy_loss.fused_op_arguments(
            temps.view(-1), params, (torch.full((n,), 0.1), torch.full((n,), 0.3), torch.full((n,), 5.0)))
        torch.library.opcheck(ops.policy_loss.policy_loss_fused,
                              (z.view(n, -1), tokens.view(-1), *per_token, temperature_arg, backend), kwargs)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_troll_on_linear_logits_takes_each_rows_temperature(backend, generator):
    """TROLL on a LinearLogits (chunks of 4 rows, a mask) with a per-token T: the loss and the hidden /
    weight gradients of the same call on the materialised logits (itself checked against the dense
    oracle above)."""
    b, t, dim, vocab = 2, 5, 12, 83
    hidden = torch.randn(b, t, dim, generator=generator)
    weight = torch.randn(vocab, dim, generator=generator) * 0.5
    tokens = torch.randint(0, vocab, (b, t), generator=generator)
    temperature = 0.25 + 3.75 * torch.rand(b, t, generator=generator)
    logits = hidden @ weight.T
    old_logits = logits + 0.5 * torch.randn(logits.shape, generator=generator)
    old_topk = rlfuse.sparse_logprobs(old_logits, tokens, 5, temperature=temperature)
    old = rlfuse.token_logprobs(old_logits, tokens, temperature)
    mask = torch.rand(b, t, generator=generator) > 0.3
    config = rlfuse.LossConfig.troll(troll_k=5, kl="k1", kl_coef=0.05)
    kwargs = dict(advantages=torch.randn(b, t, generator=generator), old_logprobs=old, old_topk=old_topk, mask=mask,
                  ref_logprobs=old - 0.1, config=config, backend=backend, temperature=temperature)
    results = []
    for linear in (False, True):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        source = rlfuse.LinearLogits(h, w, chunk_tokens=4) if linear else h @ w.T
        out = rlfuse.policy_loss(source, tokens, **kwargs)
        out.loss.backward()
        results.append((out.loss.detach(), out.logprobs, h.grad, w.grad))
    for dense, chunked in zip(*results):
        torch.testing.assert_close(chunked, dense, rtol=2e-5, atol=2e-6)
    constant = dict(kwargs, temperature=torch.full((b, t), 1.3, dtype=torch.float64))  # the number 1.3 exactly
    scalar = dict(kwargs, temperature=1.3, old_topk=old_topk)
    src = rlfuse.LinearLogits(hidden, weight, chunk_tokens=4)
    assert torch.equal(rlfuse.policy_loss(src, tokens, **constant).loss, rlfuse.policy_loss(src, tokens, **scalar).loss)
