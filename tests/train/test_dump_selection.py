"""`train.dump_every` dumps the selection that trained, whatever the plan (it recomputed a batch-scope
selection on old entropies before, wrong for micro-batch, sequence and current scopes and `random`)."""

import pytest
import torch

import forkrl.training.step as step_mod
from forkrl.analysis.dump import as_tensors, read_dump
from tests.train.test_smoke import _run


@pytest.mark.parametrize(
    "overrides",
    [
        ["preset=official", "optim.micro_batch_size=4"],  # per micro-batch, current entropies
        ["selection.rule=random"],  # seeded draws of the step's generator
        ["selection.scope=sequence", "selection.rho=0.5"],
    ],
    ids=["official", "random", "sequence"],
)
@pytest.mark.slow  # end to end, > 5 s
def test_dump_holds_the_trained_selection(tiny_model_dir, tmp_path, monkeypatch, overrides):
    trained = []
    update = step_mod.actor_update

    def spy(model, opt, sched, scored, adv, plan, *args, **kwargs):
        out = update(model, opt, sched, scored, adv, plan, *args, **kwargs)
        trained.append(plan.record.sel_mask.clone())
        return out

    monkeypatch.setattr(step_mod, "actor_update", spy)
    run_dir, _ = _run(tiny_model_dir, tmp_path, "train.steps=1", "train.dump_every=1", *overrides)
    dump = read_dump(run_dir / "rollouts" / "step_000001.jsonl")
    sel, valid = as_tensors(dump, "sel")
    sel = sel.bool()
    (want,) = trained
    assert want.any()
    L = sel.shape[1]
    assert torch.equal(sel & valid, want[:, :L] & valid)
    assert not want[:, L:].any()
