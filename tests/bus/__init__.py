"""A private system bus for the bus tests and the bus benchmarks.

`start_private_bus(directory)` runs a `dbus-daemon` of its own (no systemd,
no service activation) from a configuration that mirrors Debian's
/usr/share/dbus-1/system.conf where it matters and includes this checkout's
dbus/org.vfiod1.conf, so the policy under test is the one that is installed.

The socket lives in `directory`, which stays private to root (pytest's
tmp_path is 0700 under /tmp/pytest-of-root, which pytest keeps 0700). Another
uid reaches the bus through an O_PATH descriptor of the socket, inherited by
the child and named by `unix:path=/proc/self/fd/N`: connect() follows that
link without searching the private directories, and the socket itself is
0777 as on the real system bus. So nothing on the machine is made more
accessible than it was.

Children as another uid run this venv's interpreter and this checkout
wherever they live, a 0700 home folder included: the same trick, O_PATH
descriptors of Python's home, the venv's site-packages and the checkout,
inherited and named /proc/self/fd/N (python_view). The first run per uid
checks that the uid can start it and import sdbus and vfiod, and says what
is not readable when it cannot.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import functools
import gc
import os
import select
import shutil
import stat
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import sdbus
from sdbus import DbusInterfaceCommonAsync, DbusUnprivilegedFlag, dbus_method_async
from sdbus.sd_bus_internals import SdBusMessage

PROJECT = Path(__file__).resolve().parents[2]
POLICY = PROJECT / "dbus" / "org.vfiod1.conf"
NOBODY = 65534
ADDRESS_VARIABLE = "DBUS_SYSTEM_BUS_ADDRESS"
START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0
MAX_SOCKET_PATH = 107  # sizeof(sun_path) - 1

NAME = "org.vfiod1"
MANAGER_INTERFACE = "org.vfiod1.Manager"
OTHER_INTERFACE = "org.example.Other"
TEST_PATH = "/org/vfiod1/test"
READY = "ready"
PAYLOAD = b"vfiod test payload"
# dbus-daemon's max_message_unix_fds, the same on every bus (system.conf
# only documents it): a message with more fds is not delivered, and the
# connection that sent it is disconnected.
MAX_MESSAGE_UNIX_FDS = 16

# Debian's system.conf without what needs a system (user messagebus, fork,
# pid file, syslog, service activation and its setuid helper, the system.d
# directories); the default and root policies are copied rule for rule.
BUS_CONFIG = """\
<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <auth>EXTERNAL</auth>
  <listen>unix:path={socket}</listen>

  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus.Introspectable"/>
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus.Properties"/>
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus.Containers1"/>
    <deny send_destination="org.freedesktop.DBus"
          send_interface="org.freedesktop.DBus"
          send_member="UpdateActivationEnvironment"/>
    <deny send_destination="org.freedesktop.DBus"
          send_interface="org.freedesktop.DBus.Debug.Stats"/>
    <deny send_destination="org.freedesktop.DBus"
          send_interface="org.freedesktop.systemd1.Activator"/>
  </policy>
  <policy user="root">
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.systemd1.Activator"/>
  </policy>
  <policy user="root">
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus.Monitoring"/>
  </policy>
  <policy user="root">
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus.Debug.Stats"/>
  </policy>

  <include>{policy}</include>
{servicedir}</busconfig>
"""


class BusUnavailableError(RuntimeError):
    """dbus-daemon or setpriv is not installed (`make deps` installs them)."""


@dataclasses.dataclass(frozen=True)
class RunResult:
    returncode: int
    stdout: str
    stderr: str

    def check(self) -> RunResult:
        """Raise with the child's output unless it exited with 0."""
        if self.returncode != 0:
            raise AssertionError(
                f"child exited with {self.returncode}\n"
                f"--- stdout\n{self.stdout}--- stderr\n{self.stderr}"
            )
        return self


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise BusUnavailableError(f"{name} is not installed (make deps installs it)")
    return path


