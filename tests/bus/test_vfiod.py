"""vfiod on a real (private) system bus, with our bus policy, on a fake host:
clients run as nobody in their own processes and get real fds."""

from __future__ import annotations

import asyncio
import os
import signal
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

import pytest

from tests.bus import NOBODY, PROJECT, PrivateBus
from tests.bus.vfiod import NOBODY_ANY_POLICY, Clients, VfiodProcess, run_vfiod
from tests.fakehost import E1000_A, E1000_B, NIC, SATA, scale_address
from vfiod.client import AsyncClient, Client, Event, VfiodError

POLICY = """
[[rule]]
name = "nobody-nic"
effect = "allow"
address = "0000:00:10.0"
users = ["nobody"]
managed = true
max-locked-memory = "4M"

[[rule]]
name = "nobody-bridged"
effect = "allow"
address = "0000:02:0[12].0"
users = ["nobody"]
managed = true
companions = true

[[rule]]
name = "root-all"
effect = "allow"
address = "*"
users = ["root"]
managed = true
companions = true
"""

NIC_PATH = "/org/vfiod1/device/0000_00_10_0"

# After CLIENT: hold a managed lease of argv[1] (labelled argv[2]) until a
# line comes; vfiod keeps its own fds, and the lease follows this connection.
HOLD_LEASE = """\
lease = vfiod.acquire([sys.argv[1]], managed=True, label=(sys.argv[2:] or [""])[0])
lease.close()
say(lease.path)
sys.stdin.readline()
"""


def root_client(bus: PrivateBus) -> Client:
    return Client(bus.connect())


def test_nobody_acquires_real_fds_and_release_restores(
    vfiod: VfiodProcess, nobody: Clients
) -> None:
    daemon_fds = vfiod.fds()
    code = """\
lease = vfiod.acquire([sys.argv[1]], backend="legacy", managed=True, label="vm-1")
targets = {name: os.readlink(f"/proc/self/fd/{fd}") for name, fd in lease.fds.items()}
inventory = vfiod.inventory()
device = inventory.devices[sys.argv[1]]
group = inventory.groups[device.group]
info = inventory.leases[lease.path]
lease.close()
vfiod.release(lease)
after = vfiod.inventory().devices[sys.argv[1]]
say({
    "path": lease.path, "targets": targets,
    "driver": device.driver, "original": device.original_driver, "lease": device.lease,
    "group_lease": group.lease, "viable": group.viable,
    "info": [info.uid, info.label, info.backend, list(info.devices), list(info.groups),
             info.unsafe, info.owner.startswith(":")],
    "after": [after.driver, after.original_driver, after.lease],
    "fds_left": sorted(os.listdir("/proc/self/fd")),
})
"""
    out = nobody.run(code, str(NIC))
    assert out["path"].startswith("/org/vfiod1/lease/")
    assert out["targets"] == {
        "container": "/memfd:vfio-fake:/dev/vfio/vfio (deleted)",
        "group:10": "/memfd:vfio-fake:/dev/vfio/10 (deleted)",
        "device:0000:00:10.0": "/memfd:vfio-fake:device 0000:00:10.0 of /dev/vfio/10 (deleted)",
    }
    assert (out["driver"], out["original"]) == ("vfio-pci", "e1000e")
    assert out["lease"] == out["group_lease"] == out["path"]
    assert out["viable"] is True
    assert out["info"] == [NOBODY, "vm-1", "legacy", [str(NIC)], ["10"], False, True]
    assert out["after"] == ["e1000e", "", "/"]
    assert vfiod.driver(str(NIC)) == "e1000e"
    assert vfiod.state() == {"version": 1, "bindings": {}, "leases": {}}
    # Nothing the lease opened stays open in the daemon.
    vfiod.wait_for(
        lambda: not Counter(vfiod.fds()) - Counter(daemon_fds),
        f"the daemon closing every fd (it had {daemon_fds}, has {vfiod.fds()})",
    )


