"""Every public op on a ``LinearLogits`` gives what it gives on the materialised logits (issue 15).

The row kernels behind each op are checked against float64 oracles elsewhere (tests/test_*.py, and
tests/test_linear_logits.py for the chunked log-probs and fused loss from hidden states); here each
public op is called twice on the same inputs -- once with the source, once with
``src.materialize()`` (the logits made by one ``F.linear``) -- and the outputs, metrics and the
gradients of hidden / weight / bias must agree. The general-path losses are also compared with the
independent float64 policy-loss oracle.

Tolerances: both sides run the same kernels on logits from the same GEMM formula; they differ only
in the GEMMs' blocking (a chunk of rows vs all rows), i.e. in the logits' last bits: fp32 ``2e-5``
relative to the largest value (a few roundings of ``|z| <= ~10``), bf16 / fp16 one rounding of the
logits, ``2^-7`` relative. Sampled ids must be equal (the draws are keyed by row, never by chunk).
"""

from __future__ import annotations

import math

import pytest
import torch

import rlfuse
from rlfuse import LinearLogits, LossConfig
from _policy_oracle import oracle_policy_loss
from conftest import kernel_backends

BACKENDS = kernel_backends("cpu")
REL = {torch.float32: 2e-5, torch.bfloat16: 2.0**-6, torch.float16: 2.0**-8}

CASES = {
    # awkward sizes: N not a multiple of the chunk, chunk of one token, D and V not powers of two
    "n11_chunk4_bias": dict(lead=(11,), dim=13, vocab=301, chunk=4),
    "b2t5_chunk1_scale_softcap_T": dict(lead=(2, 5), dim=7, vocab=37, chunk=1, scale=0.7, softcap=3.0,
                                        temperature=0.8),
    "n9_nobias_budget_chunk": dict(lead=(9,), dim=5, vocab=1000, chunk=None, bias=False),
    "n7_batch_invariant": dict(lead=(7,), dim=6, vocab=129, chunk=3, batch_invariant=True),
    "b2t4_bf16": dict(lead=(2, 4), dim=16, vocab=200, chunk=3, dtype=torch.bfloat16),
}


def make(generator, lead, dim, vocab, chunk=None, bias=True, scale=None, softcap=None, dtype=torch.float32,
         batch_invariant=False, temperature=1.0):
    hidden = torch.randn(*lead, dim, generator=generator).to(dtype)
    weight = (torch.randn(vocab, dim, generator=generator) * 2 / math.sqrt(dim)).to(dtype)
    b = (torch.randn(vocab, generator=generator) * 0.5).to(dtype) if bias else None
    tokens = torch.randint(0, vocab, lead, generator=generator)
    options = dict(scale=scale, softcap=softcap, chunk_tokens=chunk, batch_invariant=batch_invariant)
    return (hidden, weight, b), tokens, options, temperature


class Pair:
    """The same leaves twice: ``src`` (a LinearLogits) and ``logits`` (its materialised logits)."""

    def __init__(self, tensors, options):
        self.tensors, self.options = tensors, options

    def fresh(self):
        leaves = [None if t is None else t.detach().clone().requires_grad_(True) for t in self.tensors]
        return leaves, LinearLogits(*leaves, **self.options)

    def run(self, fn):
        """``fn(source_or_logits)`` -> (outputs, gradients) for the source and for the materialised logits;
        the gradient is of ``sum(outputs[0] * upstream)``."""
        results = []
        for materialised in (False, True):
            leaves, src = self.fresh()
            outputs = fn(src.materialize() if materialised else src)
            outputs = outputs if isinstance(outputs, tuple) else (outputs,)
            if outputs[0].requires_grad:
                n = outputs[0].numel()
                upstream = (torch.linspace(-1, 1, n) if n > 1 else torch.ones(n)).reshape(outputs[0].shape)
                (outputs[0] * upstream).sum().backward()
            results.append(([o.detach() for o in outputs], [None if t is None else t.grad for t in leaves]))
        return results