def require_tools() -> None:
    """Raise BusUnavailableError unless dbus-daemon and setpriv are installed."""
    _tool("dbus-daemon")
    _tool("setpriv")


class PythonView:
    """How another uid runs this venv's Python with this checkout, wherever
    they live (a 0700 home folder, a pyenv under /root): O_PATH descriptors
    of Python's home, the venv's site-packages and the checkout, kept open
    for the session and inherited by the child, which names them
    /proc/self/fd/N. A path through such a link is not searched from /, so
    only the three trees themselves must be readable by others, not the
    folders they sit in."""

    def __init__(self) -> None:
        home = os.path.realpath(sys.base_prefix)
        interpreter = os.path.realpath(sys.executable)
        self.interpreter = os.path.relpath(interpreter, home)
        if self.interpreter.startswith(".."):
            raise RuntimeError(f"{interpreter} is not under Python's home {home}")
        sites = dict.fromkeys(sysconfig.get_path(k) for k in ("purelib", "platlib"))
        flags = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
        self.home = os.open(home, flags)
        self.paths = [os.open(d, flags) for d in (str(PROJECT), *sites)]
        self.trees = (home, str(PROJECT), *sites)  # for messages

    @property
    def fds(self) -> tuple[int, ...]:
        return (self.home, *self.paths)

    def argv(self, args: Sequence[str]) -> list[str]:
        # -s: no user site directory, only the venv and this checkout.
        return [f"/proc/self/fd/{self.home}/{self.interpreter}", "-s", *args]

    def env(self) -> dict[str, str]:
        return {
            "PYTHONHOME": f"/proc/self/fd/{self.home}",
            # The checkout first, so the project imports whether or not it is installed.
            "PYTHONPATH": ":".join(f"/proc/self/fd/{fd}" for fd in self.paths),
        }


@functools.cache
def python_view() -> PythonView:
    """The session's PythonView: opened on first use (tests/conftest.py
    does that before any test, so its fds are no test's leak)."""
    return PythonView()


def _unreadable(tree: str) -> list[str]:
    """Folders at or below ``tree`` that others may not search (their files
    others may not read), for an error message; only the first few."""
    bad: list[str] = []
    for directory, subdirs, files in os.walk(tree):
        for name in (directory, *(os.path.join(directory, f) for f in files)):
            try:
                mode = os.lstat(name).st_mode
            except OSError:
                continue
            need = stat.S_IXOTH if stat.S_ISDIR(mode) else stat.S_IROTH
            if not stat.S_ISLNK(mode) and not mode & need:
                bad.append(f"{name} (mode {stat.filemode(mode)})")
        subdirs[:] = [d for d in subdirs if d not in ("__pycache__", ".git", "build")]
        if len(bad) >= 5:
            break
    return bad


