"""``rlfuse bench --op policy_loss``'s Liger-Kernel contender, on a tiny CPU case under the Triton interpreter.

The contender must time what rlfuse's dapo contender computes: the loss and the logits' gradient of
Liger's ``triton_grpo_loss`` on the case's own inputs must equal ``rlfuse.policy_loss`` (torch reference
backend) on the same inputs; its built-in check must pass and record the difference; a contender whose
check disagrees must be reported invalid and never timed; and Liger is left out, with a note, where it
cannot run the case. Skips without ``liger_kernel`` (``pip install --no-deps liger-kernel``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os

import pytest
import torch

pytest.importorskip("liger_kernel")

import rlfuse  # noqa: E402
from rlfuse import LossConfig, bench  # noqa: E402
from rlfuse.bench import harness, policy_loss as policy_loss_bench  # noqa: E402

CPU = torch.device("cpu")
SEQ_LEN = policy_loss_bench.SEQ_LEN  # the policy_loss case's sequence length (128)


@pytest.fixture(autouse=True)
def _interpreter():
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Liger on CPU tensors needs the Triton interpreter (TRITON_INTERPRET=1)")


def _args(*extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--op", "policy_loss", "--device", "cpu", "--tokens", "256", "--vocab", "512",
                              "--no-compile", "--repeats", "1", "--warmup", "1", "--no-save", *extra])
    bench._resolve(args)
    return args


def _liger(case: bench.Case) -> list[bench.Contender]:
    return [c for c in case.contenders if c.name.startswith("liger")]


def _rlfuse_dapo(t: dict, backend: str = "torch", **overrides) -> torch.Tensor:
    return rlfuse.policy_loss(t["logits"], t["tokens"], t["advantages"], old_logprobs=t["old"], mask=t["mask"],
                              cu_seqlens=t["cu_seqlens"], config=LossConfig.dapo(**overrides), backend=backend).loss


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_liger_contender_computes_rlfuse_dapo(dtype):
    case = bench.CASE_BUILDERS["policy_loss"](_args("--liger"), CPU)
    (liger,) = _liger(case)
    inp = case.make_inputs(dtype)
    t, logits = inp.tensors, inp.leaves[0]
    assert not t["mask"].view(-1, SEQ_LEN)[:, -1].any(), "each sequence's last position has no next token"

    agreement = liger.check(inp, dtype)
    assert agreement.ok, agreement
    assert agreement.against.startswith("rlfuse ") and agreement.against.endswith(" dapo")
    assert agreement.max_abs_diff <= 1e-6  # both compute in fp32 from the same logits

    (loss,) = liger.make(dtype)(inp)
    loss.backward()
    grad = logits.grad.clone()
    logits.grad = None
    expected = _rlfuse_dapo(t)
    expected.backward()

    assert loss.dtype == torch.float32 and loss.shape == ()
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-6)
    assert grad.dtype == dtype and grad.abs().max() > 0
    if dtype == torch.float32:
        torch.testing.assert_close(grad, logits.grad, rtol=1e-4, atol=1e-7)
    else:  # both round an fp32 gradient to bf16: at most an ulp apart
        torch.testing.assert_close(grad, logits.grad, rtol=2 ** -7, atol=1e-6)
    # A check against a different computation (temperature 0.5) must not pass: the tolerance is meaningful.
    assert abs(agreement.value - _rlfuse_dapo(t, temperature=0.5).item()) > 10 * agreement.tolerance


def test_disagreeing_contender_is_invalid_and_not_timed():
    args = _args("--liger")
    case = bench.CASE_BUILDERS["policy_loss"](args, CPU)
    notes: list[str] = []
    # Liger configured as dapo, checked against a different rlfuse loss (temperature 0.5).
    (wrong,) = policy_loss_bench._liger_grpo_contender(args, CPU, SEQ_LEN, LossConfig.dapo(),
                                                       lambda t: _rlfuse_dapo(t, temperature=0.5),
                                                       "rlfuse torch dapo T=0.5", notes)
    calls = []

    def make(dtype):
        def forward(inp):
            calls.append(1)
            return wrong.make(dtype)(inp)
        return forward

    contender = dataclasses.replace(wrong, make=make)
    case = dataclasses.replace(case, contenders=[contender])
    result = harness._measure(case, contender, torch.float32, CPU, args, bench.MemoryProbe(CPU),
                              bench.Progress(len(bench.PHASES)))
    assert calls == [] and result.ms == {}
    assert result.invalid and result.error.startswith("invalid, not timed")
    assert result.agreement.max_abs_diff > result.agreement.tolerance
    assert "invalid, not timed" in bench.format_results(case, [result], None)
    env = {"device": "cpu", "device_name": "cpu", "repeats": 1}
    (row,) = harness._csv_rows(case, [result], env)
    assert row["checked_against"] == "rlfuse torch dapo T=0.5"
    assert float(row["check_max_abs_diff"]) == pytest.approx(result.agreement.max_abs_diff, rel=1e-2)


def test_liger_only_where_it_can_run(monkeypatch):
    assert not _liger(bench.CASE_BUILDERS["policy_loss"](_args(), CPU)), "CPU: only with --liger"
    assert not _liger(bench.CASE_BUILDERS["policy_loss"](_args("--no-liger"), CPU))

    case = bench.CASE_BUILDERS["policy_loss"](_args("--liger", "--tokens", "200"), CPU)
    assert not _liger(case)
    assert any("Liger-Kernel not benchmarked" in n and "multiple" in n for n in case.notes)

    monkeypatch.setattr(policy_loss_bench, "_LIGER_MAX_COMPLETION", SEQ_LEN - 2)
    case = bench.CASE_BUILDERS["policy_loss"](_args("--liger"), CPU)
    assert not _liger(case)
    assert any("Liger-Kernel not benchmarked" in n and "grid limit" in n for n in case.notes)


def test_run_exits_1_when_liger_disagrees(monkeypatch, capsys):
    monkeypatch.setattr(policy_loss_bench, "_LIGER_LOSS_RTOL", -1.0)  # no difference is small enough
    monkeypatch.setattr(bench, "measure_copy_bandwidth", lambda device: 1e9)  # not what is tested: save time
    args = _args("--liger", "--backends", "cpu", "--dtype", "fp32")
    assert bench.run(args) == 1
    table = capsys.readouterr().out
    (row,) = [line for line in table.splitlines() if line.startswith("liger dapo")]
    assert "invalid, not timed" in row
