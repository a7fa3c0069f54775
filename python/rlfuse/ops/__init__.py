"""Vocabulary-sized ops, each declared once with torch.library and implemented per backend."""

# Importing the modules registers the rlfuse:: ops.
from . import distill, generator, kl_div, policy_loss, row_topk, sample, token_logprobs, troll  # noqa: F401
