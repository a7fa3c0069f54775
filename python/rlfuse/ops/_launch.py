"""Uniform launchers over the compiled (C++/CUDA) kernels of ``rlfuse._C``.

Every kernel of ``rlfuse._schema.KERNELS`` gets one tensor-level launcher per backend, named like
the kernel, whose parameters are the kernel's ``launch_params``: the fields of its argument struct
in order, without ``dtype`` (taken from the logits). The Triton package has the same functions
(``tests/test_schema.py`` checks their signatures). Here each launcher turns tensors into addresses
and calls ``rlfuse._C.<kernel>_cpu`` / ``_cuda`` with every field as a keyword argument: the
bindings fill the C++ struct by name, so no argument list is written out twice.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import types

import torch

from .. import _schema
from .._layout import as_rows, contiguous_layout
from ..backends import compiled_extension

DTYPE_TAGS = {getattr(torch, name): tag for name, tag in _schema.DTYPE.items()}
HUGE_PAGE_MIN_BYTES = 32 << 20


def empty_gradient(like: torch.Tensor) -> torch.Tensor:
    """A contiguous, uninitialised gradient buffer with the shape, dtype and device of ``like``."""
    return empty_buffer(like.shape, like.dtype, like.device)


def empty_buffer(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A contiguous, uninitialised buffer. On CPU a large one is advised to use transparent huge
    pages before its first write: a fresh [N, V] buffer otherwise faults in 4 KiB at a time, which
    costs about as much as the kernel (measured on a 2-core VM: 256 MiB took ~100 ms to fault in,
    35 ms advised, the fused loss ~60 ms)."""
    buffer = torch.empty(shape, dtype=dtype, device=device)
    ext = compiled_extension()
    if ext is not None and buffer.device.type == "cpu" and buffer.nbytes >= HUGE_PAGE_MIN_BYTES:
        ext.advise_huge_pages(buffer.data_ptr(), buffer.nbytes)
    return buffer


def split_temperature(temperature) -> tuple[float, torch.Tensor | None]:
    """``(temperature, temperatures)`` op arguments of a validated temperature: a float gives
    ``(T, None)``; a per-token float64 tensor (``_validation.check_temperature``) ``(1.0, tensor)``,
    the scalar then unused."""
    if isinstance(temperature, torch.Tensor):
        return 1.0, temperature
    return temperature, None


def reference_temperature(temperature: float, temperatures: torch.Tensor | None):
    """The torch backend's temperature (``rlfuse.reference`` takes a number or one value per row):
    the per-row float64 tensor when given, else the number."""
    return temperature if temperatures is None else temperatures


def inv_temps(temperatures: torch.Tensor | None) -> torch.Tensor | None:
    """The kernels' per-row ``inv_temps``: fp32(1 / T) from the float64 T, as the scalar path's
    ``inv_temp = 1.0 / T`` is rounded once to fp32 (so a constant tensor gives the scalar's bits)."""
    if temperatures is None:
        return None
    return torch.reciprocal(temperatures.reshape(-1).to(torch.float64)).to(torch.float32).contiguous()


def rows_f32(values: torch.Tensor | None) -> torch.Tensor | None:
    """An optional per-row input as the kernels take it: flat contiguous fp32."""
    return None if values is None else values.reshape(-1).to(torch.float32).contiguous()


def pair_rows_forward(logits: torch.Tensor, other: torch.Tensor, outputs: tuple[str, ...], launch) -> tuple:
    """The two-row ops' forward (KL, JSD): one fp32 per-row result per name in ``outputs``;
    ``launch(**args)`` gets the rows of both inputs and the results' buffers by those names (not
    called for no rows)."""
    x, layout = as_rows(logits)
    y, other_layout = as_rows(other)
    outs = {name: torch.empty(logits.shape[:-1], dtype=torch.float32, device=logits.device) for name in outputs}
    if layout[0] > 0:
        launch(logits=x, layout=layout, other=y, other_layout=other_layout, vocab=logits.shape[-1], **outs)
    return tuple(outs.values())


