r"""Math answer rewards: final-answer extraction, DAPO's normalisation and rule, math-verify equivalence.

Two reward functions in TRL's convention `(prompts, completions, answer, **fields) -> list[float]`:

- `math_reward` (1 / 0): the final answer is the last `\boxed{...}` / `\fbox{...}` / `\boxed x` or the last
  `Answer: ...` line, whichever comes later; it is right when its normalised string equals the ground
  truth's, or else when `math-verify` finds the two equivalent (fractions, decimals, LaTeX, intervals,
  sets, roots, units).
- `dapo_reward` (+1 / -1): DAPO's exact rule, as in verl's `verl/utils/reward_score/math_dapo.py`
  (`compute_score` with `strict_box_verify=False`): keep the last 300 characters, take the last
  `Answer: ...` line, normalise it and the ground truth with `normalize_final_answer`, compare strings.

math-verify bounds its own work with `signal.alarm`, which only works on the main thread, and its
`TimeoutException` is a `BaseException`. Some inputs (`9^{9^{9^{9}}}`) still run for its full timeout, and
a C-level computation cannot be interrupted at all; for training, wrap the reward in
`forkrl.rewards.pool.RewardPool`, which enforces a per-item timeout from outside the process.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Sequence
from typing import Any

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------
# DAPO (verl `verl/utils/reward_score/math_dapo.py`, itself adapted from Minerva / lm-evaluation-harness
# `hendrycks_math/utils.py`). The two tables and the order of the steps in `normalize_final_answer` are
# kept exactly, quirks included (`"a "` is deleted anywhere, `\dfrac` stays distinct from `\frac`,
# `"5."` stays distinct from `"5"`), so that `dapo_reward` gives the rewards DAPO trained with. Its five
# `re.sub` rewrites of `$...$`, `\text{}`, `\textbf{}`, `\overline{}` and `\boxed{}` are quadratic on long
# lines; `_first_dollar_span` and `_unwrap` give the same strings in linear time (checked by a
# differential fuzz against the regexes and verl's function).
# --------------------------------------------------------------------------------------------------

SUBSTITUTIONS: list[tuple[str, str]] = [
    ("an ", ""),
    ("a ", ""),
    (".$", "$"),
    ("\\$", ""),
    (r"\ ", ""),
    (" ", ""),
    ("mbox", "text"),
    (",\\text{and}", ","),
    ("\\text{and}", ","),
    ("\\text{m}", "\\text{}"),
]

REMOVED_EXPRESSIONS: list[str] = [
    "square",
    "ways",
    "integers",
    "dollars",
    "mph",
    "inches",
    "hours",
    "km",
    "units",
    "\\ldots",
    "sue",
    "points",
    "feet",
    "minutes",
    "digits",
    "cents",
    "degrees",
    "cm",
    "gm",
    "pounds",
    "meters",
    "meals",
    "edges",
    "students",
    "childrentickets",
    "multiples",
    "\\text{s}",
    "\\text{.}",
    "\\text{\ns}",
    "\\text{}^2",
    "\\text{}^3",
    "\\text{\n}",
    "\\text{}",
    r"\mathrm{th}",
    r"^\circ",
    r"^{\circ}",
    r"\;",
    r",\!",
    "{,}",
    '"',
    "\\dots",
]

#: verl's `is_correct_minerva` default `answer_pattern`; `\s*` may cross a newline ("Answer:\n5").
DAPO_ANSWER_PATTERN = re.compile(r"(?i)Answer\s*:\s*([^\n]+)")
#: verl's `compute_score` grades only the tail ("The longest answer in MATH-500 has 159 characters").
DAPO_TAIL_CHARS = 300
_INVALID = "[INVALID]"


def _first_dollar_span(s: str) -> str:
    r"""verl's `re.sub(r"(.*?)(\$)(.*?)(\$)(.*)", "$\\3$", s)` in linear time (the regex is quadratic).

    `.` stops at newlines, so the regex rewrites each line holding two or more `$` to its first `$...$`
    span ("The final answer is $5$. I hope it is correct." -> "$5$") and leaves other lines alone.
    """
    lines = s.split("\n")
    for k, line in enumerate(lines):
        parts = line.split("$", 2)
        if len(parts) == 3:
            lines[k] = f"${parts[1]}$"
    return "\n".join(lines)


def _unwrap(s: str, opener: str, greedy: bool = False) -> str:
    r"""verl's `re.sub(r"(\\text\{)(.*?)(\})", "\\2", s)` (lazy) or `(\\boxed\{)(.*)(\})` (greedy), linear.

    The regexes rescan the rest of the line from every opener that has no `}` after it: quadratic on
    repetition loops such as `\text{\text{\text{...`. Per line: lazy drops each opener and the next `}`;
    greedy drops the first opener and the last `}` of the line.
    """
    lines = s.split("\n")
    for k, line in enumerate(lines):
        if greedy:
            i, close = line.find(opener), line.rfind("}")
            if 0 <= i and close >= i + len(opener):
                lines[k] = line[:i] + line[i + len(opener) : close] + line[close + 1 :]
            continue
        out, pos = [], 0
        while (i := line.find(opener, pos)) >= 0:
            close = line.find("}", i + len(opener))
            if close < 0:  # no later opener can close either
                break
            out += [line[pos:i], line[i + len(opener) : close]]
            pos = close + 1
        lines[k] = "".join(out) + line[pos:]
    return "\n".join(lines)


def _normalize(final_answer: str, substitutions: Sequence[tuple[str, str]]) -> str:
    final_answer = final_answer.split("=")[-1]
    for before, after in substitutions:
        final_answer = final_answer.replace(before, after)
    for expr in REMOVED_EXPRESSIONS:
        final_answer = final_answer.replace(expr, "")
    final_answer = _first_dollar_span(final_answer)
    final_answer = _unwrap(final_answer, "\\text{")
    final_answer = _unwrap(final_answer, "\\textbf{")
    final_answer = _unwrap(final_answer, "\\overline{")
    final_answer = _unwrap(final_answer, "\\boxed{", greedy=True)
    # Shorthand TeX: \fracab -> \frac{a}{b}, \sqrta -> \sqrt{a}.
    final_answer = re.sub(r"(frac)([^{])(.)", "frac{\\2}{\\3}", final_answer)
    final_answer = re.sub(r"(sqrt)([^{])", "sqrt{\\2}", final_answer)
    final_answer = final_answer.replace("$", "")
    if final_answer.replace(",", "").isdigit():  # "1,000" -> "1000"; "1,2" -> "12" too (as upstream)
        final_answer = final_answer.replace(",", "")
    return final_answer.strip()


def normalize_final_answer(final_answer: str) -> str:
    r"""DAPO's (Minerva's) normalisation of a final answer, step for step as in verl.

    >>> normalize_final_answer(r"x = \$1,000")
    '1000'
    >>> normalize_final_answer(r"10 \text{ cm}^2")
    '10'
    >>> normalize_final_answer(r"The final answer is $\frac12$. I hope it is correct.")
    '\\frac{1}{2}'
    >>> normalize_final_answer(r"\dfrac{1}{2}")  # not rewritten to \frac: a mismatch in DAPO
    '\\dfrac{1}{2}'
    """
    return _normalize(final_answer, SUBSTITUTIONS)


def is_correct_minerva(solution: str, ground_truth: str) -> tuple[bool, str]:
    r"""verl's `is_correct_minerva`: last `Answer:` line, both sides normalised, strings compared.

    Returns (correct, normalised prediction); the prediction is `"[INVALID]"` when there is no
    `Answer:` line.

    >>> is_correct_minerva("so 12 apples.\nAnswer: 12 apples", "12")
    (False, '12apples')
    >>> is_correct_minerva("Answer: $12$", "12")
    (True, '12')
    """
    matches = DAPO_ANSWER_PATTERN.findall(solution)
    pred = normalize_final_answer(matches[-1] if matches else _INVALID)
    return pred == normalize_final_answer(ground_truth), pred


def dapo_score(completion: str, ground_truth: str) -> float:
    r"""DAPO's reward for one completion: +1.0 when `is_correct_minerva` on the last 300 characters, else -1.0.

    Matches `compute_score(solution_str, ground_truth)` of verl's `math_dapo.py` as released with DAPO
    (no `\boxed{}` fallback; later verl versions fall back to the last box when no `Answer:` line exists).

    >>> dapo_score("... so the sum is 34.\nAnswer: 34", "34")
    1.0
    >>> dapo_score(r"the sum is \boxed{34}", "34")
    -1.0
    """
    correct, _ = is_correct_minerva(completion[-DAPO_TAIL_CHARS:], str(ground_truth))
    return 1.0 if correct else -1.0


# --------------------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------------------

_BOX_COMMANDS = ("\\boxed", "\\fbox")


def _balanced(text: str, open_at: int) -> str | None:
    """Content of the brace group opening at `text[open_at] == "{"`; escaped braces don't count."""
    depth, j = 0, open_at
    while j < len(text):
        ch = text[j]
        if ch == "\\":
            j += 2  # `\{`, `\}` and `\\` are one token each
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[open_at + 1 : j]
        j += 1
    return None


