"""The scoring pass must reproduce the sampler's log-probs on the same tokens (DESIGN: traps)."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from forkrl.rollout.hf import generate
from forkrl.train.forward import scoring_pass


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("selective_head", [True, False])
def test_scoring_pass_reproduces_sampler_logprobs(tiny_model_dir, temperature, selective_head):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    # Prompts of different lengths -> left padding; max_new_tokens large enough that some rows stop at EOS.
    prompts = ["1+?=3 in 2,5:", "12+?=40 in 28,3,9:", "7:"]
    torch.manual_seed(0)
    ro = generate(model, tok, prompts, n=3, temperature=temperature, max_new_tokens=24)
    # Replay the sampler: the logits generate() saw at each step, turned into log-probs at T.
    torch.manual_seed(0)
    tok.padding_side = "left"
    enc = tok([p for p in prompts for _ in range(3)], return_tensors="pt", padding=True, add_special_tokens=False)
    out = model.generate(**enc, do_sample=True, temperature=temperature, top_k=0, top_p=1.0, max_new_tokens=24,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                         output_logits=True, return_dict_in_generate=True)
    assert torch.equal(out.sequences[:, ro.prompt_len:], ro.response_ids.masked_fill(~ro.response_mask, tok.pad_token_id))
    steps = torch.stack(out.logits, dim=1).float() / temperature  # (B, L, V)
    sampler_logp = torch.log_softmax(steps, -1).gather(-1, ro.response_ids[..., None]).squeeze(-1)  # (B, L)
    logp, entropy = scoring_pass(model, ro.input_ids, ro.attention_mask, ro.prompt_len, ro.response_ids,
                                 temperature=temperature, selective_head=selective_head)
    m = ro.response_mask
    assert m.sum() > 20 and (ro.attention_mask[:, : ro.prompt_len] == 0).any()  # left padding was exercised
    torch.testing.assert_close(logp[m], sampler_logp[m], rtol=1e-4, atol=1e-4)
    p = torch.softmax(steps, -1)
    ref_entropy = -(p * torch.log_softmax(steps, -1)).sum(-1)
    torch.testing.assert_close(entropy[m], ref_entropy[m], rtol=1e-4, atol=1e-4)
