"""The `arith` task: disjoint held-out facts, a fixed held-out list, the lenient grader, TRL-format export."""

import json

import pytest

from forkrl.tasks.arith import ADD_WORDINGS, INSTRUCTION, LEVELS, ArithTask, arith_reward
from forkrl.tasks.base import Example
from forkrl.tasks.export import export_task
from forkrl.tasks.files import load_examples
from forkrl.tasks.registry import get_task


def _fact(e: Example):
    return (e.fields["level"], e.fields["op"], e.fields["a"], e.fields["b"])


@pytest.mark.parametrize("level", ["add1", "add2", "mul1", "word"])
def test_no_held_out_fact_is_trained_on(level):
    t = ArithTask(level)
    train = {_fact(e) for e in t.examples("train", 3000, seed=0)}
    test = {_fact(e) for e in t.examples("test", 300, seed=1234)}
    assert test and train and not (train & test)


def test_held_out_list_is_fixed_distinct_and_complete():
    t = ArithTask("add1")
    held_facts = [f for f in t.facts("add1") if t._split_of("add1", f) == "test"]
    assert len(held_facts) == 18 and len(ADD_WORDINGS) == 12  # 216 held-out problems, >= 200 to evaluate on
    a, b = t.examples("test", 216, seed=1234), t.examples("test", 216, seed=1234)
    assert [e.prompt for e in a] == [e.prompt for e in b]
    assert len({e.prompt for e in a}) == 216  # every wording of every held-out fact, no repeats
    assert {_fact(e)[1:] for e in a} == set(held_facts)
    assert [e.prompt for e in t.examples("test", 100, seed=1234)] == [e.prompt for e in a[:100]]


@pytest.mark.parametrize("level", LEVELS)
def test_answers_are_the_arithmetic(level):
    for e in ArithTask(level).examples("train", 200, seed=3):
        op, x, y = e.fields["op"], e.fields["a"], e.fields["b"]
        assert int(e.answer) == {"+": x + y, "-": x - y, "*": x * y}[op]
        assert e.prompt.endswith(INSTRUCTION) and str(x) in e.prompt and str(y) in e.prompt
        assert int(e.answer) >= 0


def test_mix_takes_every_level_in_turn():
    levels = [e.fields["level"] for e in ArithTask("mix").examples("train", 8)]
    assert levels == ["add1", "add2", "mul1", "word"] * 2
    test_levels = [e.fields["level"] for e in ArithTask("mix").examples("test", 8, seed=1234)]
    assert test_levels == ["add1", "add2", "mul1", "word"] * 2


def test_grader_box_first_else_last_number():
    ex = Example("What is 7 plus 5?", "12")
    t = ArithTask()
    assert t.grade(r"7 + 5 = 12, so \boxed{12}.", ex) == 1.0
    assert t.grade("7 + 5 = 12. So the answer is 12.", ex) == 1.0
    assert t.grade(r"\boxed{13}. Hmm, 12", ex) == 0.0  # a box is the answer, wherever it stands
    assert t.grade(r"\boxed{N}", ex) == 0.0  # the placeholder copied from a prompt
    assert t.grade("No numbers at all.", ex) == 0.0
    assert arith_reward(["p"] * 2, ["It is 12.", "It is 1,2"], answer=["12", "12"]) == [1.0, 0.0]


def test_registry_builds_from_config_fields():
    assert get_task("arith", level="word", max_value=30, n_candidates=4).level == "word"
    with pytest.raises(ValueError, match="task.level='add3'"):
        get_task("arith", level="add3")


def test_export_is_trl_conversational_and_reloads_as_the_task(tmp_path):
    from trl.data_utils import is_conversational

    t = ArithTask("mul1")
    train, test = export_task(t, tmp_path, n_train=30, n_test=20)
    rows = [json.loads(line) for line in open(test)]
    assert all(is_conversational(r) for r in rows)
    assert [r["prompt"][0]["content"] for r in rows] == [e.prompt for e in t.examples("test", 20, seed=1234)]
    loaded = load_examples(str(test))
    assert [(e.prompt, e.answer) for e in loaded] == [
        (e.prompt, e.answer) for e in t.examples("test", 20, seed=1234)
    ]
    assert len(open(train).readlines()) == 30
