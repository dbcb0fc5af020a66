"""The error types the command-line scripts turn into one ``error: ...`` line (:func:`atc.cli.run_cli`).

They live here, below everything that raises them, so that ``atc.cli``, ``atc.checkpoint`` and ``atc.data`` import
them without importing each other. Each is also importable from where it is raised (``atc.cli.ConfigError``,
``atc.checkpoint.CheckpointError``, ``atc.data.DatasetError``): the same classes.
"""

from __future__ import annotations

__all__ = ["ConfigError", "CheckpointError", "DatasetError", "CLI_ERRORS"]


class ConfigError(ValueError):
    """A bad command-line option or config value; raised before any heavy work with a message naming the fix."""


class CheckpointError(ConfigError):
    """A checkpoint that cannot be loaded into the model (missing file, other architecture)."""


class DatasetError(ValueError):
    """A dataset folder or file is missing or malformed; the message says what was expected where."""


#: What :func:`atc.cli.run_cli` reports as one line instead of a traceback.
CLI_ERRORS = (ConfigError, DatasetError, CheckpointError)
