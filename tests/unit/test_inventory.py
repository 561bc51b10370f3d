"""Inventory, binding and ``vfiod inventory`` on fake sysfs trees.

The trees are the topologies vfiod meets: a NIC alone in its group, the
ICH9 southbridge group, PCI devices behind a PCIe-to-PCI bridge, SR-IOV, no
IOMMU at all. The first tests pin FakeSysfs itself to the kernel's behaviour,
because every later test trusts it.
"""

from __future__ import annotations

import errno
import json
import os
import re
from pathlib import Path

import pytest

from tests.fakehost import (
    E1000_A,
    E1000_B,
    ISA,
    NIC,
    PCI_BRIDGE,
    ROOT_PORT,
    SATA,
    SMBUS,
    add_bridged_e1000s,
    add_e1000e,
    add_ich9,
    no_modules,
)
from vfiod.__main__ import main
from vfiod.host.binding import Binder
from vfiod.host.fake import FakeSysfs, SriovCapability
from vfiod.host.hwdb import HardwareDatabase
from vfiod.host.inventory import IommuGroup, PciDevice, read_device, scan
from vfiod.host.sysfs import HostError
from vfiod.pci import PciAddress
from vfiod.state import BindPhase, StateFile

PF = PciAddress.parse("0000:03:00.0")
VF0 = PciAddress.parse("0000:03:10.0")  # 82576: First VF Offset 0x80, VF Stride 2
VF1 = PciAddress.parse("0000:03:10.2")
UNKNOWN = PciAddress.parse("0000:7f:00.0")

ICH9_BLOCKERS = (
    "0000:00:1f.2 (SATA controller) is bound to ahci",
    "0000:00:1f.3 (SMBus) is bound to i801_smbus",
)


@pytest.fixture
def fs(tmp_path: Path) -> FakeSysfs:
    fake = FakeSysfs(tmp_path / "sys")
    fake.add_driver("vfio-pci")
    return fake


@pytest.fixture
def state(tmp_path: Path) -> StateFile:
    return StateFile(str(tmp_path / "run" / "state.json"))


@pytest.fixture
def binder(fs: FakeSysfs, state: StateFile) -> Binder:
    return Binder(fs, state, load_module=no_modules, critical=dict)


def add_sriov_pf(fs: FakeSysfs) -> None:
    fs.add_driver("igbvf")
    fs.add_device(
        PF,
        vendor=0x8086,
        device=0x10C9,
        pci_class=0x020000,
        driver="igb",
        group=12,
        reset_methods=("flr",),
        sriov=SriovCapability(
            total_vfs=7, vf_device=0x10CA, vf_driver="igbvf", offset=0x80, stride=2
        ),
    )


def attr(fs: FakeSysfs, address: PciAddress, name: str) -> str:
    return fs.path("bus/pci/devices", str(address), name)


def errno_is(err: int) -> str:
    """A ``match`` for a plain OSError: str() starts "[Errno N]"."""
    return rf"^\[Errno {err}\] "


def reasons(group: IommuGroup) -> tuple[str, ...]:
    return tuple(b.reason for b in group.blockers())


# FakeSysfs itself


def test_fake_tree_reads_like_linux(fs: FakeSysfs) -> None:
    add_e1000e(fs)
    device = os.path.join(fs.root, "devices/pci0000:00/0000:00:10.0")
    assert fs.read(os.path.join(device, "vendor")) == "0x8086"
    assert fs.read(os.path.join(device, "class")) == "0x020000"
    assert fs.read(os.path.join(device, "driver_override")) == "(null)"
    assert fs.read(os.path.join(device, "reset_method")) == "flr bus"
    assert fs.read(os.path.join(device, "modalias")) == (
        "pci:v00008086d000010D3sv00008086sd0000A01Fbc02sc00i00"
    )
    assert os.path.samefile(fs.device_path(NIC), device)
    assert os.path.samefile(fs.path("bus/pci/drivers/e1000e/0000:00:10.0"), device)
    assert os.path.samefile(fs.path("kernel/iommu_groups/10/devices/0000:00:10.0"), device)
    assert fs.driver(NIC) == "e1000e"
    assert fs.driver_override(NIC) is None
    assert fs.iommu_group(NIC) == "10"


