"""Prompt formatting in one place, for training (`model.chat_template`, `data.dapo_template`) and
`forkrl eval` (`--chat-template`, `--dapo-template`): DAPO's prompt template first (idempotent), then
the tokenizer's chat template. A DAPO-layout row with several turns (e.g. a system prompt) keeps them;
its last user turn becomes the formatted problem.
"""

from __future__ import annotations

from forkrl.tasks.base import Example
from forkrl.tasks.files import apply_chat_template, apply_dapo_template


def format_example(e: Example, tokenizer, *, chat_template: bool, dapo_template: bool) -> Example:
    """`e` with its prompt formatted; `tokenizer` is needed for the chat template only.

    >>> format_example(Example("What is 1+1?", "2"), None, chat_template=False, dapo_template=True).prompt[:6]
    'Solve '
    """
    text = apply_dapo_template(e.prompt) if dapo_template else e.prompt
    if not chat_template:
        return Example(text, e.answer, e.fields)
    messages = e.fields.get("messages")
    if messages:
        messages = [dict(m) for m in messages]
        last_user = max(i for i, m in enumerate(messages) if m.get("role", "user") == "user")
        messages[last_user]["content"] = text
    return Example(apply_chat_template(tokenizer, messages or text), e.answer, e.fields)
