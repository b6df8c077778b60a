"""API keys for the server: a file maps each key to the models (adapters, or the base) it may use.

JSON `{"key-1": ["positive", "negative"], "admin": "*"}` or the same in TOML
(`key-1 = ["positive"]`). "*" grants every model, and only a "*" key may load or remove adapters.
"""

from __future__ import annotations

import hmac
import json
import tomllib
from dataclasses import dataclass
from pathlib import Path

from lorakit.errors import UsageError

ALL = "*"


@dataclass(frozen=True)
class Grant:
    """What one key may do."""

    models: frozenset[str]

    @property
    def admin(self) -> bool:
        """A "*" key: every model, and adapter loading/removal."""
        return ALL in self.models

    def allows(self, model: str) -> bool:
        """Whether this key may use `model`."""
        return self.admin or model in self.models


def load_api_keys(path: str | Path) -> dict[str, Grant]:
    """Read a keys file (JSON, or TOML by suffix); one UsageError listing every problem."""
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"API keys file {str(file)!r} does not exist: check --api-keys")
    text = file.read_text(encoding="utf-8")
    try:
        data = tomllib.loads(text) if file.suffix.lower() == ".toml" else json.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as err:
        kind = "TOML" if file.suffix.lower() == ".toml" else "JSON"
        raise UsageError(f"API keys file {str(file)!r} is not valid {kind}: {err}") from None
    if not isinstance(data, dict) or not data:
        raise UsageError(f'API keys file {str(file)!r} must map each key to a list of models (or "*")')
    keys, problems = {}, []
    for key, value in data.items():
        models = [value] if isinstance(value, str) else value
        if not isinstance(models, list) or not all(isinstance(m, str) and m for m in models):
            problems.append(f'key {key[:4]}...: the value must be "*" or a list of model names')
        elif len(key) < 8:
            problems.append(f"key {key[:4]}...: keys must be at least 8 characters")
        else:
            keys[key] = Grant(frozenset(models))
    if problems:
        raise UsageError(f"API keys file {str(file)!r}: " + "; ".join(problems))
    return keys


def find_grant(keys: dict[str, Grant], header: str | None) -> Grant | None:
    """The grant for an `Authorization: Bearer KEY` header, or None; compared in constant time."""
    if not header or not header.lower().startswith("bearer "):
        return None
    given = header[7:].strip().encode()
    found = None
    for key, grant in keys.items():  # no early exit: timing must not tell how many keys matched
        if hmac.compare_digest(key.encode(), given):
            found = grant
    return found
