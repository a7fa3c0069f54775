"""Every op is a proper torch.library op (opcheck, fake tensors) and every public path traces under
torch.compile(fullgraph=True) with the eager results."""

import pytest
import torch

import rlfuse
from rlfuse import LossConfig
from rlfuse.ops import generator as generator_ops
from rlfuse.ops import kl_div as kl_ops
from rlfuse.ops import policy_loss as policy_ops
from rlfuse.ops import row_topk as topk_ops
from rlfuse.ops import sample as sample_ops
from rlfuse.ops import token_logprobs as ops
from conftest import kernel_backends
from _presets import PRESET_CASES, preset_case

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


# --- every op (issue 14): opcheck, fakes, torch.compile(fullgraph=True) of every public path -------

# Every op of the rlfuse namespace and the test that runs opcheck on it ("file::test").
OPCHECKED_BY = {
    "token_logprobs_fwd": "test_torch_library::test_opcheck_forward",
    "token_logprobs_bwd": "test_torch_library::test_opcheck_backward_ops",
    "token_logprobs_bwd_inplace": "test_torch_library::test_opcheck_backward_ops",
    "policy_loss_fused": "test_torch_library::test_opcheck_policy_loss_fused",
    "policy_loss_fused_inplace": "test_torch_library::test_opcheck_policy_loss_fused",
    "kl_div_fwd": "test_kl_div::test_opcheck",
    "kl_div_bwd": "test_torch_library::test_opcheck_row_topk_and_kl_backward",
    "row_topk": "test_torch_library::test_opcheck_row_topk_and_kl_backward",
    "sample": "test_torch_library::test_opcheck_sample",
    "sample_score": "test_filtered_logprobs::test_opcheck_sample_score",
    "generator_draws": "test_torch_library::test_opcheck_generator_draws",
    "jsd_fwd": "test_distill::test_opcheck_jsd_ops",
    "jsd_bwd": "test_distill::test_opcheck_jsd_ops",
    "troll_fused": "test_troll::test_fused_troll_opcheck",
    "troll_fused_inplace": "test_troll::test_fused_troll_opcheck",
}


def test_every_op_is_opchecked():
    """A new op of the namespace fails here until a test runs opcheck on it."""
    import importlib
    import inspect

    registered = {name for name in torch.ops.rlfuse._dir}  # the ops loaded with rlfuse
    assert registered == set(OPCHECKED_BY), registered ^ set(OPCHECKED_BY)
    for name, where in OPCHECKED_BY.items():
        module, test = where.split("::")
        source = inspect.getsource(getattr(importlib.import_module(module), test))
        assert "opcheck" in source and name in source, (name, where)


