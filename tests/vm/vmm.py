"""Run a stock QEMU as a VMM that was handed VFIO fds, and ask it over QMP what it built.

The helpers here start QEMU the way vfiod's clients will: with file descriptors
inherited (named like the broker's ``Acquire`` returns them: ``iommufd``,
``device:0000:00:10.0``, ``container``, ``group:9``, substituted into the
command line as ``fd={iommufd}``), optionally as another user (``setpriv
--reuid --regid --clear-groups``) and with a given ``RLIMIT_MEMLOCK``. QMP runs
over one end of a socketpair passed to QEMU as ``-chardev socket,fd=N``: no
socket path, no directory the user must be able to write, no polling for the
socket to appear, and end-of-file the moment QEMU dies. The process is always
killed and reaped, and every fd the helpers open is closed again.

Locked memory. A VFIO DMA mapping pins the mapped pages and counts them
against ``RLIMIT_MEMLOCK`` of the process that maps them. With iommufd's
default accounting mode the pages are charged to that process's *user*
(``incr_user_locked_vm()`` in Linux's ``drivers/iommu/iommufd/pages.c`` adds
to ``user->locked_vm`` and compares with the mapping task's limit), so every
VMM of one uid shares one budget; ``IOMMU_OPTION_RLIMIT_MODE`` = 1 on the
iommufd (needs ``CAP_SYS_RESOURCE``) makes it per process. Pages stay pinned,
and charged, until their mapping is removed or the iommufd's last holder
closes it: a broker that keeps its own copy of a handed-out iommufd keeps an
exited VMM's mappings alive (and, likewise, its device cdev bound).
QEMU maps all of its guest RAM while it realizes a ``vfio-pci`` device, during
start-up, before QMP answers and whether or not ``-S`` is given, so the limit
must be in place before QEMU runs; with Linux's default of 8 MiB it fails with
``vfio_container_dma_map(...) = -12 (Cannot allocate memory)``. An
unprivileged process cannot raise its own hard limit, and ``setpriv`` keeps
limits as they are, so there are two correct ways: set the limit while the
child is still root (a pre-exec step), or have a process with
``CAP_SYS_RESOURCE`` raise it from outside with ``prlimit`` before the VMM
maps anything. ``QemuVmm`` does the second, because it is what vfiod does for
a lease owner: the child drops privileges, then waits at a gate (a shell
reading one line from a pipe); the parent calls ``prlimit`` on the already
unprivileged process, opens the gate, and the shell execs QEMU, which keeps the
limit across ``exec``. A ``prlimit`` on the pid without such a gate races with
QEMU's start-up. ``memlock=None`` leaves the limit as inherited: that is the
case of ``vfioctl run``, which runs as the user and whose own limit vfiod has
raised (the owner-pidfd of the lease is vfioctl's, and QEMU inherits the limit).

Legacy fds (container and group) cannot be given to a stock QEMU. Read in QEMU
10.0: ``vfio-pci``'s ``fd`` property (``vfio_pci_set_fd()`` in
``hw/vfio/pci.c``, only with CONFIG_IOMMUFD) takes a device fd, and
``vfio_device_get_name()`` in ``hw/vfio/helpers.c`` refuses it unless the
device also has ``iommufd=``: "Use FD passing only with iommufd backend". The
legacy backend has no fd input at all: ``vfio_legacy_attach_device()`` in
``hw/vfio/container.c`` finds the group number from sysfs
(``vfio_device_groupid()``, the ``<device>/iommu_group`` link), and
``vfio_get_group()`` opens ``"/dev/vfio/%d"`` by path with ``qemu_open_old()``,
as ``vfio_connect_container()`` does ``/dev/vfio/vfio``. ``qemu_open_old()``
substitutes passed fds only for paths under ``/dev/fdset/`` (``-add-fd``,
``qemu_open_internal()`` in ``util/osdep.c``), so a fixed ``/dev/vfio/N``
path can never be an fd from a broker. A legacy group is therefore only usable
by a QEMU that may open the node itself (root, or a node made accessible to
its user, as libvirt does in a private /dev) — and since a group opens once, not
while a broker holds it open. (QEMU 10.1 moved the same code to
``hw/vfio/device.c`` and ``hw/vfio/container-legacy.c``.) The VM tests show
all three refusals.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import resource
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import IO, Any, Self

from vfiod.cli import substitute
from vfiod.qmp import Qmp, QmpProtocolError
from vfiod.qmp import connect as qmp_connect

QEMU = "qemu-system-x86_64"
MiB = 1 << 20
KERNEL_DEFAULT_MEMLOCK = 8 * MiB  # RLIMIT_MEMLOCK of init since Linux 5.16
QMP_CHARDEV = "vfiod-qmp"
# Blocks until the parent writes a line (then execs the command with stdin from
# /dev/null), or exits when the parent closes the pipe without writing.
_GATE = 'read -r _ && exec "$@" </dev/null'

Progress = Callable[[str], None]


def _quiet(line: str) -> None:
    pass


def mib(size: int | None) -> str:
    if size is None:
        return "unlimited"
    return f"{size / MiB:g} MiB" if size % MiB == 0 else f"{size} bytes"


def memlock_needed(memory_mib: int) -> int:
    """RLIMIT_MEMLOCK that lets a QEMU with ``memory_mib`` of guest RAM map all of
    it for DMA: the RAM, plus headroom for firmware and option ROMs."""
    return (memory_mib + 64) * MiB


class QemuError(Exception):
    """QEMU failed; ``output`` is what it wrote to stdout and stderr, ``hint`` what
    the failure most likely means."""

    def __init__(
        self,
        message: str,
        *,
        output: str = "",
        returncode: int | None = None,
        hint: str = "",
    ) -> None:
        self.message = message
        self.output = output
        self.returncode = returncode
        self.hint = hint
        text = message + (f": {hint}" if hint else "")
        if output.strip():
            text += "\nQEMU said:\n" + output.strip()
        super().__init__(text)


class QemuNotFoundError(Exception):
    """No usable QEMU; the message says how to get one."""


def find_qemu(binary: str = QEMU, minimum: tuple[int, int] = (9, 0)) -> tuple[str, str]:
    """The path and version of ``binary``, which must be at least ``minimum``
    (iommufd fd passing came with QEMU 9.0)."""
    how = (
        f"apt-get install qemu-system-x86 (QEMU >= {minimum[0]}.{minimum[1]}, "
        "e.g. from bookworm-backports)"
    )
    path = shutil.which(binary)
    if path is None:
        raise QemuNotFoundError(f"{binary} is not installed: {how}")
    out = subprocess.run(
        [path, "--version"], capture_output=True, text=True, check=False, timeout=60
    ).stdout
    found = re.search(r"version (\d+)\.(\d+)\.(\d+)", out)
    if found is None:
        raise QemuNotFoundError(f"{path} --version said {out.strip()!r}: {how}")
    major, minor = int(found.group(1)), int(found.group(2))
    if (major, minor) < minimum:
        raise QemuNotFoundError(f"{path} is QEMU {major}.{minor}: {how}")
    return path, ".".join(found.groups())


def probe_argv(extra: Sequence[str], *, memory_mib: int = 64, binary: str = QEMU) -> list[str]:
    """A QEMU that builds a q35 machine and its devices but never runs guest code
    (``-S``): enough to see over QMP what it realized."""
    return [
        binary,
        "-S",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-machine",
        "q35",
        "-accel",
        "tcg",
        "-m",
        f"{memory_mib}M",
        *extra,
    ]


def privilege_drop(uid: int | None, gid: int | None = None) -> list[str]:
    """The command prefix that runs the rest as ``uid``/``gid`` with no
    supplementary groups (nothing when ``uid`` is None)."""
    if uid is None:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        raise QemuNotFoundError("setpriv is missing: apt-get install util-linux")
    group = uid if gid is None else gid
    return [setpriv, f"--reuid={uid}", f"--regid={group}", "--clear-groups", "--"]


@dataclasses.dataclass(frozen=True)
class ProcessInfo:
    """Who a process runs as and its RLIMIT_MEMLOCK (None: unlimited), from /proc."""

    pid: int
    uid: int
    gid: int
    groups: tuple[int, ...]
    memlock_soft: int | None
    memlock_hard: int | None

    @classmethod
    def read(cls, pid: int) -> ProcessInfo:
        status: dict[str, list[str]] = {}
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                status[key] = value.split()
        soft = hard = None
        with open(f"/proc/{pid}/limits") as f:
            for line in f:
                if line.startswith("Max locked memory"):
                    fields = line.split()
                    soft, hard = (None if v == "unlimited" else int(v) for v in fields[3:5])
        return cls(
            pid=pid,
            uid=int(status["Uid"][1]),  # effective
            gid=int(status["Gid"][1]),
            groups=tuple(int(g) for g in status.get("Groups", [])),
            memlock_soft=soft,
            memlock_hard=hard,
        )

    def __str__(self) -> str:
        return (
            f"pid {self.pid} uid {self.uid} gid {self.gid} groups "
            f"{list(self.groups)} RLIMIT_MEMLOCK {mib(self.memlock_soft)}"
        )


def diagnose(output: str, memlock: int | None) -> str:
    """What a QEMU failure (its ``output``) most likely means, in words; ``memlock``
    is the RLIMIT_MEMLOCK it ran with."""
    if "Cannot allocate memory" in output and re.search("dma_map|DMA_MAP", output):
        return (
            f"QEMU could not pin its guest RAM for device DMA: its RLIMIT_MEMLOCK "
            f"({mib(memlock)}) is smaller than the memory it maps. Pinned pages count "
            "against RLIMIT_MEMLOCK of the process that maps them; raise the VMM's limit "
            "before it starts (vfiod raises the lease owner's to the policy's "
            "max-locked-memory with prlimit, which needs CAP_SYS_RESOURCE)"
        )
    if "Use FD passing only with iommufd backend" in output:
        return (
            "stock QEMU takes a VFIO device fd only together with an iommufd "
            "(-object iommufd,id=i0,fd=N -device vfio-pci,iommufd=i0,fd=M); "
            "it opens legacy groups and the container by path itself"
        )
    if re.search(r"error bind device fd=\d+ to iommufd=\d+: Invalid argument", output):
        return (
            "the device fd is bound to an iommufd already (by an earlier VMM: the binding "
            "lasts as long as the open file, not the process); open the cdev again"
        )
    if re.search(r"/dev/vfio/\d+'?: Permission denied", output):
        return "group nodes are root-only: pass an iommufd and the device cdev fd instead"
    if re.search(r"/dev/vfio/\d+'?: Device or resource busy", output):
        return "the group is open elsewhere (a VFIO group opens only once)"
    return ""


@dataclasses.dataclass(frozen=True)
class PciFunction:
    """One PCI function of QEMU's guest, from QMP ``query-pci``."""

    bus: int
    slot: int
    function: int
    vendor_id: int
    device_id: int
    class_id: int
    description: str
    qdev_id: str

    @property
    def ids(self) -> tuple[int, int]:
        return (self.vendor_id, self.device_id)

    @property
    def address(self) -> str:
        return f"{self.bus:02x}:{self.slot:02x}.{self.function:x}"

    def __str__(self) -> str:
        text = f"{self.address} {self.vendor_id:04x}:{self.device_id:04x} class {self.class_id:04x}"
        text += f" {self.description}" if self.description else ""
        return text + (f" (id {self.qdev_id})" if self.qdev_id else "")


