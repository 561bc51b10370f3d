"""vfiod's iommufd backend on the test kernel: as nobody, the iommufd and the
unbound device cdev it returns bind, attach and map."""

from __future__ import annotations

from tests.bus import PrivateBus
from tests.bus.vfiod import Clients, VfiodProcess
from tests.vm.topology import E1000E

POLICY = f"""
[[rule]]
name = "nobody-e1000e"
effect = "allow"
address = "{E1000E}"
users = ["nobody"]
managed = true
backends = ["iommufd"]
"""

USE_IOMMUFD_FDS = """\
from vfiod.vfio import CdevDevice, DmaMapping, IommuFd, LinuxKernel
kernel = LinuxKernel()
out = {"legacy": failure(vfiod.acquire, [sys.argv[1]], managed=True, backend="legacy")}
lease = vfiod.acquire([sys.argv[1]], managed=True, backend="iommufd")
out["fds"] = sorted(lease.fds)
iommufd = IommuFd(kernel, lease.fds.pop("iommufd"), "/dev/iommu")
device = CdevDevice(kernel, lease.fds.pop("device:" + sys.argv[1]), "cdev", sys.argv[1])
out["devid"] = device.bind(iommufd)
ioas = iommufd.alloc_ioas()
device.attach(ioas)
out["ids"] = [device.vendor_id, device.device_id]
memfd = os.memfd_create("guest-ram")
os.ftruncate(memfd, 2 << 20)
with DmaMapping.map_memfd(kernel, ioas, memfd, 0, 2 << 20, iova=0) as mapping:
    out["iova"] = mapping.iova
os.close(memfd)
device.close()
iommufd.close()
vfiod.release(lease)
say(out)
"""


def test_iommufd_fds_bind_attach_and_map(vfiod: VfiodProcess, bus: PrivateBus) -> None:
    out = Clients(bus).run(USE_IOMMUFD_FDS, E1000E, timeout=120)
    assert out["legacy"][0] == "PermissionDenied"
    assert "iommufd" in out["legacy"][1]
    assert out["fds"] == ["device:0000:00:10.0", "iommufd"]
    assert out["devid"] >= 0
    assert out["ids"] == [0x8086, 0x10D3]
    assert out["iova"] == 0
    vfiod.wait_for(lambda: vfiod.driver(E1000E) == "e1000e", "e1000e coming back", 60)
    # (its record goes a moment after its devices are back)
    vfiod.wait_for(lambda: vfiod.state()["leases"] == {}, "the lease record going", 10)
