"""Bad input raises a clear ValueError/TypeError naming the argument, before any kernel runs."""

import pytest
import torch

import rlfuse


@pytest.fixture
def case():
    logits = torch.randn(4, 10)
    tokens = torch.randint(0, 10, (4,))
    return logits, tokens


def test_token_id_too_large(case):
    logits, tokens = case
    tokens[2] = 10
    with pytest.raises(ValueError, match=r"tokens must lie in \[0, V\).*10"):
        rlfuse.token_logprobs(logits, tokens)


def test_negative_token_id(case):
    logits, tokens = case
    tokens[0] = -1
    with pytest.raises(ValueError, match="tokens.*-1"):
        rlfuse.token_logprobs(logits, tokens)


def test_shape_mismatch(case):
    logits, _ = case
    with pytest.raises(ValueError, match="tokens must have shape"):
        rlfuse.token_logprobs(logits, torch.zeros(5, dtype=torch.long))


def test_non_floating_logits(case):
    _, tokens = case
    with pytest.raises(TypeError, match="logits must be float32"):
        rlfuse.token_logprobs(torch.ones(4, 10, dtype=torch.int64), tokens)


def test_float_token_ids(case):
    logits, tokens = case
    with pytest.raises(TypeError, match="tokens must be int32 or int64"):
        rlfuse.token_logprobs(logits, tokens.float())


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("inf"), float("nan")])
def test_bad_temperature(case, temperature):
    logits, tokens = case
    with pytest.raises(ValueError, match="temperature"):
        rlfuse.token_logprobs(logits, tokens, temperature=temperature)


def test_temperature_not_a_number(case):
    logits, tokens = case
    with pytest.raises(TypeError, match="temperature"):
        rlfuse.token_logprobs(logits, tokens, temperature="1.0")


def test_different_devices(case):
    logits, tokens = case
    with pytest.raises(ValueError, match="tokens are on meta but logits are on cpu"):
        rlfuse.token_logprobs(logits, tokens.to("meta"))


def test_logits_without_vocab_dimension():
    with pytest.raises(ValueError, match=r"logits must have shape \[..., V\]"):
        rlfuse.token_logprobs(torch.randn(3, 0), torch.zeros(3, dtype=torch.long))


def test_unknown_backend(case):
    logits, tokens = case
    with pytest.raises(ValueError, match="backend must be one of"):
        rlfuse.token_logprobs(logits, tokens, backend="fast")


def test_backend_unavailable_for_device(case):
    logits, tokens = case
    with pytest.raises(ValueError, match="backend='cuda' is not available for cpu tensors"):
        rlfuse.token_logprobs(logits, tokens, backend="cuda")


def test_float64_on_kernel_backend(case):
    logits, tokens = case
    with pytest.raises(TypeError, match="float64"):
        rlfuse.token_logprobs(logits.double(), tokens, backend="cpu")


def test_inplace_backward_needs_addressable_rows(case):
    logits, tokens = case
    strided_vocab = torch.randn(4, 20)[:, ::2]
    with pytest.raises(ValueError, match="inplace_backward"):
        rlfuse.token_logprobs(strided_vocab, tokens, inplace_backward=True)


def test_logits_not_a_tensor(case):
    _, tokens = case
    with pytest.raises(TypeError, match="logits must be a torch.Tensor"):
        rlfuse.token_logprobs([[0.0] * 10] * 4, tokens)


def test_entropy_checks_logits():
    with pytest.raises(TypeError, match="logits"):
        rlfuse.entropy(torch.ones(3, 4, dtype=torch.int32))
