"""`vfioctl attach` and `detach` into a real QEMU running as nobody, with
vfiod on a fake host: the fake kernel's fds are memfds, so QEMU refuses to
realize the device, which is the path these tests follow on purpose (the
lease and the binding undone, QEMU's words shown, nothing left in QEMU).
The way through, into a real guest, is the VM tests' (test_hotplug_qemu.py).
"""

from __future__ import annotations

import os
import signal

from tests.bus import NOBODY, PrivateBus, RunResult
from tests.bus.vfiod import VFIOCTL, Clients, VfiodProcess
from tests.fakehost import NIC
from tests.vm.libvirt_session import ROOT_PORT, URI, libvirt_session
from tests.vm.vmm import socket_qemu

POLICY = """
[[rule]]
name = "nobody-nic"
effect = "allow"
address = "0000:00:10.0"
users = ["nobody"]
managed = true
backends = ["iommufd"]
"""

# Native PCIe hotplug on a root port: QEMU needs no guest to plug or unplug.
ROOT_PORTS = [
    "-global",
    "ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off",
    "-device",
    "pcie-root-port,id=rp0,chassis=1",
    "-device",
    "pcie-root-port,id=rp1,chassis=2",
    "-device",
    "pci-testdev,id=testdev,bus=rp1",
]


def vfioctl(bus: PrivateBus, *args: str, env: dict[str, str] | None = None) -> RunResult:
    return bus.run_as(module="vfiod.cli", args=args, env=env, timeout=120)


def test_attach_that_qemu_refuses_is_undone(vfiod: VfiodProcess) -> None:
    with socket_qemu(ROOT_PORTS, uid=NOBODY) as qemu:
        before = [fd for fd in qemu.fds() if "vfio-fake" in fd]
        ran = vfioctl(
            vfiod.bus, "attach", "--qmp", qemu.socket, "--device", "00:10.0",
            "--managed", "--bus", "rp0",
        )  # fmt: skip
        assert ran.returncode == 1, ran
        # QEMU's own words: the fake cdev is no VFIO device.
        assert "vfioctl: QEMU refused device_add: vfio " in ran.stderr
        assert "Inappropriate ioctl for device" in ran.stderr
        assert "vfiod released lease " in ran.stderr
        assert "moving 0000:00:10.0 from e1000e to vfio-pci" in ran.stderr
        vfiod.wait_for(lambda: vfiod.driver(str(NIC)) == "e1000e", "e1000e coming back")
        vfiod.wait_for(lambda: vfiod.state()["leases"] == {}, "the lease record going")
        assert qemu.peripherals() == {"rp0", "rp1", "testdev"}
        objects = qemu.execute("qom-list", path="/objects")
        assert isinstance(objects, list)
        assert not [o for o in objects if o["name"].startswith("vfiod-")], objects
        # No device fd stays in QEMU. (The iommufd does: QEMU 10 never closes
        # one it was given, even when the object goes; it holds no device.)
        left = [fd for fd in qemu.fds() if "vfio-fake" in fd and fd not in before]
        assert left == ["/memfd:vfio-fake:/dev/iommu (deleted)"], left
        assert vfiod.fd_store == []


def test_attach_to_an_occupied_slot_says_so(vfiod: VfiodProcess) -> None:
    with socket_qemu(ROOT_PORTS, uid=NOBODY) as qemu:
        ran = vfioctl(
            vfiod.bus, "attach", "--qmp", qemu.socket, "--device", "0000:00:10.0",
            "--managed", "--bus", "rp1", "--id", "nic0",
        )  # fmt: skip
        assert ran.returncode == 1, ran
        assert "QEMU refused device_add: PCI: slot 0 function 0 already occupied" in ran.stderr
        vfiod.wait_for(lambda: vfiod.driver(str(NIC)) == "e1000e", "e1000e coming back")
        vfiod.wait_for(lambda: vfiod.state()["leases"] == {}, "the lease record going")
        assert "nic0" not in qemu.peripherals()


