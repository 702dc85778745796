"""`forkrl task export`: a built-in task's problems as TRL-format jsonl files."""

from __future__ import annotations

import sys


def _cmd_export(args) -> int:
    from forkrl.errors import ConfigError
    from forkrl.tasks.export import export_task
    from forkrl.tasks.registry import get_task

    if args.train < 1 or args.test < 1:
        raise ConfigError("--train and --test must be >= 1")
    try:
        task = get_task(args.task, level=args.level)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    for path in export_task(task, args.out, n_train=args.train, n_test=args.test, seed=args.seed):
        print(path)
    print(
        f"forkrl: train with `forkrl train data.path={args.out}/train.jsonl data.eval_path={args.out}/test.jsonl "
        "model.chat_template=true reward.fn=arith`, or load the files in TRL (load_dataset('json', ...))",
        file=sys.stderr,
    )
    return 0


def add_task_command(sub) -> None:
    t = sub.add_parser("task", help="export a built-in task's problems as TRL-format jsonl")
    tsub = t.add_subparsers(dest="task_cmd", required=True)
    e = tsub.add_parser(
        "export",
        help="train.jsonl and test.jsonl: prompt as chat messages, answer, and each problem's fields",
    )
    e.add_argument("task", choices=("arith", "pick"), help="the built-in task")
    e.add_argument("--level", default="add1", help="arith: add1, add2, mul1, word or mix")
    e.add_argument("--out", required=True, help="output folder")
    e.add_argument("--train", type=int, default=5000, help="training problems (seeded draws)")
    e.add_argument("--test", type=int, default=240, help="held-out problems (the fixed held-out list)")
    e.add_argument("--seed", type=int, default=0, help="seed of the training draws")
    e.set_defaults(func=_cmd_export)
