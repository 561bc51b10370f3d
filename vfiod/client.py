"""A client of vfiod for VM managers and VMMs, blocking or asyncio.

    with Client() as vfiod:
        lease = vfiod.acquire(["0000:00:10.0"], backend="iommufd", managed=True, label="vm1")
        qemu_fds = lease.fds            # {"iommufd": 5, "device:0000:00:10.0": 6}
        ...
        vfiod.release(lease)            # or exit: the lease ends with the connection

    async with AsyncClient() as vfiod:
        lease = await vfiod.acquire(...)
        async for event in vfiod.events(): ...

Both speak plain D-Bus messages to org.vfiod1 on the system bus; requests are
built and replies read by the same functions, so the two cannot drift apart.
fds in a reply belong to the caller (close them, or let ``Lease.close()`` do
it); fds passed in (owner-pidfd, a memfd) stay the caller's.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import errno
import os
import re
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self, cast

import sdbus
from sdbus.sd_bus_internals import SdBus, SdBusMessage

from vfiod.errors import BrokerError

if TYPE_CHECKING:
    from vfiod import hotplug

BUS_NAME = "org.vfiod1"
MANAGER_PATH = "/org/vfiod1"
MANAGER = "org.vfiod1.Manager"
LEASE = "org.vfiod1.Lease"
PROPERTIES = "org.freedesktop.DBus.Properties"
ERROR_PREFIX = "org.vfiod1.Error."
NO_REPLY = "org.freedesktop.DBus.Error.NoReply"
TIMED_OUT = "org.freedesktop.DBus.Error.Timeout"
DISCONNECTED = "org.freedesktop.DBus.Error.Disconnected"

# How long Acquire waits by default: a GPU can take seconds to unbind, a
# driver's module up to a minute to load. vfiod hears it (option timeout)
# and gives up — putting back what it moved — before the client would.
ACQUIRE_TIMEOUT = 300.0
TICK = 5.0  # seconds between "still moving" reminders


class VfiodError(Exception):
    """vfiod (or the bus) refused or failed; ``name`` is the D-Bus error name."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(message)
        self.name = name
        self.message = message

    @property
    def kind(self) -> str:
        """The error without its prefix: "PermissionDenied", "Busy", ..."""
        return self.name.rsplit(".", 1)[-1]

    def __str__(self) -> str:
        return self.message


# What a call may raise: sdbus's classes, and vfiod's own where a process
# that also serves vfiod (tests) has them mapped to their names.
BusErrors = (
    sdbus.DbusFailedError,
    sdbus.SdBusUnmappedMessageError,
    sdbus.SdBusLibraryError,
    BrokerError,
)


def _strerror(error: sdbus.SdBusLibraryError) -> str:
    """The errno in an sd-bus library error ("... returned error number: 2"), in words."""
    found = re.search(r"error number: (\d+)", str(error))
    return os.strerror(int(found[1]) if found else errno.EIO)


def _system_bus() -> SdBus:
    """A connection to the system bus, or a VfiodError that says why there is none."""
    try:
        return sdbus.sd_bus_open_system()
    except sdbus.SdBusLibraryError as e:
        address = os.environ.get("DBUS_SYSTEM_BUS_ADDRESS", "unix:path=/run/dbus/system_bus_socket")
        raise VfiodError(
            "org.freedesktop.DBus.Error.NoServer",
            f"cannot connect to the system bus at {address}: {_strerror(e)}; "
            "is dbus running (`systemctl status dbus`)?",
        ) from None


def _error(e: Exception) -> VfiodError:
    if isinstance(e, sdbus.SdBusLibraryError):
        return VfiodError(
            "org.freedesktop.DBus.Error.Disconnected",
            f"lost the system bus: {_strerror(e)}; is dbus running?",
        )
    if isinstance(e, sdbus.SdBusUnmappedMessageError):
        # An error name sdbus has no class for (all of vfiod's): (name, message).
        name, message = (str(a) for a in (*e.args, "", "")[:2])
    elif isinstance(e, BrokerError):
        name, message = e.dbus_name, e.message
    else:
        name = str(getattr(e, "dbus_error_name", "org.freedesktop.DBus.Error.Failed"))
        message = str(e.args[0]) if e.args else name
    if name == "org.freedesktop.DBus.Error.ServiceUnknown":
        message = (
            "vfiod is not running and could not be started: start it with "
            "`systemctl start vfiod` (as root) and check `journalctl -u vfiod`"
        )
    elif name == "org.freedesktop.DBus.Error.AccessDenied":
        message = (
            f"the system bus refused the call ({message}); is vfiod's bus policy "
            "(org.vfiod1.conf) installed in /usr/share/dbus-1/system.d?"
        )
    return VfiodError(name, message)


