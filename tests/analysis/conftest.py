"""Shared helpers for the analysis tests: a small generated dump and an HTML well-formedness check."""

from html.parser import HTMLParser

import pytest

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class _Checker(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack, self.errors, self.starts = [], [], {}

    def handle_starttag(self, tag, attrs):
        self.starts[tag] = self.starts.get(tag, 0) + 1
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()


def check_html(text: str) -> dict:
    """Parse `text`; assert a doctype and balanced, properly nested tags. Returns tag counts."""
    assert text.lstrip().lower().startswith("<!doctype html>")
    p = _Checker()
    p.feed(text)
    p.close()
    assert not p.errors, p.errors[:5]
    assert not p.stack, f"unclosed tags: {p.stack}"
    return p.starts


@pytest.fixture(scope="session")
def tiny_dump(tiny_model_dir, tmp_path_factory):
    """A dump of 2 problems x 2 samples from the random tiny model, with top-5 alternatives."""
    from forkrl.analysis.generate import generate_dump
    from forkrl.models.loading import load_model_and_tokenizer
    from forkrl.tasks.pick import get_task

    model, tok = load_model_and_tokenizer(tiny_model_dir)
    task = get_task("pick")
    path = tmp_path_factory.mktemp("dump") / "dump.parquet"
    return generate_dump(
        model, tok, task.examples("test", 2, seed=0), path, n=2, max_new_tokens=12, grade=task.grade
    )
