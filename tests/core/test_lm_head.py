"""selected_logprobs (the selective training head) and lm_head_params."""

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from forkrl.core.entropy import (
    lm_head_params,
    score_from_hidden,
    selected_logprobs,
    token_logprobs_and_entropy,
)
from tests.reference.entropy_ref import ref_selected_logprobs

N, D, V = 17, 8, 29  # V = 29 is prime: no vocab chunk divides it


def close(actual, expected, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol)


def close_grad(actual, expected, rtol=1e-5):
    # Relative to the gradient's scale: an entry that is a sum of cancelling float32 terms carries an
    # absolute error of about eps * max|g|, so a pure per-entry relative test would be meaningless
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=rtol * scale)


def _grads(loss, params):
    params = [p for p in params if p is not None]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]


def _naive_full_logits(hidden, weight, bias, idx, tokens, temperature):
    # The naive path: logits for all N tokens, log_softmax, then pick the selected (position, token)
    logits = hidden @ weight.T + (bias if bias is not None else 0)  # (N, V)
    log_p = torch.log_softmax(logits / temperature, dim=-1)  # (N, V)
    return log_p[idx, tokens[idx]]


@pytest.mark.parametrize("temperature", [1.0, 0.6, 1.7])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("which", ["random", "duplicates", "none", "all"])
def test_selected_matches_naive_values_and_gradients(temperature, with_bias, which):
    hidden = (2 * torch.randn(N, D)).requires_grad_()
    weight = torch.randn(V, D).requires_grad_()
    bias = torch.randn(V).requires_grad_() if with_bias else None
    tokens = torch.randint(0, V, (N,))
    tokens[3] = tokens[5]  # two positions with the same token
    idx = {
        "random": torch.randperm(N)[: int(torch.randint(1, N, ()))],
        "duplicates": torch.tensor([2, 7, 2, 3, 5, 7, 7]),  # repeated positions (and tokens 3 == 5)
        "none": torch.zeros(0, dtype=torch.long),  # k = 0
        "all": torch.arange(N),  # k = N
    }[which]
    coef = torch.randn(len(idx))
    params = [hidden, weight, bias]

    logp = selected_logprobs(
        hidden[idx], weight, tokens[idx], bias=bias, temperature=temperature, token_chunk=3, vocab_chunk=7
    )
    assert logp.shape == (len(idx),) and logp.dtype == torch.float32
    grads = _grads((coef * logp).sum(), params)

    naive = _naive_full_logits(hidden, weight, bias, idx, tokens, temperature)
    close(logp, naive)
    for g, g_naive in zip(grads, _grads((coef * naive).sum(), params), strict=True):
        close_grad(g, g_naive)

    # and the row-by-row float64 reference
    p64 = [p.detach().double().requires_grad_() if p is not None else None for p in params]
    ref = ref_selected_logprobs(p64[0][idx], p64[1], tokens[idx], p64[2], temperature)
    close(logp, ref)
    for g, g_ref in zip(grads, _grads((coef.double() * ref).sum(), p64), strict=True):
        close_grad(g, g_ref)


def test_zero_selected_gives_empty_output_and_zero_grads():
    hidden, weight, bias = torch.randn(N, D, requires_grad=True), torch.randn(V, D, requires_grad=True), None
    sel_mask = torch.zeros(N, dtype=torch.bool)
    logp = selected_logprobs(hidden[sel_mask], weight, torch.zeros(N, dtype=torch.long)[sel_mask], bias=bias)
    assert logp.shape == (0,)
    logp.sum().backward()
    assert torch.equal(hidden.grad, torch.zeros(N, D))
    assert torch.equal(weight.grad, torch.zeros(V, D))


