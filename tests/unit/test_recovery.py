"""A restart after the state file was damaged: vfiod gives back what the
valid records say it moved, never unbinds under a client that still holds
a group, and never lets two records claim one group."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fakehost import NIC
from tests.unit.test_broker import (
    ALICE,
    BOB,
    ROOT,
    ROOT_POLICY,
    ManualWatcher,
    World,
    close_all,
    die,
    make_world,
    restarted,
)
from tests.unit.test_broker import FakeFdStore as FdStore
from vfiod.broker import LeaseState
from vfiod.vfio.kernel import LinuxKernel


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
    """As many fds as it had under its name, but one is no VFIO node."""
    w = make_world(tmp_path)
    store = FdStore()
    w.broker.fd_store = store
    try:
        grant = w.acquire(ALICE)
        close_all(grant.fds)
        die(w.broker)
        passed = store.passed()
        (name,) = grant.lease.stored
        fds = passed[name]
        os.close(fds.pop(0))
        fds.append(os.memfd_create("not-a-vfio-node"))
        again = restarted(w, store)
        (lease,) = again.recover(passed)
        assert lease.state is not LeaseState.ACTIVE
        assert w.host.sysfs.driver(NIC) == "e1000e"
    finally:
        store.close()


@pytest.fixture
def owner() -> Iterator[subprocess.Popen[bytes]]:
    """A process for a lease to follow."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield process
    process.kill()
    process.wait()


def test_fds_of_another_lease_under_a_leases_name_adopt_neither(tmp_path: Path) -> None:
    """Each stored fd is known by what it is open on: a group fd that moved
    to another lease's name makes one lease hold too much and the other too
    little, and neither is adopted with the wrong group."""
    w = make_world(tmp_path)
    store = FdStore()
    w.broker.fd_store = store
    try:
        first = w.acquire(ALICE)
        second = w.acquire(BOB, devices=("0000:02:01.0", "0000:02:02.0"))
        close_all(first.fds)
        close_all(second.fds)
        die(w.broker)
        passed = store.passed()
        kernel = w.host.kernel
        (moved,) = (
            fd for fd in passed[second.lease.stored[0]] if kernel.node_of(fd, ["/dev/vfio/4"])
        )
        passed[second.lease.stored[0]].remove(moved)
        passed[first.lease.stored[0]].append(moved)
        again = restarted(w, store)
        leases = again.recover(passed)
        assert {lease.id for lease in leases} == {first.lease.id, second.lease.id}
        assert all(lease.state is not LeaseState.ACTIVE for lease in leases)
        assert store.fds == {}
        assert w.host.sysfs.driver(NIC) == "e1000e"
    finally:
        store.close()


def test_an_older_vfiods_fds_one_name_each_are_adopted(tmp_path: Path) -> None:
    """vfiod before one name per lease kept "<id>.container", "<id>.group.N":
    an upgrade across a restart adopts its leases all the same."""
    w = make_world(tmp_path)
    store = FdStore()
    w.broker.fd_store = store
    try:
        grant = w.acquire(ALICE)
        lease_id = grant.lease.id
        close_all(grant.fds)
        die(w.broker)
        old_names = {
            "/dev/vfio/vfio": f"{lease_id}.container",
            "/dev/vfio/10": f"{lease_id}.group.10",
        }
        passed = {
            old_names[w.host.kernel.node_of(fd, old_names)]: [fd]
            for fd in store.passed().pop(grant.lease.stored[0])
        }
        record = w.host.state.load().leases[lease_id]
        w.host.state.put_lease(dataclasses.replace(record, fds=tuple(sorted(passed))))
        for fd in store.fds.pop(grant.lease.stored[0]):  # the store as the older vfiod left it
            os.close(fd)
        store.fds = {name: [os.dup(fds[0])] for name, fds in passed.items()}
        again = restarted(w, store)
        (lease,) = again.recover(passed)
        assert lease.state is LeaseState.ACTIVE
        again.release(lease_id, ALICE)
        assert store.fds == {}, "every name of the old lease was dropped"
        assert w.host.sysfs.driver(NIC) == "e1000e"
    finally:
        store.close()


