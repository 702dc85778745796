"""HF rollout backend: the reserved-slot decode cache (same keys, values and samples) and per-prompt seeds."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache
from transformers.cache_utils import DynamicLayer

import forkrl.rollout.hf as hf
from forkrl.rollout.hf import _ReservedLayer, decode_cache, generate


@pytest.mark.parametrize("reserve", [0, 1, 3, 16])
def test_reserved_layer_matches_dynamic_layer(reserve):
    g = torch.Generator().manual_seed(0)
    ref, new = DynamicLayer(), _ReservedLayer(reserve)

    def kv(b, t):
        return torch.randn(b, 2, t, 4, generator=g), torch.randn(b, 2, t, 4, generator=g)

    def same():
        assert new.get_seq_length() == ref.get_seq_length()
        assert torch.equal(new.keys, ref.keys) and torch.equal(new.values, ref.values)

    k, v = kv(3, 5)  # prefill
    for layer in (ref, new):
        layer.update(k, v)
    same()
    for layer in (ref, new):
        layer.batch_repeat_interleave(2)
    same()
    for step in range(6):  # decode past the reserve, so the buffer must grow
        k, v = kv(ref.keys.shape[0], 1)
        out_ref, out_new = ref.update(k, v), new.update(k, v)
        assert all(torch.equal(a, b) for a, b in zip(out_ref, out_new))
        if step == 2:
            idx = torch.tensor([0, 2, 5])
            ref.batch_select_indices(idx)
            new.batch_select_indices(idx)
        same()
    assert new.get_seq_length() == 11
    for layer in (ref, new):
        layer.crop(-4)
    same()


def test_decode_cache_uses_reserved_layers():
    cache = decode_cache(8)
    k = torch.zeros(1, 1, 3, 2)
    cache.update(k, k, 0)
    assert isinstance(cache.layers[0], _ReservedLayer) and cache.get_seq_length() == 3


def test_generate_is_unchanged_by_the_cache_and_by_when_rows_leave(monkeypatch):
    from forkrl.models.loading import DEFAULT_MODEL
    from forkrl.tasks.pick import get_task

    model = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL)
    tok = AutoTokenizer.from_pretrained(DEFAULT_MODEL)
    prompts = [e.prompt for e in get_task("pick").examples("test", 6)]

    def run(**kw):
        return generate(model, tok, prompts, n=4, max_new_tokens=31, generator_seed=5, **kw)

    base = run()
    lengths = base.response_mask.sum(-1)
    assert lengths.min() < lengths.max()  # rows finish at different steps, so compaction happens
    for every in (1, 2, 10**9):  # compact when all / half / any of the rows are finished
        other = run(compact_every=every)
        assert other.texts == base.texts
        torch.testing.assert_close(other.sampler_logp, base.sampler_logp, rtol=1e-5, atol=1e-6)
    monkeypatch.setattr(hf, "decode_cache", lambda reserve: DynamicCache())  # transformers' own cache
    plain = run()
    assert plain.texts == base.texts
    torch.testing.assert_close(plain.sampler_logp, base.sampler_logp, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(plain.sampler_entropy, base.sampler_entropy, rtol=1e-5, atol=1e-6)


def test_prompt_seeds_make_a_row_independent_of_its_batch():
    from forkrl.models.loading import DEFAULT_MODEL
    from forkrl.tasks.pick import get_task

    model = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL)
    tok = AutoTokenizer.from_pretrained(DEFAULT_MODEL)
    prompts = [e.prompt for e in get_task("pick").examples("train", 4)]
    seeds = [11, 22, 33, 44]
    whole = generate(model, tok, prompts, n=3, max_new_tokens=31, prompt_seeds=seeds)
    halves = [
        generate(model, tok, prompts[i : i + 2], n=3, max_new_tokens=31, prompt_seeds=seeds[i : i + 2])
        for i in (0, 2)
    ]
    assert whole.texts == halves[0].texts + halves[1].texts
    assert len(set(whole.texts)) > 4  # really sampled
    other = generate(model, tok, prompts, n=3, max_new_tokens=31, prompt_seeds=[11, 22, 33, 45])
    assert other.texts[:9] == whole.texts[:9] and other.texts[9:] != whole.texts[9:]
    with pytest.raises(ValueError, match="3 prompt seeds for 4 prompts"):
        generate(model, tok, prompts, prompt_seeds=seeds[:3])


def test_decode_threads_rule_and_context():
    from forkrl.models.tiny import build_tiny_model
    from forkrl.rollout.hf import SMALL_MODEL_PARAMS, decode_threads, torch_threads

    small = build_tiny_model(
        40, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=48
    )
    big = build_tiny_model(
        40, hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=768
    )
    assert (
        sum(p.numel() for p in small.parameters())
        < SMALL_MODEL_PARAMS
        <= sum(p.numel() for p in big.parameters())
    )
    assert decode_threads(small, 0, 4) == 1 and decode_threads(big, 0, 4) == 4
    assert decode_threads(small, 3, 4) == 3 and decode_threads(big, 2, 4) == 2
    assert decode_threads(big, 0, 0) == torch.get_num_threads()
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with torch_threads(1, "cpu"):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with torch_threads(1, "meta"):  # not a CPU model: threads untouched
            assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError), torch_threads(1):
            raise RuntimeError("restored on errors too")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
