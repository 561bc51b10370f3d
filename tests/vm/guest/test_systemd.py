"""Real systemd as PID 1 of a private namespace in the test VM, proved with
a probe service (tests/vm/sdnotify_probe.py) that does what vfiod's unit
will: D-Bus activation, Type=notify, the fd store across `systemctl
restart` and a SIGKILL with Restart=on-failure, reload, and journal entries
with a MESSAGE_ID.

One systemd serves the whole module; the tests run in file order and each
leaves the probe running.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.vm import sdnotify_probe as probe
from tests.vm.systemd_ns import NSENTER, SystemdNamespace

RELOAD_SECONDS = 2.0
SYSTEM_SERVICES = "/usr/share/dbus-1/system-services"
SYSTEM_POLICY = "/usr/share/dbus-1/system.d"


@pytest.fixture(scope="module")
def ns(pytestconfig: pytest.Config) -> Iterator[SystemdNamespace]:
    capture = pytestconfig.pluginmanager.getplugin("capturemanager")

    def progress(line: str) -> None:
        """Straight to the VM's console, past pytest's capture."""
        with capture.global_and_fixture_disabled():
            print(line, flush=True)

    with SystemdNamespace(
        units={probe.UNIT: probe.unit_text(RELOAD_SECONDS)},
        files={
            f"{SYSTEM_POLICY}/{probe.NAME}.conf": probe.BUS_POLICY,
            f"{SYSTEM_SERVICES}/{probe.NAME}.service": probe.ACTIVATION,
        },
        progress=progress,
    ) as namespace:
        yield namespace


def status(ns: SystemdNamespace) -> tuple[str, bool, int, int]:
    """The probe's Status() over the namespace's system bus (activating it
    when it is not running)."""
    result = ns.run(
        [
            "busctl",
            "--json=short",
            "--timeout=120",
            "call",
            probe.NAME,
            probe.OBJECT_PATH,
            probe.INTERFACE,
            "Status",
        ],
        timeout=150,
    )
    token, adopted, reloads, pid = json.loads(result.stdout)["data"]
    return str(token), bool(adopted), int(reloads), int(pid)


def test_systemd_runs_as_pid1_with_journal_and_bus(ns: SystemdNamespace) -> None:
    print(f"systemd reached running in {ns.boot_seconds:.1f} s")
    assert ns.run(["cat", "/proc/1/comm"]).stdout.strip() == "systemd"
    assert ns.systemctl("is-system-running").stdout.strip() == "running"
    for unit in ("systemd-journald.service", "dbus.service"):
        assert ns.show(unit, "ActiveState")["ActiveState"] == "active", unit
    names = ns.run(
        [
            "busctl",
            "--json=short",
            "call",
            "org.freedesktop.DBus",
            "/",
            "org.freedesktop.DBus",
            "ListActivatableNames",
        ]
    ).stdout
    assert probe.NAME in json.loads(names)["data"][0]
    # The machine's own files did not change: the policy exists only inside.
    assert (ns.path(SYSTEM_POLICY) / f"{probe.NAME}.conf").exists()
    assert not (Path(SYSTEM_POLICY) / f"{probe.NAME}.conf").exists()


def test_dbus_activation_starts_the_notify_service(ns: SystemdNamespace) -> None:
    assert ns.show(probe.UNIT, "ActiveState")["ActiveState"] == "inactive"
    token, adopted, reloads, pid = status(ns)  # the call activates it
    props = ns.wait_unit(probe.UNIT)
    assert int(props["MainPID"]) == pid
    assert not adopted, "a fresh start found an fd in the store"
    assert reloads == 0
    print(f"activated: pid {pid}, token {token}")


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


def test_reload_goes_through_reloading(ns: SystemdNamespace) -> None:
    token, _, reloads, pid = status(ns)
    reload = subprocess.Popen(
        [*NSENTER, f"--target={ns.pid}", "--", "systemctl", "reload", probe.UNIT],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    states: list[str] = []
    deadline = time.monotonic() + 60
    while reload.poll() is None and time.monotonic() < deadline:
        state = ns.show(probe.UNIT, "ActiveState")["ActiveState"]
        if not states or states[-1] != state:
            states.append(state)
        time.sleep(0.1)
    output, _ = reload.communicate(timeout=60)
    after = ns.show(probe.UNIT, "ActiveState")["ActiveState"]
    print(f"states during systemctl reload: {states}, after: {after}")
    assert reload.returncode == 0, output
    new_token, _, new_reloads, new_pid = status(ns)
    print(f"reloads: {reloads} -> {new_reloads}")
    assert (new_token, new_pid) == (token, pid)
    ns.wait_journal(f"MESSAGE_ID={probe.MESSAGE_RELOADED}", count=reloads + 1)
    assert "reloading" in states


def test_journal_has_the_probe_entries(ns: SystemdNamespace) -> None:
    started = ns.wait_journal(f"MESSAGE_ID={probe.MESSAGE_STARTED}", count=3)
    assert [e["PROBE_ADOPTED"] for e in started] == ["0", "1", "1"]
    assert len({e["PROBE_TOKEN"] for e in started}) == 1
    assert len({e["_PID"] for e in started}) == 3
    assert {e["_SYSTEMD_UNIT"] for e in started} == {probe.UNIT}
    reloaded = ns.journal(f"MESSAGE_ID={probe.MESSAGE_RELOADED}", unit=probe.UNIT)
    assert [e["PROBE_RELOADS"] for e in reloaded] == ["1"]
