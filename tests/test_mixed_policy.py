"""CHORD, LUFFY, EMPG and Lp-Reg in ``rlfuse.policy_loss`` (docs/SPEC.md section 11).

Each is checked against a float64 oracle written here from the paper's formula (nothing from
``rlfuse.reference``): the loss value and the logits' gradient (float64 autograd through the
formula, stop-gradients as Python floats / detached tensors), on every CPU backend (Triton in the
interpreter), padded and packed, with masked rows, a ``-inf`` logit, V not a power of two and V
above one Triton block. Tolerances: the kernels accumulate in fp32, so values agree to ~1e-6
relative; 2e-5 on the loss and 2e-6 of the largest gradient entry leave margin without hiding a
wrong term (each wrong term tried changes the loss by > 1e-3 here).
"""

from __future__ import annotations

import math

import pytest
import torch

import rlfuse
from rlfuse import LossConfig as C
from rlfuse.mixed_policy import chord_mu_schedule
from _policy_batch import assert_matches, run
from conftest import kernel_backends

BACKENDS = kernel_backends("cpu")

# --- inputs ---------------------------------------------------------------------------------


def make_batch(generator, shape=(3, 5), vocab=61, scale=2.0, packed_lengths=None):
    """Logits (one -inf entry), tokens, old log-probs near the current ones, per-token advantages,
    a mask with masked rows (every sequence keeps its first token) and an expert mask."""
    n_rows = math.prod(shape)
    logits = torch.randn(*shape, vocab, generator=generator, dtype=torch.float64) * scale
    tokens = torch.randint(0, vocab, shape, generator=generator)
    logits.view(-1, vocab)[0, (int(tokens.view(-1)[0]) + 1) % vocab] = -math.inf
    current = _log_softmax(logits.reshape(n_rows, vocab), 1.0).gather(-1, tokens.reshape(-1, 1)).squeeze(-1)
    old = (current + 0.15 * torch.randn(n_rows, generator=generator, dtype=torch.float64)).reshape(shape)
    advantages = torch.randn(shape, generator=generator)
    mask = torch.rand(shape, generator=generator) > 0.25
    expert = torch.rand(shape, generator=generator) > 0.5
    cu = None
    if packed_lengths is not None:
        cu = torch.tensor([0, *torch.tensor(packed_lengths).cumsum(0).tolist()])
        mask[cu[:-1][torch.tensor(packed_lengths) > 0]] = True
    elif len(shape) == 2:
        mask[:, 0] = True
    return dict(logits=logits.float(), tokens=tokens, advantages=advantages, old_logprobs=old.float(), mask=mask,
                expert_mask=expert, cu_seqlens=cu)


# --- the oracle: float64, written from the papers ----------------------------------------------


def _log_softmax(rows, temperature):
    """log softmax(rows / T) of [N, V] rows; ``temperature`` a number or one per row."""
    x = rows / (temperature.double().reshape(-1, 1) if isinstance(temperature, torch.Tensor) else temperature)
    top = x.max(-1, keepdim=True).values
    return x - top - torch.log(torch.exp(x - top).sum(-1, keepdim=True))


def _rows(batch, temperature=1.0):
    """Differentiable float64 logits [N, V], log-probs, entropies and the flat per-token inputs."""
    logits = batch["logits"].double().reshape(-1, batch["logits"].shape[-1]).requires_grad_(True)
    log_probs = _log_softmax(logits, temperature)
    probs = torch.exp(log_probs)
    entropy = -torch.where(probs > 0, probs * log_probs, torch.zeros_like(probs)).sum(-1)
    logp = log_probs.gather(-1, batch["tokens"].reshape(-1, 1)).squeeze(-1)
    flat = {k: batch[k].reshape(-1) for k in ("advantages", "old_logprobs", "mask", "expert_mask")
            if batch[k] is not None}
    return logits, logp, entropy, flat


def _sequences(batch):
    """The [start, end) runs of the sequences."""
    if batch["cu_seqlens"] is not None:
        cu = batch["cu_seqlens"].tolist()
        return list(zip(cu[:-1], cu[1:]))
    n_seq, length = batch["tokens"].shape
    return [(i * length, (i + 1) * length) for i in range(n_seq)]


