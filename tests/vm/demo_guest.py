"""The demo's in-guest part (`make demo`): the story of one device, told with
the real commands and their real output.

An admin lets nobody (uid 65534) have the e1000e; vfiod starts; nobody looks at
the device, is refused another one, and runs a stock QEMU through `vfioctl
run`, which gets the e1000e as an iommufd and a device cdev; QEMU's own QMP
shows the device in its guest; when QEMU quits, the lease ends and the device
is back on the e1000e driver. Then nobody's QEMU, already running, gets the
device hot-added with `vfioctl attach` and taken out with `vfioctl detach`,
and the device is back on e1000e again. On a kernel without iommufd (Debian's), the lease is made
with `vfioctl acquire` on the legacy backend instead, and the device's vendor
ID is read through the fd it returned.

Commands run as root are shown as ``$ ...``, those run as nobody as
``nobody$ ...``; lines starting with ``#`` are the demo's own remarks. Any
step that does not do what the story says stops the demo with the reason and
exit status 1.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from tests.bus import (
    NOBODY,
    PROJECT,
    PrivateBus,
    _child_env,
    _other_uid_env,
    python_view,
    start_private_bus,
)
from tests.bus.vfiod import VfiodProcess
from tests.vm.topology import E1000E, E1000E_IDS, ICH9_SATA
from tests.vm.vmm import (
    QemuNotFoundError,
    find_qemu,
    parse_query_pci,
    privilege_drop,
    probe_argv,
)
from vfiod.pci import PciAddress
from vfiod.qmp import Qmp
from vfiod.qmp import connect as qmp_connect
from vfiod.vfio import LinuxKernel
from vfiod.vfio.device import Device

DONE = "demo: every step done"
POLICY_NAME = "etc/vfiod/policy.d/50-demo.toml"
QEMU_READY_TIMEOUT = 180.0
SYS_PIDFD_GETFD = 438  # x86_64


def policy(backend: str) -> str:
    return f"""\
