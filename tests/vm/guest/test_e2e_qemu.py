"""The whole story on the test kernel: an unprivileged user runs a stock QEMU
through `vfioctl run`, which gets the e1000e from vfiod (bound to vfio-pci on
the way) as an iommufd and a device cdev; QEMU's own QMP shows the device in
its guest; when QEMU quits, the lease ends and e1000e gets its driver back.

(QEMU cannot take legacy container/group fds at all: see tests/vm/vmm.py.)
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.bus import NOBODY, PrivateBus
from tests.bus.vfiod import VFIOCTL, Clients, Spawned, VfiodProcess
from tests.vm.topology import E1000E, E1000E_IDS
from tests.vm.vmm import QemuNotFoundError, find_qemu, parse_query_pci, probe_argv
from vfiod.qmp import Qmp

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


@pytest.fixture
def rundir() -> Iterator[Path]:
    """A directory QEMU (as nobody) can make its QMP socket in."""
    path = Path(tempfile.mkdtemp(prefix="vfiod-e2e-"))
    os.chown(path, NOBODY, NOBODY)
    yield path
    shutil.rmtree(path)


def _wait_for_socket(path: Path, vfioctl: Spawned, timeout: float) -> socket.socket:
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            if vfioctl.process.poll() is not None or time.monotonic() > deadline:
                vfioctl.kill()
                raise AssertionError(
                    f"QEMU's QMP socket {path} did not appear; vfioctl said:\n{vfioctl.stderr}"
                ) from None
            time.sleep(0.2)
        else:
            return sock


def test_vfioctl_run_gives_qemu_its_device(
    vfiod: VfiodProcess, bus: PrivateBus, rundir: Path
) -> None:
    try:
        qemu, _version = find_qemu()
    except QemuNotFoundError as e:
        pytest.fail(str(e))  # make deps installs it; the VM shares the host's files
    qmp_path = rundir / "qmp.sock"
    qemu_argv = probe_argv(
        [
            "-qmp",
            f"unix:{qmp_path},server=on,wait=off",
            "-object",
            "iommufd,id=i0,fd={iommufd}",
            "-device",
            f"vfio-pci,iommufd=i0,fd={{device:{E1000E}}},id=hostdev0",
        ],
        binary=qemu,
    )
    vfioctl = Clients(bus).spawn(
        VFIOCTL, "run", "--backend", "iommufd", "--managed", "--device", E1000E, "--", *qemu_argv
    )
    try:
        with _wait_for_socket(qmp_path, vfioctl, timeout=180) as sock:
            qmp = Qmp(sock)
            qmp.negotiate(timeout=60)
            devices = parse_query_pci(qmp.execute("query-pci"))
            passed = [d for d in devices if d.ids == E1000E_IDS]
            assert passed, f"QEMU's guest has no 8086:10d3: {[str(d) for d in devices]}"
            assert vfiod.driver(E1000E) == "vfio-pci"
            (lease,) = vfiod.state()["leases"].values()
            assert (lease["uid"], lease["label"], lease["backend"]) == (
                NOBODY,
                os.path.basename(qemu),
                "iommufd",
            )
            qmp.execute("quit")
        stderr = vfioctl.finish(timeout=120)
    except BaseException:
        vfioctl.kill()
        raise
    # vfiod's Progress signals, as vfioctl shows them: the real kernel's unbind.
    assert "vfioctl: moving 0000:00:10.0 from e1000e to vfio-pci" in stderr
    assert re.search(r"vfioctl: 0000:00:10.0 is on vfio-pci \(\d+\.\d s\)", stderr), stderr
    vfiod.wait_for(lambda: vfiod.driver(E1000E) == "e1000e", "e1000e coming back", 60)
    # (its record goes a moment after its devices are back)
    vfiod.wait_for(lambda: vfiod.state()["leases"] == {}, "the lease record going", 10)
