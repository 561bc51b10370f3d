"""iommufd + VFIO device cdevs on the test kernel with an emulated Intel IOMMU."""

from __future__ import annotations

import errno
import os

import pytest

from tests.vm.guest.conftest import Bound
from tests.vm.topology import E1000E, E1000E_IDS
from vfiod.host.binding import wait_for_node
from vfiod.host.sysfs import Sysfs
from vfiod.pci import PciAddress
from vfiod.vfio import (
    CdevDevice,
    DmaMapping,
    Group,
    Ioas,
    IommuFd,
    LinuxKernel,
    VfioError,
    cdev_path,
)

MiB = 1 << 20


def test_cdev_bind_attach_map_unmap(kernel: LinuxKernel, bind_vfio: Bound) -> None:
    bind_vfio(E1000E)
    path = cdev_path(E1000E)
    assert path.startswith("/dev/vfio/devices/vfio")
    wait_for_node(path)

    memfd = os.memfd_create("vfiod-test-dma", os.MFD_CLOEXEC)
    os.ftruncate(memfd, 2 * MiB)
    try:
        with IommuFd.open(kernel) as iommufd, CdevDevice.open(kernel, path, E1000E) as device:
            ioas = iommufd.alloc_ioas()
            ranges = ioas.ranges()
            assert ranges.ranges, "a new IOAS allows IOVAs"
            assert any(r.contains(0, 2 * MiB) for r in ranges.ranges)

            # Until it is bound, the cdev fd can do nothing.
            with pytest.raises(VfioError) as unbound:
                device.info()
            assert unbound.value.operation == "DEVICE_GET_INFO"

            assert device.bind(iommufd) >= 0
            with pytest.raises(VfioError) as twice:
                device.bind(iommufd)
            assert twice.value.operation == "DEVICE_BIND_IOMMUFD"

            device.attach(ioas)
            assert (device.vendor_id, device.device_id) == E1000E_IDS

            with DmaMapping.map_memfd(kernel, ioas, memfd, 0, 2 * MiB, iova=0x200000) as m:
                assert m.iova == 0x200000
                with pytest.raises(VfioError) as overlap:
                    ioas.map_dma(m.vaddr, 0x200000, 4096)
                assert overlap.value.errno == errno.EEXIST
            # IOVA 0 is a valid address here too; unmap reports what it undid.
            vaddr = kernel.mmap_shared(memfd, MiB, 0)
            try:
                ioas.map_dma(vaddr, 0, MiB)
                assert ioas.unmap_dma(0, MiB) == MiB
            finally:
                kernel.munmap(vaddr, MiB)

            device.detach()
            ioas.destroy()
    finally:
        os.close(memfd)


def test_iommufd_rlimit_mode(kernel: LinuxKernel) -> None:
    with IommuFd.open(kernel) as iommufd:
        assert iommufd.rlimit_mode == 0
        iommufd.rlimit_mode = 1  # root has CAP_SYS_RESOURCE
        assert iommufd.rlimit_mode == 1


def test_cdev_and_legacy_group_exclude_each_other(
    sysfs: Sysfs, kernel: LinuxKernel, bind_vfio: Bound
) -> None:
    bind_vfio(E1000E)
    path = cdev_path(E1000E)
    wait_for_node(path)
    group_id = sysfs.iommu_group(PciAddress.parse(E1000E))
    assert group_id is not None
    with (
        Group.open(kernel, group_id),
        IommuFd.open(kernel) as iommufd,
        CdevDevice.open(kernel, path, E1000E) as device,
    ):
        with pytest.raises(VfioError) as busy:
            device.bind(iommufd)
        assert busy.value.errno == errno.EBUSY
        assert "open through the legacy interface" in str(busy.value)


def test_bad_input(kernel: LinuxKernel) -> None:
    with pytest.raises(VfioError) as no_cdev:
        cdev_path("0000:00:1f.2")  # on ahci, not vfio-pci
    assert no_cdev.value.errno == errno.ENOENT
    assert "bind it to vfio-pci" in str(no_cdev.value)
    with pytest.raises(VfioError) as malformed:
        cdev_path("0000:00:10")
    assert malformed.value.errno == errno.EINVAL
    with IommuFd.open(kernel) as iommufd:
        with pytest.raises(VfioError) as unknown_ioas:
            Ioas(iommufd, 4242).iova_ranges()
        assert unknown_ioas.value.errno == errno.ENOENT
        assert "IOAS 4242" in str(unknown_ioas.value)
