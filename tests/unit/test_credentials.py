"""The caller's unit and slices count only as far as systemd vouches for them:
a cgroup path is text the owner of a delegated subtree writes itself."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from vfiod.bus.credentials import (
    NoUnits,
    VouchedUnit,
    caller_from,
    slice_chain,
    vouched_unit,
)
from vfiod.errors import PermissionDenied


class Vouchers:
    """What a system manager would answer for a pid, and what it did meanwhile."""

    def __init__(self, unit: str | None, slice_: str = "", meanwhile: object = None) -> None:
        self.unit = None if unit is None else VouchedUnit(unit, slice_)
        self.asked: list[int] = []
        self.meanwhile = meanwhile

    async def unit_of(self, pid: int) -> VouchedUnit | None:
        self.asked.append(pid)
        if callable(self.meanwhile):
            self.meanwhile()
        return self.unit


@pytest.fixture
def child() -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen(["sleep", "60"])
    yield process
    process.kill()
    process.wait()


def fake_proc(root: Path, pid: int, uid: int = 65534) -> str:
    (root / str(pid)).mkdir(parents=True)
    (root / str(pid) / "status").write_text(f"Name:\tsleep\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\n")
    return str(root)


def unit(pid: int, uid: int, vouchers: object, proc: str) -> tuple[str | None, tuple[str, ...]]:
    return asyncio.run(vouched_unit(pid, uid, vouchers, proc))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("vouched", "slice_", "expected"),
    [
        pytest.param(
            "user@65534.service",
            "user-65534.slice",
            ("user@65534.service", ("user.slice", "user-65534.slice")),
            id="anything-made-in-a-user-subtree",
        ),
        pytest.param(
            "dpdk-forwarder.service",
            "system.slice",
            ("dpdk-forwarder.service", ("system.slice",)),
            id="a-system-service",
        ),
        pytest.param(
            "machine-qemu\\x2d1\\x2dvm.scope",
            "machine.slice",
            ("machine-qemu\\x2d1\\x2dvm.scope", ("machine.slice",)),
            id="libvirt-vm-scope",
        ),
        pytest.param(
            "container.service",
            "system.slice",
            ("container.service", ("system.slice",)),
            id="anything-below-a-delegate-yes-unit",
        ),
        pytest.param("-.slice", "", (None, ()), id="root-cgroup"),
        pytest.param("machine.slice", "-.slice", (None, ("machine.slice",)), id="in-a-slice"),
        pytest.param(None, "", (None, ()), id="no-system-manager"),
    ],
)
def test_only_what_systemd_vouches_for_counts(
    tmp_path: Path,
    child: subprocess.Popen[bytes],
    vouched: str | None,
    slice_: str,
    expected: tuple[str | None, tuple[str, ...]],
) -> None:
    proc = fake_proc(tmp_path, child.pid)
    vouchers = Vouchers(vouched, slice_)
    assert unit(child.pid, 65534, vouchers, proc) == expected
    assert vouchers.asked == [child.pid]


def test_without_a_service_manager_nobody_has_a_unit(
    tmp_path: Path, child: subprocess.Popen[bytes]
) -> None:
    proc = fake_proc(tmp_path, child.pid)
    assert unit(child.pid, 65534, NoUnits(), proc) == (None, ())


def test_a_process_of_another_uid_lends_no_unit(
    tmp_path: Path, child: subprocess.Popen[bytes]
) -> None:
    """The connection's pid now names a process of someone else (a reused pid)."""
    proc = fake_proc(tmp_path, child.pid, uid=0)
    vouchers = Vouchers("dpdk-forwarder.service")
    assert unit(child.pid, 65534, vouchers, proc) == (None, ())
    assert vouchers.asked == []


def test_a_process_that_exits_while_systemd_is_asked_lends_no_unit(
    tmp_path: Path, child: subprocess.Popen[bytes]
) -> None:
    """Once it has exited its pid may name another process: the answer may be
    about that one."""
    proc = fake_proc(tmp_path, child.pid)

    def exit_now() -> None:
        child.kill()
        child.wait()

    assert unit(
        child.pid, 65534, Vouchers("dpdk-forwarder.service", "system.slice", exit_now), proc
    ) == (None, ())


def test_a_gone_process_has_no_unit(tmp_path: Path) -> None:
    process = subprocess.Popen(["true"])
    process.wait()
    proc = fake_proc(tmp_path, process.pid)
    assert unit(process.pid, 65534, Vouchers("dpdk-forwarder.service"), proc) == (None, ())


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("system.slice", ("system.slice",)),
        ("user-1000.slice", ("user.slice", "user-1000.slice")),
        ("a-b-c.slice", ("a.slice", "a-b.slice", "a-b-c.slice")),
        ("machine-qemu\\x2d1.slice", ("machine.slice", "machine-qemu\\x2d1.slice")),
        ("-.slice", ()),
        ("", ()),
        ("vm.service", ()),
    ],
)
def test_slice_chain(name: str, expected: tuple[str, ...]) -> None:
    assert slice_chain(name) == expected


def test_a_pidfd_from_the_bus_is_used_and_closed(
    tmp_path: Path, child: subprocess.Popen[bytes]
) -> None:
    proc = fake_proc(tmp_path, child.pid)
    pidfd = os.pidfd_open(child.pid)
    credentials = {
        "UnixUserID": ("u", 65534),
        "ProcessID": ("u", child.pid),
        "ProcessFD": ("h", pidfd),
    }
    found = asyncio.run(
        caller_from(credentials, Vouchers("dpdk-forwarder.service", "system.slice"), proc)
    )
    assert (found.caller.unit, found.caller.slices) == ("dpdk-forwarder.service", ("system.slice",))
    with pytest.raises(OSError, match="Bad file descriptor"):
        os.fstat(pidfd)


def test_a_pidfd_from_the_bus_is_closed_when_the_caller_is_refused() -> None:
    pidfd = os.pidfd_open(os.getpid())
    with pytest.raises(PermissionDenied):
        asyncio.run(caller_from({"ProcessFD": ("h", pidfd)}, NoUnits()))
    with pytest.raises(OSError, match="Bad file descriptor"):
        os.fstat(pidfd)
