"""SIGKILL at every step: vfiod killed just before or just after each step of
a managed Acquire and of a Release loses nothing and leaves nothing wrong
once it is restarted.

The daemon runs on the fake host (tests/fakehost.py) with its kernel in a
process of its own (``--serve-kernel``), which outlives the daemon as Linux
does, and under a service manager that keeps vfiod's fd store across
restarts and passes it back as LISTEN_FDS, as systemd does (``STORE``). A
step is a sysfs write, a call of the Kernel interface, a save of the state
file, or a keep or drop in the fd store; the fake host counts them from
READY=1 and kills the daemon with SIGKILL at the one asked for
(``VFIOD_TEST_KILL_AT`` / ``VFIOD_TEST_KILL_AFTER``), logging each step.

The recordings below (``RECORDINGS``) are what a dry run logs;
``test_recording`` checks them, so a change in the daemon's steps shows up
there first, with the new list to paste. (A retry of a call that just
failed, such as probing a group that is still busy, is part of that step,
not a step of its own: see ``tests.fakehost.Steps``.) Every case then kills
the daemon at one step, restarts it on the same host, kernel and fd store,
and checks:

(a) vfiod starts again and answers;
(b) while the client still holds its connection, its lease is either fully
    there (Lease object, state.json record, its fds in the fd store, the
    devices on vfio-pci) or fully gone (devices back on their drivers) —
    and it is there exactly when it was whole at the kill (``Case.kept``:
    after the acquire's last step, before the release's first), so nothing
    granted is lost;
(c) once the client has released what it holds and exited, every device is
    on its original driver, state.json has no binding and no lease, the fd
    store is empty and vfiod holds no fd more than it did fresh;
(d) vfiod's log has no traceback and no "bug:".

The ``-client-gone`` cases kill the client too while vfiod is down: the
restarted vfiod must give the devices back at start.

By default a spread of cases runs (``spread``), 42 of them in about 40 s:
in each recording the first and the last step and the first step of every
kind (sysfs write, kernel call, state save, fd store keep, fd store drop),
each killed before and after, with the client staying; and the first and
the last step, before and after, with the client gone.
``VFIOD_TEST_FAULTS=all`` runs every step of every recording both ways, with
and without the client: 224 cases, 3 to 4 minutes on 2 cores.

Then two cases of a release while the client still holds its device fd
(the restarted vfiod must not take the device from under it), and a state
file corrupted in four ways after a kill mid-bind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from tests.bus import NOBODY, PROJECT, PrivateBus, _child_env
from tests.bus.vfiod import (
    FDS_PER_LEASE,
    HOLD_MANY,
    KEEP_NOTICE,
    NOBODY_ANY_POLICY,
    START_TIMEOUT,
    STOP_TIMEOUT,
    Clients,
    VfiodProcess,
)
from tests.fakehost import (
    E1000_A,
    E1000_B,
    KERNEL_SOCKET_VARIABLE,
    KILL_AFTER_VARIABLE,
    KILL_BEFORE_VARIABLE,
    NIC,
    STEPS_VARIABLE,
)
from vfiod.client import Client
from vfiod.state import JOURNAL_SUFFIX

POLICY = """
[[rule]]
name = "nobody-nic"
effect = "allow"
address = "0000:00:10.0"
users = ["nobody"]
managed = true

[[rule]]
name = "nobody-bridged"
effect = "allow"
address = "0000:02:0[12].0"
users = ["nobody"]
managed = true
companions = true
"""

ORIGINAL = {str(NIC): "e1000e", str(E1000_A): "e1000", str(E1000_B): "e1000"}
EXHAUSTIVE_VARIABLE = "VFIOD_TEST_FAULTS"
PYTHON = (sys.executable, "-s")
FAKEHOST = (*PYTHON, "-m", "tests.fakehost")
DEATH_TIMEOUT = 20.0
SETTLE_TIMEOUT = 5.0

# The service manager's side of NOTIFY_SOCKET, like tests/bus/vfiod.py's
# SERVE_NOTIFY, but it outlives the daemon as systemd does: it keeps the fd
# store across restarts and hands it (names and fds) to whoever connects to
# its control socket, after reading every notice already sent.
STORE = (
    """\
import json, os, select, socket, signal, sys
"""
    + KEEP_NOTICE
    + """\
notify_path, control_path, directory = sys.argv[1:4]
for path in (notify_path, control_path):
    if os.path.exists(path):
        os.unlink(path)
sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
sock.bind(notify_path)
sock.setblocking(False)
control = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
control.bind(control_path)
control.listen()
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
store = {}
import resource  # it keeps every fd of every lease, as systemd does
resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)

def receive():
    while True:
        try:
            data, fds, _flags, _addr = socket.recv_fds(sock, 65536, 253)
        except BlockingIOError:
            return
        keep(data, fds, store, directory)

