"""QMP to a libvirt domain's QEMU, through libvirt: for `vfioctl attach
--libvirt URI --domain NAME`, in session mode (qemu:///session, the user's
own QEMUs) as in system mode.

The commands go by ``virDomainQemuMonitorCommandWithFiles`` (libvirt 8.2),
which passes fds with a command, as ``getfd`` needs. libvirt does not know
the device afterwards (it is not in the domain's XML, and libvirt marks the
domain tainted by custom monitor commands); the lease follows the QEMU
process, so it ends with the domain whatever libvirt knows.

The QEMU process is the one libvirt's pid file names
(``<run dir>/qemu/<name>.pid``: ``$XDG_RUNTIME_DIR/libvirt`` for a
session, ``/run/libvirt`` for the system), checked to be that domain's QEMU
(``-name guest=NAME``) before and after it is pinned with a pidfd.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from vfiod import qmp
from vfiod.hotplug import HotplugError, Vmm

POLL = 0.2  # seconds between looks for a device's end: libvirt passes no QMP events here


def run_dir(uri: str) -> Path:
    """Where libvirt's QEMU driver keeps its pid files for ``uri``."""
    if uri.split("?", 1)[0].rstrip("/").endswith("/session"):
        runtime = os.environ.get("XDG_RUNTIME_DIR")
        if runtime:
            return Path(runtime) / "libvirt/qemu/run"
        cache = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
        return Path(cache) / "libvirt/qemu/run"
    return Path("/run/libvirt/qemu")


def _is_domain_qemu(pid: int, name: str) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return False
    for flag, value in itertools.pairwise(argv):
        if flag == b"-name" and value.split(b",")[0] in (name.encode(), f"guest={name}".encode()):
            return True
    return False


def qemu_pidfd(pid_file: Path, name: str) -> tuple[int, int]:
    """The pid of domain ``name``'s QEMU from libvirt's pid file, and a pidfd of it."""
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError) as e:
        raise HotplugError(
            f"cannot read libvirt's pid file for domain {name!r} ({pid_file}: {e}); "
            "is the domain running, and is this the libvirt it runs under?"
        ) from None
    if not _is_domain_qemu(pid, name):
        raise HotplugError(f"pid {pid} from {pid_file} is not domain {name!r}'s QEMU")
    pidfd = os.pidfd_open(pid)
    if not _is_domain_qemu(pid, name):  # the pid was reused before it was pinned
        os.close(pidfd)
        raise HotplugError(f"domain {name!r}'s QEMU (pid {pid}) exited")
    return pid, pidfd


class LibvirtMonitor:
    def __init__(self, libvirt_qemu: Any, domain: Any, vmm: Vmm, pidfd: int) -> None:
        self._libvirt_qemu = libvirt_qemu
        self.domain = domain
        self.vmm = vmm
        self.pidfd = pidfd

    def execute(
        self, command: str, arguments: Mapping[str, Any] | None = None, *, fds: Sequence[int] = ()
    ) -> Any:
        import libvirt  # noqa: PLC0415 - an optional dependency, present once here

        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = dict(arguments)
        text = json.dumps(request)
        try:
            if fds:
                answer, _fds = self._libvirt_qemu.qemuMonitorCommandWithFiles(
                    self.domain, text, list(fds), 0
                )
            else:
                answer = self._libvirt_qemu.qemuMonitorCommand(self.domain, text, 0)
        except libvirt.libvirtError as e:
            raise ConnectionError(f"libvirt: {e}") from None
        try:
            reply = json.loads(answer)
        except ValueError:
            raise qmp.QmpProtocolError(
                f"libvirt passed on a non-JSON answer: {answer[:200]!r}"
            ) from None
        if not isinstance(reply, dict):
            raise qmp.QmpProtocolError(f"libvirt passed on a non-object: {answer[:200]!r}")
        return qmp.returned(command, reply)

    def wait_deleted(self, device_id: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            found = self.execute("qom-list", {"path": "/machine/peripheral"})
            if device_id not in {e.get("name") for e in found}:
                return
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{device_id} is still there after {timeout:g} s")
            time.sleep(POLL)


def _version(number: int) -> str:
    return f"{number // 1000000}.{number // 1000 % 1000}.{number % 1000}"


@contextlib.contextmanager
def domain_monitor(uri: str, name: str) -> Iterator[LibvirtMonitor]:
    """QMP to running domain ``name`` of libvirt at ``uri``, its QEMU pinned."""
    try:
        import libvirt  # noqa: PLC0415 - an optional dependency
        import libvirt_qemu  # noqa: PLC0415
    except ImportError:
        raise HotplugError(
            "the libvirt Python binding is missing: pip install libvirt-python (as many as "
            "the installed libvirt's version, e.g. libvirt-python==11.3.0) or apt-get install "
            "python3-libvirt"
        ) from None
    if not hasattr(libvirt_qemu, "qemuMonitorCommandWithFiles"):
        raise HotplugError("this libvirt binding cannot pass fds: it needs libvirt >= 8.2")
    try:
        connection = libvirt.open(uri)
    except libvirt.libvirtError as e:
        raise HotplugError(f"cannot connect to libvirt at {uri}: {e}") from None
    try:
        try:
            domain = connection.lookupByName(name)
            active = domain.isActive()
            version = _version(connection.getVersion())
        except libvirt.libvirtError as e:
            raise HotplugError(f"libvirt at {uri}: {e}") from None
        if not active:
            raise HotplugError(f"domain {name!r} is not running: start it first")
        pid, pidfd = qemu_pidfd(run_dir(uri) / f"{name}.pid", name)
        try:
            vmm = Vmm(pid=pid, uid=qmp.process_uid(pid), version=version, name=name)
            yield LibvirtMonitor(libvirt_qemu, domain, vmm, pidfd)
        finally:
            os.close(pidfd)
    finally:
        connection.close()
