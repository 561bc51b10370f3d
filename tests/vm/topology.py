"""The emulated machines the VM tests boot, described in one place.

Slots are explicit and high (0x10+) because virtme-ng adds its own devices
from slot 1 up, one more for every shared directory.
"""

from __future__ import annotations

import dataclasses
import enum


class KernelKind(enum.StrEnum):
    STOCK = "stock"  # Debian's linux-image-amd64: legacy VFIO only
    TEST = "test"  # 6.12 with VFIO_NOIOMMU, IOMMUFD, VFIO_DEVICE_CDEV built in


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str
    description: str
    iommu: bool
    qemu_devices: tuple[str, ...]

    def qemu_opts(self, disk_image: str) -> list[str]:
        """QEMU options; ``disk_image`` is a blank raw file that becomes the
        guest's /dev/sda on the ICH9 SATA controller."""
        machine = "q35,kernel-irqchip=split" if self.iommu else "q35"
        opts = ["-machine", machine]
        opts += ["-drive", f"file={disk_image},format=raw,if=none,id=disk0"]
        opts += ["-device", "ide-hd,drive=disk0,bus=ide.0"]
        if self.iommu:
            opts += ["-device", "intel-iommu,intremap=on,caching-mode=on"]
        for device in self.qemu_devices:
            opts += ["-device", device]
        return opts

    def kernel_args(self) -> list[str]:
        # loglevel=4: errors and worse reach the console (and console.log),
        # driver chatter does not interleave with the test output.
        return ["loglevel=4", *(["intel_iommu=on"] if self.iommu else [])]


# Addresses the guest tests rely on.
E1000E = "0000:00:10.0"  # alone in its group
BRIDGE = "0000:00:11.0"  # pcie-pci-bridge: the bridge and both e1000 share one group
BRIDGED_E1000 = ("0000:01:01.0", "0000:01:02.0")
ICH9_LPC = "0000:00:1f.0"  # the ICH9 functions of q35 share one group with
ICH9_SATA = "0000:00:1f.2"  # host drivers bound: a real non-viable group
ICH9_SMBUS = "0000:00:1f.3"
SATA_DISK = "/dev/sda"  # a blank disk on ICH9_SATA; the root file system is 9p
E1000E_IDS = (0x8086, 0x10D3)
IGB_PF = "0000:02:00.0"  # igb (SR-IOV capable, QEMU >= 8) behind a PCIe root port
# A multifunction slot of conventional PCI e1000s: functions without ACS
# between them share a group. (Two e1000e in one slot got a group each on
# Linux 6.1: PCIe functions may be isolated by quirks; conventional PCI is not.)
MULTIFUNCTION = ("0000:00:13.0", "0000:00:13.1")
# An igb behind a root port without ACS: the port, the PF and its VFs share
# one group (as behind a switch without ACS).
NOACS_PF = "0000:03:00.0"
NOACS_VFS = ("0000:03:10.0", "0000:03:10.2")  # igb's VF offset 0x80, stride 2

_DEVICES = (
    "e1000e,addr=10.0",
    "pcie-pci-bridge,id=br0,addr=11.0",
    "e1000,bus=br0,addr=1.0",
    "e1000,bus=br0,addr=2.0",
    "pcie-root-port,id=rp0,addr=12.0,chassis=1",
    "igb,bus=rp0",
    "e1000,addr=13.0,multifunction=on",
    "e1000,addr=13.1,multifunction=on",
    "pcie-root-port,id=rp1,addr=14.0,chassis=2,disable-acs=on",
    "igb,bus=rp1",
)

IOMMU = Topology(
    "iommu",
    "q35 with an emulated Intel IOMMU: e1000e alone in its group, the ICH9 "
    "functions in one group, a pcie-pci-bridge with two e1000 in a three-member group, "
    "an SR-IOV igb behind a root port, a multifunction e1000 pair in one group, and "
    "an SR-IOV igb behind a root port without ACS (port, PF and VFs in one group)",
    iommu=True,
    qemu_devices=_DEVICES,
)
NOIOMMU = Topology(
    "noiommu",
    "q35 without an IOMMU (no IOMMU groups unless vfio's unsafe no-IOMMU mode is on)",
    iommu=False,
    qemu_devices=_DEVICES,
)

TOPOLOGIES = {t.name: t for t in (IOMMU, NOIOMMU)}


@dataclasses.dataclass(frozen=True)
class Boot:
    """One VM boot and the guest test files it runs."""

    kernel: KernelKind
    topology: Topology
    tests: tuple[str, ...]
    installed: bool = False  # its tests run vfiod as `make install` puts it
    part: str = ""  # tells apart two boots of one kernel and topology
    # Reserved for vfio-pci from boot: vfiod's udev rules for them are in
    # the guest's /etc/udev/rules.d before its udev adds the devices.
    reserved: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return f"{self.kernel}-{self.topology.name}" + (f"-{self.part}" if self.part else "")


GUEST_DIR = "tests/vm/guest"

BOOTS = (
    Boot(
        KernelKind.STOCK,
        IOMMU,
        ("test_legacy.py", "test_host.py", "test_broker.py", "test_broker_trust.py"),
    ),
    Boot(
        KernelKind.TEST,
        IOMMU,
        (
            "test_legacy.py",
            "test_iommufd.py",
            "test_vmm.py",
            "test_broker_iommufd.py",
            "test_e2e_qemu.py",
            "test_vfiod_systemd.py",
        ),
        installed=True,
    ),
    # QEMU and libvirt as the managers run them (nested QEMUs: slow under TCG).
    Boot(
        KernelKind.TEST,
        IOMMU,
        ("test_hotplug_qemu.py", "test_libvirt_system.py"),
        part="managers",
    ),
    Boot(KernelKind.TEST, NOIOMMU, ("test_noiommu.py", "test_broker_noiommu.py")),
    # What admins set up: a reservation from boot (Debian's kernel: e1000e is
    # a module, as a GPU's driver is, so udev acts before it can probe),
    # resets between tenants, polkit.
    Boot(KernelKind.STOCK, IOMMU, ("test_admin.py",), part="admin", reserved=(E1000E,)),
)
RESERVATION = "boot-reserved"  # the name the reserved devices' rules give
