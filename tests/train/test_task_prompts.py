"""A built-in task's prompts get the tokenizer's chat template with model.chat_template (issue 26: the
arith task is for instruct models), and a tokenizer without one is a config error, not a traceback."""

import pytest
from transformers import AutoTokenizer

from forkrl.config import ConfigError, load_config
from forkrl.models.loading import DEFAULT_MODEL
from forkrl.tasks.arith import ArithTask
from forkrl.training.components import with_chat_template

CHAT = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<a>{% endif %}"


def test_task_prompts_get_the_chat_template():
    tok = AutoTokenizer.from_pretrained(DEFAULT_MODEL)
    tok.chat_template = CHAT
    rows = ArithTask().examples("test", 3, seed=1234)
    on = with_chat_template(load_config(None, ["task.name=arith", "model.chat_template=true"]), tok, rows)
    assert [r.prompt for r in on] == [f"<user>{r.prompt}<a>" for r in rows]
    assert [r.answer for r in on] == [r.answer for r in rows]
    off = with_chat_template(load_config(None, ["task.name=arith"]), tok, rows)
    assert off == rows


def test_a_tokenizer_without_a_chat_template_is_a_config_error():
    tok = AutoTokenizer.from_pretrained(DEFAULT_MODEL)
    assert not tok.chat_template
    with pytest.raises(ConfigError, match="model.chat_template=true: tokenizer .* has no chat template"):
        with_chat_template(
            load_config(None, ["model.chat_template=true"]), tok, ArithTask().examples("test", 2)
        )
