"""Every fd that reaches vfiod in a call is closed again, whatever the call
carried and however it ended; a forged fd index is refused before anything
is duplicated; every error a vfiod method answers is one of the contract's;
and vfiod has no fd limit below the kernel's (nothing of it uses select(2)).

Calls come from uid 65534 (sdbus messages built by hand: options with fds
nested in arrays, structs, dicts and variants) and from a raw client that
writes D-Bus messages byte by byte (fd indexes past the fds a message
carries, which sdbus cannot build)."""

from __future__ import annotations

import asyncio
import configparser
import os
import re
import resource
import struct
import time
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import sdbus

from tests.bus import NAME, PROJECT, PrivateBus
from tests.bus.test_bus_policy import (
    DESTINATION,
    ERROR,
    ERROR_NAME,
    INTERFACE,
    MEMBER,
    METHOD_RETURN,
    PATH,
    SIGNATURE,
    UNIX_FDS,
    RawClient,
    RawMessage,
)
from tests.bus.vfiod import HOLD_MANY, NOBODY_ANY_POLICY, Clients, VfiodProcess, run_vfiod
from tests.fakehost import E1000_A, NIC, SATA
from vfiod.bus.checked import complete_types
from vfiod.client import Client

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

MANAGER_PATH = "/org/vfiod1"
MANAGER = "org.vfiod1.Manager"
LEASE = "org.vfiod1.Lease"
UNIT = PROJECT / "systemd/vfiod.service.in"


def contract_errors() -> frozenset[str]:
    """The org.vfiod1.Error.* names of dbus/org.vfiod1.xml (Failed included)."""
    text = (PROJECT / "dbus/org.vfiod1.xml").read_text()
    listed = re.search(r"org\.vfiod1\.Error\.\{([^}]*)\}", text)
    assert listed is not None
    names = {n.strip() for n in listed.group(1).replace("\n", " ").split(",")}
    assert "org.vfiod1.Error.Failed" in text
    return frozenset("org.vfiod1.Error." + n for n in names | {"Failed"})


def settle(vfiod: VfiodProcess, baseline: list[str], what: str) -> None:
    """Wait until the daemon holds no fd beyond ``baseline`` (received fds
    close when the call ends; the message that carried them a moment later)."""
    vfiod.wait_for(
        lambda: not Counter(vfiod.fds()) - Counter(baseline),
        f"{what}: the daemon closing every fd it received "
        f"(left open: {sorted((Counter(vfiod.fds()) - Counter(baseline)).elements())})",
        timeout=5.0,
    )


# -- a D-Bus marshaller for the raw client: 'h' values are fd indexes as given

_FIXED = {
    "y": "B",
    "b": "I",
    "n": "h",
    "q": "H",
    "i": "i",
    "u": "I",
    "x": "q",
    "t": "Q",
    "d": "d",
    "h": "I",
}
_ALIGN = {**{k: struct.calcsize(v) for k, v in _FIXED.items()}, "s": 4, "o": 4, "g": 1}
_ALIGN |= {"a": 4, "(": 8, "{": 8, "v": 1}


def _put(buffer: bytearray, kind: str, value: Any) -> None:
    buffer.extend(bytes(-len(buffer) % _ALIGN[kind[0]]))
    code = kind[0]
    if code in _FIXED:
        buffer += struct.pack("<" + _FIXED[code], value)
    elif code in "so":
        data = value.encode()
        buffer += struct.pack("<I", len(data)) + data + b"\0"
    elif code == "g":
        buffer += bytes([len(value)]) + value.encode() + b"\0"
    elif code == "v":
        inner, item = value
        _put(buffer, "g", inner)
        _put(buffer, inner, item)
    elif code == "(":
        for part, item in zip(complete_types(kind[1:-1]), value, strict=True):
            _put(buffer, part, item)
    else:
        assert code == "a", kind
        element = kind[1:]
        at = len(buffer)
        buffer += bytes(4)
        buffer.extend(bytes(-len(buffer) % _ALIGN[element[0]]))
        start = len(buffer)
        if element[0] == "{":  # a dict, or a list of pairs (to repeat a key)
            key, item = complete_types(element[1:-1])
            for k, v in value.items() if isinstance(value, dict) else value:
                _put(buffer, "(" + key + item + ")", (k, v))
        else:
            for item in value:
                _put(buffer, element, item)
        struct.pack_into("<I", buffer, at, len(buffer) - start)