def test_fake_links_are_relative_and_stay_inside(fs: FakeSysfs) -> None:
    add_ich9(fs)
    add_bridged_e1000s(fs, None)
    root = os.path.realpath(fs.root)
    links = [
        os.path.join(d, name)
        for d, dirs, files in os.walk(fs.root)
        for name in dirs + files
        if os.path.islink(os.path.join(d, name))
    ]
    assert len(links) > 20
    for link in links:
        assert not os.path.isabs(os.readlink(link)), link
        assert os.path.realpath(link).startswith(root + os.sep), link


def test_fake_nests_devices_under_their_bridge(fs: FakeSysfs) -> None:
    add_bridged_e1000s(fs, None)
    assert os.path.realpath(fs.device_path(E1000_A)) == os.path.join(
        os.path.realpath(fs.root),
        "devices/pci0000:00/0000:00:1c.0/0000:01:00.0/0000:02:01.0",
    )


def test_fake_driver_override_stores_and_clears(fs: FakeSysfs) -> None:
    add_e1000e(fs)
    fs.write(attr(fs, NIC, "driver_override"), "vfio-pci")
    assert fs.driver_override(NIC) == "vfio-pci"
    assert fs.driver(NIC) == "e1000e"  # an override alone moves nothing
    fs.write(attr(fs, NIC, "driver_override"), "\n")
    assert fs.read(attr(fs, NIC, "driver_override")) == "(null)"


def test_fake_unbind_then_probe_follows_the_override(fs: FakeSysfs) -> None:
    add_e1000e(fs)
    fs.write(attr(fs, NIC, "driver_override"), "vfio-pci")
    fs.write(attr(fs, NIC, "driver/unbind"), str(NIC))
    assert fs.driver(NIC) is None
    assert not os.path.lexists(fs.path("bus/pci/drivers/e1000e", str(NIC)))
    fs.write(fs.path("bus/pci/drivers_probe"), f"{NIC}\n")
    assert fs.driver(NIC) == "vfio-pci"
    assert fs.writes == [
        ("devices/pci0000:00/0000:00:10.0/driver_override", "vfio-pci"),
        ("bus/pci/drivers/e1000e/unbind", str(NIC)),
        ("bus/pci/drivers_probe", f"{NIC}\n"),
    ]


def test_fake_probe_without_override_takes_the_native_driver(fs: FakeSysfs) -> None:
    add_e1000e(fs)
    fs.write(fs.path("bus/pci/drivers/e1000e/unbind"), str(NIC))
    fs.write(fs.path("bus/pci/drivers_probe"), str(NIC))
    assert fs.driver(NIC) == "e1000e"


def test_fake_override_naming_a_missing_driver_leaves_device_unbound(fs: FakeSysfs) -> None:
    add_e1000e(fs)
    fs.write(attr(fs, NIC, "driver_override"), "not-loaded")
    fs.write(fs.path("bus/pci/drivers/e1000e/unbind"), str(NIC))
    fs.write(fs.path("bus/pci/drivers_probe"), str(NIC))  # no error, no driver
    assert fs.driver(NIC) is None
    fs.add_driver("not-loaded")  # registering a driver probes what it matches
    assert fs.driver(NIC) == "not-loaded"


