"""Errors the broker answers with. Each carries its D-Bus error name, one of
dbus/org.vfiod1.xml; the bus layer turns them into replies. Any other
exception reaching the bus layer is a bug: it is logged with its traceback
and answered with InternalError (org.vfiod1.Error.Failed)."""

from __future__ import annotations

import errno as errno_
from typing import ClassVar

from vfiod.pci import PciAddress
from vfiod.reasons import Reason

ERROR_PREFIX = "org.vfiod1.Error."


class BrokerError(Exception):
    """A refusal or failure that the caller should hear about, in words that
    say what to do next. Raised only as one of its subclasses: its own name
    (Failed) is InternalError's."""

    dbus_name: ClassVar[str] = ERROR_PREFIX + "Failed"

    def __init__(
        self,
        message: str,
        *,
        code: Reason | None = None,
        blocker: PciAddress | None = None,
        backends: tuple[str, ...] = (),
    ) -> None:
        super().__init__(message)
        self.message = message
        # For CheckAccess, set where a refusal is built: its reason code, the
        # member that refuses (if one does), and for code backend the
        # backends that would do. None: no CheckAccess answers with it.
        self.code = code
        self.blocker = blocker
        self.backends = backends


class PermissionDenied(BrokerError):
    dbus_name = ERROR_PREFIX + "PermissionDenied"


class NotFound(BrokerError):
    dbus_name = ERROR_PREFIX + "NotFound"


class NotViable(BrokerError):
    dbus_name = ERROR_PREFIX + "NotViable"


class Busy(BrokerError):
    dbus_name = ERROR_PREFIX + "Busy"


class Unsafe(BrokerError):
    dbus_name = ERROR_PREFIX + "Unsafe"


class HostCritical(BrokerError):
    dbus_name = ERROR_PREFIX + "HostCritical"


class InvalidArgument(BrokerError):
    dbus_name = ERROR_PREFIX + "InvalidArgument"


class NotSupported(BrokerError):
    dbus_name = ERROR_PREFIX + "NotSupported"


class PolicyInvalid(BrokerError):
    """The policy files have errors; the previous policy stays in force."""

    dbus_name = ERROR_PREFIX + "PolicyInvalid"


class KernelError(BrokerError):
    """The kernel refused; the message starts with the errno name."""

    dbus_name = ERROR_PREFIX + "Kernel"

    def __init__(self, err: int, message: str) -> None:
        self.errno = err
        self.errno_name = errno_.errorcode.get(err, str(err))
        super().__init__(
            message if message.startswith(self.errno_name) else f"{self.errno_name}: {message}"
        )


class Cancelled(BrokerError):
    """The caller cancelled its request (Manager.Cancel), or left; whatever
    vfiod had changed for it was put back."""

    dbus_name = ERROR_PREFIX + "Cancelled"


class TimedOut(BrokerError):
    """The request could not be done within the time its caller said it
    waits (the timeout option); whatever vfiod had changed was put back."""

    dbus_name = ERROR_PREFIX + "TimedOut"


class InternalError(BrokerError):
    """Anything but a BrokerError escaping a method is a bug in vfiod."""

    dbus_name = ERROR_PREFIX + "Failed"


# The refusals, in the contract's order (InternalError is no refusal).
ALL_ERRORS: tuple[type[BrokerError], ...] = (
    PermissionDenied,
    NotFound,
    NotViable,
    Busy,
    Unsafe,
    HostCritical,
    InvalidArgument,
    NotSupported,
    PolicyInvalid,
    Cancelled,
    TimedOut,
    KernelError,
)