def _ppo(logp, old, a, lo, hi):
    """max(-A r, -A clip(r, lo, hi)), r = exp(logp - old) (no log-ratio here reaches the +-20 clamp)."""
    r = torch.exp(logp - old)
    return torch.maximum(-a * r, -a * torch.clamp(r, lo, hi))


def _zero(logits):
    """A differentiable 0 (logits holds a -inf, so not logits.sum() * 0)."""
    return torch.where(torch.isfinite(logits), logits, 0.0).sum() * 0.0


def _finish(total, logits, shape):
    total.backward()
    return total.detach(), logits.grad.reshape(shape)


def oracle_chord(batch, mu, clip=0.2, use_phi=True, seq_mean=False):
    """CHORD (arXiv 2508.11408, Trinity-RFT mix_chord): (1 - mu) GRPO-clip over the on-policy tokens
    alone (token-mean, or seq-mean-token-mean over the sequences that have one) + mu token-mean over
    the expert tokens of -phi log p, phi = sg(p (1 - p))."""
    logits, logp, _, f = _rows(batch)
    valid = f["mask"].tolist()
    on = [t for t in range(len(valid)) if valid[t] and not f["expert_mask"][t]]
    ex = [t for t in range(len(valid)) if valid[t] and f["expert_mask"][t]]
    runs = [[t for t in on if start <= t < end] for start, end in _sequences(batch)]
    runs = [run for run in runs if run]
    if seq_mean:
        weight = {t: 1.0 / (len(run) * len(runs)) for run in runs for t in run}
    else:
        weight = {t: 1.0 / len(on) for t in on}
    total = _zero(logits)
    for t in on:
        total = total + (1 - mu) * weight[t] * _ppo(logp[t], float(f["old_logprobs"][t]), float(f["advantages"][t]),
                                                    1 - clip, 1 + clip)
    for t in ex:
        p = math.exp(float(logp[t].detach()))
        phi = p * (1 - p) if use_phi else 1.0
        total = total + mu * (-phi * logp[t]) / len(ex)
    return _finish(total, logits, batch["logits"].shape)


def oracle_luffy(batch, gamma, clip=None, norm_length=None):
    """LUFFY (arXiv 2504.14945): expert tokens -A p / (p + gamma) (no clip), on-policy tokens -A r
    (clip None: the authors' loss_remove_clip) or PPO-clip; Dr. GRPO weights 1 / (norm_length S)
    when norm_length is given, else token-mean over all valid tokens."""
    logits, logp, _, f = _rows(batch)
    seqs = [(s, e) for s, e in _sequences(batch) if any(f["mask"][s:e].tolist())]
    n_valid = int(f["mask"].sum())
    total = _zero(logits)
    for t in range(len(logp)):
        if not f["mask"][t]:
            continue
        a = float(f["advantages"][t])
        if f["expert_mask"][t]:
            p = torch.exp(logp[t])
            term = -a * p / (p + gamma)
        elif clip is None:
            term = -a * torch.exp(logp[t] - float(f["old_logprobs"][t]))
        else:
            term = _ppo(logp[t], float(f["old_logprobs"][t]), a, 1 - clip, 1 + clip)
        weight = 1.0 / (norm_length * len(seqs)) if norm_length is not None else 1.0 / n_valid
        total = total + weight * term
    return _finish(total, logits, batch["logits"].shape)


def empg_advantages_oracle(entropy, advantages, mask, sequences, k=1.0, k_f=1.0, zeta=0.1):
    """EMPG (arXiv 2509.09265; the authors' compute_empg_advantage) with tokens as steps, one token
    at a time: min-max normalised entropy over the batch, g = exp(-k Hn) / mean g, f = exp(-k_f Hn),
    A' = g A + zeta f(next valid token of the sequence), then A' minus its mean over valid tokens."""
    valid = [t for t in range(len(mask)) if mask[t]]
    h = {t: float(entropy[t]) for t in valid}
    low, high = min(h.values()), max(h.values())
    hn = {t: (h[t] - low) / (high - low + 1e-8) for t in valid}
    mean_scale = sum(math.exp(-k * hn[t]) for t in valid) / len(valid)
    modulated = {}
    for start, end in sequences:
        steps = [t for t in range(start, end) if mask[t]]
        for i, t in enumerate(steps):
            bonus = zeta * math.exp(-k_f * hn[steps[i + 1]]) if i + 1 < len(steps) else 0.0
            modulated[t] = math.exp(-k * hn[t]) / (mean_scale + 1e-8) * float(advantages[t]) + bonus
    centre = sum(modulated.values()) / len(modulated)
    return {t: value - centre for t, value in modulated.items()}


