"""vfiod.qmp's framing against a scripted peer on a socketpair: what it
sends, what it keeps, how it fails. (Against a real QEMU: tests/bus/test_hotplug.py.)"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
from collections.abc import Callable, Iterator

import pytest

from vfiod import hotplug, qmp

GREETING = {"QMP": {"version": {"qemu": {"major": 10, "minor": 0, "micro": 2}}, "capabilities": []}}

Script = Callable[[socket.socket], None]


def _line(sock: socket.socket, value: object) -> None:
    sock.sendall(json.dumps(value).encode() + b"\n")


def _request(sock: socket.socket) -> tuple[dict[str, object], list[int]]:
    data, fds, _flags, _addr = socket.recv_fds(sock, 65536, 4)
    return json.loads(data), fds


class Peer:
    """A QMP peer on the other end that runs ``script`` in a thread."""

    def __init__(self, script: Script) -> None:
        self.ours, self.theirs = socket.socketpair()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(script,))
        self.thread.start()

    def _run(self, script: Script) -> None:
        try:
            script(self.theirs)
        except BaseException as e:  # reported by close()
            self.error = e
        finally:
            self.theirs.close()

    def close(self) -> None:
        self.ours.close()
        self.thread.join(10)
        if self.error is not None:
            raise self.error


@pytest.fixture
def peer() -> Iterator[Callable[[Script], qmp.Qmp]]:
    peers: list[Peer] = []

    def start(script: Script) -> qmp.Qmp:
        p = Peer(script)
        peers.append(p)
        return qmp.Qmp(p.ours)

    yield start
    for p in peers:
        p.close()


def _negotiated(sock: socket.socket) -> None:
    _line(sock, GREETING)
    request, _ = _request(sock)
    assert request["execute"] == "qmp_capabilities"
    _line(sock, {"return": {}, "id": request["id"]})


def test_negotiate_and_events_kept_while_a_command_runs(peer: Callable[[Script], qmp.Qmp]) -> None:
    def script(sock: socket.socket) -> None:
        _negotiated(sock)
        request, _ = _request(sock)
        assert request == {"execute": "device_del", "arguments": {"id": "d0"}, "id": "vfiod-2"}
        _line(sock, {"return": {}, "id": "stale"})  # an earlier command's late answer
        _line(sock, {"event": "DEVICE_DELETED", "data": {"device": "other"}})
        _line(sock, {"return": {}, "id": request["id"]})
        _line(sock, {"event": "DEVICE_DELETED", "data": {"device": "d0"}})

    session = peer(script)
    assert session.negotiate(5) == "10.0.2"
    assert session.execute("device_del", {"id": "d0"}) == {}
    assert [e["data"] for e in session.events] == [{"device": "other"}]
    got = session.wait_event("DEVICE_DELETED", lambda d: d.get("device") == "d0", 5)
    assert got["data"] == {"device": "d0"}
    # The other one stays for whoever waits for it.
    assert session.wait_event("DEVICE_DELETED", lambda d: True, 0.01)["data"] == {"device": "other"}
    with pytest.raises(ConnectionError, match="closed the QMP connection"):
        session.wait_event("DEVICE_DELETED", lambda d: True, 5)


def test_an_event_that_never_comes_times_out(peer: Callable[[Script], qmp.Qmp]) -> None:
    done = threading.Event()

    def script(sock: socket.socket) -> None:
        _negotiated(sock)
        done.wait(10)

    session = peer(script)
    session.negotiate(5)
    with pytest.raises(TimeoutError):
        session.wait_event("DEVICE_DELETED", lambda d: True, 0.2)
    done.set()


def test_error_answers_and_fds_sent_with_a_command(peer: Callable[[Script], qmp.Qmp]) -> None:
    received: list[str] = []

    def script(sock: socket.socket) -> None:
        _negotiated(sock)
        request, fds = _request(sock)
        assert request["arguments"] == {"fdname": "f"}
        for fd in fds:
            received.append(os.readlink(f"/proc/self/fd/{fd}"))
            os.close(fd)
        _line(sock, {"id": request["id"], "error": {"class": "GenericError", "desc": "no"}})

    session = peer(script)
    session.negotiate(5)
    memfd = os.memfd_create("qmp-test")
    try:
        with pytest.raises(qmp.QmpError, match="QMP getfd failed: GenericError: no") as caught:
            session.execute("getfd", {"fdname": "f"}, fds=[memfd])
    finally:
        os.close(memfd)
    assert (caught.value.error_class, caught.value.desc) == ("GenericError", "no")
    assert received == ["/memfd:qmp-test (deleted)"]


@pytest.mark.parametrize(
    ("sent", "error"),
    [
        (b"not json\n", "not JSON"),
        (b"[1, 2]\n", "not an object"),
        (b'{"hello": 1}\n', "expected the QMP greeting"),
        (b"x" * (qmp.MAX_LINE + 70000), "without a newline"),
    ],
)
def test_what_is_not_qmp_is_a_protocol_error(
    peer: Callable[[Script], qmp.Qmp], sent: bytes, error: str
) -> None:
    def script(sock: socket.socket) -> None:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(sent)

    session = peer(script)
    with pytest.raises(qmp.QmpProtocolError, match=error):
        session.negotiate(10)


def test_peer_and_its_pidfd() -> None:
    a, b = socket.socketpair()
    with a, b:
        who = qmp.peer(a)
        assert (who.pid, who.uid, who.gid) == (os.getpid(), os.geteuid(), os.getegid())
        found, pidfd = qmp.peer_pidfd(a)
        try:
            assert found == who
            with open(f"/proc/self/fdinfo/{pidfd}") as info:
                assert f"Pid:\t{os.getpid()}\n" in info.read()
        finally:
            os.close(pidfd)


def test_object_names_carry_the_lease() -> None:
    lease = "0123456789abcdef"
    assert hotplug.object_id(lease) == "vfiod-0123456789abcdef"
    assert hotplug.lease_of_object("/objects/vfiod-0123456789abcdef") == lease
    assert hotplug.lease_of_object("vfiod-0123456789abcdef") == lease
    for foreign in ("/objects/iommufd0", "/objects/vfiod-0123", "/objects/vfiod-0123456789abcdefx"):
        assert hotplug.lease_of_object(foreign) is None
    assert hotplug.default_id("0000:00:10.0") == "vfio-0000_00_10_0"
