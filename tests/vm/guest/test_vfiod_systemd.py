"""vfiod under real systemd (PID 1 of a private namespace in the test VM,
tests/vm/systemd_ns.py), as `make install` installs it — its unit, bus policy,
activation file and venv, staged by the harness (tests/vm/harness.py,
installed_tree) and put in place in the namespace only: started by D-Bus
activation, a lease kept across `systemctl restart` and across SIGKILL (the
fd store), policy re-read by `systemctl reload`, devices given back by
`systemctl stop`, audit entries in the journal.

One systemd serves the module; the tests run in file order and build on
each other (a lease made in one is checked in the next).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.vm.harness import INSTALL_PREFIX
from tests.vm.systemd_ns import SystemdNamespace, SystemdNamespaceError
from tests.vm.topology import E1000E
from vfiod.broker import MESSAGE_GRANTED, MESSAGE_REVOKED

NOBODY = 65534
# The installed venv's interpreter: clients here import the installed vfiod.
PYTHON = f"{INSTALL_PREFIX}/lib/vfiod/venv/bin/python"
# What of the staged tree the namespace needs besides INSTALL_PREFIX itself.
SYSTEM_FILES = (
    "/usr/lib/systemd/system/vfiod.service",
    "/usr/share/dbus-1/system.d/org.vfiod1.conf",
    "/usr/share/dbus-1/system-services/org.vfiod1.service",
    "/usr/lib/tmpfiles.d/vfiod.conf",
    "/usr/lib/vfiod/vfiod.toml",
)

POLICY = f"""
[[rule]]
name = "nobody-e1000e"
effect = "allow"
address = "{E1000E}"
users = ["nobody"]
managed = true
max-locked-memory = "64M"
"""


def installed() -> Path:
    tree = os.environ.get("VFIOD_INSTALLED")
    if not tree:
        pytest.fail("VFIOD_INSTALLED is not set: run this through tests/vm/test_vm.py")
    return Path(tree)


Say = Callable[[str], None]


@pytest.fixture(scope="module")
def say(pytestconfig: pytest.Config) -> Say:
    capture = pytestconfig.pluginmanager.getplugin("capturemanager")

    def print_line(line: str) -> None:
        with capture.global_and_fixture_disabled():
            print(line, flush=True)

    return print_line


@pytest.fixture(scope="module")
def ns(say: Say) -> Iterator[SystemdNamespace]:
    tree = installed()
    files: dict[str, str | bytes] = {f: (tree / f.lstrip("/")).read_bytes() for f in SYSTEM_FILES}
    files["/etc/vfiod/policy.d/50-test.toml"] = POLICY
    with SystemdNamespace(
        files=files,
        binds={INSTALL_PREFIX: str(tree / INSTALL_PREFIX.lstrip("/"))},
        progress=say,
    ) as namespace:
        yield namespace
        # Whatever happened, the device goes back.
        namespace.systemctl("stop", "vfiod.service", check=False, timeout=120)


def as_nobody(ns: SystemdNamespace, code: str, *args: str, timeout: float = 150) -> object:
    """Run a client snippet as nobody in the namespace; the JSON it prints last."""
    prelude = (
        "import json, os, subprocess, sys\n"
        "from vfiod.client import Client, VfiodError\n"
        "vfiod = Client()\n"
    )
    argv = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--"]
    argv += [PYTHON, "-c", prelude + code, *args]
    result = ns.run(argv, timeout=timeout)
    return json.loads(result.stdout.splitlines()[-1])


def driver(address: str) -> str | None:
    link = Path("/sys/bus/pci/devices", address, "driver")
    return link.resolve().name if link.exists() else None


def leases(ns: SystemdNamespace) -> list[str]:
    code = "print(json.dumps(sorted(vfiod.inventory().leases)))"
    result = as_nobody(ns, code)
    assert isinstance(result, list)
    return [str(path) for path in result]


def test_a_call_activates_vfiod_which_grants_a_lease(ns: SystemdNamespace, say: Say) -> None:
    assert ns.show("vfiod.service", "ActiveState")["ActiveState"] == "inactive"
    # A call activates it (busctl: a longer timeout than a client's 25 s, for TCG).
    ping = ["busctl", "--timeout=150", "call", "org.vfiod1", "/org/vfiod1"]
    ns.run([*ping, "org.freedesktop.DBus.Peer", "Ping"], timeout=160)
    # The lease follows a process of nobody's (sleep), not the caller's connection.
    code = """\
