"""A fake VFIO host for the broker's tests and benchmarks: a fake sysfs tree
and a fake kernel that agree with each other, a policy root and a state file.

    host = build(tmp_path / "host", "small", policy=POLICY)

Topologies:
- ``small``: an e1000e alone in group 10 (0000:00:10.0), the ICH9 functions
  in group 5 (ahci, i801_smbus: not viable), a PCIe-to-PCI bridge with two
  e1000 sharing group 4 behind a root port in group 3.
- ``noiommu``: no IOMMU; an e1000e (0000:00:10.0) that unsafe no-IOMMU mode
  can give group ``noiommu-0``.
- ``scale:N``: N devices, two functions per slot sharing one group; all
  start on vfio-pci (warm acquires).
- ``trust``: ``small`` plus what the trust checks need: a multifunction
  e1000e pair (0000:03:00.0, 0000:03:00.1) sharing group 20 (no ACS between
  functions), and an SR-IOV igb PF (0000:06:00.0) behind a switch port
  without ACS, with two enabled VFs (0000:06:10.0, 0000:06:10.2, on igbvf)
  that share the PF's group 7.

The daemon for bus tests runs in its own process, which must build the fake
itself (FakeSysfs and FakeKernel are in-memory models over the tree):

    python -m tests.fakehost DIR TOPOLOGY   # runs vfiod on the fake host in DIR
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import os
import pickle
import selectors
import signal
import socket
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from vfiod.host.fake import NOIOMMU_PARAMETER, FakeDevice, FakeDriver, FakeSysfs, SriovCapability
from vfiod.host.sysfs import Sysfs
from vfiod.pci import PciAddress
from vfiod.state import State, StateFile
from vfiod.vfio.fake import FakeKernel, FakePciDevice
from vfiod.vfio.kernel import Kernel

if TYPE_CHECKING:
    from vfiod.broker import FdStore

NIC = PciAddress.parse("0000:00:10.0")
ISA = PciAddress.parse("0000:00:1f.0")
SATA = PciAddress.parse("0000:00:1f.2")
SMBUS = PciAddress.parse("0000:00:1f.3")
ROOT_PORT = PciAddress.parse("0000:00:1c.0")
PCI_BRIDGE = PciAddress.parse("0000:01:00.0")
E1000_A = PciAddress.parse("0000:02:01.0")
E1000_B = PciAddress.parse("0000:02:02.0")
NIC_GROUP = "10"
BRIDGE_GROUP = "4"
MULTI_A = PciAddress.parse("0000:03:00.0")
MULTI_B = PciAddress.parse("0000:03:00.1")
MULTI_GROUP = "20"
SWITCH_PORT = PciAddress.parse("0000:05:00.0")
IGB_PF = PciAddress.parse("0000:06:00.0")
IGB_VFS = (PciAddress.parse("0000:06:10.0"), PciAddress.parse("0000:06:10.2"))
SRIOV_GROUP = "7"


@dataclasses.dataclass
class FakeHost:
    directory: Path
    sysfs: FakeSysfs
    kernel: FakeKernel
    state: StateFile

    @property
    def policy_root(self) -> Path:
        return self.directory / "root"


def no_modules(module: str) -> str:
    """The fake host has no modules to load; the real modprobe must never run."""
    return f"module {module} not found in the fake host"


def _kernel_device(fs: FakeSysfs, address: PciAddress) -> FakePciDevice:
    d = fs.description(address)
    return FakePciDevice(
        str(address), vendor=d.vendor, device=d.device, class_code=d.pci_class, bars=(0x20000,)
    )


def _add_kernel_groups(fs: FakeSysfs, kernel: FakeKernel) -> None:
    """Give every non-bridge member of every IOMMU group a VFIO group node and
    cdev, the way the kernel does once it is on vfio-pci; the broker opens
    them only after checking the group is viable."""
    groups: dict[int, list[PciAddress]] = {}
    for address in fs.present():
        d = fs.description(address)
        if d.group is not None and d.pci_class >> 8 != 0x0604:  # bridges stay on pcieport
            groups.setdefault(d.group, []).append(address)
    for group, members in sorted(groups.items()):
        kernel.add_group(group, [_kernel_device(fs, a) for a in members])
        for address in members:
            cdev = os.path.basename(kernel.cdev_path(str(address)))
            os.makedirs(os.path.join(fs.device_path(address), "vfio-dev", cdev), exist_ok=True)


def add_e1000e(fs: FakeSysfs, address: PciAddress = NIC, group: int | None = 10) -> None:
    fs.add_device(
        address,
        vendor=0x8086,
        device=0x10D3,
        subsystem_device=0xA01F,
        pci_class=0x020000,
        driver="e1000e",
        group=group,
        reset_methods=("flr", "bus"),
    )


def add_ich9(fs: FakeSysfs) -> None:
    """QEMU q35's southbridge functions, one IOMMU group (no ACS on them)."""
    fs.add_device(ISA, vendor=0x8086, device=0x2918, pci_class=0x060100, group=5)
    fs.add_device(SATA, vendor=0x8086, device=0x2922, pci_class=0x010601, driver="ahci", group=5)
    fs.add_device(
        SMBUS, vendor=0x8086, device=0x2930, pci_class=0x0C0500, driver="i801_smbus", group=5
    )


