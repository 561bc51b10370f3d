"""libvirt's own `<hostdev managed='no'>`, with vfiod doing the binding: a
real system libvirtd (in a mount namespace of its own, QEMU as root) runs
the shipped qemu hook (hooks/libvirt-qemu, `vfioctl libvirt-hook`); `virsh
start` of a defined domain gets the e1000e bound to vfio-pci by vfiod within its policy and
QEMU opens it the legacy way; `virsh destroy` gives it back to e1000e; a
device the policy refuses stops the domain with vfiod's reason."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.bus import PROJECT, PrivateBus, _child_env
from tests.bus.vfiod import VfiodProcess
from tests.vm.libvirt_session import LibvirtSystem, libvirt_system
from tests.vm.topology import E1000E, E1000E_IDS, ICH9_SATA
from tests.vm.vmm import parse_query_pci
from vfiod.pci import PciAddress

POLICY = f"""
[[rule]]
name = "libvirt-e1000e"
effect = "allow"
address = "{E1000E}"
users = ["root"]
managed = true
backends = ["iommufd"]
"""

DOMAIN = """\
<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type></os>
  <devices>
    <emulator>{emulator}</emulator>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
    <hostdev mode='subsystem' type='pci' managed='no'>
      <source>
        <address domain='0x{a.domain:04x}' bus='0x{a.bus:02x}' slot='0x{a.slot:02x}'
                 function='0x{a.function:x}'/>
      </source>
    </hostdev>
  </devices>
</domain>
"""
HOLDERS = Path("/run/vfioctl-libvirt")  # the hook's default


@pytest.fixture
def hook(bus: PrivateBus) -> Iterator[str]:
    """/etc/libvirt/hooks/qemu for the test's libvirtd: the shipped hook, with
    `vfioctl` from this checkout on the test's bus."""
    shim = Path(tempfile.mkdtemp(prefix="vfiod-hook-"))
    (shim / "vfioctl").write_text(
        f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m vfiod.cli "$@"\n'
    )
    (shim / "vfioctl").chmod(0o755)
    env = _child_env(bus.address, {"PATH": f"{shim}:/usr/sbin:/usr/bin:/sbin:/bin"})
    exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items())
    yield f'#!/bin/sh\n{exports}exec {shlex.quote(str(PROJECT / "hooks/libvirt-qemu"))} "$@"\n'
    for pid_file in HOLDERS.glob("*.pid") if HOLDERS.exists() else []:
        with contextlib.suppress(ProcessLookupError, ValueError):  # a failed test's holder
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
    shutil.rmtree(HOLDERS, ignore_errors=True)
    shutil.rmtree(shim)


def _start(system: LibvirtSystem, name: str, address: str) -> tuple[int, str]:
    """`virsh define` and `virsh start` a domain with ``address`` as hostdev."""
    xml = system.home / f"{name}.xml"
    emulator = shutil.which("qemu-system-x86_64") or "/usr/bin/qemu-system-x86_64"
    xml.write_text(DOMAIN.format(name=name, emulator=emulator, a=PciAddress.parse(address)))
    system.virsh("define", str(xml))
    system.domains.append(name)
    ran = system.virsh("start", name, check=False)
    return ran.returncode, ran.stderr


def test_virsh_start_and_destroy_with_vfiod_binding(vfiod: VfiodProcess, hook: str) -> None:
    assert vfiod.driver(E1000E) == "e1000e"
    with libvirt_system(hook) as system:
        status, said = _start(system, "sysvm", E1000E)
        assert status == 0, f"{said}\nQEMU said:\n{system.log('sysvm')}"
        assert vfiod.driver(E1000E) == "vfio-pci"
        ((_lease_id, lease),) = vfiod.state()["leases"].items()
        assert (lease["uid"], lease["label"]) == (0, "libvirt:sysvm")
        answer = system.virsh("qemu-monitor-command", "sysvm", '{"execute": "query-pci"}')
        pci = parse_query_pci(json.loads(answer.stdout)["return"])
        assert E1000E_IDS in [f.ids for f in pci], [str(f) for f in pci]

        system.virsh("destroy", "sysvm")
        vfiod.wait_for(lambda: vfiod.driver(E1000E) == "e1000e", "e1000e coming back", 60)
        vfiod.wait_for(lambda: not vfiod.state().get("leases"), "the lease going", 10)
        # Started again, the domain gets it again.
        again = system.virsh("start", "sysvm", check=False)
        assert again.returncode == 0, again.stderr
        assert vfiod.driver(E1000E) == "vfio-pci"
        system.virsh("destroy", "sysvm")
        vfiod.wait_for(lambda: vfiod.driver(E1000E) == "e1000e", "e1000e back again", 60)

        status, said = _start(system, "satavm", ICH9_SATA)
        assert status != 0
        assert "Hook script execution failed" in said, said
        assert "vfioctl: satavm: vfioctl: " in said, said
        assert ICH9_SATA in said, said
        assert vfiod.driver(ICH9_SATA) == "ahci"
        assert not vfiod.state().get("leases")