def pair_rows_backward(logits: torch.Tensor, other: torch.Tensor, need_logits: bool, need_other: bool,
                       row_values: dict, launch) -> tuple[torch.Tensor, torch.Tensor]:
    """The two-row ops' backward (KL, JSD): ``launch(**args)`` gets the rows of both inputs, the
    per-row ``row_values`` flattened to fp32 and the requested gradients' buffers (None otherwise);
    a gradient that is not needed comes back empty."""
    x, layout = as_rows(logits)
    y, other_layout = as_rows(other)
    rows, vocab = layout[0], logits.shape[-1]
    grad_x = empty_gradient(logits) if need_logits else None
    grad_y = empty_gradient(other) if need_other else None
    if rows > 0 and (need_logits or need_other):
        grad_layout = contiguous_layout(rows, vocab)
        launch(logits=x, layout=layout, other=y, other_layout=other_layout, vocab=vocab,
               **{name: t.reshape(-1).float().contiguous() for name, t in row_values.items()},
               grad_logits=grad_x, grad_layout=grad_layout, grad_other=grad_y, grad_other_layout=grad_layout)
    empty = logits.new_empty(0)
    return (grad_x if need_logits else empty, grad_y if need_other else empty)


def _converter(field: _schema.Field):
    """value -> what the binding takes for ``field`` (pointers as int addresses, 0 for None)."""
    if field.ctype in _schema.POINTER_TYPES:
        return lambda value: 0 if value is None else value.data_ptr()
    if field.ctype == "DType":
        return lambda tensor: DTYPE_TAGS[tensor.dtype]
    if field.ctype == "RowLayout":
        return tuple
    if field.ctype in _schema.SCALAR_TYPES:
        return float if field.ctype in ("float", "double") else int
    nested = [(f.name, _converter(f)) for f in _schema.struct(field.ctype).fields]  # e.g. TokenLossParams

    def convert(value):
        get = value.__getitem__ if isinstance(value, dict) else functools.partial(getattr, value)
        return {name: conv(get(name)) for name, conv in nested}

    return convert


@functools.cache
def _plan(kernel: str):
    spec = _schema.KERNELS[kernel]
    optional = {f.param: None for f in spec.args.fields if f.optional}
    return spec.launch_params, optional, [(f.name, f.derived or f.param, _converter(f)) for f in spec.args.fields]


def kernel_fields(kernel: str, *args, **kwargs) -> dict:
    """The keyword arguments of ``rlfuse._C.<kernel>_*`` for a launcher call ``(*args, **kwargs)``."""
    params, optional, plan = _plan(kernel)
    if len(args) > len(params):
        raise TypeError(f"{kernel}() takes {len(params)} arguments ({', '.join(params)}), got {len(args)}")
    bound = dict(zip(params, args))
    for name, value in kwargs.items():
        if name not in params:
            raise TypeError(f"{kernel}() got an unexpected argument {name!r}")
        if name in bound:
            raise TypeError(f"{kernel}() got multiple values for argument {name!r}")
        bound[name] = value
    bound = {**optional, **bound}  # optional pointers default to null
    if len(bound) != len(params):
        raise TypeError(f"{kernel}() missing arguments: {', '.join(p for p in params if p not in bound)}")
    return {name: convert(bound[source]) for name, source, convert in plan}


def _launcher(kernel: str, suffix: str, launch_name: str, launch_value, device_guard):
    entry = getattr(compiled_extension(), f"{kernel}_{suffix}")

    def launch(*args, **kwargs):
        fields = kernel_fields(kernel, *args, **kwargs)
        logits = args[0] if args else kwargs["logits"]
        with device_guard(logits):
            entry(**fields, **{launch_name: launch_value(logits)})

    launch.__name__ = launch.__qualname__ = kernel
    launch.__doc__ = f"{kernel}({', '.join(_schema.KERNELS[kernel].launch_params)}) on rlfuse._C.{kernel}_{suffix}"
    return launch


def _nullcontext(tensor):
    return contextlib.nullcontext()


def _cpu_launchers():
    return types.SimpleNamespace(**{
        name: _launcher(name, "cpu", "num_threads", lambda tensor: torch.get_num_threads(), _nullcontext)
        for name in _schema.KERNELS
    })


def _cuda_launchers():
    def stream(tensor):
        return torch.cuda.current_stream(tensor.device).cuda_stream

    def device_guard(tensor):
        return torch.cuda.device(tensor.device)

    return types.SimpleNamespace(**{
        name: _launcher(name, "cuda", "stream", stream, device_guard) for name in _schema.KERNELS
    })


@functools.cache
def _compiled_launchers(backend: str):
    return _cpu_launchers() if backend == "cpu" else _cuda_launchers()


def kernels(backend: str, op: str):
    """The launchers of ``op`` on a kernel backend ("cpu", "cuda" or "triton")."""
    if backend in ("cpu", "cuda"):
        return _compiled_launchers(backend)
    if backend == "triton":
        return importlib.import_module(f"rlfuse.triton_kernels.{op}")
    raise ValueError(f"no kernels for backend {backend!r}")
