"""The persisted state: round trips, atomic replacement, clear errors."""

from __future__ import annotations

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
    assert os.listdir(tmp_path) == ["state.json"]


def test_failed_save_keeps_the_old_state(tmp_path: Path) -> None:
    store = StateFile(str(tmp_path / "state.json"))
    store.save(State().with_binding(RECORD))

    class Unencodable(State):
        pass

    broken = Unencodable(bindings={"x": object()})  # type: ignore[dict-item]
    with pytest.raises((TypeError, AttributeError)):
        store.save(broken)
    assert store.load().bindings == {RECORD.address: RECORD}
    assert os.listdir(tmp_path) == ["state.json"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not JSON"),
        ('{"version": 99}', "not a vfiod state file of format 1"),
        ("[]", "not a vfiod state file of format 1"),
        (
            '{"version": 1, "bindings": {"0000:00:10.0": {"driver": "vfio-pci"}}}',
            "binding '0000:00:10.0' is malformed",
        ),
        (
            '{"version": 1, "bindings": {"0000:00:10.0": {"driver": "vfio-pci", '
            '"original_driver": "e1000e", "original_override": null, "phase": "odd"}}}',
            "binding '0000:00:10.0' is malformed",
        ),
    ],
)
def test_bad_state_file_is_a_clear_error(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "state.json"
    path.write_text(content)
    with pytest.raises(StateError) as error:
        StateFile(str(path)).load()
    assert message in str(error.value)
    assert "move it aside" in str(error.value)
    assert str(path) in str(error.value)
