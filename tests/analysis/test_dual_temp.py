"""Dual-temperature decoding: T_high only where H >= threshold; T_high = T_low = 1 is plain sampling."""

import math

import pytest
import torch
from transformers import LogitsProcessorList

from forkrl.analysis.dual_temp import (
    DualTemperatureProcessor,
    dual_temperature_eval,
    plot_sweep,
    row_entropy,
    sweep,
)
from forkrl.models.loading import load_model_and_tokenizer
from forkrl.rollout.hf import generate
from forkrl.tasks.pick import get_task


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model_and_tokenizer(tiny_model_dir)


def test_unit_temperatures_return_the_raw_logits():
    logits = torch.randn(6, 50) * 3
    logits[0, :10] = -math.inf  # a row masked by an earlier processor
    proc = DualTemperatureProcessor(threshold=1.0, t_high=1.0, t_low=1.0)
    assert torch.equal(proc(None, logits), logits)
    bf = logits.bfloat16()
    out = proc(None, bf)
    assert out.dtype == torch.bfloat16 and torch.equal(out, bf)


def test_high_temperature_only_where_entropy_reaches_the_threshold():
    V = 8
    uniform = torch.zeros(V)  # H = ln 8 = 2.079
    peaked = torch.tensor([10.0, 0, 0, 0, 0, 0, 0, 0])  # H ~ 0.003
    two_way = torch.tensor([0.0, 0.0] + [-math.inf] * 6)  # H = ln 2 exactly, masked tokens count 0
    logits = torch.stack([uniform + torch.arange(V) * 0.01, peaked, two_way])  # (3, V)
    h = row_entropy(logits)
    assert h[1] < 0.01 and h[2] == pytest.approx(math.log(2))
    proc = DualTemperatureProcessor(threshold=float(h[2]), t_high=2.0, t_low=0.5)  # row 2 sits exactly on it
    out = proc(None, logits)
    assert torch.equal(out[0], logits[0] / 2.0)  # H >= threshold: T_high
    assert torch.equal(out[1], logits[1] / 0.5)  # H < threshold: T_low
    assert torch.equal(out[2], logits[2] / 2.0)  # H == threshold counts as high
    assert proc.high_mask(logits).tolist() == [True, False, True]
    with pytest.raises(ValueError, match="t_low=0"):
        DualTemperatureProcessor(1.0, 1.0, 0)


def test_forkrl_generate_samples_identically_with_unit_processor(tiny):
    model, tok = tiny
    prompts = ["3+?=8 in 4,5:", "12+?=20 in 8,3,9:"]
    kw = dict(n=3, temperature=1.0, max_new_tokens=10, generator_seed=11)
    plain = generate(model, tok, prompts, **kw)
    dual = generate(model, tok, prompts, logits_processor=DualTemperatureProcessor(0.5, 1.0, 1.0), **kw)
    assert torch.equal(plain.response_ids, dual.response_ids)
    assert torch.equal(plain.sampler_logp, dual.sampler_logp)
    cold = generate(model, tok, prompts, logits_processor=DualTemperatureProcessor(0.0, 1e-4, 1.0), **kw)
    greedy = generate(model, tok, prompts, greedy=True, **{**kw, "generator_seed": None})
    assert torch.equal(cold.response_ids, greedy.response_ids)  # the processor does steer sampling
    assert not torch.equal(plain.response_ids, greedy.response_ids)


class CountingProcessor(DualTemperatureProcessor):
    calls = 0

    def __call__(self, input_ids, scores):
        CountingProcessor.calls += 1
        return super().__call__(input_ids, scores)


def test_equal_temperatures_are_plain_temperature_sampling(tiny):
    model, tok = tiny
    prompts = ["3+?=8 in 4,5:"]
    kw = dict(n=4, max_new_tokens=10, generator_seed=5)
    plain = generate(model, tok, prompts, temperature=0.7, **kw)
    dual = generate(
        model, tok, prompts, temperature=0.7, logits_processor=DualTemperatureProcessor(1.0, 0.7, 0.7), **kw
    )
    assert torch.equal(plain.response_ids, dual.response_ids)


def test_transformers_generate_accepts_the_processor(tiny):
    model, tok = tiny
    enc = tok(["3+?=8 in 4,5:"], return_tensors="pt")
    kw = dict(do_sample=True, max_new_tokens=8, top_k=0, pad_token_id=tok.pad_token_id)
    torch.manual_seed(3)
    plain = model.generate(**enc, **kw)
    torch.manual_seed(3)
    dual = model.generate(
        **enc, logits_processor=LogitsProcessorList([CountingProcessor(0.5, 1.0, 1.0)]), **kw
    )
    assert CountingProcessor.calls > 0 and torch.equal(plain, dual)
    cold = model.generate(
        **enc, logits_processor=LogitsProcessorList([DualTemperatureProcessor(0.0, 1e-4, 1.0)]), **kw
    )
    greedy = model.generate(**enc, do_sample=False, max_new_tokens=8, pad_token_id=tok.pad_token_id)
    assert torch.equal(cold, greedy) and not torch.equal(plain, greedy)  # T_high -> 0 everywhere: argmax


def test_dual_temperature_eval_counts_high_steps(tiny):
    model, tok = tiny
    task = get_task("pick")
    ex = task.examples("test", 2, seed=0)
    allhigh = dual_temperature_eval(model, tok, task, ex, 1.3, 0.7, threshold=0.0, k=2, max_new_tokens=6)
    nohigh = dual_temperature_eval(model, tok, task, ex, 1.3, 0.7, threshold=math.inf, k=2, max_new_tokens=6)
    assert allhigh["high_frac"] == 1.0 and nohigh["high_frac"] == 0.0
    assert 0.0 <= allhigh["accuracy"] <= 1.0 and allhigh["n"] == 2 and "pass@2" in allhigh


def test_sweep_grid_and_heat_map(tiny, tmp_path):
    model, tok = tiny
    task = get_task("pick")
    res = sweep(
        model, tok, task, task.examples("test", 2), [0.7, 1.3], [1.0], threshold=4.0, k=1, max_new_tokens=4
    )
    assert len(res["grid"]) == 2 and len(res["grid"][0]) == 1 and len(res["cells"]) == 2
    assert [c["t_high"] for c in res["cells"]] == [0.7, 1.3]
    plot_sweep(res, tmp_path / "s.png")
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