print("listening", flush=True)
while True:
    readable, _, _ = select.select([sock, control], [], [])
    receive()
    if control in readable:
        connection, _ = control.accept()
        receive()
        names = [n for n in sorted(store) for _ in store[n]]
        fds = [fd for n in sorted(store) for fd in store[n]]
        # At most 253 fds go in one message (SCM_MAX_FD): the names, then the fds.
        connection.send(json.dumps(names).encode())
        for at in range(0, len(fds), 253):
            socket.send_fds(connection, [b"fds"], fds[at : at + 253])
        connection.close()
"""
)

# What systemd does between fork and exec: the fd store's fds become 3, 4,
# ... and LISTEN_FDS, LISTEN_FDNAMES and LISTEN_PID say so. Then the daemon.
# (Moved one at a time, as few more fds open as can be: a store as large as
# the fd limit allows fits.)
LAUNCH = """\
import fcntl, os, sys
count, names = int(sys.argv[1]), sys.argv[2]
fds = [int(a) for a in sys.argv[3 : 3 + count]]
argv = sys.argv[4 + count :]
at = {fd: i for i, fd in enumerate(fds)}  # which of them each fd number holds
for i in range(count):
    target = 3 + i
    if fds[i] == target:
        continue
    other = at.pop(target, None)
    if other is not None:  # another of them is in the way: out of it first
        fds[other] = fcntl.fcntl(target, fcntl.F_DUPFD_CLOEXEC, 3 + count)
        at[fds[other]] = other
    os.dup2(fds[i], target)
    os.close(fds[i])
    del at[fds[i]]
    fds[i] = target
    at[target] = i
env = dict(os.environ)
if count:
    env.update(LISTEN_FDS=str(count), LISTEN_FDNAMES=names, LISTEN_PID=str(os.getpid()))
os.execve(argv[0], argv, env)
"""

# The client (as nobody): acquires the devices after argv[1] and closes the
# fds at once ("close": a VMM that has finished with them; the lease stays)
# or keeps them ("hold"), then answers commands.
OPERATE = """\
held = []

def attempt(function, *args):
    try:
        return ["ok", function(*args)]
    except VfiodError as e:
        return ["error", e.kind, e.message]

def mine():
    return sorted(p for p, info in vfiod.inventory().leases.items() if info.uid == os.getuid())

def acquire():
    lease = vfiod.acquire(sys.argv[2:], backend="legacy", managed=True, label="faults")
    held.append(lease)
    if sys.argv[1] == "close":
        lease.close()
    return lease.path

def close_fds():
    for lease in held:
        lease.close()

def release_mine():
    leases = mine()
    for path in leases:
        vfiod.release(path)
    return leases

say(attempt(acquire))
for line in sys.stdin:
    command, _, argument = line.strip().partition(" ")
    if command == "release":
        say(attempt(vfiod.release, argument))
    elif command == "leases":
        say(attempt(mine))
    elif command == "release-mine":
        say(attempt(release_mine))
    elif command == "close-fds":
        say(attempt(close_fds))