_BOX_TOKEN = re.compile(r"[^\s$]+")


def _last_box(text: str) -> tuple[int, str] | None:
    """(start, content) of the last `\\boxed{..}`, `\\fbox{..}` or `\\boxed x`; None if the last is cut off."""
    pos = {cmd: text.rfind(cmd) for cmd in _BOX_COMMANDS}
    while True:
        cmd = max(pos, key=pos.__getitem__)
        start = pos[cmd]
        if start < 0:
            return None
        pos[cmd] = text.rfind(cmd, 0, start)  # the next candidate of this command (the others stay valid)
        j = start + len(cmd)
        while j < len(text) and text[j] == " ":
            j += 1
        if j < len(text) and text[j] == "{":
            content = _balanced(text, j)
            return None if content is None else (start, content)  # an unclosed last box: truncated
        if j > start + len(cmd):  # `\boxed 5`: one token, up to whitespace or `$`
            m = _BOX_TOKEN.match(text, j)
            if m:
                return start, m.group(0)
        # `\boxedfoo`, `\fboxsep`, a bare `\boxed` at the end: look further back


def last_boxed(text: str) -> str | None:
    r"""Content of the last `\boxed{...}` (nested braces), `\fbox{...}` or `\boxed x` (one token).

    >>> last_boxed(r"so \boxed{\frac{1}{2}} and \boxed{3}")
    '3'
    >>> last_boxed(r"\boxed{\frac{1}{2}}")
    '\\frac{1}{2}'
    >>> last_boxed(r"thus $\boxed 5$.")
    '5'
    >>> last_boxed(r"\fbox{x+1}"), last_boxed(r"\boxed{\{1, 2\}}"), last_boxed(r"\boxed{12")
    ('x+1', '\\{1, 2\\}', None)
    """
    found = _last_box(text)
    return None if found is None else found[1]