def marshal_body(signature: str, *args: Any) -> bytes:
    body = bytearray()
    for kind, value in zip(complete_types(signature), args, strict=True):
        _put(body, kind, value)
    return bytes(body)


def raw_call(
    client: RawClient,
    path: str,
    interface: str,
    member: str,
    signature: str,
    args: Sequence[Any],
    fds: Sequence[int] = (),
) -> RawMessage:
    fields: dict[int, str | int] = {
        PATH: path,
        INTERFACE: interface,
        MEMBER: member,
        DESTINATION: NAME,
    }
    if signature:
        fields[SIGNATURE] = signature
    if fds:
        fields[UNIX_FDS] = len(fds)
    return client.call(fields, marshal_body(signature, *args), list(fds))


# -- 1. fds nested anywhere in the options


NESTED_CLIENT = """\
import sdbus

NIC, SATA, E1000_A = sys.argv[1], sys.argv[2], sys.argv[3]
bus = vfiod.bus
memfd = os.memfd_create("guest-ram")
os.ftruncate(memfd, 1 << 20)
me = os.pidfd_open(os.getpid())

def raw(path, interface, member, signature, *args):
    message = bus.new_method_call_message("org.vfiod1", path, interface, member)
    if signature:
        message.append_data(signature, *args)
    try:
        reply = bus.call(message)
    except sdbus.SdBusUnmappedMessageError as e:
        return e.args[0]
    except sdbus.DbusFailedError as e:
        return e.dbus_error_name
    contents = reply.get_contents()
    del reply, message  # the fds they hold keep a lease draining
    if member == "Acquire":
        for fd in contents[1].values():
            os.close(fd)
        vfiod.release(contents[0])
        while vfiod.inventory().devices[args[0][0]].lease != "/":
            time.sleep(0.01)  # free once vfiod's copies left the fd store
    return "ok"

lease = vfiod.acquire([NIC], managed=True)
lease.close()
m, p = memfd, me
CASES = {
    "ah": ("CheckAccess", "asa{sv}", [NIC], {"x": ("ah", [m, m, m])}),
    "a{sh}": ("CheckAccess", "asa{sv}", [NIC], {"x": ("a{sh}", {"a": m, "b": p})}),
    "a{hs}": ("CheckAccess", "asa{sv}", [NIC], {"x": ("a{hs}", {m: "a"})}),
    "v(h)": ("CheckAccess", "asa{sv}", [NIC], {"x": ("v", ("h", m))}),
    "(hh)": ("CheckAccess", "asa{sv}", [NIC], {"x": ("(hh)", (m, p))}),
    "v(v(ah))": ("CheckAccess", "asa{sv}", [NIC], {"x": ("v", ("v", ("ah", [m, p])))}),
    "aa{sv}": ("CheckAccess", "asa{sv}", [NIC], {"x": ("aa{sv}", [{"y": ("h", m)}])}),
    "owner-pidfd ah": ("CheckAccess", "asa{sv}", [NIC], {"owner-pidfd": ("ah", [p, p])}),
    "owner-pidfd v": ("Acquire", "asa{sv}", [NIC], {"owner-pidfd": ("v", ("h", p))}),
    "unknown key": ("CheckAccess", "asa{sv}", [NIC], {"owner-pidfd": ("h", p), "x": ("h", m)}),
    "wrong type": (
        "Acquire", "asa{sv}", [NIC], {"owner-pidfd": ("h", p), "label": ("ah", [m])}
    ),
    "bad backend": (
        "Acquire", "asa{sv}", [NIC], {"owner-pidfd": ("h", p), "backend": ("s", "x")}
    ),
    "refused": ("Acquire", "asa{sv}", [SATA], {"owner-pidfd": ("h", p), "z": ("ah", [m])}),
    "not found": ("Acquire", "asa{sv}", ["0000:00:1e.0"], {"owner-pidfd": ("h", p)}),
    "not viable": ("Acquire", "asa{sv}", [E1000_A], {"owner-pidfd": ("h", p), "label": ("s", "x")}),
    "check ok": ("CheckAccess", "asa{sv}", [NIC, SATA], {"owner-pidfd": ("h", p)}),
    "granted": ("Acquire", "asa{sv}", [E1000_A], {"owner-pidfd": ("h", p), "managed": ("b", True)}),
    "map nested": (
        "MapDma", "httta{sv}", m, 0, 4096, 0, {"x": ("ah", [m, m]), "y": ("v", ("(h)", (p,)))}
    ),
    "map unknown": ("MapDma", "httta{sv}", m, 0, 4096, 0, {"owner-pidfd": ("h", p)}),
    "map bad size": ("MapDma", "httta{sv}", m, 0, 12345, 0, {}),
    "map too much": ("MapDma", "httta{sv}", m, 0, 64 << 20, 0, {"allocate-iova": ("b", True)}),
}
say(sorted(CASES))
for line in sys.stdin:
    name, rounds = line.split("|")
    if name == "end":
        break
    member, signature, *args = CASES[name]
    path = lease.path if member == "MapDma" else "/org/vfiod1"
    interface = "org.vfiod1.Lease" if member == "MapDma" else "org.vfiod1.Manager"
    started = time.monotonic()
    answers = sorted({raw(path, interface, member, signature, *args) for _ in range(int(rounds))})
    say([answers, time.monotonic() - started])
vfiod.release(lease)
say("released")
"""

