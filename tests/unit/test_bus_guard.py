"""The bus layer answers broker errors as they are and turns anything else
into a logged bug with a generic message: no traceback crosses the bus."""

from __future__ import annotations

import asyncio
import logging

import pytest

from vfiod.bus.interfaces import InternalError, guarded
from vfiod.errors import Busy


@guarded
async def refuses() -> None:
    raise Busy("IOMMU group 10 is leased to vm-1")


@guarded
async def breaks() -> None:
    raise KeyError("secret internal detail")


def test_broker_errors_pass_unchanged() -> None:
    with pytest.raises(Busy, match="leased to vm-1"):
        asyncio.run(refuses())


def test_other_exceptions_become_a_logged_bug(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR)
    with pytest.raises(InternalError) as bug:
        asyncio.run(breaks())
    assert bug.value.dbus_name == "org.vfiod1.Error.Failed"
    assert "secret internal detail" not in bug.value.message
    assert "this is a bug, logged in vfiod's journal" in bug.value.message
    (record,) = caplog.records
    assert record.exc_info is not None
    assert "bug: breaks failed" in record.getMessage()
