"""Smoke test of a built wheel (`make wheel`, release/build_wheel.py; `make sdist` for a CPU one).

The wheel is $RLFUSE_WHEEL, else the newest dist/rlfuse*.whl; without one the module is skipped.
It is installed with --no-deps into a fresh virtual environment that reuses this interpreter's
packages (torch, triton) and imported from outside the source tree. Checks:
  - the CPU backend against a float64 torch computation (values and gradient), and a C++ exception
    through the module's own (static) C++ runtime;
  - `rlfuse info` names the compiled CUDA architectures;
  - cuobjdump (the one shipped in the triton package) lists SASS for sm_80, sm_90a, sm_100a and PTX
    for compute_100 inside the installed binary ($RLFUSE_WHEEL_SASS / $RLFUSE_WHEEL_PTX override);
  - release wheels (manylinux tag): tag manylinux_2_28 or older, no shared library but glibc's, no
    glibc symbol newer than 2.28, nothing exported but PyInit_* (release/check_so.py); < 100 MB.
CUDA checks apply to wheels built with CUDA (local version +cuNN, or a module with CUDA kernels).
"""

from __future__ import annotations

import json
import os
import re
import site
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "release"))
import build_wheel  # noqa: E402  (the release tools: one way to find cuobjdump)
EXPECTED_SASS = os.environ.get("RLFUSE_WHEEL_SASS", "sm_80 sm_90a sm_100a").split()
EXPECTED_PTX = os.environ.get("RLFUSE_WHEEL_PTX", "compute_100").split()
EXPECTED_INFO_ARCHS = ["80-real", "90a-real", "100a-real", "100-virtual"]
MAX_WHEEL_MB = 100


def find_wheel() -> Path | None:
    explicit = os.environ.get("RLFUSE_WHEEL")
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            pytest.fail(f"RLFUSE_WHEEL={explicit} does not exist")
        return path
    wheels = sorted((REPO / "dist").glob("rlfuse*.whl"), key=lambda p: p.stat().st_mtime)
    return wheels[-1] if wheels else None


WHEEL = find_wheel()
pytestmark = pytest.mark.skipif(
    WHEEL is None, reason="no wheel to test: set RLFUSE_WHEEL or build one into dist/ (make wheel, make sdist)")


def wheel_version(wheel: Path) -> str:
    return wheel.name.split("-")[1]


def platform_tags(wheel: Path) -> list[str]:
    return wheel.name[: -len(".whl")].split("-")[-1].split(".")


