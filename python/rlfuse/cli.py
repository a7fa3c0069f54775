"""The ``rlfuse`` command: ``rlfuse info`` and ``rlfuse bench``."""

from __future__ import annotations

import argparse
import platform
import sys

import torch

import rlfuse
from . import backends


def info_lines() -> list[str]:
    ext = backends.compiled_extension()
    lines = [
        f"rlfuse {rlfuse.__version__}",
        f"python {platform.python_version()}, torch {torch.__version__}",
    ]
    if backends.triton_installed():
        import triton as triton_package

        mode = " (interpreter, TRITON_INTERPRET=1)" if backends.triton_interpreting() else ""
        lines.append(f"triton {triton_package.__version__}{mode}")
    else:
        lines.append("triton: not installed")
    if ext is None:
        lines.append(f"compiled extension rlfuse._C: missing ({backends.extension_import_error()})")
    else:
        lines.append(f"compiled extension rlfuse._C: yes (CPU kernels: {ext.cpu_isa()})")
        if ext.cuda_compiled:
            lines.append(f"CUDA kernels: built for {ext.cuda_archs.replace(',', ', ')}")
        else:
            lines.append("CUDA kernels: not built (no nvcc at build time, or RLFUSE_CUDA=OFF)")
    lines.append(f"CUDA devices visible to torch: {torch.cuda.device_count() if torch.cuda.is_available() else 0}")
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        names = backends.available_backends(device)
        auto = backends.resolve_backend("auto", torch.device(device), "token_logprobs", torch.float32)
        lines.append(f"backends for {device} tensors: {', '.join(names)} (auto -> {auto})")
    lines.append(f"CPU threads: {torch.get_num_threads()}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rlfuse", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="what was built and what is available")
    from . import bench

    bench.add_arguments(commands.add_parser("bench", help="microbenchmarks vs torch eager / torch.compile"))
    args = parser.parse_args(argv)
    if args.command == "info":
        print("\n".join(info_lines()))
        return 0
    return bench.run(args)


if __name__ == "__main__":
    sys.exit(main())
