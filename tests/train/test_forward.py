"""The scoring pass must reproduce the sampler's log-probs on the same tokens (DESIGN: traps)."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from forkrl.rollout.hf import generate
from forkrl.training.forward import scoring_pass

PROMPTS = ["1+?=3 in 2,5:", "12+?=40 in 28,3,9:", "7:"]  # different lengths -> left padding


@pytest.fixture(scope="module")
def model_and_tok(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), AutoTokenizer.from_pretrained(
        tiny_model_dir
    )


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("selective_head", [True, False])
def test_scoring_pass_reproduces_sampler_logprobs(model_and_tok, temperature, selective_head):
    model, tok = model_and_tok
    ro = generate(model, tok, PROMPTS, n=3, temperature=temperature, max_new_tokens=24, generator_seed=0)
    m = ro.response_mask
    assert m.sum() > 20 and (ro.attention_mask[:, : ro.prompt_len] == 0).any()
    logp, entropy = scoring_pass(
        model,
        ro.input_ids,
        ro.attention_mask,
        ro.prompt_len,
        ro.response_ids,
        temperature=temperature,
        selective_head=selective_head,
    )
    torch.testing.assert_close(logp[m], ro.sampler_logp[m], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(entropy[m], ro.sampler_entropy[m], rtol=1e-4, atol=1e-5)


def test_greedy_decode_matches_transformers_generate(model_and_tok):
    # Our KV-cache loop (explicit position ids for left padding) must decode what generate() decodes.
    model, tok = model_and_tok
    ro = generate(model, tok, PROMPTS, greedy=True, max_new_tokens=16)
    tok.padding_side = "left"
    enc = tok(PROMPTS, return_tensors="pt", padding=True, add_special_tokens=False)
    ref = model.generate(
        **enc,
        do_sample=False,
        max_new_tokens=16,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )[:, enc["input_ids"].shape[1] :]
    L = min(ref.shape[1], ro.response_ids.shape[1])
    ours = ro.response_ids[:, :L]
    assert torch.equal(ours[ro.response_mask[:, :L]], ref[:, :L][ro.response_mask[:, :L]])


def test_stops_at_eos_and_marks_truncation(model_and_tok):
    model, tok = model_and_tok
    ro = generate(model, tok, PROMPTS, n=4, max_new_tokens=30, generator_seed=1)
    eos = tok.eos_token_id
    for i in range(ro.response_ids.shape[0]):
        row, mask = ro.response_ids[i], ro.response_mask[i]
        n = int(mask.sum())
        if ro.truncated[i]:
            assert n == ro.response_ids.shape[1] and eos not in row.tolist()
        else:
            assert row[n - 1] == eos and (row[n:] == tok.pad_token_id).all()
        assert ro.texts[i] == tok.decode(row[:n][row[:n] != eos], skip_special_tokens=True)


@pytest.mark.parametrize("how", ["packed", "cache"])
@pytest.mark.parametrize("G", [1, 3])
def test_shared_prompt_forward_equals_the_plain_forward(model_and_tok, G, how, monkeypatch):
    # Values and gradients: the prompt run once per group (each group packed under a block mask, or
    # with a repeated KV cache) == every row run in full, padded.
    from forkrl.training import forward
    from forkrl.training.forward import response_hidden

    model, tok = model_and_tok
    assert forward.packable(model) is None  # the shipped model is a transformers Qwen3
    if how == "cache":
        monkeypatch.setattr(forward, "packable", lambda m: "not here")
    else:  # these short rows would run the KV-cache way (packing_pays): packed here all the same
        monkeypatch.setattr(forward, "packing_pays", lambda *a: True)
    packed = []
    real = forward.packed_hidden
    monkeypatch.setattr(forward, "packed_hidden", lambda *a: packed.append(1) or real(*a))
    ro = generate(model, tok, PROMPTS, n=3, max_new_tokens=10, generator_seed=0)
    args = (ro.input_ids, ro.attention_mask, ro.prompt_len)
    coef = torch.randn(ro.response_ids.shape + (model.config.hidden_size,))
    grads = []
    for g in (1, G):
        model.zero_grad()
        h = response_hidden(model, *args, group_size=g)
        (h * coef)[ro.response_mask].sum().backward()
        grads.append((h.detach(), [p.grad.clone() for p in model.parameters()]))
    (h1, g1), (hG, gG) = grads
    assert len(packed) == (G > 1 and how == "packed")
    torch.testing.assert_close(hG[ro.response_mask], h1[ro.response_mask], rtol=1e-4, atol=1e-5)
    for a, b in zip(g1, gG):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-5)


def _llama(attn: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        attn_implementation=attn,
    )
    return LlamaForCausalLM(cfg).train()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_groups_equal_padded_rows_on_llama(attn):
    # SmolLM2's architecture, random weights: groups with different prompt paddings, responses of
    # different lengths (one of a single token), values and gradients against the padded rows.
    from forkrl.training.forward import packable, packed_hidden, response_hidden

    model = _llama(attn)
    assert packable(model) is None
    g = torch.Generator().manual_seed(1)
    G, P, L = 4, 7, 9
    ids = torch.randint(2, 97, (3 * G, P + L), generator=g)
    mask = torch.ones_like(ids)
    for grp, pad in enumerate((0, 3, 6)):  # left padding of each group's prompt
        ids[grp * G : (grp + 1) * G, :P] = ids[grp * G, :P]
        mask[grp * G : (grp + 1) * G, :pad] = 0
    for i, n in enumerate([9, 1, 5, 8, 2, 9, 9, 3, 4, 6, 1, 7]):  # real response tokens per row
        mask[i, P + n :] = 0
    ids = ids * mask
    real = mask[:, P:].bool()
    coef = torch.randn(3 * G, L, 32, generator=g)
    out = []
    for packed in (False, True):
        model.zero_grad()
        h = packed_hidden(model.model, ids, mask, P, G) if packed else response_hidden(model, ids, mask, P)
        (h * coef)[real].sum().backward()
        out.append((h.detach()[real], [p.grad.clone() for p in model.parameters()]))
    (h_rows, g_rows), (h_packed, g_packed) = out
    torch.testing.assert_close(h_packed, h_rows, rtol=1e-5, atol=1e-5)
    for a, b in zip(g_rows, g_packed):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def _rows(G, n, P, lengths, T):
    mask = torch.zeros(G * n, P + T, dtype=torch.long)
    mask[:, :P] = 1
    for i, m in enumerate(lengths):
        mask[i, P : P + m] = 1
    return mask


def test_packing_is_chosen_where_it_costs_less(monkeypatch):
    from transformers import LlamaConfig

    from forkrl.training import forward
    from forkrl.training.forward import packing_pays

    smollm2 = LlamaConfig(
        hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3
    )
    # SmolLM2 on arith: 61-token prompts, responses of 20-128 tokens (mean about 55), groups of 8
    lengths = [20, 35, 50, 55, 60, 70, 90, 128] * 4
    mask = _rows(8, 4, 61, lengths, 128)
    assert packing_pays(smollm2, mask, 61, 8, checkpointed=False)
    assert packing_pays(smollm2, mask, 61, 8, checkpointed=True)
    monkeypatch.setattr(forward, "PACK_MASK_BYTES", 4 * 569 * 569 - 1)  # the same, over its mask limit
    assert not packing_pays(smollm2, mask, 61, 8, checkpointed=False)
    monkeypatch.undo()
    # long responses of one length (no padding to drop): G times the attention does not pay
    for length in (500, 3000):
        mask = _rows(8, 1, 61, [length] * 8, length)
        assert not packing_pays(smollm2, mask, 61, 8, checkpointed=False)
        assert not packing_pays(smollm2, mask, 61, 8, checkpointed=True)


def test_what_cannot_be_packed_says_why():
    from forkrl.training.forward import packable

    model = _llama("sdpa")
    model.config.rope_parameters = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    assert "dynamic" in packable(model)
    model = _llama("sdpa")
    model.config._attn_implementation = "flex_attention"
    assert "flex_attention" in packable(model)
    model.config.model_type = "gpt2"
    assert "gpt2" in packable(model)


def test_dropping_finished_rows_changes_nothing():
    # The shipped warm start ends most answers early; rows that hit EOS leave the decode batch.
    # Decoding with and without that (a logits processor keeps every row) must agree exactly, greedy or sampled.
    from forkrl.models.loading import DEFAULT_MODEL
    from forkrl.tasks.pick import get_task

    model = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL)
    tok = AutoTokenizer.from_pretrained(DEFAULT_MODEL)
    prompts = [e.prompt for e in get_task("pick").examples("test", 12)]
    dropped = generate(model, tok, prompts, greedy=True, max_new_tokens=40)
    kept = generate(model, tok, prompts, greedy=True, max_new_tokens=40, logits_processor=lambda ids, z: z)
    assert not dropped.truncated.all()
    lengths = dropped.response_mask.sum(-1)
    assert lengths.min() < lengths.max()  # rows really finished at different steps
    assert dropped.texts == kept.texts and torch.equal(dropped.response_ids, kept.response_ids)
    torch.testing.assert_close(dropped.sampler_logp, kept.sampler_logp, rtol=1e-5, atol=1e-6)
    dropped = generate(model, tok, prompts, n=2, max_new_tokens=40, generator_seed=3)
    kept = generate(
        model, tok, prompts, n=2, max_new_tokens=40, generator_seed=3, logits_processor=lambda ids, z: z
    )
    assert dropped.texts == kept.texts


def test_sampler_draws_from_softmax_over_temperature():
    from forkrl.rollout.hf import _pick

    logits = torch.tensor([[2.0, 0.0, -1.0, -30.0]]).repeat(20000, 1)
    torch.manual_seed(0)
    for T in (1.0, 0.5):
        u = torch.rand(20000)
        tok, logp, ent = _pick(
            logits, temperature=T, top_p=1.0, greedy=False, logits_processor=None, ids_so_far=None, u=u
        )
        p = torch.softmax(logits[0] / T, -1)
        freq = torch.bincount(tok, minlength=4).float() / len(tok)
        torch.testing.assert_close(freq, p, atol=0.01, rtol=0)  # ~4 sigma at n = 20000
        torch.testing.assert_close(logp, p.log()[tok])
    # u = 0 must not pick a zero-probability token (top-p removes the tail)
    tok, _, _ = _pick(
        logits[:1],
        temperature=1.0,
        top_p=0.5,
        greedy=False,
        logits_processor=None,
        ids_so_far=None,
        u=torch.zeros(1),
    )
    assert tok.item() == 0
