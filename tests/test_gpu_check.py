"""bench/gpu_check.sh (``make gpu-check``) without a GPU: the no-GPU run, and the step / budget logic.

The GPU round itself needs a GPU; what can go wrong before one is lent is tested here in a few seconds,
without building anything: the no-GPU run must skip every step, write its summary and exit 0, and with
stub ``nvidia-smi``, ``compute-sanitizer`` and python on PATH (which make the script believe a GPU is
there) the steps must run in priority order with the right commands, a step that no longer fits the
budget must be recorded as "skipped for time", and a failing or timed-out step must make the exit
status non-zero.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).parents[1]
SCRIPT = REPO / "bench" / "gpu_check.sh"
STEPS = ["build", "info", "tests-gpu", "memcheck", "bench-policy_loss", "bench-token_logprobs",
         "bench-sample", "bench-troll", "bench-linear_policy_loss", "racecheck", "initcheck", "synccheck",
         "tests-rest", "bench-kl", "bench-distill"]
LINE = re.compile(r"^(\S+)\s+(.+?)\s+(\d+)\s+(\d+)$")

# Stub python: logs each call (cwd, tool, the build environment, arguments) one per line, answers the GPU
# probe (the only `-c` call before the build) with a fake device, and can be made slow or failing.
STUB_PYTHON = r"""#!/usr/bin/env bash
call="${STUB_TOOL:+[$STUB_TOOL] }$*"
printf '%s|%s|%s|%s|%s\n' "$PWD" "${RLFUSE_CUDA_ARCHS:-}" "${CMAKE_BUILD_PARALLEL_LEVEL:-}" \
  "${TRITON_INTERPRET:-}" "${call//$'\n'/ }" >>"$STUB_LOG"
if [[ -n ${STUB_SLOW:-} && $call == *"$STUB_SLOW"* ]]; then sleep "${STUB_SLEEP_S:-3}"; fi
if [[ -n ${STUB_FAIL:-} && $call == *"$STUB_FAIL"* ]]; then echo "stub: failing on purpose" >&2; exit 3; fi
if [[ $1 == -c ]]; then
  if [[ -n ${STUB_NO_CUDA:-} ]]; then echo "torch.cuda.is_available() is False (torch stub)" >&2; exit 1; fi
  printf 'NVIDIA Stub GPU\t%s\t%s\n' "${STUB_MAJOR:-9}" "${STUB_MINOR:-0}"
