"""`pick`: find the missing addend among candidates, trying them out in writing.

    prompt:      17+?=42 in 9,25,31,14:
    completion:  42-17=25;17+31=48x;17+25=42!#25<eos>

The chain of thought computes the difference, then tries candidates one by one (`x` = wrong,
`!` = right) and states the answer after `#`. The warm-start traces try the candidates in a
random order, so the warm-started model picks its first candidate at random: that choice is a
forking token with high entropy, and it is learnable from the prompt (the difference it has
just written). Under a completion budget that fits about two attempts, choosing well first is
what earns the reward, so RL on the forking tokens has something real to learn.
"""

from __future__ import annotations

import hashlib
import random
import re

from forkrl.tasks.base import Example

_ANSWER = re.compile(r"#(-?\d+)")


class PickTask:
    """Missing-addend search.

    Args:
        max_value: addends are drawn from 1..max_value (difficulty).
        n_candidates: number of candidates shown, exactly one of them correct (difficulty).
        test_fraction: share of the problem space reserved for the test split.
    """

    name = "pick"

    def __init__(self, max_value: int = 30, n_candidates: int = 4, test_fraction: float = 0.2):
        if max_value < n_candidates + 1:
            raise ValueError(f"pick: max_value={max_value} must exceed n_candidates={n_candidates}")
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"pick: test_fraction={test_fraction} must be in (0, 1)")
        self.max_value = max_value
        self.n_candidates = n_candidates
        self.test_fraction = test_fraction
        # Budget: the difference, one wrong attempt and the right one, written with
        # max_value-wide numbers ("41-19=22;" + "19+12=31x;" + "19+22=41!#22" = 31 for width 2).
        w = len(str(max_value))
        self.default_max_new_tokens = (3 * w + 3) + (3 * w + 4) + (4 * w + 4)

    def _split_of(self, a: int, b: int) -> str:
        # The split is a pure function of the (first addend, answer) pair: disjoint by construction,
        # and a test problem's arithmetic fact never appears in a training trace.
        h = hashlib.sha256(f"{self.name}:{a}+{b}".encode()).digest()
        return "test" if int.from_bytes(h[:8], "big") / 2**64 < self.test_fraction else "train"

    def _sample(self, rng: random.Random) -> Example:
        a = rng.randint(1, self.max_value)
        b = rng.randint(1, self.max_value)
        others = rng.sample([c for c in range(1, self.max_value + 1) if c != b], self.n_candidates - 1)
        cands = [b, *others]
        rng.shuffle(cands)
        prompt = f"{a}+?={a + b} in {','.join(map(str, cands))}:"
        return Example(prompt=prompt, answer=str(b), fields={"a": a, "target": a + b, "candidates": cands})

    def examples(self, split: str, n: int, seed: int = 0) -> list[Example]:
        """`n` seeded problems of `split` ("train" or "test"); repeats are allowed only when the split is small."""
        if split not in ("train", "test"):
            raise ValueError(f"pick: split must be 'train' or 'test', got {split!r}")
        rng = random.Random(f"{self.name}:{split}:{seed}")
        out: list[Example] = []
        while len(out) < n:
            ex = self._sample(rng)
            if self._split_of(ex.fields["a"], int(ex.answer)) == split:
                out.append(ex)
        return out

    def grade(self, completion: str, example: Example) -> float:
        """1.0 when the first `#N` in the completion names the right candidate, else 0.0.

        >>> t = PickTask(); ex = Example("3+?=8 in 4,5:", "5")
        >>> t.grade("8-3=5;3+5=8!#5", ex), t.grade("8-3=5;3+4=7x;3+5=8!", ex)
        (1.0, 0.0)
        """
        m = _ANSWER.search(completion)
        return 1.0 if m is not None and m.group(1) == example.answer else 0.0

    def trace(self, example: Example, rng: random.Random) -> str:
        """A correct solution that tries the candidates in a random order until it finds the answer."""
        a, t = example.fields["a"], example.fields["target"]
        order = list(example.fields["candidates"])
        rng.shuffle(order)
        steps = [f"{t}-{a}={t - a};"]
        for c in order:
            if a + c == t:
                steps.append(f"{a}+{c}={t}!#{c}")
                break
            steps.append(f"{a}+{c}={a + c}x;")
        return "".join(steps)


def pick_reward(prompts, completions, answer, **_fields) -> list[float]:
    """The `pick` grader as a TRL-style reward function (module level, so worker processes can import it).

    >>> pick_reward(["3+?=8 in 4,5:"] * 2, ["8-3=5;3+5=8!#5", "8-3=5;3+4=7x;"], answer=["5", "5"])
    [1.0, 0.0]
    """
    return [PickTask.grade(None, c, Example("", str(a))) for c, a in zip(completions, answer)]


def get_task(name: str, **kwargs):
    """Look up a built-in task by name (`forkrl.tasks.registry.get_task`)."""
    from forkrl.tasks.registry import get_task as lookup

    return lookup(name, **kwargs)
