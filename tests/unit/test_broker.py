"""The broker on a fake host: fake sysfs, fake kernel, real policy files."""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import os
import resource
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from tests.fakehost import (
    BRIDGE_GROUP,
    E1000_A,
    E1000_B,
    NIC,
    NIC_GROUP,
    SATA,
    FakeHost,
    build,
    no_modules,
)
from vfiod.broker import (
    MESSAGE_DENIED,
    MESSAGE_FREED,
    MESSAGE_GRANTED,
    MESSAGE_RELEASED,
    AcquireOptions,
    Backend,
    Broker,
    Grant,
    LeaseChange,
    LeaseState,
    _appearing,
    first_fit,
)
from vfiod.errors import (
    Busy,
    Cancelled,
    HostCritical,
    InvalidArgument,
    KernelError,
    NotFound,
    NotSupported,
    NotViable,
    PermissionDenied,
    Unsafe,
)
from vfiod.host.binding import Binder
from vfiod.host.watcher import Action, Host, UEvent
from vfiod.pci import PciAddress
from vfiod.policy.load import PolicyHolder
from vfiod.policy.model import Caller
from vfiod.vfio import VfioError, abi
from vfiod.vfio.kernel import IovaRange

ALICE = Caller(uid=1000, user="alice", gids=(1000,), groups=("alice",), unit=None, slices=())
BOB = Caller(uid=1001, user="bob", gids=(1001,), groups=("bob",), unit=None, slices=())
ROOT = Caller(uid=0, user="root", gids=(0,), groups=("root",), unit=None, slices=())

POLICY = """
[[rule]]
name = "alice-nic"
effect = "allow"
address = "0000:00:10.0"
users = ["alice"]
managed = true
max-locked-memory = "1M"
max-leases = 1

[[rule]]
name = "alice-bridged"
effect = "allow"
address = "0000:02:01.0"
users = ["alice"]
managed = true

[[rule]]
name = "bob-bridged"
effect = "allow"
address = ["0000:02:01.0", "0000:02:02.0"]
users = ["bob"]
managed = true
companions = true

[[rule]]
name = "alice-sata"
effect = "allow"
address = "0000:00:1f.*"
users = ["alice"]
managed = true
companions = true
"""

LEGACY = AcquireOptions(backend=Backend.LEGACY, managed=True)
MiB = 1 << 20


class ManualWatcher:
    """Process exits delivered by the test."""

    def __init__(self) -> None:
        self.watched: dict[int, Callable[[], None]] = {}

    def watch(self, pidfd: int, on_exit: Callable[[], None]) -> Callable[[], None]:
        self.watched[pidfd] = on_exit

        def stop() -> None:
            self.watched.pop(pidfd, None)

        return stop

    def exit_all(self) -> None:
        for on_exit in list(self.watched.values()):
            on_exit()


@dataclasses.dataclass
class World:
    host: FakeHost
    live: Host
    broker: Broker
    watcher: ManualWatcher
    events: list[tuple[str, LeaseChange]]

    def acquire(
        self, caller: Caller = ALICE, devices: tuple[str, ...] = (str(NIC),), **options: object
    ) -> Grant:
        merged = dataclasses.replace(LEGACY, **options)  # type: ignore[arg-type]
        return asyncio.run(self.broker.acquire(caller, 4242, ":1.7", list(devices), merged))


def make_world(
    tmp_path: Path, topology: str = "small", policy: str = POLICY, settings: str = ""
) -> World:
    host = build(tmp_path / "host", topology, policy=policy, settings=settings)
    live = Host(host.sysfs, host.state)
    binder = Binder(host.sysfs, host.state, load_module=no_modules, critical=dict)
    watcher = ManualWatcher()
    broker = Broker(live, binder, host.kernel, PolicyHolder(str(host.policy_root)), watcher)
    events: list[tuple[str, LeaseChange]] = []
    broker.listeners.append(lambda lease, change: events.append((lease.id, change)))
    return World(host, live, broker, watcher, events)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = make_world(tmp_path)
    yield w
    w.broker.shutdown()
    assert w.broker.leases == {}, "a lease outlived the test"
    assert w.host.kernel.open_nodes() == {}


