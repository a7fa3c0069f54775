"""Logits sources: what every public op accepts in place of a ``[..., V]`` logits tensor.

A source stands for logits that are never stored whole: ``rlfuse.LinearLogits`` (hidden states and
the lm_head weight, made a chunk of tokens at a time) and ``rlfuse.ShardedLogits`` (each rank holds
a slice of the vocabulary). The public functions (``token_logprobs``, ``entropy``,
``kl_divergence``, ``sparse_logprobs``, ``sample``, ``policy_loss``) validate their arguments as for a
tensor, from the source's tensor-like metadata, and hand the row work to the source's methods
below. A source implements each method with the same kernels as the tensor path
(docs/ARCHITECTURE.md, "Logits sources"); the methods are not a second public API.
"""

from __future__ import annotations

import torch
from torch import Tensor


class LogitsSource:
    """Base class of the logits sources. Subclasses provide ``shape`` (the logits' shape, global
    vocabulary last), ``dtype`` (the dtype the logits are made in now), ``device`` and the methods."""

    shape: torch.Size
    device: torch.device
    fused_path = False  # whether _fused_policy_loss exists (else policy_loss takes the general path)

    @property
    def dtype(self) -> torch.dtype:
        raise NotImplementedError

    def compute_dtype(self) -> torch.dtype:
        """The dtype the logits are made in now (LinearLogits: the autocast dtype under autocast)."""
        return self.dtype

    @property
    def vocab(self) -> int:
        return self.shape[-1]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def dim(self) -> int:
        return len(self.shape)

    @property
    def requires_grad(self) -> bool:
        raise NotImplementedError

    def detach(self) -> "LogitsSource":
        """The same logits with no gradient path."""
        raise NotImplementedError

    # --- the row work of each public op; arguments already validated by the public function ----

    def _token_logprobs(self, tokens: Tensor, temperature: float, backend: str, mask: Tensor | None = None
                        ) -> tuple[Tensor, Tensor]:
        """(logp, entropy), fp32 of the tokens' shape, differentiable. ``mask`` (the tokens' shape or
        flat, nonzero = valid): masked positions may be skipped; they then read 0 with zero gradient."""
        raise NotImplementedError

    def _kl_divergence(self, other, direction: str, temperature: float, backend: str,
                       mask: Tensor | None = None) -> Tensor:
        """Per-row KL between ``self`` and ``other`` (a tensor or a source of the same kind).
        ``mask``: rows that may be skipped (the public function zeroes them afterwards)."""
        raise NotImplementedError

    def _sparse_logprobs(self, tokens: Tensor, k: int, threshold: float, temperature: float, backend: str):
        raise NotImplementedError

    def _sample(self, **kwargs):
        """``rlfuse.sample``'s keyword arguments, unchanged."""
        raise NotImplementedError

    def _fused_policy_loss(self, tokens: Tensor, per_token, temperature: float, params, backend: str,
                           valid: Tensor | None):
        """The fused path of ``policy_loss`` (``FusedPolicyLoss``'s contract); called only when the
        class sets ``fused_path = True``."""
        raise NotImplementedError

    def _troll_token_loss(self, tokens, advantages, old_logprobs, old_topk, config, backend, valid_tokens,
                          temperature=None):
        """``troll.troll_token_loss`` on this source."""
        raise NotImplementedError


def is_source(value) -> bool:
    return isinstance(value, LogitsSource)
