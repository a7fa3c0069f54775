"""Ahead-of-time nvcc build of the CUDA kernels (no GPU needed).

Compiles every csrc/cuda/*.cu to a cubin for each release architecture, prints the ptxas resource
report (visible with ``pytest -s``) and fails on compiler warnings, register spills, stack frames
or local memory: all of them cost bandwidth in kernels that must stream at memory speed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).parents[1]
CUDA_SOURCES = sorted((REPO / "csrc" / "cuda").glob("*.cu"))
ARCHS = ("sm_80", "sm_90a", "sm_100a")
NVCC_FLAGS = ("-std=c++17", "-O3", "-I", str(REPO / "csrc" / "include"), "--resource-usage")


def find_nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.is_file() and os.access(default, os.X_OK) else None


@dataclass
class KernelUsage:
    name: str
    registers: int = -1
    stack: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    local: int = 0
    shared: int = 0

    def problems(self) -> list[str]:
        found = []
        if self.spill_stores or self.spill_loads:
            found.append(f"spills ({self.spill_stores} B stores, {self.spill_loads} B loads)")
        if self.stack:
            found.append(f"{self.stack} B stack frame")
        if self.local:
            found.append(f"{self.local} B local memory")
        return found


_FUNCTION = re.compile(r"(?:Compiling entry function '([^']+)'|Function properties for (\S+))")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_LMEM = re.compile(r"(\d+) bytes lmem")
_SMEM = re.compile(r"(\d+) bytes smem")


def parse_resource_usage(report: str) -> list[KernelUsage]:
    """Parses ptxas's per-function report (the --resource-usage / -Xptxas -v format)."""
    kernels: dict[str, KernelUsage] = {}
    current: KernelUsage | None = None
    for line in report.splitlines():
        if match := _FUNCTION.search(line):
            name = match.group(1) or match.group(2)
            current = kernels.setdefault(name, KernelUsage(name))
            continue
        if current is None:
            continue
        if match := _FRAME.search(line):
            current.stack, current.spill_stores, current.spill_loads = map(int, match.groups())
        if match := _USED.search(line):
            current.registers = int(match.group(1))
        if match := _LMEM.search(line):
            current.local = int(match.group(1))
        if match := _SMEM.search(line):
            current.shared = int(match.group(1))
    return list(kernels.values())


def demangle(names: list[str]) -> dict[str, str]:
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt or not names:
        return {name: name for name in names}
    result = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True)
    pretty = result.stdout.splitlines()
    if result.returncode != 0 or len(pretty) != len(names):
        return {name: name for name in names}
    # Drop the anonymous namespace and argument list: "rlfuse::kernel<T, 512>".
    short = [re.sub(r"\(anonymous namespace\)::|\(.*\)$", "", p) for p in pretty]
    return dict(zip(names, short))


def compile_cubin(nvcc: str, source: Path, arch: str, out_dir: Path) -> tuple[int, str]:
    cubin = out_dir / f"{source.stem}.{arch}.cubin"
    command = [nvcc, *NVCC_FLAGS, f"--gpu-architecture={arch}", "-cubin", str(source)]
    command += ["-o", str(cubin)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    return result.returncode, result.stdout + result.stderr


def test_cuda_kernels_compile_without_spills(tmp_path: Path) -> None:
    nvcc = find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (PATH or /usr/local/cuda/bin/nvcc)")
    assert CUDA_SOURCES, "no csrc/cuda/*.cu sources found"

    jobs = [(source, arch) for arch in ARCHS for source in CUDA_SOURCES]
    with ThreadPoolExecutor(max_workers=len(ARCHS)) as pool:
        results = list(pool.map(lambda job: compile_cubin(nvcc, job[0], job[1], tmp_path), jobs))

    failures: list[str] = []
    rows: list[tuple[str, KernelUsage]] = []
    for (source, arch), (returncode, output) in zip(jobs, results):
        where = f"{source.name} [{arch}]"
        if returncode != 0:
            failures.append(f"{where}: nvcc failed (exit {returncode}):\n{output}")
            continue
        warnings = [line for line in output.splitlines() if "warning" in line.lower()]
        if warnings:
            failures.append(f"{where}: compiler warnings:\n" + "\n".join(warnings))
        for kernel in parse_resource_usage(output):
            rows.append((arch, kernel))
            failures.extend(f"{where} {kernel.name}: {problem}" for problem in kernel.problems())

    names = demangle(sorted({kernel.name for _, kernel in rows}))
    print(f"\nnvcc resource usage ({len(rows)} functions)")
    columns = ("arch", "regs", "spill st/ld", "stack", "lmem", "smem")
    print("{:8} {:>4} {:>11} {:>5} {:>4} {:>5}  function".format(*columns))
    for arch, k in sorted(rows, key=lambda row: (row[0], names[row[1].name])):
        spills = f"{k.spill_stores}/{k.spill_loads}"
        values = (arch, k.registers, spills, k.stack, k.local, k.shared, names[k.name])
        print("{:8} {:>4} {:>11} {:>5} {:>4} {:>5}  {}".format(*values))

    # Guards the parser: an empty report must not pass as "no spills".
    kernels = {arch: sum(a == arch and "kernel" in k.name for a, k in rows) for arch in ARCHS}
    assert all(kernels.values()), f"no kernels found in the ptxas report: {kernels}"
    assert not failures, "\n".join(failures)
