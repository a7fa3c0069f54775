"""Vocabulary-sized ops, each declared once with torch.library and implemented per backend."""

from . import kl_div, policy_loss, row_topk, token_logprobs  # noqa: F401  (registers the rlfuse:: ops)
