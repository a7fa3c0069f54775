"""Uniform launchers over the compiled (C++/CUDA) kernels of ``rlfuse._C``.

Each backend module exposes ``token_logprobs_fwd(logits, layout, vocab, tokens, inv_temp, logp,
entropy, lse)`` and ``token_logprobs_bwd(logits, layout, vocab, tokens, inv_temp, lse, entropy,
grad_logp, grad_entropy, grad_logits, grad_layout)`` taking tensors; the Triton package has the
same functions. This module adapts ``rlfuse._C``'s pointer-based entry points to that shape.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import types

import torch

from ..backends import compiled_extension

DTYPE_TAGS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
HUGE_PAGE_MIN_BYTES = 32 << 20


def empty_gradient(like: torch.Tensor) -> torch.Tensor:
    """A contiguous, uninitialised gradient buffer with the shape, dtype and device of ``like``."""
    return empty_buffer(like.shape, like.dtype, like.device)


def empty_buffer(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A contiguous, uninitialised buffer. On CPU a large one is advised to use transparent huge
    pages before its first write: a fresh [N, V] buffer otherwise faults in 4 KiB at a time, which
    costs about as much as the kernel (measured on a 2-core VM: 256 MiB took ~100 ms to fault in,
    35 ms advised, the fused loss ~60 ms)."""
    buffer = torch.empty(shape, dtype=dtype, device=device)
    ext = compiled_extension()
    if ext is not None and buffer.device.type == "cpu" and buffer.nbytes >= HUGE_PAGE_MIN_BYTES:
        ext.advise_huge_pages(buffer.data_ptr(), buffer.nbytes)
    return buffer


def _cpu_launchers():
    ext = compiled_extension()

    def threads(tensor):
        return torch.get_num_threads()

    def no_guard(tensor):
        return contextlib.nullcontext()

    def fwd(logits, layout, vocab, tokens, inv_temp, logp, entropy, lse):
        ext.token_logprobs_fwd_cpu(
            logits.data_ptr(), DTYPE_TAGS[logits.dtype], layout, vocab, tokens.data_ptr(), inv_temp,
            logp.data_ptr(), entropy.data_ptr(), lse.data_ptr(), torch.get_num_threads(),
        )

    def bwd(logits, layout, vocab, tokens, inv_temp, lse, entropy, grad_logp, grad_entropy, grad_logits,
            grad_layout):
        ext.token_logprobs_bwd_cpu(
            logits.data_ptr(), DTYPE_TAGS[logits.dtype], layout, vocab, tokens.data_ptr(), inv_temp,
            lse.data_ptr(), entropy.data_ptr(), grad_logp.data_ptr(), grad_entropy.data_ptr(),
            grad_logits.data_ptr(), grad_layout, torch.get_num_threads(),
        )

    def fused(logits, layout, vocab, tokens, inv_temp, advantages, old_logp, ref_logp, policy_weight, weight,
              params, loss, logp, entropy, grad_logits, grad_layout):
        ext.policy_loss_fused_cpu(*_fused_pointers(
            logits, layout, vocab, tokens, inv_temp, advantages, old_logp, ref_logp, policy_weight, weight,
            params, loss, logp, entropy, grad_logits, grad_layout), torch.get_num_threads())

    return types.SimpleNamespace(token_logprobs_fwd=fwd, token_logprobs_bwd=bwd, policy_loss_fused=fused,
                                 **_kl_launchers(ext.kl_div_fwd_cpu, ext.kl_div_bwd_cpu, threads, no_guard),
                                 **_topk_launcher(ext.row_topk_cpu, threads, no_guard),
                                 **_sample_launcher(ext.sample_cpu, threads, no_guard))


def _topk_launcher(entry, launch_arg, device_guard):
    def row_topk(logits, layout, vocab, tokens, inv_temp, k, ids, values, logp, entropy, lse):
        with device_guard(logits):
            entry(logits.data_ptr(), DTYPE_TAGS[logits.dtype], layout, vocab, tokens.data_ptr(), inv_temp, k,
                  ids.data_ptr(), values.data_ptr(), logp.data_ptr(), entropy.data_ptr(), lse.data_ptr(),
                  launch_arg(logits))

    return {"row_topk": row_topk}


def _sample_launcher(entry, launch_arg, device_guard):
    def sample(logits, layout, vocab, temperature, top_k, top_p, min_p, seed, num_samples, adaptive, t_min, t_max,
               h_low, h_high, tokens, logprobs, raw_logprobs, entropy):
        with device_guard(logits):
            entry(logits.data_ptr(), DTYPE_TAGS[logits.dtype], layout, vocab, temperature.data_ptr(),
                  top_k.data_ptr(), top_p.data_ptr(), min_p.data_ptr(), seed.data_ptr(), num_samples, int(adaptive),
                  (t_min, t_max, h_low, h_high), tokens.data_ptr(), logprobs.data_ptr(), raw_logprobs.data_ptr(),
                  entropy.data_ptr(), launch_arg(logits))

    return {"sample": sample}


