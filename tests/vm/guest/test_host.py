"""The host layer on a real kernel: inventory and blockers, whole-group binding,
hotplug events, crash repair."""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.vm.guest.conftest import Bound
from tests.vm.topology import (
    BRIDGE,
    BRIDGED_E1000,
    E1000E,
    ICH9_LPC,
    ICH9_SATA,
    ICH9_SMBUS,
    IGB_PF,
    SATA_DISK,
    KernelKind,
)
from vfiod.host.binding import Binder, FaultPoint
from vfiod.host.critical import find_critical
from vfiod.host.hwdb import HardwareDatabase
from vfiod.host.inventory import scan
from vfiod.host.sysfs import HostError, Sysfs
from vfiod.host.watcher import (
    Action,
    Host,
    HostChange,
    UEvent,
    UEventMonitor,
    default_source,
)
from vfiod.pci import PciAddress
from vfiod.state import BindPhase, StateFile

E1000E_ADDRESS = PciAddress.parse(E1000E)


@pytest.fixture(scope="module", autouse=True)
def _host_drivers(kernel_kind: KernelKind) -> None:
    # virtme-ng's udevd does not load modules for coldplugged devices; the
    # test kernel has these drivers built in.
    if kernel_kind is KernelKind.STOCK:
        for module in ("i2c-i801", "igb", "igbvf"):
            subprocess.run(["modprobe", module], check=True)


def test_inventory_names_every_blocker(sysfs: Sysfs) -> None:
    hwdb = HardwareDatabase()
    try:
        inventory = scan(sysfs, hwdb)
    finally:
        hwdb.close()
    e1000e = inventory.group_of(E1000E_ADDRESS)
    assert [str(d.address) for d in e1000e.devices] == [E1000E]
    assert e1000e.devices[0].ids == "8086:10d3"
    assert e1000e.devices[0].description == "Intel Corporation 82574L Gigabit Network Connection"
    assert inventory.devices[PciAddress.parse(IGB_PF)].reset_methods == ("flr", "pm", "bus")
    assert [b.reason for b in e1000e.blockers()] == [
        f"{E1000E} (Ethernet controller) is bound to e1000e"
    ]

    bridge = inventory.group_of(PciAddress.parse(BRIDGE))
    assert sorted(str(d.address) for d in bridge.devices) == sorted((BRIDGE, *BRIDGED_E1000))
    assert not bridge.viable
    assert [b.reason for b in bridge.blockers()] == [
        f"{a} (Ethernet controller) is bound to e1000" for a in BRIDGED_E1000
    ]

    ich9 = inventory.group_of(PciAddress.parse(ICH9_SATA))
    assert sorted(str(d.address) for d in ich9.devices) == [ICH9_LPC, ICH9_SATA, ICH9_SMBUS]
    reasons = [b.reason for b in ich9.blockers()]
    assert f"{ICH9_SATA} (SATA controller) is bound to ahci" in reasons
    assert f"{ICH9_SMBUS} (SMBus) is bound to i801_smbus" in reasons


def test_bridge_group_bound_whole_then_restored(sysfs: Sysfs, binder: Binder) -> None:
    group = scan(sysfs).group_of(PciAddress.parse(BRIDGE))
    records = binder.bind_group(group)
    try:
        # The bridge stays where it is: it keeps the group viable, and
        # vfio-pci does not take bridges.
        assert sorted(r.address for r in records) == sorted(BRIDGED_E1000)
        assert all(r.original_driver == "e1000" for r in records)
        after = scan(sysfs).group_of(PciAddress.parse(BRIDGE))
        assert after.viable, after.blockers()
        assert {str(d.address): d.driver for d in after.devices} == {
            BRIDGE: sysfs.driver(PciAddress.parse(BRIDGE)),
            BRIDGED_E1000[0]: "vfio-pci",
            BRIDGED_E1000[1]: "vfio-pci",
        }
    finally:
        binder.restore_all(PciAddress.parse(a) for a in BRIDGED_E1000)
    restored = scan(sysfs).group_of(PciAddress.parse(BRIDGE))
    assert not restored.viable
    assert all(sysfs.driver(PciAddress.parse(a)) == "e1000" for a in BRIDGED_E1000)
    assert not binder.state.load().bindings


async def _collect(
    monitor: UEventMonitor, host: Host, want: set[tuple[Action, str]], timeout: float = 30
) -> list[UEvent]:
    seen: list[UEvent] = []

    async def run() -> None:
        async for event in monitor.events():
            seen.append(event)
            host.apply(event)
            if want <= {(e.action, str(e.address)) for e in seen}:
                return

    await asyncio.wait_for(run(), timeout)
    return seen


