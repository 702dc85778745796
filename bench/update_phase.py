"""The trainer's update phase with the selective LM head on vs off, same rollout and seed.

Prints the median time of `forkrl.training.update.update` for each setting, the ratio, and checks
that both made the same selection and the same loss. By default on the shipped tiny model
(V = 98, where the LM head is a negligible share of the update); `--vocab 151936` builds a
random tiny model with a Qwen-size vocabulary to show where the selective head pays off.

    python bench/update_phase.py
    python bench/update_phase.py --vocab 151936 --hidden 256
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from forkrl.config import load_config
from forkrl.models.loading import DEFAULT_MODEL, load_model_and_tokenizer
from forkrl.rollout.hf import generate
from forkrl.tasks.pick import get_task
from forkrl.training.trainer import settings_from
from forkrl.training.update import group_advantages, score_rollout, update


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--vocab", type=int, default=0, help="0 = the shipped model; else a random model with V tokens"
    )
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--group", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, tok = load_model_and_tokenizer(DEFAULT_MODEL)
    task = get_task("pick")
    ro = generate(
        model,
        tok,
        [e.prompt for e in task.examples("train", args.prompts)],
        n=args.group,
        max_new_tokens=task.default_max_new_tokens,
        generator_seed=0,
    )
    if args.vocab:
        from forkrl.models.tiny import build_tiny_model

        model = build_tiny_model(args.vocab, hidden_size=args.hidden, seed=0)
    rewards = torch.tensor(
        [
            task.grade(t, e)
            for t, e in zip(
                ro.texts, [e for e in task.examples("train", args.prompts) for _ in range(args.group)]
            )
        ]
    )
    rewards[:: args.group] = 1.0 - rewards[:: args.group]  # every group has both outcomes
    results = {}
    for on in (False, True):
        cfg = load_config(None, [f"model.selective_head={on}", "rollout.reuse_logprobs=false"])
        s = settings_from(cfg, max_len=task.default_max_new_tokens)
        times, last = [], None
        for _ in range(args.repeats + 1):
            m = copy.deepcopy(model)
            opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0)
            batch = score_rollout(m, None, ro, s, overlong_filter=False)
            adv = group_advantages(rewards, ro.group_size, s)
            t0 = time.perf_counter()
            last = update(m, opt, sched, batch, adv, s, generator=torch.Generator().manual_seed(0))[0]
            times.append(time.perf_counter() - t0)
        results[on] = (statistics.median(times[1:]), last)
    (t_off, m_off), (t_on, m_on) = results[False], results[True]
    V = args.vocab or len(tok)
    print(
        f"update phase, {ro.response_ids.shape[0]} sequences, {int(ro.response_mask.sum())} response tokens, V = {V}"
    )
    print(f"{'selective head':>15} {'median s':>9} {'loss':>12} {'selected':>9}")
    for name, t, m in (("off", t_off, m_off), ("on", t_on, m_on)):
        print(f"{name:>15} {t:>9.3f} {m['loss']:>12.6g} {m['selected_tokens']:>9.0f}")
    print(f"time on/off = {t_on / t_off:.2f}; |loss on - loss off| = {abs(m_on['loss'] - m_off['loss']):.2e}")


if __name__ == "__main__":
    main()
