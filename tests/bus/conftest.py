"""Fixtures for the bus tests: a private system bus per test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.bus import (
    ADDRESS_VARIABLE,
    NOBODY,
    BusUnavailableError,
    PrivateBus,
    require_tools,
    start_private_bus,
)
from tests.bus.vfiod import Clients, VfiodProcess, run_vfiod


@pytest.fixture
def private_bus(tmp_path: Path) -> Iterator[PrivateBus]:
    """A private dbus-daemon with Debian's system bus policy and ours; its
    files in tmp_path/bus. Stopped, with every fd closed, after the test."""
    try:
        require_tools()
    except BusUnavailableError as e:
        pytest.skip(str(e))
    with start_private_bus(tmp_path / "bus") as bus:
        yield bus


@pytest.fixture
def system_bus_address(private_bus: PrivateBus, monkeypatch: pytest.MonkeyPatch) -> str:
    """The private bus's address, also set as DBUS_SYSTEM_BUS_ADDRESS in this
    process for the test, so sd_bus_open_system() connects to it."""
    monkeypatch.setenv(ADDRESS_VARIABLE, private_bus.address)
    return private_bus.address


@pytest.fixture
def vfiod(
    private_bus: PrivateBus, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[VfiodProcess]:
    """vfiod on a fake host (tests/fakehost.py, topology "small") with the
    test module's POLICY."""
    with run_vfiod(private_bus, tmp_path / "vfiod", request.module.POLICY) as daemon:
        yield daemon


@pytest.fixture
def nobody(private_bus: PrivateBus) -> Clients:
    """Client processes as uid 65534 on the private bus."""
    return Clients(private_bus, NOBODY)
