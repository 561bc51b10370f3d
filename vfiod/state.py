"""State that must survive a crash or restart, in /run/vfiod/state.json.

Written atomically (temporary file, fsync, rename, fsync of the directory), so
a reader sees either the old or the new state, never half of one. Whatever
vfiod is about to change on the host is recorded here *before* it changes it.
"""

from __future__ import annotations

import dataclasses
import enum
import errno
import json
import os
import tempfile
from collections.abc import Callable, Mapping
from typing import Any

STATE_PATH = "/run/vfiod/state.json"
FORMAT_VERSION = 1


class StateError(OSError):
    def __str__(self) -> str:
        return str(self.strerror)


class BindPhase(enum.StrEnum):
    BINDING = "binding"  # recorded, host possibly half-changed
    BOUND = "bound"  # on the new driver
    RESTORE_FAILED = "restore-failed"  # tried to give it back, it did not come back


@dataclasses.dataclass(frozen=True)
class BindingRecord:
    """A device vfiod moved off its driver, and how to give it back."""

    address: str
    driver: str  # what vfiod bound it to
    original_driver: str | None
    original_override: str | None
    phase: BindPhase


@dataclasses.dataclass(frozen=True)
class LeaseRecord:
    """A lease vfiod granted: enough to find its owner, its groups and what to
    give back after a restart."""

    id: str
    uid: int
    pid: int | None  # of the caller, when it asked
    unit: str | None
    owner: str  # the bus name that asked
    owner_pid: int | None  # the process the lease follows (owner-pidfd), if any
    label: str
    backend: str
    unsafe: bool
    groups: tuple[str, ...]  # IOMMU group ids
    devices: tuple[str, ...]  # the addresses asked for
    rules: tuple[str, ...]  # the policy rules that allowed it
    created: float  # seconds since the epoch
    restore: bool  # give devices vfiod moved back to their drivers when free
    max_locked_memory: int | None = None
    moved: tuple[str, ...] = ()  # devices vfiod moved to vfio-pci for this lease
    fds: tuple[str, ...] = ()  # names of the fds vfiod holds for it (the fd store's FDNAMEs)
    iommu_type: int | None = None  # of its container (legacy)
    mappings: tuple[tuple[int, int], ...] = ()  # (IOVA, size) mapped through MapDma


@dataclasses.dataclass(frozen=True)
class State:
    bindings: Mapping[str, BindingRecord] = dataclasses.field(default_factory=dict)
    leases: Mapping[str, LeaseRecord] = dataclasses.field(default_factory=dict)

    def with_binding(self, record: BindingRecord) -> State:
        return dataclasses.replace(self, bindings={**self.bindings, record.address: record})

    def without_binding(self, address: str) -> State:
        rest = {a: r for a, r in self.bindings.items() if a != address}
        return dataclasses.replace(self, bindings=rest)

    def with_lease(self, record: LeaseRecord) -> State:
        return dataclasses.replace(self, leases={**self.leases, record.id: record})

    def without_lease(self, lease_id: str) -> State:
        rest = {i: r for i, r in self.leases.items() if i != lease_id}
        return dataclasses.replace(self, leases=rest)


