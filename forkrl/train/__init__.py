"""forkrl.train: the RL loop. The package is callable: `forkrl.train(config, reward_fn=...)` is `forkrl.run`."""

import sys
import types


class _CallableModule(types.ModuleType):
    def __call__(self, config=None, reward_fn=None):
        from forkrl import run

        return run(config, reward_fn=reward_fn)


sys.modules[__name__].__class__ = _CallableModule
