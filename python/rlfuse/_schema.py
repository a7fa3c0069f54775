"""The kernel interface of rlfuse, declared once (issue 14).

Every enum (dtype tag, policy variant, KL estimator, CISPO mode, KL direction), the per-token loss
parameter struct ``TokenLossParams`` and every kernel's argument struct are declared here, by name,
and nowhere else. Everything else derives from this module:

- ``csrc/include/rlfuse/schema.h`` is generated from it (``python python/rlfuse/_schema.py --write``
  from the repository root, no torch needed; ``python -m rlfuse._schema --write`` also works) and
  checked in; it holds the C++ enums, each struct as an X-macro field list, the structs defined
  from those lists, a field visitor per struct and the list of kernels. ``tests/test_schema.py``
  fails when the checked-in header differs from what this module generates.
- ``csrc/bindings.cpp`` binds every kernel of ``KERNELS`` as ``<kernel>_cpu(**fields, num_threads)``
  / ``<kernel>_cuda(**fields, stream)`` and fills the struct field by field through the header's
  visitor: keyword arguments only, unknown or missing names are errors.
- ``rlfuse/ops/_launch.py`` builds those keyword arguments from ``KERNELS`` (``launch_params``).
- ``rlfuse/ops/policy_loss.py`` builds ``TokenLossParams`` from a ``LossConfig`` (``source`` of
  each field) and declares the parameters as typed, named arguments of its custom ops.
- ``triton_kernels/policy_loss.py`` takes the enum values (``POLICY_KIND`` ...) and the float
  parameters (``TOKEN_LOSS_FLOATS``, passed to the kernel as one named tuple) from here.
- ``rlfuse/config.py`` takes its option tuples from the enum names.

Adding a token-local loss variant: one name in ``POLICY_KIND`` (and a float field of
``TOKEN_LOSS_PARAMS`` per new knob, with a ``LossConfig`` field of the same name), then its
per-token math (docs/adding-a-loss.md). This module imports nothing outside the standard library,
so it runs without torch, Triton or the compiled extension.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

# --- declarations ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Enum:
    """A C++ enum with values 0 .. n-1 in declaration order; ``members`` = (name, C++ enumerator).

    ``name`` is the Python-side name (a LossConfig value, a dtype name); ``scoped`` makes it an
    ``enum class`` in C++.
    """

    cname: str
    members: tuple[tuple[str, str], ...]
    doc: str
    scoped: bool = False

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.members)

    def __getitem__(self, name: str) -> int:
        for value, (member, _) in enumerate(self.members):
            if member == name:
                return value
        raise KeyError(f"{self.cname} has no member {name!r} (members: {self.names})")

    def __len__(self) -> int:
        return len(self.members)

    def items(self):
        return ((name, value) for value, (name, _) in enumerate(self.members))


# Field types. A pointer arrives as an int address (0 = null), a DType as its tag, a RowLayout as
# the tuple (rows, inner, stride_outer, stride_inner), a nested struct as a dict of its fields.
POINTER_TYPES = ("const void*", "void*", "const int64_t*", "int64_t*", "const int32_t*", "int32_t*",
                 "const float*", "float*", "const uint64_t*")
SCALAR_TYPES = {"int": "int", "int64_t": "int", "float": "float", "double": "float"}
TRITON_TYPES = {"float": "fp32", "double": "fp64", "int": "i32", "int64_t": "i64"}


@dataclass(frozen=True)
class Field:
    """One struct field.

    ``enum``: the enum an ``int`` field holds (bindings reject other values). ``py_name``: the
    launcher parameter's name where it differs from the field's. ``derived``: the field is not a
    launcher parameter but taken from another one (``dtype`` from the logits tensor).
    ``source`` / ``none`` (TokenLossParams only): the LossConfig attribute it is read from (default:
    the same name) and the value a ``None`` there stands for. ``optional`` (pointers only, declared
    after the required fields): a launcher parameter that defaults to None (a null pointer).
    """

    name: str
    ctype: str
    doc: str = ""
    enum: str | None = None
    py_name: str | None = None
    derived: str | None = None
    source: str | None = None
    none: float | None = None
    optional: bool = False

    @property
    def param(self) -> str:
        return self.py_name or self.name


@dataclass(frozen=True)
class Struct:
    cname: str
    fields: tuple[Field, ...]
    doc: str = ""

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields)

    def field(self, name: str) -> Field:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(f"{self.cname} has no field {name!r}")


@dataclass(frozen=True)
class Kernel:
    """A kernel entry point: ``<name>_cpu(const Args&, int num_threads)`` and
    ``<name>_cuda(const Args&, void* stream)`` in C++, ``rlfuse._C.<name>_cpu`` / ``_cuda`` taking
    the struct's fields as keyword arguments, and the tensor-level launcher ``<name>(...)`` of every
    backend (``ops/_launch.py``, ``triton_kernels/<module>.py``) whose parameters are
    ``launch_params``: the struct's fields in order, without derived ones."""

    name: str
    args: Struct
    module: str  # the triton_kernels module (and ops/_launch.kernels op name)

    @property
    def launch_params(self) -> tuple[str, ...]:
        return tuple(f.param for f in self.args.fields if f.derived is None)


