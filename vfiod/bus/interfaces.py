"""The org.vfiod1 interfaces, as sdbus classes: one class per interface, used
both to serve (by vfiod) and as proxies (by vfiod.client).

Served objects are thin: methods hand over to a ``BusBackend`` (the service in
vfiod.bus.service, which calls the broker); properties read a snapshot the
service keeps up to date, so GetManagedObjects over thousands of objects does
no work beyond reading attributes.

Methods are ``vfiod_method``s (vfiod.bus.checked): a call that sd-bus
cannot read whole (a forged fd index, a key given twice) is refused before
sdbus parses it; every fd a call carried is closed when it is done (the
backend borrows them: the broker dups what it keeps); every error answered
is an org.vfiod1.Error.*, bugs logged with their tracebacks.

sdbus facts this relies on (0.14.3): every exported method needs
DbusUnprivilegedFlag or sd-bus refuses non-root callers itself
(vfiod_method sets it); fds sent are copied into the message, so the sender
closes its own after the reply is built.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from sdbus import (
    DbusInterfaceCommonAsync,
    DbusObjectManagerInterfaceAsync,
    DbusPropertyConstFlag,
    DbusPropertyEmitsChangeFlag,
    dbus_property_async,
    dbus_signal_async,
)

from vfiod.bus.checked import vfiod_method
from vfiod.errors import InternalError as InternalError  # noqa: PLC0414 - the service's

if TYPE_CHECKING:
    from vfiod.bus.service import BusBackend

MANAGER_PATH = "/org/vfiod1"
DEVICE_PREFIX = "/org/vfiod1/device/"
GROUP_PREFIX = "/org/vfiod1/group/"
LEASE_PREFIX = "/org/vfiod1/lease/"
NO_OBJECT = "/"


def device_path(address: str) -> str:
    return DEVICE_PREFIX + address.replace(":", "_").replace(".", "_")


def group_path(node_name: str) -> str:
    return GROUP_PREFIX + node_name.replace("-", "_")


def lease_path(lease_id: str) -> str:
    return LEASE_PREFIX + lease_id


@dataclasses.dataclass(frozen=True)
class DeviceView:
    address: str
    vendor: int
    device: int
    subsystem_vendor: int
    subsystem_device: int
    pci_class: int
    description: str
    driver: str
    original_driver: str
    group: str  # object path, "/" without a group
    noiommu: bool
    host_critical: tuple[str, ...]
    lease: str  # object path, "/" when not leased
    reset_methods: tuple[str, ...]
    reservation: str  # the [[reserve]] keeping it on vfio-pci; "" for none


@dataclasses.dataclass(frozen=True)
class GroupView:
    id: str
    devices: tuple[str, ...]  # object paths
    viable: bool
    blockers: tuple[tuple[str, str], ...]
    noiommu: bool
    lease: str


# Manager.GetInventory's rows: each object's properties in the order of its
# interface's, after its path, then an a{sv} of more (what a later version
# adds, and a lease's details for who may see them).
DEVICE_ROW = "(osqqqqusssobasoasa{sv})"
GROUP_ROW = "(osaoba(ss)boa{sv})"
LEASE_ROW = "(ouasassbta{sv})"
More = dict[str, tuple[str, Any]]  # the a{sv} closing each row
DeviceRow = tuple[
    str, str, int, int, int, int, int, str, str, str, str, bool, list[str], str, list[str], More
]
GroupRow = tuple[str, str, list[str], bool, list[tuple[str, str]], bool, str, More]
LeaseRow = tuple[str, int, list[str], list[str], str, bool, int, More]


def device_row(path: str, v: DeviceView) -> DeviceRow:
    return (
        path,
        v.address,
        v.vendor,
        v.device,
        v.subsystem_vendor,
        v.subsystem_device,
        v.pci_class,
        v.description,
        v.driver,
        v.original_driver,
        v.group,
        v.noiommu,
        list(v.host_critical),
        v.lease,
        list(v.reset_methods),
        {"Reservation": ("s", v.reservation)} if v.reservation else {},
    )


def group_row(path: str, v: GroupView) -> GroupRow:
    return (path, v.id, list(v.devices), v.viable, list(v.blockers), v.noiommu, v.lease, {})


CHANGES = DbusPropertyEmitsChangeFlag
CONST = DbusPropertyConstFlag


class ManagerInterface(DbusInterfaceCommonAsync, interface_name="org.vfiod1.Manager"):
    backend: BusBackend

    @vfiod_method(
        input_signature="asa{sv}",
        result_signature="oa{sh}",
        input_args_names=("devices", "options"),
        result_args_names=("lease", "fds"),
    )
    async def acquire(
        self, devices: list[str], options: dict[str, tuple[str, Any]]
    ) -> tuple[str, dict[str, int]]:
        return await self.backend.acquire(devices, options)

    @vfiod_method(input_signature="o", input_args_names=("lease",))
    async def release(self, lease: str) -> None:
        await self.backend.release(lease)

    @vfiod_method(input_signature="s", input_args_names=("request_id",))
    async def cancel(self, request_id: str) -> None:
        await self.backend.cancel(request_id)

    @vfiod_method(
        input_signature="asa{sv}",
        result_signature="a(sbsa{sv})",
        input_args_names=("devices", "options"),
        result_args_names=("results",),
    )
    async def check_access(
        self, devices: list[str], options: dict[str, tuple[str, Any]]
    ) -> list[tuple[str, bool, str, dict[str, tuple[str, Any]]]]:
        return await self.backend.check_access(devices, options)

    @vfiod_method()
    async def reload_policy(self) -> None:
        await self.backend.reload_policy()

    @vfiod_method(
        input_signature="ao",
        result_signature="a{oa{sv}}",
        input_args_names=("leases",),
        result_args_names=("details",),
    )
    async def get_lease_details(self, leases: list[str]) -> dict[str, dict[str, tuple[str, Any]]]:
        return await self.backend.lease_details(leases)

    @vfiod_method(
        input_signature="a{sv}",
        result_signature=f"a{DEVICE_ROW}a{GROUP_ROW}a{LEASE_ROW}",
        input_args_names=("options",),
        result_args_names=("devices", "groups", "leases"),
    )
    async def get_inventory(
        self, options: dict[str, tuple[str, Any]]
    ) -> tuple[list[DeviceRow], list[GroupRow], list[LeaseRow]]:
        return await self.backend.inventory(options)

    # Sent to the requester alone (the service sets its destination).
    @dbus_signal_async(
        "sssst", signal_args_names=("request", "device", "step", "driver", "elapsed_usec")
    )
    def progress(self) -> tuple[str, str, str, str, int]:
        raise NotImplementedError

    @dbus_property_async("s", flags=CONST)
    def version(self) -> str:
        return self.backend.version

    @dbus_property_async("as", flags=CONST)
    def backends(self) -> list[str]:
        return list(self.backend.backends)

    @dbus_property_async("b", flags=CHANGES)
    def no_iommu_mode(self) -> bool:
        return self.backend.no_iommu_mode


class Manager(ManagerInterface, DbusObjectManagerInterfaceAsync):
    """/org/vfiod1: the Manager and the ObjectManager of everything below it."""

    def __init__(self, backend: BusBackend) -> None:
        super().__init__()
        self.backend = backend


class DeviceInterface(DbusInterfaceCommonAsync, interface_name="org.vfiod1.Device"):
    view: DeviceView

    def __init__(self, view: DeviceView) -> None:
        super().__init__()
        self.view = view

    @dbus_property_async("s", flags=CONST)
    def address(self) -> str:
        return self.view.address

    @dbus_property_async("q", flags=CONST)
    def vendor(self) -> int:
        return self.view.vendor

    @dbus_property_async("q", flags=CONST)
    def device(self) -> int:
        return self.view.device

    @dbus_property_async("q", flags=CONST)
    def subsystem_vendor(self) -> int:
        return self.view.subsystem_vendor

    @dbus_property_async("q", flags=CONST)
    def subsystem_device(self) -> int:
        return self.view.subsystem_device

    @dbus_property_async("u", flags=CONST, property_name="Class")
    def pci_class(self) -> int:
        return self.view.pci_class

    @dbus_property_async("s", flags=CONST)
    def description(self) -> str:
        return self.view.description

    @dbus_property_async("s", flags=CHANGES)
    def driver(self) -> str:
        return self.view.driver

    @dbus_property_async("s", flags=CHANGES)
    def original_driver(self) -> str:
        return self.view.original_driver

    @dbus_property_async("o", flags=CHANGES)
    def group(self) -> str:
        return self.view.group

    @dbus_property_async("b", flags=CHANGES)
    def no_iommu(self) -> bool:
        return self.view.noiommu

    @dbus_property_async("as", flags=CHANGES)
    def host_critical(self) -> list[str]:
        return list(self.view.host_critical)

    @dbus_property_async("o", flags=CHANGES)
    def lease(self) -> str:
        return self.view.lease

    @dbus_property_async("as", flags=CHANGES)
    def reset_methods(self) -> list[str]:
        return list(self.view.reset_methods)

    @dbus_property_async("s", flags=CHANGES)
    def reservation(self) -> str:
        return self.view.reservation


class GroupInterface(DbusInterfaceCommonAsync, interface_name="org.vfiod1.Group"):
    view: GroupView

    def __init__(self, view: GroupView) -> None:
        super().__init__()
        self.view = view

    @dbus_property_async("s", flags=CONST)
    def id(self) -> str:
        return self.view.id

    @dbus_property_async("ao", flags=CHANGES)
    def devices(self) -> list[str]:
        return list(self.view.devices)

    @dbus_property_async("b", flags=CHANGES)
    def viable(self) -> bool:
        return self.view.viable

    @dbus_property_async("a(ss)", flags=CHANGES)
    def blockers(self) -> list[tuple[str, str]]:
        return list(self.view.blockers)

    @dbus_property_async("b", flags=CONST)
    def no_iommu(self) -> bool:
        return self.view.noiommu

    @dbus_property_async("o", flags=CHANGES)
    def lease(self) -> str:
        return self.view.lease


@dataclasses.dataclass(frozen=True)
class LeaseView:
    """What anyone may see of a lease (see Manager.GetLeaseDetails for the rest)."""

    uid: int
    devices: tuple[str, ...]
    groups: tuple[str, ...]
    backend: str
    unsafe: bool
    created: int  # microseconds since the epoch


def lease_row(path: str, v: LeaseView, details: More) -> LeaseRow:
    return (path, v.uid, list(v.devices), list(v.groups), v.backend, v.unsafe, v.created, details)


class LeaseInterface(DbusInterfaceCommonAsync, interface_name="org.vfiod1.Lease"):
    backend: BusBackend
    lease_id: str
    view: LeaseView

    def __init__(self, backend: BusBackend, lease_id: str, view: LeaseView) -> None:
        super().__init__()
        self.backend = backend
        self.lease_id = lease_id
        self.view = view

    @vfiod_method(method_name="Release")
    async def release_lease(self) -> None:
        await self.backend.release(lease_path(self.lease_id))

    @vfiod_method(
        input_signature="httta{sv}",
        result_signature="t",
        input_args_names=("memfd", "offset", "size", "iova", "options"),
        result_args_names=("mapped_iova",),
    )
    async def map_dma(
        self, memfd: int, offset: int, size: int, iova: int, options: dict[str, tuple[str, Any]]
    ) -> int:
        return await self.backend.map_dma(self.lease_id, memfd, offset, size, iova, options)

    @vfiod_method(input_signature="tt", input_args_names=("iova", "size"))
    async def unmap_dma(self, iova: int, size: int) -> None:
        await self.backend.unmap_dma(self.lease_id, iova, size)

    @dbus_signal_async("s", signal_args_names=("reason",))
    def revoked(self) -> str:
        raise NotImplementedError  # emitted, never called

    @dbus_property_async("u", flags=CONST)
    def uid(self) -> int:
        return self.view.uid

    @dbus_property_async("as", flags=CONST)
    def devices(self) -> list[str]:
        return list(self.view.devices)

    @dbus_property_async("as", flags=CONST)
    def groups(self) -> list[str]:
        return list(self.view.groups)

    @dbus_property_async("s", flags=CONST, property_name="Backend")
    def backend_name(self) -> str:
        return self.view.backend

    @dbus_property_async("b", flags=CONST)
    def unsafe(self) -> bool:
        return self.view.unsafe

    @dbus_property_async("t", flags=CONST)
    def created(self) -> int:
        return self.view.created
