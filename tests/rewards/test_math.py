"""Verifiers: DAPO's rule (checked against verl's `math_dapo.py`), extraction, math-verify equivalence."""

import re
import threading
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from forkrl.rewards.math import (
    _first_dollar_span,
    _unwrap,
    dapo_reward,
    dapo_score,
    extract_answer,
    is_equivalent,
    last_boxed,
    math_reward,
    normalize_answer,
    normalize_final_answer,
)

# (completion, ground truth, DAPO reward). The verdicts are those of verl's
# `verl/utils/reward_score/math_dapo.py::compute_score` (run side by side while writing this table).
DAPO_CASES = [
    ("Answer: 34", "34", 1.0),
    ("answer : 34", "34", 1.0),  # case-insensitive, spaces around the colon
    ("Answer:\n34", "34", 1.0),  # `\s*` crosses the newline
    ("Answer: 1,000", "1000", 1.0),  # thousands separators
    ("Answer: 1,000", "1,000", 1.0),
    ("Answer: \\$12", "12", 1.0),  # escaped dollar
    ("Answer: 12 dollars", "12", 1.0),  # unit words are deleted
    ("Answer: 5 cm", "5", 1.0),
    ("Answer: 30^\\circ", "30", 1.0),  # degrees
    ("Answer: 30 degrees", "30", 1.0),
    ("Answer: \\text{(B)}", "(B)", 1.0),  # \text{} unwrapped
    ("Answer: $\\frac{1}{2}$.", "\\frac{1}{2}", 1.0),  # ".$" -> "$", then the $...$ span
    ("Answer: \\frac12", "\\frac{1}{2}", 1.0),  # shorthand \frac
    ("Answer: \\sqrt2", "\\sqrt{2}", 1.0),  # shorthand \sqrt
    ("Answer: x = 5", "5", 1.0),  # text after the last "="
    ("Answer: \\boxed{5}", "5", 1.0),
    ("Answer: The final answer is $5$. I hope it is correct.", "5", 1.0),
    ("Answer: 3\nAnswer: 34", "34", 1.0),  # the last Answer line wins
    ("Answer: 2a + b", "2 + b", 1.0),  # DAPO quirk: "a " is deleted anywhere
    ("Answer: 5.", "5", -1.0),  # a trailing period outside $...$ stays
    ("Answer: \\dfrac{1}{2}", "\\frac{1}{2}", -1.0),  # \dfrac is not rewritten
    ("Answer: 0.5", "\\frac{1}{2}", -1.0),  # strings only, no math equivalence
    ("Answer: -3", "3", -1.0),
    ("The answer is \\boxed{34}", "34", -1.0),  # no Answer line (no box fallback in DAPO's release)
    ("Answer: 34\n" + "x" * 300, "34", -1.0),  # outside the graded 300-character tail
]

