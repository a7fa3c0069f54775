"""No host synchronisation on any forward / backward path (issue 14).

On CPU tensors a host read is not a device synchronisation, but it is the same Python call that
would synchronise on CUDA (``.item()``, ``bool(t)``, ``.tolist()``, ``torch.equal``, a boolean
mask index, ``nonzero``, ...). ``count_host_reads`` records every such call during a forward and
backward of each public op on CPU tensors, twice over: Python-level wrappers of the Tensor methods
and ``torch.equal``, and a dispatch mode that sees the aten ops that read data back to the host
(``_local_scalar_dense``, behind every ``item`` / ``bool`` / ``int`` / ``float``) or whose output
shape depends on the data (``nonzero``, ``masked_select``, boolean indexing, ``repeat_interleave``
without ``output_size``). With validation off (``rlfuse.set_validation(False)``) every op makes
none; with validation on, each call makes exactly one (README "Host synchronisation").
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import rlfuse
from rlfuse import LossConfig
from rlfuse import losses
from rlfuse import reference as ref
from rlfuse.ops import policy_loss as policy_ops
from _presets import PRESET_CASES, preset_case

aten = torch.ops.aten
BACKENDS = [b for b in ("cpu", "torch") if b in rlfuse.available_backends("cpu")]

# aten ops that read tensor data on the host, or whose output shape depends on tensor data.
READ_OPS = {aten._local_scalar_dense, aten.equal, aten.is_nonzero, aten.nonzero, aten.nonzero_static,
            aten.masked_select, aten._unique2, aten.unique_dim, aten.unique_consecutive, aten.item}
TENSOR_METHODS = ("item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__", "__complex__")


class _DataDependentOps(TorchDispatchMode):
    def __init__(self, events):
        super().__init__()
        self.events = events

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        if packet in READ_OPS:
            self.events.append(f"aten.{packet.__name__}")
        elif packet is aten.index and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else ())):
            self.events.append("aten.index with a boolean mask")
        elif packet is aten.repeat_interleave and kwargs.get("output_size") is None and not (
                len(args) > 3 and args[3] is not None):
            self.events.append("aten.repeat_interleave without output_size")
        return func(*args, **kwargs)


@contextlib.contextmanager
def count_host_reads():
    """Yields a list that collects one entry per host read of tensor data (see module docstring)."""
    events: list[str] = []
    originals = {name: getattr(torch.Tensor, name) for name in TENSOR_METHODS}
    original_equal = torch.equal

    def wrap(name, original):
        def wrapper(self, *args, **kwargs):
            events.append(f"Tensor.{name}")
            return original(self, *args, **kwargs)
        return wrapper

    def equal(*args, **kwargs):
        events.append("torch.equal")
        return original_equal(*args, **kwargs)

    for name, original in originals.items():
        setattr(torch.Tensor, name, wrap(name, original))
    torch.equal = equal
    try:
        with _DataDependentOps(events):
            yield events
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
        torch.equal = original_equal


@pytest.fixture
def validation_off():
    previous = rlfuse.set_validation(False)
    yield
    rlfuse.set_validation(previous)


@pytest.fixture(autouse=True)
def device_rescale(monkeypatch):
    """The fused backward's device path (what CUDA tensors take): on CPU tensors the host path reads
    the CPU upstream gradient, which is not a synchronisation but looks like one here."""
    monkeypatch.setattr(policy_ops, "DEVICE_RESCALE_ON_CPU", True, raising=False)


def _batch(generator, batch=3, seq=9, vocab=67, packed=False):
    logits = (torch.randn(batch, seq, vocab, generator=generator) * 2).requires_grad_(True)
    tokens = torch.randint(0, vocab, (batch, seq), generator=generator)
    current = torch.log_softmax(logits.detach(), -1).gather(-1, tokens[..., None])[..., 0]
    mask = torch.rand(batch, seq, generator=generator) > 0.2
    mask[:, 0] = True
    kwargs = dict(
        advantages=torch.randn(batch, seq, generator=generator),
        old_logprobs=current + 0.3 * torch.randn(batch, seq, generator=generator),
        ref_logprobs=current + 0.2 * torch.randn(batch, seq, generator=generator),
        rollout_logprobs=current + 0.2 * torch.randn(batch, seq, generator=generator),
        mask=mask,
    )
    if packed:
        n = batch * seq
        kwargs = {k: v.reshape(n) for k, v in kwargs.items()}
        kwargs["cu_seqlens"] = torch.tensor([0, 4, 4, n - 5, n])
        return logits, logits.reshape(n, vocab), tokens.reshape(n), kwargs
    return logits, logits, tokens, kwargs


LOSSES = {
    "dapo (fused)": (LossConfig.dapo(), {}),
    "grpo k3 + entropy (fused)": (LossConfig.grpo(entropy_coef=0.01), {}),
    "dapo seq_mask (fused)": (LossConfig.dapo(rollout_correction="seq_mask", rollout_cap=3.0), {}),
    "dapo inplace (fused)": (LossConfig.dapo(), dict(inplace_backward=True)),
    "ppo (general)": (LossConfig(), dict(path="general")),
    "gspo": (LossConfig.gspo(kl="k3", kl_coef=0.05), {}),
    "gspo_token": (LossConfig(loss="gspo_token", clip_low=0.02, clip_high=0.03), {}),
    "gmpo": (LossConfig.gmpo(), {}),
    "clip_cov": (LossConfig.clip_cov(cov_ratio=0.2, cov_lb=0.0, cov_ub=50.0), {}),
    "kl_cov": (LossConfig.kl_cov(cov_ratio=0.2), {}),
    "entropy_quantile": (LossConfig.dapo(entropy_quantile=0.3), {}),
    "kl_full_coef": (LossConfig.dapo(kl_full_coef=0.1), dict(ref_logits=True)),
    "troll": (LossConfig.troll(troll_k=8, kl="k1", kl_coef=0.05), dict(old_topk=True)),
}


def _policy_loss_call(generator, name, backend, packed=False):
    config, extra = LOSSES[name]
    if backend == "torch" and "(fused)" in name:
        pytest.skip("backend='torch' has no fused path")
    leaf, logits, tokens, kwargs = _batch(generator, packed=packed)
    extra = dict(extra)
    if extra.pop("ref_logits", False):
        extra["ref_logits"] = logits.detach() + 0.1 * torch.randn(logits.shape, generator=generator)
    if extra.pop("old_topk", False):
        extra["old_topk"] = rlfuse.sparse_logprobs(logits.detach() + 0.2, tokens, k=8)
    if extra.get("inplace_backward"):
        logits = logits * 1.0  # in place needs a non-leaf buffer

    def call():
        out = rlfuse.policy_loss(logits, tokens, config=config, backend=backend, **kwargs, **extra)
        out.loss.backward()
        return out

    return call


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_policy_loss_forward_and_backward_never_read_the_host(validation_off, name, backend, packed, generator):
    call = _policy_loss_call(generator, name, backend, packed)
    with count_host_reads() as reads:
        out = call()
    assert reads == [], f"{name}: host reads {reads}"
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", PRESET_CASES)
def test_every_preset_never_reads_the_host(validation_off, name, backend, generator):
    """Every LossConfig preset and per-call knob (tests/_presets.py), forward and backward."""
    logits, tokens, config, kwargs = preset_case(name, generator)
    leaf = logits.requires_grad_(True)
    with count_host_reads() as reads:
        out = rlfuse.policy_loss(leaf, tokens, config=config, backend=backend, **kwargs)
        out.loss.backward()
    assert reads == [], f"{name}: host reads {reads}"
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["dapo (fused)", "ppo (general)", "clip_cov", "troll"])
def test_policy_loss_validation_is_one_host_read(name, backend, generator):
    """Token ids, cu_seqlens and old_topk are validated together: one read per call."""
    call = _policy_loss_call(generator, name, backend, packed=True)
    with count_host_reads() as reads:
        call()
    assert reads == ["Tensor.tolist"], reads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("inplace", [False, True])
def test_token_logprobs_and_entropy(validation_off, backend, inplace, generator):
    leaf = torch.randn(4, 5, 33, generator=generator, requires_grad=True)
    tokens = torch.randint(0, 33, (4, 5), generator=generator)
    with count_host_reads() as reads:
        logits = leaf * 1.0
        logp, entropy = rlfuse.token_logprobs(logits, tokens, temperature=0.8, return_entropy=True, backend=backend,
                                               inplace_backward=inplace)
        (logp.sum() + entropy.sum()).backward()
        rlfuse.entropy(leaf, backend=backend).sum().backward()
    assert reads == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_kl_divergence(validation_off, backend, generator):
    x = torch.randn(3, 4, 40, generator=generator, requires_grad=True)
    y = torch.randn(3, 4, 40, generator=generator, requires_grad=True)
    mask = torch.rand(3, 4, generator=generator) > 0.3
    with count_host_reads() as reads:
        for direction in ("forward", "reverse"):
            rlfuse.kl_divergence(x, y, direction=direction, mask=mask, backend=backend).sum().backward()
    assert reads == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_logprobs(validation_off, backend, generator):
    logits = torch.randn(3, 4, 50, generator=generator)
    tokens = torch.randint(0, 50, (3, 4), generator=generator)
    with count_host_reads() as reads:
        rlfuse.sparse_logprobs(logits, tokens, k=6, backend=backend)
    assert reads == []


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("per_token_temperature", [False, True])
def test_distill_loss_makes_at_most_one_host_read(backend, per_token_temperature, generator):
    """Every kind: none without validation; with it, one read when the call has data to check (a
    per-token temperature's values, the sampled tokens' ids), read together."""
    from rlfuse.distill import distill_loss

    x = torch.randn(3, 4, 50, generator=generator, requires_grad=True)
    teacher = torch.randn(3, 4, 50, generator=generator)
    tokens = torch.randint(0, 50, (3, 4), generator=generator)
    temperature = torch.rand(3, 4, generator=generator) + 0.5 if per_token_temperature else 0.8
    kinds = {"jsd": dict(teacher=teacher), "reverse_kl": dict(teacher=teacher),
             "sparse_kl": dict(teacher=rlfuse.sparse_logprobs(teacher, tokens, 5)),
             "sampled_reverse_kl": dict(tokens=tokens, teacher_logprobs=torch.randn(3, 4, generator=generator))}
    previous = rlfuse.set_validation(False)
    try:
        for validate in (False, True):
            rlfuse.set_validation(validate)
            for kind, kwargs in kinds.items():
                with count_host_reads() as reads:
                    distill_loss(x, kind=kind, temperature=temperature, backend=backend, **kwargs).loss.backward()
                has_data = per_token_temperature or kind == "sampled_reverse_kl"
                assert reads == (["Tensor.tolist"] if validate and has_data else []), (kind, validate, reads)
    finally:
        rlfuse.set_validation(previous)


SAMPLE_CALLS = {
    "plain": dict(),
    "filters": dict(temperature=0.7, top_k=5, top_p=0.9, min_p=0.02, num_samples=3),
    "greedy": dict(temperature=0.0),
    "tensors": dict(temperature=torch.tensor([0.5, 1.0, 0.0, 2.0, 1.0, 0.9]), top_k=torch.tensor([0, 3, 1, 9, 2, 0]),
                    top_p=torch.full((6,), 0.8), min_p=torch.zeros(6), seed=torch.arange(6) * 11),
    "adaptive": dict(adaptive_temperature=(0.5, 1.5, 1.0, 2.5), num_samples=2),
    "adaptive constant": dict(adaptive_temperature=(0.7, 0.7, 1.0, 2.5)),
}


def _sample_backends():
    return [b for b in ("cpu", "torch") if b in rlfuse.available_backends("cpu")]


@pytest.mark.parametrize("backend", _sample_backends())
@pytest.mark.parametrize("name", sorted(SAMPLE_CALLS))
def test_sample_never_reads_the_host_without_validation(validation_off, name, backend, generator):
    logits = torch.randn(2, 3, 30, generator=generator)
    kwargs = {"seed": 3, **SAMPLE_CALLS[name]}
    with count_host_reads() as reads:
        rlfuse.sample(logits, backend=backend, **kwargs)
    assert reads == []


@pytest.mark.parametrize("backend", _sample_backends())
@pytest.mark.parametrize("name", sorted(SAMPLE_CALLS))
def test_sample_validation_is_one_read_of_a_small_result(name, backend, generator):
    """Parameters given as tensors and the rows that cannot be sampled (from the pass's own NaN
    entropy, not a second read of the logits) are checked with one host read per call."""
    logits = torch.randn(2, 3, 30, generator=generator)
    kwargs = {"seed": 3, **SAMPLE_CALLS[name]}
    with count_host_reads() as reads:
        rlfuse.sample(logits, backend=backend, **kwargs)
    assert reads == ["Tensor.tolist"], reads


def test_sample_reads_the_logits_once():
    """Without adaptive temperature (or with a constant one) the only pass over the logits is the
    sampling kernel's: no max-per-row scan before it."""
    logits = torch.randn(4, 50)
    seen = []

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            reads_logits = any(isinstance(a, torch.Tensor) and a.data_ptr() == logits.data_ptr()
                               and a.numel() == logits.numel() for a in args)
            if reads_logits and func.overloadpacket is not aten.detach:
                seen.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    with Ops():
        rlfuse.sample(logits, temperature=0.8, top_p=0.9, seed=1, backend="cpu")
    assert seen == ["sample"], seen


