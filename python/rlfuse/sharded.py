"""``rlfuse.ShardedLogits``: logits split over the vocabulary across ``torch.distributed`` ranks (issue 16).

Each rank of a process group holds ``local_logits [..., V_r]``: the columns ``[vocab_start_r,
vocab_start_r + V_r)`` of the global ``[..., V]`` logits (Megatron's column-parallel lm_head, FSDP
tensor parallelism). Every statistic of a row spans ranks; the ops here compute them with the
**two-kernel contract** of docs/ARCHITECTURE.md ("Logits sources"), never with a gathered row:

1. the existing row kernel runs on the local shard (``token_logprobs_fwd``, ``kl_div_fwd``,
   ``row_topk``): per-row partial statistics, O(N) numbers;
2. collectives combine them (a max, then one sum of a packed ``[N, k]`` tensor): O(N) bytes, never
   O(N x V);
3. per-token math on ``[N]`` tensors, identical on every rank;
4. the existing gradient kernel (``token_logprobs_bwd``, ``kl_div_bwd``) writes this rank's slice
   of the gradient from the *global* normalisers; no gradient collective.

Outputs are identical (bitwise) on every rank. Gradients: each rank receives the gradient of its own
shard, assuming the upstream gradients are the same on every rank (the loss is computed identically
on each rank from these identical outputs, as in Megatron's tensor parallelism).

Combining per-shard statistics. For shard ``r`` the kernel returns ``lse_r``, ``H_r`` (and the
owned token's ``logp_r``); with ``L = max_r lse_r`` (all-reduce MAX) and ``w_r = exp(lse_r - L)``
one all-reduce SUM of ``[w_r, w_r H_r, w_r (L - lse_r), owner ? logp_r + (lse_r - L) : 0]`` gives
``A, B, C, Q`` and

    lse = L + log A        H = (B + C) / A + log A        logp = Q - log A

(``H = sum_r pi_r (H_r + lse - lse_r)`` with ``pi_r = w_r / A``: no cancellation at large logits).
The owner's ``logp_r = (x_y - M_r) - log s_r`` is exact; the shift ``lse_r - L`` between shards
carries the fp32 rounding of the shards' ``lse`` (relative ~6e-8 of ``|lse|``: ~1e-6 at ``|lse| = 20``,
~5e-4 at ``|lse| = 1e4``). Exact log-probs at huge logits across shards would need the kernels to
return the row max next to ``lse`` (docs/sharded.md, "Limitations").

docs/sharded.md lists the collectives of every op, their bytes per token and the limitations.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import torch
import torch.distributed as dist
from torch import Tensor

from . import _validation as check
from .backends import resolve_backend
from .distill import inverse_temperature, support_logprobs, write_support_gradient
from .ops._launch import split_temperature
from .ops.kl_div import DIRECTIONS, kl_div_bwd, kl_div_fwd
from .ops.row_topk import row_topk
from .ops.token_logprobs import token_logprobs_bwd, token_logprobs_fwd
from .reference.token_logprobs import per_row, row_divisor
from .source import LogitsSource

__all__ = ["ShardedLogits", "vocab_parallel_log_probs_from_logits", "vocab_parallel_entropy"]

_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
_CODE_DTYPES = {code: dtype for dtype, code in _DTYPE_CODES.items()}
_MAX_DIMS = 8  # leading dims exchanged exactly; beyond that the rest is folded into one product

# Local problems found before the layout exchange: every rank still takes part in the all_gather,
# then every rank raises the same error naming the rank (no rank is left waiting in a collective).
_OK, _NOT_TENSOR, _BAD_DTYPE, _BAD_NDIM, _EMPTY_SHARD, _BAD_START, _NOT_DENSE, _LOCAL_ERROR = range(8)
_PROBLEMS = {
    _LOCAL_ERROR: (ValueError, "its arguments were rejected (see that rank's error)"),
    _NOT_TENSOR: (TypeError, "local_logits must be a torch.Tensor"),
    _BAD_DTYPE: (TypeError, "local_logits must be float32, float16, bfloat16 or float64"),
    _BAD_NDIM: (ValueError, "local_logits must have shape [..., V_local] (at least one dimension)"),
    _EMPTY_SHARD: (ValueError, "local_logits must hold at least one vocabulary column (V_local >= 1)"),
    _BAD_START: (ValueError, "vocab_start must be None or a non-negative int"),
    _NOT_DENSE: (TypeError, "local_logits must be a dense (strided) tensor"),
}
_ROW_INFO = 6  # problem, start given, start, size, dtype code, ndim; then _MAX_DIMS leading dims

NEG_INF = float("-inf")


# --- process groups and collectives -------------------------------------------------------------


def _resolve_group(group):
    """(group, rank in group, world size); ValueError where no collective can run at all."""
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("ShardedLogits needs an initialised torch.distributed process group "
                         "(torch.distributed.init_process_group)")
    group = dist.group.WORLD if group is None else group
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("this process is not a member of the process group given to ShardedLogits")
    return group, rank, dist.get_world_size(group)


def _comm_device(tensor, group) -> torch.device:
    """Where collective buffers live: the logits' device; for a non-tensor, CUDA under NCCL."""
    if isinstance(tensor, Tensor):
        return tensor.device
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce(tensor: Tensor, op, group) -> Tensor:
    dist.all_reduce(tensor, op=op, group=group)
    return tensor


def _all_gather(tensor: Tensor, group, world: int) -> Tensor:
    """``[world, *tensor.shape]``, in group-rank order."""
    out = torch.empty((world, *tensor.shape), dtype=tensor.dtype, device=tensor.device)
    dist.all_gather(list(out.unbind(0)), tensor.contiguous(), group=group)
    return out


def _group_src(group) -> int:
    """The global rank of the group's rank 0 (what ``dist.broadcast`` takes)."""
    if group is None or group is dist.group.WORLD:
        return 0
    return dist.get_global_rank(group, 0)


def agree(group, device, fn):
    """Run ``fn()`` on every rank; if it raised on any rank, raise on every rank (the failing rank
    its own exception, the others a ValueError naming it), so no rank goes on into a collective that
    another rank will never join. One all-reduce of one number. Returns ``fn()``'s value."""
    error, value = None, None
    try:
        value = fn()
    except (ValueError, TypeError) as exc:
        error = exc
    group, rank, _ = _resolve_group(group)
    flag = torch.tensor([rank + 1 if error is not None else 0], dtype=torch.int64, device=device)
    failed = int(_all_reduce(flag, dist.ReduceOp.MAX, group).item())
    if error is not None:
        raise error
    if failed:
        raise ValueError(f"rank {failed - 1} of the process group rejected its arguments (see that rank's error)")
    return value


# --- the source ----------------------------------------------------------------------------------


def _local_problem(local_logits, vocab_start) -> int:
    if not isinstance(local_logits, Tensor):
        return _NOT_TENSOR
    if local_logits.layout != torch.strided:
        return _NOT_DENSE
    if local_logits.dtype not in _DTYPE_CODES:
        return _BAD_DTYPE
    if local_logits.dim() < 1:
        return _BAD_NDIM
    if local_logits.shape[-1] < 1:
        return _EMPTY_SHARD
    if vocab_start is not None and (isinstance(vocab_start, bool) or not isinstance(vocab_start, numbers.Integral)
                                    or vocab_start < 0):
        return _BAD_START
    return _OK


def _layout_row(local_logits, vocab_start, problem: int, device, extra=()) -> Tensor:
    row = torch.full((_ROW_INFO + _MAX_DIMS + len(extra),), -1, dtype=torch.int64)
    row[0] = problem
    if extra:
        row[_ROW_INFO + _MAX_DIMS:] = torch.tensor([int(value) for _, value in extra], dtype=torch.int64)
    if problem == _OK:
        lead = tuple(local_logits.shape[:-1])
        row[1] = vocab_start is not None
        row[2] = 0 if vocab_start is None else int(vocab_start)
        row[3] = local_logits.shape[-1]
        row[4] = _DTYPE_CODES[local_logits.dtype]
        row[5] = len(lead)
        dims = list(lead[:_MAX_DIMS - 1]) + ([math.prod(lead[_MAX_DIMS - 1:])] if len(lead) >= _MAX_DIMS else [])
        row[_ROW_INFO:_ROW_INFO + len(dims)] = torch.tensor(dims, dtype=torch.int64)
    return row.to(device)


def _check_layout(table: list[list[int]], what: str = "ShardedLogits", extra_names=()):
    """(starts, sizes) from every rank's layout row, or the (exception type, message) that every
    rank raises: the same table on every rank gives the same verdict."""
    for rank, row in enumerate(table):
        if row[0] != _OK:
            kind, message = _PROBLEMS[row[0]]
            return kind, f"{what}: rank {rank}: {message}"
    for i, name in enumerate(extra_names):
        values = [row[_ROW_INFO + _MAX_DIMS + i] for row in table]
        if len(set(values)) > 1:
            return ValueError, f"{what}: {name} must be the same on every rank, got {values} by rank"
    dtypes = [_CODE_DTYPES[row[4]] for row in table]
    if len(set(dtypes)) > 1:
        return TypeError, f"{what}: the logits must have one dtype on every rank, got {dtypes} by rank"
    leads = [tuple(row[_ROW_INFO:_ROW_INFO + min(row[5], _MAX_DIMS)]) + (row[5],) for row in table]
    if len(set(leads)) > 1:
        shapes = [lead[:-1] for lead in leads]
        return ValueError, (f"{what}: the logits must have the same leading shape on every rank "
                            f"(one row per token), got {shapes} by rank")
    given = [bool(row[1]) for row in table]
    sizes = [row[3] for row in table]
    if any(given) and not all(given):
        return ValueError, (f"{what}: vocab_start must be given on every rank or on none, given on ranks "
                            f"{[r for r, g in enumerate(given) if g]} only")
    if not any(given):
        starts = [sum(sizes[:r]) for r in range(len(sizes))]
        return starts, sizes
    starts = [row[2] for row in table]
    order = sorted(range(len(table)), key=lambda r: starts[r])
    position = 0
    for r in order:
        if starts[r] != position:
            what = "overlap" if starts[r] < position else "leave a gap"
            shards = ", ".join(f"rank {q}: [{starts[q]}, {starts[q] + sizes[q]})" for q in order)
            return ValueError, (f"{what}: the shards must tile the vocabulary [0, V) without gaps or "
                                f"overlaps; they {what} at column {min(starts[r], position)} ({shards})")
        position += sizes[r]
    return starts, sizes


