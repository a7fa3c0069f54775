"""RLFuseGRPOTrainer vs TRL's own GRPOTrainer on CPU: same losses and gradients.

A tiny randomly initialised Qwen2 causal LM and a word-level tokenizer are built in-process and
saved to a temporary folder (no download: HF_HUB_OFFLINE). Two kinds of checks:

- a real ``trainer.train()``: three optimiser steps with each trainer from the same saved model and
  seed, for several loss types; the logged per-step losses and gradient norms must agree;
- ``compute_loss`` on one hand-made batch (old / reference / vLLM log-probs, advantages, padding)
  for the option matrix (loss types x importance-sampling level x delta x beta x entropy mask x
  entropy bonus x vLLM correction modes): loss and every parameter gradient must agree.
"""

from __future__ import annotations

import copy
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

pytest.importorskip("trl", reason="TRL is not installed (pip install 'rlfuse[trl]')")
pytest.importorskip("transformers", reason="transformers is not installed (pip install 'rlfuse[trl]')")
pytest.importorskip("datasets", reason="datasets is not installed (pip install 'rlfuse[trl]')")
pytest.importorskip("tokenizers", reason="tokenizers is not installed (pip install 'rlfuse[trl]')")

import torch  # noqa: E402

VOCAB = 48
COMPLETION = 8
RTOL, ATOL = 2e-4, 1e-6


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    path = tmp_path_factory.mktemp("tiny-lm")
    words = ["<pad>", "<eos>"] + [f"w{i}" for i in range(VOCAB - 2)]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="w0"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>",
                                        unk_token="w0", padding_side="left")
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                         tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, bos_token_id=1)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():  # a peaked-enough distribution that clipping and masks actually bite
        model.lm_head.weight.mul_(20.0)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = 1
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def _reward(completions, **kwargs):
    return [sum(word in ("w3", "w4", "w5") for word in c.split()) / 4.0 - 0.5 for c in completions]


def _config(tmp_path, **overrides):
    from trl import GRPOConfig

    fields = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4, steps_per_generation=3,
        max_completion_length=COMPLETION, max_steps=3, learning_rate=3e-2, logging_steps=1, report_to="none",
        use_cpu=True, seed=0, save_strategy="no", disable_tqdm=True, beta=0.0, temperature=1.0,
        dataloader_num_workers=0, bf16=False,  # fp32 end to end: agreement to fp32 tolerance
    )
    fields.update(overrides)
    return GRPOConfig(**fields)


def _dataset():
    from datasets import Dataset

    return Dataset.from_dict({"prompt": ["w1 w2 w3", "w7 w8", "w9 w10 w11 w12"]})


def _trainer(cls, model_dir, tmp_path, **overrides):
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(model_dir)  # AutoTokenizer would pick Qwen2's BPE class
    trainer_kwargs = {k: overrides.pop(k) for k in ("rlfuse_from_hidden",) if k in overrides}
    return cls(model=model_dir, reward_funcs=_reward, args=_config(tmp_path, **overrides),
               train_dataset=_dataset(), processing_class=tokenizer, **trainer_kwargs)


def _train(cls, model_dir, tmp_path, **overrides):
    trainer = _trainer(cls, model_dir, tmp_path, **overrides)
    trainer.train()
    history = [entry for entry in trainer.state.log_history if "loss" in entry and "grad_norm" in entry]
    assert len(history) == 3, trainer.state.log_history
    return history


TRAIN_CASES = {
    "grpo": dict(loss_type="grpo"),
    "dapo": dict(loss_type="dapo", epsilon_high=0.28),
    "dr_grpo+temperature": dict(loss_type="dr_grpo", temperature=0.7),
    "bnpo+beta": dict(loss_type="bnpo", beta=0.04),
    "cispo": dict(loss_type="cispo", epsilon_high=5.0),
    "sapo": dict(loss_type="sapo"),
    "gspo": dict(loss_type="grpo", importance_sampling_level="sequence", epsilon=3e-4, epsilon_high=4e-4),
    "dapo+entropy": dict(loss_type="dapo", top_entropy_quantile=0.5, entropy_coef=0.01, delta=2.0),
}