def test_refusals_say_why_and_change_nothing(vfiod: VfiodProcess, nobody: Clients) -> None:
    code = """\
say({
    "sata": failure(vfiod.acquire, [sys.argv[2]], managed=True),
    "unknown": failure(vfiod.acquire, ["0000:00:1e.0"]),
    "malformed": failure(vfiod.acquire, ["nic"]),
    "not-viable": failure(vfiod.acquire, [sys.argv[1]]),
    "backend": failure(vfiod.acquire, [sys.argv[1]], backend="vfio"),
    "reload": failure(vfiod.reload_policy),
    "release": failure(vfiod.release, "/org/vfiod1/lease/nope"),
    "check": [[a.device, a.allowed]
              for a in vfiod.check_access([sys.argv[1], sys.argv[2]], managed=True)],
    "check-unmanaged": [[a.allowed, a.reason] for a in vfiod.check_access([sys.argv[1]])],
})
"""
    out = nobody.run(code, str(NIC), str(SATA))
    assert out["sata"][0] == "PermissionDenied"
    assert "policy rule allows user nobody (uid 65534) to use 0000:00:1f.2" in out["sata"][1]
    assert out["unknown"][0] == "NotFound"
    assert out["malformed"][0] == "InvalidArgument"
    assert out["not-viable"] == [
        "NotViable",
        "IOMMU group 10 is not viable: 0000:00:10.0 (Ethernet controller) is bound to "
        "e1000e. Ask with managed=true to let vfiod bind it to vfio-pci",
    ]
    assert out["backend"][0] == "InvalidArgument"
    assert out["reload"][0] == "PermissionDenied"
    assert out["release"][0] == "NotFound"
    assert out["check"] == [[str(NIC), True], [str(SATA), False]]
    assert out["check-unmanaged"] == [[False, out["not-viable"][1]]]
    assert vfiod.driver(str(NIC)) == "e1000e"
    assert vfiod.driver(str(SATA)) == "ahci"


def test_check_access_answers_with_the_plan(vfiod: VfiodProcess, nobody: Clients) -> None:
    """(device, allowed, reason, details) on the wire, read by both clients."""
    code = """\
import asyncio, dataclasses
from vfiod.client import AsyncClient
message = vfiod.bus.new_method_call_message(
    "org.vfiod1", "/org/vfiod1", "org.vfiod1.Manager", "CheckAccess")
message.append_data("asa{sv}", [sys.argv[1]], {})
reply = vfiod.bus.call(message)
lease = vfiod.acquire([sys.argv[2]], managed=True)
lease.close()
async def both():
    async with AsyncClient() as client:
        return await client.check_access(sys.argv[1:], managed=True)
say({
    "raw": [list(r) for r in reply.get_contents()],
    "blocking": [dataclasses.asdict(a) for a in vfiod.check_access(sys.argv[1:], managed=True)],
    "async": [dataclasses.asdict(a) for a in asyncio.run(both())],
    "unmanaged": dataclasses.asdict(vfiod.check_access([sys.argv[1]])[0]),
    "lease": lease.path,
})
vfiod.release(lease)
"""
    out = nobody.run(code, str(NIC), str(E1000_A), str(SATA), "0000:00:1e.0")
    [(device, allowed, reason, details)] = out["raw"]
    assert (device, allowed) == (str(NIC), False)
    assert details == {
        "code": ["s", "needs-managed"],
        "move": ["as", [str(NIC)]],
        "blocker": ["s", str(NIC)],
        "group": ["s", "10"],
        "holder": ["o", "/"],
        "companions": ["as", []],
        "backends": ["as", []],
    }
    assert "Ask with managed=true" in reason
    assert out["blocking"] == out["async"]
    nic, bridged, sata, unknown = out["blocking"]
    assert {k: v for k, v in nic.items() if k != "reason"} == {
        "device": str(NIC),
        "allowed": True,
        "code": "allowed",
        "move": [str(NIC)],
        "blocker": "",
        "group": "10",
        "holder": "/",
        "companions": [],
        "backends": [],
    }
    assert bridged["device"] == str(E1000_A)
    assert (bridged["allowed"], bridged["code"], bridged["holder"]) == (True, "busy", out["lease"])
    assert bridged["move"] == []  # moved already, for the lease
    assert bridged["companions"] == [str(E1000_B)]
    assert (sata["code"], sata["blocker"], sata["group"]) == ("no-rule", str(SATA), "5")
    assert (unknown["code"], unknown["group"], unknown["move"]) == ("not-found", "", [])
    assert out["unmanaged"]["code"] == "needs-managed"