# --- the sync-free forms of the general path's selections equal their direct forms -----------------

def _selection_inputs(generator, n=200):
    logp = -torch.rand(n, generator=generator, dtype=torch.float64) * 3
    old = logp + 0.3 * torch.randn(n, generator=generator, dtype=torch.float64)
    advantages = torch.randn(n, generator=generator, dtype=torch.float64)
    mask = (torch.rand(n, generator=generator) > 0.3).double()
    return logp, old, advantages, mask


@pytest.mark.parametrize("seed", [0, 1, 7, 12345])
@pytest.mark.parametrize("ratio", [0.001, 0.05, 0.3, 1.0])
def test_clip_cov_pick_equals_the_randperm_form(seed, ratio, generator):
    logp, old, advantages, mask = _selection_inputs(generator)
    config = LossConfig.clip_cov(cov_ratio=ratio, cov_lb=0.0, cov_ub=10.0, seed=seed)
    expected = ref.clip_cov_term(logp, old, advantages, mask, config)
    got = losses.clip_cov_term(logp, old, advantages, mask, config)
    assert torch.equal(got == 0, expected == 0) and (got == 0).any()
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("n", [0, 1, 2, 3, 17, 64])
def test_randperm_prefix_equals_torch_randperm(n):
    for seed in range(12):
        for bound in (1, 5, 64):
            expected = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:bound]
            got = losses._randperm_prefix(torch.tensor(n), bound, seed)[:min(bound, n)]
            assert torch.equal(got, expected), (n, seed, bound)


