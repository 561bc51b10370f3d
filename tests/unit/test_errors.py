"""Broker errors and their D-Bus names, as the contract lists them."""

from __future__ import annotations

import errno
import re
from pathlib import Path

from vfiod.errors import ALL_ERRORS, ERROR_PREFIX, KernelError

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
