"""Rewards for the evaluation tests, in a module without heavy imports so reward workers start fast."""


def exact_match_reward(prompts, completions, answer, **_fields) -> list[float]:
    """1.0 when the completion is the answer (surrounding whitespace ignored), else 0.0."""
    return [1.0 if c.strip() == str(a).strip() else 0.0 for c, a in zip(completions, answer)]
