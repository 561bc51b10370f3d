"""libvirt daemons for the tests: a session daemon of an unprivileged user
(qemu:///session, as GNOME Boxes and users without root run it), for
`vfioctl attach --libvirt`, and the system daemon with a qemu hook, for
`vfioctl libvirt-hook`.

The daemon is Debian's ``libvirtd`` run in the foreground as the user, with
a home, runtime, config and cache directory of its own under a fresh
temporary directory, so it is this helper's child and nothing of it
outlives the ``with`` block: domains are destroyed, the daemon stopped,
any QEMU it left killed, the directory removed. ``stdio_handler = "file"``
keeps virtlogd (which libvirt would start as a daemon of its own) out of it;
each domain's QEMU output is in ``log(name)``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

LIBVIRTD = "/usr/sbin/libvirtd"
VIRSH = "/usr/bin/virsh"
URI = "qemu:///session"
INSTALL = (
    "apt-get install -t bookworm-backports libvirt-daemon-driver-qemu libvirt-clients "
    "(`make deps` does)"
)

# A q35 domain on TCG with one free PCIe root port (libvirt names it pci.1)
# and nothing else; native PCIe hotplug, so QEMU unplugs at once when no OS
# runs to answer ACPI.
DOMAIN_XML = """\
<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{name}</name>
  <memory unit='MiB'>{memory_mib}</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type></os>
  <devices>
    <emulator>{emulator}</emulator>
    <controller type='usb' model='none'/>
    <controller type='pci' model='pcie-root'/>
    <controller type='pci' model='pcie-root-port' index='1'/>
    <memballoon model='none'/>
  </devices>
  <qemu:commandline>
    <qemu:arg value='-global'/>
    <qemu:arg value='ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off'/>
  </qemu:commandline>
</domain>
"""
ROOT_PORT = "pci.1"


class LibvirtUnavailableError(RuntimeError):
    """libvirt is not installed; the message says how to get it."""


class LibvirtSession:
    def __init__(self, uid: int, home: Path) -> None:
        self.uid = uid
        self.home = home
        self.env = {
            "HOME": str(home),
            "XDG_RUNTIME_DIR": str(home / "run"),
            "XDG_CONFIG_HOME": str(home / "config"),
            "XDG_CACHE_HOME": str(home / "cache"),
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "LANG": "C.UTF-8",
        }
        self.daemon: subprocess.Popen[bytes] | None = None
        self.domains: list[str] = []

    @property
    def socket(self) -> Path:
        return self.home / "run/libvirt/libvirt-sock"

    def _as_user(self, argv: Sequence[str]) -> list[str]:
        return [
            "setpriv",
            f"--reuid={self.uid}",
            f"--regid={self.uid}",
            "--clear-groups",
            "--",
            *argv,
        ]

    def virsh(self, *args: str, timeout: float = 120) -> str:
        """`virsh -c qemu:///session ARGS` as the user; its output."""
        ran = subprocess.run(
            self._as_user([VIRSH, "-c", URI, *args]),
            env=self.env,
            cwd="/",
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout,
        )
        if ran.returncode != 0:
            raise AssertionError(f"virsh {' '.join(args)} failed: {ran.stderr.strip()}")
        return ran.stdout

    def create(self, name: str, *, paused: bool, memory_mib: int = 64) -> int:
        """Start a transient domain ``name``; its QEMU's pid."""
        emulator = shutil.which("qemu-system-x86_64") or "/usr/bin/qemu-system-x86_64"
        xml = self.home / f"{name}.xml"
        xml.write_text(DOMAIN_XML.format(name=name, memory_mib=memory_mib, emulator=emulator))
        os.chown(xml, self.uid, self.uid)
        self.domains.append(name)
        self.virsh("create", str(xml), *(["--paused"] if paused else []))
        return self.qemu_pid(name)

    def qemu_pid(self, name: str) -> int:
        return int((self.home / f"run/libvirt/qemu/run/{name}.pid").read_text())

    def log(self, name: str) -> str:
        path = self.home / f"cache/libvirt/qemu/log/{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start(self) -> None:
        for sub in ("run", "config/libvirt", "cache"):
            (self.home / sub).mkdir(parents=True, mode=0o700, exist_ok=True)
        (self.home / "config/libvirt/qemu.conf").write_text('stdio_handler = "file"\n')
        for path in [self.home, *self.home.rglob("*")]:
            os.chown(path, self.uid, self.uid)
        self.daemon = subprocess.Popen(
            self._as_user([LIBVIRTD]),
            env=self.env,
            cwd="/",
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        while not self.socket.exists():
            if self.daemon.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"libvirtd (session, uid {self.uid}) did not start")
            time.sleep(0.1)

    def stop(self) -> None:
        left = []
        for name in self.domains:
            with contextlib.suppress(AssertionError, subprocess.TimeoutExpired, OSError):
                left.append(self.qemu_pid(name))
            with contextlib.suppress(AssertionError, subprocess.TimeoutExpired):
                self.virsh("destroy", name, timeout=60)
        _stop_daemon(self.daemon, left)


