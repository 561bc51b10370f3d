"""A small blocking QMP client: commands, events and fd passing.

Our own rather than a library: the QEMU project's ``qemu.qmp`` (PyPI) is
asyncio-only and still pre-1.0, while vfioctl is blocking; hot attach needs
only three things from QMP (commands with an id, events kept while a command
runs, fds sent with a command for ``getfd``), which fit in this module.

The peer of a QMP socket is the QEMU behind it only when QEMU made the socket
(``-qmp unix:PATH,server=on``): ``SO_PEERCRED`` tells who called ``listen()``
or ``socketpair()``. ``peer_pidfd()`` pins that process: with
``SO_PEERPIDFD`` (Linux 6.5) the kernel's own reference, else
``pidfd_open()`` of the pid, checked to be the same uid afterwards.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import struct
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from vfiod.host import process

SO_PEERPIDFD = 77  # <asm-generic/socket.h>, Linux 6.5; Python 3.11 has no name for it
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
MAX_LINE = 16 << 20  # a QMP answer larger than this is not one we asked for

Progress = Callable[[str], None]


def _quiet(line: str) -> None:
    pass


class QmpError(Exception):
    """A command answered ``{"error": {"class": ..., "desc": ...}}``: ``desc``
    is QEMU's own words."""

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        super().__init__(f"QMP {command} failed: {error_class}: {desc}")
        self.command = command
        self.error_class = error_class
        self.desc = desc


class QmpProtocolError(Exception):
    """The other end does not speak QMP (or stopped making sense)."""


@dataclasses.dataclass(frozen=True)
class Peer:
    """The process on the other end of a unix socket, from ``SO_PEERCRED``."""

    pid: int
    uid: int
    gid: int


def connect(path: str, timeout: float) -> socket.socket:
    """A connected socket to QMP at ``path``; OSError names the path."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(timeout)
        sock.connect(path)
    except OSError as e:
        sock.close()
        raise OSError(e.errno, f"cannot connect to QMP at {path}: {e.strerror}") from None
    return sock


def peer(sock: socket.socket) -> Peer:
    pid, uid, gid = _UCRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    )
    return Peer(pid=pid, uid=uid, gid=gid)


def process_uid(pid: int) -> int:
    """The effective uid of process ``pid``, from /proc."""
    found = process.uids(pid)
    if found is None:
        raise ProcessLookupError(pid)
    return found[1]


def peer_pidfd(sock: socket.socket) -> tuple[Peer, int]:
    """The socket's peer and a pidfd of it (the caller's to close)."""
    who = peer(sock)
    if who.pid <= 0:
        raise ProcessLookupError(f"the QMP socket's peer has no pid here (pid {who.pid})")
    try:
        return who, sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD)
    except OSError:
        pass  # older kernel: pin the pid, then check it is still the peer's process
    pidfd = os.pidfd_open(who.pid)
    try:
        if process_uid(who.pid) != who.uid:
            raise ProcessLookupError(f"pid {who.pid} is no longer the QMP socket's peer")
    except BaseException:
        os.close(pidfd)
        raise
    return who, pidfd


def returned(command: str, answer: Mapping[str, Any]) -> Any:
    """The ``return`` of ``command``'s answer; QmpError for an ``error`` one."""
    if "error" in answer:
        error = answer["error"]
        if not isinstance(error, dict):
            raise QmpProtocolError(f"QMP {command}: malformed error {error!r}")
        raise QmpError(command, str(error.get("class", "?")), str(error.get("desc", "")))
    return answer.get("return")


class Qmp:
    """QMP over a connected socket: ``negotiate()`` first, then ``execute()``.

    Events that arrive while a command runs are kept in ``events`` (oldest
    first) until ``wait_event`` takes them. End of file raises ConnectionError;
    silence past a timeout raises TimeoutError."""

    def __init__(self, sock: socket.socket, *, progress: Progress = _quiet) -> None:
        self.sock = sock
        self.progress = progress
        self.greeting: dict[str, Any] = {}
        self.events: list[dict[str, Any]] = []
        self._buffer = bytearray()
        self._next_id = 0

    def _message(self, deadline: float) -> dict[str, Any]:
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("QEMU did not answer on QMP in time")
            if len(self._buffer) > MAX_LINE:
                raise QmpProtocolError(f"QMP sent more than {MAX_LINE} bytes without a newline")
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                continue  # the loop reports it
            if not chunk:
                raise ConnectionError("QEMU closed the QMP connection")
            self._buffer += chunk
        line, _, rest = bytes(self._buffer).partition(b"\n")
        self._buffer[:] = rest
        try:
            message = json.loads(line)
        except ValueError:
            raise QmpProtocolError(f"QMP sent a line that is not JSON: {line[:200]!r}") from None
        if not isinstance(message, dict):
            raise QmpProtocolError(f"QMP sent something that is not an object: {line[:200]!r}")
        return message

    def negotiate(self, timeout: float) -> str:
        """Read the greeting and leave capabilities negotiation; QEMU's version."""
        greeting = self._message(time.monotonic() + timeout)
        if not isinstance(greeting.get("QMP"), dict):
            raise QmpProtocolError(f"expected the QMP greeting, got {str(greeting)[:200]}")
        self.greeting = greeting
        self.execute("qmp_capabilities", timeout=timeout)
        version = greeting["QMP"].get("version", {}).get("qemu", {})
        try:
            return "{major}.{minor}.{micro}".format(**version)
        except (KeyError, TypeError):
            return "?"

    def execute(
        self,
        command: str,
        arguments: Mapping[str, Any] | None = None,
        *,
        fds: Sequence[int] = (),
        timeout: float = 30.0,
    ) -> Any:
        """Run ``command``; its ``return`` value. ``fds`` go with the command
        (SCM_RIGHTS), for ``getfd``; they stay the caller's."""
        self._next_id += 1
        request: dict[str, Any] = {"execute": command, "id": f"vfiod-{self._next_id}"}
        if arguments:
            request["arguments"] = dict(arguments)
        data = json.dumps(request).encode() + b"\n"
        self.sock.settimeout(timeout)
        if fds:
            sent = socket.send_fds(self.sock, [data], list(fds))
            self.sock.sendall(data[sent:])
        else:
            self.sock.sendall(data)
        deadline = time.monotonic() + timeout
        while True:
            message = self._message(deadline)
            if "event" in message:
                self.events.append(message)
                self.progress(f"QMP event {message['event']}")
                continue
            if message.get("id") != request["id"]:
                continue  # an answer to an earlier command that timed out
            return returned(command, message)

    def wait_event(
        self, name: str, match: Callable[[Mapping[str, Any]], bool], timeout: float
    ) -> dict[str, Any]:
        """The first event ``name`` whose data ``match`` accepts, kept or still
        to come; TimeoutError after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            for i, event in enumerate(self.events):
                data = event.get("data", {})
                if event.get("event") == name and isinstance(data, dict) and match(data):
                    return self.events.pop(i)
            message = self._message(deadline)
            if "event" in message:
                self.events.append(message)
                self.progress(f"QMP event {message['event']}")