class Backend(enum.StrEnum):
    LEGACY = "legacy"
    IOMMUFD = "iommufd"


@dataclasses.dataclass
class Lease:
    """A granted lease and the fds that came with it (the caller's to close)."""

    path: str
    fds: dict[str, int]

    @property
    def id(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    def close(self) -> None:
        """Close the fds (the lease stays until released or the connection ends)."""
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


@dataclasses.dataclass(frozen=True)
class Access:
    """CheckAccess's answer for one device: vfiod's plan for it. ``code`` is
    one of vfiod.reasons.Reason, or a newer one (a refusal ``reason``
    explains); ``reason`` is for people."""

    device: str
    allowed: bool
    reason: str
    code: str
    move: tuple[str, ...]  # what vfiod would move to vfio-pci for the device's group
    blocker: str  # the member that refuses; "" if none does
    group: str  # the group's node name; "" without one
    holder: str  # the lease object path holding the group now; "/" if none
    companions: tuple[str, ...]  # members the lease would reach that were not asked for
    backends: tuple[str, ...]  # for code "backend": the backends that would do


@dataclasses.dataclass(frozen=True)
class DeviceInfo:
    path: str
    address: str
    vendor: int
    device: int
    subsystem_vendor: int
    subsystem_device: int
    pci_class: int
    description: str
    driver: str
    original_driver: str
    group: str  # object path
    noiommu: bool
    host_critical: tuple[str, ...]
    lease: str  # object path, "/" if none
    reset_methods: tuple[str, ...]
    reservation: str = ""  # the [[reserve]] that keeps it on vfio-pci

    @property
    def ids(self) -> str:
        return f"{self.vendor:04x}:{self.device:04x}"


@dataclasses.dataclass(frozen=True)
class GroupInfo:
    path: str
    id: str
    devices: tuple[str, ...]  # object paths
    viable: bool
    blockers: tuple[tuple[str, str], ...]
    noiommu: bool
    lease: str


@dataclasses.dataclass(frozen=True)
class LeaseDetails:
    """Who holds a lease: told to the lease's own uid and to root only."""

    owner: str  # the bus name that asked
    pid: int  # of the caller when it asked (0: not known)
    owner_pid: int  # of the process the lease follows (0: it follows the bus connection)
    unit: str
    label: str
    state: str  # "active", "draining", "restoring" (its devices going back)


@dataclasses.dataclass(frozen=True)
class LeaseInfo:
    path: str
    uid: int
    devices: tuple[str, ...]
    groups: tuple[str, ...]
    backend: str
    unsafe: bool
    created: int  # microseconds since the epoch
    details: LeaseDetails | None = None  # None: not yours to see

    @property
    def label(self) -> str:
        return self.details.label if self.details is not None else ""

    @property
    def unit(self) -> str:
        return self.details.unit if self.details is not None else ""

    @property
    def pid(self) -> int:
        return self.details.pid if self.details is not None else 0

    @property
    def owner(self) -> str:
        return self.details.owner if self.details is not None else ""

    @property
    def id(self) -> str:
        return self.path.rsplit("/", 1)[-1]


@dataclasses.dataclass(frozen=True)
class Inventory:
    devices: dict[str, DeviceInfo]  # by address
    groups: dict[str, GroupInfo]  # by object path
    leases: dict[str, LeaseInfo]  # by object path

    def group_of(self, device: DeviceInfo) -> GroupInfo | None:
        return self.groups.get(device.group)


@dataclasses.dataclass(frozen=True)
class Event:
    """A change vfiod announced: ``kind`` is "added", "removed", "changed" or
    "revoked"; ``changes`` the new property values (or the reason, for revoked)."""

    kind: str
    path: str
    changes: Mapping[str, Any]


def lease_path(lease: Lease | str) -> str:
    if isinstance(lease, Lease):
        return lease.path
    return lease if lease.startswith("/") else f"{MANAGER_PATH}/lease/{lease}"


# -- requests and replies, shared by both clients


def _options(
    *,
    backend: str | None = None,
    managed: bool | None = None,
    unsafe_noiommu: bool | None = None,
    open_devices: bool | None = None,
    owner_pidfd: int | None = None,
    label: str | None = None,
    request_id: str | None = None,
    timeout: float | None = None,
) -> dict[str, tuple[str, Any]]:
    options: dict[str, tuple[str, Any]] = {}
    if request_id is not None:
        options["request-id"] = ("s", request_id)
    if timeout is not None:
        options["timeout"] = ("u", round(timeout * 1000))
    if backend is not None:
        options["backend"] = ("s", str(backend))
    if managed is not None:
        options["managed"] = ("b", managed)
    if unsafe_noiommu is not None:
        options["unsafe-noiommu"] = ("b", unsafe_noiommu)
    if open_devices is not None:
        options["open-devices"] = ("b", open_devices)
    if owner_pidfd is not None:
        options["owner-pidfd"] = ("h", owner_pidfd)
    if label is not None:
        options["label"] = ("s", label)
    return options


def _call(
    bus: SdBus,
    interface: str,
    member: str,
    signature: str = "",
    *args: Any,
    path: str = MANAGER_PATH,
) -> SdBusMessage:
    message = bus.new_method_call_message(BUS_NAME, path, interface, member)
    if signature:
        message.append_data(signature, *args)
    return message


def _value(reply: SdBusMessage) -> Any:
    contents: Any = reply.get_contents()  # the value itself for one complete type
    return contents


def _unwrap(properties: Mapping[str, tuple[str, Any]]) -> dict[str, Any]:
    return {name: value for name, (_sig, value) in properties.items()}


def _lease_details(d: Mapping[str, Any]) -> LeaseDetails | None:
    """A lease's details, as vfiod tells them (GetLeaseDetails, or a
    GetInventory row's a{sv}); None where they are not yours to see."""
    if "Owner" not in d:
        return None
    return LeaseDetails(
        owner=d["Owner"],
        pid=d["Pid"],
        owner_pid=d["OwnerPid"],
        unit=d["Unit"],
        label=d["Label"],
        state=d["State"],
    )


def _lease_info(path: str, p: Mapping[str, Any], details: LeaseDetails | None) -> LeaseInfo:
    return LeaseInfo(
        path=path,
        uid=p["Uid"],
        devices=tuple(p["Devices"]),
        groups=tuple(p["Groups"]),
        backend=p["Backend"],
        unsafe=p["Unsafe"],
        created=p["Created"],
        details=details,
    )


Details = Mapping[str, Mapping[str, tuple[str, Any]]]


def _details_call(bus: SdBus, paths: Sequence[str]) -> SdBusMessage:
    return _call(bus, MANAGER, "GetLeaseDetails", "ao", list(paths))


def _inventory_call(bus: SdBus) -> SdBusMessage:
    return _call(bus, MANAGER, "GetInventory", "a{sv}", {})


def _device_row(row: Sequence[Any]) -> DeviceInfo:
    (path, address, vendor, device, sub_vendor, sub_device, pci_class, description, driver,
     original_driver, group, noiommu, critical, lease, resets, more) = row  # fmt: skip
    reservation = more.get("Reservation")
    return DeviceInfo(
        path, address, vendor, device, sub_vendor, sub_device, pci_class, description, driver,
        original_driver, group, noiommu, tuple(critical), lease, tuple(resets),
        reservation[1] if reservation is not None and reservation[0] == "s" else "",
    )  # fmt: skip


def _group_row(row: Sequence[Any]) -> GroupInfo:
    path, id_, members, viable, blockers, noiommu, lease, _more = row
    return GroupInfo(path, id_, tuple(members), viable, tuple(blockers), noiommu, lease)


def _lease_row(row: Sequence[Any]) -> LeaseInfo:
    path, uid, devices, groups, backend, unsafe, created, more = row
    details = _lease_details(_unwrap(more))
    return LeaseInfo(path, uid, tuple(devices), tuple(groups), backend, unsafe, created, details)


def _inventory(reply: SdBusMessage) -> Inventory:
    """GetInventory's rows (org.vfiod1.xml gives their fields' order):
    structs, which decode in a tenth of GetManagedObjects' dicts' time."""
    device_rows, group_rows, lease_rows = _value(reply)
    devices = {device.address: device for device in map(_device_row, device_rows)}
    groups = {group.path: group for group in map(_group_row, group_rows)}
    leases = {lease.path: lease for lease in map(_lease_row, lease_rows)}
    return Inventory(dict(sorted(devices.items())), groups, leases)


def _acquired(reply: SdBusMessage) -> Lease:
    path, fds = _value(reply)
    return Lease(str(path), {str(k): int(v) for k, v in fds.items()})


@dataclasses.dataclass(frozen=True)
class Progress:
    """A step of a device moving between drivers for your request (vfiod's
    Progress signal), or, with step "moving", a reminder from the client
    that it still is."""

    device: str
    step: str  # "bind", "bound", "restore", "restored", "failed"; "moving"
    driver: str  # the driver it leaves (bind) or goes back to (restore)
    elapsed: float  # seconds since it began to move


ProgressCallback = Callable[[Progress], None]


def _acquire_call(
    bus: SdBus, devices: Sequence[str], timeout: float, options: Mapping[str, Any]
) -> tuple[str, SdBusMessage]:
    """An Acquire under a request-id of its own (to Cancel it by), telling
    vfiod how long the caller waits."""
    request_id = secrets.token_hex(8)
    options = _options(**options, request_id=request_id, timeout=timeout)
    return request_id, _call(bus, MANAGER, "Acquire", "asa{sv}", list(devices), options)


def _timed_out(e: VfiodError) -> bool:
    return e.name in (NO_REPLY, TIMED_OUT) or (e.name == DISCONNECTED and "timed out" in e.message)


def _accesses(reply: SdBusMessage) -> list[Access]:
    results = []
    for device, allowed, reason, details in _value(reply):
        d = _unwrap(details)  # (keys it does not know yet are left)
        results.append(
            Access(
                device=device,
                allowed=bool(allowed),
                reason=reason,
                code=d["code"],
                move=tuple(d["move"]),
                blocker=d["blocker"],
                group=d["group"],
                holder=d["holder"],
                companions=tuple(d["companions"]),
                backends=tuple(d["backends"]),
            )
        )
    return results


class Client:
    """Blocking client. One bus connection: leases made without owner-pidfd
    end when it closes."""

    def __init__(self, bus: SdBus | None = None) -> None:
        self.bus = bus if bus is not None else _system_bus()

    def _send(self, message: SdBusMessage) -> SdBusMessage:
        try:
            return self.bus.call(message)
        except BusErrors as e:
            raise _error(e) from None

    def acquire(
        self,
        devices: Sequence[str],
        *,
        timeout: float = ACQUIRE_TIMEOUT,
        progress: ProgressCallback | None = None,
        **options: Any,
    ) -> Lease:
        """Options: backend, managed, unsafe_noiommu, open_devices, owner_pidfd,
        label. Waits up to ``timeout`` seconds, and vfiod knows it: if the
        devices cannot be moved in time it puts them back and says TimedOut.
        If the wait ends otherwise (^C, a lost reply), the request is
        cancelled, so no lease is left behind unknown. ``progress`` hears
        each device's steps as it moves."""
        if progress is not None:
            # Signals are read by the asyncio client; the bus stays this one.
            return asyncio.run(
                AsyncClient(self.bus).acquire(
                    devices, timeout=timeout, progress=progress, **options
                )
            )
        request_id, message = _acquire_call(self.bus, devices, timeout, options)
        try:
            with _call_timeout(self.bus, timeout):
                return _acquired(self._send(message))
        except VfiodError as e:
            if _timed_out(e):
                self._cancel(request_id)
                raise _waited_too_long(timeout) from None
            raise
        except BaseException:  # ^C while vfiod works on it
            self._cancel(request_id)
            raise

    def _cancel(self, request_id: str) -> None:
        """Stop the request, or end the lease it made; it is no error that
        it has ended already."""
        with contextlib.suppress(VfiodError):
            self._send(_call(self.bus, MANAGER, "Cancel", "s", request_id))

    def cancel(self, request_id: str) -> None:
        """Stop an Acquire this connection sent with ``request_id`` (an
        option), or end the lease it made."""
        self._send(_call(self.bus, MANAGER, "Cancel", "s", request_id))

    def release(self, lease: Lease | str) -> None:
        self._send(_call(self.bus, MANAGER, "Release", "o", lease_path(lease)))

    def check_access(self, devices: Sequence[str], **options: Any) -> list[Access]:
        message = _call(
            self.bus, MANAGER, "CheckAccess", "asa{sv}", list(devices), _options(**options)
        )
        return _accesses(self._send(message))

    def reload_policy(self) -> None:
        self._send(_call(self.bus, MANAGER, "ReloadPolicy"))

    def inventory(self) -> Inventory:
        """Every device, group and lease; who holds a lease only for your
        own leases (all, for root)."""
        return _inventory(self._send(_inventory_call(self.bus)))

    def lease_info(self, lease: Lease | str) -> LeaseInfo:
        path = lease_path(lease)
        reply = self._send(_call(self.bus, PROPERTIES, "GetAll", "s", LEASE, path=path))
        details = cast(Details, _value(self._send(_details_call(self.bus, [path]))))
        return _lease_info(
            path, _unwrap(_value(reply)), _lease_details(_unwrap(details.get(path, {})))
        )

    def manager_properties(self) -> dict[str, Any]:
        reply = self._send(_call(self.bus, PROPERTIES, "GetAll", "s", MANAGER))
        return _unwrap(_value(reply))

    def map_dma(
        self, lease: Lease | str, memfd: int, offset: int, size: int, iova: int | None
    ) -> int:
        """Map a memfd window for the lease's devices; iova None lets vfiod pick."""
        options = {"allocate-iova": ("b", iova is None)}
        message = _call(
            self.bus,
            LEASE,
            "MapDma",
            "httta{sv}",
            memfd,
            offset,
            size,
            iova or 0,
            options,
            path=lease_path(lease),
        )
        return int(_value(self._send(message)))

    def unmap_dma(self, lease: Lease | str, iova: int, size: int) -> None:
        self._send(_call(self.bus, LEASE, "UnmapDma", "tt", iova, size, path=lease_path(lease)))

    def attach(self, qemu: str | hotplug.Monitor, device: str, **options: Any) -> hotplug.Attached:
        """Lease ``device`` for a running QEMU and hot-add it as vfio-pci
        (iommufd). ``qemu``: the QMP socket QEMU listens on, or a Monitor
        (vfiod.libvirt_monitor.domain_monitor for a libvirt domain). The lease
        follows that QEMU process: it ends when QEMU exits, whether or not
        this client is still there. Options: device_id, bus, managed,
        unsafe_noiommu, label, acquire_timeout, moves (device moves, as
        Progress), say (steps, as text). Raises HotplugError with everything
        undone when QEMU refuses."""
        from vfiod import hotplug  # noqa: PLC0415 - it builds on this module

        if isinstance(qemu, str):
            with hotplug.qmp_monitor(qemu) as monitor:
                return hotplug.attach(self, monitor, device, **options)
        return hotplug.attach(self, qemu, device, **options)

    def detach(
        self, qemu: str | hotplug.Monitor, device_id: str, **options: Any
    ) -> hotplug.Detached:
        """Unplug device ``device_id`` that ``attach`` put into that QEMU, wait
        for the guest to let go (option timeout), delete its iommufd object
        and release the lease. A guest that does not let go in time leaves the
        device and the lease as they were (HotplugError)."""
        from vfiod import hotplug  # noqa: PLC0415 - it builds on this module

        if isinstance(qemu, str):
            with hotplug.qmp_monitor(qemu) as monitor:
                return hotplug.detach(self, monitor, device_id, **options)
        return hotplug.detach(self, qemu, device_id, **options)

    def close(self) -> None:
        self.bus.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class AsyncClient:
    """asyncio client; the same calls, awaited, plus ``events()``."""

    def __init__(self, bus: SdBus | None = None) -> None:
        self.bus = bus if bus is not None else _system_bus()

    async def _send(self, message: SdBusMessage) -> SdBusMessage:
        try:
            return await self.bus.call_async(message)
        except BusErrors as e:
            raise _error(e) from None

    async def acquire(
        self,
        devices: Sequence[str],
        *,
        timeout: float = ACQUIRE_TIMEOUT,
        progress: ProgressCallback | None = None,
        **options: Any,
    ) -> Lease:
        """As Client.acquire; a task cancelled while it waits cancels the request."""
        request_id, message = _acquire_call(self.bus, devices, timeout, options)
        watching = _ProgressWatch(request_id, progress) if progress is not None else None
        try:
            if watching is not None:
                await watching.start(self.bus)
            with _call_timeout(self.bus, timeout):
                reply = self.bus.call_async(message)
            try:
                return _acquired(await reply)
            except BusErrors as e:
                raise _error(e) from None
        except VfiodError as e:
            if _timed_out(e):
                await self._cancel(request_id)
                raise _waited_too_long(timeout) from None
            raise
        except BaseException:
            await asyncio.shield(self._cancel(request_id))
            raise
        finally:
            if watching is not None:
                watching.stop()

    async def _cancel(self, request_id: str) -> None:
        with contextlib.suppress(VfiodError):
            await self._send(_call(self.bus, MANAGER, "Cancel", "s", request_id))

    async def cancel(self, request_id: str) -> None:
        await self._send(_call(self.bus, MANAGER, "Cancel", "s", request_id))

    async def release(self, lease: Lease | str) -> None:
        await self._send(_call(self.bus, MANAGER, "Release", "o", lease_path(lease)))

    async def check_access(self, devices: Sequence[str], **options: Any) -> list[Access]:
        message = _call(
            self.bus, MANAGER, "CheckAccess", "asa{sv}", list(devices), _options(**options)
        )
        return _accesses(await self._send(message))

    async def inventory(self) -> Inventory:
        return _inventory(await self._send(_inventory_call(self.bus)))

    async def events(self) -> AsyncIterator[Event]:
        """vfiod's announcements: objects added and removed, properties
        changed, leases revoked, as they come."""
        queue = _SignalQueue(self.bus)
        async for message in queue:
            member, path, body = message.member, message.path or "", message.get_contents()
            if member == "InterfacesAdded":
                added_path, interfaces = cast(Any, body)
                props = {k: v for i in interfaces.values() for k, v in _unwrap(i).items()}
                yield Event("added", added_path, props)
            elif member == "InterfacesRemoved":
                removed_path, _ = cast(Any, body)
                yield Event("removed", removed_path, {})
            elif member == "PropertiesChanged":
                _iface, changed, _invalid = cast(Any, body)
                yield Event("changed", path, _unwrap(changed))
            elif member == "Revoked":
                yield Event("revoked", path, {"reason": body})

    def close(self) -> None:
        self.bus.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


@contextlib.contextmanager
def _call_timeout(bus: SdBus, timeout: float) -> Iterator[None]:
    """sd-bus takes a call's timeout from its bus when the call is sent."""
    before = bus.method_call_timeout_usec
    bus.method_call_timeout_usec = round(timeout * 1_000_000)
    try:
        yield
    finally:
        bus.method_call_timeout_usec = before


def _waited_too_long(timeout: float) -> VfiodError:
    return VfiodError(
        ERROR_PREFIX + "TimedOut",
        f"no answer from vfiod within {timeout:g} s; the request was cancelled, so nothing "
        "is left leased or moved for it. Ask again with a longer timeout for slow devices",
    )


class _ProgressWatch:
    """vfiod's Progress signals for one request, and a reminder every TICK
    seconds for each device still moving."""

    def __init__(self, request: str, callback: ProgressCallback) -> None:
        self.request = request
        self.callback = callback
        self.moving: dict[str, tuple[str, float]] = {}  # device -> (driver, began)
        self.slot: Any = None
        self.ticker: asyncio.Task[None] | None = None

    async def start(self, bus: SdBus) -> None:
        self.slot = await bus.match_signal_async(
            BUS_NAME, MANAGER_PATH, MANAGER, "Progress", self._heard
        )
        self.ticker = asyncio.get_running_loop().create_task(self._tick())

    def _heard(self, message: SdBusMessage) -> None:
        request, device, step, driver, elapsed_usec = cast(Any, message.get_contents())
        if request != self.request:
            return
        elapsed = elapsed_usec / 1_000_000
        if step in ("bind", "restore"):
            self.moving[device] = (driver, time.monotonic())
        else:
            self.moving.pop(device, None)
        self.callback(Progress(device, step, driver, elapsed))

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            now = time.monotonic()
            for device, (driver, began) in list(self.moving.items()):
                self.callback(Progress(device, "moving", driver, now - began))

    def stop(self) -> None:
        if self.ticker is not None:
            self.ticker.cancel()
        self.slot = None


class _SignalQueue:
    """Signals from vfiod, through one match rule on its bus name."""

    def __init__(self, bus: SdBus) -> None:
        self.bus = bus

    async def __aiter__(self) -> AsyncIterator[SdBusMessage]:
        queue: asyncio.Queue[SdBusMessage] = asyncio.Queue()
        slot = await self.bus.match_signal_async(BUS_NAME, None, None, None, queue.put_nowait)
        try:
            while True:
                yield await queue.get()
        finally:
            del slot
