"""The persisted state: round trips, atomic replacement, clear errors."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from vfiod.state import BindingRecord, BindPhase, State, StateError, StateFile

RECORD = BindingRecord(
    address="0000:00:10.0",
    driver="vfio-pci",
    original_driver="e1000e",
    original_override=None,
    phase=BindPhase.BOUND,
)


def test_missing_file_is_empty_state(tmp_path: Path) -> None:
    assert StateFile(str(tmp_path / "state.json")).load() == State()


def test_round_trip_and_update(tmp_path: Path) -> None:
    store = StateFile(str(tmp_path / "run/vfiod/state.json"))
    store.save(State().with_binding(RECORD))
    assert store.load().bindings == {RECORD.address: RECORD}
    assert (tmp_path / "run/vfiod").stat().st_mode & 0o777 == 0o700
    store.update(lambda s: s.without_binding(RECORD.address))
    assert store.load() == State()
    on_disk = json.loads((tmp_path / "run/vfiod/state.json").read_text())
    assert on_disk == {"version": 1, "bindings": {}, "leases": {}}


def test_save_replaces_atomically_and_leaves_no_temporary(tmp_path: Path) -> None:
    store = StateFile(str(tmp_path / "state.json"))
    store.save(State().with_binding(RECORD))
    inode = os.stat(store.path).st_ino
    store.save(State())
    assert os.stat(store.path).st_ino != inode, "a new file renamed over the old one"
    assert sorted(os.listdir(tmp_path)) == ["state.json", "state.json.journal"]


def test_failed_save_keeps_the_old_state(tmp_path: Path) -> None:
    store = StateFile(str(tmp_path / "state.json"))
    store.save(State().with_binding(RECORD))

    class Unencodable(State):
        pass

    broken = Unencodable(bindings={"x": object()})  # type: ignore[dict-item]
    with pytest.raises((TypeError, AttributeError)):
        store.save(broken)
    assert store.load().bindings == {RECORD.address: RECORD}
    assert sorted(os.listdir(tmp_path)) == ["state.json", "state.json.journal"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "is not JSON"),
        ('{"version": 99}', "its version is 99, this vfiod reads 1"),
        ("[]", "its top level is a list of 0 item(s), not an object"),
        (
            '{"version": 1, "bindings": {"0000:00:10.0": {"driver": "vfio-pci"}}, "leases": {}}',
            "binding '0000:00:10.0' dropped: its field 'original_driver' is missing",
        ),
        (
            '{"version": 1, "bindings": {"0000:00:10.0": {"driver": "vfio-pci", '
            '"original_driver": "e1000e", "original_override": null, "phase": "odd"}}, '
            '"leases": {}}',
            "binding '0000:00:10.0' dropped: phase is 'odd', expected one of binding, bound, "
            "restore-failed",
        ),
    ],
)
def test_bad_state_file_is_set_aside_with_a_clear_problem(
    tmp_path: Path, content: str, message: str
) -> None:
    """A damaged file does not stop vfiod: what was wrong is said, the file
    is kept aside, and vfiod starts from what was intact (here: nothing).
    tests/unit/test_state_corrupt.py has the whole table."""
    path = tmp_path / "state.json"
    path.write_text(content)
    store = StateFile(str(path))
    assert store.load() == State()
    assert any(message in problem for problem in store.problems), store.problems
    assert store.moved_aside is not None
    assert Path(store.moved_aside).read_text() == content
    assert json.loads(path.read_text()) == {"version": 1, "bindings": {}, "leases": {}}


def test_unreadable_state_file_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An error that says nothing about the content stops vfiod, leaving the
    file alone: starting as if it said nothing would overwrite its records."""
    path = tmp_path / "state.json"
    StateFile(str(path)).save(State().with_binding(RECORD))
    before = path.read_bytes()
    real_open = os.open

    def failing_open(name: str, flags: int, *args: int, **kwargs: int) -> int:
        if name == str(path):
            raise OSError(errno.EIO, os.strerror(errno.EIO), name)
        return real_open(name, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", failing_open)
    with pytest.raises(StateError) as error:
        StateFile(str(path)).load()
    monkeypatch.undo()
    assert error.value.errno == errno.EIO
    assert str(path) in str(error.value)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["state.json", "state.json.journal"]
