"""The decode step's LM head on CPU: (A, E) @ (E, V) against (V, E) @ (E, A) and a transpose copy.

At a decode step the LM head multiplies a few rows (A = the rows still sampling) by the (V, E) weight.
MKL's kernel for x @ W.T with few rows is far from the memory bandwidth the weight needs; computing
W @ x.T into a (V, A) block and copying its transpose into the (A, V) logits is faster at large
vocabularies and wide models in float32, and slower in bfloat16, for narrow models and for one row.
This measures both, alternating within each repeat (the machine's noise hits both), and prints the
medians and their ratio per shape: the table behind `forkrl.rollout.lean.head_transposed`'s rule
(HEAD_T_ROWS, HEAD_T_MIN_HIDDEN, HEAD_T_MIN_VOCAB), which marks the shapes where it is used.

The two give the same products up to float rounding (each logit is one length-E dot product; the
order of its additions may differ between the two kernels).

    python bench/decode_head.py                    # ~2 minutes on 2 CPUs
    python bench/decode_head.py --repeats 9 --threads 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # no spinning barriers on a shared machine

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from forkrl.rollout.lean import head_transposed  # noqa: E402

SHAPES = (  # (V, E, dtype)
    (151_936, 512, torch.float32),  # Qwen3's vocabulary, the real-shapes benchmark model
    (151_936, 1024, torch.float32),  # Qwen3-0.6B's width
    (151_936, 64, torch.float32),  # narrow
    (32_000, 512, torch.float32),  # Llama-2's vocabulary
    (8_192, 256, torch.float32),  # small vocabulary
    (151_936, 512, torch.bfloat16),
)
ROWS = (1, 2, 4, 16, 64)


def _time(fn, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n * 1e3


def measure(V: int, E: int, dtype: torch.dtype, A: int, repeats: int, calls: int) -> tuple[float, float]:
    """Median milliseconds per call of (plain, transposed) for one shape."""
    g = torch.Generator().manual_seed(0)
    W = (torch.randn(V, E, generator=g) * 0.02).to(dtype)
    x = torch.randn(A, E, generator=g).to(dtype)
    out, out_t = torch.empty(A, V, dtype=dtype), torch.empty(V, A, dtype=dtype)

    def plain():
        torch.mm(x, W.t(), out=out)

    def transposed():
        out.copy_(torch.mm(W, x.t(), out=out_t).t())

    plain(), transposed()  # warm-up
    a, b = [], []
    for _ in range(repeats):
        a.append(_time(plain, calls))
        b.append(_time(transposed, calls))
    return statistics.median(a), statistics.median(b)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--calls", type=int, default=5, help="calls per timing")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    con = Console(width=120)
    tab = Table(
        title=f"decode-step LM head, {args.threads} threads: median ms per call over {args.repeats} repeats"
    )
    for col in ("V", "E", "dtype", "rows", "x @ W.T", "(W @ x.T).T", "speed-up", "forkrl uses"):
        tab.add_column(col, justify="right")
    for V, E, dtype in SHAPES:
        for A in ROWS:
            a, b = measure(V, E, dtype, A, args.repeats, args.calls)
            used = "transposed" if head_transposed(torch.empty(V, E, dtype=dtype), A) else "plain"
            tab.add_row(
                str(V),
                str(E),
                str(dtype).removeprefix("torch."),
                str(A),
                f"{a:.2f}",
                f"{b:.2f}",
                f"{a / b:.2f}x",
                used,
            )
    con.print(tab)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
