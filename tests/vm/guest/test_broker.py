"""vfiod on a real kernel and a real system bus (a private dbus-daemon with our
bus policy), serving clients that run as nobody: the legacy backend."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from tests.bus import PrivateBus
from tests.bus.vfiod import Clients, VfiodProcess
from tests.vm.topology import BRIDGE, BRIDGED_E1000, E1000E, ICH9_SATA, IGB_PF
from vfiod.client import Client, Inventory
from vfiod.pci import PciAddress

POLICY = f"""
[[rule]]
name = "nobody-e1000e"
effect = "allow"
address = "{E1000E}"
users = ["nobody"]
managed = true
max-locked-memory = "256M"

[[rule]]
name = "nobody-bridged"
effect = "allow"
address = ["{BRIDGED_E1000[0]}", "{BRIDGED_E1000[1]}"]
users = ["nobody"]
managed = true
companions = true
"""

# As nobody: the fds vfiod returned work — config space through the device
# fd, a DMA mapping through the container fd (at IOVA 0: a valid address).
USE_LEGACY_FDS = """\
from vfiod.vfio import LinuxKernel, abi
from vfiod.vfio.device import Device
kernel = LinuxKernel()
lease = vfiod.acquire([sys.argv[1]], managed=True, label="vm-test")
out = {"fds": sorted(lease.fds), "driver": vfiod.inventory().devices[sys.argv[1]].driver}
device = Device(kernel, lease.fds.pop("device:" + sys.argv[1]), "device", sys.argv[1])
out["ids"] = [device.vendor_id, device.device_id]
device.close()
memfd = os.memfd_create("guest-ram")
os.ftruncate(memfd, 2 << 20)
vaddr = kernel.mmap_shared(memfd, 2 << 20, 0)
flags = abi.DmaMapFlag.READ | abi.DmaMapFlag.WRITE
kernel.iommu_map_dma(lease.fds["container"], vaddr, 0, 2 << 20, flags)
out["unmapped"] = kernel.iommu_unmap_dma(lease.fds["container"], 0, 2 << 20)
kernel.munmap(vaddr, 2 << 20)
os.close(memfd)
lease.close()
vfiod.release(lease)
say(out)
"""


def test_nobody_gets_working_fds_and_the_driver_comes_back(
    vfiod: VfiodProcess, nobody: Clients
) -> None:
    out = nobody.run(USE_LEGACY_FDS, E1000E, timeout=120)
    assert out["fds"] == ["container", "device:0000:00:10.0", "group:10"]
    assert out["driver"] == "vfio-pci"
    assert out["ids"] == [0x8086, 0x10D3]
    assert out["unmapped"] == 2 << 20
    assert vfiod.driver(E1000E) == "e1000e"
    assert vfiod.state()["bindings"] == {}
    # (its record goes a moment after its devices are back)
    vfiod.wait_for(lambda: vfiod.state()["leases"] == {}, "the lease record going", 10)


def test_brokered_dma_through_vfiod(vfiod: VfiodProcess, nobody: Clients) -> None:
    code = """\
lease = vfiod.acquire([sys.argv[1]], managed=True)
memfd = os.memfd_create("guest-ram")
os.ftruncate(memfd, 4 << 20)
out = {"zero": vfiod.map_dma(lease, memfd, 0, 2 << 20, 0),
       "picked": vfiod.map_dma(lease, memfd, 2 << 20, 2 << 20, None)}
vfiod.unmap_dma(lease, 0, 2 << 20)
os.close(memfd)
lease.close()
vfiod.release(lease)
say(out)
"""
    out = nobody.run(code, E1000E, timeout=120)
    assert out == {"zero": 0, "picked": 2 << 20}
    assert vfiod.driver(E1000E) == "e1000e"


def test_killed_client_ends_its_lease(vfiod: VfiodProcess, nobody: Clients) -> None:
    client = nobody.spawn(
        """\
lease = vfiod.acquire([sys.argv[1]], managed=True)
say(sorted(lease.fds))
sys.stdin.readline()
""",
        E1000E,
    )
    try:
        assert client.read(timeout=120) == ["container", "device:0000:00:10.0", "group:10"]
        assert vfiod.driver(E1000E) == "vfio-pci"
    finally:
        client.kill()
    vfiod.wait_for(lambda: vfiod.driver(E1000E) == "e1000e", "e1000e coming back", 60)
    assert "its bus connection" in vfiod.log()


def test_the_bridge_group_is_granted_whole(vfiod: VfiodProcess, nobody: Clients) -> None:
    code = """\
lease = vfiod.acquire([sys.argv[1]], managed=True)
inventory = vfiod.inventory()
out = {"fds": sorted(lease.fds),
       "drivers": {a: inventory.devices[a].driver for a in sys.argv[1:]}}