NESTED_EXPECTED = {
    "check ok": ["ok"],
    "granted": ["ok"],
    "refused": ["org.vfiod1.Error.InvalidArgument"],  # the unknown key, before the policy
    "not found": ["org.vfiod1.Error.NotFound"],
    "not viable": ["org.vfiod1.Error.NotViable"],
    "map too much": ["org.vfiod1.Error.PermissionDenied"],
}


def test_fds_nested_anywhere_in_a_call_are_closed(vfiod: VfiodProcess, nobody: Clients) -> None:
    """Whatever shape the options take, and whether the call is granted,
    refused or fails on an option, vfiod closes every fd the call carried:
    the broker keeps its own dup of what it keeps."""
    rounds = 20
    before = vfiod.fds()
    client = nobody.spawn(NESTED_CLIENT, str(NIC), str(SATA), str(E1000_A))
    try:
        cases = client.read()
        baseline = vfiod.fds()  # the client's lease holds its container and group
        leaked = {}
        for case in cases:
            client.send(f"{case}|{rounds}")
            answers, took = client.read()
            print(f"{case}: {rounds} calls in {took:.2f} s")
            assert answers == NESTED_EXPECTED.get(case, ["org.vfiod1.Error.InvalidArgument"]), (
                case,
                vfiod.log()[-2000:],
            )
            try:
                settle(vfiod, baseline, case)
            except AssertionError as e:
                print(e)
                leaked[case] = len(vfiod.fds()) - len(baseline)
                baseline = vfiod.fds()
        client.send("end|0")
        assert client.read() == "released"
        client.finish()
    finally:
        if client.process.returncode is None:
            client.kill()
    assert leaked == {}, f"fds left open in the daemon after {rounds} calls, by case: {leaked}"
    settle(vfiod, before, "the end")


# -- 2. fd indexes past the fds a message carries