@pytest.mark.parametrize(
    ("control", "value", "err"),
    [
        pytest.param("drivers/e1000e/unbind", str(UNKNOWN), errno.ENODEV, id="unbind-unknown"),
        pytest.param("drivers/vfio-pci/unbind", str(NIC), errno.ENODEV, id="unbind-not-bound"),
        pytest.param("drivers/vfio-pci/bind", str(NIC), errno.ENODEV, id="bind-no-match"),
        pytest.param("drivers/e1000e/bind", str(NIC), errno.EBUSY, id="bind-bound"),
        pytest.param("drivers_probe", str(UNKNOWN), errno.ENODEV, id="probe-unknown"),
        pytest.param("drivers_probe", "00:10.0", errno.ENODEV, id="probe-short-name"),
        pytest.param("rescan", "yes", errno.EINVAL, id="rescan-not-a-number"),
    ],
)
def test_fake_bus_writes_fail_like_the_kernel(
    fs: FakeSysfs, control: str, value: str, err: int
) -> None:
    add_e1000e(fs)
    with pytest.raises(OSError, match=errno_is(err)):
        fs.write(fs.path("bus/pci", control), value)
    assert fs.driver(NIC) == "e1000e"


def test_fake_refusing_driver(fs: FakeSysfs) -> None:
    """drivers_probe ignores a probe error (the write succeeds, the device
    stays unbound); bind returns the probe's error."""
    add_e1000e(fs)
    fs.add_driver("stubborn", refuses=True)
    fs.write(attr(fs, NIC, "driver_override"), "stubborn")
    fs.write(fs.path("bus/pci/drivers/e1000e/unbind"), str(NIC))
    fs.write(fs.path("bus/pci/drivers_probe"), str(NIC))
    assert fs.driver(NIC) is None
    with pytest.raises(OSError, match=errno_is(errno.ENODEV)):
        fs.write(fs.path("bus/pci/drivers/stubborn/bind"), str(NIC))
    assert fs.driver(NIC) is None


def test_fake_vfio_pci_refuses_bridges(fs: FakeSysfs) -> None:
    add_bridged_e1000s(fs, None)
    fs.write(attr(fs, PCI_BRIDGE, "driver_override"), "vfio-pci")
    with pytest.raises(OSError, match=errno_is(errno.EINVAL)):
        fs.write(fs.path("bus/pci/drivers/vfio-pci/bind"), str(PCI_BRIDGE))
    assert fs.driver(PCI_BRIDGE) is None


def test_fake_fail_next_write_fails_once(fs: FakeSysfs) -> None:
    add_e1000e(fs)
    fs.fail_next_write("e1000e/unbind", errno.EBUSY)
    with pytest.raises(OSError, match=errno_is(errno.EBUSY)):
        fs.write(attr(fs, NIC, "driver/unbind"), str(NIC))  # matched once resolved
    assert fs.driver(NIC) == "e1000e"
    fs.write(attr(fs, NIC, "driver/unbind"), str(NIC))
    assert fs.driver(NIC) is None


def test_fake_plain_attribute_write(fs: FakeSysfs) -> None:
    add_e1000e(fs)
    fs.write(attr(fs, NIC, "reset_method"), "bus")
    assert fs.read(attr(fs, NIC, "reset_method")) == "bus"
    with pytest.raises(FileNotFoundError):
        fs.write(attr(fs, NIC, "no_such_attribute"), "1")


def test_fake_rejects_clashing_addresses(fs: FakeSysfs) -> None:
    add_sriov_pf(fs)
    with pytest.raises(ValueError, match=re.escape("0000:03:10.2 is taken")):
        fs.add_device(VF1, vendor=0x8086, device=0x10D3, pci_class=0x020000)


# inventory


def test_single_device_group(fs: FakeSysfs) -> None:
    add_e1000e(fs)
    inventory = scan(fs)
    assert inventory.devices[NIC] == PciDevice(
        address=NIC,
        vendor=0x8086,
        device=0x10D3,
        subsystem_vendor=0x8086,
        subsystem_device=0xA01F,
        pci_class=0x020000,
        driver="e1000e",
        group="10",
        reset_methods=("flr", "bus"),
        physfn=None,
        virtfns=(),
    )
    group = inventory.group_of(NIC)
    assert (group.id, group.noiommu, group.node_name) == ("10", False, "10")
    assert [d.address for d in group.devices] == [NIC]
    # "Viable" is "assignable as it stands": the NIC must leave e1000e first.
    assert group.viable is False
    assert reasons(group) == ("0000:00:10.0 (Ethernet controller) is bound to e1000e",)