@pytest.mark.parametrize("source", ["udev", "kernel"])
def test_hot_removal_of_a_bound_device_is_reported(
    sysfs: Sysfs, binder: Binder, source: str
) -> None:
    # virtme-ng runs udevd; the kernel source is what hosts without it get.
    assert default_source() == "udev"
    host = Host(sysfs, binder.state)
    heard: list[HostChange] = []
    host.listeners.append(lambda e: heard.append(e.change) if e.bound_by_vfiod else None)
    monitor = UEventMonitor(source)
    try:
        binder.bind(E1000E_ADDRESS)
        asyncio.run(_collect(monitor, host, {(Action.BIND, E1000E)}))
        assert host.inventory.devices[E1000E_ADDRESS].driver == "vfio-pci"

        sysfs.write(sysfs.device_path(E1000E_ADDRESS) + "/remove", "1")
        asyncio.run(_collect(monitor, host, {(Action.REMOVE, E1000E)}))
        assert E1000E_ADDRESS not in host.inventory.devices
        assert HostChange.REMOVED in heard, "the removal of a device vfiod bound is reported"
        assert str(E1000E_ADDRESS) not in binder.state.load().bindings

        sysfs.write(sysfs.path("bus/pci/rescan"), "1")
        events = asyncio.run(_collect(monitor, host, {(Action.ADD, E1000E), (Action.BIND, E1000E)}))
        assert (Action.ADD, E1000E) in {(e.action, str(e.address)) for e in events}
        # A re-added device is a new device: its native driver takes it.
        assert host.inventory.devices[E1000E_ADDRESS].driver == "e1000e"
        assert host.inventory.group_of(E1000E_ADDRESS).devices[0].address == E1000E_ADDRESS
    finally:
        monitor.close()
        if sysfs.driver(E1000E_ADDRESS) != "e1000e":
            sysfs.write(sysfs.path("bus/pci/rescan"), "1")


def test_sriov_vfs_appear_as_new_devices_and_groups(sysfs: Sysfs, binder: Binder) -> None:
    pf = PciAddress.parse(IGB_PF)
    numvfs = sysfs.device_path(pf) + "/sriov_numvfs"
    host = Host(sysfs, binder.state)
    before = host.inventory
    assert before.devices[pf].driver == "igb"
    assert before.devices[pf].virtfns == ()
    monitor = UEventMonitor()
    try:
        sysfs.write(numvfs, "2")
        vfs = ("0000:02:10.0", "0000:02:10.2")  # igb: VF offset 0x80, stride 2
        asyncio.run(_collect(monitor, host, {(Action.ADD, vf) for vf in vfs}))
        for vf in vfs:
            device = host.inventory.devices[PciAddress.parse(vf)]
            assert device.physfn == pf
            assert device.group is not None
            assert device.group not in before.groups, "each VF is a new IOMMU group"
            assert host.inventory.group_of(device.address).devices == (device,)
        assert [str(a) for a in scan(sysfs).devices[pf].virtfns] == list(vfs)

        sysfs.write(numvfs, "0")
        asyncio.run(_collect(monitor, host, {(Action.REMOVE, vf) for vf in vfs}))
        assert not any(PciAddress.parse(vf) in host.inventory.devices for vf in vfs)
        assert host.inventory.groups.keys() == before.groups.keys()
    finally:
        monitor.close()
        sysfs.write(numvfs, "0")


@pytest.mark.parametrize("fault", list(FaultPoint))
def test_crash_mid_bind_is_repaired_at_next_start(
    sysfs: Sysfs, tmp_path: Path, fault: FaultPoint
) -> None:
    state_path = str(tmp_path / "state.json")
    script = (
        "from vfiod.host.binding import Binder, FaultPoint\n"
        "from vfiod.host.sysfs import Sysfs\n"
        "from vfiod.pci import PciAddress\n"
        "from vfiod.state import StateFile\n"
        f"Binder(Sysfs(), StateFile({state_path!r}), fault=FaultPoint({str(fault)!r}))"
        f".bind(PciAddress.parse({E1000E!r}))\n"
    )
    crashed = subprocess.run([sys.executable, "-c", script], check=False)
    assert crashed.returncode == -9, "the binding process was killed at the fault point"

    state = StateFile(state_path)
    record = state.load().bindings[E1000E]
    assert record.phase is BindPhase.BINDING
    assert record.original_driver == "e1000e"
    assert sysfs.driver_override(E1000E_ADDRESS) == "vfio-pci"
    expected_now = None if fault is FaultPoint.AFTER_UNBIND else "e1000e"
    assert sysfs.driver(E1000E_ADDRESS) == expected_now

    results = Binder(sysfs, state).repair()
    assert [(r.address, r.restored_to, r.error) for r in results] == [(E1000E, "e1000e", None)]
    assert sysfs.driver(E1000E_ADDRESS) == "e1000e"
    assert sysfs.driver_override(E1000E_ADDRESS) is None
    assert not state.load().bindings


