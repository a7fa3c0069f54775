"""Plain-PyTorch implementations written from docs/SPEC.md: the test oracle and the ``torch`` backend."""

from .adaptive_clip import (
    ClipBounds,
    bapo_search,
    cpgd_drift,
    cpgd_term,
    dcpo_bounds,
    entropy_ratio,
    erc_keep,
    hapo_bounds,
    hapo_entropy_scores,
)
from .distill import jsd_gradients, jsd_reference, jsd_statistics, sampled_kl_terms, sparse_kl_terms
from .kl_div import kl_divergence_reference, kl_gradients, kl_statistics
from . import mixed_policy  # CHORD, LUFFY, EMPG, Lp-Reg (docs/SPEC.md section 11)
from .policy_loss import (
    aggregation_weights,
    clip_cov_term,
    entropy_minority_mask,
    gmpo_loss,
    gspo_loss,
    gspo_token_term,
    kl_cov_term,
    kl_importance_weights,
    kl_term,
    m2po_mask,
    mismatch_metrics,
    off_policy_sequence_mask,
    penalty_terms,
    policy_term,
    prob_trust_region_mask,
    prob_trust_region_violations,
    ratio,
    rollout_correction_weights,
    rollout_rejection_mask,
    rollout_weight_batch_mean,
    segment_sum,
    token_loss,
    topr_weights,
    weighted,
)
from .sampling import sample_reference
from .token_logprobs import row_gradient, row_statistics, token_logprobs_reference

__all__ = [
    "token_logprobs_reference", "row_statistics", "row_gradient", "kl_divergence_reference", "kl_statistics",
    "kl_gradients", "aggregation_weights", "clip_cov_term",
    "entropy_minority_mask", "gmpo_loss", "gspo_loss", "gspo_token_term", "kl_cov_term", "kl_term",
    "penalty_terms", "policy_term", "ratio", "rollout_correction_weights", "segment_sum", "token_loss", "weighted", "sample_reference",
    "jsd_reference", "jsd_statistics", "jsd_gradients", "sparse_kl_terms", "sampled_kl_terms",
    "kl_importance_weights", "mismatch_metrics", "off_policy_sequence_mask", "rollout_rejection_mask",
    "rollout_weight_batch_mean", "m2po_mask", "prob_trust_region_mask", "prob_trust_region_violations",
    "topr_weights", "ClipBounds", "bapo_search", "cpgd_drift", "cpgd_term", "dcpo_bounds", "entropy_ratio",
    "erc_keep", "hapo_bounds", "hapo_entropy_scores",
]
