"""Exceptions. Anything a user can cause derives from :class:`UserError`.

The CLI turns a ``UserError`` into one line on stderr and exit code 2; any other
exception is our bug (exit code 1).
"""

from __future__ import annotations


class NetanatomyError(Exception):
    """Base class of every error netanatomy raises on purpose."""


class UserError(NetanatomyError):
    """Something the user supplied is wrong: a path, a file, an option."""


class LoadError(UserError):
    """A model file could not be read (missing, corrupt, hostile or unsupported)."""


class UnsafeFileError(LoadError):
    """A file would need code execution to load; it is refused, never run."""


class LayerError(NetanatomyError):
    """One layer cannot be analysed; the analysis records the reason and goes on."""


class NonFiniteWeightsError(LayerError):
    """A tensor holds NaN or Inf values."""