@dataclasses.dataclass(frozen=True, eq=False)
class ShardLayout:
    """Which columns of the vocabulary each rank of ``group`` holds (exchanged once, by
    ``exchange_layout``); shared by every source cut the same way, at no further collective."""

    group: object
    rank: int
    world_size: int
    starts: tuple
    sizes: tuple

    @property
    def vocab_start(self) -> int:
        return self.starts[self.rank]

    @property
    def vocab_end(self) -> int:
        return self.starts[self.rank] + self.sizes[self.rank]

    @property
    def vocab(self) -> int:
        return sum(self.sizes)

    def same(self, other: "ShardLayout") -> bool:
        return other.group == self.group and other.starts == self.starts and other.sizes == self.sizes

    def wrap(self, local_logits: Tensor) -> "ShardedLogits":
        """``local_logits`` (this rank's columns) as a ``ShardedLogits`` of this layout: no collective."""
        out = ShardedLogits.__new__(ShardedLogits)
        out._set(local_logits, self)
        return out


def exchange_layout(group, like, vocab_start, device, *, what: str = "ShardedLogits", problem: int | None = None,
                    local_error: BaseException | None = None, extra=()) -> ShardLayout:
    """The layout of a vocabulary split over ``group``, from every rank's ``like`` (a tensor, possibly on
    the meta device, with this rank's ``[..., V_r]`` shape and dtype) and ``vocab_start``: one all_gather
    of ``14 + len(extra)`` int64 per rank. ``extra``: ``(name, int)`` pairs that must be equal on every
    rank. ``local_error``: this rank's arguments were rejected before (then it raises that error, and
    every other rank a ValueError naming it). Every rank decides from the same table, so every rank
    raises or none does: no rank is left waiting in a collective."""
    group, rank, world = _resolve_group(group)
    if local_error is not None:
        problem = _LOCAL_ERROR
    elif problem is None:
        problem = _local_problem(like, vocab_start)
    row = _layout_row(like, vocab_start, problem, device, extra)
    table = _all_gather(row, group, world).tolist()
    if local_error is not None:
        raise local_error
    verdict = _check_layout(table, what, [name for name, _ in extra])
    if isinstance(verdict[1], str):
        raise verdict[0](verdict[1])
    starts, sizes = verdict
    return ShardLayout(group, rank, world, tuple(starts), tuple(sizes))


