"""The adapter card: what an adapter folder remembers about the run that made it.

It lives in the folder's README.md, where PEFT writes its model card: YAML front matter that
Hugging Face tools read (library_name, base_model, tags) plus one `lorakit:` line holding the
card as a JSON object. One JSON line keeps the file readable without a YAML parser and keeps
the cards of older lorakit versions (which held only "task" and "labels") readable too.

The base is stored so that it resolves on any machine: an absolute path, or a marker for a
model lorakit ships (the packaged MiniLM, the shipped SST-2 GPT), which resolves to that
model's folder in whichever install reads the card.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from lorakit.files.errors import AdapterError

CARD_FILE = "README.md"
CARD_KEY = "lorakit:"  # the front-matter line holding the card (JSON)
TEMPLATE_FILE = "chat_template.jinja"  # the name transformers (and lorakit train) give a chat template
PACKAGED = "lorakit-packaged:"  # base marker prefix: "lorakit-packaged:minilm", "lorakit-packaged:sst2-gpt"

_FRONT = "---"
_OURS = ("library_name:", "base_model:", "tags:", CARD_KEY)  # front-matter entries write_card owns


@dataclass(frozen=True)
class AdapterCard:
    """What an adapter folder says about its training run; every field may be unknown (None)."""

    task: str | None = None  # "classify" or "causal-lm"
    labels: list[str] | None = None  # classifier output names, in head-row order
    text_column: str | None = None
    label_column: str | None = None
    prompt_column: str | None = None
    completion_column: str | None = None
    chat_template: str | None = None  # file name of the chat template in the folder
    base: str | None = None  # absolute path, or a PACKAGED marker (see portable_base)
    base_fingerprint: str | None = None  # files.fingerprint of the adapted base modules
    lorakit_version: str | None = None

    def base_path(self) -> Path | None:
        """The base folder this card names, if it is here (see resolve_base)."""
        return resolve_base(self.base)

    def columns(self) -> dict[str, str]:
        """The data columns recorded (only those known), keyed like the commands' options."""
        names = ("text_column", "label_column", "prompt_column", "completion_column")
        return {n: getattr(self, n) for n in names if getattr(self, n)}

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_json(cls, data: Any, source: str) -> AdapterCard:
        """The card of a JSON object (unknown keys ignored: a newer lorakit may add some);
        AdapterError naming `source` when it is not an object or a field has the wrong type."""
        if not isinstance(data, dict):
            raise AdapterError(f"{source}: the {CARD_KEY} line is not a JSON object; fix it or train again")
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known and v is not None}
        for key, value in values.items():
            if key == "labels":
                ok = isinstance(value, list) and all(isinstance(n, str | int) for n in value)
                values[key] = [str(n) for n in value] if ok else value
            else:
                ok = isinstance(value, str)
            if not ok:
                kind = "a list of names" if key == "labels" else "a string"
                raise AdapterError(f"{source}: card field {key!r} must be {kind}, got {value!r}; fix it or train again")
        return cls(**values)


# --- where the base is --------------------------------------------------------------------------
def _packaged_models() -> dict[str, Path]:
    """The models lorakit ships, by marker name (only those installed here)."""
    from lorakit import defaults

    found = {}
    for name, where in (("minilm", defaults.default_model_path), ("sst2-gpt", defaults.default_causal_lm_path)):
        try:
            found[name] = where()
        except FileNotFoundError:
            continue
    return found


def portable_base(path: str | os.PathLike) -> str:
    """How a card records base folder `path`: the PACKAGED marker for a model lorakit ships
    (its folder differs per install), else the absolute path (the card is read from anywhere)."""
    folder = Path(path).resolve()
    for name, shipped in _packaged_models().items():
        if shipped.resolve() == folder:
            return PACKAGED + name
    return str(folder)


def resolve_base(base: str | None) -> Path | None:
    """The folder a card's `base` names, when it is a model folder here: a PACKAGED marker
    resolves to this install's copy; a path must hold config.json. None otherwise."""
    if not base:
        return None
    if base.startswith(PACKAGED):
        return _packaged_models().get(base[len(PACKAGED) :])
    folder = Path(base)
    return folder if (folder / "config.json").is_file() else None


