"""vfiod itself on a private system bus, on a fake host, for the bus tests and
the benchmarks.

The daemon runs as root in a process of its own (``python -m tests.fakehost``),
exactly as `vfiod` runs it, except that the host is the fake one: the test
reads the fake sysfs tree to see drivers change. Readiness comes the systemd
way, as READY=1 on a notify socket the test holds.

Clients run as nobody in processes of their own: ``Clients.run`` for a
snippet that runs to its end, ``Clients.spawn`` for one the test talks to
line by line.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

from tests.bus import (
    NOBODY,
    PROJECT,
    PrivateBus,
    _check_runnable,
    _child_env,
    _other_uid_env,
    _setpriv_argv,
)
from tests.fakehost import SLOW_UNBIND_FILE
from vfiod.host.sysfs import Sysfs
from vfiod.pci import PciAddress
from vfiod.state import JOURNAL_SUFFIX, read_state, state_text

START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0

# What systemd does with one notice: the lines go to notices.log; FDSTORE=1
# adds every fd it carries under its FDNAME, FDSTOREREMOVE=1 closes every fd
# of that name; the store's names, one per fd, go to fdstore.json (whole,
# for the test reading it). For the service managers below and
# tests/bus/test_faults.py.
KEEP_NOTICE = """\
def keep(data, fds, store, directory, listing=True):
    lines = data.decode().splitlines()
    with open(os.path.join(directory, "notices.log"), "a") as notices:
        notices.write("".join(line + "\\n" for line in lines))
    fields = dict(line.split("=", 1) for line in lines if "=" in line)
    name = fields.get("FDNAME", "stored")
    if fields.get("FDSTORE") == "1":
        store.setdefault(name, []).extend(fds)
        fds = []
    if fields.get("FDSTOREREMOVE") == "1":
        for fd in store.pop(name, []):
            os.close(fd)
    for fd in fds:
        os.close(fd)
    if not listing:
        return
    listing = os.path.join(directory, "fdstore.json")
    with open(listing + ".new", "w") as f:
        json.dump(sorted(n for n, kept in store.items() for _ in kept), f)
    os.rename(listing + ".new", listing)

"""

# The service manager's side of NOTIFY_SOCKET, as systemd does it where it
# matters here (KEEP_NOTICE). Ends on SIGTERM, closing whatever it holds.
SERVE_NOTIFY = (
    """\
import json, os, signal, socket, sys
"""
    + KEEP_NOTICE
    + """\
path, directory, listing = sys.argv[1], sys.argv[2], sys.argv[3] == "list"
import resource  # it keeps every fd of every lease, as systemd does
resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
if os.path.exists(path):
    os.unlink(path)
sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
sock.bind(path)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
store = {}
print("listening", flush=True)
while True:
    data, fds, _flags, _addr = socket.recv_fds(sock, 65536, 253)
    keep(data, fds, store, directory, listing)
"""
)

# Every device to nobody, without managed binding (a scale host's devices
# start on vfio-pci), and a client snippet (after CLIENT) that holds a lease
# of the first function of each of the first argv[1] groups of a scale host
# (of backend argv[2], legacy without it).
NOBODY_ANY_POLICY = """
[[rule]]
name = "nobody-all"
effect = "allow"
address = "*"
users = ["nobody"]
"""
HOLD_MANY = """\
from tests.fakehost import scale_address
backend = sys.argv[2] if len(sys.argv) > 2 else "legacy"
for i in range(int(sys.argv[1])):
    lease = vfiod.acquire([str(scale_address(2 * i))], backend=backend, open_devices=False)
    lease.close()  # vfiod keeps its own; the lease follows this connection
say("held")
sys.stdin.readline()
"""
# The fds vfiod holds for each of HOLD_MANY's leases (no owner pidfd), and
# as many in the fd store: a container and a group, or an iommufd.
FDS_PER_LEASE = {"legacy": 2, "iommufd": 1}

# Prepended to client snippets: the project's own client, as nobody.
# vfioctl as a client snippet (for Clients.spawn): its stdout is the test's.
VFIOCTL = "from vfiod.cli import main\nsys.exit(main(sys.argv[1:]))\n"

CLIENT = """\
import json, os, sys, time
from vfiod.client import Client, VfiodError

vfiod = Client()

def failure(function, *args, **kwargs):
    try:
        function(*args, **kwargs)
    except VfiodError as e:
        return [e.kind, e.message]
    return None

def say(value):
    print(json.dumps(value), flush=True)
