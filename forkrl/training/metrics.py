"""Metrics sinks: one JSON line per step in `metrics.jsonl`, TensorBoard when it is installed, and
Weights & Biases when `train.wandb` asks for it; `GLOSSARY` explains every key of `metrics.jsonl`
(`forkrl metrics`, docs/metrics.md).

Weights & Biases (`pip install 'forkrl[wandb]'`): `train.wandb` is off (null or false) by default;
true logs to the project `forkrl`, any other string is the project's name. Every metrics row is logged
at its step, the run is named after the run folder, its config is the run's `config.yaml`, and its id
is kept in `RUN_DIR/wandb_id`, so a resumed run (`--resume`) continues the same wandb run. The
wandb files go to `WANDB_DIR` when it is set, else `RUN_DIR/wandb/`; `WANDB_MODE=offline` works as
for any wandb run. The trainer builds `MetricsLog(run_dir, tensorboard=...)`, so `MetricsLog` reads
`train.wandb` and the config from `RUN_DIR/config.yaml`, which the trainer writes before the first step.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import string
from pathlib import Path
from typing import Any

from forkrl.errors import ConfigError

WANDB_ID = "wandb_id"  # in the run folder: the wandb run id a resumed run logs to again
WANDB_DEFAULT_PROJECT = "forkrl"
_ID_CHARS = string.ascii_lowercase + string.digits


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None  # strict JSON has no NaN
    return v


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def wandb_project(value: Any) -> str | None:
    """`train.wandb` as a project name, or None when it is off.

    >>> [wandb_project(v) for v in (None, False, "false", True, "True", "my-runs")]
    [None, None, None, 'forkrl', 'forkrl', 'my-runs']
    """
    if value is None or value is False:
        return None
    if value is True:
        return WANDB_DEFAULT_PROJECT
    text = str(value).strip()
    if text.lower() in ("", "false", "0", "no", "off", "none", "null"):
        return None
    if text.lower() in ("true", "1", "yes", "on"):
        return WANDB_DEFAULT_PROJECT
    return text


def _read_run_config(run_dir: Path) -> dict | None:
    path = run_dir / "config.yaml"
    if not path.is_file():
        return None
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None


class _WandbSink:
    """One wandb run per run folder: its id in RUN_DIR/wandb_id, reused when the run resumes."""

    def __init__(self, run_dir: Path, project: str, config: dict | None, resuming: bool):
        try:
            import wandb
        except ImportError:
            raise ConfigError(
                f"train.wandb={project!r} needs the wandb package: pip install 'forkrl[wandb]' "
                "(or pip install wandb), or set train.wandb=false"
            ) from None
        id_path = run_dir / WANDB_ID
        run_id = id_path.read_text().strip() if resuming and id_path.is_file() else ""
        if not run_id:  # a new run (or an overwritten folder): a new wandb run
            run_id = "".join(secrets.choice(_ID_CHARS) for _ in range(8))  # as wandb's own ids
            id_path.write_text(run_id + "\n")
        # read now, not once per process as wandb's own settings are: each run its own folder
        wandb_dir = os.environ.get("WANDB_DIR") or str(run_dir)
        self.run = wandb.init(
            project=project,
            name=run_dir.resolve().name,
            id=run_id,
            resume="allow",
            config=config,
            dir=wandb_dir,
        )

    def log(self, step: int, metrics: dict) -> None:
        # A step logged before a resume's checkpoint was cut back is refused by wandb (steps only go
        # up); forkrl's resume is bit-identical, so the values it keeps are the same ones.
        self.run.log({k: v for k, v in metrics.items() if _number(v)}, step=step)

    def close(self) -> None:
        self.run.finish()


class MetricsLog:
    def __init__(self, run_dir: Path, tensorboard: bool = True, wandb: Any = "config"):
        """`wandb`: a project name, true/false, or "config" (the default): `train.wandb` of RUN_DIR/config.yaml."""
        run_dir = Path(run_dir)
        self.path = run_dir / "metrics.jsonl"
        resuming = self.path.is_file() and self.path.stat().st_size > 0  # a resume keeps step 0 at least
        config = _read_run_config(run_dir)
        if wandb == "config":
            wandb = ((config or {}).get("train") or {}).get("wandb")
        project = wandb_project(wandb)
        # wandb first: a missing package is refused before anything is written
        self._wandb = _WandbSink(run_dir, project, config, resuming) if project else None
        self._fh = open(self.path, "a", buffering=1)
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(run_dir / "tb"))
            except ImportError:
                self._tb = None

    def log(self, step: int, metrics: dict) -> None:
        self._fh.write(json.dumps({"step": step, **{k: _clean(v) for k, v in metrics.items()}}) + "\n")
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(step, metrics)

    def flush(self) -> None:
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def offset(self) -> int:
        """Bytes written so far: a checkpoint records it, and a resume truncates the log back to it."""
        return self._fh.tell()

    def close(self) -> None:
        if self._fh.closed:
            return
        self._fh.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.close()


def read_metrics(run_dir: str | Path) -> list[dict]:
    with open(Path(run_dir) / "metrics.jsonl") as fh:
        return [json.loads(line) for line in fh if line.strip()]


class NullLog:
    """`MetricsLog`'s interface, writing nothing: the sink of ranks other than 0 (rank 0 writes the metrics)."""

    def log(self, step: int, metrics: dict) -> None:
        pass

    def flush(self) -> None:
        pass

    def offset(self) -> int:
        return 0

    def close(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------- glossary

_FIRST = "over the step's first generation round (before dynamic sampling refills)"
_SEL = "over the selected tokens, mean over micro-batches"
_PPO = "PPO only (algorithm.advantage=gae)"

#: Every key of `metrics.jsonl`: (meaning, unit). docs/metrics.md is this table; a test fails when a
#: training writes a key that is not here.
GLOSSARY: dict[str, tuple[str, str]] = {
    # the row
    "step": ("RL step; 0 is the evaluation before training (its row has only eval_accuracy)", "step"),
    "eval_accuracy": (
        "greedy accuracy on the held-out set; only at step 0, every train.eval_every steps and the last "
        "step; null when the evaluation was interrupted",
        "fraction",
    ),
    # rollout and rewards (forkrl/training/rollouts.py)
    "reward_mean": (f"mean reward of the completions, overlong penalty included, {_FIRST}", "reward"),
    "accuracy": (
        f"share of completions whose verifier score counts as correct (>= forkrl.rewards.CORRECT), {_FIRST}",
        "fraction",
    ),
    "response_len_mean": (f"mean completion length, {_FIRST}", "tokens"),
    "response_len_max": (f"longest completion, {_FIRST}", "tokens"),
    "truncated_frac": (
        f"share of completions cut at the length budget (rollout.max_new_tokens), {_FIRST}",
        "fraction",
    ),
    "ds_rounds": ("generation rounds this step took (more than 1: dynamic sampling refilled)", "count"),
    "kept_groups": (
        "prompt groups trained on, after dynamic sampling dropped those whose rewards were all equal "
        "(at most rollout.prompts_per_step)",
        "groups",
    ),
    "time_rollout": ("time generating completions, all rounds", "s"),
    "time_reward": ("time computing rewards, all rounds", "s"),
    "reward_nonfinite": (
        "completions whose reward was NaN or inf (scored 0 with reward.on_error=default)",
        "count",
    ),
    "reward_timeouts": (
        "completions whose reward ran past reward.timeout (scored 0); reward.isolate=true only",
        "count",
    ),
    "reward_errors": (
        "completions whose reward function raised (scored 0); reward.isolate=true only",
        "count",
    ),
    "reward_crashes": (
        "completions whose reward worker process died (scored 0); reward.isolate=true only",
        "count",
    ),
    "reward_skipped": (
        "completions given the default reward without running, because every probe row of their call "
        "timed out or crashed; reward.isolate=true only",
        "count",
    ),
    # scoring pass (forkrl/training/trainer.py)
    "time_scoring": (
        "time of the scoring pass (old log-probs and entropies; ~0 with rollout.reuse_logprobs)",
        "s",
    ),
    "entropy_mean": ("mean token entropy of the trained completions over all their valid tokens", "nats"),
    "entropy_adv_mean": (
        "algorithm.entropy_adv_alpha > 0: mean shaping term min(alpha H, |A| / kappa) added to the "
        "advantage, over every rank's valid tokens",
        "adv",
    ),
    "entropy_adv_capped_frac": (
        "algorithm.entropy_adv_alpha > 0: share of valid tokens where the |A| / kappa cap bound the term",
        "fraction",
    ),
    "tokens": ("valid response tokens in the trained batch (all ranks)", "tokens"),
    "time_step": ("wall time of the whole RL step (evaluation excluded)", "s"),
    "tokens_per_s": ("tokens / time_step", "tokens/s"),
    # the actor's update (forkrl/core/losses.py, forkrl/training/update.py)
    "loss": (
        "the actor's loss (policy gradient + KL term), per optimizer step, mean over optimizer steps",
        "loss",
    ),
    "pg_loss": ("the policy-gradient (clipped surrogate) part of loss", "loss"),
    "kl": (
        "mean KL estimate (loss.kl_estimator) against the initial model; only with loss.kl_coef > 0",
        "nats",
    ),
    "kl_loss": ("loss.kl_coef x the aggregated KL: the KL part of loss; only with loss.kl_coef > 0", "loss"),
    "clip_frac_low": (
        f"share of tokens with A < 0 and ratio < 1 - loss.eps_low (clipped), {_SEL}",
        "fraction",
    ),
    "clip_frac_high": (
        f"share of tokens with A > 0 and ratio > 1 + loss.eps_high (clipped), {_SEL}",
        "fraction",
    ),
    "dual_clip_frac": (
        f"share of tokens where the dual clip (A < 0, ratio > loss.dual_clip) bounds the loss, {_SEL}",
        "fraction",
    ),
    "approx_kl": (f"(ratio - 1) - log ratio: KL(old || current policy) estimate, {_SEL}", "nats"),
    # the loss mode's own (loss.mode; forkrl/core/loss_modes.py, forkrl/core/cov_losses.py)
    "seq_clip_frac": (
        "gspo: share of sequences with a selected token whose sequence ratio s_i is clipped (A < 0 and "
        "s_i < 1 - loss.eps_low, or A > 0 and s_i > 1 + loss.eps_high), mean over micro-batches",
        "fraction",
    ),
    "seq_ratio_mean": (
        "gspo: mean sequence ratio s_i = exp(mean log ratio), over the sequences with a selected token, "
        "mean over micro-batches",
        "ratio",
    ),
    "cispo_clip_frac": (
        f"cispo: share of tokens whose importance weight the bounds clipped (verl's pg_clipfrac), {_SEL}",
        "fraction",
    ),
    "cov_mean": (
        "clip_cov / kl_cov: mean per-token covariance (A - mean A)(logp - mean logp), i.e. Cov(A, logp), "
        f"{_SEL}",
        "adv x nats",
    ),
    "cov_touched_frac": (
        "clip_cov: share of tokens detached (no gradient); kl_cov: share KL-penalised (the top "
        f"loss.cov_ratio by covariance); {_SEL}",
        "fraction",
    ),
    "cov_band_frac": (
        "clip_cov: share of tokens in the band (loss.clip_cov_lb < cov < loss.clip_cov_ub, ratio not "
        f"clipped), the candidates the detached tokens are drawn from, {_SEL}",
        "fraction",
    ),
    "cov_band_lb": ("clip_cov: the band's lower bound on the covariance (loss.clip_cov_lb)", "adv x nats"),
    "cov_band_ub": ("clip_cov: the band's upper bound on the covariance (loss.clip_cov_ub)", "adv x nats"),
    "cov_kth": (
        "kl_cov: the top-k threshold, the smallest covariance of a KL-penalised token (0 when none), "
        "mean over micro-batches",
        "adv x nats",
    ),
    "abs_log_ratio": (
        f"kl_cov: mean |log ratio|, the penalty's per-token KL (verl's ppo_kl for kl_cov), {_SEL}",
        "nats",
    ),
    "archer_clip_frac_high_entropy": (
        "archer: share of the high-entropy selected tokens (above their row's loss.archer_quantile) whose "
        "clipped surrogate binds (verl's pg_clipfrac, range loss.archer_high_eps_*), mean over micro-batches",
        "fraction",
    ),
    "archer_clip_frac_low_entropy": (
        "archer: the same over the low-entropy selected tokens (range loss.archer_low_eps_*)",
        "fraction",
    ),
    "archer_high_entropy_frac": (f"archer: share of tokens in the high-entropy class, {_SEL}", "fraction"),
    "archer_kl_high_entropy": (
        "archer: mean KL estimate over the high-entropy tokens of the KL scope (upstream's "
        "high_entropy_kl_loss); only with a KL coefficient > 0",
        "nats",
    ),
    "archer_kl_low_entropy": (
        "archer: mean KL estimate over the other tokens of the KL scope (upstream's low_entropy_kl_loss)",
        "nats",
    ),
    "valid_tokens": ("response tokens in the loss per optimizer step (mean over optimizer steps)", "tokens"),
    "selected_tokens": (
        "tokens that carry the gradient per optimizer step (mean over optimizer steps)",
        "tokens",
    ),
    "kept_frac": (
        "selected_tokens / valid_tokens: the share of tokens trained on (about selection.rho)",
        "fraction",
    ),
    "entropy_kept": ("mean entropy of the selected tokens (selection.entropy_source's entropies)", "nats"),
    "entropy_dropped": ("mean entropy of the valid tokens not selected", "nats"),
    "tau": (
        "the selection's entropy threshold (mean over selections when selection.scope is not batch); "
        "null for rules without one (random, all)",
        "nats",
    ),
    "grad_norm": (
        "global gradient norm before clipping (optim.grad_clip), mean over optimizer steps",
        "norm",
    ),
    "skipped_steps": ("optimizer steps skipped this RL step for NaN/inf gradients", "count"),
    "time_update": ("time of the actor's forward/backward/optimizer steps", "s"),
    "time_selection": ("time spent selecting tokens (part of time_update)", "s"),
    "lr": ("the actor's learning rate after this step's scheduler steps", "lr"),
    # PPO: the critic (forkrl/training/critic.py)
    "value_explained_var": (
        f"1 - Var(returns - values) / Var(returns) over valid tokens; {_PPO}",
        "fraction",
    ),
    "values_mean": (f"mean critic value over valid tokens; {_PPO}", "reward"),
    "values_std": (f"std of the critic values; {_PPO}", "reward"),
    "values_max": (f"largest critic value; {_PPO}", "reward"),
    "values_min": (f"smallest critic value; {_PPO}", "reward"),
    "returns_mean": (f"mean GAE return (the critic's target) over valid tokens; {_PPO}", "reward"),
    "returns_std": (f"std of the returns; {_PPO}", "reward"),
    "returns_max": (f"largest return; {_PPO}", "reward"),
    "returns_min": (f"smallest return; {_PPO}", "reward"),
    "adv_mean": (f"mean GAE advantage before whitening; {_PPO}", "reward"),
    "adv_std": (f"std of the advantages before whitening; {_PPO}", "reward"),
    "adv_max": (f"largest advantage before whitening; {_PPO}", "reward"),
    "adv_min": (f"smallest advantage before whitening; {_PPO}", "reward"),
    "kl_in_reward": (
        f"mean logp_old - logp_ref over valid tokens, the per-token KL penalised in the reward "
        f"(times algorithm.kl_in_reward); {_PPO}, with algorithm.kl_in_reward > 0",
        "nats",
    ),
    "time_critic_scoring": (f"time of the critic's value pass and the GAE; {_PPO}", "s"),
    "value_loss": (f"the critic's (clipped) value loss, mean over mini-batches; {_PPO}", "loss"),
    "value_clip_frac": (
        f"share of tokens where algorithm.value_clip bound the value loss; {_PPO}",
        "fraction",
    ),
    "value_grad_norm": (
        f"the critic's gradient norm before clipping, mean over optimizer steps; {_PPO}",
        "norm",
    ),
    "value_skipped_steps": (f"critic optimizer steps skipped for NaN/inf gradients; {_PPO}", "count"),
    "critic_lr": (f"the critic's learning rate; {_PPO}", "lr"),
    "time_critic_update": (f"time of the critic's update; {_PPO}", "s"),
}


#: Keys named after something the run chooses: (prefix, key as shown) -> (meaning, unit).
GLOSSARY_PATTERNS: dict[tuple[str, str], tuple[str, str]] = {
    ("reward/", "reward/NAME"): (
        f"mean unweighted reward of one of several rewards (reward.fn=a,b; NAME is its name), {_FIRST}",
        "reward",
    ),
}


def describe_key(key: str) -> tuple[str, str] | None:
    """(meaning, unit) of a metrics.jsonl key, or None when the glossary does not explain it."""
    if key in GLOSSARY:
        return GLOSSARY[key]
    for (prefix, _), entry in GLOSSARY_PATTERNS.items():
        if key.startswith(prefix) and len(key) > len(prefix):
            return entry
    return None


def _entries() -> dict[str, tuple[str, str]]:
    return {**GLOSSARY, **{shown: e for (_, shown), e in GLOSSARY_PATTERNS.items()}}


def glossary_markdown() -> str:
    """The glossary as a Markdown table (docs/metrics.md holds it)."""
    lines = ["| key | meaning | unit |", "|---|---|---|"]
    for k, (meaning, unit) in _entries().items():
        lines.append(f"| `{k}` | {meaning.replace('|', '/')} | {unit} |")
    return "\n".join(lines)


def format_glossary() -> str:
    """The glossary as plain text, one key a paragraph (what `forkrl metrics` prints)."""
    entries = _entries()
    width = max(map(len, entries))
    return "\n".join(f"{k:<{width}}  [{unit}] {meaning}" for k, (meaning, unit) in entries.items())


def format_row(row: dict) -> str:
    """One metrics row with each key's value, unit and meaning; keys the glossary lacks are said so."""
    width = max(map(len, row)) if row else 0
    out = []
    for k, v in row.items():
        meaning, unit = describe_key(k) or ("(not in the glossary)", "")
        shown = f"{v:.6g}" if isinstance(v, float) else json.dumps(v)
        out.append(f"{k:<{width}}  {shown:>12} {unit:<9} {meaning}")
    return "\n".join(out)


def explain_run(run_dir: str | Path) -> str:
    """The last row of RUN_DIR/metrics.jsonl, explained (and the last evaluation when that row has none)."""
    run_dir = Path(run_dir)
    if not (run_dir / "metrics.jsonl").is_file():
        raise FileNotFoundError(f"{run_dir}: no metrics.jsonl; is it a forkrl run folder?")
    rows = read_metrics(run_dir)
    if not rows:
        return f"{run_dir / 'metrics.jsonl'}: no rows yet"
    last = rows[-1]
    text = (
        f"{run_dir / 'metrics.jsonl'}: step {last.get('step')} (row {len(rows)} of {len(rows)})\n"
        + format_row(last)
    )
    if last.get("eval_accuracy") is None:
        evals = [r for r in rows if r.get("eval_accuracy") is not None]
        if evals:
            text += (
                f"\nlast evaluation: step {evals[-1]['step']}, eval_accuracy {evals[-1]['eval_accuracy']:.6g}"
            )
    return text
