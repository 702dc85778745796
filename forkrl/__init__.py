"""forkrl: RLVR for language models on the forking (high-entropy) tokens.

Wang et al., 2025, "Beyond the 80/20 Rule: High-Entropy Minority Tokens Drive Effective
Reinforcement Learning for LLM Reasoning" (arXiv 2506.01939).

    import forkrl
    run_dir, summary = forkrl.train(["selection.rho=0.2", "train.steps=50"], reward_fn=my_reward)
"""

from __future__ import annotations

__version__ = "0.1.0"


def run(config=None, reward_fn=None):
    """Run RLVR and return (run folder, summary metrics).

    `config`: a `forkrl.config.Config`, a list of dotted overrides (`["selection.rho=0.1"]`), a dict of
    sections (`{"selection": {"rho": 0.1}}`), or None for the defaults. `reward_fn`: an optional
    callable `(prompts, completions, **row_fields) -> list[float]` (TRL's convention).
    """
    from forkrl.config import Config, load_config
    from forkrl.train.trainer import train as _train

    if config is None:
        config = load_config()
    elif isinstance(config, dict):
        config = load_config(values=config)
    elif isinstance(config, (list, tuple)):
        config = load_config(overrides=list(config))
    elif not isinstance(config, Config):
        raise TypeError(
            f"config must be a Config, a list of overrides or a dict, got {type(config).__name__}"
        )
    return _train(config, reward_fn=reward_fn)


# `forkrl.train` is also the subpackage `forkrl/train/`: importing it would replace a function of that
# name, so the subpackage itself is made callable (see forkrl/train/__init__.py) and calls `run`.
from forkrl import train  # noqa: E402,F401