def close_all(fds: dict[str, int]) -> None:
    for fd in fds.values():
        os.close(fd)


def test_managed_acquire_release_restores_the_driver(world: World) -> None:
    grant = world.acquire(label="vm1")
    try:
        assert sorted(grant.fds) == ["container", "device:0000:00:10.0", "group:10"]
        assert world.host.sysfs.driver(NIC) == "vfio-pci"
        lease = grant.lease
        assert lease.state is LeaseState.ACTIVE
        assert lease.group_ids == (NIC_GROUP,)
        assert lease.rules == ("alice-nic",)
        assert lease.moved == (NIC,)
        record = world.host.state.load().leases[lease.id]
        assert (record.uid, record.pid, record.label, record.moved) == (
            1000,
            4242,
            "vm1",
            (str(NIC),),
        )
        assert str(NIC) in world.host.state.load().bindings
    finally:
        close_all(grant.fds)
    world.broker.release(grant.lease.id, ALICE)
    assert grant.lease.state is LeaseState.FREE
    assert world.host.sysfs.driver(NIC) == "e1000e"
    assert world.broker.leases == {}
    assert world.host.state.load().leases == {}
    assert world.host.state.load().bindings == {}
    assert [c for _, c in world.events] == [
        LeaseChange.GRANTED,
        LeaseChange.ENDED,
        LeaseChange.FREED,
    ]


def test_group_stays_leased_while_the_client_holds_a_device_fd(world: World) -> None:
    grant = world.acquire()
    device_fd = grant.fds.pop("device:0000:00:10.0")
    close_all(grant.fds)
    world.broker.release(grant.lease.id, ALICE)
    assert grant.lease.state is LeaseState.DRAINING
    assert world.host.sysfs.driver(NIC) == "vfio-pci", "no unbind under an open device"
    with pytest.raises(Busy, match=r"leased to an unnamed VM \(uid 1000, lease \w+, draining\)"):
        world.acquire()
    assert world.broker.drain() == []
    os.close(device_fd)
    assert world.broker.drain() == [grant.lease]
    assert world.host.sysfs.driver(NIC) == "e1000e"


def test_second_caller_is_told_who_holds_the_group(world: World) -> None:
    """The label to the holder's uid and root; the uid to anyone."""
    grant = world.acquire(label="win10")
    try:
        with pytest.raises(Busy) as busy:
            world.acquire(BOB)
        assert f"leased to uid 1000 (lease {grant.lease.id})" in busy.value.message
        assert "win10" not in busy.value.message
        with pytest.raises(Busy) as busy:
            world.acquire(ROOT)
        assert f"leased to win10 (uid 1000, lease {grant.lease.id})" in busy.value.message
    finally:
        close_all(grant.fds)


def test_refusals_change_nothing(world: World) -> None:
    with pytest.raises(PermissionDenied, match=r"(?i)no policy rule allows user bob"):
        world.acquire(BOB)
    with pytest.raises(NotViable, match=r"is bound to e1000e.*managed=true"):
        world.acquire(managed=False)
    with pytest.raises(NotFound, match=r"no PCI device 0000:00:1e\.0"):
        world.acquire(devices=("0000:00:1e.0",))
    with pytest.raises(InvalidArgument, match="malformed PCI address"):
        world.acquire(devices=("nic",))
    with pytest.raises(InvalidArgument, match="at least one device"):
        world.acquire(devices=())
    assert world.host.sysfs.driver(NIC) == "e1000e"
    assert world.host.state.load().bindings == {}
    assert world.broker.leases == {}
    assert world.host.kernel.open_nodes() == {}


