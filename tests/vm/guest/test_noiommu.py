"""Unsafe no-IOMMU mode on the test kernel, on a machine without an IOMMU."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator

import pytest

from tests.vm.guest.conftest import Bound
from tests.vm.topology import E1000E, E1000E_IDS
from vfiod.host import binding
from vfiod.host.binding import wait_for_node
from vfiod.host.inventory import scan
from vfiod.host.sysfs import HostError, Sysfs
from vfiod.pci import PciAddress
from vfiod.vfio import (
    Container,
    Group,
    LinuxKernel,
    NotSupportedError,
    VfioError,
    abi,
    group_path,
)

NOIOMMU_PARAM = "/sys/module/vfio/parameters/enable_unsafe_noiommu_mode"
TAINT_USER = 1 << 6


@pytest.fixture
def noiommu_mode(sysfs: Sysfs) -> Iterator[None]:
    sysfs.write(NOIOMMU_PARAM, "Y")
    yield
    sysfs.write(NOIOMMU_PARAM, "N")


def test_vfio_pci_refuses_without_noiommu_mode(sysfs: Sysfs, binder: binding.Binder) -> None:
    address = PciAddress.parse(E1000E)
    assert sysfs.read(NOIOMMU_PARAM) == "N"
    assert sysfs.iommu_group(address) is None
    with pytest.raises(HostError) as no_group:
        scan(sysfs).group_of(address)
    assert "0000:00:10.0 has no IOMMU group: boot with the IOMMU on" in str(no_group.value)
    with pytest.raises(HostError) as refused:
        binder.bind(address)
    assert "vfio-pci did not take 0000:00:10.0" in str(refused.value)
    assert "put back on e1000e" in str(refused.value)
    # Nothing left behind: the device is back on its driver, override and
    # record cleared.
    assert sysfs.driver(address) == "e1000e"
    assert sysfs.driver_override(address) is None
    assert not binder.state.load().bindings


def test_noiommu_sequence(
    sysfs: Sysfs, kernel: LinuxKernel, bind_vfio: Bound, noiommu_mode: None
) -> None:
    bind_vfio(E1000E)
    number = sysfs.iommu_group(PciAddress.parse(E1000E))
    assert number is not None
    assert sysfs.read(f"/sys/kernel/iommu_groups/{number}/name") == "vfio-noiommu"
    name = f"noiommu-{number}"
    group_info = scan(sysfs).group_of(PciAddress.parse(E1000E))
    assert group_info.noiommu
    assert group_info.node_name == name
    assert group_info.viable
    wait_for_node(group_path(name))

    with Container.open(kernel) as container, Group.open(kernel, name) as group:
        assert group.noiommu
        assert container.check_extension(abi.IommuType.NOIOMMU)
        assert group.viable
        group.set_container(container)
        assert container.set_iommu() is abi.IommuType.NOIOMMU
        with group.open_device(E1000E) as device:
            assert (device.vendor_id, device.device_id) == E1000E_IDS
        with pytest.raises(NotSupportedError) as refused:
            container.map_dma(0x10000, 0, 4096)
        assert refused.value.errno == errno.EOPNOTSUPP
        assert "no-IOMMU container has no IOMMU" in str(refused.value)
        with pytest.raises(NotSupportedError):
            container.iova_ranges()

    # Opening a no-IOMMU device taints the kernel: the admin can see it happened.
    assert int(sysfs.read("/proc/sys/kernel/tainted")) & TAINT_USER


def test_noiommu_group_needs_its_name(
    sysfs: Sysfs, kernel: LinuxKernel, bind_vfio: Bound, noiommu_mode: None
) -> None:
    bind_vfio(E1000E)
    number = sysfs.iommu_group(PciAddress.parse(E1000E))
    assert number is not None
    wait_for_node(group_path(f"noiommu-{number}"))
    assert not os.path.exists(group_path(number))
    with pytest.raises(VfioError) as missing:
        Group.open(kernel, number)
    assert missing.value.errno == errno.ENOENT