def oracle_empg(batch, clip_low=0.2, clip_high=0.28, **knobs):
    """DAPO (token-mean, clip 0.2 / 0.28) on EMPG's advantages (computed from sg(H))."""
    logits, logp, entropy, f = _rows(batch)
    adv = empg_advantages_oracle(entropy.detach(), f["advantages"], f["mask"].tolist(), _sequences(batch), **knobs)
    total = _zero(logits)
    for t, a in adv.items():
        total = total + _ppo(logp[t], float(f["old_logprobs"][t]), a, 1 - clip_low, 1 + clip_high) / len(adv)
    return _finish(total, logits, batch["logits"].shape)


def oracle_lp_reg(batch, coef, min_p, rho, clip_low=0.2, clip_high=0.2, temperature=1.0):
    """Lp-Reg (arXiv 2510.03222; the authors' compute_policy_loss_lp_reg): PPO token-mean plus
    coef / N_valid KL(proxy || pi) on the valid A < 0 tokens among the max(1, floor(rho n_neg)) of
    lowest probability whose token the proxy keeps; proxy = pi on {p_j >= min_p max p} renormalised,
    detached; pi = softmax(z / T). The KL is the full sum over the proxy's support, not a shortcut."""
    logits, logp, _, f = _rows(batch, temperature)
    valid = [t for t in range(len(logp)) if f["mask"][t]]
    negative = sorted((t for t in valid if f["advantages"][t] < 0), key=lambda t: float(logp[t].detach()))
    picked = negative[:max(1, math.floor(rho * len(negative)))] if negative else []
    total = _zero(logits)
    for t in valid:
        total = total + _ppo(logp[t], float(f["old_logprobs"][t]), float(f["advantages"][t]), 1 - clip_low,
                             1 + clip_high) / len(valid)
    regularised = 0
    log_probs = _log_softmax(logits, temperature)
    for t in picked:
        probs = torch.exp(log_probs[t]).detach()
        kept = probs >= min_p * probs.max()
        if not kept[batch["tokens"].reshape(-1)[t]]:
            continue
        proxy = torch.where(kept, probs, torch.zeros_like(probs))
        proxy = proxy / proxy.sum()
        support = proxy > 0
        kl = (proxy[support] * (torch.log(proxy[support]) - log_probs[t][support])).sum()
        total = total + coef * kl / len(valid)
        regularised += int(float(kl) > 1e-12)  # a proxy that keeps every finite entry: KL 0 up to rounding
    loss, grad = _finish(total, logits, batch["logits"].shape)
    return loss, grad, regularised


# --- CHORD ----------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["padded", "packed_wide", "no_phi", "seq_mean"])
def test_chord_matches_the_oracle(case, backend, generator):
    if case == "packed_wide":  # V above one Triton block, an empty sequence, one-token sequence
        batch = make_batch(generator, shape=(7,), vocab=1100, packed_lengths=[3, 0, 1, 3])
    else:
        batch = make_batch(generator)
    if case == "seq_mean":  # a sequence of expert tokens only: it leaves the on-policy sequence mean
        batch["expert_mask"][1] = True
    use_phi, seq_mean = case != "no_phi", case == "seq_mean"
    config = C.chord(chord_mu=0.3, chord_phi=use_phi, aggregation="seq-mean-token-mean" if seq_mean else "token-mean")
    want = oracle_chord(batch, 0.3, use_phi=use_phi, seq_mean=seq_mean)
    for path in ("auto", "general"):
        out, grad = run(batch, config, backend, path=path)
        assert out.metrics["path"] == ("general" if path == "general" or backend == "torch" else "fused")
        assert_matches(out, grad, *want, floor=1e-9)
        masked = ~batch["mask"].reshape(-1)
        assert torch.all(grad.reshape(masked.numel(), -1)[masked] == 0)