def add_bridged_e1000s(fs: FakeSysfs, bridge_driver: str | None) -> None:
    """A PCIe-to-PCI bridge behind a root port, two conventional e1000 behind
    it: requester IDs alias to the bridge, so all three share a group."""
    fs.add_device(
        ROOT_PORT, vendor=0x1B36, device=0x000C, pci_class=0x060400, driver="pcieport", group=3
    )
    fs.add_device(
        PCI_BRIDGE,
        vendor=0x1B36,
        device=0x000E,
        pci_class=0x060400,
        driver=bridge_driver,
        group=int(BRIDGE_GROUP),
        parent=ROOT_PORT,
    )
    for address in (E1000_A, E1000_B):
        fs.add_device(
            address,
            vendor=0x8086,
            device=0x100E,
            pci_class=0x020000,
            driver="e1000",
            group=int(BRIDGE_GROUP),
            parent=PCI_BRIDGE,
        )


def add_small(fs: FakeSysfs) -> None:
    add_e1000e(fs)
    add_ich9(fs)
    add_bridged_e1000s(fs, None)


def add_trust(fs: FakeSysfs) -> None:
    add_small(fs)
    for address in (MULTI_A, MULTI_B):
        add_e1000e(fs, address, int(MULTI_GROUP))
    fs.add_device(
        SWITCH_PORT,
        vendor=0x1B36,
        device=0x000C,
        pci_class=0x060400,
        driver="pcieport",
        group=int(SRIOV_GROUP),
    )
    fs.add_driver("igbvf")
    fs.add_device(
        IGB_PF,
        vendor=0x8086,
        device=0x10C9,
        pci_class=0x020000,
        driver="igb",
        group=int(SRIOV_GROUP),
        parent=SWITCH_PORT,
        reset_methods=("flr",),
        sriov=SriovCapability(
            total_vfs=7, vf_device=0x10CA, vf_driver="igbvf", offset=0x80, stride=2, acs=False
        ),
    )
    fs.write(os.path.join(fs.device_path(IGB_PF), "sriov_numvfs"), str(len(IGB_VFS)))


def scale_address(index: int) -> PciAddress:
    """Device ``index`` of a scale host: two functions per slot, 32 slots per
    bus, buses 1 to 255 of each PCI domain in turn (16,320 devices a domain)."""
    slot, function = divmod(index, 2)
    bus, slot = divmod(slot, 32)
    domain, bus = divmod(bus, 255)
    return PciAddress(domain, bus + 1, slot, function)


def add_scale(fs: FakeSysfs, count: int) -> None:
    for i in range(count):
        fs.add_device(
            scale_address(i),
            vendor=0x8086,
            device=0x10CA,
            pci_class=0x020000,
            driver="vfio-pci",
            group=i // 2 + 100,
            reset_methods=("flr",),
        )