lease.close()
vfiod.release(lease)
say(out)
"""
    out = nobody.run(code, BRIDGED_E1000[0], BRIDGED_E1000[1], BRIDGE, timeout=120)
    group = next(f for f in out["fds"] if f.startswith("group:"))
    assert out["fds"] == sorted(["container", group, *(f"device:{a}" for a in BRIDGED_E1000)])
    assert out["drivers"] == {
        BRIDGED_E1000[0]: "vfio-pci",
        BRIDGED_E1000[1]: "vfio-pci",
        BRIDGE: "",
    }
    assert [vfiod.driver(a) for a in BRIDGED_E1000] == ["e1000", "e1000"]


def test_owner_process_gets_its_memlock_and_ends_the_lease(
    vfiod: VfiodProcess, nobody: Clients
) -> None:
    code = """\
import resource, subprocess
child = subprocess.Popen(["sleep", "300"], start_new_session=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
pidfd = os.pidfd_open(child.pid)
lease = vfiod.acquire([sys.argv[1]], managed=True, owner_pidfd=pidfd)
os.close(pidfd)
lease.close()
say({"pid": child.pid, "memlock": resource.prlimit(child.pid, resource.RLIMIT_MEMLOCK)})
"""
    out = nobody.run(code, E1000E, timeout=120)
    try:
        assert out["memlock"] == [256 << 20, 256 << 20]
        assert vfiod.driver(E1000E) == "vfio-pci"
    finally:
        os.kill(out["pid"], signal.SIGKILL)
    vfiod.wait_for(lambda: vfiod.driver(E1000E) == "e1000e", "the lease ending with its owner", 60)


def test_refusals_name_the_reason(vfiod: VfiodProcess, nobody: Clients) -> None:
    code = """\
say({"sata": failure(vfiod.acquire, [sys.argv[2]], managed=True),
     "unmanaged": failure(vfiod.acquire, [sys.argv[1]])})
"""
    out = nobody.run(code, E1000E, ICH9_SATA, timeout=120)
    assert out["sata"][0] == "PermissionDenied"
    assert "no policy rule allows user nobody" in out["sata"][1].lower()
    assert out["unmanaged"][0] == "NotViable"
    assert "bound to e1000e" in out["unmanaged"][1]
    assert vfiod.driver(ICH9_SATA) == "ahci"
    assert vfiod.driver(E1000E) == "e1000e"


def _inventory(bus: PrivateBus) -> Inventory:
    with Client(bus.connect()) as root:
        return root.inventory()


def test_hotplug_reaches_the_bus_and_removal_revokes(
    vfiod: VfiodProcess, nobody: Clients, bus: PrivateBus
) -> None:
    # SR-IOV VFs appear as Device and Group objects, and go again.
    before = set(_inventory(bus).devices)
    numvfs = Path(vfiod.sysfs.device_path(PciAddress.parse(IGB_PF)), "sriov_numvfs")
    numvfs.write_text("2")
    try:
        vfiod.wait_for(lambda: len(set(_inventory(bus).devices) - before) == 2, "2 VFs", 60)
    finally:
        numvfs.write_text("0")
    vfiod.wait_for(lambda: set(_inventory(bus).devices) == before, "the VFs going", 60)

    # A leased device that leaves the host ends its lease: the client hears why.
    client = nobody.spawn(
        """\
import asyncio
from vfiod.client import AsyncClient

async def main():
    async with AsyncClient() as client:
        lease = await client.acquire([sys.argv[1]], managed=True)
        lease.close()  # vfio-pci's remove waits for device fds: close them
        events = client.events()
        say(lease.path)
        async for event in events:
            if event.kind == "revoked" and event.path == lease.path:
                say(event.changes["reason"])
                return

asyncio.run(main())
""",
        E1000E,
    )
    try:
        client.read(timeout=120)
        assert vfiod.driver(E1000E) == "vfio-pci"
        Path(vfiod.sysfs.device_path(PciAddress.parse(E1000E)), "remove").write_text("1")
        assert client.read(timeout=60) == "device 0000:00:10.0 was removed from the host"
        client.finish()
    except BaseException:
        client.kill()
        raise
    finally:
        Path("/sys/bus/pci/rescan").write_text("1")
    vfiod.wait_for(lambda: vfiod.driver(E1000E) == "e1000e", "e1000e back after a rescan", 60)
    # (its record goes a moment after its devices are back)
    vfiod.wait_for(lambda: vfiod.state()["leases"] == {}, "the lease record going", 10)
    assert vfiod.state()["bindings"] == {}
    assert _inventory(bus).devices[E1000E].driver == "e1000e"