def _last_answer_line(text: str) -> tuple[int, str] | None:
    last = None
    for last in DAPO_ANSWER_PATTERN.finditer(text):  # noqa: B007 - only the last match is wanted
        pass
    if last is None:
        return None
    # "**Answer:** 5" (markdown bold) leaves "** 5" after the colon.
    return last.start(), last.group(1).strip().strip("*").strip()


def extract_answer(text: str) -> str | None:
    r"""The final answer of a completion: the last box or `Answer:` line, whichever starts later.

    >>> extract_answer(r"First \boxed{3}. On reflection:\nAnswer: $\frac{1}{2}$")
    '$\\frac{1}{2}$'
    >>> extract_answer(r"**Answer:** \boxed{7}")
    '7'
    >>> extract_answer("no final answer here") is None
    True
    """
    box, line = _last_box(text), _last_answer_line(text)
    best = max((c for c in (box, line) if c is not None), default=None, key=lambda c: c[0])
    if best is None:
        return None
    answer = best[1].strip()
    return answer or None


_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")


def final_answer(text: str) -> str | None:
    r"""A lenient final answer: the last box or `Answer:` line (`extract_answer`) if there is one, else
    the last number in the text (thousands separators dropped), as GSM8K-style graders read it.

    >>> final_answer(r"so \boxed{12}, not 13"), final_answer("7 + 5 = 12. The answer is 1,012."), final_answer("none")
    ('12', '1012', None)
    """
    boxed = extract_answer(text)
    if boxed is not None:
        return boxed
    last = None
    for last in _NUMBER.finditer(text):  # noqa: B007 - only the last match is wanted
        pass
    return None if last is None else last.group(0).replace(",", "")


# --------------------------------------------------------------------------------------------------
# Equivalence
# --------------------------------------------------------------------------------------------------

_ARTICLE = re.compile(r"\b(?:an?|the)\s+(?=[A-Za-z])")
_LATEX_NOISE = re.compile(r"\\left\b|\\right\b|\\!|\\displaystyle\b")


def normalize_answer(answer: str) -> str:
    r"""The string key `math_reward` compares first: DAPO's rules without their false matches.

    DAPO deletes "a " and "an " anywhere, so "2a + b" and "2 + b" normalise alike; here only whole-word
    articles before a word go ("a triangle" -> "triangle"). On top of DAPO: `\dfrac`/`\tfrac` -> `\frac`,
    `\left`/`\right`/`\!` dropped, a trailing period dropped.

    >>> normalize_answer(r"\dfrac{1}{2}."), normalize_answer(r"\$1,000"), normalize_answer("2a + b")
    ('\\frac{1}{2}', '1000', '2a+b')
    """
    s = answer.strip().strip("*").strip()
    s = _ARTICLE.sub("", s)
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    s = _LATEX_NOISE.sub("", s)
    s = _normalize(s, SUBSTITUTIONS[2:])  # the two bare-article substitutions are the false matches
    return s.rstrip(".").strip()