def build(
    directory: Path,
    topology: str = "small",
    *,
    policy: str = "",
    settings: str = "",
    cross_process: bool = False,
) -> FakeHost:
    """A fake host in ``directory``: sys/, root/etc/vfiod (the policy), run/.
    ``cross_process``: the kernel's fds are handed to other processes."""
    directory.mkdir(parents=True, exist_ok=True)
    noiommu = topology == "noiommu"
    fs = FakeSysfs(directory / "sys")
    fs.add_driver("vfio-pci")
    kernel = FakeKernel(cross_process=cross_process)
    if topology == "small":
        add_small(fs)
        _add_kernel_groups(fs, kernel)
    elif topology == "trust":
        add_trust(fs)
        _add_kernel_groups(fs, kernel)
    elif noiommu:
        fs.add_device(NIC, vendor=0x8086, device=0x10D3, pci_class=0x020000, driver="e1000e")
        kernel.add_group("noiommu-0", [_kernel_device(fs, NIC)])
    elif topology.startswith("scale:"):
        add_scale(fs, int(topology.removeprefix("scale:")))
        _add_kernel_groups(fs, kernel)
    else:
        raise ValueError(f"unknown fake topology {topology!r}")
    etc = directory / "root/etc/vfiod"
    (etc / "policy.d").mkdir(parents=True, exist_ok=True)
    if policy:
        (etc / "policy.d/50-test.toml").write_text(policy)
    if settings:
        (etc / "vfiod.toml").write_text(settings)
    state = StateFile(str(directory / "run/state.json"))
    return FakeHost(directory, fs, kernel, state)


def main(argv: list[str]) -> int:
    """Run vfiod on a fake host (for the bus tests and benchmarks).

    ``python -m tests.fakehost --serve-kernel DIR TOPOLOGY`` instead builds the
    host in DIR and serves its fake kernel on DIR/kernel.sock (``KernelServer``)
    until SIGTERM, so that the kernel outlives the daemon as Linux's does. With
    ``VFIOD_TEST_KERNEL`` naming that socket, the daemon uses that kernel
    (``RemoteKernel``) and the host already built in DIR, which a restarted
    daemon finds as the last one left it. ``VFIOD_TEST_STEPS`` (a log path),
    ``VFIOD_TEST_KILL_AT=N`` and ``VFIOD_TEST_KILL_AFTER=N`` count the steps
    the daemon takes once it is ready and kill it with SIGKILL just before or
    just after the N-th (``Steps``). A file DIR/slow-unbind makes every unbind
    take the seconds it holds (``SlowSysfs``)."""
    from vfiod import daemon, log, notify  # noqa: PLC0415 - only the daemon process needs them
    from vfiod.service_manager import SystemdFdStore  # noqa: PLC0415

    if argv[0] == "--serve-kernel":
        return serve_kernel(Path(argv[1]), argv[2])
    directory, topology = Path(argv[0]), argv[1]
    policy = (directory / "policy.toml").read_text() if (directory / "policy.toml").exists() else ""
    settings = (directory / "vfiod.toml").read_text() if (directory / "vfiod.toml").exists() else ""
    kernel_socket = os.environ.get(KERNEL_SOCKET_VARIABLE)
    kernel: Kernel
    if kernel_socket:
        host = reopen(directory / "host")
        kernel = RemoteKernel(kernel_socket)
    else:
        host = build(
            directory / "host", topology, policy=policy, settings=settings, cross_process=True
        )
        kernel = host.kernel
    sysfs: Sysfs = host.sysfs
    if (directory / SLOW_UNBIND_FILE).exists():
        sysfs = SlowSysfs(sysfs, directory / SLOW_UNBIND_FILE)
    state = host.state
    fd_store: FdStore = SystemdFdStore()
    steps = Steps.from_environment(directory)
    if steps is not None:
        sysfs = CountingSysfs(sysfs, steps)
        kernel = CountingKernel(kernel, steps)
        state = CountingStateFile(state.path, steps)
        fd_store = CountingFdStore(fd_store, steps)
        notify.notify = steps.arming(notify.notify)  # counting starts with READY=1
    log.setup()
    parts = daemon.Parts(
        sysfs=sysfs,
        kernel=kernel,
        state=state,
        policy_root=str(host.policy_root),
        hwdb=False,
        hotplug=False,
        load_module=no_modules,
        critical=dict,
        fd_store=fd_store,
    )
    daemon.run(parts)
    return 0


# -- For the fault tests (tests/bus/test_faults.py): a fake kernel that
# outlives the daemon, a host that a restarted daemon finds as it was left,
# and Parts that count every step the daemon takes and can kill it at one.

