"""The bus layer: broker errors are answered as they are, anything else
becomes a logged bug with a generic message (no traceback crosses the bus);
the caller is who its live process is."""

from __future__ import annotations

import asyncio
import logging
import subprocess
from pathlib import Path

import pytest

from vfiod.bus.credentials import pinned_unit
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


def test_the_callers_unit_comes_from_its_live_process(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    child = subprocess.Popen(["sleep", "30"])
    try:
        (proc / str(child.pid)).mkdir(parents=True)
        (proc / str(child.pid) / "cgroup").write_text(
            "0::/machine.slice/machine-qemu\\x2d1.scope\n"
        )
        assert pinned_unit(child.pid, str(proc)) == (
            "machine-qemu\\x2d1.scope",
            ("machine.slice",),
        )
    finally:
        child.kill()
        child.wait()
    # Gone: no unit, whatever /proc says (the pid may belong to someone else).
    assert pinned_unit(child.pid, str(proc)) == (None, ())
