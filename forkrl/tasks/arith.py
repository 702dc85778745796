r"""`arith`: arithmetic asked in words, for pretrained instruct models (SmolLM2-135M-Instruct and up).

    prompt:      Maria has 7 apples and buys 5 more. How many apples does Maria have now?
                 Think step by step, then give the final answer as \boxed{N}.
    completion:  Maria starts with 7 apples and buys 5 more, so 7 + 5 = 12. The answer is \boxed{12}.

Levels (`task.level`), each a family of problems whose ground truth is one integer:

- `add1`: one-digit addition (0-9 + 0-9), asked in one of 12 wordings ("What is 7 plus 5?", "Add 7 and 5.");
- `add2`: two-digit addition (10-99 + 10-99), same wordings;
- `mul1`: one-digit multiplication (2-9 x 2-9), its own wordings;
- `word`: one-step word problems (a name, an object, gets more or gives some away), 1-20;
- `mix`: the four levels in turn.

The held-out split is a pure function of the arithmetic fact (level, operation, operands), so no
held-out fact is ever seen in training, whatever its wording; the test split lists every wording of
every held-out fact in a fixed, seeded order (`add1`: 18 facts x 12 wordings = 216 distinct prompts).

Grading (`arith_reward`, `forkrl.rewards.math.final_answer`): the last `\boxed{}` or `Answer:` line if
the completion has one, else its last number, compared with math-verify. Small instruct models seldom
box their answer ("So the answer is 12."): a strict box grader scores ~0 on SmolLM2-135M-Instruct and
leaves RL nothing to start from; the last number is the grader GSM8K's evaluations use. A completion
that ends on a wrong number is wrong, so listing numbers does not pay.
"""

from __future__ import annotations

import hashlib
import random

from forkrl.tasks.base import Example

INSTRUCTION = r"Answer with a short explanation, and put the final number in \boxed{}."

ADD_WORDINGS = (
    "What is {a} plus {b}?",
    "What is {a} + {b}?",
    "Add {a} and {b}.",
    "Compute {a} + {b}.",
    "What is the sum of {a} and {b}?",
    "Calculate {a} plus {b}.",
    "If you add {b} to {a}, what do you get?",
    "Find the sum: {a} + {b}.",
    "What number is {a} more than {b}?",
    "Work out {a} + {b}.",
    "How much is {a} plus {b}?",
    "What do you get when you add {a} and {b}?",
)
MUL_WORDINGS = (
    "What is {a} times {b}?",
    "What is {a} x {b}?",
    "Multiply {a} by {b}.",
    "Compute {a} * {b}.",
    "What is the product of {a} and {b}?",
    "Calculate {a} times {b}.",
    "What is {a} multiplied by {b}?",
    "Find the product: {a} x {b}.",
    "How much is {a} times {b}?",
    "Work out {a} * {b}.",
    "What do you get when you multiply {a} by {b}?",
    "What is {b} groups of {a}?",
)
NAMES = ("Maria", "Tom", "Aisha", "Ken", "Lena", "Omar", "Sara", "Jack", "Priya", "Leo", "Mia", "Ravi")
OBJECTS = ("apples", "books", "marbles", "pencils", "stickers", "cookies", "coins", "cards", "shells", "toys")
WORD_GAIN = (
    "{n} has {a} {o} and buys {b} more. How many {o} does {n} have now?",
    "{n} had {a} {o}. A friend gave {n} {b} more. How many {o} does {n} have?",
    "There are {a} {o} in a box. {n} puts in {b} more. How many {o} are in the box?",
)
WORD_LOSS = (
    "{n} has {a} {o} and gives away {b}. How many {o} does {n} have left?",
    "{n} had {a} {o} and lost {b} of them. How many {o} are left?",
    "There are {a} {o} in a box. {n} takes out {b}. How many {o} are still in the box?",
)
LEVELS = ("add1", "add2", "mul1", "word", "mix")


