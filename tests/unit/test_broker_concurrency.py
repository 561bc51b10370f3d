"""The broker with its threaded worker: an unbind that does not return (a
gate the test opens) stalls only its own request. Others are served, the
group is reserved meanwhile, and a request that is cancelled, whose time
runs out or whose caller leaves answers at once and gives back what it moved
once the write returns. No timing: the gate decides when a write ends."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fakehost import E1000_A, E1000_B, NIC, build, no_modules
from tests.unit.test_broker import ALICE, BOB, LEGACY, POLICY, ManualWatcher
from vfiod.broker import Broker, LeaseState, Moving
from vfiod.errors import Busy, Cancelled, NotFound, TimedOut
from vfiod.host.binding import Binder, Step
from vfiod.host.sysfs import Sysfs
from vfiod.host.watcher import Host
from vfiod.policy.load import PolicyHolder
from vfiod.reasons import Reason
from vfiod.worker import ThreadWorker

PAIR = [str(E1000_A), str(E1000_B)]


class GatedSysfs(Sysfs):
    """Unbinds of ``gated`` devices wait for the test to open the gate."""

    def __init__(self, inner: Sysfs) -> None:
        super().__init__(inner.root)
        self.inner = inner
        self.gated: set[str] = set()
        self.gate = threading.Event()
        self.waiting = threading.Event()  # an unbind is at the gate

    def write(self, path: str, value: str) -> None:
        if path.endswith("/unbind") and value.strip() in self.gated:
            self.waiting.set()
            assert self.gate.wait(30), "the test never opened the gate"
        self.inner.write(path, value)


@dataclasses.dataclass
class Threaded:
    broker: Broker
    sysfs: GatedSysfs
    steps: list[Moving]
    worker: ThreadWorker


@pytest.fixture
def world(tmp_path: Path) -> Iterator[Threaded]:
    host = build(tmp_path / "host", "small", policy=POLICY)
    sysfs = GatedSysfs(host.sysfs)
    loop = asyncio.new_event_loop()
    worker = ThreadWorker(loop)
    binder = Binder(sysfs, host.state, load_module=no_modules, critical=dict)
    broker = Broker(
        Host(host.sysfs, host.state),
        binder,
        host.kernel,
        PolicyHolder(str(host.policy_root)),
        ManualWatcher(),
        worker=worker,
    )
    steps: list[Moving] = []
    broker.progress_listeners.append(steps.append)
    asyncio.set_event_loop(loop)
    try:
        yield Threaded(broker, sysfs, steps, worker)
    finally:
        sysfs.gate.set()
        broker.shutdown()
        loop.run_until_complete(_settle(broker))
        worker.close()
        asyncio.set_event_loop(None)
        loop.close()
    assert host.sysfs.driver(E1000_A) == host.sysfs.driver(E1000_B) == "e1000"
    assert host.sysfs.driver(NIC) == "e1000e"
    assert host.state.load().leases == {}
    assert host.state.load().bindings == {}
    assert host.kernel.open_nodes() == {}


async def _settle(broker: Broker) -> None:
    for _ in range(500):
        broker.drain()
        if not broker.busy:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the broker did not settle")


async def _at_gate(w: Threaded) -> None:
    while not w.sysfs.waiting.is_set():
        await asyncio.sleep(0.005)


def _run(w: Threaded, test: object) -> None:
    assert asyncio.iscoroutine(test)
    asyncio.get_event_loop().run_until_complete(test)


def test_others_are_served_while_a_group_moves(world: Threaded) -> None:
    w = world
    w.sysfs.gated.add(str(E1000_B))  # the pair's second unbind hangs

    async def scenario() -> None:
        pair = asyncio.ensure_future(
            w.broker.acquire(BOB, 1, ":1.8", PAIR, dataclasses.replace(LEGACY, label="vm-b"))
        )
        await _at_gate(w)
        # Another group moves and is granted while the pair's write hangs.
        nic = await w.broker.acquire(ALICE, 2, ":1.9", [str(NIC)], LEGACY)
        assert not pair.done()
        with pytest.raises(Busy, match=r"IOMMU group 4 is being prepared for uid 1001, for"):
            await w.broker.acquire(ALICE, 2, ":1.9", [str(E1000_A)], LEGACY)
        # Its own uid hears which of its VMs it is being prepared for.
        [access, _] = w.broker.check_access(BOB, PAIR, LEGACY)
        assert access.code is Reason.BUSY, access
        assert "being prepared for vm-b (uid 1001)" in access.reason
        w.sysfs.gate.set()
        grant = await pair
        assert grant.lease.moved == (E1000_A, E1000_B)
        for fd in (*grant.fds.values(), *nic.fds.values()):
            os.close(fd)
        w.broker.release(grant.lease.id, BOB)
        w.broker.release(nic.lease.id, ALICE)
        await _settle(w.broker)

    _run(w, scenario())
    bob = [(m.device, m.step) for m in w.steps if m.owner == ":1.8" and m.request == ""]
    assert bob[:4] == [
        (E1000_A, Step.BIND),
        (E1000_A, Step.BOUND),
        (E1000_B, Step.BIND),
        (E1000_B, Step.BOUND),
    ]


@pytest.mark.parametrize("how", ["cancel", "owner-left", "timeout"])
def test_a_stopped_request_answers_at_once_and_gives_back(world: Threaded, how: str) -> None:
    w = world
    w.sysfs.gated.add(str(E1000_B))
    # With "timeout", the answer is due in 0.5 s, long before the gate opens.
    timeout = 0.5 if how == "timeout" else 30.0
    options = dataclasses.replace(LEGACY, request_id="vm-b/1", timeout=timeout)

    async def scenario() -> None:
        pair = asyncio.ensure_future(w.broker.acquire(BOB, 1, ":1.8", PAIR, options))
        await _at_gate(w)
        if how == "cancel":
            assert w.broker.cancel(":1.8", "vm-b/1") == "cancelled"
            error: type[Exception] = Cancelled
        elif how == "owner-left":
            w.broker.end_owner(":1.8", "its bus connection :1.8 closed")
            error = Cancelled
        else:
            error = TimedOut
        with pytest.raises(error):
            await pair  # answered while the unbind still hangs
        assert w.sysfs.gate.is_set() is False
        # Reserved until what it moved is back: nobody else touches the group.
        with pytest.raises(Busy, match="being prepared"):
            await w.broker.acquire(ALICE, 2, ":1.9", [str(E1000_A)], LEGACY)
        w.sysfs.gate.set()
        await _settle(w.broker)
        assert w.broker.leases == {}
        # The group can be had again.
        w.sysfs.gated.clear()
        grant = await w.broker.acquire(BOB, 1, ":1.8", PAIR, LEGACY)
        for fd in grant.fds.values():
            os.close(fd)
        w.broker.release(grant.lease.id, BOB)
        await _settle(w.broker)

    _run(w, scenario())


def test_cancel_after_the_grant_ends_the_lease(world: Threaded) -> None:
    """A client whose reply was lost cancels by its request-id: the lease ends."""
    w = world
    options = dataclasses.replace(LEGACY, request_id="vm-a/1")

    async def scenario() -> None:
        grant = await w.broker.acquire(ALICE, 2, ":1.9", [str(NIC)], options)
        for fd in grant.fds.values():
            os.close(fd)
        with pytest.raises(NotFound, match="no Acquire with request-id 'vm-a/1'"):
            w.broker.cancel(":1.10", "vm-a/1")  # another connection's: not found
        assert w.broker.cancel(":1.9", "vm-a/1") == "released"
        assert grant.lease.state is not LeaseState.ACTIVE
        await _settle(w.broker)

    _run(w, scenario())


def test_a_released_lease_is_restoring_until_its_devices_are_back(world: Threaded) -> None:
    w = world

    async def scenario() -> None:
        grant = await w.broker.acquire(BOB, 1, ":1.8", PAIR, LEGACY)
        for fd in grant.fds.values():
            os.close(fd)
        w.sysfs.gated.add(str(E1000_A))  # unbinding it from vfio-pci hangs now
        w.broker.release(grant.lease.id, BOB)
        await _at_gate(w)
        assert grant.lease.state is LeaseState.RESTORING
        with pytest.raises(Busy, match="restoring"):
            await w.broker.acquire(ALICE, 2, ":1.9", [str(E1000_A)], LEGACY)
        nic = await w.broker.acquire(ALICE, 2, ":1.9", [str(NIC)], LEGACY)  # others go on
        for fd in nic.fds.values():
            os.close(fd)
        w.broker.release(nic.lease.id, ALICE)
        w.sysfs.gate.set()
        await _settle(w.broker)
        assert grant.lease.id not in w.broker.leases  # freed, once its devices were back

    _run(w, scenario())