child = subprocess.Popen(["sleep", "3600"], start_new_session=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
pidfd = os.pidfd_open(child.pid)
lease = vfiod.acquire([sys.argv[1]], managed=True, owner_pidfd=pidfd, label="vm-systemd")
lease.close()
print(json.dumps({"lease": lease.path, "sleep": child.pid}))
"""
    out = as_nobody(ns, code, E1000E)
    assert isinstance(out, dict)
    props = ns.wait_unit("vfiod.service")
    say(f"[vfiod-systemd] activated: {props.get('StatusText') or 'active'}")
    assert driver(E1000E) == "vfio-pci"
    assert leases(ns) == [out["lease"]]
    (granted,) = ns.wait_journal(f"MESSAGE_ID={MESSAGE_GRANTED}")
    assert granted["CALLER_UID"] == str(NOBODY)
    assert granted["LABEL"] == "vm-systemd"
    assert granted["DEVICES"] == E1000E
    assert granted["_SYSTEMD_UNIT"] == "vfiod.service"
    # vfiod raised the owner's locked-memory limit to the rule's 64 MiB.
    limits = ns.run(
        [
            "prlimit",
            "--memlock",
            "--raw",
            "--noheadings",
            "--output=SOFT,HARD",
            f"--pid={out['sleep']}",
        ]
    )
    assert limits.stdout.split() == [str(64 << 20)] * 2
    # The fds it holds for the lease are in systemd's fd store.
    assert int(ns.show("vfiod.service", "NFileDescriptorStore")["NFileDescriptorStore"]) == 3


def test_the_installed_vfiod_is_what_runs(ns: SystemdNamespace) -> None:
    """The unit systemd runs is the one `make install` installed, and its
    vfiod the installed one, not this checkout."""
    props = ns.show("vfiod.service", "FragmentPath", "MainPID")
    assert props["FragmentPath"].endswith("lib/systemd/system/vfiod.service")  # merged /usr
    unit = ns.path(props["FragmentPath"]).read_bytes()
    assert unit == (installed() / "usr/lib/systemd/system/vfiod.service").read_bytes()
    process = ns.path(f"/proc/{props['MainPID']}")  # its pid in the namespace
    command = (process / "cmdline").read_bytes().split(b"\0")
    assert command[1].decode() == f"{INSTALL_PREFIX}/bin/vfiod", command
    exe = os.readlink(process / "exe")
    assert not exe.startswith(str(installed())), "the venv's python links to the system's"
    maps = (process / "maps").read_text()
    assert "sd_bus_internals" in maps
    assert str(Path(__file__).resolve().parents[3]) not in maps, "vfiod runs from the checkout"


def vfiod_said(ns: SystemdNamespace, lines: int = 20) -> str:
    """The last lines of vfiod's journal, for a failing assertion to show."""
    entries = ns.journal("_SYSTEMD_UNIT=vfiod.service")[-lines:]
    return "vfiod said:\n" + "\n".join(str(e["MESSAGE"]) for e in entries)


def test_restart_keeps_the_lease(ns: SystemdNamespace) -> None:
    (before,) = leases(ns)
    pid = ns.main_pid("vfiod.service")
    ns.systemctl("restart", "vfiod.service", timeout=150)
    assert ns.main_pid("vfiod.service") != pid
    assert leases(ns) == [before], vfiod_said(ns)
    assert driver(E1000E) == "vfio-pci"
    entries = ns.journal("_SYSTEMD_UNIT=vfiod.service")
    assert any("re-adopted with its fds after a restart" in e["MESSAGE"] for e in entries)


def test_kill_9_and_restart_keep_the_lease(ns: SystemdNamespace) -> None:
    (before,) = leases(ns)
    pid = ns.main_pid("vfiod.service")
    restarts = int(ns.show("vfiod.service", "NRestarts")["NRestarts"])
    ns.run(["kill", "-9", str(pid)])
    ns.wait_unit(
        "vfiod.service",
        where=lambda p: int(p["NRestarts"]) == restarts + 1 and int(p["MainPID"]) != pid,
        timeout=150,
    )
    assert leases(ns) == [before], vfiod_said(ns)
    assert driver(E1000E) == "vfio-pci"


def test_reload_rereads_the_policy_and_revokes(ns: SystemdNamespace) -> None:
    (before,) = leases(ns)
    policy = ns.path("/etc/vfiod/policy.d/50-test.toml")
    policy.write_text(POLICY.replace('users = ["nobody"]', 'users = ["daemon"]'))
    ns.systemctl("reload", "vfiod.service", timeout=120)
    (revoked,) = ns.wait_journal(f"MESSAGE_ID={MESSAGE_REVOKED}")
    assert revoked["LEASE"] == before.rsplit("/", 1)[1]
    assert "no longer allows 0000:00:10.0" in revoked["MESSAGE"]
    ns.wait_for("e1000e back on its driver", lambda: driver(E1000E) == "e1000e" or None, 60)
    assert leases(ns) == []
    policy.write_text(POLICY)
    ns.systemctl("reload", "vfiod.service", timeout=120)


UNIT_POLICY = f"""
[[rule]]
name = "dpdk-unit"
effect = "allow"
address = "{E1000E}"
units = ["dpdk-forwarder.service"]
managed = true

[[rule]]
name = "vms-in-machine-slice"
effect = "allow"
address = "{E1000E}"
slices = ["machine.slice"]
managed = true
"""

# As nobody in a unit systemd-run makes: optionally make cgroups named like
# system units in the unit's delegated subtree (systemd hands it to the
# unit's user) and move in; ask; give back what was granted. No "$" here:
# systemd expands it in a unit's command line.
ASK_IN_UNIT = """\
import json, os, sys

def own_cgroup():  # the directory, whatever the cgroup namespace shows
    pid = str(os.getpid())
    for directory, _, files in os.walk("/sys/fs/cgroup"):
        if "cgroup.procs" in files:
            try:
                with open(directory + "/cgroup.procs") as f:
                    if pid in f.read().split():
                        return directory
            except OSError:
                pass
    raise SystemExit("no cgroup of mine")

spoof = sys.argv[2:]
if spoof:
    path = own_cgroup()
    for name in spoof:
        path += "/" + name
        os.mkdir(path)
    with open(path + "/cgroup.procs", "w") as f:
        f.write(str(os.getpid()))
from vfiod.client import Client, VfiodError
cgroup = open("/proc/self/cgroup").read().split("::", 1)[1].strip()
vfiod = Client()
check = vfiod.check_access([sys.argv[1]], managed=True)[0]
try:
    lease = vfiod.acquire([sys.argv[1]], managed=True, label="unit-test", timeout=90)
except VfiodError as e:
    out = {"error": [e.kind, e.message]}
else:
    lease.close()
    info = vfiod.inventory().leases[lease.path]
    out = {"unit": info.unit}
    vfiod.release(lease)
out.update(cgroup=cgroup, allowed=check.allowed, reason=check.reason)
print(json.dumps(out))
"""


def in_unit(
    ns: SystemdNamespace, run_options: list[str], *spoof: str, delegate: bool = False
) -> dict[str, object]:
    """ASK_IN_UNIT as nobody in a transient unit of the namespace's systemd,
    with the installed vfiod's interpreter."""
    argv = ["systemd-run", "--quiet", "--wait", "--pipe", f"--uid={NOBODY}", f"--gid={NOBODY}"]
    # systemd ends the unit if it outlives its time: its stdio are ours (--pipe).
    argv += [*run_options, "-p", "RuntimeMaxSec=150", *(["-p", "Delegate=yes"] if delegate else [])]
    argv += ["--", PYTHON, "-c", ASK_IN_UNIT, E1000E, *spoof]
    try:
        result = ns.run(argv, timeout=180)
    except SystemdNamespaceError as e:
        raise AssertionError(f"{e}\n{vfiod_said(ns, 60)}") from None
    out = json.loads(result.stdout.splitlines()[-1])
    assert isinstance(out, dict)
    return out


def test_units_and_slices_count_only_when_systemd_vouches(ns: SystemdNamespace, say: Say) -> None:
    """A unit or slice name a caller made up in its own delegated cgroup
    subtree never satisfies a rule; the unit systemd runs it in does."""
    policy = ns.path("/etc/vfiod/policy.d/50-test.toml")
    policy.write_text(UNIT_POLICY)
    ns.systemctl("reload", "vfiod.service", timeout=120)
    try:
        spoofed_unit = in_unit(ns, [], "dpdk-forwarder.service", delegate=True)
        say(f"[vfiod-systemd] spoofed unit: {spoofed_unit}")
        assert str(spoofed_unit["cgroup"]).endswith("/dpdk-forwarder.service")
        assert spoofed_unit["allowed"] is False
        assert spoofed_unit["error"][0] == "PermissionDenied"  # type: ignore[index]
        spoofed_slice = in_unit(ns, [], "machine.slice", "vm-1.scope", delegate=True)
        assert str(spoofed_slice["cgroup"]).endswith("/machine.slice/vm-1.scope")
        assert spoofed_slice["allowed"] is False
        assert spoofed_slice["error"][0] == "PermissionDenied"  # type: ignore[index]
        assert driver(E1000E) == "e1000e"

        genuine_unit = in_unit(ns, ["--unit=dpdk-forwarder.service"])
        say(f"[vfiod-systemd] genuine unit: {genuine_unit}")
        assert genuine_unit["allowed"] is True, f"{genuine_unit}\n{vfiod_said(ns)}"
        assert genuine_unit["unit"] == "dpdk-forwarder.service"
        genuine_slice = in_unit(ns, ["--slice=machine.slice", "--unit=vm-1.service"])
        assert str(genuine_slice["cgroup"]).endswith("/machine.slice/vm-1.service")
        assert genuine_slice["allowed"] is True, genuine_slice
        assert genuine_slice["unit"] == "vm-1.service"
        ns.wait_for("e1000e back on its driver", lambda: driver(E1000E) == "e1000e" or None, 60)
    finally:
        policy.write_text(POLICY)
        ns.systemctl("reload", "vfiod.service", timeout=120)


def test_stop_gives_devices_back(ns: SystemdNamespace) -> None:
    code = """\
child = subprocess.Popen(["sleep", "3600"], start_new_session=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
pidfd = os.pidfd_open(child.pid)
lease = vfiod.acquire([sys.argv[1]], managed=True, owner_pidfd=pidfd)
lease.close()
print(json.dumps(child.pid))
"""
    sleeper = as_nobody(ns, code, E1000E)
    try:
        assert driver(E1000E) == "vfio-pci"
        ns.systemctl("stop", "vfiod.service", timeout=120)
        assert driver(E1000E) == "e1000e"
        assert int(ns.show("vfiod.service", "NFileDescriptorStore")["NFileDescriptorStore"]) == 0
    finally:
        ns.run(["pkill", "-KILL", "-x", "sleep"], check=False)
    del sleeper


def test_security_exposure(ns: SystemdNamespace, say: Say) -> None:
    result = ns.run(["systemd-analyze", "security", "--no-pager", "vfiod.service"], timeout=120)
    overall = next(line for line in result.stdout.splitlines() if "Overall exposure level" in line)
    say(f"[vfiod-systemd] systemd-analyze security: {overall.strip()}")
    score = float(overall.split("level for vfiod.service:")[1].split()[0])
    assert score <= 5.0, result.stdout