def test_chord_terms_bite(generator):
    """mu = 0 is PPO on the on-policy tokens alone; mu = 1 is the expert tokens' SFT term alone."""
    batch = make_batch(generator)
    expert = batch["expert_mask"]
    on_policy_mask = batch["mask"] & ~expert
    ppo_only, ppo_grad = run({**batch, "mask": on_policy_mask, "expert_mask": None}, C.chord(chord_mu=None), "cpu")
    chord0, chord0_grad = run(batch, C.chord(chord_mu=0.0), "cpu")
    torch.testing.assert_close(chord0.loss, ppo_only.loss)
    torch.testing.assert_close(chord0_grad, ppo_grad)
    sft, _ = run(batch, C.chord(chord_mu=1.0), "cpu")
    assert abs(float(sft.loss)) > 1e-4 and abs(float(sft.loss) - float(chord0.loss)) > 1e-4
    assert 0.0 < float(sft.metrics["expert_frac"]) < 1.0 and float(sft.metrics["chord_phi_mean"]) > 0


def test_chord_mu_schedule_matches_trinity():
    """Trinity-RFT's mu_schedule_function (chord_policy_loss.py), transcribed."""

    def trinity(step, warmup, decay, peak, valley):
        if step < warmup:
            return (step / warmup) * peak
        if step >= warmup + decay:
            return valley
        cosine = 0.5 * (1 + math.cos(math.pi * (step - warmup) / decay))
        return (peak - valley) * cosine + valley

    for step in (0, 3, 10, 11, 40, 59, 60, 200):
        assert chord_mu_schedule(step, 10, 50, 0.9, 0.05) == pytest.approx(trinity(step, 10, 50, 0.9, 0.05))
    assert chord_mu_schedule(123) == 0.1


# --- LUFFY ----------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["preset", "clipped_packed"])
def test_luffy_matches_the_oracle(case, backend, generator):
    if case == "preset":  # no clip, Dr. GRPO weights with norm_length = T
        batch = make_batch(generator)
        config, expected = C.luffy(), oracle_luffy(batch, 0.1, norm_length=batch["tokens"].shape[1])
    else:
        batch = make_batch(generator, shape=(7,), vocab=1100, packed_lengths=[2, 4, 1])
        config = C(luffy_gamma=0.3)  # PPO clip 0.2, token-mean
        expected = oracle_luffy(batch, 0.3, clip=0.2)
    for path in ("auto", "general"):
        out, grad = run(batch, config, backend, path=path)
        assert out.metrics["path"] == ("general" if path == "general" or backend == "torch" else "fused")
        assert_matches(out, grad, *expected, floor=1e-9)
        assert 0.0 < float(out.metrics["luffy_shaped_mean"]) < 1.0


def test_luffy_ignores_nan_behaviour_logprobs_of_expert_tokens(generator):
    """An expert token's old log-prob (the expert's behaviour policy) is never read."""
    batch = make_batch(generator)
    poisoned = batch["old_logprobs"].masked_fill(batch["expert_mask"], math.nan)
    out, grad = run(batch, C.luffy(), "cpu")
    out_nan, grad_nan = run({**batch, "old_logprobs": poisoned}, C.luffy(), "cpu")
    torch.testing.assert_close(out_nan.loss, out.loss)
    torch.testing.assert_close(grad_nan, grad)


# --- EMPG -----------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["padded", "packed_wide"])
def test_empg_matches_the_oracle(case, backend, generator):
    if case == "packed_wide":
        batch = make_batch(generator, shape=(7,), vocab=1100, packed_lengths=[3, 0, 4])
    else:
        batch = make_batch(generator)
    batch["expert_mask"] = None
    config = C.empg(empg_k=1.5, empg_k_future=0.7, empg_zeta=0.2)
    out, grad = run(batch, config, backend)
    assert out.metrics["path"] == ("general" if backend == "torch" else "fused")
    assert_matches(out, grad, *oracle_empg(batch, k=1.5, k_f=0.7, zeta=0.2), floor=1e-9)
    assert float(out.metrics["empg_scale_min"]) < 1.0 < float(out.metrics["empg_scale_max"])


