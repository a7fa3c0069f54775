"""``rlfuse.LinearLogits``: logits that never exist (issue 15).

A ``LinearLogits(hidden, weight, bias=None, *, scale=None, softcap=None, chunk_tokens=None,
batch_invariant=False)`` stands for the logits

    logits = softcap * tanh(scale * (hidden @ weight.T + bias) / softcap)

(``scale`` 1 and no ``tanh`` when not given) of ``hidden [..., D]``, the lm_head ``weight [V, D]``
and ``bias [V]``, without ever storing them: the functions here make the logits of ``chunk_tokens``
tokens at a time with the platform GEMM (``torch.addmm``: cuBLAS on GPU, the CPU BLAS here; never a
GEMM of our own) into one reused ``[chunk, V]`` buffer, run the existing row kernels on that buffer,
and send the gradient through the GEMMs' own backward formulas:

    dpre = dL/dlogits * (1 - t^2),  t = tanh(scale * pre / softcap) kept in fp32 from the forward
    grad_hidden[chunk] = scale * dpre @ W      grad_W += scale * dpre.T @ hidden[chunk]  (fp32 accumulator)
    grad_b += scale * dpre.sum(0)              (fp32 accumulator)

``scale`` and ``1 / softcap`` ride in the GEMMs' ``alpha`` / ``beta`` (no pass over the chunk for
them); softcap costs two elementwise passes in the forward and two in the backward. A gradient is
computed only for the tensors among hidden / weight / bias that require one (a frozen or LoRA'd
lm_head costs no weight-gradient GEMM).

Two paths, as for materialised logits (ARCHITECTURE.md, "The two paths for a loss"):

* **General** (``linear_token_logprobs``, ``linear_entropy``; any loss on top): the forward keeps
  only per-token ``lse`` and entropy (O(N)); the backward recomputes each chunk's logits, lets
  ``token_logprobs_bwd_inplace`` write dL/dlogits into the chunk buffer, and runs the two gradient
  GEMMs on it.
* **Fused** (``linear_fused_policy_loss``; token-local policy losses): the forward runs
  ``policy_loss_fused_inplace`` on each chunk buffer, which writes dL/dlogits there, and the gradient
  GEMMs follow at once; the backward only rescales the three gradients by ``grad_output`` (the rules
  of ``FusedPolicyLoss.backward``).

Memory: one ``[chunk, V]`` buffer in the compute dtype (plus an fp32 one with ``softcap``), the
``[N, D]`` hidden gradient, the ``[V, D]`` fp32 weight-gradient accumulator, O(N) per-token values:
O(chunk x V + N x D + V x D), never O(N x V). (A ``hidden`` view whose rows cannot be addressed as
``[N, D]`` without a copy, e.g. ``hidden[:, :-1]``, is copied once: O(N x D).)

Compute dtype: the logits are made in the inputs' dtype, as the model's ``lm_head`` would make them;
under ``torch.autocast`` (enabled for the tensors' device type when the op is called) in the autocast
dtype, exactly as autocast runs ``F.linear`` (inputs cast to it, GEMM output in it; float64 is never
autocast). The choice is recorded in the forward and reused by the backward's recomputation.

Masked tokens: given a mask, only valid rows ever reach a GEMM or a kernel (one ``nonzero`` of the
mask: a host synchronisation, since the number of valid rows sets the shapes). Their log-prob and
entropy are reported as 0 (materialised logits report the real values there; every loss and metric
ignores them either way) and their hidden rows get a zero gradient.

``batch_invariant=True``: every GEMM and kernel launch has the same shape whatever the batch: each
chunk is padded to ``chunk_tokens`` rows (zero hidden rows, token 0, zero upstream gradients and
weights; discarded), and ``chunk_tokens=None`` then takes the budget rule *without* clamping to
the number of tokens. A token's log-prob, entropy and hidden-gradient row are then bitwise the same
whatever else shares the batch (tests/test_linear_logits.py; for a loss, given the same per-token
weight, e.g. ``token-sum``). Sums over tokens -- the weight and bias gradients, and the loss itself --
cannot be: their summation order depends on the other tokens.

Precision: every GEMM accumulates in fp32 (the BLAS's / cuBLAS's own accumulation); the weight and
bias gradients are accumulated over chunks in fp32 accumulators and rounded to the parameters' dtype
once at the end. For bf16/fp16 inputs on CUDA the weight-gradient GEMM writes fp32 directly
(``addmm`` with ``out_dtype``; falls back to the CPU scheme if unavailable -- not yet run on a GPU);
on CPU, which has no fp32-output low-precision GEMM, each chunk's product is rounded once to the
inputs' dtype before the fp32 accumulation.

Not traceable by ``torch.compile`` (a host loop over chunks, and the mask's ``nonzero``).

Chunk size (``chunk_tokens=None``): the largest ``c`` with ``c * V * bytes <= CHUNK_BUDGET_BYTES``
for the device type (32 MiB on CPU -- large enough for BLAS efficiency, small enough to stay far
under the fp32 logits; 256 MiB on CUDA, where the GEMM needs more rows to fill the GPU), where
``bytes`` = 4 per logit (8 with ``softcap``: the extra fp32 tanh buffer), rounded down to a multiple
of 64 when at least 128, then clamped to ``[1, N]`` (not clamped to N when ``batch_invariant``).
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from . import _validation as check
from .backends import resolve_backend
from .ops._launch import empty_buffer, split_temperature
from .ops.policy_loss import TokenLossParams, fused_op_arguments, policy_loss_fused_inplace
from .ops.token_logprobs import token_logprobs_bwd_inplace, token_logprobs_fwd
from .source import LogitsSource

__all__ = ["LinearLogits", "linear_token_logprobs", "linear_entropy", "linear_fused_policy_loss",
           "CHUNK_BUDGET_BYTES", "default_chunk_tokens"]

# Bytes of chunk working set per device type (see the module docstring for the rule).
CHUNK_BUDGET_BYTES = {"cpu": 32 << 20, "cuda": 256 << 20}
_DEFAULT_BUDGET = 32 << 20
HIDDEN_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def default_chunk_tokens(vocab: int, device: torch.device, softcap: float | None) -> int:
    """``chunk_tokens=None``: the budget rule before clamping to the number of tokens."""
    budget = CHUNK_BUDGET_BYTES.get(torch.device(device).type, _DEFAULT_BUDGET)
    per_token = max(1, vocab) * (8 if softcap is not None else 4)
    chunk = budget // per_token
    if chunk >= 128:
        chunk -= chunk % 64
    return max(1, chunk)


def _check_tensor(value, name: str) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in HIDDEN_DTYPES:
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {value.dtype}")
    if value.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {value.layout}")


def _finite_real(value, name: str) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.requires_grad:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number or None, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


class LinearLogits(LogitsSource):
    """Logits ``softcap * tanh(scale * (hidden @ weight.T + bias) / softcap)``, made a chunk at a time.

    Args:
        hidden: ``[..., D]`` hidden states (the leading shape is the tokens' shape).
        weight: ``[V, D]`` lm_head weight (possibly tied to the embedding).
        bias: optional ``[V]``.
        scale: optional finite logit scale (Cohere / Granite style), applied to ``hidden @ W.T + b``.
        softcap: optional final logit soft-cap ``> 0`` (Gemma-2 style).
        chunk_tokens: tokens per chunk (positive int), or None for the memory-budget rule
            (``rlfuse.linear`` module docstring; ``CHUNK_BUDGET_BYTES``).
        batch_invariant: fixed GEMM / kernel shapes (every chunk padded to ``chunk_tokens`` rows), so
            a token's outputs and hidden gradient are bitwise independent of the rest of the batch.
        group: a ``torch.distributed`` process group over which the lm_head is split by vocabulary rows
            (Megatron's column-parallel output layer): ``weight`` / ``bias`` are then this rank's rows
            ``[vocab_start, vocab_start + V_r)`` and ``hidden`` is replicated on every rank. None (the
            default): the whole lm_head is here. Pass ``torch.distributed.group.WORLD`` for the
            default group. See ``rlfuse.sharded`` and docs/sharded.md.
        vocab_start: with ``group``, this rank's first vocabulary row; None on every rank means the
            shards lie in group-rank order.
        reduce_hidden_grad: with ``group``, all-reduce (sum) ``hidden``'s gradient over the group in the
            backward, so the replicated ``hidden`` receives the full gradient (Megatron's
            copy-to-tensor-parallel-region). False when the op that made ``hidden`` already sums its
            gradient over the group (e.g. Megatron's sequence-parallel gather).

    hidden, weight and bias must share a dtype (float32, float16, bfloat16, float64) and a device.
    Gradients reach whichever of them requires grad.

    With ``group`` every rank of the group must construct its ``LinearLogits`` (one all_gather of the
    layout) and call the same ops with the same replicated inputs; outputs are identical on every rank
    and equal to the unsharded call's, each rank receives its own shard's weight / bias gradient.
    """

    shard_layout = None  # rlfuse.sharded.ShardLayout when the lm_head is split over a process group

    def __init__(self, hidden: Tensor, weight: Tensor, bias: Tensor | None = None, *, scale=None, softcap=None,
                 chunk_tokens=None, batch_invariant: bool = False, group=None, vocab_start=None,
                 reduce_hidden_grad: bool = True):
        if group is None:
            if vocab_start is not None:
                raise ValueError("vocab_start is for an lm_head split over a process group: pass group= too")
            self._init(hidden, weight, bias, scale, softcap, chunk_tokens, batch_invariant)
            return
        from .sharded import shard_linear_logits

        error = None
        try:  # a local problem is exchanged with the layout: every rank raises, none waits in a collective
            self._init(hidden, weight, bias, scale, softcap, chunk_tokens, batch_invariant)
            if not isinstance(reduce_hidden_grad, bool):
                raise TypeError(f"reduce_hidden_grad must be a bool, got {reduce_hidden_grad!r}")
        except (TypeError, ValueError) as exc:
            error = exc
        self.reduce_hidden_grad = reduce_hidden_grad
        self.shard_layout = shard_linear_logits(self, group, vocab_start, error)
        self.fused_path = False  # the fused kernel cannot see the global row: policy_loss takes the general path

    def _init(self, hidden, weight, bias, scale, softcap, chunk_tokens, batch_invariant):
        _check_tensor(hidden, "hidden")
        _check_tensor(weight, "weight")
        if hidden.dim() < 1:
            raise ValueError("hidden must have shape [..., D], got a 0-dimensional tensor")
        if weight.dim() != 2:
            raise ValueError(f"weight must have shape [V, D], got {tuple(weight.shape)}")
        vocab, dim = weight.shape
        if vocab < 1:
            raise ValueError(f"weight must have shape [V, D] with V >= 1, got {tuple(weight.shape)}")
        if dim != hidden.shape[-1]:
            raise ValueError(
                f"weight must have shape [V, D] with D = hidden.shape[-1] = {hidden.shape[-1]}, "
                f"got {tuple(weight.shape)}"
            )
        if weight.dtype != hidden.dtype:
            raise TypeError(f"weight must have hidden's dtype {hidden.dtype}, got {weight.dtype}")
        if weight.device != hidden.device:
            raise ValueError(f"weight is on {weight.device} but hidden is on {hidden.device}")
        if bias is not None:
            _check_tensor(bias, "bias")
            if bias.shape != (vocab,):
                raise ValueError(
                    f"bias must have shape [V] = ({vocab},) (V = weight.shape[0]), got {tuple(bias.shape)}")
            if bias.dtype != hidden.dtype:
                raise TypeError(f"bias must have hidden's dtype {hidden.dtype}, got {bias.dtype}")
            if bias.device != hidden.device:
                raise ValueError(f"bias is on {bias.device} but hidden is on {hidden.device}")
        if scale is not None:
            scale = _finite_real(scale, "scale")
        if softcap is not None:
            softcap = _finite_real(softcap, "softcap")
            if not softcap > 0:
                raise ValueError(f"softcap must be > 0, got {softcap}")
        if chunk_tokens is not None:
            if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, numbers.Integral):
                raise TypeError(f"chunk_tokens must be a positive int or None, got {chunk_tokens!r}")
            if chunk_tokens < 1:
                raise ValueError(f"chunk_tokens must be a positive int, got {chunk_tokens}")
            chunk_tokens = int(chunk_tokens)
        if not isinstance(batch_invariant, bool):
            raise TypeError(f"batch_invariant must be a bool, got {batch_invariant!r}")
        self.hidden, self.weight, self.bias = hidden, weight, bias
        self.scale, self.softcap = scale, softcap
        self.chunk_tokens, self.batch_invariant = chunk_tokens, batch_invariant

    # --- tensor-like metadata (what the public functions' validation reads) -----------------------

    @property
    def shape(self) -> torch.Size:
        """``hidden.shape[:-1] + (V,)``: the shape of the logits this stands for."""
        return torch.Size(tuple(self.hidden.shape[:-1]) + (self.vocab,))

    @property
    def vocab(self) -> int:
        """The (global) vocabulary ``V``; with ``group``, the sum of every rank's rows."""
        return self.weight.shape[0] if self.shard_layout is None else self.shard_layout.vocab

    @property
    def local_vocab(self) -> int:
        """The rows of ``weight`` held here (``V`` unless the lm_head is split over a group)."""
        return self.weight.shape[0]

    @property
    def collective_group(self):
        """The process group of a split lm_head (None otherwise): the public functions' data checks
        agree over it (``rlfuse._validation.DataChecks``)."""
        return None if self.shard_layout is None else self.shard_layout.group

    @property
    def hidden_dim(self) -> int:
        return self.weight.shape[1]

    @property
    def num_tokens(self) -> int:
        return math.prod(self.hidden.shape[:-1])

    @property
    def dtype(self) -> torch.dtype:
        """The inputs' dtype (the logits' dtype outside autocast; see ``compute_dtype``)."""
        return self.hidden.dtype

    @property
    def device(self) -> torch.device:
        return self.hidden.device

    @property
    def requires_grad(self) -> bool:
        return any(t is not None and t.requires_grad for t in (self.hidden, self.weight, self.bias))

    def compute_dtype(self) -> torch.dtype:
        """The dtype the logits are made in now: the autocast dtype when autocast is enabled for the
        tensors' device type (and they are not float64), else the inputs' dtype."""
        kind = self.device.type
        if self.dtype != torch.float64 and torch.is_autocast_enabled(kind):
            return torch.get_autocast_dtype(kind)
        return self.dtype

    def resolved_chunk_tokens(self, rows: int | None = None) -> int:
        """Tokens per chunk for ``rows`` tokens (default: all of them)."""
        rows = self.num_tokens if rows is None else rows
        if self.chunk_tokens is not None:
            chunk = self.chunk_tokens
        else:  # split over a group: the widest shard's budget, so every rank runs the same chunks
            widest = self.local_vocab if self.shard_layout is None else max(self.shard_layout.sizes)
            chunk = default_chunk_tokens(widest, self.device, self.softcap)
        if self.batch_invariant:
            return chunk  # a fixed shape, whatever the batch
        return max(1, min(chunk, rows))

    def materialize(self) -> Tensor:
        """The full ``[..., V]`` logits with plain torch ops (differentiable; O(N x V) memory). For
        tests and comparisons. Split over a group: gathered from every rank, not differentiable."""
        if self.shard_layout is not None:
            with torch.no_grad():
                return self.shard_layout.wrap(self._logits_of(self.hidden, self.weight, self.bias)).materialize()
        return self._logits_of(self.hidden, self.weight, self.bias)

    def _logits_of(self, hidden: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """The logits of some hidden rows with plain, differentiable torch ops (autocast applies as
        to ``F.linear``)."""
        logits = torch.nn.functional.linear(hidden, weight, bias)
        if self.scale is not None:
            logits = logits * self.scale
        if self.softcap is not None:
            logits = self.softcap * torch.tanh(logits / self.softcap)
        return logits

    def detach(self) -> "LinearLogits":
        if self.shard_layout is not None:  # the same layout, no collective
            out = object.__new__(LinearLogits)
            out.__dict__.update(self.__dict__)
            out.hidden, out.weight = self.hidden.detach(), self.weight.detach()
            out.bias = None if self.bias is None else self.bias.detach()
            return out
        return LinearLogits(self.hidden.detach(), self.weight.detach(),
                            None if self.bias is None else self.bias.detach(), scale=self.scale,
                            softcap=self.softcap, chunk_tokens=self.chunk_tokens,
                            batch_invariant=self.batch_invariant)

    # --- the row work of the public ops (rlfuse.source.LogitsSource) -----------------------------

    fused_path = True

    def _local(self) -> "LinearLogits":
        """Split over a group: this rank's rows as an unsharded ``LinearLogits`` (its logits are the
        local columns) with the agreed chunk size, and ``hidden`` whose gradient is all-reduced over the
        group in the backward (``reduce_hidden_grad``). For ``map_rows`` in ``rlfuse.sharded``."""
        from .sharded import hidden_with_reduced_grad

        out = object.__new__(LinearLogits)
        out.__dict__.update(self.__dict__)
        out.shard_layout, out.fused_path = None, True
        if self.chunk_tokens is None:
            out.chunk_tokens = default_chunk_tokens(max(self.shard_layout.sizes), self.device, self.softcap)
        out.hidden = hidden_with_reduced_grad(self)
        return out

    def _token_logprobs(self, tokens, temperature, backend, mask=None):
        return _token_logprobs(self, tokens, temperature, backend, mask, True)

    def _fused_policy_loss(self, tokens, per_token, temperature, params, backend, valid, clip_rows=(None, None, None)):
        if self.shard_layout is not None:
            raise ValueError("a LinearLogits split over a process group has no fused path: use path='general'")
        loss, logp, entropy = linear_fused_policy_loss(self, tokens, per_token, temperature, params, backend, valid,
                                                       clip_rows)
        return loss, logp.reshape(-1), entropy.reshape(-1)  # flat [N], as FusedPolicyLoss's

    def _kl_divergence(self, other, direction, temperature, backend, mask=None):
        from .functional import checked_kl_divergence

        if self.shard_layout is not None or getattr(other, "shard_layout", None) is not None:
            from .sharded import linear_kl_divergence

            return linear_kl_divergence(self, other, direction, temperature, backend, mask)

        def kl(x, y, *t):  # the arguments were validated by the public call
            return (checked_kl_divergence(x, y, direction, chunk_temperature(temperature, t), None, backend),)

        return map_rows(kl, [self, other], temperature_rows(temperature), mask=mask)[0].reshape(self.shape[:-1])

    def _sparse_logprobs(self, tokens, k, threshold, temperature, backend):
        from .troll import SparseLogprobs, sparse_logprobs

        if self.shard_layout is not None:
            from .sharded import linear_sparse_logprobs

            return linear_sparse_logprobs(self, tokens, k, threshold, temperature, backend)

        def topk(x, tok, *t):
            out = sparse_logprobs(x, tok, k, threshold, chunk_temperature(temperature, t), backend)
            return out.ids, out.logprobs, out.count

        with torch.no_grad():
            ids, logprobs, count = map_rows(topk, [self], [tokens, *temperature_rows(temperature)])
        lead = self.shape[:-1]
        return SparseLogprobs(ids.reshape(*lead, k), logprobs.reshape(*lead, k), count.reshape(lead), self.vocab)

    def _troll_token_loss(self, tokens, advantages, old_logprobs, old_topk, config, backend, valid_tokens,
                          temperature=None):
        from .troll import troll_token_loss

        if self.shard_layout is not None:
            from .sharded import linear_troll_token_loss

            return linear_troll_token_loss(self, tokens, advantages, old_logprobs, old_topk, config, backend,
                                           valid_tokens, temperature)
        return troll_by_chunks(self, self, troll_token_loss, tokens, advantages, old_logprobs, old_topk, config,
                               backend, valid_tokens, temperature)

    def _sample(self, **kwargs):
        from .sampling import per_row_seeds, sample

        if self.shard_layout is not None:
            from .sharded import linear_sample

            return linear_sample(self, **kwargs)
        seeds = per_row_seeds(kwargs.pop("seed", None), kwargs.pop("generator", None), self.num_tokens, self.device)
        return sample_by_chunks(self, self, sample, seeds, kwargs)

    def __repr__(self) -> str:
        extras = [f"{k}={getattr(self, k)}" for k in ("scale", "softcap", "chunk_tokens")
                  if getattr(self, k) is not None]
        if self.batch_invariant:
            extras.append("batch_invariant=True")
        if self.shard_layout is not None:
            layout = self.shard_layout
            extras.append(f"rows=[{layout.vocab_start}, {layout.vocab_end}), rank={layout.rank}/{layout.world_size}")
        return (f"LinearLogits(shape={tuple(self.shape)}, hidden_dim={self.hidden_dim}, dtype={self.dtype}, "
                f"device={self.device}, bias={self.bias is not None}{''.join(', ' + e for e in extras)})")


# --- the chunk machinery ------------------------------------------------------------------------


def _valid_rows(mask: Tensor | None, n: int) -> Tensor | None:
    """Indices of the valid rows, or None when every row is valid (then chunks are plain slices).
    ``nonzero`` synchronises with the host: the number of valid rows sets the GEMM shapes."""
    if mask is None:
        return None
    rows = (mask.reshape(-1) != 0).nonzero().squeeze(1)
    return None if rows.numel() == n else rows


def _mm_accumulate_(acc: Tensor, a: Tensor, b: Tensor, alpha: float, scratch: list) -> None:
    """``acc += alpha * a @ b`` with ``acc`` fp32 (fp64 for fp64 inputs) whatever ``a``/``b``'s dtype."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b, alpha=alpha)
        return
    if a.device.type == "cuda":
        try:  # cuBLAS: low-precision inputs, fp32 output accumulated in place (no [V, D] temporary)
            torch.ops.aten.addmm.dtype_out(acc, a, b, acc.dtype, beta=1, alpha=alpha, out=acc)
            return
        except (RuntimeError, NotImplementedError):
            pass
    # CPU (no fp32-output GEMM for bf16/fp16 inputs): the chunk's product in the inputs' dtype (the
    # BLAS accumulates it in fp32, then rounds it once), accumulated over chunks in fp32.
    if not scratch or scratch[0].shape != acc.shape:
        scratch[:] = [torch.empty(acc.shape, dtype=a.dtype, device=a.device)]
    acc.add_(torch.mm(a, b, out=scratch[0]), alpha=alpha)


class _Chunks:
    """One call's chunk loop over the (valid) rows of a LinearLogits: buffers, logits, gradients."""

    def __init__(self, src: LinearLogits, hidden, weight, bias, rows: Tensor | None, cdtype: torch.dtype):
        self.src = src
        self.cdtype = cdtype
        self.acc_dtype = torch.float64 if cdtype == torch.float64 else torch.float32
        self.hidden2d = hidden.reshape(-1, src.hidden_dim)
        self.rows = rows
        self.n = self.hidden2d.shape[0] if rows is None else rows.numel()
        self.chunk = src.resolved_chunk_tokens(self.n)
        self.padded = src.batch_invariant
        self.n_pad = -(-self.n // self.chunk) * self.chunk if self.padded else self.n
        self.scale = 1.0 if src.scale is None else src.scale
        self.softcap = src.softcap
        self.weight = weight.to(cdtype)  # a no-op outside autocast
        self.bias = None if bias is None else bias.to(cdtype)
        device, vocab = hidden.device, src.local_vocab
        rows_per_buffer = min(self.chunk, self.n_pad)
        self.buf = empty_buffer((rows_per_buffer, vocab), cdtype, device) if self.n_pad else None
        self.tbuf = None
        if self.softcap is not None and self.n_pad:
            self.tbuf = empty_buffer((rows_per_buffer, vocab), self.acc_dtype, device)
        self.hbuf = None
        if self.padded and self.n_pad:
            self.hbuf = torch.empty((self.chunk, src.hidden_dim), dtype=cdtype, device=device)
        self.scratch: list = []

    def bounds(self):
        return [(r0, min(r0 + self.chunk, self.n_pad)) for r0 in range(0, self.n_pad, self.chunk)]

    def pad(self, values: Tensor) -> Tensor:
        """Per-row values ``[n]`` (contiguous) zero-padded to ``[n_pad]``."""
        values = values.reshape(-1).contiguous()
        if self.n_pad == self.n:
            return values
        out = values.new_zeros(self.n_pad)
        out[: self.n] = values
        return out

    def gather(self, values: Tensor) -> Tensor:
        """A per-token tensor (any shape with N elements) at the valid rows, padded: ``[n_pad]``."""
        flat = values.reshape(-1)
        if self.rows is not None:
            flat = flat.index_select(0, self.rows)
        return self.pad(flat)

    def gather_temperature(self, temperature):
        """A number as it is; a per-token temperature at the valid rows, padded with 1 (a padding
        row's T must stay a valid scale): ``[n_pad]``."""
        if not isinstance(temperature, Tensor):
            return temperature
        rows = self.gather(temperature)
        if self.n_pad > self.n:
            rows[self.n:] = 1.0
        return rows

    def hidden_chunk(self, r0: int, r1: int) -> Tensor:
        """``[r1 - r0, D]`` hidden rows of the chunk in the compute dtype (zero rows past ``n``)."""
        end = min(r1, self.n)
        if self.rows is None:
            rows = self.hidden2d[r0:end]
        else:
            rows = self.hidden2d.index_select(0, self.rows[r0:end])
        if not self.padded:
            return rows.to(self.cdtype)
        h = self.hbuf[: r1 - r0]
        h[: end - r0].copy_(rows)
        h[end - r0:].zero_()
        return h

    def logits(self, h: Tensor) -> Tensor:
        """The chunk's logits in the chunk buffer (a ``[m, V]`` contiguous view). With softcap the GEMM
        makes ``v = scale * pre / softcap`` (both factors in its alpha / beta), the fp32 buffer keeps
        ``t = tanh(v)`` for the backward chain, and the logits are ``softcap * t`` (one rounding)."""
        m = h.shape[0]
        buf = self.buf[:m]
        w_t = self.weight.t()
        alpha = self.scale if self.softcap is None else self.scale / self.softcap
        if self.bias is not None:
            torch.addmm(self.bias, h, w_t, beta=alpha, alpha=alpha, out=buf)
        elif alpha != 1.0:
            torch.addmm(buf, h, w_t, beta=0, alpha=alpha, out=buf)
        else:
            torch.mm(h, w_t, out=buf)
        if self.softcap is not None:
            t = self.tbuf[:m]
            if buf.dtype == t.dtype:
                torch.tanh(buf, out=t)
            else:  # tanh of the compute-dtype value, in fp32
                t.copy_(buf).tanh_()
            torch.mul(t, self.softcap, out=buf)
        return buf

    def backprop(self, r0: int, r1: int, h: Tensor, dlogits: Tensor, grads: "_Grads") -> None:
        """Gradient GEMMs of one chunk; ``dlogits`` (the chunk buffer) holds dL/dlogits, with rows of
        padding already zero."""
        m = dlogits.shape[0]
        dpre = dlogits
        if self.softcap is not None:
            # d logits / d (scale * pre) = 1 - t^2 (as autograd's tanh backward), in fp32, one rounding;
            # the scale rides in the GEMMs' alpha below.
            t2 = self.tbuf[:m].square_()
            dlogits.addcmul_(dlogits, t2, value=-1.0)
        s = self.scale
        if grads.hidden is not None:
            end = min(r1, self.n)
            if self.rows is None and not self.padded and grads.hidden.dtype == dpre.dtype:
                out = grads.hidden[r0:end]  # straight into the gradient's rows
                torch.addmm(out, dpre, self.weight, beta=0, alpha=s, out=out)
            else:
                gh = torch.mm(dpre, self.weight)
                if s != 1.0:
                    gh.mul_(s)
                if self.rows is None:
                    grads.hidden[r0:end].copy_(gh[: end - r0])
                else:
                    grads.hidden.index_copy_(0, self.rows[r0:end], gh[: end - r0].to(grads.hidden.dtype))
        if grads.weight is not None:
            _mm_accumulate_(grads.weight, dpre.t(), h, s, self.scratch)
        if grads.bias is not None:
            grads.bias.add_(dpre.sum(0, dtype=grads.bias.dtype), alpha=s)


class _Grads:
    """The gradients being accumulated: hidden ``[N, D]`` (its dtype), weight / bias in fp32."""

    def __init__(self, src: LinearLogits, chunks: _Chunks, hidden, weight, bias, needs):
        need_h, need_w, need_b = needs
        n_all = chunks.hidden2d.shape[0]
        self.hidden = None
        if need_h:
            alloc = torch.zeros if chunks.rows is not None else torch.empty
            self.hidden = alloc((n_all, src.hidden_dim), dtype=hidden.dtype, device=hidden.device)
        self.weight = torch.zeros(weight.shape, dtype=chunks.acc_dtype, device=weight.device) if need_w else None
        self.bias = torch.zeros(bias.shape, dtype=chunks.acc_dtype, device=bias.device) if need_b else None

    def results(self, hidden, weight, bias):
        gh = None if self.hidden is None else self.hidden.view(hidden.shape)
        gw = None if self.weight is None else self.weight.to(weight.dtype)
        gb = None if self.bias is None else self.bias.to(bias.dtype)
        return gh, gw, gb


def _scatter_rows(values: Tensor, chunks: _Chunks, shape) -> Tensor:
    """``[n_pad]`` per-valid-row values -> the tokens' shape, 0 at masked positions."""
    values = values[: chunks.n]
    if chunks.rows is None:
        return values.reshape(shape)
    out = values.new_zeros(math.prod(shape))
    out.index_copy_(0, chunks.rows, values)
    return out.view(shape)


# --- any tensor op, a chunk of rows at a time --------------------------------------------------


def map_rows(fn, sources, per_row=(), mask: Tensor | None = None, pad: bool | None = None):
    """``fn(*logits_chunks, *per_row_chunks)`` over chunks of rows, for ops whose row work is a tensor
    op with no chunked kernel path of its own (KL, sparse top-k, TROLL, sampling).

    ``sources``: LinearLogits (the first one sets the chunk size) or ``[..., V]`` tensors with the
    same rows. ``per_row``: tensors whose leading dimensions are the tokens' shape (or one flat ``N``).
    ``fn`` returns a tuple of tensors with one leading row per chunk row; the result is that tuple
    concatenated over chunks: flat ``[N, ...]``. ``mask`` (nonzero = valid): only valid rows reach a
    GEMM; masked rows' outputs are 0. ``pad`` (default: ``batch_invariant``): pad every chunk to the
    fixed chunk size (zero rows, discarded), so GEMM shapes never depend on the batch.

    With gradients, each chunk runs under activation checkpointing: the forward keeps only the
    chunk's inputs, the backward recomputes that chunk's logits and ``fn`` (one chunk at a time), and
    autograd sums the weight / bias gradients of the chunks: O(chunk x V + V x D) transient memory.
    """
    linear = next(s for s in sources if isinstance(s, LinearLogits))
    lead = linear.shape[:-1]
    n = linear.num_tokens
    rows = _valid_rows(mask, n) if mask is not None else None
    n_rows = n if rows is None else rows.numel()
    pad = linear.batch_invariant if pad is None else pad
    chunk = linear.resolved_chunk_tokens(n_rows)

    def flat(t: Tensor) -> Tensor:
        rest = t.shape[len(lead):] if t.shape[: len(lead)] == lead else t.shape[1:]
        return t.reshape(n, *rest)

    inputs = []  # the differentiable tensors, flat: per source (hidden2d, weight, bias) or (logits2d,)
    for src in sources:
        if isinstance(src, LinearLogits):
            inputs += [src.hidden.reshape(n, src.hidden_dim), src.weight, src.bias]
        else:
            inputs.append(src.reshape(n, src.shape[-1]))
    per_row = [flat(t) for t in per_row]
    differentiable = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)

    def rows_of(t: Tensor, r0: int, r1: int) -> Tensor:
        part = t[r0:r1] if rows is None else t.index_select(0, rows[r0:r1].to(t.device))
        if pad and part.shape[0] < chunk:
            part = torch.cat([part, part.new_zeros(chunk - part.shape[0], *part.shape[1:])])
        return part

    def run(r0, r1, *tensors):
        logits, i = [], 0
        for src in sources:
            if isinstance(src, LinearLogits):
                hidden2d, weight, bias = tensors[i : i + 3]
                logits.append(src._logits_of(rows_of(hidden2d, r0, r1), weight, bias))
                i += 3
            else:
                logits.append(rows_of(tensors[i], r0, r1))
                i += 1
        outs = fn(*logits, *(rows_of(t, r0, r1) for t in per_row))
        return tuple(o[: min(r1, n_rows) - r0] for o in outs)

    pieces = []
    for r0 in range(0, n_rows, chunk):
        r1 = min(r0 + chunk, n_rows)
        if differentiable:
            pieces.append(torch.utils.checkpoint.checkpoint(run, r0, r1, *inputs, use_reentrant=False,
                                                            preserve_rng_state=False))
        else:
            pieces.append(run(r0, r1, *inputs))
    if not pieces:  # no valid row: fn on an empty chunk for the outputs' shapes and dtypes
        pieces.append(run(0, 0, *inputs))
    outs = [torch.cat(parts) for parts in zip(*pieces)]
    if rows is None:
        return outs
    return [o.new_zeros(n, *o.shape[1:]).index_copy(0, rows, o) for o in outs]


def temperature_rows(temperature) -> list:
    """``map_rows``' per-row inputs for a temperature: none for a number, the per-token tensor."""
    return [temperature] if isinstance(temperature, Tensor) else []


def chunk_temperature(temperature, chunk_rows):
    """A chunk's temperature inside ``map_rows``: the number, or the chunk's slice of the per-token
    tensor (``chunk_rows``, from :func:`temperature_rows`), its padding rows (zeros) set to T = 1."""
    if not chunk_rows:
        return temperature
    (rows,) = chunk_rows
    return torch.where(rows > 0, rows, torch.ones_like(rows))


def troll_by_chunks(src, source, troll_chunk, tokens, advantages, old_logprobs, old_topk, config, backend,
                    valid_tokens, temperature=None):
    """TROLL's per-token terms a chunk of valid rows at a time: ``troll_chunk(chunk_logits, ...,
    temperature=)`` (the signature of ``troll.troll_token_loss``) on the chunks of ``source`` (``src``
    itself or a split source's local part), the old top-k (and a per-token temperature) sliced with the
    rows. ``fused`` says whether every chunk ran a fused TROLL kernel."""
    from .troll import SparseLogprobs, TrollTerms

    fused = []
    temperature = config.temperature if temperature is None else temperature

    def terms(x, tok, adv, old, ids, logprobs, count, *t):
        out = troll_chunk(x, tok, adv, old, SparseLogprobs(ids, logprobs, count, src.vocab), config, backend,
                          temperature=chunk_temperature(temperature, t))
        fused.append(out.fused)
        return out.tensors()

    per_row = [tokens, advantages, old_logprobs, old_topk.ids, old_topk.logprobs, old_topk.count,
               *temperature_rows(temperature)]
    values = map_rows(terms, [source], per_row, mask=valid_tokens)
    return TrollTerms(*values, fused=bool(fused) and all(fused))


def sample_by_chunks(src, source, sample_chunk, seeds: Tensor, kwargs: dict):
    """``sample`` a chunk of rows at a time: ``sample_chunk(chunk_logits, **kwargs)`` on the chunks of
    ``source`` (what ``map_rows`` chunks: ``src`` itself, or a split source's local part), with the
    per-row arguments (tensors with one value per row) and the per-row ``seeds`` sliced to the chunk,
    so each row draws from its own key: the tokens of the unchunked call."""
    from .sampling import SampleOutput

    rows = src.num_tokens
    kwargs = dict(kwargs, seed=seeds)
    per_row = {name: value for name, value in kwargs.items() if isinstance(value, Tensor) and value.numel() == rows}
    fixed = {name: value for name, value in kwargs.items() if name not in per_row}
    names = list(per_row)
    start = [0]

    def draw(x, *values):
        r0 = start[0]
        start[0] += x.shape[0]
        try:
            out = sample_chunk(x, **fixed, **dict(zip(names, values)))
        except ValueError as error:
            raise ValueError(f"{error} (row numbers counted from token {r0} of the LinearLogits)") from None
        return out.tokens, out.logprobs, out.raw_logprobs, out.entropy

    with torch.no_grad():
        tokens, logprobs, raw, entropy = map_rows(draw, [source], [per_row[n].reshape(rows) for n in names],
                                                  pad=False)
    lead = src.shape[:-1]
    extra = tokens.shape[1:]
    return SampleOutput(tokens.reshape(*lead, *extra), logprobs.reshape(*lead, *extra), raw.reshape(*lead, *extra),
                        entropy.reshape(lead))


def _no_autocast(device: torch.device):
    return torch.autocast(device.type, enabled=False)


# --- general path: log-probs and entropy --------------------------------------------------------


class _LinearTokenLogprobs(torch.autograd.Function):
    """Split over a group (``src.shard_layout``), the two-kernel contract of ``rlfuse.sharded``: the
    forward kernel on each chunk of local logits (the token's local id, or -1 where another rank owns
    it), then one combination of the per-row statistics over the group for all rows (2 all-reduces);
    the backward kernel with the global ``lse`` / entropy on the recomputed local chunks, no collective
    (``hidden``'s gradient is summed over the group by the op that made ``src``'s hidden input)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, src, tokens, rows, temperature, backend, cdtype):
        layout = src.shard_layout
        with _no_autocast(hidden.device):
            chunks = _Chunks(src, hidden, weight, bias, rows, cdtype)
            tok = chunks.gather(tokens.to(torch.int64))
            ids = tok
            if layout is not None:  # the kernels see local ids; -1: another rank's token
                owned = (tok >= layout.vocab_start) & (tok < layout.vocab_end)
                ids = torch.where(owned, tok - layout.vocab_start, torch.full_like(tok, -1))
            logp, entropy, lse = (torch.empty(chunks.n_pad, dtype=torch.float32, device=hidden.device)
                                  for _ in range(3))
            temperature = chunks.gather_temperature(temperature)
            for r0, r1 in chunks.bounds():
                logits = chunks.logits(chunks.hidden_chunk(r0, r1))
                scalar, temperatures = split_temperature(_chunk_rows(temperature, r0, r1))
                lp, en, ls = token_logprobs_fwd(logits, ids[r0:r1], scalar, backend, False, temperatures)
                logp[r0:r1], entropy[r0:r1], lse[r0:r1] = lp, en, ls
            if layout is not None:
                from .sharded import combine_token_stats

                logp, entropy, lse = combine_token_stats(logp, entropy, lse, owned, layout.group)
                unknown = (tok < 0) | (tok >= layout.vocab)  # owned by no rank: NaN, as the kernels give
                logp = torch.where(unknown, torch.full_like(logp, math.nan), logp)
        ctx.save_for_backward(hidden, weight, bias, ids, lse, entropy, rows)
        ctx.src, ctx.temperature, ctx.backend, ctx.cdtype = src, temperature, backend, cdtype
        shape = tokens.shape
        return _scatter_rows(logp, chunks, shape), _scatter_rows(entropy, chunks, shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, bias, tok, lse, entropy, rows = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        none = (None,) * 6
        if not any(needs):
            return None, None, None, *none
        with _no_autocast(hidden.device):
            chunks = _Chunks(ctx.src, hidden, weight, bias, rows, ctx.cdtype)
            # fp32 for the kernels; float64 for float64 logits (the torch backend's row_gradient
            # scatters the upstream gradient into a gradient of the logits' dtype).
            g_dtype = chunks.acc_dtype
            zeros = torch.zeros(chunks.n_pad, dtype=g_dtype, device=hidden.device)
            g_logp = zeros if grad_logp is None else chunks.gather(grad_logp.to(g_dtype))
            g_entropy = zeros if grad_entropy is None else chunks.gather(grad_entropy.to(g_dtype))
            grads = _Grads(ctx.src, chunks, hidden, weight, bias, needs)
            for r0, r1 in chunks.bounds():
                h = chunks.hidden_chunk(r0, r1)
                buf = chunks.logits(h)
                # dL/dlogits into the chunk buffer; padding rows have zero upstream gradients, so
                # the kernels write them as zeros.
                if ctx.backend == "torch" and ctx.src.shard_layout is not None:
                    from .sharded import _torch_token_gradient  # the reference recomputes a local normaliser

                    buf.copy_(_torch_token_gradient(buf, tok[r0:r1], lse[r0:r1], entropy[r0:r1], g_logp[r0:r1],
                                                    g_entropy[r0:r1], _chunk_rows(ctx.temperature, r0, r1)))
                else:
                    scalar, temperatures = split_temperature(_chunk_rows(ctx.temperature, r0, r1))
                    token_logprobs_bwd_inplace(buf, tok[r0:r1], lse[r0:r1], entropy[r0:r1], g_logp[r0:r1],
                                               g_entropy[r0:r1], scalar, ctx.backend, temperatures)
                chunks.backprop(r0, r1, h, buf, grads)
        return *grads.results(hidden, weight, bias), *none


def _chunk_rows(values, r0: int, r1: int):
    """A chunk's part of an optional per-row input: a number or None as it is, else the slice."""
    return values[r0:r1] if isinstance(values, Tensor) else values


def _check_mask(mask, tokens: Tensor) -> None:
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.shape != tokens.shape and mask.shape != (tokens.numel(),):
        raise ValueError(f"mask must have the tokens' shape {tuple(tokens.shape)} (or be flat [N]), "
                         f"got {tuple(mask.shape)}")
    if mask.device != tokens.device:
        raise ValueError(f"mask is on {mask.device} but hidden is on {tokens.device}")


def _check_source(src) -> None:
    if not isinstance(src, LinearLogits):
        raise TypeError(f"expected a rlfuse.LinearLogits, got {type(src).__name__}")


def linear_token_logprobs(src: LinearLogits, tokens: Tensor, temperature: float = 1.0, return_entropy: bool = False,
                          backend: str = "auto", mask: Tensor | None = None, tokens_checked: bool = False):
    """``rlfuse.token_logprobs`` for a ``LinearLogits``: log-probs (and entropy) of ``tokens``.

    Same arguments and outputs as for materialised logits, plus ``mask`` (the tokens' shape or flat
    ``[N]``; a position is valid iff nonzero): masked positions never reach a GEMM, and their log-prob and
    entropy are 0 with zero gradient. Differentiable with respect to whichever of ``src.hidden``,
    ``src.weight``, ``src.bias`` requires grad. ``tokens_checked``: the caller has validated the ids'
    range (as ``functional._forward``'s), so it is not read back here.
    """
    logp, entropy = _token_logprobs(src, tokens, temperature, backend, mask, tokens_checked)
    return (logp, entropy) if return_entropy else logp


def linear_entropy(src: LinearLogits, temperature: float = 1.0, backend: str = "auto",
                   mask: Tensor | None = None) -> Tensor:
    """``rlfuse.entropy`` for a ``LinearLogits`` (``mask`` as in ``linear_token_logprobs``)."""
    _check_source(src)
    tokens = torch.zeros(src.shape[:-1], dtype=torch.int64, device=src.device)
    return _token_logprobs(src, tokens, check.check_temperature(temperature, logits=src), backend, mask,
                           True)[1]


def _token_logprobs(src, tokens, temperature, backend, mask, tokens_checked):
    """``temperature``: a number, or one value per token (a tensor is checked here unless
    ``tokens_checked``: the caller's checks covered it, as they covered the ids)."""
    _check_source(src)
    if tokens_checked:  # type, shape and device only
        if not isinstance(tokens, torch.Tensor) or tokens.shape != src.shape[:-1] or tokens.device != src.device:
            check.check_tokens(tokens, src)  # raises the usual message
        if not isinstance(temperature, Tensor):
            temperature = check.check_temperature(temperature)
    else:
        checks = check.DataChecks(src)  # the ids and a per-token temperature: one host read
        check.check_tokens(tokens, src, checks)
        temperature = check.check_temperature(temperature, tokens, checks)
        checks.run()
    _check_mask(mask, tokens)
    cdtype = src.compute_dtype()
    resolved = resolve_backend(backend, src.device, "token_logprobs", cdtype)
    rows = _valid_rows(mask, tokens.numel())
    hidden = src.hidden
    if src.shard_layout is not None:
        from .sharded import hidden_with_reduced_grad

        hidden = hidden_with_reduced_grad(src)
    return _LinearTokenLogprobs.apply(hidden, src.weight, src.bias, src, tokens, rows, temperature, resolved,
                                      cdtype)


# --- fused path: token-local policy losses ------------------------------------------------------


def _fused_chunk(logits: Tensor, tokens: Tensor, per_token, temperature, params: TokenLossParams,
                 backend: str, clip_rows):
    """The one call of ``rlfuse::policy_loss_fused_inplace``: the single place to adapt when its
    signature changes. The ``TokenLossParams`` fields and the optional per-row inputs (a per-token
    ``temperature``, ``clip_rows``) are built by ``fused_op_arguments``, as in
    ``FusedPolicyLoss.forward``. Returns (per-token loss, logp, entropy) and leaves dL/dlogits in
    ``logits``."""
    temperature, op_kwargs = fused_op_arguments(temperature, params, clip_rows)
    return policy_loss_fused_inplace(logits, tokens, *per_token, temperature, backend, **op_kwargs)


def _rescale_(grads, factor: Tensor) -> None:
    """Saved gradients *= factor, in place (their version counters kept: they are saved tensors)."""
    for g in grads:
        if g is None:
            continue
        with torch.autograd._unsafe_preserve_version_counter(g):
            if g.dtype in (torch.float32, torch.float64):
                g.mul_(factor.to(g.dtype))
            else:  # multiply in fp32, round once
                g.copy_(g.float() * factor)


class _LinearFusedPolicyLoss(torch.autograd.Function):
    """loss = sum of the fused per-token losses over the valid rows; its gradients with respect to
    hidden / weight / bias are made in the forward; the backward rescales them by grad_output."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, src, tokens, rows, per_token, temperature, params, backend, cdtype,
                needs, clip_rows):
        with _no_autocast(hidden.device):
            chunks = _Chunks(src, hidden, weight, bias, rows, cdtype)
            tok = chunks.gather(tokens.to(torch.int64))
            # Padding rows: advantages, old/ref log-probs and both weights 0, so their loss and
            # gradient rows are 0.
            per_row = [chunks.gather(p.to(torch.float32)) for p in per_token]
            temperature = chunks.gather_temperature(temperature)
            clip_rows = [None if c is None else chunks.gather(c.to(torch.float32)) for c in clip_rows]
            loss, logp, entropy = (torch.empty(chunks.n_pad, dtype=torch.float32, device=hidden.device)
                                   for _ in range(3))
            grads = _Grads(src, chunks, hidden, weight, bias, needs)
            for r0, r1 in chunks.bounds():
                h = chunks.hidden_chunk(r0, r1)
                buf = chunks.logits(h)
                lo, lp, en = _fused_chunk(buf, tok[r0:r1], [p[r0:r1] for p in per_row],
                                          _chunk_rows(temperature, r0, r1), params, backend,
                                          [_chunk_rows(c, r0, r1) for c in clip_rows])
                loss[r0:r1], logp[r0:r1], entropy[r0:r1] = lo, lp, en
                if any(needs):
                    chunks.backprop(r0, r1, h, buf, grads)
            total = loss[: chunks.n].sum()
        # Saved (not kept as ctx attributes): after a backward without retain_graph autograd frees
        # them before AccumulateGrad runs, which then takes the tensors as .grad without a copy.
        ctx.save_for_backward(*grads.results(hidden, weight, bias))
        ctx.applied_scale = 1.0  # the factor the saved gradients carry (host path)
        ctx.applied = None  # the same as a device scalar (device path)
        shape = tokens.shape
        logp, entropy = _scatter_rows(logp, chunks, shape), _scatter_rows(entropy, chunks, shape)
        ctx.mark_non_differentiable(logp, entropy)
        return total, logp, entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _grad_logp, _grad_entropy):
        grads = ctx.saved_tensors
        none = (None,) * 10
        present = [g for g in grads if g is not None]
        if not present:
            return None, None, None, *none
        device = present[0].device
        if device.type != "cpu":  # never a host synchronisation: the factor stays on the device
            upstream = grad_loss.detach().to(torch.float32).reshape(())
            if ctx.applied is None:
                ctx.applied = torch.ones((), dtype=torch.float32, device=device)
            applied = ctx.applied
            recoverable = (applied != 0) & torch.isfinite(applied)
            factor = torch.where(upstream == applied, torch.ones_like(applied),
                                 torch.where(recoverable, upstream / applied, torch.full_like(applied, math.nan)))
            _rescale_(grads, factor)
            ctx.applied.copy_(upstream)
            return *grads, *none
        scale = float(grad_loss)  # a CPU tensor: no synchronisation
        if scale == ctx.applied_scale:  # the usual upstream gradient 1: the gradients as made
            return *grads, *none
        if scale == 0.0:
            return None, None, None, *none
        if not math.isfinite(scale):
            return *(None if g is None else g * grad_loss.to(g.dtype) for g in grads), *none
        # In place (no new [V, D] / [N, D] tensors); a repeated backward rescales from this factor.
        _rescale_(grads, torch.tensor(scale / ctx.applied_scale, dtype=torch.float32))
        ctx.applied_scale = scale
        return *grads, *none


def linear_fused_policy_loss(src: LinearLogits, tokens: Tensor, per_token, temperature,
                             params: TokenLossParams, backend: str, valid: Tensor | None = None,
                             clip_rows=(None, None, None)):
    """The fused path of ``rlfuse.policy_loss`` for a ``LinearLogits``: ``FusedPolicyLoss.apply``'s
    contract with the logits replaced by ``src``.

    Args:
        tokens: ids of ``src.shape[:-1]`` (already validated by the caller).
        per_token: ``(advantages, old_logp, ref_logp, policy_weight, weight)``, each ``[N]`` fp32
            with 0 at masked positions (``losses._fused`` builds them).
        temperature: a number, or a validated per-token float64 tensor (the tokens' shape).
        params (``TokenLossParams``), backend: a resolved kernel backend.
        clip_rows: optional per-token ``clip_low`` / ``clip_high`` / ``dual_clip`` (``[N]`` fp32).
        valid: optional ``[N]`` (or tokens-shaped) mask; rows with ``valid == 0`` are dropped before any
            GEMM (their logp / entropy are reported as 0, their hidden rows get zero gradient).

    Returns ``(loss, logp, entropy)``: the scalar loss (differentiable with respect to whichever of
    ``src.hidden / weight / bias`` requires grad) and detached fp32 logp / entropy of the tokens' shape.
    """
    _check_source(src)
    if src.shard_layout is not None:
        raise ValueError("a LinearLogits split over a process group has no fused path (its rows span ranks)")
    if backend not in ("cpu", "cuda", "triton"):
        raise ValueError(f"the fused path needs a kernel backend ('cpu', 'cuda' or 'triton'), got {backend!r}")
    if valid is not None and valid.numel() != tokens.numel():
        raise ValueError(f"valid must have one entry per token ({tokens.numel()}), got {valid.numel()}")
    rows = _valid_rows(valid, tokens.numel())
    cdtype = src.compute_dtype()
    grad_on = torch.is_grad_enabled()
    needs = tuple(bool(grad_on and t is not None and t.requires_grad) for t in (src.hidden, src.weight, src.bias))
    return _LinearFusedPolicyLoss.apply(src.hidden, src.weight, src.bias, src, tokens, rows, tuple(per_token),
                                        temperature if isinstance(temperature, Tensor) else float(temperature),
                                        params, backend, cdtype, needs, tuple(clip_rows))
