"""Several rewards with weights (TRL's `reward_funcs` + `reward_weights`), and a Hugging Face
sequence-classification model as a reward (TRL accepts a model path in `reward_funcs`).

`reward.fn=math,mypkg.style:score,model:/models/my-rm reward.weights=1.0,0.2,0.5` trains on
1.0 x math + 0.2 x score + 0.5 x the reward model's score; each part's mean over a step's first
rollout round is logged as `reward/<name>` (name: the registry name, the function's name, or
`model`). Each function part runs in its own `RewardPool` when `reward.isolate` (timeouts, crashes
and NaN counted per part, summed in the step's `reward_*` counters); a reward model runs in the
trainer's process, batched.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

MODEL_PREFIX = "model:"


def part_name(spec: str, fn: Callable) -> str:
    if spec.startswith(MODEL_PREFIX):
        return "model"
    return spec if ":" not in spec else getattr(fn, "__name__", spec.rsplit(":", 1)[-1])


class RewardModel:
    """`fn(prompts, completions) -> list[float]`: the logit of the first label of a local
    `AutoModelForSequenceClassification` on prompt + completion, as TRL scores a reward model
    (`logits[:, 0]` of the texts tokenised without special tokens, right-padded)."""

    def __init__(self, path: str | Path, *, device: str = "cpu", batch_size: int = 16):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.path, self.device, self.batch_size = str(path), device, batch_size
        if not Path(self.path).is_dir():
            raise ValueError(
                f"reward model {self.path!r} is not a folder; give a local Hugging Face checkpoint"
            )
        self.tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        self.model = AutoModelForSequenceClassification.from_pretrained(self.path, local_files_only=True)
        self.model.to(device).eval()
        if self.tokenizer.pad_token is None:  # batching needs one; the model finds the last real token by it
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.__name__ = "model"

    def __reduce__(self):  # to a worker process by path, not by pickling the weights
        return (RewardModel, (self.path,))

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **_) -> list[float]:
        import torch

        texts = [p + c for p, c in zip(prompts, completions)]
        out: list[float] = []
        with torch.no_grad():
            for i in range(0, len(texts), self.batch_size):
                enc = self.tokenizer(
                    texts[i : i + self.batch_size],
                    return_tensors="pt",
                    padding=True,
                    padding_side="right",
                    add_special_tokens=False,
                ).to(self.device)
                out += self.model(**enc).logits[:, 0].float().tolist()
        return out


class _SummedStats(Mapping):
    """The parts' pools' counters, summed, read live (the trainer compares them step to step)."""

    def __init__(self, pools):
        self._pools = pools

    def __getitem__(self, key):
        return sum(p.stats[key] for p in self._pools)

    def __iter__(self):
        return iter(self._pools[0].stats) if self._pools else iter(())

    def __len__(self):
        return len(self._pools[0].stats) if self._pools else 0


class WeightedRewards:
    """The weighted sum of several rewards; `names` and `last_sums` (each part's sum over the rows of
    the last call) let the trainer log each part."""

    def __init__(self, parts: Sequence[tuple[str, float, Callable]]):
        if not parts:
            raise ValueError("no rewards to combine")
        names = [n for n, _, _ in parts]
        seen: dict[str, int] = {}
        self.names = []
        for n in names:  # unique names for the log: math, math_2, ...
            seen[n] = seen.get(n, 0) + 1
            self.names.append(n if seen[n] == 1 else f"{n}_{seen[n]}")
        self.parts = list(parts)
        self.last_sums = [0.0] * len(parts)
        self.__name__ = "+".join(self.names)
        self.stats = _SummedStats([fn for _, _, fn in parts if hasattr(fn, "stats") and hasattr(fn, "close")])

    def __call__(self, prompts, completions, **fields) -> list[float]:
        total = [0.0] * len(completions)
        for i, (_, weight, fn) in enumerate(self.parts):
            values = [float(v) for v in fn(prompts, completions, **fields)]
            if len(values) != len(completions):
                raise ValueError(
                    f"reward {self.names[i]!r} returned {len(values)} values for {len(completions)}"
                )
            self.last_sums[i] = sum(v for v in values if math.isfinite(v))
            total = [t + weight * v for t, v in zip(total, values)]  # a NaN part makes the row NaN: counted
        return total

    def close(self) -> None:
        for _, _, fn in self.parts:
            if hasattr(fn, "close"):
                fn.close()