def _lease_for_root(vfiod: VfiodProcess) -> tuple[Client, str]:
    root = Client(vfiod.bus.connect())
    lease = root.acquire([str(NIC)], managed=True)
    lease.close()
    return root, lease.path


def test_a_forged_fd_index_or_a_repeated_key_is_refused_and_nothing_leaks(
    vfiod: VfiodProcess,
) -> None:
    """sdbus duplicates each fd as it parses a call's arguments and, when a
    later index is forged, drops the duplicates made so far: vfiod checks the
    whole message first (reading each fd without duplicating it) and refuses
    it with InvalidArgument before sdbus parses it. A dict with a key twice
    is refused too: sdbus would drop the first value and any fd in it."""
    rounds = 50
    root, lease = _lease_for_root(vfiod)
    memfd = os.memfd_create("raw-client", os.MFD_CLOEXEC)
    os.ftruncate(memfd, 1 << 20)
    pidfd = os.pidfd_open(os.getpid())
    client = RawClient(str(vfiod.bus.socket_path))
    try:
        twice = [("owner-pidfd", ("h", 0)), ("owner-pidfd", ("h", 1))]
        forged: list[tuple[str, str, str, str, list[Any], int]] = [
            (
                "CheckAccess",
                MANAGER_PATH,
                MANAGER,
                "asa{sv}",
                [[str(NIC)], {"a": ("h", 0), "b": ("h", 1), "c": ("h", 9)}],
                2,
            ),
            (
                "Acquire",
                MANAGER_PATH,
                MANAGER,
                "asa{sv}",
                [[str(NIC)], {"owner-pidfd": ("h", 0), "x": ("v", ("ah", [0, 1, 2]))}],
                2,
            ),
            (
                "MapDma memfd",
                lease,
                LEASE,
                "httta{sv}",
                [5, 0, 4096, 0, {"x": ("h", 0)}],
                1,
            ),
            (
                "MapDma options",
                lease,
                LEASE,
                "httta{sv}",
                [0, 0, 4096, 0, {"x": ("(hh)", (0, 0xFFFFFFFF))}],
                1,
            ),
            # A key given twice: sdbus would keep the second value and drop
            # the first, fds and all.
            ("Acquire twice", MANAGER_PATH, MANAGER, "asa{sv}", [[str(NIC)], twice], 2),
            (
                "CheckAccess twice nested",
                MANAGER_PATH,
                MANAGER,
                "asa{sv}",
                [[], {"x": ("v", ("aa{sh}", [[("a", 0), ("b", 1), ("a", 1)]]))}],
                2,
            ),
            (
                "MapDma twice",
                lease,
                LEASE,
                "httta{sv}",
                [0, 0, 4096, 0, [("x", ("s", "")), ("x", ("h", 0))]],
                1,
            ),
        ]
        baseline = vfiod.fds()
        leaked = {}
        for name, path, interface, signature, args, nfds in forged:
            fds = [memfd] * nfds
            for _ in range(rounds):
                reply = raw_call(client, path, interface, name.split()[0], signature, args, fds)
                assert reply.kind == ERROR, name
                assert reply.fields[ERROR_NAME] == "org.vfiod1.Error.InvalidArgument", (
                    name,
                    reply.fields[ERROR_NAME],
                    reply.first_string(),
                )
            assert ("given twice" if "twice" in name else "EBADMSG") in reply.first_string(), (
                reply.first_string()
            )
            try:
                settle(vfiod, baseline, name)
            except AssertionError:
                leaked[name] = len(vfiod.fds()) - len(baseline)
                baseline = vfiod.fds()
        # The same calls done right are answered: the refusals were the indexes'.
        checked = raw_call(
            client,
            MANAGER_PATH,
            MANAGER,
            "CheckAccess",
            "asa{sv}",
            [[str(NIC)], {"owner-pidfd": ("h", 0), "managed": ("b", True)}],
            [pidfd],
        )
        assert checked.kind == METHOD_RETURN, checked.first_string()
        good = raw_call(client, lease, LEASE, "MapDma", "httta{sv}", [0, 0, 4096, 0, {}], [memfd])
        assert good.kind == METHOD_RETURN, good.first_string()
        assert struct.unpack("<Q", good.body) == (0,)
        assert leaked == {}, f"fds leaked in the daemon by {rounds} forged calls: {leaked}"
    finally:
        client.close()
        os.close(memfd)
        os.close(pidfd)
        root.release(lease)
        root.close()
    assert "Traceback" not in vfiod.log()


