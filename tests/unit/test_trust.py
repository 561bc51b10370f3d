"""Everything a lease makes reachable passes the caller's policy, deny rules
included, and CheckAccess says what Acquire does (fake host, topology
"trust": a multifunction pair in one group, an SR-IOV PF whose VFs share
its group behind a switch without ACS)."""

from __future__ import annotations

import errno
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fakehost import (
    E1000_A,
    E1000_B,
    IGB_PF,
    IGB_VFS,
    MULTI_A,
    MULTI_B,
    MULTI_GROUP,
    NIC,
    SRIOV_GROUP,
)
from tests.unit.test_broker import (
    ALICE,
    BOB,
    ROOT,
    FakeFdStore,
    World,
    close_all,
    die,
    make_world,
    restarted,
)
from vfiod.broker import MESSAGE_DENIED, MESSAGE_REVOKED, AcquireOptions
from vfiod.errors import (
    BrokerError,
    InvalidArgument,
    KernelError,
    NotViable,
    PermissionDenied,
)
from vfiod.host.fake import FakeSysfs
from vfiod.host.sysfs import HostError
from vfiod.host.watcher import Action, UEvent
from vfiod.pci import PciAddress
from vfiod.policy.model import Caller

POLICY = f"""
[[rule]]
name = "no-multi-a-for-alice"
effect = "deny"
address = "{MULTI_A}"
users = ["alice"]

[[rule]]
name = "alice-multi-b"
effect = "allow"
address = "{MULTI_B}"
users = ["alice"]
managed = true
companions = true

[[rule]]
name = "bob-multi-b"
effect = "allow"
address = "{MULTI_B}"
users = ["bob"]
managed = true

[[rule]]
name = "alice-vfs"
effect = "allow"
vendor = "8086"
device = "10ca"
users = ["alice"]
managed = true
companions = true

[[rule]]
name = "no-pf-for-bob"
effect = "deny"
address = "{IGB_PF}"
users = ["bob"]

[[rule]]
name = "bob-vfs"
effect = "allow"
vendor = "8086"
device = "10ca"
users = ["bob"]

[[rule]]
name = "bob-bridged"
effect = "allow"
address = "0000:02:01.0"
users = ["bob"]
managed = true
companions = true
"""


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = make_world(tmp_path, "trust", POLICY)
    yield w
    w.broker.shutdown()
    assert w.broker.leases == {}


def check(world: World, caller: object, address: PciAddress, **options: object) -> tuple[bool, str]:
    merged = AcquireOptions(managed=True, **options)  # type: ignore[arg-type]
    (access,) = world.broker.check_access(caller, [str(address)], merged)  # type: ignore[arg-type]
    return access.allowed, access.reason


def refused(world: World, caller: object, address: PciAddress) -> BrokerError:
    with pytest.raises(BrokerError) as e:
        world.acquire(caller, devices=(str(address),))  # type: ignore[arg-type]
    return e.value


def unchanged(world: World) -> None:
    assert world.host.sysfs.driver(MULTI_A) == world.host.sysfs.driver(MULTI_B) == "e1000e"
    assert world.host.state.load().bindings == {}
    assert world.broker.leases == {}
    assert world.host.kernel.open_nodes() == {}