[[rule]]
name = "nobody-e1000e"
effect = "allow"
address = "{E1000E}"
users = ["nobody"]
managed = true
backends = ["{backend}"]
max-locked-memory = "512M"
"""


class DemoError(Exception):
    """A step did not do what the story says."""


_print_lock = threading.Lock()


def out(line: str = "") -> None:
    with _print_lock:
        print(line, flush=True)


def heading(text: str) -> None:
    out()
    out(f"==> {text}")


def remark(text: str) -> None:
    out(f"# {text}")


_PLAIN_WORD = re.compile(r"[\w@%+=:,./{}-]+")


def _quote(word: str) -> str:
    """As a person types it: fd placeholders like fd={iommufd} stay unquoted
    (without a comma inside the braces, a shell leaves them alone)."""
    if word in ("&", "|") or (
        _PLAIN_WORD.fullmatch(word) and not re.search(r"\{[^}]*,[^}]*\}", word)
    ):
        return word
    return shlex.quote(word)


def command_line(prompt: str, words: Sequence[str], width: int = 96) -> str:
    """``words`` as typed after ``prompt``, wrapped before options with `` \\``."""
    lines: list[str] = []
    current = prompt + " ".join(_quote(w) for w in words[:1])
    i = 1
    while i < len(words):
        # An option and its value stay on one line.
        has_value = i + 1 < len(words) and not words[i + 1].startswith("-")
        take = 2 if words[i].startswith("-") and has_value else 1
        chunk = " ".join(_quote(w) for w in words[i : i + take])
        if len(current) + 1 + len(chunk) > width - 2 and current.strip():
            lines.append(current + " \\")
            current = "    " + chunk
        else:
            current += " " + chunk
        i += take
    lines.append(current)
    return "\n".join(lines)


class Streamed:
    """A process whose output (stdout and stderr, merged as on a terminal) is
    printed line by line as it comes, and kept."""

    def __init__(self, process: subprocess.Popen[str], name: str) -> None:
        self.process = process
        self.name = name
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for text in self.process.stdout:
            line = text.rstrip("\n")
            self.lines.append(line)
            out(line)

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait(self, timeout: float) -> int:
        try:
            status = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            self._reader.join(10)
            raise DemoError(f"`{self.name}` did not finish in {timeout:g} s") from None
        self._reader.join(10)
        if self.process.stdout is not None:
            self.process.stdout.close()
        return status

    def close_stdin(self) -> None:
        if self.process.stdin is not None:
            with contextlib.suppress(BrokenPipeError):
                self.process.stdin.close()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self.close_stdin()
        self._reader.join(10)
        if self.process.stdout is not None:
            self.process.stdout.close()


def python_options() -> list[str]:
    """Where this guest's Python keeps bytecode: the checkout is read-only
    here, so without a cache every command would compile vfiod again."""
    prefix = sys.pycache_prefix
    return ["-X", f"pycache_prefix={prefix}"] if prefix else []


class Shell:
    """Runs the story's commands, as root or as nobody, printing each as typed
    and then its output."""

    def __init__(self, bus: PrivateBus) -> None:
        self.bus = bus

    def _popen(self, words: Sequence[str], nobody: bool, **how: Any) -> subprocess.Popen[str]:
        """``words`` as typed (vfioctl, vfiod, or another program), started
        as root or nobody, on the private bus."""
        ours = words[0] in ("vfioctl", "vfiod")
        module = "vfiod.cli" if words[0] == "vfioctl" else "vfiod"
        python = [*python_options(), "-m", module, *words[1:]]
        if nobody:
            argv = privilege_drop(NOBODY) + (python_view().argv(python) if ours else list(words))
            env = _other_uid_env(self.bus.child_address, {})
            fds = self.bus.child_fds
        else:
            argv = [sys.executable, "-s", *python] if ours else list(words)
            env = _child_env(self.bus.address, {})
            if sys.pycache_prefix:
                del env["PYTHONDONTWRITEBYTECODE"]  # root fills the cache; nobody reads it
            fds = ()
        return subprocess.Popen(
            argv, env=env, cwd="/", pass_fds=fds, text=True, errors="replace", **how
        )

    def start(self, words: Sequence[str], *, nobody: bool, stdin: bool = False) -> Streamed:
        """Print ``words`` as typed and start it; its output is printed as it comes."""
        out(command_line("nobody$ " if nobody else "$ ", words))
        process = self._popen(
            words,
            nobody,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        return Streamed(process, shlex.join(words))

    def run(
        self,
        words: Sequence[str],
        *,
        nobody: bool = False,
        expect: int = 0,
        timeout: float = 60,
        pipe: Sequence[str] = (),
    ) -> str:
        """Run ``words`` (piped into ``pipe``, when given) to its end; its
        output. A status other than ``expect`` is a DemoError."""
        if pipe:
            return self._pipeline(words, pipe, nobody=nobody, timeout=timeout)
        command = self.start(words, nobody=nobody)
        status = command.wait(timeout)
        if status != expect:
            raise DemoError(
                f"`{command.name}` exited with status {status}, not {expect}"
                + (f":\n{command.output}" if command.output else "")
            )
        if expect != 0:
            remark(f"exit status {status}")
        return command.output

    def _pipeline(
        self, words: Sequence[str], pipe: Sequence[str], *, nobody: bool, timeout: float
    ) -> str:
        """``words | pipe``: the first one's stderr is kept apart, as a
        terminal shows it; its status counts."""
        out(command_line("nobody$ " if nobody else "$ ", [*words, "|", *pipe]))
        first = self._popen(
            words, nobody, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        assert first.stdout is not None
        assert first.stderr is not None
        second = self._popen(pipe, nobody, stdin=first.stdout, stdout=subprocess.PIPE)
        first.stdout.close()
        command = Streamed(second, shlex.join([*words, "|", *pipe]))
        try:
            command.wait(timeout)
            status = first.wait(timeout)
        finally:
            if first.poll() is None:
                first.kill()
                first.wait()
        errors = first.stderr.read()
        first.stderr.close()
        if errors:
            out(errors.rstrip("\n"))
        if status != 0:
            raise DemoError(f"`{shlex.join(words)}` exited with status {status}: {errors}")
        return command.output


def expect(condition: bool, what: str) -> None:
    if not condition:
        raise DemoError(what)


def driver_of(address: str) -> str | None:
    link = Path("/sys/bus/pci/devices") / address / "driver"
    return os.path.basename(os.readlink(link)) if link.exists() else None


def wait_for_driver(address: str, driver: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while driver_of(address) != driver:
        if time.monotonic() > deadline:
            raise DemoError(f"{address} is on {driver_of(address)}, not back on {driver}")
        time.sleep(0.1)


# -- the story's common steps


def admin_policy(shell: Shell, root: Path, backend: str) -> None:
    heading("The admin's policy: nobody may have the e1000e (and nothing else)")
    path = root / POLICY_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(policy(backend))
    (root / "etc/vfiod/vfiod.toml").write_text("")  # the built-in settings
    out(command_line("$ ", ["cat", str(path)]))
    for line in path.read_text().splitlines():
        out(line)
    output = shell.run(
        [
            "vfiod",
            "check-policy",
            "--explain",
            E1000E,
            "--user",
            "nobody",
            "--root",
            str(root),
            "--backend",
            backend,
            "--managed",
        ]
    )
    expect("nobody-e1000e" in output, "check-policy does not name the rule that allows")


@contextlib.contextmanager
def vfiod_running(bus: PrivateBus, directory: Path, root: Path) -> Iterator[VfiodProcess]:
    directory.mkdir(parents=True, exist_ok=True)
    state = directory / "run/state.json"
    words = ["vfiod", "daemon", "--root", str(root), "--state", str(state)]
    heading(
        "vfiod starts, on a private system bus with vfiod's bus policy "
        "(this guest has no system bus of its own)"
    )
    out(command_line("$ ", [*words, "&"]))
    daemon = VfiodProcess(
        bus,
        directory,
        [sys.executable, "-s", *python_options(), "-m", *words],
        sysfs="/sys",
        state_path=state,
        policy_root=root,
    )
    started = time.monotonic()
    try:
        daemon.start()
    except RuntimeError as e:
        raise DemoError(f"vfiod did not start: {e}") from None
    remark(f"ready after {time.monotonic() - started:.1f} s (it told its service manager READY=1)")
    try:
        yield daemon
    except BaseException:
        daemon.stop()
        raise
    status = daemon.stop()
    if status != 0 or "Traceback" in daemon.log():
        raise DemoError(f"vfiod exited with status {status}:\n{daemon.log()}")


def host_view(shell: Shell) -> None:
    heading(
        "The host as vfiod sees it: the e1000e alone in its IOMMU group; the ICH9 "
        "group is not viable, and vfioctl says why"
    )
    output = shell.run(["vfioctl", "list"])
    expect(E1000E in output, f"vfioctl list does not show {E1000E}")
    expect(
        re.search(rf"not viable: {re.escape(ICH9_SATA)} ", output) is not None,
        f"vfioctl list does not say why the group of {ICH9_SATA} is not viable",
    )


def nobody_looks(shell: Shell, backend: str) -> None:
    heading(f"As nobody: why {E1000E} can be assigned")
    output = shell.run(["vfioctl", "show", "--backend", backend, "--managed", E1000E], nobody=True)
    expect("allowed" in output, f"vfiod does not allow nobody {E1000E}")
    heading(f"As nobody: a device the policy does not give nobody ({ICH9_SATA}, the SATA one)")
    shell.run(
        ["vfioctl", "acquire", "--backend", backend, "--managed", ICH9_SATA],
        nobody=True,
        expect=1,
    )


def e1000e_in_list(shell: Shell, after: int) -> str:
    """`vfioctl list`, as nobody, cut to the e1000e's group and the leases."""
    group = os.path.basename(os.readlink(f"/sys/bus/pci/devices/{E1000E}/iommu_group"))
    grep = ["grep", f"-A{after}", "-e", f"^{group} ", "-e", "^LEASE"]
    return shell.run(["vfioctl", "list"], nobody=True, pipe=grep)


