"""Gradient checkpointing recomputes layers in the backward: same loss and same update as without it."""

import copy
import dataclasses

import pytest
import torch

import forkrl.training.forward as forward
from forkrl.config import load_config
from forkrl.models.loading import DEFAULT_MODEL, enable_gradient_checkpointing, load_model_and_tokenizer
from forkrl.rollout.hf import generate
from forkrl.tasks.pick import get_task
from forkrl.training.step import select_and_train
from forkrl.training.trainer import settings_from
from forkrl.training.update import group_advantages, score_rollout


@pytest.mark.parametrize("packable", [True, False])
def test_checkpointed_update_equals_the_plain_one(packable, monkeypatch):
    # Shared prompts run packed under checkpointing (a plain forward); where a model cannot be packed,
    # every row runs whole (the checkpointed layers cannot pass the prompt's KV cache on).
    calls = []
    real = forward.packed_hidden
    monkeypatch.setattr(forward, "packed_hidden", lambda *a: calls.append(1) or real(*a))
    if packable:  # packed with and without checkpointing (where it would not pay, for this test)
        monkeypatch.setattr(forward, "packing_pays", lambda *a: True)
    else:
        monkeypatch.setattr(forward, "packable", lambda m: "not here")
    model, tok = load_model_and_tokenizer(DEFAULT_MODEL)
    examples = get_task("pick").examples("train", 4)
    ro = generate(model, tok, [e.prompt for e in examples], n=4, max_new_tokens=31, generator_seed=0)
    rewards = torch.tensor([float(i % 3 == 0) for i in range(16)])
    cfg = load_config(None, ["model.gradient_checkpointing=true", "optim.micro_batch_size=8"])
    s = settings_from(cfg, max_len=31)
    assert s.share_prompt
    results = []
    for checkpointing in (False, True):
        m = copy.deepcopy(model)
        if checkpointing:
            enable_gradient_checkpointing(m)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0)
        # Unpackable and checkpointed, every row runs whole: as without checkpointing and sharing.
        run = dataclasses.replace(s, share_prompt=packable or checkpointing)
        batch = score_rollout(m, None, ro, run, overlong_filter=False)
        adv = group_advantages(rewards, ro.group_size, run)
        out = select_and_train(m, opt, sched, batch, adv, run, generator=torch.Generator().manual_seed(0))[0]
        results.append((out, m))
    (plain, m0), (ckpt, m1) = results
    assert bool(calls) == packable
    assert m1.model.gradient_checkpointing and not m0.model.gradient_checkpointing
    assert plain["selected_tokens"] == ckpt["selected_tokens"] > 0
    assert abs(plain["loss"] - ckpt["loss"]) < 1e-6
    for (name, a), b in zip(m0.named_parameters(), m1.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), m1.parameters()))  # it trained