"""


class VfiodProcess:
    """A running vfiod: ``argv`` runs it; ``sysfs`` and ``state_path`` are
    where the test looks at the host it changes."""

    def __init__(
        self,
        bus: PrivateBus,
        directory: Path,
        argv: list[str],
        *,
        sysfs: str,
        state_path: Path,
        policy_root: Path,
        environment: Mapping[str, str] | None = None,
        list_fd_store: bool = True,
    ) -> None:
        self.bus = bus
        self.environment = dict(environment or {})
        # The stand-in service manager writes the store's names to
        # fdstore.json at every notice (fd_store reads it): a cost of the
        # stand-in that grows with the leases, which benchmarks leave out.
        self.list_fd_store = list_fd_store
        self.directory = directory
        self.argv = argv
        self.sysfs = Sysfs(sysfs)
        self.state_path = state_path
        self.policy_root = policy_root
        self.log_path = directory / "vfiod.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.manager: subprocess.Popen[bytes] | None = None  # see serve_notify

    @property
    def policy_file(self) -> Path:
        return self.policy_root / "etc/vfiod/policy.d/50-test.toml"

    def driver(self, address: str) -> str | None:
        return self.sysfs.driver(PciAddress.parse(address))

    def state(self) -> dict[str, Any]:
        """What vfiod has recorded: its state file with its journal replayed,
        in the file's form ({} when there is neither)."""
        path = self.state_path
        if not path.exists() and not Path(str(path) + JOURNAL_SUFFIX).exists():
            return {}
        state, _problems = read_state(str(path))
        return dict(json.loads(state_text(state)))

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def fds(self) -> list[str]:
        """The daemon's open fds and what they are."""
        names = []
        for fd in sorted(os.listdir(f"/proc/{self.pid}/fd"), key=int):
            with contextlib.suppress(FileNotFoundError):
                names.append(os.readlink(f"/proc/{self.pid}/fd/{fd}"))
        return names

    @property
    def notices(self) -> list[str]:
        """What vfiod told its service manager so far, line by line."""
        path = self.directory / "notices.log"
        return path.read_text().splitlines() if path.exists() else []

    @property
    def fd_store(self) -> list[str]:
        """The names of the fds in its fd store now, one per fd, sorted."""
        path = self.directory / "fdstore.json"
        return list(json.loads(path.read_text())) if path.exists() else []

    def start(self) -> None:
        notify_path = self.directory / "notify.sock"
        (self.directory / "notices.log").unlink(missing_ok=True)
        # The service manager runs in a process of its own: a thread of the
        # test would stall while the test sits in a blocking D-Bus call.
        self.manager = subprocess.Popen(
            [
                *(sys.executable, "-s", "-c", SERVE_NOTIFY),
                *(str(notify_path), str(self.directory), "list" if self.list_fd_store else "-"),
            ],
            env=_child_env(None, {}),
            cwd=PROJECT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
        )
        assert self.manager.stdout is not None
        if self.manager.stdout.readline().strip() != b"listening":
            self.stop()
            raise RuntimeError("the notify socket's listener did not start")
        self.manager.stdout.close()
        env = _child_env(self.bus.address, {"NOTIFY_SOCKET": str(notify_path), **self.environment})
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.argv,
                env=env,
                cwd=PROJECT,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while "READY=1" not in self.notices:
            if self.process.poll() is not None:
                self.stop()
                raise RuntimeError(f"vfiod exited at start:\n{self.log()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"vfiod was not ready in {START_TIMEOUT} s:\n{self.log()}")
            time.sleep(0.05)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def slow_unbind(self, seconds: float) -> None:
        """From now, each unbind takes ``seconds`` (run_vfiod(slow_unbind=...))."""
        (self.directory / SLOW_UNBIND_FILE).write_text(str(seconds))

    def stop(self) -> int:
        process, self.process = self.process, None
        try:
            if process is None:
                return 0
            process.send_signal(signal.SIGTERM)
            try:
                return process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                raise AssertionError(f"vfiod did not stop on SIGTERM:\n{self.log()}") from None
        finally:
            manager, self.manager = self.manager, None
            if manager is not None:
                time.sleep(0.1)  # the last messages (STOPPING=1) are read
                manager.terminate()
                manager.wait()

    def wait_for(self, condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} did not happen in {timeout} s:\n{self.log()[-3000:]}")
            time.sleep(0.05)


@contextlib.contextmanager
def _running(daemon: VfiodProcess) -> Iterator[VfiodProcess]:
    daemon.start()
    try:
        yield daemon
    finally:
        returncode = daemon.stop()
    assert returncode == 0, f"vfiod exited with {returncode}:\n{daemon.log()}"
    assert "Traceback" not in daemon.log(), daemon.log()
    assert "STOPPING=1" in daemon.notices


def run_vfiod(
    bus: PrivateBus,
    directory: Path,
    policy: str,
    topology: str = "small",
    *,
    slow_unbind: float | None = None,
    environment: Mapping[str, str] | None = None,
    soft_fd_limit: int | None = None,
    list_fd_store: bool = True,
) -> contextlib.AbstractContextManager[VfiodProcess]:
    """vfiod on a fake host (python -m tests.fakehost) built in ``directory``;
    ``slow_unbind``: seconds each unbind takes (``VfiodProcess.slow_unbind``
    changes it); ``environment``: more of vfiod's environment (WATCHDOG_USEC);
    ``soft_fd_limit``: vfiod starts with this soft RLIMIT_NOFILE (systemd's
    default for services is 1024)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "policy.toml").write_text(policy)
    if slow_unbind is not None:
        (directory / SLOW_UNBIND_FILE).write_text(str(slow_unbind))
    argv = [sys.executable, "-s", "-m", "tests.fakehost", str(directory), topology]
    if soft_fd_limit is not None:
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        argv = ["prlimit", f"--nofile={soft_fd_limit}:{hard}", "--", *argv]
    host = directory / "host"
    daemon = VfiodProcess(
        bus,
        directory,
        argv,
        sysfs=str(host / "sys"),
        state_path=host / "run/state.json",
        policy_root=host / "root",
        environment=environment,
        list_fd_store=list_fd_store,
    )
    return _running(daemon)


def run_real_vfiod(
    bus: PrivateBus, directory: Path, policy: str, settings: str = ""
) -> contextlib.AbstractContextManager[VfiodProcess]:
    """vfiod itself (python -m vfiod) on this host, with its policy and state
    in ``directory``: for the VM tests, on a real kernel."""
    root = directory / "root"
    (root / "etc/vfiod/policy.d").mkdir(parents=True, exist_ok=True)
    (root / "etc/vfiod/policy.d/50-test.toml").write_text(policy)
    (root / "etc/vfiod/vfiod.toml").write_text(settings)
    state = directory / "run/state.json"
    argv = [sys.executable, "-s", "-m", "vfiod", "daemon"]
    argv += ["--root", str(root), "--state", str(state)]
    daemon = VfiodProcess(bus, directory, argv, sysfs="/sys", state_path=state, policy_root=root)
    return _running(daemon)


class Spawned:
    """A client snippet running as another uid; the test reads its JSON lines
    and writes lines to it."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.process = process
        self.stderr = ""  # once it has ended

    @property
    def stdin(self) -> IO[str]:
        assert self.process.stdin is not None
        return self.process.stdin

    def read(self, timeout: float = 20.0) -> Any:
        assert self.process.stdout is not None
        ready = select.select([self.process.stdout], [], [], timeout)[0]
        line = self.process.stdout.readline() if ready else ""
        if not line:
            self.process.kill()
            _, err = self.process.communicate()
            self._close()
            raise AssertionError(
                f"the client said nothing (exit {self.process.returncode}):\n{err}"
            )
        return json.loads(line)

    def send(self, line: str = "") -> None:
        self.stdin.write(line + "\n")
        self.stdin.flush()

    def finish(self, timeout: float = 20.0) -> str:
        """Close its stdin, wait for it; its stderr. Fails on a non-zero exit."""
        try:
            _, err = self.process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            _, err = self.process.communicate()
        self._close()
        assert self.process.returncode == 0, f"client exited {self.process.returncode}:\n{err}"
        return err

    def kill(self) -> None:
        """Kill it (if it still runs) and keep what it wrote to stderr."""
        self.process.kill()
        _, self.stderr = self.process.communicate()
        self._close()

    def _close(self) -> None:
        for pipe in (self.process.stdin, self.process.stdout, self.process.stderr):
            if pipe is not None:
                pipe.close()


class Clients:
    """Client processes as ``uid`` on ``bus``."""

    def __init__(self, bus: PrivateBus, uid: int = NOBODY) -> None:
        self.bus = bus
        self.uid = uid

    def run(self, code: str, *args: str, timeout: float = 30.0) -> Any:
        """Run CLIENT + ``code`` to its end; the JSON it printed last."""
        result = self.bus.run_as(CLIENT + code, args=args, uid=self.uid, timeout=timeout).check()
        return json.loads(result.stdout.splitlines()[-1])

    def spawn(self, code: str, *args: str) -> Spawned:
        _check_runnable(self.uid, self.uid)
        process = subprocess.Popen(
            _setpriv_argv(self.uid, self.uid, ["-c", CLIENT + code, *args]),
            env=_other_uid_env(self.bus.child_address, {}),
            cwd="/",
            pass_fds=self.bus.child_fds,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        return Spawned(process)
