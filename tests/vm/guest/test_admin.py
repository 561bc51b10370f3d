"""What admins set up, on a real kernel (Debian's: e1000e is a module):

- the e1000e was reserved for vfio-pci from boot (this boot's
  /etc/udev/rules.d holds vfiod's rules for it, as a vfiod of the last
  boot would have left them), so e1000e never probed it, and the
  reservation follows a remove and rescan;
- a device is reset between two tenants, and a rule with require-reset
  refuses a device the kernel cannot reset (what the emulated devices
  offer is pinned here);
- polkit (Debian's polkitd, on the same private bus) narrows what the
  policy allows: one user yes, one no, one "auth_admin", which is a
  refusal at once, never a prompt or a hang.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.bus import NOBODY, PrivateBus, start_private_bus
from tests.bus.vfiod import VFIOCTL, Clients, VfiodProcess, run_real_vfiod
from tests.polkitd import ACTIONS, BUS_POLICY, Polkitd, running_polkitd
from tests.vm.topology import BRIDGED_E1000, E1000E, ICH9_SATA, IGB_PF, MULTIFUNCTION, RESERVATION
from vfiod import polkit
from vfiod.host.reserve import RULES_FILE
from vfiod.host.sysfs import Sysfs
from vfiod.pci import PciAddress

DAEMON, BIN = 1, 2  # Debian's "daemon" and "bin": polkit says no, and auth_admin
DEVICE = f"/sys/bus/pci/devices/{E1000E}"

POLICY = f"""
[[reserve]]
name = "{RESERVATION}"
address = "{E1000E}"

[[rule]]
name = "e1000e"
effect = "allow"
address = "{E1000E}"
users = ["nobody", "daemon", "bin"]
require-reset = true

[[rule]]
name = "multifunction"
effect = "allow"
address = ["{MULTIFUNCTION[0]}", "{MULTIFUNCTION[1]}"]
users = ["nobody"]
managed = true
require-reset = true
"""
SETTINGS = "polkit = true\n"


def polkit_rules() -> dict[str, str]:
    return {
        "10-vfiod-test.rules": f"""\
polkit.addRule(function(action, subject) {{
    if (action.id == "{polkit.ACQUIRE}") {{
        polkit.log("vfiod asks for " + subject.user + ": " + action.lookup("device")
                   + " group " + action.lookup("group") + " label " + action.lookup("label"));
        if (subject.user == "nobody") return polkit.Result.YES;
        if (subject.user == "daemon") return polkit.Result.NO;
        if (subject.user == "bin") return polkit.Result.AUTH_ADMIN;
    }}
}});
"""
    }


@pytest.fixture(scope="module")
def bus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateBus]:
    """The guest's private system bus, where polkitd may own its name too."""
    with start_private_bus(tmp_path_factory.mktemp("bus"), extra_config=BUS_POLICY) as private:
        yield private


@pytest.fixture(scope="module")
def polkitd(bus: PrivateBus, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Polkitd]:
    directory = tmp_path_factory.mktemp("polkitd")
    with running_polkitd(bus, ACTIONS, polkit_rules(), directory) as running:
        yield running


