"""The real-shapes benchmark model (issue 20): Qwen3's vocabulary size, a byte-level BPE tokenizer that
forkrl loads, and the selective head giving the full head's log-probs on it. A tiny body (1 layer,
hidden 64) with the real V = 151,936 keeps the test fast."""

import random

import pytest
import torch

from forkrl.models.loading import load_model_and_tokenizer
from forkrl.models.real_shapes import MARKER, VOCAB_SIZE, build_real_shapes
from forkrl.tasks.pick import get_task
from forkrl.training.forward import scoring_pass

pytestmark = pytest.mark.slow  # builds a 151,936-token vocabulary and model (about 12 s)


@pytest.fixture(scope="module")
def real_dir(tmp_path_factory):
    return build_real_shapes(tmp_path_factory.mktemp("real-shapes"), seed=0, layers=1, hidden=64)


@pytest.fixture(scope="module")
def loaded(real_dir):
    return load_model_and_tokenizer(real_dir)


def _texts(n=64):
    task = get_task("pick")
    rng = random.Random(1)
    return [e.prompt + task.trace(e, rng) for e in task.examples("train", n, seed=1)]


def test_vocabulary_is_real_size_and_cached(real_dir, loaded):
    model, tok = loaded
    assert len(tok) == VOCAB_SIZE == model.config.vocab_size == model.get_input_embeddings().weight.shape[0]
    assert model.config.tie_word_embeddings
    assert (
        tok.eos_token_id is not None and tok.pad_token_id is not None and tok.eos_token_id != tok.pad_token_id
    )
    assert (real_dir / MARKER).is_file()
    stamp = (real_dir / "model.safetensors").stat().st_mtime_ns
    assert build_real_shapes(real_dir, seed=0, layers=1, hidden=64) == real_dir  # cached: no rebuild
    assert (real_dir / "model.safetensors").stat().st_mtime_ns == stamp


def test_tokens_are_multi_character_and_round_trip(loaded):
    _, tok = loaded
    texts = _texts()
    ids = [tok(t, add_special_tokens=False).input_ids for t in texts]
    assert sum(map(len, texts)) / sum(map(len, ids)) > 1.5
    assert [tok.decode(i) for i in ids] == texts
    odd = "café\t🙂 x"  # bytes outside the corpus still encode (byte-level)
    assert tok.decode(tok(odd, add_special_tokens=False).input_ids) == odd


def test_selective_head_matches_full_head(loaded):
    model, tok = loaded
    texts = _texts(4)
    prompts = [t[: t.index(":") + 1] for t in texts]
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    P = enc.input_ids.shape[1]
    g = torch.Generator().manual_seed(0)
    L = 12
    response = torch.randint(0, VOCAB_SIZE, (len(prompts), L), generator=g)
    input_ids = torch.cat([enc.input_ids, response], dim=1)
    mask = torch.cat([enc.attention_mask, torch.ones_like(response)], dim=1)
    out = {
        sel: scoring_pass(model, input_ids, mask, P, response, temperature=1.0, selective_head=sel)
        for sel in (True, False)
    }
    (lp_s, ent_s), (lp_f, ent_f) = out[True], out[False]
    assert lp_s.shape == (len(prompts), L)
    torch.testing.assert_close(lp_s, lp_f, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent_s, ent_f, atol=1e-4, rtol=1e-5)
    assert float(lp_s.mean()) < -5  # near-uniform over V: about -log(151936) = -11.9


def test_decode_loop_allocates_no_vocabulary_sized_block_per_step(loaded):
    """The sampler's (rows, V) intermediates live in reused buffers (`forkrl.rollout.hf.Scratch`): the
    blocks of at least rows x V floats freed during a `generate` call do not grow with its length."""
    from torch.profiler import ProfilerActivity, profile

    from forkrl.rollout.hf import generate

    model, tok = loaded
    rows = 4
    counts = {}
    for steps in (4, 16):
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            r = generate(model, tok, ["a:", "b:"], n=2, max_new_tokens=steps, generator_seed=0)
        assert r.response_ids.shape[0] == rows
        counts[steps] = sum(
            e.name == "[memory]" and -e.cpu_memory_usage >= rows * VOCAB_SIZE * 4 for e in prof.events()
        )
    assert counts[4] == counts[16] > 0  # > 0: the buffers themselves are freed at the end
