"""token_logprobs_and_entropy (from logits) and score_from_hidden (streamed from hidden states)."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from forkrl.core.entropy import score_from_hidden, token_logprobs_and_entropy
from tests.reference.entropy_ref import (
    ref_logits_logp_entropy_autograd,
    ref_score_from_hidden,
    ref_token_logprobs_and_entropy,
)

LN3 = math.log(3.0)  # 1.0986122886681098


def close(actual, expected, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol)


# ---------------------------------------------------------------- from logits


def test_hand_computed_1x2x3():
    # row 0: uniform logits -> p = 1/3 each: logp = -ln 3 = -1.098612, H = ln 3 = 1.098612
    # row 1: logits ln(1, 2, 3) -> p = (1/6, 2/6, 3/6); token 2: logp = ln(1/2) = -0.693147;
    #        H = (1/6) ln 6 + (1/3) ln 3 + (1/2) ln 2 = 0.298627 + 0.366204 + 0.346574 = 1.011404
    logits = torch.tensor([[[0.0, 0.0, 0.0], [0.0, math.log(2.0), math.log(3.0)]]])  # (1, 2, 3)
    tokens = torch.tensor([[1, 2]])
    logp, entropy = token_logprobs_and_entropy(logits, tokens)
    assert logp.shape == entropy.shape == (1, 2)
    assert logp.dtype == entropy.dtype == torch.float32
    close(logp, torch.tensor([[-LN3, -0.6931471805599453]]), rtol=0, atol=1e-6)
    close(entropy, torch.tensor([[LN3, 1.0114042647073518]]), rtol=0, atol=1e-6)


def test_hand_computed_temperature():
    # logits (0, 2 ln 2, 2 ln 3) at T = 2 -> z = (0, ln 2, ln 3): the second row above again
    logits = torch.tensor([[[0.0, 2 * math.log(2.0), 2 * math.log(3.0)]]])
    logp, entropy = token_logprobs_and_entropy(logits, torch.tensor([[2]]), temperature=2.0)
    close(logp, torch.tensor([[-0.6931471805599453]]), rtol=0, atol=1e-6)
    close(entropy, torch.tensor([[1.0114042647073518]]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.3])
@pytest.mark.parametrize("chunk_size", [1, 4, 7, 1000])  # B*L = 15: 4 and 7 do not divide it
def test_logits_match_reference(temperature, chunk_size):
    logits = 3 * torch.randn(3, 5, 41)
    tokens = torch.randint(0, 41, (3, 5))
    logp, entropy = token_logprobs_and_entropy(logits, tokens, temperature, chunk_size=chunk_size)
    ref_logp, ref_entropy = ref_token_logprobs_and_entropy(logits, tokens, temperature)
    close(logp, ref_logp)
    close(entropy, ref_entropy)
    # and the vectorised naive computation
    log_p = torch.log_softmax(logits / temperature, dim=-1)
    close(logp, log_p.gather(-1, tokens.unsqueeze(-1)).squeeze(-1))
    close(entropy, -(log_p.exp() * log_p).sum(-1))


def test_chunk_loop_gives_identical_results():
    logits = 4 * torch.randn(2, 9, 53)
    tokens = torch.randint(0, 53, (2, 9))
    full = token_logprobs_and_entropy(logits, tokens, 0.9, chunk_size=18)
    for chunk_size in (1, 5, 17):
        chunked = token_logprobs_and_entropy(logits, tokens, 0.9, chunk_size=chunk_size)
        torch.testing.assert_close(chunked, full, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_logits_equal_their_float32_upcast(dtype):
    logits = (5 * torch.randn(2, 6, 37)).to(dtype)
    tokens = torch.randint(0, 37, (2, 6))
    logp, entropy = token_logprobs_and_entropy(logits, tokens, 0.8, chunk_size=5)
    ref_logp, ref_entropy = token_logprobs_and_entropy(logits.float(), tokens, 0.8)
    assert logp.dtype == entropy.dtype == torch.float32
    torch.testing.assert_close(logp, ref_logp, rtol=0, atol=1e-6)
    torch.testing.assert_close(entropy, ref_entropy, rtol=0, atol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("use", ["both", "logp", "entropy"])
def test_logits_gradient_matches_autograd_reference(temperature, use):
    logits = (3 * torch.randn(2, 4, 23)).requires_grad_()
    tokens = torch.randint(0, 23, (2, 4))
    c_logp, c_ent = torch.randn(2, 4), torch.randn(2, 4)
    logp, entropy = token_logprobs_and_entropy(logits, tokens, temperature, chunk_size=3)
    ref_logits = logits.detach().double().requires_grad_()
    ref_logp, ref_entropy = ref_logits_logp_entropy_autograd(ref_logits, tokens, temperature)
    loss = {"both": (c_logp * logp + c_ent * entropy), "logp": c_logp * logp, "entropy": c_ent * entropy}[use]
    ref_loss = {
        "both": (c_logp * ref_logp + c_ent * ref_entropy),
        "logp": c_logp * ref_logp,
        "entropy": c_ent * ref_entropy,
    }[use]
    (grad,) = torch.autograd.grad(loss.sum(), logits)
    (ref_grad,) = torch.autograd.grad(ref_loss.sum(), ref_logits)
    assert grad.dtype == torch.float32
    close(grad, ref_grad)


def test_logits_gradient_low_precision_dtype():
    logits = (2 * torch.randn(3, 11)).to(torch.bfloat16).requires_grad_()
    tokens = torch.randint(0, 11, (3,))
    logp, _ = token_logprobs_and_entropy(logits, tokens)
    logp.sum().backward()
    up = logits.detach().float().requires_grad_()
    token_logprobs_and_entropy(up, tokens)[0].sum().backward()
    assert logits.grad.dtype == torch.bfloat16
    torch.testing.assert_close(logits.grad, up.grad.to(torch.bfloat16), rtol=0, atol=0)


def test_logits_gradcheck_float64():
    logits = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, 5, (2, 3))
    assert torch.autograd.gradcheck(
        lambda x: token_logprobs_and_entropy(x, tokens, 0.8, chunk_size=4), (logits,)
    )


def test_logits_empty_and_bad_arguments():
    logp, entropy = token_logprobs_and_entropy(torch.zeros(0, 4, 7), torch.zeros(0, 4, dtype=torch.long))
    assert logp.shape == entropy.shape == (0, 4)
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs_and_entropy(torch.zeros(1, 2, 3), torch.zeros(1, 2, dtype=torch.long), 0.0)
    with pytest.raises(ValueError, match="tokens.shape"):
        token_logprobs_and_entropy(torch.zeros(1, 2, 3), torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="chunk_size"):
        token_logprobs_and_entropy(torch.zeros(1, 2, 3), torch.zeros(1, 2, dtype=torch.long), chunk_size=0)


# ---------------------------------------------------------------- streamed from hidden states


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.3])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("chunks", [(4, 10), (7, 13), (100, 1000)])  # N = 23, V = 47: no divisors
def test_score_matches_naive_and_reference(temperature, with_bias, chunks):
    n, d, vocab = 23, 8, 47
    hidden, weight = torch.randn(n, d), torch.randn(vocab, d)
    bias = torch.randn(vocab) if with_bias else None
    tokens = torch.randint(0, vocab, (n,))
    token_chunk, vocab_chunk = chunks
    logp, entropy = score_from_hidden(
        hidden,
        weight,
        tokens,
        bias=bias,
        temperature=temperature,
        token_chunk=token_chunk,
        vocab_chunk=vocab_chunk,
    )
    assert logp.dtype == entropy.dtype == torch.float32
    ref_logp, ref_entropy = ref_score_from_hidden(hidden, weight, tokens, bias, temperature)
    close(logp, ref_logp)
    close(entropy, ref_entropy)
    logits = hidden @ weight.T + (bias if with_bias else 0)  # (N, V) naive
    log_p = torch.log_softmax(logits / temperature, dim=-1)
    close(logp, log_p.gather(-1, tokens.unsqueeze(-1)).squeeze(-1))
    close(entropy, -(log_p.exp() * log_p).sum(-1))


def test_score_tied_head_batched_shape():
    # Tied head: the weight is the embedding matrix; hidden states (B, L, d) are flattened inside
    emb = torch.nn.Embedding(31, 6)
    ids = torch.randint(0, 31, (2, 5))
    hidden = torch.tanh(emb(ids) @ torch.randn(6, 6))  # (2, 5, 6)
    tokens = torch.randint(0, 31, (2, 5))
    logp, entropy = score_from_hidden(
        hidden, emb.weight, tokens, temperature=0.6, token_chunk=3, vocab_chunk=8
    )
    assert logp.shape == entropy.shape == (2, 5)
    assert not logp.requires_grad and not entropy.requires_grad  # scoring pass: no grad
    ref = token_logprobs_and_entropy(hidden.detach() @ emb.weight.detach().T, tokens, 0.6)
    close(logp, ref[0])
    close(entropy, ref[1])


def test_score_low_precision_equals_float32_upcast():
    hidden = torch.randn(19, 16).to(torch.bfloat16)
    weight = (0.5 * torch.randn(45, 16)).to(torch.bfloat16)
    bias = torch.randn(45).to(torch.bfloat16)
    tokens = torch.randint(0, 45, (19,))
    kw = dict(temperature=0.9, token_chunk=6, vocab_chunk=11)
    logp, entropy = score_from_hidden(hidden, weight, tokens, bias=bias, **kw)
    ref_logp, ref_entropy = score_from_hidden(hidden.float(), weight.float(), tokens, bias=bias.float(), **kw)
    assert logp.dtype == entropy.dtype == torch.float32
    torch.testing.assert_close(logp, ref_logp, rtol=0, atol=1e-6)
    torch.testing.assert_close(entropy, ref_entropy, rtol=0, atol=1e-6)


def test_score_uniform_and_out_of_range_token():
    # zero weight -> uniform over V = 5: logp = -ln 5 = -1.609438, H = ln 5 = 1.609438
    logp, entropy = score_from_hidden(
        torch.randn(3, 4), torch.zeros(5, 4), torch.tensor([0, 4, 5]), vocab_chunk=2
    )
    close(logp[:2], torch.full((2,), -math.log(5.0)))
    close(entropy, torch.full((3,), math.log(5.0)))
    assert torch.isnan(logp[2])  # token 5 is outside the vocabulary: nan, not a plausible number


def test_score_empty_and_bad_arguments():
    logp, entropy = score_from_hidden(torch.zeros(0, 4), torch.randn(5, 4), torch.zeros(0, dtype=torch.long))
    assert logp.shape == entropy.shape == (0,)
    with pytest.raises(ValueError, match="weight"):
        score_from_hidden(torch.zeros(2, 4), torch.zeros(5, 3), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="bias"):
        score_from_hidden(
            torch.zeros(2, 4), torch.zeros(5, 4), torch.zeros(2, dtype=torch.long), bias=torch.zeros(4)
        )
    with pytest.raises(ValueError, match="vocab_chunk"):
        score_from_hidden(
            torch.zeros(2, 4), torch.zeros(5, 4), torch.zeros(2, dtype=torch.long), vocab_chunk=0
        )


# ---------------------------------------------------------------- properties


def _check_bounds(logp, entropy, vocab):
    assert torch.isfinite(logp).all() and torch.isfinite(entropy).all()
    assert (logp <= 0).all()
    assert (entropy >= 0).all()
    assert (entropy <= math.log(vocab) + 1e-5).all()


@given(
    logits=st.integers(1, 4).flatmap(
        lambda v: arrays(
            np.float32,
            st.tuples(st.integers(1, 3), st.integers(1, 4), st.just(v + 1)),
            elements=st.floats(-300, 300, width=32),
        )
    ),
    temperature=st.floats(0.05, 5.0),
    chunk_size=st.integers(1, 5),
    data=st.data(),
)
def test_property_logits_bounds(logits, temperature, chunk_size, data):
    vocab = logits.shape[-1]
    tokens = torch.tensor(data.draw(arrays(np.int64, logits.shape[:-1], elements=st.integers(0, vocab - 1))))
    logp, entropy = token_logprobs_and_entropy(torch.from_numpy(logits), tokens, temperature, chunk_size)
    _check_bounds(logp, entropy, vocab)


@given(
    n=st.integers(1, 6),
    d=st.integers(1, 4),
    vocab=st.integers(2, 9),
    temperature=st.floats(0.05, 5.0),
    vocab_chunk=st.integers(1, 4),
    data=st.data(),
)
def test_property_score_bounds(n, d, vocab, temperature, vocab_chunk, data):
    floats = st.floats(-20, 20, width=32)
    hidden = torch.from_numpy(data.draw(arrays(np.float32, (n, d), elements=floats)))
    weight = torch.from_numpy(data.draw(arrays(np.float32, (vocab, d), elements=floats)))
    tokens = torch.tensor(data.draw(arrays(np.int64, (n,), elements=st.integers(0, vocab - 1))))
    logp, entropy = score_from_hidden(
        hidden, weight, tokens, temperature=temperature, token_chunk=2, vocab_chunk=vocab_chunk
    )
    _check_bounds(logp, entropy, vocab)


def test_sliced_logits_are_chunked_without_a_full_copy():
    # The trainer passes logits[:, :-1] (not flattenable to a view): the chunks must still be views
    from forkrl.core.entropy import _row_blocks

    logits = (3 * torch.randn(3, 6, 19)).requires_grad_()
    sliced = logits[:, :-1]  # (3, 5, 19), non-contiguous
    blocks = _row_blocks(sliced.detach())
    assert all(b.untyped_storage().data_ptr() == logits.untyped_storage().data_ptr() for b in blocks)
    tokens = torch.randint(0, 19, (3, 5))
    c = torch.randn(3, 5)
    logp, entropy = token_logprobs_and_entropy(sliced, tokens, 1.2, chunk_size=4)
    (grad,) = torch.autograd.grad((c * logp + entropy).sum(), logits)
    dense = sliced.detach().contiguous().requires_grad_()
    ref_logp, ref_entropy = token_logprobs_and_entropy(dense, tokens, 1.2, chunk_size=4)
    (ref_grad,) = torch.autograd.grad((c * ref_logp + ref_entropy).sum(), dense)
    torch.testing.assert_close((logp, entropy), (ref_logp, ref_entropy), rtol=0, atol=0)
    torch.testing.assert_close(grad[:, :-1], ref_grad, rtol=0, atol=0)
    assert torch.equal(grad[:, -1], torch.zeros(3, 19))
