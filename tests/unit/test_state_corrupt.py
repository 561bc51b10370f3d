"""A damaged state file: vfiod keeps what is intact, says what is not, and
keeps the damaged file aside.

Each case of the table damages a state file holding two bindings and two
leases (or puts something else at its path) and says which records survive
and what the problems must name. For every case: loading does not raise,
exactly those records survive, unchanged; the damaged file is kept next to
the path with what it held; the new file at the path loads clean with the
same records; a warning with MESSAGE_STATE_REPAIRED says where the damaged
file went.
"""

from __future__ import annotations

import copy
import dataclasses
import errno
import functools
import json
import logging
import os
import signal
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import pytest

import vfiod.state
from vfiod.state import (
    MAX_PROBLEMS,
    MESSAGE_STATE_REPAIRED,
    BindingRecord,
    BindPhase,
    LeaseRecord,
    State,
    StateError,
    StateFile,
)

NIC = "0000:00:10.0"
GPU = "0000:01:00.0"
LEASE = "a1b2c3d4e5f60718"
OTHER = "0f1e2d3c4b5a6978"

BINDINGS = {
    NIC: BindingRecord(NIC, "vfio-pci", "e1000e", None, BindPhase.BOUND),
    GPU: BindingRecord(GPU, "vfio-pci", "amdgpu", "amdgpu", BindPhase.RESTORE_FAILED),
}
LEASES = {
    LEASE: LeaseRecord(
        id=LEASE,
        uid=1000,
        pid=4242,
        unit="app-qemu-1.scope",
        owner=":1.7",
        owner_pid=4243,
        label="win11 (gaming)",
        backend="legacy",
        unsafe=False,
        groups=("10",),
        devices=(NIC,),
        rules=("alice-nic",),
        created=1_700_000_000.25,
        restore=True,
        max_locked_memory=1 << 30,
        moved=(NIC,),
        fds=(f"{LEASE}.container", f"{LEASE}.group.10", f"{LEASE}.owner"),
        iommu_type=3,
        mappings=((0, 1 << 21), (1 << 32, 4096)),
    ),
    OTHER: LeaseRecord(
        id=OTHER,
        uid=0,
        pid=None,
        unit=None,
        owner=":1.99",
        owner_pid=None,
        label="",
        backend="iommufd",
        unsafe=True,
        groups=("7", "0"),
        devices=(GPU, "0000:01:00.1"),
        rules=(),
        created=1_700_000_100.0,
        restore=False,
        moved=(GPU,),
        fds=(f"{OTHER}.iommufd",),
    ),
}
GOOD = State(BINDINGS, LEASES)


def good_raw() -> dict[str, Any]:
    """The intact file as JSON values, written by vfiod itself."""
    raw: dict[str, Any] = json.loads(_good_text())
    return raw


def _good_text() -> str:
    return vfiod.state._Lines().text(GOOD)


def dumps(raw: object) -> bytes:
    return json.dumps(raw).encode()


def with_lease_field(lease: str, field: str, value: object) -> Callable[[], bytes]:
    def make() -> bytes:
        raw = good_raw()
        raw["leases"][lease][field] = value
        return dumps(raw)

    return make


def with_binding_field(address: str, field: str, value: object) -> Callable[[], bytes]:
    def make() -> bytes:
        raw = good_raw()
        raw["bindings"][address][field] = value
        return dumps(raw)

    return make


def edited(change: Callable[[dict[str, Any]], None]) -> Callable[[], bytes]:
    def make() -> bytes:
        raw = good_raw()
        change(raw)
        return dumps(raw)

    return make


def text(content: str | bytes) -> Callable[[], bytes]:
    data = content.encode() if isinstance(content, str) else content
    return lambda: data


@dataclasses.dataclass(frozen=True)
class Case:
    make: Callable[[], bytes]  # the damaged file's bytes
    bindings: tuple[str, ...]  # the records that survive
    leases: tuple[str, ...]
    problems: tuple[str, ...]  # what the problems must say, each in one of them


