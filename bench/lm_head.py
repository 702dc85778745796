"""LM-head cost of one forking-token update: naive full logits vs TRL's chunked kernel vs forkrl.

Each case computes log-probs and entropy of N response tokens from hidden states (N, d) and a head
W (V, d), selects the k = ceil(rho * N) highest-entropy tokens, and backpropagates
loss = Σ_selected coef * logp into the hidden states and W:

- naive:  logits = hidden @ W.T, float32 log_softmax, entropy, loss over the selected positions but
          with the autograd graph over all N tokens (what TRL without its kernel and verl do);
- trl:    `trl.kernels.chunked_logprob.ChunkedLogProbFunction` (TRL's streaming head, used by its
          GRPO trainer) for log-probs and entropy of all N tokens, backward over all N;
- forkrl: `score_from_hidden` over all N without grad, then `selected_logprobs` on the k selected
          rows with backward (forward + backward of the head scale with k, not N).

Every (case, N) runs in a fresh process so that its peak memory is its own: the peak resident set
during the step minus the resident set after the inputs are allocated (VmHWM after resetting it via
/proc/self/clear_refs; ru_maxrss when that is unavailable); the (V, d) float32 weight gradient
(594 MiB at the defaults) is part of every case's peak. Times are medians over up to --repeats steps
(no new step once a case has run --case-budget-s), wall clock and process CPU time: on a shared
machine the CPU time is the steadier number. On CPU, TRL runs its torch fallback for the tile fold
(Triton is used on CUDA/XPU only); by matmul count alone forkrl does 1.8 N-token passes over W
(score N, forward k, backward 3k) against TRL's 4 (forward N, backward 3N).

    python bench/lm_head.py            # N in {1024, 2048, 4096}, 6-13 min on 2 shared CPU cores
    python bench/lm_head.py --quick    # N = 1024, one repeat
    python bench/lm_head.py --case forkrl --n 4096   # one case, prints one JSON line
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time

CASES = ("naive", "trl", "forkrl")


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def _step(case: str, hidden, weight, tokens, coef, k: int, args) -> float:
    import torch

    from forkrl.core.entropy import score_from_hidden, selected_logprobs

    if case == "naive":
        logits = hidden @ weight.t()  # (N, V)
        logp_all = torch.log_softmax(logits, dim=-1)  # (N, V)
        logp = logp_all.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # (N,)
        with torch.no_grad():
            entropy = -(logp_all.exp() * logp_all).sum(-1)  # (N,)
        sel_mask = torch.zeros_like(coef, dtype=torch.bool)
        sel_mask[entropy.topk(k).indices] = True
        loss = (coef * logp * sel_mask).sum()
    elif case == "trl":
        from trl.kernels.chunked_logprob import ChunkedLogProbFunction

        logp, entropy, *_ = ChunkedLogProbFunction.apply(
            hidden, weight, None, tokens, 1.0, args.trl_chunk, None, 1.0, ("entropy",)
        )
        sel_mask = torch.zeros_like(coef, dtype=torch.bool)
        sel_mask[entropy.detach().topk(k).indices] = True
        loss = (coef * logp * sel_mask).sum()
    else:
        _, entropy = score_from_hidden(
            hidden, weight, tokens, token_chunk=args.token_chunk, vocab_chunk=args.vocab_chunk
        )
        sel = entropy.topk(k).indices  # (k,)
        logp_sel = selected_logprobs(
            hidden[sel], weight, tokens[sel], token_chunk=args.token_chunk, vocab_chunk=args.vocab_chunk
        )
        loss = (coef[sel] * logp_sel).sum()
    loss.backward()
    return float(loss)


def run_case(args) -> dict:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    n, k = args.n, math.ceil(args.rho * args.n)
    hidden = torch.randn(n, args.d, generator=gen).requires_grad_()  # (N, d)
    weight = (0.05 * torch.randn(args.vocab, args.d, generator=gen)).requires_grad_()  # (V, d)
    tokens = torch.randint(0, args.vocab, (n,), generator=gen)  # (N,)
    coef = torch.randn(n, generator=gen)  # (N,) stands in for the clipped-surrogate weights
    has_hwm = _reset_peak()
    base_kib = _rss_kib("VmRSS")
    times, cpu_times, loss = [], [], 0.0
    start = time.perf_counter()
    # At least one step; more up to --repeats while the case stays within its time budget
    while len(times) < args.repeats and (not times or time.perf_counter() - start < args.case_budget_s):
        hidden.grad, weight.grad = None, None
        t0, c0 = time.perf_counter(), time.process_time()
        loss = _step(args.case, hidden, weight, tokens, coef, k, args)
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    peak_kib = _rss_kib("VmHWM") if has_hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "case": args.case,
        "n": n,
        "k": k,
        "time_s": statistics.median(times),
        "times_s": [round(t, 2) for t in times],
        "cpu_s": statistics.median(cpu_times),
        "peak_mib": (peak_kib - base_kib) / 1024,
        "loss": loss,
        "grad_w_norm": float(weight.grad.norm()),
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", choices=CASES, help="run one case in this process and print a JSON line")
    p.add_argument("--n", type=int, nargs="+", default=[1024, 2048, 4096], help="response tokens N")
    p.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    p.add_argument("--vocab", type=int, default=151_936, help="V (Qwen2.5/Qwen3 vocabulary)")
    p.add_argument("--d", type=int, default=1024, help="hidden size (Qwen3-0.6B)")
    p.add_argument("--rho", type=float, default=0.2, help="fraction of tokens selected (paper: 0.2)")
    p.add_argument("--repeats", type=int, default=3, help="timed steps per case (median reported)")
    p.add_argument(
        "--case-budget-s", type=float, default=30.0, help="no new repeat once a case has run this long"
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--token-chunk", type=int, default=None, help="forkrl token_chunk (default: library)")
    p.add_argument("--vocab-chunk", type=int, default=None, help="forkrl vocab_chunk (default: library)")
    p.add_argument("--trl-chunk", type=int, default=32768, help="TRL vocab chunk (its trainer uses 32768)")
    p.add_argument("--quick", action="store_true", help="N = 1024 and one repeat")
    args = p.parse_args()

    from forkrl.core.lm_head import TOKEN_CHUNK, VOCAB_CHUNK

    args.token_chunk = args.token_chunk or TOKEN_CHUNK
    args.vocab_chunk = args.vocab_chunk or VOCAB_CHUNK
    if args.case:
        args.n = args.n[0]
        print(json.dumps(run_case(args)))
        return
    if args.quick:
        args.n, args.repeats = [1024], 1

    passthrough = ["--vocab", str(args.vocab), "--d", str(args.d), "--rho", str(args.rho)]
    passthrough += ["--repeats", str(args.repeats), "--threads", str(args.threads)]
    passthrough += ["--case-budget-s", str(args.case_budget_s)]
    passthrough += ["--token-chunk", str(args.token_chunk), "--vocab-chunk", str(args.vocab_chunk)]
    passthrough += ["--trl-chunk", str(args.trl_chunk)]
    print(
        f"V={args.vocab} d={args.d} rho={args.rho} float32 CPU, repeats={args.repeats}, "
        f"forkrl tiles {args.token_chunk}x{args.vocab_chunk}, TRL vocab chunk {args.trl_chunk}"
    )
    results: dict[tuple[str, int], dict] = {}
    for n in args.n:
        for case in args.cases:
            cmd = [sys.executable, __file__, "--case", case, "--n", str(n), *passthrough]
            out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
            if out.returncode != 0:
                print(f"{case} N={n} failed:\n{out.stderr[-2000:]}", file=sys.stderr)
                continue
            res = json.loads(out.stdout.strip().splitlines()[-1])
            results[(case, n)] = res
            print(
                f"  {case:>6} N={n:5d} k={res['k']:4d} wall {res['time_s']:7.2f} s {res['times_s']} "
                f"cpu {res['cpu_s']:7.2f} s threads {res['threads']} "
                f"peak {res['peak_mib']:8.0f} MiB loss {res['loss']:.5f} |gW| {res['grad_w_norm']:.5f}",
                flush=True,
            )

    print(
        "\n|     N |    k | case   | wall s | cpu s | peak MiB | wall/naive | wall/TRL | cpu/naive | cpu/TRL "
        "| mem/naive | mem/TRL |"
    )
    print(
        "|------:|-----:|--------|-------:|------:|---------:|-----------:|---------:|----------:|--------:"
        "|----------:|--------:|"
    )
    for n in args.n:
        naive, trl = results.get(("naive", n)), results.get(("trl", n))
        for case in args.cases:
            r = results.get((case, n))
            if r is None:
                continue

            def ratio(key, ref, r=r):
                return f"{r[key] / ref[key]:.3f}" if ref and ref[key] > 0 else "-"

            print(
                f"| {n:5d} | {r['k']:4d} | {case:<6} | {r['time_s']:6.2f} | {r['cpu_s']:5.1f} | {r['peak_mib']:8.0f} | "
                f"{ratio('time_s', naive):>10} | {ratio('time_s', trl):>8} | "
                f"{ratio('cpu_s', naive):>9} | {ratio('cpu_s', trl):>7} | "
                f"{ratio('peak_mib', naive):>9} | {ratio('peak_mib', trl):>7} |"
            )
    for case in args.cases:
        rows = [results[(case, n)] for n in args.n if (case, n) in results]
        if len(rows) > 1:
            per_token = ", ".join(
                f"N={r['n']}: {1e3 * r['time_s'] / r['n']:.2f}/{1e3 * r['cpu_s'] / r['n']:.2f}" for r in rows
            )
            print(f"{case:>6} ms per response token, wall/cpu (linear in N when constant): {per_token}")


if __name__ == "__main__":
    main()