CHECK_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import torch
    import rlfuse
    import rlfuse._C as C

    out = {"rlfuse": rlfuse.__file__, "ext": C.__file__, "cwd": os.getcwd(), "version": rlfuse.__version__,
           "cuda_compiled": bool(C.cuda_compiled), "cuda_archs": C.cuda_archs, "cpu_isa": C.cpu_isa()}
    g = torch.Generator().manual_seed(0)
    full = torch.randn(3, 18, 1000, generator=g) * 3
    logits = full[:, :-1]                      # a strided view, read in place
    tokens = torch.randint(0, 1000, (3, 17), generator=g)
    x = logits.clone().requires_grad_()
    logp, ent = rlfuse.token_logprobs(x, tokens, return_entropy=True, backend="cpu")
    (logp.sum() + 0.5 * ent.sum()).backward()
    xr = logits.double().requires_grad_()
    ref = torch.log_softmax(xr, -1)
    ref_logp = ref.gather(-1, tokens[..., None])[..., 0]
    ref_ent = -(ref.exp() * ref).sum(-1)
    (ref_logp.sum() + 0.5 * ref_ent.sum()).backward()
    out["logp_err"] = (logp.double() - ref_logp).abs().max().item()
    out["entropy_err"] = (ent.double() - ref_ent).abs().max().item()
    out["grad_err"] = (x.grad.double() - xr.grad).abs().max().item()
    # A C++ exception thrown and caught inside the module (static libstdc++ + unwinder).
    out["cxx_exception"] = None
    if hasattr(C, "policy_loss_fused_cpu"):
        try:
            C.policy_loss_fused_cpu(1, 2)
        except Exception as exc:
            out["cxx_exception"] = f"{type(exc).__name__}: {exc}"
    print("RESULT " + json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv python, venv bin dir, results of CHECK_SCRIPT) for WHEEL installed in a fresh venv."""
    python_tag = f"cp{sys.version_info[0]}{sys.version_info[1]}"
    if python_tag not in WHEEL.name.split("-")[-3].split("."):
        pytest.skip(f"{WHEEL.name} is not for this interpreter ({python_tag})")
    root = tmp_path_factory.mktemp("wheel-venv")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    vpy = venv / "bin" / "python"
    # Reuse this interpreter's packages (torch, triton, numpy) without installing them again: a .pth
    # appends its site-packages after the venv's own, so the wheel's rlfuse comes first (a .pth in
    # an appended directory is not executed, so an editable rlfuse there stays inactive).
    own = subprocess.run([str(vpy), "-c", "import site; print(site.getsitepackages()[0])"],
                         capture_output=True, text=True, check=True).stdout.strip()
    parents = [p for p in site.getsitepackages() if Path(p).is_dir() and Path(p) != Path(own)]
    (Path(own) / "_rlfuse_test_parent_env.pth").write_text("\n".join(parents) + "\n")
    subprocess.run([str(vpy), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(WHEEL)], check=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    run = subprocess.run([str(vpy), "-c", CHECK_SCRIPT], cwd=root, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, f"importing the installed wheel failed:\n{run.stdout}\n{run.stderr}"
    line = next(l for l in run.stdout.splitlines() if l.startswith("RESULT "))
    return vpy, venv / "bin", json.loads(line[len("RESULT "):]), env, root


def is_cuda_wheel(results: dict) -> bool:
    return "+cu" in wheel_version(WHEEL) or results["cuda_compiled"]


def test_imports_installed_copy(installed):
    vpy, _, results, _, root = installed
    venv = vpy.parents[1]
    assert Path(results["rlfuse"]).is_relative_to(venv), results["rlfuse"]
    assert Path(results["ext"]).is_relative_to(venv), results["ext"]
    assert not Path(results["rlfuse"]).is_relative_to(REPO)
    assert Path(results["cwd"]) == root


def test_cpu_backend_matches_torch(installed):
    results = installed[2]
    assert results["logp_err"] < 1e-4, results
    assert results["entropy_err"] < 1e-4, results
    assert results["grad_err"] < 1e-5, results


def test_cxx_exceptions_cross_the_static_runtime(installed):
    results = installed[2]
    if results["cxx_exception"] is None:
        pytest.skip("rlfuse._C.policy_loss_fused_cpu is gone: no binding known to throw")
    assert results["cxx_exception"].startswith("ValueError"), results["cxx_exception"]


@pytest.fixture(scope="module")
def binary_archs(installed):
    """{"sass": {arch: cubin count}, "ptx": {compute_NN}} read by cuobjdump from the installed module,
    independently of what the module says about itself."""
    results = installed[2]
    if not is_cuda_wheel(results):
        pytest.skip(f"{WHEEL.name} is a CPU-only wheel")
    tool = build_wheel.cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump (install triton, or a CUDA toolkit)")
    so = results["ext"]
    elf = subprocess.run([tool, "--list-elf", so], capture_output=True, text=True, check=True).stdout
    ptx = subprocess.run([tool, "--list-ptx", so], capture_output=True, text=True, check=True).stdout
    print(elf, ptx, sep="\n")
    sass: dict[str, int] = {}
    for arch in re.findall(r"\.(sm_\d+[a-z]?)\.cubin", elf):
        sass[arch] = sass.get(arch, 0) + 1
    virtual = {a.replace("sm_", "compute_") for a in re.findall(r"\.(sm_\d+[a-z]?)\.ptx", ptx)}
    return {"sass": sass, "ptx": virtual}


def test_binary_holds_release_architectures(binary_archs):
    sass, virtual = binary_archs["sass"], binary_archs["ptx"]
    assert set(sass) == set(EXPECTED_SASS), f"SASS {sorted(sass)}, expected {EXPECTED_SASS}"
    assert virtual == set(EXPECTED_PTX), f"PTX {sorted(virtual)}, expected {EXPECTED_PTX}"
    # Every CUDA translation unit carries code for every architecture.
    assert len(set(sass.values())) == 1, f"uneven SASS per architecture: {sass}"


def test_cli_info_lists_architectures(installed, request):
    _, bindir, results, env, root = installed
    run = subprocess.run([str(bindir / "rlfuse"), "info"], cwd=root, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    print(run.stdout)
    if not is_cuda_wheel(results):
        assert not results["cuda_compiled"]
        assert "CUDA kernels: not built" in run.stdout, run.stdout
        return
    assert results["cuda_compiled"], "a +cu wheel without CUDA kernels"
    line = next((l for l in run.stdout.splitlines() if l.startswith("CUDA kernels: built for ")), None)
    assert line is not None, f"`rlfuse info` names no CUDA architectures:\n{run.stdout}"
    listed = set(line[len("CUDA kernels: built for "):].replace(" ", "").split(","))
    assert listed == set(EXPECTED_INFO_ARCHS), f"`rlfuse info` lists {sorted(listed)}, expected {EXPECTED_INFO_ARCHS}"
    # What `rlfuse info` claims must be what the binary holds (cuobjdump's reading).
    binary = request.getfixturevalue("binary_archs")
    from_binary = {a[len("sm_"):] + "-real" for a in binary["sass"]}
    from_binary |= {a[len("compute_"):] + "-virtual" for a in binary["ptx"]}
    assert listed == from_binary, f"`rlfuse info` lists {sorted(listed)}, the binary holds {sorted(from_binary)}"


def release_wheel_or_skip() -> None:
    if not any(t.startswith("manylinux") for t in platform_tags(WHEEL)):
        pytest.skip(f"{WHEEL.name} is not a release wheel (no manylinux tag)")


def test_manylinux_tag_and_size():
    release_wheel_or_skip()
    for tag in platform_tags(WHEEL):
        match = re.fullmatch(r"manylinux_(\d+)_(\d+)_(x86_64|aarch64)", tag) or re.fullmatch(r"manylinux2014_\w+", tag)
        assert match, f"unexpected platform tag {tag}"
        if match.re.pattern.startswith("manylinux_"):
            assert (int(match.group(1)), int(match.group(2))) <= (2, 28), tag
    size_mb = WHEEL.stat().st_size / 2**20
    assert size_mb < MAX_WHEEL_MB, f"{WHEEL.name}: {size_mb:.1f} MiB"


def test_binary_needs_only_old_glibc():
    release_wheel_or_skip()
    pytest.importorskip("elftools", reason="pyelftools not installed (pip install -r release/requirements.txt)")
    sys.path.insert(0, str(REPO / "release"))
    try:
        import check_so
    finally:
        sys.path.remove(str(REPO / "release"))
    members, problems = check_so.check_wheel(WHEEL, glibc="2.28")
    assert members
    assert not problems, "\n".join(problems)
    with zipfile.ZipFile(WHEEL) as zf:
        names = zf.namelist()
    assert not [n for n in names if re.search(r"lib(torch|c10|cuda|cudart|stdc\+\+)", n)], names