def _math_verify_equal(pred: str, gold: str, timeout: int | None) -> bool:
    try:
        from math_verify import parse, verify
        from math_verify.errors import TimeoutException
    except ImportError as e:  # a dependency of forkrl: without it `\frac{1}{2}` vs 0.5 would score 0
        raise ImportError(
            f"the math reward needs math-verify ({e}); it is a dependency of forkrl: "
            "pip install 'math-verify>=0.7'"
        ) from None
    # signal.alarm exists only on the main thread; elsewhere the caller (RewardPool) bounds the time.
    if threading.current_thread() is not threading.main_thread():
        timeout = None
    if timeout is None:  # deliberate (the pool's timeout, or the warm-up): math-verify's warning about it
        # would print twice per worker process and evaluation ("Timeout is disabled ...")
        import math_verify.grader
        import math_verify.parser

        math_verify.parser.TIMEOUT_WARNING_SHOWN = math_verify.grader.TIMEOUT_WARNING_SHOWN = True

    def wrap(s: str) -> str:
        return s if ("$" in s or "\\(" in s or "\\[" in s) else f"${s}$"

    try:
        gold_parsed = parse(wrap(gold), parsing_timeout=timeout)
        pred_parsed = parse(wrap(pred), parsing_timeout=timeout)
        if not gold_parsed or not pred_parsed:
            return False
        return bool(verify(gold_parsed, pred_parsed, timeout_seconds=timeout))  # gold first: not symmetric
    except (Exception, TimeoutException):  # TimeoutException is a BaseException
        log.debug("math-verify failed on pred=%.80r gold=%.80r", pred, gold, exc_info=True)
        return False


def is_equivalent(pred: str, gold: str, *, timeout: int | None = 5) -> bool:
    r"""Whether a predicted final answer equals the ground truth.

    Normalised strings first (`normalize_answer`), then `math-verify` (gold parsed as the reference),
    whose own per-step timeout is `timeout` seconds on the main thread and off elsewhere.

    >>> is_equivalent("0.5", r"\frac{1}{2}"), is_equivalent(r"(1, 2]", "(1,2]"), is_equivalent("3", "-3")
    (True, True, False)
    """
    if not pred.strip() or not gold.strip():
        return False
    key = normalize_answer(gold)
    if key and normalize_answer(pred) == key:
        return True
    return _math_verify_equal(pred, gold, timeout)


# --------------------------------------------------------------------------------------------------
# Reward functions (TRL convention)
# --------------------------------------------------------------------------------------------------


def _text(completion: Any) -> str:
    """A completion as text; TRL's conversational completions are lists of messages."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    return str(completion)


def score_answers(completions: list, answer: list, extract) -> list[float]:
    """1.0 per completion whose `extract`ed final answer is equivalent to its ground truth, else 0.0."""
    preds = (extract(_text(c)) for c in completions)
    return [1.0 if p is not None and is_equivalent(p, str(g)) else 0.0 for p, g in zip(preds, answer)]


def math_reward(prompts: list, completions: list, answer: list, **fields: Any) -> list[float]:
    r"""1.0 when the extracted final answer is equivalent to the ground truth, else 0.0.

    >>> math_reward(["p"] * 3, [r"so \boxed{\dfrac{1}{2}}", "Answer: 0.5", r"\boxed{2}"], ["1/2"] * 3)
    [1.0, 1.0, 0.0]
    """
    return score_answers(completions, answer, extract_answer)


def lenient_math_reward(prompts: list, completions: list, answer: list, **fields: Any) -> list[float]:
    r"""`math_reward` with a lenient extraction (`final_answer`): without a box or `Answer:` line, the
    last number of the completion is its answer (registered as `math_lenient`).

    >>> lenient_math_reward(["p"] * 3, ["So the answer is 12.", r"\boxed{12}", "12, no: 13"], ["12"] * 3)
    [1.0, 1.0, 0.0]
    """
    return score_answers(completions, answer, final_answer)


def _warm_up_math_verify() -> None:
    """Import math-verify and run its LaTeX parser and `verify` once: their first call builds the
    parser (1-2 s), which a `RewardPool` worker should pay at start-up, not inside a row's timeout."""
    _math_verify_equal(r"\frac{1}{2}", "0.5", timeout=None)


math_reward.warmup = _warm_up_math_verify  # called once per RewardPool worker, before it takes rows
lenient_math_reward.warmup = _warm_up_math_verify


def dapo_reward(prompts: list, completions: list, answer: list, **fields: Any) -> list[float]:
    r"""DAPO's +1 / -1 reward on the `Answer: ...` format (see `dapo_score`).

    >>> dapo_reward(["p"] * 3, ["Answer: 1,000 dollars", r"Answer: \dfrac{1}{2}", "12"], ["1000", r"\frac{1}{2}", "12"])
    [1.0, -1.0, -1.0]
    """
    return [dapo_score(_text(c), str(a)) for c, a in zip(completions, answer)]
