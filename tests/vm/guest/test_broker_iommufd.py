"""vfiod's iommufd backend on the test kernel: as nobody, the iommufd and the
unbound device cdev it returns bind, attach and map, and what the client
pins counts against its own locked-memory limit."""

from __future__ import annotations

import errno

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
max-locked-memory = "16M"
"""

# After CLIENT and a `lease` of argv[1]: what a VMM does with its iommufd and
# cdev (bind, allocate an IOAS, attach), and the end of it all.
BIND_AND_ATTACH = """\
iommufd = IommuFd(kernel, lease.fds.pop("iommufd"), "/dev/iommu")
device = CdevDevice(kernel, lease.fds.pop("device:" + sys.argv[1]), "cdev", sys.argv[1])
devid = device.bind(iommufd)
ioas = iommufd.alloc_ioas()
device.attach(ioas)
"""
CLOSE_AND_RELEASE = """\
os.close(memfd)
device.close()
iommufd.close()
vfiod.release(lease)
say(out)
"""

USE_IOMMUFD_FDS = (
    """\
from vfiod.vfio import CdevDevice, DmaMapping, IommuFd, LinuxKernel
kernel = LinuxKernel()
out = {"legacy": failure(vfiod.acquire, [sys.argv[1]], managed=True, backend="legacy")}
lease = vfiod.acquire([sys.argv[1]], managed=True, backend="iommufd")
out["fds"] = sorted(lease.fds)
"""
    + BIND_AND_ATTACH
    + """\
out["devid"] = devid
out["ids"] = [device.vendor_id, device.device_id]
memfd = os.memfd_create("guest-ram")
os.ftruncate(memfd, 2 << 20)
with DmaMapping.map_memfd(kernel, ioas, memfd, 0, 2 << 20, iova=0) as mapping:
    out["iova"] = mapping.iova
"""
    + CLOSE_AND_RELEASE
)


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


# As a VMM that gives its own pidfd: vfiod raises its RLIMIT_MEMLOCK to the
# rule's 16 MiB and sets the iommufd to count pins per process, so the
# client pins 16 MiB (its VmLck says so) and no more.
PIN_TO_THE_LIMIT = (
    """\
import resource
from vfiod.vfio import CdevDevice, DmaMapping, IommuFd, LinuxKernel, VfioError
kernel = LinuxKernel()
out = {"before": resource.getrlimit(resource.RLIMIT_MEMLOCK)}
pidfd = os.pidfd_open(os.getpid())
lease = vfiod.acquire([sys.argv[1]], managed=True, backend="iommufd", owner_pidfd=pidfd)
os.close(pidfd)
out["memlock"] = resource.getrlimit(resource.RLIMIT_MEMLOCK)
"""
    + BIND_AND_ATTACH
    + """\
out["mode"] = iommufd.rlimit_mode
memfd = os.memfd_create("guest-ram")
os.ftruncate(memfd, 32 << 20)

def locked_kib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmLck:"))

with DmaMapping.map_memfd(kernel, ioas, memfd, 0, 16 << 20, iova=0):
    out["locked"] = locked_kib()
    try:
        DmaMapping.map_memfd(kernel, ioas, memfd, 16 << 20, 1 << 20, iova=16 << 20).close()
        out["beyond"] = "mapped"
    except VfioError as e:
        out["beyond"] = [e.errno, str(e)]
out["after"] = locked_kib()
"""
    + CLOSE_AND_RELEASE
)


def test_pins_count_against_the_clients_own_limit(vfiod: VfiodProcess, bus: PrivateBus) -> None:
    out = Clients(bus).run(PIN_TO_THE_LIMIT, E1000E, timeout=120)
    assert out["memlock"] == [16 << 20, 16 << 20], out["before"]
    assert out["mode"] == 1, "IOMMU_OPTION_RLIMIT_MODE: per process"
    assert out["locked"] == 16 << 10, "16 MiB pinned, in the client's own VmLck"
    assert out["beyond"][0] == errno.ENOMEM, out["beyond"]
    assert out["after"] == 0
    vfiod.wait_for(lambda: vfiod.driver(E1000E) == "e1000e", "e1000e coming back", 60)
    vfiod.wait_for(lambda: vfiod.state()["leases"] == {}, "the lease record going", 10)
