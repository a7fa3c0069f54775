"""Launch configurations and argument helpers shared by the kernel launchers, and the entries of
the ahead-of-time check (aot.py)."""

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


def pair_block_config(vocab, on_gpu, block_v=None):
    """block_config's (BLOCK_V, num_warps) for a two-row kernel (kl_div, distill), the GPU chunk
    halved: a chunk loads two rows, so each thread keeps as many bytes in flight as a one-row chunk."""
    block, num_warps = block_config(vocab, on_gpu, block_v)
    if block_v is None and on_gpu:
        block = max(block // 2, MIN_BLOCK_V)
    return block, num_warps


def optional_rows(values, stand_in):
    """(pointer, given) for an optional [rows] kernel input (_row.py ``_row_or``): a None passes
    ``stand_in``, any tensor of the launch, as a pointer the kernel never reads; ``given`` is the
    kernel's constexpr flag, so a launch without the input compiles its read away."""
    return (stand_in, False) if values is None else (values, True)


def pair_forward(kernel, logits, layout, other, other_layout, vocab, inv_temp, op_scalar, outputs, inv_temps,
                 block_v):
    """Launches a two-row forward (kl_div, distill) with arguments (logits, other, *outputs,
    inv_temps, both layouts but their rows, vocab, inv_temp, op_scalar); ``outputs[0]`` stands in
    for missing ``inv_temps``."""
    rows = layout[0]
    assert other_layout[0] == rows, "layout and other_layout must describe the same rows"
    if rows == 0:
        return
    inv_temps, has_row_temp = optional_rows(inv_temps, outputs[0])
    block, num_warps = pair_block_config(vocab, logits.device.type != "cpu", block_v)
    kernel[(rows,)](
        logits, other, *outputs, inv_temps, *layout[1:], *other_layout[1:], vocab, float(inv_temp), op_scalar,
        BLOCK_V=block, VEC=min(16 // logits.element_size(), block), HAS_ROW_TEMP=has_row_temp, num_warps=num_warps,
    )


def pair_backward(kernel, logits, layout, other, other_layout, vocab, inv_temp, op_scalar, inputs, grad_logits,
                  grad_layout, grad_other, grad_other_layout, inv_temps, block_v, inv_temps_last=False):
    """Launches a two-row backward with arguments (logits, other, *inputs, grad_logits, grad_other,
    inv_temps, the four layouts but their rows, vocab, inv_temp, op_scalar), ``inv_temps`` last
    instead with ``inv_temps_last``. A skipped gradient (None, its layout ignored) gets its input as
    a stand-in the kernel never writes; ``inputs[0]`` stands in for missing ``inv_temps``."""
    grad_x, grad_y = grad_logits is not None, grad_other is not None
    if not grad_x:
        grad_logits, grad_layout = logits, layout
    if not grad_y:
        grad_other, grad_other_layout = other, other_layout
    rows = layout[0]
    assert other_layout[0] == rows, "layout and other_layout must describe the same rows"
    assert grad_layout[0] == rows and grad_other_layout[0] == rows, "gradient layouts must describe the same rows"
    if rows == 0 or not (grad_x or grad_y):
        return
    inv_temps, has_row_temp = optional_rows(inv_temps, inputs[0])
    block, num_warps = pair_block_config(vocab, logits.device.type != "cpu", block_v)
    pointers = (logits, other, *inputs, grad_logits, grad_other)
    layouts = (*layout[1:], *other_layout[1:], *grad_layout[1:], *grad_other_layout[1:])
    scalars = (vocab, float(inv_temp), op_scalar)
    args = (*pointers, *layouts, *scalars, inv_temps) if inv_temps_last else (*pointers, inv_temps, *layouts, *scalars)
    kernel[(rows,)](*args, BLOCK_V=block, GRAD_X=grad_x, GRAD_Y=grad_y, HAS_ROW_TEMP=has_row_temp, num_warps=num_warps)


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


# The vocabulary of the AOT entries (Qwen's): a large one, at the launchers' GPU configuration.
AOT_VOCAB = 151936


def aot_variants(inputs):
    """(tag, dtype, aligned, given) of a row kernel's AOT entries: each load width at aligned
    arguments, bf16 at a vocab like 50257 (scalar loads), and bf16 with its optional per-row
    inputs given (``inputs`` names them in the tag)."""
    for dtype, aligned, given in (("bf16", True, False), ("fp16", True, False), ("fp32", True, False),
                                  ("bf16", False, False), ("bf16", True, True)):
        yield (dtype if aligned else f"{dtype},unaligned") + (f",{inputs}" if given else ""), dtype, aligned, given


def vec_width(dtype):
    """VEC of a launch: the elements of one 16-byte load of ``dtype`` ("bf16", "fp16", "fp32")."""
    return 16 // {"bf16": 2, "fp16": 2, "fp32": 4}[dtype]


def layout_signature(*prefixes):
    """The Triton types of the row layouts ``<prefix>inner, <prefix>stride_outer, <prefix>stride_inner``."""
    return {f"{prefix}{name}": kind for prefix in prefixes
            for name, kind in (("inner", "i32"), ("stride_outer", "i64"), ("stride_inner", "i32"))}


def aot_kernel(name, fn, signature, dtype, aligned, num_warps, constexprs, extra_aligned=(), options=None):
    """The AotKernel of ``fn`` for logits of ``dtype``: "{dtype}" in ``signature`` filled in (tuple
    types kept), and with ``aligned`` what a launch usually specialises as multiples of 16 (pointers,
    strides, vocab and ``extra_aligned``); without it, a vocab like 50257."""
    if aligned:
        aligned = tuple(k for k, v in signature.items() if isinstance(v, str) and v.startswith("*")) + tuple(
            k for k in signature if k.endswith(("stride_outer", "stride_inner"))) + ("vocab",) + tuple(extra_aligned)
    return AotKernel(name=name, fn=fn, constexprs=constexprs, num_warps=num_warps, aligned=aligned or (),
                     signature={k: v if isinstance(v, tuple) else v.format(dtype=dtype) for k, v in signature.items()},
                     options=options or {})


def pair_aot_kernels(op, fwd_fn, fwd_signature, bwd_fn, bwd_signature):
    """AOT entries of a two-row op (kl_div, jsd): its forward, and its backward with the gradient
    on the logits only (frozen reference or teacher) or on both rows (distillation)."""
    block, num_warps = pair_block_config(AOT_VOCAB, on_gpu=True)
    entries = []
    for tag, dtype, aligned, row_temp in aot_variants("inv_temps"):
        entries.append(aot_kernel(f"{op}_fwd[{tag}]", fwd_fn, fwd_signature, dtype, aligned, num_warps,
                                  {"BLOCK_V": block, "VEC": vec_width(dtype), "HAS_ROW_TEMP": row_temp}))
        for grads, grad_y in (("dx", False), ("dx,dy", True)):
            entries.append(aot_kernel(
                f"{op}_bwd[{tag},{grads}]", bwd_fn, bwd_signature, dtype, aligned, num_warps,
                {"BLOCK_V": block, "GRAD_X": True, "GRAD_Y": grad_y, "HAS_ROW_TEMP": row_temp}))
    return entries
