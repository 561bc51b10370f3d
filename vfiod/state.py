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
class State:
    bindings: Mapping[str, BindingRecord] = dataclasses.field(default_factory=dict)

    def with_binding(self, record: BindingRecord) -> State:
        return dataclasses.replace(self, bindings={**self.bindings, record.address: record})

    def without_binding(self, address: str) -> State:
        rest = {a: r for a, r in self.bindings.items() if a != address}
        return dataclasses.replace(self, bindings=rest)


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
    return State(bindings)


def _encode(state: State) -> dict[str, Any]:
    return {
        "version": FORMAT_VERSION,
        "bindings": {
            address: {k: v for k, v in dataclasses.asdict(r).items() if k != "address"}
            for address, r in sorted(state.bindings.items())
        },
    }


class StateFile:
    def __init__(self, path: str = STATE_PATH) -> None:
        self.path = path

    def load(self) -> State:
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
                json.dump(_encode(state), f, indent=1)
                f.write("\n")
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

    def update(self, change: Callable[[State], State]) -> State:
        """Load, apply ``change``, save; return the new state."""
        new = change(self.load())
        self.save(new)
        return new
