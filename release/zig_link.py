#!/usr/bin/env python3
"""Linker launcher for RLFUSE_GLIBC release builds (see release/portable_link.cmake).

CMake runs it as the CXX_LINKER_LAUNCHER of rlfuse._C:

    python zig_link.py --glibc 2.28 --shim glibc_compat.c --exports exports.map -- c++ <link args>

and it reruns that link with ``zig cc -target <arch>-linux-gnu.<glibc>`` instead of the host
driver: the objects (g++/nvcc output), the CUDA static runtime and gcc's own libstdc++.a are linked
against zig's glibc stubs of that version, so every glibc symbol the module needs carries a version
<= <glibc>. Unwinding comes from zig's static libunwind (gcc 12's libgcc_eh.a calls
_dl_find_object, glibc 2.35), glibc_compat.c defines the few newer glibc symbols libstdc++.a
references, and the version script exports only PyInit__C. ``zig c++`` is not used: its libc++ is
not ABI-compatible with objects compiled by g++/nvcc against libstdc++.

The linked module is then checked with release/check_so.py (when pyelftools is importable).
``--probe`` prints the zig version and exits (used by CMake at configure time).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

# Host-driver flags that zig must not see: LTO (zig's linker cannot read GCC LTO objects), the
# host C++ runtime (replaced by libstdc++.a + libunwind below), linker selection.
DROP_EXACT = {
    "-static-libstdc++", "-static-libgcc", "-lstdc++", "-lgcc_s", "-lgcc", "-lgcc_eh",
    "-fno-fat-lto-objects", "-fuse-linker-plugin", "-pthread", "-rdynamic",
}
DROP_PREFIX = ("-flto", "-fuse-ld=")
SYSTEM_LIBS = ["-lm", "-lpthread", "-ldl", "-lrt"]


def zig_command() -> list[str]:
    """The zig executable: the `ziglang` package's, else a `zig` on PATH."""
    try:
        import ziglang  # noqa: PLC0415

        exe = Path(ziglang.__file__).parent / ("zig.exe" if os.name == "nt" else "zig")
        if exe.is_file():
            return [str(exe)]
        return [sys.executable, "-m", "ziglang"]
    except ImportError:
        found = shutil.which("zig")
        if found:
            return [found]
    raise SystemExit("zig_link.py: zig not found: pip install ziglang (release/requirements.txt)")


def zig_target(glibc: str) -> str:
    machine = platform.machine().lower()
    arch = {"amd64": "x86_64", "x86_64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}.get(machine)
    if arch is None:
        raise SystemExit(f"zig_link.py: unsupported machine {machine!r}")
    return f"{arch}-linux-gnu.{glibc}"


def gcc_archive(driver: str, name: str) -> str:
    out = subprocess.run([driver, f"-print-file-name={name}"], capture_output=True, text=True, check=True).stdout.strip()
    if not os.path.isabs(out) or not os.path.isfile(out):
        raise SystemExit(f"zig_link.py: {driver} has no {name} (got {out!r}); install the static libstdc++ "
                         "(Debian/Ubuntu: libstdc++-<ver>-dev, RHEL: libstdc++-static)")
    return out


def output_of(args: list[str]) -> str | None:
    for i, arg in enumerate(args):
        if arg == "-o" and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("-o") and len(arg) > 2:
            return arg[2:]
    return None


def main(argv: list[str]) -> int:
    if "--" in argv:
        split = argv.index("--")
        own, link = argv[:split], argv[split + 1:]
    else:
        own, link = argv, []
    parser = argparse.ArgumentParser(prog="zig_link.py")
    parser.add_argument("--probe", action="store_true", help="print zig's version and exit")
    parser.add_argument("--glibc", default="2.28")
    parser.add_argument("--shim", help="C file compiled into the link (glibc_compat.c)")
    parser.add_argument("--exports", help="linker version script")
    parser.add_argument("--no-check", action="store_true", help="skip check_so.py after linking")
    opts = parser.parse_args(own)
    zig = zig_command()
    if opts.probe:
        print("zig " + subprocess.run([*zig, "version"], capture_output=True, text=True, check=True).stdout.strip())
        return 0
    if not link:
        parser.error("missing `-- <driver> <link args>`")
    driver, args = link[0], link[1:]

    kept = [a for a in args if a not in DROP_EXACT and not a.startswith(DROP_PREFIX)
            and not (a.startswith("-L") and not os.path.isdir(a[2:]))]  # zig warns about missing dirs
    command = [*zig, "cc", "-target", zig_target(opts.glibc), *kept]
    if opts.shim:
        # Compiled by zig for the target glibc; explicit flags so zig's Debug defaults (UBSan) stay off.
        command += ["-O2", "-fno-sanitize=all", opts.shim]
    # libgcc.a before zig's compiler_rt: its cpuinfo.o initialises __cpu_model/__cpu_features2 for
    # g++'s __builtin_cpu_supports (compiler_rt's copy leaves them zero: the AVX2 kernels would never
    # be picked). Its other helpers are the same ABI as compiler_rt's.
    command += [gcc_archive(driver, "libstdc++.a"), gcc_archive(driver, "libgcc.a"), "-lunwind"]
    if opts.exports:
        command.append(f"-Wl,--version-script={opts.exports}")
    command += SYSTEM_LIBS
    if os.environ.get("RLFUSE_LINK_VERBOSE"):
        print("zig_link.py:", " ".join(command), file=sys.stderr)
    result = subprocess.run(command)
    if result.returncode != 0:
        print("zig_link.py: link failed:\n  " + " ".join(command), file=sys.stderr)
        return result.returncode

    target = output_of(args)
    if target and not opts.no_check:
        sys.path.insert(0, str(Path(__file__).parent))
        try:
            import check_so  # noqa: PLC0415
        except ImportError:
            return 0
        try:
            problems = check_so.check_file(target, glibc=opts.glibc)
        except check_so.MissingTool as exc:
            print(f"zig_link.py: not checking {target}: {exc}", file=sys.stderr)
            return 0
        if problems:
            print(f"zig_link.py: {target} is not portable:\n  " + "\n  ".join(problems), file=sys.stderr)
            os.unlink(target)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
