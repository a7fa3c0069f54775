"""``--op sample``: top-k 50 + top-p 0.9 sampling with log-probs (a decode step's batch, B=256 V=151936 by
default on every device) vs torch's sort-based sampler, and FlashInfer's sampler on a GPU where it imports."""

from __future__ import annotations

import argparse

import torch

import rlfuse

from .harness import Case, Contender, Draws, Inputs, kernels_vs_torch, register_case, short_error


def _flashinfer_contender(device: torch.device, temperature: float, top_k: int, top_p: float,
                          notes: list[str]) -> list[Contender]:
    """FlashInfer's sorting-free top-k/top-p sampler, on a GPU where it is importable (tokens only)."""
    if device.type != "cuda":
        return []
    try:
        from flashinfer.sampling import top_k_top_p_sampling_from_logits
    except Exception as exc:  # not installed, or built for another torch / CUDA
        notes.append(f"FlashInfer not benchmarked: {short_error(exc)}")
        return []
    notes.append("flashinfer returns tokens only (no log-probs or entropy)")

    def forward(inp: Inputs):
        return [top_k_top_p_sampling_from_logits(inp.tensors["logits"] / temperature, top_k, top_p)]

    return [Contender("flashinfer", lambda dtype: forward)]


@register_case("sample", tokens=256, vocab=151936, dtypes=("fp32", "bf16"))
def _sample_case(args: argparse.Namespace, device: torch.device) -> Case:
    top_k, top_p, temperature = 50, 0.9, 0.8

    def make_inputs(dtype: torch.dtype) -> Inputs:
        return Inputs({"logits": Draws(args, device).logits(dtype, requires_grad=False)}, [], [])

    def call(t: dict, backend: str):
        out = rlfuse.sample(t["logits"], temperature=temperature, top_k=top_k, top_p=top_p, seed=0,
                            backend=backend)
        return [out.tokens, out.logprobs]

    def torch_sort_sampler(logits):
        # The usual PyTorch sampler (HF / vLLM style): full sort, cumulative softmax, multinomial.
        x = logits.float() / temperature
        values, ids = torch.sort(x, dim=-1, descending=True)
        values[..., top_k:] = float("-inf")
        probs = torch.softmax(values, -1)
        outside = probs.cumsum(-1) - probs > top_p
        values = values.masked_fill(outside, float("-inf"))
        choice = torch.multinomial(torch.softmax(values, -1), 1)
        tokens = ids.gather(-1, choice).squeeze(-1)
        logprobs = torch.log_softmax(values, -1).gather(-1, choice).squeeze(-1)
        return [tokens, logprobs]

    case = kernels_vs_torch("sample", f"sample (top-k {top_k}, top-p {top_p}) with log-probs", args, device,
                            make_inputs, call, torch_sort_sampler, ("logits",), {"fwd": 1, "fwd+bwd": 1},
                            [f"temperature {temperature}, top_k {top_k}, top_p {top_p}; forward only (no backward)"])
    case.contenders += _flashinfer_contender(device, temperature, top_k, top_p, case.notes)
    return case

