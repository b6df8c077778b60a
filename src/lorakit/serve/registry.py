"""The adapter registry: which adapters a server knows, which sit in slots, and LRU eviction.

Known adapters are validated folders; at most `max_resident` of them occupy slots of the
MultiLoraModel at once. `pin(name)` (one per running request) makes an adapter resident,
loading it on demand and evicting the least recently used unpinned one; `unpin` releases
it. HTTP threads call register/remove/pin/unpin while an engine thread runs forwards.
"""

from __future__ import annotations

import threading
from collections import Counter, OrderedDict
from pathlib import Path

from lorakit.io import AdapterError
from lorakit.serve.batched import MultiLoraModel, NoFreeSlotError, UnknownAdapterError


class AdapterRegistry:
    """Adapters by name over one MultiLoraModel, with a bound on resident ones (LRU eviction).

    With `root` set, every registered path must lie under it (after resolving symlinks and
    `..`): a server that accepts paths from clients exposes only that folder.
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
        self._lru: OrderedDict[str, None] = OrderedDict()  # resident names, least recently used first
        self._pins: Counter[str] = Counter()
        self._removing: set[str] = set()  # removed while pinned: unloaded at the last unpin

    def _check_path(self, path: str | Path) -> Path:
        folder = Path(path)
        if self.root is None:
            return folder
        resolved = (folder if folder.is_absolute() else self.root / folder).resolve()
        if not resolved.is_relative_to(self.root):
            raise AdapterError(f"{path} is outside the adapter root {self.root}; put the adapter folder under it")
        return resolved

    def register(self, name: str, path: str | Path, *, load_now: bool = True) -> None:
        """Make adapter `name` known from folder `path` (validated now, against the model).

        With `load_now` it is also made resident (evicting the least recently used unpinned
        adapter when at the bound). The same name and path again does nothing; a new path
        replaces the adapter once the new folder has passed validation.
        """
        if not isinstance(name, str) or not name:
            raise AdapterError(f"adapter name {name!r}: give a non-empty string")
        folder = self._check_path(path)
        with self._lock:
            if name in self._removing:
                raise AdapterError(f"adapter {name!r} is being removed (requests still use it); retry shortly")
            if self._paths.get(name) == folder:
                if load_now and name not in self._lru:
                    self._make_resident(name)
                return
        plan = self.multi.prepare(folder)  # reads and checks files without the lock: pins go on meanwhile
        with self._lock:
            if name in self._removing:
                raise AdapterError(f"adapter {name!r} is being removed (requests still use it); retry shortly")
            if name in self._lru:  # replace in place: the engine never sees the name missing
                self._evict_for_one(keep=name, bound=len(self._lru) + 1)  # the new copy needs a slot first
                self.multi.load_plan(name, plan)
                self._lru.move_to_end(name)
            elif load_now:
                self._evict_for_one()
                self.multi.load_plan(name, plan)
                self._lru[name] = None
            self._paths[name] = folder

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

    def pin(self, name: str | None) -> None:
        """Hold adapter `name` resident for one request (None, the base, needs nothing).

        Loads it on demand, evicting the least recently used unpinned adapter; raises
        NoFreeSlotError when every resident adapter is pinned. Pins are counted.
        """
        if name is None:
            return
        with self._lock:
            self._check_known(name)
            if name not in self._lru:
                self._make_resident(name)
            self._lru.move_to_end(name)
            self._pins[name] += 1

    def unpin(self, name: str | None) -> None:
        """Release one pin of `name` taken with `pin`."""
        if name is None:
            return
        with self._lock:
            if self._pins[name] <= 0:
                raise AdapterError(f"adapter {name!r} is not pinned; every unpin needs a pin")
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

    def _make_resident(self, name: str) -> None:
        self._evict_for_one()
        self.multi.load(name, self._paths[name])
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
        del self._paths[name]
        if name in self._lru:
            del self._lru[name]
            self.multi.unload(name)