class ArithTask:
    """Arithmetic in words (see the module docstring).

    Args:
        level: add1, add2, mul1, word or mix.
        test_fraction: share of the arithmetic facts held out.
    """

    name = "arith"
    default_max_new_tokens = 128

    def __init__(self, level: str = "add1", test_fraction: float = 0.2):
        if level not in LEVELS:
            raise ValueError(f"task.level={level!r} is not an arith level; choose one of {', '.join(LEVELS)}")
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"arith: test_fraction={test_fraction} must be in (0, 1)")
        self.level = level
        self.test_fraction = test_fraction

    # -- the problem space ---------------------------------------------------------------------------

    @staticmethod
    def facts(level: str) -> list[tuple[str, int, int]]:
        """Every (operation, a, b) of a level, in a fixed order; `word` facts with `-` have a > b."""
        if level == "add1":
            return [("+", a, b) for a in range(10) for b in range(10)]
        if level == "add2":
            return [("+", a, b) for a in range(10, 100) for b in range(10, 100)]
        if level == "mul1":
            return [("*", a, b) for a in range(2, 10) for b in range(2, 10)]
        if level == "word":
            gains = [("+", a, b) for a in range(1, 21) for b in range(1, 21)]
            return gains + [("-", a, b) for a in range(2, 21) for b in range(1, a)]
        raise ValueError(f"arith: no facts for level {level!r}")

    def _split_of(self, level: str, fact: tuple[str, int, int]) -> str:
        op, a, b = fact
        h = hashlib.sha256(f"arith:{level}:{a}{op}{b}".encode()).digest()
        return "test" if int.from_bytes(h[:8], "big") / 2**64 < self.test_fraction else "train"

    def _wordings(self, level: str, op: str) -> int:
        if level == "word":
            return len(WORD_GAIN if op == "+" else WORD_LOSS) * len(NAMES) * len(OBJECTS)
        return len(MUL_WORDINGS if op == "*" else ADD_WORDINGS)

    def _example(self, level: str, fact: tuple[str, int, int], wording: int) -> Example:
        op, a, b = fact
        if level == "word":
            templates = WORD_GAIN if op == "+" else WORD_LOSS
            t, rest = divmod(wording, len(NAMES) * len(OBJECTS))
            n, o = divmod(rest, len(OBJECTS))
            question = templates[t].format(n=NAMES[n], o=OBJECTS[o], a=a, b=b)
        else:
            question = (MUL_WORDINGS if op == "*" else ADD_WORDINGS)[wording].format(a=a, b=b)
        value = a + b if op == "+" else a - b if op == "-" else a * b
        fields = {"level": level, "op": op, "a": a, "b": b, "wording": wording}
        return Example(prompt=f"{question} {INSTRUCTION}", answer=str(value), fields=fields)

    def _levels(self) -> list[str]:
        return ["add1", "add2", "mul1", "word"] if self.level == "mix" else [self.level]

    def examples(self, split: str, n: int, seed: int = 0) -> list[Example]:
        """`n` problems of `split`. "test": every wording of every held-out fact in a seeded order (the
        first `n`, distinct while `n` is within the split; the same list for the same seed). "train":
        drawn at random from the training facts and wordings."""
        if split not in ("train", "test"):
            raise ValueError(f"arith: split must be 'train' or 'test', got {split!r}")
        rng = random.Random(f"arith:{self.level}:{split}:{seed}")
        levels = self._levels()
        pools = {lv: [f for f in self.facts(lv) if self._split_of(lv, f) == split] for lv in levels}
        if split == "test":
            per_level = []
            for lv in levels:
                # word problems have 360 wordings per fact: a seeded few per fact keep the list varied
                cap = 12 if lv == "word" else None
                items = [
                    (lv, f, w)
                    for f in pools[lv]
                    for w in (
                        rng.sample(range(self._wordings(lv, f[0])), cap)
                        if cap
                        else range(self._wordings(lv, f[0]))
                    )
                ]
                rng.shuffle(items)
                per_level.append(items)
            order = [x for group in zip(*per_level) for x in group] if len(levels) > 1 else per_level[0]
            out = [self._example(lv, f, w) for lv, f, w in order[:n]]
            while len(out) < n:  # a split smaller than n repeats, in the same order
                out.extend(out[: n - len(out)])
            return out
        out = []
        for i in range(n):
            lv = levels[i % len(levels)]
            fact = rng.choice(pools[lv])
            out.append(self._example(lv, fact, rng.randrange(self._wordings(lv, fact[0]))))
        return out

    def grade(self, completion: str, example: Example) -> float:
        r"""1.0 when the final answer (the last box or `Answer:` line, else the last number) equals the
        ground truth, else 0.0.

        >>> t = ArithTask(); ex = Example("What is 7 plus 5?", "12")
        >>> t.grade(r"7 + 5 = 12, so \boxed{12}", ex), t.grade("7 + 5 = 12. The answer is 12.", ex)
        (1.0, 1.0)
        >>> t.grade("12? No: 7 + 5 = 13.", ex), t.grade(r"\boxed{13}, or 12", ex)
        (0.0, 0.0)
        """
        from forkrl.rewards.math import final_answer, score_answers

        return score_answers([completion], [example.answer], final_answer)[0]


def arith_reward(prompts, completions, answer, **_fields) -> list[float]:
    r"""The `arith` grader as a TRL-style reward function (registered as `arith`).

    >>> arith_reward(["p"] * 3, ["3 + 4 = 7.", r"\boxed{7}", "It is 8."], answer=["7"] * 3)
    [1.0, 1.0, 0.0]
    """
    from forkrl.rewards.math import final_answer, score_answers

    return score_answers(completions, answer, final_answer)


def _warm_up() -> None:
    from forkrl.rewards.math import _warm_up_math_verify

    _warm_up_math_verify()


arith_reward.warmup = _warm_up  # called once per RewardPool worker: math-verify's parser is slow to build