def test_companions_need_their_own_grant(world: World) -> None:
    with pytest.raises(PermissionDenied, match=r"also holds 0000:02:02\.0.*companions = true"):
        world.acquire(devices=(str(E1000_A),))
    assert world.host.sysfs.driver(E1000_A) == "e1000"
    grant = world.acquire(BOB, devices=(str(E1000_A),))
    try:
        assert grant.lease.group_ids == (BRIDGE_GROUP,)
        assert sorted(grant.fds) == [
            "container",
            "device:0000:02:01.0",
            "device:0000:02:02.0",
            "group:4",
        ]
        assert grant.lease.moved == (E1000_A, E1000_B)
        assert world.host.sysfs.driver(PciAddress.parse("0000:01:00.0")) is None
    finally:
        close_all(grant.fds)
    world.broker.release(grant.lease.id, BOB)
    assert world.host.sysfs.driver(E1000_A) == world.host.sysfs.driver(E1000_B) == "e1000"


def test_a_failed_bind_puts_everything_back(world: World) -> None:
    # The second device fails to move; the first, moved already, goes back.
    world.host.sysfs.fail_next_write("0000:02:02.0/driver_override", 5)
    with pytest.raises(KernelError, match="EIO"):
        world.acquire(BOB, devices=(str(E1000_A),))
    assert world.host.sysfs.driver(E1000_A) == world.host.sysfs.driver(E1000_B) == "e1000"
    assert world.host.state.load().bindings == {}
    assert world.broker.leases == {}


def test_a_failed_open_puts_the_driver_back(world: World) -> None:
    world.host.kernel.fail_next("set_iommu", 22)
    with pytest.raises(KernelError, match="EINVAL"):
        world.acquire()
    assert world.host.sysfs.driver(NIC) == "e1000e"
    assert world.host.state.load().bindings == {}
    assert world.broker.leases == {}


def test_host_critical_devices_are_refused_unless_named(tmp_path: Path) -> None:
    w = make_world(tmp_path)
    w.broker.binder.critical = lambda: {SATA: ("backs / (ext4 on /dev/sda1)",)}
    try:
        with pytest.raises(HostCritical, match="backs /"):
            w.acquire(devices=(str(SATA),))
        assert w.host.sysfs.driver(SATA) == "ahci"
        assert w.host.state.load().bindings == {}
    finally:
        w.broker.shutdown()


MAX_LEASES_POLICY = """
[[rule]]
name = "alice-vfs"
effect = "allow"
address = "0000:01:*"
users = ["alice"]
max-leases = 1
"""


def test_max_leases(tmp_path: Path) -> None:
    w = make_world(tmp_path, "scale:4", MAX_LEASES_POLICY)
    try:
        grant = w.acquire(devices=("0000:01:00.0",), managed=False)
        close_all(grant.fds)
        assert sorted(grant.fds) == [
            "container",
            "device:0000:01:00.0",
            "device:0000:01:00.1",
            "group:100",
        ]
        with pytest.raises(PermissionDenied, match=r"max-leases = 1.*release one first"):
            w.acquire(devices=("0000:01:01.0",), managed=False)
        w.broker.release(grant.lease.id, ALICE)
        close_all(w.acquire(devices=("0000:01:01.0",), managed=False).fds)
    finally:
        w.broker.shutdown()


def test_only_the_owner_or_root_may_release(world: World) -> None:
    grant = world.acquire()
    close_all(grant.fds)
    with pytest.raises(PermissionDenied, match="belongs to uid 1000"):
        world.broker.release(grant.lease.id, BOB)
    world.broker.release(grant.lease.id, ROOT)
    with pytest.raises(NotFound, match="ended already"):
        world.broker.release(grant.lease.id, ALICE)


def test_removal_of_a_leased_device_ends_the_lease(world: World) -> None:
    grant = world.acquire()
    close_all(grant.fds)
    world.host.sysfs.write(world.host.sysfs.device_path(NIC) + "/remove", "1")
    world.live.apply(UEvent(Action.REMOVE, NIC, None))
    assert grant.lease.state is LeaseState.FREE
    assert grant.lease.revoked
    assert grant.lease.end_reason == "device 0000:00:10.0 was removed from the host"


def test_owner_gone_ends_its_leases(world: World) -> None:
    grant = world.acquire()
    close_all(grant.fds)
    world.broker.end_owner(":1.7", "its bus connection closed")
    assert grant.lease.state is LeaseState.FREE
    assert world.host.sysfs.driver(NIC) == "e1000e"


