"""Ahead-of-time compile of every Triton kernel for the release GPUs, no GPU needed.

Each registry entry (``AOT_KERNELS`` of the modules in ``KERNEL_MODULES``) is compiled for
sm_80, sm_90 and sm_100 and its cubin is read with the ``cuobjdump`` shipped inside the triton
package: registers, stack, shared and local memory per kernel. STACK or LOCAL > 0 means spills.

Must run in a process without ``TRITON_INTERPRET=1`` (under the interpreter ``@triton.jit``
builds no compilable kernels). From a checkout: ``python triton_kernels/aot.py [--json FILE]``;
installed: ``python -m rlfuse.triton_kernels.aot [--json FILE]``. Exit status 1 on any spill.
"""

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile

KERNEL_MODULES = ("token_logprobs", "policy_loss", "kl_div", "row_topk", "sample", "distill", "troll")
ARCHS = (80, 90, 100)


def registry():
    """All AotKernel entries of all kernel modules."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("aot needs a process without TRITON_INTERPRET=1")
    entries = []
    for name in KERNEL_MODULES:
        entries += importlib.import_module(f"{__package__}.{name}").AOT_KERNELS
    return entries


def _cuobjdump():
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def resource_usage(cubin_path):
    """{kernel name: {"REG": n, "STACK": n, "SHARED": n, "LOCAL": n, ...}} of one cubin."""
    out = subprocess.run([_cuobjdump(), "--dump-resource-usage", cubin_path],
                         check=True, capture_output=True, text=True).stdout
    usage, kernel = {}, None
    for line in out.splitlines():
        match = re.match(r"\s*Function (\S+):", line)
        if match:
            kernel = match.group(1)
        elif kernel and "REG:" in line:
            usage[kernel] = {k: int(v) for k, v in re.findall(r"([A-Z]+(?:\[\d+\])?):(\d+)", line)}
            kernel = None
    return usage


def compile_entry(entry, arch, workdir):
    """Compiles one AotKernel for sm_<arch>; returns a flat dict of its resource usage."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    arg_index = {name: i for i, name in enumerate(entry.fn.arg_names)}
    attrs = {(arg_index[name],): [["tt.divisibility", 16]] for name in entry.aligned}
    src = ASTSource(fn=entry.fn, signature=entry.signature, constexprs=entry.constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": entry.num_warps, **entry.options})
    path = os.path.join(workdir, f"{re.sub(r'[^A-Za-z0-9_]', '_', entry.name)}_sm{arch}.cubin")
    with open(path, "wb") as f:
        f.write(compiled.asm["cubin"])
    (usage,) = resource_usage(path).values()  # one kernel per cubin
    return {
        "kernel": entry.name, "arch": f"sm_{arch}", "num_warps": entry.num_warps,
        "constexprs": dict(entry.constexprs),
        "regs": usage["REG"], "stack": usage["STACK"], "shared": usage["SHARED"],
        "local": usage["LOCAL"],
        # Shared memory Triton requests at launch (reduction scratch), on top of SHARED.
        "dynamic_shared": compiled.metadata.shared,
    }


def compile_all(archs=ARCHS):
    """Resource usage of every registry entry on every arch (a list of dicts)."""
    with tempfile.TemporaryDirectory(prefix="rlfuse_aot_") as workdir:
        return [compile_entry(entry, arch, workdir) for entry in registry() for arch in archs]


def spills(results):
    return [r for r in results if r["local"] > 0 or r["stack"] > 0]


def format_table(results):
    width = max([36] + [len(r["kernel"]) for r in results])
    header = (f"{'kernel':{width}s} {'arch':7s} {'warps':>5s} {'regs':>5s} {'stack':>6s} {'shared':>7s}"
              f" {'dyn_shared':>10s} {'local':>6s}")
    rows = [header, "-" * len(header)]
    for r in results:
        rows.append(f"{r['kernel']:{width}s} {r['arch']:7s} {r['num_warps']:5d} {r['regs']:5d} "
                    f"{r['stack']:6d} {r['shared']:7d} {r['dynamic_shared']:10d} {r['local']:6d}")
    return "\n".join(rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--arch", type=int, action="append", help="e.g. 90 (default: 80 90 100)")
    args = parser.parse_args(argv)
    results = compile_all(tuple(args.arch or ARCHS))
    print(format_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    bad = spills(results)
    for r in bad:
        print(f"SPILL: {r['kernel']} {r['arch']}: stack {r['stack']}, local {r['local']}")
    return 1 if bad else 0


def _main_from_checkout():
    # Run as a file: import this folder as a package (under a private name) for relative imports.
    import importlib.util

    pkg_dir = os.path.dirname(os.path.abspath(__file__))
    spec = importlib.util.spec_from_file_location(
        "rlfuse_triton_kernels", os.path.join(pkg_dir, "__init__.py"),
        submodule_search_locations=[pkg_dir])
    package = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = package
    spec.loader.exec_module(package)
    return importlib.import_module(f"{spec.name}.aot").main()


if __name__ == "__main__":
    sys.exit(main() if __package__ else _main_from_checkout())