def test_a_killed_client_loses_its_lease(vfiod: VfiodProcess, nobody: Clients) -> None:
    client = nobody.spawn(
        """\
lease = vfiod.acquire([sys.argv[1]], managed=True)
say(lease.path)
sys.stdin.readline()
""",
        str(NIC),
    )
    try:
        lease_id = client.read().rsplit("/", 1)[1]
        assert vfiod.driver(str(NIC)) == "vfio-pci"
        # systemd keeps what vfiod holds for the lease, for a restart: its
        # container and its group, under the lease's short name, which its
        # record gives.
        assert vfiod.fd_store == ["0", "0"]
        assert vfiod.state()["leases"][lease_id]["fds"] == ["0"]
    finally:
        client.kill()  # holding its device fd until the kernel closes it
    vfiod.wait_for(lambda: vfiod.driver(str(NIC)) == "e1000e", "e1000e coming back")
    # (its record goes a moment after its devices are back)
    vfiod.wait_for(lambda: vfiod.state()["leases"] == {}, "the lease record going", 10)
    assert vfiod.fd_store == []


def test_a_lease_follows_its_owner_process(vfiod: VfiodProcess, nobody: Clients) -> None:
    """With owner-pidfd the lease outlives the caller's connection and ends
    with the process. (Raising that process's RLIMIT_MEMLOCK needs
    CAP_SYS_RESOURCE, which vfiod has under systemd but maybe not here: the
    unit tests raise it within the hard limit, the VM tests for real.)"""
    code = """\
import subprocess
child = subprocess.Popen(["sleep", "60"], start_new_session=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
pidfd = os.pidfd_open(child.pid)
lease = vfiod.acquire([sys.argv[1]], managed=True, owner_pidfd=pidfd)
os.close(pidfd)
lease.close()
say({"pid": child.pid, "lease": lease.path})
"""
    out = nobody.run(code, str(E1000_A))
    try:
        # The caller's connection is gone; the lease is not.
        with root_client(vfiod.bus) as root:
            assert out["lease"] in root.inventory().leases
        assert vfiod.driver(str(E1000_A)) == vfiod.driver(str(E1000_B)) == "vfio-pci"
    finally:
        os.kill(out["pid"], signal.SIGKILL)
    vfiod.wait_for(lambda: vfiod.driver(str(E1000_B)) == "e1000", "the lease ending with its owner")
    assert f"its owner process {out['pid']} exited" in vfiod.log()


def test_two_callers_race_one_wins(vfiod: VfiodProcess, nobody: Clients) -> None:
    code = """\
sys.stdin.readline()
try:
    lease = vfiod.acquire([sys.argv[1]], managed=True, label=sys.argv[2])
    say(["won", lease.path])
    sys.stdin.readline()
except VfiodError as e:
    say([e.kind, e.message])
"""
    clients = [nobody.spawn(code, str(NIC), label) for label in ("vm-a", "vm-b")]
    for client in clients:
        client.send()
    results = [client.read() for client in clients]
    for client in clients:
        client.finish()
    outcomes = sorted(r[0] for r in results)
    assert outcomes == ["Busy", "won"]
    busy = next(r[1] for r in results if r[0] == "Busy")
    winner = next(i for i, r in enumerate(results) if r[0] == "won")
    # The loser came while the winner's group was reserved, or leased.
    assert (
        f"leased to vm-{'ab'[winner]} (uid 65534, lease " in busy
        or f"being prepared for vm-{'ab'[winner]} (uid 65534)" in busy
    ), busy
    vfiod.wait_for(lambda: vfiod.driver(str(NIC)) == "e1000e", "e1000e coming back")


