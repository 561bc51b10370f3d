"""vfiod on the bus: exports the broker's view of the host (devices, groups,
leases) under one ObjectManager, keeps it current, and answers the methods.

This is the only place that knows both sdbus and the broker; it translates
wire inputs (checked getters), calls the broker, and closes every fd it
received or sent at the right moment.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import functools
import logging
import os
from collections.abc import Iterable, Iterator
from typing import Any, Protocol

from sdbus import get_current_message, map_exception_to_dbus_error
from sdbus.dbus_proxy_async_interface_base import DbusExportHandle
from sdbus.sd_bus_internals import SdBus

from vfiod import __version__
from vfiod.broker import Backend, Broker, Lease, LeaseChange, Moving
from vfiod.bus.checked import set_destination
from vfiod.bus.credentials import Callers
from vfiod.bus.interfaces import (
    DEVICE_PREFIX,
    GROUP_PREFIX,
    LEASE_PREFIX,
    MANAGER_PATH,
    NO_OBJECT,
    DeviceInterface,
    DeviceRow,
    DeviceView,
    GroupInterface,
    GroupRow,
    GroupView,
    InternalError,
    LeaseInterface,
    LeaseRow,
    LeaseView,
    Manager,
    device_path,
    device_row,
    group_path,
    group_row,
    lease_path,
    lease_row,
)
from vfiod.bus.subtree import Subtree
from vfiod.bus.wire import Variants, acquire_options, inventory_options, map_options
from vfiod.errors import ALL_ERRORS, BrokerError, InvalidArgument, PermissionDenied, PolicyInvalid
from vfiod.host.inventory import Inventory, IommuGroup, PciDevice
from vfiod.host.watcher import HostEvent
from vfiod.pci import PciAddress
from vfiod.policy.load import PolicyError

log = logging.getLogger(__name__)

SETTLE_TIME = 1.0  # seconds Release waits for a lease to become free
MAX_DETAILS = 65536  # leases one GetLeaseDetails may ask about
MANAGER_INTERFACE = "org.vfiod1.Manager"


class BusBackend(Protocol):
    """What the served interfaces call."""

    version: str
    backends: tuple[str, ...]

    @property
    def no_iommu_mode(self) -> bool: ...

    async def acquire(
        self, devices: list[str], options: Variants
    ) -> tuple[str, dict[str, int]]: ...

    async def release(self, lease: str) -> None: ...

    async def cancel(self, request_id: str) -> None: ...

    async def check_access(
        self, devices: list[str], options: Variants
    ) -> list[tuple[str, bool, str, dict[str, tuple[str, Any]]]]: ...

    async def reload_policy(self) -> None: ...

    async def lease_details(self, leases: list[str]) -> dict[str, dict[str, tuple[str, Any]]]: ...

    async def inventory(
        self, options: Variants
    ) -> tuple[list[DeviceRow], list[GroupRow], list[LeaseRow]]: ...

    async def map_dma(
        self, lease_id: str, memfd: int, offset: int, size: int, iova: int, options: Variants
    ) -> int: ...

    async def unmap_dma(self, lease_id: str, iova: int, size: int) -> None: ...


def register_errors() -> None:
    """Map each error class vfiod answers with to its D-Bus name, for sdbus
    (which maps by exact type, one class per name). Its methods answer with
    the error's own name anyway (vfiod.bus.checked). BrokerError itself is
    never raised: its name, Failed, is InternalError's."""
    from sdbus.sd_bus_internals import EXCEPTION_TO_DBUS_ERROR  # noqa: PLC0415

    errors: tuple[type[BrokerError], ...] = (*ALL_ERRORS, InternalError)
    for error in errors:
        # Mapped already when a second service runs in the same process (tests);
        # any other mapping of the name is a conflict, and raises ValueError.
        if EXCEPTION_TO_DBUS_ERROR.get(error) != error.dbus_name:
            map_exception_to_dbus_error(error, error.dbus_name)


@functools.cache
class _Exported:
    """One exported lease object and its export handle."""

    def __init__(self, obj: LeaseInterface, path: str) -> None:
        self.obj = obj
        self.path = path
        self.handle: DbusExportHandle | None = None


