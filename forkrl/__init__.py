"""forkrl: RLVR for language models on the forking (high-entropy) tokens.

Wang et al., 2025, "Beyond the 80/20 Rule: High-Entropy Minority Tokens Drive Effective
Reinforcement Learning for LLM Reasoning" (arXiv 2506.01939).

    import forkrl

    trainer = forkrl.Trainer(["train.steps=20"], model=model, tokenizer=tok, train_dataset=ds,
                             reward_funcs=[correct, short], reward_weights=[1.0, 0.1])
    metrics = trainer.step()          # one RL step; a dict of its metrics
    summary = trainer.train()         # the remaining steps, final/ and summary.json

    run_dir, summary = forkrl.train(["selection.rho=0.2", "train.steps=50"], reward_fn=my_reward)

`forkrl.train(...)` (also `forkrl.run(...)`) is `Trainer(...).train()` from a config alone, as
`forkrl train` runs it. Importing forkrl loads neither torch nor the trainer until one is used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["Config", "Trainer", "__version__", "load_config", "run", "train"]

if TYPE_CHECKING:
    from forkrl.config import Config, load_config
    from forkrl.training.trainer import Trainer


def train(config=None, reward_fn=None, *, resume: bool = False, overwrite: bool = False):
    """Run RLVR to the end and return (run folder, summary metrics): `forkrl train` from Python.

    `config`: a `forkrl.Config`, a list of dotted overrides (`["selection.rho=0.1"]`), a dict of sections
    (`{"selection": {"rho": 0.1}}`), or None for the defaults. `reward_fn`: an optional callable
    `(prompts, completions, **row_fields) -> list[float]` (TRL's convention). A run folder
    (`train.out_dir`) holds one run: `resume` continues the one there, `overwrite` replaces it.
    For a model object, a dataset or several weighted rewards, use `forkrl.Trainer`.
    """
    from forkrl.training.trainer import Trainer

    with Trainer(config, reward_funcs=reward_fn, resume=resume, overwrite=overwrite) as trainer:
        summary = trainer.train()
    return trainer.run_dir, summary


run = train


def __getattr__(name: str):  # Config, load_config and Trainer, imported when first used
    if name in ("Config", "load_config"):
        import forkrl.config as config

        return getattr(config, name)
    if name == "Trainer":
        from forkrl.training.trainer import Trainer

        return Trainer
    raise AttributeError(f"module 'forkrl' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