# (completion, ground truth, math_reward)
MATH_CASES = [
    ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("\\boxed{0.5}", "\\frac{1}{2}", 1.0),
    ("\\boxed{1/2}", "\\frac12", 1.0),
    ("\\boxed{\\dfrac{1}{2}}", "\\frac{1}{2}", 1.0),
    ("\\boxed{\\tfrac12}", "1/2", 1.0),
    ("Answer: 0.5", "1/2", 1.0),
    ("\\boxed{(1, 2]}", "(1,2]", 1.0),
    ("\\boxed{[1, 2]}", "(1,2]", 0.0),  # closed vs half-open interval
    ("\\boxed{(-\\infty, 3)}", "(-\\infty,3)", 1.0),
    ("\\boxed{[0,1) \\cup (2,3]}", "[0,1)\\cup(2,3]", 1.0),
    ("\\boxed{\\{3, 2, 1\\}}", "\\{1,2,3\\}", 1.0),  # sets are unordered
    ("\\boxed{\\{1, 3\\}}", "\\{1,2\\}", 0.0),
    ("\\boxed{\\sqrt{8}}", "2\\sqrt{2}", 1.0),
    ("\\boxed{\\sqrt2}", "\\sqrt{2}", 1.0),
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\sqrt{3}/2", 1.0),
    ("\\boxed{-3}", "-3", 1.0),
    ("\\boxed{3}", "-3", 0.0),
    ("\\boxed{-\\frac{1}{2}}", "-0.5", 1.0),
    ("\\boxed{5 \\text{ cm}}", "5", 1.0),
    ("\\boxed{30^\\circ}", "30", 1.0),
    ("\\boxed{\\$1,000}", "1000", 1.0),
    ("\\boxed{12 \\text{ dollars}}", "12", 1.0),
    ("Answer: 5.", "5", 1.0),  # trailing period (DAPO: -1)
    ("**Answer:** 7", "7", 1.0),  # markdown bold around the label
    ("\\boxed{x = 5}", "5", 1.0),
    ("\\boxed{\\text{Tuesday}}", "\\text{Tuesday}", 1.0),
    ("\\boxed{\\pi}", "\\pi", 1.0),
    ("\\boxed{3+2i}", "2i+3", 1.0),
    ("\\boxed 5", "5", 1.0),  # no braces
    ("$\\fbox{5}$", "5", 1.0),
    ("First \\boxed{3}, then I rechecked.\nAnswer: 4", "4", 1.0),  # the later of box and Answer line
    ("\\boxed{2}", "3", 0.0),
    ("\\boxed{0.333}", "\\frac{1}{3}", 0.0),
    ("\\boxed{2\\pi}", "\\pi", 0.0),
    ("\\boxed{2a + b}", "2 + b", 0.0),  # no DAPO article false match
    ("the result is 5", "5", 0.0),  # no final-answer marker
    ("\\boxed{5", "5", 0.0),  # truncated box
    ("Answer: 12", "\\text{(B)}", 0.0),
]


@pytest.mark.parametrize("completion, gold, expected", DAPO_CASES)
def test_dapo_score_matches_verl(completion, gold, expected):
    assert dapo_score(completion, gold) == expected


@pytest.mark.parametrize("completion, gold, expected", MATH_CASES)
def test_math_reward_verdicts(completion, gold, expected):
    assert math_reward(["p"], [completion], [gold]) == [expected]