def test_calls_are_read_without_duplicating_their_fds(private_bus: PrivateBus) -> None:
    """The check reads sdbus's own messages through the sd_bus_message* it
    finds after PyObject_HEAD: the same member and signature sdbus sees,
    every value read, no fd duplicated, and the message rewound for sdbus."""
    from vfiod.bus.checked import MessageCheck, message_pointer, sd_bus  # noqa: PLC0415

    connection = private_bus.connect()
    memfd = os.memfd_create("check", os.MFD_CLOEXEC)
    try:
        message = connection.new_method_call_message(NAME, MANAGER_PATH, MANAGER, "Acquire")
        options = {
            "owner-pidfd": ("h", memfd),
            "x": ("v", ("a{sv}", {"y": ("ah", [memfd, memfd])})),
            "label": ("s", "vm"),
        }
        message.append_data("asa{sv}", [str(NIC)], options)
        message.seal()
        pointer = message_pointer(message)
        assert sd_bus().get_member(pointer) == b"Acquire"
        assert sd_bus().get_signature(pointer, 1) == b"asa{sv}"
        check = MessageCheck.of("asa{sv}")
        assert check is not None
        fds = sorted(os.listdir("/proc/self/fd"), key=int)
        for _ in range(3):
            assert check.refusal(message) is None
        assert sorted(os.listdir("/proc/self/fd"), key=int) == fds
        devices, parsed = message.parse_to_tuple()  # rewound: sdbus reads it all
        assert devices == [str(NIC)]
        received = [parsed["owner-pidfd"][1], *parsed["x"][1][1]["y"][1]]
        for fd in received:
            os.close(fd)
        assert len(received) == 3
    finally:
        os.close(memfd)
        connection.close()


# -- 3. error names


class _Broken:
    """A BusBackend whose methods fail as vfiod's own bugs would."""

    version = "0"
    backends = ("legacy",)
    no_iommu_mode = False

    async def check_access(self, devices: list[str], options: Any) -> Any:
        raise KeyError("internal detail")

    async def reload_policy(self) -> None:
        from vfiod.errors import BrokerError  # noqa: PLC0415

        raise BrokerError("a BrokerError itself")

    async def release(self, lease: str) -> None:
        from vfiod.errors import Busy  # noqa: PLC0415

        raise Busy("held")


def test_every_error_a_method_answers_is_the_contracts(
    private_bus: PrivateBus, caplog: pytest.LogCaptureFixture
) -> None:
    """A bug (any exception but a refusal) answers org.vfiod1.Error.Failed,
    not sdbus's org.freedesktop.DBus.Error.Failed; refusals keep their names.
    (The methods name their errors themselves: register_errors, which maps
    the names for sdbus in the whole process, and would turn this process's
    vfiod.client errors into vfiod.errors classes, is not needed.)"""
    from vfiod.bus.interfaces import Manager  # noqa: PLC0415

    texts: list[str] = []

    async def run() -> dict[str, str]:
        server = private_bus.connect()
        caller = private_bus.connect()
        manager = Manager(_Broken())  # type: ignore[arg-type]
        names: dict[str, str] = {}
        try:
            with manager.export_to_dbus(MANAGER_PATH, server):
                await server.request_name_async(NAME, 0)
                for member, signature, args in (
                    ("CheckAccess", "asa{sv}", ([], {})),
                    ("ReloadPolicy", "", ()),
                    ("Release", "o", ("/org/vfiod1/lease/x",)),
                ):
                    message = caller.new_method_call_message(NAME, MANAGER_PATH, MANAGER, member)
                    if signature:
                        message.append_data(signature, *args)
                    try:
                        await caller.call_async(message)
                    except Exception as e:  # the name is what matters
                        names[member] = error_name(e)
                        texts.append(str(e))
        finally:
            caller.close()
            server.close()
        return names

    names = asyncio.run(run())
    assert "bug: ManagerInterface.check_access failed" in caplog.text
    assert "internal detail" in caplog.text  # the traceback, in the log only
    caplog.clear()  # its traceback holds the connections
    assert not [t for t in texts if "internal detail" in t]
    assert names == {
        "CheckAccess": "org.vfiod1.Error.Failed",
        "ReloadPolicy": "org.vfiod1.Error.Failed",
        "Release": "org.vfiod1.Error.Busy",
    }


