"""Calls on a Lease object: they reply even when the lease ends during the
call, and a lease ended by someone else is announced to its owner."""

from __future__ import annotations

from tests.bus import PrivateBus
from tests.bus.vfiod import Clients, VfiodProcess
from tests.fakehost import NIC
from vfiod.client import Client

POLICY = f"""
[[rule]]
name = "nobody-nic"
effect = "allow"
address = "{NIC}"
users = ["nobody"]
managed = true
"""

# Lease.Release on the lease's own object, timed; the lease is free during it
# (the client closed its fds), so its object goes away while the call runs.
RELEASE_ON_THE_OBJECT = """\
from vfiod.client import _call
lease = vfiod.acquire([sys.argv[1]], managed=True)
lease.close()
start = time.monotonic()
vfiod._send(_call(vfiod.bus, "org.vfiod1.Lease", "Release", path=lease.path))
took = time.monotonic() - start
say({"took": took, "leases": sorted(vfiod.inventory().leases),
     "again": failure(vfiod.release, lease)})
"""


def test_lease_release_replies_when_the_lease_is_freed_meanwhile(
    vfiod: VfiodProcess, nobody: Clients
) -> None:
    out = nobody.run(RELEASE_ON_THE_OBJECT, str(NIC), timeout=60)
    assert out["took"] < 5.0, out
    assert out["leases"] == []
    assert out["again"][0] == "NotFound"
    assert vfiod.driver(str(NIC)) == "e1000e"


# Holds a lease until told, then says what it heard about it.
HOLD_AND_LISTEN = """\
import asyncio
from vfiod.client import AsyncClient

async def main():
    client = AsyncClient()
    heard = []

    async def listen():
        async for event in client.events():
            heard.append([event.kind, event.path, event.changes])

    task = asyncio.create_task(listen())
    await asyncio.sleep(0.2)
    lease = await client.acquire([sys.argv[1]], managed=True)
    lease.close()
    say(lease.path)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    await asyncio.sleep(0.5)
    task.cancel()
    say([h for h in heard if h[0] == "revoked"])

asyncio.run(main())
"""


def test_root_releasing_a_lease_revokes_it_for_its_owner(
    vfiod: VfiodProcess, nobody: Clients, private_bus: PrivateBus
) -> None:
    holder = nobody.spawn(HOLD_AND_LISTEN, str(NIC))
    try:
        path = holder.read(timeout=30)
        root = Client(private_bus.connect())
        try:
            root.release(path)
        finally:
            root.close()
        holder.send()
        revoked = holder.read(timeout=30)
    finally:
        holder.kill()
    assert revoked == [["revoked", path, {"reason": "released by uid 0"}]]
    assert "released by uid 0" in vfiod.log()
    assert vfiod.driver(str(NIC)) == "e1000e"


HOLD = """\
lease = vfiod.acquire([sys.argv[1]], managed=True, label="tenant-a")
lease.close()
say(lease.path)
sys.stdin.readline()
"""

LOOK = """\
inventory = vfiod.inventory()
(info,) = inventory.leases.values()
say({"uid": info.uid, "details": None if info.details is None else
         [info.details.label, info.details.owner_pid, info.details.state],
     "busy": failure(vfiod.acquire, [sys.argv[1]])})
"""


def test_who_holds_a_lease_is_told_to_its_uid_and_root_only(
    vfiod: VfiodProcess, nobody: Clients, private_bus: PrivateBus
) -> None:
    holder = nobody.spawn(HOLD, str(NIC))
    try:
        holder.read(timeout=30)
        own = nobody.run(LOOK, str(NIC))
        other = Clients(private_bus, 1).run(LOOK, str(NIC))
        root = Client(private_bus.connect())
        try:
            (seen,) = root.inventory().leases.values()
        finally:
            root.close()
    finally:
        holder.kill()
    assert own["details"] == ["tenant-a", 0, "active"]
    assert own["busy"][0] == "Busy"
    assert "tenant-a" in own["busy"][1]
    assert other["uid"] == 65534
    assert other["details"] is None
    assert other["busy"][0] == "Busy"
    assert "tenant-a" not in other["busy"][1]
    assert "leased to uid 65534 (lease " in other["busy"][1]
    assert seen.details is not None
    assert seen.label == "tenant-a"
    assert seen.owner.startswith(":")