def test_device_without_reset_method_has_none(fs: FakeSysfs) -> None:
    fs.add_device(NIC, vendor=0x8086, device=0x10D3, pci_class=0x020000, group=1)
    assert not os.path.exists(attr(fs, NIC, "reset_method"))
    assert scan(fs).devices[NIC].reset_methods == ()


def test_ich9_group_is_blocked_by_its_bound_members(fs: FakeSysfs) -> None:
    add_ich9(fs)
    add_e1000e(fs)
    inventory = scan(fs)
    group = inventory.group_of(SATA)
    assert [d.address for d in group.devices] == [ISA, SATA, SMBUS]
    assert inventory.devices[ISA].driver is None
    assert group.viable is False
    assert reasons(group) == ICH9_BLOCKERS
    assert [b.address for b in group.blockers()] == [SATA, SMBUS]


@pytest.mark.parametrize("bridge_driver", [None, "pcieport"])
def test_pcie_pci_bridge_group(fs: FakeSysfs, binder: Binder, bridge_driver: str | None) -> None:
    add_bridged_e1000s(fs, bridge_driver)
    group = scan(fs).group_of(E1000_A)
    assert [d.address for d in group.devices] == [PCI_BRIDGE, E1000_A, E1000_B]
    assert reasons(group) == (
        "0000:02:01.0 (Ethernet controller) is bound to e1000",
        "0000:02:02.0 (Ethernet controller) is bound to e1000",
    )
    assert scan(fs).group_of(ROOT_PORT).viable  # pcieport is DMA-safe

    records = binder.bind_group(group)

    assert [r.address for r in records] == [str(E1000_A), str(E1000_B)]
    after = scan(fs).group_of(E1000_A)
    assert after.viable
    assert [d.driver for d in after.devices] == [bridge_driver, "vfio-pci", "vfio-pci"]


@pytest.mark.parametrize(
    "driver", [None, "vfio-pci", "pci-stub", "pcieport", "mlx5_vfio_pci", "nvme-vfio-pci"]
)
def test_dma_safe_drivers_keep_group_viable(fs: FakeSysfs, driver: str | None) -> None:
    fs.add_device(NIC, vendor=0x15B3, device=0x101E, pci_class=0x020000, driver=driver, group=7)
    fs.add_device(
        "0000:00:10.1", vendor=0x15B3, device=0x101E, pci_class=0x020000, driver="vfio-pci", group=7
    )
    group = scan(fs).group_of(NIC)
    assert group.viable, reasons(group)


@pytest.mark.parametrize("driver", ["mlx5_core", "nvme", "vfio_pci_core", "snd_hda_intel"])
def test_other_drivers_block(fs: FakeSysfs, driver: str) -> None:
    fs.add_device(NIC, vendor=0x15B3, device=0x101E, pci_class=0x020000, driver=driver, group=7)
    assert reasons(scan(fs).group_of(NIC)) == (
        f"0000:00:10.0 (Ethernet controller) is bound to {driver}",
    )


def test_noiommu_group(tmp_path: Path) -> None:
    fs = FakeSysfs(tmp_path, noiommu=True)
    fs.add_device(NIC, vendor=0x8086, device=0x10D3, pci_class=0x020000, driver="vfio-pci")
    assert fs.read(fs.path("kernel/iommu_groups/0/name")) == "vfio-noiommu"
    group = scan(fs).group_of(NIC)
    assert (group.id, group.noiommu, group.node_name) == ("0", True, "noiommu-0")
    assert group.viable


