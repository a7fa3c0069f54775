"""One fake implementation for every out-variant op.

An out-variant op allocates its outputs from its arguments' shapes and a kernel fills them, so its
fake (what ``torch.compile`` and ``opcheck`` run on fake tensors) is the allocation alone. Instead of
a hand-written fake per op, each op declares its outputs once::

    @out_op("rlfuse::row_topk", per_row("k", torch.int32), per_row("k"), ROW, ROW, ROW)
    def row_topk(logits, tokens, temperature: float, k: int, backend: str): ...

``out_op`` is ``torch.library.custom_op`` plus ``register_fake`` with a fake built from those
declarations (arguments bound by name). ``opcheck`` (tests/test_torch_library.py) checks that the
real implementation returns the declared shapes, dtypes and devices.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Out:
    """One output, described through the op's argument names.

    ``per_row``: ``like.shape[:-1]`` (one value per row of ``like``), plus a trailing dimension of
    size ``trailing`` (an int argument) if given, with ``dtype``. Otherwise a gradient: ``like``'s
    shape and dtype, contiguous. ``when`` (a bool argument): an empty tensor when it is false.
    """

    like: str = "logits"
    per_row: bool = True
    trailing: str | None = None
    dtype: torch.dtype = torch.float32
    when: str | None = None
    whole: bool = False  # ``like``'s whole shape (a per-token argument), with ``dtype``

    def fake(self, arguments: dict) -> torch.Tensor:
        like = arguments[self.like]
        if self.when is not None and not arguments[self.when]:
            return like.new_empty(0)
        if self.whole:
            return like.new_empty(like.shape, dtype=self.dtype)
        if not self.per_row:
            return torch.empty_like(like, memory_format=torch.contiguous_format)
        trailing = () if self.trailing is None else (arguments[self.trailing],)
        return like.new_empty((*like.shape[:-1], *trailing), dtype=self.dtype)


ROW = Out()  # fp32, one value per row of the logits


def per_row(trailing: str | None = None, dtype: torch.dtype = torch.float32, like: str = "logits") -> Out:
    return Out(like=like, trailing=trailing, dtype=dtype)


def gradient(like: str = "logits", when: str | None = None) -> Out:
    return Out(like=like, per_row=False, when=when)


def per_entry(like: str, dtype: torch.dtype = torch.float32) -> Out:
    """One value per entry of the per-token argument ``like`` (its shape)."""
    return Out(like=like, whole=True, dtype=dtype)


def out_op(name: str, *outputs: Out, mutates_args=(), schema: str | None = None):
    """``torch.library.custom_op(name)`` whose fake allocates ``outputs`` (none: returns None; one:
    that tensor; several: a tuple). ``schema``: an explicit op schema (keyword-only arguments from
    ``rlfuse._schema``), else inferred from ``fn``'s annotations."""

    def declare(fn):
        op = torch.library.custom_op(name, mutates_args=mutates_args, schema=schema)(fn)
        signature = inspect.signature(fn)

        def fake(*args, **kwargs):
            arguments = signature.bind(*args, **kwargs).arguments
            made = tuple(out.fake(arguments) for out in outputs)
            if not made:
                return None
            return made[0] if len(made) == 1 else made

        op.register_fake(fake)
        return op

    return declare
