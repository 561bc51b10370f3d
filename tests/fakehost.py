"""A fake VFIO host for the broker's tests and benchmarks: a fake sysfs tree
and a fake kernel that agree with each other, a policy root and a state file.

    host = build(tmp_path / "host", "small", policy=POLICY)

Topologies:
- ``small``: an e1000e alone in group 10 (0000:00:10.0), the ICH9 functions
  in group 5 (ahci, i801_smbus: not viable), a PCIe-to-PCI bridge with two
  e1000 sharing group 4 behind a root port in group 3.
- ``noiommu``: no IOMMU; an e1000e (0000:00:10.0) that unsafe no-IOMMU mode
  can give group ``noiommu-0``.
- ``scale:N``: N devices, two functions per slot sharing one group; all
  start on vfio-pci (warm acquires).

The daemon for bus tests runs in its own process, which must build the fake
itself (FakeSysfs and FakeKernel are in-memory models over the tree):

    python -m tests.fakehost DIR TOPOLOGY   # runs vfiod on the fake host in DIR
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

from vfiod.host.fake import FakeSysfs
from vfiod.pci import PciAddress
from vfiod.state import StateFile
from vfiod.vfio.fake import FakeKernel, FakePciDevice

NIC = PciAddress.parse("0000:00:10.0")
ISA = PciAddress.parse("0000:00:1f.0")
SATA = PciAddress.parse("0000:00:1f.2")
SMBUS = PciAddress.parse("0000:00:1f.3")
ROOT_PORT = PciAddress.parse("0000:00:1c.0")
PCI_BRIDGE = PciAddress.parse("0000:01:00.0")
E1000_A = PciAddress.parse("0000:02:01.0")
E1000_B = PciAddress.parse("0000:02:02.0")
NIC_GROUP = "10"
BRIDGE_GROUP = "4"


@dataclasses.dataclass
class FakeHost:
    directory: Path
    sysfs: FakeSysfs
    kernel: FakeKernel
    state: StateFile

    @property
    def policy_root(self) -> Path:
        return self.directory / "root"


def no_modules(module: str) -> str:
    """The fake host has no modules to load; the real modprobe must never run."""
    return f"module {module} not found in the fake host"


def _kernel_device(fs: FakeSysfs, address: PciAddress) -> FakePciDevice:
    d = fs.description(address)
    return FakePciDevice(
        str(address), vendor=d.vendor, device=d.device, class_code=d.pci_class, bars=(0x20000,)
    )


def _add_kernel_groups(fs: FakeSysfs, kernel: FakeKernel) -> None:
    """Give every non-bridge member of every IOMMU group a VFIO group node and
    cdev, the way the kernel does once it is on vfio-pci; the broker opens
    them only after checking the group is viable."""
    groups: dict[int, list[PciAddress]] = {}
    for address in fs.present():
        d = fs.description(address)
        if d.group is not None and d.pci_class >> 8 != 0x0604:  # bridges stay on pcieport
            groups.setdefault(d.group, []).append(address)
    for group, members in sorted(groups.items()):
        kernel.add_group(group, [_kernel_device(fs, a) for a in members])
        for address in members:
            cdev = os.path.basename(kernel.cdev_path(str(address)))
            os.makedirs(os.path.join(fs.device_path(address), "vfio-dev", cdev), exist_ok=True)


def add_e1000e(fs: FakeSysfs, address: PciAddress = NIC, group: int | None = 10) -> None:
    fs.add_device(
        address,
        vendor=0x8086,
        device=0x10D3,
        subsystem_device=0xA01F,
        pci_class=0x020000,
        driver="e1000e",
        group=group,
        reset_methods=("flr", "bus"),
    )


def add_ich9(fs: FakeSysfs) -> None:
    """QEMU q35's southbridge functions, one IOMMU group (no ACS on them)."""
    fs.add_device(ISA, vendor=0x8086, device=0x2918, pci_class=0x060100, group=5)
    fs.add_device(SATA, vendor=0x8086, device=0x2922, pci_class=0x010601, driver="ahci", group=5)
    fs.add_device(
        SMBUS, vendor=0x8086, device=0x2930, pci_class=0x0C0500, driver="i801_smbus", group=5
    )


