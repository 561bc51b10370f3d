"""A slow driver rebind stalls nobody but its requester, and a requester that
gives up is left holding nothing: vfiod on a fake host whose unbinds take
seconds (as a GPU's do), on a private system bus."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.bus import PrivateBus
from tests.bus.vfiod import Clients, VfiodProcess, run_vfiod
from tests.fakehost import E1000_A, E1000_B, NIC
from vfiod.client import Client, Lease, VfiodError, _call

POLICY = """
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

UNBIND = 2.0  # seconds each unbind takes
PAIR = (str(E1000_A), str(E1000_B))  # one group: two unbinds to move, two to restore
PROMPT = 1.0  # seconds an unrelated call may take at most while a group moves

HOLD = """\
def heard(progress):
    say({"step": progress.step, "device": progress.device, "driver": progress.driver,
         "elapsed": progress.elapsed})
lease = vfiod.acquire(sys.argv[1:], managed=True, progress=heard, label="slow-vm")
say({"lease": lease.path})
sys.stdin.readline()
lease.close()
vfiod.release(lease)
say({"released": True})
"""


@pytest.fixture
def slow(private_bus: PrivateBus, tmp_path: Path) -> Iterator[VfiodProcess]:
    """vfiod with UNBIND-second unbinds and a 1 s watchdog (keep-alive every 0.5 s)."""
    with run_vfiod(
        private_bus,
        tmp_path / "vfiod",
        POLICY,
        slow_unbind=UNBIND,
        environment={"WATCHDOG_USEC": "1000000"},
    ) as daemon:
        yield daemon


def _timed(what: str, call: object) -> float:
    assert callable(call)
    began = time.monotonic()
    call()
    took = time.monotonic() - began
    assert took < PROMPT, f"{what} took {took:.2f} s while another group was moving"
    return took


def _ping(client: Client) -> None:
    client._send(_call(client.bus, "org.freedesktop.DBus.Peer", "Ping"))


def _keep_alives(daemon: VfiodProcess) -> int:
    return daemon.notices.count("WATCHDOG=1")


def test_others_are_served_while_a_group_moves(
    slow: VfiodProcess, nobody: Clients, private_bus: PrivateBus
) -> None:
    holder = nobody.spawn(HOLD, *PAIR)
    try:
        first = holder.read()
        assert first == {"step": "bind", "device": str(E1000_A), "driver": "e1000", "elapsed": 0.0}
        alive_before = _keep_alives(slow)
        with Client(private_bus.connect()) as root:
            _timed("Peer.Ping", lambda: _ping(root))
            _timed("GetManagedObjects", root.inventory)
            _timed("CheckAccess", lambda: root.check_access([str(NIC)]))
            # The group is reserved for the request: said, not touched.
            with pytest.raises(VfiodError) as busy:
                _timed("a racing Acquire", lambda: root.acquire(list(PAIR), managed=True))
            assert busy.value.kind == "Busy"
            assert "IOMMU group 4 is being prepared for slow-vm (uid 65534)" in str(busy.value)
            # Another group moves in parallel: done while the pair still moves.
            began = time.monotonic()
            other = root.acquire([str(NIC)], managed=True)
            took = time.monotonic() - began
            assert UNBIND * 0.9 < took < UNBIND * 2, took
            assert slow.driver(str(E1000_B)) == "e1000", "the pair's second unbind came first"
            other.close()
            root.release(other)
        steps = [holder.read() for _ in range(3)]
        assert [(s["step"], s["device"]) for s in steps] == [
            ("bound", str(E1000_A)),
            ("bind", str(E1000_B)),
            ("bound", str(E1000_B)),
        ]
        assert all(s["elapsed"] >= UNBIND * 0.9 for s in steps if s["step"] == "bound"), steps
        granted = holder.read()
        assert granted["lease"].startswith("/org/vfiod1/lease/")
        # The watchdog was fed all along (every 0.5 s): a rebind of any length is safe.
        assert _keep_alives(slow) - alive_before >= 2 * UNBIND * 2 - 2

        # Giving the pair back takes as long; Release answers within its second.
        holder.send()
        began = time.monotonic()
        assert holder.read() == {"released": True}
        assert time.monotonic() - began < 1.5
        with Client(private_bus.connect()) as root:
            leases = root.inventory().leases
            assert [lease.details.state for lease in leases.values() if lease.details] == [
                "restoring"
            ]
            _timed("Peer.Ping during the restore", lambda: _ping(root))
        holder.finish()
    finally:
        holder.kill()
    _back_and_free(slow, private_bus)