def _stop_daemon(daemon: subprocess.Popen[bytes] | None, qemus: list[int]) -> None:
    """Stop a libvirtd (SIGTERM, then SIGKILL), then the QEMUs it left."""
    if daemon is not None:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(30)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
    for pid in qemus:  # not ours to wait for: libvirt's QEMU is no child of ours
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            time.sleep(0.05)


@contextlib.contextmanager
def libvirt_session(uid: int) -> Iterator[LibvirtSession]:
    for tool in (LIBVIRTD, VIRSH):
        if not os.access(tool, os.X_OK):
            raise LibvirtUnavailableError(f"{tool} is missing: {INSTALL}")
    home = Path(tempfile.mkdtemp(prefix="vfiod-libvirt-"))
    os.chmod(home, 0o755)  # noqa: S103 - the user's, below; others only pass through
    session = LibvirtSession(uid, home)
    try:
        session.start()
        yield session
    finally:
        session.stop()
        shutil.rmtree(home, ignore_errors=True)


# -- the system daemon, in a mount namespace of its own


SYSTEM_QEMU_CONF = """
# The test's: QEMU as root (no libvirt-qemu ownership of /dev/vfio), its
# output in a file (no virtlogd), no private /dev per domain.
user = "root"
group = "root"
stdio_handler = "file"
namespaces = [ ]
"""

# Mounts over libvirt's own directories, in the daemon's namespace only.
_SYSTEM_START = """\
set -e
mount --bind "$1/etc" /etc/libvirt
for dir in /run/libvirt /var/lib/libvirt /var/log/libvirt /var/cache/libvirt; do
    [ -d "$dir" ] || mkdir -p "$dir"
    mount -t tmpfs -o mode=0755 tmpfs "$dir"
done
exec /usr/sbin/libvirtd
"""


class LibvirtSystem:
    """libvirtd in system mode, its configuration and state private to it;
    ``hook`` is installed as its /etc/libvirt/hooks/qemu."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.daemon: subprocess.Popen[bytes] | None = None
        self.domains: list[str] = []

    def _root(self) -> Path:
        assert self.daemon is not None
        return Path(f"/proc/{self.daemon.pid}/root")

    @property
    def uri(self) -> str:
        return f"qemu+unix:///system?socket={self._root()}/run/libvirt/libvirt-sock"

    def virsh(
        self, *args: str, timeout: float = 180, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        ran = subprocess.run(
            [VIRSH, "-c", self.uri, *args],
            cwd="/",
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout,
        )
        if check and ran.returncode != 0:
            raise AssertionError(f"virsh {' '.join(args)} failed: {ran.stderr.strip()}")
        return ran

    def qemu_pid(self, name: str) -> int:
        return int((self._root() / f"run/libvirt/qemu/{name}.pid").read_text())

    def log(self, name: str) -> str:
        path = self._root() / f"var/log/libvirt/qemu/{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start(self, hook: str) -> None:
        shutil.copytree("/etc/libvirt", self.home / "etc", symlinks=True)
        with open(self.home / "etc/qemu.conf", "a") as conf:
            conf.write(SYSTEM_QEMU_CONF)
        hooks = self.home / "etc/hooks"
        hooks.mkdir(exist_ok=True)
        (hooks / "qemu").write_text(hook)
        (hooks / "qemu").chmod(0o755)
        self.daemon = subprocess.Popen(
            [
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                _SYSTEM_START,
                "sh",
                str(self.home),
            ],
            cwd="/",
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        while not (self._root() / "run/libvirt/libvirt-sock").exists():
            if self.daemon.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("libvirtd (system) did not start")
            time.sleep(0.1)

    def stop(self) -> None:
        left = []
        for name in self.domains:
            with contextlib.suppress(OSError, ValueError):
                left.append(self.qemu_pid(name))
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.virsh("destroy", name, timeout=60, check=False)
        _stop_daemon(self.daemon, left)


@contextlib.contextmanager
def libvirt_system(hook: str) -> Iterator[LibvirtSystem]:
    """System libvirtd with ``hook`` (a script's text) as its qemu hook."""
    for tool in (LIBVIRTD, VIRSH, "/usr/bin/unshare"):
        if not os.access(tool, os.X_OK):
            raise LibvirtUnavailableError(f"{tool} is missing: {INSTALL}")
    home = Path(tempfile.mkdtemp(prefix="vfiod-libvirt-system-"))
    system = LibvirtSystem(home)
    try:
        system.start(hook)
        yield system
    finally:
        system.stop()
        shutil.rmtree(home, ignore_errors=True)