def assert_same(got, expected, dtype, what):
    rel = REL[dtype]
    for i, (g, e) in enumerate(zip(got, expected)):
        if e is None:
            assert g is None, f"{what}[{i}]: unexpected gradient"
            continue
        assert g is not None and g.shape == e.shape, f"{what}[{i}]"
        if not g.is_floating_point():
            assert torch.equal(g, e), f"{what}[{i}]"
            continue
        finite = torch.isfinite(e)
        assert torch.equal(finite, torch.isfinite(g)) and torch.equal(g[~finite], e[~finite]), f"{what}[{i}]"
        scale = e[finite].abs().max().item() if finite.any() else 1.0
        torch.testing.assert_close(g[finite].double(), e[finite].double(), atol=rel * max(scale, 1.0), rtol=rel,
                                   msg=lambda m: f"{what}[{i}]: {m}")


def check(pair, fn, dtype, what):
    (out, grads), (out_m, grads_m) = pair.run(fn)
    assert_same(out, out_m, dtype, f"{what} outputs")
    assert_same(grads, grads_m, dtype, f"{what} gradients")
    return out


@pytest.fixture(params=sorted(CASES))
def case(request, generator):
    return make(generator, **CASES[request.param])


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_logprobs_and_entropy(case, backend):
    tensors, tokens, options, t = case
    pair = Pair(tensors, options)
    dtype = tensors[0].dtype
    check(pair, lambda x: rlfuse.token_logprobs(x, tokens, temperature=t, return_entropy=True, backend=backend),
          dtype, "token_logprobs")
    check(pair, lambda x: rlfuse.entropy(x, temperature=t, backend=backend), dtype, "entropy")


@pytest.mark.parametrize("backend", BACKENDS)
def test_kl_divergence_either_side(case, backend, generator):
    tensors, tokens, options, t = case
    pair = Pair(tensors, options)
    dtype = tensors[0].dtype
    other = (torch.randn(*tokens.shape, tensors[1].shape[0], generator=generator) * 2).to(dtype)
    masked_vocab = other.clone()
    masked_vocab[..., 0] = -math.inf  # an impossible token for q: KL(q || p) stays finite
    mask = torch.rand(tokens.shape, generator=generator) > 0.3
    for direction in ("forward", "reverse"):
        q_first = direction == "reverse"
        check(pair, lambda x: rlfuse.kl_divergence(x, masked_vocab if q_first else other, direction, t, mask=mask,
                                                   backend=backend), dtype, f"kl(src, tensor) {direction}")
        check(pair, lambda x: rlfuse.kl_divergence(other if q_first else masked_vocab, x, direction, t,
                                                   backend=backend), dtype, f"kl(tensor, src) {direction}")
    # Both sides sources: a second head on the same hidden states (the gradient reaches hidden twice).
    second = (torch.randn(tensors[1].shape, generator=generator) / 4).to(dtype)
    leaves, src = pair.fresh()
    kl_src = rlfuse.kl_divergence(src, LinearLogits(src.hidden, second, chunk_tokens=2), "reverse", t,
                                  backend=backend)
    kl_src.sum().backward()
    leaves_m, src_m = pair.fresh()
    kl_m = rlfuse.kl_divergence(src_m.materialize(), torch.nn.functional.linear(src_m.hidden, second), "reverse", t,
                                backend=backend)
    kl_m.sum().backward()
    assert_same([kl_src.detach()] + [l.grad for l in leaves if l is not None],
                [kl_m.detach()] + [l.grad for l in leaves_m if l is not None], dtype,
                "kl(src, src)")


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_logprobs(case, backend):
    tensors, tokens, options, t = case
    pair = Pair(tensors, options)
    _, src = pair.fresh()
    got = rlfuse.sparse_logprobs(src, tokens, k=5, temperature=t, backend=backend)
    expected = rlfuse.sparse_logprobs(src.materialize().detach(), tokens, k=5, temperature=t, backend=backend)
    assert got.vocab == expected.vocab and got.ids.shape == tokens.shape + (5,)
    assert_same([got.ids, got.count, got.logprobs], [expected.ids, expected.count, expected.logprobs],
                tensors[0].dtype, "sparse_logprobs")


