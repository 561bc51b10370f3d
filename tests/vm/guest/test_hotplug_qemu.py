"""Hot attach and detach on the test kernel: a running, unprivileged QEMU
(nobody, paused, its QMP on a socket of its own) gets the e1000e from vfiod
with `vfioctl attach`, run as nobody: bound to vfio-pci on the way, passed as
an iommufd and a device cdev over QMP, realized by QEMU against the real
kernel. `vfioctl detach` unplugs it and e1000e gets its driver back. The
same through libvirt's session mode: nobody's own libvirtd and domain, with
`vfioctl attach --libvirt qemu:///session --domain NAME`.

Unplug needs the guest's consent. These QEMUs run their firmware only (it
numbers the bus behind the root port, so query-pci sees the device there)
and no OS, so the root port uses native PCIe hotplug with its slot never
powered on by a guest, where QEMU removes the device at once
(DEVICE_DELETED); q35's default ACPI hotplug waits for an OS that never
answers: the detach that times out and must leave everything in place.
"""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

from tests.bus import NOBODY, PrivateBus, RunResult
from tests.bus.vfiod import VfiodProcess
from tests.vm.libvirt_session import ROOT_PORT as LIBVIRT_ROOT_PORT
from tests.vm.libvirt_session import URI, LibvirtSession, libvirt_session
from tests.vm.topology import E1000E, E1000E_IDS
from tests.vm.vmm import SocketQemu, parse_query_pci, socket_qemu

POLICY = f"""
[[rule]]
name = "nobody-e1000e"
effect = "allow"
address = "{E1000E}"
users = ["nobody"]
managed = true
backends = ["iommufd"]
max-locked-memory = "512M"
"""

ROOT_PORT = ["-name", "hotvm", "-device", "pcie-root-port,id=rp0,chassis=1"]
NATIVE_HOTPLUG = ["-global", "ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off", *ROOT_PORT]
DEVICE_ID = "vfio-0000_00_10_0"


def vfioctl(bus: PrivateBus, *args: str, env: dict[str, str] | None = None) -> RunResult:
    """`vfioctl ARGS` as nobody; its steps are shown."""
    ran = bus.run_as(module="vfiod.cli", args=args, uid=NOBODY, env=env, timeout=300)
    print(ran.stderr, end="")
    return ran


def _attach(bus: PrivateBus, qemu: SocketQemu) -> dict[str, object]:
    ran = vfioctl(
        bus, "attach", "--qmp", qemu.socket, "--device", E1000E, "--managed", "--bus", "rp0",
        "--json",
    )  # fmt: skip
    assert ran.returncode == 0, f"{ran}\nQEMU said:\n{qemu.output()}"
    attached: dict[str, object] = json.loads(ran.stdout)
    return attached


def _lease(vfiod: VfiodProcess) -> tuple[str, dict[str, object]]:
    """The one lease vfiod holds: its id and its record."""
    ((lease_id, record),) = vfiod.state()["leases"].items()
    assert isinstance(record, dict)
    return lease_id, record


def _in_guest(qemu: SocketQemu) -> list[str]:
    return [f.qdev_id for f in qemu.query_pci() if f.ids == E1000E_IDS]


def _back_on_e1000e(vfiod: VfiodProcess) -> None:
    vfiod.wait_for(lambda: vfiod.driver(E1000E) == "e1000e", "e1000e coming back", 60)
    vfiod.wait_for(lambda: not vfiod.state().get("leases"), "the lease record going", 10)


def test_attach_and_detach_into_a_running_qemu(vfiod: VfiodProcess, bus: PrivateBus) -> None:
    with socket_qemu(NATIVE_HOTPLUG, uid=NOBODY, paused=False, progress=print) as qemu:
        qemu.wait_for_bus_numbers("rp0")
        assert _in_guest(qemu) == []
        attached = _attach(bus, qemu)
        assert attached["id"] == DEVICE_ID
        assert attached["guest_address"] == "01:00.0"
        assert attached["qemu_pid"] == qemu.process.pid
        assert vfiod.driver(E1000E) == "vfio-pci"
        assert _in_guest(qemu) == [DEVICE_ID]
        # vfioctl is gone; the lease follows QEMU, and says so.
        lease_id, lease = _lease(vfiod)
        assert attached["lease"] == f"/org/vfiod1/lease/{lease_id}"
        assert attached["object"] == f"vfiod-{lease_id}"
        assert (lease["uid"], lease["label"], lease["backend"]) == (NOBODY, "hotvm", "iommufd")
        assert lease["owner_pid"] == qemu.process.pid
        assert attached["object"] in [o["name"] for o in qemu.execute("qom-list", path="/objects")]

        ran = vfioctl(bus, "detach", "--qmp", qemu.socket, "--id", DEVICE_ID)
        assert ran.returncode == 0, ran
        assert ran.stdout == (
            f"{DEVICE_ID} is out of QEMU pid {qemu.process.pid}; lease {lease_id} released\n"
        )
        assert "QMP DEVICE_DELETED vfio-0000_00_10_0" in ran.stderr
        _back_on_e1000e(vfiod)
        assert _in_guest(qemu) == []
        assert DEVICE_ID not in qemu.peripherals()
        assert not [fd for fd in qemu.fds() if fd.startswith("/dev/vfio/devices/")]

        # Attach again, then QEMU dies with the device in it: the lease ends.
        _attach(bus, qemu)
        assert _in_guest(qemu) == [DEVICE_ID]
        os.kill(qemu.process.pid, signal.SIGKILL)
        qemu.process.wait()
        _back_on_e1000e(vfiod)
    assert f"its owner process {qemu.process.pid} exited" in vfiod.log()


