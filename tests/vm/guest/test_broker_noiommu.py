"""vfiod and unsafe no-IOMMU devices, on the test kernel without an IOMMU:
granted only with all three consents (daemon setting, a rule with
unsafe-noiommu = true, the caller's own option); each missing one is named."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.bus import PrivateBus
from tests.bus.vfiod import Clients, VfiodProcess
from tests.vm.topology import E1000E
from vfiod.client import Client
from vfiod.pci import PciAddress

NOIOMMU_PARAM = "/sys/module/vfio/parameters/enable_unsafe_noiommu_mode"

RULE = f"""
[[rule]]
name = "nobody-e1000e"
effect = "allow"
address = "{E1000E}"
users = ["nobody"]
managed = true
"""
UNSAFE_RULE = RULE + "unsafe-noiommu = true\n"
POLICY = RULE  # what vfiod starts with

ACQUIRE = """\
from vfiod.vfio import LinuxKernel
from vfiod.vfio.device import Device
out = {"without-consent": failure(vfiod.acquire, [sys.argv[1]], managed=True)}
try:
    lease = vfiod.acquire([sys.argv[1]], managed=True, unsafe_noiommu=True)
except VfiodError as e:
    out["refused"] = [e.kind, e.message]
else:
    out["fds"] = sorted(lease.fds)
    out["unsafe"] = vfiod.inventory().leases[lease.path].unsafe
    device = Device(LinuxKernel(), lease.fds.pop("device:" + sys.argv[1]), "d", sys.argv[1])
    out["ids"] = [device.vendor_id, device.device_id]
    device.close()
    lease.close()
    vfiod.release(lease)
say(out)
"""


@pytest.fixture(scope="module", autouse=True)
def noiommu_mode_off() -> Iterator[None]:
    """vfiod turns the kernel's unsafe mode on; the next tests expect it off."""
    yield
    Path(NOIOMMU_PARAM).write_text("N")


def _reload(vfiod: VfiodProcess, bus: PrivateBus, policy: str, settings: str) -> None:
    vfiod.policy_file.write_text(policy)
    (vfiod.policy_root / "etc/vfiod/vfiod.toml").write_text(settings)
    with Client(bus.connect()) as root:
        root.reload_policy()


def test_noiommu_needs_all_three_consents(vfiod: VfiodProcess, bus: PrivateBus) -> None:
    nobody = Clients(bus)
    # Neither the daemon setting nor the rule allows it.
    out = nobody.run(ACQUIRE, E1000E, timeout=120)
    assert out["refused"][0] == "Unsafe"
    assert "allow-unsafe-noiommu" in out["refused"][1]
    assert Path(NOIOMMU_PARAM).read_text().strip() == "N"

    # The daemon allows it; the rule does not.
    _reload(vfiod, bus, RULE, "allow-unsafe-noiommu = true\n")
    out = nobody.run(ACQUIRE, E1000E, timeout=120)
    assert out["refused"][0] == "Unsafe"
    assert "nobody-e1000e" in out["refused"][1]

    # Both do; the caller must still say so itself.
    _reload(vfiod, bus, UNSAFE_RULE, "allow-unsafe-noiommu = true\n")
    out = nobody.run(ACQUIRE, E1000E, timeout=120)
    assert out["without-consent"][0] == "Unsafe"
    assert "unsafe-noiommu" in out["without-consent"][1]
    group = next(f for f in out["fds"] if f.startswith("group:"))
    assert group.startswith("group:noiommu-")
    assert out["fds"] == sorted(["container", group, f"device:{E1000E}"])
    assert out["unsafe"] is True
    assert out["ids"] == [0x8086, 0x10D3]
    assert "UNSAFE no-IOMMU" in vfiod.log()
    vfiod.wait_for(lambda: vfiod.driver(E1000E) == "e1000e", "e1000e coming back", 60)
    assert vfiod.sysfs.iommu_group(PciAddress.parse(E1000E)) is None, "the no-IOMMU group went"
