"""Boot a real kernel under QEMU (TCG) with virtme-ng and run tests inside it.

The guest sees the host's root file system, so it runs the in-guest tests from
this checkout with this project's own virtualenv; results come back as JUnit
XML through a directory shared read-write with the guest.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import hashlib
import os
import re
import select
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO

from tests.vm.topology import (
    E1000E,
    E1000E_IDS,
    GUEST_DIR,
    RESERVATION,
    Boot,
    KernelKind,
    Topology,
)
from vfiod.host.reserve import RULES_FILE, udev_rules
from vfiod.pci import PciAddress
from vfiod.policy.model import Reservation

PROJECT = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vfiod"
DISK_SIZE = 64 << 20
BOOT_TIMEOUT = 900  # seconds for boot plus all guest tests of one boot, under TCG
# What a guest kernel prints when its CPUs got no time for a long while.
STALLED = "rcu_preempt detected stalls on CPUs/tasks"
GUEST_TEST_STUCK = 240  # seconds one guest test may take before its stacks are printed
# What `make install` is staged from, and where the staged trees are kept
# (one per state of the sources): the systemd tests run vfiod as installed.
INSTALLED_FROM = ("vfiod", "systemd", "dbus", "policy", "Makefile", "setup.cfg", "pyproject.toml")
INSTALLS = PROJECT / "build/vm-install"
INSTALL_PREFIX = "/usr/local"
# The interpreter the installed venv is made from: the system's own, which
# the unit's ProtectHome=yes cannot hide (unlike, say, a pyenv in /root).
SYSTEM_PYTHON = "/usr/bin/python3"
# Where a boot's shared directory is made: a path virtme-ng can take (it
# hands --rwdir and the kernel's path to a shell unquoted, so the checkout's
# path, which may hold a space, will not do).
SCRATCH = "/tmp"

HOW_TO_GET_TEST_KERNEL = (
    "the no-IOMMU/iommufd tests need a kernel with CONFIG_VFIO_NOIOMMU, CONFIG_IOMMUFD "
    "and CONFIG_VFIO_DEVICE_CDEV: run `make test-kernel` (builds one from Debian's "
    "linux-source-6.12 with tests/vm/vfiotest.fragment, about 20 min, cached), or set "
    "VFIOD_TEST_KERNEL to such a bzImage"
)
HOW_TO_GET_STOCK_KERNEL = (
    "the legacy VFIO tests need Debian's kernel: apt-get install linux-image-amd64 "
    "(`make deps` does), or set VFIOD_STOCK_KERNEL to a bzImage with its modules installed"
)


class NotInstalledError(Exception):
    """Something a VM test needs is not installed; the message says how to get it."""


def _newest(paths: list[str]) -> Path | None:
    readable = [p for p in paths if os.access(p, os.R_OK)]
    return Path(sorted(readable)[-1]) if readable else None


def stock_kernel() -> Path:
    override = os.environ.get("VFIOD_STOCK_KERNEL")
    found = Path(override) if override else _newest(glob.glob("/boot/vmlinuz-*-amd64"))
    if found is None or not found.is_file():
        raise NotInstalledError(HOW_TO_GET_STOCK_KERNEL)
    return found


def test_kernel() -> Path:
    """The test kernel: $VFIOD_TEST_KERNEL, the shared one beside the checkout,
    or the one `make test-kernel` built into the cache."""
    override = os.environ.get("VFIOD_TEST_KERNEL")
    if override:
        if not Path(override).is_file():
            raise NotInstalledError(f"VFIOD_TEST_KERNEL={override} does not exist")
        return Path(override)
    candidates = glob.glob(str(PROJECT.parent / "shared/vm/vmlinuz-*-vfiotest"))
    candidates += glob.glob(str(CACHE / "kernel/vmlinuz-*-vfiotest"))
    found = _newest(candidates)
    if found is None:
        raise NotInstalledError(HOW_TO_GET_TEST_KERNEL)
    return found


def kernel_for(kind: KernelKind) -> Path:
    return stock_kernel() if kind is KernelKind.STOCK else test_kernel()


def vng_path() -> str:
    venv_vng = Path(sys.executable).parent / "vng"
    found = str(venv_vng) if venv_vng.exists() else shutil.which("vng")
    if found is None:
        raise NotInstalledError("virtme-ng is not installed: pip install virtme-ng (`make venv`)")
    if shutil.which("qemu-system-x86_64") is None:
        raise NotInstalledError("QEMU is missing: apt-get install qemu-system-x86 (`make deps`)")
    return found


def vng_argv() -> list[str]:
    """How to run virtme-ng. It puts the paths of its own files on the kernel
    command line (``init=<its guest tools>/...`` for a modular kernel), where
    whitespace splits them. From a venv under a path with whitespace it runs
    through a link to the venv from the scratch folder (Python finds its
    packages under the path it was started by), and so do the scripts it
    runs (virtme-run, ...), through wrappers in a folder first on its PATH."""
    vng = vng_path()
    here = Path(sys.executable).parent
    if not any(c.isspace() for c in sys.prefix) or Path(vng).parent != here:
        return [vng]
    digest = hashlib.sha256(os.fsencode(sys.prefix)).hexdigest()[:16]
    link = Path(SCRATCH) / f"vfiod-venv-{digest}"
    _replace_link(link, sys.prefix)
    wrappers = Path(SCRATCH) / f"vfiod-venv-{digest}.bin"
    wrappers.mkdir(exist_ok=True)
    python = link / "bin" / Path(sys.executable).name
    for script in [*sorted(here.glob("virtme-*")), here / "vng"]:
        wrapper = wrappers / script.name
        # pip's scripts are Python too (their sh trampoline is a string to it)
        run = shlex.join([str(python), str(link / "bin" / script.name)])
        text = f'#!/bin/sh\nexec {run} "$@"\n'
        if not wrapper.exists() or wrapper.read_text() != text:
            wrapper.write_text(text)
            wrapper.chmod(0o755)
    return [str(wrappers / "vng")]


def _replace_link(link: Path, target: str) -> None:
    if link.is_symlink() and os.readlink(link) == target:
        return
    temporary = link.with_name(f"{link.name}.{os.getpid()}")
    temporary.unlink(missing_ok=True)
    temporary.symlink_to(target)
    temporary.rename(link)  # (another boot may be making it too)


GUEST_START = "--- vfiod: guest command starts ---"
GUEST_SCRIPT = "guest.sh"
_POWERED_OFF = "reboot: Power down"
POWEROFF_GRACE = 20.0  # seconds QEMU may take to exit after the guest powered off
_KERNEL_LOG = re.compile(r"\[\s*\d+\.\d+\] ")


def _lines_until(stream: IO[str], deadline: Callable[[], float]) -> Iterator[str]:
    """Lines of ``stream`` until it ends or ``deadline()`` (monotonic) passes."""
    fd = stream.fileno()
    buffer = ""
    while True:
        left = deadline() - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            if buffer:
                yield buffer
            return
        chunk = os.read(fd, 65536).decode(errors="replace")
        if not chunk:
            if buffer:
                yield buffer
            return
        buffer += chunk
        *complete, buffer = buffer.split("\n")
        for line in complete:
            yield line + "\n"


@dataclasses.dataclass(frozen=True)
class VmRun:
    returncode: int
    output: str
    seconds: float


def run_vm(
    kernel: Path,
    topology: Topology,
    command: str,
    *,
    shared_dir: Path,
    progress: Callable[[str], None] = lambda line: None,
    timeout: float = BOOT_TIMEOUT,
    memory: str = "1G",
    rodirs: Mapping[str, Path] = {},
) -> VmRun:
    """Boot ``kernel`` on ``topology`` and run ``command`` (a shell line) as root
    in the guest; ``shared_dir`` is writable from inside (make it in SCRATCH:
    virtme-ng takes no whitespace in its path)."""
    vng = vng_argv()
    if any(c.isspace() for c in str(shared_dir)):
        raise ValueError(f"virtme-ng cannot share {shared_dir!r} (whitespace): use {SCRATCH}")
    if any(c.isspace() for c in str(kernel)):  # as for the shared directory
        link = shared_dir / "vmlinuz"
        link.unlink(missing_ok=True)
        link.symlink_to(kernel)
        kernel = link
    disk = shared_dir / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(DISK_SIZE)  # sparse and blank at every boot
    argv = [
        *vng,
        "--run",
        str(kernel),
        "--disable-kvm",  # this host's /dev/kvm cannot boot stock kernels
        "--disable-microvm",  # q35: PCIe, ICH9 and the emulated IOMMU
        "--verbose",  # the kernel log goes into console.log, for failures
        "--cpus",
        "2",
        "--memory",
        memory,
        "--rwdir",
        str(shared_dir),
        "--qemu-opts=" + shlex.join(topology.qemu_opts(str(disk))),
    ]
    # Mounted by the guest's init before its udev starts: what a host has at boot.
    for guest_path, host_dir in rodirs.items():
        argv += ["--rodir", f"{guest_path}={host_dir}"]
    argv += ["--append", " ".join(topology.kernel_args())]
    argv += ["--exec", guest_script(shared_dir, command)]
    env = dict(os.environ)
    env["PATH"] = f"{Path(vng[0]).parent}:{env.get('PATH', '/usr/bin:/bin')}"
    try:
        # virtme-ng works in its current folder (the initramfs of a modular
        # kernel): the shared one, which has no space in its path.
        return run_supervised(argv, env=env, progress=progress, timeout=timeout, cwd=shared_dir)
    finally:
        disk.unlink(missing_ok=True)


def guest_script(shared_dir: Path, command: str) -> str:
    """Put ``command`` in a script in ``shared_dir``; the short line that runs
    it. virtme-ng hands its --exec to the guest on the kernel command line,
    which Linux cuts at 2048 bytes (x86): a long command (a deep checkout's
    path, many test files) would be cut, and the guest's init would die."""
    script = shared_dir / GUEST_SCRIPT
    script.write_text(f"echo {shlex.quote(GUEST_START)}\n{command}\n")
    return f"sh {shlex.quote(str(script))}"


