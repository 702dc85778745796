"""Warm start: supervised fine-tuning of the tiny model on a built-in task's solution traces.

The traces try candidates in a random order (see `forkrl.tasks.pick`), so the warm-started
model solves the arithmetic but makes its first choice at random: RL has room to improve it.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from forkrl.models.tiny import build_char_tokenizer, build_tiny_model
from forkrl.tasks.pick import get_task


@dataclass
class WarmstartConfig:
    task: str = "pick"
    """built-in task whose traces are learned"""
    steps: int = 1200
    """optimizer steps (the shipped checkpoint: 1200)"""
    batch_size: int = 64
    """traces per step"""
    lr: float = 3e-3
    """peak AdamW learning rate (linear warmup, cosine decay)"""
    warmup: int = 100
    """warmup steps"""
    weight_decay: float = 0.01
    """AdamW weight decay"""
    n_traces: int = 50_000
    """distinct training problems (each step draws a batch; a new random trace order every time)"""
    seed: int = 0
    """seed for the model init, the data and the trace orders"""
    hidden_size: int = 128
    """model width"""
    num_layers: int = 4
    """transformer layers"""
    eval_n: int = 500
    """held-out problems for the final evaluation"""
    threads: int = 1
    """torch CPU threads (the shipped checkpoint was made with 1; results depend on it in the last bits)"""


def _batch(tokenizer, task, examples, rng, device):
    prompts = [tokenizer(e.prompt, add_special_tokens=False).input_ids for e in examples]
    traces = [
        tokenizer(task.trace(e, rng), add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        for e in examples
    ]
    width = max(len(p) + len(t) for p, t in zip(prompts, traces))
    ids = torch.full((len(examples), width), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    attn = torch.zeros_like(ids)
    for i, (p, t) in enumerate(zip(prompts, traces)):
        seq = p + t
        ids[i, : len(seq)] = torch.tensor(seq)
        attn[i, : len(seq)] = 1
        labels[i, len(p) : len(seq)] = torch.tensor(t)  # loss on the completion only
    return ids.to(device), attn.to(device), labels.to(device)


def warmstart(
    cfg: WarmstartConfig,
    out_dir: str | Path,
    *,
    device: str = "cpu",
    progress: bool = True,
    log_every: int = 0,
    evaluate: Callable[..., dict] | None = None,
) -> dict:
    """Train the tiny model on traces and save model + tokenizer to `out_dir`. Returns final metrics.

    The metrics are the last SFT loss and, with `evaluate` (`forkrl.evaluate.evaluate_task`: models/
    sits below evaluate/, so the caller passes it in), the greedy accuracy on `eval_n` held-out problems
    within the task's completion budget ("greedy_acc") and within 96 tokens ("greedy_acc_unbounded").
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    task = get_task(cfg.task)
    tokenizer = build_char_tokenizer()
    model = build_tiny_model(
        len(tokenizer), hidden_size=cfg.hidden_size, num_layers=cfg.num_layers, seed=cfg.seed
    )
    model.to(device).train()
    data = task.examples("train", cfg.n_traces, seed=cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))

    def lr_at(step: int) -> float:
        if step < cfg.warmup:
            return cfg.lr * (step + 1) / cfg.warmup
        frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * frac))

    cols = [
        TextColumn("warmstart"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} loss {task.fields[loss]:.3f}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ]
    with Progress(*cols, disable=not progress) as bar:
        job = bar.add_task("sft", total=cfg.steps, loss=float("nan"))
        for step in range(cfg.steps):
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            ids, attn, labels = _batch(tokenizer, task, rng.sample(data, cfg.batch_size), rng, device)
            loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            bar.update(job, advance=1, loss=loss.item())
            if log_every and (step + 1) % log_every == 0:
                print(f"warmstart step {step + 1}/{cfg.steps} loss {loss.item():.4f}", flush=True)
    model.eval()
    metrics = {"sft_loss": loss.item()}
    if evaluate is not None:
        held_out = task.examples("test", cfg.eval_n, seed=cfg.seed)
        metrics["greedy_acc"] = evaluate(model, tokenizer, task, held_out, greedy=True)["accuracy"]
        metrics["greedy_acc_unbounded"] = evaluate(
            model, tokenizer, task, held_out, greedy=True, max_new_tokens=96
        )["accuracy"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return metrics