@functools.cache
def _check_runnable(uid: int, gid: int) -> None:
    """Fail clearly when `uid` cannot run this Python or import the project
    and sdbus from this checkout; once per uid."""
    probe = "import sys, sdbus, vfiod; print('%d.%d' % sys.version_info[:2])"
    result = subprocess.run(
        _setpriv_argv(uid, gid, ["-c", probe]),
        env=_other_uid_env(None, {}),
        cwd="/",
        pass_fds=python_view().fds,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    ours = "{}.{}".format(*sys.version_info[:2])
    if result.returncode == 0 and result.stdout.strip() != ours:
        raise AssertionError(f"uid {uid} runs Python {result.stdout.strip()}, this is {ours}")
    if result.returncode != 0:
        unreadable = [bad for tree in python_view().trees for bad in _unreadable(tree)]
        raise AssertionError(
            f"uid {uid} cannot run this Python with this checkout "
            f"(exit {result.returncode}): {result.stderr.strip()}\n"
            f"not readable by others: {', '.join(unreadable[:5]) or 'nothing found'}"
        )


def _setpriv_argv(uid: int, gid: int, args: Sequence[str]) -> list[str]:
    """This Python, as ``uid`` with no supplementary groups: the child needs
    python_view().fds (in pass_fds) and _child_env's environment."""
    return [
        _tool("setpriv"),
        f"--reuid={uid}",
        f"--regid={gid}",
        "--clear-groups",
        "--",
        *python_view().argv(args),
    ]


def _child_env(address: str | None, extra: Mapping[str, str]) -> dict[str, str]:
    """The environment of a child of ours as root (this venv's interpreter)."""
    env = {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "LANG": "C.UTF-8",
        # The checkout, so the project imports whether or not it is installed;
        # the child cannot write bytecode caches into it anyway.
        "PYTHONPATH": str(PROJECT),
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    if address is not None:
        env[ADDRESS_VARIABLE] = address
    env.update(extra)
    return env


def _other_uid_env(address: str | None, extra: Mapping[str, str]) -> dict[str, str]:
    """The environment of a child as another uid (_setpriv_argv, python_view().fds)."""
    return _child_env(address, {**python_view().env(), **extra})


class PrivateBus:
    """A running private dbus-daemon; see the module docstring."""

    def __init__(
        self, directory: Path, service_dir: Path | None = None, extra_config: str = ""
    ) -> None:
        self.directory = directory
        self.service_dir = service_dir
        self.extra_config = extra_config  # more <policy> elements, for a test's own services
        self.config_path = directory / "bus.conf"
        self.socket_path = directory / "bus.sock"
        self.log_path = directory / "dbus-daemon.log"
        if len(os.fsencode(self.socket_path)) > MAX_SOCKET_PATH:
            raise ValueError(f"socket path too long for AF_UNIX: {self.socket_path}")
        self.address = f"unix:path={self.socket_path}"
        self._process: subprocess.Popen[bytes] | None = None
        self._socket_fd = -1

    # -- life

    def start(self) -> None:
        dbus_daemon = _tool("dbus-daemon")
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.config_path.write_text(
            BUS_CONFIG.format(
                socket=self.socket_path,
                policy=POLICY,
                servicedir=(
                    f"  <servicedir>{self.service_dir}</servicedir>\n" if self.service_dir else ""
                )
                + self.extra_config,
            ),
            encoding="utf-8",
        )
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
        try:
            with open(self.log_path, "wb") as log:
                self._process = subprocess.Popen(
                    [
                        dbus_daemon,
                        f"--config-file={self.config_path}",
                        "--nofork",
                        "--nopidfile",
                        "--nosyslog",
                        f"--print-address={write_end}",
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=log,
                    pass_fds=[write_end],
                )
            os.close(write_end)
            write_end = -1
            printed = self._read_address(read_end)
        except BaseException:
            self.stop()
            raise
        finally:
            os.close(read_end)
            if write_end >= 0:
                os.close(write_end)
        if not printed.startswith(self.address + ","):
            self.stop()
            raise RuntimeError(f"dbus-daemon listens on {printed!r}, not {self.address!r}")
        self._socket_fd = os.open(self.socket_path, os.O_PATH | os.O_CLOEXEC)

    def _read_address(self, fd: int) -> str:
        """dbus-daemon prints its address once it listens."""
        deadline = time.monotonic() + START_TIMEOUT
        data = b""
        while not data.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise RuntimeError(f"dbus-daemon did not start in {START_TIMEOUT} s{self._log()}")
            chunk = os.read(fd, 4096)
            if not chunk:
                raise RuntimeError(f"dbus-daemon exited at start{self._log()}")
            data += chunk
        return data.decode().strip()

    def _log(self) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip()
        except OSError:
            return ""
        return f":\n{text}" if text else ""

    def stop(self) -> None:
        if self._socket_fd >= 0:
            os.close(self._socket_fd)
            self._socket_fd = -1
        process, self._process = self._process, None
        if process is None:
            return
        process.terminate()
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    @property
    def pid(self) -> int:
        assert self._process is not None, "the bus is not running"
        return self._process.pid

    # -- connections in this process (root)

    def connect(self) -> sdbus.SdBus:
        """A new connection of this process, opened the way vfiod opens the
        system bus: sd_bus_open_system(), which reads DBUS_SYSTEM_BUS_ADDRESS
        when it is called (and only then)."""
        saved = os.environ.get(ADDRESS_VARIABLE)
        os.environ[ADDRESS_VARIABLE] = self.address
        try:
            return sdbus.sd_bus_open_system()
        finally:
            if saved is None:
                del os.environ[ADDRESS_VARIABLE]
            else:
                os.environ[ADDRESS_VARIABLE] = saved

    # -- other uids

    @property
    def child_address(self) -> str:
        """The bus address for a child started with `pass_fds=self.child_fds`."""
        assert self._socket_fd >= 0, "the bus is not running"
        return f"unix:path=/proc/self/fd/{self._socket_fd}"

    @property
    def child_fds(self) -> tuple[int, ...]:
        """What a child as another uid inherits: the bus socket and python_view()."""
        return (self._socket_fd, *python_view().fds)

    def run_as(
        self,
        code: str | None = None,
        *,
        module: str | None = None,
        args: Sequence[str] = (),
        uid: int = NOBODY,
        gid: int | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float = 30.0,
    ) -> RunResult:
        """Run a Python snippet (`code`) or `module` (python -m) with this
        venv's interpreter as `uid` (default nobody, 65534) with no
        supplementary groups, connected to this bus through
        DBUS_SYSTEM_BUS_ADDRESS, with the checkout on PYTHONPATH and "/" as
        its working directory. Raises subprocess.TimeoutExpired (after
        killing it) when it runs longer than `timeout` seconds."""
        if (code is None) == (module is None):
            raise ValueError("give either code or module")
        gid = uid if gid is None else gid
        _check_runnable(uid, gid)
        if code is not None:
            what = ["-c", code]
        else:
            assert module is not None
            what = ["-m", module]
        result = subprocess.run(
            _setpriv_argv(uid, gid, [*what, *args]),
            env=_other_uid_env(self.child_address, env or {}),
            cwd="/",
            pass_fds=self.child_fds,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout,
        )
        return RunResult(result.returncode, result.stdout, result.stderr)


@contextlib.contextmanager
def start_private_bus(
    directory: Path, service_dir: Path | None = None, extra_config: str = ""
) -> Iterator[PrivateBus]:
    """Run a private system bus with its files in `directory` (created 0700
    if missing); stop it and close everything on the way out. With
    `service_dir`, the bus reads the activation files there (and would start
    their services when called: do not call them)."""
    bus = PrivateBus(directory, service_dir, extra_config)
    bus.start()
    try:
        yield bus
    finally:
        bus.stop()


# -- a small service on the bus, shaped like the broker: it runs as root in
# a process of its own, owns org.vfiod1, hands out fds and takes fds.
#
# Its classes are defined in that process only: sdbus allows one class per
# D-Bus interface name in a process (DbusInterfaceCommonAsync raises
# ValueError for a second "org.vfiod1.Manager"), and the broker's own
# classes will hold these names in the test process. The test process talks
# to it with plain messages (`call`), which need no class.


def fd_service_main() -> None:
    """The test service's process: serve until stdin is closed."""
    asyncio.run(_fd_service())


async def _fd_service() -> None:
    calls: collections.Counter[str] = collections.Counter()
    received: list[bytes] = []
    connection = sdbus.sd_bus_open_system()
    # Held for the service's lifetime, like a lease's fds: each reply
    # carries a duplicate that sd-bus makes and closes.
    held_fd = os.memfd_create("vfiod-test", os.MFD_CLOEXEC)
    os.write(held_fd, PAYLOAD)

    class OtherInterface(DbusInterfaceCommonAsync, interface_name=OTHER_INTERFACE):
        """An interface the bus policy does not open: the bus must refuse
        every call to it before it reaches the service."""

        @dbus_method_async(result_signature="s", flags=DbusUnprivilegedFlag)
        async def ping(self) -> str:
            calls["Ping"] += 1
            return "pong"

    class FdService(DbusInterfaceCommonAsync, interface_name=MANAGER_INTERFACE):
        """Test methods on an interface the policy opens to everyone. Every
        method that others may call needs DbusUnprivilegedFlag: without it,
        sd-bus itself answers AccessDenied to any caller that is not root
        (or the service's uid), before sdbus sees the call."""

        @dbus_method_async(result_signature="h", flags=DbusUnprivilegedFlag)
        async def open_fd(self) -> int:
            """The fd the service holds; it keeps it."""
            calls["OpenFd"] += 1
            return held_fd

        @dbus_method_async(result_signature="h", flags=DbusUnprivilegedFlag)
        async def new_pipe(self) -> int:
            """A fresh fd handed over: the service closes its own copy once
            sdbus has put the reply together (in this same loop iteration)."""
            calls["NewPipe"] += 1
            read_end, write_end = os.pipe2(os.O_CLOEXEC)
            os.write(write_end, PAYLOAD)
            os.close(write_end)
            asyncio.get_running_loop().call_soon(os.close, read_end)
            return read_end

        @dbus_method_async(input_signature="h", result_signature="s", flags=DbusUnprivilegedFlag)
        async def read_fd(self, fd: int) -> str:
            """Read what the caller's fd holds. sdbus hands the method its
            own duplicate of the fd, so the method closes it."""
            calls["ReadFd"] += 1
            try:
                data = os.pread(fd, 4096, 0)
            finally:
                os.close(fd)
            received.append(data)
            return data.decode(errors="replace")

        @dbus_method_async(result_signature="suu", flags=DbusUnprivilegedFlag)
        async def who_am_i(self) -> tuple[str, int, int]:
            """The caller as the bus sees it: unique name, uid, pid."""
            calls["WhoAmI"] += 1
            sender = sdbus.get_current_message().sender
            assert sender is not None
            creds = await credentials(connection, sender)
            return sender, int(creds["UnixUserID"][1]), int(creds["ProcessID"][1])

        @dbus_method_async(result_signature="s")
        async def restricted(self) -> str:
            """No DbusUnprivilegedFlag: sd-bus lets only root in."""
            calls["Restricted"] += 1
            return "root only"

        @dbus_method_async(
            input_signature="u", result_signature="a{sh}", flags=DbusUnprivilegedFlag
        )
        async def many_fds(self, count: int) -> dict[str, int]:
            """`count` duplicates of the held fd in one reply, as Acquire
            returns its fds."""
            calls["ManyFds"] += 1
            return {f"fd{i}": held_fd for i in range(count)}

        @dbus_method_async(
            input_signature="a{sv}", result_signature="u", flags=DbusUnprivilegedFlag
        )
        async def close_fds(self, options: dict[str, tuple[str, Any]]) -> int:
            """Close every fd among `options` (an a{sv}, like Acquire's);
            how many there were."""
            calls["CloseFds"] += 1
            fds = [value for signature, value in options.values() if signature == "h"]
            for fd in fds:
                os.close(fd)
            return len(fds)

        @dbus_method_async(result_signature="a{su}auaay")
        async def stats(self) -> tuple[dict[str, int], list[int], list[bytes]]:
            """For the tests (root only): calls per method, this process's
            open fds, what ReadFd read."""
            gc.collect()
            fds = sorted(int(name) for name in os.listdir("/proc/self/fd"))
            return dict(calls), fds, received

    service = FdService()
    other = OtherInterface()
    try:
        await connection.request_name_async(NAME, 0)
        with (
            service.export_to_dbus(TEST_PATH, connection),
            other.export_to_dbus(TEST_PATH, connection),
        ):
            print(READY, flush=True)
            await asyncio.to_thread(sys.stdin.buffer.read)
    finally:
        connection.close()
        os.close(held_fd)


async def credentials(connection: sdbus.SdBus, sender: str) -> dict[str, tuple[str, Any]]:
    """org.freedesktop.DBus.GetConnectionCredentials of a unique name, as the
    broker asks for them: UnixUserID, UnixGroupIDs, ProcessID (dbus-daemon
    1.14 gives no ProcessFD)."""
    message = connection.new_method_call_message(
        "org.freedesktop.DBus",
        "/org/freedesktop/DBus",
        "org.freedesktop.DBus",
        "GetConnectionCredentials",
    )
    message.append_data("s", sender)
    reply = await connection.call_async(message)
    return cast(dict[str, tuple[str, Any]], reply.get_contents())


def message(
    connection: sdbus.SdBus,
    member: str,
    signature: str = "",
    *args: Any,
    interface: str = MANAGER_INTERFACE,
    destination: str = NAME,
    path: str = TEST_PATH,
) -> SdBusMessage:
    """A method call, by default to the test service."""
    call_message = connection.new_method_call_message(destination, path, interface, member)
    if signature:
        call_message.append_data(signature, *args)
    return call_message


def reply_value(reply: SdBusMessage) -> Any:
    """The body of a reply. sdbus types get_contents() as a tuple, but it
    returns the value itself when the signature is one complete type."""
    contents: Any = reply.get_contents()
    return contents


def call(connection: sdbus.SdBus, member: str, signature: str = "", *args: Any, **kw: str) -> Any:
    """A blocking call (see `message`); D-Bus errors raise DbusFailedError
    subclasses."""
    return reply_value(connection.call(message(connection, member, signature, *args, **kw)))


@dataclasses.dataclass(frozen=True)
class ServiceStats:
    calls: dict[str, int]
    fds: list[int]
    received: list[bytes]


class FdServiceProcess:
    """The test service, running as root in its own process."""

    def __init__(self, bus: PrivateBus) -> None:
        self.bus = bus
        self.log_path = bus.directory / "fd-service.log"
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log_path, "wb") as log:
            self._process = subprocess.Popen(
                [sys.executable, "-s", "-c", "from tests.bus import fd_service_main as m; m()"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                env=_child_env(self.bus.address, {}),
                cwd="/",
            )
        assert self._process.stdout is not None
        fd = self._process.stdout.fileno()
        deadline = time.monotonic() + START_TIMEOUT
        line = b""
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                self.stop()
                raise RuntimeError(f"the test service did not start: {self.log_text()}")
            chunk = os.read(fd, 4096)
            if not chunk:
                self.stop()
                raise RuntimeError(f"the test service exited at start: {self.log_text()}")
            line += chunk
        if line.strip() != READY.encode():
            self.stop()
            raise RuntimeError(f"the test service said {line!r}: {self.log_text()}")

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace").strip()

    def stop(self) -> int:
        """Close its stdin, which ends it; its exit status."""
        process, self._process = self._process, None
        if process is None:
            return 0
        assert process.stdin is not None
        assert process.stdout is not None
        with contextlib.suppress(BrokenPipeError):
            process.stdin.close()
        try:
            returncode = process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            returncode = process.wait()
        process.stdout.close()
        return returncode

    @property
    def pid(self) -> int:
        assert self._process is not None, "the test service is not running"
        return self._process.pid

    def stats(self) -> ServiceStats:
        connection = self.bus.connect()
        try:
            calls, fds, received = call(connection, "Stats")
        finally:
            connection.close()
        return ServiceStats(dict(calls), list(fds), list(received))


@contextlib.contextmanager
def run_fd_service(bus: PrivateBus) -> Iterator[FdServiceProcess]:
    """Run the test service on `bus` until the block ends; fail if it did
    not end cleanly."""
    service = FdServiceProcess(bus)
    service.start()
    try:
        yield service
    finally:
        returncode = service.stop()
    if returncode != 0:
        raise AssertionError(f"the test service exited with {returncode}: {service.log_text()}")
