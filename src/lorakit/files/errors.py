"""The error of adapter files, in its own module so that the parser (plan.py) and the folder
reader/writer (peft_format.py) both raise it without importing each other."""

from __future__ import annotations

from lorakit.errors import LorakitError


class AdapterError(LorakitError):
    """An adapter folder cannot be saved or loaded; the message says why and what to do."""