ALL_B = (NIC, GPU)
ALL_L = (LEASE, OTHER)

CASES: dict[str, Case] = {
    "bindings-list": Case(
        edited(lambda r: r.update(bindings=[])),
        (),
        ALL_L,
        ("the bindings section is a list of 0 item(s), not an object",),
    ),
    "bindings-null": Case(
        edited(lambda r: r.update(bindings=None)), (), ALL_L, ("the bindings section is null",)
    ),
    "bindings-string": Case(
        edited(lambda r: r.update(bindings="0000:00:10.0")),
        (),
        ALL_L,
        ("the bindings section is '0000:00:10.0'",),
    ),
    "bindings-missing": Case(
        edited(lambda r: r.pop("bindings")), (), ALL_L, ("the bindings section is missing",)
    ),
    "leases-list": Case(
        edited(lambda r: r.update(leases=[LEASE])),
        ALL_B,
        (),
        ("the leases section is a list of 1 item(s)",),
    ),
    "leases-null": Case(
        edited(lambda r: r.update(leases=None)), ALL_B, (), ("the leases section is null",)
    ),
    "one-bad-lease": Case(
        with_lease_field(OTHER, "uid", "root"),
        ALL_B,
        (LEASE,),
        (f"lease '{OTHER}' dropped: uid is 'root', expected an integer",),
    ),
    "lease-not-an-object": Case(
        edited(lambda r: r["leases"].update({OTHER: [1, 2]})),
        ALL_B,
        (LEASE,),
        (f"lease '{OTHER}' dropped: it is a list of 2 item(s), not an object",),
    ),
    "binding-null": Case(
        edited(lambda r: r["bindings"].update({GPU: None})),
        (NIC,),
        ALL_L,
        (f"binding '{GPU}' dropped: it is null, not an object",),
    ),
    "junk-address-key": Case(
        edited(lambda r: r["bindings"].update({"nic0": r["bindings"][NIC]})),
        ALL_B,
        ALL_L,
        ("binding 'nic0' dropped: its key is 'nic0', expected a PCI address",),
    ),
    "address-key-out-of-range": Case(
        edited(lambda r: r["bindings"].update({"0000:00:20.0": r["bindings"][NIC]})),
        ALL_B,
        ALL_L,
        ("binding '0000:00:20.0' dropped",),
    ),
    "address-key-path": Case(
        edited(lambda r: r["bindings"].update({"../../../etc": r["bindings"][NIC]})),
        ALL_B,
        ALL_L,
        ("binding '../../../etc' dropped",),
    ),
    "two-spellings-of-one-address": Case(
        edited(lambda r: r["bindings"].update({"00:10.0": r["bindings"][GPU]})),
        (GPU,),
        ALL_L,
        (f"bindings '{NIC}', '00:10.0' dropped: they are all {NIC}",),
    ),
    "lease-key-junk": Case(
        edited(lambda r: r["leases"].update({"a/b": r["leases"][LEASE]})),
        ALL_B,
        ALL_L,
        ("lease 'a/b' dropped: its key is not a lease id",),
    ),
    "unknown-backend": Case(
        with_lease_field(LEASE, "backend", "vfio"),
        ALL_B,
        (OTHER,),
        (f"lease '{LEASE}' dropped: backend is 'vfio', expected one of legacy, iommufd",),
    ),
    "unknown-phase": Case(
        with_binding_field(NIC, "phase", "gone"),
        (GPU,),
        ALL_L,
        (f"binding '{NIC}' dropped: phase is 'gone'",),
    ),
    "fds-of-another-lease": Case(
        with_lease_field(LEASE, "fds", [f"{OTHER}.iommufd"]),
        ALL_B,
        (OTHER,),
        (f"lease '{LEASE}' dropped: fds item 0 is '{OTHER}.iommufd'",),
    ),
    "group-path": Case(
        with_lease_field(LEASE, "groups", ["../10"]),
        ALL_B,
        (OTHER,),
        (f"lease '{LEASE}' dropped: groups item 0 is '../10'",),
    ),
    "driver-path": Case(
        with_binding_field(NIC, "original_driver", "../../module"),
        (GPU,),
        ALL_L,
        (f"binding '{NIC}' dropped: original_driver is '../../module'",),
    ),
    "driver-option": Case(
        with_binding_field(NIC, "original_driver", "-r"),
        (GPU,),
        ALL_L,
        (f"binding '{NIC}' dropped: original_driver is '-r'",),
    ),
    "overlapping-mappings": Case(
        with_lease_field(LEASE, "mappings", [[0, 8192], [4096, 4096]]),
        ALL_B,
        (OTHER,),
        (f"lease '{LEASE}' dropped: mappings overlap at IOVA 0x1000",),
    ),
    "mapping-past-64-bits": Case(
        with_lease_field(LEASE, "mappings", [[2**64 - 4096, 8192]]),
        ALL_B,
        (OTHER,),
        (f"lease '{LEASE}' dropped: mappings item 0",),
    ),
    "device-listed-twice": Case(
        with_lease_field(LEASE, "devices", [NIC, NIC]),
        ALL_B,
        (OTHER,),
        (f"lease '{LEASE}' dropped: devices item 1 ('{NIC}') is listed twice",),
    ),
    "label-with-a-newline": Case(
        with_lease_field(LEASE, "label", "vm\nvfiod: granted everything"),
        ALL_B,
        (OTHER,),
        (f"lease '{LEASE}' dropped: label is",),
    ),
    "label-lone-surrogate": Case(
        with_lease_field(LEASE, "label", "\ud800"),
        ALL_B,
        (OTHER,),
        (f"lease '{LEASE}' dropped: label is",),
    ),
    "nan": Case(
        with_lease_field(LEASE, "created", float("nan")),
        ALL_B,
        (OTHER,),
        (f"lease '{LEASE}' dropped: created is NaN",),
    ),
    "infinity": Case(
        text(_good_text().replace("1700000000.25", "1e999")),
        ALL_B,
        (OTHER,),
        (f"lease '{LEASE}' dropped: created is Infinity",),
    ),
    "huge-integer": Case(
        text(_good_text().replace('"uid": 1000', '"uid": ' + "9" * 30)),
        ALL_B,
        (OTHER,),
        (f"lease '{LEASE}' dropped: uid is a number of 30 digits",),
    ),
    "integer-past-python-limit": Case(
        # json.loads refuses an int of more than 4300 digits for the whole file.
        text(_good_text().replace('"uid": 1000', '"uid": ' + "9" * 5000)),
        ALL_B,
        (OTHER,),
        (f"lease '{LEASE}' dropped: uid is a number of 5000 digits",),
    ),
    "nested-junk": Case(
        with_binding_field(NIC, "driver", [[[[{"x": [[["vfio-pci"]]]}]]]]),
        (GPU,),
        ALL_L,
        (f"binding '{NIC}' dropped: driver is a list of 1 item(s)",),
    ),
    "duplicate-lease": Case(
        text(
            _good_text().replace(
                f'"{OTHER}": ', f'"{LEASE}": {json.dumps({"uid": 0})},\n  "{OTHER}": '
            )
        ),
        ALL_B,
        (OTHER,),
        (f"lease '{LEASE}' dropped: it appears twice",),
    ),
    "duplicate-field": Case(
        text(_good_text().replace('"uid": 1000,', '"uid": 1000, "uid": 0,')),
        ALL_B,
        (OTHER,),
        (f"lease '{LEASE}' dropped: its field 'uid' appears twice",),
    ),
    "unknown-field": Case(
        with_binding_field(NIC, "colour", "blue"),
        ALL_B,
        ALL_L,
        (f"binding '{NIC}': ignored unknown field(s) 'colour'",),
    ),
    "unknown-top-level-key": Case(
        edited(lambda r: r.update(extra=1)), ALL_B, ALL_L, ("unknown top-level key 'extra'",)
    ),
    "short-address-key": Case(
        edited(lambda r: r["bindings"].update({"01:00.0": r["bindings"].pop(GPU)})),
        ALL_B,
        ALL_L,
        (f"binding '01:00.0': its key '01:00.0' read as {GPU}",),
    ),
    "version-missing": Case(edited(lambda r: r.pop("version")), (), (), ("it has no version",)),
    "version-2": Case(
        edited(lambda r: r.update(version=2)), (), (), ("its version is 2, this vfiod reads 1",)
    ),
    "version-string": Case(
        edited(lambda r: r.update(version="1")), (), (), ("its version is '1'",)
    ),
    "version-true": Case(edited(lambda r: r.update(version=True)), (), (), ("version is true",)),
    "version-float": Case(edited(lambda r: r.update(version=1.0)), (), (), ("version is 1.0",)),
    "version-twice": Case(
        text(_good_text().replace('"version": 1,', '"version": 1, "version": 1,')),
        (),
        (),
        ("version appears twice",),
    ),
    "truncated": Case(text(_good_text()[: len(_good_text()) // 2]), (), (), ("it is not JSON",)),
    "not-utf-8": Case(
        text(_good_text().encode().replace(b"win11", b"win\xff1")),
        (),
        (),
        ("it is not UTF-8 text (invalid start byte at byte",),
    ),
    "empty": Case(text(""), (), (), ("it is empty",)),
    "blank": Case(text(" \n\n"), (), (), ("it is empty",)),
    "nul-bytes": Case(text(b"\0" * 4096), (), (), ("it is not JSON",)),
    "top-level-list": Case(text("[]"), (), (), ("its top level is a list of 0 item(s)",)),
    "top-level-null": Case(text("null"), (), (), ("its top level is null",)),
    "nested-too-deeply": Case(
        text('{"version": 1, "bindings": ' + "[" * 200_000 + "]" * 200_000 + "}"),
        (),
        (),
        ("nested too deeply",),
    ),
}

LEASE_FIELDS_BAD: dict[str, list[object]] = {
    "uid": ["1000", 1000.0, True, -1, 2**32 - 1, 2**32, None, [], {}],
    "pid": ["4242", 4242.5, False, 0, -1, 2**22 + 1, []],
    "unit": [1, "", "a/b.scope", "a b.service", [], {}],
    "owner": [None, 7, "", "1.7", ":1", ":1.7/..", "a b.c", "x" * 300 + ".y"],
    "owner_pid": ["1", 0, 1.0, True, [None]],
    "label": [None, 1, ["vm"], "x" * 257, "tab\there", "\x00"],
    "backend": [None, "", "LEGACY", 1, ["legacy"]],
    "unsafe": [None, 0, 1, "false", "true", []],
    "groups": [None, "10", [], [10], ["10", "10"], ["010"], ["-1"], ["noiommu-0"], [None]],
    "devices": [None, NIC, [], [1], ["nic0"], [NIC, NIC], [None], {NIC: 1}],
    "rules": [None, "alice-nic", [1], [""], ["two words"], ["x" * 257], ["a", "a"]],
    "created": [None, "1700000000", True, -1, [], {}],
    "restore": [None, 1, "yes", []],
    "max_locked_memory": ["1", -1, 2**64, 1.5, True, []],
    "moved": [None, NIC, [1], ["0000:00:10.8"], [NIC, NIC]],
    "fds": [None, "x.container", [1], [""], [f"{LEASE}.group.../x"], [f"{LEASE}:container"]],
    "iommu_type": ["3", 0, 2, 4, 3.0, True, []],
    "mappings": [
        None,
        {},
        [0, 4096],
        [[0]],
        [[0, 4096, 1]],
        [[0, 0]],
        [[-1, 4096]],
        [[0, 1.5]],
        [[True, 4096]],
        [["0", "4096"]],
        [[2**64, 4096]],
    ],
}
BINDING_FIELDS_BAD: dict[str, list[object]] = {
    "driver": [None, "", 1, ["vfio-pci"], "vfio pci", "../vfio", ".", "..", "x" * 65],
    "original_driver": ["", 1, True, ["e1000e"], "e1000e\n", "a/b"],
    "original_override": ["", 0, ["x"], "vfio-pci\nx"],
    "phase": [None, "", "BOUND", 1, ["bound"], "restore_failed"],
}

for _field, _values in LEASE_FIELDS_BAD.items():
    for _i, _value in enumerate(_values):
        CASES[f"lease-{_field}-{_i}"] = Case(
            with_lease_field(LEASE, _field, _value),
            ALL_B,
            (OTHER,),
            (f"lease '{LEASE}' dropped: {_field} ",),
        )
    CASES[f"lease-{_field}-missing"] = Case(
        edited(functools.partial(lambda f, r: r["leases"][LEASE].pop(f), _field)),
        ALL_B,
        (OTHER,),
        (f"lease '{LEASE}' dropped: its field '{_field}' is missing",),
    )
for _field, _values in BINDING_FIELDS_BAD.items():
    for _i, _value in enumerate(_values):
        CASES[f"binding-{_field}-{_i}"] = Case(
            with_binding_field(NIC, _field, _value),
            (GPU,),
            ALL_L,
            (f"binding '{NIC}' dropped: {_field} ",),
        )
    CASES[f"binding-{_field}-missing"] = Case(
        edited(functools.partial(lambda f, r: r["bindings"][NIC].pop(f), _field)),
        (GPU,),
        ALL_L,
        (f"binding '{NIC}' dropped: its field '{_field}' is missing",),
    )
# Fields a file of an older vfiod may lack: the record is intact without them.
for _field in ("max_locked_memory", "moved", "fds", "iommu_type", "mappings"):
    del CASES[f"lease-{_field}-missing"]


@pytest.fixture
def deadline() -> Iterator[None]:
    """Fail, rather than hang, when loading blocks (on a FIFO, say)."""

    def expired(signum: int, frame: FrameType | None) -> None:
        raise TimeoutError("loading the state file blocked")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, 10)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def expect_repaired(
    store: StateFile,
    state: State,
    bindings: tuple[str, ...],
    leases: tuple[str, ...],
    problems: tuple[str, ...],
    caplog: pytest.LogCaptureFixture,
) -> str:
    """What every damaged file must give; returns where it was kept."""
    assert dict(state.bindings) == {a: BINDINGS[a] for a in bindings}
    assert dict(state.leases) == {i: LEASES[i] for i in leases}
    for wanted in problems:
        assert any(wanted in problem for problem in store.problems), (wanted, store.problems)
    assert all(len(problem) < 400 for problem in store.problems), store.problems
    aside = store.moved_aside
    assert aside is not None
    assert os.path.basename(aside).startswith("state.json.corrupt-")
    assert aside.endswith("Z")
    assert os.path.dirname(aside) == os.path.dirname(store.path)
    # The new file is a vfiod state file holding just what survived.
    assert stat.S_ISREG(os.lstat(store.path).st_mode)
    again = StateFile(store.path)
    assert again.load() == state
    assert again.problems == ()
    assert again.moved_aside is None
    assert sorted(os.listdir(os.path.dirname(store.path))) == sorted(
        ["state.json", "state.json.journal", os.path.basename(aside)]
    ), "no temporary is left behind"
    (entry,) = [r for r in caplog.records if getattr(r, "MESSAGE_ID", None)]
    assert getattr(entry, "MESSAGE_ID", None) == MESSAGE_STATE_REPAIRED
    assert entry.levelno == logging.WARNING
    assert aside in entry.getMessage()
    assert store.path in entry.getMessage()
    return aside


@pytest.mark.usefixtures("deadline")
@pytest.mark.parametrize("name", list(CASES))
def test_damaged_file(tmp_path: Path, name: str, caplog: pytest.LogCaptureFixture) -> None:
    case = CASES[name]
    data = case.make()
    path = tmp_path / "state.json"
    path.write_bytes(data)
    inode = path.stat().st_ino
    store = StateFile(str(path))
    state = store.load()
    aside = expect_repaired(store, state, case.bindings, case.leases, case.problems, caplog)
    assert Path(aside).read_bytes() == data
    assert os.stat(aside).st_ino == inode, "the damaged file itself is kept, not a copy"
    assert store.load() is state, "read once"


def test_the_table_starts_from_an_intact_file(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_text(_good_text())
    store = StateFile(str(path))
    assert store.load() == GOOD
    assert (store.problems, store.moved_aside) == ((), None)
    assert os.listdir(tmp_path) == ["state.json"]
    assert path.read_text() == _good_text(), "an intact file is left alone"


def test_a_lease_whose_bindings_were_lost_is_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The broker gives its moved devices back from the lease alone."""
    path = tmp_path / "state.json"
    path.write_bytes(CASES["bindings-list"].make())
    store = StateFile(str(path))
    state = store.load()
    assert state.bindings == {}
    assert state.leases[LEASE].moved == (NIC,)
    assert state.leases[OTHER].moved == (GPU,)


def _directory(path: Path) -> None:
    path.mkdir()
    (path / "inside").write_text("kept")


def _fifo(path: Path) -> None:
    os.mkfifo(path)


def _sparse(path: Path) -> None:
    with path.open("wb") as f:
        f.truncate(100 * 1024 * 1024)


def _dev_zero(path: Path) -> None:
    path.symlink_to("/dev/zero")


def _link_to_good(path: Path) -> None:
    target = path.parent / "elsewhere.json"
    target.write_text(_good_text())
    path.symlink_to(target.name)


@pytest.mark.usefixtures("deadline")
@pytest.mark.parametrize(
    ("make", "problem"),
    [
        (_directory, "it is a directory, not a regular file"),
        (_fifo, "it is a FIFO (named pipe), not a regular file"),
        (_sparse, "it is 104857600 bytes, more than the"),
        (_dev_zero, "it is a symbolic link, not a regular file"),
        (_link_to_good, "it is a symbolic link, not a regular file"),
    ],
    ids=["directory", "fifo", "sparse-100MB", "symlink-dev-zero", "symlink"],
)
def test_not_a_state_file_at_the_path(
    tmp_path: Path,
    make: Callable[[Path], None],
    problem: str,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    path = tmp_path / "state.json"
    make(path)
    before = os.lstat(path)
    target = os.readlink(path) if path.is_symlink() else None
    read: list[int] = []
    real_read = os.read

    def counted_read(fd: int, n: int) -> bytes:
        data = real_read(fd, n)
        read.append(len(data))
        return data

    monkeypatch.setattr(os, "read", counted_read)
    store = StateFile(str(path))
    state = store.load()
    monkeypatch.undo()
    assert sum(read) == 0, "nothing but a regular file of a sane size is read"
    assert state == State()
    (said,) = store.problems
    assert said.startswith(f"{path} is not a vfiod state file of format 1: {problem}")
    if make is _link_to_good:
        (tmp_path / "elsewhere.json").unlink()  # (not part of the state directory)
    aside = expect_repaired(store, state, (), (), (problem,), caplog)
    after = os.lstat(aside)
    assert (after.st_ino, stat.S_IFMT(after.st_mode)) == (
        before.st_ino,
        stat.S_IFMT(before.st_mode),
    )
    if make is _directory:
        assert (Path(aside) / "inside").read_text() == "kept"
    if target is not None:
        assert os.readlink(aside) == target
    if make is _sparse:
        assert after.st_size == 100 * 1024 * 1024


def test_repairs_in_the_same_second_keep_every_damaged_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "state.json"
    kept = []
    for content in (b"one", b"two", b"three"):
        path.write_bytes(content)
        store = StateFile(str(path))
        store.load()
        assert store.moved_aside is not None
        kept.append(store.moved_aside)
    assert len(set(kept)) == 3
    assert [Path(k).read_bytes() for k in kept] == [b"one", b"two", b"three"]


def test_many_problems_are_counted_not_all_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    raw = good_raw()
    for n in range(1000):
        raw["bindings"][f"junk{n}"] = {}
    raw["bindings"]["x" * 1_000_000] = {}
    path = tmp_path / "state.json"
    path.write_bytes(dumps(raw))
    store = StateFile(str(path))
    assert store.load() == GOOD
    assert len(store.problems) == MAX_PROBLEMS + 1
    assert store.problems[-1] == f"... and {1001 - MAX_PROBLEMS} more problem(s)"
    (entry,) = [r for r in caplog.records if getattr(r, "MESSAGE_ID", None)]
    assert len(entry.getMessage()) < 100 * 200


def test_a_damaged_file_that_cannot_be_moved_aside_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Not starting (the file stays as it was) beats starting with a state
    file vfiod cannot write: it would bind devices without a record."""
    path = tmp_path / "state.json"
    path.write_bytes(b"[]")

    def read_only(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(os, "link", read_only)
    monkeypatch.setattr(os, "rename", read_only)
    with pytest.raises(StateError) as error:
        StateFile(str(path)).load()
    monkeypatch.undo()
    assert error.value.errno == errno.EROFS
    assert "cannot be moved aside" in str(error.value)
    assert os.listdir(tmp_path) == ["state.json"]
    assert path.read_bytes() == b"[]"
    assert any(getattr(r, "MESSAGE_ID", None) for r in caplog.records), "the problems are said"


@pytest.mark.parametrize("at_path", ["file", "directory"])
def test_a_repair_that_cannot_be_written_puts_the_damaged_file_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, at_path: str
) -> None:
    path = tmp_path / "state.json"
    if at_path == "file":
        path.write_bytes(b"[]")
    else:
        _directory(path)

    def no_space(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(StateFile, "save", no_space)
    with pytest.raises(StateError) as error:
        StateFile(str(path)).load()
    monkeypatch.undo()
    assert error.value.errno == errno.ENOSPC
    assert "cannot be written" in str(error.value)
    assert os.listdir(tmp_path) == ["state.json"], "the next start finds it again"
    if at_path == "file":
        assert path.read_bytes() == b"[]"
    else:
        assert (path / "inside").read_text() == "kept"


def test_a_file_gone_before_it_could_be_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "state.json"
    path.write_bytes(b"[]")
    real_read = vfiod.state._read

    def then_removed(name: str) -> tuple[State, list[str], int]:
        result = real_read(name)
        os.unlink(name)
        return result

    monkeypatch.setattr(vfiod.state, "_read", then_removed)
    store = StateFile(str(path))
    assert store.load() == State()
    assert store.moved_aside is None
    assert store.problems
    assert sorted(os.listdir(tmp_path)) == ["state.json", "state.json.journal"]
    assert "gone before it could be kept" in caplog.text


def test_saves_after_a_repair_keep_the_damaged_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "state.json"
    path.write_bytes(CASES["one-bad-lease"].make())
    store = StateFile(str(path))
    store.update(lambda s: s.without_lease(LEASE))
    assert store.moved_aside is not None
    assert Path(store.moved_aside).read_bytes() == CASES["one-bad-lease"].make()
    assert StateFile(str(path)).load() == State(BINDINGS, {})


def test_the_problems_do_not_copy_the_damage(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A problem quotes a bounded part of a value, escaped: no huge or
    multi-line log entry, no control character from the file."""
    raw = copy.deepcopy(good_raw())
    raw["leases"][LEASE]["label"] = "line\nvfiod: forged\x1b[2J" + "y" * 100_000
    path = tmp_path / "state.json"
    path.write_bytes(dumps(raw))
    store = StateFile(str(path))
    store.load()
    (problem,) = store.problems
    assert "\n" not in problem
    assert "\x1b" not in problem
    assert len(problem) < 300
    assert "\n" not in caplog.records[-1].getMessage()