DTYPE = Enum("DType", (("float32", "kFloat32"), ("float16", "kFloat16"), ("bfloat16", "kBFloat16")),
             "Logits element type tag.", scoped=True)
POLICY_KIND = Enum(
    "PolicyKind",
    (("ppo", "kPpo"), ("gppo", "kGppo"), ("cispo", "kCispo"), ("sapo", "kSapo"), ("pspo", "kPspo"),
     ("reinforce", "kReinforce"), ("spo", "kSpo"), ("cpgd", "kCpgd")),
    "Token-local policy-loss variant (LossConfig.loss) of the fused path: docs/SPEC.md section 3.")
KL_KIND = Enum(
    "KlKind",
    (("none", "kKlNone"), ("k1", "kK1"), ("k2", "kK2"), ("k3", "kK3"), ("k3+", "kK3Plus"), ("abs", "kKlAbs")),
    "KL-to-reference estimator (LossConfig.kl; None is \"none\"): docs/SPEC.md section 5.")
CISPO_MODE = Enum(
    "CispoMode", (("two_sided", "kCispoTwoSided"), ("upper", "kCispoUpper"), ("cap", "kCispoCap")),
    "How CISPO bounds its detached importance weight (LossConfig.cispo_mode).")
KL_DIRECTION = Enum(
    "KlDirection", (("forward", "kKlForward"), ("reverse", "kKlReverse")),
    "Full-vocabulary KL direction: forward KL(p || q), reverse KL(q || p).")

ENUMS = (DTYPE, POLICY_KIND, KL_KIND, CISPO_MODE, KL_DIRECTION)

ROW_LAYOUT = Struct("RowLayout", (
    Field("rows", "int64_t", "number of rows (tokens)"),
    Field("inner", "int64_t", "rows per outer index (>= 1)"),
    Field("stride_outer", "int64_t", "elements between outer indices"),
    Field("stride_inner", "int64_t", "elements between consecutive inner rows"),
), "Row r of a [..., V] tensor starts at (r / inner) * stride_outer + (r % inner) * stride_inner\n"
   "elements from its data pointer; its V entries are contiguous (ARCHITECTURE.md, row layout).")

TOKEN_LOSS_PARAMS = Struct("TokenLossParams", (
    Field("policy", "int", "PolicyKind", enum="PolicyKind", source="loss"),
    Field("kl", "int", "KlKind", enum="KlKind", source="kl"),
    Field("cispo_mode", "int", "CispoMode", enum="CispoMode", source="cispo_mode"),
    Field("clip_low", "float", "eps_low; < 0 means no lower bound (cispo only)", none=-1.0),
    Field("clip_high", "float", "eps_high (cispo \"cap\" mode: the cap itself)"),
    Field("dual_clip", "float", "c of dual-clip PPO; <= 0 means off", none=0.0),
    Field("delta", "float", "INTELLECT-2 upper clamp of r before clipping; <= 0 means off", none=0.0),
    Field("gppo_beta_low", "float"),
    Field("gppo_beta_high", "float"),
    Field("sapo_tau_pos", "float"),
    Field("sapo_tau_neg", "float"),
    Field("pspo_alpha", "float"),
    Field("kl_coef", "float"),
    Field("entropy_coef", "float"),
    Field("cpgd_drift_coef", "float", "CPGD's policy drift coefficient (loss \"cpgd\" only)"),
    Field("cpgd_drift_cap", "float", "cap of r - 1 in CPGD's drift gradient"),
), "Per-token loss parameters of the fused path (token_loss.h); every float is a LossConfig field\n"
   "of the same name.")