def test_iommufd_backend_hands_out_unbound_cdevs(world: World) -> None:
    grant = world.acquire(backend=Backend.IOMMUFD)
    kernel = world.host.kernel
    try:
        assert sorted(grant.fds) == ["device:0000:00:10.0", "iommufd"]
        nodes = set(kernel.open_nodes().values())
        assert "/dev/iommu" in nodes
        assert "/dev/vfio/10" not in nodes, "an open group would keep the cdev from binding"
        # What the VMM does with them: bind, allocate an IOAS, attach.
        device, iommufd = grant.fds["device:0000:00:10.0"], grant.fds["iommufd"]
        assert kernel.device_bind_iommufd(device, iommufd) > 0
        kernel.device_attach_iommufd_pt(device, kernel.ioas_alloc(iommufd))
        world.broker.release(grant.lease.id, ALICE)
        assert grant.lease.state is LeaseState.DRAINING, "the bound cdev holds the group"
        assert world.host.sysfs.driver(NIC) == "vfio-pci"
    finally:
        close_all(grant.fds)
    assert world.broker.drain() == [grant.lease]
    assert world.host.sysfs.driver(NIC) == "e1000e"


def test_open_devices_false_returns_no_device_fds(world: World) -> None:
    grant = world.acquire(open_devices=False)
    close_all(grant.fds)
    assert sorted(grant.fds) == ["container", "group:10"]


# -- owner processes


def _low_memlock() -> None:
    # Below the hard limit, so raising it needs no CAP_SYS_RESOURCE (which
    # a container may not give the test; vfiod under systemd has it).
    _, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    resource.setrlimit(resource.RLIMIT_MEMLOCK, (64 << 10, hard))


@pytest.fixture
def child() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)"],
        preexec_fn=_low_memlock,  # noqa: PLW1509 - no threads run in the test
    )
    yield proc
    proc.kill()
    proc.wait()


def test_owner_pidfd_of_another_uid_is_refused(
    world: World, child: subprocess.Popen[bytes]
) -> None:
    pidfd = os.pidfd_open(child.pid)  # the child runs as root, the caller is alice
    try:
        with pytest.raises(PermissionDenied, match=f"pid {child.pid} of uid 0, not one of yours"):
            world.acquire(owner_pidfd=pidfd)
    finally:
        os.close(pidfd)
    assert world.host.sysfs.driver(NIC) == "e1000e"


def test_owner_pidfd_must_be_a_pidfd(world: World) -> None:
    r, w = os.pipe()
    try:
        with pytest.raises(InvalidArgument, match="not a pidfd"):
            world.acquire(owner_pidfd=r)
    finally:
        os.close(r)
        os.close(w)


ROOT_POLICY = """
[[rule]]
name = "root-nic"
effect = "allow"
address = "0000:00:10.0"
users = ["root"]
managed = true
max-locked-memory = "1M"
"""


def test_owner_exit_ends_the_lease_and_memlock_is_raised(
    tmp_path: Path, child: subprocess.Popen[bytes]
) -> None:
    w = make_world(tmp_path, policy=ROOT_POLICY)
    pidfd = os.pidfd_open(child.pid)
    try:
        grant = w.acquire(ROOT, owner_pidfd=pidfd)
    finally:
        os.close(pidfd)
    close_all(grant.fds)
    try:
        soft, _ = resource.prlimit(child.pid, resource.RLIMIT_MEMLOCK)
        assert soft == MiB
        # A bus disconnect does not end a lease that follows a process.
        w.broker.end_owner(":1.7", "its bus connection closed")
        assert w.broker.leases == {grant.lease.id: grant.lease}
        w.watcher.exit_all()
        assert grant.lease.state is LeaseState.FREE
        assert grant.lease.end_reason == f"its owner process {child.pid} exited"
        assert grant.lease.owner_pidfd is None
    finally:
        w.broker.shutdown()


# -- brokered DMA