def test_host_critical_devices_are_found_and_refused(
    sysfs: Sysfs, binder: Binder, tmp_path: Path
) -> None:
    sata, nic = PciAddress.parse(ICH9_SATA), PciAddress.parse(BRIDGED_E1000[0])
    (interface,) = os.listdir(sysfs.device_path(nic) + "/net")
    mount_point = tmp_path / "data"
    mount_point.mkdir()
    subprocess.run(["mkfs.ext4", "-q", "-F", SATA_DISK], check=True)
    subprocess.run(["mount", SATA_DISK, str(mount_point)], check=True)
    subprocess.run(["ip", "link", "set", interface, "up"], check=True)
    subprocess.run(["ip", "route", "add", "default", "dev", interface], check=True)
    try:
        critical = find_critical(sysfs)
        assert critical[sata] == (f"backs {mount_point} (ext4 on {SATA_DISK})",)
        assert critical[nic] == (f"carries the default route ({interface})",)
        # The root file system of the VM is 9p over virtio-pci.
        assert any(r.startswith("backs / (9p") for rs in critical.values() for r in rs)

        for member in (ICH9_SMBUS, BRIDGE):
            group = scan(sysfs).group_of(PciAddress.parse(member))
            with pytest.raises(HostError) as refused:
                binder.bind_group(group)
            assert refused.value.errno == errno.EPERM
            assert "host-critical: " in str(refused.value)
            assert "unless a policy rule names it by address" in str(refused.value)
        with pytest.raises(HostError, match=f"host-critical: {sata} backs {mount_point}"):
            binder.bind(sata)
        # Nothing moved.
        assert sysfs.driver(PciAddress.parse(ICH9_SMBUS)) == "i801_smbus"
        assert sysfs.driver(PciAddress.parse(BRIDGED_E1000[1])) == "e1000"
        assert not binder.state.load().bindings
    finally:
        subprocess.run(["ip", "route", "del", "default", "dev", interface], check=False)
        subprocess.run(["ip", "link", "set", interface, "down"], check=False)
        subprocess.run(["umount", str(mount_point)], check=False)
    after = find_critical(sysfs)
    assert sata not in after
    assert nic not in after


def test_bad_input_changes_nothing(sysfs: Sysfs, binder: Binder) -> None:
    with pytest.raises(HostError) as unknown:
        binder.bind(PciAddress.parse("0000:00:1e.0"))
    assert unknown.value.errno == errno.ENODEV
    assert "no PCI device 0000:00:1e.0" in str(unknown.value)
    with pytest.raises(HostError) as not_ours:
        binder.restore(E1000E_ADDRESS)
    assert "vfiod has no record of binding" in str(not_ours.value)
    assert sysfs.driver(E1000E_ADDRESS) == "e1000e"
    assert not binder.state.load().bindings
    assert not os.path.exists(binder.state.path)


def test_udev_rule_keeps_vfio_nodes_root_only(
    sysfs: Sysfs, bind_vfio: Bound, tmp_path: Path
) -> None:
    """An earlier rule opening the nodes up (as some distros and how-tos do)
    loses to ours: group nodes stay 0600 root."""
    rules = Path("/etc/udev/rules.d")  # an overlay in the VM: the host is untouched
    loose = rules / "60-loose-vfio.rules"
    ours = rules / "70-vfiod.rules"
    loose.write_text('SUBSYSTEM=="vfio", MODE="0666"\n')
    shutil.copy(Path(__file__).parents[3] / "systemd/70-vfiod.rules", ours)
    try:
        subprocess.run(["udevadm", "control", "--reload"], check=True)
        bind_vfio(E1000E)
        group = sysfs.iommu_group(E1000E_ADDRESS)
        assert group is not None
        node = f"/dev/vfio/{group}"
        subprocess.run(["udevadm", "settle"], check=True)
        info = os.stat(node)
        assert (stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid) == (0o600, 0, 0)
        # Without our rule the loose one would have won.
        ours.unlink()
        subprocess.run(["udevadm", "control", "--reload"], check=True)
        subprocess.run(["udevadm", "trigger", "--settle", f"--name-match={node}"], check=True)
        assert stat.S_IMODE(os.stat(node).st_mode) == 0o666
    finally:
        loose.unlink(missing_ok=True)
        ours.unlink(missing_ok=True)
        subprocess.run(["udevadm", "control", "--reload"], check=True)
