"""Real systemd as PID 1 of a private namespace, for tests inside the test VM.

`SystemdNamespace` runs `/lib/systemd/systemd --system` in new PID, mount,
UTS and cgroup namespaces (`unshare`), with its own /run and /tmp (tmpfs),
so it brings up its own journald and dbus-daemon (the namespace's system
bus) without touching the machine's. Units go to /run/systemd/system;
other files (bus policy, activation files) are put in place through
overlays that exist only in the namespace's mount namespace, so the
machine's own files never change. /etc and /var are overlaid as a whole:
whatever the namespace's services write there stays in the namespace.
`binds` puts whole directories from outside in place (bind mounts in the
namespace only): an installed tree, say.

    with SystemdNamespace(units={"x.service": UNIT}, files={path: text}) as ns:
        ns.systemctl("start", "x.service")
        ns.run(["busctl", "list"])
        ns.journal("MESSAGE_ID=...")

It boots its own target (`vfiod-test.target`: sysinit, the journal and the
system bus; no basic.target, so no timers and nothing from
multi-user.target), without generators, and masks what would act on the
machine outside the namespace (the clock, sysctls, kernel modules, binfmt,
/dev, pstore) or only costs time there. The namespace uses the machine's
udev: its /run/udev is the machine's, bound in, and its own systemd-udevd is
masked (two udevds would both act on every kernel event, and every udev
event would reach listeners twice). As /sys stays writable (vfiod writes
there), systemd tracks devices through that udev, as on a host.

systemd runs in a cgroup of its own (the root of its cgroup namespace),
which is how everything in it is killed if poweroff does not end it.
/dev/console in the namespace is a pty whose output lands in
`console.log` in the work directory: systemd's status lines, and its log
until journald is up.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
import tty
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import Self, TypeVar

T = TypeVar("T")

SYSTEMD = "/lib/systemd/systemd"
UNIT_DIR = "/run/systemd/system"
TARGET = "vfiod-test.target"
CONTAINER = "vfiod-test"  # $container: systemd runs in container mode
CGROUP_ROOT = Path("/sys/fs/cgroup")

BOOT_TIMEOUT = 180.0  # seconds from unshare to `running`, under QEMU TCG
STOP_TIMEOUT = 60.0  # seconds for poweroff to end the namespace
COMMAND_TIMEOUT = 60.0  # seconds for one command in the namespace
POLL_INTERVAL = 0.2
POWEROFF_SIGNAL = signal.SIGRTMIN + 4  # systemd(1): "SIGRTMIN+4: poweroff.target"
POWEROFF_REPEAT = 10.0  # seconds between poweroff requests

TARGET_UNIT = """\
[Unit]
Description=vfiod test namespace: the journal and the system bus
Requires=sysinit.target dbus.socket
Wants=dbus.service
After=sysinit.target dbus.socket dbus.service
AllowIsolate=yes
"""

JOURNALD_CONF = """\
[Journal]
# In /run only, and without the machine's kernel log.
Storage=volatile
ReadKMsg=no
"""

# dbus-daemon gives up on a service it activates after 25 s by default; under
# TCG on a busy machine vfiod (Python, its imports, the host scan) has taken
# longer than that to be ready. busctl in the tests waits 150 s.
DBUS_LIMITS_CONF = """\
<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <limit name="service_start_timeout">140000</limit>
</busconfig>
"""

# Every mount the namespace starts with (inherited from the machine, or made
# here) gets DefaultDependencies=no, so it does not conflict with
# umount.target: systemd does not try to unmount it at poweroff. Many of them
# cannot be unmounted in the namespace (shadowed by the overlays and tmpfs,
# or busy), and with systemd 252 such failed stop jobs left poweroff.target
# waiting forever (swap.target's stop job was never run).
MOUNT_DROP_IN = "[Unit]\nDefaultDependencies=no\n"
NO_GENERATORS = "/nonexistent"  # $SYSTEMD_GENERATOR_PATH: no generators at all

# Masked in every namespace, and why.
MASKED = {
    # They act on the whole machine, not on the namespace.
    "systemd-timesyncd.service": "sets the clock",
    "systemd-sysctl.service": "sets kernel parameters",
    "systemd-modules-load.service": "loads kernel modules",
    "modprobe@.service": "loads kernel modules",
    "systemd-binfmt.service": "registers binary formats",
    "proc-sys-fs-binfmt_misc.automount": "binfmt_misc",
    "proc-sys-fs-binfmt_misc.mount": "binfmt_misc",
    "kmod-static-nodes.service": "creates nodes in the shared /dev",
    "systemd-tmpfiles-setup-dev.service": "creates nodes in the shared /dev",
    "systemd-pstore.service": "empties the kernel's pstore",
    "systemd-random-seed.service": "feeds the kernel's random pool",
    # Irrelevant in the namespace, and each costs time under TCG.
    "systemd-journal-flush.service": "the journal stays in /run",
    "systemd-remount-fs.service": "no fstab",
    "dev-hugepages.mount": "not needed",
    "dev-mqueue.mount": "not needed",
    "sys-fs-fuse-connections.mount": "not needed",
    "sys-kernel-config.mount": "not needed",
    "sys-kernel-debug.mount": "not needed",
    "sys-kernel-tracing.mount": "not needed",
    "systemd-ask-password-console.path": "nobody answers",
    "systemd-update-utmp.service": "no logins",
    "systemd-sysusers.service": "the machine's users are there",
}
# Masked when the namespace uses the machine's udev (the default).
UDEV_UNITS = (
    "systemd-udevd.service",
    "systemd-udevd-control.socket",
    "systemd-udevd-kernel.socket",
    "systemd-udev-trigger.service",
    "systemd-udev-settle.service",
)
# Overlaid as a whole: writes by the namespace's services stay in it.
OVERLAID = ("/etc", "/var")
TMPFS = ("/run", "/tmp")  # fresh and empty in the namespace

NSENTER = ("nsenter", "--all")
# For commands run in the namespace: no pager, no colour, no terminal tricks.
COMMAND_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "SYSTEMD_PAGER": "",
    "SYSTEMD_COLORS": "0",
    "TERM": "dumb",
}

JournalEntry = dict[str, str]


class SystemdNamespaceError(RuntimeError):
    """systemd in the namespace did not do what was asked; the message says
    what and carries `systemctl --failed`, the journal tail and the console."""


def _is_under(path: PurePosixPath, roots: Iterable[str]) -> bool:
    return any(path == PurePosixPath(r) or PurePosixPath(r) in path.parents for r in roots)


def _overlays_for(paths: Iterable[str]) -> list[str]:
    """The directories to overlay so that every path in `paths` can be
    written: /etc and /var always, otherwise each path's nearest existing
    directory, unless it lies in a tmpfs or an overlay already."""
    chosen: list[str] = list(OVERLAID)
    for raw in sorted(paths):
        path = PurePosixPath(raw)
        if not path.is_absolute() or ".." in path.parts:
            raise ValueError(f"not an absolute, normal path: {raw!r}")
        if _is_under(path, (*TMPFS, *chosen)):
            continue
        directory = path.parent
        while not os.path.isdir(directory):
            directory = directory.parent
        if directory == PurePosixPath("/"):
            raise ValueError(f"{raw}: would need an overlay over / itself")
        chosen = [c for c in chosen if not _is_under(PurePosixPath(c), [str(directory)])]
        chosen.append(str(directory))
    for overlaid in chosen:
        if any(c in overlaid for c in ",:\\\n "):
            raise ValueError(f"cannot overlay {overlaid!r}: overlayfs options cannot hold it")
    return chosen


def _systemd_pid_of(unshare_pid: int) -> int | None:
    """The child of `unshare --fork`: PID 1 of the new PID namespace (found
    through /proc/*/stat, as kernels without CONFIG_PROC_CHILDREN have no
    /proc/PID/task/TID/children)."""
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{name}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rpartition(")")[2].split()[1])
        if ppid == unshare_pid:
            return int(name)
    return None


def _read(path: Path) -> str:
    """A file's text, or "" when it is gone."""
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""


def _mount_points() -> set[str]:
    """Where this mount namespace has mounts (mountinfo's octal escapes
    decoded)."""
    points = set()
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        field = line.split()[4]
        points.add(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field))
    return points


def _mount_unit(path: str) -> str:
    """The mount unit's name for `path`, as `systemd-escape --path
    --suffix=mount` makes it."""
    trimmed = "/".join(part for part in path.split("/") if part)
    if not trimmed:
        return "-.mount"
    escaped = []
    for i, char in enumerate(trimmed):
        if char == "/":
            escaped.append("-")
        elif (char.isascii() and char.isalnum()) or char in ":_" or (char == "." and i > 0):
            escaped.append(char)
        else:
            escaped += [f"\\x{byte:02x}" for byte in char.encode()]
    return "".join(escaped) + ".mount"


def _mounts() -> list[str]:
    """This mount namespace's mounts, for the check that none were left."""
    lines = Path("/proc/self/mountinfo").read_text().splitlines()
    return sorted(" ".join(line.split()[3:5]) for line in lines)


def _journal_value(value: object) -> str:
    """A field of `journalctl --output=json`: a string, a list of byte
    values (binary data), a list of strings (a field given more than once:
    the first), or null (too large)."""
    if isinstance(value, list):
        if value and isinstance(value[0], str):
            return value[0]
        return bytes(value).decode(errors="replace")
    return "" if value is None else str(value)


class SystemdNamespace:
    """systemd as PID 1 of private namespaces; a context manager.

    `units` maps unit file names (or drop-in paths such as
    "x.service.d/y.conf") to their text, installed in /run/systemd/system;
    `files` maps absolute paths in the namespace to their text (mode 0644);
    `mask` names more units to mask. `share_udev=False` keeps the machine's
    /run/udev out and lets the namespace run its own systemd-udevd (without
    the coldplug trigger). `generators=True` runs the system generators
    (fstab, getty, sysv, ...; nothing here needs them, and they cost
    seconds under TCG). `workdir` (kept) holds the staged files and
    console.log; without it a temporary directory is used and removed.
    """

    def __init__(
        self,
        units: Mapping[str, str] | None = None,
        files: Mapping[str, str | bytes] | None = None,
        *,
        binds: Mapping[str, str] | None = None,
        mask: Iterable[str] = (),
        target: str | None = None,
        share_udev: bool = True,
        generators: bool = False,
        workdir: Path | None = None,
        progress: Callable[[str], None] = lambda line: None,
        boot_timeout: float = BOOT_TIMEOUT,
        stop_timeout: float = STOP_TIMEOUT,
    ) -> None:
        self.units = dict(units or {})
        self.files = dict(files or {})
        self.binds = dict(binds or {})  # path in the namespace -> directory outside
        self.mask = set(mask) | set(MASKED) | (set(UDEV_UNITS) if share_udev else set())
        self.mask.add("systemd-udev-trigger.service")  # never re-add every device
        self.target = target or TARGET
        self.share_udev = share_udev
        self.generators = generators
        self.progress = progress
        self.boot_timeout = boot_timeout
        self.stop_timeout = stop_timeout
        self._keep_workdir = workdir is not None
        self._workdir_arg = workdir
        self.workdir = Path("/nonexistent")
        self._process: subprocess.Popen[bytes] | None = None
        self._console: subprocess.Popen[bytes] | None = None
        self._cgroup: Path | None = None
        self._home_cgroup = CGROUP_ROOT
        self._pid = 0
        self._mounts_before: list[str] = []
        self.boot_seconds = 0.0

    # -- life cycle

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        """systemd's PID as seen from outside the namespace."""
        if not self._pid:
            raise SystemdNamespaceError("systemd is not running")
        return self._pid

    @property
    def console_log(self) -> Path:
        return self.workdir / "console.log"

    def start(self) -> None:
        if self._process is not None:
            raise SystemdNamespaceError("already started")
        self._mounts_before = _mounts()
        if self._workdir_arg is not None:
            self._workdir_arg.mkdir(parents=True, exist_ok=True)
            self.workdir = self._workdir_arg
        else:
            self.workdir = Path(tempfile.mkdtemp(prefix="vfiod-systemd-ns-"))
        started = time.monotonic()
        try:
            self._launch()
            self.progress(f"[systemd-ns] systemd is PID {self._pid} outside, waiting for it")
            self._wait_running(started + self.boot_timeout)
        except BaseException:
            self.stop()
            raise
        self.boot_seconds = time.monotonic() - started
        self.progress(f"[systemd-ns] running after {self.boot_seconds:.1f} s")

    def _stage(self, console: str) -> Path:
        """Stage the files under workdir/root and write the setup script,
        which runs as PID 1 of the new namespaces and ends by exec'ing
        systemd; the script's path. `console` is the pty that becomes
        /dev/console."""
        files: dict[str, str | bytes] = {
            f"{UNIT_DIR}/{self.target}": TARGET_UNIT,
            "/run/systemd/journald.conf.d/50-vfiod-test.conf": JOURNALD_CONF,
            "/etc/dbus-1/system.d/50-vfiod-test-limits.conf": DBUS_LIMITS_CONF,
        }
        files.update({f"{UNIT_DIR}/{name}": text for name, text in self.units.items()})
        files.update(self.files)
        overlays = _overlays_for(files)
        writable = (*TMPFS, *overlays)
        overlay_area = self.workdir / "overlays"
        udev = self.workdir / "udev"
        root = self.workdir / "root"
        for made in (overlay_area, udev, root):
            made.mkdir()
        mounts = {*_mount_points(), "/proc", "/dev/console", *writable, "/run/udev", *self.binds}
        mounts |= {str(overlay_area)}
        for where in sorted(mounts):
            drop_in = f"{UNIT_DIR}/{_mount_unit(where)}.d/50-vfiod-test.conf"
            files.setdefault(drop_in, MOUNT_DROP_IN)
        for path, content in files.items():
            staged = root / path.lstrip("/")
            staged.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, str):
                staged.write_text(content)
            else:
                staged.write_bytes(content)
            staged.chmod(0o644)
        (root / UNIT_DIR.lstrip("/")).mkdir(parents=True, exist_ok=True)
        for unit in sorted(self.mask - set(self.units)):  # a unit given is not masked
            (root / UNIT_DIR.lstrip("/") / unit).symlink_to("/dev/null")

        q = shlex.quote
        lines = [
            "set -eu",
            f"cd {q(str(self.workdir))}",
            f"mount --bind {q(console)} /dev/console",
            f"mount -t tmpfs -o mode=0700 vfiod-ns-overlays {q(str(overlay_area))}",
        ]
        layers = [
            (f"{overlay_area}/{i}/upper", f"{overlay_area}/{i}/work") for i in range(len(overlays))
        ]
        lines.append("mkdir -p " + " ".join(q(d) for layer in layers for d in layer))
        for directory, (upper, work) in zip(overlays, layers, strict=True):
            options = f"lowerdir={directory},upperdir={upper},workdir={work}"
            lines.append(f"mount -t overlay vfiod-ns-overlay -o {q(options)} {q(directory)}")
        # Before /tmp is covered: a source may be in the machine's /tmp.
        lines += [f"mount --bind {q(src)} {q(dst)}" for dst, src in sorted(self.binds.items())]
        if self.share_udev:  # taken before /run is covered, moved back after
            lines.append(
                "udev=no; if [ -d /run/udev ]; then mount --bind /run/udev udev; udev=yes; fi"
            )
        lines.append("mount -t tmpfs -o mode=0755,nosuid,nodev vfiod-ns-run /run")
        lines.append("mount -t tmpfs -o mode=1777,nosuid,nodev vfiod-ns-tmp /tmp")
        # From here on, the work directory (under the machine's /tmp) is
        # reached through the working directory only: hence relative paths,
        # and --no-canonicalize (mount would resolve them from /).
        if self.share_udev:
            lines.append(
                'if [ "$udev" = yes ]; then mkdir /run/udev; '
                "mount --no-canonicalize --move udev /run/udev; fi"
            )
        for directory in writable:
            if (root / directory.lstrip("/")).exists():
                lines.append(f"cp -R root{q(directory)}/. {q(directory)}/")
        environment = f"container={CONTAINER} PATH={COMMAND_ENV['PATH']} LANG=C.UTF-8"
        environment += " SYSTEMD_COLORS=0"
        if not self.generators:
            environment += f" SYSTEMD_GENERATOR_PATH={NO_GENERATORS}"
        arguments = f"--system --unit={q(self.target)} --log-target=journal --show-status=yes"
        lines += ["cd /", f"exec env -i {environment} {SYSTEMD} {arguments}"]
        script = self.workdir / "setup.sh"
        script.write_text("\n".join(lines) + "\n")
        return script

    def _make_cgroup(self) -> Path | None:
        """A cgroup of its own, to become the root of the namespace's cgroup
        namespace (so systemd does not share its root with the machine's
        processes), and to kill everything in it if all else fails."""
        if not (CGROUP_ROOT / "cgroup.procs").exists() or not os.access(CGROUP_ROOT, os.W_OK):
            return None  # no cgroup2 at /sys/fs/cgroup: systemd gets what there is
        # Beside this process's own cgroup (a leaf, when it is not the root).
        own = Path("/proc/self/cgroup").read_text().strip().partition("::")[2]
        self._home_cgroup = CGROUP_ROOT / own.lstrip("/")
        parent = self._home_cgroup.parent if own != "/" else CGROUP_ROOT
        for n in range(100):
            candidate = parent / f"vfiod-test-ns-{os.getpid()}-{n}"
            try:
                candidate.mkdir()
            except FileExistsError:
                continue
            return candidate
        raise SystemdNamespaceError("could not make a cgroup for the namespace")

    def _launch(self) -> None:
        # systemd writes its status lines and, until journald runs, its log
        # to /dev/console, which must be a terminal: a pty whose other side
        # `cat` copies into console.log (cat also holds the pty open, so
        # that reading never sees a hang-up between systemd's writes).
        master, slave = os.openpty()
        try:
            tty.setraw(slave)  # no \r\n
            console = os.ttyname(slave)
            with open(self.console_log, "ab") as log:
                self._console = subprocess.Popen(
                    ["cat"], stdin=master, stdout=log, pass_fds=(slave,)
                )
            script = self._stage(console)
            self._cgroup = self._make_cgroup()
            unshare = [
                "unshare",
                "--fork",
                "--kill-child",
                "--pid",
                "--mount",
                "--mount-proc",
                "--uts",
                "--cgroup",
                "--propagation",
                "private",
                "sh",
                str(script),
            ]
            # Into the new cgroup first, so it becomes the cgroup namespace's root.
            enter = 'echo $$ > "$0" && exec "$@"' if self._cgroup else 'exec "$@"'
            where = str(self._cgroup / "cgroup.procs") if self._cgroup else "sh"
            self.progress("[systemd-ns] starting systemd in private namespaces")
            self._process = subprocess.Popen(
                ["sh", "-c", enter, where, *unshare],
                stdin=subprocess.DEVNULL,
                stdout=slave,  # the setup script's output goes to the console too
                stderr=subprocess.STDOUT,
                env=COMMAND_ENV,
            )
        finally:
            os.close(master)
            os.close(slave)
        deadline = time.monotonic() + 30
        while True:
            if self._process.poll() is not None:
                raise self._error(f"the namespace ended at once (exit {self._process.returncode})")
            pid = _systemd_pid_of(self._process.pid)
            if pid is not None:
                self._pid = pid
                if self._cgroup is not None:
                    # unshare (outside the PID namespace) goes back where it
                    # came from: systemd is to find only its own processes in
                    # its cgroup namespace, and it cannot move ones it cannot see.
                    with contextlib.suppress(OSError):
                        (self._home_cgroup / "cgroup.procs").write_text(str(self._process.pid))
                return
            if time.monotonic() > deadline:
                raise self._error("unshare started no child in 30 s")
            time.sleep(0.05)

    def _wait_running(self, deadline: float) -> None:
        private = self.path("/run/systemd/private")
        self.wait_for(
            "systemd's private socket /run/systemd/private",
            lambda: private.exists() or None,
            timeout=deadline - time.monotonic(),
        )
        left = max(deadline - time.monotonic(), 1.0)
        try:
            result = self.systemctl("is-system-running", "--wait", check=False, timeout=left)
        except subprocess.TimeoutExpired:
            message = f"systemd did not finish starting in {self.boot_timeout:g} s"
            raise self._error(message) from None
        state = result.stdout.strip()
        if state != "running":
            raise self._error(f"systemd started up {state!r}, not 'running'")

    def stop(self) -> None:
        """Power the namespace off (kill it if it does not end), remove its
        cgroup and work directory, and check that nothing was left."""
        problems: list[str] = []
        process = self._process
        if process is not None and process.poll() is None and self._pid:
            stopped = time.monotonic()
            self.progress("[systemd-ns] powering off")
            if self._power_off(process):
                self.progress(f"[systemd-ns] off after {time.monotonic() - stopped:.1f} s")
            else:
                problems.append(
                    f"poweroff did not end it in {self.stop_timeout:g} s\n{self.diagnostics()}"
                )
        if process is not None and process.poll() is None:
            self._kill_all()
            process.kill()
            process.wait()
        self._process = None
        self._pid = 0
        if self._cgroup is not None:
            problems += self._remove_cgroup(self._cgroup)
            self._cgroup = None
        console, self._console = self._console, None
        if console is not None:
            console.kill()
            console.wait()
        left = sorted(set(_mounts()) - set(self._mounts_before)) if self._mounts_before else []
        if left:
            problems.append(f"mounts left behind: {left}")
        if problems:
            tail = self._console_tail()
            if not self._keep_workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)
            raise SystemdNamespaceError("; ".join(problems) + tail)
        if not self._keep_workdir and self.workdir.exists():
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _power_off(self, process: subprocess.Popen[bytes]) -> bool:
        """Ask systemd to power off, as a container manager does (SIGRTMIN+4:
        start poweroff.target; `systemctl poweroff` would ask systemd-logind
        first); whether the namespace ended in time. The signal is repeated
        now and then: a repeated request makes systemd look at its waiting
        jobs again, should one of them be stuck."""
        started = time.monotonic()
        deadline = started + self.stop_timeout
        while True:
            if time.monotonic() > started + 1:
                waited = time.monotonic() - started
                self.progress(f"[systemd-ns] not off after {waited:.0f} s, asking again")
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._pid, POWEROFF_SIGNAL)
            try:
                process.wait(min(POWEROFF_REPEAT, max(deadline - time.monotonic(), 0.1)))
            except subprocess.TimeoutExpired:
                if time.monotonic() > deadline:
                    return False
            else:
                return True

    def _kill_all(self) -> None:
        if self._cgroup is not None:
            with contextlib.suppress(OSError):
                (self._cgroup / "cgroup.kill").write_text("1")
        if self._pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._pid, signal.SIGKILL)

    def _remove_cgroup(self, cgroup: Path) -> list[str]:
        """Remove the cgroup tree (deepest first; systemd may have removed
        some of it, or all, on its way out); what could not be."""
        if not cgroup.exists():
            return []
        deadline = time.monotonic() + 10
        while True:
            leftover = [p for p in cgroup.rglob("cgroup.procs") if _read(p).strip()]
            if not leftover:
                break
            if time.monotonic() > deadline:
                return [f"processes left in {[str(p.parent) for p in leftover]}"]
            with contextlib.suppress(OSError):
                (cgroup / "cgroup.kill").write_text("1")
            time.sleep(0.1)
        directories = sorted(
            (p for p in cgroup.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)
        )
        try:
            for directory in [*directories, cgroup]:
                with contextlib.suppress(FileNotFoundError):
                    directory.rmdir()
        except OSError as e:
            return [f"cannot remove cgroup {e.filename}: {e.strerror}"]
        return []

    # -- commands in the namespace

    def path(self, path: str) -> Path:
        """A path in the namespace, as reached from outside it."""
        return Path(f"/proc/{self.pid}/root") / path.lstrip("/")

    def run(
        self,
        argv: Sequence[str],
        *,
        check: bool = True,
        timeout: float = COMMAND_TIMEOUT,
        input: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run `argv` in every namespace of systemd (and its root), as root.
        With `check`, a non-zero exit raises SystemdNamespaceError; so does
        running past `timeout`, whatever still holds the output pipes (a
        `systemd-run --pipe` service does: killing the command alone would
        leave the wait for its output unbounded)."""
        process = subprocess.Popen(
            [*NSENTER, f"--target={self.pid}", "--", *argv],
            stdin=subprocess.PIPE if input is not None else None,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
            env={**COMMAND_ENV, **(env or {})},
            start_new_session=True,
        )
        try:
            stdout, stderr = process.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            try:
                stdout, stderr = process.communicate(timeout=5)
            except subprocess.TimeoutExpired:  # held open outside the process group
                stdout, stderr = "", "(output pipes still held open by another process)"
                for pipe in (process.stdout, process.stderr):
                    if pipe is not None:
                        pipe.close()
                process.wait()
            raise self._error(
                f"{shlex.join(argv)} did not finish within {timeout:g} s\n"
                f"--- stdout\n{stdout}--- stderr\n{stderr}"
            ) from None
        result = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
        if check and result.returncode != 0:
            raise self._error(
                f"{shlex.join(argv)} exited with {result.returncode}\n"
                f"--- stdout\n{result.stdout}--- stderr\n{result.stderr}"
            )
        return result

    def systemctl(
        self, *args: str, check: bool = True, timeout: float = COMMAND_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        argv = ["systemctl", "--no-pager", "--no-ask-password", *args]
        return self.run(argv, check=check, timeout=timeout)

    def show(self, unit: str, *properties: str) -> dict[str, str]:
        """`systemctl show` of `unit`: the properties asked for (all without)."""
        args = ["show", unit]
        if properties:
            args.append("--property=" + ",".join(properties))
        output = self.systemctl(*args).stdout
        return dict(line.partition("=")[::2] for line in output.splitlines() if "=" in line)

    def wait_for(self, what: str, probe: Callable[[], T | None], timeout: float) -> T:
        """Poll `probe` until it returns something other than None; raise
        naming `what` when `timeout` seconds pass first."""
        deadline = time.monotonic() + timeout
        while True:
            value = probe()
            if value is not None:
                return value
            if time.monotonic() > deadline:
                raise self._error(f"{what}: not there after {timeout:g} s")
            if self._process is not None and self._process.poll() is not None:
                raise self._error(f"{what}: the namespace ended (exit {self._process.returncode})")
            time.sleep(POLL_INTERVAL)

    def wait_unit(
        self,
        unit: str,
        *,
        active: str = "active",
        sub: str | None = "running",
        where: Callable[[dict[str, str]], bool] = lambda props: True,
        timeout: float = COMMAND_TIMEOUT,
    ) -> dict[str, str]:
        """Wait until `unit` is in ActiveState `active` (and SubState `sub`)
        and `where` holds of its properties; they are returned. A unit that
        fails on the way raises at once."""
        names = ("ActiveState", "SubState", "MainPID", "NRestarts", "Result", "ExecMainStatus")

        def probe() -> dict[str, str] | None:
            props = self.show(unit, *names)
            if props["ActiveState"] == "failed" and active != "failed":
                raise self._error(f"{unit} failed: {props}")
            ok = props["ActiveState"] == active and sub in (None, props["SubState"])
            return props if ok and where(props) else None

        state = f"ActiveState={active}" + (f" SubState={sub}" if sub else "")
        return self.wait_for(f"{unit} in {state}", probe, timeout)

    def main_pid(self, unit: str) -> int:
        """The unit's main PID, in the namespace's numbering (0: none)."""
        return int(self.show(unit, "MainPID")["MainPID"])

    def journal(self, *matches: str, unit: str | None = None) -> list[JournalEntry]:
        """Journal entries matching every `FIELD=value` of `matches` (and of
        `unit`), oldest first; binary values come back decoded."""
        argv = ["journalctl", "--no-pager", "--output=json"]
        if unit is not None:
            argv.append(f"--unit={unit}")
        result = self.run([*argv, *matches])
        entries: list[JournalEntry] = []
        for line in result.stdout.splitlines():
            raw = json.loads(line)
            entries.append({key: _journal_value(value) for key, value in raw.items()})
        return entries

    def wait_journal(
        self, *matches: str, count: int = 1, timeout: float = COMMAND_TIMEOUT
    ) -> list[JournalEntry]:
        """Wait until at least `count` entries match; all that match."""

        def probe() -> list[JournalEntry] | None:
            entries = self.journal(*matches)
            return entries if len(entries) >= count else None

        return self.wait_for(f"{count} journal entries with {' '.join(matches)}", probe, timeout)

    # -- diagnostics

    def diagnostics(self) -> str:
        """What is failed and queued, the journal tail and the console tail."""
        parts: list[str] = []
        if self._pid and self._process is not None and self._process.poll() is None:
            for title, argv in (
                ("systemctl --failed", ["systemctl", "--no-pager", "--failed"]),
                ("systemctl list-jobs", ["systemctl", "--no-pager", "list-jobs"]),
                (
                    "journal tail",
                    ["journalctl", "--no-pager", "--lines=60", "--output=short-monotonic"],
                ),
            ):
                try:
                    result = subprocess.run(
                        [*NSENTER, f"--target={self._pid}", "--", *argv],
                        capture_output=True,
                        text=True,
                        errors="replace",
                        check=False,
                        timeout=20,
                        env=COMMAND_ENV,
                    )
                    parts.append(f"--- {title}\n{result.stdout}{result.stderr}")
                except subprocess.SubprocessError as e:
                    parts.append(f"--- {title}: {e}")
        return "\n".join(parts) + self._console_tail()

    def _console_tail(self, lines: int = 40) -> str:
        try:
            text = self.console_log.read_text(errors="replace")
        except OSError:
            return ""
        text = text.replace("\r", "")  # systemd sets the pty up as a terminal again
        return "\n--- console tail\n" + "\n".join(text.splitlines()[-lines:])

    def _error(self, message: str) -> SystemdNamespaceError:
        return SystemdNamespaceError(f"{message}\n{self.diagnostics()}")
