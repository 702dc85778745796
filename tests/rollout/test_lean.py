"""LeanDecoder: the same next-token logits as the model's own forward, and the fallbacks."""

import pytest
import torch
from transformers import (
    DynamicCache,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import forkrl.rollout.lean as lean
from forkrl.models.tiny import build_tiny_model
from forkrl.rollout.hf import cache_kwarg
from forkrl.rollout.lean import LeanDecoder, unsupported

V = 40


def _qwen3():
    return build_tiny_model(
        V, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=96
    )


def _llama(**kw):
    torch.manual_seed(1)
    config = LlamaConfig(
        **{
            "vocab_size": V,
            "hidden_size": 64,
            "intermediate_size": 96,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 1,
            "max_position_embeddings": 128,
            "tie_word_embeddings": False,
            **kw,
        }
    )
    return LlamaForCausalLM(config)


def _mistral(**kw):
    torch.manual_seed(3)
    config = MistralConfig(
        **{
            "vocab_size": V,
            "hidden_size": 64,
            "intermediate_size": 96,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 128,
            "sliding_window": None,
            **kw,
        }
    )
    return MistralForCausalLM(config)


def _qwen2():
    torch.manual_seed(2)
    config = Qwen2Config(
        vocab_size=V,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():  # Qwen2 has q/k/v biases; make them matter
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    return model


MODELS = {
    "qwen3": _qwen3,
    "llama": lambda: _llama(),
    "llama-biases-llama3-rope": lambda: _llama(
        attention_bias=True,
        mlp_bias=True,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    ),
    "qwen2-biases": _qwen2,
    "mistral": _mistral,
    # head_dim 24: the attention scale 24**-0.5 is not a power of two, so folding it into q rounds
    "llama-yarn-head24-tied": lambda: _llama(
        head_dim=24,
        tie_word_embeddings=True,
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    ),
}


def _decode_both(model, steps=6, tol=(1e-5, 2e-5)):
    """Greedy-free check: feed random tokens to left-padded prompts; lean logits vs full forwards."""
    g = torch.Generator().manual_seed(0)
    n, lens = 3, [5, 2, 7]  # 3 prompts of different lengths, each repeated n times
    P = max(lens)
    ids = torch.zeros(len(lens), P, dtype=torch.long)
    mask = torch.zeros(len(lens), P, dtype=torch.long)
    for i, L in enumerate(lens):
        ids[i, P - L :] = torch.randint(2, V, (L,), generator=g)
        mask[i, P - L :] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    model.eval()
    cache = DynamicCache()
    with torch.no_grad():
        model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=pos,
            use_cache=True,
            **{cache_kwarg(model): cache},
        )
    dec = LeanDecoder(model, P + steps)
    dec.begin(cache, n, capacity=P + steps)
    ids, mask, pos = (t.repeat_interleave(n, 0) for t in (ids, mask, pos))
    bias = torch.zeros(ids.shape[0], P + steps, dtype=model.dtype).masked_fill_(
        torch.cat([mask, torch.ones(ids.shape[0], steps, dtype=torch.long)], 1) == 0, float("-inf")
    )
    next_pos = pos[:, -1] + 1
    rows = torch.arange(ids.shape[0])
    for t in range(steps):
        tok = torch.randint(2, V, (len(rows),), generator=g)
        if t == 3:  # rows leave the batch
            keep = torch.tensor([0, 2, 3, 5, 8])
            dec.select(keep)
            rows, tok, next_pos, bias = rows[keep], tok[keep], next_pos[keep], bias[keep]
            ids, mask = ids[keep], mask[keep]
        ids = torch.cat([ids, tok[:, None]], 1)
        mask = torch.cat([mask, torch.ones(len(rows), 1, dtype=torch.long)], 1)
        got = dec.step(tok, next_pos, bias[:, : dec.n + 1])
        with torch.no_grad():
            want = model(
                input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)
            ).logits[:, -1]
        torch.testing.assert_close(got.float(), want.float(), rtol=tol[0], atol=tol[1])
        next_pos = next_pos + 1


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("fused", [True, False])
def test_lean_step_equals_the_models_forward(name, fused, monkeypatch):
    if not fused:
        monkeypatch.setattr(lean, "FUSE_MAX_BYTES", 0)
    model = MODELS[name]()
    assert unsupported(model) is None
    dec = LeanDecoder(model, 8)
    assert dec.fused is fused
    _decode_both(model)


