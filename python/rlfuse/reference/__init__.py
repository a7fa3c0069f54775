"""Plain-PyTorch implementations written from SPEC.md: the test oracle and the ``torch`` backend."""

from .token_logprobs import row_gradient, row_statistics, token_logprobs_reference

__all__ = ["token_logprobs_reference", "row_statistics", "row_gradient"]