"""


class FaultyVfiod(VfiodProcess):
    """vfiod on a fake host whose kernel and fd store outlive it: it can be
    killed at a step and started again, finding the host, the kernel's open
    files and its fd store as the last process left them."""

    def __init__(self, bus: PrivateBus, directory: Path, topology: str = "small") -> None:
        host = directory / "host"
        super().__init__(
            bus,
            directory,
            [*FAKEHOST, str(directory), topology],
            sysfs=str(host / "sys"),
            state_path=host / "run/state.json",
            policy_root=host / "root",
        )
        self.topology = topology
        self.kernel: subprocess.Popen[bytes] | None = None
        self.steps_path = directory / "steps.log"
        self.log_offset = 0  # where the log of the latest start begins

    # the kernel and the service manager, for the whole test

    def open(self, policy: str) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / "policy.toml").write_text(policy)
        self.kernel = self._listening(
            [*FAKEHOST, "--serve-kernel", str(self.directory), self.topology]
        )
        sockets = [str(self.notify_path), str(self.control_path)]
        self.manager = self._listening([*PYTHON, "-c", STORE, *sockets, str(self.directory)])

    def _listening(self, argv: list[str]) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(
            argv,
            env=_child_env(None, {}),
            cwd=PROJECT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
        )
        assert process.stdout is not None
        line = process.stdout.readline()
        process.stdout.close()
        if line.strip() != b"listening":
            process.kill()
            process.wait()
            raise RuntimeError(f"{argv[-3:]} did not start")
        return process

    def close(self) -> None:
        try:
            if self.process is not None:
                self.stop()
        finally:
            for process in (self.manager, self.kernel):
                if process is not None:
                    process.terminate()
                    process.wait()
            self.manager = self.kernel = None

    @property
    def notify_path(self) -> Path:
        return self.directory / "notify.sock"

    @property
    def control_path(self) -> Path:
        return self.directory / "store.sock"

    # the daemon

    def stored(self) -> tuple[list[str], list[int]]:
        """What the fd store holds now: names and duplicates of the fds."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as control:
            control.connect(str(self.control_path))
            names = list(json.loads(control.recv(1 << 24)))
            fds: list[int] = []
            while len(fds) < len(names):
                _message, more, _flags, _address = socket.recv_fds(control, 16, 253)
                assert more, f"the fd store sent {len(fds)} of {len(names)} fds"
                fds += more
        return names, fds

    def start(self, env: Mapping[str, str] | None = None) -> None:
        names, fds = self.stored()
        ready = self.notices.count("READY=1")
        self.log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        variables = {
            "NOTIFY_SOCKET": str(self.notify_path),
            KERNEL_SOCKET_VARIABLE: str(self.directory / "kernel.sock"),
            **(env or {}),
        }
        argv = [*PYTHON, "-c", LAUNCH, str(len(fds)), ":".join(names)]
        argv += [str(fd) for fd in fds] + ["--", *self.argv]
        try:
            with open(self.log_path, "ab") as log:
                self.process = subprocess.Popen(
                    argv,
                    env=_child_env(self.bus.address, variables),
                    cwd=PROJECT,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    pass_fds=fds,
                )
        finally:
            for fd in fds:
                os.close(fd)
        deadline = time.monotonic() + START_TIMEOUT
        while self.notices.count("READY=1") <= ready:
            if self.process.poll() is not None:
                self.process = None
                raise RuntimeError(f"vfiod exited at start:\n{self.log()}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"vfiod was not ready in {START_TIMEOUT} s:\n{self.log()}")
            time.sleep(0.02)

    def start_killing(self, side: str, step: int) -> None:
        """Start with SIGKILL due just ``side`` ("before" or "after") step ``step``."""
        variable = KILL_BEFORE_VARIABLE if side == "before" else KILL_AFTER_VARIABLE
        self.steps_path.unlink(missing_ok=True)
        self.start({variable: str(step), STEPS_VARIABLE: str(self.steps_path)})

    def start_recording(self) -> None:
        self.steps_path.unlink(missing_ok=True)
        self.start({STEPS_VARIABLE: str(self.steps_path)})

    def steps(self) -> list[str]:
        """The steps logged so far (lease ids as LEASE), and the kill as "# killed ..."."""
        if not self.steps_path.exists():
            return []
        lines = self.steps_path.read_text().splitlines()
        return [normalized(line) for line in lines if not line.startswith("# again: ")]

    def died(self, timeout: float = DEATH_TIMEOUT) -> int | None:
        """Its exit status once it has ended within ``timeout``, else None."""
        assert self.process is not None
        try:
            returncode = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        self.process = None
        return returncode

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def stop(self) -> int:
        """SIGTERM, as `systemctl stop` (no systemd job says restart): leases end."""
        process, self.process = self.process, None
        if process is None:
            return 0
        process.send_signal(signal.SIGTERM)
        try:
            return process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise AssertionError(f"vfiod did not stop on SIGTERM:\n{self.log()}") from None

    def latest_log(self) -> str:
        """The log of the latest start."""
        with open(self.log_path, "rb") as f:
            f.seek(self.log_offset)
            return f.read().decode(errors="replace")


def normalized(line: str) -> str:
    return re.sub(r"\b[0-9a-f]{16}\b", "LEASE", line)


def fd_kinds(fds: list[str]) -> Counter[str]:
    """Open fds by what they are (socket and pipe inode numbers dropped)."""
    return Counter(re.sub(r"\[\d+\]", "[]", fd) for fd in fds)


@contextlib.contextmanager
def faulty_vfiod(bus: PrivateBus, directory: Path) -> Iterator[FaultyVfiod]:
    daemon = FaultyVfiod(bus, directory)
    daemon.open(POLICY)
    try:
        yield daemon
    finally:
        daemon.close()


@pytest.fixture
def host(private_bus: PrivateBus, tmp_path: Path) -> Iterator[FaultyVfiod]:
    with faulty_vfiod(private_bus, tmp_path / "vfiod") as daemon:
        yield daemon


def root_client(bus: PrivateBus) -> Client:
    return Client(bus.connect())


# -- the recordings


@dataclasses.dataclass(frozen=True)
class Operation:
    """A client operation whose steps are recorded: ``acquire`` of
    ``devices``, then (with ``release``) their Release."""

    name: str
    devices: tuple[str, ...]  # asked for
    moved: tuple[str, ...]  # moved to vfio-pci by it
    release: bool


OPERATIONS = {
    "acquire": Operation("acquire", (str(NIC),), (str(NIC),), release=False),
    "release": Operation("release", (str(NIC),), (str(NIC),), release=True),
    "acquire-bridged": Operation(
        "acquire-bridged", (str(E1000_A),), (str(E1000_A), str(E1000_B)), release=False
    ),
}

# What the dry runs log, step by step (see test_recording).
ACQUIRE_NIC = [
    "state-save bindings=0000:00:10.0=binding leases=0",
    "sysfs-write bus/pci/devices/0000:00:10.0/driver_override <- vfio-pci",
    "sysfs-write bus/pci/devices/0000:00:10.0/driver/unbind <- 0000:00:10.0",
    "sysfs-write bus/pci/drivers_probe <- 0000:00:10.0",
    "state-save bindings=0000:00:10.0=bound leases=0",
    "kernel open /dev/vfio/vfio 2",
    "kernel get_api_version",
    "kernel open /dev/vfio/10 2",
    "kernel group_get_status",
    "kernel group_get_status",
    "kernel group_set_container",
    "kernel check_extension 3",
    "kernel set_iommu 3",
    "kernel group_get_device_fd 0000:00:10.0",
    "kernel close",
    "fdstore-keep 0 2",
    "state-save bindings=0000:00:10.0=bound leases=1",
]
RELEASE_NIC = [
    "fdstore-drop 0",
    "kernel group_unset_container",
    "kernel close",
    "kernel close",
    "kernel open /dev/vfio/10 2",
    "kernel group_get_status",
    "kernel close",
    "sysfs-write bus/pci/devices/0000:00:10.0/reset <- 1",  # for the next tenant
    "sysfs-write bus/pci/devices/0000:00:10.0/driver/unbind <- 0000:00:10.0",
    "sysfs-write bus/pci/devices/0000:00:10.0/driver_override <- '\\n'",
    "sysfs-write bus/pci/drivers_probe <- 0000:00:10.0",
    "state-save bindings=- leases=1",
    "state-save bindings=- leases=0",
]
ACQUIRE_BRIDGED = [
    "state-save bindings=0000:02:01.0=binding leases=0",
    "sysfs-write bus/pci/devices/0000:02:01.0/driver_override <- vfio-pci",
    "sysfs-write bus/pci/devices/0000:02:01.0/driver/unbind <- 0000:02:01.0",
    "sysfs-write bus/pci/drivers_probe <- 0000:02:01.0",
    "state-save bindings=0000:02:01.0=bound leases=0",
    "state-save bindings=0000:02:01.0=bound,0000:02:02.0=binding leases=0",
    "sysfs-write bus/pci/devices/0000:02:02.0/driver_override <- vfio-pci",
    "sysfs-write bus/pci/devices/0000:02:02.0/driver/unbind <- 0000:02:02.0",
    "sysfs-write bus/pci/drivers_probe <- 0000:02:02.0",
    "state-save bindings=0000:02:01.0=bound,0000:02:02.0=bound leases=0",
    "kernel open /dev/vfio/vfio 2",
    "kernel get_api_version",
    "kernel open /dev/vfio/4 2",
    "kernel group_get_status",
    "kernel group_get_status",
    "kernel group_set_container",
    "kernel check_extension 3",
    "kernel set_iommu 3",
    "kernel group_get_device_fd 0000:02:01.0",
    "kernel close",
    "kernel group_get_device_fd 0000:02:02.0",
    "kernel close",
    "fdstore-keep 0 2",
    "state-save bindings=0000:02:01.0=bound,0000:02:02.0=bound leases=1",
]
RELEASE_BRIDGED = [
    "fdstore-drop 0",
    "kernel group_unset_container",
    "kernel close",
    "kernel close",
    "kernel open /dev/vfio/4 2",
    "kernel group_get_status",
    "kernel close",
    "sysfs-write bus/pci/devices/0000:02:01.0/driver/unbind <- 0000:02:01.0",
    "sysfs-write bus/pci/devices/0000:02:01.0/driver_override <- '\\n'",
    "sysfs-write bus/pci/drivers_probe <- 0000:02:01.0",
    "state-save bindings=0000:02:02.0=bound leases=1",
    "sysfs-write bus/pci/devices/0000:02:02.0/driver/unbind <- 0000:02:02.0",
    "sysfs-write bus/pci/devices/0000:02:02.0/driver_override <- '\\n'",
    "sysfs-write bus/pci/drivers_probe <- 0000:02:02.0",
    "state-save bindings=- leases=1",
    "state-save bindings=- leases=0",
]

RECORDINGS = {
    "acquire": ACQUIRE_NIC,
    "release": RELEASE_NIC,
    "acquire-bridged": ACQUIRE_BRIDGED,
}


def record(daemon: FaultyVfiod, nobody: Clients, devices: tuple[str, ...]) -> list[list[str]]:
    """Run one acquire and its release with every step logged: the steps of each."""
    daemon.start_recording()
    baseline = fd_kinds(daemon.fds())
    client = nobody.spawn(OPERATE, "close", *devices)
    try:
        granted = client.read()
        assert granted[0] == "ok", granted
        acquired = daemon.steps()
        client.send(f"release {granted[1]}")
        assert client.read() == ["ok", None]
        released = daemon.steps()[len(acquired) :]
    finally:
        client.finish()
    check_clean(daemon, baseline)
    return [acquired, released]


@pytest.mark.parametrize("devices", ["nic", "bridged"])
def test_recording(host: FaultyVfiod, nobody: Clients, devices: str) -> None:
    """A dry run logs the steps the recordings list, one by one."""
    if devices == "nic":
        wanted = [ACQUIRE_NIC, RELEASE_NIC]
        acquired, released = record(host, nobody, (str(NIC),))
    else:
        wanted = [ACQUIRE_BRIDGED, RELEASE_BRIDGED]
        acquired, released = record(host, nobody, (str(E1000_A),))
    assert [acquired, released] == wanted, "the daemon's steps changed:\n" + json.dumps(
        [acquired, released], indent=4
    )
    check_log(host)


# -- what must hold after a restart


@dataclasses.dataclass(frozen=True)
class View:
    """The host as the test sees it: vfiod's leases (on the bus), its state
    file, its fd store and the drivers."""

    leases: dict[str, Any]  # by lease id: (uid, devices)
    state: dict[str, Any]
    fd_store: list[str]
    drivers: dict[str, str | None]

    @classmethod
    def of(cls, daemon: FaultyVfiod) -> View:
        with root_client(daemon.bus) as root:
            inventory = root.inventory()
        return cls(
            leases={i.id: (i.uid, list(i.devices)) for i in inventory.leases.values()},
            state=daemon.state(),
            fd_store=daemon.fd_store,
            drivers={address: daemon.driver(address) for address in ORIGINAL},
        )

    def problems_if_there(self, op: Operation) -> list[str]:
        """What keeps the lease from being whole: the Lease object, its
        record, its fds in the store, its devices on vfio-pci."""
        problems = []
        if list(self.leases.values()) != [(NOBODY, list(op.devices))]:
            problems.append(f"vfiod serves the leases {self.leases}")
        records = self.state.get("leases", {})
        if set(records) != set(self.leases):
            problems.append(f"state.json records the leases {sorted(records)}")
        for record in records.values():
            if sorted(record.get("moved", ())) != sorted(op.moved):
                problems.append(f"state.json says the lease moved {record.get('moved')}")
            # (The store lists a name once per fd: a lease's fds share one.)
            if not record.get("fds") or sorted(record["fds"]) != sorted(set(self.fd_store)):
                problems.append(f"the fd store holds {self.fd_store}, the lease {record['fds']}")
        bindings = self.state.get("bindings", {})
        if sorted(bindings) != sorted(op.moved):
            problems.append(f"state.json records bindings of {sorted(bindings)}")
        for address in op.moved:
            binding = bindings.get(address, {})
            wanted = {"phase": "bound", "original_driver": ORIGINAL[address]}
            if {k: binding.get(k) for k in wanted} != wanted:
                problems.append(f"the binding of {address} is {binding}")
            if self.drivers[address] != "vfio-pci":
                problems.append(f"{address} is on {self.drivers[address]}")
        return problems

    def problems_if_gone(self) -> list[str]:
        problems = []
        if self.leases:
            problems.append(f"vfiod serves the leases {self.leases}")
        if self.state.get("leases") or self.state.get("bindings"):
            problems.append(f"state.json still says {self.state}")
        if self.fd_store:
            problems.append(f"the fd store still holds {self.fd_store}")
        wrong = {a: d for a, d in self.drivers.items() if d != ORIGINAL[a]}
        if wrong:
            problems.append(f"not on their original drivers: {wrong}")
        return problems


def settled(daemon: FaultyVfiod, op: Operation) -> str:
    """(b): wait for the lease to be whole ("there") or gone ("gone"); fail
    with what is half if it stays neither."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while True:
        view = View.of(daemon)
        there, gone = view.problems_if_there(op), view.problems_if_gone()
        if not there:
            return "there"
        if not gone:
            return "gone"
        if time.monotonic() > deadline:
            raise AssertionError(
                "the lease is half there after the restart:\n  as a lease: "
                + "; ".join(there)
                + "\n  as no lease: "
                + "; ".join(gone)
                + f"\n{daemon.latest_log()[-3000:]}"
            )
        time.sleep(0.05)


def check_clean(daemon: FaultyVfiod, baseline: Counter[str]) -> None:
    """(c): every device back, no binding or lease recorded, the fd store
    empty, and no fd in vfiod that a fresh vfiod does not have."""

    def problems() -> list[str]:
        found = View.of(daemon).problems_if_gone()
        extra = fd_kinds(daemon.fds()) - baseline
        if extra:
            found.append(f"vfiod holds fds a fresh vfiod does not: {dict(extra)}")
        return found

    deadline = time.monotonic() + SETTLE_TIMEOUT
    while found := problems():
        if time.monotonic() > deadline:
            raise AssertionError("; ".join(found) + f"\n{daemon.latest_log()[-3000:]}")
        time.sleep(0.05)


def check_log(daemon: FaultyVfiod) -> None:
    """(d)"""
    text = daemon.log()
    assert "Traceback" not in text, text
    assert "bug:" not in text, text


# -- the cases


def slug(step: str) -> str:
    """A short name for a step, for test ids: "sysfs-write-unbind", "kernel-open-vfio", ..."""
    kind, what = step.split(" ", 1)
    if kind == "sysfs-write":
        detail = what.split(" <- ")[0].rsplit("/", 1)[-1]
    elif kind == "kernel":
        method, *arguments = what.split(" ")
        detail = f"{method}-{arguments[0].rsplit('/', 1)[-1]}" if method == "open" else method
    elif kind == "state-save":
        fields = dict(field.split("=", 1) for field in what.split(" "))
        phases = [b.rsplit("=", 1)[1] for b in fields["bindings"].split(",") if b != "-"]
        detail = "-".join(phases or ["no-binding"]) + ("-lease" if fields["leases"] != "0" else "")
    else:
        detail = what.removeprefix("LEASE.")
    return f"{kind}-{detail}".replace("_", "-").replace(".", "-")


@dataclasses.dataclass(frozen=True)
class Case:
    operation: str
    side: str  # "before" or "after"
    step: int  # 1-based, within the recording
    client_gone: bool

    @property
    def name(self) -> str:
        return RECORDINGS[self.operation][self.step - 1]

    @property
    def kept(self) -> bool:
        """Whether the lease must outlive the kill: once it is recorded with
        its fds in the store (the acquire's last step), until its Release
        drops the first of them."""
        steps = RECORDINGS[self.operation]
        if OPERATIONS[self.operation].release:
            return (self.side, self.step) == ("before", 1)
        return (self.side, self.step) == ("after", len(steps))

    @property
    def id(self) -> str:
        gone = "-client-gone" if self.client_gone else ""
        return f"{self.operation}-{self.side}-step-{self.step:02d}-{slug(self.name)}{gone}"


def spread(steps: list[str]) -> list[int]:
    """The first and last step, and the first of each kind (1-based)."""
    chosen = {1, len(steps)}
    for kind in ("sysfs-write", "kernel", "state-save", "fdstore-keep", "fdstore-drop"):
        chosen |= {next((i for i, s in enumerate(steps, 1) if s.startswith(kind + " ")), 1)}
    return sorted(chosen)


def cases() -> list[Case]:
    exhaustive = os.environ.get(EXHAUSTIVE_VARIABLE) == "all"
    found = []
    for operation, steps in RECORDINGS.items():
        every = list(range(1, len(steps) + 1))
        for gone in (False, True):
            chosen = every if exhaustive else [1, len(steps)] if gone else spread(steps)
            found += [
                Case(operation, side, step, gone) for step in chosen for side in ("before", "after")
            ]
    return found


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in cases()])
def test_sigkill_at_a_step(
    private_bus: PrivateBus, tmp_path: Path, nobody: Clients, case: Case
) -> None:
    op = OPERATIONS[case.operation]
    kill_at = case.step + (len(ACQUIRE_NIC) if op.release else 0)
    with faulty_vfiod(private_bus, tmp_path / "vfiod") as daemon:
        daemon.start_killing(case.side, kill_at)
        baseline = fd_kinds(daemon.fds())
        client = nobody.spawn(OPERATE, "close", *op.devices)
        try:
            outcome = client.read()
            if op.release:
                assert outcome[0] == "ok", f"the acquire before the release failed: {outcome}"
                client.send(f"release {outcome[1]}")
                outcome = client.read()
            returncode = daemon.died(DEATH_TIMEOUT if outcome[0] == "error" else 1.0)
            assert returncode == -signal.SIGKILL, (
                f"vfiod was not killed {case.side} step {kill_at} ({case.name}): the "
                f"{op.name} ended with {outcome} and vfiod with {returncode}; is the "
                f"recording stale? It took the steps {daemon.steps()}"
            )
            steps = daemon.steps()
            assert steps[-1] == f"# killed {case.side} step {kill_at}", steps
            assert steps[kill_at - 1] == case.name, f"the recording is stale: {steps}"
            if case.client_gone:
                client.kill()
            daemon.start()
            with root_client(private_bus) as root:  # (a)
                assert root.inventory().devices[str(NIC)].address == str(NIC)
            if not case.client_gone:
                found = settled(daemon, op)  # (b)
                assert found == ("there" if case.kept else "gone"), daemon.latest_log()
                client.send("release-mine")
                released = client.read()
                assert released[0] == "ok", released
                client.finish()
            check_clean(daemon, baseline)  # (c)
            check_log(daemon)  # (d)
        finally:
            if client.process.poll() is None:
                client.kill()
        assert daemon.stop() == 0, daemon.log()


@pytest.mark.parametrize(
    "step", [1, 5], ids=lambda step: f"after-release-step-{step:02d}-{slug(RELEASE_NIC[step - 1])}"
)
def test_sigkill_while_a_released_lease_drains(
    private_bus: PrivateBus, tmp_path: Path, nobody: Clients, step: int
) -> None:
    """The client releases while it still holds its device fd (the lease
    drains) and vfiod dies: the restarted vfiod must not take the device
    from under the fd, and gives it back once the client closes it."""
    op = OPERATIONS["release"]
    kill_at = len(ACQUIRE_NIC) + step
    with faulty_vfiod(private_bus, tmp_path / "vfiod") as daemon:
        daemon.start_killing("after", kill_at)
        baseline = fd_kinds(daemon.fds())
        client = nobody.spawn(OPERATE, "hold", *op.devices)
        try:
            granted = client.read()
            assert granted[0] == "ok", granted
            client.send(f"release {granted[1]}")
            outcome = client.read()
            assert daemon.died(DEATH_TIMEOUT if outcome[0] == "error" else 1.0) == -signal.SIGKILL
            assert daemon.steps()[kill_at - 1 :] == [
                RELEASE_NIC[step - 1],
                f"# killed after step {kill_at}",
            ]
            daemon.start()
            time.sleep(1.2)  # two rounds of the drain timer
            view = View.of(daemon)
            assert view.drivers[str(NIC)] == "vfio-pci", "taken from under the client's fd"
            assert list(view.state["leases"]) == [granted[1].rsplit("/", 1)[1]], view.state
            assert view.state["bindings"][str(NIC)]["phase"] == "bound", view.state
            assert view.fd_store == []
            client.send("close-fds")
            assert client.read() == ["ok", None]
            daemon.wait_for(lambda: daemon.driver(str(NIC)) == "e1000e", "e1000e coming back")
            client.send("release-mine")
            assert client.read() == ["ok", []]
            client.finish()
            check_clean(daemon, baseline)
            check_log(daemon)
        finally:
            if client.process.poll() is None:
                client.kill()
        assert daemon.stop() == 0, daemon.log()


# -- a state file that is not what vfiod wrote


def _bindings_as_a_list(seed: dict[str, Any]) -> object:
    listed = [{"address": a, **record} for a, record in seed["bindings"].items()]
    return {**seed, "bindings": listed}


def _bad_lease_beside_a_good_binding(seed: dict[str, Any]) -> object:
    return {**seed, "leases": {"0123456789abcdef": {"uid": "nobody", "groups": 10}}}


CORRUPTIONS: dict[str, Callable[[dict[str, Any]], object]] = {
    "bindings-as-a-list": _bindings_as_a_list,
    "bad-lease-beside-a-good-binding": _bad_lease_beside_a_good_binding,
}


@pytest.mark.parametrize(
    ("corruption", "restores"),
    [
        pytest.param("intact", True, id="intact"),
        pytest.param("bindings-as-a-list", False, id="bindings-as-a-list"),
        pytest.param("bad-lease-beside-a-good-binding", True, id="bad-lease-beside-a-good-binding"),
        pytest.param("a-directory", False, id="a-directory"),
        pytest.param("truncated", False, id="truncated"),
    ],
)
def test_a_corrupt_state_file(
    private_bus: PrivateBus, tmp_path: Path, nobody: Clients, corruption: str, restores: bool
) -> None:
    """vfiod killed mid-bind leaves a state file that says 0000:00:10.0 is
    being bound (from e1000e); with that file corrupted, vfiod still starts,
    says what is wrong with the file, gives the device back where the valid
    records allow it ("restores"), and goes on keeping its state."""
    unbind = ACQUIRE_NIC.index(
        "sysfs-write bus/pci/devices/0000:00:10.0/driver/unbind <- 0000:00:10.0"
    )
    with faulty_vfiod(private_bus, tmp_path / "vfiod") as daemon:
        daemon.start_killing("after", unbind + 1)
        client = nobody.spawn(OPERATE, "close", str(NIC))
        try:
            assert client.read()[0] == "error"
            assert daemon.died() == -signal.SIGKILL
        finally:
            client.kill()
        seed = daemon.state()
        assert seed["bindings"][str(NIC)]["phase"] == "binding", seed
        assert seed["bindings"][str(NIC)]["original_driver"] == "e1000e", seed
        assert daemon.driver(str(NIC)) is None
        # The state in one file, as a snapshot (no journal), to be damaged.
        text = json.dumps(seed, indent=1)
        daemon.state_path.write_text(text)
        Path(str(daemon.state_path) + JOURNAL_SUFFIX).unlink(missing_ok=True)
        if corruption == "a-directory":
            daemon.state_path.unlink()
            daemon.state_path.mkdir()
        elif corruption == "truncated":
            daemon.state_path.write_text(text[: len(text) // 2])
        elif corruption != "intact":
            daemon.state_path.write_text(json.dumps(CORRUPTIONS[corruption](seed), indent=1))
        daemon.start()
        with root_client(private_bus) as root:
            assert str(NIC) in root.inventory().devices
        log = daemon.latest_log()
        if corruption != "intact":
            assert re.search(r"vfiod: (WARNING|ERROR): .*state\.json", log), log
        if restores:
            daemon.wait_for(lambda: daemon.driver(str(NIC)) == "e1000e", "e1000e coming back")
        # It keeps its state where it can: a lease of other devices comes and goes.
        client = nobody.spawn(OPERATE, "close", str(E1000_A))
        try:
            granted = client.read()
            assert granted[0] == "ok", granted
            client.send(f"release {granted[1]}")
            assert client.read() == ["ok", None]
        finally:
            client.finish()
        assert daemon.driver(str(E1000_A)) == daemon.driver(str(E1000_B)) == "e1000"
        assert daemon.state()["leases"] == {}
        check_log(daemon)
        assert daemon.stop() == 0, daemon.log()


# -- many leases

# Acquires and releases one more group until killed: vfiod dies mid-change.
CHURN = """\
from tests.fakehost import scale_address
device = str(scale_address(2 * int(sys.argv[1])))
say("churning")
while True:
    try:
        lease = vfiod.acquire([device], backend="legacy", open_devices=False)
        lease.close()
        vfiod.release(lease)
    except VfiodError:
        time.sleep(0.01)
"""


@pytest.mark.parametrize(("leases", "backend"), [(1000, "legacy"), (10000, "iommufd")])
def test_sigkill_with_many_leases(
    private_bus: PrivateBus, tmp_path: Path, nobody: Clients, leases: int, backend: str
) -> None:
    """vfiod is killed while 1,000 or 10,000 leases exist (and another client
    is acquiring and releasing): the next vfiod, started as systemd starts
    it (the fd store's fds, and their names in LISTEN_FDNAMES, of which
    execve takes at most 128 KiB), adopts every one of them from the fd
    store and its journal, and once their client leaves, gives everything
    back and keeps nothing. (10,000 iommufd leases: one fd each, in vfiod
    and in the fd store's stand-in, within a 20,000-fd hard limit.)"""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = FDS_PER_LEASE[backend] * leases + 4096
    limit = max(hard, needed)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))  # what LimitNOFILE= does
    except (ValueError, OSError):
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {needed}: raise it (ulimit -Hn)")
    daemon = FaultyVfiod(private_bus, tmp_path / "vfiod", f"scale:{2 * leases + 2}")
    daemon.open(NOBODY_ANY_POLICY)
    holder = churn = None
    try:
        daemon.start()
        holder = nobody.spawn(HOLD_MANY, str(leases), backend)
        assert holder.read(timeout=60 + leases * 0.02) == "held"
        churn = nobody.spawn(CHURN, str(leases))
        assert churn.read() == "churning"
        time.sleep(0.3)
        daemon.kill()
        churn.kill()
        daemon.start()
        with root_client(private_bus) as root:
            held = root.inventory().leases
        mine = [info for info in held.values() if info.details and info.details.state == "active"]
        assert len(mine) >= leases, f"{len(mine)} of {leases} leases adopted"
        assert "re-adopted" in daemon.latest_log()
        holder.send()  # its connection closes: every lease ends
        holder.finish()
        daemon.wait_for(
            lambda: not daemon.state().get("leases"), "every lease ending", 60 + leases * 0.01
        )
        daemon.wait_for(lambda: daemon.stored()[0] == [], "the fd store emptying", 30)
        assert daemon.state().get("bindings") == {}
        assert daemon.stop() == 0, daemon.log()
    finally:
        for client in (holder, churn):
            if client is not None and client.process.poll() is None:
                client.kill()
        daemon.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
