"""Math answer rewards: final-answer extraction and equivalence.

Extraction: the last `\\boxed{...}` (nested braces) or DAPO's `Answer: ...` line. Equivalence:
normalised string match, then `math-verify` when it is installed.
"""

from __future__ import annotations

import re

_ANSWER_LINE = re.compile(r"Answer\s*:\s*(.+)", re.IGNORECASE)


def last_boxed(text: str) -> str | None:
    r"""Content of the last \boxed{...}, with nested braces.

    >>> last_boxed(r"so \boxed{\frac{1}{2}} and \boxed{3}")
    '3'
    >>> last_boxed(r"\boxed{\frac{1}{2}}")
    '\\frac{1}{2}'
    """
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
    return None


def extract_answer(text: str) -> str | None:
    """The final answer of a completion: `\\boxed{}` first, else the last `Answer:` line."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    matches = _ANSWER_LINE.findall(text)
    return matches[-1].strip() if matches else None


def _norm(s: str) -> str:
    s = s.strip().strip("$").strip()
    s = re.sub(r"\\text\{([^}]*)\}", r"\1", s)
    s = s.replace(" ", "").replace("\\!", "").replace("dfrac", "frac").replace("tfrac", "frac")
    return s.rstrip(".")


def is_equivalent(pred: str, gold: str) -> bool:
    if _norm(pred) == _norm(gold):
        return True
    try:
        from math_verify import parse, verify
    except ImportError:
        return False
    try:
        return bool(verify(parse(f"${gold}$"), parse(f"${pred}$")))
    except BaseException:  # math-verify's TimeoutException is a BaseException
        return False


def math_reward(prompts, completions, answer, **_fields) -> list[float]:
    """1.0 when the extracted final answer equals the ground truth, else 0.0 (TRL-style reward)."""
    out = []
    for c, a in zip(completions, answer):
        pred = extract_answer(c)
        out.append(1.0 if pred is not None and is_equivalent(pred, str(a)) else 0.0)
    return out