def test_attach_with_an_id_in_use_changes_nothing(vfiod: VfiodProcess) -> None:
    with socket_qemu(ROOT_PORTS, uid=NOBODY) as qemu:
        ran = vfioctl(
            vfiod.bus, "attach", "--qmp", qemu.socket, "--device", "00:10.0",
            "--managed", "--id", "testdev",
        )  # fmt: skip
        assert ran.returncode == 1, ran
        assert "has a device with id 'testdev' already: give another with --id" in ran.stderr
        assert "moving" not in ran.stderr  # checked before vfiod was asked
        assert vfiod.driver(str(NIC)) == "e1000e"
        assert vfiod.state().get("leases", {}) == {}


def test_attach_to_another_users_qemu_is_refused(vfiod: VfiodProcess) -> None:
    """nobody may reach root's QMP socket (made world-writable here), but
    vfiod does not lease a device to a process of another uid."""
    with socket_qemu(ROOT_PORTS, uid=None) as qemu:
        os.chmod(qemu.socket, 0o777)  # noqa: S103 - the point of the test
        ran = vfioctl(vfiod.bus, "attach", "--qmp", qemu.socket, "--device", "00:10.0", "--managed")
        assert ran.returncode == 1, ran
        assert "owner-pidfd names pid " in ran.stderr
        assert f"pid {qemu.process.pid} of uid 0, not one of yours (uid {NOBODY})" in ran.stderr
        assert vfiod.driver(str(NIC)) == "e1000e"
        assert vfiod.state().get("leases", {}) == {}


def test_attach_refusals_before_anything_moves(vfiod: VfiodProcess) -> None:
    legacy = vfioctl(
        vfiod.bus, "attach", "--qmp", "/nonexistent", "--device", "00:10.0", "--backend", "legacy"
    )
    assert legacy.returncode == 2
    assert "QEMU takes a device fd only with the iommufd backend" in legacy.stderr
    missing = vfioctl(vfiod.bus, "attach", "--qmp", "/nonexistent/qmp", "--device", "00:10.0")
    assert missing.returncode == 1
    assert "cannot connect to QMP at /nonexistent/qmp: No such file or directory" in missing.stderr
    bad_id = vfioctl(vfiod.bus, "attach", "--qmp", "/x", "--device", "00:10.0", "--id", "1x")
    assert bad_id.returncode == 1
    assert "'1x' is not a QEMU id" in bad_id.stderr
    assert vfiod.driver(str(NIC)) == "e1000e"


def test_detach_refuses_what_vfiod_did_not_attach(vfiod: VfiodProcess) -> None:
    with socket_qemu(ROOT_PORTS, uid=NOBODY) as qemu:
        unknown = vfioctl(vfiod.bus, "detach", "--qmp", qemu.socket, "--id", "nic9")
        assert unknown.returncode == 1
        assert f"QEMU (pid {qemu.process.pid}) has no device 'nic9'" in unknown.stderr
        port = vfioctl(vfiod.bus, "detach", "--qmp", qemu.socket, "--id", "rp0")
        assert port.returncode == 1
        assert "QEMU's device 'rp0' is not a vfio-pci device on an iommufd" in port.stderr
        assert qemu.peripherals() == {"rp0", "rp1", "testdev"}


# -- through libvirt: nobody's own session daemon and domain


def test_attach_through_libvirt_that_qemu_refuses_is_undone(vfiod: VfiodProcess) -> None:
    with libvirt_session(NOBODY) as session:
        pid = session.create("hotvm", paused=True)
        ran = vfioctl(
            vfiod.bus, "attach", "--libvirt", URI, "--domain", "hotvm", "--device", "00:10.0",
            "--managed", "--bus", ROOT_PORT, env=session.env,
        )  # fmt: skip
        assert ran.returncode == 1, ran
        assert f"vfioctl: QMP: QEMU 10.0.2, pid {pid}, uid {NOBODY}" in ran.stderr
        assert "QEMU refused device_add: vfio " in ran.stderr
        assert "Inappropriate ioctl for device" in ran.stderr
        assert "moving 0000:00:10.0 from e1000e to vfio-pci" in ran.stderr
        vfiod.wait_for(lambda: vfiod.driver(str(NIC)) == "e1000e", "e1000e coming back")
        vfiod.wait_for(lambda: vfiod.state()["leases"] == {}, "the lease record going")
        assert "vfio-0000_00_10_0" not in session.virsh(
            "qemu-monitor-command", "hotvm", '{"execute": "qom-list", "arguments": '
            '{"path": "/machine/peripheral"}}',
        )  # fmt: skip
        unknown = vfioctl(
            vfiod.bus, "detach", "--libvirt", URI, "--domain", "hotvm", "--id", "nic9",
            env=session.env,
        )  # fmt: skip
        assert unknown.returncode == 1
        assert f"QEMU (pid {pid}) has no device 'nic9'" in unknown.stderr
        missing = vfioctl(
            vfiod.bus, "attach", "--libvirt", URI, "--domain", "nope", "--device", "00:10.0",
            env=session.env,
        )  # fmt: skip
        assert missing.returncode == 1
        assert "libvirt at qemu:///session: " in missing.stderr
        assert "Domain not found" in missing.stderr
        usage = vfioctl(vfiod.bus, "attach", "--libvirt", URI, "--device", "00:10.0")
        assert usage.returncode == 2
        assert "--libvirt needs --domain NAME" in usage.stderr