fi
exit 0
"""
STUB_NVIDIA_SMI = """#!/usr/bin/env bash
echo "GPU 0: NVIDIA Stub GPU (UUID: GPU-00000000)"
"""
# Stub compute-sanitizer: drops its --options and runs the program, telling it which tool it is under.
STUB_SANITIZER = """#!/usr/bin/env bash
tool=""
while [[ $1 == --* ]]; do [[ $1 == --tool ]] && tool=$2; shift 2; done
STUB_TOOL=$tool exec "$@"
"""


def nvidia_gpu_present() -> bool:
    try:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def run_check(python: str, results: Path, path_prefix: Path | None = None, **env: str):
    """Runs the script; returns (exit status, {step: status} in summary order, summary text, output)."""
    full_env = {k: v for k, v in os.environ.items()
                if not k.startswith(("RLFUSE_GPU_", "RLFUSE_CUDA_ARCHS", "STUB_"))}
    full_env.update(RLFUSE_RESULTS=str(results), TRITON_INTERPRET="1", **env)
    if path_prefix is not None:
        full_env["PATH"] = f"{path_prefix}{os.pathsep}{full_env['PATH']}"
    proc = subprocess.run(["bash", str(SCRIPT), python], env=full_env, capture_output=True, text=True,
                          timeout=120)
    output = proc.stdout + proc.stderr
    summary_file = results / "summary.txt"
    assert summary_file.is_file(), f"no summary.txt; output:\n{output}"
    summary = summary_file.read_text()
    statuses = {}
    for line in summary.splitlines():
        match = LINE.match(line)
        if match and match.group(1) in STEPS:
            statuses[match.group(1)] = match.group(2)
    return proc.returncode, statuses, summary, output


@pytest.fixture
def stubs(tmp_path: Path):
    """A folder of stub commands that make the script see a compute capability 9.0 GPU."""
    folder = tmp_path / "stubs"
    folder.mkdir()
    for name, text in [("python", STUB_PYTHON), ("nvidia-smi", STUB_NVIDIA_SMI),
                       ("compute-sanitizer", STUB_SANITIZER)]:
        path = folder / name
        path.write_text(text)
        path.chmod(0o755)
    return folder


def stub_calls(tmp_path: Path) -> list[dict]:
    log = tmp_path / "calls.log"
    calls = []
    for line in log.read_text().splitlines() if log.exists() else []:
        cwd, archs, jobs, interpret, args = line.split("|", 4)
        calls.append(dict(cwd=cwd, archs=archs, jobs=jobs, interpret=interpret, args=args))
    return calls


def run_stubbed(tmp_path: Path, stubs: Path, **env: str):
    return run_check(str(stubs / "python"), tmp_path / "results", stubs, STUB_LOG=str(tmp_path / "calls.log"),
                     **env)


def test_no_gpu_skips_every_step_and_exits_0(tmp_path: Path):
    if nvidia_gpu_present():
        pytest.skip("a GPU is present: the script would run the real GPU round")
    results = tmp_path / "results"
    rc, statuses, summary, output = run_check(sys.executable, results)
    assert rc == 0, output
    assert list(statuses) == STEPS, summary
    assert all(status == "skipped (no GPU)" for status in statuses.values()), summary
    assert "no GPU (nvidia-smi missing or failing)" in summary
    assert re.search(r"^total \d+ s of the 480 s budget; 0 step\(s\) failed; exit status 0$", summary, re.M)
    # No step ran, so no step left a log.
    assert sorted(p.name for p in results.iterdir()) == ["env.txt", "nvidia-smi.txt", "probe.log", "summary.txt"]
    assert summary.strip() in output  # the summary is also printed at the end


def test_torch_without_cuda_counts_as_no_gpu(tmp_path: Path, stubs: Path):
    rc, statuses, summary, output = run_stubbed(tmp_path, stubs, STUB_NO_CUDA="1")
    assert rc == 0, output
    assert set(statuses.values()) == {"skipped (no GPU)"}, summary
    assert "torch.cuda.is_available() is False" in summary
    assert not any("pip install" in c["args"] for c in stub_calls(tmp_path))


def test_fake_gpu_runs_every_step_in_priority_order(tmp_path: Path, stubs: Path):
    rc, statuses, summary, output = run_stubbed(tmp_path, stubs)
    assert rc == 0, output
    assert list(statuses) == STEPS and set(statuses.values()) == {"ok"}, summary
    assert "NVIDIA Stub GPU (compute capability 9.0; building 90a-real)" in summary
    calls = stub_calls(tmp_path)
    assert all(c["interpret"] == "" for c in calls), "TRITON_INTERPRET must be unset on the GPU"
    build = next(c for c in calls if "pip install" in c["args"])
    nproc = subprocess.run(["nproc"], capture_output=True, text=True, check=True).stdout.strip()
    assert build["archs"] == "90a-real" and build["jobs"] == nproc  # every core
    for flag in ("--no-index", "--no-build-isolation", "--no-deps"):
        assert flag in build["args"]
    pytest_calls = [c for c in calls if "-m pytest" in c["args"]]
    assert [c["cwd"] for c in pytest_calls] == [str(REPO / "tests")] * 2  # the installed package
    assert "-m gpu" in pytest_calls[0]["args"] and "-m not gpu" in pytest_calls[1]["args"]
    benches = [re.search(r"--op (\S+)", c["args"]).group(1) for c in calls if "rlfuse.cli bench" in c["args"]]
    assert benches == ["policy_loss", "token_logprobs", "sample", "troll", "linear_policy_loss", "kl", "distill"]
    tools = [c["args"].split("]")[0][1:] for c in calls if c["args"].startswith("[")]
    assert tools == ["memcheck", "racecheck", "initcheck", "synccheck"]
    assert all(c["args"].endswith("bench/sanitize_cuda.py") for c in calls if c["args"].startswith("["))
    for step in STEPS:  # every step leaves its log
        assert (tmp_path / "results" / f"{step}.log").is_file()


@pytest.mark.parametrize("capability, archs", [(("8", "0"), "80-real"), (("8", "6"), "86-real"),
                                                (("10", "0"), "100a-real")])
def test_builds_only_the_local_architecture(tmp_path: Path, stubs: Path, capability, archs):
    rc, _, summary, output = run_stubbed(tmp_path, stubs, STUB_MAJOR=capability[0], STUB_MINOR=capability[1],
                                         RLFUSE_GPU_STEPS="build")
    assert rc == 0, output
    assert f"building {archs}" in summary
    assert [c["archs"] for c in stub_calls(tmp_path) if "pip install" in c["args"]] == [archs]


def test_tiny_budget_skips_every_step_for_time(tmp_path: Path, stubs: Path):
    rc, statuses, summary, output = run_stubbed(tmp_path, stubs, RLFUSE_GPU_BUDGET_S="1")
    assert rc == 0, output  # nothing failed: nothing ran
    assert list(statuses) == STEPS, summary
    assert all(status.startswith("skipped for time") for status in statuses.values()), summary
    assert not any("pip install" in c["args"] for c in stub_calls(tmp_path))


@pytest.mark.parametrize("slow", [False, True])
def test_a_slow_step_leaves_no_time_for_the_next(tmp_path: Path, stubs: Path, slow: bool):
    # Budget 6 s; build 1 s, info 5 s, tests-gpu 4 s; the rest keep their minutes-long limits. tests-gpu
    # fits after a quick info (about 6 s left) but not after one that takes 3 s (about 3 s left).
    env = dict(RLFUSE_GPU_BUDGET_S="6", RLFUSE_GPU_LIMIT_BUILD="1", RLFUSE_GPU_LIMIT_INFO="5",
               RLFUSE_GPU_LIMIT_TESTS_GPU="4")
    if slow:
        env.update(STUB_SLOW="rlfuse.cli info", STUB_SLEEP_S="3")
    rc, statuses, summary, output = run_stubbed(tmp_path, stubs, **env)
    assert rc == 0, output
    assert statuses["build"] == "ok" and statuses["info"] == "ok", summary
    if slow:
        assert statuses["tests-gpu"].startswith("skipped for time (needs 4 s"), summary
    else:
        assert statuses["tests-gpu"] == "ok", summary
    assert all(statuses[s].startswith("skipped for time") for s in STEPS[3:]), summary


def test_failures_and_timeouts_make_the_exit_status_1(tmp_path: Path, stubs: Path):
    rc, statuses, summary, output = run_stubbed(
        tmp_path, stubs, STUB_FAIL="[memcheck]", STUB_SLOW="rlfuse.cli info", STUB_SLEEP_S="5",
        RLFUSE_GPU_LIMIT_INFO="1")
    assert rc == 1, output
    assert statuses["memcheck"] == "FAILED (exit 3)", summary
    assert statuses["info"] == "FAILED (timed out)", summary
    assert statuses["racecheck"] == "ok" and statuses["bench-kl"] == "ok", summary  # the round goes on
    assert "2 step(s) failed; exit status 1" in summary
    assert "failing on purpose" in (tmp_path / "results" / "memcheck.log").read_text()


def test_failed_build_skips_the_steps_that_need_it(tmp_path: Path, stubs: Path):
    rc, statuses, summary, output = run_stubbed(tmp_path, stubs, STUB_FAIL="pip install")
    assert rc == 1, output
    assert statuses["build"] == "FAILED (exit 3)", summary
    assert all(statuses[s] == "skipped (build not ok)" for s in STEPS[1:]), summary


def test_selected_steps_only(tmp_path: Path, stubs: Path):
    rc, statuses, summary, output = run_stubbed(tmp_path, stubs, RLFUSE_GPU_STEPS="racecheck,bench-kl")
    assert rc == 0, output
    assert {s for s, status in statuses.items() if status == "ok"} == {"racecheck", "bench-kl"}, summary
    assert all(statuses[s] == "skipped (not selected)" for s in STEPS if s not in ("racecheck", "bench-kl"))


def test_no_compute_sanitizer_is_reported_not_failed(tmp_path: Path, stubs: Path):
    (stubs / "compute-sanitizer").unlink()
    if Path("/usr/local/cuda/bin/compute-sanitizer").exists():
        pytest.skip("/usr/local/cuda/bin/compute-sanitizer exists here")
    clean_path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep)
                                 if not (Path(p) / "compute-sanitizer").exists())
    rc, statuses, summary, output = run_check(str(stubs / "python"), tmp_path / "results", stubs,
                                              STUB_LOG=str(tmp_path / "calls.log"), PATH=clean_path)
    assert rc == 0, output
    for tool in ("memcheck", "racecheck", "initcheck", "synccheck"):
        assert statuses[tool] == "skipped (no compute-sanitizer)", summary
    assert statuses["bench-kl"] == "ok", summary
