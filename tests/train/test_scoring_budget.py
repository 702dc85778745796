"""The scoring pass in token-budgeted micro-batches (optim.micro_batch_tokens), each cut to its own longest
response: the same log-probs and entropies as one pass over the whole rollout, within the budget."""

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import forkrl.training.update as update_mod
from forkrl.config import load_config
from forkrl.rollout.hf import generate
from forkrl.training.components import settings_from
from forkrl.training.update import score


def test_budgeted_scoring_equals_one_pass_and_keeps_to_the_budget(tiny_model_dir, monkeypatch):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ro = generate(
        model, tok, ["1+?=3 in 2,5:", "12+?=40 in 28,3,9:", "7:"], n=4, max_new_tokens=24, generator_seed=0
    )
    lengths = ro.response_mask.sum(-1)
    assert lengths.min() < lengths.max()  # rows of different lengths: cutting matters

    def settings(*overrides):
        return settings_from(load_config(None, list(overrides)), 24)

    whole = score(model, ro, settings(f"optim.micro_batch_size={len(lengths)}", "optim.micro_batch_tokens=0"))
    seen = []
    real = update_mod.scoring_pass

    def spy(model, input_ids, attention_mask, prompt_len, response_ids, **kw):
        seen.append(int(attention_mask.sum()))
        assert response_ids.shape[1] <= int(lengths.max())
        return real(model, input_ids, attention_mask, prompt_len, response_ids, **kw)

    monkeypatch.setattr(update_mod, "scoring_pass", spy)
    budget = 2 * int(ro.prompt_len + lengths.max())
    parts = score(model, ro, settings(f"optim.micro_batch_tokens={budget}"))
    m = ro.response_mask
    assert len(seen) > 1 and max(seen) <= budget  # several chunks, none over the budget
    assert torch.allclose(parts[0][m], whole[0][m], atol=1e-5) and torch.allclose(
        parts[1][m], whole[1][m], atol=1e-5
    )
