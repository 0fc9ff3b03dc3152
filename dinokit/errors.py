"""dinokit's exception types.

Library code raises :class:`DinokitError` (or a subclass) for anything a user can cause: a missing
folder, an unreadable image, a checkpoint that does not fit. The message is one plain sentence; the
CLI prints it and exits with code 2, without a traceback.
"""

from __future__ import annotations


class DinokitError(Exception):
    """A problem with the user's input, explained in one sentence."""

    exit_code = 2


class CheckpointError(DinokitError):
    """A weights file that cannot be read, or that does not fit the requested model."""


class DataError(DinokitError):
    """A data folder, image or mask that cannot be used."""


class OutputExistsError(DinokitError):
    """An output that already holds results and would be overwritten."""


class FolderInUseError(OutputExistsError):
    """A run folder that another process is writing (it holds the folder's lock)."""


class ModelConfigError(DinokitError, ValueError):
    """A model option without a valid meaning, such as a patch size below 1 or an unknown mode."""
