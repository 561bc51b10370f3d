"""A fuzzer for vfiod's bus API, against vfiod on the fake host.

A few long-running client processes, as uid 65534 and as root, send
thousands of calls with random arguments that are well formed on the wire:
every method of the Manager and of leases (theirs, others', made up),
Properties Get/GetAll/Set, Introspect, GetManagedObjects and Peer on random
objects; device lists valid, invalid, huge, unicode, repeated; options with
known keys of the right and wrong types, unknown keys, nested containers,
variants in variants, fds nested anywhere; MapDma of memfds, pipes,
/dev/null, eventfds and pidfds at random sizes, offsets and IOVAs. Besides
those, a raw client (tests/bus/test_bus_policy.py) sends what sdbus cannot
build: fd indexes past the fds a message carries, keys given twice, bodies
of the wrong signature, calls without an interface.

vfiod must never crash (it answers Peer.Ping and a plain Acquire/Release at
the end), answer only the contract's org.vfiod1.Error.* names (Failed is a
bug: none) or, for what the bus or sd-bus refuse before vfiod sees it, the
BUS_ERRORS below; log no traceback and no bug; and once the clients are
gone and their leases freed, hold the fds it held before and about the
memory (RSS_SLACK).

The seed is random per run and printed; VFIOD_FUZZ_SEED=N repeats a run.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import random
import socket
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from tests.bus import NOBODY, PrivateBus, test_fds
from tests.bus.test_bus_policy import RawClient
from tests.bus.test_fds import contract_errors, error_name, raw_call, settle
from tests.bus.vfiod import Clients, VfiodProcess
from tests.fakehost import E1000_A, E1000_B, NIC, SATA
from vfiod.client import Client

POLICY = test_fds.POLICY
SEED_VARIABLE = "VFIOD_FUZZ_SEED"
# Calls per client process, and the processes: about 3,000 calls in all.
CLIENTS = (("nobody-a", NOBODY, 1000), ("nobody-b", NOBODY, 900), ("root", 0, 900))
WARM_UP = 150  # calls before the baseline is taken: vfiod's caches and lazy imports fill
# RSS may grow by this much and be back to baseline: CPython keeps the arenas
# it allocated while the calls were in flight (thousands of messages parsed,
# tasks, replies of up to a few hundred kB) and sd-bus its read buffers; the
# caches of checked signatures are bounded (512 each). A leak of one object
# per call would not fit: 3,000 calls leaking 4 kB each is 12 MB.
RSS_SLACK = 10 << 20

# What the bus or sd-bus answer before any vfiod code runs, and why the
# fuzzer causes it:
BUS_ERRORS = {
    # sd-bus: a path no object is exported at (made-up lease paths).
    "org.freedesktop.DBus.Error.UnknownObject",
    # sd-bus: a member the interface lacks, or an interface the object lacks.
    "org.freedesktop.DBus.Error.UnknownMethod",
    # sd-bus: Properties.GetAll of an interface the object lacks.
    "org.freedesktop.DBus.Error.UnknownInterface",
    # sd-bus: Properties.Get/Set of a property (or interface) the object lacks.
    "org.freedesktop.DBus.Error.UnknownProperty",
    # sd-bus: Properties.Set of one of vfiod's properties (all read-only).
    "org.freedesktop.DBus.Error.PropertyReadOnly",
    # sd-bus: a body whose signature is not the method's (the raw client).
    "org.freedesktop.DBus.Error.InvalidArgs",
    # dbus-daemon's policy: a call without an interface, or to an interface
    # the policy does not open (the raw client).
    "org.freedesktop.DBus.Error.AccessDenied",
}

MANAGER_PATH = "/org/vfiod1"
MANAGER = "org.vfiod1.Manager"
LEASE = "org.vfiod1.Lease"
DEVICE = "org.vfiod1.Device"
GROUP = "org.vfiod1.Group"
PROPERTIES = "org.freedesktop.DBus.Properties"
INTROSPECTABLE = "org.freedesktop.DBus.Introspectable"
OBJECT_MANAGER = "org.freedesktop.DBus.ObjectManager"
PEER = "org.freedesktop.DBus.Peer"
PROPERTY_NAMES = {
    MANAGER: ["Version", "Backends", "NoIommuMode"],
    DEVICE: ["Address", "Vendor", "Class", "Driver", "Group", "HostCritical", "Lease"],
    GROUP: ["Id", "Devices", "Viable", "Blockers", "Lease"],
    LEASE: ["Owner", "Uid", "Pid", "Label", "Devices", "Groups", "Backend", "Created"],
}
OPTIONS = ["backend", "open-devices", "managed", "unsafe-noiommu", "owner-pidfd", "label"]
MAX_FDS = 16  # per message: dbus-daemon disconnects a sender of more


def seed() -> int:
    value = os.environ.get(SEED_VARIABLE)
    return int(value) if value else random.SystemRandom().randrange(1 << 32)


# -- the client side (runs in the client processes)


class _Fds:
    """The fds a client passes: it keeps them all run long."""

    def __init__(self) -> None:
        self.child = subprocess.Popen(
            ["sleep", "600"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        read_end, write_end = os.pipe()
        memfds = []
        for size in (0, 4096, 1 << 20, 8 << 20):
            memfd = os.memfd_create(f"fuzz-{size}")
            os.ftruncate(memfd, size)
            memfds.append(memfd)
        self.memfds = memfds
        self.pidfds = [os.pidfd_open(os.getpid()), os.pidfd_open(self.child.pid)]
        self.sock_a, self.sock_b = socket.socketpair()
        self.others = [
            read_end,
            write_end,
            os.open("/dev/null", os.O_RDWR),
            os.eventfd(0),
            self.sock_a.fileno(),
        ]
        self.all = [*self.memfds, *self.pidfds, *self.others]

    def any(self, rng: random.Random) -> int:
        return rng.choice(self.all)

    def close(self) -> None:
        self.child.kill()
        self.child.wait()
        for fd in [*self.memfds, *self.pidfds, *self.others[:4]]:
            os.close(fd)
        self.sock_a.close()
        self.sock_b.close()


@dataclass
class _Budget:
    """fds left for the message being built."""

    fds: int = MAX_FDS

    def take(self) -> bool:
        if self.fds <= 0:
            return False
        self.fds -= 1
        return True


UNICODE = ["ü", "😀", "\u202e", "e\u0301", "\u00a0", "ÿ" * 40, "Ω≈ç√", "\ufeff"]
BAD_ADDRESSES = ["0000:zz:10.0", "0000:00:10.8", "ffff:ff:1f.7", "10.0", "nic", "*"]


def _string(rng: random.Random, addresses: list[str]) -> str:
    makers: list[Callable[[], str]] = [
        lambda: "",
        lambda: rng.choice(addresses),
        lambda: rng.choice(addresses) + rng.choice([" ", "\n", "x", ".0", "\t"]),
        lambda: rng.choice(UNICODE) * rng.randint(1, 5),
        lambda: "a" * rng.choice([257, 1000, 20000]),
        lambda: rng.choice(BAD_ADDRESSES),
        lambda: "".join(rng.choice("0123456789abcdef:.") for _ in range(rng.randint(1, 14))),
        lambda: rng.choice(["legacy", "iommufd", "vfio", "LEGACY"]),
        lambda: "".join(chr(rng.randint(1, 0xD7FF)) for _ in range(rng.randint(1, 12))),
    ]
    return rng.choice(makers)()


def _devices(rng: random.Random, addresses: list[str]) -> list[str]:
    makers: list[Callable[[], list[str]]] = [
        lambda: [],
        lambda: [rng.choice(addresses)],
        lambda: [rng.choice(addresses)] * rng.randint(2, 4),
        lambda: [rng.choice(addresses) for _ in range(rng.choice([100, 2000]))],
        lambda: [_string(rng, addresses) for _ in range(rng.randint(1, 4))],
        lambda: [_string(rng, addresses) for _ in range(rng.randint(1, 4))],
    ]
    return rng.choice(makers)()


def _segment(rng: random.Random) -> str:
    return "".join(rng.choice("abcXYZ019_") for _ in range(rng.randint(1, 8)))


def _path(rng: random.Random, leases: list[str]) -> str:
    makers: list[Callable[[], str]] = [
        lambda: "/org/vfiod1/lease/" + "".join(rng.choice("0123456789abcdef") for _ in range(16)),
        lambda: rng.choice(["/", "/org/vfiod1", "/org/vfiod1/lease", "/org/vfiod1/device/x"]),
        lambda: "/org/vfiod1/lease/" + rng.choice(["_", "A", "0" * 200, "x_y"]),
        lambda: "/" + "/".join(_segment(rng) for _ in range(rng.randint(1, 4))),
    ]
    if leases:
        makers.append(lambda: rng.choice(leases))
    return rng.choice(makers)()


class _Values:
    """Random variants, (signature, value), with fds from a budget."""

    INTEGERS: ClassVar[dict[str, tuple[int, int]]] = {
        "y": (0, 0xFF),
        "n": (-(1 << 15), (1 << 15) - 1),
        "q": (0, 0xFFFF),
        "i": (-(1 << 31), (1 << 31) - 1),
        "u": (0, 0xFFFFFFFF),
        "x": (-(1 << 63), (1 << 63) - 1),
        "t": (0, (1 << 64) - 1),
    }

    def __init__(self, rng: random.Random, fds: _Fds, addresses: list[str]) -> None:
        self.rng = rng
        self.fds = fds
        self.addresses = addresses

    def _integer(self, kind: str) -> tuple[str, Any]:
        low, high = self.INTEGERS[kind]
        return kind, self.rng.choice([low, high, 0, 1, self.rng.randint(low, high)])

    def _fds(self, budget: _Budget, most: int) -> list[int]:
        count = self.rng.randint(0, min(budget.fds, most))
        budget.fds -= count
        return [self.fds.any(self.rng) for _ in range(count)]

    def _fd(self, budget: _Budget) -> int:
        assert budget.take()  # value() offers fds only with two left
        return self.fds.any(self.rng)

    def value(self, budget: _Budget, depth: int = 0) -> tuple[str, Any]:
        rng = self.rng
        text = functools.partial(_string, rng, self.addresses)
        makers: dict[str, Callable[[], tuple[str, Any]]] = {
            "b": lambda: ("b", rng.random() < 0.5),
            "s": lambda: ("s", text()),
            "d": lambda: ("d", rng.choice([0.0, -1.5, 1e300, float("inf")])),
            "o": lambda: ("o", _path(rng, [])),
            "g": lambda: ("g", rng.choice(["", "s", "a{sv}", "(ii)", "v", "ah", "x" * 40])),
            "ay": lambda: ("ay", rng.randbytes(rng.choice([0, 3, 5000]))),
            "as": lambda: ("as", [text() for _ in range(rng.randint(0, 3))]),
        }
        for kind in self.INTEGERS:
            makers[kind] = functools.partial(self._integer, kind)
        if budget.fds >= 2:
            makers |= {
                "h": lambda: ("h", self._fd(budget)),
                "ah": lambda: ("ah", self._fds(budget, 5)),
                "a{sh}": lambda: (
                    "a{sh}",
                    {f"k{i}": fd for i, fd in enumerate(self._fds(budget, 3))},
                ),
                "a{hs}": lambda: ("a{hs}", {fd: "x" for fd in self._fds(budget, 2)}),
                "(hh)": lambda: ("(hh)", (self._fd(budget), self._fd(budget))),
            }
        if depth < 4:
            makers |= {
                "v": lambda: ("v", self.value(budget, depth + 1)),
                "a{sv}": lambda: ("a{sv}", self.options(budget, depth + 1)),
                "aa{sv}": lambda: ("aa{sv}", [self.options(budget, depth + 1)]),
                "(sv)": lambda: ("(sv)", (text(), self.value(budget, depth + 1))),
                "av": lambda: (
                    "av",
                    [self.value(budget, depth + 1) for _ in range(rng.randint(0, 3))],
                ),
            }
        return makers[rng.choice(sorted(makers))]()

    def known(self, key: str, budget: _Budget) -> tuple[str, Any]:
        """A known option, mostly of its right type."""
        rng = self.rng
        if rng.random() < 0.3:
            return self.value(budget)
        if key == "backend":
            return "s", rng.choice(["legacy", "iommufd", "legacy", _string(rng, self.addresses)])
        if key == "label":
            return "s", rng.choice(["vm-1", "", _string(rng, self.addresses)])
        if key == "owner-pidfd" and budget.take():
            return "h", rng.choice([*self.fds.pidfds, *self.fds.pidfds, self.fds.any(rng)])
        return "b", rng.random() < 0.5

    def options(
        self, budget: _Budget, depth: int = 0, known: Sequence[str] = OPTIONS
    ) -> dict[str, tuple[str, Any]]:
        rng = self.rng
        options: dict[str, tuple[str, Any]] = {}
        for _ in range(rng.choice([0, 1, 2, 3, 3, 4, 6])):
            if rng.random() < 0.75 and depth == 0:
                key = rng.choice(known)
                options[key] = self.known(key, budget)
            else:
                key = rng.choice([_string(rng, self.addresses), "x", "owner_pidfd", "Managed"])
                options[key] = self.value(budget, depth)
        return options


def _plain_options(rng: random.Random, fds: _Fds) -> dict[str, tuple[str, Any]]:
    """Options vfiod would grant with."""
    options: dict[str, tuple[str, Any]] = {"managed": ("b", True)}
    if rng.random() < 0.3:
        options["owner-pidfd"] = ("h", rng.choice(fds.pidfds))
    if rng.random() < 0.3:
        options["label"] = ("s", rng.choice(["vm-1", "ü", ""]))
    return options


@dataclass
class _Report:
    calls: Counter[str] = field(default_factory=Counter)
    names: Counter[str] = field(default_factory=Counter)
    unexpected: list[str] = field(default_factory=list)
    granted: int = 0
    seconds: dict[str, float] = field(default_factory=dict)  # by member

    def record(self, member: str, name: str, message: str, allowed: set[str]) -> None:
        self.calls[member] += 1
        self.names[name] += 1
        if name != "ok" and name not in allowed and len(self.unexpected) < 20:
            self.unexpected.append(f"{member}: {name}: {message[:300]}")


class _Fuzzer:
    def __init__(self, client: Client, rng: random.Random, allowed: set[str]) -> None:
        self.client = client
        self.bus = client.bus
        self.rng = rng
        self.allowed = allowed
        self.fds = _Fds()
        self.report = _Report()
        inventory = client.inventory()
        self.addresses = sorted(inventory.devices)
        self.values = _Values(rng, self.fds, self.addresses)
        self.objects = [
            MANAGER_PATH,
            *(d.path for d in inventory.devices.values()),
            *(g.path for g in inventory.groups.values()),
        ]
        self.mine: list[str] = []  # leases this client holds
        self.seen: list[str] = []  # leases anyone holds, as last seen
        address = os.environ["DBUS_SYSTEM_BUS_ADDRESS"].removeprefix("unix:path=")
        self.raw = RawClient(address)

    def close(self) -> None:
        self.raw.close()
        self.fds.close()

    # -- one call

    def call(self, path: str, interface: str, member: str, signature: str, *args: Any) -> None:
        """Send one call with sdbus; record how it was answered."""
        try:
            message = self.bus.new_method_call_message("org.vfiod1", path, interface, member)
            if signature:
                message.append_data(signature, *args)
        except Exception as e:  # the fuzzer's own mistake: sdbus would not build it
            self.report.record(member, f"client:{type(e).__name__}", str(e), self.allowed)
            return
        started = time.monotonic()
        try:
            reply = self.bus.call(message)
        except Exception as e:
            self.report.record(member, error_name(e), str(e), self.allowed)
            return
        finally:
            del message
            spent = self.report.seconds
            spent[member] = spent.get(member, 0.0) + time.monotonic() - started
        contents: Any = reply.get_contents()
        del reply
        if member == "Acquire":
            lease, fds = contents
            for fd in fds.values():
                os.close(fd)
            self.mine.append(lease)
            self.report.granted += 1
        self.report.record(member, "ok", "", self.allowed)

    def raw_call(self, interface: str, member: str, signature: str, *args: Any, **kw: Any) -> None:
        fds = kw.get("fds", [])
        path = kw.get("path", MANAGER_PATH)
        reply = raw_call(self.raw, path, interface, member, signature, args, fds)
        name = str(reply.fields.get(4, "ok"))
        text = reply.first_string() if reply.kind == 3 else ""
        self.report.record("raw " + member, name, text, self.allowed)

    # -- the calls

    def step(self) -> None:
        rng = self.rng
        choice = rng.random()
        if choice < 0.22:
            self.acquire()
        elif choice < 0.34:
            budget = _Budget()
            options = self.values.options(budget)
            self.call(
                MANAGER_PATH,
                MANAGER,
                "CheckAccess",
                "asa{sv}",
                _devices(rng, self.addresses),
                options,
            )
        elif choice < 0.42:
            self.release()
        elif choice < 0.54:
            self.map_dma()
        elif choice < 0.58:
            self.unmap_dma()
        elif choice < 0.68:
            self.properties()
        elif choice < 0.72:
            self.misc()
        else:
            self.raw_message()

    def acquire(self) -> None:
        rng = self.rng
        if rng.random() < 0.35:  # one vfiod may grant
            devices = [rng.choice([str(NIC), str(E1000_A), str(E1000_B), str(SATA)])]
            options = _plain_options(rng, self.fds)
        else:
            devices = _devices(rng, self.addresses)
            options = self.values.options(_Budget())
        self.call(MANAGER_PATH, MANAGER, "Acquire", "asa{sv}", devices, options)

    def release(self) -> None:
        rng = self.rng
        if self.mine and rng.random() < 0.6:
            lease = self.mine.pop(rng.randrange(len(self.mine)))
        else:
            lease = _path(rng, self.seen)
        if rng.random() < 0.5:
            self.call(MANAGER_PATH, MANAGER, "Release", "o", lease)
        else:
            self.call(lease, LEASE, "Release", "")
        if rng.random() < 0.2:
            self.seen = list(self.client.inventory().leases)

    def _lease(self) -> str:
        if self.mine and self.rng.random() < 0.7:
            return self.rng.choice(self.mine)
        return _path(self.rng, self.seen)

    def map_dma(self) -> None:
        rng = self.rng
        fd = rng.choice([*self.fds.memfds, *self.fds.memfds, self.fds.any(rng)])
        page = 4096
        offset = rng.choice(
            [0, 0, page, 1, (1 << 20) - page, (1 << 64) - page, rng.getrandbits(64)]
        )
        size = rng.choice([page, 2 * page, 1 << 20, 4 << 20, 8 << 20, 0, 1, (1 << 64) - page])
        iova = rng.choice([0, page, 1 << 32, (1 << 64) - page, rng.getrandbits(64), 3])
        options: dict[str, tuple[str, Any]] = {}
        if rng.random() < 0.5:
            options["allocate-iova"] = ("b", rng.random() < 0.5)
        if rng.random() < 0.3:
            options |= self.values.options(_Budget(MAX_FDS - 1))
        self.call(self._lease(), LEASE, "MapDma", "httta{sv}", fd, offset, size, iova, options)

    def unmap_dma(self) -> None:
        rng = self.rng
        iova = rng.choice([0, 4096, 2 << 20, rng.getrandbits(64)])
        size = rng.choice([4096, 1 << 20, 0, rng.getrandbits(64)])
        self.call(self._lease(), LEASE, "UnmapDma", "tt", iova, size)

    def properties(self) -> None:
        rng = self.rng
        path = rng.choice([*self.objects, *self.mine, *self.seen, _path(rng, [])])
        interface = rng.choice([*PROPERTY_NAMES, "org.vfiod1.Nope", ""])
        names = PROPERTY_NAMES.get(interface, ["X"])
        name = rng.choice([*names, "Nope", ""])
        kind = rng.randrange(3)
        if kind == 0:
            self.call(path, PROPERTIES, "Get", "ss", interface, name)
        elif kind == 1:
            self.call(path, PROPERTIES, "GetAll", "s", interface)
        else:
            value = self.values.value(_Budget(2))
            self.call(path, PROPERTIES, "Set", "ssv", interface, name, value)

    def misc(self) -> None:
        rng = self.rng
        kind = rng.randrange(6)
        path = rng.choice([*self.objects[:3], *self.mine[:2], _path(rng, self.seen)])
        if kind == 0:
            self.call(path, INTROSPECTABLE, "Introspect", "")
        elif kind == 1 and rng.random() < 0.5:
            self.call(
                rng.choice([MANAGER_PATH, "/", path]), OBJECT_MANAGER, "GetManagedObjects", ""
            )
        elif kind == 1:
            options = self.values.options(_Budget()) if rng.random() < 0.3 else {}
            self.call(MANAGER_PATH, MANAGER, "GetInventory", "a{sv}", options)
        elif kind == 2:
            self.call(path, PEER, "Ping", "")
        elif kind == 3:
            self.call(path, PEER, "GetMachineId", "")
        elif kind == 4 and rng.random() < 0.3:  # it re-reads the policy: not too often
            self.call(MANAGER_PATH, MANAGER, "ReloadPolicy", "")
        else:
            self.call(path, rng.choice([MANAGER, LEASE]), rng.choice(["Nope", "acquire"]), "")

    def raw_message(self) -> None:
        """What sdbus cannot send: forged fd indexes, keys given twice,
        bodies of another signature, calls without an interface."""
        rng = self.rng
        memfd = rng.choice(self.fds.memfds)
        sent = [memfd] * rng.randint(0, 3)
        good = rng.randrange(max(len(sent), 1))
        forged = rng.choice([len(sent), len(sent) + 1, 255, 0xFFFFFFFF])
        kind = rng.randrange(7)
        if kind == 0:  # good fds then a forged one, nested
            options = {
                "owner-pidfd": ("h", good),
                "x": ("v", ("ah", [good, good, forged])),
            }
            self.raw_call(MANAGER, "CheckAccess", "asa{sv}", [str(NIC)], options, fds=sent)
        elif kind == 1:
            options = {"a": ("(hh)", (good, forged)), "label": ("s", "x")}
            self.raw_call(MANAGER, "Acquire", "asa{sv}", [str(NIC)], options, fds=sent)
        elif kind == 2:
            path = self._lease()
            dma = [rng.choice([good, forged]), 0, 4096, 0, {"x": ("h", forged)}]
            self.raw_call(LEASE, "MapDma", "httta{sv}", *dma, fds=sent, path=path)
        elif kind == 3:  # a key twice, the first carrying an fd
            twice = [("owner-pidfd", ("h", good)), ("owner-pidfd", ("s", "x"))]
            self.raw_call(MANAGER, "CheckAccess", "asa{sv}", [], twice, fds=sent)
        elif kind == 4:  # another signature than the method's
            wrong: list[tuple[str, str, list[Any]]] = [
                ("Acquire", "s", ["0000:00:10.0"]),
                ("Acquire", "asa{ss}", [[], {"a": "b"}]),
                ("CheckAccess", "", []),
                ("Release", "s", ["/org/vfiod1/lease/x"]),
                ("ReloadPolicy", "h", [good]),
                ("CheckAccess", "asa{sv}h", [[], {}, good]),
                ("GetInventory", "", []),
            ]
            member, signature, args = rng.choice(wrong)
            self.raw_call(MANAGER, member, signature, *args, fds=sent)
        elif kind == 5:  # no interface: the bus refuses it
            fields: dict[int, str | int] = {1: MANAGER_PATH, 3: "ReloadPolicy", 6: "org.vfiod1"}
            reply = self.raw.call(fields)
            name = str(reply.fields.get(4, "ok"))
            self.report.record("raw no-interface", name, "", self.allowed)
        else:  # an interface outside the policy
            self.raw_call("org.example.Other", "Ping", "")

    def run(self, calls: int) -> _Report:
        for _ in range(calls):
            self.step()
        return self.report


def fuzz_main(seed: int, calls: int, allowed: list[str]) -> dict[str, Any]:
    """A client process's run: ``calls`` random calls; what they got."""
    rng = random.Random(seed)  # noqa: S311 - a fuzzer's choices, repeatable by seed
    client = Client()
    fuzzer = _Fuzzer(client, rng, set(allowed))
    started = time.monotonic()
    try:
        report = fuzzer.run(calls)
    finally:
        fuzzer.close()
        client.close()
    return {
        "calls": sum(report.calls.values()),
        "members": dict(report.calls),
        "names": dict(report.names),
        "unexpected": report.unexpected,
        "granted": report.granted,
        "slowest": [
            f"{m} {t:.1f} s" for m, t in sorted(report.seconds.items(), key=lambda i: -i[1])[:3]
        ],
        "seconds": time.monotonic() - started,
    }