def lease_ends(shell: Shell, daemon: VfiodProcess) -> None:
    heading("The lease has ended: the e1000e is back on its driver")
    wait_for_driver(E1000E, "e1000e", 60)
    shell.run(["readlink", f"/sys/bus/pci/devices/{E1000E}/driver"])
    output = e1000e_in_list(shell, after=1)
    expect(
        re.search(rf"{re.escape(E1000E)}\s+\S+\s+e1000e\s", output) is not None,
        "vfioctl list does not show the e1000e back on e1000e",
    )
    expect("LEASE" not in output, "vfioctl list still shows a lease")
    remark("no LEASE table: vfiod holds no lease")
    expect(daemon.state().get("leases") == {}, "vfiod's state still records a lease")


# -- iommufd: QEMU gets the device through `vfioctl run`


def qmp_socket(path: Path, vfioctl: Streamed, timeout: float) -> socket.socket:
    """Connect to QEMU's QMP socket once it is there, with a progress line
    every 10 s."""
    started = time.monotonic()
    next_note = started + 10
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            now = time.monotonic()
            if vfioctl.process.poll() is not None:
                raise DemoError(
                    f"vfioctl run exited with status {vfioctl.process.returncode} before "
                    "QEMU's QMP socket appeared"
                ) from None
            if now - started > timeout:
                raise DemoError(
                    f"QEMU's QMP socket {path} did not appear in {timeout:g} s"
                ) from None
            if now >= next_note:
                remark(f"waiting for QEMU's QMP socket ({now - started:.0f} s so far)")
                next_note += 10
            time.sleep(0.2)
        else:
            return sock