def parse_query_pci(buses: Any) -> list[PciFunction]:
    """Every function in a ``query-pci`` answer, including those behind bridges."""
    found: list[PciFunction] = []

    def walk(devices: list[dict[str, Any]]) -> None:
        for d in devices:
            info = d.get("class_info", {})
            found.append(
                PciFunction(
                    bus=d["bus"],
                    slot=d["slot"],
                    function=d["function"],
                    vendor_id=d["id"]["vendor"],
                    device_id=d["id"]["device"],
                    class_id=info.get("class", 0),
                    description=info.get("desc", ""),
                    qdev_id=d.get("qdev_id", ""),
                )
            )
            walk(d.get("pci_bridge", {}).get("devices", []))

    for bus in buses:
        walk(bus["devices"])
    return found


class QemuVmm:
    """One QEMU process with VFIO fds inherited and QMP on a socketpair.

    ``argv`` is QEMU's full command line (binary first); ``{name}`` in it is
    replaced with the number of ``fds[name]``, and those fds are inherited.
    ``uid``/``gid``: run as that user, with no supplementary groups.
    ``memlock``: RLIMIT_MEMLOCK (soft and hard) set from outside with prlimit
    once the process is unprivileged and before QEMU runs; None leaves the
    inherited limit. ``close()`` (or leaving the ``with`` block) always kills
    and reaps QEMU and closes every fd opened here; the passed fds stay the
    caller's.
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        fds: Mapping[str, int] | None = None,
        uid: int | None = None,
        gid: int | None = None,
        memlock: int | None = None,
        timeout: float = 60.0,
        progress: Progress = _quiet,
    ) -> None:
        fds = dict(fds or {})
        self.argv = substitute(argv, fds)  # what `vfioctl run` does
        self.pass_fds = tuple(sorted(set(fds.values())))
        self.uid = uid
        self.gid = gid
        self.memlock = memlock
        self.timeout = timeout
        self.progress = progress
        self.process: subprocess.Popen[bytes] | None = None
        self.qmp: Qmp | None = None
        self.info: ProcessInfo | None = None
        self.version = ""
        self._sock: socket.socket | None = None
        self._log: IO[bytes] | None = None

    # -- life cycle

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def start(self) -> Self:
        try:
            self._spawn()
            self._connect()
        except BaseException:
            self.close()
            raise
        return self

    def _spawn(self) -> None:
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock = parent_end
        try:
            qemu = [
                self.argv[0],
                "-chardev",
                f"socket,id={QMP_CHARDEV},fd={child_end.fileno()}",
                "-mon",
                f"chardev={QMP_CHARDEV},mode=control",
                *self.argv[1:],
            ]
            gated = self.memlock is not None
            command = privilege_drop(self.uid, self.gid)
            command += ["/bin/sh", "-c", _GATE, "vfiod-vmm-gate"] if gated else []
            command += qemu
            # A file, not a pipe: QEMU can never block on a full pipe. Closed in close().
            self._log = tempfile.TemporaryFile(prefix="vfiod-qemu-")  # noqa: SIM115
            who = "root" if self.uid is None else f"uid {self.uid}"
            limit = "inherited" if self.memlock is None else mib(self.memlock)
            self.progress(f"starting QEMU as {who}, RLIMIT_MEMLOCK {limit}: {' '.join(qemu)}")
            self.process = subprocess.Popen(
                command,
                stdin=subprocess.PIPE if gated else subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                pass_fds=(*self.pass_fds, child_end.fileno()),
                cwd="/",
            )
        finally:
            child_end.close()  # QEMU's end: ours would hide QEMU's exit
        if gated:
            self._open_gate()

    def _open_gate(self) -> None:
        assert self.process is not None
        assert self.process.stdin is not None
        assert self.memlock is not None
        pid = self.process.pid
        if self.uid is not None:
            self._wait_for_uid(pid, self.uid)
        try:
            resource.prlimit(pid, resource.RLIMIT_MEMLOCK, (self.memlock, self.memlock))
        except PermissionError as e:
            raise QemuError(
                f"cannot set RLIMIT_MEMLOCK of pid {pid} to {mib(self.memlock)}",
                hint="setting the limit of another user's process, or raising a hard limit, "
                "needs CAP_SYS_RESOURCE",
            ) from e
        self.progress(f"prlimit: RLIMIT_MEMLOCK of pid {pid} is {mib(self.memlock)}; exec QEMU")
        with contextlib.suppress(BrokenPipeError):  # it died already: QMP will say so
            self.process.stdin.write(b"go\n")
        with contextlib.suppress(BrokenPipeError):
            self.process.stdin.close()

    def _wait_for_uid(self, pid: int, uid: int) -> None:
        """Until the child has dropped to ``uid``: then the limit is raised on an
        unprivileged process, as vfiod does for a lease owner."""
        assert self.process is not None
        deadline = time.monotonic() + self.timeout
        while self.process.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(FileNotFoundError, ValueError):
                if ProcessInfo.read(pid).uid == uid:
                    return
            time.sleep(0.005)

    def _connect(self) -> None:
        assert self._sock is not None
        assert self.process is not None
        self.qmp = Qmp(self._sock, progress=self.progress)
        started = time.monotonic()
        try:
            self.version = self.qmp.negotiate(self.timeout)
            self.info = ProcessInfo.read(self.process.pid)
        except (ConnectionError, TimeoutError, FileNotFoundError, QmpProtocolError) as e:
            raise self._failure(e) from e
        self.progress(
            f"QMP connected after {time.monotonic() - started:.1f} s: QEMU {self.version}, "
            f"{self.info}"
        )

    def _failure(self, cause: BaseException) -> QemuError:
        """QEMU died or hung: reap it and say why, from its own output."""
        assert self.process is not None
        if isinstance(cause, TimeoutError) and self.process.poll() is None:
            self.process.kill()
            message = f"QEMU did not answer on QMP within {self.timeout:g} s (killed)"
        else:
            message = "QEMU exited"
        try:
            returncode = self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            returncode = self.process.wait()
        if message == "QEMU exited":
            message = f"QEMU exited with status {returncode} before it was ready"
        output = self.output()
        memlock = self.memlock
        if memlock is None:
            memlock = _as_limit(resource.getrlimit(resource.RLIMIT_MEMLOCK)[0])
        hint = diagnose(output, memlock)
        said = output.strip().splitlines()
        self.progress(message + (f"; QEMU said: {said[-1]}" if said else ""))
        if hint:
            self.progress(f"meaning: {hint}")
        return QemuError(message, output=output, returncode=returncode, hint=hint)

    def output(self) -> str:
        """What QEMU has written to stdout and stderr so far."""
        if self._log is None:
            return ""
        self._log.seek(0)
        return self._log.read().decode(errors="replace")

    def quit(self, timeout: float = 30.0) -> int:
        """Ask QEMU to quit over QMP; kill it if it does not. Returns its status."""
        assert self.process is not None
        assert self.qmp is not None
        with contextlib.suppress(ConnectionError, TimeoutError):
            self.qmp.execute("quit", timeout=timeout)  # it may close before answering
        try:
            returncode = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            returncode = self.process.wait()
        self.progress(f"QEMU quit (status {returncode})")
        return returncode

    def close(self) -> None:
        if self.process is not None:
            if self.process.poll() is None:
                self.process.kill()
            self.process.wait()
            if self.process.stdin is not None:
                with contextlib.suppress(BrokenPipeError):
                    self.process.stdin.close()
        if self._sock is not None:
            self._sock.close()
        if self._log is not None:
            self._log.close()

    # -- questions

    def execute(self, command: str, arguments: Mapping[str, Any] | None = None) -> Any:
        assert self.qmp is not None, "start() first"
        try:
            return self.qmp.execute(command, arguments, timeout=self.timeout)
        except (ConnectionError, TimeoutError) as e:
            raise self._failure(e) from e

    def query_pci(self) -> list[PciFunction]:
        return parse_query_pci(self.execute("query-pci"))


def _as_limit(value: int) -> int | None:
    return None if value == resource.RLIM_INFINITY else value


@dataclasses.dataclass(frozen=True)
class QemuRun:
    """What one probe run found: QEMU's version, its process as QMP saw it,
    the PCI functions of its guest, its QMP events and output."""

    version: str
    process: ProcessInfo
    pci: tuple[PciFunction, ...]
    events: tuple[str, ...]
    output: str
    returncode: int
    seconds: float


def run_qemu(
    extra: Sequence[str],
    *,
    fds: Mapping[str, int] | None = None,
    uid: int | None = None,
    gid: int | None = None,
    memlock: int | None = None,
    memory_mib: int = 64,
    timeout: float = 60.0,
    binary: str = QEMU,
    progress: Progress = _quiet,
) -> QemuRun:
    """Start a paused QEMU (``probe_argv``) with ``extra`` options, list its PCI
    functions over QMP, quit it. Raises QemuError, with QEMU's output and a
    hint, when QEMU fails to start."""
    started = time.monotonic()
    argv = probe_argv(extra, memory_mib=memory_mib, binary=binary)
    with QemuVmm(
        argv, fds=fds, uid=uid, gid=gid, memlock=memlock, timeout=timeout, progress=progress
    ) as vmm:
        assert vmm.info is not None
        assert vmm.qmp is not None
        pci = vmm.query_pci()
        for function in pci:
            progress(f"query-pci: {function}")
        returncode = vmm.quit()
        seconds = time.monotonic() - started
        progress(f"QEMU run took {seconds:.1f} s")
        return QemuRun(
            version=vmm.version,
            process=vmm.info,
            pci=tuple(pci),
            events=tuple(e["event"] for e in vmm.qmp.events),
            output=vmm.output(),
            returncode=returncode,
            seconds=seconds,
        )


class SocketQemu:
    """A QEMU with QMP on a unix socket it made itself, so that the socket's
    peer (``SO_PEERCRED``) is QEMU, as a manager's QEMU has it: what ``vfioctl
    attach`` needs. Each ``execute`` is a connection of its own, as QEMU
    serves one QMP client at a time."""

    def __init__(self, socket_path: str, process: subprocess.Popen[bytes], log: IO[bytes]) -> None:
        self.socket = socket_path
        self.process = process
        self._log = log

    def output(self) -> str:
        self._log.seek(0)
        return self._log.read().decode(errors="replace")

    def fds(self) -> list[str]:
        """What QEMU's open fds are."""
        fd_dir = f"/proc/{self.process.pid}/fd"
        found = []
        for name in os.listdir(fd_dir):
            with contextlib.suppress(FileNotFoundError):
                found.append(os.readlink(f"{fd_dir}/{name}"))
        return found

    def execute(self, command: str, **arguments: Any) -> Any:
        with qmp_connect(self.socket, 30) as sock:
            session = Qmp(sock)
            session.negotiate(30)
            return session.execute(command, arguments)

    def peripherals(self) -> set[str]:
        """The ids of the devices given one (-device id=, device_add id=)."""
        found = self.execute("qom-list", path="/machine/peripheral")
        return {e["name"] for e in found if e["type"].startswith("child<")}

    def query_pci(self) -> list[PciFunction]:
        return parse_query_pci(self.execute("query-pci"))

    def wait_for_bus_numbers(self, bridge: str, timeout: float = 60.0) -> None:
        """Until the firmware has given ``bridge`` (a root port's id) its
        secondary bus number: before that, query-pci cannot see behind it."""
        deadline = time.monotonic() + timeout
        while True:
            for bus in self.execute("query-pci"):
                for d in bus["devices"]:
                    if d.get("qdev_id") == bridge and d["pci_bridge"]["bus"]["secondary"]:
                        return
            if time.monotonic() > deadline:
                raise QemuError(f"the firmware numbered no bus behind {bridge} in {timeout:g} s")
            time.sleep(0.2)


