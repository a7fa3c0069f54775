"""Row layouts: how kernels address the rows of a ``[..., V]`` tensor without copying it.

Every kernel takes ``layout = (rows, inner, stride_outer, stride_inner)`` (elements): row ``r``
starts at ``(r // inner) * stride_outer + (r % inner) * stride_inner`` from the tensor's data
pointer, and its ``V`` entries are contiguous. Two strides cover contiguous ``[N, V]`` tensors and
views such as ``logits[:, :-1]`` of a ``[B, T, V]`` tensor.
"""

from __future__ import annotations

import math

import torch

Layout = tuple[int, int, int, int]


def _merged_leading_dims(tensor: torch.Tensor) -> list[tuple[int, int]]:
    """(size, stride) of the leading dimensions, size-1 dims dropped and mergeable dims merged."""
    dims = [(s, st) for s, st in zip(tensor.shape[:-1], tensor.stride()[:-1]) if s != 1]
    merged: list[tuple[int, int]] = []
    for size, stride in dims:
        if merged and merged[-1][1] == size * stride:
            outer_size, _ = merged.pop()
            merged.append((outer_size * size, stride))
        else:
            merged.append((size, stride))
    return merged


def row_layout(tensor: torch.Tensor) -> Layout | None:
    """The layout of ``tensor``'s rows, or None when it needs a copy first (last dim strided, or
    more than two non-mergeable leading dimensions)."""
    if tensor.dim() == 0:
        return None
    if tensor.shape[-1] > 1 and tensor.stride(-1) != 1:
        return None
    rows = math.prod(tensor.shape[:-1])
    dims = _merged_leading_dims(tensor)
    if rows == 0 or not dims:
        return (rows, 1, 0, 0)
    if len(dims) == 1:
        (size, stride), = dims
        return (rows, size, 0, stride)
    if len(dims) == 2:
        (outer, outer_stride), (inner, inner_stride) = dims
        return (rows, inner, outer_stride, inner_stride)
    return None


def as_rows(tensor: torch.Tensor) -> tuple[torch.Tensor, Layout]:
    """``tensor`` (or a contiguous copy, only when unavoidable) and its row layout."""
    layout = row_layout(tensor)
    if layout is None:
        tensor = tensor.contiguous()
        layout = row_layout(tensor)
        assert layout is not None
    return tensor, layout


def may_overlap(tensor: torch.Tensor) -> bool:
    """True unless every element of ``tensor`` provably has its own memory: with the dimensions
    sorted by stride, each stride must exceed the farthest offset the smaller ones reach. Expanded
    (stride-0) views overlap; exotic interleaved layouts are conservatively reported too."""
    reach = 0
    for stride, size in sorted((st, s) for s, st in zip(tensor.shape, tensor.stride()) if s > 1):
        if stride <= reach:
            return True
        reach += stride * (size - 1)
    return False


def inplace_layout(tensor: torch.Tensor, what: str = "logits") -> Layout:
    """The row layout of ``tensor`` for writing a gradient into its own memory: its rows must be
    addressable without a copy (a copy would be written, not ``tensor``) and must not share memory
    (one element would receive several rows' gradients). Anything else is a clear error."""
    layout = row_layout(tensor)
    if layout is None:
        raise ValueError(
            f"inplace_backward=True needs {what} whose last dimension is contiguous and whose leading "
            f"dimensions collapse to at most two strides (got shape {tuple(tensor.shape)}, strides "
            f"{tuple(tensor.stride())}); pass {what}.contiguous() or use inplace_backward=False"
        )
    if may_overlap(tensor):
        raise ValueError(
            f"inplace_backward=True cannot write into {what} whose elements share memory (an expanded "
            f"or overlapping view: shape {tuple(tensor.shape)}, strides {tuple(tensor.stride())}); "
            f"use inplace_backward=False"
        )
    return layout


def gradient_layouts(logits: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, Layout, Layout]:
    """(rows to read, their layout, the gradient's layout) for a kernel that reads ``logits`` and
    writes ``grad``: in place (``grad is logits``) through the logits' own layout (inplace_layout's
    rules), otherwise into a fresh contiguous ``[rows, V]`` gradient."""
    if grad is logits:
        layout = inplace_layout(logits)
        return logits, layout, layout
    rows_view, layout = as_rows(logits)
    return rows_view, layout, contiguous_layout(layout[0], logits.shape[-1])


def contiguous_layout(rows: int, vocab: int) -> Layout:
    return (rows, max(rows, 1), 0, vocab)
