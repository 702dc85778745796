"""model.update_dtype=bfloat16: the body's forward under torch.autocast, the LM head and the weights in
float32 (docs/DESIGN.md, "Precision"; measured on SmolLM2 by bench/bf16.py)."""

import copy
import dataclasses

import torch

from forkrl.config import load_config
from forkrl.core.lm_head import score_from_hidden, selected_logprobs
from forkrl.models.loading import DEFAULT_MODEL, load_model_and_tokenizer
from forkrl.rollout.hf import generate
from forkrl.rollout.lean import LeanDecoder
from forkrl.tasks.pick import get_task
from forkrl.training.forward import body_autocast, scoring_pass
from forkrl.training.step import select_and_train
from forkrl.training.trainer import settings_from
from forkrl.training.update import group_advantages, score_rollout

BF16 = torch.autocast("cpu", dtype=torch.bfloat16)


def test_the_streaming_head_ignores_autocast():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(5, 7, 16, generator=g)
    weight = torch.randn(300, 16, generator=g, requires_grad=True)
    tokens = torch.randint(0, 300, (5, 7), generator=g)
    ref = score_from_hidden(hidden, weight, tokens, temperature=0.7, vocab_chunk=128)
    with BF16:
        got = score_from_hidden(hidden, weight, tokens, temperature=0.7, vocab_chunk=128)
    for a, b in zip(ref, got):
        assert b.dtype == torch.float32
        assert torch.equal(
            a, b
        )  # bf16 logits would be off by ~1e-2 (the tiles use out= matmuls, which autocast leaves alone)
    grads = []
    for ctx in (torch.autocast("cpu", enabled=False), BF16):
        h = hidden[:2].reshape(-1, 16).clone().requires_grad_()
        with ctx:
            logp = selected_logprobs(h, weight, tokens[:2].reshape(-1), temperature=0.7, vocab_chunk=128)
        logp.sum().backward()
        grads.append((logp.detach(), h.grad, weight.grad.clone()))
        weight.grad = None
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def _rollout():
    model, tok = load_model_and_tokenizer(DEFAULT_MODEL)
    examples = get_task("pick").examples("train", 4)
    ro = generate(model, tok, [e.prompt for e in examples], n=4, max_new_tokens=31, generator_seed=0)
    return model, tok, examples, ro


def test_bf16_update_follows_the_float32_one():
    model, _, _, ro = _rollout()
    rewards = torch.tensor([float(i % 3 == 0) for i in range(16)])
    deltas, outs = [], []
    for dtype in ("float32", "bfloat16"):
        cfg = load_config(
            None, [f"model.update_dtype={dtype}", "optim.micro_batch_size=8", "optim.grad_clip=0"]
        )
        s = settings_from(cfg, max_len=31)
        assert s.model.update_dtype == dtype
        m = copy.deepcopy(model)
        opt = torch.optim.SGD(m.parameters(), lr=1.0)  # the parameter change is the gradient itself
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0)
        batch = score_rollout(m, None, ro, dataclasses.replace(s), overlong_filter=False)
        adv = group_advantages(rewards, ro.group_size, s)
        outs.append(
            select_and_train(m, opt, sched, batch, adv, s, generator=torch.Generator().manual_seed(0))[0]
        )
        assert all(p.dtype == torch.float32 for p in m.parameters())  # weights stay float32
        deltas.append(torch.cat([(a - b).flatten() for a, b in zip(m.parameters(), model.parameters())]))
    fp32, bf16 = outs
    assert fp32["selected_tokens"] == bf16["selected_tokens"] > 0
    assert abs(fp32["loss"] - bf16["loss"]) <= 0.02 * abs(fp32["loss"]) + 1e-4
    assert not torch.equal(deltas[0], deltas[1])  # the body did run in bf16
    a, b = deltas[0].double(), deltas[1].double()
    cos = torch.dot(a, b) / (a.norm() * b.norm())
    assert cos > 0.99, cos


def test_sampling_under_autocast_keeps_a_float32_head():
    model, tok, examples, ro = _rollout()
    with BF16:
        decoder = LeanDecoder.for_model(model, 64)
        assert decoder is not None and decoder._qkv[0][0].dtype == torch.bfloat16  # cast once, not per step
        ro16 = generate(model, tok, [e.prompt for e in examples], n=4, max_new_tokens=31, generator_seed=0)
    assert ro16.sampler_logp.dtype == torch.float32
    # The sampler's bf16 log-probs against the float32 scoring pass of the same tokens: close, not equal.
    lp, _ = scoring_pass(
        model,
        ro16.input_ids,
        ro16.attention_mask,
        ro16.prompt_len,
        ro16.response_ids,
        temperature=1.0,
        group_size=ro16.group_size,
    )
    d = (lp - ro16.sampler_logp)[ro16.response_mask].abs()
    assert 0 < d.max() < 0.2 and d.median() < 0.02, (d.median(), d.max())
    with body_autocast(model, "bfloat16"):
        lp16, _ = scoring_pass(
            model,
            ro16.input_ids,
            ro16.attention_mask,
            ro16.prompt_len,
            ro16.response_ids,
            temperature=1.0,
            group_size=ro16.group_size,
        )
    assert (lp16 - ro16.sampler_logp)[ro16.response_mask].abs().median() < 0.02