def qemu_story(shell: Shell, daemon: VfiodProcess) -> None:
    try:
        qemu, version = find_qemu()
    except QemuNotFoundError as e:
        raise DemoError(str(e)) from None
    rundir = Path(tempfile.mkdtemp(prefix="vfiod-demo-qemu-"))
    os.chown(rundir, NOBODY, NOBODY)
    qmp_path = rundir / "qmp.sock"
    try:
        qemu_argv = probe_argv(
            [
                "-qmp",
                f"unix:{qmp_path},server=on,wait=off",
                "-object",
                "iommufd,id=i0,fd={iommufd}",
                "-device",
                f"vfio-pci,iommufd=i0,fd={{device:{E1000E}}},id=hostdev0",
            ],
            binary=os.path.basename(qemu),
        )
        heading(
            f"As nobody: QEMU {version} with the e1000e, through `vfioctl run` "
            "(-S: it builds the machine, runs no guest code)"
        )
        words = ["vfioctl", "run", "--backend", "iommufd", "--managed", "--device", E1000E]
        vfioctl = shell.start([*words, "--", *qemu_argv], nobody=True)
        try:
            qemu_session(shell, daemon, vfioctl, qmp_path)
        except BaseException:
            vfioctl.kill()
            raise
        status = vfioctl.wait(120)
        remark(f"vfioctl run exited with QEMU's status, {status}")
        expect(status == 0, f"vfioctl run exited with status {status}")
        expect(
            any(f"moving {E1000E} from e1000e to vfio-pci" in line for line in vfioctl.lines)
            and any(f"{E1000E} is on vfio-pci" in line for line in vfioctl.lines),
            "vfioctl run did not show vfiod moving the e1000e to vfio-pci",
        )
    finally:
        shutil.rmtree(rundir, ignore_errors=True)


def qemu_session(shell: Shell, daemon: VfiodProcess, vfioctl: Streamed, qmp_path: Path) -> None:
    with qmp_socket(qmp_path, vfioctl, QEMU_READY_TIMEOUT) as sock:
        qmp = Qmp(sock)
        qmp.negotiate(timeout=60)
        heading("QEMU's own view of its guest, over QMP: the e1000e is there as 8086:10d3")
        out("qmp> query-pci")
        devices = parse_query_pci(qmp.execute("query-pci"))
        for device in devices:
            out(str(device))
        passed = [d for d in devices if d.ids == E1000E_IDS]
        expect(
            bool(passed),
            f"QEMU's guest has no {E1000E_IDS[0]:04x}:{E1000E_IDS[1]:04x}",
        )
        heading("Meanwhile on the host: the e1000e is on vfio-pci, leased to nobody's QEMU")
        output = e1000e_in_list(shell, after=2)
        expect(daemon.driver(E1000E) == "vfio-pci", "the e1000e is not on vfio-pci")
        expect(
            re.search(rf"{re.escape(E1000E)}\s+\S+\s+vfio-pci", output) is not None,
            "vfioctl list does not show the e1000e on vfio-pci",
        )
        leases = daemon.state().get("leases", {})
        expect(len(leases) == 1, f"vfiod holds {len(leases)} leases, not 1")
        (lease,) = leases.values()
        expect(
            (lease["uid"], lease["backend"]) == (NOBODY, "iommufd"),
            f"the lease is not nobody's iommufd lease: {lease}",
        )
        heading("QEMU quits")
        out("qmp> quit")
        with contextlib.suppress(ConnectionError, TimeoutError):
            qmp.execute("quit")


