"""Real systemd as PID 1 of a private namespace in the test VM
(tests/vm/systemd_ns.py), proved with a probe service
(tests/vm/sdnotify_probe.py) that does what vfiod's unit will: D-Bus
activation, Type=notify, the fd store across `systemctl restart` and across
SIGKILL with Restart=on-failure, reload by RELOADING=1/READY=1, and journal
entries with a MESSAGE_ID.

One systemd serves the whole module (it takes 15-40 s to come up under
TCG); the tests run in file order, the first one activates the probe and
each later one leaves it running.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.vm import sdnotify_probe as probe
from tests.vm.systemd_ns import NSENTER, SystemdNamespace

RELOAD_SECONDS = 2.0  # the probe's reload, between RELOADING=1 and READY=1
SYSTEM_SERVICES = "/usr/share/dbus-1/system-services"
SYSTEM_POLICY = "/usr/share/dbus-1/system.d"
POLICY_FILE = f"{SYSTEM_POLICY}/{probe.NAME}.conf"
ACTIVATION_FILE = f"{SYSTEM_SERVICES}/{probe.NAME}.service"

Say = Callable[[str], None]


@pytest.fixture(scope="module")
def say(pytestconfig: pytest.Config) -> Say:
    """Print straight to the VM's console, past pytest's capture."""
    capture = pytestconfig.pluginmanager.getplugin("capturemanager")

    def print_line(line: str) -> None:
        with capture.global_and_fixture_disabled():
            print(line, flush=True)

    return print_line


@pytest.fixture(scope="module")
def ns(say: Say) -> Iterator[SystemdNamespace]:
    with SystemdNamespace(
        units={probe.UNIT: probe.unit_text(RELOAD_SECONDS)},
        files={POLICY_FILE: probe.BUS_POLICY, ACTIVATION_FILE: probe.ACTIVATION},
        progress=say,
    ) as namespace:
        yield namespace


def status(ns: SystemdNamespace) -> tuple[str, bool, int, int]:
    """The probe's Status() over the namespace's system bus, from busctl in
    the namespace (which activates the probe when it is not running)."""
    argv = ["busctl", "--json=short", "--timeout=120", "call", probe.NAME, probe.OBJECT_PATH]
    result = ns.run([*argv, probe.INTERFACE, "Status"], timeout=150)
    token, adopted, reloads, pid = json.loads(result.stdout)["data"]
    return str(token), bool(adopted), int(reloads), int(pid)


def test_systemd_runs_as_pid1_with_journal_bus_and_udev(ns: SystemdNamespace) -> None:
    assert ns.run(["cat", "/proc/1/comm"]).stdout.strip() == "systemd"
    assert ns.systemctl("is-system-running").stdout.strip() == "running"
    for unit in ("systemd-journald.service", "dbus.service"):
        assert ns.show(unit, "ActiveState")["ActiveState"] == "active", unit
    call = ["busctl", "--json=short", "call", "org.freedesktop.DBus", "/"]
    names = ns.run([*call, "org.freedesktop.DBus", "ListActivatableNames"]).stdout
    assert probe.NAME in json.loads(names)["data"][0]
    # The policy and activation file exist in the namespace only.
    for path in (POLICY_FILE, ACTIVATION_FILE):
        assert ns.path(path).is_file(), path
        assert not Path(path).exists(), f"{path} leaked out of the namespace"
    # The machine's udev database is there (pyudev in vfiod needs it).
    loopback = ns.run(["udevadm", "info", "--query=property", "/sys/class/net/lo"]).stdout
    assert "INTERFACE=lo" in loopback


def test_dbus_activation_starts_the_notify_service(ns: SystemdNamespace, say: Say) -> None:
    assert ns.show(probe.UNIT, "ActiveState")["ActiveState"] == "inactive"
    started = time.monotonic()
    token, adopted, reloads, pid = status(ns)  # the call activates it
    say(f"[systemd-ns] activated by a bus call in {time.monotonic() - started:.1f} s")
    props = ns.wait_unit(probe.UNIT)  # Type=notify: active once READY=1 came
    assert int(props["MainPID"]) == pid
    assert not adopted, "a fresh start found an fd in the store"
    assert reloads == 0
    started_entries = ns.wait_journal(f"MESSAGE_ID={probe.MESSAGE_STARTED}")
    assert [e["PROBE_TOKEN"] for e in started_entries] == [token]


def test_restart_passes_the_stored_fd_back(ns: SystemdNamespace) -> None:
    token, _, _, pid = status(ns)
    ns.systemctl("restart", probe.UNIT, timeout=150)
    props = ns.wait_unit(probe.UNIT)
    new_token, adopted, _, new_pid = status(ns)
    assert new_pid == int(props["MainPID"]) != pid
    assert adopted, "after systemctl restart the fd store was empty"
    assert new_token == token


def test_kill_9_restarts_with_the_stored_fd(ns: SystemdNamespace) -> None:
    token, _, _, pid = status(ns)
    restarts = int(ns.show(probe.UNIT, "NRestarts")["NRestarts"])
    ns.run(["kill", "-9", str(pid)])
    props = ns.wait_unit(
        probe.UNIT,
        where=lambda p: int(p["NRestarts"]) == restarts + 1 and int(p["MainPID"]) != pid,
        timeout=150,
    )
    new_token, adopted, _, new_pid = status(ns)
    assert new_pid == int(props["MainPID"])
    assert adopted, "after SIGKILL and Restart=on-failure the fd store was empty"
    assert new_token == token


def test_reload_goes_through_reloading(ns: SystemdNamespace, say: Say) -> None:
    """ExecReload sends SIGHUP; the probe says RELOADING=1 (with
    MONOTONIC_USEC), takes RELOAD_SECONDS, then READY=1. systemd shows the
    unit as `reloading` in between."""
    token, _, reloads, pid = status(ns)
    reload = subprocess.Popen(
        [*NSENTER, f"--target={ns.pid}", "--", "systemctl", "reload", probe.UNIT],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    states: list[str] = []
    try:
        deadline = time.monotonic() + 60
        while reload.poll() is None and time.monotonic() < deadline:
            state = ns.show(probe.UNIT, "ActiveState")["ActiveState"]
            if not states or states[-1] != state:
                states.append(state)
        output, _ = reload.communicate(timeout=60)
    finally:
        if reload.poll() is None:
            reload.kill()
            reload.communicate()
    assert reload.returncode == 0, output
    done = status(ns)[2]  # reloads counted when `systemctl reload` returned
    entries = ns.wait_journal(f"MESSAGE_ID={probe.MESSAGE_RELOADED}", count=reloads + 1)
    props = ns.wait_unit(probe.UNIT)
    say(
        f"[systemd-ns] during systemctl reload: {' -> '.join(states)}; "
        f"reload {'done' if done > reloads else 'not done yet'} when it returned"
    )
    assert "reloading" in states
    assert int(props["MainPID"]) == pid
    assert entries[-1]["PROBE_TOKEN"] == token
    assert entries[-1]["PROBE_RELOADS"] == str(reloads + 1)


def test_journal_has_the_probe_entries(ns: SystemdNamespace) -> None:
    started = ns.wait_journal(f"MESSAGE_ID={probe.MESSAGE_STARTED}", count=3)
    assert [e["PROBE_ADOPTED"] for e in started] == ["0", "1", "1"]
    assert len({e["PROBE_TOKEN"] for e in started}) == 1
    assert len({e["_PID"] for e in started}) == 3
    assert {e["_SYSTEMD_UNIT"] for e in started} == {probe.UNIT}
    assert {e["PRIORITY"] for e in started} == {"6"}
    reloaded = ns.journal(f"MESSAGE_ID={probe.MESSAGE_RELOADED}", unit=probe.UNIT)
    assert [e["PROBE_RELOADS"] for e in reloaded] == ["1"]