def test_binding_makes_and_restoring_drops_a_noiommu_group(tmp_path: Path) -> None:
    fs = FakeSysfs(tmp_path / "sys", noiommu=True)
    fs.add_driver("vfio-pci")
    add_e1000e(fs, group=None)
    add_e1000e(fs, PciAddress.parse("0000:00:11.0"), group=None)
    binder = Binder(
        fs, StateFile(str(tmp_path / "state.json")), load_module=no_modules, critical=dict
    )

    binder.bind(NIC)

    inventory = scan(fs)
    group = inventory.group_of(NIC)
    assert (group.noiommu, group.node_name) == (True, "noiommu-0")
    assert inventory.devices[PciAddress.parse("0000:00:11.0")].group is None
    assert binder.restore(NIC) == "e1000e"
    assert scan(fs).groups == {}
    assert fs.iommu_group(NIC) is None


def test_vfio_pci_refuses_a_groupless_device_without_noiommu(
    fs: FakeSysfs, binder: Binder, state: StateFile
) -> None:
    add_e1000e(fs, group=None)
    with pytest.raises(HostError, match="was put back on e1000e"):
        binder.bind(NIC)
    assert fs.driver(NIC) == "e1000e"
    assert fs.driver_override(NIC) is None
    assert state.load().bindings == {}


def test_sriov_pf_and_vfs_read_back(fs: FakeSysfs) -> None:
    add_sriov_pf(fs)
    add_e1000e(fs)
    assert fs.read(attr(fs, PF, "sriov_totalvfs")) == "7"
    assert scan(fs).devices[PF].virtfns == ()
    groups_before = set(scan(fs).groups)

    fs.write(attr(fs, PF, "sriov_numvfs"), "2\n")

    inventory = scan(fs)
    assert fs.read(attr(fs, PF, "sriov_numvfs")) == "2"
    assert inventory.devices[PF].virtfns == (VF0, VF1)
    new_groups = set(inventory.groups) - groups_before
    assert len(new_groups) == 2
    for vf in (VF0, VF1):
        device = inventory.devices[vf]
        assert (device.physfn, device.ids, device.driver) == (PF, "8086:10ca", "igbvf")
        assert device.group in new_groups
        assert [d.address for d in inventory.group_of(vf).devices] == [vf]
        # VFs sit beside their PF, not under it.
        assert os.path.dirname(os.path.realpath(fs.device_path(vf))) == os.path.dirname(
            os.path.realpath(fs.device_path(PF))
        )

    fs.write(attr(fs, PF, "sriov_numvfs"), "0")

    inventory = scan(fs)
    assert VF0 not in inventory.devices
    assert VF1 not in inventory.devices
    assert set(inventory.groups) == groups_before
    assert inventory.devices[PF].virtfns == ()


@pytest.mark.parametrize(
    ("first", "then", "err"),
    [
        pytest.param(None, "8", errno.ERANGE, id="more-than-total"),
        pytest.param("2", "3", errno.EBUSY, id="change-without-disabling"),
        pytest.param(None, "two", errno.EINVAL, id="not-a-number"),
    ],
)
def test_sriov_numvfs_errors(fs: FakeSysfs, first: str | None, then: str, err: int) -> None:
    add_sriov_pf(fs)
    if first is not None:
        fs.write(attr(fs, PF, "sriov_numvfs"), first)
    with pytest.raises(OSError, match=errno_is(err)):
        fs.write(attr(fs, PF, "sriov_numvfs"), then)


def test_sriov_needs_a_pf_driver(fs: FakeSysfs) -> None:
    add_sriov_pf(fs)
    fs.write(fs.path("bus/pci/drivers/igb/unbind"), str(PF))
    with pytest.raises(OSError, match=errno_is(errno.ENOENT)):
        fs.write(attr(fs, PF, "sriov_numvfs"), "1")


