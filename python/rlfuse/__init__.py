"""rlfuse: fused RL losses and sampling for language models.

See README.md for the API; docs/SPEC.md (shared design docs) for the math every backend computes.
"""

from __future__ import annotations

__version__ = "0.1.0"

from . import nn, ops  # noqa: F401  (ops registers the torch.library ops)
from ._validation import set_validation
from .backends import available_backends
from .config import LossConfig
from .functional import entropy, kl_divergence, token_logprobs
from .linear import LinearLogits
from .losses import LossOutput, policy_loss
from .sampling import SampleOutput, sample
from .sharded import ShardedLogits
from .troll import SparseLogprobs, sparse_logprobs

__all__ = ["__version__", "token_logprobs", "entropy", "kl_divergence", "policy_loss", "sparse_logprobs", "SparseLogprobs", "sample", "SampleOutput", "LossConfig", "LossOutput", "nn",
           "LinearLogits", "ShardedLogits",
           "available_backends", "set_validation"]
