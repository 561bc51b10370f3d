"""A real polkitd on a private system bus (tests/bus PrivateBus), with this
checkout's actions and a test's own rules.

polkitd reads its actions from /usr/share/polkit-1/actions and its rules
from /etc/polkit-1/rules.d and /usr/share/polkit-1/rules.d, with no option
to look elsewhere. So it runs in a mount namespace of its own (``unshare
--mount``, private propagation: nothing it mounts reaches the host), where
a folder with the test's action file is bind-mounted over the first, one
with the test's rules over the second and an empty one over the third (no
distro rule, such as Debian's admin rule for group sudo, interferes).

polkitd 122, started as root, makes itself the ``polkitd`` user before it
connects to the bus (as Debian's unit has it run anyway), so:

- it reaches the bus as PrivateBus's other-uid children do, through an
  inherited O_PATH descriptor of the socket (``child_address``): the bus
  folder stays private to root;
- the bus policy lets user polkitd own org.freedesktop.PolicyKit1 and anyone
  call it (BUS_POLICY, as Debian's org.freedesktop.PolicyKit1.conf has it);
- the folders it reads are 0755 and their files 0644. Reached through the
  mount points, they need no access to the folders they sit in, so they
  live in the test's own (private) folder wherever the checkout is.

It finds the bus as GLib does, by DBUS_SYSTEM_BUS_ADDRESS. polkitd is the
process this module starts (unshare and sh exec it): stopping it leaves
nothing behind, and its namespace goes with it.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

from tests.bus import ADDRESS_VARIABLE, PROJECT, PrivateBus, call

POLKITD = Path("/usr/lib/polkit-1/polkitd")
POLKITD_USER = "polkitd"
NAME = "org.freedesktop.PolicyKit1"
ACTIONS = PROJECT / "polkit" / "org.vfiod1.policy"
START_TIMEOUT = 15.0
STOP_TIMEOUT = 5.0

ACTIONS_DIR = "/usr/share/polkit-1/actions"
RULES_DIRS = ("/etc/polkit-1/rules.d", "/usr/share/polkit-1/rules.d")

# For start_private_bus(extra_config=...): polkitd (as user polkitd) may own
# its name and anyone may call it, as Debian's bus policy for polkit says.
BUS_POLICY = f"""\
  <policy user="{POLKITD_USER}">
    <allow own="{NAME}"/>
  </policy>
  <policy context="default">
    <allow send_destination="{NAME}"/>
  </policy>
"""

# In the new mount namespace: the three bind mounts, then polkitd itself.
# The folders come as arguments, so no path is ever parsed by the shell.
_MOUNT_AND_EXEC = """\
set -e
mount --bind -- "$1" {actions}
mount --bind -- "$2" {etc_rules}
mount --bind -- "$3" {share_rules}
exec {polkitd}
"""


class PolkitdUnavailableError(RuntimeError):
    """polkitd, its user, or unshare/mount is missing."""


def require_polkitd() -> None:
    """Raise PolkitdUnavailableError naming what is missing and how to get it."""
    if not os.access(POLKITD, os.X_OK):
        raise PolkitdUnavailableError(f"polkitd is not installed ({POLKITD}): apt install polkitd")
    try:
        pwd.getpwnam(POLKITD_USER)
    except KeyError:
        raise PolkitdUnavailableError(
            f"there is no user {POLKITD_USER}, whom polkitd becomes: "
            "apt install --reinstall polkitd"
        ) from None
    for tool in ("unshare", "mount"):
        if shutil.which(tool) is None:
            raise PolkitdUnavailableError(f"{tool} is not installed: apt install util-linux mount")
    if os.geteuid() != 0:
        raise PolkitdUnavailableError("running polkitd in a mount namespace needs root")


def _readable_folder(path: Path, files: Mapping[str, str | bytes]) -> Path:
    """``path`` created 0755 with ``files`` in it, 0644: readable by polkitd."""
    path.mkdir()
    path.chmod(0o755)  # mkdir's mode is cut by the umask
    for name, content in files.items():
        if "/" in name or name.startswith("."):
            raise ValueError(f"not a plain file name: {name!r}")
        file = path / name
        if isinstance(content, bytes):
            file.write_bytes(content)
        else:
            file.write_text(content, encoding="utf-8")
        file.chmod(0o644)
    return path


class Polkitd:
    """A running polkitd; see the module docstring."""

    def __init__(self, bus: PrivateBus, process: subprocess.Popen[bytes], log_path: Path) -> None:
        self.bus = bus
        self.process = process
        self.log_path = log_path

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace").strip()
        except OSError:
            return ""

    def has_name(self) -> bool:
        connection = self.bus.connect()
        try:
            return bool(
                call(
                    connection,
                    "NameHasOwner",
                    "s",
                    NAME,
                    interface="org.freedesktop.DBus",
                    destination="org.freedesktop.DBus",
                    path="/org/freedesktop/DBus",
                )
            )
        finally:
            connection.close()

    def wait_ready(self) -> None:
        """Until polkitd owns its name on the bus (bounded)."""
        deadline = time.monotonic() + START_TIMEOUT
        while not self.has_name():
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"polkitd exited with {self.process.returncode} at start:\n{self.log()}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"polkitd did not own {NAME} within {START_TIMEOUT} s:\n{self.log()}"
                )
            time.sleep(0.05)

    def pause(self) -> None:
        """SIGSTOP: polkitd owns its name but answers nothing."""
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.process.send_signal(signal.SIGCONT)

    def stop(self) -> int:
        """SIGTERM (after SIGCONT, should it be paused), SIGKILL when it does
        not end in time; its exit status. Idempotent."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.terminate()
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


@contextlib.contextmanager
def running_polkitd(
    bus: PrivateBus, actions: Path, rules: Mapping[str, str], directory: Path
) -> Iterator[Polkitd]:
    """polkitd on ``bus`` (started with extra_config=BUS_POLICY) with the
    action file ``actions`` and ``rules`` (file name, e.g. "10-test.rules",
    to JavaScript) as its only rules; its files and log in ``directory``
    (created if missing, may be private to root). Stopped on the way out."""
    require_polkitd()
    directory.mkdir(parents=True, exist_ok=True)
    folders = (
        _readable_folder(directory / "actions", {actions.name: actions.read_bytes()}),
        _readable_folder(directory / "rules.d", rules),
        _readable_folder(directory / "no-rules.d", {}),
    )
    script = _MOUNT_AND_EXEC.format(
        actions=ACTIONS_DIR, etc_rules=RULES_DIRS[0], share_rules=RULES_DIRS[1], polkitd=POLKITD
    )
    log_path = directory / "polkitd.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "--",
                "/bin/sh",
                "-c",
                script,
                "sh",
                *(str(f) for f in folders),
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={
                "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
                "LANG": "C.UTF-8",
                ADDRESS_VARIABLE: bus.child_address,
                "GIO_USE_VFS": "local",  # no gvfs, which would look for a session bus
            },
            pass_fds=bus.child_fds,
            cwd="/",
        )
    polkitd = Polkitd(bus, process, log_path)
    try:
        polkitd.wait_ready()
        yield polkitd
    finally:
        polkitd.stop()