def test_table_sizes():
    assert len(DAPO_CASES) + len(MATH_CASES) >= 40


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("x = \\$1,000", "1000"),
        ("10 \\text{ cm}^2", "10"),
        ("5 square units", "5"),  # unit words deleted
        ("an integer 5", "integer5"),  # "an " deleted; only the plural "integers" is a removed word
        ("\\frac{a}{b}", "\\frac{a}{b}"),
        ("\\textbf{12}", "12"),
        ("\\overline{3}", "3"),
        ("1,2", "12"),  # upstream quirk: a comma-list of digits collapses
        ("(1, 2)", "(1,2)"),
        ("$\\frac12$ units", "\\frac{1}{2}"),
        ('"7"', "7"),
    ],
)
def test_normalize_final_answer(raw, expected):
    assert normalize_final_answer(raw) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so \\boxed{\\frac{1}{2}} and \\boxed{3}", "3"),
        ("\\boxed{\\left\\{ x > 0 \\right.}", "\\left\\{ x > 0 \\right."),  # unpaired escaped brace
        ("\\boxed {7}", "7"),
        ("\\boxed 5$ more", "5"),
        ("\\fbox{a} then \\boxed{b}", "b"),
        ("\\boxed{b} then \\fbox{a}", "a"),
        ("\\boxedfoo \\boxed{4} \\boxed", "4"),  # not-a-box commands are skipped
        ("Answer: $12$\n\nDone.", "$12$"),
        ("Answer: \\boxed{9}", "9"),
        ("**Answer:** 3", "3"),
        ("Answer: **", None),
        ("nothing", None),
        ("\\boxed{unclosed", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_last_boxed_keeps_raw_content():
    assert last_boxed("\\boxed{ 5 }") == " 5 "
    assert last_boxed("\\boxed{\\\\}") == "\\\\"


def test_normalize_answer_is_stricter_than_dapo():
    assert normalize_final_answer("2a + b") == normalize_final_answer("2 + b")
    assert normalize_answer("2a + b") != normalize_answer("2 + b")
    assert normalize_answer("a triangle") == normalize_answer("triangle")


def test_rewards_take_trl_conversational_completions():
    completions = [[{"role": "assistant", "content": "Answer: 4"}]]
    assert math_reward(["p"], completions, ["4"]) == [1.0]
    assert dapo_reward(["p"], completions, ["4"]) == [1.0]


def test_numeric_ground_truth():
    assert math_reward(["p"], ["\\boxed{34}"], [34]) == [1.0]
    assert dapo_reward(["p"], ["Answer: 34"], [34]) == [1.0]


def test_is_equivalent_off_the_main_thread():
    """math-verify's signal-based timeout fails off the main thread; there it must run without one."""
    out = {}
    t = threading.Thread(target=lambda: out.update(v=is_equivalent("0.5", "\\frac{1}{2}")))
    t.start()
    t.join(timeout=120)  # the bound only ends a broken test; the thread takes about a second
    assert out == {"v": True}


def test_is_equivalent_empty():
    assert not is_equivalent("", "")
    assert not is_equivalent("  ", "5")


_LATEX_BITS = st.sampled_from(
    [
        "\\boxed",
        "\\boxed{",
        "\\fbox",
        "{",
        "}",
        "\\{",
        "\\}",
        "\\",
        "$",
        "Answer:",
        "answer :",
        "**",
        "\n",
        " ",
        "\\frac",
        "\\text{",
        "=",
        "5",
        "a ",
        "\\dfrac{1}{2}",
        "\\boxed ",
        ".",
        ",",
    ]
)


@given(
    st.one_of(
        st.text(max_size=300), st.lists(st.one_of(_LATEX_BITS, st.text(max_size=5)), max_size=80).map("".join)
    )
)
def test_extract_answer_total_and_fast(text):
    # CPU time of this process: other processes on a busy machine do not count against the bound.
    t0 = time.process_time()
    answer = extract_answer(text)
    if answer is not None:
        normalize_answer(answer)
    normalize_final_answer(text)
    assert answer is None or (isinstance(answer, str) and answer == answer.strip() and answer)
    assert time.process_time() - t0 < 0.5


@pytest.mark.parametrize(
    "unit, reps",
    [
        ("\\boxed", 20_000),
        ("\\boxed \n", 20_000),
        ("\\boxed{", 20_000),
        ("Answer:\n", 20_000),
        ("\\text{", 20_000),
        ("\\overline{", 20_000),
        ("x", 50_000),
    ],
    ids=["boxed", "boxed-space", "boxed-open", "answer-lines", "text-open", "overline-open", "one-dollar"],
)
def test_degenerate_repetitions_are_linear(unit, reps):
    """Repetition loops must not hit the quadratic regexes of the upstream normalisation."""
    text = unit * reps + ("$" if unit == "x" else "")
    # CPU time of this process (5-70 ms here; a quadratic pass takes seconds of it), not wall time,
    # which a busy machine stretches.
    t0 = time.process_time()
    answer = extract_answer(text)
    normalize_answer(text if answer is None else answer)
    normalize_final_answer(text)
    assert time.process_time() - t0 < 1.0


_REGEX_BITS = st.sampled_from(
    ["\\text{", "\\textbf{", "\\overline{", "\\boxed{", "{", "}", "$", "\n", "x", " ", "\\"]
)


@given(st.lists(_REGEX_BITS, max_size=16).map("".join))
def test_linear_rewrites_equal_upstream_regexes(s):
    """The linear-time steps give exactly what verl's (quadratic) `re.sub` calls give."""
    assert _first_dollar_span(s) == re.sub(r"(.*?)(\$)(.*?)(\$)(.*)", "$\\3$", s)
    assert _unwrap(s, "\\text{") == re.sub(r"(\\text\{)(.*?)(\})", "\\2", s)
    assert _unwrap(s, "\\textbf{") == re.sub(r"(\\textbf\{)(.*?)(\})", "\\2", s)
    assert _unwrap(s, "\\overline{") == re.sub(r"(\\overline\{)(.*?)(\})", "\\2", s)
    assert _unwrap(s, "\\boxed{", greedy=True) == re.sub(r"(\\boxed\{)(.*)(\})", "\\2", s)
