"""GPU benchmark on a ~0.5B Qwen3-architecture model with random weights, built locally (no download).

Measures, on one CUDA GPU:
- rollout throughput of the HF backend (`forkrl.rollout.hf.generate`), generated tokens per second,
  with the lean decode step (default) and with the model's forward per step, and the lean step's
  largest logit difference from the forward (teacher-forced, in the benchmark's dtype);
- one update step (scoring pass + one optimizer step over the whole rollout) with the selective LM
  head on and off: time and peak CUDA memory (`torch.cuda.max_memory_allocated`);
- when vLLM is installed (`pip install 'forkrl[vllm]'`): the vLLM backend's throughput on the same
  prompts, after loading the HF model's weights into it (the trainer's weight-sync path), and how
  far its sampler log-probs are from forkrl's scoring pass on the same tokens.

A random model almost never samples EOS, so every row runs to `--new-tokens`: the token count is
the same for both backends. The figures go to bench/results/gpu.json and gpu.md (`--out`).

    python bench/gpu.py                                  # 64 prompts x 8 x 512 tokens, ~5 min on an H100
    python bench/gpu.py --prompts 16 --new-tokens 256    # smaller
    python bench/gpu.py --cpu-smoke --out /tmp/gpu-smoke # tiny sizes on the CPU: the script end to end
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

from forkrl.config import load_config
from forkrl.models.tiny import CHARS, build_char_tokenizer
from forkrl.rollout.hf import generate
from forkrl.training.forward import scoring_pass
from forkrl.training.step import select_and_train
from forkrl.training.trainer import settings_from
from forkrl.training.update import group_advantages, score_rollout

RESULTS = Path(__file__).resolve().parent / "results"
SMOKE = dict(
    prompts=2,
    group=2,
    new_tokens=8,
    prompt_len=8,
    hidden=64,
    layers=2,
    heads=4,
    kv_heads=2,
    head_dim=16,
    intermediate=128,
    vocab=1000,
    micro_batch=2,
)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--group", type=int, default=8, help="samples per prompt")
    ap.add_argument("--new-tokens", type=int, default=512)
    ap.add_argument("--prompt-len", type=int, default=64, help="prompt tokens (random characters)")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--intermediate", type=int, default=3072)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--micro-batch", type=int, default=8, help="sequences per forward/backward in the update")
    ap.add_argument(
        "--update-repeats", type=int, default=2, help="update steps per setting; the last is timed"
    )
    ap.add_argument("--vllm-memory", type=float, default=0.5, help="vLLM gpu_memory_utilization")
    ap.add_argument("--vllm-eager", action="store_true", help="vLLM without CUDA graphs (quicker start)")
    ap.add_argument("--no-vllm", action="store_true", help="skip the vLLM backend even if installed")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="output stem (default bench/results/gpu)")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU; no vLLM")
    args = ap.parse_args(argv)
    if args.cpu_smoke:
        for k, v in SMOKE.items():
            setattr(args, k, v)
        args.update_repeats, args.no_vllm = 1, True
    return args


def build_model(args, device: torch.device, dtype: torch.dtype):
    """A Qwen3ForCausalLM from a config (random weights, tied embeddings), on `device` in `dtype`."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim,
        max_position_embeddings=max(1024, args.prompt_len + args.new_tokens),
        tie_word_embeddings=True,
        pad_token_id=0,  # the char tokenizer's <pad> and <eos>
        eos_token_id=1,
        bos_token_id=None,
    )
    torch.manual_seed(args.seed)
    with torch.device(device):
        model = Qwen3ForCausalLM(config)
    return model.to(dtype)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def bench_hf_rollout(model, tok, prompts, args, device, lean: bool = True):
    kw = dict(generator_seed=args.seed, lean=lean)
    generate(model, tok, prompts[:1], n=2, max_new_tokens=4, **kw)  # warm the kernels
    reset_peak(device)
    sync(device)
    t0 = time.perf_counter()
    ro = generate(model, tok, prompts, n=args.group, max_new_tokens=args.new_tokens, **kw)
    sync(device)
    dt = time.perf_counter() - t0
    tokens = int(ro.response_mask.sum())
    return ro, {
        "tokens": tokens,
        "seconds": dt,
        "tokens_per_s": tokens / dt,
        "peak_gib": peak_gib(device),
    }