def test_brokered_dma(vfiod: VfiodProcess, nobody: Clients) -> None:
    code = """\
lease = vfiod.acquire([sys.argv[1]], managed=True)
memfd = os.memfd_create("guest-ram")
os.ftruncate(memfd, 4 << 20)
out = {
    "at-zero": vfiod.map_dma(lease, memfd, 0, 1 << 20, 0),
    "picked": vfiod.map_dma(lease, memfd, 0, 2 << 20, None),
    "too-much": failure(vfiod.map_dma, lease, memfd, 0, 16 << 20, None),
    "wrong-unmap": failure(vfiod.unmap_dma, lease, 0, 4096),
}
vfiod.unmap_dma(lease, 0, 1 << 20)
os.close(memfd)
lease.close()
vfiod.release(lease)
say(out)
"""
    out = nobody.run(code, str(NIC))
    assert out["at-zero"] == 0
    assert out["picked"] == 2 << 20
    assert out["too-much"][0] == "PermissionDenied"
    assert "max-locked-memory of 4194304" in out["too-much"][1]
    assert out["wrong-unmap"][0] == "NotFound"


def test_introspection_matches_the_contract(vfiod: VfiodProcess) -> None:
    contract = ET.parse(PROJECT / "dbus/org.vfiod1.xml").getroot()
    wanted = {i.get("name"): _members(i) for i in contract.iter("interface")}
    with root_client(vfiod.bus) as root:
        lease = root.acquire([str(NIC)], managed=True)
        lease.close()
        served: dict[str | None, object] = {}
        for path in ("/org/vfiod1", NIC_PATH, "/org/vfiod1/group/10", lease.path):
            reply = root.bus.call(
                root.bus.new_method_call_message(
                    "org.vfiod1", path, "org.freedesktop.DBus.Introspectable", "Introspect"
                )
            )
            xml = ET.fromstring(str(reply.get_contents()))
            for interface in xml.iter("interface"):
                if interface.get("name") in wanted:
                    served[interface.get("name")] = _members(interface)
            assert {i.get("name") for i in xml.iter("interface")} >= {
                "org.freedesktop.DBus.Properties",
                "org.freedesktop.DBus.Introspectable",
            }
        root.release(lease)
    assert served == wanted


def _members(interface: ET.Element) -> object:
    def args(element: ET.Element) -> list[tuple[str | None, str | None, str | None]]:
        return [(a.get("name"), a.get("type"), a.get("direction")) for a in element.iter("arg")]

    return {
        "methods": {m.get("name"): args(m) for m in interface.iter("method")},
        "signals": {
            s.get("name"): [(n, t) for n, t, _ in args(s)] for s in interface.iter("signal")
        },
        "properties": {
            p.get("name"): (p.get("type"), p.get("access")) for p in interface.iter("property")
        },
    }


