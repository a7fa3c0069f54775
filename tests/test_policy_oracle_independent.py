"""The policy-loss test oracle (tests/_policy_oracle.py) stays independent of the library.

Issue 14: the oracle once computed the expected loss with ``rlfuse.reference`` — the functions the
general path runs in production — so that math was only checked against itself. These tests keep
the oracle free of any rlfuse import, and check a few of its answers against docs/SPEC.md's closed forms
(the dL/dlogp column of section 3 through the row gradient of section 2), so the oracle itself is
checked by something other than the library.
"""

from __future__ import annotations

import ast
import math
import pathlib
import subprocess
import sys

import pytest
import torch

from rlfuse import LossConfig as C
from _policy_oracle import oracle_policy_loss

ORACLE = pathlib.Path(__file__).with_name("_policy_oracle.py")


def test_oracle_source_imports_nothing_from_rlfuse():
    tree = ast.parse(ORACLE.read_text(), filename=str(ORACLE))
    imported = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative imports could reach the library"
            imported.append(node.module or "")
        elif isinstance(node, ast.Call):  # importlib.import_module("rlfuse...") / __import__("rlfuse")
            name = getattr(node.func, "attr", None) or getattr(node.func, "id", None)
            assert name not in ("import_module", "__import__"), "dynamic imports are not allowed in the oracle"
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            assert not node.value.startswith("rlfuse"), f"string naming the library: {node.value!r}"
    assert imported, "expected the oracle to import something (torch)"
    offending = [m for m in imported if m == "rlfuse" or m.startswith("rlfuse.") or m.startswith("rlfuse_")]
    assert not offending, f"tests/_policy_oracle.py imports {offending} (the oracle must be independent)"
    assert set(imported) <= {"__future__", "math", "torch"}, f"unexpected imports {sorted(set(imported))}"


