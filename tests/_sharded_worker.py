"""The ranks of tests/test_sharded_logits.py: real processes, torch.distributed gloo on CPU.

``run_group(world, cases)`` spawns ``world`` processes that join one gloo group (with a timeout on
the group, so a rank left waiting in a collective fails instead of hanging) and run every case in
turn; each case compares ``ShardedLogits`` with the unsharded op on the full logits, which every
rank makes from the same seed. A case returns normally or raises; its outcome per rank is written
to a JSON file that the parent reads.

Tolerances. The sharded ops combine per-shard ``lse_r`` in fp32 (rlfuse/sharded.py): a log-prob or
entropy differs from the one-pass kernel by a few ulps of ``|lse|`` (here |lse| < 30, ulp <= 2e-6),
hence ``atol = 2e-5``; gradients ``p_j (...)`` carry the relative rounding of ``exp(x_j - lse)``
(~1e-6), hence ``rtol = 1e-5``, ``atol = 1e-6``. bf16 gradients are compared at one bf16 ulp.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import rlfuse
from rlfuse.distill import distill_loss, distill_term
from rlfuse.sharded import ShardedLogits, vocab_parallel_entropy, vocab_parallel_log_probs_from_logits

GROUP_TIMEOUT_S = 20
F32 = dict(rtol=1e-5, atol=2e-5)
GRAD32 = dict(rtol=1e-5, atol=1e-6)

CASES = {}


def case(fn):
    CASES[fn.__name__] = fn
    return fn


# --- layouts and data ----------------------------------------------------------------------------


def uneven_sizes(vocab: int, world: int) -> list[int]:
    """Uneven shard sizes adding up to ``vocab``; with 3 ranks the middle one holds one column."""
    if world == 2:
        return [vocab * 3 // 5, vocab - vocab * 3 // 5]
    if world == 3:
        return [vocab // 3, 1, vocab - vocab // 3 - 1]
    base = vocab // world
    return [base] * (world - 1) + [vocab - base * (world - 1)]


def rank_order_layout(vocab, world):
    sizes = uneven_sizes(vocab, world)
    starts = [sum(sizes[:r]) for r in range(world)]
    return starts, sizes


def permuted_layout(vocab, world):
    """Shards out of rank order: rank r holds the (world - 1 - r)-th block."""
    sizes = uneven_sizes(vocab, world)
    block_starts = [sum(sizes[:b]) for b in range(world)]
    return [block_starts[world - 1 - r] for r in range(world)], [sizes[world - 1 - r] for r in range(world)]


def full_logits(seed, lead, vocab, dtype=torch.float32, scale=3.0, neg_inf=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, vocab, generator=g) * scale
    if neg_inf:
        flat = x.view(-1, vocab)
        flat[0, : max(1, vocab // 2)] = float("-inf")  # row 0: the first shard(s) have no finite entry
        holes = torch.rand(flat.shape, generator=g) < 0.05
        flat[1:][holes[1:]] = float("-inf")
    return x.to(dtype)


def local_part(full, starts, sizes, rank, requires_grad=False):
    part = full[..., starts[rank]:starts[rank] + sizes[rank]].clone()
    return part.requires_grad_(requires_grad)


def tokens_for(seed, lead, vocab, full=None):
    g = torch.Generator().manual_seed(seed + 1)
    tokens = torch.randint(0, vocab, lead, generator=g)
    if full is not None:  # keep tokens on finite logits (an exact -inf log-prob is tested separately)
        flat_t, flat_x = tokens.view(-1), full.reshape(-1, vocab)
        for i in range(flat_t.numel()):
            if not torch.isfinite(flat_x[i, flat_t[i]]):
                flat_t[i] = int(torch.argmax(flat_x[i].float()))
    return tokens


def same_on_all_ranks(tensor):
    """Every rank holds bitwise the same tensor."""
    world = dist.get_world_size()
    t = tensor.detach().contiguous()
    out = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(out, t)
    for r, other in enumerate(out):
        assert torch.equal(other.view(torch.uint8) if other.dtype == torch.bool else other, t) or (
            torch.equal(torch.isnan(other), torch.isnan(t)) and torch.equal(other[~torch.isnan(other)],
                                                                            t[~torch.isnan(t)])
        ), f"rank {r} differs from rank {dist.get_rank()}"


def make(full, layout, rank, explicit=False, requires_grad=False, group=None):
    starts, sizes = layout
    local = local_part(full, starts, sizes, rank, requires_grad)
    return ShardedLogits(local, group, vocab_start=starts[rank] if explicit else None), local


# --- token_logprobs / entropy ----------------------------------------------------------------------


def _check_token_logprobs(rank, world, dtype, backend, explicit, temperature, vocab, lead, seed, grad_tol):
    layout = (permuted_layout if explicit else rank_order_layout)(vocab, world)
    full = full_logits(seed, lead, vocab, dtype)
    tokens = tokens_for(seed, lead, vocab, full)
    src, local = make(full, layout, rank, explicit, requires_grad=True)
    assert src.shape == full.shape and src.vocab == vocab and src.dtype == dtype
    logp, entropy = src._token_logprobs(tokens, temperature, backend)
    ref_full = full.clone().requires_grad_(True)
    ref_backend = "torch" if dtype == torch.float64 else backend
    ref_logp, ref_entropy = rlfuse.token_logprobs(ref_full, tokens, temperature, return_entropy=True,
                                                  backend=ref_backend)
    same_on_all_ranks(logp)
    same_on_all_ranks(entropy)
    torch.testing.assert_close(logp, ref_logp, **F32)
    torch.testing.assert_close(entropy, ref_entropy, **F32)
    g = torch.Generator().manual_seed(seed + 2)
    a, b = torch.randn(lead, generator=g), torch.randn(lead, generator=g)
    # Row 0 of the flattened rows: one shard has no finite entry; it keeps a gradient too.
    (logp * a + entropy * b).sum().backward()
    (ref_logp * a + ref_entropy * b).sum().backward()
    starts, sizes = layout
    want = ref_full.grad[..., starts[rank]:starts[rank] + sizes[rank]]
    assert local.grad.dtype == dtype
    torch.testing.assert_close(local.grad.float(), want.float(), **grad_tol)


@case
def token_logprobs_fp32_cpu(rank, world):
    _check_token_logprobs(rank, world, torch.float32, "cpu", False, 0.7, 1001, (5, 13), 10, GRAD32)


@case
def token_logprobs_fp32_torch_backend(rank, world):
    _check_token_logprobs(rank, world, torch.float32, "torch", False, 1.0, 997, (21,), 11, GRAD32)


@case
def token_logprobs_explicit_permuted_shards(rank, world):
    _check_token_logprobs(rank, world, torch.float32, "cpu", True, 1.3, 1000, (17,), 12, GRAD32)


@case
def token_logprobs_bf16(rank, world):
    # bf16 gradients: both sides round the same fp32 value to bf16; one bf16 ulp apart at most.
    _check_token_logprobs(rank, world, torch.bfloat16, "cpu", False, 0.9, 1003, (4, 6), 13,
                          dict(rtol=8e-3, atol=1e-5))


@case
def token_logprobs_fp16(rank, world):
    _check_token_logprobs(rank, world, torch.float16, "cpu", False, 1.0, 515, (9,), 14, dict(rtol=1e-3, atol=1e-6))


@case
def token_logprobs_float64_auto(rank, world):
    # float64 logits run on the torch backend ("auto"), outputs fp32 as for the unsharded op.
    _check_token_logprobs(rank, world, torch.float64, "auto", False, 1.0, 300, (7,), 15, GRAD32)


@case
def token_logprobs_triton_and_kl_triton(rank, world):
    """The Triton kernels (interpreted on CPU here: tests/conftest.py sets TRITON_INTERPRET=1, which
    the ranks inherit) with id -1 for tokens another rank owns, and the KL pair."""
    assert "triton" in rlfuse.available_backends("cpu"), "TRITON_INTERPRET=1 must reach the ranks"
    _check_token_logprobs(rank, world, torch.float32, "triton", False, 0.8, 301, (5,), 19, GRAD32)
    vocab, lead = 257, (3,)
    layout = rank_order_layout(vocab, world)
    p_full, q_full = full_logits(24, lead, vocab, neg_inf=False), full_logits(25, lead, vocab, neg_inf=False)
    src, local = make(p_full, layout, rank, requires_grad=True)
    other, _ = make(q_full, layout, rank)
    kl = src._kl_divergence(other, "reverse", 1.0, "triton")
    ref_p = p_full.clone().requires_grad_(True)
    ref = rlfuse.kl_divergence(ref_p, q_full, "reverse", backend="triton")
    torch.testing.assert_close(kl, ref, rtol=1e-4, atol=2e-5)
    kl.sum().backward()
    ref.sum().backward()
    starts, sizes = layout
    torch.testing.assert_close(local.grad, ref_p.grad[..., starts[rank]:starts[rank] + sizes[rank]],
                               rtol=1e-4, atol=2e-5)


@case
def token_logprobs_view_of_larger_tensor(rank, world):
    """A strided local view (``logits[:, :-1]``) is read in place; its gradient is a plain tensor."""
    vocab, seed = 777, 16
    layout = rank_order_layout(vocab, world)
    full = full_logits(seed, (3, 9), vocab)
    starts, sizes = layout
    base = full[..., starts[rank]:starts[rank] + sizes[rank]].clone().requires_grad_(True)
    local = base[:, :-1]
    tokens = tokens_for(seed, (3, 8), vocab, full[:, :-1])
    src = ShardedLogits(local)
    logp = src._token_logprobs(tokens, 1.0, "cpu")[0]
    ref_full = full.clone().requires_grad_(True)
    ref = rlfuse.token_logprobs(ref_full[:, :-1], tokens, backend="cpu")
    torch.testing.assert_close(logp, ref, **F32)
    logp.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(base.grad, ref_full.grad[..., starts[rank]:starts[rank] + sizes[rank]], **GRAD32)


@case
def token_logprobs_mask_and_edge_rows(rank, world):
    """Masked positions read 0 and get exactly zero gradient, whatever their logits and ids hold; a
    token at a -inf logit has log-prob -inf; a row with no finite entry gives NaN."""
    vocab, lead, seed = 640, (12,), 17
    layout = rank_order_layout(vocab, world)
    full = full_logits(seed, lead, vocab)
    tokens = tokens_for(seed, lead, vocab, full)
    full[3] = float("nan")  # masked row full of NaN
    tokens[3] = -100  # and an id out of range: masked positions are never read
    full[5] = float("-inf")  # no finite entry (valid): NaN log-prob and entropy
    tokens[6] = 0  # row 0's first half is finite in row 6; make the token's logit -inf
    full[6, 0] = float("-inf")
    mask = torch.ones(lead, dtype=torch.bool)
    mask[3] = False
    mask[9] = False
    src, local = make(full, layout, rank, requires_grad=True)
    logp, entropy = src._token_logprobs(tokens, 1.0, "cpu", mask=mask)
    assert logp[3] == 0 and entropy[3] == 0 and logp[9] == 0 and entropy[9] == 0
    assert torch.isnan(logp[5]) and torch.isnan(entropy[5])
    assert logp[6] == float("-inf") and torch.isfinite(entropy[6])
    keep = mask.clone()
    keep[5] = False
    keep[6] = False
    safe_tokens = torch.where(mask, tokens, 0)
    ref_full = full.clone().requires_grad_(True)
    ref_logp, ref_entropy = rlfuse.token_logprobs(ref_full, safe_tokens, return_entropy=True, backend="cpu")
    torch.testing.assert_close(logp[keep], ref_logp[keep], **F32)
    torch.testing.assert_close(entropy[keep], ref_entropy[keep], **F32)
    torch.testing.assert_close(entropy[6], ref_entropy[6], **F32)
    g = torch.Generator().manual_seed(99)
    a = torch.randn(lead, generator=g)
    w = torch.where(keep, a, 0.0)
    (torch.where(keep, logp, 0.0) * w + torch.where(keep, entropy, 0.0) * w).sum().backward()
    (torch.where(keep, ref_logp, 0.0) * w + torch.where(keep, ref_entropy, 0.0) * w).sum().backward()
    starts, sizes = layout
    want = ref_full.grad[..., starts[rank]:starts[rank] + sizes[rank]]
    torch.testing.assert_close(local.grad, want, **GRAD32)
    assert torch.equal(local.grad[3], torch.zeros_like(local.grad[3]))  # NaN row, masked: exact zeros
    # An id outside [0, V) at a valid position (the public functions reject it first): NaN, as the kernels.
    bad_ids = tokens.clone()
    bad_ids[0], bad_ids[1] = vocab, -1
    assert torch.isnan(src._token_logprobs(bad_ids, 1.0, "cpu", mask=mask)[0][:2]).all()
    # Upstream gradient sent to masked positions is dropped: still exact zeros.
    local.grad = None
    logp, entropy = src._token_logprobs(tokens, 1.0, "cpu", mask=mask)
    (logp[3] + entropy[9] + logp[0]).backward()
    assert torch.equal(local.grad[3], torch.zeros_like(local.grad[3]))
    assert torch.equal(local.grad[9], torch.zeros_like(local.grad[9]))


@case
def entropy_and_temperature(rank, world):
    vocab, lead, seed = 999, (2, 3, 4), 18
    layout = rank_order_layout(vocab, world)
    full = full_logits(seed, lead, vocab, neg_inf=False, scale=8.0)
    src, local = make(full, layout, rank, requires_grad=True)
    for temperature in (0.3, 1.0, 2.5):
        h = src.entropy(temperature, backend="cpu")
        torch.testing.assert_close(h, rlfuse.entropy(full, temperature, backend="cpu"), **F32)


@case
def per_token_temperature(rank, world):
    """A per-token temperature (issue 17): every rank passes the same tokens-shaped tensor for its rows
    of its columns. token_logprobs / entropy, kl_divergence, sparse_logprobs and policy_loss (general
    path, TROLL), plus a split LinearLogits, against the unsharded calls (tests/test_token_temperature.py
    checks those against float64 oracles): values on every rank and this rank's gradient slice. A bad
    value on one rank only raises on every rank."""
    from rlfuse import LossConfig

    vocab, lead, seed = 601, (3, 7), 23
    layout = rank_order_layout(vocab, world)
    starts, sizes = layout
    cols = slice(starts[rank], starts[rank] + sizes[rank])
    full = full_logits(seed, lead, vocab, neg_inf=False)
    full[0, 0, : vocab // 2] = float("-inf")  # the first shard(s) of one row have no finite entry
    tokens = tokens_for(seed, lead, vocab, full)
    g = torch.Generator().manual_seed(seed + 3)
    temperature = 0.25 + 3.75 * torch.rand(lead, generator=g)
    a, b = torch.randn(lead, generator=g), torch.randn(lead, generator=g)
    for backend in ("cpu", "torch"):
        src, local = make(full, layout, rank, requires_grad=True)
        ref_full = full.clone().requires_grad_(True)
        logp, entropy = rlfuse.token_logprobs(src, tokens, temperature, return_entropy=True, backend=backend)
        ref_logp, ref_entropy = rlfuse.token_logprobs(ref_full, tokens, temperature, return_entropy=True,
                                                      backend=backend)
        same_on_all_ranks(logp)
        torch.testing.assert_close(logp, ref_logp, **F32)
        torch.testing.assert_close(entropy, ref_entropy, **F32)
        (logp * a + entropy * b).sum().backward()
        (ref_logp * a + ref_entropy * b).sum().backward()
        # GRAD32 scaled by 1 / T <= 4 (gradients are p_j (...) / T; the combined lse's rounding with them)
        torch.testing.assert_close(local.grad, ref_full.grad[..., cols], rtol=4e-5, atol=4e-6)
        other = full_logits(seed + 5, lead, vocab, neg_inf=False)
        src, local = make(full.clamp(min=-30.0), layout, rank, requires_grad=True)
        ref_full = full.clamp(min=-30.0).requires_grad_(True)
        kl = rlfuse.kl_divergence(src, other, temperature=temperature, backend=backend)
        ref = rlfuse.kl_divergence(ref_full, other, temperature=temperature, backend=backend)
        same_on_all_ranks(kl)
        torch.testing.assert_close(kl, ref, rtol=1e-4, atol=2e-5)
        (kl * a).sum().backward()
        (ref * a).sum().backward()
        torch.testing.assert_close(local.grad, ref_full.grad[..., cols], rtol=1e-4, atol=2e-5)
    src, _ = make(full, layout, rank)
    sparse = rlfuse.sparse_logprobs(src, tokens, 8, temperature=temperature)
    ref_sparse = rlfuse.sparse_logprobs(full, tokens, 8, temperature=temperature)
    assert torch.equal(sparse.ids, ref_sparse.ids)
    torch.testing.assert_close(sparse.logprobs, ref_sparse.logprobs, **F32)
    adv, old = torch.randn(lead, generator=g), ref_logp.detach() + 0.1 * torch.randn(lead, generator=g)
    mask = (torch.rand(lead, generator=g) > 0.2).float()
    config = LossConfig.dapo(entropy_coef=0.01)
    src, local = make(full, layout, rank, requires_grad=True)
    ref_full = full.clone().requires_grad_(True)
    out = rlfuse.policy_loss(src, tokens, adv, old_logprobs=old, mask=mask, config=config, temperature=temperature)
    ref = rlfuse.policy_loss(ref_full, tokens, adv, old_logprobs=old, mask=mask, config=config, path="general",
                             temperature=temperature)
    _compare_loss_outputs(out, ref, "per-token temperature", mask)
    out.loss.backward()
    ref.loss.backward()
    torch.testing.assert_close(local.grad, ref_full.grad[..., cols], rtol=1e-4, atol=1e-7)
    # TROLL: the global top-k and the support at each row's T (the unsharded call at the same T).
    troll = LossConfig.troll(troll_k=8)
    src, local = make(full, layout, rank, requires_grad=True)
    ref_full = full.clone().requires_grad_(True)
    outs = [rlfuse.policy_loss(x, tokens, adv, old_logprobs=old, mask=mask, config=troll, old_topk=sparse,
                               temperature=temperature, backend="cpu") for x in (src, ref_full)]
    _compare_loss_outputs(outs[0], outs[1], "TROLL, per-token temperature", mask)
    outs[0].loss.backward()
    outs[1].loss.backward()
    torch.testing.assert_close(local.grad, ref_full.grad[..., cols], rtol=1e-4, atol=1e-7)
    lsrc, plain, _, leaves = _linear_pair(rank, world, vocab, 7, lead, seed + 7, chunk_tokens=5)
    torch.testing.assert_close(rlfuse.token_logprobs(lsrc, tokens, temperature),
                               rlfuse.token_logprobs(plain, tokens, temperature), **F32)
    troll_linear = [rlfuse.policy_loss(x, tokens, adv, old_logprobs=old, mask=mask, config=troll, old_topk=sparse,
                                       temperature=temperature, backend="cpu").loss for x in (lsrc, plain)]
    torch.testing.assert_close(troll_linear[0], troll_linear[1], **F32)
    bad = temperature.clone()
    if rank == world - 1:
        bad[1, 2] = 0.0
    words = ["temperature values must lie in"] if rank == world - 1 else [f"rank {world - 1}"]
    _expect_on_every_rank(ValueError, words, lambda: rlfuse.token_logprobs(src, tokens, bad))
    _expect_on_every_rank(ValueError, words, lambda: rlfuse.policy_loss(src, tokens, adv, old_logprobs=old,
                                                                         temperature=bad))


# --- KL ----------------------------------------------------------------------------------------------


def _check_kl(rank, world, direction, backend, dtype, other_full_tensor, seed):
    vocab, lead = 1001, (6, 5)
    layout = rank_order_layout(vocab, world)
    p_full = full_logits(seed, lead, vocab, dtype, neg_inf=False)
    q_full = (p_full.float() + 0.7 * full_logits(seed + 5, lead, vocab, neg_inf=False)).to(dtype)
    q_full[0, 0, 7] = float("-inf")  # an entry where q is 0 (forward KL stays finite only if p is 0 there)
    p_full[0, 0, 7] = float("-inf")
    src_p, local_p = make(p_full, layout, rank, requires_grad=True)
    if other_full_tensor:
        other = q_full.clone().requires_grad_(True)
    else:
        other, local_q = make(q_full, layout, rank, requires_grad=True)
    kl = src_p._kl_divergence(other, direction, 0.8, backend)
    ref_p, ref_q = p_full.clone().requires_grad_(True), q_full.clone().requires_grad_(True)
    ref = rlfuse.kl_divergence(ref_p, ref_q, direction, 0.8, backend="torch" if dtype == torch.float64 else backend)
    same_on_all_ranks(kl)
    torch.testing.assert_close(kl, ref, rtol=1e-4, atol=2e-5)
    g = torch.randn(lead, generator=torch.Generator().manual_seed(seed + 9))
    (kl * g).sum().backward()
    (ref * g).sum().backward()
    starts, sizes = layout
    cols = slice(starts[rank], starts[rank] + sizes[rank])
    # p_j (log p_j - log q_j - KL) cancels: each log carries ~ulp(|lse|) (|lse| < 16 here: 1e-6), times
    # |g| / T <~ 4: atol 2e-5.
    tol = dict(rtol=1e-4, atol=2e-5) if dtype == torch.float32 else dict(rtol=8e-3, atol=2e-5)
    torch.testing.assert_close(local_p.grad.float(), ref_p.grad[..., cols].float(), **tol)
    grad_q = other.grad[..., cols] if other_full_tensor else local_q.grad
    torch.testing.assert_close(grad_q.float(), ref_q.grad[..., cols].float(), **tol)
    if other_full_tensor:  # only this rank's columns of a full tensor receive a gradient
        outside = torch.ones(vocab, dtype=torch.bool)
        outside[cols] = False
        assert torch.equal(other.grad[..., outside], torch.zeros_like(other.grad[..., outside]))


@case
def kl_forward_cpu(rank, world):
    _check_kl(rank, world, "forward", "cpu", torch.float32, False, 20)


@case
def kl_reverse_torch_backend(rank, world):
    _check_kl(rank, world, "reverse", "torch", torch.float32, False, 21)


@case
def kl_forward_against_full_tensor_bf16(rank, world):
    _check_kl(rank, world, "forward", "cpu", torch.bfloat16, True, 22)


@case
def kl_identical_rows_exactly_zero(rank, world):
    vocab, lead = 500, (7,)
    layout = rank_order_layout(vocab, world)
    full = full_logits(23, lead, vocab)
    full[0] = torch.randn(vocab)  # keep every row with a finite entry
    src, _ = make(full, layout, rank)
    other, _ = make(full, layout, rank)
    for direction in ("forward", "reverse"):
        kl = src._kl_divergence(other, direction, 1.0, "cpu")
        assert torch.equal(kl, torch.zeros_like(kl)), kl


# --- sparse_logprobs -----------------------------------------------------------------------------------


@case
def sparse_logprobs_global_ids(rank, world):
    for vocab, k, threshold, temperature, explicit, seed in ((1001, 8, 1e-5, 1.0, False, 30),
                                                             (400, 64, 1e-3, 0.6, True, 31),
                                                             (50, 64, 1e-5, 1.0, False, 32)):
        lead = (4, 5)
        layout = (permuted_layout if explicit else rank_order_layout)(vocab, world)
        full = full_logits(seed, lead, vocab, scale=2.0)
        full[1, 2, 10] = full[1, 2, vocab - 3] = full[1, 2].max() + 1.0  # a tie across shards: lower id first
        tokens = tokens_for(seed, lead, vocab, full)
        src, _ = make(full, layout, rank, explicit)
        got = src._sparse_logprobs(tokens, k, threshold, temperature, "cpu")
        want = rlfuse.sparse_logprobs(full, tokens, k, threshold, temperature, backend="cpu")
        assert got.vocab == vocab and got.ids.dtype == want.ids.dtype and got.ids.shape == want.ids.shape
        assert torch.equal(got.count, want.count), (got.count, want.count)
        assert torch.equal(got.ids, want.ids)
        torch.testing.assert_close(got.logprobs, want.logprobs, **F32)
        assert got.ids[1, 2, 0] == 10 and got.ids[1, 2, 1] == vocab - 3
        same_on_all_ranks(got.ids)
        same_on_all_ranks(got.logprobs)


# --- sampling --------------------------------------------------------------------------------------------

SAMPLE_CONFIGS = [
    dict(temperature=1.0),
    dict(temperature=0.6, num_samples=3),
    dict(temperature=0),
    dict(temperature=0.9, top_k=7),
    dict(temperature=1.2, top_p=0.8),
    dict(temperature=1.0, min_p=0.05),
    dict(temperature=0.7, top_k=20, top_p=0.9, min_p=0.01, num_samples=2),
    dict(temperature="per-row", top_k="per-row", top_p="per-row"),
    dict(adaptive_temperature=(0.4, 1.3, 1.0, 4.0)),
    dict(temperature=1.0, top_k=1),
]


def _per_row(config, rows):
    g = torch.Generator().manual_seed(7)
    out = dict(config)
    if out.get("temperature") == "per-row":
        t = torch.rand(rows, generator=g) + 0.3
        t[::4] = 0.0  # greedy rows mixed in
        out["temperature"] = t
    if out.get("top_k") == "per-row":
        out["top_k"] = torch.randint(0, 30, (rows,), generator=g)
    if out.get("top_p") == "per-row":
        out["top_p"] = torch.rand(rows, generator=g) * 0.7 + 0.3
    return out


@case
def sample_same_tokens_as_unsharded(rank, world):
    vocab, lead = 1003, (3, 7)
    rows = 21
    layout = rank_order_layout(vocab, world)
    for i, config in enumerate(SAMPLE_CONFIGS):
        for dtype in (torch.float32, torch.bfloat16):
            full = full_logits(40 + i, lead, vocab, dtype, scale=2.5, neg_inf=False)
            full.view(-1, vocab)[2, ::3] = float("-inf")
            src, _ = make(full, layout, rank)
            kwargs = _per_row(config, rows)
            for k, v in list(kwargs.items()):
                if isinstance(v, torch.Tensor):
                    kwargs[k] = v.reshape(lead)
            got = src._sample(seed=1234 + i, **kwargs)
            want = rlfuse.sample(full, seed=1234 + i, backend="cpu", **kwargs)
            ref = rlfuse.sample(full, seed=1234 + i, backend="torch", **kwargs)
            assert torch.equal(want.tokens, ref.tokens)  # the two unsharded backends agree on these inputs
            assert got.tokens.shape == want.tokens.shape and got.tokens.dtype == torch.int64
            assert torch.equal(got.tokens, want.tokens), (config, dtype, got.tokens, want.tokens)
            torch.testing.assert_close(got.logprobs, want.logprobs, **F32)
            torch.testing.assert_close(got.raw_logprobs, want.raw_logprobs, **F32)
            torch.testing.assert_close(got.entropy, want.entropy, **F32)
            same_on_all_ranks(got.tokens)
            same_on_all_ranks(got.logprobs)


@case
def sample_generator_and_explicit_layout(rank, world):
    """``generator=`` draws one seed on rank 0 and broadcasts it; shards out of rank order."""
    vocab, lead = 811, (6,)
    layout = permuted_layout(vocab, world)
    full = full_logits(50, lead, vocab, neg_inf=False)
    src, _ = make(full, layout, rank, explicit=True)
    gen = torch.Generator().manual_seed(5 + rank)  # a different generator state on every rank
    got = src._sample(generator=gen, top_k=50)
    same_on_all_ranks(got.tokens)
    seeds = torch.tensor([3, 1, 4, 1, 5, 9], dtype=torch.int64)
    got = src._sample(seed=seeds, top_p=0.7)
    want = rlfuse.sample(full, seed=seeds, top_p=0.7, backend="cpu")
    assert torch.equal(got.tokens, want.tokens)


@case
def sample_bad_rows_raise_on_every_rank(rank, world):
    vocab, lead = 300, (4,)
    layout = rank_order_layout(vocab, world)
    for bad in ("nan", "inf", "all_neg_inf"):
        full = full_logits(60, lead, vocab, neg_inf=False)
        if bad == "nan":
            full[2, vocab - 1] = float("nan")  # on the last rank's shard only
        elif bad == "inf":
            full[1, 0] = float("inf")  # on rank 0's shard only
        else:
            full[3] = float("-inf")
        src, _ = make(full, layout, rank)
        try:
            src._sample(seed=1)
        except ValueError as error:
            assert "nothing to sample from" in str(error)
        else:
            raise AssertionError(f"no ValueError for a row with {bad}")
    # A bad argument on one rank only: every rank raises, none is left in a collective.
    full = full_logits(61, lead, vocab, neg_inf=False)
    src, _ = make(full, layout, rank)
    try:
        src._sample(seed=1, top_p=1.5 if rank == world - 1 else 0.5)
    except ValueError as error:
        assert ("top_p" in str(error)) == (rank == world - 1), str(error)
    else:
        raise AssertionError("no ValueError for top_p=1.5 on one rank")


# --- TROLL ------------------------------------------------------------------------------------------------


@case
def troll_token_loss_matches(rank, world):
    """ShardedLogits' TROLL terms and gradient against the single-device ones, also with -inf current
    logits on the support (old top-k ids and a chosen token): they leave the projection there as on
    one device (the sharded path once kept them in, a NaN loss)."""
    from rlfuse import LossConfig
    from rlfuse.troll import troll_token_loss

    vocab, lead, seed = 700, (10,), 70
    layout = rank_order_layout(vocab, world)
    starts, sizes = layout
    tokens = tokens_for(seed, lead, vocab)
    config = LossConfig.troll()
    adv = torch.randn(lead, generator=torch.Generator().manual_seed(seed + 3))
    valid = torch.ones(lead, dtype=torch.bool)
    valid[4] = False
    for support_neg_inf in (False, True):
        full = full_logits(seed, lead, vocab, scale=2.0, neg_inf=False)
        old_full = full + 0.3 * full_logits(seed + 1, lead, vocab, neg_inf=False)
        old_topk = rlfuse.sparse_logprobs(old_full, tokens, config.troll_k, backend="cpu")
        old_logp = rlfuse.token_logprobs(old_full, tokens, backend="cpu")
        if support_neg_inf:
            for row in (0, 3, 7):  # two old top-k ids; row 7 also its chosen token
                full[row, old_topk.ids[row, :2].long()] = float("-inf")
            full[7, tokens[7]] = float("-inf")
        src, local = make(full, layout, rank, requires_grad=True)
        got = src._troll_token_loss(tokens, adv, old_logp, old_topk, config, "cpu", valid)
        ref_full = full.clone().requires_grad_(True)
        want = troll_token_loss(ref_full, tokens, adv, old_logp, old_topk, config, "cpu", valid)
        assert torch.isfinite(want.loss[valid]).all()
        for name in ("loss", "eta", "kl_before", "kl_after", "support", "logp", "entropy"):
            torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=1e-4, atol=2e-5,
                                       equal_nan=True, msg=f"{name}, -inf on the support: {support_neg_inf}")
        w = torch.where(valid, 1.0, 0.0)
        (got.loss * w).sum().backward()
        (want.loss * w).sum().backward()
        torch.testing.assert_close(local.grad, ref_full.grad[..., starts[rank]:starts[rank] + sizes[rank]],
                                   rtol=1e-4, atol=1e-6)


# --- drop-ins -----------------------------------------------------------------------------------------------


@case
def verl_drop_ins(rank, world):
    vocab, lead = 1000, (11, 3)
    sizes = [vocab // world] * world  # Megatron: equal partitions in rank order
    sizes[-1] += vocab - sum(sizes)
    layout = ([sum(sizes[:r]) for r in range(world)], sizes)
    full = full_logits(80, lead, vocab, neg_inf=False)
    tokens = tokens_for(80, lead, vocab)
    local = local_part(full, *layout, rank, requires_grad=True)
    logp = vocab_parallel_log_probs_from_logits(local, tokens)
    ent = vocab_parallel_entropy(local)
    ref_full = full.clone().requires_grad_(True)
    ref_logp, ref_ent = rlfuse.token_logprobs(ref_full, tokens, return_entropy=True, backend="cpu")
    torch.testing.assert_close(logp, ref_logp, **F32)
    torch.testing.assert_close(ent, ref_ent, **F32)
    (logp.sum() + ent.sum()).backward()
    (ref_logp.sum() + ref_ent.sum()).backward()
    starts, sizes = layout
    torch.testing.assert_close(local.grad, ref_full.grad[..., starts[rank]:starts[rank] + sizes[rank]], **GRAD32)


# --- the public functions ---------------------------------------------------------------------------------


@case
def public_functions(rank, world):
    vocab, lead, seed = 1001, (4, 6), 90
    layout = rank_order_layout(vocab, world)
    full = full_logits(seed, lead, vocab, neg_inf=False)
    tokens = tokens_for(seed, lead, vocab)
    src, local = make(full, layout, rank, requires_grad=True)
    logp, ent = rlfuse.token_logprobs(src, tokens, 0.9, return_entropy=True)
    ref_logp, ref_ent = rlfuse.token_logprobs(full, tokens, 0.9, return_entropy=True)
    torch.testing.assert_close(logp, ref_logp, **F32)
    torch.testing.assert_close(ent, ref_ent, **F32)
    torch.testing.assert_close(rlfuse.entropy(src), rlfuse.entropy(full), **F32)
    other, _ = make(full + 0.5 * full_logits(seed + 1, lead, vocab, neg_inf=False), layout, rank)
    mask = torch.ones(lead, dtype=torch.bool)
    mask[0, 1] = False
    torch.testing.assert_close(rlfuse.kl_divergence(src, other, mask=mask),
                               rlfuse.kl_divergence(full, other.materialize(), mask=mask), rtol=1e-4, atol=2e-5)
    got, want = rlfuse.sparse_logprobs(src, tokens, 8), rlfuse.sparse_logprobs(full, tokens, 8)
    assert torch.equal(got.ids, want.ids)
    assert torch.equal(rlfuse.sample(src, seed=3, top_k=40).tokens, rlfuse.sample(full, seed=3, top_k=40).tokens)


def _compare_loss_outputs(out, ref, what, mask):
    """Per-token outputs at valid positions (a source reports 0 at masked ones, materialised logits
    their values), the loss, and every metric."""
    valid = mask.reshape(out.logprobs.shape) != 0
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-4, atol=1e-6, msg=f"{what}: loss")
    torch.testing.assert_close(out.logprobs[valid], ref.logprobs[valid], **F32, msg=f"{what}: logprobs")
    torch.testing.assert_close(out.entropy[valid], ref.entropy[valid], **F32, msg=f"{what}: entropy")
    assert out.metrics.get("path") == "general" and set(out.metrics) == set(ref.metrics), (out.metrics, ref.metrics)
    for key, value in ref.metrics.items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(out.metrics[key], value, rtol=1e-4, atol=1e-5, equal_nan=True,
                                       msg=f"{what}: metric {key}")


@case
def public_policy_loss(rank, world):
    """policy_loss on ShardedLogits (general path) against the unsharded call: padded [B, T] and packed
    [N] + cu_seqlens inputs, token-level and sequence-level variants, KL / entropy terms, TROLL."""
    from rlfuse import LossConfig

    vocab, lead, seed = 600, (3, 8), 91
    layout = rank_order_layout(vocab, world)
    full = full_logits(seed, lead, vocab, neg_inf=False)
    tokens = tokens_for(seed, lead, vocab)
    g = torch.Generator().manual_seed(seed + 4)
    adv = torch.randn(lead, generator=g)
    mask = (torch.rand(lead, generator=g) > 0.2).float()
    old = rlfuse.token_logprobs(full, tokens) + 0.05 * torch.randn(lead, generator=g)
    ref_lp = old + 0.05 * torch.randn(lead, generator=g)
    old_topk = rlfuse.sparse_logprobs(full + 0.2 * full_logits(seed + 9, lead, vocab, neg_inf=False), tokens, 16)
    configs = [("grpo", LossConfig.grpo(), {}), ("dapo+entropy", LossConfig.dapo(entropy_coef=0.01), {}),
               ("gspo", LossConfig(loss="gspo"), {}), ("troll", LossConfig.troll(troll_k=16), {"old_topk": old_topk})]
    # Full-vocabulary KL to a reference sharded the same way (kl_full_coef).
    ref_full_logits = full + 0.3 * full_logits(seed + 11, lead, vocab, neg_inf=False)
    src, local = make(full, layout, rank, requires_grad=True)
    ref_src, _ = make(ref_full_logits, layout, rank)
    config = LossConfig.dapo(kl_full_coef=0.1)
    out = rlfuse.policy_loss(src, tokens, adv, old_logprobs=old, mask=mask, config=config, ref_logits=ref_src)
    ref_full = full.clone().requires_grad_(True)
    ref = rlfuse.policy_loss(ref_full, tokens, adv, old_logprobs=old, mask=mask, config=config,
                             ref_logits=ref_full_logits)
    _compare_loss_outputs(out, ref, "kl_full", mask)
    out.loss.backward()
    ref.loss.backward()
    starts, sizes = layout
    torch.testing.assert_close(local.grad, ref_full.grad[..., starts[rank]:starts[rank] + sizes[rank]],
                               rtol=1e-4, atol=1e-7, msg="kl_full")
    for packed in (False, True):
        for what, config, extra in configs:
            kwargs = dict(old_logprobs=old, mask=mask, config=config, **extra)
            if config.kl is not None:
                kwargs["ref_logprobs"] = ref_lp
            toks, advs = tokens, adv
            src_full = full
            if packed:  # the same tokens as one packed [N] batch of three sequences
                src_full = full.reshape(-1, vocab)
                toks, advs = tokens.reshape(-1), adv.reshape(-1)
                kwargs = {k: (v.reshape(-1) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
                if "old_topk" in kwargs:
                    kwargs["old_topk"] = type(old_topk)(old_topk.ids.reshape(-1, 16), old_topk.logprobs.reshape(-1, 16),
                                                        old_topk.count.reshape(-1), vocab)
                kwargs["cu_seqlens"] = torch.tensor([0, 5, 13, 24], dtype=torch.int32)
                if config.aggregation == "seq-mean-token-sum-norm":
                    kwargs["config"] = config
            src, local = make(src_full, layout, rank, requires_grad=True)
            out = rlfuse.policy_loss(src, toks, advs, **kwargs)
            ref_full = src_full.clone().requires_grad_(True)
            ref = rlfuse.policy_loss(ref_full, toks, advs, **kwargs)
            label = f"{what} packed={packed}"
            _compare_loss_outputs(out, ref, label, mask)
            same_on_all_ranks(out.loss)
            out.loss.backward()
            ref.loss.backward()
            starts, sizes = layout
            torch.testing.assert_close(local.grad, ref_full.grad[..., starts[rank]:starts[rank] + sizes[rank]],
                                       rtol=1e-4, atol=1e-7, msg=label)


# --- LinearLogits with the lm_head split over the group ---------------------------------------------------


def _linear_pair(rank, world, vocab, dim, lead, seed, *, bias=True, explicit=False, dtype=torch.float32, **options):
    """(sharded LinearLogits, unsharded LinearLogits on the full weight, layout, leaves): the same
    hidden on every rank; ``leaves`` = (hidden, weight shard, bias shard, ref hidden, ref weight, ref bias)."""
    layout = (permuted_layout if explicit else rank_order_layout)(vocab, world)
    starts, sizes = layout
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*lead, dim, generator=g).to(dtype)
    weight = (torch.randn(vocab, dim, generator=g) * 0.6).to(dtype)
    b = (torch.randn(vocab, generator=g) * 0.5).to(dtype) if bias else None
    cols = slice(starts[rank], starts[rank] + sizes[rank])
    h = hidden.clone().requires_grad_(True)
    w = weight[cols].clone().requires_grad_(True)
    bb = None if b is None else b[cols].clone().requires_grad_(True)
    src = rlfuse.LinearLogits(h, w, bb, group=dist.group.WORLD, vocab_start=starts[rank] if explicit else None,
                              **options)
    rh, rw = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    rb = None if b is None else b.clone().requires_grad_(True)
    ref = rlfuse.LinearLogits(rh, rw, rb, **options)
    return src, ref, layout, (h, w, bb, rh, rw, rb)


def _check_linear_grads(layout, rank, leaves, what, rtol=1e-4, atol=1e-5):
    h, w, b, rh, rw, rb = leaves
    starts, sizes = layout
    cols = slice(starts[rank], starts[rank] + sizes[rank])
    torch.testing.assert_close(h.grad.float(), rh.grad.float(), rtol=rtol, atol=atol, msg=f"{what}: grad hidden")
    torch.testing.assert_close(w.grad.float(), rw.grad[cols].float(), rtol=rtol, atol=atol, msg=f"{what}: grad weight")
    if b is not None:
        torch.testing.assert_close(b.grad.float(), rb.grad[cols].float(), rtol=rtol, atol=atol,
                                   msg=f"{what}: grad bias")
    same_on_all_ranks(h.grad)
    for t in leaves:
        if t is not None:
            t.grad = None


@case
def linear_token_logprobs_and_entropy(rank, world):
    """token_logprobs / entropy of LinearLogits(..., group=): values identical on every rank and equal to
    the unsharded LinearLogits; each rank its weight / bias rows' gradient; hidden the full gradient.
    Uneven shards (a one-row shard at 3 ranks), bias, scale, softcap, temperature, masked tokens,
    chunks that do not divide N, shards out of rank order, the torch backend, bf16."""
    configs = [
        dict(vocab=301, dim=24, lead=(3, 7), seed=100, backend="cpu", temperature=0.8,
             options=dict(scale=0.7, softcap=6.0, chunk_tokens=4)),
        dict(vocab=256, dim=17, lead=(13,), seed=101, backend="cpu", temperature=1.0, explicit=True, bias=False,
             options=dict()),
        dict(vocab=199, dim=8, lead=(9,), seed=102, backend="torch", temperature=1.3,
             options=dict(chunk_tokens=5, batch_invariant=True)),
        dict(vocab=300, dim=16, lead=(2, 5), seed=103, backend="cpu", temperature=1.0, dtype=torch.bfloat16,
             options=dict(chunk_tokens=3)),
    ]
    for cfg in configs:
        dtype = cfg.get("dtype", torch.float32)
        src, ref, layout, leaves = _linear_pair(rank, world, cfg["vocab"], cfg["dim"], cfg["lead"], cfg["seed"],
                                                bias=cfg.get("bias", True), explicit=cfg.get("explicit", False),
                                                dtype=dtype, **cfg["options"])
        assert src.shape == ref.shape and src.vocab == cfg["vocab"] and not src.fused_path
        tokens = tokens_for(cfg["seed"], cfg["lead"], cfg["vocab"])
        mask = torch.rand(cfg["lead"], generator=torch.Generator().manual_seed(cfg["seed"])) > 0.25
        what = f"{cfg['seed']}"
        logp, ent = src._token_logprobs(tokens, cfg["temperature"], cfg["backend"], mask)
        want_logp, want_ent = ref._token_logprobs(tokens, cfg["temperature"], cfg["backend"], mask)
        same_on_all_ranks(logp)
        tol = F32 if dtype == torch.float32 else dict(rtol=2e-3, atol=2e-3)
        torch.testing.assert_close(logp, want_logp, **tol, msg=what)
        torch.testing.assert_close(ent, want_ent, **tol, msg=what)
        g = torch.Generator().manual_seed(cfg["seed"] + 1)
        a, b = torch.randn(cfg["lead"], generator=g), torch.randn(cfg["lead"], generator=g)
        (logp * a + ent * b).sum().backward()
        (want_logp * a + want_ent * b).sum().backward()
        grad_tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
        _check_linear_grads(layout, rank, leaves, what, **grad_tol)
        # The public functions, and entropy alone.
        torch.testing.assert_close(rlfuse.token_logprobs(src, tokens, cfg["temperature"], backend=cfg["backend"]),
                                   rlfuse.token_logprobs(ref, tokens, cfg["temperature"], backend=cfg["backend"]),
                                   **tol, msg=what)
        torch.testing.assert_close(rlfuse.entropy(src, backend=cfg["backend"]),
                                   rlfuse.entropy(ref, backend=cfg["backend"]), **tol, msg=what)
    # The logits it stands for, gathered (tests only).
    src, ref, _, _ = _linear_pair(rank, world, 97, 5, (4,), 104)
    torch.testing.assert_close(src.materialize(), ref.materialize().detach(), rtol=1e-6, atol=1e-6)
    # reduce_hidden_grad=False: hidden receives only this rank's part; summed over ranks, the full one.
    src, ref, layout, (h, w, bb, rh, rw, rb) = _linear_pair(rank, world, 97, 5, (4,), 105,
                                                            reduce_hidden_grad=False)
    tokens = tokens_for(105, (4,), 97)
    rlfuse.token_logprobs(src, tokens).sum().backward()
    rlfuse.token_logprobs(ref, tokens).sum().backward()
    summed = h.grad.clone()
    dist.all_reduce(summed)
    torch.testing.assert_close(summed, rh.grad, rtol=1e-5, atol=1e-6)


def _linear_loss_close(out, ref, what, mask):
    valid = mask.reshape(out.logprobs.shape) != 0
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-4, atol=1e-6, msg=f"{what}: loss")
    torch.testing.assert_close(out.logprobs[valid], ref.logprobs[valid], **F32, msg=f"{what}: logprobs")
    torch.testing.assert_close(out.entropy[valid], ref.entropy[valid], **F32, msg=f"{what}: entropy")
    assert out.metrics["path"] == "general" and set(out.metrics) == set(ref.metrics), (what, out.metrics)
    for key, value in ref.metrics.items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(out.metrics[key], value, rtol=1e-4, atol=1e-5, equal_nan=True,
                                       msg=f"{what}: metric {key}")
    same_on_all_ranks(out.loss)


@case
def linear_policy_losses(rank, world):
    """policy_loss on a split LinearLogits (general path, also for token-local configs whose unsharded
    call takes the fused path) against the unsharded LinearLogits: padded and packed inputs with masked
    tokens, token- and sequence-level variants, KL / entropy terms, TROLL, kl_full_coef to a split
    reference LinearLogits."""
    from rlfuse import LossConfig

    vocab, dim, lead, seed = 203, 12, (3, 6), 110
    g = torch.Generator().manual_seed(seed + 4)
    tokens = tokens_for(seed, lead, vocab)
    adv = torch.randn(lead, generator=g)
    mask = (torch.rand(lead, generator=g) > 0.2).float()
    old = -5.0 + 0.1 * torch.randn(lead, generator=g)
    ref_lp = old + 0.05 * torch.randn(lead, generator=g)
    options = dict(chunk_tokens=5, softcap=8.0)
    _, old_ref, _, _ = _linear_pair(rank, world, vocab, dim, lead, seed + 7, **options)
    old_topk = rlfuse.sparse_logprobs(old_ref, tokens, 8)
    configs = [("dapo", LossConfig.dapo(), {}), ("grpo+kl+entropy", LossConfig.grpo(entropy_coef=0.01), {}),
               ("gspo", LossConfig(loss="gspo"), {}), ("troll", LossConfig.troll(troll_k=8), {"old_topk": old_topk})]
    for packed in (False, True):
        for what, config, extra in configs:
            if packed and what in ("dapo", "grpo+kl+entropy"):
                continue
            kwargs = dict(old_logprobs=old, mask=mask, config=config, **extra)
            if config.kl is not None:
                kwargs["ref_logprobs"] = ref_lp
            toks, advs, shape = tokens, adv, lead
            if packed:
                toks, advs, shape = tokens.reshape(-1), adv.reshape(-1), (lead[0] * lead[1],)
                kwargs = {k: (v.reshape(-1) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
                if "old_topk" in kwargs:
                    kwargs["old_topk"] = type(old_topk)(old_topk.ids.reshape(-1, 8), old_topk.logprobs.reshape(-1, 8),
                                                        old_topk.count.reshape(-1), vocab)
                kwargs["cu_seqlens"] = torch.tensor([0, 5, 11, 18], dtype=torch.int32)
            src, ref, layout, leaves = _linear_pair(rank, world, vocab, dim, shape, seed, **options)
            out = rlfuse.policy_loss(src, toks, advs, **kwargs)
            want = rlfuse.policy_loss(ref, toks, advs, **kwargs)
            label = f"{what} packed={packed}"
            _linear_loss_close(out, want, label, mask)
            out.loss.backward()
            want.loss.backward()
            _check_linear_grads(layout, rank, leaves, label, rtol=1e-4, atol=1e-6)
    # Full-vocabulary KL to a reference split the same way.
    src, ref, layout, leaves = _linear_pair(rank, world, vocab, dim, lead, seed, **options)
    ref_src, ref_ref, _, _ = _linear_pair(rank, world, vocab, dim, lead, seed + 3, **options)
    config = LossConfig.dapo(kl_full_coef=0.1)
    out = rlfuse.policy_loss(src, tokens, adv, old_logprobs=old, mask=mask, config=config, ref_logits=ref_src)
    want = rlfuse.policy_loss(ref, tokens, adv, old_logprobs=old, mask=mask, config=config, ref_logits=ref_ref)
    _linear_loss_close(out, want, "kl_full", mask)
    out.loss.backward()
    want.loss.backward()
    _check_linear_grads(layout, rank, leaves, "kl_full", rtol=1e-4, atol=1e-6)
    # path='fused' is refused on every rank alike (no collective has run).
    _expect_on_every_rank(ValueError, ["no fused path"], lambda: rlfuse.policy_loss(
        src, tokens, adv, old_logprobs=old, mask=mask, path="fused"))


@case
def linear_kl_sparse_and_sample(rank, world):
    """kl_divergence between split sources (a LinearLogits and another one, a ShardedLogits or a full
    tensor, either argument first), gradients to both; sparse_logprobs' global ids; sample: the
    unsharded LinearLogits' tokens for the same seed, every parameter form."""
    vocab, dim, lead, seed = 211, 10, (2, 7), 120
    mask = torch.ones(lead, dtype=torch.bool)
    mask[1, 3] = False
    for other_kind, direction in (("linear", "forward"), ("sharded", "reverse"), ("full", "forward"),
                                  ("sharded-first", "forward")):
        src, ref, layout, leaves = _linear_pair(rank, world, vocab, dim, lead, seed, chunk_tokens=4, scale=1.5)
        osrc, oref, _, oleaves = _linear_pair(rank, world, vocab, dim, lead, seed + 1, chunk_tokens=3)
        starts, sizes = layout
        cols = slice(starts[rank], starts[rank] + sizes[rank])
        full_other = oref.materialize().detach().clone().requires_grad_(True)  # the sharded side's
        full_ref = full_other.detach().clone().requires_grad_(True)  # the unsharded side's
        if other_kind == "linear":
            got = rlfuse.kl_divergence(src, osrc, direction, 0.9, mask=mask)
        elif other_kind == "sharded":
            local = full_other.detach()[..., cols].clone().requires_grad_(True)
            got = rlfuse.kl_divergence(src, ShardedLogits(local), direction, 0.9, mask=mask)
        elif other_kind == "full":
            got = rlfuse.kl_divergence(full_other, src, direction, 0.9, mask=mask)
        else:
            local = full_other.detach()[..., cols].clone().requires_grad_(True)
            got = rlfuse.kl_divergence(ShardedLogits(local), src, direction, 0.9, mask=mask)
        second = full_ref if other_kind != "linear" else oref
        if other_kind in ("full", "sharded-first"):
            want = rlfuse.kl_divergence(second, ref, direction, 0.9, mask=mask)
        else:
            want = rlfuse.kl_divergence(ref, second, direction, 0.9, mask=mask)
        same_on_all_ranks(got)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-5, msg=other_kind)
        w = torch.randn(lead, generator=torch.Generator().manual_seed(seed + 2))
        (got * w).sum().backward()
        (want * w).sum().backward()
        _check_linear_grads(layout, rank, leaves, f"kl {other_kind}", rtol=1e-4, atol=2e-5)
        if other_kind == "linear":
            _check_linear_grads(layout, rank, oleaves, "kl other", rtol=1e-4, atol=2e-5)
        elif other_kind == "full":  # this rank's columns of the full tensor, nothing else
            want_grad = torch.zeros_like(full_ref.grad)
            want_grad[..., cols] = full_ref.grad[..., cols]
            torch.testing.assert_close(full_other.grad, want_grad, rtol=1e-4, atol=2e-5)
        else:
            torch.testing.assert_close(local.grad, full_ref.grad[..., cols], rtol=1e-4, atol=2e-5)
    # sparse_logprobs: global ids, equal to the unsharded call.
    src, ref, _, _ = _linear_pair(rank, world, vocab, dim, lead, seed + 5, chunk_tokens=4)
    tokens = tokens_for(seed, lead, vocab)
    got, want = rlfuse.sparse_logprobs(src, tokens, 16, 1e-3), rlfuse.sparse_logprobs(ref, tokens, 16, 1e-3)
    assert torch.equal(got.ids, want.ids) and torch.equal(got.count, want.count) and got.vocab == vocab
    torch.testing.assert_close(got.logprobs, want.logprobs, **F32)
    # sample: the same tokens as the unsharded LinearLogits.
    for i, config in enumerate(SAMPLE_CONFIGS[:2] + SAMPLE_CONFIGS[6:8]):
        kwargs = _per_row(config, 14)
        kwargs = {k: (v.reshape(lead) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
        got = rlfuse.sample(src, seed=77 + i, **kwargs)
        want = rlfuse.sample(ref, seed=77 + i, backend="cpu", **kwargs)
        assert torch.equal(got.tokens, want.tokens), (config, got.tokens, want.tokens)
        torch.testing.assert_close(got.logprobs, want.logprobs, **F32)
        torch.testing.assert_close(got.entropy, want.entropy, **F32)
    got = rlfuse.sample(src, generator=torch.Generator().manual_seed(rank), top_k=20)  # rank 0's draw
    same_on_all_ranks(got.tokens)


@case
def linear_bad_input_raises_on_every_rank(rank, world):
    vocab, dim = 60, 6
    starts, sizes = rank_order_layout(vocab, world)
    hidden = torch.randn(5, dim)
    weight = torch.randn(sizes[rank], dim)
    group = dist.group.WORLD
    # A local problem on one rank (weight's D): that rank its own error, the others one naming it.
    bad_weight = torch.randn(sizes[rank], dim + 1) if rank == world - 1 else weight
    _expect_on_every_rank(ValueError, [] if rank == world - 1 else [f"rank {world - 1}"],
                          lambda: rlfuse.LinearLogits(hidden, bad_weight, group=group))
    # Options that differ between ranks.
    _expect_on_every_rank(ValueError, ["chunk_tokens", "every rank"], lambda: rlfuse.LinearLogits(
        hidden, weight, group=group, chunk_tokens=4 if rank == 0 else None))
    _expect_on_every_rank(ValueError, ["softcap"], lambda: rlfuse.LinearLogits(
        hidden, weight, group=group, softcap=5.0 if rank == 0 else 6.0))
    _expect_on_every_rank(ValueError, ["tile"], lambda: rlfuse.LinearLogits(
        hidden, weight, group=group, vocab_start=0))
    _expect_on_every_rank(ValueError, ["leading shape"], lambda: rlfuse.LinearLogits(
        torch.randn(5 + (rank == 0), dim), weight, group=group))
    # vocab_start without a group: a local error, no collective.
    _expect_on_every_rank(ValueError, ["group"], lambda: rlfuse.LinearLogits(hidden, weight, vocab_start=0))
    # KL against an unsharded LinearLogits: refused alike on every rank.
    src = rlfuse.LinearLogits(hidden, weight, group=group)
    full = rlfuse.LinearLogits(hidden, torch.randn(vocab, dim))
    _expect_on_every_rank(ValueError, ["split the same way"], lambda: rlfuse.kl_divergence(src, full))
    assert rlfuse.token_logprobs(src, torch.zeros(5, dtype=torch.int64)).shape == (5,)
    # No token, or every token masked: empty / zero outputs and gradients, the same collectives everywhere.
    for n in (0, 3):
        h = torch.randn(n, dim, requires_grad=True)
        empty = rlfuse.LinearLogits(h, weight, group=group)
        ids = torch.zeros(n, dtype=torch.int64)
        out = rlfuse.policy_loss(empty, ids, torch.ones(n), old_logprobs=torch.zeros(n), mask=torch.zeros(n))
        out.loss.backward()
        assert out.loss == 0 and torch.equal(h.grad, torch.zeros_like(h))
        assert rlfuse.sparse_logprobs(empty, ids, 4).ids.shape == (n, 4)
        assert rlfuse.sample(empty, seed=1).tokens.shape == (n,)


@case
def data_checks_agree_across_ranks(rank, world):
    """A token id out of range on one rank only: the public functions raise on every rank (the failing
    one its own error, the others one naming it) and none is left waiting in a collective."""
    from rlfuse import LossConfig

    vocab, lead = 90, (3, 4)
    layout = rank_order_layout(vocab, world)
    full = full_logits(130, lead, vocab, neg_inf=False)
    tokens = tokens_for(130, lead, vocab)
    bad = tokens.clone()
    if rank == world - 1:
        bad[1, 2] = vocab + 3
    words = ["tokens must lie in [0, V)"] if rank == world - 1 else [f"rank {world - 1}"]
    src, _ = make(full, layout, rank, requires_grad=True)
    lsrc, _, _, _ = _linear_pair(rank, world, vocab, 7, lead, 131, chunk_tokens=5)
    adv = torch.randn(lead)
    for source in (src, lsrc):
        _expect_on_every_rank(ValueError, words, lambda: rlfuse.token_logprobs(source, bad))
        _expect_on_every_rank(ValueError, words, lambda: rlfuse.policy_loss(source, bad, adv,
                                                                             old_logprobs=torch.zeros(lead)))
        _expect_on_every_rank(ValueError, words, lambda: rlfuse.sparse_logprobs(source, bad, 4))
    old_topk = rlfuse.sparse_logprobs(full, tokens, 4)
    if rank == 0:
        old_topk.ids[0, 0, 0] = -7  # a bad old_topk id on rank 0 only
    _expect_on_every_rank(ValueError, ["old_topk"] if rank == 0 else ["rank 0"], lambda: rlfuse.policy_loss(
        src, tokens, adv, old_logprobs=torch.zeros(lead), config=LossConfig.troll(troll_k=4), old_topk=old_topk))
    # The group still works, and good calls agree.
    torch.testing.assert_close(rlfuse.token_logprobs(src, tokens), rlfuse.token_logprobs(full, tokens), **F32)


# --- bad input ----------------------------------------------------------------------------------------------


def _expect_on_every_rank(kind, words, build):
    try:
        build()
    except kind as error:
        for word in words:
            assert word in str(error), str(error)
        return
    raise AssertionError(f"no {kind.__name__} raised")


@case
def bad_layouts_raise_on_every_rank(rank, world):
    vocab = 100
    starts, sizes = rank_order_layout(vocab, world)
    local = torch.randn(4, sizes[rank])
    # Overlapping shards (explicit starts): rank 1 claims rank 0's columns.
    bad_start = 0 if rank == 1 else starts[rank]
    _expect_on_every_rank(ValueError, ["tile"], lambda: ShardedLogits(local, vocab_start=bad_start))
    # A gap: the last rank starts one column late.
    gap_start = starts[rank] + (1 if rank == world - 1 else 0)
    _expect_on_every_rank(ValueError, ["tile", "gap"], lambda: ShardedLogits(local, vocab_start=gap_start))
    # Starts that do not begin at 0.
    _expect_on_every_rank(ValueError, ["tile"], lambda: ShardedLogits(local, vocab_start=starts[rank] + 5))
    # vocab_start on some ranks only.
    _expect_on_every_rank(ValueError, ["every rank or on none"],
                          lambda: ShardedLogits(local, vocab_start=starts[rank] if rank == 0 else None))
    # Another leading shape on one rank.
    other_lead = torch.randn(5 if rank == world - 1 else 4, sizes[rank])
    _expect_on_every_rank(ValueError, ["leading shape"], lambda: ShardedLogits(other_lead))
    # Another dtype on one rank.
    other_dtype = local.to(torch.bfloat16) if rank == 0 else local
    _expect_on_every_rank(TypeError, ["dtype"], lambda: ShardedLogits(other_dtype))
    # Not a tensor / an empty shard / a negative start, on one rank: every rank raises naming it.
    _expect_on_every_rank(TypeError, [f"rank {world - 1}", "torch.Tensor"],
                          lambda: ShardedLogits("logits" if rank == world - 1 else local))
    _expect_on_every_rank(ValueError, ["rank 0", "at least one"],
                          lambda: ShardedLogits(torch.randn(4, 0) if rank == 0 else local))
    _expect_on_every_rank(ValueError, ["vocab_start"],
                          lambda: ShardedLogits(local, vocab_start=-1 if rank == 0 else starts[rank]))
    # KL between differently sharded sources: a local check with the same verdict on every rank.
    src = ShardedLogits(local)
    other = ShardedLogits(torch.randn(4, sizes[world - 1 - rank]), vocab_start=starts[world - 1 - rank])
    if sizes != sizes[::-1]:
        _expect_on_every_rank(ValueError, ["sharded the same way"], lambda: src._kl_divergence(other, "forward", 1.0,
                                                                                                 "cpu"))
    # After all that, the group still works.
    assert src._token_logprobs(torch.zeros(4, dtype=torch.int64), 1.0, "cpu")[0].shape == (4,)


# --- distillation (rlfuse.distill on sharded sources, docs/distillation.md) ---------------------------------------

DISTILL_GRAD = dict(rtol=1e-4, atol=2e-5)  # as the KL gradients: p_j (u_j + KL) cancels at ~ulp(|lse|)


def _distill_pair(seed, lead, vocab, dtype=torch.float32):
    """(student, teacher) full logits with -inf entries in both rows (the teacher finite where the student
    is -inf and vice versa in places) and a row where the first shard(s) of the student are all -inf."""
    student = full_logits(seed, lead, vocab, dtype)
    teacher = (full_logits(seed + 7, lead, vocab, neg_inf=False) * 0.8 + 0.5 * student.float().clamp(min=-30)).to(dtype)
    flat = teacher.view(-1, vocab)
    flat[1, 3:6] = float("-inf")  # teacher 0 where the student is not
    flat[2, vocab - 4:] = float("-inf")  # ... including in the last shard
    return student, teacher


def _distill_mask(lead):
    mask = torch.ones(lead, dtype=torch.bool)
    mask.view(-1)[3] = False
    mask.view(-1)[-1] = False
    return mask


@case
def distill_jsd_matches_unsharded(rank, world):
    """distill_loss(kind='jsd', 0 < beta < 1) with ShardedLogits on either side or both (the other a full
    tensor): loss and per-token values equal to the unsharded call on every rank; each rank its columns'
    gradient of the student and of the teacher. Uneven shards, shards out of rank order, masked tokens,
    -inf entries in either row, temperature, beta 0.3 / 0.5, seq-mean-token-mean, bf16; identical rows
    give exactly 0."""
    configs = [  # (beta, temperature, sides, explicit, dtype, aggregation)
        (0.3, 0.8, "both", False, torch.float32, "token-mean"),
        (0.5, 1.0, "both", True, torch.float32, "seq-mean-token-mean"),
        (0.3, 1.3, "student", False, torch.float32, "sum"),
        (0.5, 0.7, "teacher", True, torch.float32, "token-mean"),
        (0.3, 1.0, "both", False, torch.bfloat16, "token-mean"),
    ]
    vocab, lead = 203, (3, 5)
    mask = _distill_mask(lead)
    for i, (beta, temperature, sides, explicit, dtype, aggregation) in enumerate(configs):
        label = f"config {i}: beta {beta}, T {temperature}, sharded {sides}, {dtype}"
        layout = (permuted_layout if explicit else rank_order_layout)(vocab, world)
        starts, sizes = layout
        cols = slice(starts[rank], starts[rank] + sizes[rank])
        s_full, t_full = _distill_pair(40 + i, lead, vocab, dtype)
        if sides in ("both", "student"):
            student, s_local = make(s_full, layout, rank, explicit, requires_grad=True)
        else:
            student = s_local = s_full.clone().requires_grad_(True)
        if sides in ("both", "teacher"):
            teacher, t_local = make(t_full, layout, rank, explicit, requires_grad=True)
        else:
            teacher = t_local = t_full.clone().requires_grad_(True)
        out = distill_loss(student, teacher, kind="jsd", beta=beta, temperature=temperature, mask=mask,
                           aggregation=aggregation, backend="cpu")
        ref_s, ref_t = s_full.clone().requires_grad_(True), t_full.clone().requires_grad_(True)
        ref = distill_loss(ref_s, ref_t, kind="jsd", beta=beta, temperature=temperature, mask=mask,
                           aggregation=aggregation, backend="cpu")
        same_on_all_ranks(out.per_token)
        same_on_all_ranks(out.loss)
        assert torch.equal(out.per_token[~mask], torch.zeros_like(out.per_token[~mask])), label
        torch.testing.assert_close(out.per_token, ref.per_token, rtol=1e-4, atol=2e-5, msg=label)
        torch.testing.assert_close(out.loss, ref.loss, rtol=1e-4, atol=2e-5, msg=label)
        torch.testing.assert_close(out.metrics["distill_mean"], ref.metrics["distill_mean"], rtol=1e-4, atol=2e-5)
        out.loss.backward()
        ref.loss.backward()
        tol = DISTILL_GRAD if dtype == torch.float32 else dict(rtol=8e-3, atol=2e-5)
        for local, full_ref, sharded in ((s_local, ref_s, sides in ("both", "student")),
                                         (t_local, ref_t, sides in ("both", "teacher"))):
            if sharded:
                assert local.grad.dtype == dtype
                torch.testing.assert_close(local.grad.float(), full_ref.grad[..., cols].float(), **tol, msg=label)
            else:  # a full tensor on the other side: this rank's columns of its gradient, nothing else
                want = torch.zeros_like(full_ref.grad)
                want[..., cols] = full_ref.grad[..., cols]
                torch.testing.assert_close(local.grad.float(), want.float(), **tol, msg=label)
            assert torch.equal(local.grad[~mask], torch.zeros_like(local.grad[~mask])), label
    # Identical rows: exactly 0 (values and gradients).
    s_full, _ = _distill_pair(49, lead, vocab)
    layout = rank_order_layout(vocab, world)
    a, a_local = make(s_full, layout, rank, requires_grad=True)
    b, b_local = make(s_full, layout, rank, requires_grad=True)
    for beta in (0.3, 0.5):
        values = distill_term(a, b, kind="jsd", beta=beta, temperature=0.9)
        assert torch.equal(values, torch.zeros_like(values)), values
        values.sum().backward()
        assert torch.equal(a_local.grad, torch.zeros_like(a_local.grad))
        assert torch.equal(b_local.grad, torch.zeros_like(b_local.grad))


def _dense_sparse_teacher(t_full, k, temperature):
    """(ids, logprobs) [..., k]: the teacher's top-k log-probs at temperature T (ids -1 / -inf where the
    teacher is 0), as a server returns them."""
    logprobs = torch.log_softmax(t_full.float() / temperature, -1)
    values, ids = logprobs.topk(k, dim=-1)
    ids = torch.where(values > float("-inf"), ids, torch.full_like(ids, -1))
    return ids, values


@case
def distill_sparse_kl_matches_unsharded(rank, world):
    """distill_loss(kind='sparse_kl') with a ShardedLogits student and a sparse teacher of global ids:
    k = 1 and k = V (the tail bucket's two ends), the tail / verl / renorm conventions, SparseLogprobs and
    (ids, logprobs) teachers, masked tokens, -inf entries in the student, temperature, shards out of order;
    values equal to the unsharded call on every rank, each rank its columns' gradient."""
    vocab, lead = 157, (3, 4)
    mask = _distill_mask(lead)
    configs = [  # (k, convention, temperature, explicit, SparseLogprobs teacher)
        (1, "tail", 0.9, False, False),
        (vocab, "tail", 1.0, True, False),
        (1, "verl", 1.0, False, False),
        (vocab, "verl", 0.8, False, False),
        (12, "tail", 0.7, True, True),
        (12, "renorm", 1.0, False, True),
    ]
    for i, (k, convention, temperature, explicit, sparse_object) in enumerate(configs):
        label = f"config {i}: k {k}, {convention}, T {temperature}"
        layout = (permuted_layout if explicit else rank_order_layout)(vocab, world)
        starts, sizes = layout
        s_full, t_full = _distill_pair(60 + i, lead, vocab)
        # Where the student is -inf the teacher is 0 too (else the KL is infinite on both sides).
        t_full = torch.where(torch.isfinite(s_full), t_full, float("-inf"))
        if sparse_object:
            teacher = rlfuse.sparse_logprobs(t_full, tokens_for(60 + i, lead, vocab, t_full), k, 1e-4, temperature)
        else:
            teacher = _dense_sparse_teacher(t_full, k, temperature)
        student, local = make(s_full, layout, rank, explicit, requires_grad=True)
        out = distill_loss(student, teacher, kind="sparse_kl", sparse_convention=convention, temperature=temperature,
                           mask=mask, backend="cpu")
        ref_s = s_full.clone().requires_grad_(True)
        ref = distill_loss(ref_s, teacher, kind="sparse_kl", sparse_convention=convention, temperature=temperature,
                           mask=mask, backend="cpu")
        same_on_all_ranks(out.per_token)
        assert torch.equal(out.per_token[~mask], torch.zeros_like(out.per_token[~mask])), label
        torch.testing.assert_close(out.per_token, ref.per_token, rtol=1e-4, atol=2e-5, msg=label)
        torch.testing.assert_close(out.loss, ref.loss, rtol=1e-4, atol=2e-5, msg=label)
        out.loss.backward()
        ref.loss.backward()
        torch.testing.assert_close(local.grad, ref_s.grad[..., starts[rank]:starts[rank] + sizes[rank]],
                                   **DISTILL_GRAD, msg=label)


@case
def distill_linear_split(rank, world):
    """distill_loss with LinearLogits(group=...) (the split lm_head) as student and / or teacher: jsd
    against a split LinearLogits, a ShardedLogits and a full tensor, forward_kl, sparse_kl; equal to
    the unsharded LinearLogits on the full weights, each rank its weight / bias rows' gradient, hidden
    the full gradient; masked rows; chunks that do not divide N."""
    vocab, dim, lead, seed = 173, 9, (2, 7), 150
    mask = torch.ones(lead, dtype=torch.bool)
    mask[1, 3] = mask[0, 0] = False
    cases = [("jsd", "linear", 0.3), ("jsd", "sharded", 0.5), ("jsd", "full", 0.3), ("jsd", "sharded-student", 0.3),
             ("forward_kl", "linear", 0.5), ("sparse_kl", None, 0.5)]
    for kind, other_kind, beta in cases:
        label = f"{kind} vs {other_kind}"
        src, ref, layout, leaves = _linear_pair(rank, world, vocab, dim, lead, seed, chunk_tokens=4, scale=1.5)
        starts, sizes = layout
        cols = slice(starts[rank], starts[rank] + sizes[rank])
        kwargs = dict(kind=kind, beta=beta, temperature=0.9, mask=mask, backend="cpu")
        if kind == "sparse_kl":
            t_full = full_logits(seed + 3, lead, vocab, neg_inf=False)
            teacher = _dense_sparse_teacher(t_full, 9, 0.9)
            got, want = distill_loss(src, teacher, **kwargs), distill_loss(ref, teacher, **kwargs)
        elif other_kind == "linear":
            osrc, oref, _, oleaves = _linear_pair(rank, world, vocab, dim, lead, seed + 1, chunk_tokens=3)
            got, want = distill_loss(src, osrc, **kwargs), distill_loss(ref, oref, **kwargs)
        else:
            full_other = full_logits(seed + 2, lead, vocab, neg_inf=False)
            local = full_other[..., cols].clone().requires_grad_(True)
            full_t = full_other.clone().requires_grad_(True)
            full_ref = full_other.clone().requires_grad_(True)
            if other_kind == "sharded":
                got = distill_loss(src, ShardedLogits(local), **kwargs)
            elif other_kind == "full":
                got = distill_loss(src, full_t, **kwargs)
            else:  # the ShardedLogits is the student, the split LinearLogits the teacher
                got = distill_loss(ShardedLogits(local), src, **kwargs)
            if other_kind == "sharded-student":
                want = distill_loss(full_ref, ref, **kwargs)
            else:
                want = distill_loss(ref, full_ref, **kwargs)
        same_on_all_ranks(got.per_token)
        torch.testing.assert_close(got.per_token, want.per_token, rtol=1e-4, atol=2e-5, msg=label)
        torch.testing.assert_close(got.loss, want.loss, rtol=1e-4, atol=2e-5, msg=label)
        got.loss.backward()
        want.loss.backward()
        _check_linear_grads(layout, rank, leaves, label, rtol=1e-4, atol=2e-5)
        if other_kind == "linear":
            _check_linear_grads(layout, rank, oleaves, label + " (teacher)", rtol=1e-4, atol=2e-5)
        elif other_kind == "full":
            want_grad = torch.zeros_like(full_ref.grad)
            want_grad[..., cols] = full_ref.grad[..., cols]
            torch.testing.assert_close(full_t.grad, want_grad, **DISTILL_GRAD, msg=label)
        elif other_kind in ("sharded", "sharded-student"):
            torch.testing.assert_close(local.grad, full_ref.grad[..., cols], **DISTILL_GRAD, msg=label)
    # An unsplit LinearLogits against a split side: the same ValueError on every rank, and the group still works.
    src, ref, _, _ = _linear_pair(rank, world, vocab, dim, lead, seed)
    _expect_on_every_rank(ValueError, ["sharded the same way"], lambda: distill_loss(
        ShardedLogits(ref.materialize().detach()[..., cols]), ref, kind="jsd", beta=0.3))
    _expect_on_every_rank(ValueError, ["split the same way"], lambda: distill_loss(src, ref, kind="jsd", beta=0.3))
    torch.testing.assert_close(distill_term(src, src, kind="jsd", beta=0.3), torch.zeros(lead).reshape(-1))


@case
def distill_per_token_temperature(rank, world):
    """distill_loss with one temperature per token (tests/test_token_temperature.py checks the unsharded
    calls against float64 oracles) on vocabulary-split sources: jsd with ShardedLogits on both sides,
    forward_kl against a full tensor, sparse_kl and sampled_reverse_kl with a ShardedLogits student,
    jsd and sparse_kl with a split LinearLogits (chunks of 4 valid rows), and policy_loss with a teacher;
    masked tokens; values equal to the unsharded call on every rank, each rank its columns' gradient.
    A bad value on one rank only raises on every rank."""
    from rlfuse import LossConfig

    vocab, lead = 203, (3, 5)
    mask = _distill_mask(lead)
    g = torch.Generator().manual_seed(70)
    temperature = 0.25 + 3.75 * torch.rand(lead, generator=g)
    layout = permuted_layout(vocab, world)
    starts, sizes = layout
    cols = slice(starts[rank], starts[rank] + sizes[rank])
    s_full, t_full = _distill_pair(71, lead, vocab)
    t_full = torch.where(torch.isfinite(s_full), t_full, float("-inf"))  # (KL(t || s) finite)
    tokens = tokens_for(71, lead, vocab, s_full)
    teacher_lp = rlfuse.token_logprobs(s_full, tokens, temperature) + 0.3 * torch.randn(lead, generator=g)
    sparse = rlfuse.sparse_logprobs(t_full, tokens, 12, 1e-4, temperature)
    cases = [("jsd", 0.3, "both", {}), ("forward_kl", 0.5, "student", {}),
             ("sparse_kl", 0.5, "student", dict(sparse_convention="tail")),
             ("sparse_kl", 0.5, "student", dict(sparse_convention="verl")),
             ("sampled_reverse_kl", 0.5, "student", dict(estimator="k3"))]
    for backend in ("cpu", "torch"):
        for kind, beta, sides, extra in cases:
            label = f"{kind} {extra} ({backend})"
            student, s_local = make(s_full, layout, rank, True, requires_grad=True)
            ref_s = s_full.clone().requires_grad_(True)
            if kind == "sparse_kl":
                teacher = ref_teacher = sparse
            elif kind == "sampled_reverse_kl":
                teacher = ref_teacher = None
                extra = dict(extra, teacher_logprobs=teacher_lp)
            elif sides == "both":
                teacher, t_local = make(t_full, layout, rank, True, requires_grad=True)
                ref_teacher = t_full.clone().requires_grad_(True)
            else:
                teacher = t_full.clone().requires_grad_(True)
                ref_teacher = t_full.clone().requires_grad_(True)
            kwargs = dict(kind=kind, beta=beta, temperature=temperature, mask=mask, backend=backend, **extra)
            out = distill_loss(student, teacher, tokens, **kwargs)
            ref = distill_loss(ref_s, ref_teacher, tokens, **kwargs)
            same_on_all_ranks(out.per_token)
            assert torch.equal(out.per_token[~mask], torch.zeros_like(out.per_token[~mask])), label
            torch.testing.assert_close(out.per_token, ref.per_token, rtol=1e-4, atol=2e-5, msg=label)
            out.loss.backward()
            ref.loss.backward()
            torch.testing.assert_close(s_local.grad, ref_s.grad[..., cols], **DISTILL_GRAD, msg=label)
            if kind in ("jsd", "forward_kl"):
                want = ref_teacher.grad[..., cols]
                got = t_local.grad if sides == "both" else teacher.grad[..., cols]
                torch.testing.assert_close(got, want, **DISTILL_GRAD, msg=label + " (teacher)")
    # A split LinearLogits student (chunks of valid rows): jsd against a full teacher, sparse_kl.
    dim = 9
    for kind, teacher_of in (("jsd", lambda ref: ref.materialize().detach() * 0.7 + 0.3),
                             ("sparse_kl", lambda ref: rlfuse.sparse_logprobs(ref.materialize().detach() * 0.7,
                                                                              tokens, 9, 1e-4, temperature))):
        src, ref, llayout, leaves = _linear_pair(rank, world, vocab, dim, lead, 72, chunk_tokens=4, scale=1.5)
        teacher = teacher_of(ref)
        kwargs = dict(kind=kind, beta=0.4, temperature=temperature, mask=mask, backend="cpu")
        got, want = distill_loss(src, teacher, **kwargs), distill_loss(ref, teacher, **kwargs)
        same_on_all_ranks(got.per_token)
        torch.testing.assert_close(got.per_token, want.per_token, rtol=1e-4, atol=2e-5, msg=f"linear {kind}")
        got.loss.backward()
        want.loss.backward()
        _check_linear_grads(llayout, rank, leaves, f"linear {kind}", rtol=1e-4, atol=2e-5)
    # policy_loss with a teacher: the per-token T reaches the distillation term.
    adv = torch.randn(lead, generator=g)
    old = rlfuse.token_logprobs(s_full, tokens, temperature) + 0.1 * torch.randn(lead, generator=g)
    config = LossConfig.dapo(distill_coef=0.3, distill_kind="jsd", distill_beta=0.4)
    student, s_local = make(s_full, layout, rank, True, requires_grad=True)
    ref_s = s_full.clone().requires_grad_(True)
    out = rlfuse.policy_loss(student, tokens, adv, old_logprobs=old, mask=mask.float(), config=config,
                             temperature=temperature, teacher=t_full)
    ref = rlfuse.policy_loss(ref_s, tokens, adv, old_logprobs=old, mask=mask.float(), config=config, path="general",
                             temperature=temperature, teacher=t_full)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-4, atol=2e-5)
    torch.testing.assert_close(out.metrics["distill"], ref.metrics["distill"], rtol=1e-4, atol=2e-5)
    out.loss.backward()
    ref.loss.backward()
    torch.testing.assert_close(s_local.grad, ref_s.grad[..., cols], rtol=1e-4, atol=1e-6)
    bad = temperature.clone()
    if rank == world - 1:
        bad[1, 2] = 0.0
    words = ["temperature values must lie in"] if rank == world - 1 else [f"rank {world - 1}"]
    _expect_on_every_rank(ValueError, words, lambda: distill_loss(student, t_full, kind="jsd", temperature=bad))


# --- the process group ---------------------------------------------------------------------------------------


def _worker(rank, world, port, result_dir, names):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=GROUP_TIMEOUT_S))
    results = {}
    for name in names:
        start = time.perf_counter()
        try:
            CASES[name](rank, world)
            results[name] = {"ok": True, "seconds": time.perf_counter() - start}
        except Exception:  # noqa: BLE001 -- reported to the parent, case by case
            results[name] = {"ok": False, "error": traceback.format_exc(), "seconds": time.perf_counter() - start}
        with open(os.path.join(result_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_group(world: int, names, result_dir: str, timeout_s: float) -> dict:
    """Spawn ``world`` ranks that run ``names``; {rank: {case: outcome}} (a rank that died or was
    stopped at the deadline has the cases it finished)."""
    context = mp.spawn(_worker, args=(world, free_port(), result_dir, list(names)), nprocs=world, join=False)
    deadline = time.monotonic() + timeout_s
    crashed = None
    while True:
        try:
            if context.join(timeout=1):
                break
        except Exception as error:  # noqa: BLE001 -- a rank died: report what the others wrote
            crashed = error
            break
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            crashed = TimeoutError(f"the {world} ranks did not finish within {timeout_s} s")
            break
    results = {}
    for rank in range(world):
        path = os.path.join(result_dir, f"rank{rank}.json")
        results[rank] = json.load(open(path)) if os.path.exists(path) else {}
    if crashed is not None:
        for rank in range(world):
            for name in names:
                results[rank].setdefault(name, {"ok": False, "error": f"not run: {crashed!r}"})
    return results
