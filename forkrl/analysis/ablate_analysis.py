"""The analyses `forkrl ablate` runs besides training: the starting model's entropy statistics and the
overlap of its forking positions with each final model's, on the study's held-out prompts formatted as
the runs' rollouts are (the tokenizer's chat template when `model.chat_template`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from forkrl.analysis.ablate_results import bootstrap_share_se, entropy_concentration, mean_std
from forkrl.config import load_config


def _analysis_setup(args: list[str]):
    """(starting model path, task, completion budget, temperature, chat template?) of a run's overrides."""
    from forkrl.models.loading import DEFAULT_MODEL
    from forkrl.tasks.registry import task_from_config

    cfg = load_config(None, args)
    if cfg.data.path:
        from forkrl.analysis.cli import FileTask

        task = FileTask(cfg.data.eval_path or cfg.data.path, max_new_tokens=cfg.rollout.max_new_tokens or 512)
    else:
        task = task_from_config(cfg.task)
    budget = cfg.rollout.max_new_tokens or task.default_max_new_tokens
    return (
        cfg.model.path or str(DEFAULT_MODEL),
        task,
        budget,
        cfg.rollout.temperature,
        cfg.model.chat_template,
    )


def _prompts(examples, tok, chat: bool):
    """Examples with their prompts as the runs' rollouts see them."""
    if not chat:
        return list(examples)
    import dataclasses

    from forkrl.tasks.files import apply_chat_template

    return [dataclasses.replace(e, prompt=apply_chat_template(tok, e.prompt)) for e in examples]


def load_quietly(path):
    from transformers.utils import logging

    from forkrl.models.loading import load_model_and_tokenizer

    logging.disable_progress_bar()  # one "Loading weights" bar per final model would bury the output
    return load_model_and_tokenizer(path, device="cpu")


def warmstart_entropy(args: list[str], out_dir: Path, *, n: int = 64, k: int = 4, rho: float = 0.2) -> dict:
    """Entropy statistics of k samples on each of n held-out prompts from the warm start (a dump, its
    `forkrl analyze stats` outputs in `out_dir`, and the concentration numbers)."""
    from forkrl.analysis.generate import generate_dump
    from forkrl.analysis.stats import write_stats

    path, task, budget, temperature, chat = _analysis_setup(args)
    model, tok = load_quietly(path)
    examples = _prompts(task.examples("test", n, seed=1234), tok, chat)
    out_dir.mkdir(parents=True, exist_ok=True)
    dump = generate_dump(
        model,
        tok,
        examples,
        out_dir / "dump.jsonl",
        n=k,
        temperature=temperature,
        max_new_tokens=budget,
        rho=rho,
        grade=task.grade,
        meta={"model": path, "task": task.name},
    )
    stats = write_stats(dump, out_dir, rho=rho, top=15)
    rows = [np.asarray(r["entropy"], np.float64)[np.asarray(r["loss"], bool)] for r in dump.rows]
    conc = entropy_concentration(np.concatenate(rows) if rows else np.zeros(0), rho)
    conc["share_top_se"] = bootstrap_share_se(rows, rho)
    return {
        "model": path,
        "responses": len(rows),
        "percentiles": stats["percentiles"],
        "tau": stats["tau"],
        **conc,
    }


def forking_overlap(
    args: list[str], finals: dict[str, list[str]], *, n: int = 64, k: int = 4, rho: float = 0.2
) -> dict:
    """Per arm, mean ± std over seeds of the overlap of top-rho positions between the warm start and the
    final model, all scored on the same warm-start samples (`checkpoint_overlap`)."""
    from forkrl.analysis.overlap import checkpoint_overlap

    path, task, budget, temperature, chat = _analysis_setup(args)
    flat = [(arm, p) for arm, paths in finals.items() for p in paths]
    if not flat:
        return {}
    tok = load_quietly(path)[1] if chat else None
    prompts = [e.prompt for e in _prompts(task.examples("test", n, seed=1234), tok, chat)]
    res = checkpoint_overlap(
        load_quietly,
        [path, *[p for _, p in flat]],
        prompts,
        n=k,
        temperature=temperature,
        max_new_tokens=budget,
        rho=rho,
    )
    out: dict = {}
    for (arm, _), row in zip(flat, res["checkpoints"][1:]):
        out.setdefault(arm, []).append(row)

    def mean_h(rows, part, key):  # mean entropy of the warm start's top-rho ("high") or other ("low") tokens
        return mean_std([r["change_vs_first"][part][key] for r in rows])["mean"]

    return {
        arm: {
            "overlap": mean_std([r["overlap_vs_first"] for r in rows]),
            "values": [r["overlap_vs_first"] for r in rows],
            "high_entropy_before": mean_h(rows, "high", "entropy_a"),
            "high_entropy_after": mean_h(rows, "high", "entropy_b"),
            "low_entropy_before": mean_h(rows, "low", "entropy_a"),
            "low_entropy_after": mean_h(rows, "low", "entropy_b"),
            "tokens": res["tokens"],
        }
        for arm, rows in out.items()
    }


def _fingerprint(model_dir: str) -> list:
    """A final model's folder as (name, size, mtime) of its files: a run trained again is a new model."""
    d = Path(model_dir)
    return [model_dir] + [
        [f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in sorted(d.iterdir()) if f.is_file()
    ]


def _analysis_cached(path: Path, key: dict, make) -> dict:
    """The warm-start statistics and the overlap take minutes on a real model (sampling, then scoring
    with every final model): a rerun reuses `path` while `key` (analysis sizes, arm arguments, the final
    models' fingerprints) is unchanged, and recomputes otherwise."""
    key = json.loads(json.dumps(key))  # tuples as lists, as they come back from the file
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("key") == key:
            return saved["result"]
    result = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"key": key, "result": result}, indent=2))
    return result