def test_selected_equals_scoring_pass_logp():
    hidden, weight = torch.randn(N, D), torch.randn(V, D)
    tokens = torch.randint(0, V, (N,))
    logp_all, _ = score_from_hidden(hidden, weight, tokens, temperature=0.8, vocab_chunk=5)
    sel_mask = torch.rand(N) < 0.4
    logp = selected_logprobs(hidden[sel_mask], weight, tokens[sel_mask], temperature=0.8, vocab_chunk=5)
    torch.testing.assert_close(logp, logp_all[sel_mask], rtol=0, atol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_tied_head_gradient_matches_naive(temperature):
    # A tiny "model": embedding -> body -> hidden; the head reuses the embedding matrix (tied), so the
    # embedding gets gradient both from the input lookup and from the head.
    emb = nn.Embedding(V, D)
    body = nn.Linear(D, D)
    ids = torch.randint(0, V, (2, 9))
    targets = torch.randint(0, V, (2, 9))
    sel_mask = torch.rand(2, 9) < 0.3
    sel_mask[0, 0] = True
    coef = torch.randn(int(sel_mask.sum()))
    params = [emb.weight, body.weight, body.bias]

    hidden = torch.tanh(body(emb(ids)))  # (2, 9, D)
    logp = selected_logprobs(
        hidden[sel_mask], emb.weight, targets[sel_mask], temperature=temperature, vocab_chunk=4
    )
    grads = _grads((coef * logp).sum(), params)

    hidden = torch.tanh(body(emb(ids)))
    logits = hidden @ emb.weight.T  # (2, 9, V): the full logits of the tied head
    log_p = torch.log_softmax(logits / temperature, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    naive_grads = _grads((coef * log_p[sel_mask]).sum(), params)
    close(logp, log_p[sel_mask])
    for g, g_naive in zip(grads, naive_grads, strict=True):
        close_grad(g, g_naive)


def test_frozen_head_only_hidden_gets_grad():
    hidden = torch.randn(N, D, requires_grad=True)
    weight, bias = torch.randn(V, D), torch.randn(V)  # frozen
    tokens = torch.randint(0, V, (N,))
    selected_logprobs(hidden, weight, tokens, bias=bias, vocab_chunk=6).sum().backward()
    h2 = hidden.detach().clone().requires_grad_()
    torch.log_softmax(h2 @ weight.T + bias, -1).gather(-1, tokens[:, None]).sum().backward()
    close_grad(hidden.grad, h2.grad)


def test_bf16_inputs_upcast_and_grads_keep_dtype():
    hidden = torch.randn(N, D).to(torch.bfloat16).requires_grad_()
    weight = torch.randn(V, D).to(torch.bfloat16).requires_grad_()
    tokens = torch.randint(0, V, (N,))
    logp = selected_logprobs(hidden, weight, tokens, temperature=0.9, vocab_chunk=8)
    assert logp.dtype == torch.float32
    logp.sum().backward()
    assert hidden.grad.dtype == weight.grad.dtype == torch.bfloat16
    h32, w32 = hidden.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
    logp32 = selected_logprobs(h32, w32, tokens, temperature=0.9, vocab_chunk=8)
    logp32.sum().backward()
    torch.testing.assert_close(logp, logp32, rtol=0, atol=1e-6)
    torch.testing.assert_close(hidden.grad, h32.grad.to(torch.bfloat16), rtol=0, atol=0)
    torch.testing.assert_close(weight.grad, w32.grad.to(torch.bfloat16), rtol=0, atol=0)


def test_gradcheck_float64():
    hidden = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(7, dtype=torch.float64, requires_grad=True)
    tokens = torch.tensor([0, 6, 3, 3, 2])

    def head(h, w, b):
        return selected_logprobs(h, w, tokens, bias=b, temperature=0.8, token_chunk=2, vocab_chunk=3)

    assert torch.autograd.gradcheck(head, (hidden, weight, bias))


def test_selected_bad_arguments():
    with pytest.raises(ValueError, match="tokens.shape"):
        selected_logprobs(torch.zeros(3, D), torch.zeros(V, D), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature"):
        selected_logprobs(
            torch.zeros(3, D), torch.zeros(V, D), torch.zeros(3, dtype=torch.long), temperature=-1
        )


# ---------------------------------------------------------------- lm_head_params on a real HF model


def _tiny_llama(tie: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=V,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=tie,
    )
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("tie", [True, False])
def test_lm_head_params_and_hidden_states_of_hf_model(tie):
    model = _tiny_llama(tie)
    weight, bias = lm_head_params(model)
    assert bias is None
    assert (weight is model.get_input_embeddings().weight) == tie
    ids = torch.randint(0, V, (2, 6))
    with torch.no_grad():
        # the final norm lives in model.model, so its last_hidden_state is what the head consumes
        hidden = model.model(ids).last_hidden_state[:, :-1]  # (2, 5, 16)
        logits = model(ids).logits[:, :-1]  # (2, 5, V)
    targets = ids[:, 1:]
    logp, entropy = score_from_hidden(hidden, weight, targets, temperature=0.7, vocab_chunk=8)
    ref_logp, ref_entropy = token_logprobs_and_entropy(logits, targets, temperature=0.7)
    close(logp, ref_logp)
    close(entropy, ref_entropy)


def test_lm_head_params_refuses_unsupported_heads():
    class NoHead(nn.Module):
        def get_output_embeddings(self):
            return None

    with pytest.raises(ValueError, match="get_output_embeddings"):
        lm_head_params(NoHead())

    class SoftCapped(nn.Module):
        config = SimpleNamespace(final_logit_softcapping=30.0)

        def get_output_embeddings(self):
            return nn.Linear(4, 5)

    with pytest.raises(NotImplementedError, match="final_logit_softcapping"):
        lm_head_params(SoftCapped())


def test_uniform_head_hand_computed():
    # weight = 0 -> logits = bias = 0 -> uniform over V: every logp = -ln V = -3.367296 (V = 29),
    # and d logp / d bias_j = 1[j = t] - 1/V
    weight = torch.zeros(V, D, requires_grad=True)
    bias = torch.zeros(V, requires_grad=True)
    logp = selected_logprobs(torch.randn(1, D), weight, torch.tensor([4]), bias=bias, vocab_chunk=10)
    close(logp, torch.tensor([-math.log(V)]))
    logp.sum().backward()
    expected = torch.full((V,), -1.0 / V)
    expected[4] += 1.0
    close(bias.grad, expected)