def test_map_dma_at_a_given_iova_including_zero(world: World) -> None:
    grant = world.acquire()
    close_all(grant.fds)
    memfd = os.memfd_create("guest-ram")
    os.ftruncate(memfd, MiB)
    try:
        assert world.broker.map_dma(grant.lease.id, ALICE, memfd, 0, 64 << 10, 0) == 0
        assert world.broker.map_dma(grant.lease.id, ALICE, memfd, 0, 64 << 10, None) == 64 << 10
        with pytest.raises(PermissionDenied, match="max-locked-memory of 1048576"):
            world.broker.map_dma(grant.lease.id, ALICE, memfd, 0, MiB, None)
        with pytest.raises(KernelError, match="EEXIST"):
            world.broker.map_dma(grant.lease.id, ALICE, memfd, 0, 4096, 0)
        with pytest.raises(PermissionDenied, match="belongs to uid 1000"):
            world.broker.map_dma(grant.lease.id, BOB, memfd, 0, 4096, None)
        with pytest.raises(InvalidArgument, match="multiples of 4096"):
            world.broker.map_dma(grant.lease.id, ALICE, memfd, 0, 100, None)
        container_fd = grant.lease.handles[0].fileno()
        assert [(m.iova, m.size) for m in world.host.kernel.mappings(container_fd)] == [
            (0, 64 << 10),
            (64 << 10, 64 << 10),
        ]
        with pytest.raises(NotFound, match="no MapDma mapping of 0x1000 bytes at IOVA 0x0"):
            world.broker.unmap_dma(grant.lease.id, ALICE, 0, 4096)
        world.broker.unmap_dma(grant.lease.id, ALICE, 0, 64 << 10)
        assert grant.lease.pinned == 64 << 10
    finally:
        os.close(memfd)
    world.broker.release(grant.lease.id, ALICE)
    assert world.host.kernel.pinned_bytes == 0
    assert world.host.kernel.mmaps() == {}


def test_an_iommufd_under_a_locked_memory_limit_counts_per_process(world: World) -> None:
    """The rule's max-locked-memory: what the VMM pins through the iommufd
    counts against its own RLIMIT_MEMLOCK (IOMMU_OPTION_RLIMIT_MODE, which
    only vfiod may set); without one the kernel's default (per user) stays."""
    kernel = world.host.kernel
    mode = abi.IommufdOption.RLIMIT_MODE
    limited = world.acquire(backend=Backend.IOMMUFD)  # alice-nic: max-locked-memory 1M
    unlimited = world.acquire(BOB, ("0000:02:01.0", "0000:02:02.0"), backend=Backend.IOMMUFD)
    try:
        for grant, wanted in ((limited, abi.RlimitMode.PROCESS), (unlimited, abi.RlimitMode.USER)):
            assert kernel.iommufd_option(
                grant.fds["iommufd"], mode, abi.IommufdOptionOp.GET, 0
            ) == (wanted)
    finally:
        close_all(limited.fds)
        close_all(unlimited.fds)
    world.broker.release(limited.lease.id, ALICE)
    world.broker.release(unlimited.lease.id, BOB)
    # A vfiod without CAP_SYS_RESOURCE cannot: the lease is refused, nothing stays.
    kernel.cap_sys_resource = False
    with pytest.raises(KernelError, match="needs CAP_SYS_RESOURCE"):
        world.acquire(backend=Backend.IOMMUFD)
    assert world.broker.leases == {}
    assert world.host.sysfs.driver(NIC) == "e1000e"
    assert "/dev/iommu" not in kernel.open_nodes().values()


def test_map_dma_on_an_iommufd_lease_is_not_supported(world: World) -> None:
    grant = world.acquire(backend=Backend.IOMMUFD)
    close_all(grant.fds)
    with pytest.raises(NotSupported, match="IOMMU_IOAS_MAP"):
        world.broker.map_dma(grant.lease.id, ALICE, 0, 0, 4096, 0)