def test_empg_one_valid_token_keeps_zero_advantage(generator):
    """One valid token: Hn = 0, g = 1, no next token, and the centring leaves A = 0 (loss 0)."""
    batch = make_batch(generator, shape=(1, 4))
    batch["mask"] = torch.tensor([[True, False, False, False]])
    batch["expert_mask"] = None
    out, grad = run(batch, C.empg(), "cpu")
    assert float(out.loss) == 0.0 and torch.all(grad == 0)


# --- Lp-Reg ---------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["padded", "packed_wide"])
def test_lp_reg_matches_the_oracle(case, backend, generator):
    if case == "packed_wide":  # min-p keeps ~90% of the tokens; in the padded case about half
        batch, min_p = make_batch(generator, shape=(9,), vocab=1100, scale=0.5, packed_lengths=[4, 5]), 0.1
    else:
        batch, min_p = make_batch(generator, shape=(4, 6), scale=0.5), 0.3
    batch["expert_mask"] = None
    config = C(lp_reg_coef=2.0, lp_reg_min_p=min_p, lp_reg_rho=0.5)
    loss, expected_grad, regularised = oracle_lp_reg(batch, 2.0, min_p, 0.5)
    assert regularised > 0  # the term bites on these inputs
    out, grad = run(batch, config, backend)
    assert out.metrics["path"] == ("general" if backend == "torch" else "fused")
    assert_matches(out, grad, loss, expected_grad, floor=1e-9)
    valid = int(batch["mask"].sum())
    torch.testing.assert_close(out.metrics["lp_reg_frac"], torch.tensor(regularised / valid))
    assert float(out.metrics["lp_reg_kl"]) > 0


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
@pytest.mark.parametrize("case", ["wide_chosen_neg_inf", "one_row"])
def test_lp_reg_runs_on_the_kernels(case, backend, generator, monkeypatch):
    """On a kernel backend the KL comes from the sampler's kept set and token_logprobs (docs/SPEC.md
    section 11), never from rlfuse.reference; at the call's temperature (policy_loss(temperature=)
    overrides the config's). wide: V above one Triton block, and a selected token whose own logit is
    -inf (outside the kept set: no term, no NaN); one_row: a single regularised row."""
    from rlfuse.reference import mixed_policy as reference_mixed

    def reference_called(*args, **kwargs):
        raise AssertionError("the reference Lp-Reg KL ran on a kernel backend")

    monkeypatch.setattr(reference_mixed, "filtered_proxy_kl", reference_called)
    if case == "one_row":
        batch, min_p = make_batch(generator, shape=(1,), vocab=1100, scale=0.5), 0.05
        batch["mask"][:], batch["advantages"][:] = True, -1.0
    else:
        batch, min_p = make_batch(generator, shape=(4, 6), vocab=1100, scale=0.5), 0.05
        negative = (batch["mask"] & (batch["advantages"] < 0)).nonzero()[0].tolist()
        batch["logits"][(*negative, int(batch["tokens"][tuple(negative)]))] = -math.inf
    batch["expert_mask"] = None
    loss, expected_grad, regularised = oracle_lp_reg(batch, 2.0, min_p, 0.5, temperature=0.7)
    assert regularised > 0
    out, grad = run(batch, C(lp_reg_coef=2.0, lp_reg_min_p=min_p, lp_reg_rho=0.5), backend, temperature=0.7)
    valid = int(batch["mask"].sum())
    torch.testing.assert_close(out.loss.double(), loss, atol=2e-5, rtol=2e-5)
    # The KL's gradient is the difference of two kernel gradients, (onehot - proxy) / T - (onehot - p) / T:
    # their one-hot parts cancel in fp32 at the chosen entry, a few 2^-24 of the term's scale coef w / T.
    # Here (one row: the clipped PPO term adds nothing) that exceeds 2e-6 of the largest entry.
    term_scale = 2.0 / valid / 0.7
    atol = 2e-6 * expected_grad.abs().max().item() + 4 * 2**-24 * term_scale
    torch.testing.assert_close(grad.double(), expected_grad, atol=atol, rtol=2e-6)
    torch.testing.assert_close(out.metrics["lp_reg_frac"], torch.tensor(regularised / valid))