KERNEL_SOCKET_VARIABLE = "VFIOD_TEST_KERNEL"
DESCRIPTION_FILE = "description.pickle"  # in the host's directory (describe)
SLOW_UNBIND_FILE = "slow-unbind"  # in the daemon's directory: seconds per unbind
STEPS_VARIABLE = "VFIOD_TEST_STEPS"
KILL_BEFORE_VARIABLE = "VFIOD_TEST_KILL_AT"
KILL_AFTER_VARIABLE = "VFIOD_TEST_KILL_AFTER"

KERNEL_METHODS = frozenset(name for name in vars(Kernel) if not name.startswith("_"))
# Which arguments of a Kernel method are fds (by position; the first one by
# default), and which methods return a new fd.
_FD_ARGUMENTS: dict[str, tuple[int, ...]] = {
    "open": (),
    "munmap": (),
    "group_set_container": (0, 1),
    "device_bind_iommufd": (0, 1),
}
_NEW_FD = frozenset({"open", "group_get_device_fd"})
_MAX_MESSAGE = 1 << 20

T = TypeVar("T")


def _fd_arguments(method: str) -> tuple[int, ...]:
    return _FD_ARGUMENTS.get(method, (0,))


def describe(host: FakeHost) -> None:
    """Keep what ``host``'s devices are (not their state) beside its tree, for
    ``reopen``: rebuilding the topology to learn it cost a restarted daemon
    seconds at a few thousand devices."""
    fs = host.sysfs
    description = (fs._devices, fs._drivers, fs._sriov)
    (host.directory / DESCRIPTION_FILE).write_bytes(pickle.dumps(description))


def reopen(directory: Path) -> FakeHost:
    """The fake host in ``directory`` as the last process left it (see
    ``ReopenedSysfs``); its kernel (a model the caller does not use: the real
    one runs in a ``KernelServer``) is fresh."""
    description = (directory / DESCRIPTION_FILE).read_bytes()
    devices, drivers, sriov = pickle.loads(description)  # noqa: S301 - the test's own file
    sysfs = ReopenedSysfs(directory / "sys", devices, drivers, sriov)
    return FakeHost(
        directory,
        sysfs,
        FakeKernel(cross_process=True),
        StateFile(str(directory / "run/state.json")),
    )


