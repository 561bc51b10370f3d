"""Broker errors and their D-Bus names, as the contract lists them."""

from __future__ import annotations

import errno
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from sdbus.sd_bus_internals import DBUS_ERROR_TO_EXCEPTION, EXCEPTION_TO_DBUS_ERROR

from vfiod.bus.service import register_errors
from vfiod.errors import ALL_ERRORS, ERROR_PREFIX, BrokerError, InternalError, KernelError

CONTRACT = Path(__file__).resolve().parents[2] / "dbus/org.vfiod1.xml"


def test_every_error_has_the_name_the_contract_lists() -> None:
    listed = re.search(r"org\.vfiod1\.Error\.\{([^}]*)\}", CONTRACT.read_text())
    assert listed is not None
    names = [n.strip() for n in listed.group(1).replace("\n", " ").split(",")]
    assert [cls.dbus_name for cls in ALL_ERRORS] == [ERROR_PREFIX + n for n in names]
    assert [cls.__name__ for cls in ALL_ERRORS[:-1]] == names[:-1]


def test_kernel_error_starts_with_the_errno_name() -> None:
    error = KernelError(errno.EBUSY, "GROUP_SET_CONTAINER on /dev/vfio/10: busy")
    assert error.message == "EBUSY: GROUP_SET_CONTAINER on /dev/vfio/10: busy"
    assert error.errno_name == "EBUSY"
    assert KernelError(errno.EPERM, "EPERM: refused").message == "EPERM: refused"


def test_a_bug_is_the_contracts_failed() -> None:
    """org.vfiod1.Error.Failed is InternalError's alone: BrokerError, never
    raised itself, shares the name but is not mapped to it."""
    assert InternalError.dbus_name == ERROR_PREFIX + "Failed"
    assert issubclass(InternalError, BrokerError)
    assert "org.vfiod1.Error.Failed" in CONTRACT.read_text()
    assert InternalError not in ALL_ERRORS


@pytest.fixture
def sdbus_error_maps() -> Iterator[None]:
    """sdbus's maps between exception classes and D-Bus error names are for
    the whole process: vfiod.client in this one must go on seeing unmapped
    names (VfiodError) after the test."""
    by_class, by_name = dict(EXCEPTION_TO_DBUS_ERROR), dict(DBUS_ERROR_TO_EXCEPTION)
    try:
        yield
    finally:
        EXCEPTION_TO_DBUS_ERROR.clear()
        EXCEPTION_TO_DBUS_ERROR.update(by_class)
        DBUS_ERROR_TO_EXCEPTION.clear()
        DBUS_ERROR_TO_EXCEPTION.update(by_name)


@pytest.mark.usefixtures("sdbus_error_maps")
def test_every_error_is_mapped_for_sdbus() -> None:
    """register_errors maps every class vfiod answers with, InternalError
    included (sdbus allows one class per name: mapping BrokerError first used
    to leave InternalError unmapped, answered org.freedesktop.DBus.Error.Failed).
    Calling it again (a second service in one process) changes nothing."""
    register_errors()
    register_errors()
    classes: tuple[type[BrokerError], ...] = (*ALL_ERRORS, InternalError)
    for cls in classes:
        assert EXCEPTION_TO_DBUS_ERROR.get(cls) == cls.dbus_name, cls
        assert DBUS_ERROR_TO_EXCEPTION.get(cls.dbus_name) is cls, cls
    assert BrokerError not in EXCEPTION_TO_DBUS_ERROR
