"""``rlfuse bench`` on tiny CPU shapes: every op's case runs through the shared harness, the table and the
files keep their layout, and ``python -m rlfuse.bench`` is the same command (the package's ``__main__``)."""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from rlfuse import bench

OPS = ["token_logprobs", "policy_loss", "kl", "troll", "sample", "distill"]
CSV_COLUMNS = (
    "op,device,device_name,tokens,vocab,dtype,contender,repeats,fwd_ms,fwd_ms_min,fwd_ms_max,bwd_ms,bwd_ms_min,"
    "bwd_ms_max,fwd+bwd_ms,fwd+bwd_ms_min,fwd+bwd_ms_max,speedup_vs_eager_fwd+bwd,peak_extra_bytes,"
    "peak_extra_x_logits,logits_bytes,fwd_GBps,fwd_pct_copy_bw,bwd_GBps,bwd_pct_copy_bw,fwd+bwd_GBps,"
    "fwd+bwd_pct_copy_bw,copy_bandwidth_GBps,first_call_s,checked_against,check_max_abs_diff,check_tolerance,error"
).split(",")
TABLE_HEADER = ["contender", "dtype", "fwd ms", "bwd ms", "fwd+bwd ms"]


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.mark.parametrize("op", OPS)
def test_every_op_runs_and_writes_its_files(op, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "measure_copy_bandwidth", lambda device: 10e9)  # not what is tested: save time
    args = _args("--op", op, "--device", "cpu", "--tokens", "256", "--vocab", "96", "--dtype", "fp32",
                 "--repeats", "1", "--warmup", "1", "--backends", "cpu", "--no-compile", "--no-liger",
                 "--out", str(tmp_path))
    assert bench.run(args) == 0
    out = capsys.readouterr().out.splitlines()
    assert "N=256 V=96  |  cpu: " in out[0] and out[1].startswith("median of 1 runs; copy bandwidth 10.0 GB/s")
    assert out[3].startswith("contender") and all(h in out[3] for h in TABLE_HEADER)
    contenders = {"troll": ["rlfuse cpu troll", "rlfuse cpu dapo"],
                  "policy_loss": ["rlfuse cpu dapo", "rlfuse cpu gspo", "torch eager"]}.get(
                      op, ["rlfuse cpu", "torch eager"])
    rows = out[5:5 + len(contenders)]
    assert [r.split("  ")[0].strip() for r in rows] == contenders
    assert all(" fp32 " in r and "error" not in r for r in rows)

    files = sorted(os.listdir(tmp_path))
    stem = files[0].removesuffix(".csv")
    png = [stem + ".png"] if importlib.util.find_spec("matplotlib") else []
    assert stem.startswith(f"{op}_cpu_") and files == [stem + ".csv", *png, stem + "_env.json"]
    csv_path = tmp_path / files[0]
    with open(csv_path, newline="") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == CSV_COLUMNS
    assert [r["contender"] for r in table] == contenders and {r["op"] for r in table} == {op}
    assert all(float(r["fwd+bwd_ms"]) > 0 and r["error"] == "" for r in table)
    env = json.loads((tmp_path / files[-1]).read_text())
    assert env["op"] == op and env["contenders"] == contenders and env["shape"] == {"tokens": 256, "vocab": 96}


@pytest.mark.parametrize("op", ["linear_policy_loss", "linear_token_logprobs"])
def test_linear_ops_run_with_every_contender(op, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "measure_copy_bandwidth", lambda device: 10e9)
    args = _args("--op", op, "--device", "cpu", "--tokens", "64", "--vocab", "96", "--hidden-dim", "8", "--dtype",
                 "fp32", "--repeats", "1", "--warmup", "1", "--backends", "cpu", "--no-compile", "--out", str(tmp_path))
    assert bench.run(args) == 0
    out = capsys.readouterr().out.splitlines()
    assert "N=64 D=8 V=96  |  cpu: " in out[0]
    contenders = ["3 GEMMs", "3 GEMMs chunked", "rlfuse cpu LinearLogits", "rlfuse cpu materialised", "torch eager"]
    if op == "linear_policy_loss" and importlib.util.find_spec("liger_kernel"):
        contenders.append("liger fused-linear dapo")  # checked against rlfuse's loss before it is timed
    rows = out[5:5 + len(contenders)]
    assert [r.split("  ")[0].strip() for r in rows] == contenders
    assert all(" fp32 " in r and "error" not in r and "invalid" not in r for r in rows)
    csv_path = tmp_path / next(f for f in sorted(os.listdir(tmp_path)) if f.endswith(".csv"))
    with open(csv_path, newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["contender"] for r in table] == contenders
    assert all(r["hidden"] == "8" and r["tokens"] == "64" and float(r["fwd+bwd_ms"]) > 0 for r in table)