_LOGITS = Field("logits", "const void*", "row layout `layout`, element type `dtype`")
_DTYPE = Field("dtype", "DType", "element type of logits (and of every gradient)", derived="logits")
_LAYOUT = Field("layout", "RowLayout", "rows of logits")
_VOCAB = Field("vocab", "int64_t", "V, the row length")
_TOKENS = Field("tokens", "const int64_t*", "[rows]; an out-of-range id gives a NaN log-prob")
_INV_TEMP = Field("inv_temp", "float", "fp32(1 / T)")
_GRAD_LOGITS = Field("grad_logits", "void*",
                     "same dtype as logits; may alias `logits` (in place). Rows whose upstream gradients "
                     "are zero are written as zeros without reading the logits")
_GRAD_LAYOUT = Field("grad_layout", "RowLayout", "rows of grad_logits")
# The two-row ops (KL, JSD): the other input, and the gradients of both (either may be null).
_OTHER = (Field("other", "const void*", "same dtype as logits"), Field("other_layout", "RowLayout", "rows of other"))
_PAIR_GRADS = (Field("grad_logits", "void*", "nullable"), _GRAD_LAYOUT, Field("grad_other", "void*", "nullable"),
               Field("grad_other_layout", "RowLayout", "rows of grad_other"))
_INV_TEMPS = Field("inv_temps", "const float*",
                   "[rows] per-row fp32(1 / T) (a per-token temperature), or null: inv_temp for every row",
                   optional=True)
_KEPT_MIN = Field("kept_min", "const float*",
                  "[rows] or null. When given, row r's distribution is restricted to its kept set "
                  "{j : x_j >= kept_min[r]} (the sampler's filtered support, x = z * inv_temp in fp32) and "
                  "renormalised: entries outside count as x = -inf (a chosen token outside gets logp -inf)",
                  optional=True)

TOKEN_LOGPROBS_FWD_ARGS = Struct("TokenLogprobsFwdArgs", (
    _LOGITS, _DTYPE, _LAYOUT, _VOCAB, _TOKENS, _INV_TEMP,
    Field("logp", "float*", "[rows]"),
    Field("entropy", "float*", "[rows]"),
    Field("lse", "float*", "[rows], saved for the backward"),
    _INV_TEMPS,
    _KEPT_MIN,
), "Token log-prob and entropy of each row (docs/SPEC.md section 1).")

TOKEN_LOGPROBS_BWD_ARGS = Struct("TokenLogprobsBwdArgs", (
    _LOGITS, _DTYPE, _LAYOUT, _VOCAB, _TOKENS, _INV_TEMP,
    Field("lse", "const float*", "[rows] from the forward"),
    Field("entropy", "const float*", "[rows] from the forward"),
    Field("grad_logp", "const float*", "[rows]"),
    Field("grad_entropy", "const float*", "[rows]"),
    Field("grad_logits", "void*",
          "same dtype as logits; may alias `logits` (in-place backward). Rows with grad_logp = "
          "grad_entropy = 0 are written as zeros without reading the logits, so garbage in masked rows "
          "never leaks"),
    _GRAD_LAYOUT,
    _INV_TEMPS,
    _KEPT_MIN,
), "Row gradient of L(logp, H) from the upstream gradients (docs/SPEC.md section 2).")

POLICY_LOSS_FUSED_ARGS = Struct("PolicyLossFusedArgs", (
    _LOGITS, _DTYPE, _LAYOUT, _VOCAB, _TOKENS, _INV_TEMP,
    Field("advantages", "const float*", "[rows]"),
    Field("old_logp", "const float*", "[rows]"),
    Field("ref_logp", "const float*", "[rows]; may be null when params.kl == kKlNone or kl_coef == 0"),
    Field("policy_weight", "const float*", "[rows] weight of the policy term"),
    Field("weight", "const float*", "[rows] weight of the KL and entropy terms"),
    Field("params", "TokenLossParams", "the loss and its knobs"),
    Field("loss", "float*", "[rows] weighted per-token loss (their sum is the loss)"),
    Field("logp", "float*", "[rows]"),
    Field("entropy", "float*", "[rows]"),
    Field("grad_logits", "void*",
          "same dtype as logits; may alias `logits` (in place). Rows whose token has zero loss gradient "
          "(g_logp = g_H = 0: masked, clipped) are written as zeros without reading the logits again, so "
          "garbage in masked rows never leaks"),
    _GRAD_LAYOUT,
    _INV_TEMPS,
    Field("clip_low_rows", "const float*", "[rows] per-token params.clip_low, or null", optional=True),
    Field("clip_high_rows", "const float*", "[rows] per-token params.clip_high, or null", optional=True),
    Field("dual_clip_rows", "const float*", "[rows] per-token params.dual_clip, or null", optional=True),
), "Fused policy loss (ARCHITECTURE.md, fused path): per row, the statistics pass, token_loss() from\n"
   "token_loss.h, then the gradient pass, all in one kernel; the backward only rescales.")

