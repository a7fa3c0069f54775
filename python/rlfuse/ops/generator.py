"""``rlfuse::generator_draws``: the raw 32-bit draws of a seeded CPU ``torch.Generator``, as an op.

Clip-Cov's seeded pick (docs/SPEC.md section 4) is ``torch.randperm`` on
``torch.Generator().manual_seed(seed)``; ``rlfuse.losses`` reproduces it on the device from these
draws (they do not depend on the data).
An op, so that ``torch.compile`` puts the draw in the graph (a generator cannot be created while
tracing) and the copy to the device is asynchronous (from pinned memory: no synchronisation).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._fake import out_op, per_row


@out_op("rlfuse::generator_draws", per_row("count", torch.int64, like="like"))
def generator_draws(like: Tensor, seed: int, count: int) -> Tensor:
    """The first ``count`` 32-bit draws of ``torch.Generator().manual_seed(seed)`` (int64, on the
    device of ``like``, a 1-element tensor whose value is not read). A full-range int64 ``random_``
    takes two draws per element, the first in the high half."""
    generator = torch.Generator().manual_seed(seed)
    pairs = torch.empty((count + 1) // 2, dtype=torch.int64).random_(-(2**63), None, generator=generator)
    draws = torch.stack([(pairs >> 32) & 0xFFFFFFFF, pairs & 0xFFFFFFFF], -1).reshape(-1)[:count].contiguous()
    if like.device.type == "cuda":  # pinned and asynchronous: a pageable copy would synchronise
        return draws.pin_memory().to(like.device, non_blocking=True)
    return draws.to(like.device)