@pytest.mark.parametrize("backend", BACKENDS)
def test_sample_same_tokens_for_the_same_seed(case, backend, generator):
    tensors, tokens, options, t = case
    _, src = Pair(tensors, options).fresh()
    logits = src.materialize().detach()
    rows = tokens.numel()
    per_row_t = torch.rand(tokens.shape, generator=generator) + 0.5
    for kwargs in (dict(temperature=t, seed=11), dict(temperature=per_row_t, top_k=7, top_p=0.9, seed=3),
                   dict(temperature=0.0), dict(min_p=0.05, seed=torch.arange(rows) * 7, num_samples=3)):
        got = rlfuse.sample(src, backend=backend, **kwargs)
        expected = rlfuse.sample(logits, backend=backend, **kwargs)
        assert torch.equal(got.tokens, expected.tokens), kwargs
        assert_same([got.logprobs, got.raw_logprobs, got.entropy],
                    [expected.logprobs, expected.raw_logprobs, expected.entropy], tensors[0].dtype, f"sample {kwargs}")


LOSS_CONFIGS = {
    "dapo": LossConfig.dapo(),
    "grpo_k3": LossConfig.grpo(),
    "ppo_entropy": LossConfig(entropy_coef=0.01),
    "cispo": LossConfig.cispo(),
    "reinforce": LossConfig(loss="reinforce"),
    "gspo": LossConfig.gspo(),
    "gspo_token": LossConfig(loss="gspo_token", clip_low=3e-4, clip_high=4e-4),
    "gmpo": LossConfig.gmpo(),
    "clip_cov": LossConfig.clip_cov(),
    "kl_cov": LossConfig.kl_cov(),
    "entropy_mask": LossConfig.dapo(entropy_quantile=0.5),
    "rollout_tis": LossConfig.dapo(rollout_correction="token_truncate", rollout_cap=2.0),
    "troll": LossConfig.troll(troll_k=4),
}


def loss_inputs(tokens, generator):
    shape = tokens.shape
    return dict(advantages=torch.randn(shape, generator=generator),
                old_logprobs=-3 + 0.5 * torch.randn(shape, generator=generator),
                ref_logprobs=-3 + 0.5 * torch.randn(shape, generator=generator),
                rollout_logprobs=-3 + 0.5 * torch.randn(shape, generator=generator),
                mask=torch.rand(shape, generator=generator) > 0.25)


