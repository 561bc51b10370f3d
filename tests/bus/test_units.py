"""`units` and `slices` rules against a system manager on the bus: vfiod
believes the unit and slice systemd reports for the caller's process, and
nothing else. A small stand-in for systemd (org.freedesktop.systemd1 with
GetUnitByPID, Unit.Id and Service.Slice, as systemd 252 has them) owns the
name on the private bus; the VM test does the same against real systemd."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.bus import PROJECT, PrivateBus, _child_env, require_tools, start_private_bus
from tests.bus.vfiod import Clients, Spawned, VfiodProcess, run_vfiod
from tests.fakehost import NIC

POLICY = f"""
[[rule]]
name = "the-forwarder"
effect = "allow"
address = "{NIC}"
units = ["dpdk-forwarder.service"]
managed = true

[[rule]]
name = "vms"
effect = "allow"
address = "{NIC}"
slices = ["machine.slice"]
managed = true
"""

# Root may own systemd's name on this bus, and anyone may call it (as
# systemd's own bus policy allows).
SYSTEMD_POLICY = """\
  <policy user="root">
    <allow own="org.freedesktop.systemd1"/>
  </policy>
  <policy context="default">
    <allow send_destination="org.freedesktop.systemd1"/>
  </policy>
"""

# The stand-in: units it knows and their slices; which pid runs in which
# unit comes from a file the test writes (read at every call).
FAKE_SYSTEMD = """\
import asyncio, json, sys
from sdbus import (DbusInterfaceCommonAsync, DbusUnprivilegedFlag, dbus_method_async,
                   dbus_property_async, sd_bus_open_system)
from sdbus.dbus_exceptions import DbusFailedError

units_path = sys.argv[1]
SLICES = {"dpdk-forwarder.service": "system.slice", "vm-1.service": "machine.slice",
          "user@65534.service": "user-65534.slice"}

class NoUnitForPID(DbusFailedError):
    dbus_error_name = "org.freedesktop.systemd1.NoUnitForPID"

def path_of(unit):
    return "/org/freedesktop/systemd1/unit/" + "".join(
        c if c.isalnum() else "_%02x" % ord(c) for c in unit)

class Manager(DbusInterfaceCommonAsync, interface_name="org.freedesktop.systemd1.Manager"):
    @dbus_method_async("u", "o", method_name="GetUnitByPID", flags=DbusUnprivilegedFlag)
    async def get_unit_by_pid(self, pid):
        with open(units_path) as f:
            unit = json.load(f).get(str(pid))
        if unit is None:
            raise NoUnitForPID(f"PID {pid} does not belong to any loaded unit.")
        return path_of(unit)

class Unit(DbusInterfaceCommonAsync, interface_name="org.freedesktop.systemd1.Unit"):
    @dbus_property_async("s")
    def id(self):
        return self.unit

class Service(DbusInterfaceCommonAsync, interface_name="org.freedesktop.systemd1.Service"):
    @dbus_property_async("s")
    def slice(self):
        return SLICES[self.unit]

class UnitObject(Unit, Service):
    def __init__(self, unit):
        super().__init__()
        self.unit = unit

async def main():
    bus = sd_bus_open_system()
    objects = [(Manager(), "/org/freedesktop/systemd1")]
    objects += [(UnitObject(unit), path_of(unit)) for unit in SLICES]
    exported = [obj.export_to_dbus(path, bus) for obj, path in objects]  # kept: exported
    await bus.request_name_async("org.freedesktop.systemd1", 0)
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)

asyncio.run(main())
"""

# As nobody: wait until the test has told the stand-in our unit, then ask.
ASK = """\
sys.stdin.readline()
check = vfiod.check_access([sys.argv[1]], managed=True)[0]
out = {"check": [check.allowed, check.reason]}
try:
    lease = vfiod.acquire([sys.argv[1]], managed=True)
except VfiodError as e:
    out["error"] = e.kind
else:
    lease.close()
    out["unit"] = vfiod.inventory().leases[lease.path].unit
    vfiod.release(lease)
say(out)
"""


@pytest.fixture
def systemd_bus(tmp_path: Path) -> Iterator[PrivateBus]:
    require_tools()
    with start_private_bus(tmp_path / "bus", extra_config=SYSTEMD_POLICY) as bus:
        yield bus


class FakeSystemd:
    def __init__(self, bus: PrivateBus, directory: Path) -> None:
        self.units_path = directory / "units.json"
        self.units_path.write_text("{}")
        self.process = subprocess.Popen(
            [sys.executable, "-s", "-c", FAKE_SYSTEMD, str(self.units_path)],
            env=_child_env(bus.address, {}),
            cwd=PROJECT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert self.process.stdout is not None
        if self.process.stdout.readline().strip() != b"ready":
            self.stop()
            raise RuntimeError("the stand-in for systemd did not start")

    def runs(self, pid: int, unit: str) -> None:
        units = json.loads(self.units_path.read_text())
        units[str(pid)] = unit
        tmp = self.units_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(units))
        os.rename(tmp, self.units_path)

    def stop(self) -> None:
        for pipe in (self.process.stdin, self.process.stdout):
            if pipe is not None:
                pipe.close()
        self.process.wait(timeout=10)


@pytest.fixture
def systemd(systemd_bus: PrivateBus, tmp_path: Path) -> Iterator[FakeSystemd]:
    fake = FakeSystemd(systemd_bus, tmp_path)
    yield fake
    fake.stop()


@pytest.fixture
def daemon(systemd_bus: PrivateBus, systemd: FakeSystemd, tmp_path: Path) -> Iterator[VfiodProcess]:
    with run_vfiod(systemd_bus, tmp_path / "vfiod", POLICY) as process:
        yield process


def ask(daemon: VfiodProcess, systemd: FakeSystemd, unit: str | None) -> dict[str, object]:
    client: Spawned = Clients(daemon.bus).spawn(ASK, str(NIC))
    try:
        if unit is not None:
            systemd.runs(client.process.pid, unit)
        client.send()
        out = client.read(timeout=30)
    finally:
        client.finish()
    assert isinstance(out, dict)
    return out


@pytest.mark.parametrize(
    ("unit", "granted"),
    [
        pytest.param("dpdk-forwarder.service", "dpdk-forwarder.service", id="the-unit-by-name"),
        pytest.param("vm-1.service", "vm-1.service", id="a-unit-in-machine-slice"),
        pytest.param("user@65534.service", None, id="a-users-own-subtree"),
        pytest.param(None, None, id="in-no-unit"),
    ],
)
def test_only_the_unit_systemd_reports_counts(
    daemon: VfiodProcess, systemd: FakeSystemd, unit: str | None, granted: str | None
) -> None:
    out = ask(daemon, systemd, unit)
    if granted is None:
        assert out["check"][0] is False  # type: ignore[index]
        assert out["error"] == "PermissionDenied"
    else:
        assert out["check"][0] is True, out  # type: ignore[index]
        assert out["unit"] == granted
    assert daemon.driver(str(NIC)) == "e1000e"
    # Asking went as systemd answers (an unknown method would be warned of).
    assert "systemd vouches for no unit" not in daemon.log()