def add_bridged_e1000s(fs: FakeSysfs, bridge_driver: str | None) -> None:
    """A PCIe-to-PCI bridge behind a root port, two conventional e1000 behind
    it: requester IDs alias to the bridge, so all three share a group."""
    fs.add_device(
        ROOT_PORT, vendor=0x1B36, device=0x000C, pci_class=0x060400, driver="pcieport", group=3
    )
    fs.add_device(
        PCI_BRIDGE,
        vendor=0x1B36,
        device=0x000E,
        pci_class=0x060400,
        driver=bridge_driver,
        group=int(BRIDGE_GROUP),
        parent=ROOT_PORT,
    )
    for address in (E1000_A, E1000_B):
        fs.add_device(
            address,
            vendor=0x8086,
            device=0x100E,
            pci_class=0x020000,
            driver="e1000",
            group=int(BRIDGE_GROUP),
            parent=PCI_BRIDGE,
        )


def add_small(fs: FakeSysfs) -> None:
    add_e1000e(fs)
    add_ich9(fs)
    add_bridged_e1000s(fs, None)


def scale_address(index: int) -> PciAddress:
    """Device ``index`` of a scale host: two functions per slot, 32 slots per bus."""
    slot, function = divmod(index, 2)
    bus, slot = divmod(slot, 32)
    return PciAddress(0, bus + 1, slot, function)


def add_scale(fs: FakeSysfs, count: int) -> None:
    for i in range(count):
        fs.add_device(
            scale_address(i),
            vendor=0x8086,
            device=0x10CA,
            pci_class=0x020000,
            driver="vfio-pci",
            group=i // 2 + 100,
            reset_methods=("flr",),
        )


def build(
    directory: Path,
    topology: str = "small",
    *,
    policy: str = "",
    settings: str = "",
    cross_process: bool = False,
) -> FakeHost:
    """A fake host in ``directory``: sys/, root/etc/vfiod (the policy), run/.
    ``cross_process``: the kernel's fds are handed to other processes."""
    directory.mkdir(parents=True, exist_ok=True)
    noiommu = topology == "noiommu"
    fs = FakeSysfs(directory / "sys")
    fs.add_driver("vfio-pci")
    kernel = FakeKernel(cross_process=cross_process)
    if topology == "small":
        add_small(fs)
        _add_kernel_groups(fs, kernel)
    elif noiommu:
        fs.add_device(NIC, vendor=0x8086, device=0x10D3, pci_class=0x020000, driver="e1000e")
        kernel.add_group("noiommu-0", [_kernel_device(fs, NIC)])
    elif topology.startswith("scale:"):
        add_scale(fs, int(topology.removeprefix("scale:")))
        _add_kernel_groups(fs, kernel)
    else:
        raise ValueError(f"unknown fake topology {topology!r}")
    etc = directory / "root/etc/vfiod"
    (etc / "policy.d").mkdir(parents=True, exist_ok=True)
    if policy:
        (etc / "policy.d/50-test.toml").write_text(policy)
    if settings:
        (etc / "vfiod.toml").write_text(settings)
    state = StateFile(str(directory / "run/state.json"))
    return FakeHost(directory, fs, kernel, state)


def main(argv: list[str]) -> int:
    """Run vfiod on a fake host (for the bus tests and benchmarks)."""
    from vfiod import daemon, log  # noqa: PLC0415 - only the daemon process needs them

    directory, topology = Path(argv[0]), argv[1]
    policy = (directory / "policy.toml").read_text() if (directory / "policy.toml").exists() else ""
    settings = (directory / "vfiod.toml").read_text() if (directory / "vfiod.toml").exists() else ""
    host = build(directory / "host", topology, policy=policy, settings=settings, cross_process=True)
    log.setup()
    parts = daemon.Parts(
        sysfs=host.sysfs,
        kernel=host.kernel,
        state=host.state,
        policy_root=str(host.policy_root),
        hwdb=False,
        hotplug=False,
        load_module=no_modules,
        critical=dict,
    )
    daemon.run(parts)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
