"""`vfioctl libvirt-hook` as libvirtd runs it (as root, the domain XML on
stdin), against vfiod on a fake host: prepare begin leases the domain's
unmanaged PCI hostdevs and vfiod binds them, release end gives them back;
a refusal fails the hook with vfiod's reason and leaves nothing. (With a
real libvirtd and `virsh start`: tests/vm/guest/test_libvirt_system.py.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.bus import PrivateBus, _child_env
from tests.bus.vfiod import VfiodProcess
from tests.fakehost import NIC, SATA
from vfiod.libvirt_hook import unmanaged_pci_hostdevs

POLICY = """
[[rule]]
name = "libvirt-nic"
effect = "allow"
address = "0000:00:10.0"
users = ["root"]
managed = true
backends = ["iommufd"]
"""

HOSTDEV = """\
    <hostdev mode='subsystem' type='pci' managed='{managed}'>
      <source>
        <address domain='0x0000' bus='0x{bus:02x}' slot='0x{slot:02x}' function='0x{function:x}'/>
      </source>
    </hostdev>
"""


def domain_xml(*hostdevs: tuple[str, str]) -> str:
    """A domain with PCI hostdevs (address, managed)."""
    devices = ""
    for address, managed in hostdevs:
        _domain, bus, rest = address.split(":")
        slot, function = rest.split(".")
        devices += HOSTDEV.format(
            managed=managed, bus=int(bus, 16), slot=int(slot, 16), function=int(function, 16)
        )
    return f"<domain type='qemu'><name>vm1</name><devices>\n{devices}  </devices></domain>\n"


def hook(
    bus: PrivateBus, run_dir: Path, *args: str, stdin: str = ""
) -> subprocess.CompletedProcess[str]:
    """The hook as libvirtd runs it: as root, arguments and XML on stdin."""
    return subprocess.run(
        [sys.executable, "-m", "vfiod.cli", "libvirt-hook", "--run-dir", str(run_dir), *args],
        input=stdin,
        env=_child_env(bus.address, {}),
        cwd="/",
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


def test_the_domain_xml_names_the_unmanaged_pci_hostdevs() -> None:
    xml = domain_xml(("0000:00:10.0", "no"), ("0000:02:01.0", "yes"))
    xml = xml.replace("</devices>", "<hostdev mode='subsystem' type='usb'/></devices>")
    assert unmanaged_pci_hostdevs(xml) == ["0000:00:10.0"]
    no_attribute = domain_xml(("0000:00:1f.2", "no")).replace(" managed='no'", "")
    assert unmanaged_pci_hostdevs(no_attribute) == ["0000:00:1f.2"]  # libvirt's default


def test_prepare_leases_and_release_gives_back(vfiod: VfiodProcess, tmp_path: Path) -> None:
    run_dir = tmp_path / "hook"
    xml = domain_xml((str(NIC), "no"))
    ran = hook(vfiod.bus, run_dir, "vm1", "prepare", "begin", "-", stdin=xml)
    holder = int((run_dir / "vm1.pid").read_text()) if ran.returncode == 0 else None
    try:
        assert ran.returncode == 0, ran.stderr
        assert "vfioctl: vm1: 0000:00:10.0 on vfio-pci for libvirt, lease " in ran.stderr
        assert vfiod.driver(str(NIC)) == "vfio-pci"
        ((lease_id, lease),) = vfiod.state()["leases"].items()
        assert (lease["uid"], lease["label"], lease["backend"]) == (0, "libvirt:vm1", "iommufd")
        assert lease_id in ran.stderr
        # libvirt retries, or calls again: still the one lease.
        again = hook(vfiod.bus, run_dir, "vm1", "prepare", "begin", "-", stdin=xml)
        assert again.returncode == 0, again.stderr
        assert list(vfiod.state()["leases"]) == [lease_id]
        # Every other step is libvirt's alone.
        for step in (("start", "begin"), ("started", "begin"), ("stopped", "end")):
            assert hook(vfiod.bus, run_dir, "vm1", *step, "-").returncode == 0
        assert list(vfiod.state()["leases"]) == [lease_id]

        gone = hook(vfiod.bus, run_dir, "vm1", "release", "end", "destroyed")
        assert gone.returncode == 0, gone.stderr
        assert "released libvirt:vm1's lease" in gone.stderr
        vfiod.wait_for(lambda: vfiod.driver(str(NIC)) == "e1000e", "e1000e coming back")
        vfiod.wait_for(lambda: not vfiod.state().get("leases"), "no lease")
        assert not os.path.exists(f"/proc/{holder}")
        assert list(run_dir.iterdir()) == []
        # A release with nothing held is no error.
        assert hook(vfiod.bus, run_dir, "vm1", "release", "end", "-").returncode == 0
    finally:
        if holder is not None and os.path.exists(f"/proc/{holder}"):
            os.kill(holder, signal.SIGKILL)


def test_a_refusal_fails_the_hook_and_leaves_nothing(vfiod: VfiodProcess, tmp_path: Path) -> None:
    run_dir = tmp_path / "hook"
    xml = domain_xml((str(SATA), "no"))
    ran = hook(vfiod.bus, run_dir, "vm1", "prepare", "begin", "-", stdin=xml)
    assert ran.returncode == 1
    assert ran.stderr.startswith("vfioctl: vm1: vfioctl: "), ran.stderr
    assert "0000:00:1f.2" in ran.stderr
    assert vfiod.driver(str(SATA)) == "ahci"
    assert not vfiod.state().get("leases")
    assert list(run_dir.iterdir()) == []
    managed_only = domain_xml((str(NIC), "yes"))  # libvirt binds those itself
    assert (
        hook(vfiod.bus, run_dir, "vm1", "prepare", "begin", "-", stdin=managed_only).returncode == 0
    )
    assert vfiod.driver(str(NIC)) == "e1000e"
    bad = hook(vfiod.bus, run_dir, "vm1", "prepare", "begin", "-", stdin="not xml")
    assert bad.returncode == 1
    assert "libvirt passed no domain XML on stdin" in bad.stderr