def test_remove_and_rescan(fs: FakeSysfs) -> None:
    add_e1000e(fs)
    add_bridged_e1000s(fs, None)
    add_sriov_pf(fs)
    fs.write(attr(fs, PF, "sriov_numvfs"), "1")
    fs.write(attr(fs, NIC, "driver_override"), "vfio-pci")

    fs.write(attr(fs, NIC, "remove"), "1")
    fs.write(attr(fs, PCI_BRIDGE, "remove"), "1")  # and what is behind it
    fs.write(attr(fs, PF, "remove"), "1")  # and its VF

    inventory = scan(fs)
    assert list(inventory.devices) == [ROOT_PORT]
    assert list(inventory.groups) == ["3"]
    assert sorted(os.listdir(fs.path("bus/pci/drivers/e1000"))) == ["bind", "unbind"]

    fs.write(fs.path("bus/pci/rescan"), "1")

    inventory = scan(fs)
    assert list(inventory.devices) == [NIC, ROOT_PORT, PCI_BRIDGE, E1000_A, E1000_B, PF]
    assert inventory.devices[NIC].driver == "e1000e"  # a new device: no override
    assert fs.driver_override(NIC) is None
    assert inventory.devices[E1000_B].group == "4"
    assert inventory.devices[PF].virtfns == ()  # SR-IOV starts disabled


def test_device_without_group(fs: FakeSysfs) -> None:
    add_e1000e(fs, group=None)
    inventory = scan(fs)
    assert inventory.devices[NIC].group is None
    assert inventory.groups == {}
    with pytest.raises(HostError, match="boot with the IOMMU on") as caught:
        inventory.group_of(NIC)
    assert caught.value.errno == errno.ENOENT


def test_unknown_address(fs: FakeSysfs) -> None:
    add_e1000e(fs)
    with pytest.raises(HostError, match=re.escape("no PCI device 0000:7f:00.0")) as caught:
        scan(fs).group_of(UNKNOWN)
    assert caught.value.errno == errno.ENODEV
    with pytest.raises(HostError) as caught:
        read_device(fs, UNKNOWN)
    assert caught.value.errno == errno.ENODEV


# binding


def test_bind_and_restore(fs: FakeSysfs, binder: Binder, state: StateFile) -> None:
    add_e1000e(fs)

    record = binder.bind(NIC)

    assert record is not None
    assert (record.original_driver, record.original_override) == ("e1000e", None)
    assert record.phase is BindPhase.BOUND
    assert state.load().bindings == {str(NIC): record}
    assert fs.driver(NIC) == "vfio-pci"
    assert fs.driver_override(NIC) == "vfio-pci"
    assert binder.bind(NIC) is None  # already there: nothing to undo

    assert binder.restore(NIC) == "e1000e"

    assert fs.driver(NIC) == "e1000e"
    assert fs.driver_override(NIC) is None
    assert state.load().bindings == {}


def test_bind_to_a_refusing_driver_puts_the_device_back(
    fs: FakeSysfs, binder: Binder, state: StateFile
) -> None:
    add_e1000e(fs)
    fs.add_driver("stubborn", refuses=True)
    with pytest.raises(HostError, match=r"the device was put back on e1000e") as caught:
        binder.bind(NIC, "stubborn")
    assert "stubborn did not take 0000:00:10.0 (it was left unbound; see the kernel log)" in str(
        caught.value
    )
    assert fs.driver(NIC) == "e1000e"
    assert fs.driver_override(NIC) is None
    assert state.load().bindings == {}


def test_bind_unknown_address_changes_nothing(
    fs: FakeSysfs, binder: Binder, state: StateFile
) -> None:
    add_e1000e(fs)
    with pytest.raises(HostError) as caught:
        binder.bind(UNKNOWN)
    assert caught.value.errno == errno.ENODEV
    assert fs.writes == []
    assert not os.path.exists(state.path)
    assert fs.driver(NIC) == "e1000e"


def test_bind_group_undoes_the_members_it_moved(fs: FakeSysfs, binder: Binder) -> None:
    add_bridged_e1000s(fs, None)
    group = scan(fs).group_of(E1000_A)
    fs.fail_next_write(f"{E1000_B}/driver_override", errno.EIO)
    with pytest.raises(
        HostError, match=re.escape("setting driver_override for 0000:02:02.0 failed")
    ):
        binder.bind_group(group)
    for address in (E1000_A, E1000_B):
        assert fs.driver(address) == "e1000"
        assert fs.driver_override(address) is None