def test_attach_stopped_by_sigterm_while_the_device_moves_leaves_nothing(
    vfiod: VfiodProcess, nobody: Clients
) -> None:
    vfiod.slow_unbind(5)
    with socket_qemu(ROOT_PORTS, uid=NOBODY) as qemu:
        attach = nobody.spawn(
            VFIOCTL, "attach", "--qmp", qemu.socket, "--device", "00:10.0", "--managed"
        )
        stderr = attach.process.stderr
        assert stderr is not None
        try:
            line = stderr.readline()
            while "moving 0000:00:10.0 from e1000e" not in line:
                assert line, "vfioctl attach ended before vfiod moved the device"
                line = stderr.readline()
            attach.process.send_signal(signal.SIGTERM)
            attach.process.wait(60)
        finally:
            attach.kill()  # reaped already; keeps its stderr
        assert attach.process.returncode == 128 + signal.SIGTERM, attach.stderr
        err = line + attach.stderr
        assert "SIGTERM: stopped; nothing stays leased or attached" in err
        vfiod.wait_for(lambda: vfiod.driver(str(NIC)) == "e1000e", "e1000e coming back", 30)
        vfiod.wait_for(lambda: not vfiod.state().get("leases"), "no lease", 10)
        assert qemu.peripherals() == {"rp0", "rp1", "testdev"}


# A QEMU that dies between taking the fds and adding the device: a Monitor
# whose connection breaks at object-add, in front of a real process (sleep)
# standing for QEMU; the lease is vfiod's, for real.
LOST_QEMU = """\
import subprocess
from vfiod import hotplug, qmp

class DyingQemu:
    def __init__(self, pid):
        self.vmm = hotplug.Vmm(pid=pid, uid=os.getuid(), version="10.0.2", name="dying")
        self.pidfd = os.pidfd_open(pid)
        self.sent = []

    def execute(self, command, arguments=None, *, fds=()):
        self.sent.append(command)
        if command == "qom-list":
            return []
        if command == "object-add":
            raise ConnectionError("QEMU closed the QMP connection")
        if command in ("closefd", "object-del"):
            raise ConnectionError("QEMU closed the QMP connection")
        return {}

    def wait_deleted(self, device_id, timeout):
        raise TimeoutError

qemu = subprocess.Popen(["sleep", "60"])
monitor = DyingQemu(qemu.pid)
try:
    hotplug.attach(vfiod, monitor, sys.argv[1], managed=True)
    outcome = "attached"
except hotplug.HotplugError as e:
    outcome = str(e)
os.close(monitor.pidfd)
qemu.kill()
qemu.wait()
say({"outcome": outcome, "sent": monitor.sent, "leases": list(vfiod.inventory().leases)})
"""


def test_qemu_lost_during_attach_releases_the_lease(vfiod: VfiodProcess, nobody: Clients) -> None:
    out = nobody.run(LOST_QEMU, str(NIC), timeout=60)
    assert out["outcome"].startswith(
        "QMP failed during the attach (QEMU closed the QMP connection); vfiod released lease "
    ), out
    assert out["sent"] == [
        "qom-list", "getfd", "getfd", "object-add", "closefd", "closefd", "object-del",
    ]  # fmt: skip
    assert out["leases"] == []
    vfiod.wait_for(lambda: vfiod.driver(str(NIC)) == "e1000e", "e1000e coming back")
    vfiod.wait_for(lambda: not vfiod.state().get("leases"), "no lease record")
    assert vfiod.fd_store == []