@torch.no_grad()
def lean_vs_forward(model, tok, prompts, steps: int = 8) -> float:
    """Max |logit difference| of the lean decode step against the model's forward (teacher-forced)."""
    from transformers import DynamicCache

    from forkrl.rollout.hf import cache_kwarg
    from forkrl.rollout.lean import LeanDecoder

    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    P = ids.shape[1]
    cache = DynamicCache()
    model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
        use_cache=True,
        **{cache_kwarg(model): cache},
    )
    dec = LeanDecoder(model, P + steps)
    dec.begin(cache, 1, capacity=P + steps)
    bias = torch.zeros(ids.shape[0], P + steps, dtype=model.dtype, device=model.device)
    bias[:, :P].masked_fill_(mask == 0, float("-inf"))
    g = torch.Generator().manual_seed(0)
    worst = 0.0
    for _ in range(steps):
        t = torch.randint(2, len(tok), (ids.shape[0],), generator=g).to(model.device)
        ids = torch.cat([ids, t[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        got = dec.step(t, pos[:, -1], bias[:, : dec.n + 1])
        want = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1]
        worst = max(worst, (got.float() - want.float()).abs().max().item())
    return worst


def bench_update(model, ro, args, device, selective: bool) -> dict:
    """Scoring pass + one optimizer step over the whole rollout; the last of `--update-repeats` is timed."""
    cfg = load_config(
        None,
        [
            f"model.selective_head={selective}",
            "rollout.reuse_logprobs=false",  # time the scoring pass too, as with the vllm backend
            f"optim.micro_batch_size={args.micro_batch}",
            "optim.mini_batches=1",
        ],
    )
    s = settings_from(cfg, max_len=args.new_tokens)
    B = ro.response_ids.shape[0]
    rewards = (torch.arange(B) % 2).float()  # every group holds both outcomes: non-zero advantages
    opt = torch.optim.AdamW(model.parameters(), lr=1e-7)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0)
    reset_peak(device)
    for _ in range(max(1, args.update_repeats)):
        sync(device)
        t0 = time.perf_counter()
        batch = score_rollout(model, None, ro, s, overlong_filter=False)
        adv = group_advantages(rewards, ro.group_size, s)
        sync(device)
        t1 = time.perf_counter()
        m = select_and_train(
            model, opt, sched, batch, adv, s, generator=torch.Generator().manual_seed(args.seed)
        )[0]
        sync(device)
        t2 = time.perf_counter()
    out = {
        "scoring_s": t1 - t0,
        "update_s": t2 - t1,
        "step_s": t2 - t0,
        "peak_gib": peak_gib(device),  # weights, AdamW state, gradients and activations
        "selected_tokens": m.get("selected_tokens"),
        "valid_tokens": m.get("valid_tokens"),
    }
    del opt, sched, batch
    model.zero_grad(set_to_none=True)
    return out


def bench_vllm(model, tok, prompts, ro_hf, args, device) -> dict:
    """The vLLM backend on the same prompts, with the HF model's weights synced into it."""
    from forkrl.rollout.vllm import VLLMRollout

    model.zero_grad(set_to_none=True)
    reset_peak(device)
    tmp = tempfile.TemporaryDirectory()
    model.config.save_pretrained(tmp.name)  # config only: vLLM starts from dummy weights, then loads ours
    tok.save_pretrained(tmp.name)
    t0 = time.perf_counter()
    backend = VLLMRollout(
        tmp.name,
        tok,
        dtype="bfloat16",
        gpu_memory_utilization=args.vllm_memory,
        sleep=True,
        seed=args.seed,
        max_model_len=args.prompt_len + args.new_tokens + 8,
        load_format="dummy",
        enforce_eager=args.vllm_eager,
    )
    t_start = time.perf_counter() - t0
    try:
        backend.sync_weights(model)
        t0 = time.perf_counter()
        backend(prompts[:1], n=1, max_new_tokens=4)  # wake, load the weights, warm up, sleep
        t_sync = time.perf_counter() - t0
        sync(device)
        t0 = time.perf_counter()
        ro = backend(prompts, n=args.group, max_new_tokens=args.new_tokens)
        sync(device)
        dt = time.perf_counter() - t0
        tokens = int(ro.response_mask.sum())
        # The synced weights and processed_logprobs: vLLM's log-probs vs the scoring pass, same tokens.
        rows = slice(0, min(16, ro.response_ids.shape[0]))
        logp, _ = scoring_pass(
            model,
            ro.input_ids[rows],
            ro.attention_mask[rows],
            ro.prompt_len,
            ro.response_ids[rows],
            temperature=1.0,
        )
        m = ro.response_mask[rows]
        diff = (logp[m] - ro.sampler_logp[rows][m]).abs()
    finally:
        backend.close()
        tmp.cleanup()
    return {
        "tokens": tokens,
        "seconds": dt,
        "tokens_per_s": tokens / dt,
        "engine_start_s": t_start,
        "wake_sync_warmup_s": t_sync,
        "logp_vs_scoring_abs_diff_mean": diff.mean().item(),
        "logp_vs_scoring_abs_diff_max": diff.max().item(),
        "hf_rollout_tokens": int(ro_hf.response_mask.sum()),
    }


def _fmt(x, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def markdown(res: dict) -> str:
    a, hf = res["setup"], res["hf_rollout"]
    lines = [
        f"# bench/gpu.py on {res['device']}",
        "",
        f"Model: Qwen3 architecture, {a['params'] / 1e6:.1f}M parameters (random, {a['dtype']}), "
        f"hidden {a['hidden']}, {a['layers']} layers, vocab {a['vocab']}. "
        f"Rollout: {a['prompts']} prompts x {a['group']} samples x {a['new_tokens']} new tokens "
        f"(prompts of {a['prompt_len']} tokens).",
        "",
        "| measure | value |",
        "|---|---|",
        f"| HF rollout (lean decode step): tokens/s | {hf['tokens_per_s']:.0f} ({hf['tokens']} tokens in "
        f"{hf['seconds']:.1f} s) |",
        f"| HF rollout (lean decode step): peak memory GiB | {_fmt(hf['peak_gib'], '.1f')} |",
        f"| lean step vs the model's forward: max abs logit diff ({a['dtype']}) | "
        f"{hf['lean_vs_forward_max_logit_diff']:.3g} |",
    ]
    plain = res.get("hf_rollout_plain")
    if plain:
        lines.append(
            f"| HF rollout (model forward per step): tokens/s; peak GiB | {plain['tokens_per_s']:.0f}; "
            f"{_fmt(plain['peak_gib'], '.1f')} |"
        )
    v = res.get("vllm")
    if isinstance(v, dict):
        lines += [
            f"| vLLM rollout: tokens/s | {v['tokens_per_s']:.0f} ({v['tokens']} tokens in {v['seconds']:.1f} s) |",
            f"| vLLM engine start s; wake + weight sync + warm-up s | {v['engine_start_s']:.1f}; "
            f"{v['wake_sync_warmup_s']:.2f} |",
            f"| vLLM log-prob vs scoring pass, mean / max abs diff | {v['logp_vs_scoring_abs_diff_mean']:.3g} / "
            f"{v['logp_vs_scoring_abs_diff_max']:.3g} |",
        ]
    else:
        lines.append(f"| vLLM rollout | {v} |")
    for key, name in (("update_selective_on", "on"), ("update_selective_off", "off")):
        u = res[key]
        lines.append(
            f"| update step, selective head {name}: scoring + update s; peak GiB | "
            f"{u['scoring_s']:.2f} + {u['update_s']:.2f} = {u['step_s']:.2f}; {_fmt(u['peak_gib'], '.1f')} |"
        )
    lines += ["", f"Command: `{res['command']}`", ""]
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.cpu_smoke:
        device, dtype = torch.device("cpu"), torch.float32
    elif not torch.cuda.is_available():
        sys.exit(
            "bench/gpu.py needs a CUDA GPU and torch.cuda.is_available() is False here; run it on a GPU "
            "machine, or pass --cpu-smoke for a tiny end-to-end check on the CPU"
        )
    else:
        device, dtype = torch.device("cuda"), torch.bfloat16
    t_all = time.perf_counter()
    model = build_model(args, device, dtype)
    tok = build_char_tokenizer(model_max_length=args.prompt_len + args.new_tokens + 8)
    rng = random.Random(args.seed)
    printable = [c for c in CHARS if c.strip()]  # one token per character
    prompts = ["".join(rng.choice(printable) for _ in range(args.prompt_len)) for _ in range(args.prompts)]
    params = sum(p.numel() for p in model.parameters())
    print(f"{params / 1e6:.1f}M parameters on {device} ({dtype})", flush=True)

    ro, hf = bench_hf_rollout(model, tok, prompts, args, device)
    print(f"HF rollout (lean decode step): {hf['tokens_per_s']:.0f} tokens/s", flush=True)
    _, hf_plain = bench_hf_rollout(model, tok, prompts, args, device, lean=False)
    print(f"HF rollout (model forward per step): {hf_plain['tokens_per_s']:.0f} tokens/s", flush=True)
    hf["lean_vs_forward_max_logit_diff"] = lean_vs_forward(model, tok, prompts[:4])
    print(f"lean step vs forward, max |logit diff|: {hf['lean_vs_forward_max_logit_diff']:.3g}", flush=True)
    updates = {}
    for selective in (True, False):
        updates[selective] = bench_update(model, ro, args, device, selective)
        print(f"update, selective head {selective}: {updates[selective]}", flush=True)
    vllm_res: dict | str
    if args.no_vllm:
        vllm_res = "skipped (--no-vllm or --cpu-smoke)"
    else:
        try:
            import vllm  # noqa: F401
        except ImportError:
            vllm_res = "not installed (pip install 'forkrl[vllm]')"
        else:
            vllm_res = bench_vllm(model, tok, prompts, ro, args, device)
            print(f"vLLM rollout: {vllm_res['tokens_per_s']:.0f} tokens/s", flush=True)

    res = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({platform.machine()})",
        "command": " ".join(["python bench/gpu.py", *(sys.argv[1:] if argv is None else argv)]),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "vllm": _vllm_version(),
        },
        "setup": {
            "params": params,
            "dtype": str(dtype).removeprefix("torch."),
            **{k: getattr(args, k) for k in ("prompts", "group", "new_tokens", "prompt_len", "hidden")},
            **{
                k: getattr(args, k)
                for k in ("layers", "heads", "kv_heads", "head_dim", "vocab", "micro_batch")
            },
        },
        "hf_rollout": hf,
        "hf_rollout_plain": hf_plain,
        "update_selective_on": updates[True],
        "update_selective_off": updates[False],
        "vllm": vllm_res,
        "total_s": time.perf_counter() - t_all,
    }
    stem = args.out or RESULTS / "gpu"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    md = markdown(res)
    stem.with_suffix(".md").write_text(md)
    print(md)
    print(f"wrote {stem.with_suffix('.json')} and {stem.with_suffix('.md')}")
    return res


def _vllm_version() -> str | None:
    try:
        import vllm
    except ImportError:
        return None
    return vllm.__version__


if __name__ == "__main__":
    main()