CLIENT_CODE = """\
from tests.bus.test_fuzz import fuzz_main
vfiod.close()
say(fuzz_main(int(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3])))
"""


# -- the test


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


@contextlib.contextmanager
def _spawned(clients: list[tuple[Clients, list[str]]]) -> Iterator[list[Any]]:
    running = [c.spawn(CLIENT_CODE, *args) for c, args in clients]
    try:
        yield running
    finally:
        for spawned in running:
            if spawned.process.returncode is None:
                spawned.kill()


def _run(vfiod: VfiodProcess, clients: list[tuple[Clients, list[str]]]) -> list[dict[str, Any]]:
    with _spawned(clients) as running:
        reports = [spawned.read(timeout=120) for spawned in running]
        for spawned in running:
            spawned.finish()
    return reports


def _quiet(vfiod: VfiodProcess, what: str) -> None:
    """No lease left, every device back on its driver."""
    vfiod.wait_for(lambda: not vfiod.state().get("leases"), f"{what}: every lease freed", 30)
    vfiod.wait_for(lambda: not vfiod.fd_store, f"{what}: the fd store empty", 10)
    for address, driver in ((NIC, "e1000e"), (E1000_A, "e1000"), (SATA, "ahci")):
        vfiod.wait_for(functools.partial(_on, vfiod, str(address), driver), f"{what}: {address}")