STOP_GRACE = 30.0  # seconds the supervisor gets to kill and reap the VM


def processes_naming(path: Path) -> dict[int, str]:
    """Processes with ``path`` in their arguments (a boot's vng and QEMU
    name its shared directory): what is left of a boot that should be gone."""
    found: dict[int, str] = {}
    needle = os.fsencode(path)
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                argv = f.read()
        except OSError:
            continue
        if needle in argv:
            found[int(name)] = argv.replace(b"\0", b" ").decode(errors="replace")[:200]
    return found


def run_supervised(
    argv: list[str],
    *,
    env: dict[str, str] | None = None,
    progress: Callable[[str], None] = lambda line: None,
    timeout: float = BOOT_TIMEOUT,
    cwd: Path | None = None,
) -> VmRun:
    """Run a VM boot (``argv``: vng and its arguments) under tests.vm.supervise,
    in a session of its own: whatever happens here — the boot ends, times
    out, the caller raises or is interrupted — no process of it survives;
    and if this process is killed, the supervisor ends the VM itself."""
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.vm.supervise", "--", *argv],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        env={**(os.environ if env is None else env), "PYTHONPATH": str(PROJECT)},
        cwd=cwd or PROJECT,
        start_new_session=True,  # a terminal's Ctrl-C reaches us, not the VM: we stop it
    )
    lines: list[str] = []
    assert proc.stdout is not None
    try:
        started_guest = False
        # A guest that hangs (at power-off, say) prints nothing more: read
        # with a deadline, never block on a line that may not come. Once the
        # guest has powered off, QEMU gets POWEROFF_GRACE seconds to exit.
        deadline = [started + timeout]
        for line in _lines_until(proc.stdout, lambda: deadline[0]):
            lines.append(line)
            if _POWERED_OFF in line:
                deadline[0] = min(deadline[0], time.monotonic() + POWEROFF_GRACE)
            # Progress is what the guest command prints; QEMU's and the boot's
            # own lines stay in the log.
            if started_guest and not _KERNEL_LOG.match(line):
                progress(line.rstrip("\n"))
            started_guest = started_guest or line.strip() == GUEST_START
        if proc.poll() is None and time.monotonic() >= deadline[0]:
            lines.append(f"\n[harness] VM stopped after {time.monotonic() - started:.0f} s\n")
    finally:
        returncode = _stop(proc)
        proc.stdout.close()
    return VmRun(returncode, "".join(lines), time.monotonic() - started)


