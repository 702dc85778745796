"""The RL loop as an object: `Trainer` builds a run (`forkrl.training.setup`), steps it
(`forkrl.training.step.rl_step`), evaluates, checkpoints and finishes it.

`forkrl train`, `forkrl.train(...)` and `train(cfg)` below are thin wrappers over `Trainer(...).train()`.
"""

from __future__ import annotations

import contextlib
import copy
import json
import random
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch

from forkrl.config import Config, load_config
from forkrl.errors import TrainingError
from forkrl.models.loading import resolve_device
from forkrl.rewards.pool import FAILURES as REWARD_FAILURES
from forkrl.rewards.pool import RewardError
from forkrl.training.checkpoint import latest_checkpoint, save_checkpoint
from forkrl.training.components import evaluate_held_out, save_final, settings_from  # noqa: F401
from forkrl.training.dist import (
    all_max,
    barrier,
    broadcast_object,
    full_model_state,
    init_distributed,
    rank_device,
)
from forkrl.training.health import collapse, count_streaks, failure
from forkrl.training.memory import set_mmap_threshold
from forkrl.training.metrics import MetricsLog, NullLog
from forkrl.training.progress import TrainProgress
from forkrl.training.run_folder import RunLock, prepare_new
from forkrl.training.setup import Run, TrainState, build_run, given_objects  # noqa: F401  (Run: for tests)
from forkrl.training.step import decoding, sync_sampler
from forkrl.training.step import rl_step as _rl_step
from forkrl.training.stopping import Abort, StopFlag, TrainingInterrupted


