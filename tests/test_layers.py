"""No module of forkrl imports a higher layer (DESIGN.md: "nothing imports upward").

Layers, bottom to top: core/ (and errors.py) -> rewards/, tasks/, models/ -> rollout/ -> evaluate/ ->
config/ (read by training/ and above, reading core/'s registries) -> training/ -> analysis/ -> cli.py and the package's public entry points. Every import counts,
at module level or inside a function: a late import still runs upward when it runs.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "forkrl"

#: first component of a module's name below `forkrl.` -> its layer (higher may import lower)
LAYERS = {
    "core": 0,
    "errors": 0,
    "rewards": 1,
    "tasks": 1,
    "models": 1,
    "rollout": 2,
    "evaluate": 3,
    "config": 4,
    "training": 5,
    "analysis": 6,
    "cli": 7,
    "cli_eval": 7,
    "__main__": 7,
    "integrations": 7,  # bridges into other trainers (TRL): import core (and training.dist); nothing imports them
    "": 7,  # forkrl/__init__.py: the public API (`forkrl.train(...)`) sits on top
}
NAMES = {
    0: "core",
    1: "rewards/tasks/models",
    2: "rollout",
    3: "evaluate",
    4: "config",
    5: "training",
    6: "analysis",
    7: "cli/top level",
}


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> int:
    """The layer of `forkrl...` module `module`."""
    rest = module.split(".")[1:]
    key = rest[0] if rest else ""
    if key not in LAYERS:
        raise KeyError(f"forkrl.{key} has no layer: add it to LAYERS in tests/test_layers.py")
    return LAYERS[key]


def _is_module(name: str, root: Path) -> bool:
    path = root.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imports_of(path: Path, root: Path = ROOT) -> list[tuple[int, str, str]]:
    """(line, imported forkrl module, first line of the statement) of every import in the file, at any depth."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    source = path.read_text(encoding="utf-8")
    out = []
    for node in ast.walk(ast.parse(source, filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the file's package, `level - 1` packages up
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            # `from forkrl import training`: the submodule when there is one, else the package itself
            targets = [
                f"{base}.{a.name}" if _is_module(f"{base}.{a.name}", root) else base for a in node.names
            ]
        else:
            continue
        text = (ast.get_source_segment(source, node) or "").splitlines()[0]
        mine = dict.fromkeys(t for t in targets if t == "forkrl" or t.startswith("forkrl."))
        out += [(node.lineno, t, text) for t in mine]
    return out


def upward_imports(root: Path = ROOT) -> list[str]:
    """`file:line: import` for each import of a higher layer than the importing module's."""
    bad = []
    for path in sorted(root.rglob("*.py")):
        own = layer_of(module_name(path, root))
        for line, target, text in imports_of(path, root):
            if layer_of(target) > own:
                where = path.relative_to(root.parent)
                up = NAMES[layer_of(target)]
                bad.append(f"{where}:{line}: {text}  ({NAMES[own]} imports {target}, {up})")
    return bad


def test_every_module_has_a_layer():
    for path in ROOT.rglob("*.py"):
        layer_of(module_name(path))


def test_no_module_imports_a_higher_layer():
    bad = upward_imports()
    assert not bad, "imports that run up the layers of DESIGN.md:\n" + "\n".join(bad)


@pytest.mark.parametrize(
    "source, upward",
    [
        ("from forkrl.analysis.dump import dump_rollout\n", True),
        ("def f():\n    from forkrl.training.rollouts import call_reward\n", True),  # late imports count
        ("import forkrl.cli\n", True),
        ("from forkrl import run\n", True),  # the package's public API is the top layer
        ("from .. import training\n", True),  # relative: forkrl.training
        ("from forkrl.core.selection import select_tokens\n", False),
        ("from forkrl.tasks.base import Example\n", False),
        ("from .base import Rollout\n", False),
    ],
)
def test_the_check_finds_upward_imports_with_file_and_line(tmp_path, source, upward):
    root = tmp_path / "forkrl"
    for pkg in ("rollout", "training"):
        (root / pkg).mkdir(parents=True)
        (root / pkg / "__init__.py").write_text("")
    (root / "__init__.py").write_text("")
    (root / "rollout" / "x.py").write_text(source)
    bad = upward_imports(root)
    assert bool(bad) is upward
    if upward:
        assert bad[0].startswith(f"forkrl/rollout/x.py:{source.count(chr(10))}: ")
