"""Fixtures for tests that run inside the test VM, as root, on a real kernel."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.vm.topology import TOPOLOGIES, KernelKind, Topology
from vfiod.host import binding
from vfiod.host.sysfs import Sysfs
from vfiod.pci import PciAddress
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

    def __init__(self, sysfs: Sysfs) -> None:
        self.sysfs = sysfs
        self.bindings: list[binding.Binding] = []

    def __call__(self, address: str) -> binding.Binding:
        done = binding.bind(self.sysfs, PciAddress.parse(address))
        self.bindings.append(done)
        return done

    def restore_all(self) -> None:
        for done in reversed(self.bindings):
            binding.restore(self.sysfs, done)
            assert self.sysfs.driver(done.address) == done.original_driver
        self.bindings.clear()


@pytest.fixture
def bind_vfio(sysfs: Sysfs) -> Iterator[Bound]:
    bound = Bound(sysfs)
    yield bound
    bound.restore_all()
