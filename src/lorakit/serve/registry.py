"""The adapter registry: which adapters a server knows, which sit in slots, and LRU eviction.

Known adapters are validated folders; at most `max_resident` of them occupy slots of the
MultiLoraModel at once. `pin(name)` (one per running request) makes an adapter resident,
loading it on demand and evicting the least recently used unpinned one; `unpin` releases
it. The handle `pin` returns names the adapter version the request was admitted with: a
re-registration under the same name serves only later requests. HTTP threads call
register/remove/pin/unpin while an engine thread runs forwards.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path

from lorakit.files.peft_format import CONFIG_NAME, WEIGHTS_NAME, AdapterError
from lorakit.hf import read_card
from lorakit.serve.batched import AdapterPlan, MultiLoraModel, NoFreeSlotError, UnknownAdapterError
from lorakit.train.chat import TEMPLATE_FILE, read_template

log = logging.getLogger(__name__)
MAX_NAME = 128  # adapter names travel in URLs and logs
MAX_TEMPLATE = 1 << 20  # bytes of a chat template: real ones are a few KiB
CARD_FILE = "README.md"  # the lorakit model card: the task and the label names
# The files read_adapter opens (and the .bin it probes for a hint): each must resolve inside the root.
LOADER_FILES = (CONFIG_NAME, WEIGHTS_NAME, "adapter_model.bin")
# Everything register reads from a folder: the loader's files, the chat template, the card.
READ_FILES = (*LOADER_FILES, TEMPLATE_FILE, CARD_FILE)


@dataclass(frozen=True)
class AdapterInfo:
    """What a server needs from an adapter folder beyond its weights, read once per registration
    (a re-registration reads them again, so each version keeps its own)."""

    template: str | None  # chat_template.jinja: how the adapter was trained to see chat messages
    labels: list[str] | None  # a classifier's label names from its lorakit card (README.md)


def read_info(folder: Path) -> AdapterInfo:
    """The chat template and label names stored in an adapter folder (None for each one absent)."""
    file = folder / TEMPLATE_FILE
    if file.is_file() and file.stat().st_size > MAX_TEMPLATE:
        raise AdapterError(f"{folder}: its {TEMPLATE_FILE} is over {MAX_TEMPLATE} bytes; a chat template is smaller")
    try:
        template = read_template(folder)
    except UnicodeDecodeError:
        raise AdapterError(f"{folder}: its {TEMPLATE_FILE} is not UTF-8 text") from None
    labels = read_card(folder).get("labels")
    named = isinstance(labels, list) and all(isinstance(n, str | int) for n in labels)
    return AdapterInfo(template=template or None, labels=[str(n) for n in labels] if named else None)


class AdapterRegistry:
    """Adapters by name over one MultiLoraModel, with a bound on resident ones (LRU eviction).

    With `root` set, every registered path, and every file the loader opens in it, must lie
    under it (after resolving symlinks and `..`), checked again on each reload: a server that
    accepts paths from clients exposes only that folder. Adapters registered `trusted` (the
    operator's own, from the command line) are exempt from the root, never from validation.
    """

    def __init__(self, multi: MultiLoraModel, *, max_resident: int | None = None, root: str | Path | None = None):
        bound = multi.slots if max_resident is None else max_resident
        if not isinstance(bound, int) or not 1 <= bound <= multi.slots:
            raise AdapterError(f"max_resident={max_resident!r}: must be an integer in 1..{multi.slots} (the slots)")
        self.multi = multi
        self.max_resident = bound
        self.root = None if root is None else Path(root).resolve()
        self._lock = threading.RLock()  # held across on-demand loads: one registry change at a time
        self._paths: dict[str, Path] = {}  # known name -> folder
        self._info: dict[str, AdapterInfo] = {}  # known name -> its folder's template and labels
        self._lru: OrderedDict[str, None] = OrderedDict()  # resident names, least recently used first
        self._pins: Counter[str] = Counter()
        self._holds: dict[str, list[int]] = {}  # name -> MultiLoraModel.hold handles of its pins
        self._trusted: set[str] = set()  # names exempt from the root (operator-given)
        self._removing: set[str] = set()  # removed while pinned: unloaded at the last unpin

    def _check_path(self, path: str | Path, trusted: bool = False) -> Path:
        folder = Path(path)
        if self.root is None or trusted:
            return folder
        resolved = (folder if folder.is_absolute() else self.root / folder).resolve()
        self._inside_root(resolved, path)
        for file in READ_FILES:  # a file symlink can leave the root even when the folder does not
            if (resolved / file).is_symlink() or (resolved / file).exists():
                self._inside_root((resolved / file).resolve(), f"{path}/{file}")
        return resolved

    def _inside_root(self, resolved: Path, shown: str | Path) -> None:
        if not resolved.is_relative_to(self.root):
            raise AdapterError(f"{shown} is outside the adapter root {self.root}; put the adapter folder under it")

    def _prepare(self, folder: Path, trusted: bool) -> AdapterPlan:
        """Root checks and full validation, before every load: on register and on each reload."""
        folder = self._check_path(folder, trusted)
        if self.root is None or trusted:  # the operator's own folder: the full details help
            return self.multi.prepare(folder)
        try:
            return self.multi.prepare(folder)
        except AdapterError as err:  # a client-given folder: say what is wrong, never quote its files
            raise AdapterError(_without_contents(err, folder)) from None

    def register(self, name: str, path: str | Path, *, load_now: bool = True, trusted: bool = False) -> None:
        """Make adapter `name` known from folder `path` (validated now, against the model).

        With `load_now` it is also made resident (evicting the least recently used unpinned
        adapter when at the bound). The same name and path again does nothing; a new path
        replaces the adapter once the new folder has passed validation, for requests pinned
        after that (running ones keep the version they pinned). `trusted` exempts the folder
        from the root (for the operator's own adapters, never for client-given paths).
        """
        _check_name(name)
        folder = self._check_path(path, trusted)
        with self._lock:
            self._check_not_removing(name)
            if self._paths.get(name) == folder:
                if load_now and name not in self._lru:
                    self._make_resident(name)
                return
        plan = self._prepare(folder, trusted)  # reads files without the lock: pins go on meanwhile
        info = read_info(folder)
        with self._lock:
            self._check_not_removing(name)
            if name in self._lru:  # replace: the new slot is published, held old slots stay until released
                self._evict_for_one(keep=name, bound=len(self._lru) + 1)  # the new copy needs a slot first
                self.multi.load_plan(name, plan)
                self._lru.move_to_end(name)
            elif load_now:
                self._evict_for_one()
                self.multi.load_plan(name, plan)
                self._lru[name] = None
            self._paths[name], self._info[name] = folder, info
            (self._trusted.add if trusted else self._trusted.discard)(name)

    def remove(self, name: str) -> None:
        """Forget adapter `name`; running requests that pinned it finish on it first."""
        with self._lock:
            self._check_known(name)
            if self._pins[name] > 0:
                self._removing.add(name)
                return
            self._drop(name)

    def known(self) -> list[str]:
        """Registered adapters (resident or not), sorted."""
        with self._lock:
            return sorted(n for n in self._paths if n not in self._removing)

    def resident(self) -> list[str]:
        """Adapters in slots now, least recently used first."""
        with self._lock:
            return list(self._lru)

    def path_of(self, name: str) -> Path:
        """The folder adapter `name` is registered from."""
        with self._lock:
            self._check_known(name)
            return self._paths[name]

    def info(self, name: str) -> AdapterInfo:
        """The chat template and label names of the version of `name` registered now."""
        with self._lock:
            self._check_known(name)
            return self._info[name]

    def pin(self, name: str | None) -> int | None:
        """Hold adapter `name` resident for one request (None, the base, needs nothing).

        Loads it on demand, evicting the least recently used unpinned adapter; raises
        NoFreeSlotError when every resident adapter is pinned. Pins are counted. Returns the
        handle to give `MultiLoraModel.use` and `unpin`: the version of `name` registered now,
        kept for this request even if `name` is re-registered or removed before it ends.
        """
        if name is None:
            return None
        with self._lock:
            self._check_known(name)
            if name not in self._lru:
                self._make_resident(name)
            self._lru.move_to_end(name)
            handle = self.multi.hold(name)
            self._holds.setdefault(name, []).append(handle)
            self._pins[name] += 1
            return handle

    def unpin(self, pinned: int | str | None) -> None:
        """Release one pin taken with `pin`: give its handle (or the adapter's name)."""
        if pinned is None:
            return
        with self._lock:
            name, handle = self._find_pin(pinned)
            self._holds[name].remove(handle)
            if not self._holds[name]:
                del self._holds[name]
            self.multi.release(handle)
            self._pins[name] -= 1
            if self._pins[name] == 0:
                del self._pins[name]
                if name in self._removing:
                    self._drop(name)

    def pinned(self) -> dict[str, int]:
        """Pin counts of the pinned adapters."""
        with self._lock:
            return dict(self._pins)

    # --- internals (hold self._lock) -------------------------------------------------------
    def _check_known(self, name: str) -> None:
        if name not in self._paths or name in self._removing:
            raise UnknownAdapterError(f"adapter {name!r} is not registered; known: {self.known() or 'none'}")

    def _check_not_removing(self, name: str) -> None:
        if name in self._removing:
            raise AdapterError(f"adapter {name!r} is being removed (requests still use it); retry shortly")

    def _find_pin(self, pinned: int | str) -> tuple[str, int]:
        """(name, handle) of one pin: a handle names its own; a name means its newest pin."""
        if isinstance(pinned, str):
            if not self._holds.get(pinned):
                raise AdapterError(f"adapter {pinned!r} is not pinned; every unpin needs a pin")
            return pinned, self._holds[pinned][-1]
        for name, handles in self._holds.items():
            if pinned in handles:
                return name, pinned
        raise AdapterError(f"adapter handle {pinned!r} is not pinned; every unpin needs a pin")

    def _make_resident(self, name: str) -> None:
        # checked again: the folder (or a link in it) may have changed since it was registered
        plan = self._prepare(self._paths[name], name in self._trusted)
        self._evict_for_one()
        self.multi.load_plan(name, plan)
        self._lru[name] = None

    def _evict_for_one(self, keep: str | None = None, bound: int | None = None) -> None:
        """Free room for one more resident adapter, evicting least recently used unpinned ones
        (never `keep`). A slot can also be held by a running batch on a replaced adapter."""
        bound = self.max_resident if bound is None else bound
        while len(self._lru) >= bound or (self._lru and self.multi.free_slots() == 0):
            victim = next((n for n in self._lru if self._pins[n] == 0 and n != keep), None)
            if victim is None:
                raise NoFreeSlotError(
                    f"all {len(self._lru)} resident adapters are pinned by running requests "
                    f"({', '.join(self._lru)}); retry when one finishes, or raise max_resident"
                )
            del self._lru[victim]
            self.multi.unload(victim)

    def _drop(self, name: str) -> None:
        self._removing.discard(name)
        self._trusted.discard(name)
        del self._paths[name]
        self._info.pop(name, None)
        if name in self._lru:
            del self._lru[name]
            self.multi.unload(name)


def _check_name(name: object) -> None:
    """Names become URL path parts, log words and model ids: refuse what cannot be one."""
    if not isinstance(name, str) or not name:
        raise AdapterError(f"adapter name {name!r}: give a non-empty string")
    if name in (".", "..") or len(name) > MAX_NAME or not name.isprintable() or any(c in name for c in "/\\"):
        raise AdapterError(
            f"adapter name {name[:MAX_NAME]!r}: use at most {MAX_NAME} printable characters, "
            "no slashes, and not '.' or '..'"
        )


def _without_contents(err: AdapterError, folder: Path) -> str:
    """The client's error for a refused folder: what is wrong and where, never a value read from its files.

    The loader's messages quote config values, key names and fingerprints, which a link inside the
    root could make anything readable by the server; the operator gets the full text in the log.
    """
    log.warning("adapter folder %s refused: %s", folder, err)
    text = str(err)
    if text.startswith(f"{folder}: ") and ("is missing" in text or "no such adapter folder" in text):
        return text  # absent files: nothing was read
    if text.startswith(str(folder / CONFIG_NAME)):
        what = f"its {CONFIG_NAME} is not a valid LoRA adapter config"
    elif text.startswith(str(folder / WEIGHTS_NAME)):
        what = f"its {WEIGHTS_NAME} is not a readable safetensors file (truncated or corrupt)"
    else:
        what = "its weights do not fit this model (targets, shapes, ranks, DoRA or base fingerprint)"
    return f"{folder} cannot be served here: {what}; the server log has the details"