@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_train_three_steps_matches_grpo_trainer(case, model_dir, tmp_path):
    from trl import GRPOTrainer

    from rlfuse.integrations.trl import RLFuseGRPOTrainer

    overrides = TRAIN_CASES[case]
    expected = _train(GRPOTrainer, model_dir, tmp_path / "trl", **overrides)
    got = _train(RLFuseGRPOTrainer, model_dir, tmp_path / "rlfuse", **overrides)
    _assert_same_history(case, expected, got)


@pytest.mark.parametrize("case", ["dapo+entropy", "gspo"])
def test_train_from_hidden_states_matches_grpo_trainer(case, model_dir, tmp_path):
    """rlfuse_from_hidden=True: the loss from the decoder's hidden states and the lm_head, no logits."""
    from trl import GRPOTrainer

    from rlfuse.integrations.trl import RLFuseGRPOTrainer

    overrides = TRAIN_CASES[case]
    expected = _train(GRPOTrainer, model_dir, tmp_path / "trl", **overrides)
    got = _train(RLFuseGRPOTrainer, model_dir, tmp_path / "rlfuse", rlfuse_from_hidden=True, **overrides)
    _assert_same_history(case, expected, got)


def _assert_same_history(case, expected, got):
    for step, (e, g) in enumerate(zip(expected, got)):
        for key in ("loss", "grad_norm", "entropy"):
            assert g[key] == pytest.approx(e[key], rel=RTOL, abs=ATOL), (case, step, key, e, g)
        for key in e:
            if key.startswith("clip_ratio") or key in ("kl", "cispo_clip_ratio", "policy_loss"):
                assert g[key] == pytest.approx(e[key], rel=RTOL, abs=ATOL), (case, step, key, e, g)
    assert any(abs(e["grad_norm"]) > 0 for e in expected)


# --- compute_loss on one batch: the option matrix ------------------------------------------------


@pytest.fixture(scope="module")
def trainers(model_dir, tmp_path_factory):
    from trl import GRPOTrainer

    from rlfuse.integrations.trl import RLFuseGRPOTrainer

    tmp = tmp_path_factory.mktemp("out")
    # TRL, rlfuse on the logits, rlfuse from the hidden states (LinearLogits: no logits built)
    return (_trainer(GRPOTrainer, model_dir, tmp / "a", max_steps=1),
            _trainer(RLFuseGRPOTrainer, model_dir, tmp / "b", max_steps=1),
            _trainer(RLFuseGRPOTrainer, model_dir, tmp / "c", max_steps=1, rlfuse_from_hidden=True))


def _batch(model=None):
    g = torch.Generator().manual_seed(1)
    b, p = 6, 4
    prompt_ids = torch.randint(2, VOCAB, (b, p), generator=g)
    prompt_mask = torch.ones(b, p, dtype=torch.long)
    prompt_mask[0, :2] = 0
    completion_ids = torch.randint(2, VOCAB, (b, COMPLETION), generator=g)
    lengths = torch.tensor([8, 5, 3, 8, 1, 0])  # one fully masked completion
    completion_mask = (torch.arange(COMPLETION)[None] < lengths[:, None]).long()
    old = -torch.rand(b, COMPLETION, generator=g) * 4 * completion_mask
    if model is not None:  # old log-probs near the current ones, so that only some ratios are clipped
        with torch.no_grad():
            ids = torch.cat([prompt_ids, completion_ids], 1)
            logits = model(input_ids=ids, attention_mask=torch.cat([prompt_mask, completion_mask], 1)).logits
            logits = logits[:, p - 1:-1].float()
            current = torch.log_softmax(logits, -1).gather(-1, completion_ids[..., None])[..., 0]
        old = (current + 0.2 * torch.randn(b, COMPLETION, generator=g)) * completion_mask
    return {
        "prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
        "completion_mask": completion_mask, "advantages": torch.randn(b, generator=g),
        "old_per_token_logps": old,
        "ref_per_token_logps": (old - torch.rand(b, COMPLETION, generator=g)) * completion_mask,
        "sampling_per_token_logps": (old + 0.3 * torch.randn(b, COMPLETION, generator=g)) * completion_mask,
        "num_items_in_batch": completion_mask.sum().float() * 3,
    }


