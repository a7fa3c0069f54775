"""Launch configurations shared by the kernel launchers and the ahead-of-time check."""

from dataclasses import dataclass, field

import triton

# Vocab chunk per loop iteration. On GPU, 4096 at 8 warps is 16 elements (two 16-byte bf16
# loads) per thread in flight at under 64 registers, so up to 8 blocks fit on an SM. On CPU
# (the interpreter) a smaller chunk still exercises multi-chunk rows at test sizes.
GPU_BLOCK_V = 4096
INTERPRET_BLOCK_V = 1024
MIN_BLOCK_V = 32


def block_config(vocab, on_gpu, block_v=None):
    """(BLOCK_V, num_warps) for a kernel that loops over one row of ``vocab`` entries."""
    if block_v is None:
        cap = GPU_BLOCK_V if on_gpu else INTERPRET_BLOCK_V
        block_v = min(max(triton.next_power_of_2(vocab), MIN_BLOCK_V), cap)
    # About 8 elements per thread (a 16-byte bf16 load), at most 8 warps.
    num_warps = min(max(block_v // 256, 1), 8)
    return block_v, num_warps


@dataclass(frozen=True)
class AotKernel:
    """One specialisation of a kernel to compile ahead of time (see aot.py).

    ``signature`` maps every argument name to a Triton type ("*bf16", "i32", "fp32", ...),
    constexpr arguments to "constexpr" with their value in ``constexprs``. ``aligned`` names
    the arguments a launch usually specialises as multiples of 16 (pointers, strides, vocab).
    """

    name: str
    fn: object
    signature: dict
    constexprs: dict
    num_warps: int
    aligned: tuple = field(default=())
    options: dict = field(default_factory=dict)  # further compile options, as the launch passes them


def optional_rows(values, stand_in):
    """(pointer, given) for an optional [rows] kernel input (_row.py ``_row_or``): a None passes
    ``stand_in``, any tensor of the launch, as a pointer the kernel never reads; ``given`` is the
    kernel's constexpr flag, so a launch without the input compiles its read away."""
    return (stand_in, False) if values is None else (values, True)