@pytest.mark.parametrize("ratio", [0.001, 0.05, 0.5, 1.0])
def test_kl_cov_pick_equals_the_topk_form(ratio, generator):
    logp, old, advantages, mask = _selection_inputs(generator)
    config = LossConfig.kl_cov(cov_ratio=ratio)
    torch.testing.assert_close(losses.kl_cov_term(logp, old, advantages, mask, config),
                               ref.kl_cov_term(logp, old, advantages, mask, config), rtol=0, atol=0)
    none = torch.zeros_like(mask)
    torch.testing.assert_close(losses.kl_cov_term(logp, old, advantages, none, config),
                               ref.kl_cov_term(logp, old, advantages, none, config), rtol=0, atol=0)


@pytest.mark.parametrize("rho", [0.0, 0.2, 0.5, 0.99, 1.0])
def test_entropy_quantile_equals_torch_quantile(rho, generator):
    entropy = torch.rand(150, generator=generator) * 4
    entropy[::7] = entropy[3]  # ties
    for mask in (torch.rand(150, generator=generator) > 0.4, torch.zeros(150, dtype=torch.bool),
                 torch.arange(150) == 5, torch.ones(150, dtype=torch.bool)):
        got = losses.entropy_minority_mask(entropy, mask.float(), rho)
        assert torch.equal(got, ref.entropy_minority_mask(entropy, mask.float(), rho))
    poisoned = entropy.clone()
    poisoned[10] = float("nan")
    assert torch.equal(losses.entropy_minority_mask(poisoned, torch.ones(150), rho),
                       ref.entropy_minority_mask(poisoned, torch.ones(150), rho))


