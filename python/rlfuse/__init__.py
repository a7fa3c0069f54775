"""rlfuse: fused RL losses and sampling for language models.

See README.md for the API; SPEC.md (shared design docs) for the math every backend computes.
"""

from __future__ import annotations

__version__ = "0.1.0"

from . import ops  # noqa: F401  (registers the torch.library ops)
from .backends import available_backends
from .functional import entropy, token_logprobs

__all__ = ["__version__", "token_logprobs", "entropy", "available_backends"]
