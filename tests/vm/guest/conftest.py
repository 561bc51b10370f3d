"""Fixtures for tests that run inside the test VM, as root, on a real kernel."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.bus import PrivateBus, start_private_bus
from tests.bus.vfiod import Clients, VfiodProcess, run_real_vfiod
from tests.vm.topology import TOPOLOGIES, KernelKind, Topology
from vfiod.host import binding
from vfiod.host.sysfs import Sysfs
from vfiod.pci import PciAddress
from vfiod.state import BindingRecord, StateFile
from vfiod.vfio import LinuxKernel


@pytest.fixture(scope="session")
def topology() -> Topology:
    return TOPOLOGIES[os.environ["VFIOD_VM_TOPOLOGY"]]


@pytest.fixture(scope="session")
def kernel_kind() -> KernelKind:
    return KernelKind(os.environ["VFIOD_VM_KERNEL"])


@pytest.fixture
def kernel() -> LinuxKernel:
    return LinuxKernel()


@pytest.fixture(scope="session")
def sysfs() -> Sysfs:
    return Sysfs()


class Bound:
    """Devices moved to vfio-pci for one test; put back and checked afterwards."""

    def __init__(self, binder: binding.Binder) -> None:
        self.binder = binder
        self.records: list[BindingRecord] = []

    def __call__(self, address: str) -> BindingRecord:
        record = self.binder.bind(PciAddress.parse(address))
        assert record is not None, f"{address} was on vfio-pci already"
        self.records.append(record)
        return record

    def restore_all(self) -> None:
        for record in reversed(self.records):
            address = PciAddress.parse(record.address)
            assert self.binder.restore(address) == record.original_driver
            assert self.binder.sysfs.driver(address) == record.original_driver
        self.records.clear()
        assert not self.binder.state.load().bindings


@pytest.fixture
def binder(sysfs: Sysfs, tmp_path: Path) -> binding.Binder:
    return binding.Binder(sysfs, StateFile(str(tmp_path / "state.json")))


@pytest.fixture
def bind_vfio(binder: binding.Binder) -> Iterator[Bound]:
    bound = Bound(binder)
    yield bound
    bound.restore_all()


@pytest.fixture(scope="module")
def bus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateBus]:
    """A private system bus with vfiod's bus policy (the guest has none of its own)."""
    with start_private_bus(tmp_path_factory.mktemp("bus")) as private:
        yield private


@pytest.fixture(scope="module")
def vfiod(
    bus: PrivateBus, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[VfiodProcess]:
    """vfiod itself on the guest's real kernel, with the test module's POLICY."""
    with run_real_vfiod(bus, tmp_path_factory.mktemp("vfiod"), request.module.POLICY) as daemon:
        yield daemon


@pytest.fixture(scope="module")
def nobody(bus: PrivateBus) -> Clients:
    return Clients(bus)
