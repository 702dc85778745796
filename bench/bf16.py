"""bfloat16 on CPU for a real model: speed of sampling and of the update, and how far the log-probs move.

`model.compute_dtype=bfloat16` runs the transformer body under `torch.autocast` (bf16 matmuls: AMX
or AVX512-BF16 where the CPU has them) while the weights, the optimizer and the LM head stay in
float32 (docs/DESIGN.md, "Precision"). This script measures, on SmolLM2-135M-Instruct and the `arith`
task's prompts (chat template, T = 0.7, responses ending at EOS), in one process:

1. sampling: `forkrl.rollout.hf.generate` of P prompts x G samples in float32, under bf16 autocast,
   and from a bfloat16 copy of the weights (`rollout.dtype=bfloat16`, forkrl.rollout.cast)
   (seconds, response tokens, tokens/s; the same seeds);
2. agreement: on the float32 rollout, the log-probs and entropies of every response token from the
   scoring pass in float32 (reference) and under bf16, and the sampler's own values: |d logp|
   (median, p99, max), |d entropy|, the importance ratio exp(d logp) outside DAPO's clip range
   [1 - 0.2, 1 + 0.28], and the overlap of the batch's top-20% entropy positions;
3. the update: forward (body, entropy-free, the head on the top-20% positions) and backward over
   micro-batches of at most `--budget` tokens, float32 vs bf16, with and without gradient checkpointing.

    python bench/bf16.py                      # SmolLM2 from `forkrl model get smollm2-135m-instruct`
    python bench/bf16.py --prompts 4 --samples 8 --threads 2 --repeats 3

Prints a table; `--json FILE` writes the figures. Timings are medians over `--repeats`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CLIP = (0.2, 0.28)  # DAPO's eps_low / eps_high


def autocast(dtype: str):
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=getattr(torch, dtype))


def prompts_for(tokenizer, n: int, seed: int) -> list[str]:
    from forkrl.tasks.files import apply_chat_template
    from forkrl.tasks.registry import get_task

    task = get_task("arith", level="add1")
    return [apply_chat_template(tokenizer, e.prompt) for e in task.examples("train", n, seed=seed)]


def timed(fn, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def top_mask(entropy: torch.Tensor, mask: torch.Tensor, rho: float = 0.2) -> torch.Tensor:
    """The batch's top-rho entropy positions among `mask` (the paper's batch-level threshold)."""
    vals = entropy[mask]
    k = max(1, int(round(rho * vals.numel())))
    tau = vals.topk(k).values[-1]
    return mask & (entropy >= tau)


def agreement(ref_lp, ref_ent, lp, ent, mask) -> dict:
    d = (lp - ref_lp)[mask].abs()
    de = (ent - ref_ent)[mask].abs()
    ratio = torch.exp(lp - ref_lp)[mask]
    a, b = top_mask(ref_ent, mask), top_mask(ent, mask)
    return {
        "dlogp_median": float(d.median()),
        "dlogp_p99": float(torch.quantile(d, 0.99)),
        "dlogp_max": float(d.max()),
        "dent_median": float(de.median()),
        "dent_p99": float(torch.quantile(de, 0.99)),
        "ratio_outside_clip": float(((ratio < 1 - CLIP[0]) | (ratio > 1 + CLIP[1])).float().mean()),
        "top20_overlap": float((a & b).sum() / a.sum()),
        "tokens": int(mask.sum()),
    }


def update_time(model, ro, budget: int, dtype: str, checkpointing: bool, repeats: int) -> float:
    from forkrl.models.loading import enable_gradient_checkpointing
    from forkrl.training.forward import train_logprobs

    if checkpointing:
        enable_gradient_checkpointing(model)
    else:
        model.gradient_checkpointing_disable()
    model.train()
    T = ro.input_ids.shape[1]
    rows = max(ro.group_size, budget // T // ro.group_size * ro.group_size)
    sel = top_mask(ro.sampler_entropy, ro.response_mask)

    def step():
        for r0 in range(0, ro.input_ids.shape[0], rows):
            r = slice(r0, r0 + rows)
            with autocast(dtype):
                _, finish = train_logprobs(
                    model,
                    ro.input_ids[r],
                    ro.attention_mask[r],
                    ro.prompt_len,
                    ro.response_ids[r],
                    temperature=0.7,
                    selective_head=True,
                    need_entropy=False,
                    group_size=1 if checkpointing else ro.group_size,
                )
                logp = finish(sel[r])
            (-(logp * sel[r]).sum()).backward()
        model.zero_grad(set_to_none=True)

    t, _ = timed(step, repeats)
    model.gradient_checkpointing_disable()
    model.eval()
    return t


def grad_agreement(model, ro, rows: int) -> dict:
    """Cosine and relative norm of the gradient of the top-20% log-probs' sum over the first `rows`
    rows: bf16 autocast against float32."""
    from forkrl.training.forward import train_logprobs

    model.train()
    sel = top_mask(ro.sampler_entropy, ro.response_mask)
    r = slice(0, rows)
    grads = {}
    for dtype in ("float32", "bfloat16"):
        with autocast(dtype):
            _, finish = train_logprobs(
                model,
                ro.input_ids[r],
                ro.attention_mask[r],
                ro.prompt_len,
                ro.response_ids[r],
                temperature=0.7,
                selective_head=True,
                need_entropy=False,
                group_size=ro.group_size,
            )
            logp = finish(sel[r])
        (logp * sel[r]).sum().backward()
        grads[dtype] = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        model.zero_grad(set_to_none=True)
    model.eval()
    a, b = grads["float32"], grads["bfloat16"]
    return {
        "cosine": float(torch.dot(a.double(), b.double()) / (a.double().norm() * b.double().norm())),
        "norm_ratio": float(b.double().norm() / a.double().norm()),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct", help="model folder or known name")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--budget", type=int, default=4096, help="tokens per update micro-batch")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    ap.add_argument("--no-update", action="store_true", help="sampling and agreement only")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from forkrl.models.loading import resolve_model_path
    from forkrl.rollout.hf import generate
    from forkrl.training.forward import scoring_pass

    path = resolve_model_path(args.model)
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32).eval()
    prompts = prompts_for(tok, args.prompts, args.seed)
    res: dict = {"args": vars(args), "cpu_capability": torch.backends.cpu.get_cpu_capability()}

    def sample(dtype):
        with autocast(dtype):
            return generate(
                model,
                tok,
                prompts,
                n=args.samples,
                temperature=0.7,
                max_new_tokens=args.length,
                generator_seed=args.seed,
            )

    from forkrl.rollout.cast import CastSampler

    copy16 = CastSampler(model, tok, torch.bfloat16)  # rollout.dtype=bfloat16: a bf16 copy of the weights

    def sample_copy():
        return copy16(
            prompts, n=args.samples, temperature=0.7, max_new_tokens=args.length, generator_seed=args.seed
        )

    for dtype, fn in (
        ("float32", lambda: sample("float32")),
        ("bfloat16", lambda: sample("bfloat16")),
        ("bfloat16 copy", sample_copy),
    ):
        t, ro = timed(fn, args.repeats)
        n_tok = int(ro.response_mask.sum())
        res[f"generate_{dtype}"] = {"s": t, "tokens": n_tok, "tok_per_s": n_tok / t}
        res[f"rollout_{dtype}"] = ro
        print(f"generate {dtype}: {t:.2f} s, {n_tok} tokens, {n_tok / t:.0f} tok/s", flush=True)

    ro = res.pop("rollout_float32")
    ro16 = res.pop("rollout_bfloat16")
    roc = res.pop("rollout_bfloat16 copy")
    m = ro.response_mask

    def score(r, dtype):
        with autocast(dtype):
            return scoring_pass(
                model,
                r.input_ids,
                r.attention_mask,
                r.prompt_len,
                r.response_ids,
                temperature=0.7,
                group_size=r.group_size,
            )

    ref_lp, ref_ent = score(ro, "float32")
    lp16, ent16 = score(ro, "bfloat16")
    res["agree"] = {
        "sampler fp32 vs scoring fp32": agreement(ref_lp, ref_ent, ro.sampler_logp, ro.sampler_entropy, m),
        "scoring bf16 vs scoring fp32": agreement(ref_lp, ref_ent, lp16, ent16, m),
    }
    m16 = ro16.response_mask
    r_lp, r_ent = score(ro16, "float32")
    s_lp, s_ent = score(ro16, "bfloat16")
    res["agree"]["sampler bf16 vs scoring bf16"] = agreement(
        s_lp, s_ent, ro16.sampler_logp, ro16.sampler_entropy, m16
    )
    res["agree"]["sampler bf16 vs scoring fp32"] = agreement(
        r_lp, r_ent, ro16.sampler_logp, ro16.sampler_entropy, m16
    )
    mc = roc.response_mask
    for dtype in ("bfloat16", "float32"):
        c_lp, c_ent = score(roc, dtype)
        res["agree"][f"sampler bf16 copy vs scoring {dtype.replace('loat', '')}"] = agreement(
            c_lp, c_ent, roc.sampler_logp, roc.sampler_entropy, mc
        )
    print(
        f"{'pair':32} {'|dlogp| med':>11} {'p99':>8} {'max':>7} {'|dH| p99':>8} {'out of clip':>11} {'top20 overlap':>13}"
    )
    for k, a in res["agree"].items():
        print(
            f"{k:32} {a['dlogp_median']:11.2e} {a['dlogp_p99']:8.4f} {a['dlogp_max']:7.3f} {a['dent_p99']:8.4f} "
            f"{a['ratio_outside_clip']:11.5f} {a['top20_overlap']:13.3f}"
        )

    if args.no_update:
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=1))
        return 0
    res["grad"] = grad_agreement(model, ro, min(16, ro.input_ids.shape[0]))
    print(
        f"gradient bf16 vs fp32: cosine {res['grad']['cosine']:.5f}, norm ratio {res['grad']['norm_ratio']:.4f}"
    )
    res["update"] = {}
    for ckpt in (False, True):
        for dtype in ("float32", "bfloat16"):
            t = update_time(model, ro, args.budget, dtype, ckpt, args.repeats)
            res["update"][f"{dtype}{' +ckpt' if ckpt else ''}"] = t
            print(f"update {dtype}{' + checkpointing' if ckpt else ''}: {t:.2f} s", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