def _is_ratio(batch, mode, clip_min, clip_max):
    """TRL's vLLM importance-sampling ratio (GRPOTrainer._generate_and_score_completions)."""
    mask = batch["completion_mask"]
    diff = (batch["old_per_token_logps"] - batch["sampling_per_token_logps"]) * mask
    if mode.startswith("sequence"):
        diff = diff.sum(-1, keepdim=True)
    ratio = torch.exp(diff)
    if mode.endswith("truncate"):
        return torch.clamp(ratio, min=clip_min, max=clip_max)
    low = clip_min if clip_min is not None else -float("inf")
    high = clip_max if clip_max is not None else float("inf")
    return ratio.masked_fill((ratio < low) | (ratio > high), 0.0)


def _configure(trainer, options):
    attributes = {"loss_type", "importance_sampling_level", "epsilon_low", "epsilon_high", "beta",
                  "top_entropy_quantile", "entropy_coef", "use_vllm", "vllm_importance_sampling_correction",
                  "vllm_importance_sampling_mode", "off_policy_mask_threshold"}
    trainer.args = copy.copy(trainer.args)
    trainer.current_gradient_accumulation_steps = options.get("accumulation", 1)
    for key, value in options.items():
        if key == "accumulation":
            continue
        if key in attributes:
            setattr(trainer, key, value)
        else:
            setattr(trainer.args, key, value)
    trainer._entropy_bonus_enabled = trainer.entropy_coef != 0.0
    trainer.ref_model = None


BASE = {"loss_type": "dapo", "importance_sampling_level": "token", "epsilon_low": 0.2, "epsilon_high": 0.28,
        "delta": None, "beta": 0.0, "use_bias_correction_kl": True, "top_entropy_quantile": 1.0,
        "entropy_coef": 0.0, "use_vllm": False, "vllm_importance_sampling_correction": False,
        "off_policy_mask_threshold": None}
MATRIX = {}
for loss_type in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo", "vespo"):
    extra = {"epsilon_high": 5.0} if loss_type == "cispo" else {}
    MATRIX[loss_type] = {"loss_type": loss_type, **extra}
    MATRIX[f"{loss_type}+beta"] = {"loss_type": loss_type, "beta": 0.04, **extra}
    MATRIX[f"{loss_type}+entropy_mask+bonus"] = {"loss_type": loss_type, "top_entropy_quantile": 0.4,
                                                 "entropy_coef": 0.05, **extra}
    for mode in ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask"):
        MATRIX[f"{loss_type}+vllm_{mode}"] = {"loss_type": loss_type, "use_vllm": True,
                                              "vllm_importance_sampling_correction": True,
                                              "vllm_importance_sampling_mode": mode, **extra}
for loss_type in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo"):
    MATRIX[f"{loss_type}+sequence"] = {"loss_type": loss_type, "importance_sampling_level": "sequence",
                                       "epsilon_low": 3e-2, "epsilon_high": 4e-2}
    MATRIX[f"{loss_type}+sequence+beta_biascorr"] = {"loss_type": loss_type, "importance_sampling_level": "sequence",
                                                     "beta": 0.1}
MATRIX["grpo+sequence+vllm_token_truncate"] = {"loss_type": "grpo", "importance_sampling_level": "sequence",
                                               "use_vllm": True, "vllm_importance_sampling_correction": True,
                                               "vllm_importance_sampling_mode": "token_truncate"}
