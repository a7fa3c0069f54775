"""``torch.nn`` wrappers of the functional API."""

from __future__ import annotations

import torch

from .config import LossConfig
from .losses import LossOutput, policy_loss


class PolicyLoss(torch.nn.Module):
    """``policy_loss`` with a fixed ``LossConfig`` (and backend / in-place choice) as a module."""

    def __init__(self, config: LossConfig | None = None, backend: str = "auto", inplace_backward: bool = False):
        super().__init__()
        self.config = LossConfig.dapo() if config is None else config
        self.backend = backend
        self.inplace_backward = inplace_backward

    def forward(self, logits, tokens, advantages, **kwargs) -> LossOutput:
        kwargs.setdefault("backend", self.backend)
        kwargs.setdefault("inplace_backward", self.inplace_backward)
        return policy_loss(logits, tokens, advantages, config=self.config, **kwargs)

    def extra_repr(self) -> str:
        return f"config={self.config}"