def test_first_fit() -> None:
    ranges = (IovaRange(0, 0xFEDF_FFFF), IovaRange(0xFEF0_0000, (1 << 48) - 1))
    assert first_fit(ranges, [], 4096, 4096) == 0
    assert first_fit(ranges, [(0, 4096)], 4096, 4096) == 4096
    assert first_fit(ranges, [(0, 4096)], 2 << 20, 2 << 20) == 2 << 20
    assert first_fit(ranges, [(0, 0xFEE0_0000)], 1 << 20, 1 << 20) == 0xFEF0_0000
    assert first_fit((IovaRange(0, 0xFFFF),), [(0, 0x10000)], 4096, 4096) is None


# -- policy reload


def test_reload_revokes_leases_the_policy_no_longer_allows(world: World) -> None:
    grant = world.acquire()
    close_all(grant.fds)
    policy = world.host.policy_root / "etc/vfiod/policy.d/50-test.toml"
    policy.write_text(
        POLICY.replace(
            'users = ["alice"]\nmanaged = true\nmax-locked',
            'users = ["carol"]\nmanaged = true\nmax-locked',
        )
    )
    assert world.broker.reload_policy() == [grant.lease]
    assert grant.lease.state is LeaseState.FREE
    assert "no longer allows 0000:00:10.0" in grant.lease.end_reason
    assert world.host.sysfs.driver(NIC) == "e1000e"


# -- no-IOMMU

NOIOMMU_POLICY = """
[[rule]]
name = "alice-noiommu"
effect = "allow"
address = "0000:00:10.0"
users = ["alice"]
managed = true
unsafe-noiommu = true
"""


def test_noiommu_needs_all_three_consents(tmp_path: Path) -> None:
    w = make_world(tmp_path / "a", "noiommu", NOIOMMU_POLICY)
    try:
        with pytest.raises(Unsafe, match="allow-unsafe-noiommu"):
            w.acquire(unsafe_noiommu=True)
        assert w.host.sysfs.driver(NIC) == "e1000e"
    finally:
        w.broker.shutdown()
    w = make_world(
        tmp_path / "b", "noiommu", NOIOMMU_POLICY, settings="allow-unsafe-noiommu = true\n"
    )
    try:
        with pytest.raises(Unsafe, match="unsafe-noiommu"):
            w.acquire()
        with pytest.raises(NotSupported, match="backend=legacy"):
            w.acquire(unsafe_noiommu=True, backend=Backend.IOMMUFD)
        assert w.host.sysfs.driver(NIC) == "e1000e"
        grant = w.acquire(unsafe_noiommu=True)
        close_all(grant.fds)
        assert grant.lease.unsafe
        assert sorted(grant.fds) == ["container", "device:0000:00:10.0", "group:noiommu-0"]
        assert (
            w.host.sysfs.read(
                w.host.sysfs.path("module/vfio/parameters/enable_unsafe_noiommu_mode")
            )
            == "Y"
        )
        with pytest.raises(NotSupported, match="no-IOMMU"):
            w.broker.map_dma(grant.lease.id, ALICE, 0, 0, 4096, 0)
        w.broker.release(grant.lease.id, ALICE)
        assert w.host.sysfs.driver(NIC) == "e1000e"
        assert w.host.sysfs.iommu_group(NIC) is None
    finally:
        w.broker.shutdown()


# -- restart


def test_leases_survive_a_restart_as_draining_and_are_restored(tmp_path: Path) -> None:
    w = make_world(tmp_path)
    grant = w.acquire()
    device_fd = grant.fds.pop("device:0000:00:10.0")
    close_all(grant.fds)
    # vfiod dies: its own fds go, the client's device fd stays open.
    for handle in grant.lease.handles:
        handle.close()
    grant.lease.handles.clear()

    again = Broker(
        Host(w.host.sysfs, w.host.state),
        Binder(w.host.sysfs, w.host.state, load_module=no_modules, critical=dict),
        w.host.kernel,
        PolicyHolder(str(w.host.policy_root)),
        ManualWatcher(),
    )
    recovered = again.recover()
    assert [lease.id for lease in recovered] == [grant.lease.id]
    assert recovered[0].state is LeaseState.DRAINING
    assert w.host.sysfs.driver(NIC) == "vfio-pci", "not while the client holds the device"
    with pytest.raises(Busy):
        asyncio.run(again.acquire(ALICE, None, ":1.9", [str(NIC)], LEGACY))
    os.close(device_fd)
    assert again.drain() == recovered
    assert w.host.sysfs.driver(NIC) == "e1000e"
    assert w.host.state.load().leases == {}
    assert w.host.state.load().bindings == {}