class Trainer:
    """One RLVR run: built at construction, then stepped (`step`) or run to the end (`train`).

    Args:
        config: a `forkrl.Config`, a list of dotted overrides (`["selection.rho=0.1"]`), a dict of
            sections (`{"selection": {"rho": 0.1}}`), or None for the defaults (`forkrl config`).
        model: a `transformers` causal LM object (trained in place, moved to the config's `model.device`,
            in its own dtype; with `model.lora_rank` wrapped in adapters, `trainer.model`) or a model
            folder / `.gguf` file (then `model.path`); None: `model.path`.
        tokenizer: the model object's tokenizer (a folder brings its own).
        train_dataset, eval_dataset: a `datasets.Dataset`, a list of dicts (`prompt` as a string or chat
            messages, `answer`; `data.prompt_field`/`data.answer_field` name other columns), or a path
            (`data.path`/`data.eval_path`). None: the data file of the config, or its built-in task.
        reward_funcs: a callable `(prompts, completions, **row_fields) -> list[float]` (TRL's
            convention), a name of a built-in reward (`math`, `dapo`, ...), or a list of them, summed
            with `reward_weights` (default 1 each; each part is logged). None: `reward.fn`.
        callbacks: callables `callback(step, metrics)` called after each step with its metrics.
        resume, overwrite: continue the run in `train.out_dir`, or replace it (a folder holds one run).

    The constructor loads everything and measures the held-out accuracy at step 0. Use it as a context
    manager, or call `close()`: that ends the reward workers and releases the run folder's lock.
    SIGINT/SIGTERM during a call stop at the next safe point and raise `TrainingInterrupted` after
    writing a checkpoint (`forkrl.training.stopping`).
    """

    def __init__(
        self,
        config=None,
        *,
        model=None,
        tokenizer=None,
        train_dataset=None,
        eval_dataset=None,
        reward_funcs=None,
        reward_weights=None,
        callbacks=(),
        resume: bool = False,
        overwrite: bool = False,
        checkpoint_hook=None,
    ):
        _refuse_in_a_reward_worker()
        cfg = _as_config(config)
        given = given_objects(
            cfg, model, tokenizer, train_dataset, eval_dataset, reward_funcs, reward_weights
        )
        self.cfg, self.run_dir, self.callbacks = cfg, Path(cfg.train.out_dir), list(callbacks)
        self._hook = checkpoint_hook  # fault injection for tests (save_checkpoint's before_rename)
        self._closed = self._finished = False
        self._depth, self._bar = 0, None  # nested calls under one signal handler; train()'s progress bar
        self._stack, self._log = ExitStack(), NullLog()
        _process_settings(cfg)
        device = resolve_device(cfg.model.device)
        self.env = env = init_distributed(device)  # torchrun: a rank per process
        device = rank_device(device, env)  # under torchrun: this rank's GPU
        if env.enabled:
            self._stack.callback(_destroy_process_group)
        lock = RunLock(self.run_dir) if env.main else None
        if lock is not None:
            self._stack.callback(lock.release)
        self._services = self._stack.enter_context(ExitStack())  # the reward pool, the vLLM engine
        self._stop = StopFlag(can_abort=not env.enabled)
        try:
            with self._signals():
                self.run, self.state, ckpt = build_run(
                    cfg,
                    env,
                    device,
                    lock,
                    self._stop,
                    self._services,
                    resume=resume,
                    overwrite=overwrite,
                    given=given,
                )
                self._start(ckpt, created=env.main and not resume)
        except Abort:  # a signal during set-up or the first evaluation
            self.close()
            raise TrainingInterrupted(self._stop.signum, None, self.run_dir, resumable=resume) from None
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------------------------ the public calls

    @property
    def model(self):
        return self.run.model

    @property
    def tokenizer(self):
        return self.run.tokenizer

    @property
    def global_step(self) -> int:
        """The last finished step (0 before the first)."""
        return self.state.step

    def step(self) -> dict:
        """One RL step (rollouts, rewards, update; the evaluation and checkpoint when due); its metrics."""
        self._check_open(stepping=True)
        if self.state.step >= self.cfg.train.steps:
            raise TrainingError(
                f"the run has done its train.steps={self.cfg.train.steps} steps; give a larger train.steps "
                "(and resume) to go on"
            )
        with self._signals():
            return self._step()

    def train(self) -> dict:
        """The remaining steps, then the final checkpoint, `final/` and `summary.json`; the summary."""
        self._check_open(stepping=True)
        cfg, state, env = self.cfg, self.state, self.env
        eval0 = state.history["eval_accuracy_last"]
        shown, main_dir = cfg.train.progress and env.main, self.run_dir if env.main else None  # train.log
        with (
            self._signals(),
            TrainProgress(cfg.train.steps, enabled=shown, eval0=eval0, run_dir=main_dir) as bar,
        ):
            self._bar = bar
            bar.update(state.step, {}, eval0)
            while state.step < cfg.train.steps:
                self._step()
            self._bar = None
            if state.saved != state.step:  # a new run with no steps writes its step-0 checkpoint too
                self._checkpoint()
        return self._finish()

    def evaluate(self) -> float | None:
        """Greedy accuracy on the held-out rows with the current weights (None without held-out rows)."""
        self._check_open()
        with self._signals():
            return self._evaluate()

    def save(self, directory: str | Path | None = None) -> Path:
        """A resumable checkpoint of the current step in the run folder; or, with `directory`, the model
        and tokenizer there as a plain Hugging Face checkpoint (LoRA: merged, the adapters beside it)."""
        self._check_open()
        if directory is None:  # the step's checkpoint, written now unless it is already there
            return (
                self._checkpoint() if self.state.saved != self.state.step else latest_checkpoint(self.run_dir)
            )
        directory = Path(directory)
        weights = full_model_state(self.run.model) if self.run.par.fsdp else None  # on every rank
        if self.env.main:
            save_final(self.run.model, directory, weights)
            self.run.tokenizer.save_pretrained(directory)
        barrier(self.env)
        return directory

    def close(self) -> None:
        """End the run's services (reward workers, the vLLM engine, the process group) and release the
        run folder. Idempotent; the model object stays usable."""
        if self._closed:
            return
        self._closed = True
        self._log.close()
        try:
            if self.env.enabled:
                barrier(self.env)
        finally:
            self._stack.close()

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------------------------ the loop

    def _start(self, ckpt, created: bool) -> None:
        """The metrics log and, for a new run, the held-out accuracy at step 0."""
        cfg, state = self.cfg, self.state
        if self.env.main:
            self._log = MetricsLog(self.run_dir, tensorboard=cfg.train.tensorboard)
        self._t_start = time.perf_counter() - state.history.get("wall_time_s", 0.0)
        # steps run by step() outside train(): their train.log lines, without a bar
        self._quiet = TrainProgress(
            cfg.train.steps, enabled=False, run_dir=self.run_dir if self.env.main else None
        )
        if ckpt is not None:
            return
        try:
            with self._stop.abortable():  # a signal here stops at once: there is nothing to keep yet
                eval0 = self._evaluate()
        except Abort:
            self._log.close()
            if created:  # a new run stopped before its first step leaves the folder as it found it
                prepare_new(self.run_dir, overwrite=True)
            raise
        self._log.log(0, {"eval_accuracy": eval0})
        state.history = {"eval_accuracy_start": eval0, "eval_accuracy_last": eval0}

    def _step(self) -> dict:
        cfg, run, state, stop, env = self.cfg, self.run, self.state, self._stop, self.env
        step = state.step + 1
        before = dict(run.pool_stats) if run.pool_stats is not None else {}
        dump = None
        if cfg.train.dump_every and step % cfg.train.dump_every == 0:
            dump = self.run_dir / "rollouts" / f"step_{step:06d}.jsonl"
        mark = state.mark()
        try:
            m = _rl_step(run, dump)
        except (Abort, RewardError) as e:  # before its first optimizer step: give the step up
            state.rewind(mark)
            path = self._checkpoint() if state.saved != state.step else latest_checkpoint(self.run_dir)
            self._dead()
            if isinstance(e, RewardError):  # the reward failed on every row, call after call
                raise RewardError(f"{e}; stopped after writing {path}: fix the reward, then resume") from None
            raise TrainingInterrupted(stop.signum, path, self.run_dir) from None
        state.step = step
        for key in REWARD_FAILURES:  # per step, from the pool's running counts (plus collect's own)
            if run.pool_stats is not None:
                m[f"reward_{key}"] = m.get(f"reward_{key}", 0) + run.pool_stats[key] - before[key]
        state.skipped_in_row, state.empty_in_row = count_streaks(
            m, step, state.skipped_in_row, state.empty_in_row
        )
        if (cfg.train.eval_every and step % cfg.train.eval_every == 0) or step == cfg.train.steps:
            try:  # a signal stops the evaluation (a hung reward) at once: the step stands without it
                with stop.abortable():
                    state.history["eval_accuracy_last"] = m["eval_accuracy"] = self._evaluate()
            except Abort:
                m["eval_accuracy"] = None
        self._log.log(step, m)
        (self._bar or self._quiet).update(step, m, state.history["eval_accuracy_last"])  # and train.log
        why = failure(run.model, env, cfg, step, state.skipped_in_row, state.saved, self.run_dir)
        if why is not None:
            self._dead()
            raise TrainingError(why)
        signum = all_max(stop.signum or 0, env)  # every rank stops at the same step
        if signum:
            path = self._checkpoint()
            self._dead()
            raise TrainingInterrupted(signum, path, self.run_dir)
        if cfg.train.save_every and step % cfg.train.save_every == 0 and step != cfg.train.steps:
            self._checkpoint()
        for callback in self.callbacks:
            callback(step, m)
        return m

    def _evaluate(self) -> float | None:  # on rank 0 (the others wait), with whole layers under FSDP2
        run = self.run
        sync_sampler(run)  # vLLM (rollout.backend=vllm) evaluates the current weights too
        # a rollout.dtype copy only samples: the held-out accuracy is the policy's own
        backend = run.rollout_backend if self.cfg.rollout.backend == "vllm" else None
        with run.par.gathered(), decoding(run.model, self.cfg):
            acc = (
                evaluate_held_out(
                    run.model,
                    run.tokenizer,
                    run.task,
                    run.held,
                    run.reward_fn,
                    run.max_new,
                    backend,
                )
                if self.env.main
                else 0
            )
        return broadcast_object(acc, self.env)

    def _checkpoint(self) -> Path:
        """A checkpoint of the last finished step: the weights and `TrainState.state_dict()`."""
        run, state, env = self.run, self.state, self.env
        state.history["wall_time_s"] = time.perf_counter() - self._t_start
        self._log.flush()
        saved = state.state_dict(metrics_offset=self._log.offset())
        weights = full_model_state(run.model) if run.par.fsdp else None  # gathered on every rank
        critic_weights = run.critic.full_weights() if run.critic is not None else None
        path = self.run_dir / "checkpoints" / f"step-{state.step:06d}"
        if env.main:
            path = save_checkpoint(
                self.run_dir,
                state.step,
                model=run.model,
                tokenizer=run.tokenizer,
                state=saved,
                keep=self.cfg.train.keep_checkpoints,
                before_rename=self._hook,
                critic=run.critic.model if run.critic is not None else None,
                state_dict=weights,
                critic_state_dict=critic_weights,
            )
        barrier(env)
        state.saved = state.step
        return path

    def _finish(self) -> dict:
        """`final/` (the trained model; LoRA: merged), `final-critic/` for PPO, and `summary.json`."""
        run, state, cfg = self.run, self.state, self.cfg
        self._log.close()
        self._finished = True
        weights = full_model_state(run.model) if run.par.fsdp else None  # collectives: on every rank
        critic_weights = run.critic.full_weights() if run.critic is not None else None
        history = state.history
        history.update(
            eval_accuracy_end=history["eval_accuracy_last"],
            steps=cfg.train.steps,
            wall_time_s=time.perf_counter() - self._t_start,
        )
        history["collapsed"] = collapse(
            history["eval_accuracy_start"], history["eval_accuracy_end"], cfg.optim.lr, len(run.held)
        )
        if self.env.main:
            save_final(run.model, self.run_dir / "final", weights)  # LoRA: and final-adapter/
            if run.critic is not None:
                run.critic.model.save_pretrained(self.run_dir / "final-critic", state_dict=critic_weights)
            run.tokenizer.save_pretrained(self.run_dir / "final")
            (self.run_dir / "summary.json").write_text(json.dumps(history, indent=2))
        return history

    # ------------------------------------------------------------------------------------ helpers

    @contextlib.contextmanager
    def _signals(self):
        """SIGINT/SIGTERM handled by the run's StopFlag while forkrl's code runs (outer call only)."""
        self._depth += 1
        try:
            if self._depth > 1:
                yield
            else:
                with self._stop:
                    yield
        finally:
            self._depth -= 1

    def _dead(self) -> None:
        """After an interruption or a failure: the metrics log is closed and no further step runs."""
        self._log.close()
        self._finished = True

    def _check_open(self, stepping: bool = False) -> None:
        if self._closed:
            raise TrainingError("this Trainer was closed; build a new one (resume=True continues its run)")
        if stepping and self._finished:
            raise TrainingError(
                f"the run in {self.run_dir} has ended; build a new Trainer (resume=True continues it)"
            )


