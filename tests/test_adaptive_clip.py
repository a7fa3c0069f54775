"""Issue 18 adaptive clipping: per-token clip bounds, DCPO, BAPO, HAPO, ERC, CPGD (docs/SPEC.md section 12),
every CPU backend (Triton in the interpreter) and path, against the float64 oracle of _adaptive_oracle.py."""

from __future__ import annotations

import math

import pytest
import torch

import rlfuse
from rlfuse import LossConfig
import _adaptive_oracle as oracle
from conftest import kernel_backends

C = LossConfig
BACKENDS = kernel_backends("cpu")
# (batch, seq, vocab): V below one Triton / CPU block and above it (not a power of two), one row.
SIZES = [(2, 5, 37), (2, 3, 1500), (1, 1, 37)]


def make_batch(generator, batch, seq, vocab, peaked=False):
    logits = torch.randn(batch, seq, vocab, generator=generator) * 2
    tokens = torch.randint(0, vocab, (batch, seq), generator=generator)
    if peaked:  # likely chosen tokens (old probability ~0.1-0.99), where DCPO's bounds are tight
        boost = math.log(vocab) + 2 + 4 * torch.rand(batch, seq, 1, generator=generator)
        logits.scatter_add_(-1, tokens.unsqueeze(-1), boost)
    # A masked vocabulary entry (-inf) in every row, never the chosen token.
    blocked = (tokens + 1) % vocab
    logits.scatter_(-1, blocked.unsqueeze(-1), float("-inf"))
    with torch.no_grad():
        current, entropy = oracle.row_logprobs(logits.double(), tokens)
    old = (current + 0.5 * torch.randn(batch, seq, generator=generator, dtype=torch.float64)).float()
    old_entropy = (entropy * (1 + 0.08 * torch.randn(batch, seq, generator=generator, dtype=torch.float64))).float()
    advantages = torch.randn(batch, seq, generator=generator)
    mask = torch.rand(batch, seq, generator=generator) > 0.3
    mask[0, 0] = True
    if batch * seq > 1:
        mask[-1, -1] = False
    return dict(logits=logits, tokens=tokens, advantages=advantages, old_logprobs=old, mask=mask), old_entropy


def run(batch, config, backend, path="auto", **extra):
    logits = batch["logits"].clone().requires_grad_(True)
    kwargs = {k: v for k, v in batch.items() if k != "logits"}
    out = rlfuse.policy_loss(logits, config=config, backend=backend, path=path, **kwargs, **extra)
    out.loss.backward()
    return out, logits.grad


def expected(batch, per_token_loss):
    """The oracle's token-mean loss and logits gradient; ``per_token_loss(logp, entropy)`` in float64."""
    logits = batch["logits"].double().requires_grad_(True)
    logp, entropy = oracle.row_logprobs(logits, batch["tokens"])
    logp.retain_grad()
    loss = oracle.token_mean(per_token_loss(logp, entropy), batch["mask"])
    loss.backward()
    return loss.detach(), logits.grad, logp.grad.abs().max().item()


def assert_matches(out, grad, want_loss, want_grad, upstream, mask):
    # fp32 log-softmax of V <= 1500 entries: ~1e-6 relative in logp; the loss is O(1) sums of them. A
    # gradient entry is dL/dlogp (1[j = y] - p_j) with p_j in fp32: a few ulp of 1 times ``upstream``
    # (the largest |dL/dlogp|), which dominates when the chosen token's p is near 1.
    torch.testing.assert_close(out.loss.detach().double(), want_loss, atol=2e-5, rtol=2e-5)
    scale = want_grad.abs().max().item()
    torch.testing.assert_close(grad.double(), want_grad, atol=2e-6 * scale + 4e-7 * upstream + 1e-8, rtol=2e-6)
    assert not grad[~mask].any()  # masked rows: an exact zero gradient


@pytest.fixture
def cases(generator):
    def build(size, peaked=False):
        batch, old_entropy = make_batch(generator, *size, peaked=peaked)
        shape = batch["tokens"].shape
        bounds = dict(low=0.05 + 0.3 * torch.rand(shape, generator=generator),
                      high=0.05 + 0.4 * torch.rand(shape, generator=generator),
                      dual=1.5 + 2 * torch.rand(shape, generator=generator))
        return batch, old_entropy, bounds
    return build