@pytest.mark.parametrize("backend", BACKENDS)
def test_lp_reg_per_token_temperature(backend, generator):
    """policy_loss(temperature=<per token>) with Lp-Reg: each selected row's proxy and pi at its own
    T (the oracle divides each row by its T), values and gradients; V 61, masked rows, a -inf logit."""
    batch, min_p = make_batch(generator, shape=(4, 6), scale=0.5), 0.1
    batch["expert_mask"] = None
    temperature = (0.6 + torch.rand(batch["tokens"].shape, generator=generator)).double()
    loss, expected_grad, regularised = oracle_lp_reg(batch, 2.0, min_p, 1.0, temperature=temperature)
    assert regularised > 0
    config = C(lp_reg_coef=2.0, lp_reg_min_p=min_p, lp_reg_rho=1.0)
    out, grad = run(batch, config, backend, temperature=temperature)
    torch.testing.assert_close(out.loss.double(), loss, atol=2e-5, rtol=2e-5)
    # As test_lp_reg_runs_on_the_kernels: fp32 cancellation at the chosen entry, scale coef w / min T.
    valid = int(batch["mask"].sum())
    term_scale = 2.0 / valid / temperature.min().item()
    atol = 2e-6 * expected_grad.abs().max().item() + 4 * 2**-24 * term_scale
    torch.testing.assert_close(grad.double(), expected_grad, atol=atol, rtol=2e-6)
    torch.testing.assert_close(out.metrics["lp_reg_frac"], torch.tensor(regularised / valid))


def test_lp_reg_kl_is_the_filtered_log_prob_gap(generator):
    """KL(proxy || pi) = log pi_proxy(y) - log pi(y) for any kept y (here the row's argmax)."""
    from rlfuse.reference.mixed_policy import filtered_proxy_kl

    rows = torch.randn(5, 300, generator=generator, dtype=torch.float64)
    top = rows.argmax(-1)
    kl, kept = filtered_proxy_kl(rows, top, 1.0, 0.05)
    log_probs = _log_softmax(rows, 1.0)
    in_set = torch.exp(log_probs) >= 0.05 * torch.exp(log_probs).max(-1, keepdim=True).values
    filtered = torch.log_softmax(rows.masked_fill(~in_set, -math.inf), -1)
    expected = filtered.gather(-1, top[:, None]) - log_probs.gather(-1, top[:, None])
    assert kept.all()
    torch.testing.assert_close(kl.double(), expected.squeeze(-1), atol=1e-6, rtol=1e-6)


# --- combinations and bad input -------------------------------------------------------------


def test_combined_knobs_run_and_report(generator):
    batch = make_batch(generator, scale=0.5)
    config = C.chord(empg_k=1.0, lp_reg_coef=1.0, lp_reg_min_p=0.3, lp_reg_rho=0.5, kl="k3", kl_coef=0.1,
                     entropy_coef=0.01)
    out, grad = run(batch, config, "cpu", ref_logprobs=batch["old_logprobs"])
    assert torch.isfinite(out.loss) and torch.isfinite(grad).all()
    for key in ("chord_mu", "expert_frac", "empg_scale_max", "lp_reg_frac"):
        assert key in out.metrics


def test_bad_inputs_raise_clear_errors(generator):
    batch = make_batch(generator)
    with pytest.raises(TypeError, match="expert_mask must be a bool tensor"):
        run(batch, C.chord(), "cpu", expert_mask=batch["expert_mask"].float())
    with pytest.raises(ValueError, match="expert_mask must have the tokens' shape"):
        run(batch, C.chord(), "cpu", expert_mask=batch["expert_mask"][:, :2])
    with pytest.raises(ValueError, match="expert_mask is required by chord_mu"):
        run(batch, C.luffy(), "cpu", expert_mask=None)
    with pytest.raises(ValueError, match="expert_mask is only used by chord_mu"):
        run(batch, C.dapo(), "cpu")
    with pytest.raises(ValueError, match="has no fused path"):
        run(batch, C.chord(entropy_quantile=0.2), "cpu", path="fused")
    with pytest.raises(ValueError, match="inplace_backward cannot be combined with lp_reg_coef"):
        run({**batch, "expert_mask": None}, C.lp_reg(), "cpu", inplace_backward=True)
    for bad, name in ((dict(chord_mu=1.5), "chord_mu"), (dict(chord_mu=-0.1), "chord_mu"),
                      (dict(luffy_gamma=0.0), "luffy_gamma"), (dict(chord_mu=0.1, luffy_gamma=0.1), "luffy_gamma"),
                      (dict(chord_mu=0.1, loss="gspo"), "chord_mu"), (dict(empg_k=-1.0), "empg_k"),
                      (dict(empg_zeta=math.nan), "empg_zeta"), (dict(lp_reg_coef=-1.0), "lp_reg_coef"),
                      (dict(lp_reg_min_p=1.0), "lp_reg_min_p"), (dict(lp_reg_rho=0.0), "lp_reg_rho"),
                      (dict(chord_phi=1), "chord_phi")):
        with pytest.raises(ValueError, match=f"LossConfig.{name}"):
            C(**bad)


