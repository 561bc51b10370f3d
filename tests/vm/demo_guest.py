"""The demo's in-guest part: vfiod's view of the host, then one device taken
through VFIO step by step, on a real kernel."""

from __future__ import annotations

import os
import sys
import tempfile

from tests.vm.topology import E1000E
from vfiod.host import binding
from vfiod.host.critical import find_critical
from vfiod.host.hwdb import HardwareDatabase
from vfiod.host.inventory import scan
from vfiod.host.sysfs import Sysfs
from vfiod.pci import PciAddress
from vfiod.report import inventory_table
from vfiod.state import StateFile
from vfiod.vfio import (
    CdevDevice,
    Container,
    DmaMapping,
    Group,
    IommuFd,
    LinuxKernel,
    VfioError,
    cdev_path,
    group_path,
)

MiB = 1 << 20


def step(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def show(text: str) -> None:
    print(f"    {text}", flush=True)


def show_inventory(sysfs: Sysfs) -> None:
    hwdb = HardwareDatabase()
    inventory = scan(sysfs, hwdb)
    hwdb.close()
    step(
        f"vfiod's view of this host (vfiod inventory): {len(inventory.devices)} PCI devices, "
        f"{len(inventory.groups)} IOMMU groups"
    )
    print(inventory_table(inventory, find_critical(sysfs)), flush=True)


def legacy_walkthrough(sysfs: Sysfs, kernel: LinuxKernel, address: PciAddress) -> None:
    group_id = sysfs.iommu_group(address)
    assert group_id is not None
    step(f"legacy VFIO: container /dev/vfio/vfio + group {group_path(group_id)}")
    memfd = os.memfd_create("vfiod-demo", os.MFD_CLOEXEC)
    os.ftruncate(memfd, 2 * MiB)
    try:
        with Container.open(kernel) as container, Group.open(kernel, group_id) as group:
            show(f"group viable: {group.viable}")
            try:
                Group.open(kernel, group_id)
            except VfioError as e:
                show(f"a second open is refused: {e}")
            group.set_container(container)
            show(f"IOMMU model: {container.set_iommu().name}")
            ranges = ", ".join(f"{r.start:#x}-{r.last:#x}" for r in container.iova_ranges())
            show(f"valid IOVA ranges: {ranges}")
            with group.open_device(address) as device:
                show(
                    f"device fd open; config space says {device.vendor_id:04x}:"
                    f"{device.device_id:04x}, sysfs says {sysfs.id_attr(address, 'vendor'):04x}:"
                    f"{sysfs.id_attr(address, 'device'):04x}"
                )
                with DmaMapping.map_memfd(kernel, container, memfd, 0, 2 * MiB, iova=0) as m:
                    show(f"mapped a 2 MiB memfd for DMA at IOVA {m.iova:#x} (0 is a valid IOVA)")
                show("unmapped it")
                device.reset()
                show("device reset")
    finally:
        os.close(memfd)


def iommufd_walkthrough(kernel: LinuxKernel, address: PciAddress) -> None:
    path = cdev_path(address)
    step(f"iommufd: /dev/iommu + device cdev {path}")
    memfd = os.memfd_create("vfiod-demo", os.MFD_CLOEXEC)
    os.ftruncate(memfd, 2 * MiB)
    try:
        with IommuFd.open(kernel) as iommufd, CdevDevice.open(kernel, path, str(address)) as dev:
            ioas = iommufd.alloc_ioas()
            show(f"IOAS {ioas.id} allocated; device bound as devid {dev.bind(iommufd)}")
            dev.attach(ioas)
            show(f"attached; config space says {dev.vendor_id:04x}:{dev.device_id:04x}")
            with DmaMapping.map_memfd(kernel, ioas, memfd, 0, 2 * MiB, iova=0x100000) as m:
                show(f"mapped 2 MiB at IOVA {m.iova:#x}")
            dev.detach()
            ioas.destroy()
            show("detached, IOAS destroyed")
    finally:
        os.close(memfd)


def main() -> int:
    sysfs = Sysfs()
    kernel = LinuxKernel()
    print(f"guest kernel {os.uname().release}", flush=True)
    show_inventory(sysfs)
    address = PciAddress.parse(E1000E)
    step(f"binding {address} to vfio-pci (driver_override, unbind, drivers_probe)")
    with tempfile.TemporaryDirectory() as state_dir:
        binder = binding.Binder(sysfs, StateFile(os.path.join(state_dir, "state.json")))
        walkthrough(sysfs, kernel, binder, address)
    show_inventory(sysfs)
    return 0


def walkthrough(
    sysfs: Sysfs, kernel: LinuxKernel, binder: binding.Binder, address: PciAddress
) -> None:
    record = binder.bind(address)
    assert record is not None
    show(f"{address}: {record.original_driver} -> {sysfs.driver(address)}")
    show(f"recorded first in the state file: {record}")
    try:
        binding.wait_for_node(group_path(sysfs.iommu_group(address) or "0"))
        legacy_walkthrough(sysfs, kernel, address)
        if os.path.exists("/dev/iommu"):
            iommufd_walkthrough(kernel, address)
        else:
            step("iommufd: this kernel has none (the test kernel has; see README)")
    finally:
        step(f"restoring {address}")
        binder.restore(address)
        show(f"{address}: back on {sysfs.driver(address)}")


if __name__ == "__main__":
    sys.exit(main())