@pytest.mark.parametrize("name", sorted(LOSS_CONFIGS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_policy_loss_every_variant(name, backend, generator):
    tensors, tokens, options, t = make(generator, lead=(2, 6), dim=9, vocab=211, chunk=5)
    config = LOSS_CONFIGS[name].replace(temperature=t)
    if name == "grpo_k3":
        config = config.replace(kl_coef=0.05)
    inputs = loss_inputs(tokens, generator)
    extra = {}
    if name == "troll":
        old_logits = torch.randn(*tokens.shape, 211, generator=generator)
        extra["old_topk"] = rlfuse.sparse_logprobs(old_logits, tokens, k=4)
    pair = Pair(tensors, options)
    dtype = tensors[0].dtype
    keys = []

    def loss(x):
        out = rlfuse.policy_loss(x, tokens, config=config, backend=backend, **inputs, **extra)
        keys[:] = sorted(k for k in out.metrics if k != "path")
        return (out.loss, out.logprobs, out.entropy, *(out.metrics[k] for k in keys))

    (got, grads), (expected, grads_m) = pair.run(loss)
    valid = inputs["mask"]
    # masked positions: the source reports 0 (their rows never reach a GEMM), the logits their values
    got[1], got[2] = got[1][valid], got[2][valid]
    expected[1], expected[2] = expected[1][valid], expected[2][valid]
    assert_same(got, expected, dtype, f"policy_loss {name}")
    assert_same(grads, grads_m, dtype, f"policy_loss {name} gradients")
    if name not in ("troll",):
        # and the independent float64 oracle, through the materialised logits' chain rule
        leaves, src = pair.fresh()
        logits64 = LinearLogits(*[None if l is None else l.double() for l in leaves], scale=options["scale"],
                                softcap=options["softcap"]).materialize()
        loss64, dlogits64 = oracle_policy_loss(logits64.detach(), tokens, inputs["advantages"], inputs["old_logprobs"],
                                               inputs["ref_logprobs"], inputs["rollout_logprobs"], inputs["mask"],
                                               config=config)
        torch.testing.assert_close(got[0].double(), loss64.double(), atol=1e-5, rtol=1e-5)
        expected64 = torch.autograd.grad(logits64, [l for l in leaves if l is not None], dlogits64)
        for g, e in zip([g for g in grads if g is not None], expected64):
            torch.testing.assert_close(g.double(), e.double(), atol=2e-5 * max(1.0, e.abs().max().item()), rtol=2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_policy_loss_paths_and_full_kl_to_a_reference_head(backend, generator):
    tensors, tokens, options, t = make(generator, lead=(3, 4), dim=8, vocab=97, chunk=5)
    inputs = loss_inputs(tokens, generator)
    ref_weight = tensors[1] + 0.1 * torch.randn(tensors[1].shape, generator=generator)
    pair = Pair(tensors, options)
    # kl_full_coef != 0 makes the loss non-token-local (general path); with 0 the KL is a metric only
    runs = [("general", LossConfig.dapo(kl_full_coef=0.1))]
    if backend != "torch":
        runs.append(("fused", LossConfig.dapo()))
    for path, config in runs:
        def loss(x):
            if isinstance(x, LinearLogits):
                ref = LinearLogits(x.hidden.detach(), ref_weight, tensors[2], chunk_tokens=3)
            else:
                ref = None
            out = rlfuse.policy_loss(x, tokens, config=config, backend=backend, path=path,
                                     ref_logits=ref if ref is not None else loss.ref_logits, **inputs)
            assert out.metrics["path"] == path
            return out.loss, out.metrics["kl_full"]

        _, src = pair.fresh()
        loss.ref_logits = torch.nn.functional.linear(src.hidden.detach(), ref_weight, tensors[2])
        (got, grads), (expected, grads_m) = pair.run(loss)
        assert_same(got, expected, tensors[0].dtype, f"policy_loss {path} + full KL")
        assert_same(grads, grads_m, tensors[0].dtype, f"policy_loss {path} + full KL gradients")


def test_zero_tokens_every_op(generator):
    tensors, tokens, options, t = make(generator, lead=(0,), dim=4, vocab=9, chunk=2)
    _, src = Pair(tensors, options).fresh()
    logp, entropy = rlfuse.token_logprobs(src, tokens, return_entropy=True)
    assert logp.shape == entropy.shape == (0,)
    assert rlfuse.kl_divergence(src, torch.randn(0, 9)).shape == (0,)
    assert rlfuse.sparse_logprobs(src, tokens, k=3).ids.shape == (0, 3)
    assert rlfuse.sample(src, seed=1).tokens.shape == (0,)
    out = rlfuse.policy_loss(src, tokens, torch.zeros(0), old_logprobs=torch.zeros(0))
    out.loss.backward()
    assert out.loss.item() == 0 and src.weight.grad is not None and torch.all(src.weight.grad == 0)


def test_source_errors_name_the_argument(generator):
    tensors, tokens, options, t = make(generator, lead=(4,), dim=4, vocab=9, chunk=2)
    _, src = Pair(tensors, options).fresh()
    with pytest.raises(ValueError, match="inplace_backward"):
        rlfuse.token_logprobs(src, tokens, inplace_backward=True)
    with pytest.raises(ValueError, match="inplace_backward"):
        rlfuse.policy_loss(src, tokens, torch.ones(4), old_logprobs=torch.zeros(4), inplace_backward=True)
    with pytest.raises(ValueError, match="tokens must have shape"):
        rlfuse.token_logprobs(src, tokens[:3])
    with pytest.raises(ValueError, match=r"tokens must lie in \[0, V\)"):
        rlfuse.sparse_logprobs(src, tokens + 9)
    with pytest.raises(ValueError, match="other_logits must have the logits' shape"):
        rlfuse.kl_divergence(src, torch.randn(4, 8))
    with pytest.raises(TypeError, match="other_logits must have the logits' dtype"):
        rlfuse.kl_divergence(src, torch.randn(4, 9, dtype=torch.float64))
    with pytest.raises(ValueError, match="temperature"):
        rlfuse.entropy(src, temperature=0.0)
    with pytest.raises(ValueError, match="top_k"):
        rlfuse.sample(src, top_k=-1)


DISTILL_KINDS = [("jsd", {}), ("jsd", {"beta": 0.0}), ("forward_kl", {}), ("reverse_kl", {}),
                 ("sparse_kl", {}), ("sparse_kl", {"sparse_convention": "verl"}), ("sampled_reverse_kl", {}),
                 ("sampled_reverse_kl", {"estimator": "k3"})]


@pytest.mark.parametrize("kind, options", DISTILL_KINDS, ids=lambda v: str(v))
@pytest.mark.parametrize("backend", BACKENDS)
def test_distill_from_hidden_states(kind, options, backend, generator):
    from rlfuse.distill import distill_loss

    tensors, tokens, src_options, t = make(generator, lead=(2, 5), dim=7, vocab=131, chunk=3, temperature=0.9)
    vocab = tensors[1].shape[0]
    teacher_logits = torch.randn(*tokens.shape, vocab, generator=generator) * 2
    mask = torch.rand(tokens.shape, generator=generator) > 0.3
    kwargs = dict(kind=kind, temperature=t, mask=mask, backend=backend, aggregation="seq-mean-token-mean", **options)
    if kind == "sparse_kl":
        teacher = rlfuse.sparse_logprobs(teacher_logits, tokens, k=6, temperature=t)
    elif kind == "sampled_reverse_kl":
        teacher = None
        kwargs.update(tokens=tokens, teacher_logprobs=torch.log_softmax(teacher_logits / t, -1).gather(
            -1, tokens.unsqueeze(-1)).squeeze(-1))
    else:
        teacher = teacher_logits
    pair = Pair(tensors, src_options)

    def loss(x):
        out = distill_loss(x, teacher, **kwargs)
        return out.loss, out.per_token, out.metrics["distill_mean"]

    (got, grads), (expected, grads_m) = pair.run(loss)
    assert_same(got, expected, tensors[0].dtype, f"distill {kind}")
    assert_same(grads, grads_m, tensors[0].dtype, f"distill {kind} gradients")


@pytest.mark.parametrize("backend", BACKENDS)
def test_distill_teacher_from_hidden_states(backend, generator):
    """Both sides LinearLogits (a student head and a teacher head on their own hidden states)."""
    from rlfuse.distill import distill_loss

    tensors, tokens, options, t = make(generator, lead=(9,), dim=6, vocab=77, chunk=4)
    teacher_hidden = torch.randn(9, 6, generator=generator)
    teacher_weight = torch.randn(77, 6, generator=generator)
    pair = Pair(tensors, options)

    def loss(x):
        if isinstance(x, LinearLogits):
            teacher = LinearLogits(teacher_hidden, teacher_weight, chunk_tokens=2)
        else:
            teacher = torch.nn.functional.linear(teacher_hidden, teacher_weight)
        return distill_loss(x, teacher, kind="jsd", beta=0.3, backend=backend).loss

    (got, grads), (expected, grads_m) = pair.run(loss)
    assert_same(got, expected, tensors[0].dtype, "distill jsd, teacher source")
    assert_same(grads, grads_m, tensors[0].dtype, "distill jsd, teacher source, gradients")
