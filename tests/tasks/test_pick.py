"""The built-in `pick` task: deterministic grader, seeded disjoint splits, traces that solve it."""

import random

import pytest

from forkrl.tasks.base import Example
from forkrl.tasks.pick import PickTask, get_task


def test_grader_hand_cases():
    t = PickTask()
    ex = Example("17+?=42 in 9,25,31,14:", "25")
    assert t.grade("42-17=25;17+25=42!#25", ex) == 1.0
    assert t.grade("42-17=25;17+31=48x;17+25=42!#25", ex) == 1.0
    assert t.grade("42-17=25;17+31=48x;17+25=", ex) == 0.0  # cut off by the budget: no answer
    assert t.grade("#31", ex) == 0.0 and t.grade("#250", ex) == 0.0 and t.grade("", ex) == 0.0
    assert t.grade("#25;#31", ex) == 1.0  # the first stated answer counts


def test_splits_are_seeded_and_disjoint():
    t = PickTask()
    train = t.examples("train", 3000, seed=0)
    test = t.examples("test", 500, seed=0)
    assert [e.prompt for e in train[:50]] == [e.prompt for e in t.examples("train", 50, seed=0)]
    assert [e.prompt for e in t.examples("train", 50, seed=1)] != [e.prompt for e in train[:50]]
    pairs = lambda xs: {(e.fields["a"], int(e.answer)) for e in xs}  # noqa: E731
    assert not pairs(train) & pairs(test)  # no (addend, answer) fact is shared
    assert 0.1 < len(pairs(test)) / (len(pairs(test)) + len(pairs(train))) < 0.4


def test_every_problem_has_exactly_one_right_candidate():
    for e in PickTask(max_value=12, n_candidates=5).examples("train", 500):
        a, t, cands = e.fields["a"], e.fields["target"], e.fields["candidates"]
        assert [c for c in cands if a + c == t] == [int(e.answer)] and len(set(cands)) == 5


def test_traces_are_correct_and_try_candidates_in_random_order():
    t = PickTask()
    rng = random.Random(0)
    firsts = []
    for e in t.examples("train", 400):
        trace = t.trace(e, rng)
        assert t.grade(trace, e) == 1.0
        firsts.append(trace.split(";")[1].split("+")[1].split("=")[0] == e.answer)
    # The first attempt is right about 1 time in n_candidates (random order): the forking decision.
    assert 0.18 < sum(firsts) / len(firsts) < 0.32


def test_budget_fits_two_attempts_of_two_digit_numbers():
    t = PickTask()
    assert len("41-19=22;" + "19+12=31x;" + "19+22=41!#22") == t.default_max_new_tokens == 31


def test_bad_settings():
    with pytest.raises(ValueError, match="max_value=3 must exceed n_candidates=4"):
        PickTask(max_value=3)
    with pytest.raises(ValueError, match="split must be 'train' or 'test'"):
        PickTask().examples("val", 3)
    with pytest.raises(ValueError, match="task.name='countdown' is not a built-in task"):
        get_task("countdown")