def test_check_access_explains(world: World) -> None:
    results = world.broker.check_access(
        ALICE, [str(NIC), str(E1000_B), "0000:00:1e.0", "bad"], LEGACY
    )
    assert [(r.device, r.allowed, r.code) for r in results] == [
        (str(NIC), True, "allowed"),
        (str(E1000_B), False, "no-rule"),
        ("0000:00:1e.0", False, "not-found"),
        ("bad", False, "invalid-address"),
    ]
    assert "alice-nic" in results[0].reason
    assert "no PCI device" in results[2].reason
    assert "malformed" in results[3].reason


class FakeFdStore:
    """systemd's fd store: keeps a duplicate of each fd under its name, passes
    duplicates to the next process (in reverse: systemd keeps no order),
    closes its own when told to drop a name."""

    def __init__(self) -> None:
        self.fds: dict[str, list[int]] = {}
        self.messages = 0

    def keep(self, name: str, fds: Sequence[int]) -> None:
        self.messages += 1
        self.fds.setdefault(name, []).extend(os.dup(fd) for fd in fds)

    def drop(self, name: str) -> None:
        self.messages += 1
        for fd in self.fds.pop(name, []):
            os.close(fd)

    def passed(self) -> dict[str, list[int]]:
        """What a restarted vfiod finds in LISTEN_FDS."""
        return {name: [os.dup(fd) for fd in reversed(fds)] for name, fds in self.fds.items()}

    def close(self) -> None:
        for name in list(self.fds):
            self.drop(name)


def die(broker: Broker) -> None:
    """The process ends: its fds close, nothing else happens (no ioctl)."""
    for lease in broker.leases.values():
        for handle in lease.handles:
            os.close(handle.fileno())
            handle._fd = None
        if lease.owner_pidfd is not None:
            os.close(lease.owner_pidfd)
            lease.owner_pidfd = None
    broker.host.listeners.clear()


def restarted(w: World, store: FakeFdStore) -> Broker:
    return Broker(
        Host(w.host.sysfs, w.host.state),
        Binder(w.host.sysfs, w.host.state, load_module=no_modules, critical=dict),
        w.host.kernel,
        PolicyHolder(str(w.host.policy_root)),
        ManualWatcher(),
        fd_store=store,
    )


def test_a_restart_with_the_fd_store_keeps_leases_active(tmp_path: Path) -> None:
    w = make_world(tmp_path)
    store = FakeFdStore()
    w.broker.fd_store = store
    try:
        grant = w.acquire()
        legacy_id = grant.lease.id
        # Its container and group, under the first short name, in one message.
        assert [(name, len(fds)) for name, fds in store.fds.items()] == [("0", 2)]
        assert grant.lease.stored == ("0",)
        assert store.messages == 1
        memfd = os.memfd_create("guest-ram")
        os.ftruncate(memfd, MiB)
        w.broker.map_dma(legacy_id, ALICE, memfd, 0, 64 << 10, 0)
        os.close(memfd)
        device_fd = grant.fds.pop("device:0000:00:10.0")
        close_all(grant.fds)
        die(w.broker)

        again = restarted(w, store)
        (lease,) = again.recover(store.passed())
        assert lease.id == legacy_id
        assert lease.state is LeaseState.ACTIVE
        assert w.host.sysfs.driver(NIC) == "vfio-pci"
        with pytest.raises(Busy):
            asyncio.run(again.acquire(BOB, None, ":1.9", [str(NIC)], LEGACY))
        # The mapping made before the restart is still there, and still ours.
        container = lease.container
        assert container is not None
        assert [(m.iova, m.size) for m in w.host.kernel.mappings(container.fileno())] == [
            (0, 64 << 10)
        ]
        again.unmap_dma(legacy_id, ALICE, 0, 64 << 10)
        assert w.host.kernel.mappings(container.fileno()) == ()
        os.close(device_fd)
        again.release(legacy_id, ALICE)
        assert again.leases == {}
        assert w.host.sysfs.driver(NIC) == "e1000e"
        assert store.fds == {}
        assert w.host.state.load().leases == {}
    finally:
        store.close()


