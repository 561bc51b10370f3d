"""Legacy VFIO (container + group) on a real kernel with an emulated Intel IOMMU."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from tests.vm.guest.conftest import Bound
from tests.vm.topology import E1000E, E1000E_IDS, ICH9_LPC, ICH9_SATA, ICH9_SMBUS
from vfiod.host.binding import wait_for_node
from vfiod.host.inventory import cross_check_viability, scan
from vfiod.host.sysfs import Sysfs
from vfiod.pci import PciAddress
from vfiod.vfio import Container, DmaMapping, Group, LinuxKernel, VfioError, abi, group_path

MiB = 1 << 20


def _group_of(sysfs: Sysfs, address: str) -> str:
    group = sysfs.iommu_group(PciAddress.parse(address))
    assert group is not None, f"{address} has no IOMMU group: is intel_iommu=on?"
    return group


def _memfd(size: int) -> int:
    fd = os.memfd_create("vfiod-test-dma", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


def test_e1000e_alone_in_its_group(sysfs: Sysfs) -> None:
    group = _group_of(sysfs, E1000E)
    assert os.listdir(f"/sys/kernel/iommu_groups/{group}/devices") == [E1000E]


def test_full_legacy_sequence(sysfs: Sysfs, kernel: LinuxKernel, bind_vfio: Bound) -> None:
    record = bind_vfio(E1000E)
    assert record.original_driver == "e1000e"
    assert sysfs.driver(PciAddress.parse(E1000E)) == "vfio-pci"
    group_id = _group_of(sysfs, E1000E)
    wait_for_node(group_path(group_id))

    with Container.open(kernel) as container, Group.open(kernel, group_id) as group:
        assert container.check_extension(abi.IommuType.TYPE1v2)
        assert not container.check_extension(abi.IommuType.NOIOMMU)

        with pytest.raises(VfioError) as second:
            Group.open(kernel, group_id)
        assert second.value.errno == errno.EBUSY
        assert f"open on /dev/vfio/{group_id}" in str(second.value)
        assert "opens only once" in str(second.value)

        status = group.status()
        assert status & abi.GroupFlag.VIABLE
        ours = scan(sysfs).group_of(PciAddress.parse(E1000E))
        assert cross_check_viability(ours, group.viable)
        assert not status & abi.GroupFlag.CONTAINER_SET
        group.set_container(container)
        assert group.status() & abi.GroupFlag.CONTAINER_SET
        assert container.set_iommu() is abi.IommuType.TYPE1v2

        info = container.info()
        assert info.iova_pgsizes & 4096
        assert info.iova_ranges, "type1 reports its valid IOVA ranges"
        assert any(r.contains(0, 2 * MiB) for r in info.iova_ranges)

        with group.open_device(E1000E) as device:
            device_info = device.info()
            assert device_info.flags & abi.DeviceFlag.PCI
            assert device_info.num_regions >= abi.PciRegion.CONFIG + 1
            address = PciAddress.parse(E1000E)
            assert device.vendor_id == sysfs.id_attr(address, "vendor") == E1000E_IDS[0]
            assert device.device_id == sysfs.id_attr(address, "device") == E1000E_IDS[1]

            # Config space writes reach the device: flip a bit in the command
            # register's memory-space enable and read it back.
            command = int.from_bytes(device.read_config(4, 2), "little")
            device.write_config(4, (command ^ 0x2).to_bytes(2, "little"))
            assert int.from_bytes(device.read_config(4, 2), "little") == command ^ 0x2
            device.write_config(4, command.to_bytes(2, "little"))

            # IOVA 0 is a real address.
            memfd = _memfd(2 * MiB)
            try:
                with DmaMapping.map_memfd(kernel, container, memfd, 0, 2 * MiB, iova=0) as m:
                    assert m.iova == 0
                    with pytest.raises(VfioError) as overlap:
                        container.map_dma(m.vaddr, 0, 4096)
                    assert overlap.value.errno == errno.EEXIST
                    assert "unmap it first" in str(overlap.value)
                with pytest.raises(VfioError) as unaligned:
                    DmaMapping.map_memfd(kernel, container, memfd, 0, 2 * MiB, iova=123)
                assert unaligned.value.errno == errno.EINVAL
                assert "multiples of the IOMMU page size" in str(unaligned.value)
            finally:
                os.close(memfd)

            if sysfs.read(sysfs.device_path(address) + "/reset_method"):
                device.reset()
            else:
                with pytest.raises(VfioError, match="no reset method"):
                    device.reset()

        # The device fd is closed: the group can be handed on again.
        group.unset_container()
        assert not group.status() & abi.GroupFlag.CONTAINER_SET

    # Everything closed: the group opens again.
    with Group.open(kernel, group_id) as again:
        assert again.viable


def test_unmap_returns_size_and_frees_the_range(
    kernel: LinuxKernel, bind_vfio: Bound, sysfs: Sysfs
) -> None:
    bind_vfio(E1000E)
    group_id = _group_of(sysfs, E1000E)
    wait_for_node(group_path(group_id))
    memfd = _memfd(MiB)
    vaddr = kernel.mmap_shared(memfd, MiB, 0)
    try:
        with Container.open(kernel) as container, Group.open(kernel, group_id) as group:
            group.set_container(container)
            container.set_iommu()
            container.map_dma(vaddr, 0x100000, MiB)
            assert container.unmap_dma(0x100000, MiB) == MiB
            container.map_dma(vaddr, 0x100000, MiB)  # the range is free again
            assert container.unmap_dma(0x100000, MiB) == MiB
    finally:
        kernel.munmap(vaddr, MiB)
        os.close(memfd)


def test_ich9_group_is_not_viable(sysfs: Sysfs, kernel: LinuxKernel, bind_vfio: Bound) -> None:
    group_id = _group_of(sysfs, ICH9_SMBUS)
    members = sorted(os.listdir(f"/sys/kernel/iommu_groups/{group_id}/devices"))
    assert members == [ICH9_LPC, ICH9_SATA, ICH9_SMBUS]
    # Binding one member creates the node; the others stay on host drivers.
    bind_vfio(ICH9_SMBUS)
    assert sysfs.driver(PciAddress.parse(ICH9_SATA)) == "ahci"
    wait_for_node(group_path(group_id))
    with Container.open(kernel) as container, Group.open(kernel, group_id) as group:
        assert not group.viable
        ours = scan(sysfs).group_of(PciAddress.parse(ICH9_SMBUS))
        assert cross_check_viability(ours, group.viable)
        with pytest.raises(VfioError) as refused:
            group.set_container(container)
        assert refused.value.errno == errno.EPERM
        assert "the group is not viable" in str(refused.value)
        assert group.container is None
        with pytest.raises(VfioError) as no_device:
            group.open_device(ICH9_SMBUS)
        assert no_device.value.operation == "GROUP_GET_DEVICE_FD"
        assert "set a container" in str(no_device.value)


def test_bad_input(sysfs: Sysfs, kernel: LinuxKernel, bind_vfio: Bound, tmp_path: Path) -> None:
    with pytest.raises(VfioError) as missing:
        Group.open(kernel, 999)
    assert missing.value.errno == errno.ENOENT
    assert "bind the group's devices to vfio-pci" in str(missing.value)

    with pytest.raises(VfioError) as malformed_group:
        Group.open(kernel, "../vfio")
    assert malformed_group.value.errno == errno.EINVAL

    with pytest.raises(VfioError) as malformed_name:
        Group.open(kernel, "vfio")
    assert malformed_name.value.errno == errno.EINVAL
    assert "give the group number" in str(malformed_name.value)

    # The container node is not a group, /dev/null is not a container.
    (tmp_path / "7").symlink_to("/dev/vfio/vfio")
    with pytest.raises(VfioError) as not_group:
        Group.open(kernel, 7, dev_dir=str(tmp_path))
    assert "is not a VFIO group node" in str(not_group.value)
    with pytest.raises(VfioError) as wrong_type:
        Container.open(kernel, "/dev/null")
    assert wrong_type.value.errno == errno.ENOTTY
    assert "not a VFIO container node" in str(wrong_type.value)

    bind_vfio(E1000E)
    group_id = _group_of(sysfs, E1000E)
    wait_for_node(group_path(group_id))
    with Container.open(kernel) as container:
        group = Group.open(kernel, group_id)
        with group:
            group.set_container(container)
            container.set_iommu()
            with pytest.raises(VfioError) as malformed:
                group.open_device("00:10")
            assert malformed.value.errno == errno.EINVAL
            assert "expected DDDD:BB:DD.F" in str(malformed.value)
            with pytest.raises(VfioError) as foreign:
                group.open_device("0000:00:1f.2")
            assert foreign.value.operation == "GROUP_GET_DEVICE_FD"
            # A group fd is not a device fd.
            with pytest.raises(OSError, match="Inappropriate ioctl") as not_device:
                kernel.device_get_info(group.fileno())
            assert not_device.value.errno == errno.ENOTTY
        with pytest.raises(VfioError) as closed:
            group.status()
        assert closed.value.errno == errno.EBADF
        assert "the group is closed" in str(closed.value)

    # An fd closed behind the layer's back: the kernel's EBADF comes through.
    fd = os.open("/dev/vfio/vfio", os.O_RDWR)
    os.close(fd)
    with pytest.raises(OSError, match="Bad file descriptor") as badf:
        kernel.get_api_version(fd)
    assert badf.value.errno == errno.EBADF
