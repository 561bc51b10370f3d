"""A restart after the state file was damaged: vfiod gives back what the
valid records say it moved, never unbinds under a client that still holds
a group, and never lets two records claim one group."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tests.fakehost import NIC
from tests.unit.test_broker import ALICE, World, close_all, die, make_world, restarted
from tests.unit.test_broker import FakeFdStore as FdStore
from vfiod.broker import LeaseState


def damage(w: World, change: str) -> None:
    w.host.state.save(w.host.state.load())  # every record in the snapshot, none in the journal
    path = Path(w.host.state.path)
    raw = json.loads(path.read_text())
    if change == "bindings":
        raw["bindings"] = []
    elif change == "leases":
        raw["leases"] = {"junk": 1}
    elif change == "twice":
        (lease_id, record) = next(iter(raw["leases"].items()))
        copy = dict(record, created=record["created"] + 1, fds=[])
        raw["leases"][lease_id[:-1] + ("0" if lease_id[-1] != "0" else "1")] = copy
    path.write_text(json.dumps(raw))
    w.host.state._cached = None  # the next process reads the file


def test_a_lease_whose_binding_records_were_lost_still_gives_its_device_back(
    tmp_path: Path,
) -> None:
    w = make_world(tmp_path)
    grant = w.acquire()
    close_all(grant.fds)
    die(w.broker)
    damage(w, "bindings")
    again = restarted(w, FdStore())
    (lease,) = again.recover()
    assert lease.state is LeaseState.FREE or lease.id not in again.leases
    assert w.host.sysfs.driver(NIC) == "e1000e", "reprobed: the native driver took it"
    assert w.host.state.load().bindings == {}
    assert w.host.state.moved_aside is not None


def test_a_device_moved_for_a_lost_lease_waits_for_its_client(tmp_path: Path) -> None:
    """The lease record is gone, the binding record is not, and the client
    still holds a device fd: unbinding now would block in the kernel."""
    w = make_world(tmp_path)
    grant = w.acquire()
    device_fd = grant.fds.pop("device:0000:00:10.0")
    close_all(grant.fds)
    die(w.broker)
    damage(w, "leases")
    again = restarted(w, FdStore())
    assert again.recover() == []
    assert w.host.sysfs.driver(NIC) == "vfio-pci", "not while the client holds it"
    again.drain()
    assert w.host.sysfs.driver(NIC) == "vfio-pci"
    os.close(device_fd)
    again.drain()
    assert w.host.sysfs.driver(NIC) == "e1000e"
    assert w.host.state.load().bindings == {}


def test_two_records_claiming_one_group_keep_only_the_one_with_its_fds(tmp_path: Path) -> None:
    w = make_world(tmp_path)
    store = FdStore()
    w.broker.fd_store = store
    try:
        grant = w.acquire(ALICE)
        close_all(grant.fds)
        die(w.broker)
        damage(w, "twice")
        again = restarted(w, store)
        (lease,) = again.recover(store.passed())
        assert lease.id == grant.lease.id
        assert lease.state is LeaseState.ACTIVE
        assert list(w.host.state.load().leases) == [lease.id]
        again.release(lease.id, ALICE)
        assert w.host.sysfs.driver(NIC) == "e1000e"
    finally:
        store.close()


def test_stored_fds_that_are_not_what_the_record_says_are_closed_once(tmp_path: Path) -> None:
    """Every fd name is there, but the container is no container."""
    w = make_world(tmp_path)
    store = FdStore()
    w.broker.fd_store = store
    try:
        grant = w.acquire(ALICE)
        close_all(grant.fds)
        die(w.broker)
        passed = store.passed()
        name = f"{grant.lease.id}.container"
        os.close(passed[name][0])
        passed[name] = [os.memfd_create("not-a-container")]
        again = restarted(w, store)
        (lease,) = again.recover(passed)
        assert lease.state is not LeaseState.ACTIVE
        assert w.host.sysfs.driver(NIC) == "e1000e"
    finally:
        store.close()