def test_bind_failing_unbind_leaves_nothing_behind(
    fs: FakeSysfs, binder: Binder, state: StateFile
) -> None:
    add_e1000e(fs)
    fs.fail_next_write("e1000e/unbind", errno.EBUSY)
    with pytest.raises(HostError, match=re.escape("unbind for 0000:00:10.0 failed")):
        binder.bind(NIC)
    assert fs.driver(NIC) == "e1000e"
    assert fs.driver_override(NIC) is None
    assert state.load().bindings == {}


def test_repair_finishes_a_bind_whose_undo_failed(
    fs: FakeSysfs, binder: Binder, state: StateFile
) -> None:
    add_e1000e(fs)
    # The bind's unbind fails, and so does the unbind of the undo after it.
    fs.fail_next_write("e1000e/unbind", errno.EBUSY)
    fs.fail_next_write("e1000e/unbind", errno.EBUSY)
    with pytest.raises(HostError, match="putting it back failed too"):
        binder.bind(NIC)
    assert state.load().bindings[str(NIC)].phase is BindPhase.RESTORE_FAILED
    assert fs.driver_override(NIC) == "vfio-pci"

    [result] = binder.repair()

    assert (result.address, result.restored_to, result.error) == (str(NIC), "e1000e", None)
    assert fs.driver(NIC) == "e1000e"
    assert fs.driver_override(NIC) is None
    assert state.load().bindings == {}


# vfiod inventory


def columns(line: str, header: str) -> list[str]:
    """A table row cut where the header's column names start."""
    starts = [m.start() for m in re.finditer(r"\S+", header)]
    ends = [*starts[1:], None]
    return [line[a:b].strip() for a, b in zip(starts, ends, strict=True)]


