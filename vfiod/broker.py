"""Leases: who holds which IOMMU groups, through which fds, and until when.

The broker is a plain object: the D-Bus layer is a thin adapter over it, and
every decision is made here, with the policy. A lease covers whole IOMMU
groups. Its life: granted -> active -> ended (release, owner gone, device
removed, policy revoked, daemon stopping) -> draining (the client still holds
device fds, so the group stays busy) -> free (drivers vfiod changed are
restored). Every step is logged; grants, denials, releases and revocations
are audit entries with a MESSAGE_ID.

Decisions never wait: they are made on the event loop, without yielding,
so two callers racing for one group are served one after the other: the
first reserves it, the second hears who holds it. What takes long — moving
devices between drivers, scanning for host-critical devices — runs on the
worker (vfiod.worker) under that reservation, while everyone else is served.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import errno
import functools
import grp
import logging
import os
import pwd
import secrets
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from typing import Any, Protocol, TypeVar

from vfiod import polkit
from vfiod.errors import (
    BrokerError,
    Busy,
    Cancelled,
    HostCritical,
    InvalidArgument,
    KernelError,
    NotFound,
    NotSupported,
    NotViable,
    PermissionDenied,
    TimedOut,
)
from vfiod.host import noiommu, reserve
from vfiod.host.binding import (
    VFIO_PCI,
    Binder,
    CriticalDevices,
    Progress,
    Step,
    critical_refusal,
)
from vfiod.host.inventory import IommuGroup, PciDevice, cross_check_viability, is_vfio_driver
from vfiod.host.process import exited, owner_process, pidfd_pid, raise_memlock
from vfiod.host.sysfs import HostError
from vfiod.host.watcher import Action, Host, HostChange, HostEvent, UEvent
from vfiod.pci import AddressError, PciAddress
from vfiod.plan import Plan, Target, plan
from vfiod.policy.load import PolicyHolder
from vfiod.policy.model import Caller, Policy, Request, Reservation
from vfiod.reasons import Reason
from vfiod.state import LeaseRecord
from vfiod.store_names import StoreNames
from vfiod.vfio import (
    CdevDevice,
    Container,
    DmaMapping,
    Group,
    IommuFd,
    Kernel,
    NotSupportedError,
    VfioError,
    abi,
    cdev_path,
)
from vfiod.vfio.iommufd import IOMMUFD_PATH
from vfiod.vfio.kernel import IovaRange
from vfiod.worker import InlineWorker, Worker

log = logging.getLogger(__name__)

_STORE_NAME = "fds:"  # before a name of the fd store, among the keys leases claim at a restart

# Journal MESSAGE_IDs of the audit trail (stable; admins filter on them).
MESSAGE_GRANTED = "7c1d7c6a2f4b4b1a9d2e0f6c5b3a1e01"
MESSAGE_DENIED = "7c1d7c6a2f4b4b1a9d2e0f6c5b3a1e02"
MESSAGE_RELEASED = "7c1d7c6a2f4b4b1a9d2e0f6c5b3a1e03"
MESSAGE_REVOKED = "7c1d7c6a2f4b4b1a9d2e0f6c5b3a1e04"
MESSAGE_UNSAFE = "7c1d7c6a2f4b4b1a9d2e0f6c5b3a1e05"
MESSAGE_FREED = "7c1d7c6a2f4b4b1a9d2e0f6c5b3a1e06"
MESSAGE_RESERVED = "7c1d7c6a2f4b4b1a9d2e0f6c5b3a1e07"  # a reservation applied, or why not
MESSAGE_RESET = "7c1d7c6a2f4b4b1a9d2e0f6c5b3a1e08"  # a device reset between tenants, or why not
MESSAGE_POLKIT = "7c1d7c6a2f4b4b1a9d2e0f6c5b3a1e09"  # polkit's answer for a grant

PAGE = 4096
NODE_TIMEOUT = 5.0  # seconds a node may take to appear after a bind
HUGE_PAGE = 2 << 20
# dbus-daemon drops a message carrying more fds and disconnects its sender.
MAX_REPLY_FDS = 16
# How long a caller waits for Acquire unless it says (the timeout option):
# sd-bus's and libdbus's default method call timeout.
DEFAULT_TIMEOUT = 25.0
REPLY_MARGIN = 2.0  # seconds before the caller's timeout vfiod answers at the latest


class Backend(enum.StrEnum):
    LEGACY = "legacy"
    IOMMUFD = "iommufd"


class LeaseState(enum.StrEnum):
    ACTIVE = "active"
    DRAINING = "draining"
    RESTORING = "restoring"  # free of clients; its devices go back to their drivers
    FREE = "free"


class LeaseChange(enum.StrEnum):
    """What lease listeners hear."""

    GRANTED = "granted"
    ENDED = "ended"  # active -> draining; lease.end_reason says why
    FREED = "freed"


@dataclasses.dataclass(frozen=True)
class AcquireOptions:
    backend: Backend | None = None  # None: the daemon's default-backend
    open_devices: bool = True
    managed: bool = False
    unsafe_noiommu: bool = False
    owner_pidfd: int | None = None  # borrowed: the broker dups what it keeps
    label: str = ""
    request_id: str = ""  # the caller's name for the request (Cancel)
    timeout: float = DEFAULT_TIMEOUT  # seconds the caller waits for the answer


@dataclasses.dataclass(frozen=True)
class Moving:
    """A step of a device moving between drivers, for a request (its
    request-id) or a lease being freed (its id); ``owner`` the bus name that
    asked."""

    request: str
    owner: str
    device: PciAddress
    step: Step
    driver: str  # the driver it leaves (bind) or goes back to (restore)
    elapsed: float  # seconds since this device began to move


@dataclasses.dataclass(eq=False)
class Pending:
    """An Acquire in progress. Its groups and devices are reserved: no other
    request may touch them until it is granted, or has given back what it
    moved."""

    token: str
    request_id: str
    caller: Caller
    owner: str
    label: str
    keys: tuple[str, ...]  # reserved: group ids and device addresses
    rules: tuple[str, ...]  # the rules it would be held under (max-leases)
    deadline: float  # time.monotonic() by which it answers
    timeout: float
    started: float = dataclasses.field(default_factory=time.monotonic)
    error: BrokerError | None = None  # why it must stop; None: it may go on
    job: asyncio.Future[Any] | None = None  # its binding, while on the worker
    stopped: asyncio.Future[None] | None = None  # resolved when it must stop

    @property
    def moving(self) -> tuple[PciAddress, ...]:
        return tuple(PciAddress.parse(k) for k in self.keys if ":" in k)

    def stop(self, error: BrokerError) -> None:
        if self.error is None:
            self.error = error
        if self.stopped is not None and not self.stopped.done():
            self.stopped.set_result(None)

    def check(self) -> None:
        """Raise why the request must stop, if it must (also on the worker,
        between devices)."""
        if self.error is None and time.monotonic() > self.deadline:
            self.error = TimedOut(self.timed_out())
        if self.error is not None:
            raise self.error

    def timed_out(self) -> str:
        return (
            f"the request could not be done within the {self.timeout:g} s you said you would "
            "wait (option timeout); what vfiod had moved for it goes back. Slow devices take "
            "longer to rebind: ask again with a longer timeout"
        )


class ProcessWatcher(Protocol):
    """Calls ``on_exit`` once the process behind ``pidfd`` exits; the returned
    function stops watching."""

    def watch(self, pidfd: int, on_exit: Callable[[], None]) -> Callable[[], None]: ...


class FdStore(Protocol):
    """Where fds survive a restart of vfiod (systemd's fd store): ``keep``
    puts fds under a name (adding to what it has), ``drop`` lets every fd of
    that name go. The order of the fds is not kept."""

    def keep(self, name: str, fds: Sequence[int]) -> None: ...

    def drop(self, name: str) -> None: ...


class NoFdStore:
    """Without a service manager: fds die with the process, leases drain."""

    def keep(self, name: str, fds: Sequence[int]) -> None:
        pass

    def drop(self, name: str) -> None:
        pass


@dataclasses.dataclass(eq=False)
class Lease:
    id: str
    caller: Caller
    pid: int | None  # the caller's, when it asked (audit)
    owner: str  # the bus name that asked
    label: str
    backend: Backend
    unsafe: bool
    groups: tuple[IommuGroup, ...]
    devices: tuple[PciAddress, ...]  # the ones asked for
    request: Request  # what was asked, to decide again after a policy reload
    rules: tuple[str, ...]  # the policy rules that allowed it
    created: float
    restore: bool = True  # give devices back to their drivers when free
    max_locked_memory: int | None = None  # bytes MapDma may pin; None: no limit
    moved: tuple[PciAddress, ...] = ()  # devices vfiod moved to vfio-pci for it
    state: LeaseState = LeaseState.ACTIVE
    end_reason: str = ""
    revoked: bool = False  # ended by someone other than its owner
    owner_pid: int | None = None
    owner_pidfd: int | None = None  # the lease ends when this process exits
    # What vfiod holds open for the lease; closing them starts the drain.
    handles: list[Group | Container | IommuFd] = dataclasses.field(default_factory=list)
    mappings: dict[int, DmaMapping] = dataclasses.field(default_factory=dict)  # by IOVA
    unwatch: Callable[[], None] | None = None
    stored: tuple[str, ...] = ()  # names of its fds in the fd store
    request_id: str = ""  # the Acquire's request-id, to Cancel a reply that got lost

    @property
    def group_ids(self) -> tuple[str, ...]:
        return tuple(g.id for g in self.groups)

    @property
    def group_nodes(self) -> tuple[str, ...]:
        return tuple(g.node_name for g in self.groups)

    @property
    def container(self) -> Container | None:
        return next((h for h in self.handles if isinstance(h, Container)), None)

    @property
    def pinned(self) -> int:
        return sum(m.size for m in self.mappings.values())

    def record(self) -> LeaseRecord:
        return LeaseRecord(
            id=self.id,
            uid=self.caller.uid,
            pid=self.pid,
            unit=self.caller.unit,
            owner=self.owner,
            owner_pid=self.owner_pid,
            label=self.label,
            backend=self.backend.value,
            unsafe=self.unsafe,
            groups=self.group_ids,
            devices=tuple(str(d) for d in self.devices),
            rules=self.rules,
            created=self.created,
            restore=self.restore,
            max_locked_memory=self.max_locked_memory,
            moved=tuple(str(d) for d in self.moved),
            fds=self.stored,
            iommu_type=(
                int(self.container.iommu_type)
                if self.container is not None and self.container.iommu_type is not None
                else None
            ),
            mappings=tuple(sorted((m.iova, m.size) for m in self.mappings.values())),
            gids=self.caller.gids,
            slices=self.caller.slices,
        )

    def held_fds(self) -> list[int]:
        """The fds vfiod holds for the lease: its handles' and the owner's pidfd."""
        held = [handle.fileno() for handle in self.handles]
        if self.owner_pidfd is not None:
            held.append(self.owner_pidfd)
        return held

    def audit_fields(self) -> dict[str, object]:
        return {
            "LEASE": self.id,
            "CALLER_UID": self.caller.uid,
            "CALLER_PID": self.pid if self.pid is not None else "",
            "CALLER_UNIT": self.caller.unit or "",
            "LABEL": self.label,
            "DEVICES": " ".join(str(d) for d in self.devices),
            "GROUPS": " ".join(self.group_ids),
        }


@dataclasses.dataclass
class Grant:
    lease: Lease
    fds: dict[str, int]  # name -> fd; the caller of acquire() owns and closes them


@dataclasses.dataclass(frozen=True)
class Access:
    """CheckAccess's answer for one device, from the plan Acquire would make now."""

    device: str  # as asked
    allowed: bool
    reason: str  # for people
    code: Reason  # for programs
    move: tuple[PciAddress, ...] = ()  # what vfiod would move to vfio-pci for its group
    blocker: PciAddress | None = None  # the member that refuses, if one does
    group: str = ""  # the node name of its group ("" without one)
    holder: str | None = None  # the lease holding its group now
    companions: tuple[PciAddress, ...] = ()  # members the lease would reach, not asked for
    backends: tuple[str, ...] = ()  # code backend: the backends that would do


def _refused(text: str, error: BrokerError, access: Access | None = None) -> Access:
    """``access`` (or a bare answer for ``text``) refused with ``error``."""
    # Each refusal CheckAccess can meet is built with its code (the unit tests meet each).
    assert error.code is not None, f"{type(error).__name__} has no reason code: {error.message}"
    return dataclasses.replace(
        access or Access(device=text, allowed=False, reason="", code=error.code),
        allowed=False,
        reason=error.message,
        code=error.code,
        blocker=error.blocker,
        backends=error.backends,
    )


def _audit(
    message_id: str, text: str, fields: Mapping[str, object], level: int = logging.INFO
) -> None:
    log.log(level, "%s", text, extra={"MESSAGE_ID": message_id, **fields})


def _caller_fields(caller: Caller, pid: int | None) -> dict[str, object]:
    return {
        "CALLER_UID": caller.uid,
        "CALLER_PID": pid if pid is not None else "",
        "CALLER_UNIT": caller.unit or "",
    }


def first_fit(
    ranges: Iterable[IovaRange], taken: Iterable[tuple[int, int]], size: int, align: int
) -> int | None:
    """The lowest ``align``-aligned IOVA where ``size`` bytes fit inside one of
    ``ranges`` without touching a ``taken`` (start, size) interval."""
    busy = sorted(taken)
    for valid in sorted(ranges, key=lambda r: r.start):
        candidate = -(-valid.start // align) * align
        for start, length in busy:
            if candidate + size <= start:
                break
            if start + length > candidate:
                candidate = -(-(start + length) // align) * align
        if valid.contains(candidate, size):
            return candidate
    return None


class Broker:
    def __init__(
        self,
        host: Host,
        binder: Binder,
        kernel: Kernel,
        policy: PolicyHolder,
        watcher: ProcessWatcher,
        *,
        fd_store: FdStore | None = None,
        dev_vfio: str = "/dev/vfio",
        proc: str = "/proc",
        clock: Callable[[], float] = time.time,
        worker: Worker | None = None,
        udev_root: str | None = None,
        authority: polkit.Authority | None = None,
    ) -> None:
        self.host = host
        self.binder = binder
        self.kernel = kernel
        self.policy = policy
        self.watcher = watcher
        self.fd_store = fd_store if fd_store is not None else NoFdStore()
        self.store_names = StoreNames()  # (recover() counts those a restart kept)
        self.dev_vfio = dev_vfio
        self.proc = proc
        self.clock = clock
        # Slow host work; without an event loop it runs in the caller.
        self.worker: Worker = worker if worker is not None else InlineWorker()
        self.leases: dict[str, Lease] = {}
        # Acquires in progress, by token, and what each has reserved.
        self._pending: dict[str, Pending] = {}
        self._reserved: dict[str, Pending] = {}
        # Giving back after a stopped request, in the background.
        self._background: set[asyncio.Task[None]] = set()
        self.progress_listeners: list[Callable[[Moving], None]] = []
        # The leases covering each device and each group, in the order of
        # self.leases (one, but while a recovered lease drains): the bus
        # objects ask for every device and group they sync.
        self._by_device: dict[PciAddress, list[Lease]] = {}
        self._by_group: dict[str, list[Lease]] = {}
        self.listeners: list[Callable[[Lease, LeaseChange], None]] = []
        self._critical: CriticalDevices | None = None
        # Devices vfiod moved for no lease it knows, whose group a client
        # still holds: given back once free.
        self._orphans: set[PciAddress] = set()
        # The leases drain() looks at: it runs on a timer and after every
        # end, so it must not walk every lease (there may be 10,000).
        self._draining: dict[str, Lease] = {}
        # Freed leases whose devices only need a reset, for the next batch.
        self._resetting: list[tuple[Lease, Sequence[PciAddress]]] = []
        # Where the udev rules of reservations go (vfiod.host.reserve); None: nowhere.
        self.udev_root = udev_root
        # polkit, asked after the policy when vfiod.toml says polkit = true.
        self.authority = authority
        # Reserved devices whose reservation cannot apply, and why.
        self.unreservable: dict[PciAddress, str] = {}
        host.listeners.append(self._on_host_event)

    # -- queries

    def lease_of_group(self, group_id: str) -> Lease | None:
        leases = self._by_group.get(group_id)
        return leases[0] if leases else None

    def lease_of_device(self, address: PciAddress) -> Lease | None:
        """The lease that asked for the device or holds its group."""
        leases = self._by_device.get(address)
        return leases[0] if leases else None

    @staticmethod
    def _covered(lease: Lease) -> set[PciAddress]:
        return set(lease.devices) | {d.address for g in lease.groups for d in g.devices}

    def _add_lease(self, lease: Lease) -> None:
        self.leases[lease.id] = lease
        if lease.state is LeaseState.DRAINING:
            self._draining[lease.id] = lease
        for address in self._covered(lease):
            self._by_device.setdefault(address, []).append(lease)
        for group_id in lease.group_ids:
            self._by_group.setdefault(group_id, []).append(lease)

    def _remove_lease(self, lease: Lease) -> None:
        del self.leases[lease.id]
        self._draining.pop(lease.id, None)
        for address in self._covered(lease):
            _unlist(self._by_device, address, lease)
        for group_id in lease.group_ids:
            _unlist(self._by_group, group_id, lease)

    def critical(self) -> CriticalDevices:
        """Host-critical devices and why, as the last scan found them (the
        first one is made now; refresh_critical() makes the others)."""
        if self._critical is None:
            self._critical = self.binder.critical()
        return self._critical

    async def refresh_critical(self) -> set[PciAddress]:
        """Scan again for host-critical devices (mounts, swap, routes,
        consoles: tens of ms on a big host), on the worker; return the
        devices whose reasons changed."""
        before = self.critical()
        after = await self.worker.run(self.binder.critical)
        self._critical = after
        return {a for a in {*before, *after} if before.get(a) != after.get(a)}

    def reservation(self, address: PciAddress) -> Reservation | None:
        """The reservation that keeps the device on vfio-pci, if one applies."""
        if address in self.unreservable:
            return None
        return self.policy.current.reserved.get(address)

    def apply_reservations(self, previous: Policy | None = None) -> None:
        """Make the policy's reservations true: write the udev rules that
        apply them whenever a reserved device appears (boot, hotplug), give
        each reserved device present to vfio-pci, and give back those only
        ``previous`` reserved. A device whose group a lease holds is on
        vfio-pci already: it stays there when the lease ends."""
        policy = self.policy.current
        if not policy.reserved and (previous is None or not previous.reserved):
            self.unreservable = {}
            self._write_udev_rules(())  # (one left from an earlier policy goes)
            return
        critical = self.critical()
        self.unreservable = {
            address: refusal
            for address in policy.reserved
            if (refusal := critical_refusal([address], (), critical)) is not None
        }
        applied = [(r, a) for a, r in policy.reserved.items() if a not in self.unreservable]
        self._write_udev_rules(applied)
        for address, refusal in self.unreservable.items():
            _audit(
                MESSAGE_RESERVED,
                f"reservation {policy.reserved[address].name!r} does not apply to {address}: "
                f"{refusal}",
                {"DEVICES": str(address), "RESERVATION": policy.reserved[address].name},
                logging.WARNING,
            )
        inventory = self.host.inventory
        recorded = self.binder.state.load().bindings
        taking: list[PciAddress] = []
        for _, address in applied:
            device = inventory.devices.get(address)
            if device is None:
                continue  # the udev rules take it when it appears
            if str(address) in recorded:
                self.binder.forget(address)  # a lease moved it: it stays when that ends
            if self._holder(device, inventory.groups.get(device.group or "")) is not None:
                continue  # on vfio-pci for its lease already
            if device.driver == VFIO_PCI and self.binder.sysfs.driver_override(address) == VFIO_PCI:
                continue  # applied already (by the udev rules, or an earlier start)
            taking.append(address)
        giving = [
            address
            for address in (previous.reserved if previous is not None else {})
            if address not in policy.reserved
            and (device := inventory.devices.get(address)) is not None
            and self._holder(device, inventory.groups.get(device.group or "")) is None
        ]
        if not taking and not giving:
            return
        pending = self._reserve_for_reservations([*taking, *giving])
        self.worker.start(
            functools.partial(self._reservation_job, policy, taking, giving, critical),
            functools.partial(self._reservations_done, pending),
        )

    def _reservations_done(self, pending: Pending, _: None, error: BaseException | None) -> None:
        self._unreserve(pending)
        if error is not None:
            log.error("applying reservations: %s", error)
        # As their bind uevents will say (listeners hear it now: the bus).
        for address in pending.moving:
            self.host.apply(UEvent(Action.BIND, address, VFIO_PCI))

    def _write_udev_rules(self, applied: Sequence[tuple[Reservation, PciAddress]]) -> None:
        if self.udev_root is None:
            return
        try:
            devices = self.host.inventory.devices
            ids = {a: (d.vendor, d.device) for _, a in applied if (d := devices.get(a))}
            changed = reserve.write_rules(self.udev_root, reserve.udev_rules(applied, ids))
        except OSError as e:
            log.error(
                "cannot write %s (%s): reserved devices present now go to vfio-pci, but at the "
                "next boot or hotplug their native driver may take them first",
                os.path.join(self.udev_root, reserve.RULES_FILE),
                e,
            )
            return
        if changed:
            log.info("udev rules for %d reserved device(s) written", len(applied))

    def _reserve_for_reservations(self, addresses: Sequence[PciAddress]) -> Pending:
        """Hold the devices (and their groups) while they move, as an Acquire would."""
        inventory = self.host.inventory
        keys = {str(a) for a in addresses}
        keys |= {g for a in addresses if (g := inventory.devices[a].group) is not None}
        pending = Pending(
            token=secrets.token_hex(8),
            request_id="",
            caller=Caller(uid=0, user="root", gids=(0,), groups=(), unit=None, slices=()),
            owner="",
            label="a reservation",
            keys=tuple(sorted(keys)),
            rules=(),
            deadline=float("inf"),
            timeout=float("inf"),
        )
        self._pending[pending.token] = pending
        for key in pending.keys:
            self._reserved[key] = pending
        return pending

    def _reservation_job(
        self,
        policy: Policy,
        taking: Sequence[PciAddress],
        giving: Sequence[PciAddress],
        critical: CriticalDevices,
    ) -> None:
        """On the worker: move what reservations say, each device on its own
        (one that fails is said, and the others still move)."""
        progress = self._progress("", "")
        for address in taking:
            name = policy.reserved[address].name
            fields = {"DEVICES": str(address), "RESERVATION": name}
            try:
                left = self.binder.reserve(address, critical, progress)
            except HostError as e:
                _audit(
                    MESSAGE_RESERVED,
                    f"reservation {name!r}: {address} could not go to vfio-pci: {e}",
                    fields,
                    logging.ERROR,
                )
                continue
            _audit(
                MESSAGE_RESERVED,
                f"reservation {name!r} applied: {address} is on vfio-pci"
                + (f" (it was on {left})" if left else ""),
                fields,
            )
        for address in giving:
            try:
                now = self.binder.unreserve(address)
            except HostError as e:
                log.error("%s is no longer reserved, but giving it back failed: %s", address, e)
                continue
            _audit(
                MESSAGE_RESERVED,
                f"{address} is no longer reserved: it is on {now or 'no driver'} now",
                {"DEVICES": str(address), "RESERVATION": ""},
            )

    def original_driver(self, address: PciAddress) -> str | None:
        record = self.binder.state.load().bindings.get(str(address))
        return record.original_driver if record is not None else None

    def check_access(
        self, caller: Caller, addresses: Sequence[str], options: AcquireOptions
    ) -> list[Access]:
        """Per device: would Acquire allow it, why (not), and what its plan
        would move. The same plan and the same request checks as Acquire, in
        its order; only a holder of the group is not a refusal here (it is a
        matter of time): code busy."""
        policy = self.policy.current
        backend, request = self._request(policy, options)
        targets: dict[str, Target] = {}
        unresolved: dict[str, BrokerError] = {}
        for text in addresses:
            try:
                targets[text] = self._target(text)
            except BrokerError as e:
                unresolved[text] = e
        owner_refusal: BrokerError | None = None
        try:
            self._check_owner(caller, options.owner_pidfd)
        except BrokerError as e:
            owner_refusal = e  # Acquire refuses it before anything else
        the_plan = self._plan(policy, caller, request, list(targets.values()), options)
        refused = self._request_refusal(caller, the_plan, backend, options)
        results = []
        for text in addresses:
            target = targets.get(text)
            if target is None:
                results.append(_refused(text, owner_refusal or unresolved[text]))
                continue
            group_plan = the_plan.group_of(target.device.address)
            holder = self._holder(target.device, target.group)
            access = Access(
                device=text,
                allowed=True,
                reason="",
                code=Reason.ALLOWED,
                move=group_plan.moving,
                group=target.group.node_name if target.group is not None else "",
                holder=holder.id if isinstance(holder, Lease) else None,
                companions=group_plan.companions,
            )
            refusal = owner_refusal or group_plan.refusal or refused
            if refusal is not None:
                results.append(_refused(text, refusal, access))
                continue
            decision = group_plan.decisions[target.device.address]
            reason = " ".join(decision.reasons) or "allowed"
            if holder is not None:
                now = self._busy_text(holder, target.group, target.device, caller)
                access = dataclasses.replace(
                    access, code=Reason.BUSY, reason=f"{reason} (but now {now})"
                )
            else:
                access = dataclasses.replace(access, reason=reason)
            results.append(access)
        return results

    def _target(self, text: str) -> Target:
        device, group = self._resolve(text)
        return Target(device, group)

    def _plan(
        self,
        policy: Policy,
        caller: Caller,
        request: Request,
        targets: Sequence[Target],
        options: AcquireOptions,
    ) -> Plan:
        unique = list({t.device.address: t for t in targets}.values())
        return plan(
            policy, caller, request, unique, managed=options.managed, critical=self.critical()
        )

    def _request_refusal(
        self, caller: Caller, the_plan: Plan, backend: Backend, options: AcquireOptions
    ) -> BrokerError | None:
        """What refuses the request as a whole, once its groups could be had."""
        try:
            self._check_max_leases(caller, the_plan)
        except PermissionDenied as e:
            return PermissionDenied(e.message, code=Reason.MAX_LEASES)
        noiommu_groups = [g for g in the_plan.groups if g.group is None or g.group.noiommu]
        if backend is Backend.IOMMUFD and noiommu_groups:
            return NotSupported(
                "no-IOMMU devices have no iommufd path in Linux; ask with backend=legacy",
                code=Reason.BACKEND,
                blocker=noiommu_groups[0].requested[0],
                backends=(Backend.LEGACY.value,),
            )
        fds = (
            1 + len(the_plan.reachable)
            if backend is Backend.IOMMUFD
            else (
                1 + len(the_plan.groups) + (len(the_plan.reachable) if options.open_devices else 0)
            )
        )
        if fds > MAX_REPLY_FDS:
            return InvalidArgument(
                f"the lease would return {fds} fds, more than the {MAX_REPLY_FDS} one D-Bus "
                "reply can carry; ask with open-devices=false and open the devices from the "
                "group fds, or ask for fewer devices at a time",
                code=Reason.TOO_MANY_FDS,
            )
        return None

    # -- acquire

    async def acquire(
        self,
        caller: Caller,
        pid: int | None,
        owner: str,
        addresses: Sequence[str],
        options: AcquireOptions,
    ) -> Grant:
        """Lease the groups of ``addresses``. Everything is decided on the
        loop, before anything changes; then the groups are reserved, so that
        no other request touches them while their members move (on the
        worker) and their nodes appear. A request that is cancelled, whose
        caller leaves or whose time runs out answers at once; what was moved
        for it goes back, and the reservation ends only then."""
        if not addresses:
            raise InvalidArgument("name at least one device (a PCI address like 0000:00:10.0)")
        deadline = time.monotonic() + options.timeout - _reply_margin(options.timeout)
        owner_pid = self._check_owner(caller, options.owner_pidfd)
        if options.managed:
            # The plan decides on a scan as fresh as the request, and binding
            # refuses on the same scan.
            await self.refresh_critical()
        # Nothing below yields until the groups are reserved.
        policy = self.policy.current
        backend, request = self._request(policy, options)
        # (After the scan: another request may have taken the id meanwhile.)
        self._check_request_id(owner, options.request_id)
        targets = [self._target(text) for text in addresses]
        for target in targets:
            holder = self._holder(target.device, target.group)
            if holder is not None:
                raise Busy(
                    self._busy_text(holder, target.group, target.device, caller)
                    + "; wait for it to end"
                )
        the_plan = self._plan(policy, caller, request, targets, options)
        refusal = the_plan.refusal or self._request_refusal(caller, the_plan, backend, options)
        if refusal is not None:
            _audit(
                MESSAGE_DENIED,
                f"denied {', '.join(addresses)} to uid {caller.uid}: {refusal.message}",
                {
                    "DEVICES": " ".join(str(t.device.address) for t in targets),
                    "ERROR": refusal.dbus_name,
                    **_caller_fields(caller, pid),
                },
            )
            raise refusal
        pending = self._reserve(caller, owner, options, the_plan, targets, deadline)
        moved: list[PciAddress] = []
        try:
            if policy.settings.polkit:
                await self._authorize(pending, the_plan, targets, backend, pid)
            grant = await self._grant(
                pending, the_plan, targets, request, backend, options, pid, owner_pid, moved
            )
        except BaseException:
            await self._give_back(pending, moved)
            raise
        self._unreserve(pending)
        return grant

    async def _grant(
        self,
        pending: Pending,
        the_plan: Plan,
        targets: Sequence[Target],
        request: Request,
        backend: Backend,
        options: AcquireOptions,
        pid: int | None,
        owner_pid: int | None,
        moved: list[PciAddress],
    ) -> Grant:
        caller = pending.caller
        rules = the_plan.rules
        unsafe = any(g.group is None or g.group.noiommu for g in the_plan.groups)
        if the_plan.moving:
            await self._bounded(
                pending, functools.partial(self._bind_job, pending, the_plan, moved)
            )
            self.host.refresh(the_plan.moving)
            pending.check()
        lease = Lease(
            id=secrets.token_hex(8),
            caller=caller,
            pid=pid,
            owner=pending.owner,
            label=options.label,
            backend=backend,
            unsafe=unsafe,
            groups=self._leased_groups(the_plan),
            devices=tuple(dict.fromkeys(t.device.address for t in targets)),
            request=request,
            rules=tuple(rule.name for rule in rules),
            created=self.clock(),
            restore=all(rule.grants.restore_driver for rule in rules),
            max_locked_memory=_smallest(rule.grants.max_locked_memory for rule in rules),
            moved=tuple(moved),
            owner_pid=owner_pid,
            request_id=pending.request_id,
        )
        fds = await self._open(lease, options, pending)
        # From here to the grant nothing yields: a request still going now is granted.
        try:
            pending.check()
            self._adopt_owner(lease, options.owner_pidfd)
        except BaseException:
            for fd in fds.values():
                os.close(fd)
            self._close_handles(lease)
            raise
        self._add_lease(lease)
        self._store(lease)
        _audit(
            MESSAGE_GRANTED,
            f"granted IOMMU group(s) {', '.join(lease.group_ids)} ({backend}) to uid "
            f"{caller.uid} as lease {lease.id}" + (f" for {lease.label}" if lease.label else ""),
            lease.audit_fields(),
        )
        if unsafe:
            _audit(
                MESSAGE_UNSAFE,
                f"UNSAFE no-IOMMU device(s) {', '.join(str(d) for d in lease.devices)} granted "
                f"to uid {caller.uid} (lease {lease.id}): they can DMA to all host memory",
                lease.audit_fields(),
                logging.WARNING,
            )
        self._notify(lease, LeaseChange.GRANTED)
        return Grant(lease, fds)

    async def _authorize(
        self,
        pending: Pending,
        the_plan: Plan,
        targets: Sequence[Target],
        backend: Backend,
        pid: int | None,
    ) -> None:
        """polkit = true: each requested device also needs polkit's yes for
        the caller's process (org.vfiod1.acquire, or acquire-unsafe for a
        no-IOMMU one), asked while a pidfd pins that process. The policy
        allowed it already: polkit can only narrow."""
        caller = pending.caller
        asked = {t.device.address: t for t in targets}
        for address, target in asked.items():
            unsafe = target.group is None or target.group.noiommu
            action = polkit.ACQUIRE_UNSAFE if unsafe else polkit.ACQUIRE
            details = {
                "device": str(address),
                "group": target.group.id if target.group is not None else "",
                "label": pending.label,
                "backend": backend.value,
            }
            answer = await self._ask_polkit(caller, pid, action, details)
            pending.check()
            if not answer.allowed:
                raise PermissionDenied(answer.text, code=Reason.POLKIT, blocker=address)

    async def authorize_reload(self, caller: Caller, pid: int | None) -> None:
        """polkit = true: ReloadPolicy also needs org.vfiod1.reload."""
        if not self.policy.current.settings.polkit:
            return
        answer = await self._ask_polkit(caller, pid, polkit.RELOAD, {})
        if not answer.allowed:
            raise PermissionDenied(answer.text, code=Reason.POLKIT)

    async def _ask_polkit(
        self, caller: Caller, pid: int | None, action: str, details: Mapping[str, str]
    ) -> polkit.Answer:
        if self.authority is None:
            answer = polkit.unavailable("vfiod has no connection to the system bus's polkit")
        elif pid is None:
            answer = polkit.Answer(
                polkit.Verdict.UNAVAILABLE,
                "polkit decides for a process, and the bus did not say which process called; "
                "ask an admin to set polkit = false in /etc/vfiod/vfiod.toml",
            )
        else:
            try:
                subject, pidfd = polkit.pin_subject(pid, caller.uid, self.proc)
            except HostError as e:
                answer = polkit.Answer(polkit.Verdict.NO, f"polkit cannot decide: {e}")
            else:
                try:
                    answer = await self.authority.check(subject, action, details)
                    if answer.allowed and exited(pidfd):
                        answer = polkit.Answer(
                            polkit.Verdict.NO, "the calling process exited while polkit decided"
                        )
                finally:
                    os.close(pidfd)
        _audit(
            MESSAGE_POLKIT,
            f"polkit said {answer.verdict} to {action} for uid {caller.uid}"
            + (f" ({details['device']})" if "device" in details else "")
            + (f": {answer.text}" if answer.text else ""),
            {
                **_caller_fields(caller, pid),
                "ACTION": action,
                "VERDICT": str(answer.verdict),
                "DEVICES": details.get("device", ""),
            },
            logging.INFO if answer.allowed else logging.WARNING,
        )
        return answer

    def _check_request_id(self, owner: str, request_id: str) -> None:
        if request_id and any(
            p.owner == owner and p.request_id == request_id for p in self._pending.values()
        ):
            raise InvalidArgument(
                f"request-id {request_id!r} is in use by another Acquire of this connection "
                "still in progress; give each request an id of its own"
            )

    def _reserve(
        self,
        caller: Caller,
        owner: str,
        options: AcquireOptions,
        the_plan: Plan,
        targets: Sequence[Target],
        deadline: float,
    ) -> Pending:
        """Reserve what the request will change: its groups, and its devices
        themselves (a device without a group gets one as it moves)."""
        keys = {g.group.id for g in the_plan.groups if g.group is not None}
        keys |= {str(t.device.address) for t in targets}
        keys |= {str(a) for a in the_plan.moving}
        pending = Pending(
            token=secrets.token_hex(8),
            request_id=options.request_id,
            caller=caller,
            owner=owner,
            label=options.label,
            keys=tuple(sorted(keys)),
            rules=tuple(rule.name for rule in the_plan.rules),
            deadline=deadline,
            timeout=options.timeout,
        )
        self._pending[pending.token] = pending
        for key in pending.keys:
            self._reserved[key] = pending
        return pending

    def _unreserve(self, pending: Pending) -> None:
        self._pending.pop(pending.token, None)
        for key in pending.keys:
            if self._reserved.get(key) is pending:
                del self._reserved[key]

    async def _bounded(self, pending: Pending, work: Callable[[], T]) -> T:
        """Run a job for ``pending`` on the worker. Raises the request's stop
        error as soon as it is cancelled or its time is up; the job then
        stops at its next checkpoint (a sysfs write in progress cannot be
        interrupted), and _give_back waits for it before undoing."""
        loop = asyncio.get_running_loop()
        job: asyncio.Future[T] = asyncio.ensure_future(self.worker.run(work))
        pending.job = job
        pending.stopped = loop.create_future()
        if pending.error is not None:
            pending.stopped.set_result(None)
        waiting: set[asyncio.Future[Any]] = {job, pending.stopped}
        try:
            await asyncio.wait(
                waiting,
                timeout=max(0.0, pending.deadline - time.monotonic()),
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            pending.stopped = None
        if job.done():
            pending.job = None
            return job.result()
        if pending.error is None:
            pending.stop(TimedOut(pending.timed_out()))
        pending.check()
        raise AssertionError("unreachable: check() raised")

    def _bind_job(self, pending: Pending, the_plan: Plan, moved: list[PciAddress]) -> None:
        """On the worker: move what the plan says must move (recording it in
        ``moved``); a device without an IOMMU group needs the kernel's unsafe
        no-IOMMU mode first (the plan has checked all three consents)."""
        if any(g.group is None for g in the_plan.groups):
            sysfs = self.binder.sysfs
            if not noiommu.enabled(sysfs):
                log.warning("turning on the kernel's unsafe no-IOMMU mode")
                try:
                    noiommu.enable(sysfs)
                except HostError as e:
                    raise KernelError(e.errno or errno.EIO, str(e)) from e
        addresses = the_plan.moving
        log.info("binding %s to vfio-pci", ", ".join(str(a) for a in addresses))
        try:
            records = self.binder.bind_all(
                addresses,
                allow_critical=set(the_plan.allow_critical),
                critical=self.critical(),  # acquire's fresh scan
                progress=self._progress(pending.request_id, pending.owner),
                checkpoint=pending.check,
            )
        except HostError as e:
            if e.errno == errno.EPERM:
                raise HostCritical(str(e)) from e
            raise KernelError(e.errno or errno.EIO, str(e)) from e
        moved.extend(PciAddress.parse(r.address) for r in records)

    async def _give_back(self, pending: Pending, moved: list[PciAddress]) -> None:
        """After a request failed or stopped: once its job is done, put back
        what it moved, then end the reservation. A stopped request answers
        first: the giving back goes on without it."""
        if pending.error is not None:
            log.info(
                "request %s of uid %d stopped: %s",
                pending.request_id or pending.token,
                pending.caller.uid,
                pending.error.message,
            )
        job = pending.job
        if job is not None and not job.done():
            self._spawn(self._give_back_after(pending, job, moved))
            return
        await self._give_back_after(pending, job, moved)

    async def _give_back_after(
        self, pending: Pending, job: asyncio.Future[Any] | None, moved: list[PciAddress]
    ) -> None:
        try:
            if job is not None:
                with contextlib.suppress(BaseException):  # it undid its own work
                    await job
            if moved:
                progress = self._progress(pending.request_id, pending.owner)
                try:
                    await self.worker.run(
                        functools.partial(self.binder.restore_all, list(reversed(moved)), progress)
                    )
                except HostError as e:
                    log.error("putting devices back after a failed acquire: %s", e)
            self.host.refresh(
                a for a in {*moved, *pending.moving} if a in self.host.inventory.devices
            )
        finally:
            self._unreserve(pending)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _progress(self, request: str, owner: str) -> Progress:
        """A binder progress callback (called on the worker) that announces
        each step on the loop, with how long the device has been moving."""
        began: dict[PciAddress, float] = {}

        def told(address: PciAddress, step: Step, driver: str) -> None:
            now = time.monotonic()
            if step in (Step.BIND, Step.RESTORE):
                began[address] = now
            moving = Moving(request, owner, address, step, driver, now - began.get(address, now))
            self.worker.on_loop(functools.partial(self._announce, moving))

        return told

    def _announce(self, moving: Moving) -> None:
        log.info(
            "%s: %s %s%s (%.1f s)",
            moving.request or "lease",
            moving.device,
            moving.step.value,
            f" ({moving.driver})" if moving.driver else "",
            moving.elapsed,
        )
        for listener in self.progress_listeners:
            listener(moving)

    def cancel(self, owner: str, request_id: str) -> str:
        """Stop the Acquire that ``owner`` sent with ``request_id``, or end
        the lease it made (its reply may never have arrived). Only the
        connection that asked can cancel it. Returns what was done."""
        if not request_id:
            raise InvalidArgument("name the request-id you gave Acquire")
        for pending in self._pending.values():
            if pending.owner == owner and pending.request_id == request_id:
                pending.stop(Cancelled(f"request {request_id!r} was cancelled by its caller"))
                return "cancelled"
        for lease in self.leases.values():
            if lease.owner == owner and lease.request_id == request_id:
                if lease.state is LeaseState.ACTIVE:
                    self.end(
                        lease, f"request {request_id!r} was cancelled by its caller", revoked=False
                    )
                return "released"
        raise NotFound(
            f"no Acquire with request-id {request_id!r} from this connection is in progress or "
            "holds a lease; it may have ended already"
        )

    def _store(self, lease: Lease) -> None:
        """Keep the lease's fds where a restart of vfiod finds them (all under
        one short name: one message to systemd), and record the lease."""
        name = self.store_names.take()
        self.fd_store.keep(name, lease.held_fds())
        lease.stored = (name,)
        self._save(lease)

    def _save(self, lease: Lease) -> None:
        self.binder.state.put_lease(lease.record())

    @staticmethod
    def _request(policy: Policy, options: AcquireOptions) -> tuple[Backend, Request]:
        """The backend asked for (or the daemon's default) and the request for decide()."""
        backend = options.backend or Backend(policy.settings.default_backend)
        request = Request(
            backend=backend.value, managed=options.managed, unsafe_noiommu=options.unsafe_noiommu
        )
        return backend, request

    def _resolve(self, text: str) -> tuple[PciDevice, IommuGroup | None]:
        """The device and its group; None for a device without an IOMMU group
        that unsafe no-IOMMU mode could give one."""
        try:
            address = PciAddress.parse(text)
        except AddressError as e:
            raise InvalidArgument(str(e), code=Reason.INVALID_ADDRESS) from e
        inventory = self.host.inventory
        device = inventory.devices.get(address)
        if device is None:
            raise NotFound(
                f"no PCI device {address} on this host; `vfioctl list` shows the devices",
                code=Reason.NOT_FOUND,
            )
        if device.group is not None:
            return device, inventory.groups[device.group]
        if not noiommu.supported(self.binder.sysfs):
            raise NotSupported(
                f"{address} has no IOMMU group: boot with the IOMMU on (intel_iommu=on or "
                "amd_iommu=on); this kernel has no unsafe no-IOMMU mode either",
                code=Reason.NO_IOMMU_GROUP,
                blocker=address,
            )
        return device, None

    def _holder(self, device: PciDevice, group: IommuGroup | None) -> Lease | Pending | None:
        """The lease holding the device's group, or the request reserving it."""
        if group is not None:
            lease = self.lease_of_group(group.id)
            pending = self._reserved.get(group.id)
        else:
            lease = self.lease_of_device(device.address)
            pending = None
        return lease or pending or self._reserved.get(str(device.address))

    @staticmethod
    def _busy_text(
        holder: Lease | Pending, group: IommuGroup | None, device: PciDevice, caller: Caller
    ) -> str:
        """Who holds it: the label only to its own uid and root (as
        GetLeaseDetails); the uid to anyone (as ps(1) shows owners)."""
        what = f"IOMMU group {group.id}" if group is not None else str(device.address)
        if isinstance(holder, Pending):
            who = f"uid {holder.caller.uid}"
            if caller.uid in (0, holder.caller.uid):
                who = f"{holder.label or 'an unnamed VM'} ({who})"
            took = time.monotonic() - holder.started
            return f"{what} is being prepared for {who}, for {took:.0f} s so far"
        state = "" if holder.state is LeaseState.ACTIVE else f", {holder.state.value}"
        if caller.uid in (0, holder.caller.uid):
            who = f"{holder.label or 'an unnamed VM'} (uid {holder.caller.uid}, lease {holder.id}"
        else:
            who = f"uid {holder.caller.uid} (lease {holder.id}"
        return f"{what} is leased to {who}{state})"

    def _check_owner(self, caller: Caller, pidfd: int | None) -> int | None:
        if pidfd is None:
            return None
        try:
            process = owner_process(pidfd, self.proc)
        except HostError as e:
            raise InvalidArgument(str(e), code=Reason.OWNER_PIDFD) from e
        if caller.uid not in (0, process.uid):
            raise PermissionDenied(
                f"owner-pidfd names pid {process.pid} of uid {process.uid}, not one of "
                f"yours (uid {caller.uid}); pass a pidfd of your own VMM process",
                code=Reason.OWNER_PIDFD,
            )
        return process.pid

    def _check_max_leases(self, caller: Caller, the_plan: Plan) -> None:
        for rule in the_plan.rules:
            limit = rule.grants.max_leases
            if limit is None:
                continue
            held: list[Lease | Pending] = [
                lease
                for lease in self.leases.values()
                if lease.caller.uid == caller.uid and rule.name in lease.rules
            ]
            held += [
                p
                for p in self._pending.values()
                if p.caller.uid == caller.uid and rule.name in p.rules
            ]
            if len(held) >= limit:
                raise PermissionDenied(
                    f"uid {caller.uid} holds {len(held)} lease(s) under rule "
                    f"{rule.name!r} ({rule.source}), which allows "
                    f"max-leases = {limit}: "
                    + ", ".join(_held_text(h) for h in held)
                    + "; release one first"
                )

    def _leased_groups(self, the_plan: Plan) -> tuple[IommuGroup, ...]:
        """The plan's groups as they are now that members moved, each viable."""
        inventory = self.host.inventory
        groups: dict[str, IommuGroup] = {}
        for group_plan in the_plan.groups:
            for address in group_plan.requested:
                try:
                    group = inventory.group_of(address)
                except HostError as e:  # it went away, or vfio-pci gave it no group
                    raise KernelError(e.errno or errno.ENODEV, str(e)) from e
                groups[group.id] = group
        for group in groups.values():
            if not group.viable:
                raise NotViable(
                    f"IOMMU group {group.id} is not viable: "
                    + "; ".join(b.reason for b in group.blockers())
                    + ". Bind those devices to vfio-pci (or unbind them), or ask with "
                    "managed=true where policy allows it"
                )
        return tuple(groups.values())

    async def _open(
        self, lease: Lease, options: AcquireOptions, pending: Pending
    ) -> dict[str, int]:
        """Open what the client gets; vfiod keeps group and container (or
        iommufd) fds — owning the open group is owning the group — and hands
        out duplicates and device fds."""
        fds: dict[str, int] = {}
        try:
            if lease.backend is Backend.LEGACY:
                await self._open_legacy(lease, options, fds, pending)
            else:
                await self._open_iommufd(lease, fds, pending)
        except BaseException as e:
            for fd in fds.values():
                os.close(fd)
            self._close_handles(lease)
            if isinstance(e, NotSupportedError):
                raise NotSupported(str(e)) from e
            if isinstance(e, VfioError):
                raise KernelError(e.errno or errno.EIO, str(e)) from e
            raise
        return fds

    def _vfio_members(self, group: IommuGroup) -> list[PciDevice]:
        # Bridges and unbound members have no device fd.
        return [d for d in group.devices if is_vfio_driver(d.driver)]

    async def _open_legacy(
        self, lease: Lease, options: AcquireOptions, fds: dict[str, int], pending: Pending
    ) -> None:
        container = Container.open(self.kernel, os.path.join(self.dev_vfio, "vfio"))
        lease.handles.append(container)
        groups: list[tuple[Group, IommuGroup]] = []
        for info in lease.groups:
            opening = functools.partial(
                Group.open, self.kernel, info.node_name, dev_dir=self.dev_vfio
            )
            group = await _appearing(opening, pending.check)
            lease.handles.append(group)
            groups.append((group, info))
            cross_check_viability(info, group.viable)
            group.set_container(container)
        container.set_iommu()
        fds["container"] = os.dup(container.fileno())
        for group, info in groups:
            fds[f"group:{info.node_name}"] = os.dup(group.fileno())
        if options.open_devices:
            for group, info in groups:
                for member in self._vfio_members(info):
                    with group.open_device(member.address) as device:
                        fds[f"device:{member.address}"] = os.dup(device.fileno())

    async def _open_iommufd(self, lease: Lease, fds: dict[str, int], pending: Pending) -> None:
        iommufd = IommuFd.open(self.kernel)
        lease.handles.append(iommufd)
        if lease.max_locked_memory is not None:
            # What the VMM pins counts against its own RLIMIT_MEMLOCK (raised
            # to the rule's limit for an owner process), not against the one
            # all of its user's processes share; only vfiod may choose
            # (CAP_SYS_RESOURCE), and only before anything is in the iommufd.
            iommufd.rlimit_mode = abi.RlimitMode.PROCESS
        fds["iommufd"] = os.dup(iommufd.fileno())
        # No group fd here: Linux refuses to bind a cdev (EBUSY) while its
        # group is open the legacy way. Once the VMM binds, the kernel keeps
        # the group from being opened; until then the node is root-only.
        for info in lease.groups:
            for member in self._vfio_members(info):
                address = str(member.address)
                path = cdev_path(address, sysfs=self.binder.sysfs.root)
                opening = functools.partial(CdevDevice.open, self.kernel, path, address)
                with await _appearing(opening, pending.check) as cdev:
                    # Unbound: the VMM binds it to its own iommufd and attaches.
                    fds[f"device:{member.address}"] = os.dup(cdev.fileno())

    def _adopt_owner(self, lease: Lease, pidfd: int | None) -> None:
        """Tie the lease to the owner process: keep a pidfd of it, watch it,
        and give it the locked-memory limit its DMA needs."""
        if pidfd is None:
            return
        if lease.max_locked_memory is not None and lease.owner_pid is not None:
            try:
                raise_memlock(lease.owner_pid, lease.max_locked_memory)
            except HostError as e:
                raise KernelError(e.errno or errno.EIO, str(e)) from e
        lease.owner_pidfd = os.dup(pidfd)
        if exited(lease.owner_pidfd):
            os.close(lease.owner_pidfd)
            lease.owner_pidfd = None
            raise InvalidArgument("the owner-pidfd's process exited while the lease was made")
        lease.unwatch = self.watcher.watch(
            lease.owner_pidfd,
            lambda: self.end(lease, f"its owner process {lease.owner_pid} exited"),
        )

    # -- brokered DMA

    def map_dma(
        self,
        lease_id: str,
        caller: Caller,
        memfd: int,
        offset: int,
        size: int,
        iova: int | None,
    ) -> int:
        """Map ``size`` bytes of ``memfd`` at ``offset`` into the lease's
        container at ``iova`` (None: vfiod picks one); return the IOVA."""
        lease = self._own_lease(lease_id, caller)
        container = lease.container
        if lease.state is not LeaseState.ACTIVE or container is None:
            raise NotSupported(
                f"lease {lease.id} has no container to map into (backend {lease.backend}); "
                "map through your own iommufd with IOMMU_IOAS_MAP"
            )
        if lease.unsafe:
            raise NotSupported(
                "a no-IOMMU lease has no IOMMU to map into: the device addresses physical "
                "memory directly"
            )
        if size <= 0 or size % PAGE or offset % PAGE:
            raise InvalidArgument(
                f"size ({size}) and offset ({offset}) must be positive multiples of {PAGE}"
            )
        # vfiod pins with its own CAP_IPC_LOCK: nothing else bounds it, so a
        # rule without max-locked-memory gets the daemon-wide dma-limit.
        limit, where = lease.max_locked_memory, "the policy's max-locked-memory"
        if limit is None:
            limit, where = self.policy.current.settings.dma_limit, "vfiod.toml's dma-limit"
        if lease.pinned + size > limit:
            raise PermissionDenied(
                f"mapping {size} bytes would pin {lease.pinned + size} bytes for lease "
                f"{lease.id}, more than {where} of {limit}; unmap something first, or ask "
                "an admin for more"
            )
        try:
            if iova is None:
                found = first_fit(
                    container.iova_ranges(),
                    ((m.iova, m.size) for m in lease.mappings.values()),
                    size,
                    HUGE_PAGE if size >= HUGE_PAGE else PAGE,
                )
                if found is None:
                    raise NotFound(f"no free IOVA range of {size} bytes is left in the lease")
                iova = found
            mapping = DmaMapping.map_memfd(self.kernel, container, memfd, offset, size, iova)
        except NotSupportedError as e:
            raise NotSupported(str(e)) from e
        except VfioError as e:
            raise KernelError(e.errno or errno.EIO, str(e)) from e
        lease.mappings[iova] = mapping
        self._save(lease)
        log.info("lease %s: mapped %#x bytes at IOVA %#x", lease.id, size, iova)
        return iova

    def unmap_dma(self, lease_id: str, caller: Caller, iova: int, size: int) -> None:
        lease = self._own_lease(lease_id, caller)
        mapping = lease.mappings.get(iova)
        if mapping is None or mapping.size != size:
            made = ", ".join(f"{m.size:#x} at {m.iova:#x}" for m in lease.mappings.values())
            raise NotFound(
                f"lease {lease.id} has no MapDma mapping of {size:#x} bytes at IOVA {iova:#x} "
                f"(it has: {made or 'none'}); mappings you made yourself through the "
                "container fd are yours to unmap"
            )
        del lease.mappings[iova]
        try:
            mapping.unmap()
        except VfioError as e:
            raise KernelError(e.errno or errno.EIO, str(e)) from e
        finally:
            self._save(lease)

    # -- release and drain

    def release(self, lease_id: str, caller: Caller) -> None:
        lease = self._own_lease(lease_id, caller)
        if caller.uid == lease.caller.uid:
            self.end(lease, "released by its owner", revoked=False)
        else:  # root took it: the owner hears why (Revoked)
            self.end(lease, f"released by uid {caller.uid}")

    def _lease(self, lease_id: str) -> Lease:
        lease = self.leases.get(lease_id)
        if lease is None:
            raise NotFound(f"no lease {lease_id}; it may have ended already")
        return lease

    def _own_lease(self, lease_id: str, caller: Caller) -> Lease:
        lease = self._lease(lease_id)
        if caller.uid not in (0, lease.caller.uid):
            raise PermissionDenied(
                f"lease {lease_id} belongs to uid {lease.caller.uid}; only it (or root) may "
                "use or release it"
            )
        return lease

    def end(self, lease: Lease, reason: str, *, revoked: bool = True) -> None:
        """End a lease: close vfiod's fds, then drain until the group is free."""
        if lease.state is not LeaseState.ACTIVE:
            return
        lease.state = LeaseState.DRAINING
        self._draining[lease.id] = lease
        lease.end_reason = reason
        lease.revoked = revoked
        self._close_handles(lease)
        _audit(
            MESSAGE_REVOKED if revoked else MESSAGE_RELEASED,
            f"lease {lease.id} ended: {reason}",
            lease.audit_fields(),
        )
        self._notify(lease, LeaseChange.ENDED)
        self.drain()

    def _close_handles(self, lease: Lease) -> None:
        for name in lease.stored:
            self.fd_store.drop(name)
        lease.stored = ()
        for mapping in list(lease.mappings.values()):
            try:
                mapping.unmap()
            except VfioError as e:  # closing the container unmaps it anyway
                log.warning("lease %s: %s", lease.id, e)
        lease.mappings.clear()
        for handle in reversed(lease.handles):
            handle.close()
        lease.handles.clear()
        if lease.unwatch is not None:
            lease.unwatch()
            lease.unwatch = None
        if lease.owner_pidfd is not None:
            os.close(lease.owner_pidfd)
            lease.owner_pidfd = None

    def drain(self) -> list[Lease]:
        """Free every draining lease whose groups nobody holds any more, and
        give its devices back (on the worker: the lease is ``restoring``
        until they are). Returns the leases this began to free. Call it
        again later for the others (the daemon does, on a timer)."""
        freed = []
        for lease in list(self._draining.values()):
            if lease.state is not LeaseState.DRAINING:
                del self._draining[lease.id]
            elif self._groups_free(lease):
                del self._draining[lease.id]
                self._free(lease)
                freed.append(lease)
        for address in [a for a in self._orphans if not self._group_busy(a)]:
            self._orphans.discard(address)
            self.worker.start(
                functools.partial(self.binder.restore_all, [address], self._progress("", "")),
                functools.partial(self._orphan_restored, address),
            )
        return freed

    def _orphan_restored(self, address: PciAddress, _: None, error: BaseException | None) -> None:
        if error is not None:
            log.error("giving back %s after a restart: %s", address, error)
        if address in self.host.inventory.devices:
            self.host.refresh([address])

    def _group_free(self, node: str, what: str) -> bool:
        try:
            Group.open(self.kernel, node, dev_dir=self.dev_vfio).close()
        except VfioError as e:
            if e.errno == errno.EBUSY:
                return False  # a client still holds a device fd
            if e.errno not in (errno.ENOENT, errno.ENODEV):
                log.warning("%s: checking group %s: %s", what, node, e)
                return False
        return True

    def _groups_free(self, lease: Lease) -> bool:
        return all(self._group_free(node, f"lease {lease.id}") for node in lease.group_nodes)

    def _group_busy(self, address: PciAddress) -> bool:
        """Does a client still hold the group of ``address`` (a device vfiod
        moved for no lease it knows)?"""
        device = self.host.inventory.devices.get(address)
        group = self.host.inventory.groups.get(device.group or "") if device else None
        return group is not None and not self._group_free(group.node_name, str(address))

    def _free(self, lease: Lease) -> None:
        """Nobody holds the lease's groups: give its devices back, then forget
        it. Until they are back its groups stay taken (``restoring``)."""
        # (An earlier process may have given some back already, as it stopped.)
        recorded = self.binder.state.load().bindings
        for address in lease.moved:
            if str(address) in recorded and self.reservation(address) is not None:
                self.binder.forget(address)  # reserved since: vfio-pci keeps it
        moved = [a for a in lease.moved if str(a) in recorded and self.reservation(a) is None]
        if not lease.restore:
            for address in lease.moved:  # policy says: leave them on vfio-pci
                self.binder.forget(address)
            moved = []
        # Every device the lease could open is reset before anyone else may
        # lease it (or go back to its driver): what one tenant left in a
        # device must not reach the next.
        inventory = self.host.inventory
        resetting = [
            d.address
            for g in lease.groups
            for d in (inventory.groups[g.id].devices if g.id in inventory.groups else g.devices)
            if is_vfio_driver(d.driver)
        ]
        if not moved and not resetting:
            self._forget(lease)
            return
        lease.state = LeaseState.RESTORING
        if moved:  # a job of its own: nobody waits on another's slow rebind
            self.worker.start(
                functools.partial(self._clean_job, lease, resetting, moved),
                functools.partial(self._restored, lease),
            )
            return
        # Resets alone (the warm path, and every lease at a stop): one job
        # resets what all such leases ended meanwhile, one callback frees them.
        self._resetting.append((lease, resetting))
        if len(self._resetting) == 1:
            self.worker.on_loop(self._reset_batch)

    def _reset_batch(self) -> None:
        batch, self._resetting = self._resetting, []
        if batch:
            self.worker.start(
                functools.partial(self._reset_all, batch),
                functools.partial(self._batch_reset, batch),
            )

    def _reset_all(self, batch: Sequence[tuple[Lease, Sequence[PciAddress]]]) -> None:
        for lease, resetting in batch:
            self._reset(lease, resetting)

    def _batch_reset(
        self,
        batch: Sequence[tuple[Lease, Sequence[PciAddress]]],
        _: None,
        error: BaseException | None,
    ) -> None:
        if error is not None:
            log.error("resetting the devices of ended leases: %s", error)
        for lease, _resetting in batch:
            self._forget(lease)  # (nothing moved: no inventory to refresh)

    def _clean_job(
        self, lease: Lease, resetting: Sequence[PciAddress], restoring: Sequence[PciAddress]
    ) -> None:
        """On the worker: reset the lease's devices, then give back those
        vfiod moved."""
        self._reset(lease, resetting)
        if restoring:
            self.binder.restore_all(restoring, self._progress(lease.id, lease.owner))

    def _reset(self, lease: Lease, resetting: Sequence[PciAddress]) -> None:
        """On the worker: reset the devices of a lease that ended. A device
        that cannot be reset is said, loudly."""
        for address in resetting:
            fields = {**lease.audit_fields(), "DEVICES": str(address)}
            try:
                self.binder.reset(address)
            except HostError as e:
                _audit(
                    MESSAGE_RESET,
                    f"lease {lease.id} ended, and {address} was not reset: {e}",
                    {**fields, "RESET": "impossible" if e.errno == errno.ENOTTY else "failed"},
                    logging.WARNING,
                )
                continue
            _audit(
                MESSAGE_RESET,
                f"lease {lease.id} ended: {address} was reset",
                {**fields, "RESET": "done"},
            )

    def _restored(self, lease: Lease, _: None, error: BaseException | None) -> None:
        if error is not None:
            log.error("lease %s: %s", lease.id, error)
        self.host.refresh(a for a in lease.moved if a in self.host.inventory.devices)
        self._forget(lease)

    def _forget(self, lease: Lease) -> None:
        lease.state = LeaseState.FREE
        self._remove_lease(lease)
        # Its fd store names are free once no record names them (its fds may
        # have left the store long before): were another lease's record to
        # name them too, a restart would adopt that lease's fds for this one.
        record = self.binder.state.load().leases.get(lease.id)
        self.binder.state.drop_lease(lease.id)
        for name in record.fds if record is not None else ():
            self.store_names.give_back(name)
        _audit(
            MESSAGE_FREED,
            f"lease {lease.id} is free"
            + (
                ": " + ", ".join(str(a) for a in lease.moved) + " restored"
                if lease.moved and lease.restore
                else ""
            ),
            lease.audit_fields(),
        )
        self._notify(lease, LeaseChange.FREED)

    def end_owner(self, owner: str, reason: str) -> None:
        """The bus name ``owner`` is gone: stop its requests in progress (no
        answer can reach it), end its leases, except those that follow an
        owner process instead."""
        for pending in list(self._pending.values()):
            if pending.owner == owner:
                pending.stop(Cancelled(f"the request's caller left: {reason}"))
        for lease in list(self.leases.values()):
            if lease.owner == owner and lease.owner_pidfd is None:
                self.end(lease, reason)

    def _on_host_event(self, event: HostEvent) -> None:
        if event.change is not HostChange.REMOVED:
            return
        lease = self.lease_of_device(event.address)
        if lease is not None:
            lease.moved = tuple(a for a in lease.moved if a != event.address)
            self.end(lease, f"device {event.address} was removed from the host")

    # -- policy

    def reload_policy(self) -> list[Lease]:
        """Read the policy files again (PolicyError keeps the old policy) and
        end the leases the new policy no longer allows: the plan of each
        lease is made again, so a rule that now denies any device the lease
        reaches, companions included, ends it. Returns those."""
        previous = self.policy.current
        policy = self.policy.reload()
        self.apply_reservations(previous)
        revoked = []
        for lease in list(self.leases.values()):
            if lease.state is not LeaseState.ACTIVE:
                continue
            targets = []
            for address in lease.devices:
                device = self.host.inventory.devices.get(address)
                if device is not None:
                    group = self.host.inventory.groups.get(device.group or "")
                    targets.append(Target(device, group))
            # Its members are on vfio-pci already: nothing would move.
            refusal = plan(
                policy, lease.caller, lease.request, targets, managed=True, critical=self.critical()
            ).refusal
            if refusal is not None:
                self.end(
                    lease,
                    "the policy was reloaded and no longer allows "
                    f"{', '.join(str(d) for d in lease.devices)}: {refusal.message}",
                )
                revoked.append(lease)
        return revoked

    # -- restart

    def recover(self, stored: Mapping[str, Sequence[int]] | None = None) -> list[Lease]:
        """After a restart. A lease whose fds systemd kept for us (``stored``,
        by fd store name) is adopted and stays active. The others lost
        vfiod's fds with the old process, but their clients may still hold
        device fds: each comes back draining, so its devices are given back
        once it is free. Devices vfiod moved for no lease are restored now
        (or, while a client still holds their group, once it lets go)."""
        remaining = {name: list(fds) for name, fds in (stored or {}).items()}
        recovered = self._recover_leases(remaining)
        records = self.binder.state.load().leases.values()  # (those kept: draining ones too)
        self.store_names = StoreNames(name for record in records for name in record.fds)
        for name, leftover in remaining.items():  # of no lease we know: let them go
            for fd in leftover:
                os.close(fd)
            self.fd_store.drop(name)
        self.apply_reservations()  # (first: a reserved device's record must not be repaired)
        self._recover_bindings(recovered)
        for lease in recovered:
            if lease.owner_pidfd is not None and exited(lease.owner_pidfd):
                self.end(lease, f"its owner process {lease.owner_pid} exited while vfiod was down")
        self.drain()
        return recovered

    def _recover_leases(self, remaining: dict[str, list[int]]) -> list[Lease]:
        """The leases of the state file, adopted with the fds they find in
        ``remaining`` (taken from it) or draining."""
        recovered: list[Lease] = []
        # Group, device or fd store name -> the lease recovered with it.
        claimed: dict[str, str] = {}
        # A damaged file may name one group in two leases: the one systemd
        # kept every fd of goes first, then the older.
        records = sorted(
            self.binder.state.load().leases.values(),
            key=lambda r: (not r.fds or any(n not in remaining for n in r.fds), r.created),
        )
        for record in records:
            names = tuple(_STORE_NAME + n for n in record.fds)
            keys = (*record.groups, *record.devices, *names)
            clash = next((claimed[k] for k in keys if k in claimed), None)
            if clash is not None:
                log.warning(
                    "lease %s of the state file claims what lease %s holds; it is dropped",
                    record.id,
                    clash,
                )
                for name in record.fds:
                    if _STORE_NAME + name not in claimed:  # (not the other lease's fds)
                        for fd in remaining.pop(name, []):
                            os.close(fd)
                        self.fd_store.drop(name)
                self.binder.state.drop_lease(record.id)
                continue
            claimed.update(dict.fromkeys(keys, record.id))
            lease = self._from_record(record)
            # (Names of an older vfiod's records, one per fd, are read the same way.)
            complete = bool(record.fds) and all(n in remaining for n in record.fds)
            fds = [fd for n in record.fds for fd in remaining.pop(n, [])]
            if complete and self._adopt(lease, record, fds):
                log.info(
                    "lease %s (uid %d, %s) re-adopted with its fds after a restart",
                    lease.id,
                    lease.caller.uid,
                    lease.label or "unnamed",
                )
            else:
                if not complete:  # (_adopt closes what it was given)
                    for fd in fds:
                        os.close(fd)
                for name in record.fds:
                    self.fd_store.drop(name)
                lease.state = LeaseState.DRAINING
                lease.end_reason = "vfiod restarted without its fds"
                log.warning(
                    "lease %s (uid %d, %s) lost vfiod's fds in a restart; it drains now",
                    lease.id,
                    lease.caller.uid,
                    lease.label or "unnamed",
                )
            self._add_lease(lease)
            recovered.append(lease)
        return recovered

    def _recover_bindings(self, recovered: Sequence[Lease]) -> None:
        """Give back what vfiod moved for no lease it has now."""
        # What a lease says vfiod moved goes back, even if its record was lost.
        self.binder.rebuild_records(a for lease in recovered for a in lease.moved)
        keep = {str(a) for lease in recovered for a in lease.moved}
        # A device whose group a client still holds open cannot be unbound
        # yet (the kernel would wait for the client): later, by drain().
        self._orphans = {
            PciAddress.parse(a)
            for a in self.binder.state.load().bindings
            if a not in keep and self._group_busy(PciAddress.parse(a))
        }
        keep |= {str(a) for a in self._orphans}
        for result in self.binder.repair(keep=keep):
            log.warning(
                "repaired %s after a restart: %s",
                result.address,
                result.error or f"back on {result.restored_to or 'no driver'}",
            )
        present = [PciAddress.parse(a) for a in keep]
        self.host.refresh(a for a in present if a in self.host.inventory.devices)

    def _adopt(self, lease: Lease, record: LeaseRecord, fds: Sequence[int]) -> bool:
        """Rebuild the lease's handles from its stored fds, each known by what
        it is open on; False (with the fds closed) when they are not exactly
        what the record says."""
        try:
            nodes, owner = self._sort_stored(lease, fds)
            if lease.backend is Backend.LEGACY:
                iommu_type = abi.IommuType(record.iommu_type) if record.iommu_type else None
                container_fd = nodes.pop(os.path.join(self.dev_vfio, "vfio"))
                container = Container.adopt(self.kernel, container_fd, iommu_type)
                lease.handles.append(container)
                for node in lease.group_nodes:
                    fd = nodes.pop(os.path.join(self.dev_vfio, node))
                    lease.handles.append(
                        Group.adopt(self.kernel, fd, node, container, dev_dir=self.dev_vfio)
                    )
                for iova, size in record.mappings:
                    lease.mappings[iova] = DmaMapping.adopt(self.kernel, container, iova, size)
            else:
                lease.handles.append(IommuFd(self.kernel, nodes.pop(IOMMUFD_PATH), IOMMUFD_PATH))
        except (VfioError, KeyError, ValueError, OSError) as e:
            log.warning("lease %s: its stored fds cannot be adopted: %s", lease.id, e)
            adopted = {h.fileno() for h in lease.handles if not h.closed}
            for handle in lease.handles:
                handle.close()
            lease.handles.clear()
            lease.mappings.clear()
            for fd in fds:
                if fd not in adopted:
                    with contextlib.suppress(OSError):
                        os.close(fd)
            return False
        if owner is not None:
            lease.owner_pidfd = owner
            lease.unwatch = self.watcher.watch(
                owner, lambda: self.end(lease, f"its owner process {lease.owner_pid} exited")
            )
        lease.stored = record.fds
        return True

    def _sort_stored(self, lease: Lease, fds: Sequence[int]) -> tuple[dict[str, int], int | None]:
        """A lease's stored fds by the node each is open on, and its owner's
        pidfd (systemd hands them back in no particular order)."""
        if lease.backend is Backend.LEGACY:
            expected = [os.path.join(self.dev_vfio, n) for n in ("vfio", *lease.group_nodes)]
        else:
            expected = [IOMMUFD_PATH]
        nodes: dict[str, int] = {}
        owner: int | None = None
        for fd in fds:
            node = self.kernel.node_of(fd, expected)
            if node:
                if node in nodes:
                    raise ValueError(f"two stored fds are open on {node}")
                nodes[node] = fd
                continue
            pid = pidfd_pid(fd)
            # (-1: the owner exited while vfiod was down; recover() ends the lease.)
            if lease.owner_pid is None or owner is not None or pid not in (lease.owner_pid, -1):
                raise ValueError(
                    "a stored fd is neither one of its VFIO nodes nor the owner's pidfd"
                )
            owner = fd
        if lease.owner_pid is not None and owner is None:
            raise ValueError(f"the pidfd of its owner process {lease.owner_pid} was not kept")
        return nodes, owner

    def _from_record(self, record: LeaseRecord) -> Lease:
        groups = tuple(
            self.host.inventory.groups.get(gid) or IommuGroup(gid, False, ())
            for gid in record.groups
        )
        # The caller as it was: a reload decides again for it (names by uid, as the bus does).
        caller = Caller(
            uid=record.uid,
            user=_name(pwd.getpwuid, record.uid),
            gids=record.gids,
            groups=tuple(n for n in (_name(grp.getgrgid, g) for g in record.gids) if n),
            unit=record.unit,
            slices=record.slices,
        )
        return Lease(
            id=record.id,
            caller=caller,
            pid=record.pid,
            owner=record.owner,
            label=record.label,
            backend=Backend(record.backend),
            unsafe=record.unsafe,
            groups=groups,
            devices=tuple(PciAddress.parse(d) for d in record.devices),
            request=Request(backend=record.backend, managed=False, unsafe_noiommu=record.unsafe),
            rules=record.rules,
            created=record.created,
            restore=record.restore,
            max_locked_memory=record.max_locked_memory,
            moved=tuple(PciAddress.parse(d) for d in record.moved),
            owner_pid=record.owner_pid,
        )

    def _notify(self, lease: Lease, change: LeaseChange) -> None:
        for listener in self.listeners:
            listener(lease, change)

    def abandon(self) -> int:
        """vfiod is restarting and systemd keeps the leases' fds: leave every
        lease as it is for the next process, undoing nothing. Returns how many."""
        kept = 0
        self._stop_requests("vfiod is restarting")
        for lease in self.leases.values():
            if lease.state is LeaseState.ACTIVE and lease.stored:
                kept += 1
            for handle in lease.handles:
                handle.detach()  # closed by the exit, not by an ioctl
            lease.handles.clear()
            lease.mappings.clear()
            if lease.unwatch is not None:
                lease.unwatch()
                lease.unwatch = None
        self.leases.clear()
        self._draining.clear()
        self._by_device.clear()
        self._by_group.clear()
        return kept

    def shutdown(self) -> None:
        """vfiod is stopping: stop every request, end every lease; give back
        what is free now."""
        self._stop_requests("vfiod is stopping")
        for lease in list(self.leases.values()):
            self.end(lease, "vfiod is stopping")

    def _stop_requests(self, reason: str) -> None:
        for pending in self._pending.values():
            pending.stop(Cancelled(f"{reason}; ask again once it is back"))

    @property
    def busy(self) -> bool:
        """Is anything left to finish: leases, requests, devices going back?"""
        return bool(self.leases or self._pending or self._background)


T = TypeVar("T")


async def _appearing(
    open_node: Callable[[], T],
    check: Callable[[], None] = lambda: None,
    timeout: float = NODE_TIMEOUT,
) -> T:
    """Open a VFIO node that may not exist yet: devtmpfs and udev create it
    a moment after a device is bound to vfio-pci. Waits on the loop, up to
    ``timeout``, or until ``check`` raises (the request must stop)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return open_node()
        except VfioError as e:
            if e.errno != errno.ENOENT or time.monotonic() > deadline:
                raise
        check()
        await asyncio.sleep(0.01)


def _reply_margin(timeout: float) -> float:
    """How much sooner than its caller vfiod gives up on a request, so that
    an answer is on its way before the caller stops waiting for it."""
    return min(REPLY_MARGIN, timeout / 10)


def _held_text(held: Lease | Pending) -> str:
    if isinstance(held, Pending):
        return f"request {held.request_id or held.token} (in progress)"
    return f"{held.id} ({held.state.value})"


def _name(lookup: Callable[[int], Any], key: int) -> str | None:
    try:
        return str(lookup(key)[0])
    except KeyError:
        return None


def _smallest(values: Iterable[int | None]) -> int | None:
    present = [v for v in values if v is not None]
    return min(present) if present else None


K = TypeVar("K")


def _unlist(index: dict[K, list[Lease]], key: K, lease: Lease) -> None:
    held = index[key]
    held.remove(lease)
    if not held:
        del index[key]
