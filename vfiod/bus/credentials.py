"""Who is calling: from the bus's own credentials, never from arguments."""

from __future__ import annotations

import dataclasses
import grp
import os
import pwd
from collections.abc import Callable
from typing import Any

from sdbus import DbusInterfaceCommonAsync, dbus_method_async, dbus_signal_async

from vfiod.errors import PermissionDenied
from vfiod.host.process import exited
from vfiod.policy.model import Caller


class BusDriver(DbusInterfaceCommonAsync, interface_name="org.freedesktop.DBus"):
    """The few bus driver methods and signals vfiod needs."""

    @dbus_method_async(input_signature="s", result_signature="a{sv}")
    async def get_connection_credentials(self, name: str) -> dict[str, tuple[str, Any]]:
        raise NotImplementedError  # answered by the bus

    @dbus_method_async(input_signature="s", result_signature="b")
    async def name_has_owner(self, name: str) -> bool:
        raise NotImplementedError  # answered by the bus

    @dbus_signal_async("sss")
    def name_owner_changed(self) -> tuple[str, str, str]:
        raise NotImplementedError  # emitted by the bus


def _name(lookup: Callable[[int], Any], key: int) -> str | None:
    try:
        return str(lookup(key)[0])
    except KeyError:
        return None


def systemd_unit(pid: int, proc: str = "/proc") -> tuple[str | None, tuple[str, ...]]:
    """The systemd unit and the slices a process runs in, from its cgroup."""
    try:
        with open(os.path.join(proc, str(pid), "cgroup")) as f:
            lines = f.read().splitlines()
    except OSError:
        return None, ()
    path = next((line.split(":", 2)[2] for line in lines if line.startswith("0::")), "")
    parts = [p for p in path.split("/") if p]
    slices = tuple(p for p in parts if p.endswith(".slice"))
    units = [p for p in parts if p.endswith((".service", ".scope"))]
    return (units[-1] if units else None), slices


def pinned_unit(pid: int, proc: str = "/proc") -> tuple[str | None, tuple[str, ...]]:
    """The unit and slices of ``pid``, read while a pidfd pins that process
    and only believed if it is still the same live process afterwards: a pid
    reused by another process must not lend the caller its unit. A caller
    whose process is gone (its connection handed on) gets no unit."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return None, ()
    try:
        found = systemd_unit(pid, proc)
        if exited(pidfd):
            return None, ()
        return found
    finally:
        os.close(pidfd)


@dataclasses.dataclass(frozen=True)
class Credentials:
    caller: Caller
    pid: int | None  # at connection time; for audit, not for decisions


def caller_from(credentials: dict[str, tuple[str, Any]], proc: str = "/proc") -> Credentials:
    """Credentials as GetConnectionCredentials returns them."""
    if "UnixUserID" not in credentials:
        raise PermissionDenied("the bus gave no uid for this connection; vfiod cannot decide")
    uid = int(credentials["UnixUserID"][1])
    gids = tuple(int(g) for g in credentials.get("UnixGroupIDs", ("au", []))[1])
    pid = int(credentials["ProcessID"][1]) if "ProcessID" in credentials else None
    unit, slices = pinned_unit(pid, proc) if pid is not None else (None, ())
    caller = Caller(
        uid=uid,
        user=_name(pwd.getpwuid, uid),
        gids=gids,
        groups=tuple(n for n in (_name(grp.getgrgid, g) for g in gids) if n is not None),
        unit=unit,
        slices=slices,
    )
    return Credentials(caller, pid)


class Callers:
    """Credentials per unique bus name. A connection's credentials are fixed
    when it connects, so each is asked for once and forgotten when the name
    goes away."""

    def __init__(self, bus_driver: BusDriver, proc: str = "/proc") -> None:
        self.bus_driver = bus_driver
        self.proc = proc
        self._known: dict[str, Credentials] = {}

    async def of(self, sender: str | None) -> Credentials:
        if not sender:
            raise PermissionDenied("the call carries no sender; call vfiod over the system bus")
        known = self._known.get(sender)
        if known is None:
            raw = await self.bus_driver.get_connection_credentials(sender)
            known = caller_from(raw, self.proc)
            self._known[sender] = known
        return known

    def forget(self, sender: str) -> None:
        self._known.pop(sender, None)