def test_a_detach_the_guest_never_acknowledges_leaves_everything(
    vfiod: VfiodProcess, bus: PrivateBus
) -> None:
    with socket_qemu(ROOT_PORT, uid=NOBODY, paused=False, progress=print) as qemu:  # ACPI
        qemu.wait_for_bus_numbers("rp0")
        _attach(bus, qemu)
        lease_id, lease = _lease(vfiod)
        ran = vfioctl(bus, "detach", "--qmp", qemu.socket, "--id", DEVICE_ID, "--timeout", "3")
        assert ran.returncode == 1, ran
        assert "did not let go of vfio-0000_00_10_0 within 3 s (no DEVICE_DELETED)" in ran.stderr
        assert f"the device stays in the VM and lease {lease_id} stays" in ran.stderr
        assert _in_guest(qemu) == [DEVICE_ID]
        assert vfiod.driver(E1000E) == "vfio-pci"
        assert _lease(vfiod) == (lease_id, lease)
        # Asked again (ACPI sends the request again): still no OS to answer.
        again = vfioctl(bus, "detach", "--qmp", qemu.socket, "--id", DEVICE_ID, "--timeout", "1")
        assert again.returncode == 1, again
        assert "did not let go of vfio-0000_00_10_0 within 1 s" in again.stderr
        assert _lease(vfiod) == (lease_id, lease)
        qemu.process.kill()
        qemu.process.wait()
        _back_on_e1000e(vfiod)


# -- libvirt's session mode: nobody's own libvirtd and domain


def _monitor(session: LibvirtSession, command: str, **arguments: Any) -> Any:
    """A QMP command through `virsh qemu-monitor-command`, as the user would."""
    request = json.dumps({"execute": command, "arguments": arguments})
    return json.loads(session.virsh("qemu-monitor-command", "hotvm", request))["return"]


def _in_domain(session: LibvirtSession) -> list[str]:
    pci = parse_query_pci(_monitor(session, "query-pci"))
    return [f.qdev_id for f in pci if f.ids == E1000E_IDS]


def _attach_libvirt(bus: PrivateBus, session: LibvirtSession) -> dict[str, object]:
    ran = vfioctl(
        bus, "attach", "--libvirt", URI, "--domain", "hotvm", "--device", E1000E, "--managed",
        "--bus", LIBVIRT_ROOT_PORT, "--json", env=session.env,
    )  # fmt: skip
    assert ran.returncode == 0, f"{ran}\nQEMU said:\n{session.log('hotvm')}"
    attached: dict[str, object] = json.loads(ran.stdout)
    return attached


def test_libvirt_session_domain_gets_a_device_and_gives_it_back(
    vfiod: VfiodProcess, bus: PrivateBus
) -> None:
    with libvirt_session(NOBODY) as session:
        pid = session.create("hotvm", paused=True)
        attached = _attach_libvirt(bus, session)
        assert (attached["id"], attached["qemu_pid"]) == (DEVICE_ID, pid)
        assert vfiod.driver(E1000E) == "vfio-pci"
        _lease_id, lease = _lease(vfiod)
        assert (lease["uid"], lease["label"], lease["owner_pid"]) == (NOBODY, "hotvm", pid)
        peripherals = _monitor(session, "qom-list", path="/machine/peripheral")
        assert DEVICE_ID in [p["name"] for p in peripherals]
        # Running, its firmware numbers the root port's bus: query-pci sees behind it.
        session.virsh("resume", "hotvm")
        deadline = time.monotonic() + 60
        while _in_domain(session) != [DEVICE_ID]:
            assert time.monotonic() < deadline, _monitor(session, "query-pci")
            time.sleep(0.5)

        ran = vfioctl(
            bus, "detach", "--libvirt", URI, "--domain", "hotvm", "--id", DEVICE_ID,
            env=session.env,
        )  # fmt: skip
        assert ran.returncode == 0, ran
        _back_on_e1000e(vfiod)
        assert _in_domain(session) == []

        # virsh destroy with the device in: the lease ends with that QEMU.
        _attach_libvirt(bus, session)
        session.virsh("destroy", "hotvm")
        _back_on_e1000e(vfiod)
    assert f"its owner process {pid} exited" in vfiod.log()