# --- reading and writing ------------------------------------------------------------------------
def read_card(folder: str | os.PathLike) -> AdapterCard | None:
    """The card in `folder`'s README.md (a card of any lorakit version); None when the folder
    has no README or its README has no lorakit line (PEFT's own card, say). A malformed
    lorakit line is one AdapterError line. An old card's base is its front matter's base_model."""
    file = Path(folder) / CARD_FILE
    if not file.is_file():
        return None
    front = _front_matter(file.read_text(encoding="utf-8", errors="replace"))
    line = next((x for x in front if x.startswith(CARD_KEY)), None)
    if line is None:
        return None
    try:
        data = json.loads(line[len(CARD_KEY) :])
    except (ValueError, RecursionError):
        raise AdapterError(f"{file}: the {CARD_KEY} line is not valid JSON; fix it or train again") from None
    card = AdapterCard.from_json(data, str(file))
    if card.base is None:  # cards before the base was in the JSON kept it in base_model only
        card = replace(card, base=_base_model(front))
    return card


def write_card(folder: str | os.PathLike, card: AdapterCard) -> Path:
    """Write `card` as `folder`'s README.md, atomically. Front matter that others wrote there
    (PEFT, a user) is kept; library_name, base_model, tags and the lorakit line are replaced.
    The fingerprint and chat template are filled in from the folder when the card lacks them."""
    from lorakit import __version__
    from lorakit.files.atomic import replace_file

    folder = Path(folder)
    card = _completed(folder, card, __version__)
    file = folder / CARD_FILE
    old = file.read_text(encoding="utf-8", errors="replace") if file.is_file() else ""
    kept = _foreign_entries(_front_matter(old))
    front = [
        "library_name: peft",
        "tags: [lora, lorakit]",
        *([f"base_model: {json.dumps(card.base)}"] if card.base else []),
        *kept,
        f"{CARD_KEY} {json.dumps(card.to_json(), ensure_ascii=False)}",
    ]
    text = "\n".join([_FRONT, *front, _FRONT, "", _body(card)]) + "\n"
    return replace_file(file, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_training_card(
    folder: str | os.PathLike,
    task: str,
    labels: list[str] | None,
    base: str | os.PathLike,
    **recorded: str | None,
) -> Path:
    """What `lorakit train` writes: the card of a run on base folder `base` (recorded portably);
    `recorded` holds the AdapterCard fields it knows (the columns, chat_template)."""
    card = AdapterCard(task=task, labels=list(labels) if labels else None, base=portable_base(base), **recorded)
    return write_card(folder, card)


def _completed(folder: Path, card: AdapterCard, version: str) -> AdapterCard:
    extra: dict[str, Any] = {"lorakit_version": version}
    if card.base_fingerprint is None:
        extra["base_fingerprint"] = _file_fingerprint(folder)
    if card.chat_template is None and (folder / TEMPLATE_FILE).is_file():
        extra["chat_template"] = TEMPLATE_FILE
    return replace(card, **extra)


def _file_fingerprint(folder: Path) -> str | None:
    """The base fingerprint the adapter's safetensors file records (None when it has none)."""
    from safetensors import safe_open

    from lorakit.files.fingerprint import FINGERPRINT_KEY

    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        return None
    try:
        with safe_open(str(weights), framework="pt") as handle:
            return (handle.metadata() or {}).get(FINGERPRINT_KEY)
    except Exception:  # noqa: BLE001 - a damaged file is reported when it is loaded, not here
        return None


def _front_matter(text: str) -> list[str]:
    """The lines between the opening and closing `---` ([] when the text has no front matter)."""
    lines = text.splitlines()
    if not lines or lines[0].strip() != _FRONT:
        return []
    for end, line in enumerate(lines[1:], start=1):
        if line.strip() == _FRONT:
            return lines[1:end]
    return []


def _foreign_entries(front: list[str]) -> list[str]:
    """Front-matter lines not owned by write_card: top-level entries with their indented or
    list continuation lines."""
    kept, keep = [], False
    for line in front:
        if line[:1] not in (" ", "\t", "-") or not line:
            keep = not line.startswith(_OURS)
        if keep and line:
            kept.append(line)
    return kept


def _base_model(front: list[str]) -> str | None:
    line = next((x for x in front if x.startswith("base_model:")), None)
    if line is None:
        return None
    value = line[len("base_model:") :].strip()
    try:
        parsed = json.loads(value)
    except ValueError:
        return value or None
    return parsed if isinstance(parsed, str) else None


def _body(card: AdapterCard) -> str:
    labels = ", ".join(card.labels or []) or "n/a"
    return (
        f"# LoRA adapter ({card.task or 'unknown task'})\n\n"
        f"Made with lorakit {card.lorakit_version}. Base: {card.base or 'unknown'}. Labels: {labels}.\n"
    )