KL_DIV_FWD_ARGS = Struct("KlDivFwdArgs", (
    _LOGITS, _DTYPE, _LAYOUT,
    *_OTHER,
    _VOCAB, _INV_TEMP,
    Field("direction", "int", "KlDirection", enum="KlDirection"),
    Field("kl", "float*", "[rows]"),
    Field("lse", "float*", "[rows] logsumexp(x), saved for the backward"),
    Field("other_lse", "float*", "[rows] logsumexp(y)"),
    _INV_TEMPS,
), "Full-vocabulary KL between two logit rows (docs/SPEC.md section 5, last bullet): p = softmax(x),\n"
   "q = softmax(y), x = logits * inv_temp, y = other * inv_temp, both of `dtype`.\n"
   "  direction forward: KL(p || q);  reverse: KL(q || p).\n"
   "Forward: one read of both rows. Entries where the distribution being averaged over is 0\n"
   "contribute nothing (0 * inf := 0); a token p > 0 where q = 0 makes the forward KL +inf.")

KL_DIV_BWD_ARGS = Struct("KlDivBwdArgs", (
    _LOGITS, _DTYPE, _LAYOUT,
    *_OTHER,
    _VOCAB, _INV_TEMP,
    Field("direction", "int", "KlDirection", enum="KlDirection"),
    Field("kl", "const float*", "[rows] from the forward"),
    Field("lse", "const float*", "[rows] from the forward"),
    Field("other_lse", "const float*", "[rows] from the forward"),
    Field("grad_kl", "const float*", "[rows]"),
    *_PAIR_GRADS,
    _INV_TEMPS,
), "KL backward: one more read of both rows, writes of the requested gradients (each may be null):\n"
   "  forward: dKL/dx_j = p_j (log p_j - log q_j - KL),  dKL/dy_j = q_j - p_j\n"
   "  reverse: dKL/dx_j = p_j - q_j,                     dKL/dy_j = q_j (log q_j - log p_j - KL)\n"
   "times grad_kl[row] * inv_temp, stored in `dtype`. Rows with grad_kl == 0 are written as zeros\n"
   "without reading the inputs (masked rows may hold garbage).")

JSD_FWD_ARGS = Struct("JsdFwdArgs", (
    _LOGITS, _DTYPE, _LAYOUT,
    *_OTHER,
    _VOCAB, _INV_TEMP,
    Field("beta", "float", "mixture weight of q, in (0, 1): m = (1 - beta) p + beta q"),
    Field("jsd", "float*", "[rows] beta KL(q || m) + (1 - beta) KL(p || m)"),
    Field("kl_logits", "float*", "[rows] KL(p || m), saved for the backward"),
    Field("kl_other", "float*", "[rows] KL(q || m), saved for the backward"),
    Field("lse", "float*", "[rows] logsumexp(x), saved for the backward"),
    Field("other_lse", "float*", "[rows] logsumexp(y), saved for the backward"),
    _INV_TEMPS,
), "Generalised Jensen-Shannon divergence between two logit rows (docs/distillation.md; TRL's GKD\n"
   "generalized_jsd_loss for 0 < beta < 1): p = softmax(x), q = softmax(y), x = logits * inv_temp,\n"
   "y = other * inv_temp, m = (1 - beta) p + beta q. Two reads of both rows: the statistics, then\n"
   "the mixture sums with d = log q - log p, u = log(m / p), v = log(m / q) = u - d, formed as\n"
   "r = log(w), w = (1 - beta) + beta e^d (d <= 0, u = r) or beta + (1 - beta) e^-d (d > 0, v = r):\n"
   "  KL(p || m) = -sum p u,  KL(q || m) = -sum q v  (terms with p = 0, resp. q = 0, add 0).\n"
   "Identical rows give d = 0, w = 1 and exactly 0. NaN anywhere, or a row with no finite entry, gives NaN.")

