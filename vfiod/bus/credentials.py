"""Who is calling: from the bus's own credentials, never from arguments.

The caller's uid and groups are what the bus saw when it connected. Its
systemd unit and slices count only as far as systemd's system manager
vouches for them: a cgroup path is text that whoever owns the cgroup names,
and every user owns a delegated subtree (``user@UID.service``, any unit with
``Delegate=yes``) where it may create ``dpdk-forwarder.service`` or
``machine.slice/vm-1.scope`` and move itself in. So vfiod asks systemd for
the unit of the caller's process (systemd answers with the delegating unit
for anything inside a delegated subtree) and for the slice that unit runs
in; the cgroup path itself is never read. Without a system manager on the
bus nothing is vouched for: the caller has no unit and no slices.
"""

from __future__ import annotations

import dataclasses
import grp
import logging
import os
import pwd
from collections.abc import Callable
from typing import Any, Protocol

from sdbus import (
    DbusInterfaceCommonAsync,
    dbus_method_async,
    dbus_signal_async,
)
from sdbus.exceptions import SdBusBaseError, SdBusUnmappedMessageError
from sdbus.sd_bus_internals import SdBus

from vfiod.errors import PermissionDenied
from vfiod.host.process import exited, real_uid
from vfiod.policy.model import Caller

log = logging.getLogger(__name__)

SYSTEMD = "org.freedesktop.systemd1"
SYSTEMD_PATH = "/org/freedesktop/systemd1"
_NO_SERVICE_MANAGER = "org.freedesktop.DBus.Error.ServiceUnknown"


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


class SystemdManager(DbusInterfaceCommonAsync, interface_name="org.freedesktop.systemd1.Manager"):
    @dbus_method_async(input_signature="u", result_signature="o", method_name="GetUnitByPID")
    async def get_unit_by_pid(self, pid: int) -> str:
        raise NotImplementedError  # answered by systemd


@dataclasses.dataclass(frozen=True)
class VouchedUnit:
    unit: str  # its Id, e.g. "dpdk-forwarder.service"
    slice: str  # the slice it runs in ("" where systemd says none)


class UnitVouchers(Protocol):
    """Who says which systemd unit a process runs in."""

    async def unit_of(self, pid: int) -> VouchedUnit | None: ...


# The unit types that run in a slice, and the interface with their Slice property.
_SLICED = {
    ".service": "Service",
    ".scope": "Scope",
    ".slice": "Slice",
    ".socket": "Socket",
    ".mount": "Mount",
    ".swap": "Swap",
}


async def systemd_property(bus: SdBus, path: str, interface: str, name: str) -> Any:
    """One property of one of systemd's objects."""
    message = bus.new_method_call_message(SYSTEMD, path, "org.freedesktop.DBus.Properties", "Get")
    message.append_data("ss", interface, name)
    reply = await bus.call_async(message)
    _signature, value = reply.get_contents()
    return value


class SystemdUnits:
    """systemd's system manager, over the system bus: the unit it runs the
    process in, and that unit's slice. For a process inside a delegated
    subtree the unit is the delegating one (systemd knows no units below a
    delegation)."""

    def __init__(self, bus: SdBus) -> None:
        self.bus = bus
        self.manager = SystemdManager.new_proxy(SYSTEMD, SYSTEMD_PATH, bus)

    async def unit_of(self, pid: int) -> VouchedUnit | None:
        try:
            path = await self.manager.get_unit_by_pid(pid)
            unit = str(await systemd_property(self.bus, path, f"{SYSTEMD}.Unit", "Id"))
            kind = next((k for suffix, k in _SLICED.items() if unit.endswith(suffix)), None)
            slice_ = (
                ""
                if kind is None
                else await systemd_property(self.bus, path, f"{SYSTEMD}.{kind}", "Slice")
            )
        except SdBusBaseError as e:  # no systemd on this bus, or the process is in no unit
            name = str(
                e.args[0]
                if isinstance(e, SdBusUnmappedMessageError) and e.args
                else getattr(e, "dbus_error_name", "")
            )
            quiet = name in (_NO_SERVICE_MANAGER, f"{SYSTEMD}.NoUnitForPID")
            log.log(
                logging.DEBUG if quiet else logging.WARNING,
                "systemd vouches for no unit of pid %d: %s %s",
                pid,
                type(e).__name__,
                e,
            )
            return None
        return VouchedUnit(unit, str(slice_))