class ShardedLogits(LogitsSource):
    """Logits ``[..., V]`` split over the vocabulary across the ranks of a process group.

    Args:
        local_logits: ``[..., V_local]`` float32 / float16 / bfloat16 / float64: this rank's columns
            ``[vocab_start, vocab_start + V_local)`` of the global logits. Views whose last dimension
            is contiguous (``logits[:, :-1]``) are read in place, as by every op.
        group: the ``torch.distributed`` process group the vocabulary is split over (None: the default
            group). Every rank of the group must construct its ``ShardedLogits`` (one collective).
        vocab_start: this rank's first column; None on every rank means the shards lie in group-rank
            order (rank 0 first). Given, the shards of all ranks must tile ``[0, V)``.

    The constructor exchanges every rank's (start, size, dtype, leading shape) with one all_gather of
    14 int64, then checks on every rank that the shards tile the vocabulary, share one dtype and one
    leading shape (any local problem, e.g. a wrong dtype on one rank, is also exchanged): every rank
    raises the same ``ValueError`` / ``TypeError``, none is left waiting in a collective.
    """

    fused_path = False  # the fused kernel cannot see the global row: policy_loss takes the general path

    def __init__(self, local_logits: Tensor, group=None, vocab_start: int | None = None):
        group = _resolve_group(group)[0]
        layout = exchange_layout(group, local_logits, vocab_start, _comm_device(local_logits, group))
        self._set(local_logits, layout)

    def _set(self, local_logits, layout: ShardLayout):
        self.local_logits = local_logits
        self.layout = layout
        self.group, self.rank, self.world_size = layout.group, layout.rank, layout.world_size
        self.starts, self.sizes = layout.starts, layout.sizes
        self.vocab_start, self.vocab_end = layout.vocab_start, layout.vocab_end
        self._vocab = layout.vocab

    @classmethod
    def _from_parts(cls, local_logits, like: "ShardedLogits") -> "ShardedLogits":
        """Another local tensor with ``like``'s (already exchanged) layout: no collective."""
        return like.layout.wrap(local_logits)

    @property
    def collective_group(self):
        """The group every rank's data checks agree over (``rlfuse._validation.DataChecks``)."""
        return self.group

    # --- tensor-like metadata ---------------------------------------------------------------------

    @property
    def shape(self) -> torch.Size:
        """The global logits' shape: the leading shape and the global vocabulary ``V``."""
        return torch.Size(tuple(self.local_logits.shape[:-1]) + (self._vocab,))

    @property
    def vocab(self) -> int:
        return self._vocab

    @property
    def local_vocab(self) -> int:
        return self.local_logits.shape[-1]

    @property
    def dtype(self) -> torch.dtype:
        return self.local_logits.dtype

    @property
    def device(self) -> torch.device:
        return self.local_logits.device

    @property
    def requires_grad(self) -> bool:
        return self.local_logits.requires_grad

    def detach(self) -> "ShardedLogits":
        return ShardedLogits._from_parts(self.local_logits.detach(), self)

    def same_layout(self, other: "ShardedLogits") -> bool:
        return isinstance(other, ShardedLogits) and self.layout.same(other.layout)

    def __repr__(self) -> str:
        return (f"ShardedLogits(shape={tuple(self.shape)}, columns=[{self.vocab_start}, {self.vocab_end}), "
                f"rank={self.rank}/{self.world_size}, dtype={self.dtype}, device={self.device})")

    def materialize(self) -> Tensor:
        """The full ``[..., V]`` logits on every rank (one all_gather of O(N x V): for tests and
        debugging only). Not differentiable."""
        lead = tuple(self.local_logits.shape[:-1])
        width = max(self.sizes)
        local = self.local_logits.detach()
        padded = local.new_zeros(lead + (width,))
        padded[..., :self.local_vocab] = local
        gathered = _all_gather(padded, self.group, self.world_size)
        full = local.new_empty(lead + (self._vocab,))
        for r in range(self.world_size):
            full[..., self.starts[r]:self.starts[r] + self.sizes[r]] = gathered[r, ..., :self.sizes[r]]
        return full

    # --- helpers ------------------------------------------------------------------------------------

    def _lead(self) -> tuple:
        return tuple(self.local_logits.shape[:-1])

    def _local_ids(self, tokens: Tensor, valid: Tensor | None = None):
        """(local ids, owned): ``tokens - vocab_start`` where this rank owns the token (and the
        position is valid), else -1 (the kernels then give a NaN log-prob and no indicator term)."""
        tokens = tokens.reshape(self._lead()).to(device=self.device, dtype=torch.int64)
        owned = (tokens >= self.vocab_start) & (tokens < self.vocab_end)
        if valid is not None:
            owned = owned & valid
        return torch.where(owned, tokens - self.vocab_start, torch.full_like(tokens, -1)), owned

    def _valid(self, mask) -> Tensor | None:
        if mask is None:
            return None
        if not isinstance(mask, Tensor):
            raise TypeError(f"mask must be a torch.Tensor or None, got {type(mask).__name__}")
        lead = self._lead()
        if mask.shape != lead and mask.numel() != math.prod(lead):
            raise ValueError(f"mask must have the tokens' shape {lead} (or be flat), got {tuple(mask.shape)}")
        return (mask.reshape(lead) != 0).to(self.device)

    def _resolve(self, backend: str, op: str) -> str:
        return resolve_backend(backend, self.device, op, self.dtype)

    # --- token_logprobs / entropy ------------------------------------------------------------------

    def _token_logprobs(self, tokens: Tensor, temperature: float, backend: str, mask: Tensor | None = None
                        ) -> tuple[Tensor, Tensor]:
        """(logp, entropy), fp32 of the tokens' shape, identical on every rank, differentiable with
        respect to ``local_logits`` (this rank's slice of the gradient). Masked positions read 0 and
        get exactly zero gradient. Collectives: 2 all-reduces (MAX of 4 B, SUM of 16 B per token).
        ``temperature``: a number, or a per-token tensor validated by the caller."""
        temperature = _number_checked(temperature)
        backend = self._resolve(backend, "token_logprobs")
        valid = self._valid(mask)
        local_ids, owned = self._local_ids(tokens, valid)
        logp, entropy = _ShardedTokenLogprobs.apply(self.local_logits, local_ids, owned, valid, temperature, backend,
                                                    self.group)
        # An id outside [0, V) (only if the caller skipped the public check) is owned by no rank: NaN,
        # as the kernels give, never a value.
        ids = tokens.reshape(self._lead()).to(self.device)
        unknown = (ids < 0) | (ids >= self._vocab)
        if valid is not None:
            unknown = unknown & valid
        logp = torch.where(unknown, torch.full_like(logp, math.nan), logp)
        return logp.reshape(tokens.shape), entropy.reshape(tokens.shape)

    def token_logprobs(self, tokens: Tensor, temperature: float = 1.0, return_entropy: bool = False,
                       backend: str = "auto", mask: Tensor | None = None):
        """``rlfuse.token_logprobs`` on this source (tokens are global ids)."""
        temperature = check.check_temperature(temperature, logits=self)
        logp, entropy = self._token_logprobs(tokens, temperature, backend, mask)
        return (logp, entropy) if return_entropy else logp

    def entropy(self, temperature: float = 1.0, backend: str = "auto", mask: Tensor | None = None) -> Tensor:
        tokens = torch.zeros(self._lead(), dtype=torch.int64, device=self.device)
        return self._token_logprobs(tokens, check.check_temperature(temperature, logits=self), backend, mask)[1]

    # --- KL ------------------------------------------------------------------------------------------

    def _other_local(self, other) -> Tensor:
        if isinstance(other, ShardedLogits):
            if not self.same_layout(other):
                raise ValueError(
                    "kl_divergence between ShardedLogits needs both sides sharded the same way (one group, the "
                    f"same columns per rank): {list(zip(self.starts, self.sizes))} vs "
                    f"{list(zip(other.starts, other.sizes))}")
            local = other.local_logits
        elif isinstance(other, Tensor):
            if other.shape[-1] != self._vocab:
                raise ValueError(f"other_logits must be ShardedLogits or a full [..., V] tensor with "
                                 f"V = {self._vocab}, got shape {tuple(other.shape)}")
            local = other[..., self.vocab_start:self.vocab_end]
        else:
            raise TypeError(f"other_logits must be ShardedLogits or a tensor, got {type(other).__name__}")
        if local.shape != self.local_logits.shape:
            raise ValueError(f"other_logits must have the logits' shape {tuple(self.shape)}")
        if local.dtype != self.dtype:
            raise TypeError(f"other_logits must have the logits' dtype {self.dtype}, got {local.dtype}")
        if local.device != self.device:
            raise ValueError(f"other_logits are on {local.device} but logits are on {self.device}")
        return local

    def _kl_divergence(self, other, direction: str, temperature: float, backend: str,
                       mask: Tensor | None = None) -> Tensor:
        """Per-row full-vocabulary KL (docs/SPEC.md section 5) between this source and ``other``
        (ShardedLogits with the same layout, or a full ``[..., V]`` tensor, of which this rank uses its
        columns), differentiable with respect to both local shards. Collectives: 2 all-reduces (MAX of
        8 B, SUM of 12 B per token). ``mask`` is accepted and ignored: every row takes part in the
        collectives, and the caller zeroes masked rows (their upstream gradient then is 0: zero
        gradient rows, written without reading the logits)."""
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be 'forward' or 'reverse', got {direction!r}")
        if getattr(other, "shard_layout", None) is not None:  # a sharded LinearLogits: KL(p || q) = reverse from q
            return other._kl_divergence(self, "reverse" if direction == "forward" else "forward", temperature,
                                        backend, mask)
        del mask
        temperature = _number_checked(temperature)
        other_local = self._other_local(other)
        backend = self._resolve(backend, "kl_div")
        return _ShardedKl.apply(self.local_logits, other_local, temperature, DIRECTIONS[direction], backend,
                                self.group)

    def kl_divergence(self, other, direction: str = "forward", temperature: float = 1.0, backend: str = "auto",
                      mask: Tensor | None = None) -> Tensor:
        kl = self._kl_divergence(other, direction, check.check_temperature(temperature, logits=self), backend)
        valid = self._valid(mask)
        return kl if valid is None else torch.where(valid, kl, torch.zeros_like(kl))

    # --- distillation (docs/distillation.md, "Logits sources") ----------------------------------------

    def _jsd(self, other, beta: float, temperature: float, backend: str) -> Tensor:
        """Per-row generalised JSD(beta) (``0 < beta < 1``) between ``s = softmax(self / T)`` and ``t =
        softmax(other / T)`` (``other``: ShardedLogits with the same layout, or a full ``[..., V]``
        tensor, of which this rank uses and differentiates its columns), float32 (float64 for float64
        logits), identical on every rank, differentiable with respect to both local shards. Collectives:
        3 all-reduces (MAX of 8 B, SUM of 8 B, SUM of 8 B per token; 16 B + 16 B + 16 B for float64
        logits). See ``_ShardedJsd``. ``temperature``: a number, or a per-token tensor validated by the
        caller."""
        temperature = _number_checked(temperature)
        if not 0.0 < beta < 1.0:
            raise ValueError(f"_jsd takes 0 < beta < 1 (beta 0 / 1 are the KLs), got {beta!r}")
        other_local = self._other_local(other)
        backend = self._resolve(backend, "token_logprobs")
        return _ShardedJsd.apply(self.local_logits, other_local, temperature, float(beta), backend, self.group)

    def _support_logprobs(self, ids: Tensor, valid: Tensor, temperature: float, backend: str) -> Tensor:
        """The global log-probs ``log s_k`` at global ``ids [..., K]`` (``valid`` slots; their ids in
        ``[0, V)`` and distinct per row), ``-inf`` at the others; identical on every rank and
        differentiable with respect to the local shard (``distill.SupportLogprobs`` on shards).
        Collectives: 2 all-reduces (MAX of 4 B, SUM of ``16 + 4 (K + 1)`` B per token). See
        ``_ShardedSupportLogprobs``. ``temperature``: a number, or a per-token tensor validated by the
        caller."""
        temperature = _number_checked(temperature)
        backend = self._resolve(backend, "token_logprobs")
        lead = self._lead()
        if tuple(ids.shape[:-1]) != lead or ids.shape != valid.shape:
            raise ValueError(f"ids and valid must have shape {lead + ('K',)}, got {tuple(ids.shape)} and "
                             f"{tuple(valid.shape)}")
        return _ShardedSupportLogprobs.apply(self.local_logits, ids.to(device=self.device, dtype=torch.int64),
                                             valid.to(self.device), temperature, backend, self.vocab_start,
                                             self.group)

    # --- sparse top-k ----------------------------------------------------------------------------------

    def _sparse_logprobs(self, tokens: Tensor, k: int, threshold: float, temperature: float, backend: str):
        """``rlfuse.sparse_logprobs`` with global ids: the local ``row_topk`` kernel (``min(k, max
        V_r)`` candidates and ``lse_r`` per row), one all_gather of them (``(2 k' + 3) x 4`` B per token
        and rank), merged on every rank into the global top-k (descending, ties lower id first)."""
        from .troll import SparseLogprobs, _kept

        temperature = _number_checked(temperature)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {threshold!r}")
        backend = self._resolve(backend, "row_topk")
        with torch.no_grad():
            ids, values, lse, _, _ = self._global_topk(k, temperature, backend)
            ids, logprobs, count = _kept(values, ids, lse, threshold)
        return SparseLogprobs(ids, logprobs, count.to(torch.int32), self._vocab)

    def sparse_logprobs(self, tokens: Tensor, k: int = 64, threshold: float = 1e-5, temperature: float = 1.0,
                        backend: str = "auto"):
        return self._sparse_logprobs(tokens, k, threshold, check.check_temperature(temperature, logits=self),
                                     backend)

    def _global_topk(self, k: int, temperature: float, backend: str, tokens: Tensor | None = None):
        """(ids int32 [..., k] global, values fp32 [..., k] (scaled logits), lse, logp, entropy [...]): the
        global top-k of every row and the token statistics, identical on every rank. The local
        ``row_topk`` kernel gives ``k' = min(k, max V_r)`` candidates and ``(logp_r, H_r, lse_r)``; one
        all_gather of ``[..., 2 k' + 3]`` int32 (values bit-cast) per rank; every rank merges in rank order
        (descending, ties lower id first) and combines the statistics (``_combine_gathered_token_stats``).
        ``logp`` is NaN without ``tokens``."""
        lead = self._lead()
        width = min(k, max(self.sizes))
        local = self.local_logits.detach()
        if tokens is None:
            local_ids = torch.full(lead, -1, dtype=torch.int64, device=self.device)
        else:
            local_ids, _ = self._local_ids(tokens)
        scalar, temperatures = split_temperature(temperature)
        ids, values, logp_r, entropy_r, lse_r = row_topk(local, local_ids, scalar, width, backend, temperatures)
        ids = torch.where(ids >= 0, ids + self.vocab_start, ids).to(torch.int32)
        stats = torch.stack([lse_r.float(), entropy_r.float(), logp_r.float()], -1)
        packed = torch.cat([values.float().contiguous().view(torch.int32), ids, stats.view(torch.int32)], -1)
        gathered = _all_gather(packed, self.group, self.world_size)  # [W, ..., 2 width + 3]
        all_values = gathered[..., :width].contiguous().view(torch.float32)  # [W, ..., width]
        all_ids = gathered[..., width:2 * width]
        all_stats = gathered[..., 2 * width:].contiguous().view(torch.float32)  # [W, ..., 3]
        all_values = torch.movedim(all_values, 0, -2).reshape(*lead, self.world_size * width)
        all_ids = torch.movedim(all_ids, 0, -2).reshape(*lead, self.world_size * width)
        # Ties lower id first: order by id, then a stable descending sort by value (empty slots,
        # -1 / -inf, go last).
        by_id = torch.where(all_ids >= 0, all_ids.to(torch.int64), torch.full_like(all_ids, 2**40, dtype=torch.int64))
        order = torch.argsort(by_id, dim=-1, stable=True)
        all_values, all_ids = all_values.gather(-1, order), all_ids.gather(-1, order)
        top_values, order = torch.sort(all_values, dim=-1, descending=True, stable=True)
        top_ids = all_ids.gather(-1, order)
        if top_values.shape[-1] >= k:
            top_values, top_ids = top_values[..., :k], top_ids[..., :k]
        else:
            pad = k - top_values.shape[-1]
            top_values = torch.cat([top_values, top_values.new_full((*lead, pad), NEG_INF)], -1)
            top_ids = torch.cat([top_ids, top_ids.new_full((*lead, pad), -1)], -1)
        top_ids = torch.where(top_values > NEG_INF, top_ids, torch.full_like(top_ids, -1))
        if tokens is None:
            owned_w = torch.zeros((self.world_size, *lead), dtype=torch.bool, device=self.device)
        else:
            t = tokens.reshape(lead).to(device=self.device, dtype=torch.int64)
            owned_w = torch.stack([(t >= s0) & (t < s0 + n) for s0, n in zip(self.starts, self.sizes)])
        lse_w, entropy_w, logp_w = all_stats.unbind(-1)
        logp, entropy, lse = _combine_gathered_token_stats(logp_w, entropy_w, lse_w, owned_w)
        return top_ids.contiguous(), top_values.contiguous(), lse, logp, entropy

    # --- sampling --------------------------------------------------------------------------------------

    def _sample(self, temperature=1.0, top_k=None, top_p=None, min_p=None, seed=None, generator=None,
                adaptive_temperature=None, backend: str = "auto", num_samples: int = 1):
        """``rlfuse.sample`` on sharded logits: the same tokens as the unsharded call for the same seed
        (random numbers keyed by the global vocabulary position). See ``_sharded_sample``."""
        return _sharded_sample(self, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed,
                              generator=generator, adaptive_temperature=adaptive_temperature, backend=backend,
                              num_samples=num_samples)

    def sample(self, **kwargs):
        return self._sample(**kwargs)

    # --- losses ----------------------------------------------------------------------------------------

    def _troll_token_loss(self, tokens, advantages, old_logprobs, old_topk, config, backend, valid_tokens=None,
                          temperature=None):
        """``troll.troll_token_loss`` on sharded logits: the support from the global top-k, its logits
        gathered from their owners (one all-reduce of ``[N, |S|]``), the projection replicated."""
        return _sharded_troll_token_loss(self, tokens, advantages, old_logprobs, old_topk, config, backend,
                                         valid_tokens, temperature)