def _back_and_free(daemon: VfiodProcess, bus: PrivateBus) -> None:
    """Once the request's reservation ends, the group can be had, both e1000
    are back on their driver and no lease is left recorded."""
    daemon.slow_unbind(0)
    with Client(bus.connect()) as root:
        # The group stays reserved until the request's last write is undone
        # (a device is still on e1000 while it is being unbound).
        deadline = time.monotonic() + 4 * UNBIND + 5
        while (lease := _acquire_unless_busy(root)) is None:
            assert time.monotonic() < deadline, "the group is still reserved"
            time.sleep(0.1)
        lease.close()
        root.release(lease)
    _on_e1000(daemon)
    assert not daemon.state().get("leases")


def _acquire_unless_busy(root: Client) -> Lease | None:
    try:
        return root.acquire(list(PAIR), managed=True)
    except VfiodError as e:
        if e.kind != "Busy":  # being prepared, or restoring
            raise
        return None


def _on_e1000(daemon: VfiodProcess) -> None:
    daemon.wait_for(
        lambda: daemon.driver(str(E1000_A)) == daemon.driver(str(E1000_B)) == "e1000",
        "the pair going back to e1000",
        timeout=4 * UNBIND + 5,
    )


def test_a_caller_whose_time_runs_out_holds_nothing(
    slow: VfiodProcess, nobody: Clients, private_bus: PrivateBus
) -> None:
    code = """\
began = time.monotonic()
error = failure(vfiod.acquire, sys.argv[1:], managed=True, timeout=UNBIND * 1.5)
say({"error": error, "took": time.monotonic() - began})
"""
    said = nobody.run(f"UNBIND = {UNBIND}\n" + code, *PAIR)
    assert said["error"][0] == "TimedOut", said
    assert "within the 3 s you said you would wait" in said["error"][1]
    assert said["took"] < UNBIND * 1.5, "vfiod answers before the caller stops waiting"
    _back_and_free(slow, private_bus)


def test_a_caller_that_leaves_mid_rebind_holds_nothing(
    slow: VfiodProcess, nobody: Clients, private_bus: PrivateBus
) -> None:
    holder = nobody.spawn(HOLD, *PAIR)
    assert holder.read()["step"] == "bind"
    holder.kill()  # its connection closes while the first unbind runs
    _back_and_free(slow, private_bus)
    assert "the request's caller left" in slow.log()


def test_cancel_stops_a_request_of_ones_own_connection_only(
    slow: VfiodProcess, nobody: Clients, private_bus: PrivateBus
) -> None:
    code = """\
import asyncio
from vfiod.client import MANAGER, AsyncClient, _call, _options

async def main():
    mine = AsyncClient(vfiod.bus)
    message = _call(vfiod.bus, MANAGER, "Acquire", "asa{sv}", sys.argv[1:],
                    _options(managed=True, request_id="vm-7/1", timeout=60))
    reply = asyncio.ensure_future(vfiod.bus.call_async(message))
    await asyncio.sleep(0.5)
    other = Client()  # the same uid on another connection
    said = {"other": failure(other.cancel, "vm-7/1")}
    await mine.cancel("vm-7/1")
    began = time.monotonic()
    try:
        await reply
        said["reply"] = "granted"
    except Exception as e:
        said["reply"] = str(e)
    said["took"] = time.monotonic() - began
    return said

say(asyncio.run(main()))
"""
    said = nobody.run(code, *PAIR)
    assert said["other"][0] == "NotFound", said
    assert "was cancelled by its caller" in said["reply"], said
    assert said["took"] < UNBIND, "the answer comes before the unbind in progress ends"
    _back_and_free(slow, private_bus)