def test_a_deny_rule_on_a_companion_refuses_the_lease(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    error = refused(world, ALICE, MULTI_B)
    assert isinstance(error, PermissionDenied)
    assert f"IOMMU group {MULTI_GROUP} also holds {MULTI_A}" in error.message
    assert "deny rule 'no-multi-a-for-alice'" in error.message
    unchanged(world)
    assert check(world, ALICE, MULTI_B) == (False, error.message)
    (denied,) = [r for r in caplog.records if getattr(r, "MESSAGE_ID", None) == MESSAGE_DENIED]
    assert denied.__dict__["ERROR"] == "org.vfiod1.Error.PermissionDenied"


def test_a_companion_on_vfio_pci_already_needs_the_callers_policy_too(world: World) -> None:
    """The group fd opens every member on vfio-pci, moved or not."""
    world.broker.binder.bind(MULTI_A)
    world.live.refresh([MULTI_A])
    try:
        error = refused(world, ALICE, MULTI_B)
        assert "deny rule 'no-multi-a-for-alice'" in error.message
        # No rule denies it to bob, but his rule (no companions) does not reach it.
        error = refused(world, BOB, MULTI_B)
        assert f"also holds {MULTI_A}" in error.message
        assert "does not say companions = true" in error.message
        assert check(world, BOB, MULTI_B) == (False, error.message)
    finally:
        world.broker.binder.restore(MULTI_A)


def test_companions_ride_along_only_where_no_rule_says_no(world: World) -> None:
    grant = world.acquire(BOB, devices=(str(E1000_A),))
    try:
        assert grant.lease.moved == (E1000_A, E1000_B)
        assert grant.lease.rules == ("bob-bridged",)
        assert {"device:0000:02:01.0", "device:0000:02:02.0"} <= set(grant.fds)
    finally:
        close_all(grant.fds)
    world.broker.release(grant.lease.id, BOB)


def test_an_sriov_pf_with_enabled_vfs_is_never_unbound(world: World) -> None:
    vf = IGB_VFS[0]
    error = refused(world, ALICE, vf)
    assert isinstance(error, PermissionDenied)
    assert f"{IGB_PF} is an SR-IOV physical function with 2 enabled virtual function(s)" in (
        error.message
    )
    assert "sriov_numvfs" in error.message
    assert world.host.sysfs.driver(IGB_PF) == "igb"
    assert [world.host.sysfs.driver(v) for v in IGB_VFS] == ["igbvf", "igbvf"]
    assert world.host.state.load().bindings == {}
    assert check(world, ALICE, vf) == (False, error.message)


def test_check_access_on_a_vf_whose_pf_is_denied_says_no(world: World) -> None:
    allowed, reason = check(world, BOB, IGB_VFS[0])
    assert allowed is False
    assert f"IOMMU group {SRIOV_GROUP} also holds {IGB_PF}" in reason
    assert "deny rule 'no-pf-for-bob'" in reason
    assert refused(world, BOB, IGB_VFS[0]).message == reason


def test_a_member_that_vanishes_while_binding_is_undone(world: World) -> None:
    """The second member goes away (hot-unplug) while the first is bound."""
    fs = world.host.sysfs
    assert isinstance(fs, FakeSysfs)
    write = fs.write

    def write_then_unplug(path: str, value: str) -> None:
        write(path, value)
        if path.endswith("drivers_probe") and value == str(E1000_A):
            write(os.path.join(fs.device_path(E1000_B), "remove"), "1")

    fs.write = write_then_unplug  # type: ignore[method-assign]
    with pytest.raises(KernelError) as e:
        world.acquire(BOB, devices=(str(E1000_A),))
    fs.write = write  # type: ignore[method-assign]
    assert e.value.errno == errno.ENODEV, e.value.message
    assert fs.driver(E1000_A) == "e1000"
    assert world.host.state.load().bindings == {}
    assert world.broker.leases == {}
    assert E1000_B not in world.live.inventory.devices


def test_check_access_refuses_what_acquire_refuses_for_the_owner_pidfd(world: World) -> None:
    memfd = os.memfd_create("not-a-pidfd")
    try:
        allowed, reason = check(world, ROOT, NIC, owner_pidfd=memfd)
        with pytest.raises(InvalidArgument) as e:
            world.acquire(ROOT, devices=(str(NIC),), owner_pidfd=memfd)
    finally:
        os.close(memfd)
    assert (allowed, reason) == (False, e.value.message)
    assert "not a pidfd" in reason


def test_reload_revokes_when_a_companion_becomes_denied(world: World) -> None:
    grant = world.acquire(BOB, devices=(str(E1000_A),))
    close_all(grant.fds)
    policy = world.host.policy_root / "etc/vfiod/policy.d/50-test.toml"
    policy.write_text(
        policy.read_text()
        + f'\n[[rule]]\nname = "not-b"\neffect = "deny"\naddress = "{E1000_B}"\nusers = ["bob"]\n'
    )
    assert world.broker.reload_policy() == [grant.lease]
    assert "not-b" in grant.lease.end_reason
    assert world.host.sysfs.driver(E1000_B) == "e1000"


def test_root_releasing_anothers_lease_revokes_it(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    grant = world.acquire(BOB, devices=(str(E1000_A),))
    close_all(grant.fds)
    world.broker.release(grant.lease.id, ROOT)
    assert grant.lease.revoked is True
    assert grant.lease.end_reason == "released by uid 0"
    assert any(getattr(r, "MESSAGE_ID", None) == MESSAGE_REVOKED for r in caplog.records)


def test_the_reply_fd_limit_is_checked_before_anything_is_granted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Eight groups of two: a container, 8 group fds and 16 device fds are
    more than one D-Bus reply carries."""
    policy = '[[rule]]\nname = "all"\neffect = "allow"\naddress = "*"\nusers = ["alice"]\n'
    w = make_world(tmp_path, "scale:16", policy)
    caplog.set_level(logging.INFO)
    devices = tuple(str(a) for a in sorted(w.live.inventory.devices))
    with pytest.raises(InvalidArgument, match="more than the 16 one D-Bus reply can carry"):
        w.acquire(ALICE, devices=devices, managed=False)
    assert w.broker.leases == {}
    assert w.host.kernel.open_nodes() == {}
    assert not [r for r in caplog.records if "granted" in r.getMessage()]
    (access,) = w.broker.check_access(ALICE, [devices[0]], AcquireOptions(open_devices=True))
    assert access.allowed is True, access.reason
    grant = w.acquire(ALICE, devices=devices, managed=False, open_devices=False)
    assert len(grant.fds) == 9
    close_all(grant.fds)
    w.broker.shutdown()


def test_vfs_enabled_after_start_make_the_pf_immovable(world: World) -> None:
    """No uevent tells of a PF's new VFs: the VFs' own events must."""
    fs = world.host.sysfs
    numvfs = os.path.join(fs.device_path(IGB_PF), "sriov_numvfs")
    fs.write(numvfs, "0")
    for vf in IGB_VFS:
        world.live.apply(UEvent(Action.REMOVE, vf, None))
    assert world.live.inventory.devices[IGB_PF].virtfns == ()
    fs.write(numvfs, "2")
    for vf in IGB_VFS:
        world.live.apply(UEvent(Action.ADD, vf, "igbvf"))
    assert world.live.inventory.devices[IGB_PF].virtfns == IGB_VFS
    assert "SR-IOV physical function" in refused(world, ALICE, IGB_VFS[0]).message


def test_the_binder_itself_never_unbinds_a_pf_with_enabled_vfs(world: World) -> None:
    with pytest.raises(HostError) as e:
        world.broker.binder.bind(IGB_PF)
    assert e.value.errno == errno.EBUSY
    assert "would destroy them" in str(e.value)
    assert world.host.sysfs.driver(IGB_PF) == "igb"
    assert world.host.state.load().bindings == {}


def test_brokered_dma_without_a_rule_limit_is_capped_by_dma_limit(tmp_path: Path) -> None:
    """vfiod pins with its own CAP_IPC_LOCK: never without a cap."""
    policy = f'[[rule]]\nname = "nic"\neffect = "allow"\naddress = "{NIC}"\nusers = ["alice"]\n'
    policy += "managed = true\n"
    w = make_world(tmp_path, "small", policy, settings='dma-limit = "4M"\n')
    grant = w.acquire(ALICE)
    memfd = os.memfd_create("guest")
    try:
        os.ftruncate(memfd, 8 << 20)
        assert grant.lease.max_locked_memory is None
        with pytest.raises(
            PermissionDenied, match=re.escape("more than vfiod.toml's dma-limit of 4194304")
        ):
            w.broker.map_dma(grant.lease.id, ALICE, memfd, 0, 8 << 20, 0)
        assert w.broker.map_dma(grant.lease.id, ALICE, memfd, 0, 4 << 20, 0) == 0
        with pytest.raises(PermissionDenied, match="dma-limit"):
            w.broker.map_dma(grant.lease.id, ALICE, memfd, 4 << 20, 4096, None)
    finally:
        os.close(memfd)
        close_all(grant.fds)
        w.broker.shutdown()


NOBODY = Caller(
    uid=65534,
    user="nobody",
    gids=(65534,),
    groups=("nogroup",),
    unit="vm-1.service",
    slices=("machine.slice",),
)


def test_a_lease_adopted_after_a_restart_keeps_its_callers_names(tmp_path: Path) -> None:
    """A reload decides again for the caller of a lease made before a
    restart: by user, group or slice, as it did then."""
    policy = f'[[rule]]\nname = "nobody-nic"\neffect = "allow"\naddress = "{NIC}"\n'
    policy += 'users = ["nobody"]\ngroups = ["nogroup"]\nslices = ["machine.slice"]\n'
    policy += "managed = true\n"
    w = make_world(tmp_path, "small", policy)
    store = FakeFdStore()
    w.broker.fd_store = store
    try:
        grant = w.acquire(NOBODY)
        close_all(grant.fds)
        die(w.broker)
        again = restarted(w, store)
        (lease,) = again.recover(store.passed())
        assert lease.caller == NOBODY
        assert again.reload_policy() == []
        again.release(lease.id, NOBODY)
        assert w.host.sysfs.driver(NIC) == "e1000e"
    finally:
        store.close()


def test_a_requested_bridge_is_refused_at_once(tmp_path: Path) -> None:
    """vfio-pci never takes a bridge: its group node would never appear."""
    policy = '[[rule]]\nname = "all"\neffect = "allow"\naddress = "*"\nusers = ["alice"]\n'
    w = make_world(tmp_path, "small", policy + "managed = true\n")
    with pytest.raises(
        InvalidArgument, match=r"0000:00:1c\.0 \(PCI bridge, pcieport\) is a bridge"
    ):
        w.acquire(ALICE, devices=("0000:00:1c.0",))
    assert w.broker.check_access(ALICE, ["0000:00:1c.0"], AcquireOptions())[0].allowed is False
    assert w.broker.leases == {}


def test_a_requested_device_on_no_driver_is_bound_for_its_device_fd(tmp_path: Path) -> None:
    policy = f'[[rule]]\nname = "nic"\neffect = "allow"\naddress = "{NIC}"\nusers = ["alice"]\n'
    w = make_world(tmp_path, "small", policy + "managed = true\n")
    fs = w.host.sysfs
    fs.write(os.path.join(fs.device_path(NIC), "driver/unbind"), str(NIC))
    w.live.refresh([NIC])
    with pytest.raises(NotViable, match=r"no driver\) must be on vfio-pci first.*managed=true"):
        w.acquire(ALICE, managed=False)
    grant = w.acquire(ALICE)
    assert "device:0000:00:10.0" in grant.fds
    assert fs.driver(NIC) == "vfio-pci"
    close_all(grant.fds)
    w.broker.release(grant.lease.id, ALICE)
    assert fs.driver(NIC) is None, "back where it was: on no driver"
