"""A signal during the update gives the step up between micro-batches, before its first optimizer step
(the weights are still the step before's), and the resumed run equals an uninterrupted one; a repeated
SIGTERM (forwarded by torchrun's agent, Slurm, systemd) is the same request, a second Ctrl-C stops now."""

import os
import signal

import pytest
import torch
from safetensors.torch import load_file

import forkrl.training.step as step_mod
import forkrl.training.update as update_mod
from forkrl.config import load_config
from forkrl.training.checkpoint import list_checkpoints
from forkrl.training.dist import LOCAL
from forkrl.training.metrics import read_metrics
from forkrl.training.optimize import MiniBatch, optimizer_steps
from forkrl.training.stopping import Abort, StopFlag, TrainingInterrupted
from forkrl.training.trainer import train

from .test_resume import _overrides, _untimed, length_reward


class _Tiny(torch.nn.Module):  # optimizer_steps only needs parameters
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))


def _run(should_stop):
    torch.manual_seed(0)
    model = _Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    minis = [
        MiniBatch(slice(0, 4), [slice(0, 2), slice(2, 4)]),
        MiniBatch(slice(4, 8), [slice(4, 6), slice(6, 8)]),
    ]
    seen = []

    def micro_loss(mini, rows):
        seen.append((rows.start, rows.stop))
        return (model.w * torch.tensor([rows.start + 1.0, 1.0])).sum()

    try:
        optimizer_steps(
            model, opt, sched, minis, micro_loss, grad_clip=0.0, par=LOCAL, should_stop=should_stop
        )
    except Abort:
        return model, sched, seen, True
    return model, sched, seen, False


def test_a_stop_between_micro_batches_before_the_first_step_leaves_everything_untouched():
    asked = []

    def stop_at_second():
        asked.append(1)
        return len(asked) == 2

    model, sched, seen, aborted = _run(stop_at_second)
    assert aborted and seen == [(0, 2)]  # the second micro-batch never ran
    assert torch.equal(model.w.detach(), torch.tensor([1.0, -2.0])) and model.w.grad is None
    assert sched.last_epoch == 0  # the scheduler did not step either


def test_after_the_first_optimizer_step_the_update_finishes():
    asked = []

    def always():
        asked.append(1)
        return len(asked) > 2  # asks to stop from the third micro-batch, after step 1

    model, sched, seen, aborted = _run(always)
    assert not aborted and seen == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert len(asked) == 2  # never asked once a step was taken
    assert sched.last_epoch == 2
    # two SGD steps of lr 0.5: grads (1+3, 2) then (5+7, 2)
    assert torch.equal(model.w.detach(), torch.tensor([1.0 - 0.5 * 4 - 0.5 * 12, -2.0 - 0.5 * 2 - 0.5 * 2]))


def test_a_repeated_sigterm_is_one_request_and_a_second_ctrl_c_stops_now():
    with StopFlag(can_abort=False) as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # no KeyboardInterrupt
        assert stop.signum == signal.SIGTERM and stop.requested()
    with StopFlag(can_abort=False) as stop:
        os.kill(os.getpid(), signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)


@pytest.mark.slow  # end to end, > 5 s
def test_sigterm_during_the_update_checkpoints_the_step_before_and_resumes_identically(
    tiny_model_dir, tmp_path, monkeypatch
):
    args = [*_overrides(tiny_model_dir, tmp_path / "sig", 3), "optim.micro_batch_size=2"]  # 3 per mini-batch
    real_update, real_logprobs = step_mod.actor_update, update_mod.train_logprobs
    updates, forwards = [], []

    def counting_update(*a, **k):
        updates.append(1)
        return real_update(*a, **k)

    def signalling_logprobs(*a, **k):
        if len(updates) == 2:
            forwards.append(1)
            if len(forwards) == 1:  # step 2's first micro-batch: the signal comes during its forward
                os.kill(os.getpid(), signal.SIGTERM)
        return real_logprobs(*a, **k)

    monkeypatch.setattr(step_mod, "actor_update", counting_update)
    monkeypatch.setattr(update_mod, "train_logprobs", signalling_logprobs)
    out = tmp_path / "sig"
    with pytest.raises(TrainingInterrupted, match="stopped after writing .*step-000001"):
        train(load_config(None, args), reward_fn=length_reward)
    assert forwards == [1]  # the second micro-batch never ran
    assert [p.name for p in list_checkpoints(out)] == ["step-000001"]
    assert [r["step"] for r in read_metrics(out)] == [0, 1]
    monkeypatch.setattr(update_mod, "train_logprobs", real_logprobs)
    train(load_config(None, args), reward_fn=length_reward, resume=True)
    full_args = [*_overrides(tiny_model_dir, tmp_path / "full", 3), "optim.micro_batch_size=2"]
    full, _ = train(load_config(None, full_args), reward_fn=length_reward)
    a, b = load_file(full / "final" / "model.safetensors"), load_file(out / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _untimed(read_metrics(full)) == _untimed(read_metrics(out))
