"""Collecting one RL step's experience: prompts -> rollout -> rewards -> dynamic-sampling filter."""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import Tensor

from forkrl.config.sections import RewardConfig, RolloutConfig, SamplingConfig
from forkrl.core.sampling import dynamic_sampling_keep, overlong_penalty
from forkrl.rewards import RewardFn, call_reward, is_correct
from forkrl.rewards.pool import ON_ERROR, RewardError
from forkrl.rewards.registry import REWARD_LIMIT
from forkrl.rollout.base import Rollout
from forkrl.rollout.hf import generate
from forkrl.tasks.base import Example
from forkrl.training.dist import SINGLE, DistEnv, all_max, all_sum, shard
from forkrl.training.stopping import Abort


def draw_seed(seed: int, draw: int) -> int:
    """A 63-bit seed for the `draw`-th prompt of a run seeded `seed` (stable across processes).

    >>> draw_seed(0, 1) == draw_seed(0, 1) != draw_seed(0, 2)
    True
    """
    digest = hashlib.blake2b(f"forkrl:{seed}:{draw}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class PromptSampler:
    """Endless, seeded pass over a pool of examples, reshuffled each epoch; its position is checkpointable."""

    def __init__(self, pool: list[Example], seed: int = 0):
        if not pool:
            raise ValueError("the training set is empty: no prompts to sample")
        self.pool, self.seed, self.epoch, self.pos = pool, seed, 0, 0
        self._order = self._shuffle()

    def _shuffle(self) -> list[int]:
        order = list(range(len(self.pool)))
        random.Random(f"{self.seed}:{self.epoch}").shuffle(order)
        return order

    def take(self, n: int) -> list[Example]:
        out = []
        for _ in range(n):
            if self.pos == len(self._order):
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._shuffle()
            out.append(self.pool[self._order[self.pos]])
            self.pos += 1
        return out

    def take_seeded(self, n: int) -> tuple[list[Example], list[int]]:
        """`take(n)` and a sampling seed per drawn prompt, fixed by the run seed and the draw's position.

        Rollouts sampled with these seeds (`generate(prompt_seeds=...)`) do not depend on how the prompts
        are split into calls, so data-parallel ranks sample what a single process would.
        """
        first = self.epoch * len(self.pool) + self.pos
        seeds = [draw_seed(self.seed, first + i) for i in range(n)]
        return self.take(n), seeds

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.epoch, self.pos = state["seed"], state["epoch"], state["pos"]
        self._order = self._shuffle()


def _pad_cat(tensors: list[Tensor], value, left: bool) -> Tensor:
    width = max(t.shape[1] for t in tensors)
    out = []
    for t in tensors:
        pad = torch.full((t.shape[0], width - t.shape[1]), value, dtype=t.dtype, device=t.device)
        out.append(torch.cat([pad, t] if left else [t, pad], dim=1))
    return torch.cat(out, dim=0)


def empty_rollout(group_size: int, device=None) -> Rollout:
    """A rollout of no rows (one masked response column, so per-row reductions stay defined): a
    data-parallel rank that kept no group still joins the update's collectives."""
    z = torch.zeros(0, 2, dtype=torch.long, device=device)
    return Rollout(
        input_ids=z,
        attention_mask=z.clone(),
        prompt_len=1,
        response_ids=torch.zeros(0, 1, dtype=torch.long, device=device),
        response_mask=torch.zeros(0, 1, dtype=torch.bool, device=device),
        truncated=torch.zeros(0, dtype=torch.bool, device=device),
        texts=[],
        group_size=group_size,
        sampler_logp=torch.zeros(0, 1, device=device),
        sampler_entropy=torch.zeros(0, 1, device=device),
    )


def concat_rollouts(parts: list[Rollout], pad_id: int) -> Rollout:
    """Stack rollouts of several generation rounds (different prompt and response widths)."""
    if len(parts) == 1:
        return parts[0]
    P = max(r.prompt_len for r in parts)
    prompts = _pad_cat([r.input_ids[:, : r.prompt_len] for r in parts], pad_id, left=True)
    prompt_attn = _pad_cat([r.attention_mask[:, : r.prompt_len] for r in parts], 0, left=True)
    response = _pad_cat([r.response_ids for r in parts], pad_id, left=False)
    rmask = _pad_cat([r.response_mask for r in parts], False, left=False)
    has_sampler = all(r.sampler_logp is not None for r in parts)
    has_entropy = all(r.sampler_entropy is not None for r in parts)  # None from the vllm backend
    return Rollout(
        input_ids=torch.cat([prompts, response], dim=1),
        attention_mask=torch.cat([prompt_attn, rmask.long()], dim=1),
        prompt_len=P,
        response_ids=response,
        response_mask=rmask,
        truncated=torch.cat([r.truncated for r in parts]),
        texts=[t for r in parts for t in r.texts],
        group_size=parts[0].group_size,
        sampler_logp=_pad_cat([r.sampler_logp for r in parts], 0.0, left=False) if has_sampler else None,
        sampler_entropy=_pad_cat([r.sampler_entropy for r in parts], 0.0, left=False)
        if has_entropy
        else None,
    )


def select_rows(ro: Rollout, rows: Tensor) -> Rollout:
    idx = rows.tolist()

    def take(t):
        return None if t is None else t[rows]

    return Rollout(
        ro.input_ids[rows],
        ro.attention_mask[rows],
        ro.prompt_len,
        ro.response_ids[rows],
        ro.response_mask[rows],
        ro.truncated[rows],
        [ro.texts[i] for i in idx],
        ro.group_size,
        take(ro.sampler_logp),
        take(ro.sampler_entropy),
    )


def _zero_nonfinite(scores: Tensor, texts: list[str], on_error: str) -> int:
    """Set NaN / inf / absurd (beyond ±REWARD_LIMIT) rewards to 0 in place and count them, or raise
    `RewardError` (`on_error="raise"`)."""
    bad = ~torch.isfinite(scores) | (scores.abs() > REWARD_LIMIT)  # (B,)
    n = int(bad.sum())
    if n and on_error == "raise":
        i = int(bad.nonzero()[0, 0])
        raise RewardError(
            f"the reward returned {scores[i].item()} for completion {i} of {len(scores)} (ending "
            f"{texts[i][-80:]!r}); every reward must be a finite number within ±{REWARD_LIMIT:g}. reward.on_error=default "
            "counts it (reward_nonfinite) and scores it 0"
        )
    scores[bad] = 0.0
    return n


@dataclass
class Experience:
    rollout: Rollout
    examples: list[Example]  # one per group
    rewards: Tensor  # (B,) shaped rewards used for advantages
    scores: Tensor  # (B,) raw verifier rewards
    stats: dict = field(default_factory=dict)


def _agree_to_go_on(failed: RewardError | None, should_stop, env: DistEnv) -> None:
    """Every rank at the same point of a round: all go on, or all raise (collect's docstring)."""
    if all_max(int(failed is not None), env):
        raise failed or RewardError("the reward failed on another rank (its message is above)")
    if should_stop is not None and should_stop():
        raise Abort


def collect(
    model,
    tokenizer,
    sampler: PromptSampler,
    reward_fn: RewardFn,
    rollout: RolloutConfig,
    sampling: SamplingConfig,
    reward: RewardConfig,
    *,
    max_new_tokens: int,
    generate_fn: Callable[..., Rollout] | None = None,
    env: DistEnv = SINGLE,
    should_stop: Callable[[], bool] | None = None,
) -> Experience:
    """Generate, grade and (DAPO) keep only groups whose rewards differ, refilling up to
    `sampling.max_rounds` rounds, as the config's `rollout`, `sampling` and `reward` sections say
    (`max_new_tokens`: the run's completion budget).

    The first round's rewards are the on-policy estimate logged as the step's reward and accuracy.
    `generate_fn(prompts, n=, temperature=, top_p=, max_new_tokens=)` is the rollout backend
    (e.g. `forkrl.rollout.vllm.VLLMRollout`); None = the HF backend on `model`.

    Data-parallel (`env`): every rank draws the same prompts, samples and grades its contiguous block
    of groups, and learns every group's keep decision, so the ranks together keep exactly the groups
    one process would and stop after the same round. The returned experience holds this rank's
    kept groups (possibly none); the logged statistics are global.

    A NaN or infinite reward (a reward called in this process; `RewardPool` catches its own) counts
    in `stats["reward_nonfinite"]` and scores 0 with `on_error="default"`, and raises `RewardError`
    naming the completion with `reward.on_error="raise"`: the advantages refuse it anyway.

    Under torchrun the ranks agree after each round's rewards, so that they stop at the same point:
    when one rank's reward raised `RewardError`, every rank raises it; when ``should_stop()`` (a
    signal, `StopFlag.requested`) says so, every rank raises `Abort`. Nothing a checkpoint holds has
    changed yet there (forkrl.training.stopping).
    """
    prompts_per_step, group_size = rollout.prompts_per_step, rollout.group_size
    dynamic, max_rounds, on_error = sampling.dynamic, sampling.max_rounds, reward.on_error
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error={on_error!r}; allowed: {', '.join(ON_ERROR)}")
    # the HF backend (on the policy or a copy) samples each prompt from its own seed
    seeded = generate_fn is None or getattr(generate_fn, "seeded", False)
    if generate_fn is None:
        generate_fn = partial(generate, model, tokenizer)
    t_gen = t_rew = 0.0
    kept_ro: list[Rollout] = []
    kept_ex: list[Example] = []
    kept_r: list[Tensor] = []
    kept_s: list[Tensor] = []
    first: dict = {}
    rounds = 0
    n_kept = 0
    nonfinite = 0
    while n_kept < prompts_per_step and rounds < (max_rounds if dynamic else 1):
        rounds += 1
        examples, seeds = sampler.take_seeded(prompts_per_step)
        mine = shard(len(examples), env)  # this rank's groups
        examples, seeds = examples[mine.start : mine.stop], seeds[mine.start : mine.stop]
        t0 = time.perf_counter()
        ro = None
        if examples:
            ro = generate_fn(
                [e.prompt for e in examples],
                **({"prompt_seeds": seeds} if seeded else {}),
                n=group_size,
                temperature=rollout.temperature,
                top_p=rollout.top_p,
                max_new_tokens=max_new_tokens,
            )
        t1 = time.perf_counter()
        failed = None
        if ro is not None:
            try:
                scores = torch.tensor(
                    call_reward(reward_fn, examples, ro.texts, group_size), dtype=torch.float32
                )
                nonfinite += _zero_nonfinite(scores, ro.texts, on_error)
            except RewardError as e:
                if not env.enabled:
                    raise
                failed = e
        if env.enabled:
            _agree_to_go_on(failed, should_stop, env)
        if ro is not None:
            rewards = scores.clone()
            if reward.overlong_buffer > 0:
                rewards += overlong_penalty(
                    ro.lengths, max_new_tokens, reward.overlong_buffer, reward.overlong_factor
                )
            lengths, truncated = ro.lengths.float(), ro.truncated.float()
        else:
            scores = rewards = lengths = truncated = torch.zeros(0)
        t_rew += time.perf_counter() - t1
        t_gen += t1 - t0
        if rounds == 1:
            sums = all_sum(
                torch.tensor(
                    [
                        rewards.sum(),
                        is_correct(scores).float().sum(),
                        lengths.sum(),
                        truncated.sum(),
                        float(len(scores)),
                    ],
                    dtype=torch.float64,
                ),
                env,
            )
            count = max(1.0, float(sums[4]))
            first = {
                "reward_mean": float(sums[0]) / count,
                "accuracy": float(sums[1]) / count,
                "response_len_mean": float(sums[2]) / count,
                "response_len_max": all_max(int(lengths.max()) if len(lengths) else 0, env),
                "truncated_frac": float(sums[3]) / count,
            }
            names = getattr(reward_fn, "names", None)  # several rewards (forkrl.rewards.combined): each one
            if names:
                part = reward_fn.last_sums if ro is not None else [0.0] * len(names)
                t = all_sum(torch.tensor([*part], dtype=torch.float64), env)
                first.update({f"reward/{n}": float(v) / count for n, v in zip(names, t)})
        # DAPO filters on the verifier's score (verl: filter_groups.metric=acc), not the shaped reward.
        keep = torch.zeros(prompts_per_step, dtype=torch.long)
        if examples:
            keep[mine.start : mine.stop] = (
                dynamic_sampling_keep(scores, group_size)
                if dynamic
                else torch.ones(len(examples), dtype=torch.bool)
            ).long()
        keep = all_sum(keep, env)  # every rank now knows every group's decision
        taken = keep.nonzero().flatten()[: prompts_per_step - n_kept]  # global group indices
        n_kept += len(taken)
        groups = taken[(taken >= mine.start) & (taken < mine.stop)] - mine.start  # this rank's
        if len(groups) == 0:
            continue
        rows = (groups[:, None] * group_size + torch.arange(group_size)).flatten()
        kept_ro.append(select_rows(ro, rows))
        kept_ex += [examples[g] for g in groups.tolist()]
        kept_r.append(rewards[rows])
        kept_s.append(scores[rows])
    stats = {**first, "ds_rounds": rounds, "kept_groups": n_kept, "time_rollout": t_gen, "time_reward": t_rew}
    stats["reward_nonfinite"] = int(all_sum(torch.tensor([nonfinite], dtype=torch.float64), env)[0])
    if not kept_ro:
        return Experience(None, [], torch.zeros(0), torch.zeros(0), stats)
    return Experience(
        concat_rollouts(kept_ro, tokenizer.pad_token_id), kept_ex, torch.cat(kept_r), torch.cat(kept_s), stats
    )