# --- combining per-shard statistics ---------------------------------------------------------------


def _combine_lse(lse_r: Tensor) -> Tensor:
    """logsumexp over dim 0 of per-shard ``lse`` in rank order (every rank computes the same bits)."""
    top = lse_r.amax(0)
    shift = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    return shift + torch.exp(lse_r - shift).sum(0).log()


def _token_terms(logp_r: Tensor, entropy_r: Tensor, lse_r: Tensor, owned: Tensor, shift: Tensor) -> Tensor:
    """Per-shard ``[w, w H_r, w (L - lse_r), owner ? logp_r + (lse_r - L) : 0]`` (module docstring),
    whose sum over shards ``_token_finish`` turns into the global statistics."""
    empty = lse_r == NEG_INF  # a shard with no finite entry in the row: contributes nothing
    zero = torch.zeros_like(lse_r)
    w = torch.exp(lse_r - shift)
    return torch.stack([
        w,
        torch.where(empty, zero, w * entropy_r),
        torch.where(empty, zero, w * (shift - lse_r)),
        torch.where(owned, torch.where(empty, torch.full_like(lse_r, NEG_INF), logp_r + (lse_r - shift)), zero),
    ], -1)


def _token_finish(total, weighted_h, weighted_gap, owner_logp, shift):
    """(logp, entropy, lse) from the summed terms: ``logp = Q - log A``, ``H = (B + C) / A + log A``."""
    log_total = torch.log(total)
    return owner_logp - log_total, (weighted_h + weighted_gap) / total + log_total, shift + log_total


def _combine_token_stats(logp_r: Tensor, entropy_r: Tensor, lse_r: Tensor, owned: Tensor, group):
    """Global (logp, entropy, lse) from this shard's kernel outputs. Two all-reduces: MAX of
    ``lse_r`` (4 B per token), SUM of the four terms of ``_token_terms`` (16 B per token)."""
    shift = _all_reduce(lse_r.clone(), dist.ReduceOp.MAX, group)
    packed = _all_reduce(_token_terms(logp_r, entropy_r, lse_r, owned, shift), dist.ReduceOp.SUM, group)
    return _token_finish(*packed.unbind(-1), shift)


def _combine_gathered_token_stats(logp_w: Tensor, entropy_w: Tensor, lse_w: Tensor, owned_w: Tensor):
    """The same from every shard's outputs gathered along dim 0 (summed in rank order)."""
    shift = lse_w.amax(0)
    terms = _token_terms(logp_w, entropy_w, lse_w, owned_w, shift.unsqueeze(0).expand_as(lse_w))
    return _token_finish(*terms.sum(0).unbind(-1), shift)


def _number_checked(temperature):
    """A number validated; a per-token tensor as it is (the public entry validated it)."""
    return temperature if isinstance(temperature, Tensor) else check.check_temperature(temperature)


def _scaled_local(logits: Tensor, temperature) -> Tensor:
    """x = z / T on the shard; ``temperature`` a number or one value per row."""
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    x = logits.to(dtype)
    return x / per_row(temperature, x)


def _torch_token_gradient(logits, local_ids, lse, entropy, g_logp, g_entropy, temperature):
    """docs/SPEC.md section 2 on the local slice with the global ``lse`` and ``H`` (the reference
    ``row_gradient`` recomputes a local normaliser, so it cannot serve a shard)."""
    x = _scaled_local(logits, temperature)
    log_p = x - lse.to(x.dtype).unsqueeze(-1)
    p = log_p.exp()
    g_logp_c, g_h = g_logp.to(x.dtype).unsqueeze(-1), g_entropy.to(x.dtype).unsqueeze(-1)
    grad = torch.where(p == 0, 0.0, -p * (g_logp_c + g_h * (log_p + entropy.to(x.dtype).unsqueeze(-1))))
    owned = (local_ids >= 0).unsqueeze(-1)
    grad = grad.scatter_add(-1, local_ids.clamp(min=0).unsqueeze(-1), torch.where(owned, g_logp_c, 0.0))
    no_gradient = ((g_logp == 0) & (g_entropy == 0)).unsqueeze(-1)
    return torch.where(no_gradient, 0.0, grad / per_row(temperature, grad)).to(logits.dtype)


class _ShardedTokenLogprobs(torch.autograd.Function):
    """Two-kernel contract: ``token_logprobs_fwd`` on the shard -> all-reduces -> global (logp, H);
    backward: ``token_logprobs_bwd`` on the shard with the global ``lse`` and ``H`` and the local id
    of the token (-1 where another rank owns it: no indicator term)."""

    @staticmethod
    def forward(ctx, local_logits, local_ids, owned, valid, temperature, backend, group):
        scalar, temperatures = split_temperature(temperature)
        logp_r, entropy_r, lse_r = token_logprobs_fwd(local_logits.detach(), local_ids, scalar, backend, False,
                                                      temperatures)
        logp, entropy, lse = _combine_token_stats(logp_r, entropy_r, lse_r, owned, group)
        if valid is not None:
            zero = torch.zeros_like(logp)
            logp, entropy = torch.where(valid, logp, zero), torch.where(valid, entropy, zero)
        ctx.save_for_backward(local_logits, local_ids, lse, entropy, valid)
        ctx.temperature, ctx.backend = temperature, backend
        return logp, entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logp, grad_entropy):
        local_logits, local_ids, lse, entropy, valid = ctx.saved_tensors
        none = (None,) * 6
        if not ctx.needs_input_grad[0]:
            return None, *none
        zero = torch.zeros_like(lse)
        g_logp = zero if grad_logp is None else grad_logp.float()
        g_entropy = zero if grad_entropy is None else grad_entropy.float()
        if valid is not None:  # masked positions: exactly zero gradient, whatever was sent upstream
            g_logp, g_entropy = torch.where(valid, g_logp, zero), torch.where(valid, g_entropy, zero)
        if ctx.backend == "torch":
            grad = _torch_token_gradient(local_logits, local_ids, lse, entropy, g_logp, g_entropy, ctx.temperature)
        else:
            scalar, temperatures = split_temperature(ctx.temperature)
            grad = token_logprobs_bwd(local_logits.detach(), local_ids, lse, entropy, g_logp, g_entropy,
                                      scalar, ctx.backend, temperatures)
        return grad, *none


def _combine_kl(kl_r, lse_p_r, lse_q_r, direction: int, group):
    """Global (KL, lse_p, lse_q) from the shard's ``kl_div_fwd`` outputs. With ``o`` the outer
    distribution (p forward, q reverse) and ``i`` the inner one:
    ``KL = sum_r pi_r [KL_r + (lse_o_r - lse_o) - (lse_i_r - lse_i)]``. Two all-reduces: MAX of the
    two ``lse_r``, SUM of ``[w_p, w_q, w_o (KL_r + (lse_o_r - L_o) - (lse_i_r - L_i))]``."""
    shifts = _all_reduce(torch.stack([lse_p_r, lse_q_r], -1), dist.ReduceOp.MAX, group)
    shift_p, shift_q = shifts.unbind(-1)
    w_p, w_q = torch.exp(lse_p_r - shift_p), torch.exp(lse_q_r - shift_q)
    if direction == DIRECTIONS["forward"]:
        w_o, gap = w_p, (lse_p_r - shift_p) - (lse_q_r - shift_q)
    else:
        w_o, gap = w_q, (lse_q_r - shift_q) - (lse_p_r - shift_p)
    term = torch.where(w_o == 0, torch.zeros_like(w_o), w_o * (kl_r + gap))
    total_p, total_q, weighted = _all_reduce(torch.stack([w_p, w_q, term], -1), dist.ReduceOp.SUM, group).unbind(-1)
    log_p, log_q = torch.log(total_p), torch.log(total_q)
    if direction == DIRECTIONS["forward"]:
        kl = weighted / total_p - log_p + log_q
    else:
        kl = weighted / total_q - log_q + log_p
    return kl, shift_p + log_p, shift_q + log_q


def _torch_kl_gradients(x_logits, y_logits, kl, lse_p, lse_q, grad_kl, temperature, direction):
    """docs/SPEC.md section 5's gradients on the local slices with the global normalisers."""
    x, y = _scaled_local(x_logits, temperature), _scaled_local(y_logits, temperature)
    log_p, log_q = x - lse_p.to(x.dtype).unsqueeze(-1), y - lse_q.to(y.dtype).unsqueeze(-1)
    p, q = log_p.exp(), log_q.exp()
    g = grad_kl.to(x.dtype).unsqueeze(-1)
    g = g / per_row(temperature, g)
    k = kl.to(x.dtype).unsqueeze(-1)
    if direction == DIRECTIONS["forward"]:
        grad_x, grad_y = torch.where(p == 0, 0.0, p * (log_p - log_q - k)), q - p
    else:
        grad_x, grad_y = p - q, torch.where(q == 0, 0.0, q * (log_q - log_p - k))
    return (torch.where(g == 0, 0.0, g * grad_x).to(x_logits.dtype),
            torch.where(g == 0, 0.0, g * grad_y).to(y_logits.dtype))


class _ShardedKl(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local_logits, other_local, temperature, direction, backend, group):
        scalar, temperatures = split_temperature(temperature)
        kl_r, lse_p_r, lse_q_r = kl_div_fwd(local_logits.detach(), other_local.detach(), scalar, direction, backend,
                                            temperatures)
        kl, lse_p, lse_q = _combine_kl(kl_r, lse_p_r, lse_q_r, direction, group)
        ctx.save_for_backward(local_logits, other_local, kl, lse_p, lse_q)
        ctx.temperature, ctx.direction, ctx.backend = temperature, direction, backend
        return kl

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_kl):
        x, y, kl, lse_p, lse_q = ctx.saved_tensors
        need_x, need_y = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        none = (None,) * 4
        if not (need_x or need_y):
            return None, None, *none
        grad_kl = grad_kl.float()
        if ctx.backend == "torch":
            grad_x, grad_y = _torch_kl_gradients(x, y, kl, lse_p, lse_q, grad_kl, ctx.temperature, ctx.direction)
        else:
            scalar, temperatures = split_temperature(ctx.temperature)
            grad_x, grad_y = kl_div_bwd(x.detach(), y.detach(), kl, lse_p, lse_q, grad_kl, scalar, ctx.direction,
                                        need_x, need_y, ctx.backend, temperatures)
        return (grad_x if need_x else None), (grad_y if need_y else None), *none