class ReopenedSysfs(FakeSysfs):
    """A fake sysfs over a tree another process built and changed. The tree
    holds every changing state (drivers, overrides, VFs); what the devices
    are comes from the builder's description (``describe``)."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        devices: dict[PciAddress, FakeDevice],
        drivers: dict[str, FakeDriver],
        sriov: list[FakeDevice],
    ) -> None:
        parameter = os.path.join(os.fspath(root), NOIOMMU_PARAMETER)
        with open(parameter) as f:
            noiommu = f.read().strip() in ("Y", "y", "1")
        super().__init__(root, noiommu=noiommu)
        self._devices = dict(devices)
        self._drivers = dict(drivers)
        self._sriov = list(sriov)


class KernelServer:
    """Serves a FakeKernel to ``RemoteKernel`` clients over a SOCK_SEQPACKET
    socket: one message per call, its fd arguments passed with it, a new fd
    passed back. The server closes its copies at once, so a file lives as
    long as some other process holds it, and the model (cross_process) learns
    of its last close from the inode's eviction, as it does within one
    process. Several clients in turn: a restarted daemon connects again."""

    def __init__(self, kernel: FakeKernel, path: str) -> None:
        self.kernel = kernel
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        self.listener.bind(path)
        self.listener.listen()

    def serve_forever(self) -> None:
        selector = selectors.DefaultSelector()
        selector.register(self.listener, selectors.EVENT_READ)
        while True:
            for key, _events in selector.select():
                if key.fileobj is self.listener:
                    connection, _ = self.listener.accept()
                    selector.register(connection, selectors.EVENT_READ)
                    continue
                assert isinstance(key.fileobj, socket.socket)
                if not self._answer(key.fileobj):
                    selector.unregister(key.fileobj)
                    key.fileobj.close()

    def _answer(self, connection: socket.socket) -> bool:
        try:
            message, fds, _flags, _address = socket.recv_fds(
                connection, _MAX_MESSAGE, 4, socket.MSG_CMSG_CLOEXEC
            )
        except ConnectionResetError:
            return False
        if not message:
            for fd in fds:
                os.close(fd)
            return False
        try:
            reply, new = self._call(message, fds)
        finally:
            for fd in fds:
                os.close(fd)
        try:
            socket.send_fds(connection, [reply], new)
        except OSError:
            return False
        finally:
            for fd in new:
                os.close(fd)
        return True

    def _call(self, message: bytes, fds: list[int]) -> tuple[bytes, list[int]]:
        """The reply to one call, and the new fd it passes back (if any)."""
        name, arguments = pickle.loads(message)  # noqa: S301 - our own daemon, a root-only socket
        try:
            if name not in KERNEL_METHODS:
                raise AttributeError(name)
            call = list(arguments)
            for position, fd in zip(_fd_arguments(name), fds, strict=True):
                call[position] = fd
            result = getattr(self.kernel, name)(*call)
        except Exception as e:  # the daemon gets it, as it would from the kernel
            try:
                return pickle.dumps(("error", e)), []
            except Exception:  # not picklable: its text, then
                return pickle.dumps(("error", OSError(errno.EIO, repr(e)))), []
        if name in _NEW_FD:
            return pickle.dumps(("ok", None)), [result]
        return pickle.dumps(("ok", result)), []


def serve_kernel(directory: Path, topology: str) -> int:
    """Build the fake host in ``directory`` and serve its kernel (main's --serve-kernel)."""
    policy = (directory / "policy.toml").read_text() if (directory / "policy.toml").exists() else ""
    settings = (directory / "vfiod.toml").read_text() if (directory / "vfiod.toml").exists() else ""
    host = build(directory / "host", topology, policy=policy, settings=settings, cross_process=True)
    describe(host)
    server = KernelServer(host.kernel, str(directory / "kernel.sock"))
    print("listening", flush=True)
    server.serve_forever()
    return 0


class RemoteKernel:
    """The Kernel protocol, served by a ``KernelServer`` in another process.
    ``close`` closes the fd here only: the model hears of it from the inode."""

    def __init__(self, path: str) -> None:
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self._socket.connect(path)

    def close(self, fd: int) -> None:
        os.close(fd)

    def __getattr__(self, name: str) -> Callable[..., Any]:
        if name not in KERNEL_METHODS:
            raise AttributeError(name)
        positions = _fd_arguments(name)

        def call(*arguments: Any) -> Any:
            fds = [arguments[i] for i in positions]
            plain = [None if i in positions else a for i, a in enumerate(arguments)]
            socket.send_fds(self._socket, [pickle.dumps((name, plain))], fds)
            reply, received, _flags, _address = socket.recv_fds(
                self._socket, _MAX_MESSAGE, 1, socket.MSG_CMSG_CLOEXEC
            )
            if not reply:
                raise ConnectionError("the fake kernel's server went away")
            status, value = pickle.loads(reply)  # noqa: S301 - our own server, a root-only socket
            if status == "error":
                raise value
            return received[0] if name in _NEW_FD else value

        return call


class Steps:
    """Counts the daemon's steps once it is ready (``arming``), logs each as
    a line "KIND DESCRIPTION", and kills the process with SIGKILL just before
    step ``kill_before`` or just after step ``kill_after`` (1-based).

    A call that repeats the step just before it, which failed, is a retry of
    that step, not a step of its own (logged as "# again: ..."): vfiod probes
    a group until it is free (EBUSY while the fd store, a process of its
    own, has not closed its copy yet) and a node until it appears, as often
    as timing has it, and the count must not depend on that."""

    def __init__(self, log_path: str, kill_before: int | None, kill_after: int | None) -> None:
        self.log_path = log_path
        self.kill_before = kill_before
        self.kill_after = kill_after
        self.armed = False
        self.count = 0
        self.last = ""  # the latest step or retry, and whether it failed
        self.last_failed = False

    @classmethod
    def from_environment(cls, directory: Path) -> Steps | None:
        before = os.environ.get(KILL_BEFORE_VARIABLE)
        after = os.environ.get(KILL_AFTER_VARIABLE)
        log_path = os.environ.get(STEPS_VARIABLE)
        if not (before or after or log_path):
            return None
        return cls(
            log_path or str(directory / "steps.log"),
            int(before) if before else None,
            int(after) if after else None,
        )

    def arming(self, send: Callable[..., bool]) -> Callable[..., bool]:
        """``notify.notify`` that starts the count once READY=1 is sent."""

        def notify(*assignments: str, fds: Sequence[int] = ()) -> bool:
            sent = send(*assignments, fds=fds)
            if "READY=1" in assignments:
                self.armed = True
            return sent

        return notify

    def _log(self, line: str) -> None:
        fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, (line + "\n").encode())
        finally:
            os.close(fd)

    def _die(self, when: str) -> None:
        self._log(f"# killed {when} step {self.count}")
        os.kill(os.getpid(), signal.SIGKILL)

    def run(self, kind: str, what: str, action: Callable[[], T]) -> T:
        if not self.armed:
            return action()
        line = f"{kind} {what}"
        if line == self.last and self.last_failed:
            self._log(f"# again: {line}")
            return self._attempt(line, action)
        self.count += 1
        step = self.count
        self._log(line)
        if step == self.kill_before:
            self._die("before")
        try:
            return self._attempt(line, action)
        finally:
            if step == self.kill_after:
                self._die("after")

    def _attempt(self, line: str, action: Callable[[], T]) -> T:
        self.last, self.last_failed = line, True
        result = action()
        self.last_failed = False
        return result


