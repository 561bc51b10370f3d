"""polkit, asked after vfiod's own policy: it can only narrow what that
policy allows, never widen it.

vfiod asks polkitd (org.freedesktop.PolicyKit1 on the system bus) whether
the caller's process may do an action, with a few details about the device
for the admin's rules. It never asks for interactive authentication: an
answer of "authenticate first" (auth_admin, auth_self) is a refusal, since a
daemon cannot put a password prompt in front of whoever called it. Without
polkitd on the bus, or with no answer in time, the check is UNAVAILABLE and
vfiod refuses: an admin who enabled polkit asked for its narrowing.

The subject is polkit's "unix-process": pid, start time and uid (polkitd
122 takes no pidfd). ``pin_subject`` reads them while a pidfd pins the
process; the caller checks that pidfd again after the answer, so a pid
reused in between never gets another process's verdict.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import errno
import itertools
import logging
import os
from collections.abc import Mapping
from typing import Any, Protocol

from sdbus import DbusInterfaceCommonAsync, dbus_method_async
from sdbus.exceptions import SdBusBaseError, SdBusUnmappedMessageError
from sdbus.sd_bus_internals import SdBus

from vfiod.host.process import exited, real_uid
from vfiod.host.sysfs import HostError

log = logging.getLogger(__name__)

# The actions of polkit/org.vfiod1.policy.
ACQUIRE = "org.vfiod1.acquire"
ACQUIRE_UNSAFE = "org.vfiod1.acquire-unsafe"
RELOAD = "org.vfiod1.reload"

POLKIT = "org.freedesktop.PolicyKit1"
AUTHORITY_PATH = "/org/freedesktop/PolicyKit1/Authority"
RULES_DIR = "/etc/polkit-1/rules.d"
DEFAULT_TIMEOUT = 10.0

_NO_INTERACTION = 0  # CheckAuthorization's flags: never AllowUserInteraction (1)
# Cancellation ids are per caller connection: unique within this process.
_CHECKS = itertools.count(1)


class Verdict(enum.StrEnum):
    YES = "yes"
    NO = "no"
    # polkit would allow it after interactive authentication (auth_admin,
    # auth_self): vfiod never asks for that, so it is a refusal.
    CHALLENGE = "challenge"
    # polkitd is not on the bus, answered with an error, or not in time.
    UNAVAILABLE = "unavailable"


@dataclasses.dataclass(frozen=True)
class Answer:
    verdict: Verdict
    text: str  # for the caller: why, and what to do ("" when allowed)

    @property
    def allowed(self) -> bool:
        return self.verdict is Verdict.YES


@dataclasses.dataclass(frozen=True)
class Subject:
    """polkit's "unix-process" subject."""

    pid: int
    start_time: int  # in clock ticks since boot, field 22 of /proc/PID/stat
    uid: int  # real uid

    def to_dbus(self) -> tuple[str, dict[str, tuple[str, Any]]]:
        return (
            "unix-process",
            {
                "pid": ("u", self.pid),
                "start-time": ("t", self.start_time),
                "uid": ("i", self.uid),
            },
        )


def _start_time(pid: int, proc: str) -> int | None:
    """Field 22 of /proc/PID/stat. The command name (field 2) is in
    parentheses and may hold spaces and parentheses itself: the fields
    after it start after the last ')'."""
    try:
        with open(os.path.join(proc, str(pid), "stat"), "rb") as f:
            stat = f.read()
        fields = stat[stat.rindex(b")") + 1 :].split()
        return int(fields[22 - 3])  # fields[0] is field 3, the state
    except (OSError, ValueError, IndexError):
        return None