@pytest.mark.parametrize("head_dim", [16, 128])
def test_lean_step_in_bfloat16(head_dim):
    model = (
        build_tiny_model(V, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=96)
        if head_dim == 16
        else _llama(head_dim=head_dim, tie_word_embeddings=True)
    )
    model = model.to(torch.bfloat16)
    _decode_both(model, tol=(0.02, 0.02))  # bf16 rounding: max error ~0.004-0.01 on logits ~1


def test_unsupported_models_are_named_and_refused():
    model = _qwen3()
    handle = model.model.layers[0].mlp.register_forward_hook(lambda *a: None)
    assert "hooks" in unsupported(model)
    handle.remove()
    assert unsupported(model) is None

    class Adapter(torch.nn.Linear):
        pass

    q = model.model.layers[1].self_attn.q_proj
    model.model.layers[1].self_attn.q_proj = Adapter(q.in_features, q.out_features, bias=False)
    assert "layer 1" in unsupported(model)
    assert "gelu" in unsupported(_llama(hidden_act="gelu"))
    assert "sliding" in unsupported(_mistral(sliding_window=4096))
    assert "longrope" in unsupported(
        _llama(
            rope_parameters={
                "rope_type": "longrope",
                "rope_theta": 1e4,
                "short_factor": [1.0] * 8,
                "long_factor": [2.0] * 8,
                "original_max_position_embeddings": 16,
            }
        )
    )
    custom = _llama()
    custom.config._attn_implementation = "my_kernel"
    assert "attention implementation" in unsupported(custom)

    # Forward replaced on an instance (accelerate's offloading and device hooks do this), or marked
    # with accelerate's `_hf_hook`; a subclass of a layer class; a global hook.
    m = _llama()
    mlp = m.model.layers[0].mlp
    mlp.forward = lambda x: 3 * type(mlp).forward(mlp, x)
    assert "replaced forwards" in unsupported(m)
    m = _llama()
    m.model.norm._hf_hook = object()
    assert "replaced forwards" in unsupported(m)
    m = _llama()
    attn = m.model.layers[1].self_attn
    attn.__class__ = type("Scaled", (type(attn),), {})
    assert "layer 1 is not built from transformers' own llama classes" in unsupported(m)
    m = _llama()
    handle = torch.nn.modules.module.register_module_forward_hook(lambda *a: None)
    try:
        assert "forward hooks" in unsupported(m)
    finally:
        handle.remove()
    assert unsupported(m) is None
    assert "dynamic" in unsupported(
        _llama(rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0})
    )
    with pytest.raises(ValueError, match="LeanDecoder: model_type 'gpt2'"):
        from transformers import GPT2Config, GPT2LMHeadModel

        gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=32, n_layer=1, n_head=2))
        gpt2.model = gpt2.transformer
        gpt2.model.layers = gpt2.transformer.h
        LeanDecoder(gpt2, 8)


@pytest.mark.parametrize("greedy", [True, False])
def test_generate_is_the_same_with_and_without_the_lean_decoder(greedy):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from forkrl.models.loading import DEFAULT_MODEL
    from forkrl.rollout.hf import generate
    from forkrl.tasks.pick import get_task

    model = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL)
    tok = AutoTokenizer.from_pretrained(DEFAULT_MODEL)
    prompts = [e.prompt for e in get_task("pick").examples("test", 8)]
    kw = dict(n=4, max_new_tokens=31, greedy=greedy, prompt_seeds=list(range(8)))
    a, b = generate(model, tok, prompts, lean=True, **kw), generate(model, tok, prompts, lean=False, **kw)
    assert a.texts == b.texts
    assert (
        a.lengths < 31
    ).any() and a.lengths.min() < a.lengths.max()  # rows stop at EOS, at different steps
    torch.testing.assert_close(a.sampler_logp, b.sampler_logp, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(a.sampler_entropy, b.sampler_entropy, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("max_new_tokens", [0, 1, 2])
def test_generate_with_almost_no_new_tokens(max_new_tokens):
    from forkrl.models.tiny import build_char_tokenizer
    from forkrl.rollout.hf import generate

    tok = build_char_tokenizer()
    model = build_tiny_model(
        len(tok), hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=48
    )
    kw = dict(n=2, max_new_tokens=max_new_tokens, prompt_seeds=[1, 2])
    a = generate(model, tok, ["3+4=", "10+?=12"], lean=True, **kw)
    b = generate(model, tok, ["3+4=", "10+?=12"], lean=False, **kw)
    assert a.response_ids.shape == b.response_ids.shape == (4, max_new_tokens)
    assert a.texts == b.texts