JSD_BWD_ARGS = Struct("JsdBwdArgs", (
    _LOGITS, _DTYPE, _LAYOUT,
    *_OTHER,
    _VOCAB, _INV_TEMP,
    Field("beta", "float", "as in the forward"),
    Field("kl_logits", "const float*", "[rows] from the forward"),
    Field("kl_other", "const float*", "[rows] from the forward"),
    Field("lse", "const float*", "[rows] from the forward"),
    Field("other_lse", "const float*", "[rows] from the forward"),
    Field("grad_jsd", "const float*", "[rows]"),
    *_PAIR_GRADS,
    _INV_TEMPS,
), "JSD backward: one more read of both rows, a write of each requested gradient (either may be null):\n"
   "  dJSD/dx_j = -(1 - beta) p_j (u_j + KL(p || m))  (0 where p_j = 0)\n"
   "  dJSD/dy_j = -beta q_j (v_j + KL(q || m))        (0 where q_j = 0)\n"
   "times grad_jsd[row] * inv_temp, stored in `dtype`; log p = x - lse, log q = y - other_lse. Rows with\n"
   "grad_jsd == 0 are written as zeros without reading the inputs.")

ROW_TOPK_ARGS = Struct("RowTopkArgs", (
    _LOGITS, _DTYPE, _LAYOUT, _VOCAB, _TOKENS, _INV_TEMP,
    Field("k", "int64_t", ">= 1"),
    Field("topk_ids", "int32_t*", "[rows, k]", py_name="ids"),
    Field("topk_values", "float*", "[rows, k], x values", py_name="values"),
    Field("logp", "float*", "[rows]"),
    Field("entropy", "float*", "[rows]"),
    Field("lse", "float*", "[rows]"),
    _INV_TEMPS,
), "Row top-k with the row statistics (TROLL's sparse support, sparse_logprobs): in one pass over\n"
   "each row, the k largest x = z * inv_temp in descending order (ties: lower id first) and the\n"
   "token_logprobs forward outputs. Slots past the row's finite entries (k > V, or -inf entries)\n"
   "hold id -1 and value -inf. NaN rows: NaN statistics, ids unspecified but in [-1, V).")

TROLL_ARGS = Struct("TrollArgs", (
    _LOGITS, _DTYPE, _LAYOUT, _VOCAB, _TOKENS, _INV_TEMP,
    Field("advantages", "const float*", "[rows]"),
    Field("old_logp", "const float*", "[rows] old log-prob of the chosen token (its b on the support)"),
    Field("ref_logp", "const float*", "[rows]; may be null when params.kl == kKlNone or kl_coef == 0"),
    Field("policy_weight", "const float*", "[rows] weight of the TROLL term"),
    Field("weight", "const float*", "[rows] weight of the KL and entropy terms"),
    Field("params", "TokenLossParams", "only kl, kl_coef and entropy_coef are read (the penalties)"),
    Field("old_ids", "const int32_t*", "[rows, old_k] old kept ids, -1 for an empty slot (ids outside [0, V) "
          "are skipped)"),
    Field("old_logprobs", "const float*", "[rows, old_k] their full-vocabulary old log-probs"),
    Field("old_k", "int64_t", "slots per row of old_ids (>= 0)"),
    Field("k", "int64_t", "troll_k: at most k new kept ids (>= 1)"),
    Field("threshold", "double", "troll_threshold (delta)"),
    Field("eps", "double", "troll_eps, the KL bound"),
    Field("alpha", "double", "troll_alpha, the weight of KL(a || sg(q))"),
    Field("loss", "float*", "[rows] weighted per-token loss (their sum is the loss)"),
    Field("logp", "float*", "[rows] full-vocabulary log-prob of the chosen token"),
    Field("entropy", "float*", "[rows]"),
    Field("eta", "float*", "[rows] the projection's eta (0: not projected)"),
    Field("kl_before", "float*", "[rows] KL(a || b) on the support"),
    Field("kl_after", "float*", "[rows] KL(q || b) on the support"),
    Field("support", "float*", "[rows] support size |S|"),
    Field("grad_logits", "void*",
          "same dtype as logits; may alias `logits` (in place: the row is read before it is written). Zero "
          "outside the support when the penalties' upstream gradients are 0; rows with both weights 0 are "
          "written as zeros without reading the logits"),
    _GRAD_LAYOUT,
    _INV_TEMPS,
), "Fused TROLL (docs/SPEC.md section 7) per row: one read of the row for the statistics and the new\n"
   "policy's top-k; the support S = {y} + old kept + new kept (priority in that order for b);\n"
   "the projection solved on S in float64 (safeguarded Newton in s = 1 / (1 + eta), at most 32 steps,\n"
   "per row); the loss, the metrics and the implicit gradient on S; then the row gradient\n"
   "  a 1[j=y] + p_j (b + c log p_j) + sum_{k in S} s_k 1[j=k]\n"
   "(a, b, c from the KL / entropy penalties, docs/SPEC.md section 2; s_k the TROLL term's).")