def train(
    cfg: Config, reward_fn=None, *, resume: bool = False, overwrite: bool = False, checkpoint_hook=None
) -> tuple[Path, dict]:
    """Run RLVR as configured. Returns (run folder, final metrics).

    A run folder holds one run (`forkrl.training.run_folder`): a new run refuses a `cfg.train.out_dir`
    that holds another run's outputs unless `overwrite`, and the folder is locked while it runs. With
    `resume`, continue from the newest readable checkpoint there (model, optimizer, scheduler, RNG
    states, data position, metrics log), bit-identically on CPU; only the settings of
    `SAFE_ON_RESUME` may differ from those the run ran under. `checkpoint_hook` is a fault-injection
    hook for tests (see `save_checkpoint`).
    """
    with Trainer(
        cfg, reward_funcs=reward_fn, resume=resume, overwrite=overwrite, checkpoint_hook=checkpoint_hook
    ) as trainer:
        return trainer.run_dir, trainer.train()


# ---------------------------------------------------------------------------------------------- set-up


def _refuse_in_a_reward_worker() -> None:
    import multiprocessing as mp

    if mp.current_process().name.startswith("reward-"):  # set before a spawned child imports __main__
        raise RuntimeError(  # a script whose own reward's worker imports it again (forkrl.rewards.pool)
            "forkrl.train() was called in a reward worker process, which imported the script that "
            "defines the reward: put the call under `if __name__ == '__main__':`, or define the reward "
            "in a module of its own and import it into the script"
        )


def _as_config(config) -> Config:
    if config is None:
        return load_config()
    if isinstance(config, dict):
        return load_config(values=config)
    if isinstance(config, (list, tuple)):
        return load_config(overrides=list(config))
    if isinstance(config, Config):
        return copy.deepcopy(config)  # the caller's object stays as it was
    raise TypeError(f"config must be a Config, a list of overrides or a dict, got {type(config).__name__}")


def _process_settings(cfg: Config) -> None:
    """Seeds, torch threads and the allocator's mmap threshold: before anything large is built."""
    set_mmap_threshold(cfg.train.mmap_threshold_mib)  # forkrl.training.memory
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    random.seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)
    torch.manual_seed(cfg.train.seed)


def _destroy_process_group() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
