#!/usr/bin/env python3
"""Checks that rlfuse's compiled module (a .so, or every .so inside a wheel) runs on old distributions.

    python release/check_so.py [--glibc 2.28] FILE.so|FILE.whl ...

Fails (exit 1, one line per problem) when the module
  - needs a shared library other than glibc's own (libc, libm, libdl, librt, libpthread, the
    loader): no libstdc++/libgcc_s, no libtorch/libc10, no libcuda/libcudart;
  - needs a glibc symbol version newer than --glibc;
  - has an undefined, non-weak symbol without a version that is not Python's C API. auditwheel
    does not see these (it reads version requirements only), but the dynamic loader of an older
    glibc refuses to load the module when the symbol does not exist there (zig's glibc stubs leave
    symbols that are newer than the target glibc exactly like this);
  - exports anything but PyInit_* (a static C++ runtime must stay private to the module);
  - carries an RPATH/RUNPATH.
Uses pyelftools (installed with auditwheel).
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import zipfile
from pathlib import Path

ALLOWED_NEEDED = re.compile(
    r"^(libc\.so\.6|libm\.so\.6|libdl\.so\.2|librt\.so\.1|libpthread\.so\.0|"
    r"ld-linux-x86-64\.so\.2|ld-linux-aarch64\.so\.1)$")
PYTHON_API = re.compile(r"^_?Py")


class MissingTool(RuntimeError):
    pass


def _version_tuple(name: str) -> tuple[int, ...]:
    return tuple(int(x) for x in name.split("_", 1)[1].split("."))


def inspect(path: str | Path) -> dict:
    """NEEDED entries, RPATH/RUNPATH, undefined symbols (name, weak, version) and exported names."""
    try:
        from elftools.elf.elffile import ELFFile  # noqa: PLC0415
    except ImportError as exc:
        raise MissingTool("pyelftools is not installed (pip install pyelftools, or auditwheel)") from exc
    with open(path, "rb") as f:
        elf = ELFFile(f)
        dynamic = elf.get_section_by_name(".dynamic")
        needed, rpaths = [], []
        for tag in dynamic.iter_tags() if dynamic else []:
            if tag.entry.d_tag == "DT_NEEDED":
                needed.append(tag.needed)
            elif tag.entry.d_tag in ("DT_RPATH", "DT_RUNPATH"):
                rpaths.append(getattr(tag, "rpath", None) or getattr(tag, "runpath", ""))
        version_names: dict[int, str] = {}
        verneed = elf.get_section_by_name(".gnu.version_r")
        if verneed is not None:
            for _, auxiliaries in verneed.iter_versions():
                for aux in auxiliaries:
                    version_names[aux["vna_other"]] = aux.name
        versym = elf.get_section_by_name(".gnu.version")
        dynsym = elf.get_section_by_name(".dynsym")
        undefined, exported = [], []
        for i, sym in enumerate(dynsym.iter_symbols() if dynsym else []):
            if not sym.name:
                continue
            bind = sym["st_info"]["bind"]
            if sym["st_shndx"] == "SHN_UNDEF":
                version = None
                if versym is not None:
                    ndx = versym.get_symbol(i)["ndx"]
                    if isinstance(ndx, int):
                        version = version_names.get(ndx & 0x7FFF)
                undefined.append((sym.name, bind == "STB_WEAK", version))
            elif bind in ("STB_GLOBAL", "STB_WEAK", "STB_GNU_UNIQUE") and sym["st_other"]["visibility"] in (
                    "STV_DEFAULT", "STV_PROTECTED"):
                exported.append(sym.name)
    return {"needed": needed, "rpaths": rpaths, "undefined": undefined, "exported": exported,
            "glibc_versions": sorted({v for v in version_names.values() if v.startswith("GLIBC_2")},
                                     key=_version_tuple)}


def check_file(path: str | Path, glibc: str | None = "2.28") -> list[str]:
    info = inspect(path)
    name = Path(path).name
    problems = [f"{name}: needs {lib}" for lib in info["needed"] if not ALLOWED_NEEDED.match(lib)]
    problems += [f"{name}: has RPATH/RUNPATH {r}" for r in info["rpaths"]]
    if glibc:
        limit = tuple(int(x) for x in glibc.split("."))
        too_new = [v for v in info["glibc_versions"] if _version_tuple(v) > limit]
        if too_new:
            syms = sorted({s for s, _, v in info["undefined"] if v in too_new})
            problems.append(f"{name}: needs {', '.join(too_new)} > GLIBC_{glibc} ({', '.join(syms)})")
    unresolved = sorted(s for s, weak, v in info["undefined"] if not weak and v is None and not PYTHON_API.match(s))
    if unresolved:
        problems.append(f"{name}: undefined symbols without a version (missing from the target glibc, or "
                        f"never defined): {', '.join(unresolved)}")
    extra = sorted(s for s in info["exported"] if not s.startswith("PyInit_"))
    if extra:
        shown = ", ".join(extra[:10]) + (f" and {len(extra) - 10} more" if len(extra) > 10 else "")
        problems.append(f"{name}: exports {shown} (only PyInit_* should be visible)")
    return problems


def check_wheel(path: str | Path, glibc: str | None = "2.28") -> tuple[list[str], list[str]]:
    """(the .so members checked, problems)."""
    problems, members = [], []
    with zipfile.ZipFile(path) as wheel, tempfile.TemporaryDirectory() as tmp:
        for member in wheel.namelist():
            if member.endswith(".so") or ".so." in member:
                members.append(member)
                problems += check_file(wheel.extract(member, tmp), glibc)
    if not members:
        problems.append(f"{Path(path).name}: no compiled module inside")
    return members, problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--glibc", default="2.28", help="newest glibc symbol version allowed ('' for any)")
    parser.add_argument("files", nargs="+")
    args = parser.parse_args(argv)
    failed = False
    for file in args.files:
        if file.endswith(".whl"):
            members, problems = check_wheel(file, args.glibc or None)
        else:
            members, problems = [file], check_file(file, args.glibc or None)
        for member in members:
            info = inspect_member(file, member) if file.endswith(".whl") else inspect(member)
            newest = info["glibc_versions"][-1] if info["glibc_versions"] else "none"
            print(f"{Path(file).name}: {member}: needs {', '.join(info['needed'])}; newest glibc symbol {newest}")
        for problem in problems:
            print(f"PROBLEM {problem}")
        failed |= bool(problems)
    return 1 if failed else 0


def inspect_member(wheel_path: str, member: str) -> dict:
    with zipfile.ZipFile(wheel_path) as wheel, tempfile.TemporaryDirectory() as tmp:
        return inspect(wheel.extract(member, tmp))


if __name__ == "__main__":
    sys.exit(main())