def check(batch, config, backend, per_token_loss, paths=("auto", "general"), **extra):
    want = expected(batch, per_token_loss)
    outs = []
    for path in paths:
        out, grad = run(batch, config, backend, path, **extra)
        assert_matches(out, grad, *want, batch["mask"])
        outs.append(out)
    return outs[0]


@pytest.mark.parametrize("size", SIZES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("backend", BACKENDS)
def test_per_token_bounds_ppo_with_dual_clip(size, backend, cases):
    batch, _, b = cases(size)
    config = C.dapo(clip_low=b["low"], clip_high=b["high"], dual_clip=b["dual"])
    out = check(batch, config, backend,
                   lambda lp, h: oracle.ppo_loss(lp, batch["old_logprobs"], batch["advantages"], b["low"].double(),
                                                 b["high"].double(), b["dual"].double()))
    assert out.metrics["path"] == ("general" if backend == "torch" else "fused")  # the kernel reads the rows
    valid = batch["mask"]
    r = (out.logprobs.double() - batch["old_logprobs"].double()).exp()
    a = batch["advantages"]
    frac = ((a > 0) & (r > 1 + b["high"]) & valid).sum() / valid.sum()
    torch.testing.assert_close(out.metrics["clip_frac_high"].double(), frac.double())
    torch.testing.assert_close(out.metrics["clip_low_mean"], b["low"][valid].mean())


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_token_bounds_cispo_spo_cpgd(backend, cases):
    batch, _, b = cases(SIZES[0])
    old, a = batch["old_logprobs"], batch["advantages"]

    def cispo(lp, h):
        weight = torch.minimum(torch.maximum(oracle.log_ratio(lp, old).exp(), 1 - b["low"].double()),
                               1 + b["high"].double())
        return -weight.detach() * a.double() * lp

    def spo(lp, h):
        r = oracle.log_ratio(lp, old).exp()
        return -(a.double() * r - a.double().abs() * (r - 1) ** 2 / (2 * b["high"].double()))

    check(batch, C(loss="cispo", cispo_mode="two_sided", clip_low=b["low"], clip_high=b["high"]), backend, cispo)
    check(batch, C.spo(clip_high=b["high"]), backend, spo)


@pytest.mark.parametrize("name", ["gppo", "gspo_token", "gmpo", "clip_cov"])
def test_constant_tensor_bounds_equal_the_float_config(name, generator):
    """Every other clipped variant: a per-token tensor holding the float gives the float's loss and gradient."""
    batch, _ = make_batch(generator, 2, 5, 37)
    base = {"gppo": C.gppo(), "gspo_token": C(loss="gspo_token", clip_low=0.02, clip_high=0.03),
            "gmpo": C.gmpo(), "clip_cov": C.clip_cov(cov_ratio=0.2, cov_lb=0.0, cov_ub=50.0)}[name]
    full = torch.ones_like(batch["advantages"])
    tensors = base.replace(clip_low=full * base.clip_low, clip_high=full * base.clip_high,
                           **({"dual_clip": full * base.dual_clip} if base.dual_clip is not None else {}))
    want, want_grad = run(batch, base, "cpu", "general")
    got, grad = run(batch, tensors, "cpu")
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, want_grad, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("size", [(4, 8, 37), (3, 6, 1500)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("backend", BACKENDS)
def test_dcpo(size, backend, cases):
    batch, _, _ = cases(size, peaked=True)
    config = C.dcpo()
    low, high = oracle.dcpo_eps(batch["old_logprobs"], 0.2, 0.28, 10.0)
    out = check(batch, config, backend,
                   lambda lp, h: oracle.ppo_loss(lp, batch["old_logprobs"], batch["advantages"], low, high, 10.0))
    assert out.metrics["path"] == ("general" if backend == "torch" else "fused")
    valid = batch["mask"]
    torch.testing.assert_close(out.metrics["clip_high_mean"].double(), high[valid].mean(), rtol=1e-5, atol=0)
    assert (low[valid] < 0.5).any()  # some lower bounds above the 0.5 floor: the formula is exercised
    assert out.metrics["clip_frac_low"] + out.metrics["clip_frac_high"] > 0


@pytest.mark.parametrize("target,size", [(0.5, SIZES[0]), (0.9, SIZES[0]), (0.5, SIZES[1]), (0.5, SIZES[2])],
                         ids=["0.5", "0.9", "0.5-wide", "0.5-one-row"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_bapo(target, size, backend, cases):
    batch, _, _ = cases(size)
    config = C.bapo(bapo_target=target)
    old, a, mask = batch["old_logprobs"], batch["advantages"], batch["mask"]
    with torch.no_grad():
        logp, _ = oracle.row_logprobs(batch["logits"].double(), batch["tokens"])
    c_low, c_high = oracle.bapo_ratio_bounds(logp, old, a, mask, target, 0.6, 0.9, 1.2, 3.0, 0.05)
    out = check(batch, config, backend, lambda lp, h: oracle.ppo_loss(lp, old, a, 1 - c_low, c_high - 1))
    assert out.metrics["path"] == ("general" if backend == "torch" else "fused")  # bounds from the pre-pass
    torch.testing.assert_close(out.metrics["bapo_clip_low"].item(), c_low, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.metrics["bapo_clip_high"].item(), c_high, atol=1e-6, rtol=0)


def test_bapo_moves_the_bounds_when_negative_tokens_dominate(generator):
    batch, _ = make_batch(generator, 2, 5, 37)
    batch["advantages"] = -batch["advantages"].abs()
    batch["advantages"][0, 0] = 0.1  # one small positive token: the search runs to the widest bounds
    out, _ = run(batch, C.bapo(), "cpu")
    assert out.metrics["bapo_clip_low"].item() == pytest.approx(0.9)
    assert out.metrics["bapo_clip_high"].item() == pytest.approx(3.0)
    assert out.metrics["bapo_positive_share"].item() < 0.5


@pytest.mark.parametrize("size", SIZES[:2], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("backend", BACKENDS)
def test_hapo(size, backend, cases):
    batch, _, _ = cases(size)
    old, a = batch["old_logprobs"], batch["advantages"]
    with torch.no_grad():
        _, entropy = oracle.row_logprobs(batch["logits"].double(), batch["tokens"])
    low, high = oracle.hapo_eps(entropy, batch["mask"], 0.2, 0.2, 0.8, 1.0)
    assert (low > 0.2).any() or batch["mask"].sum() < 3  # the low-entropy side is widened
    out = check(batch, C.hapo(), backend, lambda lp, h: oracle.ppo_loss(lp, old, a, low, high, 10.0))
    assert out.metrics["path"] == ("general" if backend == "torch" else "fused")  # bounds from the pre-pass


@pytest.mark.parametrize("base,size", [("dapo", SIZES[0]), ("gppo", SIZES[0]), ("dapo", SIZES[1])],
                         ids=["dapo", "gppo", "dapo-wide"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_erc(base, size, backend, cases):
    batch, old_entropy, _ = cases(size)
    old, a = batch["old_logprobs"], batch["advantages"]
    config = C.erc() if base == "dapo" else C.erc(loss="gppo", clip_high=0.2)
    if base == "dapo":
        def per_token(lp, h):
            return oracle.erc_gate(oracle.ppo_loss(lp, old, a, 0.2, 0.28, 10.0), h, old_entropy, 0.05, 0.05)
    else:  # GPPO (Klear, beta 1): PPO's value; a clipped token's gradient is the bound's, (1 +- eps) A
        def per_token(lp, h):
            r = oracle.log_ratio(lp, old).exp()
            gate = r / r.detach()  # value 1, gradient d logp
            bounded = torch.where(r < 0.8, 0.8 * gate, torch.where(r > 1.2, 1.2 * gate, r))
            loss = torch.maximum(-a * r, -a * bounded)
            loss = torch.where(a < 0, torch.minimum(loss, -10.0 * a), loss)
            return oracle.erc_gate(loss, h, old_entropy, 0.05, 0.05)
    out = check(batch, config, backend, per_token, old_entropy=old_entropy)
    assert out.metrics["path"] == ("general" if backend == "torch" else "fused")
    ratio = (out.entropy.double() + 1e-8) / (old_entropy.double() + 1e-8)
    valid = batch["mask"]
    dropped = (((ratio <= 0.95) | (ratio >= 1.05)) & valid).sum() / valid.sum()
    assert 0 < dropped < 1
    torch.testing.assert_close(out.metrics["erc_masked_frac"].double(), dropped.double())


def test_erc_old_entropy_comes_from_token_logprobs(generator):
    batch, _ = make_batch(generator, 2, 5, 37)
    old_logits = batch["logits"] + 0.3 * torch.randn(batch["logits"].shape, generator=generator)
    old_logprobs, old_entropy = rlfuse.token_logprobs(old_logits, batch["tokens"], return_entropy=True)
    batch["old_logprobs"] = old_logprobs
    out, grad = run(batch, C.erc(), "cpu", old_entropy=old_entropy)
    assert torch.isfinite(out.loss) and torch.isfinite(grad).all()


@pytest.mark.parametrize("size", SIZES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("backend", BACKENDS)
def test_cpgd(size, backend, cases):
    """The fused kernel (general path on torch) and the general path: the log-ratio clip and the drift, with
    the config's eps and with per-token eps (its cap at 0.5 bites on some tokens)."""
    batch, _, b = cases(size)
    old, a = batch["old_logprobs"], batch["advantages"]
    path = "general" if backend == "torch" else "fused"
    out = check(batch, C.cpgd(cpgd_drift_coef=0.3), backend,
                lambda lp, h: oracle.cpgd_loss(lp, old, a, 0.2, 0.2, 0.3, 2.0))
    assert out.metrics["path"] == path
    config = C.cpgd(clip_low=b["low"], clip_high=b["high"], cpgd_drift_coef=0.2, cpgd_drift_cap=0.5)
    out = check(batch, config, backend,
                lambda lp, h: oracle.cpgd_loss(lp, old, a, b["low"].double(), b["high"].double(), 0.2, 0.5))
    assert out.metrics["path"] == path


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
def test_cpgd_fused_bf16_clamped_log_ratios_and_penalties(backend, generator):
    """bf16 logits, log-ratios past the +-20 clamp (no gradient from the term or the drift there), ratios past
    the drift cap and clipped on both sides, with a KL and an entropy bonus, against the oracle."""
    batch, _ = make_batch(generator, 3, 6, 1500)
    batch["logits"] = batch["logits"].bfloat16()
    old, a, mask = batch["old_logprobs"], batch["advantages"], batch["mask"]
    with torch.no_grad():
        current, _ = oracle.row_logprobs(batch["logits"].double(), batch["tokens"])
    # Valid tokens with log-ratios l = logp - old of -30 and 30 (the clamp bites), -0.5 with A < 0 (clipped
    # low), 0.5 with A > 0 (clipped high), 1.5 (r - 1 = 3.5: the drift's gradient cap of 2 bites).
    rows, cols = torch.tensor([0, 0, 1, 1, 2]), torch.tensor([0, 1, 0, 1, 0])
    old[rows, cols] = (current[rows, cols] - torch.tensor([-30.0, 30.0, -0.5, 0.5, 1.5], dtype=torch.float64)).float()
    a[rows, cols] = torch.tensor([1.0, -1.0, -1.0, 1.0, 0.7]) * a[rows, cols].abs()
    mask[rows, cols] = True
    ref_lp = (current + 0.3 * torch.randn(current.shape, generator=generator, dtype=torch.float64)).float()

    def per_token(lp, h):
        k3 = torch.clamp(torch.exp(ref_lp.double() - lp) - (ref_lp.double() - lp) - 1, max=10.0)
        return oracle.cpgd_loss(lp, old, a, 0.2, 0.2, 0.4, 2.0) + 0.05 * k3 - 0.01 * h

    config = C.cpgd(cpgd_drift_coef=0.4, kl="k3", kl_coef=0.05, entropy_coef=0.01)
    want_loss, want_grad, _ = expected(batch, per_token)
    for path in ("fused", "general"):
        out, grad = run(batch, config, backend, path, ref_logprobs=ref_lp)
        assert out.metrics["path"] == path and grad.dtype == torch.bfloat16
        # fp32 math on bf16 inputs: the loss as in fp32; the gradient rounded to bf16 (2^-8 relative).
        torch.testing.assert_close(out.loss.detach().double(), want_loss, atol=2e-5, rtol=2e-5)
        scale = want_grad.abs().max().item()
        torch.testing.assert_close(grad.double(), want_grad, atol=8e-3 * scale, rtol=8e-3)
        assert not grad[~mask].any()  # masked rows: exact zeros


def test_cpgd_per_token_eps_low_below_one(generator):
    batch, _ = make_batch(generator, 2, 5, 37)
    low = torch.full(batch["tokens"].shape, 0.2)
    low[0, 0] = 1.0  # log(1 - eps_low) = -inf
    with pytest.raises(ValueError, match=r"LossConfig.clip_low must be finite and in \[0, 1\)"):
        run(batch, C.cpgd(clip_low=low), "cpu")


def test_bad_values_raise_naming_the_argument(generator):
    batch, old_entropy = make_batch(generator, 2, 5, 37)
    shape = batch["tokens"].shape
    with pytest.raises(ValueError, match="LossConfig.clip_low must have the tokens' shape"):
        run(batch, C.dapo(clip_low=torch.full((3,), 0.2)), "cpu")
    negative = torch.full(shape, 0.2)
    negative[0, 0] = -0.1
    with pytest.raises(ValueError, match=r"LossConfig.clip_high must be finite and >= 0"):
        run(batch, C.dapo(clip_high=negative), "cpu")
    with pytest.raises(ValueError, match=r"LossConfig.dual_clip must be finite and > 1"):
        run(batch, C.dapo(dual_clip=torch.full(shape, 0.5)), "cpu")
    nan = torch.full(shape, 0.2)
    nan[0, 0] = float("nan")
    with pytest.raises(ValueError, match="LossConfig.clip_low must be finite"):
        run(batch, C.dapo(clip_low=nan), "torch")
    with pytest.raises(TypeError, match="LossConfig.clip_low must be a float"):
        run(batch, C.dapo(clip_low=torch.zeros(shape, dtype=torch.int64)), "cpu")
    with pytest.raises(ValueError, match="LossConfig.clip_low may be a per-token tensor"):
        C.sapo(clip_low=torch.full(shape, 0.2))
    with pytest.raises(ValueError, match="old_entropy is required by ERC"):
        run(batch, C.erc(), "cpu")
    with pytest.raises(ValueError, match="old_entropy is only used by ERC"):
        run(batch, C.dapo(), "cpu", old_entropy=old_entropy)
    with pytest.raises(ValueError, match="old_entropy must have the tokens' shape"):
        run(batch, C.erc(), "cpu", old_entropy=old_entropy[0])
    with pytest.raises(ValueError, match="LossConfig.clip_low is computed by adaptive_clip"):
        C.dcpo(clip_low=torch.full(shape, 0.2))
    with pytest.raises(ValueError, match="LossConfig.bapo_step applies to adaptive_clip='bapo'"):
        C.dapo(bapo_step=0.1)
    with pytest.raises(ValueError, match="LossConfig.clip_low is CPGD's eps_low"):
        C.cpgd(clip_low=1.0)
    for name, value in (("top_k", -1), ("top_k", 2.0), ("top_p", 0.0), ("min_p", 1.0)):
        with pytest.raises(ValueError, match=f"LossConfig.{name}"):
            C(**{name: value})
    assert not C.dapo(top_p=0.9).token_local and C.dapo(top_k=0, min_p=0.0).top_k == 0


def test_masked_tokens_ignore_their_bounds(generator):
    """Garbage bounds at masked positions (NaN, negative) are never read."""
    batch, _ = make_batch(generator, 2, 5, 37)
    low = torch.full(batch["tokens"].shape, 0.2)
    low[~batch["mask"]] = float("nan")
    want, want_grad = run(batch, C.dapo(), "cpu")
    got, grad = run(batch, C.dapo(clip_low=low, clip_high=torch.full_like(low, 0.28)), "cpu")
    torch.testing.assert_close(got.loss, want.loss)
    torch.testing.assert_close(grad, want_grad)


@pytest.mark.parametrize("name", ["hapo_erc", "cpgd_per_token"])
def test_compile_fullgraph_matches_eager(name, generator):
    """The entropy normalisation and the per-token checks trace without a host read (each preset alone:
    test_torch_library.py::test_compile_fullgraph_every_preset)."""
    batch, old_entropy = make_batch(generator, 3, 6, 41)
    shape = batch["tokens"].shape
    config, extra = {"hapo_erc": (C.hapo(erc_beta_low=0.05, erc_beta_high=0.05), {"old_entropy": old_entropy}),
                     "cpgd_per_token": (C.cpgd(clip_high=torch.full(shape, 0.3)), {})}[name]
    kwargs = {k: v for k, v in batch.items() if k != "logits"}

    def loss_fn(logits):
        return rlfuse.policy_loss(logits, config=config, backend="cpu", **kwargs, **extra).loss

    torch._dynamo.reset()
    results = []
    for fn in (loss_fn, torch.compile(loss_fn, fullgraph=True, backend="aot_eager")):
        leaf = batch["logits"].clone().requires_grad_(True)
        loss = fn(leaf * 1.0)
        loss.backward()
        results.append((loss.detach(), leaf.grad))
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager)


@pytest.mark.parametrize("name", ["dcpo", "bapo", "hapo", "erc", "cpgd", "per_token"])
def test_zero_tokens_and_all_masked(name):
    """No valid token: a zero loss and gradient (also with zero tokens), never an empty-reduction error."""
    for shape in ((0,), (2, 3)):
        config = {"dcpo": C.dcpo(), "bapo": C.bapo(), "hapo": C.hapo(), "erc": C.erc(), "cpgd": C.cpgd(),
                  "per_token": C.dapo(clip_low=torch.full(shape, 0.2))}[name]
        extra = {"old_entropy": torch.ones(shape)} if name == "erc" else {}
        batch = dict(logits=torch.randn(*shape, 11), tokens=torch.zeros(shape, dtype=torch.long),
                     advantages=torch.randn(shape), old_logprobs=torch.full(shape, -2.0),
                     mask=torch.zeros(shape, dtype=torch.bool))
        if len(shape) == 1:
            batch.pop("mask")
        for backend in ("cpu", "torch"):
            out, grad = run(batch, config, backend, **extra)
            assert out.loss.item() == 0 and not grad.any()


@pytest.mark.parametrize("validation", [False, True], ids=["validation_off", "validation_on"])
@pytest.mark.parametrize("name", ["dcpo", "bapo", "hapo", "erc", "cpgd", "per_token"])
def test_no_host_read_but_the_one_validation(name, validation, generator, monkeypatch):
    """The bounds, the BAPO search and the HAPO quantile stay on the device; the bound tensors' and
    old_entropy's checks join the call's one validation read (tests/test_host_syncs.py's counter)."""
    from test_host_syncs import count_host_reads

    from rlfuse.ops import policy_loss as policy_ops

    # The fused backward's device path (CUDA's): on CPU tensors the host path reads the upstream gradient.
    monkeypatch.setattr(policy_ops, "DEVICE_RESCALE_ON_CPU", True, raising=False)

    batch, old_entropy = make_batch(generator, 3, 6, 41)
    shape = batch["tokens"].shape
    config = {"dcpo": C.dcpo(), "bapo": C.bapo(), "hapo": C.hapo(), "erc": C.erc(), "cpgd": C.cpgd(),
              "per_token": C.dapo(clip_low=torch.full(shape, 0.1), dual_clip=torch.full(shape, 3.0))}[name]
    extra = {"old_entropy": old_entropy} if name == "erc" else {}
    previous = rlfuse.set_validation(validation)
    try:
        with count_host_reads() as reads:
            out, _ = run(batch, config, "cpu", **extra)
    finally:
        rlfuse.set_validation(previous)
    assert reads == (["Tensor.tolist"] if validation else []), reads
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
def test_per_token_bounds_fused_inplace_and_linear_logits(backend, generator):
    """The fused kernel's bound rows: in-place backward and LinearLogits chunks give the general path's result."""
    batch, _ = make_batch(generator, 2, 5, 37)
    shape = batch["tokens"].shape
    config = C.dapo(clip_low=0.05 + 0.3 * torch.rand(shape, generator=generator),
                    clip_high=0.05 + 0.3 * torch.rand(shape, generator=generator))
    want, want_grad = run(batch, config, backend, "general")
    kwargs = {k: v for k, v in batch.items() if k != "logits"}
    leaf = batch["logits"].clone().requires_grad_(True)
    out = rlfuse.policy_loss(leaf * 1.0, config=config, backend=backend, inplace_backward=True, **kwargs)
    out.loss.backward()
    assert out.metrics["path"] == "fused"
    torch.testing.assert_close(out.loss, want.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(leaf.grad, want_grad, rtol=1e-5, atol=1e-6)
    hidden = torch.randn(2, 5, 8, generator=generator, requires_grad=True)
    weight = torch.randn(37, 8, generator=generator)
    logits = hidden.detach() @ weight.T
    kwargs["old_logprobs"] = torch.log_softmax(logits, -1).gather(-1, batch["tokens"][..., None])[..., 0] + 0.3
    via_source = rlfuse.policy_loss(rlfuse.LinearLogits(hidden, weight), config=config, backend=backend, **kwargs)
    direct = rlfuse.policy_loss(logits, config=config, backend=backend, path="general", **kwargs)
    assert via_source.metrics["path"] == "fused"
    torch.testing.assert_close(via_source.loss, direct.loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["bapo", "hapo", "erc", "erc_bapo_m2po_rollout"])
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
def test_pre_pass_rules_fused_inplace_and_two_reads(name, backend, generator, monkeypatch):
    """BAPO / HAPO / ERC on the fused path: one no-grad token_logprobs pre-pass and one fused kernel (the
    general path's two reads of the logits), in-place backward equal to the general path."""
    from rlfuse import losses
    from rlfuse.ops.policy_loss import FusedPolicyLoss

    batch, old_entropy = make_batch(generator, 3, 4, 300)
    config = {"bapo": C.bapo(), "hapo": C.hapo(), "erc": C.erc(),
              "erc_bapo_m2po_rollout": C.bapo(erc_beta_low=0.05, erc_beta_high=0.05, m2po_threshold=0.5,
                                              rollout_correction="token_truncate")}[name]
    extra = {"old_entropy": old_entropy} if config.entropy_ratio_clip else {}
    if config.rollout_correction is not None:
        extra["rollout_logprobs"] = batch["old_logprobs"] + 0.2 * torch.randn(batch["tokens"].shape, generator=generator)
    want, want_grad = run(batch, config, backend, "general", **extra)
    reads = []
    token_logprobs_fwd, fused_apply = losses.token_logprobs_fwd, FusedPolicyLoss.apply
    monkeypatch.setattr(losses, "token_logprobs_fwd", lambda *a, **k: reads.append("pre-pass") or
                        token_logprobs_fwd(*a, **k))
    monkeypatch.setattr(FusedPolicyLoss, "apply", lambda *a, **k: reads.append("kernel") or fused_apply(*a, **k))
    kwargs = {k: v for k, v in batch.items() if k != "logits"}
    leaf = batch["logits"].clone().requires_grad_(True)
    out = rlfuse.policy_loss(leaf * 1.0, config=config, backend=backend, inplace_backward=True, **kwargs, **extra)
    out.loss.backward()
    assert reads == ["pre-pass", "kernel"] and out.metrics["path"] == "fused"
    torch.testing.assert_close(out.loss, want.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(leaf.grad, want_grad, rtol=1e-5, atol=1e-6)
    for key, value in want.metrics.items():  # the rules' metrics report the bounds / mask the kernel used
        if key != "path":
            torch.testing.assert_close(out.metrics[key], value, rtol=1e-5, atol=1e-6, msg=key)