class NoUnits:
    """No service manager: nobody's unit is vouched for."""

    async def unit_of(self, pid: int) -> VouchedUnit | None:
        return None


def slice_chain(name: str) -> tuple[str, ...]:
    """The slices from the top down to ``name``: "user-1000.slice" is in
    "user.slice" (systemd's naming: a dash nests; "-.slice" is the root)."""
    if name in ("", "-.slice") or not name.endswith(".slice"):
        return ()
    parts = name.removesuffix(".slice").split("-")
    return tuple("-".join(parts[: i + 1]) + ".slice" for i in range(len(parts)))


def _name(lookup: Callable[[int], Any], key: int) -> str | None:
    try:
        return str(lookup(key)[0])
    except KeyError:
        return None


def _believed(vouched: VouchedUnit) -> tuple[str | None, tuple[str, ...]]:
    """The unit and slices of what systemd said."""
    if vouched.unit.endswith(".slice"):  # right in a slice: no unit ("-.slice": the root)
        return None, slice_chain(vouched.unit)
    return vouched.unit, slice_chain(vouched.slice)


async def vouched_unit(
    pid: int, uid: int, vouchers: UnitVouchers, proc: str = "/proc", pidfd: int | None = None
) -> tuple[str | None, tuple[str, ...]]:
    """The unit and slices of the caller's process ``pid``, as systemd vouches
    for them, asked while a pidfd pins the process and believed only if that
    process is still alive afterwards and runs as the connection's ``uid``: a
    pid reused by someone else's process must not lend the caller its unit.
    A caller whose process is gone (its connection handed on) gets none.
    ``pidfd``: the bus's own pidfd of that process, if it gave one (no
    reused pid can fool it); borrowed."""
    if pidfd is not None:
        return await _vouched(pid, uid, vouchers, proc, pidfd)
    try:
        pinned = os.pidfd_open(pid)
    except OSError:
        return None, ()
    try:
        return await _vouched(pid, uid, vouchers, proc, pinned)
    finally:
        os.close(pinned)


async def _vouched(
    pid: int, uid: int, vouchers: UnitVouchers, proc: str, pidfd: int
) -> tuple[str | None, tuple[str, ...]]:
    if real_uid(pid, proc) != uid:
        return None, ()
    vouched = await vouchers.unit_of(pid)
    if vouched is None or exited(pidfd):
        return None, ()
    return _believed(vouched)


@dataclasses.dataclass(frozen=True)
class Credentials:
    caller: Caller
    pid: int | None  # at connection time; for audit, not for decisions


async def caller_from(
    credentials: dict[str, tuple[str, Any]], vouchers: UnitVouchers, proc: str = "/proc"
) -> Credentials:
    """Credentials as GetConnectionCredentials returns them. Newer buses
    (dbus-daemon 1.15.x, dbus-broker) add ProcessFD, a pidfd: ours to close."""
    pidfd = int(credentials["ProcessFD"][1]) if "ProcessFD" in credentials else None
    try:
        if "UnixUserID" not in credentials:
            raise PermissionDenied("the bus gave no uid for this connection; vfiod cannot decide")
        uid = int(credentials["UnixUserID"][1])
        gids = tuple(int(g) for g in credentials.get("UnixGroupIDs", ("au", []))[1])
        pid = int(credentials["ProcessID"][1]) if "ProcessID" in credentials else None
        unit, slices = (
            (None, ()) if pid is None else await vouched_unit(pid, uid, vouchers, proc, pidfd)
        )
    finally:
        if pidfd is not None:
            os.close(pidfd)
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

    def __init__(self, bus_driver: BusDriver, vouchers: UnitVouchers, proc: str = "/proc") -> None:
        self.bus_driver = bus_driver
        self.vouchers = vouchers
        self.proc = proc
        self._known: dict[str, Credentials] = {}

    async def of(self, sender: str | None) -> Credentials:
        if not sender:
            raise PermissionDenied("the call carries no sender; call vfiod over the system bus")
        known = self._known.get(sender)
        if known is None:
            raw = await self.bus_driver.get_connection_credentials(sender)
            known = await caller_from(raw, self.vouchers, self.proc)
            self._known[sender] = known
        return known

    def forget(self, sender: str) -> None:
        self._known.pop(sender, None)
