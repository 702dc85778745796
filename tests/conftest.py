"""Shared test setup: deterministic hypothesis, a small torch thread pool, seeded RNGs."""

import os

# Before torch is imported: spinning OpenMP waits make small ops crawl when processes share 2 cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import random  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

# Derandomized: the same examples on every run, so a red test is reproducible.
settings.register_profile(
    "forkrl",
    derandomize=True,
    deadline=None,
    max_examples=int(os.environ.get("FORKRL_HYPOTHESIS_EXAMPLES", "60")),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("forkrl")

# One thread: the tests' tensors are small, and results must not depend on the core count.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A random tiny Qwen3 + char tokenizer saved as a local HF checkpoint (seconds to build)."""
    from forkrl.models.tiny import build_char_tokenizer, build_tiny_model

    path = tmp_path_factory.mktemp("tiny")
    tok = build_char_tokenizer()
    model = build_tiny_model(
        len(tok), hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64, seed=0
    )
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def smollm2_dir():
    """The fetched SmolLM2-135M-Instruct folder (`bash scripts/setup.sh --test` fetches it). Without it
    the test skips and says so; under CI (CI=true, as .ci/run runs) or FORKRL_REQUIRE_SMOLLM2=1 it
    fails instead: the real-model tests must not be skipped there."""
    from forkrl.models.fetch import model_folder, source_file
    from forkrl.models.gguf import is_converted

    name = "smollm2-135m-instruct"
    if is_converted(model_folder(name)) and source_file(name).is_file():
        return model_folder(name)
    why = f"SmolLM2-135M-Instruct not fetched ({model_folder(name)}): run `bash scripts/setup.sh --test`"
    if os.environ.get("FORKRL_REQUIRE_SMOLLM2") == "1" or os.environ.get("CI") == "true":
        pytest.fail(why)
    pytest.skip(why)
