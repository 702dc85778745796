"""The optional vLLM rollout backend (forkrl/rollout/vllm.py).

The conversion, trainer-wiring and error tests run everywhere. The engine tests need vLLM: its CPU
build (`bash scripts/setup.sh --vllm`, a venv of its own), where they run on the CPU in float32, or
its CUDA build (`pip install 'forkrl[vllm]'`) with a CUDA GPU, where they run in bfloat16. They are
skipped without either.
"""

import json
import math
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from forkrl.config import ConfigError, load_config
from forkrl.models.tiny import build_char_tokenizer, build_tiny_model
from forkrl.rollout.hf import generate
from forkrl.rollout.vllm import device_problems, sampled_logprobs, to_rollout
from forkrl.training.forward import scoring_pass
from forkrl.training.rollouts import concat_rollouts
from forkrl.training.trainer import settings_from, train
from forkrl.training.update import score_rollout
from tests.vllm_engine import ENGINE, ENGINE_DTYPE, HAS_CUDA, HAS_VLLM, LOGP_TOL, needs_engine  # noqa: F401

PROMPTS = ["1+?=3 in 2,5:", "12+?=40 in 28,3,9:", "7:"]  # different lengths -> left padding


def _unpadded(ro):
    """The per-row token lists a vLLM engine would return for the rows of an HF rollout."""
    P = ro.prompt_len
    prompts = [row[P - int(m.sum()) : P].tolist() for row, m in zip(ro.input_ids, ro.attention_mask[:, :P])]
    responses = [r[m].tolist() for r, m in zip(ro.response_ids, ro.response_mask)]
    logps = [lp[m].tolist() for lp, m in zip(ro.sampler_logp, ro.response_mask)]
    return prompts, responses, logps


# ---- pure conversion: plain Python lists in, a Rollout out ------------------------------------


def test_sampled_logprobs_reads_the_sampled_token_of_each_position():
    lp = SimpleNamespace
    ids = [5, 7, 9]
    per_pos = [{5: lp(logprob=-0.5)}, {7: lp(logprob=-1.25), 3: lp(logprob=-0.1)}, {}]
    out = sampled_logprobs(ids, per_pos)
    assert out[:2] == [-0.5, -1.25] and math.isnan(out[2])  # a missing entry is NaN, not a wrong value
    assert sampled_logprobs(ids, None) is None


def test_to_rollout_pads_masks_and_flags_like_the_hf_backend():
    tok = build_char_tokenizer()
    pad, eos = tok.pad_token_id, tok.eos_token_id
    a, b = tok("ab", add_special_tokens=False).input_ids, tok("xyz", add_special_tokens=False).input_ids
    hi = tok("hi", add_special_tokens=False).input_ids
    # ended, truncated, ended at once, truncated and longest (sets the width L = 4)
    responses = [hi + [eos], hi, [eos], hi + hi]
    logps = [[-0.1, -0.2, -0.3], [-0.4, -0.5], [-0.6], [-1.0, -2.0, -3.0, -4.0]]
    ro = to_rollout([a, a, b, b], responses, logps, group_size=2, pad_id=pad, eos_id=eos, tokenizer=tok)
    assert ro.prompt_len == 3 and ro.response_ids.shape == (4, 4) and ro.group_size == 2
    assert ro.input_ids[0].tolist() == [pad, *a, *hi, eos, pad]  # left-padded prompt, right-padded response
    assert ro.attention_mask[0].tolist() == [0, 1, 1, 1, 1, 1, 0]
    assert ro.attention_mask[2].tolist() == [1, 1, 1, 1, 0, 0, 0]
    assert ro.response_mask.long().tolist() == [[1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]]
    assert ro.truncated.tolist() == [False, True, False, True]
    assert ro.lengths.tolist() == [3, 2, 1, 4]
    assert ro.texts == ["hi", "hi", "", "hihi"]
    torch.testing.assert_close(ro.sampler_logp[0], torch.tensor([-0.1, -0.2, -0.3, 0.0]))
    assert ro.sampler_entropy is None  # the trainer's scoring pass supplies entropies
    assert (
        to_rollout([a], [hi], None, group_size=1, pad_id=pad, eos_id=eos, tokenizer=tok).sampler_logp is None
    )
    with pytest.raises(ValueError, match="one each per row"):
        to_rollout([a], [hi, hi], None, group_size=1, pad_id=pad, eos_id=eos, tokenizer=tok)


