"""One GRPO loss step (forward + backward of ``compute_loss``) with TRL's GRPOTrainer vs RLFuseGRPOTrainer, on CPU.

    .venv/bin/python bench/trl_grpo_step.py --vocab 32768 --seq 512 --batch 8 [--loss-type dapo]

Each trainer runs in its own subprocess (peak RSS is per process): a randomly initialised Qwen2-shaped
model built from a config (no download), a word-level tokenizer built in-process, one hand-made batch of
``batch`` completions of ``seq`` tokens (old log-probs given, so the clipped ratio path runs). Reported:
median wall time of ``--repeat`` loss steps and the peak-RSS growth over the process's state before the
first step (model, optimizer-free). fp32 end to end.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _rss_mib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def run_one(which, args):
    import torch
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    from rlfuse.integrations.trl import RLFuseGRPOTrainer

    torch.manual_seed(0)
    words = ["<pad>", "<eos>"] + [f"w{i}" for i in range(args.vocab - 2)]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="w0"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="w0")
    config = Qwen2Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=args.seq + 64, tie_word_embeddings=False, pad_token_id=0,
                         eos_token_id=1)
    model = Qwen2ForCausalLM(config)
    cls = {"trl": GRPOTrainer, "rlfuse": RLFuseGRPOTrainer}[which]
    with tempfile.TemporaryDirectory() as out:
        grpo = GRPOConfig(output_dir=out, per_device_train_batch_size=args.batch, num_generations=args.batch,
                          max_completion_length=args.seq, report_to="none", use_cpu=True, bf16=False,
                          loss_type=args.loss_type, beta=0.0, disable_tqdm=True)
        trainer = cls(model=model, reward_funcs=lambda completions, **k: [0.0] * len(completions), args=grpo,
                      train_dataset=Dataset.from_dict({"prompt": ["w1"] * args.batch}), processing_class=tokenizer)
        trainer.current_gradient_accumulation_steps = 1
        g = torch.Generator().manual_seed(0)
        b, p, t = args.batch, 16, args.seq
        completion_ids = torch.randint(2, args.vocab, (b, t), generator=g)
        mask = torch.ones(b, t, dtype=torch.long)
        inputs = {"prompt_ids": torch.randint(2, args.vocab, (b, p), generator=g),
                  "prompt_mask": torch.ones(b, p, dtype=torch.long), "completion_ids": completion_ids,
                  "completion_mask": mask, "advantages": torch.randn(b, generator=g),
                  "old_per_token_logps": -torch.rand(b, t, generator=g) * 10 - 5,
                  "num_items_in_batch": mask.sum().float()}
        model.train()
        times = []
        base_rss = _rss_mib()
        base_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        for _ in range(args.repeat):
            model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            loss = trainer.compute_loss(model, dict(inputs))
            loss.backward()
            times.append(time.perf_counter() - start)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return {"which": which, "loss": float(loss), "median_s": statistics.median(times), "times_s": times,
                "peak_rss_growth_mib": peak - max(base_peak, base_rss), "base_rss_mib": base_rss}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--loss-type", default="dapo")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--one", choices=["trl", "rlfuse"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args)))
        return
    results = []
    for which in ("trl", "rlfuse"):
        out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--one", which], capture_output=True, text=True,
                             check=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    n = args.batch * args.seq
    print(f"GRPO loss step (compute_loss + backward), loss_type={args.loss_type}, tokens={n}, vocab={args.vocab}, "
          f"hidden={args.hidden}, layers={args.layers}, fp32, CPU, {os.cpu_count()} cores")
    for r in results:
        print(f"  {r['which']:7s} median {r['median_s']:.3f} s  (runs {', '.join(f'{t:.3f}' for t in r['times_s'])})  "
              f"peak RSS growth {r['peak_rss_growth_mib']:.0f} MiB  loss {r['loss']:.6f}")
    a, b = results
    print(f"  rlfuse / trl: time {b['median_s'] / a['median_s']:.2f}x, peak memory growth "
          f"{b['peak_rss_growth_mib'] / max(a['peak_rss_growth_mib'], 1e-9):.2f}x")


if __name__ == "__main__":
    main()