def _sample_args(rows_shape=(2, 3), vocab=37, num_samples=1, adaptive=None, backend="cpu"):
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(*rows_shape, vocab, generator=generator)
    rows = logits[..., 0].numel()
    return (logits, torch.tensor([0.7, 1.0, 0.0, 1.3, 0.9, 1.0][:rows]), torch.tensor([0, 5, 0, 3, 40, 1][:rows],
            dtype=torch.int32), torch.full((rows,), 0.9), torch.full((rows,), 0.01), torch.arange(rows) * 5 + 1,
            num_samples, adaptive, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_samples, adaptive", [(1, None), (4, None), (3, [0.5, 1.5, 1.0, 2.5])])
def test_opcheck_sample(backend, num_samples, adaptive):
    torch.library.opcheck(sample_ops.sample, _sample_args(num_samples=num_samples, adaptive=adaptive,
                                                          backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_row_topk_and_kl_backward(backend):
    logits, tokens = _inputs(requires_grad=False)
    for k in (1, 5, 40):
        torch.library.opcheck(topk_ops.row_topk, (logits, tokens, 0.8, k, backend))
    other = logits.flip(-1).contiguous()
    kl, lse, other_lse = kl_ops.kl_div_fwd(logits, other, 0.9, 0, backend)
    grad = torch.randn(2, 3)
    for need_logits, need_other in ((True, True), (True, False), (False, True)):
        torch.library.opcheck(kl_ops.kl_div_bwd, (logits, other, kl, lse, other_lse, grad, 0.9, 0, need_logits,
                                                  need_other, backend))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
def test_opcheck_policy_loss_fused(backend):
    logits, tokens = _inputs(requires_grad=False)
    n = tokens.numel()
    generator = torch.Generator().manual_seed(5)
    per_token = [torch.randn(n, generator=generator) for _ in range(3)] + [torch.full((n,), 1.0 / n)] * 2
    params = policy_ops.TokenLossParams.from_config(LossConfig.grpo(entropy_coef=0.01))._asdict()
    torch.library.opcheck(policy_ops.policy_loss_fused, (logits, tokens, *per_token, 0.9, backend), params)
    torch.library.opcheck(policy_ops.policy_loss_fused_inplace, (logits.clone(), tokens, *per_token, 0.9, backend),
                          params)


def test_opcheck_generator_draws():
    torch.library.opcheck(generator_ops.generator_draws, (torch.zeros(1, dtype=torch.int64), 7, 9))


def test_sample_fake_shapes_follow_num_samples():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        args = list(_sample_args(rows_shape=(2, 3)))
        args[0] = torch.empty(2, 3, 11, dtype=torch.bfloat16)
        for num_samples in (1, 5):
            args[6] = num_samples
            tokens, logprobs, raw, entropy = sample_ops.sample(*args)
            assert tokens.shape == logprobs.shape == raw.shape == (2, 3, num_samples)
            assert tokens.dtype == torch.int64 and logprobs.dtype == raw.dtype == torch.float32
            assert entropy.shape == (2, 3) and entropy.dtype == torch.float32


def _compiled(fn, dynamic=False):
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, backend="aot_eager", dynamic=dynamic)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", [17, "tensor"])
def test_compile_fullgraph_sample_matches_eager(backend, seed):
    logits = torch.randn(3, 4, 50, generator=torch.Generator().manual_seed(1)) * 2
    seed = torch.arange(12) * 3 + 1 if seed == "tensor" else seed

    def draw(logits):
        out = rlfuse.sample(logits, temperature=0.8, top_k=10, top_p=0.9, min_p=0.01, seed=seed, num_samples=3,
                            backend=backend)
        greedy = rlfuse.sample(logits, temperature=0.0, seed=seed, backend=backend)
        adaptive = rlfuse.sample(logits, adaptive_temperature=(0.5, 1.5, 1.0, 3.0), seed=seed, backend=backend)
        return out.tokens, out.logprobs, out.raw_logprobs, out.entropy, greedy.tokens, adaptive.tokens

    eager = draw(logits)
    compiled = _compiled(draw)(logits)
    assert eager[0].shape == (3, 4, 3) and eager[4].shape == (3, 4)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_compile_sample_keeps_the_int_seed_rng_contract():
    """A Python int seed stays a function of (seed, row) under torch.compile: the same draws."""
    logits = torch.randn(6, 40, generator=torch.Generator().manual_seed(2))
    compiled = _compiled(lambda x, s: rlfuse.sample(x, seed=s, num_samples=4, backend="cpu").tokens, dynamic=True)
    for s in (5, 6, 2**40 + 1):
        assert torch.equal(compiled(logits, s), rlfuse.sample(logits, seed=s, num_samples=4, backend="cpu").tokens)


LOSS_PATHS = {
    "dapo fused": (LossConfig.dapo(), {}),
    "grpo fused": (LossConfig.grpo(entropy_coef=0.01, rollout_correction="seq_mask", rollout_cap=3.0), {}),
    "dapo fused inplace": (LossConfig.dapo(), dict(inplace_backward=True)),
    "ppo general": (LossConfig(kl="k3", kl_coef=0.05), dict(path="general")),
    "gspo": (LossConfig.gspo(), {}),
    "gspo_token": (LossConfig(loss="gspo_token", clip_low=0.02, clip_high=0.03), {}),
    "gmpo": (LossConfig.gmpo(), {}),
    "clip_cov": (LossConfig.clip_cov(cov_ratio=0.2, cov_lb=0.0, cov_ub=50.0), {}),
    "kl_cov": (LossConfig.kl_cov(cov_ratio=0.2), {}),
    "entropy_quantile": (LossConfig.dapo(entropy_quantile=0.3), {}),
    "kl_full_coef": (LossConfig.dapo(kl_full_coef=0.1), dict(ref_logits=True)),
    "troll": (LossConfig.troll(troll_k=6, kl="k1", kl_coef=0.05), dict(old_topk=True)),
}


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("name", sorted(LOSS_PATHS))
def test_compile_fullgraph_policy_loss_matches_eager(name, packed, backend):
    config, extra = LOSS_PATHS[name]
    if backend == "torch" and "fused" in name:
        pytest.skip("backend='torch' has no fused path")
    generator = torch.Generator().manual_seed(11)
    b, t, vocab = 3, 6, 41
    hidden = torch.randn(b, t, vocab, generator=generator)
    tokens = torch.randint(0, vocab, (b, t), generator=generator)
    advantages = torch.randn(b, t, generator=generator)
    old = torch.log_softmax(hidden, -1).gather(-1, tokens[..., None])[..., 0] + 0.2 * torch.randn(b, t)
    mask = torch.rand(b, t, generator=generator) > 0.2
    kwargs = dict(advantages=advantages, old_logprobs=old, ref_logprobs=old + 0.1, rollout_logprobs=old - 0.1,
                  mask=mask)
    if packed:
        kwargs = {k: v.reshape(-1) for k, v in kwargs.items()}
        kwargs["cu_seqlens"] = torch.tensor([0, 5, 5, 12, b * t])
        hidden, tokens = hidden.reshape(b * t, vocab), tokens.reshape(-1)
    extra = dict(extra)
    if extra.pop("ref_logits", False):
        extra["ref_logits"] = hidden + 0.1
    if extra.pop("old_topk", False):
        extra["old_topk"] = rlfuse.sparse_logprobs(hidden + 0.2, tokens, k=6)

    def loss_fn(logits, tokens):
        out = rlfuse.policy_loss(logits, tokens, config=config, backend=backend, **kwargs, **extra)
        return out.loss, out.logprobs, out.metrics["entropy"]

    results = []
    for fn in (loss_fn, _compiled(loss_fn)):
        leaf = hidden.clone().requires_grad_(True)
        loss, logprobs, entropy = fn(leaf * 1.0, tokens)
        loss.backward()
        results.append((loss.detach(), logprobs, entropy, leaf.grad))
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph_kl_divergence_and_sparse_logprobs(backend):
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(2, 5, 30, generator=generator)
    y = torch.randn(2, 5, 30, generator=generator)
    tokens = torch.randint(0, 30, (2, 5), generator=generator)
    mask = torch.rand(2, 5, generator=generator) > 0.3

    def fn(x, y):
        kl = rlfuse.kl_divergence(x, y, direction="reverse", temperature=0.9, mask=mask, backend=backend)
        return kl.sum(), rlfuse.sparse_logprobs(x.detach(), tokens, k=4, backend=backend).ids

    results = []
    for f in (fn, _compiled(fn)):
        xs, ys = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
        kl, ids = f(xs * 1.0, ys * 1.0)
        kl.backward()
        results.append((kl.detach(), ids, xs.grad, ys.grad))
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager)


@pytest.mark.parametrize("name", PRESET_CASES)
def test_compile_fullgraph_every_preset(name):
    """Every LossConfig preset (and the per-call knobs) traces whole, with the eager loss and gradient."""
    logits, tokens, config, kwargs = preset_case(name, torch.Generator().manual_seed(13))

    def loss_fn(x):
        return rlfuse.policy_loss(x, tokens, config=config, backend="cpu", **kwargs).loss

    results = []
    for fn in (loss_fn, _compiled(loss_fn)):
        leaf = logits.clone().requires_grad_(True)
        loss = fn(leaf * 1.0)
        loss.backward()
        results.append((loss.detach(), leaf.grad))
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager)


@pytest.mark.parametrize("name", ["dapo fused", "ppo general", "clip_cov", "kl_cov", "entropy_quantile", "gspo"])
def test_compile_dynamic_shapes_policy_loss(name):
    """dynamic=True: two batch shapes through one compiled graph (norm_length, the selection bounds
    and the temperature may be symbolic: nothing may read them on the host)."""
    config, extra = LOSS_PATHS[name]
    if name == "ppo general":
        config = config.replace(aggregation="seq-mean-token-sum-norm", kl=None)

    def loss_fn(logits, tokens, advantages, old):
        return rlfuse.policy_loss(logits, tokens, advantages, old_logprobs=old, config=config, backend="cpu",
                                  **extra).loss

    compiled = _compiled(loss_fn, dynamic=True)
    generator = torch.Generator().manual_seed(8)
    for b, t in ((2, 5), (3, 7)):
        args = (torch.randn(b, t, 20, generator=generator), torch.randint(0, 20, (b, t), generator=generator),
                torch.randn(b, t, generator=generator), torch.randn(b, t, generator=generator) - 3)
        torch.testing.assert_close(compiled(*args), loss_fn(*args))