# --- distillation: JSD and the student's log-probs at a sparse support (docs/distillation.md) ------------
#
# JSD. The JSD kernels (rlfuse::jsd_fwd/_bwd) normalise each row themselves, and the mixture's logarithm
# does not split over shards, so the kernels cannot run on a shard without an lse-input variant. The
# shard work is therefore the kernels' math in PyTorch on the local columns with the *global* lse's,
# a block of rows at a time (O(block x V_r) temporaries):
#
# 1. the local lse of both rows with the token_logprobs kernel (no token), combined over ranks: MAX of
#    ``[lse_p_r, lse_q_r]``, SUM of ``[w_p, w_q]`` (``lse = L + log sum_r e^(lse_r - L)``);
# 2. local mixture sums ``-sum_j p_j u_j`` and ``-sum_j q_j v_j`` over this rank's columns (``d = log q -
#    log p``, ``u = log(m / p)``, ``v = log(m / q)`` in the overflow-safe form below), one SUM gives
#    ``KL(p || m)`` and ``KL(q || m)``; ``JSD = beta KL(q || m) + (1 - beta) KL(p || m)``;
# 3. backward, local, no collective: ``dJSD/dx_j = -(1 - beta) p_j (u_j + KL(p || m)) g / T``,
#    ``dJSD/dy_j = -beta q_j (v_j + KL(q || m)) g / T``.
#
# ``r = log w`` is taken as ``log1p(beta expm1(-|d|))`` (``d <= 0``) or ``log1p((1 - beta) expm1(-|d|))``
# (``d > 0``): the kernels' ``w = (1 - beta) + beta e^-|d|`` (resp. ``beta + (1 - beta) e^-|d|``) minus
# one, so ``d = 0`` gives exactly 0 whatever the rounding of ``beta`` and ``1 - beta``.

_JSD_BLOCK_ELEMENTS = 1 << 21  # rows per block x V_r: bounds the fp32 temporaries (~8 of them)


def _mixture_logs(log_p: Tensor, log_q: Tensor, beta: float):
    """(u, v) = (log(m / p), log(m / q)), m = (1 - beta) p + beta q; exactly 0 where log p = log q."""
    d = log_q - log_p
    below = d <= 0
    e = torch.expm1(-d.abs())
    r = torch.where(below, torch.log1p(beta * e), torch.log1p((1.0 - beta) * e))
    return torch.where(below, r, r + d), torch.where(below, r - d, r)


def _jsd_blocks(rows: int, width: int):
    step = max(1, _JSD_BLOCK_ELEMENTS // max(1, width))
    return [(r0, min(r0 + step, rows)) for r0 in range(0, rows, step)]


def _flat_rows(temperature, rows: int):
    """A number as it is; a per-row temperature tensor flat ``[rows]`` (``_ShardedJsd``'s row blocks)."""
    return temperature.reshape(rows) if isinstance(temperature, Tensor) else temperature


def _block(temperature, r0: int, r1: int):
    """Rows ``r0:r1`` of a flat per-row temperature; a number as it is."""
    return temperature[r0:r1] if isinstance(temperature, Tensor) else temperature


def _jsd_local_parts(x, y, lse_p, lse_q, beta, temperature):
    """log p, log q, p, q, u, v of rows ``x``, ``y`` (a block of local columns) with the global lse's."""
    log_p = _scaled_local(x, temperature) - lse_p.unsqueeze(-1)
    log_q = _scaled_local(y, temperature) - lse_q.unsqueeze(-1)
    u, v = _mixture_logs(log_p, log_q, beta)
    return log_p.exp(), log_q.exp(), u, v


class _ShardedJsd(torch.autograd.Function):
    """Generalised JSD(beta) of sharded rows (the comment above): local lse's from the token_logprobs
    kernel, 3 all-reduces, local mixture sums and gradients in PyTorch with the global statistics."""

    @staticmethod
    def forward(ctx, local_logits, other_local, temperature, beta, backend, group):
        x, y = local_logits.detach(), other_local.detach()
        lead, width = tuple(x.shape[:-1]), x.shape[-1]
        compute = torch.float64 if x.dtype == torch.float64 else torch.float32
        if compute == torch.float64:  # the kernels' statistics are fp32: float64 rows keep float64 lse's
            lse_p_r = torch.logsumexp(_scaled_local(x, temperature), -1)
            lse_q_r = torch.logsumexp(_scaled_local(y, temperature), -1)
        else:
            no_ids = torch.full(lead, -1, dtype=torch.int64, device=x.device)
            scalar, temperatures = split_temperature(temperature)
            lse_p_r = token_logprobs_fwd(x, no_ids, scalar, backend, False, temperatures)[2]
            lse_q_r = token_logprobs_fwd(y, no_ids, scalar, backend, False, temperatures)[2]
        lse_r = torch.stack([lse_p_r, lse_q_r], -1).to(compute)
        shift = _all_reduce(lse_r.clone(), dist.ReduceOp.MAX, group)
        total = _all_reduce(torch.exp(lse_r - shift), dist.ReduceOp.SUM, group)
        lse_p, lse_q = (shift + torch.log(total)).unbind(-1)
        rows = math.prod(lead)
        x2, y2 = x.reshape(rows, width), y.reshape(rows, width)
        lp2, lq2 = lse_p.reshape(rows), lse_q.reshape(rows)
        sums = torch.zeros(rows, 2, dtype=compute, device=x.device)
        t2 = _flat_rows(temperature, rows)
        for r0, r1 in _jsd_blocks(rows, width):
            p, q, u, v = _jsd_local_parts(x2[r0:r1], y2[r0:r1], lp2[r0:r1], lq2[r0:r1], beta, _block(t2, r0, r1))
            sums[r0:r1, 0] = -torch.where(p == 0, 0.0, p * u).sum(-1)
            sums[r0:r1, 1] = -torch.where(q == 0, 0.0, q * v).sum(-1)
        kl_p, kl_q = _all_reduce(sums, dist.ReduceOp.SUM, group).reshape(*lead, 2).unbind(-1)
        ctx.save_for_backward(local_logits, other_local, lse_p, lse_q, kl_p, kl_q)
        ctx.temperature, ctx.beta = temperature, beta
        return beta * kl_q + (1.0 - beta) * kl_p

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_jsd):
        x, y, lse_p, lse_q, kl_p, kl_q = ctx.saved_tensors
        need_x, need_y = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        none = (None,) * 4
        if not (need_x or need_y):
            return None, None, *none
        beta, temperature = ctx.beta, ctx.temperature
        lead, width = tuple(x.shape[:-1]), x.shape[-1]
        rows = math.prod(lead)
        x2, y2 = x.detach().reshape(rows, width), y.detach().reshape(rows, width)
        t2 = _flat_rows(temperature, rows)
        g2 = grad_jsd.to(lse_p.dtype).reshape(rows, 1)
        g2 = g2 / per_row(t2, g2)
        lp2, lq2, kp2, kq2 = (t.reshape(rows, 1) for t in (lse_p, lse_q, kl_p, kl_q))
        grad_x = torch.empty((rows, width), dtype=x.dtype, device=x.device) if need_x else None
        grad_y = torch.empty((rows, width), dtype=y.dtype, device=y.device) if need_y else None
        for r0, r1 in _jsd_blocks(rows, width):
            p, q, u, v = _jsd_local_parts(x2[r0:r1], y2[r0:r1], lp2[r0:r1, 0], lq2[r0:r1, 0], beta,
                                          _block(t2, r0, r1))
            g = g2[r0:r1]
            if need_x:
                gx = torch.where(p == 0, 0.0, -(1.0 - beta) * p * (u + kp2[r0:r1]))
                grad_x[r0:r1] = torch.where(g == 0, 0.0, g * gx).to(x.dtype)
            if need_y:
                gy = torch.where(q == 0, 0.0, -beta * q * (v + kq2[r0:r1]))
                grad_y[r0:r1] = torch.where(g == 0, 0.0, g * gy).to(y.dtype)
        return (grad_x.reshape(x.shape) if need_x else None), (grad_y.reshape(y.shape) if need_y else None), *none


class _ShardedSupportLogprobs(torch.autograd.Function):
    """``distill.SupportLogprobs`` on a shard: the student's global log-probs at global ``ids [..., K]``.

    Forward: ``token_logprobs_fwd`` on the shard with the first id as anchor (its local id where this
    rank owns it, else -1); MAX all-reduce of ``lse_r``; one SUM all-reduce of the token terms
    ``[A, B, C, Q]`` packed with the owned logits at ``[anchor, ids]`` (others add 0: exact), so
    ``log s_k = (x_k - x_a) + log s_a`` as on one device (``x_k - lse`` where ``x_a = -inf``).
    Backward, local: ``dL/dz_j = (g_j - G s_j) / T``: the dense ``-G s_j / T`` from the gradient
    kernel with no target and the global ``lse``, then the owned support entries written exactly."""

    @staticmethod
    def forward(ctx, local_logits, ids, valid, temperature, backend, vocab_start, group):
        local = local_logits.detach()
        size = local.shape[-1]
        compute = torch.float64 if local.dtype == torch.float64 else torch.float32
        safe = torch.where(valid, ids, torch.zeros_like(ids))
        cols = torch.cat([safe[..., :1], safe], -1)  # the anchor, then the support
        owned = (cols >= vocab_start) & (cols < vocab_start + size)
        local_cols = torch.where(owned, cols - vocab_start, torch.zeros_like(cols))
        anchor = torch.where(owned[..., 0], local_cols[..., 0], torch.full_like(local_cols[..., 0], -1))
        scalar, temperatures = split_temperature(temperature)
        logp_r, entropy_r, lse_r = token_logprobs_fwd(local, anchor, scalar, backend, False, temperatures)
        stats = lse_r.dtype
        shift = _all_reduce(lse_r.clone(), dist.ReduceOp.MAX, group)
        terms = _token_terms(logp_r, entropy_r, lse_r, owned[..., 0], shift)
        x_owned = torch.where(owned, local.gather(-1, local_cols).to(compute), 0.0)
        packed = _all_reduce(torch.cat([terms.to(compute), x_owned], -1).contiguous(), dist.ReduceOp.SUM, group)
        logp_a, entropy, lse = _token_finish(*packed[..., :4].to(stats).unbind(-1), shift)
        scaled = packed[..., 4:] * inverse_temperature(temperature, packed.shape[:-1], compute)
        x_a, x = scaled[..., :1], scaled[..., 1:]
        logs = support_logprobs(x, x_a, logp_a.to(compute), lse.to(compute), valid)
        ctx.save_for_backward(local_logits, local_cols[..., 1:], owned[..., 1:] & valid, valid, lse, entropy, logs)
        ctx.temperature, ctx.backend = temperature, backend
        return logs

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logs):
        local_logits, local_ids, own, valid, lse, entropy, logs = ctx.saved_tensors
        none = (None,) * 6
        if not ctx.needs_input_grad[0]:
            return None, *none
        temperature = ctx.temperature
        g = torch.where(valid, grad_logs, 0.0)
        total = g.sum(-1)
        no_target = torch.full_like(local_ids[..., 0], -1)
        zero = torch.zeros_like(lse)
        if ctx.backend == "torch":
            grad = _torch_token_gradient(local_logits, no_target, lse, entropy, total.float(), zero, temperature)
        else:
            scalar, temperatures = split_temperature(temperature)
            grad = token_logprobs_bwd(local_logits.detach(), no_target, lse, entropy, total.float(), zero,
                                      scalar, ctx.backend, temperatures)
        # The owned support entries, exactly (slots owned elsewhere or invalid are not written).
        return write_support_gradient(grad, local_ids, g, logs, valid, own, temperature), *none


