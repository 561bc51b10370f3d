"""On a real kernel: everything a lease would reach passes the caller's policy,
and an SR-IOV PF with enabled VFs is never unbound.

The topology has a multifunction e1000 pair (no ACS between the functions:
one IOMMU group) and an igb behind a root port without ACS, whose VFs share
the PF's group, as behind a switch without ACS.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.bus import PrivateBus
from tests.bus.vfiod import Clients, VfiodProcess
from tests.vm.topology import MULTIFUNCTION, NOACS_PF, NOACS_VFS
from vfiod.pci import PciAddress

DAEMON_UID = 1  # Debian's "daemon" user

POLICY = f"""
[[rule]]
name = "never-the-first-function"
effect = "deny"
address = "{MULTIFUNCTION[0]}"
users = ["*"]

[[rule]]
name = "nobody-second-function"
effect = "allow"
address = "{MULTIFUNCTION[1]}"
users = ["nobody"]
managed = true
companions = true

[[rule]]
name = "igb-vfs"
effect = "allow"
vendor = "8086"
device = "10ca"
users = ["nobody", "daemon"]
managed = true
companions = true

[[rule]]
name = "not-the-pf-for-nobody"
effect = "deny"
address = "{NOACS_PF}"
users = ["nobody"]
"""

ASK = """\
import time
deadline = time.monotonic() + 60  # a new VF reaches vfiod by its uevent
while sys.argv[1] not in vfiod.inventory().devices and time.monotonic() < deadline:
    time.sleep(0.2)
check = vfiod.check_access([sys.argv[1]], managed=True)[0]
say({"check": [check.allowed, check.reason],
     "acquire": failure(vfiod.acquire, [sys.argv[1]], managed=True)})
"""


def group_of(address: str) -> str:
    return os.path.basename(os.readlink(f"/sys/bus/pci/devices/{address}/iommu_group"))


def driver(address: str) -> str | None:
    link = Path("/sys/bus/pci/devices", address, "driver")
    return link.resolve().name if link.exists() else None


def test_a_deny_rule_on_a_companion_refuses_the_lease(vfiod: VfiodProcess, nobody: Clients) -> None:
    first, second = MULTIFUNCTION
    assert group_of(first) == group_of(second), "the kernel put the functions in one group"
    assert driver(first) == driver(second) == "e1000"
    out = nobody.run(ASK, second, timeout=120)
    allowed, reason = out["check"]
    assert allowed is False
    assert f"also holds {first}" in reason
    assert "never-the-first-function" in reason
    assert out["acquire"] == ["PermissionDenied", reason]
    assert driver(first) == driver(second) == "e1000"
    assert vfiod.state().get("bindings", {}) == {}
    assert vfiod.state().get("leases", {}) == {}


@pytest.fixture
def vfs(vfiod: VfiodProcess) -> Iterator[tuple[str, ...]]:
    """Two VFs on the PF behind the port without ACS, known to vfiod."""
    numvfs = Path(vfiod.sysfs.device_path(PciAddress.parse(NOACS_PF)), "sriov_numvfs")
    numvfs.write_text("2")
    try:
        deadline = time.monotonic() + 60
        while not all(os.path.exists(f"/sys/bus/pci/devices/{vf}") for vf in NOACS_VFS):
            assert time.monotonic() < deadline, "the VFs did not appear"
            time.sleep(0.1)
        yield NOACS_VFS
    finally:
        numvfs.write_text("0")


def test_an_sriov_pf_with_enabled_vfs_is_never_unbound(
    vfiod: VfiodProcess, bus: PrivateBus, vfs: tuple[str, ...]
) -> None:
    assert {group_of(vf) for vf in vfs} == {group_of(NOACS_PF)}, "VFs share the PF's group"
    out = Clients(bus, DAEMON_UID).run(ASK, vfs[0], timeout=150)
    allowed, reason = out["check"]
    assert allowed is False
    assert f"{NOACS_PF} is an SR-IOV physical function with 2 enabled" in reason
    assert out["acquire"] == ["PermissionDenied", reason]
    assert driver(NOACS_PF) == "igb"
    assert Path(f"/sys/bus/pci/devices/{NOACS_PF}/sriov_numvfs").read_text().strip() == "2"
    assert all(os.path.exists(f"/sys/bus/pci/devices/{vf}") for vf in vfs)
    assert vfiod.state().get("bindings", {}) == {}


def test_check_access_on_a_vf_whose_pf_is_denied_says_no(
    vfiod: VfiodProcess, nobody: Clients, vfs: tuple[str, ...]
) -> None:
    out = nobody.run(ASK, vfs[1], timeout=150)
    allowed, reason = out["check"]
    assert allowed is False
    assert f"also holds {NOACS_PF}" in reason
    assert "not-the-pf-for-nobody" in reason
    assert out["acquire"] == ["PermissionDenied", reason]
    assert driver(NOACS_PF) == "igb"