class SlowSysfs(Sysfs):
    """Sysfs whose unbinds take as long as a GPU's: each write to an
    ``unbind`` file first waits the seconds ``delay_file`` holds (read at
    each write, so a test can change it; no file, no wait). It waits before
    the fake kernel's lock, as a writer waits in the real kernel's driver."""

    def __init__(self, inner: Sysfs, delay_file: Path) -> None:
        super().__init__(inner.root)
        self.inner = inner
        self.delay_file = delay_file

    def write(self, path: str, value: str) -> None:
        if os.path.basename(path) == "unbind":
            with contextlib.suppress(FileNotFoundError):
                time.sleep(float(self.delay_file.read_text() or 0))
        self.inner.write(path, value)


class CountingSysfs(Sysfs):
    """Sysfs whose every write is a step; reads go to the tree as before."""

    def __init__(self, inner: Sysfs, steps: Steps) -> None:
        super().__init__(inner.root)
        self.inner = inner
        self.steps = steps

    def write(self, path: str, value: str) -> None:
        what = f"{os.path.relpath(path, self.root)} <- {value.strip() or repr(value)}"
        self.steps.run("sysfs-write", what, functools.partial(self.inner.write, path, value))


class CountingKernel:
    """The Kernel protocol around another: every call is a step."""

    def __init__(self, inner: Kernel, steps: Steps) -> None:
        self.inner = inner
        self.steps = steps

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method: Callable[..., Any] = getattr(self.inner, name)
        if name not in KERNEL_METHODS:
            return method
        positions = _fd_arguments(name)

        def call(*arguments: Any) -> Any:
            shown = [
                f"<{len(a)} bytes>" if isinstance(a, bytes) else str(a)
                for i, a in enumerate(arguments)
                if i not in positions
            ]
            what = " ".join([name, *shown])
            return self.steps.run("kernel", what, functools.partial(method, *arguments))

        return call


class CountingStateFile(StateFile):
    """A StateFile whose every save is a step."""

    def __init__(self, path: str, steps: Steps) -> None:
        super().__init__(path)
        self.steps = steps

    def save(self, state: State) -> None:
        self.steps.run(
            "state-save", _described(state), functools.partial(StateFile.save, self, state)
        )

    def _commit(self, state: State, change: Mapping[str, Any]) -> State:
        # A journal line is the same step as a snapshot was: one state write.
        commit = functools.partial(StateFile._commit, self, state, change)
        return self.steps.run("state-save", _described(state), commit)


def _described(state: State) -> str:
    bindings = ",".join(f"{a}={r.phase}" for a, r in sorted(state.bindings.items()))
    return f"bindings={bindings or '-'} leases={len(state.leases)}"


class CountingFdStore:
    """An fd store whose every keep and drop is a step."""

    def __init__(self, inner: FdStore, steps: Steps) -> None:
        self.inner = inner
        self.steps = steps

    def keep(self, name: str, fds: Sequence[int]) -> None:
        what = f"{name} {len(fds)}"
        self.steps.run("fdstore-keep", what, functools.partial(self.inner.keep, name, fds))

    def drop(self, name: str) -> None:
        self.steps.run("fdstore-drop", name, functools.partial(self.inner.drop, name))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