def test_to_rollout_rebuilds_an_hf_rollout_exactly(tiny_model_dir):
    # The same token lists laid out by to_rollout give the HF backend's tensors, bit for bit.
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ro = generate(model, tok, PROMPTS, n=3, max_new_tokens=20, generator_seed=0)
    assert ro.truncated.any() and not ro.truncated.all()  # both kinds of rows are covered
    prompts, responses, logps = _unpadded(ro)
    got = to_rollout(
        prompts,
        responses,
        logps,
        group_size=3,
        pad_id=tok.pad_token_id,
        eos_id=tok.eos_token_id,
        tokenizer=tok,
    )
    for name in ("input_ids", "attention_mask", "response_ids", "response_mask", "truncated", "sampler_logp"):
        assert torch.equal(getattr(got, name), getattr(ro, name)), name
    assert got.prompt_len == ro.prompt_len and got.texts == ro.texts and got.group_size == ro.group_size


# ---- trainer wiring: a backend without entropies gets the scoring pass ------------------------


def test_vllm_backend_rollouts_are_scored_by_the_trainer(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ro = generate(model, tok, PROMPTS, n=2, temperature=0.7, max_new_tokens=16, generator_seed=0)
    parts = [
        to_rollout(
            *_unpadded(r), group_size=2, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id, tokenizer=tok
        )
        for r in (ro, ro)
    ]
    both = concat_rollouts(parts, tok.pad_token_id)  # dynamic sampling's rounds, without entropies
    assert both.sampler_entropy is None and both.sampler_logp is not None
    cfg = load_config(None, ["rollout.backend=vllm", "rollout.temperature=0.7"])
    s = settings_from(cfg, max_len=16)
    assert cfg.rollout.reuse_logprobs and not s.reuse_sampler_logprobs  # reuse is hf-only
    batch = score_rollout(model, None, both, s, overlong_filter=False)
    m = both.response_mask
    hf_entropy = torch.cat([ro.sampler_entropy, ro.sampler_entropy])
    torch.testing.assert_close(batch.entropy[m], hf_entropy[m], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(batch.old_logp[m], both.sampler_logp[m], rtol=1e-4, atol=1e-5)


# ---- configuration and errors that need no GPU ------------------------------------------------


def test_backend_choices_name_vllm():
    assert load_config(None, ["rollout.backend=vllm"]).rollout.backend == "vllm"
    with pytest.raises(ConfigError, match="hf, vllm"):
        load_config(None, ["rollout.backend=sglang"])


@pytest.mark.skipif(HAS_VLLM, reason="vllm is installed here")
def test_backend_vllm_without_vllm_is_a_clear_error(tiny_model_dir, tmp_path):
    cfg = load_config(
        None,
        [
            "rollout.backend=vllm",
            f"model.path={tiny_model_dir}",
            f"train.out_dir={tmp_path / 'run'}",
            "train.steps=1",
            "train.progress=false",
            "train.tensorboard=false",
        ],
    )
    with pytest.raises(ConfigError, match="rollout.backend=vllm needs") as err:
        train(cfg)
    msg = str(err.value)
    assert "rollout.backend=hf" in msg  # what to do instead
    assert "pip install 'forkrl[vllm]'" in msg and "bash scripts/setup.sh --vllm" in msg  # CUDA, CPU


@pytest.mark.parametrize(
    "build, device, cuda, problem",
    [
        ("cpu", "cpu", False, None),
        ("cpu", None, True, None),  # the engine's own device
        ("cpu", "cuda", True, "use model.device=cpu"),
        ("cuda", "cuda", True, None),
        ("cuda", "cuda:0", True, None),
        ("cuda", "cpu", True, "the model on a CUDA device (model.device='cpu')"),
        ("cuda", "cuda", False, "a CUDA GPU (torch.cuda.is_available() is False) or vLLM's CPU build"),
    ],
)
def test_device_problems_name_what_each_vllm_build_needs(build, device, cuda, problem):
    got = device_problems(build, device, cuda_available=cuda)
    assert got == [] if problem is None else (len(got) == 1 and problem in got[0]), got


# ---- the engine itself: vLLM's CPU build, or vLLM on a CUDA GPU ---------------------------------


@pytest.fixture(scope="module")
def vllm_model_dir(tmp_path_factory):
    """A tiny Qwen3 with head_dim 64 (vLLM's attention kernels take it) and bf16-exact weights.

    The weights are rounded to bf16 before saving, so on CUDA vLLM's bf16 copy and the float32 HF
    model used for scoring hold the same numbers; only the kernels' arithmetic differs.
    """
    path = tmp_path_factory.mktemp("tiny-vllm")
    tok = build_char_tokenizer()
    model = build_tiny_model(
        len(tok), hidden_size=128, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=256, seed=0
    )
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def engine(vllm_model_dir):
    from forkrl.rollout.vllm import VLLMRollout

    tok = AutoTokenizer.from_pretrained(vllm_model_dir)
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    backend = VLLMRollout(
        vllm_model_dir,
        tok,
        dtype=ENGINE_DTYPE,
        gpu_memory_utilization=0.2,
        sleep=True,  # on CUDA; the CPU build has no sleep mode and the backend turns it off there
        cpu_kv_cache_gib=0.25,
        seed=0,
        max_model_len=256,
        enforce_eager=True,  # no CUDA-graph capture or compilation: a quicker start for tests
    )
    backend.rng_kept = torch.equal(torch.get_rng_state(), before)  # vLLM reseeds it; the backend puts it back
    yield backend
    backend.close()


def _hf(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(ENGINE).eval()


def _assert_scoring_pass_matches(model, ro, temperature):
    m = ro.response_mask
    logp, _ = scoring_pass(
        model,
        ro.input_ids,
        ro.attention_mask,
        ro.prompt_len,
        ro.response_ids,
        temperature=temperature,
        selective_head=True,
    )
    diff = (logp[m] - ro.sampler_logp[m]).abs()
    assert diff.max() < LOGP_TOL, (diff.mean().item(), diff.max().item())
    if ENGINE_DTYPE == "bfloat16":  # bf16 activations vs float32 here, same weights: small, unbiased
        assert diff.mean() < 0.02, diff.mean().item()


@needs_engine
def test_vllm_engine_device_and_sleep_mode(engine):
    assert engine.device.type == ENGINE
    assert engine.sleep_mode == (ENGINE == "cuda")  # no sleep mode on vLLM's CPU build
    assert torch.set_num_threads.__module__ == "torch"  # vLLM's CPU worker's no-op was put back
    assert engine.rng_kept  # the trainer's global generators are as they were (a resume restored them)


@needs_engine
def test_vllm_rollout_is_well_formed(engine):
    ro = engine(PROMPTS, n=3, temperature=1.0, max_new_tokens=24, seed=0)
    B, L = ro.response_ids.shape
    pad, eos = engine.tokenizer.pad_token_id, engine.tokenizer.eos_token_id
    assert B == 9 and ro.group_size == 3 and 0 < L <= 24 and len(ro.texts) == 9
    assert ro.input_ids.shape == (B, ro.prompt_len + L) and ro.input_ids.device.type == ENGINE
    assert (ro.attention_mask[:, : ro.prompt_len] == 0).any()  # prompts are left-padded
    m = ro.response_mask
    assert torch.equal(m, torch.arange(L, device=m.device) < ro.lengths[:, None])  # a prefix of each row
    assert (ro.response_ids[~m] == pad).all() and m[:, 0].all()
    ends = (ro.response_ids == eos) & m
    assert torch.equal(ro.truncated, ~ends.any(-1))
    assert ro.sampler_entropy is None
    assert torch.isfinite(ro.sampler_logp[m]).all() and (ro.sampler_logp[m] <= 0).all()
    assert (ro.sampler_logp[~m] == 0).all()
    again = engine(PROMPTS, n=3, temperature=1.0, max_new_tokens=24, seed=0)
    assert torch.equal(again.response_ids, ro.response_ids)  # per-row seeds make it reproducible


@needs_engine
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_vllm_logprobs_match_the_scoring_pass(engine, vllm_model_dir, temperature):
    # processed_logprobs: log softmax(z / T), the scoring pass's quantity (raw_logprobs would be z's).
    ro = engine(PROMPTS, n=4, temperature=temperature, max_new_tokens=32, seed=1)
    assert ro.response_mask.sum() > 40
    _assert_scoring_pass_matches(_hf(vllm_model_dir), ro, temperature)


@needs_engine
def test_weight_sync_changes_what_vllm_samples(engine, vllm_model_dir):
    model = _hf(vllm_model_dir)
    before = engine(PROMPTS, n=4, max_new_tokens=24, seed=2)
    try:
        with torch.no_grad():
            g = torch.Generator(device=ENGINE).manual_seed(0)
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g, device=p.device) * 0.5)
                p.copy_(p.to(torch.bfloat16).float())  # still bf16-exact
        engine.sync_weights(model)
        after = engine(PROMPTS, n=4, max_new_tokens=24, seed=2)
        assert not torch.equal(before.input_ids, after.input_ids)  # same seeds, new weights
        _assert_scoring_pass_matches(model, after, 1.0)  # it samples from the synced policy
    finally:
        engine.sync_weights(_hf(vllm_model_dir))  # leave the module's engine as it was
    restored = engine(PROMPTS, n=4, max_new_tokens=24, seed=2)
    assert torch.equal(restored.input_ids, before.input_ids)  # the old weights sample as before


@needs_engine
def test_vllm_top_p_samples_the_nucleus_and_returns_no_sampler_logprob(engine, vllm_model_dir):
    # docs/DESIGN.md "Sampling with top-p": the nucleus of softmax(z / T), as the HF backend's; the
    # policy's log-probs come from the scoring pass, since vLLM's are the renormalised nucleus's.
    from vllm import SamplingParams

    from tests.rollout.test_top_p import full_distribution, mass_above, nucleus_log_mass

    model = _hf(vllm_model_dir)
    ro = engine(PROMPTS, n=8, temperature=1.0, top_p=0.6, max_new_tokens=16, seed=3)
    assert ro.sampler_logp is None and ro.response_mask.sum() > 40
    assert (
        mass_above(full_distribution(model, ro, 1.0), ro.response_ids)[ro.response_mask] < 0.6 + 1e-4
    ).all()
    # What vLLM itself reports under top-p (asked directly): log p - log P(nucleus), not log p.
    tok = engine.tokenizer
    ids = tok(PROMPTS, add_special_tokens=False)["input_ids"]
    params = SamplingParams(
        temperature=1.0,
        top_p=0.6,
        max_tokens=16,
        logprobs=0,
        seed=3,
        detokenize=False,
        stop_token_ids=[tok.eos_token_id],
    )
    outs = [
        o.outputs[0]
        for o in engine.llm.generate([{"prompt_token_ids": p} for p in ids], params, use_tqdm=False)
    ]
    responses = [list(c.token_ids) for c in outs]
    raw = to_rollout(
        ids,
        responses,
        [sampled_logprobs(r, c.logprobs) for r, c in zip(responses, outs)],
        group_size=1,
        pad_id=tok.pad_token_id,
        eos_id=tok.eos_token_id,
        tokenizer=tok,
        device=ENGINE,
    )
    m, logp_all = raw.response_mask, full_distribution(model, raw, 1.0)
    full = logp_all.gather(-1, raw.response_ids[..., None]).squeeze(-1)
    renormalised = full - nucleus_log_mass(logp_all, 0.6)
    assert ((raw.sampler_logp - renormalised).abs()[m] < 1e-3).float().mean() > 0.95
    assert (raw.sampler_logp - full)[m].max() > 0.1  # so it is not the policy's log-prob


@needs_engine
def test_held_out_evaluation_through_vllm_matches_the_hf_backend(engine, vllm_model_dir):
    from forkrl.evaluate import evaluate_task
    from forkrl.tasks.pick import get_task

    task, model = get_task("pick"), _hf(vllm_model_dir)
    held = task.examples("test", 12, seed=0)
    calls = []

    def counting(*a, **k):
        calls.append(k)
        return engine(*a, **k)

    through = evaluate_task(model, engine.tokenizer, task, held, max_new_tokens=16, generate_fn=counting)
    hf = evaluate_task(model, engine.tokenizer, task, held, max_new_tokens=16)
    assert calls and all(c["greedy"] for c in calls)  # it sampled through vLLM, greedily
    assert through == hf  # greedy on the same float32 weights: the same answers


@needs_engine
@pytest.mark.slow
def test_forkrl_eval_backend_vllm(tmp_path):
    def run(backend: str) -> dict:
        cmd = [
            sys.executable,
            "-m",
            "forkrl",
            "eval",
            "--backend",
            backend,
            "--n",
            "16",
            "--k",
            "0",
            "--dtype",
            ENGINE_DTYPE,
            "--no-progress",
            "--out",
            str(tmp_path / backend),
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
        return json.loads((tmp_path / backend / "summary.json").read_text())

    through, hf = run("vllm"), run("hf")
    assert through["settings"]["backend"] == "vllm" and through["n"] == hf["n"] == 16
    # greedy answers of the shipped model: the same in float32, up to a few in bfloat16
    assert abs(through["accuracy"] - hf["accuracy"]) <= (1 / 16 if ENGINE_DTYPE == "float32" else 0.25)


# Imported into `forkrl train` with --import: at every rollout of the run, how far vLLM's log-probs are
# from the policy being trained (synced before each step's rollout) and from the policy at the start.
