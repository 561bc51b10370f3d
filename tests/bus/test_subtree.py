"""vfiod.bus.subtree on a real dbus-daemon: objects served from one vtable
are what the standard interfaces say of them (GetManagedObjects, Get,
GetAll, Introspect), their signals name what changed, and a getter that
breaks is an error reply, never a broken bus."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import sdbus
from sdbus import (
    DbusInterfaceCommonAsync,
    DbusObjectManagerInterfaceAsync,
    DbusUnknownInterfaceError,
    DbusUnknownObjectError,
    dbus_property_async,
)
from sdbus.sd_bus_internals import SdBus

from tests.bus import PrivateBus
from vfiod.bus.interfaces import (
    DeviceInterface,
    DeviceView,
    GroupInterface,
    GroupView,
    LeaseInterface,
)
from vfiod.bus.subtree import Subtree, properties_of

NAME = "org.vfiod1"
DEVICES = "/org/vfiod1/device"
GROUPS = "/org/vfiod1/group"
OBJECT_MANAGER = "org.freedesktop.DBus.ObjectManager"


def device(n: int, **changes: Any) -> DeviceView:
    view = DeviceView(
        address=f"0000:00:{n:02x}.0",
        vendor=0x8086,
        device=0x10D3,
        subsystem_vendor=0x8086,
        subsystem_device=n,
        pci_class=0x020000,
        description="Ethernet controller",
        driver="e1000e",
        original_driver="",
        group=f"{GROUPS}/{n}",
        noiommu=False,
        host_critical=("carries the default route",) if n == 2 else (),
        lease="/",
        reset_methods=("flr", "bus"),
        reservation="gpu" if n == 3 else "",
    )
    return dataclasses.replace(view, **changes)


GROUP = GroupView(
    id="7",
    devices=(f"{DEVICES}/d1", f"{DEVICES}/d2"),
    viable=False,
    blockers=(("0000:00:1f.0", "bound to lpc_ich, not vfio-pci"),),
    noiommu=False,
    lease="/",
)


def wire_device(view: DeviceView) -> dict[str, tuple[str, Any]]:
    """The org.vfiod1.Device properties a view should read as, by hand."""
    return {
        "Address": ("s", view.address),
        "Vendor": ("q", view.vendor),
        "Device": ("q", view.device),
        "SubsystemVendor": ("q", view.subsystem_vendor),
        "SubsystemDevice": ("q", view.subsystem_device),
        "Class": ("u", view.pci_class),
        "Description": ("s", view.description),
        "Driver": ("s", view.driver),
        "OriginalDriver": ("s", view.original_driver),
        "Group": ("o", view.group),
        "NoIommu": ("b", view.noiommu),
        "HostCritical": ("as", list(view.host_critical)),
        "Lease": ("o", view.lease),
        "ResetMethods": ("as", list(view.reset_methods)),
        "Reservation": ("s", view.reservation),
    }


@dataclasses.dataclass
class Served:
    server: SdBus
    client: SdBus
    devices: Subtree
    groups: Subtree

    async def call(
        self, path: str, interface: str, member: str, signature: str = "", *args: Any
    ) -> Any:
        message = self.client.new_method_call_message(NAME, path, interface, member)
        if signature:
            message.append_data(signature, *args)
        reply = await self.client.call_async(message)
        return reply.get_contents()

    async def managed(self) -> dict[str, dict[str, dict[str, tuple[str, Any]]]]:
        objects: dict[str, dict[str, dict[str, tuple[str, Any]]]] = await self.call(
            "/org/vfiod1", OBJECT_MANAGER, "GetManagedObjects"
        )
        return objects


def serve(private_bus: PrivateBus, test: Callable[[Served], Coroutine[Any, Any, None]]) -> None:
    async def run() -> None:
        server, client = private_bus.connect(), private_bus.connect()
        await server.request_name_async(NAME, 0)
        manager = DbusObjectManagerInterfaceAsync()
        handle = manager.export_to_dbus("/org/vfiod1", server)
        devices = Subtree(server, DEVICES, DeviceInterface)
        groups = Subtree(server, GROUPS, GroupInterface)
        try:
            await test(Served(server, client, devices, groups))
        finally:
            devices.close()
            groups.close()
            handle.stop()
            server.close()
            client.close()

    asyncio.run(run())


def test_objects_read_as_their_views(private_bus: PrivateBus) -> None:
    async def test(served: Served) -> None:
        for n in (1, 2, 3):
            served.devices.add(f"{DEVICES}/d{n}", device(n), announce=False)
        served.groups.add(f"{GROUPS}/7", GROUP, announce=False)
        objects = await served.managed()
        assert sorted(objects) == [f"{DEVICES}/d{n}" for n in (1, 2, 3)] + [f"{GROUPS}/7"]
        for n in (1, 2, 3):
            assert objects[f"{DEVICES}/d{n}"]["org.vfiod1.Device"] == wire_device(device(n))
        assert objects[f"{GROUPS}/7"]["org.vfiod1.Group"] == {
            "Id": ("s", "7"),
            "Devices": ("ao", [f"{DEVICES}/d1", f"{DEVICES}/d2"]),
            "Viable": ("b", False),
            "Blockers": ("a(ss)", [("0000:00:1f.0", "bound to lpc_ich, not vfio-pci")]),
            "NoIommu": ("b", False),
            "Lease": ("o", "/"),
        }
        properties = "org.freedesktop.DBus.Properties"
        path = f"{DEVICES}/d2"
        assert await served.call(
            path, properties, "Get", "ss", "org.vfiod1.Device", "HostCritical"
        ) == (
            "as",
            ["carries the default route"],
        )
        assert await served.call(
            path, properties, "GetAll", "s", "org.vfiod1.Device"
        ) == wire_device(device(2))
        # The sdbus proxy the client uses reads them as well.
        proxy = DeviceInterface.new_proxy(NAME, path, served.client)
        assert await proxy.address == "0000:00:02.0"
        assert await proxy.reset_methods == ["flr", "bus"]
        xml = await served.call(path, "org.freedesktop.DBus.Introspectable", "Introspect")
        assert '<interface name="org.vfiod1.Device">' in xml
        assert '<property name="HostCritical" type="as" access="read">' in xml
        children = await served.call(DEVICES, "org.freedesktop.DBus.Introspectable", "Introspect")
        assert all(f'<node name="d{n}"/>' in children for n in (1, 2, 3))

    serve(private_bus, test)


def test_unknown_paths_are_unknown_objects(private_bus: PrivateBus) -> None:
    async def test(served: Served) -> None:
        served.devices.add(f"{DEVICES}/d1", device(1), announce=False)
        for path in (f"{DEVICES}/d9", f"{DEVICES}/d1/deeper", f"{GROUPS}/d1"):
            with pytest.raises((DbusUnknownObjectError, DbusUnknownInterfaceError)):
                await served.call(
                    path, "org.freedesktop.DBus.Properties", "GetAll", "s", "org.vfiod1.Device"
                )
        with pytest.raises(ValueError, match="not under"):
            served.devices.add(f"{GROUPS}/x", device(1))

    serve(private_bus, test)


def test_changes_are_signalled_with_what_changed(private_bus: PrivateBus) -> None:
    async def test(served: Served) -> None:
        served.devices.add(f"{DEVICES}/d1", device(1), announce=False)
        served.devices.add(f"{DEVICES}/d2", device(2), announce=False)
        heard: list[tuple[str, str, Any]] = []

        def listen(message: Any) -> None:
            heard.append((message.path, message.member, message.get_contents()))

        slot = await served.client.match_signal_async(NAME, None, None, None, listen)
        served.devices.update(f"{DEVICES}/d1", device(1))  # the same: nothing
        served.devices.update(
            f"{DEVICES}/d1", device(1, driver="vfio-pci", lease="/org/vfiod1/lease/a")
        )
        served.devices.remove(f"{DEVICES}/d2")
        served.devices.remove(f"{DEVICES}/d2")  # gone already: nothing
        served.devices.add(f"{DEVICES}/d3", device(3))
        for _ in range(100):
            if len(heard) >= 3:
                break
            await asyncio.sleep(0.05)
        changed, removed, added = heard
        assert changed == (
            f"{DEVICES}/d1",
            "PropertiesChanged",
            (
                "org.vfiod1.Device",
                {"Driver": ("s", "vfio-pci"), "Lease": ("o", "/org/vfiod1/lease/a")},
                [],
            ),
        )
        assert removed[:2] == ("/org/vfiod1", "InterfacesRemoved")
        assert removed[2][0] == f"{DEVICES}/d2"
        assert "org.vfiod1.Device" in removed[2][1]
        assert added[:2] == ("/org/vfiod1", "InterfacesAdded")
        assert added[2][0] == f"{DEVICES}/d3"
        assert added[2][1]["org.vfiod1.Device"] == wire_device(device(3))
        assert sorted(await served.managed()) == [f"{DEVICES}/d1", f"{DEVICES}/d3"]
        assert f"{DEVICES}/d2" not in served.devices
        assert len(served.devices) == 2
        await asyncio.sleep(0.2)
        assert len(heard) == 3, heard[3:]
        del slot

    serve(private_bus, test)


class Breaking(DbusInterfaceCommonAsync, interface_name="org.example.Breaking"):
    view: dict[str, int]

    @dbus_property_async("u")
    def count(self) -> int:
        return self.view["count"]  # KeyError for a view without one


class Said(logging.Handler):
    """The messages logged, kept as text (a record's traceback would keep
    the frames, and so the bus, alive)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        assert record.exc_info is None
        self.messages.append(record.getMessage())