def pin_subject(pid: int, uid: int, proc: str = "/proc") -> tuple[Subject, int]:
    """The subject for the live process ``pid`` of the connection's ``uid``,
    and a pidfd pinning it (the caller's to close; check ``exited(pidfd)``
    again once polkit has answered). HostError ESRCH when the process is
    gone or runs as another uid: a reused pid must not lend the caller
    another user's identity, nor another user the caller's."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        raise HostError(errno.ESRCH, f"process {pid} has exited") from None
    except OSError as e:
        err = e.errno if e.errno is not None else errno.EIO
        raise HostError(err, f"cannot pin process {pid}: {os.strerror(err)}") from e
    try:
        start_time = _start_time(pid, proc)
        uid_now = real_uid(pid, proc)
        # Read both, then check the pidfd's process is alive still: only
        # then were they that process's (its pid cannot be reused while
        # the pidfd is open).
        if start_time is None or uid_now is None or exited(pidfd):
            raise HostError(errno.ESRCH, f"process {pid} has exited")
        if uid_now != uid:
            raise HostError(
                errno.ESRCH,
                f"process {pid} runs as uid {uid_now}, not as the caller's uid {uid}; "
                "its pid was reused",
            )
    except BaseException:
        os.close(pidfd)
        raise
    return Subject(pid, start_time, uid_now), pidfd


class Authority(Protocol):
    """Who decides whether a subject may do an action."""

    async def check(self, subject: Subject, action: str, details: Mapping[str, str]) -> Answer: ...


class PolkitAuthorityInterface(DbusInterfaceCommonAsync, interface_name=f"{POLKIT}.Authority"):
    """The two methods of polkit's authority vfiod calls."""

    @dbus_method_async(
        input_signature="(sa{sv})sa{ss}us",
        result_signature="(bba{ss})",
        method_name="CheckAuthorization",
    )
    async def check_authorization(
        self,
        subject: tuple[str, dict[str, tuple[str, Any]]],
        action_id: str,
        details: dict[str, str],
        flags: int,
        cancellation_id: str,
    ) -> tuple[bool, bool, dict[str, str]]:
        raise NotImplementedError  # answered by polkitd


def _bus_error(e: SdBusBaseError) -> str:
    """A bus error as a D-Bus error name and message, for the caller."""
    if isinstance(e, SdBusUnmappedMessageError) and len(e.args) >= 2:
        name, message = str(e.args[0]), str(e.args[1])
    else:
        name = str(getattr(e, "dbus_error_name", type(e).__name__))
        message = str(e.args[0]) if e.args else ""
    return f"{name}: {message}" if message else name


def unavailable(why: str) -> Answer:
    return Answer(
        Verdict.UNAVAILABLE,
        f"polkit is enabled in vfiod.toml but polkitd did not answer: {why}; "
        "start polkit (systemctl start polkit) or set polkit = false",
    )


def answer_of(action: str, uid: int, is_authorized: bool, is_challenge: bool) -> Answer:
    """polkit's (is_authorized, is_challenge) as vfiod's answer."""
    if is_authorized:
        return Answer(Verdict.YES, "")
    if is_challenge:
        return Answer(
            Verdict.CHALLENGE,
            f"polkit allows {action} for uid {uid} only after authentication, which "
            "vfiod cannot ask for; an admin can allow it with a polkit rule in "
            f"{RULES_DIR}",
        )
    return Answer(Verdict.NO, f"polkit refuses {action} for uid {uid}")


class PolkitAuthority:
    """polkitd on ``bus``. ``timeout`` (seconds) bounds each whole check."""

    def __init__(self, bus: SdBus, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.bus = bus
        self.timeout = timeout
        self.proxy = PolkitAuthorityInterface.new_proxy(POLKIT, AUTHORITY_PATH, bus)

    async def check(self, subject: Subject, action: str, details: Mapping[str, str]) -> Answer:
        cancellation_id = f"vfiod-{os.getpid()}-{next(_CHECKS)}"
        try:
            is_authorized, is_challenge, _details = await asyncio.wait_for(
                self.proxy.check_authorization(
                    subject.to_dbus(), action, dict(details), _NO_INTERACTION, cancellation_id
                ),
                self.timeout,
            )
        except TimeoutError:
            self._cancel(cancellation_id)
            why = f"no answer to {action} within {self.timeout:g} s"
        except SdBusBaseError as e:
            why = f"{action}: {_bus_error(e)}"
            if "not registered" in why:  # polkitd's words for an action it does not know
                why += " (is org.vfiod1.policy installed in /usr/share/polkit-1/actions?)"
        else:
            return answer_of(action, subject.uid, is_authorized, is_challenge)
        log.warning("polkit check of %s for pid %d: %s", action, subject.pid, why)
        return unavailable(why)

    def _cancel(self, cancellation_id: str) -> None:
        """Tell polkitd to drop a check nobody waits for any more; sent
        without waiting for a reply, so it adds nothing to the timeout."""
        message = self.bus.new_method_call_message(
            POLKIT, AUTHORITY_PATH, f"{POLKIT}.Authority", "CancelCheckAuthorization"
        )
        message.append_data("s", cancellation_id)
        message.expect_reply = False
        try:
            message.send()
        except SdBusBaseError as e:  # the bus is gone: there is nothing to cancel
            log.debug("cancelling polkit check %s: %s", cancellation_id, e)
