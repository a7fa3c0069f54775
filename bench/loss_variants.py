"""Cost of the round-2 loss options against the fused DAPO loss on the same inputs (CPU or GPU).

    python bench/loss_variants.py [--tokens N] [--vocab V] [--dtype fp32|bf16] [--repeats R] [--backend B]

Times one forward + backward of ``rlfuse.policy_loss`` (and ``token_logprobs``) per option, median of
``--repeats`` runs after one warm-up, and prints each as a multiple of the fused DAPO loss (for the
policy losses) or of plain ``token_logprobs`` (for the log-prob options). The options: a per-token
temperature tensor, per-token clip bounds (DCPO), CPGD (its own kernel variant), BAPO / HAPO / ERC /
CHORD (a no-grad pre-pass of the log-probs, then the kernel), Lp-Reg, and the log-probs on the
sampler's filtered support (top-k / top-p: the sampler's score pass, then the kept-set statistics).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import rlfuse
from rlfuse import LossConfig


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device, repeats):
    fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    g = torch.Generator().manual_seed(0)
    n, v = args.tokens, args.vocab
    logits = (torch.randn(n, v, generator=g) * 2).to(device=device, dtype=dtype)
    tokens = torch.randint(0, v, (n,), generator=g).to(device)
    advantages = torch.randn(n, generator=g).to(device)
    with torch.no_grad():
        base = rlfuse.token_logprobs(logits, tokens, backend=args.backend)[0]
    old = (base + 0.05 * torch.randn(n, generator=g).to(device)).float()
    old_entropy = rlfuse.entropy(logits, backend=args.backend).float() * 1.02
    cu_seqlens = torch.arange(0, n + 1, 256, device=device)
    temperature = (0.7 + 0.6 * torch.rand(n, generator=g)).to(device)
    expert = torch.zeros(n, dtype=torch.bool, device=device)
    expert[: n // 8] = True

    def loss_fn(config, **kw):
        def run():
            leaf = logits.detach().requires_grad_(True)
            out = rlfuse.policy_loss(leaf, tokens, advantages, old_logprobs=old, cu_seqlens=cu_seqlens, config=config,
                                     backend=args.backend, **kw)
            out.loss.backward()
            return out
        return run

    def logprobs_fn(**kw):
        def run():
            leaf = logits.detach().requires_grad_(True)
            logp = rlfuse.token_logprobs(leaf, tokens, backend=args.backend, **kw)
            torch.where(torch.isfinite(logp), logp, 0.0).sum().backward()
        return run

    losses = [
        ("dapo (fused)", loss_fn(LossConfig.dapo())),
        ("dapo, per-token temperature", loss_fn(LossConfig.dapo(), temperature=temperature)),
        ("dcpo (per-token bounds)", loss_fn(LossConfig.dcpo())),
        ("cpgd", loss_fn(LossConfig.cpgd())),
        ("bapo (pre-pass)", loss_fn(LossConfig.bapo())),
        ("hapo (pre-pass)", loss_fn(LossConfig.hapo())),
        ("erc (pre-pass)", loss_fn(LossConfig.erc(), old_entropy=old_entropy)),
        ("chord (pre-pass)", loss_fn(LossConfig.chord(), expert_mask=expert)),
        ("lp_reg", loss_fn(LossConfig.lp_reg())),
        ("dapo, general path", loss_fn(LossConfig.dapo(), path="general")),
    ]
    logprob_options = [
        ("token_logprobs", logprobs_fn()),
        ("token_logprobs, per-token temperature", logprobs_fn(temperature=temperature)),
        ("token_logprobs, top_k=50 top_p=0.9", logprobs_fn(top_k=50, top_p=0.9)),
    ]
    print(f"# {device.type} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
          f"N={n} V={v} {args.dtype}, backend={args.backend}, {torch.get_num_threads()} threads, "
          f"median of {args.repeats} fwd+bwd")
    for group in (losses, logprob_options):
        baseline = None
        for name, fn in group:
            seconds = _time(fn, device, args.repeats)
            baseline = baseline or seconds
            print(f"{name:42s} {seconds * 1e3:9.1f} ms  {seconds / baseline:5.2f}x")


if __name__ == "__main__":
    main()