def test_op_defaults_and_bad_arguments(capsys):
    args = _args("--op", "sample", "--device", "cpu")
    bench._resolve(args)
    assert (args.tokens, args.vocab, args.dtypes) == (256, 151936, [torch.float32, torch.bfloat16])
    args = _args("--device", "cpu", "--quick")
    bench._resolve(args)
    assert (args.tokens, args.vocab, args.repeats) == (256, 4096, 1)
    assert bench.run(_args("--device", "cpu", "--tokens", "0")) == 2
    assert bench.run(_args("--device", "cpu", "--dtype", "fp8")) == 2
    assert "unknown dtype(s) ['fp8']" in capsys.readouterr().err


def test_python_dash_m_is_the_bench_command():
    result = subprocess.run([sys.executable, "-m", "rlfuse.bench", "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: python -m rlfuse.bench")
    for op in OPS:
        assert op in result.stdout


def test_vocab_parallel_spawns_ranks_and_counts_bytes(tmp_path, capsys):
    """``--vocab-parallel 2``: two gloo ranks time the sharded op next to the unsharded one, and the bytes
    counted on the wrapped collectives equal docs/sharded.md's formula (20 B per token + 120 B)."""
    args = _args("--op", "token_logprobs", "--vocab-parallel", "2", "--device", "cpu", "--tokens", "64", "--vocab",
                 "97", "--dtype", "fp32", "--repeats", "1", "--warmup", "1", "--backends", "cpu", "--threads", "1",
                 "--out", str(tmp_path))
    assert bench.run(args) == 0
    out = capsys.readouterr().out
    assert "vocab-parallel over 2 ranks (gloo), N=64 V=97" in out
    assert f"= {20 * 64 + 120} B in the forward, 0 in the backward; measured [({20 * 64 + 120}, 0)]: match" in out
    csv_path = next(p for p in tmp_path.iterdir() if p.suffix == ".csv")
    assert csv_path.name.startswith("token_logprobs_vocab_parallel2_cpu_")
    with open(csv_path, newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["contender"] for r in table] == ["rlfuse cpu unsharded", "rlfuse cpu rank 0/2", "rlfuse cpu rank 1/2"]
    assert [r["local_vocab"] for r in table] == ["97", "49", "48"]
    assert all(float(r["fwd+bwd_ms"]) > 0 and r["error"] == "" for r in table)
    assert [r["payload_bytes_fwd"] for r in table[1:]] == [str(20 * 64 + 120)] * 2
    assert [r["collectives_fwd"] for r in table[1:]] == ["4", "4"] and table[1]["payload_bytes_bwd"] == "0"
    assert bench.run(_args("--op", "kl", "--vocab-parallel", "2", "--device", "cpu")) == 2


def test_linear_distill_runs_with_every_contender(tmp_path, monkeypatch, capsys):
    """``--op linear_distill``: rlfuse's distill_loss on two LinearLogits, on materialised logits, torch eager and
    (when importable) Liger's fused-linear JSD, whose loss is checked against rlfuse's before it is timed."""
    monkeypatch.setattr(bench, "measure_copy_bandwidth", lambda device: 10e9)
    args = _args("--op", "linear_distill", "--device", "cpu", "--tokens", "32", "--vocab", "48", "--hidden-dim", "8",
                 "--dtype", "fp32", "--repeats", "1", "--warmup", "1", "--backends", "cpu", "--no-compile",
                 "--out", str(tmp_path))
    assert bench.run(args) == 0
    out = capsys.readouterr().out.splitlines()
    assert "N=32 D=8 V=48  |  cpu: " in out[0]
    contenders = ["rlfuse cpu LinearLogits", "rlfuse cpu materialised", "torch eager"]
    if importlib.util.find_spec("liger_kernel"):
        contenders.append("liger fused-linear jsd")
    rows = out[5:5 + len(contenders)]
    assert [r.split("  ")[0].strip() for r in rows] == contenders
    assert all(" fp32 " in r and "error" not in r and "invalid" not in r for r in rows)
    if "liger fused-linear jsd" in contenders:
        assert "loss = rlfuse LinearLogits's" in rows[-1]
