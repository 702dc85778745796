"""Errors every layer may raise (this module imports nothing, so it sits below them all)."""


class ConfigError(ValueError):
    """A configuration key or value that cannot be used; the message says what is allowed.

    Raised by configuration (`forkrl.config`), and by the layers under it for a setting that they
    check (a model folder, a context length); `forkrl.config.ConfigError` is this class.
    """


class TrainingError(RuntimeError):
    """A run that cannot go on (non-finite weights, too many skipped steps); the message says why,
    which checkpoint is the newest good one, and what to change."""
