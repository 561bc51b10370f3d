"""CheckAccess answers with the plan, structured: for every kind of refusal
the plan and the broker's request checks make, its reason code, the member
that refuses, what would move and what the lease would reach; and Acquire
refuses with the same error, code and blocker (fake host)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fakehost import (
    BRIDGE_GROUP,
    E1000_A,
    E1000_B,
    IGB_PF,
    IGB_VFS,
    MULTI_A,
    MULTI_B,
    MULTI_GROUP,
    NIC,
    ROOT_PORT,
    SATA,
    SMBUS,
    SRIOV_GROUP,
)
from tests.unit.test_broker import (
    ALICE,
    BOB,
    LEGACY,
    MAX_LEASES_POLICY,
    NOIOMMU_POLICY,
    ROOT,
    World,
    close_all,
    make_world,
)
from tests.unit.test_tenants import FakeAuthority, acquire_as_this_process, polkit_world
from tests.unit.test_trust import POLICY as TRUST_POLICY
from vfiod import polkit
from vfiod.broker import Access, Backend
from vfiod.errors import (
    BrokerError,
    HostCritical,
    InvalidArgument,
    NotFound,
    NotSupported,
    NotViable,
    PermissionDenied,
    Unsafe,
)
from vfiod.host.fake import NOIOMMU_PARAMETER
from vfiod.pci import PciAddress
from vfiod.policy.model import Caller
from vfiod.reasons import Reason


def rule(name: str, address: str, extra: str = "managed = true\n") -> str:
    return (
        f'[[rule]]\nname = "{name}"\neffect = "allow"\naddress = "{address}"\n'
        f'users = ["alice"]\n{extra}\n'
    )


@pytest.fixture
def small(tmp_path: Path) -> Iterator[World]:
    w = make_world(tmp_path)  # test_broker's policy
    yield w
    w.broker.shutdown()


@pytest.fixture
def trust(tmp_path: Path) -> Iterator[World]:
    w = make_world(tmp_path, "trust", TRUST_POLICY)
    yield w
    w.broker.shutdown()


def check(world: World, caller: Caller, *devices: PciAddress | str, **options: object) -> Access:
    """CheckAccess for the first of ``devices`` (asked with the others), with
    the options World.acquire uses."""
    merged = dataclasses.replace(LEGACY, **options)  # type: ignore[arg-type]
    return world.broker.check_access(caller, [str(d) for d in devices], merged)[0]


def refused(
    world: World, caller: Caller, *devices: PciAddress | str, **options: object
) -> tuple[Access, BrokerError]:
    """CheckAccess's refusal of ``devices``, and Acquire's: the same."""
    access = check(world, caller, *devices, **options)
    with pytest.raises(BrokerError) as e:
        world.acquire(caller, tuple(str(d) for d in devices), **options)
    assert access.allowed is False
    assert (e.value.code, e.value.blocker, e.value.message) == (
        access.code,
        access.blocker,
        access.reason,
    )
    return access, e.value


def test_allowed_says_what_moves_and_what_the_lease_reaches(small: World) -> None:
    access = check(small, ALICE, NIC)
    assert access == Access(
        device=str(NIC),
        allowed=True,
        reason=access.reason,
        code=Reason.ALLOWED,
        move=(NIC,),
        blocker=None,
        group="10",
        holder=None,
        companions=(),
    )
    assert "alice-nic" in access.reason
    # bob-bridged names both e1000s: the one not asked for comes along.
    access = check(small, BOB, E1000_A)
    assert (access.code, access.move, access.companions, access.group) == (
        Reason.ALLOWED,
        (E1000_A, E1000_B),
        (E1000_B,),
        BRIDGE_GROUP,
    )
    # Asked for together, neither is a companion.
    assert check(small, BOB, E1000_A, E1000_B).companions == ()


def test_a_held_group_is_busy_and_names_its_lease(small: World) -> None:
    grant = small.acquire(BOB, (str(E1000_A),), label="vm-7")
    try:
        access = check(small, BOB, E1000_A)
        assert (access.allowed, access.code, access.holder, access.move) == (
            True,
            Reason.BUSY,
            grant.lease.id,
            (),
        )
        assert f"but now IOMMU group {BRIDGE_GROUP} is leased to vm-7" in access.reason
        # A refusal still names who holds the group.
        access = check(small, ALICE, E1000_A)
        assert (access.code, access.holder) == (Reason.COMPANION_NOT_ALLOWED, grant.lease.id)
    finally:
        close_all(grant.fds)


def test_needs_managed(small: World) -> None:
    access, error = refused(small, ALICE, NIC, managed=False)
    assert isinstance(error, NotViable)
    assert (access.code, access.blocker, access.move) == (Reason.NEEDS_MANAGED, NIC, (NIC,))


def test_no_rule(small: World) -> None:
    access, error = refused(small, BOB, NIC)
    assert isinstance(error, PermissionDenied)
    assert (access.code, access.blocker) == (Reason.NO_RULE, NIC)


def test_companion_not_allowed(small: World) -> None:
    access, error = refused(small, ALICE, E1000_A)
    assert isinstance(error, PermissionDenied)
    assert (access.code, access.blocker, access.companions) == (
        Reason.COMPANION_NOT_ALLOWED,
        E1000_B,
        (E1000_B,),
    )
    assert access.move == (E1000_A, E1000_B)


def test_deny_rules_on_the_device_and_on_a_companion(trust: World) -> None:
    access, _ = refused(trust, ALICE, MULTI_A)
    assert (access.code, access.blocker, access.group) == (Reason.DENY_RULE, MULTI_A, MULTI_GROUP)
    access, error = refused(trust, ALICE, MULTI_B)
    assert isinstance(error, PermissionDenied)
    assert (access.code, access.blocker, access.companions) == (
        Reason.COMPANION_DENIED,
        MULTI_A,
        (MULTI_A,),
    )


def test_pf_with_vfs(trust: World) -> None:
    access, error = refused(trust, ALICE, IGB_VFS[0])
    assert isinstance(error, PermissionDenied)
    assert (access.code, access.blocker, access.group) == (Reason.PF_WITH_VFS, IGB_PF, SRIOV_GROUP)
    assert set(access.move) == {IGB_PF, *IGB_VFS}
    assert set(access.companions) == {IGB_PF, IGB_VFS[1]}


def test_managed_not_allowed(tmp_path: Path) -> None:
    w = make_world(tmp_path, policy=rule("nic", str(NIC), extra=""))
    access, error = refused(w, ALICE, NIC)
    assert isinstance(error, PermissionDenied)
    assert (access.code, access.blocker) == (Reason.MANAGED_NOT_ALLOWED, NIC)


def test_companions_cannot_move(tmp_path: Path) -> None:
    """The companion has a rule of its own, but what was asked for has no
    companions = true to move it."""
    w = make_world(tmp_path, policy=rule("a", str(E1000_A)) + rule("b", str(E1000_B)))
    access, error = refused(w, ALICE, E1000_A)
    assert isinstance(error, PermissionDenied)
    assert (access.code, access.blocker) == (Reason.COMPANIONS_CANNOT_MOVE, E1000_B)


def test_host_critical_on_the_device_and_on_a_member_that_would_move(tmp_path: Path) -> None:
    w = make_world(
        tmp_path, policy=rule("sata", "0000:00:1f.*", "managed = true\ncompanions = true")
    )
    w.broker.binder.critical = lambda: {SATA: ("backs / (ext4 on /dev/sda1)",)}
    access, error = refused(w, ALICE, SATA)
    assert isinstance(error, HostCritical)
    assert (access.code, access.blocker) == (Reason.HOST_CRITICAL, SATA)

    # By exact address, SATA may go; SMBUS, carried by companions = true, may not.
    policy = rule("sata", str(SATA), "managed = true\ncompanions = true")
    w = make_world(tmp_path / "exact", policy=policy)
    w.broker.binder.critical = lambda: {SMBUS: ("drives the console",)}
    access, error = refused(w, ALICE, SATA)
    assert isinstance(error, HostCritical)
    assert (access.code, access.blocker, access.move) == (
        Reason.HOST_CRITICAL,
        SMBUS,
        (SATA, SMBUS),
    )


def test_bridge(tmp_path: Path) -> None:
    w = make_world(tmp_path, policy=rule("all", "*"))
    access, error = refused(w, ALICE, ROOT_PORT)
    assert isinstance(error, InvalidArgument)
    assert (access.code, access.blocker) == (Reason.BRIDGE, ROOT_PORT)


def test_backend_of_the_rule(tmp_path: Path) -> None:
    w = make_world(tmp_path, policy=rule("nic", str(NIC), 'managed = true\nbackends = ["iommufd"]'))
    access, error = refused(w, ALICE, NIC)
    assert isinstance(error, PermissionDenied)
    assert (access.code, access.blocker, access.backends) == (Reason.BACKEND, NIC, ("iommufd",))
    assert check(w, ALICE, NIC, backend=Backend.IOMMUFD).code == Reason.ALLOWED


def test_noiommu_consents_and_backend(tmp_path: Path) -> None:
    w = make_world(tmp_path / "off", "noiommu", NOIOMMU_POLICY)
    access, error = refused(w, ALICE, NIC, unsafe_noiommu=True)
    assert isinstance(error, Unsafe)
    assert (access.code, access.blocker, access.group) == (Reason.UNSAFE_NOT_ALLOWED, NIC, "")

    settings = "allow-unsafe-noiommu = true\n"
    w = make_world(tmp_path / "on", "noiommu", NOIOMMU_POLICY, settings=settings)
    access, error = refused(w, ALICE, NIC)
    assert isinstance(error, Unsafe)
    assert (access.code, access.blocker, access.move) == (Reason.UNSAFE_CONSENT, NIC, (NIC,))
    access, error = refused(w, ALICE, NIC, unsafe_noiommu=True, backend=Backend.IOMMUFD)
    assert isinstance(error, NotSupported)
    assert (access.code, access.blocker, access.backends) == (Reason.BACKEND, NIC, ("legacy",))
    assert check(w, ALICE, NIC, unsafe_noiommu=True).code == Reason.ALLOWED

    w = make_world(tmp_path / "unsupported", "noiommu", NOIOMMU_POLICY, settings=settings)
    os.remove(w.host.sysfs.path(NOIOMMU_PARAMETER))
    access, error = refused(w, ALICE, NIC, unsafe_noiommu=True)
    assert isinstance(error, NotSupported)
    assert (access.code, access.blocker) == (Reason.NO_IOMMU_GROUP, NIC)


def test_max_leases(tmp_path: Path) -> None:
    w = make_world(tmp_path, "scale:4", MAX_LEASES_POLICY)
    grant = w.acquire(devices=("0000:01:00.0",), managed=False)
    try:
        access, error = refused(w, ALICE, "0000:01:01.0", managed=False)
        assert isinstance(error, PermissionDenied)
        assert (access.code, access.blocker, access.holder) == (Reason.MAX_LEASES, None, None)
    finally:
        close_all(grant.fds)
        w.broker.shutdown()


def test_too_many_fds(tmp_path: Path) -> None:
    w = make_world(tmp_path, "scale:16", rule("all", "*", ""))
    devices = sorted(w.live.inventory.devices)
    access, error = refused(w, ALICE, *devices, managed=False)
    assert isinstance(error, InvalidArgument)
    assert (access.code, access.blocker) == (Reason.TOO_MANY_FDS, None)
    assert check(w, ALICE, *devices, managed=False, open_devices=False).code == Reason.ALLOWED


def test_owner_pidfd_refuses_every_device_first(small: World) -> None:
    memfd = os.memfd_create("not-a-pidfd")
    try:
        merged = dataclasses.replace(LEGACY, owner_pidfd=memfd)
        results = small.broker.check_access(ROOT, [str(NIC), "0000:00:1e.0"], merged)
        access, error = refused(small, ROOT, NIC, owner_pidfd=memfd)
    finally:
        os.close(memfd)
    assert isinstance(error, InvalidArgument)
    assert [(r.code, r.allowed) for r in results] == [(Reason.OWNER_PIDFD, False)] * 2
    assert results[0].move == (NIC,)  # the plan is said all the same
    pidfd = os.pidfd_open(1)  # init: not alice's
    try:
        access, error = refused(small, ALICE, NIC, owner_pidfd=pidfd)
    finally:
        os.close(pidfd)
    assert isinstance(error, PermissionDenied)
    assert access.code == Reason.OWNER_PIDFD


def test_addresses(small: World) -> None:
    access, error = refused(small, ALICE, "nic")
    assert isinstance(error, InvalidArgument)
    assert (access.code, access.group, access.move) == (Reason.INVALID_ADDRESS, "", ())
    access, error = refused(small, ALICE, "0000:00:1e.0")
    assert isinstance(error, NotFound)
    assert access.code == Reason.NOT_FOUND
    # Each device its own answer; the request's refusal for those it reaches.
    results = small.broker.check_access(ALICE, [str(NIC), "0000:00:1e.0"], LEGACY)
    assert [r.code for r in results] == [Reason.ALLOWED, Reason.NOT_FOUND]


def test_no_reset(tmp_path: Path) -> None:
    """The fake host's conventional e1000s have no reset method."""
    w = make_world(
        tmp_path, policy=rule("e1000s", "0000:02:0?.0", "managed = true\nrequire-reset = true\n")
    )
    access, error = refused(w, ALICE, E1000_A, E1000_B)
    assert isinstance(error, PermissionDenied)
    assert (access.code, access.blocker, access.group) == (Reason.NO_RESET, E1000_A, BRIDGE_GROUP)


def test_polkit_is_asked_by_acquire_alone(tmp_path: Path) -> None:
    """CheckAccess answers for vfiod's policy; polkit (which might take its
    time, or want to ask someone) is asked when a lease is made."""
    w = polkit_world(tmp_path, {str(NIC): polkit.Verdict.NO})
    assert check(w, ROOT, NIC).code == Reason.ALLOWED
    with pytest.raises(PermissionDenied) as e:
        acquire_as_this_process(w)
    assert (e.value.code, e.value.blocker) == (Reason.POLKIT, NIC)
    assert isinstance(w.broker.authority, FakeAuthority)
    w.broker.shutdown()


def test_every_code_is_met_here() -> None:
    """Each code a test above meets (BUSY and ALLOWED included): a new
    refusal needs a test of its own here."""
    source = Path(__file__).read_text()
    assert [r for r in Reason if f"Reason.{r.name}" not in source] == []