def _decode(path: str, raw: Any) -> State:
    def bad(what: str) -> StateError:
        return StateError(
            errno.EINVAL,
            f"{path}: {what}; move it aside to start clean, after restoring the devices "
            "it lists to their drivers by hand",
        )

    if not isinstance(raw, dict) or raw.get("version") != FORMAT_VERSION:
        raise bad(f"not a vfiod state file of format {FORMAT_VERSION}")
    bindings: dict[str, BindingRecord] = {}
    for address, entry in raw.get("bindings", {}).items():
        try:
            record = BindingRecord(
                address=address,
                driver=str(entry["driver"]),
                original_driver=entry["original_driver"],
                original_override=entry["original_override"],
                phase=BindPhase(entry["phase"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise bad(f"binding {address!r} is malformed ({e})") from e
        bindings[address] = record
    leases: dict[str, LeaseRecord] = {}
    for lease_id, entry in raw.get("leases", {}).items():
        try:
            leases[lease_id] = _lease_record(lease_id, entry)
        except (KeyError, TypeError, ValueError) as e:
            raise bad(f"lease {lease_id!r} is malformed ({e})") from e
    return State(bindings, leases)


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _lease_record(lease_id: str, entry: Any) -> LeaseRecord:
    return LeaseRecord(
        id=lease_id,
        uid=int(entry["uid"]),
        pid=_optional_int(entry["pid"]),
        unit=None if entry["unit"] is None else str(entry["unit"]),
        owner=str(entry["owner"]),
        owner_pid=_optional_int(entry["owner_pid"]),
        label=str(entry["label"]),
        backend=str(entry["backend"]),
        unsafe=bool(entry["unsafe"]),
        groups=tuple(str(g) for g in entry["groups"]),
        devices=tuple(str(d) for d in entry["devices"]),
        rules=tuple(str(r) for r in entry["rules"]),
        created=float(entry["created"]),
        restore=bool(entry["restore"]),
        max_locked_memory=_optional_int(entry.get("max_locked_memory")),
        moved=tuple(str(d) for d in entry.get("moved", ())),
        fds=tuple(str(f) for f in entry.get("fds", ())),
        iommu_type=_optional_int(entry.get("iommu_type")),
        mappings=tuple((int(i), int(n)) for i, n in entry.get("mappings", ())),
    )


def _fields(record: BindingRecord | LeaseRecord, key: str) -> dict[str, Any]:
    """A record's fields but its key, shallowly (dataclasses.asdict deep-copies
    every value, and the records hold only strings, numbers and tuples)."""
    return {f.name: getattr(record, f.name) for f in dataclasses.fields(record) if f.name != key}


class _Lines:
    """The file's text: one binding or lease per line, so it stays readable,
    each written by json's C encoder (``indent=`` sends the whole file through
    json's pure-Python encoder: most of a save's time with a few dozen
    leases). Records are immutable, so a line is encoded once and reused
    while the same record object stays in the state."""

    def __init__(self) -> None:
        self._cache: dict[tuple[str, str], tuple[object, str]] = {}

    def _section(
        self,
        name: str,
        records: Mapping[str, BindingRecord | LeaseRecord],
        key: str,
        cache: dict[tuple[str, str], tuple[object, str]],
    ) -> str:
        lines = []
        for k, record in sorted(records.items()):
            cached = self._cache.get((name, k))
            if cached is None or cached[0] is not record:
                cached = (record, f"  {json.dumps(k)}: {json.dumps(_fields(record, key))}")
            cache[(name, k)] = cached
            lines.append(cached[1])
        return "{\n" + ",\n".join(lines) + "\n }" if lines else "{}"

    def text(self, state: State) -> str:
        cache: dict[tuple[str, str], tuple[object, str]] = {}
        bindings = self._section("bindings", state.bindings, "address", cache)
        leases = self._section("leases", state.leases, "id", cache)
        self._cache = cache
        return (
            f'{{\n "version": {FORMAT_VERSION},\n "bindings": {bindings},\n'
            f' "leases": {leases}\n}}\n'
        )


class StateFile:
    """The state file of this process. Only one vfiod runs at a time, so what
    this process last read or wrote is what is on disk: it is kept in memory
    and the file is read once."""

    def __init__(self, path: str = STATE_PATH) -> None:
        self.path = path
        self._cached: State | None = None
        self._lines = _Lines()

    def load(self) -> State:
        if self._cached is None:
            self._cached = self._read()
        return self._cached

    def _read(self) -> State:
        try:
            with open(self.path) as f:
                raw = json.load(f)
        except FileNotFoundError:
            return State()
        except json.JSONDecodeError as e:
            raise StateError(
                errno.EINVAL, f"{self.path}: not JSON ({e}); move it aside to start clean"
            ) from e
        return _decode(self.path, raw)

    def save(self, state: State) -> None:
        directory = os.path.dirname(self.path) or "."
        os.makedirs(directory, mode=0o700, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".state.", dir=directory)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(self._lines.text(state))
                f.flush()
                os.fsync(f.fileno())
            os.rename(tmp, self.path)
        except BaseException:
            os.unlink(tmp)
            raise
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        self._cached = state

    def update(self, change: Callable[[State], State]) -> State:
        """Load, apply ``change``, save; return the new state."""
        new = change(self.load())
        self.save(new)
        return new