SAMPLE_ARGS = Struct("SampleArgs", (
    _LOGITS, _DTYPE, _LAYOUT, _VOCAB,
    Field("temperature", "const float*", "[rows]"),
    Field("top_k", "const int32_t*", "[rows]"),
    Field("top_p", "const float*", "[rows]"),
    Field("min_p", "const float*", "[rows]"),
    Field("seed", "const uint64_t*", "[rows]"),
    Field("num_samples", "int64_t"),
    Field("adaptive", "int", "0 or 1"),
    Field("t_min", "float"),
    Field("t_max", "float"),
    Field("h_low", "float"),
    Field("h_high", "float"),
    Field("tokens", "int64_t*", "[rows, num_samples]"),
    Field("logprobs", "float*", "[rows, num_samples]"),
    Field("raw_logprobs", "float*", "[rows, num_samples]"),
    Field("entropy", "float*", "[rows]"),
    Field("score_tokens", "const int64_t*", "[rows] or null: instead of drawing, score these tokens (num_samples == 1): tokens[row] = score_tokens[row], its log-probs as a draw of it would give (logprobs -inf when it is outside the kept set)", optional=True),
    Field("kept_min", "float*", "[rows] or null: the row's kept-set threshold on x (-inf: nothing filtered; greedy rows: the maximum)", optional=True),
), "Sampling (docs/SPEC.md section 8), num_samples draws per row. Per row: temperature T (T == 0:\n"
   "greedy), or with `adaptive` T = t_min + (t_max - t_min) * clamp((H1 - h_low) / (h_high - h_low), 0, 1)\n"
   "from the row's entropy H1 at temperature 1. Then, on x = z / T, the kept set is\n"
   "{j : x_j >= threshold}, threshold = max(t_k, t_p, t_min_p):\n"
   "  t_k: the top_k-th largest x (top_k <= 0 or >= vocab: -inf);\n"
   "  t_p: the largest t with mass{x_j >= max(t, t_k)} >= top_p * mass{x_j >= t_k} (top_p >= 1: -inf);\n"
   "  t_min_p: max x + log(min_p) (min_p <= 0: -inf).\n"
   "Ties at a threshold are all kept. Thresholds are found without sorting (e.g. bisection on the\n"
   "order-preserving integer key of x, one counting pass per step). The draw is Gumbel-max over\n"
   "the kept set: argmax_j (x_j + G_j), ties to the lower id, G_j = -log(-log u_j) with\n"
   "  u_j = ((rng_bits(seed[row], sample, j) >> 9) + 0.5) * 2^-23, exact in fp32, never 0 or 1\n"
   "  (see rng_uniform in row_math.h).\n"
   "Outputs per draw: token, its log-prob under the kept set renormalised (0 when greedy) and under\n"
   "the unfiltered temperature-T distribution (T = 1 when greedy); per row: the unfiltered entropy\n"
   "at T (T = 1 when greedy). Rows with NaN, or with no finite entry, are rejected by the caller.")

STRUCTS = (ROW_LAYOUT, TOKEN_LOSS_PARAMS, TOKEN_LOGPROBS_FWD_ARGS, TOKEN_LOGPROBS_BWD_ARGS,
           POLICY_LOSS_FUSED_ARGS, KL_DIV_FWD_ARGS, KL_DIV_BWD_ARGS, ROW_TOPK_ARGS, SAMPLE_ARGS,
           JSD_FWD_ARGS, JSD_BWD_ARGS, TROLL_ARGS)

