"""With a token budget, micro-batches hold whole groups where they fit, so that each group's prompt runs
once in the training forward (model.share_prompt); the update is the same as with row packing."""

import copy
import dataclasses

import torch

import forkrl.training.forward as forward
from forkrl.config import load_config
from forkrl.models.loading import DEFAULT_MODEL, load_model_and_tokenizer
from forkrl.rollout.hf import generate
from forkrl.tasks.pick import get_task
from forkrl.training.dist import LOCAL
from forkrl.training.optimize import layout
from forkrl.training.step import select_and_train
from forkrl.training.trainer import settings_from
from forkrl.training.update import group_advantages, score_rollout


def _slices(minis):
    return [(m.start, m.stop) for mb in minis for m in mb.micros]


def test_groups_are_packed_whole_and_a_group_over_the_budget_row_by_row():
    tokens = torch.tensor([10] * 12 + [30] * 4)  # (16,): three groups of 4 x 10, one of 4 x 30
    rows = layout(16, 1, 16, LOCAL.env, tokens, 65, "in_order")
    assert _slices(rows) == [(0, 6), (6, 12), (12, 14), (14, 16)]  # rows only: groups cut apart
    groups = layout(16, 1, 16, LOCAL.env, tokens, 65, "in_order", group_size=4)
    assert _slices(groups) == [(0, 4), (4, 8), (8, 12), (12, 14), (14, 16)]  # the last group: 120 > 65


def test_a_budgeted_update_shares_prompts_and_matches_row_packing(monkeypatch):
    model, tok = load_model_and_tokenizer(DEFAULT_MODEL)
    examples = get_task("pick").examples("train", 4)
    ro = generate(model, tok, [e.prompt for e in examples], n=4, max_new_tokens=15, generator_seed=0)
    rewards = torch.tensor([float(i % 3 == 0) for i in range(16)])
    shared = []
    real = forward._shared_prompts
    monkeypatch.setattr(forward, "_shared_prompts", lambda *a: shared.append(real(*a)) or shared[-1])
    budget = int(ro.attention_mask[:6].sum())  # about 6 rows: row packing cuts groups of 4 apart
    results = []
    for share in (False, True):
        shared.clear()
        cfg = load_config(
            None, [f"optim.micro_batch_tokens={budget}", f"model.share_prompt={str(share).lower()}"]
        )
        s = settings_from(cfg, max_len=15)
        m = copy.deepcopy(model)
        opt = torch.optim.SGD(m.parameters(), lr=1.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0)
        batch = score_rollout(m, None, ro, dataclasses.replace(s), overlong_filter=False)
        adv = group_advantages(rewards, ro.group_size, s)
        out = select_and_train(m, opt, sched, batch, adv, s, generator=torch.Generator().manual_seed(0))[0]
        results.append((out, m, list(shared)))
    (plain, m0, _), (packed, m1, calls) = results
    assert calls.count(True) >= 4, calls  # every group's prompt ran once in the update (and the scoring)
    assert plain["selected_tokens"] == packed["selected_tokens"] > 0
    assert abs(plain["loss"] - packed["loss"]) < 1e-5
    for (name, a), b in zip(m0.named_parameters(), m1.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