# -- iommufd: the device hot-added to a running QEMU, and taken out again


def hotplug_story(shell: Shell, daemon: VfiodProcess) -> None:
    try:
        qemu, version = find_qemu()
    except QemuNotFoundError as e:
        raise DemoError(str(e)) from None
    rundir = Path(tempfile.mkdtemp(prefix="vfiod-demo-hotplug-"))
    os.chown(rundir, NOBODY, NOBODY)
    qmp_path = str(rundir / "qmp.sock")
    # Native PCIe hotplug: with no OS in this VM, only it unplugs at once.
    qemu_argv = [
        arg
        for arg in probe_argv(
            [
                "-name",
                "demo-vm",
                "-global",
                "ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off",
                "-device",
                "pcie-root-port,id=rp0,chassis=1",
                "-qmp",
                f"unix:{qmp_path},server=on,wait=off",
            ],
            binary=os.path.basename(qemu),
        )
        if arg != "-S"  # its firmware runs and numbers the bus behind rp0
    ]
    heading(
        f"As nobody: a running QEMU {version} with a free PCIe root port (its firmware "
        "runs; nothing to boot)"
    )
    running = shell.start(qemu_argv, nobody=True)
    try:
        with qmp_socket(Path(qmp_path), running, QEMU_READY_TIMEOUT):
            pass  # it is there; vfioctl makes its own connection
        hot_attach_and_detach(shell, daemon, qmp_path, running.process.pid)
    finally:
        running.kill()
        shutil.rmtree(rundir, ignore_errors=True)


def _query_pci(qmp_path: str) -> list[str]:
    """QEMU's guest, over our own QMP connection, as printed lines."""
    with qmp_connect(qmp_path, 30) as sock:
        session = Qmp(sock)
        session.negotiate(30)
        out("qmp> query-pci")
        lines = [str(d) for d in parse_query_pci(session.execute("query-pci"))]
    for line in lines:
        out(line)
    return lines


def hot_attach_and_detach(shell: Shell, daemon: VfiodProcess, qmp_path: str, pid: int) -> None:
    heading("As nobody: `vfioctl attach` leases the e1000e for that QEMU and hot-adds it")
    shell.run(
        ["vfioctl", "attach", "--qmp", qmp_path, "--device", E1000E, "--managed", "--bus", "rp0"],
        nobody=True,
        timeout=180,
    )
    leases = daemon.state().get("leases", {})
    expect(len(leases) == 1, f"vfiod holds {len(leases)} leases, not 1")
    (lease,) = leases.values()
    expect(lease["owner_pid"] == pid, f"the lease follows pid {lease['owner_pid']}, not QEMU {pid}")
    remark(f"vfioctl has exited; the lease follows QEMU (pid {pid}), not vfioctl")
    heading("QEMU's guest, over QMP: the e1000e behind the root port")
    lines = _query_pci(qmp_path)
    ids = f"{E1000E_IDS[0]:04x}:{E1000E_IDS[1]:04x}"
    expect(any(ids in line and "(id vfio-" in line for line in lines), f"no {ids} in QEMU")
    heading("As nobody: `vfioctl detach` unplugs it, and vfiod gives the e1000e back")
    shell.run(
        ["vfioctl", "detach", "--qmp", qmp_path, "--id", "vfio-0000_00_10_0"],
        nobody=True,
        timeout=120,
    )
    lines = _query_pci(qmp_path)
    expect(not any(ids in line for line in lines), f"{ids} is still in QEMU")