# --- the counter itself ----------------------------------------------------------------------------

@pytest.mark.parametrize("read", [
    lambda t: t.sum().item(), lambda t: bool(t.any()), lambda t: int(t.argmax()), lambda t: float(t.max()),
    lambda t: t.tolist(), lambda t: torch.equal(t, t), lambda t: t[t > 0], lambda t: torch.nonzero(t),
    lambda t: t.repeat_interleave(torch.tensor([1, 2, 3])), lambda t: t[torch.tensor(1)],
    lambda t: torch.quantile(t[t > 0], 0.5), lambda t: t.masked_select(t > 0),
], ids=["item", "bool", "int", "float", "tolist", "equal", "mask index", "nonzero", "repeat_interleave",
        "0-dim index", "quantile of a masked select", "masked_select"])
def test_the_counter_sees_host_reads(read):
    t = torch.tensor([1.0, -2.0, 3.0])
    with count_host_reads() as reads:
        read(t)
    assert reads, "not detected"


def test_validation_switch_and_environment_variable():
    import subprocess
    import sys

    assert rlfuse.set_validation(False) is True
    try:
        logp = rlfuse.token_logprobs(torch.zeros(2, 5), torch.tensor([1, 7]))  # id 7 >= V: NaN, no error
        assert torch.isnan(logp[1]) and torch.isfinite(logp[0])
    finally:
        assert rlfuse.set_validation(True) is False
    with pytest.raises(ValueError, match=r"tokens must lie in \[0, V\)"):
        rlfuse.token_logprobs(torch.zeros(2, 5), torch.tensor([1, 7]))
    with pytest.raises(TypeError):
        rlfuse.set_validation(0)
    code = "import rlfuse._validation as v; print(v.validation_enabled())"
    for value, expected in (("0", "False"), ("1", "True"), ("off", "False")):
        env = {**__import__("os").environ, "RLFUSE_VALIDATE": value}
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
        assert out.stdout.strip() == expected
