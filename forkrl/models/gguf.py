"""GGUF checkpoints (llama.cpp's format) as `model.path`: converted once into a cached safetensors folder.

transformers reads a GGUF file offline (`from_pretrained(folder, gguf_file=NAME)`, with the `gguf`
package): it dequantises the tensors (Q4_1, Q8_0, ...) to floats and takes the tokenizer and its chat
template from the file's metadata. That takes ~20 s for a 135M model, so forkrl does it once and keeps
the result as a normal Hugging Face folder (`config.json`, `model.safetensors`, the tokenizer) under
`FORKRL_CACHE/gguf/NAME-SHA` (default `~/.cache/forkrl`), keyed by the file's SHA-256: a changed file is
converted again, an unchanged one is loaded from the cache. The folder is written beside its final place
and renamed into it, so an interrupted conversion leaves nothing that looks complete.

The loaded model still carries transformers' GGUF quantisation markers (`quantization_config`,
`hf_quantizer`), with which `save_pretrained` refuses ("not serializable"); the tensors are already
dequantised floats, so the markers are cleared before saving.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from forkrl.errors import ConfigError

MARKER = "forkrl-gguf.json"  # written last into a converted folder: its source file and SHA-256


def cache_root() -> Path:
    """Where forkrl keeps converted and fetched models: `FORKRL_CACHE`, else `~/.cache/forkrl`."""
    return Path(os.environ.get("FORKRL_CACHE") or Path.home() / ".cache" / "forkrl")


def sha256_of(path: Path) -> str:
    """The file's SHA-256, read once per process for an unchanged file: a run resolves `model.path`
    more than once, and a multi-GB GGUF takes seconds to hash."""
    st = Path(path).stat()
    return _sha256(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _sha256(path: str, size: int, mtime_ns: int, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def find_gguf(path: Path) -> Path | None:
    """The GGUF file `path` names: the file itself, or the one `.gguf` file of a folder that has no
    `config.json` (a Hugging Face folder is loaded as such); None when `path` is neither."""
    if path.is_file() and path.suffix.lower() == ".gguf":
        return path
    if not path.is_dir() or (path / "config.json").exists():
        return None
    files = sorted(p for p in path.iterdir() if p.suffix.lower() == ".gguf" and p.is_file())
    if len(files) > 1:
        names = ", ".join(p.name for p in files)
        raise ConfigError(
            f"model.path={str(path)!r} holds several GGUF files ({names}); name one: model.path={files[0]}"
        )
    return files[0] if files else None


def require_gguf(what: str) -> None:
    try:
        import gguf  # noqa: F401 - transformers' GGUF reader needs it
    except ImportError:
        raise ConfigError(
            f"{what} is a GGUF file: reading it needs the `gguf` package; pip install 'forkrl[gguf]'"
        ) from None


def converted_folder(file: Path, sha: str) -> Path:
    return cache_root() / "gguf" / f"{file.stem}-{sha[:16]}"


def is_converted(folder: Path) -> bool:
    return (folder / MARKER).is_file() and (folder / "config.json").is_file()


def convert_gguf(file: Path, out: Path | None = None, *, sha: str | None = None, log=None) -> Path:
    """A Hugging Face folder with `file`'s model, tokenizer and chat template, float32 safetensors:
    `out`, or the cache folder for the file's SHA-256; reused when already complete."""
    file = Path(file)
    sha = sha or sha256_of(file)
    out = Path(out) if out is not None else converted_folder(file, sha)
    if is_converted(out) and json.loads((out / MARKER).read_text()).get("sha256") == sha:
        return out
    require_gguf(str(file))
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if log is not None:
        log(f"forkrl: converting {file.name} (GGUF) into {out} once; later loads read that folder")
    hf_logging.disable_progress_bar()  # its carriage-return bars would fill logs
    try:
        model = AutoModelForCausalLM.from_pretrained(
            file.parent, gguf_file=file.name, dtype=torch.float32, local_files_only=True
        )
        tokenizer = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name, local_files_only=True)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ConfigError(
            f"model.path={str(file)!r}: transformers cannot read this GGUF file ({e})"
        ) from None
    # Dequantised already: drop the markers that make save_pretrained refuse.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / MARKER).write_text(json.dumps({"source": file.name, "sha256": sha}, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