def _is_split(x) -> bool:
    return isinstance(x, ShardedLogits) or getattr(x, "shard_layout", None) is not None


def _split_order(x) -> int:
    """0: a split LinearLogits, 1: a ShardedLogits, 2: anything else (the side that leads a pair)."""
    if isinstance(x, ShardedLogits):
        return 1
    return 0 if getattr(x, "shard_layout", None) is not None else 2


def sharded_jsd(student, teacher, beta: float, temperature, backend: str, valid=None) -> Tensor:
    """JSD(beta), ``0 < beta < 1``, with a vocabulary-split source on either side (ShardedLogits or a
    split LinearLogits; the other one split the same way or a full ``[..., V]`` tensor): per-token fp32
    values of the tokens' shape, 0 where ``valid`` is False. ``JSD_beta(s, t) = JSD_(1 - beta)(t, s)``
    (the same mixture), so the split side leads. A split LinearLogits runs ``_ShardedJsd`` on each chunk of
    valid rows' local logits (``map_rows``: 3 all-reduces per chunk); a ShardedLogits on all rows.
    ``temperature``: a number, or a validated per-token tensor (each chunk gets its rows' values)."""
    from .linear import chunk_temperature, map_rows, temperature_rows

    lead = tuple(student.shape[:-1])
    if _split_order(teacher) < _split_order(student):
        student, teacher, beta = teacher, student, 1.0 - beta
    if isinstance(student, ShardedLogits):
        if not isinstance(teacher, (ShardedLogits, Tensor)):
            raise ValueError("distill_loss on ShardedLogits needs the other side sharded the same way (a "
                             "ShardedLogits or a LinearLogits with the same group and rows per rank) or a full "
                             "[..., V] tensor")
        values = student._jsd(teacher, beta, temperature, backend).float()
        return values if valid is None else torch.where(valid, values, 0.0)
    try:
        layout = _linear_layout(student, teacher)
    except ValueError as error:
        raise ValueError(str(error).replace("kl_divergence", "distill_loss", 1)) from None
    other_input, wrap_other = _other_rows(layout, teacher)

    def jsd(x, y, *t):
        return (layout.wrap(x)._jsd(wrap_other(y), beta, chunk_temperature(temperature, t), backend).float(),)

    rows = temperature_rows(temperature)
    return map_rows(jsd, [student._local(), other_input], rows, mask=valid)[0].reshape(lead)


def sharded_support_logprobs(student, ids: Tensor, valid: Tensor, temperature, backend: str,
                             mask=None) -> Tensor:
    """The student's global log-probs at global ``ids [..., K]`` (``valid`` slots, -inf elsewhere) for a
    ShardedLogits or a split LinearLogits student (``map_rows`` over chunks of ``mask``-valid rows:
    masked rows are never computed and read as -inf), differentiable. ``temperature``: a number, or a
    validated per-token tensor."""
    from .linear import chunk_temperature, map_rows, temperature_rows

    if isinstance(student, ShardedLogits):
        return student._support_logprobs(ids, valid, temperature, backend)
    layout = student.shard_layout
    lead = tuple(student.shape[:-1])

    def support(x, chunk_ids, chunk_valid, *t):
        return (layout.wrap(x)._support_logprobs(chunk_ids, chunk_valid, chunk_temperature(temperature, t),
                                                 backend),)

    logs = map_rows(support, [student._local()], [ids, valid, *temperature_rows(temperature)],
                    mask=mask)[0].reshape(*lead, ids.shape[-1])
    return torch.where(valid, logs, NEG_INF)


# --- verl / Megatron drop-ins -----------------------------------------------------------------------


def _tensor_parallel_group(group):
    """``group``, else Megatron-core's tensor-parallel group when Megatron is initialised, else the
    default process group (None)."""
    if group is not None:
        return group
    try:
        from megatron.core import parallel_state
    except ImportError:
        return None
    try:
        if parallel_state.model_parallel_is_initialized():
            return parallel_state.get_tensor_model_parallel_group()
    except (AttributeError, AssertionError, RuntimeError):
        pass
    return None


def vocab_parallel_log_probs_from_logits(logits: Tensor, labels: Tensor, group=None) -> Tensor:
    """Drop-in for verl's ``verl.utils.megatron.tensor_parallel.vocab_parallel_log_probs_from_logits``
    (``-megatron.core.tensor_parallel.vocab_parallel_cross_entropy``): ``logits [..., V / tp]`` this
    rank's vocabulary shard (Megatron's column-parallel output layer: shards in rank order),
    ``labels [...]`` global ids; returns the fp32 log-probs ``[...]``, differentiable with respect to
    the shard. ``group``: default Megatron's tensor-parallel group, else the default process group.
    Collectives: the layout exchange (one all_gather of 14 int64) and two all-reduces."""
    src = ShardedLogits(logits, _tensor_parallel_group(group))
    return src._token_logprobs(labels, 1.0, "auto")[0]


def vocab_parallel_entropy(vocab_parallel_logits: Tensor, group=None) -> Tensor:
    """Drop-in for verl's ``vocab_parallel_entropy``: entropy ``[...]`` (fp32) of the softmax of logits
    sharded over the vocabulary (``[..., V / tp]`` per rank), differentiable with respect to the shard."""
    src = ShardedLogits(vocab_parallel_logits, _tensor_parallel_group(group))
    tokens = torch.zeros(vocab_parallel_logits.shape[:-1], dtype=torch.int64, device=vocab_parallel_logits.device)
    return src._token_logprobs(tokens, 1.0, "auto")[1]


# --- sampling (docs/SPEC.md section 8) ---------------------------------------------------------------
#
# The sample kernels key their random numbers by the *local* position and find the thresholds of the
# local row, so they cannot serve a shard without a kernel change (a vocabulary offset and external
# thresholds in SampleArgs). Sampling is a forward-only op on a few hundred rows, so the local row
# work is plain PyTorch on the shard (O(rows x V_local) fp32 temporaries) and follows the CPU kernel
# (csrc/cpu/sample_rows.cpp) step for step, with every row-wide quantity made global by a collective:
#
# * row statistics: MAX of (max, -lowest finite), SUM of (sum exp, shifted dot, bad-row flags);
# * top-k: the kernel's bisection over fp32 order keys, with the count all-reduced each step (32
#   steps; counts are integers, so the threshold is exactly the kernel's);
# * top-p: the same bisection on the all-reduced kept mass (32 steps);
# * min-p: ``max + log(min_p)`` (local);
# * the draw: the kernel's exponential race ``argmax_j e_j / E_j`` (Gumbel-max) with ``u_j`` keyed by
#   the global position ``j``; each rank's best (score, id) is packed into one int64 (score bits high,
#   ``2^31 - 1 - id`` low: ties to the lower id, as the kernel) and MAX-reduced;
# * the winner's logit from its owner and the kept mass: one SUM.

_MASK32 = 0xFFFFFFFF
_BISECTION_STEPS = 32  # the uint32 order keys: 32 halvings always converge (fixed: no rank decides alone)


def _order_key(x: Tensor) -> Tensor:
    """row_math's ``order_key`` (uint32, held in int64) of fp32 values: monotone in the value."""
    u = x.contiguous().view(torch.int32).to(torch.int64) & _MASK32
    return torch.where(u >= 2**31, (~u) & _MASK32, u | 0x80000000)


def _from_order_key(key: Tensor) -> Tensor:
    bits = torch.where(key >= 2**31, key & 0x7FFFFFFF, (~key) & _MASK32)
    return torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32).view(torch.float32)


