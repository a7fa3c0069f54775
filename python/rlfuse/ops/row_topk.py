"""``rlfuse::row_topk``: each row's k largest scaled logits with the row statistics, in one pass.

No gradient: TROLL and ``sparse_logprobs`` use it to choose a sparse support; values on the support
are gathered again (differentiably) by the caller. ``temperatures`` (optional, float64, one per row):
per-row T (``temperature`` then unused; the kernels get fp32(1 / T) as ``inv_temps``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import reference
from .._layout import as_rows
from ._fake import ROW, out_op, per_row
from ._launch import inv_temps, kernels, reference_temperature


def _torch_row_topk(logits, tokens, temperature, k):
    x = reference.token_logprobs._scaled(logits, temperature).float()
    vocab = x.shape[-1]
    # Stable descending sort: ties keep the lower id first, as the kernels do.
    values, ids = torch.sort(x, dim=-1, descending=True, stable=True)
    values, ids = values[..., :k].contiguous(), ids[..., :k].to(torch.int32)  # contiguous, as the fake
    if k > vocab:
        pad = list(x.shape[:-1]) + [k - vocab]
        values = torch.cat([values, values.new_full(pad, float("-inf"))], -1)
        ids = torch.cat([ids, ids.new_full(pad, -1)], -1)
    ids = torch.where(values > float("-inf"), ids, torch.full_like(ids, -1))
    logp, entropy, lse = reference.row_statistics(logits, tokens, temperature)
    return ids, values, logp, entropy, lse


@out_op("rlfuse::row_topk", per_row("k", torch.int32), per_row("k"), ROW, ROW, ROW)
def row_topk(logits: Tensor, tokens: Tensor, temperature: float, k: int, backend: str,
             temperatures: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    if backend == "torch":
        return _torch_row_topk(logits, tokens, reference_temperature(temperature, temperatures), k)
    rows_view, layout = as_rows(logits)
    lead = logits.shape[:-1]
    ids = torch.empty(*lead, k, dtype=torch.int32, device=logits.device)
    values = torch.empty(*lead, k, dtype=torch.float32, device=logits.device)
    logp, entropy, lse = (torch.empty(lead, dtype=torch.float32, device=logits.device) for _ in range(3))
    if layout[0] > 0:
        kernels(backend, "row_topk").row_topk(
            logits=rows_view, layout=layout, vocab=logits.shape[-1],
            tokens=tokens.reshape(-1).to(torch.int64).contiguous(), inv_temp=1.0 / temperature, k=k, ids=ids,
            values=values, logp=logp, entropy=entropy, lse=lse, inv_temps=inv_temps(temperatures),
        )
    return ids, values, logp, entropy, lse
