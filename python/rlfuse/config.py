"""``LossConfig``: every knob of the policy-loss family (docs/SPEC.md sections 3-7), with presets."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from . import _schema
from ._validation import MAX_TEMPERATURE, MIN_TEMPERATURE, TEMPERATURE_RANGE

# The token-local losses, KL estimators and CISPO modes are the kernels' enums (rlfuse._schema).
TOKEN_LOCAL_LOSSES = _schema.POLICY_KIND.names
POLICY_LOSSES = TOKEN_LOCAL_LOSSES + ("gspo", "gspo_token", "gmpo", "clip_cov", "kl_cov", "troll", "topr")
# Fused although not a kernel enum: the kernel's REINFORCE term times a detached per-token weight that
# depends on the current log-probs (computed by a no-grad pre-pass, docs/SPEC.md section 4).
DETACHED_WEIGHT_LOSSES = ("topr",)
PPO_CLIP_LOSSES = ("ppo", "gppo", "clip_cov")  # the ones whose ratio takes dual_clip and delta
SEQUENCE_MEAN_LOSSES = ("gspo", "gmpo")  # one term per sequence, averaged over sequences
KL_ESTIMATORS = tuple(name for name in _schema.KL_KIND.names if name != "none")  # kl=None is "none"
CISPO_MODES = _schema.CISPO_MODE.names
ROLLOUT_CORRECTIONS = ("token_truncate", "token_mask", "seq_truncate", "seq_mask", "seq_mask_tis")
# verl's rollout rejection options (rollout_corr_helper.SUPPORTED_ROLLOUT_RS_OPTIONS): divergence of the
# trainer's old log-probs from the inference engine's, per token or per sequence (sum / mean / max).
ROLLOUT_REJECTIONS = ("token_k1", "token_k2", "token_k3", "seq_sum_k1", "seq_sum_k2", "seq_sum_k3", "seq_mean_k1",
                      "seq_mean_k2", "seq_mean_k3", "seq_max_k2", "seq_max_k3")
# rlfuse.distill.KINDS (not imported: the config module imports no kernels)
DISTILL_KINDS = ("jsd", "forward_kl", "reverse_kl", "sparse_kl", "sampled_reverse_kl")
AGGREGATIONS = ("token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


@dataclass(frozen=True)
class LossConfig:
    """Which policy loss, and all its knobs. Field names are public API (docs/ARCHITECTURE.md).

    ``clip_low`` / ``clip_high`` are eps_low / eps_high of the ratio clip (GMPO: in log space; CISPO
    "cap" mode: ``clip_high`` is the cap itself, TRL/Liger's convention). ``dual_clip`` and
    ``delta`` are off when None. ``rollout_correction`` multiplies the policy term only (as verl),
    never the KL or entropy terms. ``kl_full_coef`` adds the full-vocabulary KL to the reference
    policy's logits (``policy_loss(..., ref_logits=...)``) in ``kl_full_direction``, aggregated like
    the other per-token terms (general path). ``distill_coef`` adds a distillation term to a teacher
    (``policy_loss(..., teacher=...)`` or ``teacher_logprobs=``; ``rlfuse.distill``'s ``distill_kind``
    with ``distill_beta`` for the JSD), aggregated like the other per-token terms.

    Off-policy corrections (docs/SPEC.md section 4, "Off-policy corrections"; README "Off-policy
    corrections"): ``rollout_is_batch_normalize`` divides the rollout weights by their batch mean
    (verl); ``rollout_rejection`` / ``rollout_rejection_threshold`` drop tokens or sequences whose
    trainer-vs-engine divergence is out of bounds, in verl's ``rollout_rs`` / ``rollout_rs_threshold``
    syntax (comma-separated options, every one must pass; k1 bounds ``"lower_upper"`` ratios, default
    lower ``1 / upper``); rejected tokens leave the loss and every normaliser, as verl's response
    mask. ``off_policy_mask_threshold`` is DeepSeek-V3.2's off-policy sequence mask (TRL's formula);
    ``kl_bias_correction`` multiplies the KL penalty by the importance ratio to the old policy (TRL /
    Liger ``use_bias_correction_kl``). ``m2po_threshold`` is M2PO's second-moment mask (Zheng et al.
    2025; paper default 0.04, ``LossConfig.m2po()``); ``dppo_mask_low`` / ``dppo_mask_high`` are
    prime-rl's sign-aware probability-difference trust region (DPPO-Binary TV; prime-rl defaults
    0.2 / 0.2, ``LossConfig.dppo()``), ``ipo_threshold`` its symmetric variant (prime-rl's IPO loss,
    default 0.1, ``LossConfig.ipo()``). These masks compare the current policy with the behaviour
    policy (``rollout_logprobs`` when given, else ``old_logprobs``) and multiply the policy term only.
    ``loss="topr"`` is tapered off-policy REINFORCE (Le Roux et al. 2025, ROLL's ``pg_variant="topr"``),
    ``topr_positive_weight`` / ``topr_negative_weight`` ROLL's weights of its two halves.
    """

    loss: str = "ppo"
    clip_low: float | None = 0.2
    clip_high: float = 0.2
    dual_clip: float | None = None
    delta: float | None = None
    cispo_mode: str = "two_sided"
    gppo_beta_low: float = 1.0
    gppo_beta_high: float = 1.0
    sapo_tau_pos: float = 1.0
    sapo_tau_neg: float = 1.05
    pspo_alpha: float = 0.1
    cov_ratio: float = 2e-4
    cov_lb: float = 1.0
    cov_ub: float = 5.0
    kl_cov_coef: float = 1.0
    seed: int = 0
    entropy_quantile: float | None = None
    kl: str | None = None
    kl_coef: float = 0.0
    kl_full_coef: float = 0.0
    kl_full_direction: str = "forward"
    distill_coef: float = 0.0
    distill_kind: str = "reverse_kl"
    distill_beta: float = 0.5
    entropy_coef: float = 0.0
    rollout_correction: str | None = None
    rollout_cap: float = 2.0
    rollout_cap_low: float | None = None
    rollout_is_batch_normalize: bool = False
    rollout_rejection: str | None = None
    rollout_rejection_threshold: str | float | None = None
    off_policy_mask_threshold: float | None = None
    kl_bias_correction: bool = False
    m2po_threshold: float | None = None
    dppo_mask_low: float | None = None
    dppo_mask_high: float | None = None
    ipo_threshold: float | None = None
    topr_positive_weight: float = 1.0
    topr_negative_weight: float = 1.0
    aggregation: str = "token-mean"
    norm_tokens: float | None = None
    norm_length: float | None = None
    temperature: float = 1.0
    troll_eps: float = 0.05
    troll_alpha: float = 1.0
    troll_k: int = 64
    troll_threshold: float = 1e-5

    def __post_init__(self):
        def fail(name, message):
            raise ValueError(f"LossConfig.{name} {message}, got {getattr(self, name)!r}")

        def finite(name, low=None, low_inclusive=True, allow_none=False):
            value = getattr(self, name)
            if value is None and allow_none:
                return
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                fail(name, "must be a finite number")
            if low is not None and (value < low or (value == low and not low_inclusive)):
                fail(name, f"must be {'>=' if low_inclusive else '>'} {low}")

        def choice(name, options, allow_none=False):
            value = getattr(self, name)
            if not (value is None and allow_none) and value not in options:
                fail(name, f"must be one of {options}" + (" or None" if allow_none else ""))

        choice("loss", POLICY_LOSSES)
        choice("cispo_mode", CISPO_MODES)
        choice("kl", KL_ESTIMATORS, allow_none=True)
        choice("rollout_correction", ROLLOUT_CORRECTIONS, allow_none=True)
        choice("aggregation", AGGREGATIONS)
        choice("kl_full_direction", ("forward", "reverse"))
        choice("distill_kind", DISTILL_KINDS)
        if not (isinstance(self.distill_beta, (int, float)) and 0.0 <= self.distill_beta <= 1.0):
            fail("distill_beta", "must be in [0, 1]")
        finite("clip_low", 0.0, allow_none=self.loss == "cispo")
        finite("clip_high", 0.0)
        finite("dual_clip", 1.0, low_inclusive=False, allow_none=True)
        finite("delta", 1.0, low_inclusive=False, allow_none=True)
        for name in ("gppo_beta_low", "gppo_beta_high", "pspo_alpha", "kl_coef", "kl_full_coef", "kl_cov_coef",
                     "cov_lb", "distill_coef"):
            finite(name, 0.0)
        for name in ("sapo_tau_pos", "sapo_tau_neg", "rollout_cap", "temperature", "troll_eps"):
            finite(name, 0.0, low_inclusive=False)
        finite("entropy_coef")
        finite("troll_alpha", 0.0)
        if not MIN_TEMPERATURE <= self.temperature <= MAX_TEMPERATURE:
            fail("temperature", f"must lie in {TEMPERATURE_RANGE} (the kernels scale by 1 / T in fp32)")
        finite("cov_ub", self.cov_lb, low_inclusive=False)
        finite("rollout_cap_low", 0.0, allow_none=True)
        finite("norm_tokens", 0.0, low_inclusive=False, allow_none=True)
        finite("norm_length", 0.0, low_inclusive=False, allow_none=True)
        if not 0.0 < self.cov_ratio <= 1.0:
            fail("cov_ratio", "must be in (0, 1]")
        if self.entropy_quantile is not None and not 0.0 < self.entropy_quantile <= 1.0:
            fail("entropy_quantile", "must be in (0, 1] or None")
        # Knobs a loss would silently ignore are errors, never no-ops.
        if self.loss not in PPO_CLIP_LOSSES and self.dual_clip is not None:
            fail("dual_clip", f"applies to {PPO_CLIP_LOSSES}, not {self.loss!r}")
        if self.loss not in PPO_CLIP_LOSSES and self.delta is not None:
            fail("delta", f"applies to {PPO_CLIP_LOSSES}, not {self.loss!r}")
        if self.loss in SEQUENCE_MEAN_LOSSES:
            if self.aggregation not in ("token-mean", "seq-mean-token-mean"):
                fail("aggregation", f"does not apply to loss={self.loss!r}, which is a mean over sequences")
            if self.rollout_correction is not None:
                fail("rollout_correction", f"is not supported by loss={self.loss!r} (a per-sequence ratio)")
        if self.loss in SEQUENCE_MEAN_LOSSES + ("troll",) and self.entropy_quantile is not None:
            fail("entropy_quantile", f"is not supported by loss={self.loss!r}")
        if self.loss == "spo" and self.clip_high <= 0:
            fail("clip_high", "is SPO's eps and must be > 0")
        if self.loss == "cispo" and self.cispo_mode == "cap" and self.clip_high <= 0:
            fail("clip_high", "is the CISPO cap in 'cap' mode and must be > 0")
        if self.rollout_cap_low is not None and self.rollout_cap_low > self.rollout_cap:
            fail("rollout_cap_low", "must not exceed rollout_cap")
        self._check_off_policy(fail, finite)
        if not isinstance(self.troll_k, int) or self.troll_k < 1:
            fail("troll_k", "must be a positive integer")
        if not 0.0 < self.troll_threshold < 1.0:
            fail("troll_threshold", "must be in (0, 1)")

    def _check_off_policy(self, fail, finite):
        for name in ("rollout_is_batch_normalize", "kl_bias_correction"):
            if not isinstance(getattr(self, name), bool):
                fail(name, "must be a bool")
        if self.rollout_is_batch_normalize and self.rollout_correction is None:
            fail("rollout_is_batch_normalize", "needs a rollout_correction (it normalises its weights)")
        if self.rollout_correction == "seq_mask_tis" and self.loss in SEQUENCE_MEAN_LOSSES:
            fail("rollout_correction", f"is not supported by loss={self.loss!r} (a per-sequence ratio)")
        if self.rollout_rejection is None:
            if self.rollout_rejection_threshold is not None:
                fail("rollout_rejection_threshold", "is set but rollout_rejection is None")
        else:
            try:
                parse_rollout_rejection(self.rollout_rejection, self.rollout_rejection_threshold)
            except (TypeError, ValueError) as error:
                raise ValueError(f"LossConfig.rollout_rejection / rollout_rejection_threshold: {error}") from None
        finite("off_policy_mask_threshold", allow_none=True)
        if self.off_policy_mask_threshold is not None and self.loss in SEQUENCE_MEAN_LOSSES:
            fail("off_policy_mask_threshold", f"is not supported by loss={self.loss!r} (a mean over sequences)")
        if self.kl_bias_correction and (self.kl is None or self.kl_coef == 0):
            fail("kl_bias_correction", "corrects the KL penalty, which is off (set kl and kl_coef)")
        for name in ("m2po_threshold", "dppo_mask_low", "dppo_mask_high", "ipo_threshold"):
            finite(name, 0.0, allow_none=True)
            if getattr(self, name) is not None and self.loss in SEQUENCE_MEAN_LOSSES:
                fail(name, f"is not supported by loss={self.loss!r} (a mean over sequences: no per-token mask)")
        for name in ("topr_positive_weight", "topr_negative_weight"):
            finite(name, 0.0)
            if self.loss != "topr" and getattr(self, name) != 1.0:
                fail(name, f"applies to loss='topr', not {self.loss!r}")

    @property
    def kl_correction_level(self) -> str:
        """The importance ratio of ``kl_bias_correction``: per sequence for the sequence-ratio losses
        (TRL's importance_sampling_level="sequence"), per token otherwise."""
        return "sequence" if self.loss in ("gspo", "gspo_token") else "token"

    @property
    def behaviour_masks(self) -> tuple:
        """The names of the set knobs that mask tokens by comparing the current policy with the
        behaviour policy (``rollout_logprobs`` when given, else ``old_logprobs``)."""
        return tuple(name for name in ("off_policy_mask_threshold", "m2po_threshold", "dppo_mask_low",
                                       "dppo_mask_high", "ipo_threshold") if getattr(self, name) is not None)

    @property
    def needs_current_logprobs(self) -> bool:
        """True when a detached factor of the policy term depends on the current log-probs (the
        fused path then reads the logits once more, without gradient, before its kernel)."""
        return bool(self.behaviour_masks) or self.loss in DETACHED_WEIGHT_LOSSES

    def replace(self, **overrides) -> "LossConfig":
        return dataclasses.replace(self, **overrides)

    @property
    def token_local(self) -> bool:
        """True when the loss can take the fused path (one kernel: loss + gradient per row)."""
        return (self.loss in TOKEN_LOCAL_LOSSES + DETACHED_WEIGHT_LOSSES and self.entropy_quantile is None
                and self.kl_full_coef == 0 and not self.kl_bias_correction)  # the corrected KL's ratio carries a gradient

    # --- presets: published defaults; keyword arguments override any field ----------------------

    @classmethod
    def grpo(cls, **overrides):
        """GRPO (DeepSeekMath): clip 0.2, k3 KL to the reference with beta 0.04, per-sequence mean."""
        return cls(**{"loss": "ppo", "clip_low": 0.2, "clip_high": 0.2, "kl": "k3", "kl_coef": 0.04,
                      "aggregation": "seq-mean-token-mean", **overrides})

    @classmethod
    def dapo(cls, **overrides):
        """DAPO: clip-higher (0.2 / 0.28), token-mean, no KL."""
        return cls(**{"loss": "ppo", "clip_low": 0.2, "clip_high": 0.28, "aggregation": "token-mean", **overrides})

    @classmethod
    def dr_grpo(cls, **overrides):
        """Dr. GRPO: clip 0.2, per-sequence token sums divided by a constant length (norm_length, default
        the padded length), averaged over sequences; no KL."""
        return cls(**{"loss": "ppo", "clip_low": 0.2, "clip_high": 0.2, "aggregation": "seq-mean-token-sum-norm",
                      **overrides})

    @classmethod
    def gppo(cls, **overrides):
        """GPPO (Klear-Reasoner): PPO forward, bounded gradients on clipped tokens, dual clip 10."""
        return cls(**{"loss": "gppo", "clip_low": 0.2, "clip_high": 0.28, "dual_clip": 10.0, **overrides})

    @classmethod
    def cispo(cls, **overrides):
        """CISPO (MiniMax-M1): detached IS weight min(r, 1 + eps_high), no lower bound."""
        return cls(**{"loss": "cispo", "cispo_mode": "upper", "clip_low": None, "clip_high": 0.28, **overrides})

    @classmethod
    def sapo(cls, **overrides):
        """SAPO: soft sigmoid gate, tau 1.0 (A > 0) / 1.05 (A < 0), per-sequence mean."""
        return cls(**{"loss": "sapo", "sapo_tau_pos": 1.0, "sapo_tau_neg": 1.05,
                      "aggregation": "seq-mean-token-mean", **overrides})

    @classmethod
    def pspo(cls, **overrides):
        """PSPO: ratio smoothed towards 1 with alpha 0.1."""
        return cls(**{"loss": "pspo", "pspo_alpha": 0.1, **overrides})

    @classmethod
    def spo(cls, **overrides):
        """SPO (Xie et al. 2025): -(A r - |A| (r - 1)^2 / (2 eps)), eps = clip_high = 0.2."""
        return cls(**{"loss": "spo", "clip_high": 0.2, **overrides})

    @classmethod
    def gspo(cls, **overrides):
        """GSPO: sequence-level length-normalised ratio, clip 3e-4 / 4e-4, no KL."""
        return cls(**{"loss": "gspo", "clip_low": 3e-4, "clip_high": 4e-4, "aggregation": "seq-mean-token-mean",
                      **overrides})

    @classmethod
    def gmpo(cls, **overrides):
        """GMPO: geometric mean of token ratios, clip (-0.4, 0.4) in log space."""
        return cls(**{"loss": "gmpo", "clip_low": 0.4, "clip_high": 0.4, **overrides})

    @classmethod
    def clip_cov(cls, **overrides):
        """Clip-Cov: PPO with a random 2e-4 of high-covariance tokens detached (lb 1, ub 5)."""
        return cls(**{"loss": "clip_cov", "clip_low": 0.2, "clip_high": 0.2, "cov_ratio": 2e-4, "cov_lb": 1.0,
                      "cov_ub": 5.0, **overrides})

    @classmethod
    def troll(cls, **overrides):
        """TROLL: KL trust-region projection (eps 0.05) on the top-64 support, alpha 1, no clipping."""
        return cls(**{"loss": "troll", "troll_eps": 0.05, "troll_alpha": 1.0, "troll_k": 64,
                      "troll_threshold": 1e-5, **overrides})

    @classmethod
    def m2po(cls, **overrides):
        """M2PO (Zheng et al. 2025, arXiv 2510.01161): no clip (``-A r``: pspo with alpha 0); the tokens
        of largest squared log-ratio to the behaviour policy are masked until the batch second moment
        is <= 0.04 (the paper's tau_M2, used in all its experiments), token-mean."""
        return cls(**{"loss": "pspo", "pspo_alpha": 0.0, "m2po_threshold": 0.04, "aggregation": "token-mean",
                      **overrides})

    @classmethod
    def dppo(cls, **overrides):
        """prime-rl's default loss (DPPO-Binary TV): ``-A r`` (pspo with alpha 0) with the sign-aware
        probability-difference mask, dppo_mask_low = dppo_mask_high = 0.2, token-mean. prime-rl's
        ``kl_tau (logp - inference)^2`` term is ``kl="k2", kl_coef=2 kl_tau`` with
        ``ref_logprobs`` = the inference log-probs."""
        return cls(**{"loss": "pspo", "pspo_alpha": 0.0, "dppo_mask_low": 0.2, "dppo_mask_high": 0.2,
                      "aggregation": "token-mean", **overrides})

    @classmethod
    def ipo(cls, **overrides):
        """prime-rl's IPO loss: ``-A r`` (pspo with alpha 0) with the symmetric probability-difference
        mask ``|p - p_behaviour| > 0.1``, token-mean (its KL term: as ``dppo``)."""
        return cls(**{"loss": "pspo", "pspo_alpha": 0.0, "ipo_threshold": 0.1, "aggregation": "token-mean",
                      **overrides})

    @classmethod
    def topr(cls, **overrides):
        """TOPR (tapered off-policy REINFORCE, arXiv 2503.14286; ROLL ``pg_variant="topr"``):
        ``-A logp`` for A >= 0, ``-sg(clip(r, 0, 1)) A logp`` for A < 0, weights 1 / 1, token-mean."""
        return cls(**{"loss": "topr", "topr_positive_weight": 1.0, "topr_negative_weight": 1.0,
                      "aggregation": "token-mean", **overrides})

    @classmethod
    def kl_cov(cls, **overrides):
        """KL-Cov: unclipped -A r plus |logp - old| on the top 2e-3 tokens by covariance."""
        return cls(**{"loss": "kl_cov", "cov_ratio": 2e-3, "kl_cov_coef": 1.0, **overrides})


def parse_rollout_rejection(options: str, threshold) -> tuple:
    """verl's ``rollout_rs`` / ``rollout_rs_threshold`` (rollout_corr_helper._parse_rollout_rs_thresholds):
    ``((option, lower, upper), ...)`` in the given order, duplicates dropped. One threshold is shared by
    every option, else one per option (comma-separated). k1 options bound the ratio: ``"lower_upper"``
    or ``upper`` (lower ``1 / upper``); the others take one positive upper bound."""
    if not isinstance(options, str):
        raise TypeError(f"rollout_rejection must be a comma-separated string of {ROLLOUT_REJECTIONS}")
    names = []
    for name in (part.strip() for part in options.split(",")):
        if not name:
            continue
        if name not in ROLLOUT_REJECTIONS:
            raise ValueError(f"unknown rejection option {name!r} (one of {ROLLOUT_REJECTIONS})")
        if name not in names:
            names.append(name)
    if not names:
        raise ValueError("rollout_rejection names no option")
    if threshold is None:
        raise ValueError("rollout_rejection_threshold is required by rollout_rejection")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float, str)):
        raise TypeError("rollout_rejection_threshold must be a number or a string")
    specs = [str(threshold)] if not isinstance(threshold, str) else [p.strip() for p in threshold.split(",") if p.strip()]
    if len(specs) not in (1, len(names)):
        raise ValueError(f"rollout_rejection_threshold needs 1 or {len(names)} comma-separated thresholds")
    specs = specs * len(names) if len(specs) == 1 else specs
    parsed = []
    for name, spec in zip(names, specs):
        try:
            if name.endswith("k1"):
                upper_text, lower_text = (spec.split("_", 1)[1], spec.split("_", 1)[0]) if "_" in spec else (spec, None)
                upper = float(upper_text)
                lower = 1.0 / upper if lower_text is None else float(lower_text)
            else:
                if "_" in spec:
                    raise ValueError(f"{name} takes one upper bound, got {spec!r}")
                upper, lower = float(spec), None
        except ZeroDivisionError:
            raise ValueError(f"threshold {spec!r} of {name} must be positive") from None
        bounds = [b for b in (lower, upper) if b is not None]
        if not all(math.isfinite(b) and b > 0 for b in bounds):
            raise ValueError(f"threshold {spec!r} of {name} must be positive and finite")
        if lower is not None and lower > upper:
            raise ValueError(f"threshold {spec!r} of {name}: lower must not exceed upper")
        parsed.append((name, lower, upper))
    return tuple(parsed)
