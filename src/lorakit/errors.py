"""The one exception family users see: every message says what was wrong and how to fix it.

The `lorakit` command turns a LorakitError into one line on stderr and exit code 2; the
Python API lets it propagate (it is a ValueError, so existing `except ValueError` code works).
"""

from __future__ import annotations


class LorakitError(ValueError):
    """Bad input from the user (a path, a config value, a data file, an adapter); the message says why."""


class UsageError(LorakitError):
    """A command-line or config-file problem: a missing, unknown or mistyped option."""


class DataError(LorakitError):
    """A data file cannot be used: missing, empty, not UTF-8, malformed, unknown columns or labels."""