def test_a_getter_that_breaks_is_an_error_reply(private_bus: PrivateBus) -> None:
    said = Said()
    logger = logging.getLogger("vfiod.bus.subtree")
    logger.addHandler(said)

    async def test(served: Served) -> None:
        tree = Subtree(served.server, "/org/vfiod1/breaking", Breaking)
        try:
            tree.add("/org/vfiod1/breaking/good", {"count": 3}, announce=False)
            tree.add("/org/vfiod1/breaking/bad", {}, announce=False)
            properties = "org.freedesktop.DBus.Properties"
            with pytest.raises(sdbus.SdBusBaseError):
                await served.call(
                    "/org/vfiod1/breaking/bad",
                    properties,
                    "Get",
                    "ss",
                    "org.example.Breaking",
                    "Count",
                )
            assert await served.call(
                "/org/vfiod1/breaking/good",
                properties,
                "Get",
                "ss",
                "org.example.Breaking",
                "Count",
            ) == ("u", 3)
        finally:
            tree.close()

    try:
        serve(private_bus, test)
    finally:
        logger.removeHandler(said)
    (message,) = said.messages
    assert message.startswith("bug: reading Count of /org/vfiod1/breaking/bad failed\nTraceback")
    assert message.endswith("KeyError: 'count'")


def test_closed_subtrees_serve_nothing(private_bus: PrivateBus) -> None:
    async def test(served: Served) -> None:
        tree = Subtree(served.server, "/org/vfiod1/other", DeviceInterface)
        tree.add("/org/vfiod1/other/d1", device(1), announce=False)
        assert "/org/vfiod1/other/d1" in await served.managed()
        tree.close()
        assert "/org/vfiod1/other/d1" not in await served.managed()
        assert len(tree) == 0

    serve(private_bus, test)


def test_only_property_interfaces_can_be_served() -> None:
    with pytest.raises(TypeError, match="methods or signals"):
        properties_of(LeaseInterface)
    name, properties = properties_of(DeviceInterface)
    assert name == "org.vfiod1.Device"
    assert [p.name for p in properties] == list(wire_device(device(1)))