def _kl_launchers(fwd_entry, bwd_entry, launch_arg, device_guard):
    """kl_div_fwd / kl_div_bwd over rlfuse._C entry points; launch_arg(tensor) is threads or stream."""

    def ptr(tensor):
        return 0 if tensor is None else tensor.data_ptr()

    def kl_div_fwd(logits, layout, other, other_layout, vocab, inv_temp, direction, kl, lse, other_lse):
        with device_guard(logits):
            fwd_entry(logits.data_ptr(), other.data_ptr(), DTYPE_TAGS[logits.dtype], layout, other_layout, vocab,
                      inv_temp, direction, kl.data_ptr(), lse.data_ptr(), other_lse.data_ptr(), launch_arg(logits))

    def kl_div_bwd(logits, layout, other, other_layout, vocab, inv_temp, direction, kl, lse, other_lse, grad_kl,
                   grad_logits, grad_layout, grad_other, grad_other_layout):
        with device_guard(logits):
            bwd_entry(logits.data_ptr(), other.data_ptr(), DTYPE_TAGS[logits.dtype], layout, other_layout, vocab,
                      inv_temp, direction, kl.data_ptr(), lse.data_ptr(), other_lse.data_ptr(), grad_kl.data_ptr(),
                      ptr(grad_logits), grad_layout, ptr(grad_other), grad_other_layout, launch_arg(logits))

    return {"kl_div_fwd": kl_div_fwd, "kl_div_bwd": kl_div_bwd}


def _fused_pointers(logits, layout, vocab, tokens, inv_temp, advantages, old_logp, ref_logp, policy_weight,
                    weight, params, loss, logp, entropy, grad_logits, grad_layout):
    """The 17 positional arguments of rlfuse._C.policy_loss_fused_* (see csrc/bindings.cpp)."""
    return (
        logits.data_ptr(), DTYPE_TAGS[logits.dtype], layout, vocab, tokens.data_ptr(), inv_temp,
        advantages.data_ptr(), old_logp.data_ptr(), ref_logp.data_ptr(), policy_weight.data_ptr(),
        weight.data_ptr(), tuple(params), loss.data_ptr(), logp.data_ptr(), entropy.data_ptr(),
        grad_logits.data_ptr(), grad_layout,
    )


def _cuda_launchers():
    ext = compiled_extension()

    def stream(tensor):
        return torch.cuda.current_stream(tensor.device).cuda_stream

    def device_guard(tensor):
        return torch.cuda.device(tensor.device)

    def fwd(logits, layout, vocab, tokens, inv_temp, logp, entropy, lse):
        with torch.cuda.device(logits.device):
            ext.token_logprobs_fwd_cuda(
                logits.data_ptr(), DTYPE_TAGS[logits.dtype], layout, vocab, tokens.data_ptr(), inv_temp,
                logp.data_ptr(), entropy.data_ptr(), lse.data_ptr(), stream(logits),
            )

    def bwd(logits, layout, vocab, tokens, inv_temp, lse, entropy, grad_logp, grad_entropy, grad_logits,
            grad_layout):
        with torch.cuda.device(logits.device):
            ext.token_logprobs_bwd_cuda(
                logits.data_ptr(), DTYPE_TAGS[logits.dtype], layout, vocab, tokens.data_ptr(), inv_temp,
                lse.data_ptr(), entropy.data_ptr(), grad_logp.data_ptr(), grad_entropy.data_ptr(),
                grad_logits.data_ptr(), grad_layout, stream(logits),
            )

    def fused(logits, layout, vocab, tokens, inv_temp, advantages, old_logp, ref_logp, policy_weight, weight,
              params, loss, logp, entropy, grad_logits, grad_layout):
        with torch.cuda.device(logits.device):
            ext.policy_loss_fused_cuda(*_fused_pointers(
                logits, layout, vocab, tokens, inv_temp, advantages, old_logp, ref_logp, policy_weight, weight,
                params, loss, logp, entropy, grad_logits, grad_layout), stream(logits))

    return types.SimpleNamespace(token_logprobs_fwd=fwd, token_logprobs_bwd=bwd, policy_loss_fused=fused,
                                 **_kl_launchers(ext.kl_div_fwd_cuda, ext.kl_div_bwd_cuda, stream, device_guard),
                                 **_topk_launcher(ext.row_topk_cuda, stream, device_guard),
                                 **_sample_launcher(ext.sample_cuda, stream, device_guard))


@functools.cache
def _compiled_launchers(backend: str):
    return _cpu_launchers() if backend == "cpu" else _cuda_launchers()


def kernels(backend: str, op: str):
    """The launchers of ``op`` on a kernel backend ("cpu", "cuda" or "triton")."""
    if backend in ("cpu", "cuda"):
        return _compiled_launchers(backend)
    if backend == "triton":
        return importlib.import_module(f"rlfuse.triton_kernels.{op}")
    raise ValueError(f"no kernels for backend {backend!r}")
