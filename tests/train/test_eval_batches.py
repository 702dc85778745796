"""Periodic evaluation on file data generates in batches; the accuracy must not depend on the batch size."""

import forkrl.training.components as components
from forkrl.models.loading import DEFAULT_MODEL, load_model_and_tokenizer
from forkrl.rewards import task_reward
from forkrl.tasks.pick import get_task


def test_file_data_evaluation_is_the_same_in_any_batch_size(monkeypatch):
    model, tok = load_model_and_tokenizer(DEFAULT_MODEL)
    task = get_task("pick")
    held = task.examples("test", 10)
    reward = task_reward(task)
    direct = components.evaluate_held_out(
        model, tok, task, held, reward, 31
    )  # the task's own grader, one batch
    monkeypatch.setattr(components, "EVAL_BATCH", 3)  # 3 + 3 + 3 + 1 prompts
    chunked = components.evaluate_held_out(model, tok, None, held, reward, 31)
    monkeypatch.setattr(components, "EVAL_BATCH", 64)
    whole = components.evaluate_held_out(model, tok, None, held, reward, 31)
    assert chunked == whole == direct
    assert 0.0 < whole < 1.0  # the warm start gets some right and some wrong, so a mix-up would show
