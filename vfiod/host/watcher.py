"""Hotplug: PCI uevents turned into host events and inventory updates.

Listens on the udev netlink source when udevd runs (``/run/udev/control``
exists), else on the kernel's own source — on a host without udevd the udev
source is silent. Integrates with asyncio through the monitor's fd.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import logging
import os
from collections.abc import AsyncIterator, Callable, Iterable

import pyudev

from vfiod.host.hwdb import HardwareDatabase
from vfiod.host.inventory import Inventory, PciDevice, assemble, read_device, scan
from vfiod.host.sysfs import HostError, Sysfs
from vfiod.pci import AddressError, PciAddress
from vfiod.state import StateFile

log = logging.getLogger(__name__)

UDEV_CONTROL = "/run/udev/control"


class Action(enum.StrEnum):
    ADD = "add"
    REMOVE = "remove"
    BIND = "bind"
    UNBIND = "unbind"
    CHANGE = "change"


@dataclasses.dataclass(frozen=True)
class UEvent:
    """One PCI uevent, as the kernel or udev sent it."""

    action: Action
    address: PciAddress
    driver: str | None


def default_source() -> str:
    return "udev" if os.path.exists(UDEV_CONTROL) else "kernel"


class UEventMonitor:
    """PCI uevents from netlink, as an async iterator."""

    def __init__(self, source: str | None = None) -> None:
        self.source = source or default_source()
        self._monitor = pyudev.Monitor.from_netlink(pyudev.Context(), source=self.source)
        if self.source == "udev":
            self._monitor.filter_by("pci")  # kernel-source messages are filtered below
        self._monitor.start()

    def fileno(self) -> int:
        fd: int = self._monitor.fileno()
        return fd

    def close(self) -> None:
        # pyudev has no close: drop the monitor, whose libudev handle closes the socket.
        del self._monitor

    def receive(self) -> list[UEvent]:
        """Everything that has arrived, without blocking."""
        events: list[UEvent] = []
        while (device := self._monitor.poll(timeout=0)) is not None:
            event = _to_event(device)
            if event is not None:
                events.append(event)
        return events

    async def events(self) -> AsyncIterator[UEvent]:
        loop = asyncio.get_running_loop()
        ready = asyncio.Event()
        loop.add_reader(self.fileno(), ready.set)
        try:
            while True:
                await ready.wait()
                ready.clear()
                for event in self.receive():
                    yield event
        finally:
            loop.remove_reader(self.fileno())


def _to_event(device: pyudev.Device) -> UEvent | None:
    if device.subsystem != "pci":
        return None
    try:
        action = Action(device.action)
        address = PciAddress.parse(device.sys_name)
    except (ValueError, AddressError):
        return None
    return UEvent(action, address, device.driver)


class HostChange(enum.StrEnum):
    ADDED = "added"
    REMOVED = "removed"
    DRIVER_CHANGED = "driver-changed"


@dataclasses.dataclass(frozen=True)
class HostEvent:
    """What the broker hears: a device came, went or changed driver."""

    change: HostChange
    address: PciAddress
    device: PciDevice | None  # None once removed
    bound_by_vfiod: bool  # vfiod had moved it to another driver


class Host:
    """The live inventory: a scan at start, then kept true by uevents."""

    def __init__(
        self, sysfs: Sysfs, state: StateFile, hwdb: HardwareDatabase | None = None
    ) -> None:
        self.sysfs = sysfs
        self.state = state
        self.hwdb = hwdb
        self.inventory: Inventory = scan(sysfs, hwdb)
        self.listeners: list[Callable[[HostEvent], None]] = []

    def apply(self, event: UEvent) -> HostEvent | None:
        """Update the inventory for one uevent; tell listeners what changed."""
        devices = dict(self.inventory.devices)
        bound = str(event.address) in self.state.load().bindings
        if event.action is Action.REMOVE:
            removed = devices.pop(event.address, None)
            if removed is None:
                return None
            self._reread_pf(devices, removed)
            change, device = HostChange.REMOVED, None
            if bound:
                # The device can no longer be restored; its record is moot.
                self.state.drop_binding(str(event.address))
        else:
            try:
                device = read_device(self.sysfs, event.address, self.hwdb)
            except (HostError, OSError) as e:
                log.warning("uevent %s for %s: cannot read it: %s", event.action, event.address, e)
                return None
            old = devices.get(event.address)
            devices[event.address] = device
            self._reread_pf(devices, device)
            if old is None:
                change = HostChange.ADDED
            elif old.driver != device.driver or old.group != device.group:
                change = HostChange.DRIVER_CHANGED
            else:
                return None
        self.inventory = assemble(self.sysfs, devices)
        host_event = HostEvent(change, event.address, device, bound)
        for listener in self.listeners:
            listener(host_event)
        return host_event

    def _reread_pf(self, devices: dict[PciAddress, PciDevice], vf: PciDevice) -> None:
        """A VF came or went: its PF's list of VFs changed (no uevent says so)."""
        if vf.physfn is None or vf.physfn not in devices:
            return
        try:
            devices[vf.physfn] = read_device(self.sysfs, vf.physfn, self.hwdb)
        except (HostError, OSError) as e:
            log.warning("re-reading the PF %s of %s: %s", vf.physfn, vf.address, e)

    def refresh(self, addresses: Iterable[PciAddress]) -> None:
        """Re-read devices vfiod just changed, without waiting for their
        uevents (which come later and then change nothing)."""
        devices = dict(self.inventory.devices)
        gone = []
        for address in addresses:
            if os.path.isdir(self.sysfs.device_path(address)):
                devices[address] = read_device(self.sysfs, address, self.hwdb)
            else:
                gone.append(address)
        self.inventory = assemble(self.sysfs, devices)
        for address in gone:  # as its uevent will say; listeners hear it now
            self.apply(UEvent(Action.REMOVE, address, None))

    async def run(self, monitor: UEventMonitor) -> None:
        async for event in monitor.events():
            self.apply(event)
