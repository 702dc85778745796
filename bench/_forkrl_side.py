"""forkrl side of bench/vs_trl.py: one `forkrl.train` run, timed per step; writes a JSON result.

    python bench/_forkrl_side.py SETTINGS_JSON OUT_JSON      (started by bench/vs_trl.py)

The `trl` preset gives TRL's selection conventions (per-micro-batch quantile threshold on the
current forward's entropy, loss over all completion tokens, no dual clip, no dynamic sampling); the
micro-batch is the whole 128-sequence batch, as on the TRL side. Evaluation (step 0 and the end,
8 problems) is outside the timed `time_step`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from vs_trl import Phases, StagePeaks, child_main, peak_rss_mib, pin_threads, rss_mib, run_profiled


def overrides(s: dict) -> list[str]:
    """The dotted config overrides that match the TRL side's GRPOConfig."""
    return [
        "preset=trl",
        f"model.path={s['model']}",
        "model.device=cpu",
        "model.dtype=float32",
        f"train.steps={s['steps']}",
        f"train.seed={s['seed']}",
        "train.eval_every=0",
        "train.eval_n=8",
        f"train.out_dir={s['workdir']}",
        "train.progress=false",
        "train.tensorboard=false",
        f"rollout.prompts_per_step={s['prompts_per_step']}",
        f"rollout.group_size={s['group_size']}",
        f"rollout.temperature={s['temperature']}",
        f"rollout.top_p={s['top_p']}",
        f"rollout.max_new_tokens={s['max_new_tokens']}",
        f"selection.rho={s['rho']}",
        f"loss.eps_low={s['eps_low']}",
        f"loss.eps_high={s['eps_high']}",
        "loss.kl_coef=0.0",
        "sampling.dynamic=false",
        f"sampling.overlong_filter={str(s['mask_truncated']).lower()}",
        f"optim.lr={s['lr']}",
        f"optim.beta1={s['beta1']}",
        f"optim.beta2={s['beta2']}",
        f"optim.weight_decay={s['weight_decay']}",
        "optim.warmup_steps=0",
        f"optim.grad_clip={s['grad_clip']}",
        "optim.mini_batches=1",
        f"optim.micro_batch_size={s['micro_batch_size']}",
    ] + (
        ["task.name=arith", "task.level=add1", "model.chat_template=true"] if s.get("task") == "arith" else []
    )


def _num(v) -> float:
    return float("nan") if v is None else float(v)  # metrics.jsonl writes NaN as null


def run(s: dict) -> dict:
    pin_threads(s["threads"])
    import torch

    import forkrl.rollout.lean as lean_mod
    import forkrl.training.step as step_mod
    import forkrl.training.trainer as trainer_mod
    from forkrl.config import Config, load_config

    extra = [f"train.threads={s['threads']}"] if hasattr(Config().train, "threads") else []
    cfg = load_config(None, overrides(s) + extra)
    phases = Phases()
    phases.install_torch_hooks()
    before: dict[str, float] = {}
    cpu: list[float] = []  # process CPU seconds from the start of collect to the end of update
    collect, update = step_mod.collect, step_mod.actor_update

    def collect_step(*args, **kwargs):
        # The first call starts step 1: the model is loaded and the step-0 evaluation is done.
        if not before:
            before.update(rss=rss_mib(), peak=peak_rss_mib())
        phases.new_step()
        cpu.append(time.process_time())
        return collect(*args, **kwargs)

    def update_step(*args, **kwargs):
        out = update(*args, **kwargs)
        cpu[-1] = time.process_time() - cpu[-1]
        return out

    step_mod.collect, step_mod.actor_update = collect_step, update_step
    # Peak RSS per stage of the step (sampled; see StagePeaks): sampling + rewards, the scoring pass
    # (when it runs), the selection plan, the update (forward, backward, optimizer).
    peaks = StagePeaks()
    for name, attr in (
        ("generate", "collect"),
        ("scoring", "score_rollout"),
        ("selection", "plan_selection"),
        ("update", "actor_update"),
    ):
        setattr(step_mod, attr, peaks.stage(name, getattr(step_mod, attr)))
    decode_info: dict = {}
    lean_init = lean_mod.LeanDecoder.__init__

    def lean_seen(self, *args, **kwargs):  # record what the sampler really ran with
        decode_info.update(lean_decoder=True, threads=torch.get_num_threads())
        return lean_init(self, *args, **kwargs)

    lean_mod.LeanDecoder.__init__ = lean_seen
    t0 = time.perf_counter()
    (run_dir, _), profile = run_profiled(s["profile"], lambda: trainer_mod.train(cfg))
    wall = time.perf_counter() - t0
    stage_peaks = peaks.close()
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r.get("step", 0) >= 1]
    if len(phases.steps) != len(rows) or len(cpu) != len(rows):
        raise RuntimeError(
            f"{len(rows)} steps logged but collect/update were seen {len(phases.steps)}/{len(cpu)} times: "
            "forkrl.training.trainer no longer calls them by module name; update bench/_forkrl_side.py"
        )
    steps = []
    for m, c, ph in zip(rows, cpu, phases.steps):
        upd = m.get("time_update", 0.0)
        fwd = upd - ph.get("backward", 0.0) - ph.get("optimizer", 0.0)
        parts = {
            "generate": m.get("time_rollout", 0.0),
            "reward": m.get("time_reward", 0.0),
            "prep_other": m.get("time_scoring", 0.0),  # advantages (+ scoring pass when not reused)
            "forward": fwd,
            "backward": ph.get("backward", 0.0),
            "optimizer": ph.get("optimizer", 0.0),
        }
        parts["other"] = m["time_step"] - sum(parts.values())
        steps.append(
            {
                "time_step": m["time_step"],
                "cpu_step": c,
                "reward": _num(m.get("reward_mean")),
                "kept_frac": _num(m.get("kept_frac")),
                "entropy": _num(m.get("entropy_mean")),
                "tau": _num(m.get("tau")),
                "response_len_mean": _num(m.get("response_len_mean")),
                "phases": parts,
            }
        )
    return {
        "side": "forkrl",
        "steps": steps,
        "rss_before_train_mib": before.get("rss", float("nan")),
        "peak_before_train_mib": before.get("peak", float("nan")),
        "run_wall_s": wall,
        "stage_peak_rss_mib": stage_peaks,
        "profile": profile,
        "checks": {
            "preset": cfg.preset,
            "selection": f"{cfg.selection.count}/{cfg.selection.scope}/{cfg.selection.entropy_source}",
            "selective_head": cfg.model.selective_head,
            "reuse_sampler_logprobs": cfg.rollout.reuse_logprobs,
            "reuse_entropy": cfg.selection.reuse_entropy,  # first mini-batch: the sampler's entropies
            "normalizer": cfg.loss.normalizer,
            "decode": decode_info,
        },
    }


if __name__ == "__main__":
    child_main(run)