class _Vanishing:
    """A BusBackend whose Release unexports the object (as a lease freed in
    the middle of other calls on it) and whose Acquire never ends."""

    version = "0"
    backends = ("legacy",)
    no_iommu_mode = False

    def __init__(self) -> None:
        self.stop: Any = None

    async def release(self, lease: str) -> None:
        self.stop()

    async def acquire(self, devices: list[str], options: Any) -> Any:
        await asyncio.Event().wait()


def test_a_call_whose_object_goes_away_is_answered(private_bus: PrivateBus) -> None:
    """sdbus cancels the calls in flight on an object it unexports, and
    sends nothing: the callers waited 25 s for their timeout. A call
    queued behind the one that unexports it is cancelled before it even
    starts; one already running is cancelled where it waits."""
    from vfiod.bus.interfaces import Manager  # noqa: PLC0415

    async def run() -> list[str]:
        server = private_bus.connect()
        caller = private_bus.connect()
        backend = _Vanishing()
        manager = Manager(backend)  # type: ignore[arg-type]
        names: list[str] = []

        def call(member: str, signature: str = "", *args: Any) -> asyncio.Future[Any]:
            message = caller.new_method_call_message(NAME, MANAGER_PATH, MANAGER, member)
            if signature:
                message.append_data(signature, *args)
            return asyncio.ensure_future(caller.call_async(message))

        try:
            handle = manager.export_to_dbus(MANAGER_PATH, server)
            backend.stop = handle.stop
            await server.request_name_async(NAME, 0)
            running = call("Acquire", "asa{sv}", [], {})
            await asyncio.sleep(0.2)
            # Sent back to back and read in one go (the loop is held while the
            # bus delivers them): the Release runs first, the Acquire's task
            # is cancelled before it starts.
            calls = [call("Release", "o", "/x"), call("Acquire", "asa{sv}", [], {}), running]
            time.sleep(0.5)
            for pending in calls:
                try:
                    await asyncio.wait_for(pending, 5)  # sd-bus's own timeout is 25 s
                    names.append("ok")
                except Exception as e:  # the name is what matters
                    names.append(error_name(e))
        finally:
            caller.close()
            server.close()
        return names

    assert asyncio.run(run()) == ["ok", "org.vfiod1.Error.NotFound", "org.vfiod1.Error.NotFound"]


def error_name(e: Exception) -> str:
    """The D-Bus name of an error reply as sdbus raised it: its own classes
    carry dbus_error_name; classes mapped by register_errors are vfiod's."""
    from sdbus.sd_bus_internals import EXCEPTION_TO_DBUS_ERROR  # noqa: PLC0415

    if isinstance(e, sdbus.SdBusUnmappedMessageError):
        return str(e.args[0])
    mapped = EXCEPTION_TO_DBUS_ERROR.get(type(e))
    if mapped is not None:
        return str(mapped)
    return str(getattr(e, "dbus_error_name", type(e).__name__))


# -- 4. no fd limit below the kernel's