# Both answers to "what is there", as JSON: GetInventory's rows, and the same
# rows made from GetManagedObjects and GetLeaseDetails by the contract's order
# of each interface's properties.
BOTH_INVENTORIES = """\
import xml.etree.ElementTree as ET
def call(interface, member, signature="", *args):
    message = vfiod.bus.new_method_call_message("org.vfiod1", "/org/vfiod1", interface, member)
    if signature:
        message.append_data(signature, *args)
    return vfiod.bus.call(message).get_contents()
contract = ET.fromstring(sys.argv[1])  # (its text: nobody may not read the checkout)
order = {i.get("name"): [p.get("name") for p in i.iter("property")]
         for i in contract.iter("interface")}
objects = call("org.freedesktop.DBus.ObjectManager", "GetManagedObjects")
leases = [path for path, interfaces in objects.items() if "org.vfiod1.Lease" in interfaces]
details = call("org.vfiod1.Manager", "GetLeaseDetails", "ao", leases)
expected = {"Device": [], "Group": [], "Lease": []}
# The structs are fixed: a Device's properties after ResetMethods came later,
# and are keys of the row's a{sv} (where they are not empty).
fixed = {"Device": order["org.vfiod1.Device"].index("ResetMethods") + 1}
for path, interfaces in objects.items():
    for kind, rows in expected.items():
        props = interfaces.get("org.vfiod1." + kind)
        if props is not None:
            names = order["org.vfiod1." + kind]
            cut = fixed.get(kind, len(names))
            more = details.get(path, {}) if kind == "Lease" else {
                name: props[name] for name in names[cut:] if props[name][1]
            }
            rows.append([path, *(props[name][1] for name in names[:cut]), more])
rows = call("org.vfiod1.Manager", "GetInventory", "a{sv}", {})
inventory = vfiod.inventory()
say({
    "rows": [sorted(r) for r in rows],
    "expected": [sorted(expected[k]) for k in ("Device", "Group", "Lease")],
    "client": {path: [info.uid, info.label] for path, info in inventory.leases.items()},
})
"""


def test_get_inventory_is_the_object_manager_in_rows(vfiod: VfiodProcess, nobody: Clients) -> None:
    contract = (PROJECT / "dbus/org.vfiod1.xml").read_text()
    with root_client(vfiod.bus) as root:
        mine = root.acquire([str(E1000_A)], managed=True, label="root's")
        mine.close()
        held = nobody.spawn(HOLD_LEASE, str(NIC), "nobody's")
        try:
            theirs = held.read()
            seen = {
                "nobody": nobody.run(BOTH_INVENTORIES, contract),
                "root": Clients(vfiod.bus, 0).run(BOTH_INVENTORIES, contract),
            }
            unknown = root.bus.new_method_call_message(
                "org.vfiod1", "/org/vfiod1", "org.vfiod1.Manager", "GetInventory"
            )
            unknown.append_data("a{sv}", {"since": ("t", 0)})
            with pytest.raises(VfiodError, match=r"unknown GetInventory option\(s\): since"):
                root._send(unknown)
            nic = root.inventory().devices[str(NIC)]
        finally:
            held.finish()
        root.release(mine)
    for view in seen.values():
        assert view["rows"] == view["expected"]
        devices, groups, leases = view["rows"]
        assert (len(devices) > 5, len(groups) > 3, len(leases)) == (True, True, 2)
    assert (nic.lease, nic.driver) == (theirs, "vfio-pci")
    # Each sees its own lease's details, root everyone's; nobody only that
    # root's lease exists.
    assert seen["nobody"]["client"] == {theirs: [NOBODY, "nobody's"], mine.path: [0, ""]}
    assert seen["root"]["client"] == {theirs: [NOBODY, "nobody's"], mine.path: [0, "root's"]}


def test_object_manager_announces_changes(vfiod: VfiodProcess) -> None:
    async def watch() -> list[Event]:
        client = AsyncClient(vfiod.bus.connect())
        events: list[Event] = []
        try:
            inventory = await client.inventory()
            assert set(inventory.devices) >= {str(NIC), str(SATA), str(E1000_A)}
            assert inventory.devices[str(NIC)].driver == "e1000e"
            assert not inventory.groups["/org/vfiod1/group/5"].viable

            async def collect() -> None:
                async for event in client.events():
                    events.append(event)

            task = asyncio.create_task(collect())
            await asyncio.sleep(0.2)  # the match rule is in place
            lease = await client.acquire([str(NIC)], managed=True)
            lease.close()
            await client.release(lease)
            await asyncio.sleep(0.5)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        finally:
            client.close()
        return events

    events = asyncio.run(watch())
    kinds = [(e.kind, e.path) for e in events]
    lease_path = next(p for k, p in kinds if k == "added")
    assert ("removed", lease_path) in kinds
    drivers = [e.changes["Driver"] for e in events if e.path == NIC_PATH and "Driver" in e.changes]
    assert drivers == ["vfio-pci", "e1000e"]
    leases = [e.changes["Lease"] for e in events if e.path == NIC_PATH and "Lease" in e.changes]
    assert leases == [lease_path, "/"]