KERNELS = {k.name: k for k in (
    Kernel("token_logprobs_fwd", TOKEN_LOGPROBS_FWD_ARGS, "token_logprobs"),
    Kernel("token_logprobs_bwd", TOKEN_LOGPROBS_BWD_ARGS, "token_logprobs"),
    Kernel("policy_loss_fused", POLICY_LOSS_FUSED_ARGS, "policy_loss"),
    Kernel("kl_div_fwd", KL_DIV_FWD_ARGS, "kl_div"),
    Kernel("kl_div_bwd", KL_DIV_BWD_ARGS, "kl_div"),
    Kernel("row_topk", ROW_TOPK_ARGS, "row_topk"),
    Kernel("sample", SAMPLE_ARGS, "sample"),
    Kernel("jsd_fwd", JSD_FWD_ARGS, "distill"),
    Kernel("jsd_bwd", JSD_BWD_ARGS, "distill"),
    Kernel("troll", TROLL_ARGS, "troll"),
)}

# The float fields of TokenLossParams, in declaration order: the Triton kernel takes them as one
# named tuple (its enum fields are compile-time constants there).
TOKEN_LOSS_FLOATS = tuple(f.name for f in TOKEN_LOSS_PARAMS.fields if f.ctype == "float")


def struct(cname: str) -> Struct:
    for s in STRUCTS:
        if s.cname == cname:
            return s
    raise KeyError(cname)


def enum(cname: str) -> Enum:
    for e in ENUMS:
        if e.cname == cname:
            return e
    raise KeyError(cname)


def _check() -> None:
    """Consistency of the declarations themselves (run at import)."""
    struct_names = {s.cname for s in STRUCTS}
    for e in ENUMS:
        assert len(set(e.names)) == len(e.names), e.cname
        assert len({c for _, c in e.members}) == len(e.members), e.cname
    for s in STRUCTS:
        assert len(set(s.names)) == len(s.names), f"{s.cname}: duplicate field"
        for f in s.fields:
            known = f.ctype in POINTER_TYPES or f.ctype in SCALAR_TYPES or f.ctype == "DType" or f.ctype in struct_names
            assert known, f"{s.cname}.{f.name}: unknown type {f.ctype}"
            assert f.enum is None or (f.ctype == "int" and enum(f.enum)), f"{s.cname}.{f.name}"
            assert f.derived is None or f.derived in s.names, f"{s.cname}.{f.name}"
            assert not f.optional or f.ctype in POINTER_TYPES, f"{s.cname}.{f.name}: only pointers are optional"
        flags = [f.optional for f in s.fields]
        assert flags == sorted(flags), f"{s.cname}: optional fields come after the required ones"
    for k in KERNELS.values():
        assert len(set(k.launch_params)) == len(k.launch_params), k.name


_check()


# --- C++ header generation ---------------------------------------------------------------------

HEADER_PATH = Path("csrc") / "include" / "rlfuse" / "schema.h"
_REPO = Path(__file__).resolve().parents[2]


def _comment(text: str, indent: str = "") -> list[str]:
    return [f"{indent}//{' ' if line else ''}{line}" for line in text.splitlines()]


def _macro_lines(name: str, entries: list[tuple[str, str]]) -> list[str]:
    """A multi-line #define whose entries are (code, comment); continuation backslashes aligned."""
    body = []
    for code, comment in entries:
        body.append(f"  {code}" + (f"  /* {comment} */" if comment else ""))
    lines = [f"#define {name}(X)"] + body
    width = max(len(line) for line in lines) + 1
    return [line.ljust(width) + "\\" for line in lines[:-1]] + [lines[-1]]


def _field_docs(s: Struct, width: int = 100) -> list[str]:
    """The documented fields of ``s`` as an aligned comment block."""
    documented = [f for f in s.fields if f.doc and f.doc != f.enum]
    if not documented:
        return []
    pad = max(len(f.name) for f in documented)
    lines = ["//"]
    for f in documented:
        head = f"//   {f.name.ljust(pad)}  "
        lines += textwrap.wrap(f.doc, width, initial_indent=head, subsequent_indent="//" + " " * (len(head) - 2))
    return lines


