"""selection.reuse_entropy: with entropy_source=current, the first mini-batch (before any optimizer step)
selects on the scored entropies instead of recomputing them, and gets the same update; later
mini-batches, dropout, and the switch turned off recompute (docs/DESIGN.md)."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import forkrl.training.update as upd
from forkrl.config import load_config
from forkrl.rollout.hf import generate
from forkrl.training.step import select_and_train
from forkrl.training.trainer import settings_from
from forkrl.training.update import dropout_active, group_advantages, score_rollout

REWARDS = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0])


@pytest.fixture(scope="module")
def rollout(tiny_model_dir):
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ro = generate(base, tok, ["3+?=9 in 6,2:", "14+?=20 in 1,6,9:"], n=4, max_new_tokens=12, generator_seed=0)
    return base, ro


def _update(rollout, monkeypatch, overrides, dropout=0.0):
    """One update; returns (the entropies each training forward was asked for, rescoring passes, state)."""
    base, ro = rollout
    cfg = load_config(None, ["optim.micro_batch_size=2", "optim.mini_batches=2", *overrides])
    s = settings_from(cfg, max_len=12)
    model = copy.deepcopy(base)
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = dropout
    asked, rescored = [], []
    forward, score = upd.train_logprobs, upd.score

    def counting_forward(*a, need_entropy, **kw):
        asked.append(need_entropy)
        return forward(*a, need_entropy=need_entropy, **kw)

    def counting_score(*a, **kw):
        rescored.append(1)
        return score(*a, **kw)

    scored = score_rollout(model, None, ro, s, overlong_filter=False)
    monkeypatch.setattr(upd, "train_logprobs", counting_forward)
    monkeypatch.setattr(upd, "score", counting_score)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0)
    adv = group_advantages(REWARDS, ro.group_size, s)
    torch.manual_seed(0)
    select_and_train(model, opt, sched, scored, adv, s, generator=torch.Generator().manual_seed(0))
    monkeypatch.undo()
    return asked, len(rescored), {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("reuse_logprobs", [True, False])
def test_first_mini_batch_selects_on_the_scored_entropies(rollout, monkeypatch, reuse_logprobs):
    common = ["preset=trl", f"rollout.reuse_logprobs={str(reuse_logprobs).lower()}"]
    asked_on, _, on = _update(rollout, monkeypatch, common)
    asked_off, _, off = _update(rollout, monkeypatch, [*common, "selection.reuse_entropy=false"])
    # 8 rows, 2 mini-batches of 2 micro-batches: the first two forwards take the scored entropies
    assert asked_on == [False, False, True, True]
    assert asked_off == [True, True, True, True]
    for k in on:  # the same selection and update, up to float rounding
        torch.testing.assert_close(on[k], off[k], rtol=1e-4, atol=1e-6)


def test_with_dropout_every_forward_recomputes(rollout, monkeypatch):
    base, _ = rollout
    assert not dropout_active(base)
    asked, _, _ = _update(rollout, monkeypatch, ["preset=trl"], dropout=0.1)
    assert asked == [True, True, True, True]
    model = copy.deepcopy(base)
    model.model.layers[0].self_attn.attention_dropout = 0.1
    assert dropout_active(model)
    model = copy.deepcopy(base)
    model.model.layers[0].mlp.add_module("drop", torch.nn.Dropout(0.05))
    assert dropout_active(model)


def test_batch_scope_skips_its_first_rescoring(rollout, monkeypatch):
    cur = ["selection.scope=batch", "selection.entropy_source=current"]
    _, rescored_on, on = _update(rollout, monkeypatch, cur)
    _, rescored_off, off = _update(rollout, monkeypatch, [*cur, "selection.reuse_entropy=false"])
    assert (rescored_on, rescored_off) == (1, 2)  # one rescoring per mini-batch, less the first
    for k in on:
        torch.testing.assert_close(on[k], off[k], rtol=1e-4, atol=1e-6)