COMBINED = C.chord(empg_k=1.0, lp_reg_coef=1.0, lp_reg_min_p=0.3, lp_reg_rho=0.5)


@pytest.mark.parametrize("backend", [b for b in ("cpu", "torch") if b in BACKENDS])
def test_no_host_reads(backend, generator, monkeypatch):
    """EMPG's pre-pass, Lp-Reg's selection and the expert terms stay on the device."""
    from rlfuse.ops import policy_loss as policy_ops
    from test_host_syncs import count_host_reads

    monkeypatch.setattr(policy_ops, "DEVICE_RESCALE_ON_CPU", True, raising=False)
    batch = make_batch(generator, scale=0.5)
    previous = rlfuse.set_validation(False)
    try:
        for config, expert in ((COMBINED, batch["expert_mask"]), (C.empg(lp_reg_coef=1.0), None)):
            with count_host_reads() as reads:
                out, _ = run(batch, config, backend, expert_mask=expert)
            assert reads == [], (config, reads)
            assert torch.isfinite(out.loss)
    finally:
        rlfuse.set_validation(previous)


def test_compile_fullgraph(generator):
    batch = make_batch(generator, scale=0.5)
    kwargs = {k: v for k, v in batch.items() if k != "logits" and v is not None}

    def loss_fn(logits):
        out = rlfuse.policy_loss(logits, config=COMBINED, backend="cpu", **kwargs)
        return out.loss, out.metrics["lp_reg_frac"], out.metrics["empg_scale_max"]

    results = []
    for fn in (loss_fn, torch.compile(loss_fn, fullgraph=True, backend="aot_eager")):
        x = batch["logits"].detach().clone().requires_grad_(True)
        loss, *metrics = fn(x)
        loss.backward()
        results.append((loss.detach(), *metrics, x.grad))
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager)