@contextlib.contextmanager
def socket_qemu(
    extra: Sequence[str],
    *,
    uid: int | None,
    paused: bool = True,
    memory_mib: int = 64,
    timeout: float = 60.0,
    progress: Progress = _quiet,
) -> Iterator[SocketQemu]:
    """QEMU (``probe_argv`` with ``extra``) as ``uid`` (None: root) with its
    QMP socket in a directory of that user's; killed, reaped and cleaned up
    afterwards. ``paused=False`` lets the firmware run (there is nothing to
    boot): it numbers the buses behind bridges, as a guest's firmware does."""
    binary, version = find_qemu()
    rundir = tempfile.mkdtemp(prefix="vfiod-qemu-")
    process = None
    with tempfile.TemporaryFile(prefix="vfiod-qemu-") as log:
        try:
            os.chmod(rundir, 0o755)  # noqa: S103 - only the socket's user may write
            if uid is not None:
                os.chown(rundir, uid, uid)
            path = os.path.join(rundir, "qmp.sock")
            argv = probe_argv(
                [*extra, "-qmp", f"unix:{path},server=on,wait=off"],
                memory_mib=memory_mib,
                binary=binary,
            )
            if not paused:
                argv.remove("-S")
            who = "root" if uid is None else f"uid {uid}"
            progress(f"starting QEMU {version} as {who}: {' '.join(argv)}")
            process = subprocess.Popen(
                [*privilege_drop(uid), *argv],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd="/",
            )
            deadline = time.monotonic() + timeout
            while not os.path.exists(path):
                if process.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    raise QemuError(
                        "QEMU made no QMP socket", output=log.read().decode(errors="replace")
                    )
                time.sleep(0.05)
            yield SocketQemu(path, process, log)
        finally:
            if process is not None:
                process.kill()
                process.wait()
            shutil.rmtree(rundir)
