"""Fixtures for every test: nothing may be left behind."""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Iterator

import pytest

from tests.bus import python_view

# The in-guest tests need a real kernel with VFIO; tests/vm/test_vm.py runs
# them inside the test VM, where the harness sets VFIOD_GUEST.
collect_ignore = [] if os.environ.get("VFIOD_GUEST") else ["vm/guest"]


def open_fds() -> dict[int, str]:
    """This process's open fds and what they point at."""
    fds: dict[int, str] = {}
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(FileNotFoundError):  # the fd listdir itself used
            fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
    return fds


def child_pids() -> set[int]:
    me = os.getpid()
    children: set[int] = set()
    for task in os.listdir(f"/proc/{me}/task"):
        with (
            contextlib.suppress(FileNotFoundError),
            open(f"/proc/{me}/task/{task}/children") as f,
        ):
            children.update(int(pid) for pid in f.read().split())
    return children


@pytest.fixture(scope="session", autouse=True)
def _python_view() -> None:
    """Opened once for the session, before any test counts its fds."""
    python_view()


@pytest.fixture(autouse=True)
def _no_leaks() -> Iterator[None]:
    """Fail any test that leaves an fd open or a child process running."""
    gc.collect()
    fds_before = open_fds()
    children_before = child_pids()
    yield
    gc.collect()
    leaked = {fd: target for fd, target in open_fds().items() if fd not in fds_before}
    assert not leaked, f"test leaked fds: {leaked}"
    left = child_pids() - children_before
    assert not left, f"test left child processes running: {sorted(left)}"