def _on(vfiod: VfiodProcess, address: str, driver: str) -> bool:
    return vfiod.driver(address) == driver


def test_fuzz_the_bus_api(vfiod: VfiodProcess, private_bus: PrivateBus) -> None:
    run_seed = seed()
    print(f"fuzz seed {run_seed} (repeat with {SEED_VARIABLE}={run_seed})")
    tag = f"[{SEED_VARIABLE}={run_seed}]"
    allowed = sorted((contract_errors() - {"org.vfiod1.Error.Failed"}) | BUS_ERRORS)
    nobody = Clients(private_bus, NOBODY)
    root = Clients(private_bus, 0)
    users = {NOBODY: nobody, 0: root}

    # Warm-up: the first calls fill vfiod's caches; then the baseline.
    warm = _run(vfiod, [(nobody, [str(run_seed ^ 0xFFFF), str(WARM_UP), json.dumps(allowed)])])
    _quiet(vfiod, "after the warm-up")
    fds_before = vfiod.fds()
    rss_before = rss(vfiod.pid)

    started = time.monotonic()
    plan = [
        (users[uid], [str(run_seed + i), str(calls), json.dumps(allowed)])
        for i, (_, uid, calls) in enumerate(CLIENTS)
    ]
    reports = _run(vfiod, plan)
    took = time.monotonic() - started
    names: Counter[str] = Counter()
    for report in [*warm, *reports]:
        names.update(report["names"])
    total = sum(r["calls"] for r in reports)
    print(
        f"{total} calls in {took:.1f} s from {len(reports)} clients; "
        f"{sum(r['granted'] for r in reports)} leases granted; answers: {dict(names)}"
    )
    for (label, _, _), report in zip(CLIENTS, reports, strict=True):
        print(
            f"  {label}: {report['calls']} calls in {report['seconds']:.1f} s "
            f"(most time in: {', '.join(report['slowest'])})"
        )

    unexpected = [u for r in [*warm, *reports] for u in r["unexpected"]]
    assert unexpected == [], f"{tag} answers outside the contract:\n" + "\n".join(unexpected)
    client_side = {n: c for n, c in names.items() if n.startswith("client:")}
    assert client_side == {}, f"{tag} the fuzzer built calls sdbus refused: {client_side}"
    assert total >= 2500, tag
    assert names["ok"] > 0, tag
    assert names["org.vfiod1.Error.InvalidArgument"] > 0, tag

    # Still there, still working.
    _quiet(vfiod, tag)
    connection = private_bus.connect()
    with Client(connection) as client:
        ping = connection.new_method_call_message("org.vfiod1", MANAGER_PATH, PEER, "Ping")
        connection.call(ping)
        lease = client.acquire([str(NIC)], managed=True)
        lease.close()
        client.release(lease)
    _quiet(vfiod, tag)
    log = vfiod.log()
    assert "Traceback" not in log, f"{tag}\n{log[-5000:]}"
    assert "bug:" not in log, f"{tag}\n{log[-5000:]}"

    # Back to what it held before.
    settle(vfiod, fds_before, f"{tag} after the fuzzing")
    growth = rss(vfiod.pid) - rss_before
    print(f"RSS {rss_before >> 20} MB before, {growth / (1 << 20):+.1f} MB after")
    assert growth <= RSS_SLACK, f"{tag} vfiod's RSS grew by {growth >> 20} MB"
    assert vfiod.process is not None
    assert vfiod.process.poll() is None, tag