def _stop(proc: subprocess.Popen[str]) -> int:
    """End the supervisor (which ends the VM) and reap it; its status."""
    if proc.poll() is None:
        proc.terminate()
        try:
            return proc.wait(STOP_GRACE)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the session it leads
    return proc.wait()


def _sources_digest() -> str:
    digest = hashlib.sha256()
    for top in INSTALLED_FROM:
        path = PROJECT / top
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            if "__pycache__" not in file.parts:
                digest.update(str(file.relative_to(PROJECT)).encode() + b"\0")
                digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


def installed_tree(progress: Callable[[str], None] = lambda line: None) -> Path:
    """This checkout as `make install DESTDIR=... PREFIX=/usr/local` puts it,
    staged once per state of its sources (a venv with vfiod and its
    dependencies from PyPI, built from the system's Python; the files
    systemd and D-Bus read)."""
    if not Path(SYSTEM_PYTHON).exists():
        raise NotInstalledError(f"{SYSTEM_PYTHON} is missing: apt-get install python3-venv")
    tree = INSTALLS / _sources_digest()
    if (tree / INSTALL_PREFIX.lstrip("/") / "bin/vfiod").exists():
        return tree
    progress(f"[vm] make install into {tree.relative_to(PROJECT)} (about a minute, once)")
    INSTALLS.mkdir(parents=True, exist_ok=True)
    for old in INSTALLS.iterdir():
        shutil.rmtree(old, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix="staging-", dir=INSTALLS))
    make = ["make", "-s", "install", f"DESTDIR={staging}", f"PREFIX={INSTALL_PREFIX}"]
    result = subprocess.run(
        [*make, f"PYTHON={SYSTEM_PYTHON}"],
        cwd=PROJECT,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if result.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        raise RuntimeError(f"make install failed:\n{result.stdout}{result.stderr}")
    staging.chmod(0o755)
    staging.rename(tree)
    return tree


@dataclasses.dataclass(frozen=True)
class GuestTest:
    name: str
    outcome: str  # passed | failed | error | skipped
    message: str
    seconds: float


def parse_junit(path: Path) -> list[GuestTest]:
    results: list[GuestTest] = []
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            element = case.find(tag)
            if element is not None:
                outcome = "failed" if tag == "failure" else tag
                message = (element.get("message") or "") + "\n" + (element.text or "")
                break
        results.append(GuestTest(name, outcome, message.strip(), float(case.get("time", 0))))
    return results


def guest_command(boot: Boot, results: Path, installed: Path | None = None) -> str:
    """The shell line the guest runs: the boot's guest tests with our venv
    (``installed``: where installed_tree staged vfiod, for the tests that
    run it as installed)."""
    tests = [f"{GUEST_DIR}/{t}" for t in boot.tests]
    pytest = [
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "no:cacheprovider",  # the root file system is read-only in the guest,
        "-p",
        "no:hypothesispytest",  # so are the caches of both
        "-o",  # a test stuck this long prints where, before the boot's time runs out
        f"faulthandler_timeout={GUEST_TEST_STUCK}",
        "-v",
        "--junitxml",
        str(results / "junit.xml"),
        *tests,
    ]
    env = {
        "VFIOD_GUEST": "1",
        "VFIOD_VM_KERNEL": str(boot.kernel),
        "VFIOD_VM_TOPOLOGY": boot.topology.name,
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    if installed is not None:
        env["VFIOD_INSTALLED"] = str(installed)
    assignments = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
    return f"cd {shlex.quote(str(PROJECT))} && env {assignments} {shlex.join(pytest)}"


@dataclasses.dataclass(frozen=True)
class BootResult:
    boot: Boot
    kernel: Path
    run: VmRun
    tests: list[GuestTest]

    def failures(self) -> list[GuestTest]:
        return [t for t in self.tests if t.outcome in ("failed", "error")]


def boot_udev_rules(boot: Boot, shared: Path) -> dict[str, Path]:
    """The guest's /etc/udev/rules.d for a boot with reserved devices: vfiod's
    own rules for them, as a vfiod of the last boot would have left them."""
    if not boot.reserved:
        return {}
    addresses = tuple(PciAddress.parse(a) for a in boot.reserved)
    reservation = Reservation(RESERVATION, "tests/vm/topology.py", addresses)
    rules = shared / "udev-rules"
    rules.mkdir(mode=0o755)
    ids = {a: E1000E_IDS for a in addresses if str(a) == E1000E}  # as vfiod saw it
    text = udev_rules(((reservation, a) for a in addresses), ids)
    (rules / Path(RULES_FILE).name).write_text(text)
    return {"/" + str(Path(RULES_FILE).parent): rules}


def run_boot(
    boot: Boot, results: Path, progress: Callable[[str], None] = lambda line: None
) -> BootResult:
    """One boot; its JUnit XML and console log land in ``results``."""
    kernel = kernel_for(boot.kernel)
    results.mkdir(parents=True, exist_ok=True)
    for old in ("junit.xml", "console.log"):
        (results / old).unlink(missing_ok=True)
    installed = installed_tree(progress) if boot.installed else None
    progress(f"[vm {boot.name}] booting {kernel.name} on {boot.topology.name} under QEMU TCG")
    with tempfile.TemporaryDirectory(prefix=f"vfiod-vm-{boot.name}-", dir=SCRATCH) as scratch:
        shared = Path(scratch)
        run = run_vm(
            kernel,
            boot.topology,
            guest_command(boot, shared, installed),
            shared_dir=shared,
            progress=lambda line: progress(f"[vm {boot.name}] {line}"),
            rodirs=boot_udev_rules(boot, shared),
        )
        junit = shared / "junit.xml"
        tests = parse_junit(junit) if junit.exists() else []
        if junit.exists():
            shutil.copyfile(junit, results / "junit.xml")
    (results / "console.log").write_text(run.output)
    progress(f"[vm {boot.name}] done in {run.seconds:.0f} s: {len(tests)} guest tests")
    return BootResult(boot, kernel, run, tests)