def test_the_unit_allows_the_fds_the_fd_store_needs() -> None:
    """systemd keeps a copy of every fd vfiod holds for its leases (up to
    FileDescriptorStoreMax): vfiod holds as many itself, gets them all back
    at once after a restart, and needs room for the calls in flight and its
    own (bus, udev, journal, epoll) besides."""
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string(UNIT.read_text())
    service = unit["Service"]
    store = int(service["FileDescriptorStoreMax"])
    limit = int(service["LimitNOFILE"])
    assert store >= 3 * 10_000, "10,000 leases with a container, a group and an owner pidfd"
    assert limit >= 2 * store + 4096, (limit, store)


def test_owner_processes_are_watched_past_fd_1024() -> None:
    """select(2) cannot take an fd >= 1024 (Python raises ValueError), and a
    daemon with many leases holds that many."""
    from vfiod.host.process import exited, owner_process  # noqa: PLC0415

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 2048:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < 2048")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 2048), hard))
    pidfd = os.pidfd_open(os.getpid())
    high = -1
    try:
        high = os.dup2(pidfd, 1500)
        assert exited(high) is False
        assert owner_process(high).pid == os.getpid()
    finally:
        os.close(pidfd)
        if high >= 0:
            os.close(high)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_nothing_in_vfiod_uses_select() -> None:
    """select.select and select.poll() on the same fds: only poll works for
    every fd number. (vfiod/cli.py's vfioctl only ever watches its stdin.)"""
    offenders = []
    for path in sorted((PROJECT / "vfiod").rglob("*.py")):
        if path.name == "cli.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"\bselect\.select\(|\bselectors\.SelectSelector", line):
                offenders.append(f"{path.relative_to(PROJECT)}:{number}")
    assert offenders == []


# -- the contract's error names, for the fuzzer too


def test_the_contract_lists_its_errors() -> None:
    names = contract_errors()
    assert "org.vfiod1.Error.InvalidArgument" in names
    assert "org.vfiod1.Error.Failed" in names
    contract = ET.parse(PROJECT / "dbus/org.vfiod1.xml").getroot()
    assert {i.get("name") for i in contract.iter("interface")} >= {MANAGER, LEASE}


def test_more_than_1024_fds_of_leases_and_new_clients_still_work(
    private_bus: PrivateBus, tmp_path: Path, nobody: Clients
) -> None:
    """vfiod started with a soft fd limit of 1024 (systemd's default for a
    service without LimitNOFILE) holds the container and group fds of 560
    leases — over 1,100 fds — and a new client's calls still work: vfiod
    raises its soft limit to the hard one, and waits with poll(2)."""
    leases = 560
    with run_vfiod(
        private_bus,
        tmp_path / "vfiod",
        NOBODY_ANY_POLICY,
        f"scale:{2 * leases + 2}",
        soft_fd_limit=1024,
    ) as daemon:
        holder = nobody.spawn(HOLD_MANY, str(leases))
        try:
            assert holder.read(timeout=120) == "held"
            held = daemon.fds()
            assert len(held) > 2 * leases > 1024, len(held)
            assert held.count("anon_inode:[pidfd]") <= 1
            # A new connection's first calls: credentials, CheckAccess, a lease.
            code = """\
from tests.fakehost import scale_address
device = str(scale_address(2 * int(sys.argv[1])))
access = vfiod.check_access([device])
lease = vfiod.acquire([device], backend="legacy")
names = sorted(lease.fds)
lease.close()
vfiod.release(lease)
say([access[0].allowed, names])
"""
            allowed, fds = nobody.run(code, str(leases))  # the one group left
            assert allowed is True
            group = f"group:{leases + 100}"  # (a scale host's groups start at 100)
            assert [f for f in fds if not f.startswith("device:")] == ["container", group], fds
            holder.send()
            holder.finish()
        finally:
            if holder.process.poll() is None:
                holder.kill()
        daemon.wait_for(lambda: daemon.state().get("leases") == {}, "every lease ending", 30)
