"""What the host has: PCI devices and IOMMU groups from sysfs, and why a group
can or cannot be assigned."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os

from vfiod.host.hwdb import HardwareDatabase
from vfiod.host.sysfs import HostError, Sysfs
from vfiod.pci import AddressError, PciAddress

log = logging.getLogger(__name__)

NOIOMMU_GROUP_NAME = "vfio-noiommu"

# Drivers that leave a group viable while its other members are assigned
# (since Linux 5.19 these are the drivers that do not claim DMA ownership).
DMA_SAFE_DRIVERS = frozenset({"vfio-pci", "pci-stub", "pcieport"})

# PCI class codes (base class, subclass) -> name, from the PCI Code and ID
# Assignment Specification; the ones a VM host meets, not all of them.
_CLASS_NAMES = {
    0x0100: "SCSI storage controller",
    0x0101: "IDE interface",
    0x0104: "RAID bus controller",
    0x0106: "SATA controller",
    0x0107: "Serial Attached SCSI controller",
    0x0108: "Non-Volatile memory controller",
    0x0200: "Ethernet controller",
    0x0207: "InfiniBand controller",
    0x0280: "Network controller",
    0x0300: "VGA compatible controller",
    0x0302: "3D controller",
    0x0380: "Display controller",
    0x0401: "Multimedia audio controller",
    0x0403: "Audio device",
    0x0500: "RAM memory",
    0x0600: "Host bridge",
    0x0601: "ISA bridge",
    0x0604: "PCI bridge",
    0x0680: "Bridge",
    0x0700: "Serial controller",
    0x0780: "Communication controller",
    0x0880: "System peripheral",
    0x0C03: "USB controller",
    0x0C05: "SMBus",
    0x0D00: "IRDA controller",
    0x1200: "Processing accelerators",
}


def class_name(pci_class: int) -> str:
    return _CLASS_NAMES.get(pci_class >> 8, f"class {pci_class:06x}")


def is_vfio_driver(driver: str | None) -> bool:
    """Is ``driver`` vfio-pci or one of its variants, whose devices a group
    fd can open?"""
    return driver is not None and (
        driver == "vfio-pci" or driver.endswith(("_vfio_pci", "-vfio-pci"))
    )


def is_dma_safe(driver: str | None) -> bool:
    """May a device stay on ``driver`` while its group is assigned?"""
    return driver is None or driver in DMA_SAFE_DRIVERS or is_vfio_driver(driver)


@dataclasses.dataclass(frozen=True)
class PciDevice:
    address: PciAddress
    vendor: int
    device: int
    subsystem_vendor: int
    subsystem_device: int
    pci_class: int
    driver: str | None
    group: str | None  # IOMMU group number, None without an IOMMU
    reset_methods: tuple[str, ...]
    physfn: PciAddress | None  # the PF of an SR-IOV VF
    virtfns: tuple[PciAddress, ...]
    description: str | None = None  # vendor and model from the hardware database

    @property
    def class_name(self) -> str:
        return class_name(self.pci_class)

    @property
    def ids(self) -> str:
        return f"{self.vendor:04x}:{self.device:04x}"


@dataclasses.dataclass(frozen=True)
class Blocker:
    address: PciAddress
    reason: str


@dataclasses.dataclass(frozen=True)
class IommuGroup:
    id: str
    noiommu: bool
    devices: tuple[PciDevice, ...]

    @property
    def node_name(self) -> str:
        """The name under /dev/vfio."""
        return f"noiommu-{self.id}" if self.noiommu else self.id

    def blockers(self) -> tuple[Blocker, ...]:
        return tuple(
            Blocker(d.address, f"{d.address} ({d.class_name}) is bound to {d.driver}")
            for d in self.devices
            if not is_dma_safe(d.driver)
        )

    @property
    def viable(self) -> bool:
        return not self.blockers()


@dataclasses.dataclass(frozen=True)
class Inventory:
    devices: dict[PciAddress, PciDevice]
    groups: dict[str, IommuGroup]

    def group_of(self, address: PciAddress) -> IommuGroup:
        device = self.devices.get(address)
        if device is None:
            raise HostError(errno.ENODEV, f"no PCI device {address}")
        if device.group is None:
            raise HostError(
                errno.ENOENT,
                f"{address} has no IOMMU group: boot with the IOMMU on "
                "(intel_iommu=on or amd_iommu=on), or use unsafe no-IOMMU mode",
            )
        return self.groups[device.group]


def _link_address(path: str) -> PciAddress | None:
    try:
        return PciAddress.parse(os.path.basename(os.readlink(path)))
    except (FileNotFoundError, AddressError):
        return None


def _link_name(path: str) -> str | None:
    """What a driver or iommu_group link names; None without the link."""
    try:
        return os.path.basename(os.readlink(path))
    except FileNotFoundError:
        return None


def read_device(
    sysfs: Sysfs, address: PciAddress, hwdb: HardwareDatabase | None = None
) -> PciDevice:
    path = sysfs.require_device(address)
    description = None
    if hwdb is not None:
        with contextlib.suppress(OSError):
            description = hwdb.describe(sysfs.read(os.path.join(path, "modalias")))
    try:
        reset_methods = tuple(sysfs.read(os.path.join(path, "reset_method")).split())
    except OSError:
        reset_methods = ()  # no attribute (old kernel) or no method (EINVAL on read)
    virtfns = sorted(
        filter(
            None,
            (
                _link_address(os.path.join(path, entry))
                for entry in os.listdir(path)
                if entry.startswith("virtfn")
            ),
        )
    )

    # The device's directory was checked once above: not again per attribute.
    def hex_attr(name: str) -> int:
        return int(sysfs.read(os.path.join(path, name)), 16)

    try:
        return PciDevice(
            address=address,
            vendor=hex_attr("vendor"),
            device=hex_attr("device"),
            subsystem_vendor=hex_attr("subsystem_vendor"),
            subsystem_device=hex_attr("subsystem_device"),
            pci_class=hex_attr("class"),
            driver=_link_name(os.path.join(path, "driver")),
            group=_link_name(os.path.join(path, "iommu_group")),
            reset_methods=reset_methods,
            physfn=_link_address(os.path.join(path, "physfn")),
            virtfns=tuple(virtfns),
            description=description,
        )
    except FileNotFoundError:
        sysfs.require_device(address)  # removed meanwhile: the HostError that says so
        raise


def scan(sysfs: Sysfs, hwdb: HardwareDatabase | None = None) -> Inventory:
    try:
        names = sorted(os.listdir(sysfs.path("bus/pci/devices")))
    except FileNotFoundError as e:
        raise HostError(
            errno.ENOENT,
            f"{sysfs.path('bus/pci/devices')} is missing: this host (or container) shows no "
            "PCI bus; run vfiod where /sys shows the PCI devices",
        ) from e
    devices = {}
    for name in names:
        address = PciAddress.parse(name)
        devices[address] = read_device(sysfs, address, hwdb)
    return assemble(sysfs, devices)


def assemble(sysfs: Sysfs, devices: dict[PciAddress, PciDevice]) -> Inventory:
    """Group devices into their IOMMU groups."""
    members: dict[str, list[PciDevice]] = {}
    for device in sorted(devices.values(), key=lambda d: d.address):
        if device.group is not None:
            members.setdefault(device.group, []).append(device)
    groups: dict[str, IommuGroup] = {}
    for group_id, group_devices in members.items():
        try:
            name = sysfs.read(sysfs.path("kernel/iommu_groups", group_id, "name"))
        except OSError:
            name = ""
        groups[group_id] = IommuGroup(group_id, name == NOIOMMU_GROUP_NAME, tuple(group_devices))
    return Inventory(devices, groups)


def cross_check_viability(group: IommuGroup, kernel_viable: bool) -> bool:
    """Log a disagreement with the kernel's VIABLE flag; True when they agree."""
    problem = viability_disagreement(group, kernel_viable)
    if problem is not None:
        log.warning("%s", problem)
    return problem is None


def viability_disagreement(group: IommuGroup, kernel_viable: bool) -> str | None:
    """Compare vfiod's verdict with the kernel's VIABLE flag of the open group.

    vfiod computes viability itself to name the blockers; the kernel has the
    last word. A disagreement means vfiod's driver list is out of date for
    this kernel: worth a log line, never to be hidden.
    """
    if group.viable == kernel_viable:
        return None
    ours = (
        "viable"
        if group.viable
        else "not viable (" + "; ".join(b.reason for b in group.blockers()) + ")"
    )
    theirs = "viable" if kernel_viable else "not viable"
    return (
        f"IOMMU group {group.id}: vfiod finds it {ours}, the kernel says {theirs}; "
        "the kernel's answer stands"
    )
