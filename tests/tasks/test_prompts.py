"""One prompt formatting for training and evaluation (forkrl.tasks.prompts)."""

from forkrl.config import load_config
from forkrl.evaluate import Benchmark, format_prompts
from forkrl.tasks.base import Example
from forkrl.tasks.files import apply_dapo_template
from forkrl.training.components import with_chat_template


def test_training_and_eval_format_prompts_the_same_way():
    rows = [Example("What is $1+1$?", "2"), Example(apply_dapo_template("What is $2+2$?"), "4")]
    cfg = load_config(None, ["data.path=x.jsonl", "data.dapo_template=true"])
    trained = with_chat_template(cfg, None, rows)
    [evaluated] = format_prompts([Benchmark("b", rows)], None, dapo_template=True)
    assert [e.prompt for e in trained] == [e.prompt for e in evaluated.examples]
    assert trained[0].prompt == apply_dapo_template("What is $1+1$?")
    assert trained[1].prompt == rows[1].prompt  # already in the template: unchanged (idempotent)
    assert with_chat_template(load_config(None, ["data.path=x.jsonl"]), None, rows) == rows  # off by default