def test_linear_logits_source_matches_materialised_logits(generator):
    """CHORD / LUFFY / EMPG from hidden states (LinearLogits) equal the materialised logits';
    Lp-Reg needs a logits tensor."""
    n, dim, vocab = 9, 8, 37
    hidden, weight = torch.randn(n, dim, generator=generator), torch.randn(vocab, dim, generator=generator)
    tokens = torch.randint(0, vocab, (n,), generator=generator)
    inputs = dict(tokens=tokens, advantages=torch.randn(n, generator=generator),
                  mask=torch.rand(n, generator=generator) > 0.2,
                  old_logprobs=torch.randn(n, generator=generator) * 0.1 - 3.5, backend="cpu")
    expert = torch.rand(n, generator=generator) > 0.5
    for config, expert_mask in ((C.chord(), expert), (C.luffy(norm_length=9.0), expert), (C.empg(), None)):
        results = []
        for make in (lambda h: rlfuse.LinearLogits(h, weight), lambda h: h @ weight.T):
            h = hidden.clone().requires_grad_(True)
            out = rlfuse.policy_loss(make(h), config=config, expert_mask=expert_mask, **inputs)
            out.loss.backward()
            results.append((out.loss.detach(), h.grad))
        torch.testing.assert_close(results[0], results[1])
    with pytest.raises(ValueError, match="lp_reg_coef needs a logits tensor"):
        rlfuse.policy_loss(rlfuse.LinearLogits(hidden, weight), config=C.lp_reg(), **inputs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_masked_rows_never_reaches_the_loss_or_gradient(backend, generator):
    """docs/SPEC.md section 9 for these knobs: a masked row full of NaN (and NaN per-token inputs)."""
    batch = make_batch(generator, shape=(4, 6), scale=0.5)
    masked = ~batch["mask"]
    batch["logits"][masked] = math.nan
    for name in ("advantages", "old_logprobs"):
        batch[name] = batch[name].masked_fill(masked, math.nan)
    for config, expert in ((C.chord(lp_reg_coef=1.0, lp_reg_min_p=0.3, lp_reg_rho=1.0), batch["expert_mask"]),
                           (C.luffy(empg_k=1.0), batch["expert_mask"]), (C.lp_reg(lp_reg_rho=1.0), None)):
        out, grad = run(batch, config, backend, expert_mask=expert)
        assert torch.isfinite(out.loss), config
        assert torch.all(grad[masked] == 0) and torch.isfinite(grad).all(), config


@pytest.mark.parametrize("backend", BACKENDS)
def test_lp_reg_kl_equals_the_samplers_filtered_log_prob_gap(backend, generator):
    """Lp-Reg's KL on a row equals rlfuse.token_logprobs(..., min_p=kappa) - token_logprobs(...) for a
    kept token: the sampler's own kept set (docs/SPEC.md section 8) and Lp-Reg's proxy agree."""
    from rlfuse.reference.mixed_policy import filtered_proxy_kl

    rows = torch.randn(6, 700, generator=generator) * 1.5
    tokens = torch.multinomial(torch.softmax(rows / 0.8, -1), 1, generator=generator).squeeze(-1)
    kl, kept = filtered_proxy_kl(rows, tokens, 0.8, 0.05)
    filtered = rlfuse.token_logprobs(rows, tokens, 0.8, backend=backend, min_p=0.05)
    full = rlfuse.token_logprobs(rows, tokens, 0.8, backend=backend)
    assert kept.any()
    assert torch.equal(kept, torch.isfinite(filtered))
    torch.testing.assert_close(kl[kept], (filtered - full)[kept], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["chord", "luffy", "chord_erc_empg"])
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
def test_fused_expert_terms_inplace_and_two_reads(name, backend, generator, monkeypatch):
    """CHORD / LUFFY on the fused path (the detached-weight route, docs/SPEC.md section 11): one no-grad
    token_logprobs pre-pass (shared with EMPG) and one fused kernel, in-place backward equal to the
    general path, metrics included."""
    from rlfuse import losses
    from rlfuse.ops.policy_loss import FusedPolicyLoss

    batch = make_batch(generator, shape=(3, 4), vocab=300)
    shape = batch["tokens"].shape
    config = {"chord": C.chord(chord_mu=0.4), "luffy": C.luffy(),
              "chord_erc_empg": C.chord(erc_beta_low=0.05, erc_beta_high=0.05, empg_k=1.0, kl="k3", kl_coef=0.1,
                                        entropy_coef=0.01)}[name]
    extra = {}
    if config.entropy_ratio_clip:
        _, entropy = rlfuse.token_logprobs(batch["logits"], batch["tokens"], return_entropy=True)
        extra["old_entropy"] = entropy * (1 + 0.1 * torch.randn(shape, generator=generator))
    if config.kl is not None:
        extra["ref_logprobs"] = batch["old_logprobs"] + 0.1 * torch.randn(shape, generator=generator)
    want, want_grad = run(batch, config, backend, path="general", **extra)
    reads = []
    token_logprobs_fwd, fused_apply = losses.token_logprobs_fwd, FusedPolicyLoss.apply
    monkeypatch.setattr(losses, "token_logprobs_fwd", lambda *a, **k: reads.append("pre-pass") or
                        token_logprobs_fwd(*a, **k))
    monkeypatch.setattr(FusedPolicyLoss, "apply", lambda *a, **k: reads.append("kernel") or fused_apply(*a, **k))
    out, grad = run(batch, config, backend, inplace_backward=True, **extra)
    assert reads == ["pre-pass", "kernel"] and out.metrics["path"] == "fused"
    torch.testing.assert_close(out.loss, want.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-6)
    for key, value in want.metrics.items():
        if key != "path":
            torch.testing.assert_close(out.metrics[key], value, rtol=1e-5, atol=1e-6, msg=key)
