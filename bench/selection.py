"""Benchmark: `select_tokens` (rule top, count exact, batch scope) against `torch.topk` on the same data.

    python bench/selection.py                      # 1M, 10M, 50M tokens on CPU
    python bench/selection.py --sizes 1e6 --device cuda --repeats 10
    python bench/selection.py --threads 1           # on a shared machine, avoids thread-pool stalls

Both sides get a (B, L) float32 entropy with L = 4096 and ~10% right padding and keep k = ceil(0.2 N)
of the N valid tokens. The baseline is what a plain implementation does: compact the valid entropies and
`torch.topk` them (no deterministic tie-break, no threshold on the mask). `radix` times the multi-rank
k-th value search (`radix_kth_largest`) run in one process. Medians over repeats, after one warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table

from forkrl.core.selection import num_selected, radix_kth_largest, select_tokens


def make_batch(n_tokens: int, device: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Entropies skewed toward 0 like an LM's (most tokens confident), rows padded at the end."""
    g = torch.Generator().manual_seed(seed)
    length = 4096
    rows = max(1, n_tokens // length)
    entropy = torch.rand(rows, length, generator=g).pow_(4).mul_(5.0)  # (B, L)
    lengths = torch.randint(int(0.8 * length), length + 1, (rows, 1), generator=g)  # (B, 1)
    mask = torch.arange(length)[None] < lengths  # (B, L)
    return entropy.to(device), mask.to(device)


def timed(fn, repeats: int, device: str) -> float:
    """Median seconds over `repeats` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="1e6,1e7,5e7", help="comma-separated token counts")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per size (3 above 2e7 tokens)")
    parser.add_argument("--rho", type=float, default=0.2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    table = Table(
        title=f"select_tokens(rule=top, count=exact, batch) vs torch.topk, rho={args.rho}, {args.device}"
    )
    for column in (
        "tokens",
        "valid N",
        "k",
        "select_tokens (ms)",
        "torch.topk (ms)",
        "ratio",
        "radix k-th (ms)",
    ):
        table.add_column(column, justify="right")
    for size in (int(float(s)) for s in args.sizes.split(",")):
        entropy, mask = make_batch(size, args.device)
        n_valid = int(mask.sum())
        k = num_selected(n_valid, args.rho)
        repeats = args.repeats if size <= 20_000_000 else min(args.repeats, 3)
        ours = timed(lambda e=entropy, m=mask: select_tokens(e, m, rho=args.rho), repeats, args.device)
        base = timed(lambda e=entropy, m=mask, k=k: torch.topk(e[m], k, sorted=False), repeats, args.device)
        radix = timed(lambda e=entropy, m=mask, k=k: radix_kth_largest(e, k, valid=m), repeats, args.device)
        table.add_row(
            f"{entropy.numel():,}",
            f"{n_valid:,}",
            f"{k:,}",
            f"{ours * 1e3:.1f}",
            f"{base * 1e3:.1f}",
            f"{ours / base:.2f}x",
            f"{radix * 1e3:.1f}",
        )
        del entropy, mask
    console = Console(width=120)
    console.print(table)
    console.print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; ratio = select_tokens / torch.topk"
    )


if __name__ == "__main__":
    main()
