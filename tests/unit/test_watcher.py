"""The live inventory kept true by uevents, on a fake sysfs (no netlink)."""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import pytest

from tests.fakehost import NIC, add_e1000e, no_modules
from vfiod.host.binding import Binder, wait_for_node
from vfiod.host.fake import FakeSysfs
from vfiod.host.sysfs import HostError
from vfiod.host.watcher import Action, Host, HostChange, HostEvent, UEvent
from vfiod.state import StateFile


@pytest.fixture
def host(tmp_path: Path) -> tuple[FakeSysfs, StateFile, Host, list[HostEvent]]:
    fs = FakeSysfs(tmp_path / "sys")
    fs.add_driver("vfio-pci")
    add_e1000e(fs)
    state = StateFile(str(tmp_path / "state.json"))
    live = Host(fs, state)
    heard: list[HostEvent] = []
    live.listeners.append(heard.append)
    return fs, state, live, heard


def test_bind_and_unbind_change_the_driver(
    host: tuple[FakeSysfs, StateFile, Host, list[HostEvent]],
) -> None:
    fs, state, live, heard = host
    Binder(fs, state, load_module=no_modules, critical=dict).bind(NIC)
    event = live.apply(UEvent(Action.BIND, NIC, "vfio-pci"))
    assert event is not None
    assert event.change is HostChange.DRIVER_CHANGED
    assert event.bound_by_vfiod
    assert live.inventory.devices[NIC].driver == "vfio-pci"
    assert live.inventory.group_of(NIC).viable
    # A uevent that changes nothing is not news.
    assert live.apply(UEvent(Action.CHANGE, NIC, "vfio-pci")) is None
    assert heard == [event]


def test_removal_of_a_bound_device_drops_its_record_and_is_reported(
    host: tuple[FakeSysfs, StateFile, Host, list[HostEvent]],
) -> None:
    fs, state, live, heard = host
    Binder(fs, state, load_module=no_modules, critical=dict).bind(NIC)
    fs.write(fs.device_path(NIC) + "/remove", "1")
    event = live.apply(UEvent(Action.REMOVE, NIC, None))
    assert event == HostEvent(HostChange.REMOVED, NIC, None, bound_by_vfiod=True)
    assert NIC not in live.inventory.devices
    assert "10" not in live.inventory.groups
    assert not state.load().bindings, "a removed device cannot be restored"
    # A second remove of the same device is not news.
    assert live.apply(UEvent(Action.REMOVE, NIC, None)) is None

    fs.write(fs.path("bus/pci/rescan"), "1")
    added = live.apply(UEvent(Action.ADD, NIC, None))
    assert added is not None
    assert added.change is HostChange.ADDED
    assert not added.bound_by_vfiod
    assert live.inventory.group_of(NIC).devices[0].driver == "e1000e"
    assert [e.change for e in heard] == [HostChange.REMOVED, HostChange.ADDED]


def test_event_for_a_device_that_vanished_meanwhile_is_dropped(
    host: tuple[FakeSysfs, StateFile, Host, list[HostEvent]],
) -> None:
    fs, _, live, heard = host
    fs.write(fs.device_path(NIC) + "/remove", "1")
    # The add raced with a removal: reading the device fails; nothing changes.
    assert live.apply(UEvent(Action.BIND, NIC, "e1000e")) is None
    assert NIC in live.inventory.devices  # the remove uevent, still to come, does that
    assert heard == []


def test_wait_for_node_times_out_clearly(tmp_path: Path) -> None:
    node = tmp_path / "vfio" / "12"
    started = time.monotonic()
    with pytest.raises(HostError) as timeout:
        wait_for_node(str(node), timeout=0.1)
    assert time.monotonic() - started < 2
    assert timeout.value.errno == errno.ETIMEDOUT
    assert str(timeout.value) == (
        f"{node} did not appear within 0.1 s; check that udev is running and the vfio "
        "modules are loaded"
    )
    os.makedirs(node.parent)
    node.touch()
    wait_for_node(str(node), timeout=0.1)


def test_refresh_reads_what_vfiod_just_changed(
    host: tuple[FakeSysfs, StateFile, Host, list[HostEvent]],
) -> None:
    fs, state, live, heard = host
    Binder(fs, state, load_module=no_modules, critical=dict).bind(NIC)
    assert live.inventory.devices[NIC].driver == "e1000e"  # no uevent processed yet
    live.refresh([NIC])
    assert live.inventory.devices[NIC].driver == "vfio-pci"
    assert live.inventory.group_of(NIC).viable
    assert heard == [], "a refresh is vfiod's own doing, not news"
