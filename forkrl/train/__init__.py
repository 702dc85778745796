"""forkrl.train: the RL loop (`forkrl.train.trainer`), and `run` to start it from Python.

`forkrl.train(config, reward_fn=...)` calls `run`. `forkrl.train` has to be this package, not a
function: Python binds a subpackage to its parent's attribute when it is first imported, and
`import forkrl.train.trainer as t` looks the package up there. So the package's module class gets a
`__call__` that calls `run`; everything else about the package is ordinary.
"""

from __future__ import annotations

import sys
import types


def run(config=None, reward_fn=None, *, resume: bool = False, overwrite: bool = False):
    """Run RLVR and return (run folder, summary metrics).

    `config`: a `forkrl.config.Config`, a list of dotted overrides (`["selection.rho=0.1"]`), a dict of
    sections (`{"selection": {"rho": 0.1}}`), or None for the defaults. `reward_fn`: an optional
    callable `(prompts, completions, **row_fields) -> list[float]` (TRL's convention). A run folder
    (`train.out_dir`) holds one run: `resume` continues the one there, `overwrite` replaces it.
    """
    import multiprocessing as mp

    from forkrl.config import Config, load_config
    from forkrl.train.trainer import train

    if mp.current_process().name.startswith("reward-"):  # set before a spawned child imports __main__
        raise RuntimeError(  # a script whose own reward's worker imports it again (forkrl.rewards.pool)
            "forkrl.train() was called in a reward worker process, which imported the script that "
            "defines the reward: put the call under `if __name__ == '__main__':`, or define the reward "
            "in a module of its own and import it into the script"
        )
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
    return train(config, reward_fn=reward_fn, resume=resume, overwrite=overwrite)


class _CallablePackage(types.ModuleType):
    def __call__(self, config=None, reward_fn=None, *, resume: bool = False, overwrite: bool = False):
        return run(config, reward_fn=reward_fn, resume=resume, overwrite=overwrite)


sys.modules[__name__].__class__ = _CallablePackage
