"""Sampling with top-p (docs/DESIGN.md, "Sampling with top-p"): the HF backend samples from the nucleus
of softmax(z / T), and its log-prob and entropy are the full-vocabulary policy's, the scoring pass's,
whatever top_p. tests/test_rollout_vllm.py checks the vLLM backend against the same references."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from forkrl.rollout.hf import generate
from forkrl.training.forward import scoring_pass

PROMPTS = ["1+?=3 in 2,5:", "12+?=40 in 28,3,9:", "7:"]


def full_distribution(model, ro, temperature: float) -> torch.Tensor:
    """log softmax(z / T) over the whole vocabulary at every response position: (B, L, V), by a plain
    forward of the whole sequence (left-padded prompts: positions from the attention mask)."""
    pos = (ro.attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=ro.input_ids, attention_mask=ro.attention_mask, position_ids=pos).logits
    P, L = ro.prompt_len, ro.response_ids.shape[1]
    return torch.log_softmax(logits[:, P - 1 : P - 1 + L].float() / temperature, dim=-1)  # (B, L, V)


def mass_above(logp_all: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The probability of the tokens strictly more likely than each sampled token: (B, L). A token is in
    the top-p nucleus (the smallest set with mass >= top_p) exactly when this is < top_p."""
    p = logp_all.exp()
    mine = p.gather(-1, tokens[..., None])
    return (p * (p > mine)).sum(-1)


def nucleus_log_mass(logp_all: torch.Tensor, top_p: float) -> torch.Tensor:
    """log P(nucleus) at each position: the mass of the smallest top set reaching top_p. (B, L)"""
    p = logp_all.exp().sort(-1, descending=True).values
    cum = p.cumsum(-1)
    inside = (cum - p) < top_p  # tokens whose predecessors have not reached top_p yet
    return torch.log((p * inside).sum(-1))


@pytest.fixture(scope="module")
def model_and_tok(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), AutoTokenizer.from_pretrained(
        tiny_model_dir
    )


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_hf_top_p_samples_the_nucleus_and_reports_the_full_policy(model_and_tok, temperature):
    model, tok = model_and_tok
    ro = generate(
        model, tok, PROMPTS, n=8, temperature=temperature, top_p=0.6, max_new_tokens=16, generator_seed=0
    )
    m = ro.response_mask
    logp_all = full_distribution(model, ro, temperature)
    assert (mass_above(logp_all, ro.response_ids)[m] < 0.6 + 1e-5).all()  # every token in the nucleus
    # The sampler's log-prob and entropy are the full-vocabulary policy's (not the nucleus's) ...
    full = logp_all.gather(-1, ro.response_ids[..., None]).squeeze(-1)
    assert torch.allclose(ro.sampler_logp[m], full[m], atol=1e-5)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    assert torch.allclose(ro.sampler_entropy[m], entropy[m], atol=1e-4)
    # ... which are what the scoring pass (old_logp, the selection entropy) computes.
    logp, ent = scoring_pass(
        model,
        ro.input_ids,
        ro.attention_mask,
        ro.prompt_len,
        ro.response_ids,
        temperature=temperature,
        selective_head=False,
    )
    assert torch.allclose(logp[m], ro.sampler_logp[m], atol=1e-5)
    assert torch.allclose(ent[m], ro.sampler_entropy[m], atol=1e-4)
    # and they differ from the nucleus's renormalised log-prob (what vLLM would report) somewhere
    assert ((full - nucleus_log_mass(logp_all, 0.6))[m] - full[m]).abs().max() > 0.1


def test_the_nucleus_check_can_fail(model_and_tok):
    # Without top-p this tiny random model samples outside the 0.6-nucleus: the check above has power.
    model, tok = model_and_tok
    ro = generate(model, tok, PROMPTS, n=8, temperature=1.0, top_p=1.0, max_new_tokens=16, generator_seed=0)
    assert (mass_above(full_distribution(model, ro, 1.0), ro.response_ids)[ro.response_mask] >= 0.6).any()