def test_reload_revokes_and_stop_restores(
    private_bus: PrivateBus, tmp_path: Path, nobody: Clients
) -> None:
    with run_vfiod(private_bus, tmp_path / "vfiod", POLICY) as daemon:
        client = nobody.spawn(HOLD_LEASE, str(NIC))
        try:
            lease_path = client.read()
            policy = daemon.policy_file
            policy.write_text(POLICY.replace('users = ["nobody"]', 'users = ["daemon"]'))
            with root_client(private_bus) as root:
                root.reload_policy()
                assert lease_path not in root.inventory().leases, (
                    daemon.log(),
                    daemon.notices,
                    daemon.fd_store,
                )
            daemon.wait_for(lambda: daemon.driver(str(NIC)) == "e1000e", "revocation")
            assert "no longer allows 0000:00:10.0" in daemon.log()
        finally:
            client.finish()
        # A broken policy keeps the last good one, and says where it is broken.
        policy.write_text('[[rule]]\nname = "x"\neffect = "maybe"\n')
        with root_client(private_bus) as root:
            with pytest.raises(VfiodError) as broken:
                root.reload_policy()
            assert broken.value.kind == "PolicyInvalid"
            assert "50-test.toml:3" in broken.value.message
            # Stopping ends leases and gives devices back. (This one follows
            # this process, so closing the connection does not end it.)
            me = os.pidfd_open(os.getpid())
            try:
                lease = root.acquire([str(E1000_A)], managed=True, owner_pidfd=me)
            finally:
                os.close(me)
            lease.close()
            assert daemon.driver(str(E1000_A)) == "vfio-pci"
    assert daemon.driver(str(E1000_A)) == "e1000"
    assert daemon.state()["leases"] == {}


# A client reading everything back to back (after CLIENT), and one cycle.
READ_EVERYTHING = """\
say("reading")
while True:
    vfiod.bus.call(vfiod.bus.new_method_call_message(
        "org.vfiod1", "/org/vfiod1", "org.freedesktop.DBus.ObjectManager", "GetManagedObjects"))
"""
ONE_CYCLE = """\
start = time.monotonic()
lease = vfiod.acquire([sys.argv[1]], backend="legacy")
lease.close()
vfiod.release(lease)
say(time.monotonic() - start)
"""


def test_clients_reading_everything_back_to_back_starve_nobody(
    private_bus: PrivateBus, tmp_path: Path, nobody: Clients
) -> None:
    """sd-bus answers GetManagedObjects inside sdbus's process(), which ran
    until nothing was queued: two clients calling it back to back kept it
    running for good, and with it every Acquire, timer and the SIGTERM
    handler (vfiod.bus.fair). Now each turn of the loop dispatches one
    message: another caller's Acquire and Release end, and vfiod stops."""
    with run_vfiod(private_bus, tmp_path / "vfiod", NOBODY_ANY_POLICY, "scale:1024") as daemon:
        readers = [nobody.spawn(READ_EVERYTHING) for _ in range(2)]
        try:
            for reader in readers:
                assert reader.read(timeout=60) == "reading"
            took = nobody.run(ONE_CYCLE, str(scale_address(0)), timeout=120)
            assert took < 60, f"one Acquire + Release took {took:.1f} s"
            assert daemon.stop() == 0
        finally:
            for reader in readers:
                reader.kill()