class BusService:
    """The BusBackend of the served interfaces, over a Broker."""

    def __init__(self, broker: Broker, bus: SdBus, callers: Callers) -> None:
        self.broker = broker
        self.bus = bus
        self.callers = callers
        self.version = __version__
        self.backends = tuple(b.value for b in Backend)
        self.manager = Manager(self)
        self._manager_handle: DbusExportHandle | None = None
        # Devices and groups are served from one vtable each (see
        # vfiod.bus.subtree: thousands of them); leases, with methods, by sdbus.
        self.device_tree: Subtree | None = None
        self.group_tree: Subtree | None = None
        self.groups: dict[str, str] = {}  # their object paths, by group id
        self.leases: dict[str, _Exported] = {}
        # Ended leases being freed, by id: Release and ReloadPolicy wait on these.
        self._settling: dict[str, asyncio.Task[None]] = {}
        # Calls in progress on each lease, and freed leases whose objects wait
        # for them: stopping an export cancels the calls on it unanswered.
        self._lease_calls: collections.Counter[str] = collections.Counter()
        self._unexport_after: dict[str, _Exported] = {}
        # The inventory whose set of groups self.groups last matched: the host
        # replaces its inventory whenever anything changes, so while it is
        # the same object no group came or went.
        self._matched: Inventory | None = None
        register_errors()
        broker.listeners.append(self.on_lease)
        broker.progress_listeners.append(self.on_progress)
        broker.host.listeners.append(self.on_host_event)

    # -- properties of the Manager

    @property
    def no_iommu_mode(self) -> bool:
        return self.broker.policy.current.settings.allow_unsafe_noiommu

    # -- exporting

    def export(self) -> None:
        """Export the Manager and every device and group (before the name is
        owned: nobody is listening, so no InterfacesAdded)."""
        self._manager_handle = self.manager.export_to_dbus(MANAGER_PATH, self.bus)
        self.device_tree = Subtree(self.bus, DEVICE_PREFIX.rstrip("/"), DeviceInterface)
        self.group_tree = Subtree(self.bus, GROUP_PREFIX.rstrip("/"), GroupInterface)
        inventory = self.broker.host.inventory
        for device in inventory.devices.values():
            self._sync_device(device.address, announce=False)
        for group_id in inventory.groups:
            self._sync_group(group_id, announce=False)
        for lease in self.broker.leases.values():
            self._export_lease(lease, announce=False)
        self._matched = inventory

    def close(self) -> None:
        for task in self._settling.values():
            task.cancel()
        for exported in [*self._unexport_after.values(), *self.leases.values()]:
            if exported.handle is not None:
                exported.handle.stop()
        for tree in (self.device_tree, self.group_tree):
            if tree is not None:
                tree.close()
        self.device_tree = self.group_tree = None
        self.groups.clear()
        self.leases.clear()
        self._unexport_after.clear()
        if self._manager_handle is not None:
            self._manager_handle.stop()
            self._manager_handle = None

    def _export(self, exported: _Exported, announce: bool) -> None:
        exported.handle = exported.obj.export_to_dbus(exported.path, self.bus)
        if announce:
            self.bus.emit_object_added(exported.path)

    def _unexport(self, exported: _Exported) -> None:
        self.bus.emit_object_removed(exported.path)
        self._stop(exported)

    @staticmethod
    def _stop(exported: _Exported) -> None:
        if exported.handle is not None:
            exported.handle.stop()
            exported.handle = None

    @contextlib.contextmanager
    def _calling(self, lease_id: str) -> Iterator[None]:
        """A call on a lease is in progress: its object stays exported until
        the call has replied, even if the lease is freed meanwhile."""
        self._lease_calls[lease_id] += 1
        try:
            yield
        finally:
            self._lease_calls[lease_id] -= 1
            if not self._lease_calls[lease_id]:
                del self._lease_calls[lease_id]
                waiting = self._unexport_after.pop(lease_id, None)
                if waiting is not None:  # the reply goes out as this call returns
                    asyncio.get_running_loop().call_soon(self._stop, waiting)

    def _device_view(self, device: PciDevice) -> DeviceView:
        inventory = self.broker.host.inventory
        group = inventory.groups.get(device.group) if device.group is not None else None
        lease = self.broker.lease_of_device(device.address)
        reservation = self.broker.reservation(device.address)
        return DeviceView(
            address=str(device.address),
            vendor=device.vendor,
            device=device.device,
            subsystem_vendor=device.subsystem_vendor,
            subsystem_device=device.subsystem_device,
            pci_class=device.pci_class,
            description=device.description or device.class_name,
            driver=device.driver or "",
            original_driver=self.broker.original_driver(device.address) or "",
            group=group_path(group.node_name) if group is not None else NO_OBJECT,
            noiommu=group.noiommu if group is not None else False,
            host_critical=self.broker.critical().get(device.address, ()),
            lease=lease_path(lease.id) if lease is not None else NO_OBJECT,
            reset_methods=device.reset_methods,
            reservation=reservation.name if reservation is not None else "",
        )

    def _group_view(self, group: IommuGroup) -> GroupView:
        lease = self.broker.lease_of_group(group.id)
        return GroupView(
            id=group.node_name,  # "noiommu-0" is no IOMMU group 0
            devices=tuple(device_path(str(d.address)) for d in group.devices),
            viable=group.viable,
            blockers=tuple((str(b.address), b.reason) for b in group.blockers()),
            noiommu=group.noiommu,
            lease=lease_path(lease.id) if lease is not None else NO_OBJECT,
        )

    def _trees(self) -> tuple[Subtree, Subtree]:
        if self.device_tree is None or self.group_tree is None:
            raise RuntimeError("the service is not exported")
        return self.device_tree, self.group_tree

    def _sync_device(self, address: PciAddress, *, announce: bool = True) -> None:
        tree, _ = self._trees()
        device = self.broker.host.inventory.devices.get(address)
        path = device_path(str(address))
        if device is None:
            tree.remove(path)
        elif path in tree:
            tree.update(path, self._device_view(device))
        else:
            tree.add(path, self._device_view(device), announce=announce)

    def _sync_group(self, group_id: str, *, announce: bool = True) -> None:
        _, tree = self._trees()
        group = self.broker.host.inventory.groups.get(group_id)
        path = self.groups.get(group_id)
        if path is not None and (group is None or path != group_path(group.node_name)):
            tree.remove(self.groups.pop(group_id))
            path = None
        if group is None:
            return
        view = self._group_view(group)
        if path is None:
            path = self.groups[group_id] = group_path(group.node_name)
            tree.add(path, view, announce=announce)
        else:
            tree.update(path, view)

    def _sync(self, addresses: Iterable[PciAddress], group_ids: Iterable[str] = ()) -> None:
        inventory = self.broker.host.inventory
        groups = set(group_ids)
        for address in set(addresses):
            self._sync_device(address)
            device = inventory.devices.get(address)
            if device is not None and device.group is not None:
                groups.add(device.group)
        # Groups that came or went with the change (no-IOMMU groups, VFs).
        if inventory is not self._matched:
            groups |= set(inventory.groups).symmetric_difference(self.groups)
        for group_id in groups:
            self._sync_group(group_id)
        self._matched = inventory

    async def refresh_critical(self) -> None:
        """Host-critical reasons change without uevents (mounts, routes): scan
        again (off the loop) and update the devices whose reasons changed."""
        for address in await self.broker.refresh_critical():
            self._sync_device(address)

    def _lease_view(self, lease: Lease) -> LeaseView:
        return LeaseView(
            uid=lease.caller.uid,
            devices=tuple(str(d) for d in lease.devices),
            groups=lease.group_nodes,
            backend=lease.backend.value,
            unsafe=lease.unsafe,
            created=int(lease.created * 1_000_000),
        )

    def _export_lease(self, lease: Lease, *, announce: bool = True) -> None:
        exported = _Exported(
            LeaseInterface(self, lease.id, self._lease_view(lease)), lease_path(lease.id)
        )
        self.leases[lease.id] = exported
        self._export(exported, announce)

    # -- events

    def on_host_event(self, event: HostEvent) -> None:
        path = device_path(str(event.address))
        # The groups it was in, as exported, and (in _sync) the one it is in now.
        _, groups = self._trees()
        was_in = [
            group_id
            for group_id, group in self.groups.items()
            if path in groups.view(group).devices
        ]
        self._sync([event.address], was_in)

    def on_progress(self, moving: Moving) -> None:
        """Tell the requester (alone: which devices another uid's VM gets is
        its business) that a device of its request or lease moved a step."""
        if not moving.owner:
            return
        message = self.bus.new_signal_message(MANAGER_PATH, MANAGER_INTERFACE, "Progress")
        message.append_data(
            "sssst",
            moving.request,
            str(moving.device),
            moving.step.value,
            moving.driver,
            int(moving.elapsed * 1_000_000),
        )
        set_destination(message, moving.owner)
        message.send()

    def on_lease(self, lease: Lease, change: LeaseChange) -> None:
        if change is LeaseChange.GRANTED:
            self._export_lease(lease)
        elif change is LeaseChange.ENDED:
            exported = self.leases.get(lease.id)
            if exported is not None and lease.revoked:
                exported.obj.revoked.emit(lease.end_reason)
            if lease.id in self.broker.leases and lease.id not in self._settling:
                # Still draining: free it soon.
                task = asyncio.get_running_loop().create_task(self._settle(lease.id))
                self._settling[lease.id] = task
                task.add_done_callback(functools.partial(self._settled_done, lease.id))
        elif change is LeaseChange.FREED:
            exported = self.leases.pop(lease.id, None)
            if exported is not None and self._lease_calls[lease.id]:
                self.bus.emit_object_removed(exported.path)
                self._unexport_after[lease.id] = exported
            elif exported is not None:
                self._unexport(exported)
        addresses = {d.address for g in lease.groups for d in g.devices} | set(lease.devices)
        self._sync(addresses, lease.group_ids)

    # -- methods

    async def acquire(self, devices: list[str], options: Variants) -> tuple[str, dict[str, int]]:
        sender = get_current_message().sender or ""
        # Received fds (owner-pidfd) are borrowed: the method closes them after
        # the call (vfiod.bus.checked); the lease keeps a dup.
        parsed = acquire_options(options)
        credentials = await self.callers.of(sender)
        # (The plan refused a grant with more fds than one reply carries.)
        # In a context of its own: timers and tasks the broker makes while the
        # devices move would otherwise copy this call's context, and with it
        # the call's message and the fds it carries, for as long as they live.
        grant = await asyncio.get_running_loop().create_task(
            self.broker.acquire(credentials.caller, credentials.pid, sender, devices, parsed),
            context=contextvars.Context(),
        )
        # The reply copies the fds when it is built, after we return; ours close then.
        loop = asyncio.get_running_loop()
        for fd in grant.fds.values():
            loop.call_soon(os.close, fd)
        return lease_path(grant.lease.id), grant.fds

    async def cancel(self, request_id: str) -> None:
        # Only the connection that sent the Acquire: the request is its own.
        self.broker.cancel(get_current_message().sender or "", request_id)

    def _lease_id(self, path: str) -> str:
        if not path.startswith(LEASE_PREFIX):
            raise InvalidArgument(f"{path} is not a lease object path ({LEASE_PREFIX}<id>)")
        return path.removeprefix(LEASE_PREFIX)

    async def release(self, lease: str) -> None:
        lease_id = self._lease_id(lease)
        with self._calling(lease_id):
            credentials = await self.callers.of(get_current_message().sender)
            self.broker.release(lease_id, credentials.caller)
            await self._settled(lease_id)

    def _settled_done(self, lease_id: str, _task: asyncio.Task[None]) -> None:
        self._settling.pop(lease_id, None)

    async def _settled(self, lease_id: str) -> None:
        """Wait for the settling of an ended lease, if it is not free already."""
        task = self._settling.get(lease_id)
        if task is not None:
            await asyncio.shield(task)  # a cancelled caller must not stop the freeing

    async def _settle(self, lease_id: str) -> None:
        """Give an ended lease a moment to become free, so that a caller that
        closed its fds finds its devices back on their drivers when Release
        returns. (vfiod's own fds leave systemd's fd store asynchronously.)
        A client still holding device fds keeps it draining: that does not
        block the reply beyond SETTLE_TIME."""
        delay = 0.0002  # systemd drops stored fds within a fraction of a millisecond
        waited = 0.0
        while lease_id in self.broker.leases and waited < SETTLE_TIME:
            await asyncio.sleep(delay)
            waited += delay
            delay = min(delay * 2, 0.1)
            self.broker.drain()

    async def check_access(
        self, devices: list[str], options: Variants
    ) -> list[tuple[str, bool, str, dict[str, tuple[str, Any]]]]:
        """(device, allowed, reason, details): the plan, as the contract's
        CheckAccess says."""
        parsed = acquire_options(options, "CheckAccess")  # owner-pidfd borrowed, as in acquire
        credentials = await self.callers.of(get_current_message().sender)
        results = self.broker.check_access(credentials.caller, devices, parsed)
        return [
            (
                a.device,
                a.allowed,
                a.reason,
                {
                    "code": ("s", a.code.value),
                    "move": ("as", [str(m) for m in a.move]),
                    "blocker": ("s", str(a.blocker) if a.blocker is not None else ""),
                    "group": ("s", a.group),
                    "holder": ("o", lease_path(a.holder) if a.holder is not None else NO_OBJECT),
                    "companions": ("as", [str(c) for c in a.companions]),
                    "backends": ("as", list(a.backends)),
                },
            )
            for a in results
        ]

    async def lease_details(self, leases: list[str]) -> dict[str, dict[str, tuple[str, Any]]]:
        """Who holds each lease, for the leases the caller may see: its own,
        or all of them for root. The rest are left out, as are leases that
        ended meanwhile."""
        if len(leases) > MAX_DETAILS:
            raise InvalidArgument(f"ask for at most {MAX_DETAILS} leases at a time")
        uid = (await self.callers.of(get_current_message().sender)).caller.uid
        details: dict[str, dict[str, tuple[str, Any]]] = {}
        for path in leases:
            lease = self.broker.leases.get(path.removeprefix(LEASE_PREFIX))
            if lease is not None and path.startswith(LEASE_PREFIX) and uid in (0, lease.caller.uid):
                details[path] = _details(lease)
        return details

    async def inventory(
        self, options: Variants
    ) -> tuple[list[DeviceRow], list[GroupRow], list[LeaseRow]]:
        """Every device, group and lease as exported, in one reply a client
        decodes in a tenth of GetManagedObjects' time; a lease's details
        only where GetLeaseDetails would tell them."""
        inventory_options(options)
        uid = (await self.callers.of(get_current_message().sender)).caller.uid
        device_tree, group_tree = self._trees()
        leases = []
        for lease_id, exported in self.leases.items():
            lease = self.broker.leases.get(lease_id)
            details = _details(lease) if lease is not None and uid in (0, lease.caller.uid) else {}
            leases.append(lease_row(exported.path, exported.obj.view, details))
        return (
            [device_row(path, view) for path, view in device_tree.items()],
            [group_row(path, view) for path, view in group_tree.items()],
            leases,
        )

    async def reload_policy(self) -> None:
        credentials = await self.callers.of(get_current_message().sender)
        if credentials.caller.uid != 0:
            raise PermissionDenied(
                "only root may reload vfiod's policy; run `systemctl reload vfiod` as root"
            )
        await self.broker.authorize_reload(credentials.caller, credentials.pid)
        try:
            revoked = self.reload()
        except PolicyError as e:
            raise PolicyInvalid(
                f"the policy was not reloaded, the previous one stays in force: {e}"
            ) from e
        for lease in revoked:
            await self._settled(lease.id)

    def reload(self) -> list[Lease]:
        """Read the policy again (ReloadPolicy, or SIGHUP from `systemctl
        reload`): end the leases it no longer allows, announce the settings.
        PolicyError keeps the old policy."""
        reserved = set(self.broker.policy.current.reserved)
        revoked = self.broker.reload_policy()
        log.info("policy reloaded; %d lease(s) revoked", len(revoked))
        for address in reserved | set(self.broker.policy.current.reserved):
            self._sync_device(address)
        self.manager.properties_changed.emit(
            (MANAGER_INTERFACE, {"NoIommuMode": ("b", self.no_iommu_mode)}, [])
        )
        return revoked

    async def map_dma(
        self, lease_id: str, memfd: int, offset: int, size: int, iova: int, options: Variants
    ) -> int:
        # memfd is borrowed, as in acquire; the mapping keeps its own reference (mmap).
        allocate = map_options(options)
        with self._calling(lease_id):
            credentials = await self.callers.of(get_current_message().sender)
            return self.broker.map_dma(
                lease_id, credentials.caller, memfd, offset, size, None if allocate else iova
            )

    async def unmap_dma(self, lease_id: str, iova: int, size: int) -> None:
        with self._calling(lease_id):
            credentials = await self.callers.of(get_current_message().sender)
            self.broker.unmap_dma(lease_id, credentials.caller, iova, size)


def _details(lease: Lease) -> dict[str, tuple[str, Any]]:
    """Who holds a lease: for its own uid and for root (GetLeaseDetails)."""
    return {
        "Owner": ("s", lease.owner),
        "Pid": ("u", lease.pid or 0),
        "OwnerPid": ("u", lease.owner_pid or 0),
        "Unit": ("s", lease.caller.unit or ""),
        "Label": ("s", lease.label),
        "State": ("s", lease.state.value),
    }