def test_cli_inventory_table(
    fs: FakeSysfs, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The host's hwdb would name these IDs; without names the class is shown.
    monkeypatch.setattr(HardwareDatabase, "describe", lambda self, modalias: None)
    add_ich9(fs)
    add_e1000e(fs)
    assert main(["inventory", "--sysfs", fs.root]) == 0
    out = capsys.readouterr().out.splitlines()
    assert columns(out[0], out[0]) == ["GROUP", "VIABLE", "DEVICE", "IDS", "DRIVER", "DESCRIPTION"]
    assert [columns(line, out[0]) for line in out[1:4]] == [
        ["5", "no", "0000:00:1f.0", "8086:2918", "-", "ISA bridge"],
        ["", "", "0000:00:1f.2", "8086:2922", "ahci", "SATA controller"],
        ["", "", "0000:00:1f.3", "8086:2930", "i801_smbus", "SMBus"],
    ]
    assert [line.strip() for line in out[4:6]] == [f"not viable: {b}" for b in ICH9_BLOCKERS]
    assert columns(out[6], out[0]) == [
        "10",
        "no",
        "0000:00:10.0",
        "8086:10d3",
        "e1000e",
        "Ethernet controller",
    ]
    assert out[7].strip() == "not viable: 0000:00:10.0 (Ethernet controller) is bound to e1000e"
    assert len(out) == 8


def test_cli_inventory_lists_noiommu_groups_last(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fs = FakeSysfs(tmp_path, noiommu=True)
    add_e1000e(fs, group=None)
    fs.add_device(
        "0000:00:11.0", vendor=0x8086, device=0x10D3, pci_class=0x020000, driver="vfio-pci"
    )
    add_e1000e(fs, PciAddress.parse("0000:00:12.0"), group=3)
    assert main(["inventory", "--sysfs", fs.root]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[:3] for line in out[1:] if not line.startswith(" ")] == [
        ["3", "no", "0000:00:12.0"],
        ["noiommu-0", "yes", "0000:00:11.0"],
    ]
    assert "0000:00:10.0" not in "\n".join(out)  # no group, nothing to assign


def test_cli_inventory_columns_line_up_with_noiommu_groups(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fs = FakeSysfs(tmp_path, noiommu=True)
    fs.add_device(NIC, vendor=0x8086, device=0x10D3, pci_class=0x020000, driver="vfio-pci")
    assert main(["inventory", "--sysfs", fs.root]) == 0
    header, row = capsys.readouterr().out.splitlines()
    assert row.index("0000:00:10.0") == header.index("DEVICE")


def test_cli_inventory_json(fs: FakeSysfs, capsys: pytest.CaptureFixture[str]) -> None:
    add_ich9(fs)
    add_bridged_e1000s(fs, "pcieport")
    assert main(["inventory", "--json", "--sysfs", fs.root]) == 0
    report = json.loads(capsys.readouterr().out)
    groups = {g["id"]: g for g in report["groups"]}
    assert groups["5"]["viable"] is False
    assert groups["5"]["node"] == "/dev/vfio/5"
    assert groups["5"]["blockers"] == [
        {"address": "0000:00:1f.2", "reason": ICH9_BLOCKERS[0]},
        {"address": "0000:00:1f.3", "reason": ICH9_BLOCKERS[1]},
    ]
    assert groups["5"]["devices"] == [str(ISA), str(SATA), str(SMBUS)]
    assert groups["3"]["viable"] is True
    devices = {d["address"]: d for d in report["devices"]}
    assert devices[str(SATA)]["driver"] == "ahci"
    assert devices[str(SATA)]["class_name"] == "SATA controller"


def test_cli_inventory_without_pci_sysfs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["inventory", "--sysfs", str(tmp_path / "none")]) == 1
    assert "bus/pci/devices" in capsys.readouterr().err


def test_host_critical_device_is_refused_before_anything_moves(
    fs: FakeSysfs, state: StateFile
) -> None:
    add_ich9(fs)
    critical = {SATA: ("backs / (ext4 on /dev/sda2)",)}
    binder = Binder(fs, state, load_module=no_modules, critical=lambda: critical)
    group = scan(fs).group_of(SMBUS)
    with pytest.raises(HostError) as refused:
        binder.bind_group(group)
    assert refused.value.errno == errno.EPERM
    assert str(refused.value) == (
        "host-critical: 0000:00:1f.2 backs / (ext4 on /dev/sda2). vfiod does not take a "
        "device the host needs away from its driver unless a policy rule names it by address"
    )
    # Nothing moved, not even the group's harmless members.
    assert fs.driver(SMBUS) == "i801_smbus"
    assert fs.driver(SATA) == "ahci"
    assert state.load().bindings == {}
    assert not any(path.endswith(("driver_override", "unbind")) for path, _ in fs.writes)

    with pytest.raises(HostError, match=re.escape("host-critical: 0000:00:1f.2 backs /")):
        binder.bind(SATA)

    # Named by policy: allowed.
    records = binder.bind_group(group, allow_critical={SATA})
    assert sorted(r.address for r in records) == [str(SATA), str(SMBUS)]
    assert scan(fs).group_of(SMBUS).viable
    binder.restore_all([SATA, SMBUS])
    assert (fs.driver(SATA), fs.driver(SMBUS)) == ("ahci", "i801_smbus")


def test_cli_inventory_shows_host_critical_devices(
    fs: FakeSysfs, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    add_e1000e(fs)
    # The NIC carries the default route: /proc/net/route and its class/net link.
    proc = tmp_path / "proc"
    (proc / "net").mkdir(parents=True)
    (proc / "net/route").write_text(
        "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n"
        "eth0\t00000000\t0102A8C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n"
    )
    os.makedirs(fs.device_path(NIC) + "/net/eth0")
    os.makedirs(fs.path("class/net"))
    os.symlink(os.path.realpath(fs.device_path(NIC) + "/net/eth0"), fs.path("class/net/eth0"))

    assert main(["inventory", "--sysfs", fs.root, "--proc", str(proc)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[2].strip() == "host-critical: carries the default route (eth0)"

    assert main(["inventory", "--json", "--sysfs", fs.root, "--proc", str(proc)]) == 0
    [device] = json.loads(capsys.readouterr().out)["devices"]
    assert device["host_critical"] == ["carries the default route (eth0)"]
