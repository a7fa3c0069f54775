"""Time and peak extra memory of a dapo fwd+bwd from hidden states (issue 15), one variant per process.

    .venv/bin/python bench/linear_logits.py --rounds 3
    (options: --tokens B*T --dim D --vocab V --repeats R --rounds K --variants a,b,... --chunk C)

Variants (each in a fresh subprocess, so peaks do not mix):
  gemms          the three GEMMs of a linear loss at full size: logits = h @ W.T, grad_h = G @ W,
                 grad_W = G.T @ h (G a preallocated [N, V]); time floor, no loss
  gemms_chunked  the same three GEMMs a chunk of the LinearLogits default size at a time
  linear         rlfuse.LinearLogits fused dapo (linear_fused_policy_loss), hidden and weight require grad
  linear_general rlfuse.LinearLogits general path: linear_token_logprobs + dapo reference math on [N]
  materialised   logits = F.linear(h, W) (autograd) + rlfuse.policy_loss(dapo, fused) + backward
  liger          Liger-Kernel LigerFusedLinearGRPOLoss(loss_type="dapo", beta=0, compiled=True)

Time: the best of R calls (after a warm-up call) in each of K rounds, rounds interleaving the
variants (the machine is shared: take the minimum), default malloc settings.
Peak extra memory: in a separate process per variant with MALLOC_MMAP_THRESHOLD_=131072: VmHWM (reset
by writing 5 to /proc/self/clear_refs) during one fwd+bwd minus VmRSS right before it, with the
inputs allocated and .grad cleared, after a warm-up call. The fixed threshold makes every large buffer
an mmap returned to the OS when freed (glibc's dynamic threshold otherwise keeps freed chunks of up
to 32 MiB in the heap, so a warm-up hides them); it is not used for the times, since it also makes
the BLAS's scratch buffers fresh mmaps on every call, which slows many small GEMMs.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time

VARIANTS = ["gemms", "gemms_chunked", "linear", "linear_general", "materialised", "liger"]


def _status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def run_variant(name, args):
    import torch

    import rlfuse
    from rlfuse import LossConfig
    from rlfuse import reference as ref
    from rlfuse.linear import LinearLogits, linear_fused_policy_loss, linear_token_logprobs
    from rlfuse.ops.policy_loss import TokenLossParams

    torch.manual_seed(0)
    b, t = 8, args.tokens // 8
    n, d, v = args.tokens, args.dim, args.vocab
    hidden = torch.randn(b, t, d)
    weight = torch.randn(v, d) * (2.0 / d**0.5)  # logits ~ N(0, 2^2)
    tokens = torch.randint(0, v, (b, t))
    config = LossConfig.dapo()
    with torch.no_grad():
        current = linear_token_logprobs(LinearLogits(hidden, weight), tokens)
    old = current + 0.3 * torch.randn(b, t)
    advantages = torch.randn(b)
    chunk = args.chunk

    def linear_args(src):
        # what losses._fused passes: every token valid, per-sequence advantages, token-mean weights
        per_token_adv = advantages.repeat_interleave(t)
        agg = torch.full((n,), 1.0 / n)
        per_token = (per_token_adv, old.reshape(-1).contiguous(), torch.zeros(n), agg, agg)
        return per_token, TokenLossParams.from_config(config)

    h = hidden.requires_grad_(True)
    w = weight.requires_grad_(True)

    if name == "gemms":
        g_buf = torch.randn(n, v)
        h2 = hidden.detach().reshape(n, d)
        w2 = weight.detach()

        def step():
            logits = h2 @ w2.T
            gh = g_buf @ w2
            gw = g_buf.T @ h2
            return logits, gh, gw
    elif name == "gemms_chunked":
        c = chunk or LinearLogits(h, w).resolved_chunk_tokens()
        g_buf = torch.randn(c, v)
        h2 = hidden.detach().reshape(n, d)
        w2 = weight.detach()
        buf = torch.empty(c, v)

        def step():
            gh = torch.empty(n, d)
            gw = torch.zeros(v, d)
            for r0 in range(0, n, c):
                hc = h2[r0:r0 + c]
                m = hc.shape[0]
                torch.mm(hc, w2.T, out=buf[:m])
                gh[r0:r0 + m] = g_buf[:m] @ w2
                gw.addmm_(g_buf[:m].T, hc)
            return gh, gw
    elif name == "linear":
        def step():
            src = LinearLogits(h, w, chunk_tokens=chunk)
            per_token, params = linear_args(src)
            loss, _, _ = linear_fused_policy_loss(src, tokens, per_token, 1.0, params, "cpu")
            loss.backward()
            return loss
    elif name == "linear_general":
        def step():
            src = LinearLogits(h, w, chunk_tokens=chunk)
            per_token, _ = linear_args(src)
            logp = linear_token_logprobs(src, tokens).reshape(-1)
            loss = ref.weighted(ref.policy_term(logp, per_token[1], per_token[0], config), per_token[3]).sum()
            loss.backward()
            return loss
    elif name == "materialised":
        def step():
            logits = torch.nn.functional.linear(h, w)
            out = rlfuse.policy_loss(logits, tokens, advantages, old_logprobs=old, config=config)
            out.loss.backward()
            return out.loss
    elif name == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        loss_fn = LigerFusedLinearGRPOLoss(beta=0.0, compiled=True, use_ref_model=False, loss_type="dapo",
                                           epsilon_low=0.2, epsilon_high=0.28)
        attention = torch.ones(b, t)

        def step():
            out = loss_fn(h, w, tokens, attention, advantages, old_per_token_logps=old)
            loss = out[0] if isinstance(out, tuple) else out
            loss.backward()
            return loss
    else:
        raise ValueError(name)

    def clear():
        h.grad = None
        w.grad = None

    step()  # warm-up (compiles Liger)
    clear()
    gc.collect()
    times, peaks = [], []
    for _ in range(args.repeats):
        clear()
        gc.collect()
        base = _status("VmRSS")
        _reset_peak()
        t0 = time.perf_counter()
        result = step()
        times.append(time.perf_counter() - t0)
        peaks.append(_status("VmHWM") - base)
        del result
    return dict(variant=name, seconds=min(times), all_seconds=times, peak_extra_mib=min(peaks) / 2**20,
                all_peak_mib=[p / 2**20 for p in peaks], threads=torch.get_num_threads())


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--child", default=None)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_variant(args.child, args)))
        return
    logits_mib = args.tokens * args.vocab * 4 / 2**20
    print(f"N={args.tokens} D={args.dim} V={args.vocab} fp32, dapo fwd+bwd; fp32 logits = {logits_mib:.0f} MiB")
    names = args.variants.split(",")

    def child(name, memory):
        cmd = [sys.executable, __file__, "--child", name, "--tokens", str(args.tokens), "--dim", str(args.dim),
               "--vocab", str(args.vocab), "--repeats", str(args.repeats)]
        if args.chunk:
            cmd += ["--chunk", str(args.chunk)]
        env = dict(os.environ)
        env.pop("MALLOC_MMAP_THRESHOLD_", None)
        if memory:
            env["MALLOC_MMAP_THRESHOLD_"] = "131072"
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            tail = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode
            print(f"{name}: failed: {tail}", flush=True)
            return None
        return json.loads(proc.stdout.strip().splitlines()[-1])

    times = {name: [] for name in names}
    for k in range(args.rounds):
        for name in names:
            row = child(name, memory=False)
            if row:
                times[name].append(row["seconds"])
        print(f"round {k + 1}: " + ", ".join(f"{n} {times[n][-1]:.3f}" for n in names if times[n]), flush=True)
    best = {n: min(v) for n, v in times.items() if v}
    floor = best.get("gemms")
    for name in names:
        row = child(name, memory=True)
        if name not in best or row is None:
            continue
        ratio = f"  {best[name] / floor:.2f}x gemms" if floor else ""
        print(f"{name:15s} {best[name]:7.3f} s{ratio}  (rounds {', '.join(f'{s:.3f}' for s in times[name])})  "
              f"peak extra {row['peak_extra_mib']:7.1f} MiB = {row['peak_extra_mib'] / logits_mib:.3f}x fp32 logits",
              flush=True)


if __name__ == "__main__":
    main()
