"""Rewards for the evaluation tests, in a module without heavy imports so reward workers start fast."""


def exact_match_reward(prompts, completions, answer, **_fields) -> list[float]:
    """1.0 when the completion is the answer (surrounding whitespace ignored), else 0.0."""
    return [1.0 if c.strip() == str(a).strip() else 0.0 for c, a in zip(completions, answer)]


def nan_for_odd_lengths(prompts, completions, **_fields) -> list[float]:
    """NaN for a completion of odd length, else its length parity: a reward that sometimes breaks."""
    return [float("nan") if len(c) % 2 else 1.0 for c in completions]