def _largest_threshold(low: Tensor, high: Tensor, active: Tensor, keep) -> Tensor:
    """Per row, the largest fp32 ``t`` in ``[low, high]`` with ``keep(t)`` (monotone: true for small t), as
    the CPU kernel's ``largest_threshold``; ``keep`` evaluates a whole column of candidates with one
    collective. Inactive rows return ``high``."""
    lo, hi = _order_key(low), _order_key(high)
    lo = torch.where(active, lo, hi)
    for _ in range(_BISECTION_STEPS):
        running = lo < hi
        mid = torch.where(running, lo + (hi - lo + 1) // 2, lo)
        ok = keep(_from_order_key(mid))
        lo = torch.where(running & ok, mid, lo)
        hi = torch.where(running & ~ok, mid - 1, hi)
    return _from_order_key(lo)


def _rng_uniform(seeds: Tensor, sample: int, positions: Tensor) -> Tensor:
    """u[row, j] for global vocabulary positions ``positions``: docs/SPEC.md section 8, bit-exact with
    the kernels' ``rng_uniform`` (reference/sampling.py ``rng_uniform`` at an offset)."""
    from .reference.sampling import _mix32

    low, high = seeds & _MASK32, (seeds >> 32) & _MASK32
    key = _mix32(_mix32(_mix32(low ^ 0x9E3779B9) ^ high) ^ sample)
    bits = _mix32((key.unsqueeze(-1) + positions * 0x9E3779B9) & _MASK32)
    return ((bits >> 9).to(torch.float32) + 0.5) * 1.1920928955078125e-7


def _seed_keys(seed, rows, device) -> Tensor:
    """``rlfuse.sample``'s per-row int64 keys for an int or per-row seed (sampling.py's helper)."""
    from . import sampling

    helper = getattr(sampling, "per_row_seeds", None) or getattr(sampling, "_seeds")
    return helper(seed, None, rows, device)


def _sample_arguments(src: ShardedLogits, temperature, top_k, top_p, min_p, seed, generator, adaptive_temperature,
                      backend, num_samples):
    """``rlfuse.sample``'s argument checks (its own helpers), run on every rank through ``agree``."""
    from . import sampling

    lead = src._lead()
    rows, vocab, device = math.prod(lead), src.vocab, src.device
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
    if seed is not None and generator is not None:
        raise ValueError("pass seed or generator, not both")
    checks = check.DataChecks()
    temperature = sampling._temperature(temperature, rows, device, checks)
    top_k = sampling._top_k(0 if top_k is None else top_k, rows, vocab, device, checks)
    top_p = sampling._per_row("top_p", 1.0 if top_p is None else top_p, rows, device,
                              lambda p: (p > 0) & (p <= 1), checks)
    min_p = sampling._per_row("min_p", 0.0 if min_p is None else min_p, rows, device,
                              lambda p: (p >= 0) & (p < 1), checks)
    adaptive = None if adaptive_temperature is None else sampling._adaptive(adaptive_temperature)
    seeds = None if seed is None else _seed_keys(seed, rows, device)
    resolve_backend(backend, device, "sample", src.dtype if src.dtype != torch.float64 else torch.float32)
    checks.run()
    return temperature, top_k, top_p, min_p, adaptive, seeds


def _global_row_stats(x: Tensor, group):
    """(max, lowest finite, log sum, entropy, bad) of rows ``x`` split over ranks: MAX of
    ``[max, -lowest]``, then SUM of ``[sum e, sum e (x - M), NaN / +inf flag]``; ``e`` is returned."""
    local_max = x.amax(-1)
    nan = torch.isnan(local_max)
    finite = torch.isfinite(x)
    lowest = torch.where(finite, x, torch.full_like(x, math.inf)).amin(-1)
    extremes = torch.stack([torch.where(nan, torch.full_like(local_max, math.inf), local_max), -lowest], -1)
    row_max, neg_lowest = _all_reduce(extremes, dist.ReduceOp.MAX, group).unbind(-1)
    shifted = x - row_max.unsqueeze(-1)
    e = torch.exp(shifted)
    dot = torch.where(e > 0, e * shifted, torch.zeros_like(e)).sum(-1)
    flags = (nan | (local_max == math.inf)).to(torch.float32)
    total, dot, flags = _all_reduce(torch.stack([e.sum(-1), dot, flags], -1), dist.ReduceOp.SUM, group).unbind(-1)
    log_sum = torch.log(total)
    entropy = log_sum - dot / total
    bad = (flags > 0) | ~torch.isfinite(row_max)
    return row_max, -neg_lowest, log_sum, torch.where(bad, torch.full_like(entropy, math.nan), entropy), e, bad


def _sharded_sample(src: ShardedLogits, temperature=1.0, top_k=None, top_p=None, min_p=None, seed=None,
                    generator=None, adaptive_temperature=None, backend: str = "auto", num_samples: int = 1):
    from .sampling import SampleOutput, _check_temperature_scale

    group, device = src.group, src.device
    temperature, top_k, top_p, min_p, adaptive, seeds = agree(group, device, lambda: _sample_arguments(
        src, temperature, top_k, top_p, min_p, seed, generator, adaptive_temperature, backend, num_samples))
    lead = src._lead()
    rows, vocab = math.prod(lead), src.vocab
    if seeds is None:  # one draw, rank 0's, so every rank keys the same stream
        base = torch.randint(0, 2**62, (1,), generator=generator).to(device)
        dist.broadcast(base, src=_group_src(group), group=group)
        seeds = _seed_keys(int(base.item()), rows, device)
    z = src.local_logits.detach().reshape(rows, src.local_vocab).float()
    positions = torch.arange(src.vocab_start, src.vocab_end, dtype=torch.int64, device=device)

    if adaptive is not None:
        t_min, t_max, h_low, h_high = adaptive
        h1 = _global_row_stats(z, group)[3]
        span = float(torch.tensor(h_high, dtype=torch.float32) - torch.tensor(h_low, dtype=torch.float32))
        if span > 0:
            w = ((h1 - h_low) / span).clamp(0.0, 1.0)
        else:
            w = (h1 >= h_high).to(torch.float32)
        t_min32 = torch.tensor(t_min, dtype=torch.float32, device=device)
        temperature = t_min32 + (torch.tensor(t_max, dtype=torch.float32, device=device) - t_min32) * w
    greedy = temperature == 0
    inv = torch.reciprocal(torch.where(greedy, torch.ones_like(temperature), temperature))
    x = z * inv.unsqueeze(-1)
    row_max, lowest, log_sum, entropy, e, bad = _global_row_stats(x, group)
    if adaptive is not None:  # rows are judged at the smallest positive T the map can give
        t_check = _check_temperature_scale(adaptive)
        inv_check = 1.0 / t_check if t_check > 0 else 1.0
        z_max = _all_reduce(torch.where(torch.isnan(z.amax(-1)), torch.full((rows,), math.inf, device=device),
                                        z.amax(-1)), dist.ReduceOp.MAX, group)
        bad = bad | ~torch.isfinite(z_max * torch.tensor(inv_check, dtype=torch.float32))
        entropy = torch.where(bad, torch.full_like(entropy, math.nan), entropy)
    if check.validation_enabled() and rows and bool(bad.any()):  # the same verdict on every rank
        bad_rows = torch.nonzero(bad).flatten()[:4].tolist()
        raise ValueError(
            f"logits rows {bad_rows} contain NaN or have no finite entry, or contain +inf or a logit that "
            f"overflows fp32 at the temperature: nothing to sample from (ShardedLogits, on some rank's shard)")

    # Thresholds, in order: top-k, then top-p among the survivors, then min-p (sample_rows.cpp).
    threshold = torch.full((rows,), NEG_INF, dtype=torch.float32, device=device)
    use_k = ~greedy & (top_k > 0) & (top_k < vocab)
    use_p = ~greedy & (top_p < 1.0)
    if bool(use_k.any()):
        def enough(t):
            count = (x >= t.unsqueeze(-1)).sum(-1)
            return _all_reduce(count, dist.ReduceOp.SUM, group) >= top_k
        threshold = torch.where(use_k, _largest_threshold(lowest, row_max, use_k, enough), threshold)
    if bool(use_p.any()):
        def mass(t):
            return _all_reduce(torch.where(x >= t.unsqueeze(-1), e, 0.0).sum(-1), dist.ReduceOp.SUM, group)
        start = torch.maximum(threshold, lowest)
        target = top_p * mass(start)
        threshold = torch.where(use_p, _largest_threshold(start, row_max, use_p, lambda t: mass(t) >= target),
                                threshold)
    use_m = ~greedy & (min_p > 0)
    threshold = torch.where(use_m, torch.maximum(threshold, row_max + torch.log(min_p)), threshold)
    kept = x >= threshold.unsqueeze(-1)

    # The race (one MAX of int64 keys) and the winner's logit + kept mass (one SUM).
    low_bits = 2**31 - 1
    is_max = x == row_max.unsqueeze(-1)
    first_max = torch.where(is_max.any(-1), low_bits - (is_max.to(torch.int8).argmax(-1) + src.vocab_start),
                            torch.full((rows,), -1, dtype=torch.int64, device=device))
    keys = []
    for s in range(num_samples):
        u = _rng_uniform(seeds, s, positions)
        score = torch.where(kept, e / -torch.log(u), torch.full_like(e, -1.0))
        best = score.argmax(-1)
        best_score = score.gather(-1, best.unsqueeze(-1)).squeeze(-1)
        key = (best_score.view(torch.int32).to(torch.int64) << 31) | (low_bits - (best + src.vocab_start))
        key = torch.where(best_score >= 0, key, torch.full_like(key, -1))
        keys.append(torch.where(greedy, first_max, key))
    keys = _all_reduce(torch.stack(keys, -1), dist.ReduceOp.MAX, group)  # [rows, S]
    tokens = torch.where(keys >= 0, low_bits - (keys & low_bits), torch.zeros_like(keys))
    owned = (tokens >= src.vocab_start) & (tokens < src.vocab_end)
    local = torch.where(owned, tokens - src.vocab_start, torch.zeros_like(tokens))
    x_best = torch.where(owned, x.gather(-1, local), torch.zeros_like(local, dtype=torch.float32))
    kept_mass = torch.where(kept, e, 0.0).sum(-1, keepdim=True)
    summed = _all_reduce(torch.cat([kept_mass, x_best], -1), dist.ReduceOp.SUM, group)
    kept_log_sum, x_best = torch.log(summed[:, :1]), summed[:, 1:]
    gap = x_best - row_max.unsqueeze(-1)
    logprobs = torch.where(greedy.unsqueeze(-1), 0.0, gap - kept_log_sum)
    raw = gap - log_sum.unsqueeze(-1)
    shape = (*lead, num_samples)
    tokens, logprobs, raw = tokens.reshape(shape), logprobs.reshape(shape), raw.reshape(shape)
    if num_samples == 1:
        tokens, logprobs, raw = tokens.squeeze(-1), logprobs.squeeze(-1), raw.squeeze(-1)
    return SampleOutput(tokens, logprobs, raw, entropy.reshape(lead))


# --- TROLL (docs/SPEC.md section 7) ---------------------------------------------------------------------


class _ShardedGather(torch.autograd.Function):
    """Global ``logits.gather(-1, ids)`` on sharded logits: each entry from the rank that owns it (others
    add 0; one all-reduce of ``[N, |S|]``, exact: one nonzero term). Backward: the (replicated) upstream
    gradient of the owned entries stored into a zeroed local gradient; ``valid`` entries are distinct."""

    @staticmethod
    def forward(ctx, local_logits, ids, valid, vocab_start, group):
        local_size = local_logits.shape[-1]
        owned = valid & (ids >= vocab_start) & (ids < vocab_start + local_size)
        local_ids = torch.where(owned, ids - vocab_start, torch.zeros_like(ids))
        values = torch.where(owned, local_logits.detach().gather(-1, local_ids).float(), 0.0)
        values = _all_reduce(values.contiguous(), dist.ReduceOp.SUM, group)
        ctx.save_for_backward(local_ids, owned)
        ctx.meta = (local_logits.shape, local_logits.dtype, local_logits.device)
        return values.to(local_logits.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_values):
        local_ids, owned = ctx.saved_tensors
        shape, dtype, device = ctx.meta
        grad = torch.zeros(shape, dtype=torch.float32, device=device)
        grad.scatter_add_(-1, local_ids, torch.where(owned, grad_values.float(), 0.0))  # others add 0
        return grad.to(dtype), None, None, None, None


def _sharded_troll_token_loss(src: ShardedLogits, tokens, advantages, old_logprobs, old_topk, config, backend,
                              valid_tokens=None, temperature=None):
    """``troll.troll_token_loss`` with the two vocabulary-sized steps made global: the new kept ids from
    the global top-k (``_global_topk``: one all_gather, which also gives the token's log-prob and
    entropy) and the support's logits from their owners (``_ShardedGather``: one all-reduce). The
    projection (``[N, |S|]``, float64) runs replicated on every rank, with troll.py's own functions."""
    from .troll import _kept, troll_terms

    temperature = config.temperature if temperature is None else temperature
    backend = src._resolve(backend, "row_topk")
    tokens = tokens.reshape(src._lead())
    new_ids, new_values, new_lse, logp, entropy = src._global_topk(config.troll_k, temperature, backend, tokens)

    def support_logits(safe_ids, valid):
        x = _ShardedGather.apply(src.local_logits, safe_ids, valid, src.vocab_start, src.group).double()
        return x / row_divisor(temperature, x)

    return troll_terms(support_logits, _kept(new_values, new_ids, new_lse, config.troll_threshold)[0], logp,
                       entropy, tokens, advantages, old_logprobs, old_topk, config, src.vocab, valid_tokens)


# --- LinearLogits with the lm_head split over a group (rlfuse.LinearLogits(..., group=...)) -----------
#
# The rows of the tokens are replicated on every rank (hidden is), so every rank runs the same chunks
# (the chunk size is agreed: ``LinearLogits.resolved_chunk_tokens`` budgets the widest shard) and the
# chunks' local logits ``[chunk, V_r]`` are exactly a ShardedLogits' local logits. token_logprobs /
# entropy (and so every policy loss, which takes the general path) run in ``linear._LinearTokenLogprobs``:
# the local kernel per chunk, one combination of all rows' statistics (2 all-reduces), and a backward
# with no collective. The other ops run this module's ShardedLogits methods on each chunk through
# ``linear.map_rows`` (under activation checkpointing when differentiable: the backward recomputes a
# chunk, collectives included; every rank recomputes the same chunks in the same order, since autograd
# walks the same graph on every rank). ``hidden``'s gradient is all-reduced once per op in the backward
# (``_ReduceHiddenGrad``), as Megatron's copy-to-tensor-parallel-region does.


combine_token_stats = _combine_token_stats


def _float_bits(value) -> int:
    """An optional float as int64 bits (None: -1, a NaN pattern, never a finite number's)."""
    if value is None:
        return -1
    return int(torch.tensor(float(value), dtype=torch.float64).view(torch.int64))


def shard_linear_logits(src, group, vocab_start, local_error) -> ShardLayout:
    """The layout of ``LinearLogits(..., group=group, vocab_start=vocab_start)`` (one all_gather): the
    weight shards must tile the vocabulary; the hidden size, the bias's presence, ``scale``, ``softcap``,
    ``chunk_tokens``, ``batch_invariant``, ``reduce_hidden_grad``, ``hidden.requires_grad``, the
    tokens' shape and the dtype must be the same on every rank. ``local_error``: this rank's arguments
    failed ``LinearLogits``' own checks (every rank then raises)."""
    group = _resolve_group(group)[0]
    if local_error is None:
        hidden, weight = src.hidden, src.weight
        like = torch.empty(tuple(hidden.shape[:-1]) + (weight.shape[0],), dtype=hidden.dtype, device="meta")
        device = hidden.device
        extra = [("the hidden size D", weight.shape[1]), ("bias (given or None)", src.bias is not None),
                 ("scale (as float64 bits)", _float_bits(src.scale)),
                 ("softcap (as float64 bits)", _float_bits(src.softcap)),
                 ("chunk_tokens (0: None)", src.chunk_tokens or 0), ("batch_invariant", src.batch_invariant),
                 ("reduce_hidden_grad", src.reduce_hidden_grad), ("hidden.requires_grad", hidden.requires_grad),
                 ("the device type (1: cuda)", device.type == "cuda")]
    else:
        like, device = None, _comm_device(None, group)
        extra = [(name, 0) for name in range(9)]
    return exchange_layout(group, like, vocab_start, device, what="LinearLogits(group=...)",
                           local_error=local_error, extra=extra)


class _ReduceHiddenGrad(torch.autograd.Function):
    """Identity forward; the backward sums the gradient over the group (one all-reduce of ``[N, D]``)."""

    @staticmethod
    def forward(ctx, hidden, group):
        ctx.group = group
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone(memory_format=torch.contiguous_format)
        return _all_reduce(grad, dist.ReduceOp.SUM, ctx.group), None


def hidden_with_reduced_grad(src) -> Tensor:
    """``src.hidden``, through ``_ReduceHiddenGrad`` when its gradient is to be summed over the group."""
    hidden = src.hidden
    if src.reduce_hidden_grad and hidden.requires_grad and torch.is_grad_enabled():
        return _ReduceHiddenGrad.apply(hidden, src.shard_layout.group)
    return hidden


def _linear_layout(src, other):
    """The layout shared by ``src`` (a split LinearLogits) and ``other`` (the same kind, a ShardedLogits
    or a full ``[..., V]`` tensor); ValueError when they are cut differently."""
    layout = src.shard_layout
    if isinstance(other, ShardedLogits):
        other_layout = other.layout
    elif isinstance(other, Tensor):
        return layout
    else:
        other_layout = getattr(other, "shard_layout", None)
    if layout is None or other_layout is None or not layout.same(other_layout):
        raise ValueError("kl_divergence on a vocabulary-split source needs the other side split the same way (a "
                         "ShardedLogits or a LinearLogits with the same group and rows per rank) or a full "
                         "[..., V] tensor")
    return layout


def _other_rows(layout, other):
    """The other side of a two-row op over a split LinearLogits' chunks: what ``map_rows`` slices (a
    full tensor, or the local logits of a shard) and how a chunk of it meets the student's chunk."""
    if isinstance(other, Tensor):
        return other, lambda y: y
    return (other.local_logits if isinstance(other, ShardedLogits) else other._local()), layout.wrap


def linear_kl_divergence(src, other, direction, temperature, backend, mask=None) -> Tensor:
    """``kl_divergence`` with a split LinearLogits on either side: ``ShardedLogits._kl_divergence`` on each
    chunk's local logits (2 all-reduces per chunk), masked rows dropped before any GEMM."""
    from .linear import chunk_temperature, map_rows, temperature_rows

    if src.shard_layout is None:  # src unsharded, other split: only a mismatch is possible
        _linear_layout(other, src)
    layout = _linear_layout(src, other)
    other_input, wrap_other = _other_rows(layout, other)

    def kl(x, y, *t):
        return (layout.wrap(x)._kl_divergence(wrap_other(y), direction, chunk_temperature(temperature, t), backend),)

    return map_rows(kl, [src._local(), other_input], temperature_rows(temperature), mask=mask)[0].reshape(
        src.shape[:-1])


def linear_sparse_logprobs(src, tokens, k, threshold, temperature, backend):
    """``sparse_logprobs`` of a split LinearLogits: the global top-k of each chunk (one all_gather each)."""
    from .linear import chunk_temperature, map_rows, temperature_rows
    from .troll import SparseLogprobs

    layout = src.shard_layout

    def topk(x, tok, *t):
        out = layout.wrap(x)._sparse_logprobs(tok, k, threshold, chunk_temperature(temperature, t), backend)
        return out.ids, out.logprobs, out.count

    with torch.no_grad():
        ids, logprobs, count = map_rows(topk, [src._local()], [tokens, *temperature_rows(temperature)])
    lead = src.shape[:-1]
    return SparseLogprobs(ids.reshape(*lead, k), logprobs.reshape(*lead, k), count.reshape(lead), layout.vocab)


def linear_troll_token_loss(src, tokens, advantages, old_logprobs, old_topk, config, backend, valid_tokens,
                            temperature=None):
    """TROLL on a split LinearLogits: ``_sharded_troll_token_loss`` on each chunk of valid rows."""
    from .linear import troll_by_chunks

    layout = src.shard_layout
    return troll_by_chunks(src, src._local(),
                           lambda x, *args, **kw: _sharded_troll_token_loss(layout.wrap(x), *args, **kw),
                           tokens, advantages, old_logprobs, old_topk, config, backend, valid_tokens, temperature)


def linear_sample(src, **kwargs):
    """``sample`` on a split LinearLogits: ``_sharded_sample`` on each chunk, with per-row seeds agreed
    first (an int / per-row seed as given; ``seed=None`` / ``generator``: rank 0's draw, broadcast), so
    the tokens equal the unsharded call's for the same seed."""
    from .linear import sample_by_chunks
    from .sampling import per_row_seeds

    layout = src.shard_layout
    group, device, rows = layout.group, src.device, src.num_tokens
    seed, generator = kwargs.pop("seed", None), kwargs.pop("generator", None)

    def seeds_given():
        if seed is not None and generator is not None:
            raise ValueError("pass seed or generator, not both")
        return None if seed is None else per_row_seeds(seed, None, rows, device)

    seeds = agree(group, device, seeds_given)
    if seeds is None:  # one draw, rank 0's, so every rank keys the same streams
        base = torch.randint(0, 2**62, (1,), generator=generator).to(device)
        dist.broadcast(base, src=_group_src(group), group=group)
        seeds = per_row_seeds(int(base.item()), None, rows, device)
    return sample_by_chunks(src, src._local(), lambda x, **kw: _sharded_sample(layout.wrap(x), **kw), seeds, kwargs)
