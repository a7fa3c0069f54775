"""Exercises every CUDA-backend kernel path on small awkward shapes, for compute-sanitizer.

Run as ``compute-sanitizer --tool memcheck python bench/sanitize_cuda.py`` (bench/gpu_check.sh does).
Covers every dtype, V below/above one block and not a multiple of 16 bytes, strided views whose
rows start unaligned, -inf entries, one row, in-place backward. Exits non-zero on a wrong result.
"""

import sys

import torch

import rlfuse
from rlfuse.reference import token_logprobs_reference


def run_case(rows, vocab, dtype, backend, view_offset=0, inplace=False):
    generator = torch.Generator(device="cuda").manual_seed(rows * 7919 + vocab)
    base = torch.randn(rows, vocab + view_offset, device="cuda", generator=generator).to(dtype)
    base[:, ::97] = float("-inf")
    logits = base[:, view_offset:]  # rows start view_offset elements past a 16-byte boundary
    tokens = torch.randint(0, vocab, (rows,), device="cuda", generator=generator)
    tokens[logits.gather(1, tokens[:, None]).squeeze(1) == float("-inf")] = 1 % vocab
    hidden = logits.float().detach().requires_grad_(True)
    source = hidden.to(dtype)
    logp, entropy = rlfuse.token_logprobs(source, tokens, return_entropy=True, backend=backend,
                                          inplace_backward=inplace)
    (logp.sum() + 0.5 * entropy.sum()).backward()
    ref_logp, ref_entropy = token_logprobs_reference(logits.double(), tokens)
    finite = torch.isfinite(ref_logp)
    ok = torch.allclose(logp.double()[finite], ref_logp[finite], atol=1e-3, rtol=1e-3)
    ok &= torch.allclose(entropy.double(), ref_entropy, atol=1e-3, rtol=1e-3)
    ok &= bool(torch.isfinite(hidden.grad).all())
    return ok


def main():
    failures = []
    backends = [b for b in rlfuse.available_backends("cuda") if b != "torch"]
    for backend in backends:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            for rows, vocab in [(1, 1), (3, 7), (5, 1000), (4, 4096 + 17), (2, 151936), (130, 333)]:
                for view_offset in (0, 3):
                    for inplace in (False, True):
                        if not run_case(rows, vocab, dtype, backend, view_offset, inplace):
                            failures.append((backend, dtype, rows, vocab, view_offset, inplace))
    torch.cuda.synchronize()
    print(f"sanitize_cuda: {len(failures)} failing cases over backends {backends}")
    for failure in failures:
        print("  FAILED", failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
