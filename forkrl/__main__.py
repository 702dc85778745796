"""`python -m forkrl`: the `forkrl` command.

`python -m` puts the working directory first on sys.path, so a file there named like a module forkrl
imports later (`tensorboard.py` in a run folder, `yaml.py`) would be imported instead of the library.
forkrl's own imports must resolve as they do under the console script: the working directory is
dropped from sys.path first. A user's reward module in the working directory is still found
(`reward.fn=my_rewards:fn`: forkrl.rewards.registry adds the folder for that import alone, as the
console script does).
"""

import os
import sys

_cwd = os.path.realpath(os.getcwd())
sys.path[:] = [p for p in sys.path if p != "" and os.path.realpath(p) != _cwd]

from forkrl.cli import main  # noqa: E402

sys.exit(main())
