"""The ComposerError hierarchy: every failure a user can cause or fix, each with a message that says what to do."""
from __future__ import annotations


class ComposerError(Exception):
    """Base class. The CLI prints these as one line and exits non-zero; anything else is a bug."""

    exit_code = 1


class RecipeError(ComposerError, ValueError):
    """The recipe is malformed, names an unknown key or method, or asks for something impossible."""


class SourceError(ComposerError, FileNotFoundError):
    """A source model cannot be found or lacks what the recipe needs (a tensor, a layer, weights)."""


class CorruptFileError(ComposerError, ValueError):
    """A safetensors file or index is truncated, malformed or inconsistent."""


class PlanError(ComposerError, ValueError):
    """The sources do not fit together as the recipe asks (shapes, layer counts, architectures)."""


class OutputError(ComposerError, OSError):
    """The destination cannot be written: not empty, inside a source, or too little free space."""


class HubError(SourceError):
    """A model named by Hub id cannot be resolved: no such repo or revision, no access, not cached while offline."""


class PushError(ComposerError, ConnectionError):
    """The output could not be uploaded to the Hub: no write access, offline, or the upload was interrupted."""
