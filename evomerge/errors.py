"""User-facing errors.

Every mistake a user can make (a bad recipe, a missing file, a shape clash)
raises :class:`EvomergeError`; the CLI prints its message on one line and exits
non-zero without a traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class EvomergeError(Exception):
    """An error caused by the user's input; ``str(err)`` is one line."""


class RecipeError(EvomergeError):
    """A merge recipe is malformed or inconsistent."""


class ModelError(EvomergeError):
    """A model directory or checkpoint file cannot be used."""


class MergeError(EvomergeError):
    """The merge itself failed (shape clash, non-finite result, ...)."""
