"""Reservations seen from the bus (vfiod on a fake host): GetInventory's
row, `vfioctl list`, the udev rules vfiod writes, and a reload that drops
the reservation. (The Device property itself: tests/bus/test_subtree.py.)"""

from __future__ import annotations

import json

from tests.bus.vfiod import Clients, VfiodProcess
from tests.fakehost import NIC
from vfiod.client import Client
from vfiod.host.reserve import RULES_FILE

RULE = """
[[rule]]
name = "nobody-nic"
effect = "allow"
address = "0000:00:10.0"
users = ["nobody"]
"""
POLICY = (
    RULE
    + """
[[reserve]]
name = "nic-for-vms"
address = "0000:00:10.0"
"""
)


def test_a_reserved_device_as_the_bus_shows_it(vfiod: VfiodProcess, nobody: Clients) -> None:
    vfiod.wait_for(lambda: vfiod.driver(str(NIC)) == "vfio-pci", "the reservation applied", 10)
    rules = vfiod.policy_root / RULES_FILE
    assert (
        'KERNEL=="0000:00:10.0", ATTR{vendor}=="0x8086", ATTR{device}=="0x10d3", '
        'GOTO="vfiod_reserved"'
    ) in rules.read_text().splitlines()
    view = (
        "device = vfiod.inventory().devices[sys.argv[1]]\n"
        'say({"driver": device.driver, "reservation": device.reservation})\n'
    )
    reserved = {"driver": "vfio-pci", "reservation": "nic-for-vms"}
    # (The bus shows the move once its job is done: a moment after sysfs.)
    vfiod.wait_for(lambda: nobody.run(view, str(NIC)) == reserved, "the bus showing it", 10)
    listed = vfiod.bus.run_as(module="vfiod.cli", args=["list", "--json"]).check().stdout
    [row] = [d for d in json.loads(listed)["devices"] if d["address"] == str(NIC)]
    assert row["reservation"] == "nic-for-vms"
    table = vfiod.bus.run_as(module="vfiod.cli", args=["list"]).check().stdout
    assert "reserved for vfio-pci from boot (reservation 'nic-for-vms')" in table

    # Dropped at a reload: the device goes back to its driver, the rules go.
    vfiod.policy_file.write_text(RULE)
    with Client(vfiod.bus.connect()) as root:
        root.reload_policy()
    vfiod.wait_for(lambda: vfiod.driver(str(NIC)) == "e1000e", "the device given back", 10)
    assert not rules.exists()
    again = nobody.run("say(vfiod.inventory().devices[sys.argv[1]].reservation)\n", str(NIC))
    assert again == ""