def generate_header() -> str:
    """The text of csrc/include/rlfuse/schema.h."""
    out = [
        "// GENERATED by `python python/rlfuse/_schema.py --write` from that file: do not edit.",
        "// tests/test_schema.py fails when this file differs from what the schema generates.",
        "//",
        "// The kernel interface declared once: enums, the per-token loss parameters and every kernel's",
        "// argument struct, each struct as an X-macro field list X(type, name, Tag) (Tag: the enum an",
        "// int field holds, void otherwise) and defined from it. visit_fields(s, f) calls",
        "// f(\"name\", s.name, (Tag*)nullptr) per field in order (csrc/bindings.cpp fills structs by name).",
        "#pragma once",
        "",
        "#include <cstdint>",
        "",
        "namespace rlfuse {",
        "",
        "// ---- enums (values 0 .. kCount - 1) ----",
        "",
        "template <typename E>",
        "struct EnumInfo;  // kName, kCount, kNames (the Python-side names)",
        "",
    ]
    for e in ENUMS:
        kind = "enum class" if e.scoped else "enum"
        members = ", ".join(f"{c} = {v}" for v, (_, c) in enumerate(e.members))
        out += _comment(e.doc)
        out.append(f"{kind} {e.cname} : int {{ {members} }};")
        names = ", ".join(f'"{n}"' for n in e.names)
        out += [
            "template <>",
            f"struct EnumInfo<{e.cname}> {{",
            f'  static constexpr const char* kName = "{e.cname}";',
            f"  static constexpr int kCount = {len(e)};",
            f"  static constexpr const char* kNames[kCount] = {{{names}}};",
            "};",
            "",
        ]
    out += [
        "// ---- structs ----",
        "",
        "#define RLFUSE_SCHEMA_DECLARE_FIELD(type, name, Tag) type name;",
        "#define RLFUSE_SCHEMA_VISIT_FIELD(type, name, Tag) f(#name, s.name, static_cast<Tag*>(nullptr));",
        "",
    ]
    for s in STRUCTS:
        macro = f"RLFUSE_FIELDS_{s.cname}"
        entries = [(f"X({f.ctype}, {f.name}, {f.enum or 'void'})", "") for f in s.fields]
        out += _comment(s.doc)
        out += _field_docs(s)
        out += _macro_lines(macro, entries)
        out += [
            f"struct {s.cname} {{",
            f"  {macro}(RLFUSE_SCHEMA_DECLARE_FIELD)",
            "};",
            f'constexpr const char* struct_name(const {s.cname}*) {{ return "{s.cname}"; }}',
            "template <typename F>",
            f"void visit_fields({s.cname}& s, F&& f) {{",
            f"  {macro}(RLFUSE_SCHEMA_VISIT_FIELD)",
            "}",
            "template <typename F>",
            f"void visit_fields(const {s.cname}& s, F&& f) {{",
            f"  {macro}(RLFUSE_SCHEMA_VISIT_FIELD)",
            "}",
            "",
        ]
    out += [
        "#undef RLFUSE_SCHEMA_DECLARE_FIELD",
        "#undef RLFUSE_SCHEMA_VISIT_FIELD",
        "",
        "// ---- kernels: X(name, Args) -> name_cpu(const Args&, int num_threads),",
        "//      name_cuda(const Args&, void* stream), rlfuse._C.name_cpu / name_cuda(**fields) ----",
    ]
    out += _macro_lines("RLFUSE_KERNELS", [(f"X({k.name}, {k.args.cname})", "") for k in KERNELS.values()])
    out += ["", "}  // namespace rlfuse", ""]
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Generate csrc/include/rlfuse/schema.h from this schema.")
    parser.add_argument("--write", action="store_true", help="write the header into the checkout")
    parser.add_argument("--check", action="store_true", help="exit 1 if the checked-in header differs")
    parser.add_argument("--root", type=Path, default=_REPO, help="repository root (default: this checkout)")
    args = parser.parse_args(argv)
    path = args.root / HEADER_PATH
    text = generate_header()
    if args.write:
        path.write_text(text)
        print(f"wrote {path}")
        return 0
    if args.check:
        same = path.exists() and path.read_text() == text
        print(f"{path}: {'up to date' if same else 'differs from the schema: run python python/rlfuse/_schema.py --write'}")
        return 0 if same else 1
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