MATRIX["dapo+delta"] = {"loss_type": "dapo", "delta": 1.5}
MATRIX["grpo+beta_no_biascorr"] = {"loss_type": "grpo", "beta": 0.3, "use_bias_correction_kl": False}
MATRIX["grpo+accumulation"] = {"loss_type": "grpo", "accumulation": 2, "beta": 0.04}
MATRIX["bnpo+accumulation"] = {"loss_type": "bnpo", "accumulation": 2, "entropy_coef": 0.01}
MATRIX["dapo+accumulation"] = {"loss_type": "dapo", "accumulation": 2, "steps_per_generation": 2}
MATRIX["dr_grpo+accumulation"] = {"loss_type": "dr_grpo", "accumulation": 3}
MATRIX["dapo+opsm"] = {"loss_type": "dapo", "off_policy_mask_threshold": 0.05}
# The off-policy sequence mask as a LossConfig knob (gspo: folded), tight enough to drop sequences.
MATRIX["grpo+opsm"] = {"loss_type": "grpo", "off_policy_mask_threshold": -0.02, "beta": 0.04}
MATRIX["cispo+opsm"] = {"loss_type": "cispo", "epsilon_high": 5.0, "off_policy_mask_threshold": 0.0}
MATRIX["grpo+sequence+opsm"] = {"loss_type": "grpo", "importance_sampling_level": "sequence",
                                "off_policy_mask_threshold": -0.02}
MATRIX["bnpo+sequence+opsm"] = {"loss_type": "bnpo", "importance_sampling_level": "sequence",
                                "off_policy_mask_threshold": -0.02}
MATRIX["dapo+vllm_token_truncate+opsm"] = {"loss_type": "dapo", "use_vllm": True,
                                           "vllm_importance_sampling_correction": True,
                                           "vllm_importance_sampling_mode": "token_truncate",
                                           "off_policy_mask_threshold": 0.0}
MATRIX["grpo+eps_0.1"] = {"loss_type": "grpo", "epsilon_low": 0.1, "epsilon_high": 0.1}


@pytest.mark.parametrize("case", list(MATRIX))
def test_compute_loss_matches(case, trainers):
    options = {**BASE, **MATRIX[case]}
    batch = _batch(trainers[0].model)
    if options["use_vllm"]:
        mode = options["vllm_importance_sampling_mode"]
        bounds = (0.5, 1.5) if mode.startswith("token") else (0.3, 3.0)
        batch["importance_sampling_ratio"] = _is_ratio(batch, mode, *bounds)
    results = []
    for trainer in trainers:
        _configure(trainer, options)
        model = trainer.model
        model.train()
        model.zero_grad(set_to_none=True)
        loss = trainer.compute_loss(model, dict(batch))
        loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads, {k: list(v) for k, v in trainer._metrics["train"].items()}))
        trainer._metrics["train"].clear()
    (loss_a, grads_a, metrics_a), *others = results
    assert any(g.abs().max() > 0 for g in grads_a.values())
    for which, (loss_b, grads_b, metrics_b) in zip(("logits", "from_hidden"), others):
        torch.testing.assert_close(loss_b, loss_a, rtol=RTOL, atol=ATOL, msg=lambda m: f"{case} {which}: {m}")
        assert grads_a.keys() == grads_b.keys()
        for name in grads_a:
            torch.testing.assert_close(grads_b[name], grads_a[name], rtol=RTOL, atol=1e-5,
                                       msg=lambda m: f"{case} {which}: {name}: {m}")
        for key in metrics_a:
            assert metrics_b[key] == pytest.approx(metrics_a[key], rel=RTOL, abs=1e-5), (case, which, key)


@pytest.mark.parametrize("options, message", [
    ({"loss_type": "sapo", "importance_sampling_level": "sequence"}, "sequence"),
    ({"loss_type": "cispo", "importance_sampling_level": "sequence"}, "sequence"),
    ({"loss_type": "grpo", "importance_sampling_level": "sequence", "delta": 2.0}, "delta"),
    ({"loss_type": "dapo", "delta": 1.1, "epsilon_high": 0.28}, "delta"),
])
def test_unsupported_options_raise_at_construction(options, message, model_dir, tmp_path):
    from rlfuse.integrations.trl import RLFuseGRPOTrainer

    with pytest.raises(ValueError, match=message):
        _trainer(RLFuseGRPOTrainer, model_dir, tmp_path, **options)