# -- legacy: `vfioctl acquire`, and the device read through its fd


def borrow_fd(pid: int, fd: int) -> int:
    """A copy of another process's fd (pidfd_getfd(2); root may)."""
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(pid)
    try:
        copy = int(libc.syscall(SYS_PIDFD_GETFD, pidfd, fd, 0))
        if copy < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"pidfd_getfd of fd {fd} of pid {pid}: {os.strerror(err)}")
        return copy
    finally:
        os.close(pidfd)


def legacy_story(shell: Shell, daemon: VfiodProcess) -> None:
    heading("As nobody: a lease on the legacy backend, held by `vfioctl acquire`")
    words = ["vfioctl", "acquire", "--backend", "legacy", "--managed", E1000E]
    vfioctl = shell.start(words, nobody=True, stdin=True)
    try:
        held = wait_for_line(vfioctl, re.compile(r"fds in vfioctl \(pid (\d+)\): (.*)"), 120)
        pid = int(held.group(1))
        fds = dict(item.split("=", 1) for item in held.group(2).split())
        device_fd = fds.get(f"device:{E1000E}")
        expect(device_fd is not None, f"the lease has no device fd: {held.group(2)}")
        assert device_fd is not None
        heading(
            f"Through that device fd: the config space of {E1000E} "
            f"(root borrows a copy of fd {device_fd} of pid {pid} with pidfd_getfd)"
        )
        address = PciAddress.parse(E1000E)
        with Device(LinuxKernel(), borrow_fd(pid, int(device_fd)), str(address), E1000E) as dev:
            ids = (dev.vendor_id, dev.device_id)
        out(f"vendor ID {ids[0]:04x}, device ID {ids[1]:04x}")
        expect(ids == E1000E_IDS, f"config space says {ids[0]:04x}:{ids[1]:04x}")
        heading("Meanwhile on the host: the e1000e is on vfio-pci, leased to nobody")
        e1000e_in_list(shell, after=2)
        expect(daemon.driver(E1000E) == "vfio-pci", "the e1000e is not on vfio-pci")
        heading("nobody ends `vfioctl acquire` (end of its input; Ctrl-C does the same)")
        vfioctl.close_stdin()
        status = vfioctl.wait(60)
        expect(status == 0, f"vfioctl acquire exited with status {status}")
    except BaseException:
        vfioctl.kill()
        raise


def wait_for_line(command: Streamed, pattern: re.Pattern[str], timeout: float) -> re.Match[str]:
    deadline = time.monotonic() + timeout
    while True:
        for line in command.lines:
            found = pattern.search(line)
            if found:
                return found
        if command.process.poll() is not None:
            raise DemoError(f"`{command.name}` exited with status {command.process.returncode}")
        if time.monotonic() > deadline:
            raise DemoError(f"no line like {pattern.pattern!r} in {timeout:g} s")
        time.sleep(0.1)


def main() -> int:
    iommufd = os.environ.get("VFIOD_VM_KERNEL", "test") == "test"
    if iommufd and not os.path.exists("/dev/iommu"):
        print("demo failed: this test kernel has no /dev/iommu (CONFIG_IOMMUFD)", flush=True)
        return 1
    backend = "iommufd" if iommufd else "legacy"
    directory = Path(tempfile.mkdtemp(prefix="vfiod-demo-"))
    root = directory / "root"
    try:
        with start_private_bus(directory / "bus") as bus:
            shell = Shell(bus)
            admin_policy(shell, root, backend)
            with vfiod_running(bus, directory / "vfiod", root) as daemon:
                host_view(shell)
                nobody_looks(shell, backend)
                if iommufd:
                    qemu_story(shell, daemon)
                    lease_ends(shell, daemon)
                    hotplug_story(shell, daemon)
                else:
                    legacy_story(shell, daemon)
                lease_ends(shell, daemon)
    except DemoError as e:
        print(f"\ndemo failed: {e}", flush=True)
        return 1
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    print(f"\n{DONE}", flush=True)
    return 0


if __name__ == "__main__":
    os.chdir(PROJECT)
    sys.exit(main())