def test_importing_the_oracle_loads_no_rlfuse_module():
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import _policy_oracle; "
        "loaded = [m for m in sys.modules if m == 'rlfuse' or m.startswith('rlfuse.')]; "
        "assert not loaded, loaded"
    )
    result = subprocess.run([sys.executable, "-c", code, str(ORACLE.parent)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr


def _row_gradient(logits, tokens, g_logp, temperature=1.0):
    """docs/SPEC.md section 2 with g_H = 0: dL/dz_j = g_logp (1[j=y] - p_j) / T, float64."""
    p = torch.softmax(logits.double() / temperature, -1)
    onehot = torch.nn.functional.one_hot(tokens, logits.shape[-1]).double()
    return g_logp.unsqueeze(-1) * (onehot - p) / temperature


def _sapo_s(r, a):
    """s = sigmoid(tau (r - 1)), tau 1.0 for A > 0 and 1.05 otherwise (SAPO defaults)."""
    return torch.sigmoid(torch.where(a > 0, torch.ones_like(a), torch.full_like(a, 1.05)) * (r - 1))


# docs/SPEC.md section 3, dL/dlogp column, as functions of (r, A); every case with token-sum aggregation.
SPEC_TABLE = {
    "ppo": (C(aggregation="token-sum"),
            lambda r, a: torch.where(((a > 0) & (r > 1.2)) | ((a < 0) & (r < 0.8)), 0.0, -a * r)),
    "gppo": (C(loss="gppo", clip_low=0.2, clip_high=0.28, gppo_beta_low=0.7, gppo_beta_high=1.3,
               aggregation="token-sum"),
             lambda r, a: torch.where((a > 0) & (r > 1.28), -1.3 * 1.28 * a,
                                      torch.where((a < 0) & (r < 0.8), -0.7 * 0.8 * a, -a * r))),
    "cispo_upper": (C(loss="cispo", cispo_mode="upper", clip_low=None, clip_high=0.28, aggregation="token-sum"),
                    lambda r, a: -torch.clamp(r, max=1.28) * a),
    "cispo_two_sided": (C(loss="cispo", cispo_mode="two_sided", clip_low=0.2, clip_high=0.2,
                          aggregation="token-sum"),
                        lambda r, a: -torch.clamp(r, 0.8, 1.2) * a),
    "cispo_cap": (C(loss="cispo", cispo_mode="cap", clip_low=None, clip_high=1.5, aggregation="token-sum"),
                  lambda r, a: -torch.clamp(r, max=1.5) * a),
    "sapo": (C(loss="sapo", aggregation="token-sum"), lambda r, a: -a * r * 4 * _sapo_s(r, a) * (1 - _sapo_s(r, a))),
    "pspo": (C(loss="pspo", pspo_alpha=0.1, aggregation="token-sum"), lambda r, a: -a * 0.9 * r),
    "reinforce": (C(loss="reinforce", aggregation="token-sum"), lambda r, a: -a),
}


@pytest.mark.parametrize("name", sorted(SPEC_TABLE))
def test_oracle_gradient_follows_the_spec_table(name, generator):
    config, dl_dlogp = SPEC_TABLE[name]
    n, vocab = 48, 29
    logits = torch.randn(n, vocab, generator=generator, dtype=torch.float64) * 2
    tokens = torch.randint(0, vocab, (n,), generator=generator)
    logp = torch.log_softmax(logits, -1).gather(-1, tokens[:, None]).squeeze(-1)
    old = logp + 0.5 * torch.randn(n, generator=generator, dtype=torch.float64)
    adv = torch.randn(n, generator=generator, dtype=torch.float64)
    _, grad = oracle_policy_loss(logits, tokens, adv, old=old, config=config)
    r = torch.exp(logp - old)
    torch.testing.assert_close(grad, _row_gradient(logits, tokens, dl_dlogp(r, adv)), rtol=1e-12, atol=1e-12)


def test_oracle_boundary_and_clamp_conventions():
    """A ratio exactly on the clip bound keeps its gradient; a log-ratio clamp that bites zeroes it."""
    logits = torch.tensor([[0.3, -1.0, 2.0], [0.0, 1.0, -2.0], [1.0, 0.5, 0.25]], dtype=torch.float64)
    tokens = torch.tensor([0, 1, 2])
    logp = torch.log_softmax(logits, -1).gather(-1, tokens[:, None]).squeeze(-1)
    old = logp - torch.tensor([0.25, 25.0, -25.0], dtype=torch.float64)  # r = e^0.25, e^25, e^-25
    adv = torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64)
    config = C(clip_high=math.exp(0.25) - 1.0, clip_low=0.2, aggregation="token-sum", loss="pspo", pspo_alpha=0.0)
    loss, grad = oracle_policy_loss(logits, tokens, adv, old=old, config=config)
    r = torch.exp(torch.clamp(logp - old, -20.0, 20.0))
    torch.testing.assert_close(loss, (-adv * r).sum())
    g_logp = torch.tensor([-r[0].item(), 0.0, 0.0], dtype=torch.float64)  # clamp bit on tokens 1 and 2
    torch.testing.assert_close(grad, _row_gradient(logits, tokens, g_logp))
    # A row whose log-prob every method computes exactly (-log 2), so r sits exactly on 1 + eps_high.
    logits, tokens, adv = torch.zeros(1, 2, dtype=torch.float64), torch.tensor([0]), torch.ones(1, dtype=torch.float64)
    old = torch.tensor([-math.log(2.0) - 0.25], dtype=torch.float64)
    r = math.exp(-math.log(2.0) - old.item())
    ppo = C(clip_high=r - 1.0, aggregation="token-sum")
    assert 1.0 + ppo.clip_high == r
    _, grad = oracle_policy_loss(logits, tokens, adv, old=old, config=ppo)
    torch.testing.assert_close(grad, _row_gradient(logits, tokens, torch.tensor([-r], dtype=torch.float64)),
                               rtol=1e-12, atol=1e-12)
    _, grad = oracle_policy_loss(logits, tokens, adv, old=old, config=ppo.replace(clip_high=r - 1.0 - 1e-9))
    assert torch.all(grad == 0)  # just inside the bound: clipped


def test_oracle_masked_rows_get_exact_zero_gradient(generator):
    logits = torch.randn(2, 4, 11, generator=generator, dtype=torch.float64)
    logits[0, 2] = float("nan")  # garbage under the mask
    tokens = torch.randint(0, 11, (2, 4), generator=generator)
    mask = torch.ones(2, 4, dtype=torch.bool)
    mask[0, 2] = False
    old = torch.full((2, 4), -2.0, dtype=torch.float64)
    old[0, 2] = float("nan")
    ref_lp = old.clone()
    loss, grad = oracle_policy_loss(logits, tokens, torch.randn(2, generator=generator), old=old, ref_lp=ref_lp,
                                    mask=mask, config=C.grpo(kl="k3", kl_coef=0.1, entropy_coef=0.01))
    assert torch.isfinite(loss)
    assert torch.all(grad[0, 2] == 0) and torch.isfinite(grad).all()
