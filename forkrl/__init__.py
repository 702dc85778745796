"""forkrl: RLVR for language models on the forking (high-entropy) tokens.

Wang et al., 2025, "Beyond the 80/20 Rule: High-Entropy Minority Tokens Drive Effective
Reinforcement Learning for LLM Reasoning" (arXiv 2506.01939).

    import forkrl
    run_dir, summary = forkrl.train(["selection.rho=0.2", "train.steps=50"], reward_fn=my_reward)

`forkrl.train(...)` and `forkrl.run(...)` are the same call (`forkrl.train.run`); importing forkrl
loads neither torch nor the trainer until it is called.
"""

from __future__ import annotations

from forkrl import train
from forkrl.train import run

__version__ = "0.1.0"
__all__ = ["__version__", "run", "train"]
