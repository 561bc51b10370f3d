"""State that must survive a crash or restart, in /run/vfiod/state.json and
its journal, /run/vfiod/state.json.journal.

A change (a lease or a binding recorded or dropped) is one line appended to
the journal and fsync'd: its cost does not grow with the number of leases.
Now and then (once the journal holds more lines than twice the records) the
whole state is written as a snapshot, atomically (temporary file, fsync,
rename, fsync of the directory), then a new journal is put in place the same
way. Reading replays the journal over the snapshot. A journal left from
before the snapshot (vfiod killed between the two renames) says nothing the
snapshot does not: replaying it gives the snapshot again, as each line sets
or drops one record and the snapshot is what they made. A line cut short at
the end (vfiod killed while appending it) was never acted on: it is ignored.
Whatever vfiod is about to change on the host is recorded *before* it
changes it.

Read defensively: whatever the file holds, loading it does not fail (vfiod
must start to give devices back, and a daemon that dies on its own state file
dies again at every restart). Only a regular file of at most ``MAX_SIZE``
bytes is read (a FIFO, a device node, a symbolic link or a directory at the
path is not opened). Every field of every record is checked; a record that
is intact is kept, one that is not is dropped with a problem that names it
and says what was wrong, and a file that is not a state file at all (not
UTF-8, not JSON, another format version) gives no records. When anything was
dropped the damaged file is kept next to it as ``state.json.corrupt-<UTC
time>``, a new file holding the intact records takes its place, and a warning
with ``MESSAGE_ID`` ``MESSAGE_STATE_REPAIRED`` says what was lost and where
the damaged file went.

What does fail is an error that says nothing about the file's content: it
cannot be read at all (EACCES, EIO, ...), or the damaged file cannot be moved
aside or the repaired one written. vfiod must not then carry on as if the
file had said nothing: its next save would overwrite the records of devices
it moved. That is a ``StateError`` naming the path.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import enum
import errno
import itertools
import json
import logging
import math
import os
import re
import stat
import tempfile
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

from vfiod.files import NotRegularError, TooLargeError, read_regular
from vfiod.pci import AddressError, PciAddress
from vfiod.vfio.abi import IommuType

log = logging.getLogger(__name__)

STATE_PATH = "/run/vfiod/state.json"
FORMAT_VERSION = 1
JOURNAL_SUFFIX = ".journal"
JOURNAL_VERSION = 1
# A snapshot is written once the journal holds more lines than this, and than
# twice the records: each line is then paid for about twice, whatever the
# number of leases.
COMPACT_AFTER = 256
# A state file with a few dozen leases is tens of kB; parsing JSON takes many
# times its size in memory, so a larger file is refused unread.
MAX_SIZE = 16 * 1024 * 1024
# Journal MESSAGE_ID of "the state file was damaged and has been repaired"
# (stable; the audit trail's ids are in vfiod/broker.py).
MESSAGE_STATE_REPAIRED = "3f9b6e2d8c1a4d7e9b05c2a6f4e8d1b3"
# At most this many problems are kept and logged; the rest are counted.
MAX_PROBLEMS = 100


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
    # The record was lost (a damaged state file) and rebuilt from a lease's
    # list of moved devices: give it back to whichever driver takes it.
    original_unknown: bool = False


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
    # The fd store's FDNAMEs of the fds vfiod holds for it: a short name of
    # its own (vfiod.store_names), or from an older vfiod the lease's id, or
    # one name per fd ("<id>.container", "<id>.group.4").
    fds: tuple[str, ...] = ()
    iommu_type: int | None = None  # of its container (legacy)
    mappings: tuple[tuple[int, int], ...] = ()  # (IOVA, size) mapped through MapDma
    gids: tuple[int, ...] = ()  # of the caller, as the bus gave them
    slices: tuple[str, ...] = ()  # of the caller's unit, as systemd vouched for them


@dataclasses.dataclass(frozen=True)
class State:
    bindings: Mapping[str, BindingRecord] = dataclasses.field(default_factory=dict)
    leases: Mapping[str, LeaseRecord] = dataclasses.field(default_factory=dict)

    def with_binding(self, record: BindingRecord) -> State:
        return dataclasses.replace(self, bindings={**self.bindings, record.address: record})

    # (Copies made by dict(), in C: a comprehension cost a change at 10,000
    # leases more than the rest of a warm Acquire.)
    def without_binding(self, address: str) -> State:
        rest = dict(self.bindings)
        rest.pop(address, None)
        return dataclasses.replace(self, bindings=rest)

    def with_lease(self, record: LeaseRecord) -> State:
        return dataclasses.replace(self, leases={**self.leases, record.id: record})

    def without_lease(self, lease_id: str) -> State:
        rest = dict(self.leases)
        rest.pop(lease_id, None)
        return dataclasses.replace(self, leases=rest)


# --- Reading -----------------------------------------------------------------

T = TypeVar("T")
R = TypeVar("R")

# What vfiod writes, and so all it accepts back.
_BACKENDS = ("legacy", "iommufd")  # vfiod.broker.Backend
# A PCI driver's name (/sys/bus/pci/drivers/<name>, modprobe's argument): no
# path separator, no option, no "." or "..".
_DRIVER = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,63}")
# secrets.token_hex(8) in the broker; also an element of a D-Bus object path.
_LEASE_ID = re.compile(r"[A-Za-z0-9_]{1,64}")
_GROUP_ID = re.compile(r"0|[1-9][0-9]{0,9}")  # /sys/kernel/iommu_groups/<id>
_UNIT = re.compile(r"[A-Za-z0-9:_.\\@-]{1,255}")  # a systemd unit name
_BUS_NAME = re.compile(  # a unique (":1.42") or well-known D-Bus name
    r"(?=.{1,255}\Z)(?::[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)+"
    r"|[A-Za-z_-][A-Za-z0-9_-]*(?:\.[A-Za-z_-][A-Za-z0-9_-]*)+)"
)
_UINT32_MAX = 2**32 - 1
_UINT64_MAX = 2**64 - 1
_PID_MAX = 4194304  # PID_MAX_LIMIT of a 64-bit kernel


def _fd_name(lease_id: str) -> re.Pattern[str]:
    """The names vfiod gives a lease's fds in the fd store (LeaseRecord.fds):
    a short one (vfiod.store_names), or an older vfiod's, made of the lease's
    id. (Two records naming the same short name: the broker adopts the fds
    for one of them only.)"""
    return re.compile(
        r"[0-9A-Za-z_-]{1,3}|"
        + re.escape(lease_id)
        + r"(?:\.(?:container|iommufd|owner|group\.(?:noiommu-)?(?:0|[1-9][0-9]{0,9})))?"
    )


class _InvalidError(ValueError):
    """What is wrong with a record, or with one of its fields."""


class _DamagedError(Exception):
    """What is wrong with the file as a whole: it gives no records."""


class _Object(dict[str, Any]):
    """A JSON object, knowing the keys it had more than once (json keeps the
    last value of a repeated key; here a repeated key is a doubtful record)."""

    duplicates: frozenset[str] = frozenset()


def _object(pairs: list[tuple[str, Any]]) -> _Object:
    obj = _Object(pairs)
    if len(obj) != len(pairs):
        counts = collections.Counter(k for k, _ in pairs)
        obj.duplicates = frozenset(k for k, n in counts.items() if n > 1)
    return obj


@dataclasses.dataclass(frozen=True)
class _BigNumber:
    """An integer too long to be any field (json would parse it, or fail
    on the whole file past 4300 digits)."""

    digits: int


def _parse_int(text: str) -> int | _BigNumber:
    return int(text) if len(text) <= 21 else _BigNumber(len(text))


def _show(text: str, limit: int = 60) -> str:
    return repr(text) if len(text) <= limit else repr(text[:limit]) + "..."


def _describe(value: object) -> str:
    """A short description of a JSON value, for a problem (never the whole
    value: it may be huge or nested deep)."""
    if isinstance(value, str):
        text = _show(value)
    elif value is None or isinstance(value, bool | int | float):
        text = json.dumps(value)
    elif isinstance(value, _BigNumber):
        text = f"a number of {value.digits} digits"
    elif isinstance(value, list):
        text = f"a list of {len(value)} item(s)"
    elif isinstance(value, dict):
        text = "an object"
    else:
        text = type(value).__name__
    return text


def _invalid(value: object, expected: str) -> _InvalidError:
    return _InvalidError(f"is {_describe(value)}, expected {expected}")


def _integer(low: int, high: int) -> Callable[[object], int]:
    def check(value: object) -> int:
        if type(value) is not int or not low <= value <= high:
            raise _invalid(value, f"an integer from {low} to {high}")
        return value

    return check


def _optional(check: Callable[[object], T]) -> Callable[[object], T | None]:
    def optional(value: object) -> T | None:
        return None if value is None else check(value)

    return optional


def _boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise _invalid(value, "true or false")
    return value


def _matching(pattern: re.Pattern[str], expected: str) -> Callable[[object], str]:
    def check(value: object) -> str:
        if not isinstance(value, str) or not pattern.fullmatch(value):
            raise _invalid(value, expected)
        return value

    return check


def _printable(limit: int, *, spaces: bool) -> Callable[[object], str]:
    def check(value: object) -> str:
        if (
            not isinstance(value, str)
            or len(value) > limit
            or not value.isprintable()
            or (not spaces and (not value or any(c.isspace() for c in value)))
        ):
            words = "printable text" if spaces else "a printable name without spaces"
            raise _invalid(value, f"{words} of at most {limit} characters")
        return value

    return check


def _phase(value: object) -> BindPhase:
    if not isinstance(value, str) or value not in {p.value for p in BindPhase}:
        raise _invalid(value, "one of " + ", ".join(p.value for p in BindPhase))
    return BindPhase(value)


def _backend(value: object) -> str:
    if not isinstance(value, str) or value not in _BACKENDS:
        raise _invalid(value, "one of " + ", ".join(_BACKENDS))
    return value


def _iommu_type(value: object) -> int:
    if type(value) is not int or value not in {t.value for t in IommuType}:
        raise _invalid(value, "one of " + ", ".join(str(t.value) for t in IommuType))
    return value


def _created(value: object) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value < 0
    ):
        raise _invalid(value, "a time in seconds since the epoch")
    return float(value)


def _address(notes: list[str], where: str) -> Callable[[object], str]:
    """A PCI address, as the kernel writes it; another spelling of one (short,
    upper case) is read as that address, and ``notes`` says so."""

    def check(value: object) -> str:
        if not isinstance(value, str) or len(value) > 64:
            raise _invalid(value, "a PCI address like 0000:00:10.0")
        try:
            address = str(PciAddress.parse(value))
        except AddressError:
            raise _invalid(value, "a PCI address like 0000:00:10.0") from None
        if address != value:
            notes.append(f"{where} {_show(value)} read as {address}")
        return address

    return check


def _items(check: Callable[[object], T], *, nonempty: bool) -> Callable[[object], tuple[T, ...]]:
    def items(value: object) -> tuple[T, ...]:
        if not isinstance(value, list) or (nonempty and not value):
            raise _invalid(value, "a non-empty list" if nonempty else "a list")
        result: list[T] = []
        for i, item in enumerate(value):
            try:
                checked = check(item)
            except _InvalidError as e:
                raise _InvalidError(f"item {i} {e}") from None
            if checked in result:
                raise _InvalidError(f"item {i} ({_describe(item)}) is listed twice")
            result.append(checked)
        return tuple(result)

    return items


def _mappings(value: object) -> tuple[tuple[int, int], ...]:
    """(IOVA, size) pairs of MapDma: inside the 64-bit IOVA space, none empty,
    none overlapping another."""
    if not isinstance(value, list):
        raise _invalid(value, "a list of [IOVA, size] pairs")
    pairs: list[tuple[int, int]] = []
    for i, item in enumerate(value):
        if (
            not isinstance(item, list)
            or len(item) != 2
            or type(item[0]) is not int
            or type(item[1]) is not int
            or not 0 <= item[0] <= _UINT64_MAX
            or not 0 < item[1] <= _UINT64_MAX + 1 - item[0]
        ):
            raise _InvalidError(f"item {i} {_invalid(item, 'an [IOVA, size] pair in 64 bits')}")
        pairs.append((item[0], item[1]))
    ordered = sorted(pairs)
    for (iova, size), (after, _) in itertools.pairwise(ordered):
        if iova + size > after:
            raise _InvalidError(f"overlap at IOVA {after:#x}")
    return tuple(pairs)


_MISSING: Any = object()


class _Entry:
    """The fields of one record, checked one at a time."""

    def __init__(self, entry: object, known: tuple[str, ...], notes: list[str]) -> None:
        if not isinstance(entry, dict):
            raise _InvalidError(f"it is {_describe(entry)}, not an object")
        twice: frozenset[str] = getattr(entry, "duplicates", frozenset())
        if twice:
            raise _InvalidError(f"its field {_show(min(twice))} appears twice")
        unknown = sorted(k for k in entry if k not in known)
        if unknown:
            shown = ", ".join(_show(k) for k in unknown[:5])
            notes.append(f"ignored unknown field(s) {shown}" + (", ..." if unknown[5:] else ""))
        self.entry: dict[str, Any] = entry

    def get(self, name: str, check: Callable[[object], T], default: T = _MISSING) -> T:
        if name not in self.entry:
            if default is _MISSING:
                raise _InvalidError(f"its field {name!r} is missing")
            return default
        try:
            return check(self.entry[name])
        except _InvalidError as e:
            raise _InvalidError(f"{name} {e}") from None


_driver = _matching(_DRIVER, "a driver name like vfio-pci")
_BINDING_FIELDS = tuple(f.name for f in dataclasses.fields(BindingRecord) if f.name != "address")
_LEASE_FIELDS = tuple(f.name for f in dataclasses.fields(LeaseRecord) if f.name != "id")


def _binding_record(key: str, entry: object, notes: list[str]) -> tuple[str, BindingRecord]:
    try:
        address = _address(notes, "its key")(key)
    except _InvalidError as e:
        raise _InvalidError(f"its key {e}") from None
    fields = _Entry(entry, _BINDING_FIELDS, notes)
    return address, BindingRecord(
        address=address,
        driver=fields.get("driver", _driver),
        original_driver=fields.get("original_driver", _optional(_driver)),
        original_override=fields.get("original_override", _optional(_driver)),
        phase=fields.get("phase", _phase),
        original_unknown=fields.get("original_unknown", _boolean, False),
    )


def _lease_record(key: str, entry: object, notes: list[str]) -> tuple[str, LeaseRecord]:
    if not _LEASE_ID.fullmatch(key):
        raise _InvalidError("its key is not a lease id (letters, digits and _)")
    fields = _Entry(entry, _LEASE_FIELDS, notes)
    pid = _optional(_integer(1, _PID_MAX))
    fd_name = _matching(_fd_name(key), f"a name of this lease's fds: {key}")
    return key, LeaseRecord(
        id=key,
        uid=fields.get("uid", _integer(0, _UINT32_MAX - 1)),
        pid=fields.get("pid", pid),
        unit=fields.get("unit", _optional(_matching(_UNIT, "a systemd unit name"))),
        owner=fields.get("owner", _matching(_BUS_NAME, "a D-Bus name like :1.42")),
        owner_pid=fields.get("owner_pid", pid),
        label=fields.get("label", _printable(256, spaces=True)),
        backend=fields.get("backend", _backend),
        unsafe=fields.get("unsafe", _boolean),
        groups=fields.get(
            "groups", _items(_matching(_GROUP_ID, "an IOMMU group number"), nonempty=True)
        ),
        devices=fields.get("devices", _items(_address(notes, "devices:"), nonempty=True)),
        rules=fields.get("rules", _items(_printable(256, spaces=False), nonempty=False)),
        created=fields.get("created", _created),
        restore=fields.get("restore", _boolean),
        max_locked_memory=fields.get(
            "max_locked_memory", _optional(_integer(0, _UINT64_MAX)), None
        ),
        moved=fields.get("moved", _items(_address(notes, "moved:"), nonempty=False), ()),
        fds=fields.get("fds", _items(fd_name, nonempty=False), ()),
        iommu_type=fields.get("iommu_type", _optional(_iommu_type), None),
        mappings=fields.get("mappings", _mappings, ()),
        gids=fields.get("gids", _items(_integer(0, _UINT32_MAX - 1), nonempty=False), ()),
        slices=fields.get(
            "slices", _items(_matching(_UNIT, "a systemd slice name"), nonempty=False), ()
        ),
    )


class _Problems:
    """What is wrong, up to MAX_PROBLEMS of it; the rest only counted (a file
    of junk records would otherwise say many times its size)."""

    def __init__(self) -> None:
        self.kept: list[str] = []
        self.more = 0

    def append(self, problem: str) -> None:
        if len(self.kept) < MAX_PROBLEMS:
            self.kept.append(problem)
        else:
            self.more += 1

    def extend(self, problems: Iterable[str]) -> None:
        for problem in problems:
            self.append(problem)

    def said(self) -> list[str]:
        return self.kept + ([f"... and {self.more} more problem(s)"] if self.more else [])


def _section(
    raw: _Object,
    name: str,
    what: str,
    decode: Callable[[str, object, list[str]], tuple[str, R]],
    problems: _Problems,
) -> dict[str, R]:
    """The intact records of one section; a problem for each one that is not."""
    if name in raw.duplicates:
        problems.append(f"the {name} section appears twice: both are ignored")
        return {}
    if name not in raw:
        problems.append(f"the {name} section is missing")
        return {}
    section = raw[name]
    if not isinstance(section, _Object):
        problems.append(f"the {name} section is {_describe(section)}, not an object: ignored")
        return {}
    decoded: dict[str, list[tuple[str, R, list[str]]]] = {}  # by the record's own key
    for key, entry in section.items():
        if key in section.duplicates:
            problems.append(f"{what} {_show(key)} dropped: it appears twice")
            continue
        notes: list[str] = []
        try:
            canonical, record = decode(key, entry, notes)
        except _InvalidError as e:
            problems.append(f"{what} {_show(key)} dropped: {e}")
            continue
        decoded.setdefault(canonical, []).append((key, record, notes))
    records: dict[str, R] = {}
    for canonical, spellings in decoded.items():
        if len(spellings) > 1:  # 00:10.0 and 0000:00:10.0: which one is true?
            keys = ", ".join(_show(key) for key, _, _ in spellings)
            problems.append(f"{what}s {keys} dropped: they are all {canonical}")
            continue
        ((key, record, notes),) = spellings
        problems.extend(f"{what} {_show(key)}: {note}" for note in notes)
        records[canonical] = record
    return records


def _decode(raw: object, problems: _Problems) -> State:
    if not isinstance(raw, _Object):
        raise _DamagedError(f"its top level is {_describe(raw)}, not an object")
    version = raw.get("version", _MISSING)
    if version is _MISSING or "version" in raw.duplicates:
        raise _DamagedError("it has no version" if version is _MISSING else "version appears twice")
    if type(version) is not int or version != FORMAT_VERSION:
        raise _DamagedError(
            f"its version is {_describe(version)}, this vfiod reads {FORMAT_VERSION}"
        )
    unknown = sorted(k for k in raw if k not in ("version", "bindings", "leases"))
    problems.extend(f"ignored the unknown top-level key {_show(k)}" for k in unknown[:5])
    bindings = _section(raw, "bindings", "binding", _binding_record, problems)
    leases = _section(raw, "leases", "lease", _lease_record, problems)
    return State(bindings, leases)


def _unreadable(path: str, e: OSError) -> StateError:
    return StateError(
        e.errno or errno.EIO,
        f"cannot read {path} ({e.strerror or e}); vfiod does not start without knowing "
        "which devices it moved",
    )


def _read_bytes(path: str) -> bytes | None:
    """The file's bytes; None when there is no file. Nothing but a regular
    file is opened, and no symbolic link followed (vfiod.files)."""
    try:
        return read_regular(path, MAX_SIZE, follow=False)
    except FileNotFoundError:
        return None
    except NotRegularError as e:
        raise _DamagedError(f"it is {e.kind}, not a regular file") from None
    except TooLargeError as e:
        raise _DamagedError(
            f"it is {e.size} bytes, more than the {MAX_SIZE} a state file may be"
        ) from None
    except OSError as e:
        if e.errno == errno.ELOOP:  # swapped for a link after the check
            raise _DamagedError("it is a symbolic link, not a regular file") from None
        raise _unreadable(path, e) from e


def _parse(data: bytes) -> object:
    if not data.strip():
        raise _DamagedError("it is empty")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _DamagedError(f"it is not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        return json.loads(text, object_pairs_hook=_object, parse_int=_parse_int)
    except RecursionError:
        raise _DamagedError("it is nested too deeply to be a state file") from None
    except ValueError as e:
        raise _DamagedError(f"it is not JSON ({e})") from None


def read_state(path: str) -> tuple[State, list[str]]:
    """The intact records of the state file at ``path`` with its journal
    replayed, and what was wrong with the rest (nothing: both were intact,
    or there is none). Raises only StateError, when a file cannot be read
    at all."""
    state, problems, _lines = _read(path)
    return state, problems


def _read(path: str) -> tuple[State, list[str], int]:
    """As read_state; also how many lines of the journal were replayed."""
    problems = _Problems()
    try:
        data = _read_bytes(path)
        state = State() if data is None else _decode(_parse(data), problems)
    except _DamagedError as e:
        problems.append(f"{path} is not a vfiod state file of format {FORMAT_VERSION}: {e}")
        state = State()
    state, replayed = _replay(path + JOURNAL_SUFFIX, state, problems)
    return state, problems.said(), replayed


def _replay(path: str, state: State, problems: _Problems) -> tuple[State, int]:
    """``state`` with the changes of the journal at ``path`` applied (what
    is intact of it, in order); how many lines were."""
    try:
        data = _read_bytes(path)
    except _DamagedError as e:
        problems.append(f"{path} is not a vfiod journal: {e}")
        return state, 0
    if data is None:
        return state, 0  # written before it: nothing happened since the snapshot
    lines = data.split(b"\n")
    if lines[-1]:  # cut short while it was appended: never acted on
        lines.pop()
    lines = [line for line in lines if line]
    if not lines:
        return state, 0
    try:
        header = _parse(lines[0])
    except _DamagedError as e:
        problems.append(f"{path} is not a vfiod journal: its first line {e}")
        return state, 0
    if not isinstance(header, _Object) or header.get("journal") != JOURNAL_VERSION:
        problems.append(f"{path} is not a vfiod journal of format {JOURNAL_VERSION}: ignored")
        return state, 0
    bindings, leases = dict(state.bindings), dict(state.leases)
    for number, line in enumerate(lines[1:], start=2):
        try:
            _apply(_parse(line), bindings, leases)
        except (_DamagedError, _InvalidError) as e:
            problems.append(f"{path} line {number} ignored: {e}")
    return State(bindings, leases), len(lines) - 1


_SECTIONS: dict[str, tuple[str, Callable[[str, object, list[str]], tuple[str, Any]]]] = {
    "binding": ("address", _binding_record),
    "lease": ("id", _lease_record),
}


def _key(section: str, key: str, notes: list[str]) -> str:
    """A record's key as its section spells it (a binding's: the kernel's
    form of the address)."""
    if section == "binding":
        return _address(notes, "its key")(key)
    if not _LEASE_ID.fullmatch(key):
        raise _InvalidError("its key is not a lease id (letters, digits and _)")
    return key


def _apply(
    entry: object, bindings: dict[str, BindingRecord], leases: dict[str, LeaseRecord]
) -> None:
    """One journal line: {"put": SECTION, "key": K, "record": {...}} or
    {"drop": SECTION, "key": K}; SECTION "binding" or "lease"."""
    if not isinstance(entry, _Object) or entry.duplicates:
        raise _InvalidError(f"it is {_describe(entry)}, not a change")
    op = "put" if "put" in entry else "drop"
    section, key = entry.get(op), entry.get("key")
    if section not in _SECTIONS or not isinstance(key, str):
        raise _InvalidError(f"it is not a change of a binding or a lease: {_show(str(entry))}")
    records: dict[str, Any] = bindings if section == "binding" else leases
    _, decode = _SECTIONS[section]
    notes: list[str] = []
    if op == "drop":
        records.pop(_key(section, key, notes), None)
        return
    canonical, record = decode(key, entry.get("record"), notes)
    if notes:
        raise _InvalidError("; ".join(notes))
    records[canonical] = record


def _fields(record: BindingRecord | LeaseRecord, key: str) -> dict[str, Any]:
    """A record's fields but its key, shallowly (dataclasses.asdict deep-copies
    every value, and the records hold only strings, numbers and tuples)."""
    return {f.name: getattr(record, f.name) for f in dataclasses.fields(record) if f.name != key}


def state_text(state: State) -> str:
    """``state`` as a snapshot of it reads."""
    return _Lines().text(state)


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


def _replace(path: str, data: bytes) -> None:
    """Put a file with ``data`` at ``path`` atomically: a reader (or a
    restart after a crash) finds the old one or the new one, whole."""
    fd, tmp = tempfile.mkstemp(prefix=".state.", dir=os.path.dirname(path) or ".")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _sync_directory(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class StateFile:
    """The state file of this process. Only one vfiod runs at a time, so what
    this process last read or wrote is what is on disk: it is kept in memory
    and the file is read once.

    After the first load, ``problems`` says what was wrong with the file (empty
    when it was intact or absent) and ``moved_aside`` where the damaged file
    was kept (None when nothing was wrong).

    Binding jobs update it from their threads (vfiod.worker) while the loop
    records leases: each update is one load-change-save under a lock."""

    def __init__(self, path: str = STATE_PATH) -> None:
        self.path = path
        self.journal_path = path + JOURNAL_SUFFIX
        self._lock = threading.RLock()
        self._cached: State | None = None
        # Lines in the journal since this process wrote a snapshot; None:
        # it has written none yet (its first change writes one).
        self._journal_lines: int | None = None
        self._lines = _Lines()
        self.problems: tuple[str, ...] = ()
        self.moved_aside: str | None = None

    def load(self) -> State:
        with self._lock:
            if self._cached is None:
                state, problems, replayed = _read(self.path)
                if problems:
                    self._repair(state, problems)
                elif replayed:
                    self.save(state)  # one snapshot of it all, and a new journal
                self._cached = state
            return self._cached

    def _repair(self, state: State, problems: list[str]) -> None:
        """Keep the damaged file aside and put one holding ``state`` (the
        intact records) in its place; say so."""
        self.problems = tuple(problems)
        kept = f"{len(state.bindings)} binding(s) and {len(state.leases)} lease(s)"
        try:
            aside = self._move_aside()
            self._move_aside(self.journal_path)  # beside it, if there is one
        except OSError as e:
            log.warning(
                "%s is damaged: %s",
                self.path,
                "; ".join(problems),
                extra={"MESSAGE_ID": MESSAGE_STATE_REPAIRED, "STATE_FILE": self.path},
            )
            raise StateError(
                e.errno or errno.EIO,
                f"{self.path} is damaged, and cannot be moved aside ({e.strerror or e}); "
                "vfiod does not start without a state file it can write",
            ) from e
        try:
            self.save(state)
        except OSError as e:
            self._put_back(aside)
            raise StateError(
                e.errno or errno.EIO,
                f"{self.path} is damaged, and a repaired one cannot be written "
                f"({e.strerror or e}); vfiod does not start without a state file it can write",
            ) from e
        self.moved_aside = aside
        where = f"kept as {aside}" if aside is not None else "gone before it could be kept"
        log.warning(
            "%s was damaged and is repaired: the damaged file is %s, the new one holds the %s "
            "that were intact. %s",
            self.path,
            where,
            kept,
            "; ".join(problems),
            extra={
                "MESSAGE_ID": MESSAGE_STATE_REPAIRED,
                "STATE_FILE": self.path,
                "MOVED_ASIDE": aside or "",
            },
        )

    def _move_aside(self, path: str | None = None) -> str | None:
        """Keep the file at the path under a new name next to it; return the
        name (None: it is gone). A file is linked there, so it stays at the
        path until a repaired one replaces it (a crash in between finds it
        again); a directory, which cannot be linked, is renamed."""
        path = self.path if path is None else path
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
        base = f"{path}.corrupt-{stamp}"
        target, n = base, 1
        while os.path.lexists(target):
            n += 1
            target = f"{base}-{n}"
        try:
            is_dir = stat.S_ISDIR(os.lstat(path).st_mode)
            if not is_dir:
                try:
                    os.link(path, target, follow_symlinks=False)
                    return target
                except OSError as e:
                    if e.errno not in (errno.EPERM, errno.EMLINK, errno.EOPNOTSUPP):
                        raise
            os.rename(path, target)
        except FileNotFoundError:
            return None
        return target

    def _put_back(self, aside: str | None) -> None:
        """Undo _move_aside after the repaired file could not be written."""
        if aside is None:
            return
        try:
            if os.path.lexists(self.path):
                os.unlink(aside)  # a link: the damaged file is still at the path
            else:
                os.rename(aside, self.path)
        except OSError as e:
            log.warning("could not put %s back at %s: %s", aside, self.path, e)

    def save(self, state: State) -> None:
        """Write ``state`` whole (a snapshot), then start a new journal."""
        with self._lock:
            directory = os.path.dirname(self.path) or "."
            os.makedirs(directory, mode=0o700, exist_ok=True)
            _replace(self.path, self._lines.text(state).encode())
            # The journal after the snapshot: what the old one said is in it.
            header = json.dumps({"journal": JOURNAL_VERSION}) + "\n"
            _replace(self.journal_path, header.encode())
            _sync_directory(directory)
            self._journal_lines = 0
            self._cached = state

    # -- one change, one journal line

    def put_lease(self, record: LeaseRecord) -> State:
        with self._lock:
            change = {"put": "lease", "key": record.id, "record": _fields(record, "id")}
            return self._commit(self.load().with_lease(record), change)

    def drop_lease(self, lease_id: str) -> State:
        with self._lock:
            return self._commit(
                self.load().without_lease(lease_id), {"drop": "lease", "key": lease_id}
            )

    def put_binding(self, record: BindingRecord) -> State:
        with self._lock:
            change = {"put": "binding", "key": record.address, "record": _fields(record, "address")}
            return self._commit(self.load().with_binding(record), change)

    def drop_binding(self, address: str) -> State:
        with self._lock:
            change = {"drop": "binding", "key": address}
            return self._commit(self.load().without_binding(address), change)

    def _commit(self, state: State, change: Mapping[str, Any]) -> State:
        """Record ``change``, which made ``state``: a line in the journal, or a
        snapshot when the journal is long (or there is none yet)."""
        records = len(state.bindings) + len(state.leases)
        if self._journal_lines is None or self._journal_lines >= max(COMPACT_AFTER, 2 * records):
            self.save(state)
            return state
        line = json.dumps(change, separators=(",", ":")) + "\n"
        # Opened for each line: vfiod holds no fd of its own state between changes.
        fd = os.open(self.journal_path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        try:
            os.write(fd, line.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        self._journal_lines += 1
        self._cached = state
        return state

    def update(self, change: Callable[[State], State]) -> State:
        """Load, apply ``change``, save it whole; return the new state. (For
        changes of many records; one record: put_lease() and the like.)"""
        with self._lock:
            new = change(self.load())
            self.save(new)
            return new
