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


def contiguous_layout(rows: int, vocab: int) -> Layout:
    return (rows, max(rows, 1), 0, vocab)