@pytest.fixture(scope="module")
def vfiod(
    bus: PrivateBus, polkitd: Polkitd, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[VfiodProcess]:
    with run_real_vfiod(bus, tmp_path_factory.mktemp("vfiod"), POLICY, SETTINGS) as daemon:
        yield daemon


def _kernel_log() -> str:
    return subprocess.run(["dmesg"], capture_output=True, text=True, check=True).stdout


def _rules(text: str) -> list[str]:
    return [line for line in text.splitlines() if not line.startswith("#")]


def test_the_reserved_e1000e_was_never_bound_to_e1000e(sysfs: Sysfs) -> None:
    address = PciAddress.parse(E1000E)
    assert sysfs.driver(address) == "vfio-pci"
    assert sysfs.driver_override(address) == "vfio-pci"
    # udev loaded e1000e for this very device (its modalias), and e1000e
    # passed over it: no probe, so no line of e1000e's about it.
    assert Path("/sys/module/e1000e").is_dir()
    assert not Path(f"/sys/bus/pci/drivers/e1000e/{E1000E}").exists()
    assert f"e1000e {E1000E}" not in _kernel_log()


def test_vfiod_shows_it_reserved_and_writes_the_rules_the_host_booted_with(
    vfiod: VfiodProcess,
) -> None:
    written = vfiod.policy_root / RULES_FILE
    vfiod.wait_for(written.exists, "vfiod's udev rules", 20)
    booted = Path("/") / RULES_FILE
    assert _rules(written.read_text()) == _rules(booted.read_text())
    listed = vfiod.bus.run_as("import sys\n" + VFIOCTL, args=["list"]).check().stdout
    assert f"reserved for vfio-pci from boot (reservation '{RESERVATION}')" in listed


def test_a_lease_ends_reset_and_leaves_the_device_on_vfio_pci(
    vfiod: VfiodProcess, sysfs: Sysfs
) -> None:
    out = Clients(vfiod.bus, NOBODY).run(
        """\
device = vfiod.inventory().devices[sys.argv[1]]
lease = vfiod.acquire([sys.argv[1]], label="tenant-1")
lease.close()
vfiod.release(lease)
say({"reservation": device.reservation, "resets": list(device.reset_methods)})
""",
        E1000E,
        timeout=120,
    )
    # QEMU's e1000e offers a power-management reset only (no FLR).
    assert out == {"reservation": RESERVATION, "resets": ["pm"]}
    assert sysfs.driver(PciAddress.parse(E1000E)) == "vfio-pci"
    vfiod.wait_for(lambda: f"{E1000E} was reset" in vfiod.log(), "the reset between tenants", 20)
    assert vfiod.state()["bindings"] == {}  # nothing to give back: it stays


def test_the_reservation_follows_a_remove_and_rescan(vfiod: VfiodProcess, sysfs: Sysfs) -> None:
    """e1000e is loaded now, so the kernel gives it the device as it comes
    back, before udev hears of it; the rules take it away at once."""
    Path(DEVICE, "remove").write_text("1")
    vfiod.wait_for(lambda: not Path(DEVICE).exists(), f"{E1000E} removed", 20)
    Path("/sys/bus/pci/rescan").write_text("1")
    subprocess.run(["udevadm", "settle", "--timeout=60"], check=True)
    address = PciAddress.parse(E1000E)
    assert sysfs.driver(address) == "vfio-pci"
    assert sysfs.driver_override(address) == "vfio-pci"
    seen = """\
say(vfiod.inventory().devices[sys.argv[1]].reservation)
"""
    nobody = Clients(vfiod.bus, NOBODY)
    vfiod.wait_for(lambda: nobody.run(seen, E1000E) == RESERVATION, "vfiod seeing it again", 30)


def test_what_the_emulated_devices_can_reset(sysfs: Sysfs) -> None:
    def methods(address: str) -> list[str]:
        path = Path(f"/sys/bus/pci/devices/{address}/reset_method")
        return path.read_text().split() if path.exists() else []

    assert methods(E1000E) == ["pm"]
    assert methods(IGB_PF) == ["flr", "pm", "bus"]
    assert methods(BRIDGED_E1000[0]) == ["bus"]  # alone enough behind its bridge to reset it
    assert methods(MULTIFUNCTION[0]) == methods(MULTIFUNCTION[1]) == []
    assert methods(ICH9_SATA) == []
    # Without a method, the kernel hides the reset attribute too.
    assert not Path(f"/sys/bus/pci/devices/{MULTIFUNCTION[0]}/reset").exists()


def test_require_reset_refuses_what_cannot_be_reset(vfiod: VfiodProcess) -> None:
    out = Clients(vfiod.bus, NOBODY).run(
        """\
[access] = vfiod.check_access([sys.argv[1], sys.argv[2]], managed=True)[:1]
say([access.code, access.blocker])
""",
        *MULTIFUNCTION,
    )
    assert out == ["no-reset", MULTIFUNCTION[0]]
    assert vfiod.driver(MULTIFUNCTION[0]) == "e1000"


ASK = """\
started = time.monotonic()
error = failure(vfiod.acquire, [sys.argv[1]], label="polkit-" + sys.argv[2])
say({"error": error, "seconds": time.monotonic() - started})
"""


def test_polkit_narrows_the_policy(vfiod: VfiodProcess, polkitd: Polkitd) -> None:
    said = {who: Clients(vfiod.bus, uid).run(ASK, E1000E, who) for who, uid in
            (("nobody", NOBODY), ("daemon", DAEMON), ("bin", BIN))}  # fmt: skip
    assert said["nobody"]["error"] is None
    assert said["daemon"]["error"][0] == "PermissionDenied"
    assert f"polkit refuses {polkit.ACQUIRE} for uid {DAEMON}" in said["daemon"]["error"][1]
    assert said["bin"]["error"][0] == "PermissionDenied"
    assert "authentication" in said["bin"]["error"][1]
    assert said["bin"]["seconds"] < 5.0  # answered, not left waiting for a prompt
    # polkit saw the details vfiod passed, for the process that asked.
    vfiod.wait_for(lambda: "label polkit-bin" in polkitd.log(), "polkit's log", 10)
    assert f"vfiod asks for nobody: {E1000E} group " in polkitd.log()
    # The policy stays the ceiling: polkit's yes for nobody opens nothing else.
    error = Clients(vfiod.bus, NOBODY).run(ASK, ICH9_SATA, "sata")["error"]
    assert error[0] == "PermissionDenied"
    assert "polkit" not in error[1]
    assert f"{ICH9_SATA}" not in polkitd.log()
