"""Fused TROLL (schema.h TrollArgs, docs/SPEC.md section 7): work in progress, the Python layer
routes Triton to the PyTorch composition (python/rlfuse/troll.py) until ``IMPLEMENTED``."""

IMPLEMENTED = False
AOT_KERNELS = []


def troll(logits, layout, vocab, tokens, inv_temp, advantages, old_logp, ref_logp, policy_weight, weight, params,
          old_ids, old_logprobs, old_k, k, threshold, eps, alpha, loss, logp, entropy, eta, kl_before, kl_after,
          support, grad_logits, grad_layout):
    raise NotImplementedError("the Triton TROLL kernel is not implemented yet")