def test_a_restart_with_stale_or_missing_fds_drains(tmp_path: Path) -> None:
    w = make_world(tmp_path)
    store = FakeFdStore()
    w.broker.fd_store = store
    try:
        grant = w.acquire()
        close_all(grant.fds)
        die(w.broker)
        passed = store.passed()
        (name,) = grant.lease.stored
        os.close(passed[name].pop())  # systemd lost one (FileDescriptorStoreMax)
        passed["stranger"] = [os.dup(passed[name][0])]
        again = restarted(w, store)
        (lease,) = again.recover(passed)
        assert lease.state is LeaseState.FREE, "drained at once: nobody holds the group"
        assert w.host.sysfs.driver(NIC) == "e1000e"
        assert store.fds == {}
    finally:
        store.close()


def test_every_step_is_an_audit_entry_with_its_fields(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="vfiod.broker")
    with pytest.raises(PermissionDenied):
        world.acquire(BOB)
    grant = world.acquire(label="vm-audit")
    close_all(grant.fds)
    world.broker.release(grant.lease.id, ALICE)
    entries = {
        getattr(r, "MESSAGE_ID", None): r for r in caplog.records if hasattr(r, "MESSAGE_ID")
    }
    denied = entries[MESSAGE_DENIED]
    assert (1001, str(NIC)) == (denied.CALLER_UID, denied.DEVICES)  # type: ignore[attr-defined]
    for message_id in (MESSAGE_GRANTED, MESSAGE_RELEASED, MESSAGE_FREED):
        entry = entries[message_id]
        fields = {k: getattr(entry, k) for k in ("LEASE", "CALLER_UID", "CALLER_PID", "LABEL")}
        assert fields == {
            "LEASE": grant.lease.id,
            "CALLER_UID": 1000,
            "CALLER_PID": 4242,
            "LABEL": "vm-audit",
        }
        assert getattr(entry, "DEVICES") == str(NIC)  # noqa: B009 - a journal field
        assert getattr(entry, "CALLER_UNIT") == ""  # noqa: B009


def test_nodes_that_appear_late_are_waited_for() -> None:
    tries: list[int] = []

    def late() -> str:
        tries.append(1)
        if len(tries) < 3:
            raise VfioError(errno.ENOENT, "open", "/dev/vfio/10")
        return "opened"

    assert asyncio.run(_appearing(late)) == "opened"
    assert len(tries) == 3

    def busy() -> str:
        raise VfioError(errno.EBUSY, "open", "/dev/vfio/10")

    with pytest.raises(VfioError, match="EBUSY"):
        asyncio.run(_appearing(busy))  # other errors are not waited out

    def missing() -> str:
        raise VfioError(errno.ENOENT, "open", "/dev/vfio/9")

    with pytest.raises(VfioError, match="ENOENT"):
        asyncio.run(_appearing(missing, timeout=0.05))  # not for ever

    def stopped() -> None:
        raise Cancelled("request 'r1' was cancelled by its caller")

    with pytest.raises(Cancelled):
        asyncio.run(_appearing(missing, stopped))  # nor once its request stopped


def test_two_devices_of_one_group_bind_the_group_once(world: World) -> None:
    grant = world.acquire(BOB, devices=(str(E1000_A), str(E1000_B)))
    close_all(grant.fds)
    assert grant.lease.group_ids == (BRIDGE_GROUP,)
    assert grant.lease.moved == (E1000_A, E1000_B)
    unbinds = [path for path, _ in world.host.sysfs.writes if path.endswith("/unbind")]
    assert len(unbinds) == 2, unbinds
    world.broker.release(grant.lease.id, BOB)
    assert world.host.sysfs.driver(E1000_A) == world.host.sysfs.driver(E1000_B) == "e1000"