def test_a_lease_that_follows_its_owner_still_does_after_a_restart(
    tmp_path: Path, owner: subprocess.Popen[bytes]
) -> None:
    w = make_world(tmp_path, policy=ROOT_POLICY)
    store = FdStore()
    w.broker.fd_store = store
    pidfd = os.pidfd_open(owner.pid)
    try:
        grant = w.acquire(ROOT, owner_pidfd=pidfd)
        os.close(pidfd)
        close_all(grant.fds)
        assert [len(fds) for fds in store.fds.values()] == [3], "container, group, owner"
        die(w.broker)
        again = restarted(w, store)
        (lease,) = again.recover(store.passed())
        assert again.leases[lease.id].state is LeaseState.ACTIVE
        assert lease.owner_pidfd is not None
        watcher = again.watcher
        assert isinstance(watcher, ManualWatcher)
        assert list(watcher.watched) == [lease.owner_pidfd]
        watcher.exit_all()
        assert lease.state is LeaseState.FREE
        assert lease.end_reason == f"its owner process {owner.pid} exited"
        assert store.fds == {}
    finally:
        store.close()
        again.shutdown()


def test_a_lease_whose_owner_kept_no_pidfd_is_not_adopted(
    tmp_path: Path, owner: subprocess.Popen[bytes]
) -> None:
    """Without its owner's pidfd a lease could no longer end with its owner."""
    w = make_world(tmp_path, policy=ROOT_POLICY)
    store = FdStore()
    w.broker.fd_store = store
    pidfd = os.pidfd_open(owner.pid)
    try:
        grant = w.acquire(ROOT, owner_pidfd=pidfd)
        os.close(pidfd)
        close_all(grant.fds)
        die(w.broker)
        passed = store.passed()
        (kept,) = passed.values()
        nodes = ["/dev/vfio/vfio", "/dev/vfio/10"]
        (owner_fd,) = (fd for fd in kept if not w.host.kernel.node_of(fd, nodes))
        kept.remove(owner_fd)
        os.close(owner_fd)
        again = restarted(w, store)
        (lease,) = again.recover(passed)
        assert lease.state is not LeaseState.ACTIVE
        assert w.host.sysfs.driver(NIC) == "e1000e"
    finally:
        store.close()


_OPEN_IN_OWN_MOUNT_NAMESPACE = """
import os, socket, sys
fd = os.open("/dev/null", os.O_RDWR)
socket.send_fds(socket.socket(fileno=int(sys.argv[1])), [b"fd"], [fd])
"""


def test_an_fd_from_a_mount_namespace_that_is_gone_is_known_by_its_device() -> None:
    """systemd runs vfiod in a mount namespace of its own (ProtectSystem=):
    the fds a restarted vfiod gets back were opened in the old one, whose
    /proc/self/fd link reads "/null", not "/dev/null". They are still known."""
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("needs unshare(1) from util-linux (apt install util-linux)")
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with ours, theirs:
        opened = subprocess.run(
            [
                unshare,
                "--mount",
                "--propagation",
                "private",
                sys.executable,
                "-c",
                _OPEN_IN_OWN_MOUNT_NAMESPACE,
                str(theirs.fileno()),
            ],
            pass_fds=[theirs.fileno()],
            check=False,
            capture_output=True,
            text=True,
        )
        if opened.returncode and "Operation not permitted" in opened.stderr:
            pytest.skip("needs root (or CAP_SYS_ADMIN) for a mount namespace of its own")
        assert opened.returncode == 0, opened.stderr
        _, (fd,), _, _ = socket.recv_fds(ours, 16, 1)
    try:
        assert os.readlink(f"/proc/self/fd/{fd}") != "/dev/null", "the case this test is about"
        kernel = LinuxKernel()
        assert kernel.node_of(fd, ["/dev/zero", "/dev/null"]) == "/dev/null"
        assert kernel.node_of(fd, ["/dev/zero"]) == ""
    finally:
        os.close(fd)
