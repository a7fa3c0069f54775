"""``LossConfig``: every knob of the policy-loss family (docs/SPEC.md sections 3-7), with presets."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from torch import Tensor

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
# Adaptive clipping (issue 18, docs/SPEC.md section 12): the losses whose clip_low / clip_high / dual_clip may
# be per-token tensors, the rules that compute the bounds, and the knobs each rule owns.
PER_TOKEN_CLIP_LOSSES = ("ppo", "gppo", "clip_cov", "gspo_token", "cispo", "gmpo", "spo", "cpgd")
ADAPTIVE_CLIPS = ("dcpo", "bapo", "hapo")
ADAPTIVE_CLIP_KNOBS = {"dcpo": ("dcpo_ratio_cap",),
                       "bapo": ("bapo_target", "bapo_low_start", "bapo_low_max", "bapo_high_start", "bapo_high_max",
                                "bapo_step"),
                       "hapo": ("hapo_entropy_pivot", "hapo_alpha")}


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

    Adaptive clipping (docs/SPEC.md section 12): ``clip_low`` / ``clip_high`` / ``dual_clip`` may be
    float tensors of the tokens' shape (checked per call: finite, >= 0, dual > 1, on valid tokens);
    ``adaptive_clip`` computes them: ``"dcpo"`` from the old probability (``dcpo_ratio_cap``), ``"bapo"``
    by a per-call search (``bapo_*``), ``"hapo"`` from the entropy (``hapo_*``). ``erc_beta_low`` /
    ``erc_beta_high`` are ERC's entropy-ratio band (``policy_loss(..., old_entropy=)``); ``loss="cpgd"``
    takes ``cpgd_drift_coef`` / ``cpgd_drift_cap``. ``top_k`` / ``top_p`` / ``min_p`` are the sampler's
    filters (issue 17).
    """

    loss: str = "ppo"
    clip_low: float | Tensor | None = 0.2  # Tensor: per-token bounds of the tokens' shape (section 12)
    clip_high: float | Tensor = 0.2
    dual_clip: float | Tensor | None = None
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
    adaptive_clip: str | None = None  # issue 18: "dcpo", "bapo", "hapo" (docs/SPEC.md section 12)
    dcpo_ratio_cap: float = 10.0
    bapo_target: float = 0.5
    bapo_low_start: float = 0.6
    bapo_low_max: float = 0.9
    bapo_high_start: float = 1.2
    bapo_high_max: float = 3.0
    bapo_step: float = 0.05
    hapo_entropy_pivot: float = 0.8
    hapo_alpha: float = 1.0
    erc_beta_low: float | None = None
    erc_beta_high: float | None = None
    cpgd_drift_coef: float = 0.01
    cpgd_drift_cap: float = 2.0
    top_k: int | None = None  # issue 17: the sampler's filters (log-probs on the sampled support)
    top_p: float | None = None
    min_p: float | None = None
    aggregation: str = "token-mean"
    norm_tokens: float | None = None
    norm_length: float | None = None
    temperature: float = 1.0
    troll_eps: float = 0.05
    troll_alpha: float = 1.0
    troll_k: int = 64
    troll_threshold: float = 1e-5
    # Mixed-policy losses and token re-weightings (docs/SPEC.md section 11; policy_loss(expert_mask=)).
    chord_mu: float | None = None
    chord_phi: bool = True
    luffy_gamma: float | None = None
    empg_k: float | None = None
    empg_k_future: float = 1.0
    empg_zeta: float = 0.1
    lp_reg_coef: float = 0.0
    lp_reg_min_p: float = 0.02
    lp_reg_rho: float = 0.01

    def __post_init__(self):
        def fail(name, message):
            raise ValueError(f"LossConfig.{name} {message}, got {getattr(self, name)!r}")

        def finite(name, low=None, low_inclusive=True, allow_none=False):
            value = getattr(self, name)
            if (value is None and allow_none) or isinstance(value, Tensor):  # tensors: checked per call (losses.py)
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
        if self.loss == "spo" and not isinstance(self.clip_high, Tensor) and self.clip_high <= 0:
            fail("clip_high", "is SPO's eps and must be > 0")
        if (self.loss == "cispo" and self.cispo_mode == "cap" and not isinstance(self.clip_high, Tensor)
                and self.clip_high <= 0):
            fail("clip_high", "is the CISPO cap in 'cap' mode and must be > 0")
        if self.rollout_cap_low is not None and self.rollout_cap_low > self.rollout_cap:
            fail("rollout_cap_low", "must not exceed rollout_cap")
        self._check_off_policy(fail, finite)
        self._check_adaptive_clip(fail, finite)
        if not isinstance(self.troll_k, int) or self.troll_k < 1:
            fail("troll_k", "must be a positive integer")
        if not 0.0 < self.troll_threshold < 1.0:
            fail("troll_threshold", "must be in (0, 1)")
        self._check_mixed_policy(fail, finite)

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

    def _check_adaptive_clip(self, fail, finite):
        """Per-token clip bounds, DCPO / BAPO / HAPO, ERC, CPGD (issue 18) and the sampler's filters (issue 17)."""
        tensors = [name for name in ("clip_low", "clip_high", "dual_clip") if isinstance(getattr(self, name), Tensor)]
        if tensors and self.loss not in PER_TOKEN_CLIP_LOSSES:
            fail(tensors[0], f"may be a per-token tensor for {PER_TOKEN_CLIP_LOSSES}, not loss={self.loss!r}")
        if self.adaptive_clip is not None:
            if self.adaptive_clip not in ADAPTIVE_CLIPS:
                fail("adaptive_clip", f"must be one of {ADAPTIVE_CLIPS} or None")
            if self.loss not in ("ppo", "gppo"):
                fail("adaptive_clip", f"applies to loss='ppo' or 'gppo', not {self.loss!r}")
            if tensors:
                fail(tensors[0], f"is computed by adaptive_clip={self.adaptive_clip!r}: pass a float")
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for rule, knobs in ADAPTIVE_CLIP_KNOBS.items():
            for name in knobs:
                finite(name, 0.0)
                if self.adaptive_clip != rule and getattr(self, name) != defaults[name]:
                    fail(name, f"applies to adaptive_clip={rule!r}, not {self.adaptive_clip!r}")
        if self.dcpo_ratio_cap < 1.0:
            fail("dcpo_ratio_cap", "caps the ratio's upper bound and must be >= 1")
        if not 0.0 < self.bapo_target < 1.0:
            fail("bapo_target", "is the positive tokens' share of the loss and must be in (0, 1)")
        if self.bapo_low_start > self.bapo_low_max or self.bapo_low_max > 1.0:
            fail("bapo_low_max", "must satisfy bapo_low_start <= bapo_low_max <= 1")
        if self.bapo_high_start > self.bapo_high_max or self.bapo_high_start < 1.0:
            fail("bapo_high_max", "must satisfy 1 <= bapo_high_start <= bapo_high_max")
        if not 0.0 <= self.hapo_entropy_pivot <= 1.0:
            fail("hapo_entropy_pivot", "is a quantile and must be in [0, 1]")
        for name in ("erc_beta_low", "erc_beta_high"):
            finite(name, 0.0, low_inclusive=False, allow_none=True)
            if getattr(self, name) is not None and self.loss in SEQUENCE_MEAN_LOSSES + ("troll",):
                fail(name, f"is not supported by loss={self.loss!r} (no per-token policy term)")
        for name in ("cpgd_drift_coef", "cpgd_drift_cap"):
            finite(name, 0.0)
            if self.loss != "cpgd" and getattr(self, name) != defaults[name]:
                fail(name, f"applies to loss='cpgd', not {self.loss!r}")
        if self.loss == "cpgd" and (self.clip_low is None or (not isinstance(self.clip_low, Tensor)
                                                               and self.clip_low >= 1.0)):
            fail("clip_low", "is CPGD's eps_low (the log-ratio is clipped at log(1 - eps_low)) and must be in [0, 1)")
        # As rlfuse.sample validates them: top_k an int >= 0 (0: off), top_p in (0, 1], min_p in [0, 1).
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int)
                                       or self.top_k < 0):
            fail("top_k", "must be an int >= 0 or None")
        finite("top_p", allow_none=True)
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            fail("top_p", "must be in (0, 1] or None")
        finite("min_p", allow_none=True)
        if self.min_p is not None and not 0.0 <= self.min_p < 1.0:
            fail("min_p", "must be in [0, 1) or None")

    @property
    def entropy_ratio_clip(self) -> bool:
        """True when entropy ratio clipping is on (either bound set); it needs ``old_entropy``."""
        return self.erc_beta_low is not None or self.erc_beta_high is not None

    @property
    def sampler_filters(self) -> bool:
        """True when a sampler filter (top_k / top_p / min_p) restricts the log-probs' support."""
        return self.top_k is not None or self.top_p is not None or self.min_p is not None

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
                and self.kl_full_coef == 0 and not self.kl_bias_correction  # the corrected KL's ratio: a gradient
                and not self.sampler_filters
                # ERC, CHORD, LUFFY run the kernel's REINFORCE term (losses._fused): CPGD's drift is its own term
                and not (self.loss == "cpgd" and (self.entropy_ratio_clip or self.mixes_expert_tokens)))

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
        """SPO (Xie et al. 2025, arXiv 2401.16025): -(A r - |A| (r - 1)^2 / (2 eps)), eps = clip_high = 0.2
        (a float, or a per-token tensor > 0: adaptive eps), token-mean; clip_low is unused."""
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

    # --- adaptive clipping presets (issue 18; docs/SPEC.md section 12 has each formula and its source) ---

    @classmethod
    def dcpo(cls, **overrides):
        """DCPO (Yang et al. 2025, arXiv 2509.02333): per-token ratio bounds from the old probability q,
        ``0.5 + 0.5 sqrt(max(1 - 4 eps_low / q, 0)) <= r <= min(0.5 + 0.5 sqrt(1 + 4 eps_high / q), 10)``,
        eps 0.2 / 0.28 and dual clip 10 (the authors' ``run_dcpo.sh``: ``clip_type=dynamic``,
        ``clip_ratio_c=10``, which also caps the upper bound), token-mean. Convention: the authors' OTM
        aggregation (each response's token mean, no batch average) is ``seq-mean-token-mean`` up to a
        constant factor; the preset keeps token-mean as DAPO, its baseline."""
        return cls(**{"loss": "ppo", "adaptive_clip": "dcpo", "clip_low": 0.2, "clip_high": 0.28, "dual_clip": 10.0,
                      "dcpo_ratio_cap": 10.0, "aggregation": "token-mean", **overrides})

    @classmethod
    def bapo(cls, **overrides):
        """BAPO (Xi et al. 2025, arXiv 2510.18927): per batch, the ratio bounds start at [0.6, 1.2]; the
        lower one rises by 0.05 up to 0.9, then the upper one by 0.05 up to 3.0, until the positive-
        advantage tokens carry 50% of the clipped loss (the authors' ``recipe/bapo``: the first bounds
        that satisfy it, else the last). Convention: contributions are token sums over the call's valid
        tokens (the authors' ``response_mask`` sums); the chosen bounds are ``metrics["bapo_clip_low"]`` /
        ``["bapo_clip_high"]`` (ratio bounds, not eps). No dual clip (the authors' verl default 3.0 is
        ``dual_clip=3.0``)."""
        return cls(**{"loss": "ppo", "adaptive_clip": "bapo", "clip_low": 0.2, "clip_high": 0.2, "bapo_target": 0.5,
                      "bapo_low_start": 0.6, "bapo_low_max": 0.9, "bapo_high_start": 1.2, "bapo_high_max": 3.0,
                      "bapo_step": 0.05, "aggregation": "token-mean", **overrides})

    @classmethod
    def hapo(cls, **overrides):
        """HAPO's asymmetric adaptive clipping (Liu et al. 2025, "From Uniform to Heterogeneous", arXiv
        2509.16591): the current entropy, normalised per batch to ``h in [-1, 1]`` around its 0.8-quantile,
        widens eps_low to ``eps_low (1 - alpha h)`` on low-entropy tokens (h <= 0) and eps_high to
        ``eps_high (1 + alpha h)`` on high-entropy ones (h > 0); eps 0.2 / 0.2, alpha 1, dual clip 10
        (the authors' recipes). Convention: the authors' code divides the negative side by its (negative)
        minimum, which makes h >= 0 everywhere and never widens eps_low; rlfuse follows the rule as the
        paper states it (h <= 0 below the pivot)."""
        return cls(**{"loss": "ppo", "adaptive_clip": "hapo", "clip_low": 0.2, "clip_high": 0.2, "dual_clip": 10.0,
                      "hapo_entropy_pivot": 0.8, "hapo_alpha": 1.0, "aggregation": "token-mean", **overrides})

    @classmethod
    def erc(cls, **overrides):
        """ERC (Su et al. 2025, arXiv 2512.05591) on DAPO: tokens whose entropy ratio ``H / H_old`` leaves
        ``(0.95, 1.05)`` keep their loss value but get no gradient; clip 0.2 / 0.28, dual clip 10 (the
        authors' ``grpo_erc`` scripts). Needs ``policy_loss(..., old_entropy=...)``. GPPO + ERC:
        ``LossConfig.erc(loss="gppo", clip_high=0.2)``."""
        return cls(**{"loss": "ppo", "clip_low": 0.2, "clip_high": 0.28, "dual_clip": 10.0, "erc_beta_low": 0.05,
                      "erc_beta_high": 0.05, "aggregation": "token-mean", **overrides})

    @classmethod
    def cpgd(cls, **overrides):
        """CPGD (Liu et al. 2025, arXiv 2505.12504): ``-min(A log r, A clip(log r, log(1 - eps), log(1 + eps)))``
        plus the policy drift ``coef * KL(old || new)``, eps 0.2, coef 0.01 (MM-EUREKA's defaults), token-mean.
        Convention: the drift's value is the k3 estimate ``r - 1 - log r``, its gradient
        ``min(r - 1, 2) d logp`` (siiRL's CPGD: the drift gradient capped at r - 1 = ``cpgd_drift_cap``)."""
        return cls(**{"loss": "cpgd", "clip_low": 0.2, "clip_high": 0.2, "cpgd_drift_coef": 0.01,
                      "cpgd_drift_cap": 2.0, "aggregation": "token-mean", **overrides})

    @classmethod
    def kl_cov(cls, **overrides):
        """KL-Cov: unclipped -A r plus |logp - old| on the top 2e-3 tokens by covariance."""
        return cls(**{"loss": "kl_cov", "cov_ratio": 2e-3, "kl_cov_coef": 1.0, **overrides})

    # --- mixed-policy losses and token re-weightings (docs/SPEC.md section 11) ------------------

    @property
    def mixes_expert_tokens(self) -> bool:
        """True for CHORD / LUFFY: off-policy expert tokens (``policy_loss(expert_mask=)``) take their
        own term (fused through a detached per-token weight, docs/SPEC.md section 11)."""
        return self.chord_mu is not None or self.luffy_gamma is not None

    def _check_mixed_policy(self, fail, finite):
        finite("chord_mu", 0.0, allow_none=True)
        if self.chord_mu is not None and self.chord_mu > 1.0:
            fail("chord_mu", "must be in [0, 1]")
        if not isinstance(self.chord_phi, bool):
            fail("chord_phi", "must be a bool")
        finite("luffy_gamma", 0.0, low_inclusive=False, allow_none=True)
        if self.chord_mu is not None and self.luffy_gamma is not None:
            fail("luffy_gamma", "and chord_mu are two treatments of the expert tokens; set one")
        if self.mixes_expert_tokens and self.loss in SEQUENCE_MEAN_LOSSES + ("troll",):
            fail("chord_mu" if self.chord_mu is not None else "luffy_gamma",
                 f"needs a per-token policy term, not loss={self.loss!r}")
        finite("empg_k", 0.0, allow_none=True)
        finite("empg_k_future", 0.0)
        finite("empg_zeta")
        finite("lp_reg_coef", 0.0)
        finite("lp_reg_min_p", 0.0, low_inclusive=False)
        if self.lp_reg_min_p >= 1.0:
            fail("lp_reg_min_p", "must be in (0, 1)")
        if isinstance(self.lp_reg_rho, bool) or not isinstance(self.lp_reg_rho, (int, float)) \
                or not 0.0 < self.lp_reg_rho <= 1.0:
            fail("lp_reg_rho", "must be in (0, 1]")

    @classmethod
    def chord(cls, **overrides):
        """CHORD-phi (arXiv 2508.11408; Trinity-RFT ``mix_chord``): ``(1 - mu)`` x PPO-clip 0.2 on the
        on-policy tokens + ``mu`` x the SFT loss ``-p (1 - p) logp`` (token-mean) on the expert tokens,
        ``mu = 0.1`` (Trinity-RFT's default; see ``rlfuse.mixed_policy.chord_mu_schedule``)."""
        return cls(**{"loss": "ppo", "clip_low": 0.2, "clip_high": 0.2, "chord_mu": 0.1, "chord_phi": True,
                      "aggregation": "token-mean", **overrides})

    @classmethod
    def luffy(cls, **overrides):
        """LUFFY (arXiv 2504.14945): expert tokens ``-A p / (p + 0.1)``, on-policy tokens ``-A r`` without
        clip (pspo alpha 0; the authors' ``loss_remove_clip``), Dr. GRPO aggregation (their
        ``loss_remove_token_mean``; ``norm_length`` defaults to the padded length)."""
        return cls(**{"loss": "pspo", "pspo_alpha": 0.0, "luffy_gamma": 0.1,
                      "aggregation": "seq-mean-token-sum-norm", **overrides})

    @classmethod
    def empg(cls, **overrides):
        """EMPG (arXiv 2509.09265) on DAPO: entropy-modulated advantages, k = k_f = 1, zeta = 0.1 (the
        authors' ``compute_empg_advantage`` defaults), tokens as steps."""
        return cls.dapo(**{"empg_k": 1.0, "empg_k_future": 1.0, "empg_zeta": 0.1, **overrides})

    @classmethod
    def lp_reg(cls, **overrides):
        """Lp-Reg (arXiv 2510.03222; the authors' scripts): PPO with clip 1.0 / 9.0, ``KL(proxy || pi)``
        with coefficient 1 on the 1% lowest-probability negative tokens, min-p proxy kappa 0.02."""
        return cls(**{"loss": "ppo", "clip_low": 1.0, "clip_high": 9.0, "lp_reg_coef": 1.0, "lp_reg_min_p": 0.02,
                      "lp_reg_rho": 0.01, "aggregation": "token-mean", **overrides})


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
