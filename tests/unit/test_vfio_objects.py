"""The VFIO object layer (Container, Group, Device, IommuFd, Ioas, DmaMapping)
over FakeKernel, and FakeKernel's own model of Linux where the layer relies on it.

Messages are user-facing, so the tests pin what they say. Every test ends with
nothing open in the fake, nothing mapped and nothing pinned (the ``fake``
fixture checks), and the autouse fixture in tests/conftest.py counts real fds.
"""

from __future__ import annotations

import contextlib
import errno
import inspect
import os
import socket
from collections.abc import Iterator

import pytest

from vfiod.vfio import (
    CdevDevice,
    Container,
    DmaMapping,
    Group,
    Ioas,
    IommuFd,
    Kernel,
    LinuxKernel,
    NotSupportedError,
    VfioError,
    abi,
    cdev_path,
)
from vfiod.vfio.fake import (
    DEFAULT_IOVA_PGSIZES,
    DEFAULT_IOVA_RANGES,
    FakeDmaMapping,
    FakeKernel,
    FakePciDevice,
)
from vfiod.vfio.kernel import IovaRange

KiB = 1 << 10
MiB = 1 << 20

NIC = FakePciDevice("0000:00:10.0", vendor=0x8086, device=0x10D3)  # e1000e, alone in group 9
# ICH9 functions sharing group 11; SATA stays on ahci, so the group is not viable.
SMBUS = FakePciDevice("0000:00:1f.3", vendor=0x8086, device=0x2930, config_size=256)
SATA = FakePciDevice("0000:00:1f.2", vendor=0x8086, device=0x2922)
# A device without a reset method and with one memory BAR, in group 12.
NO_RESET = FakePciDevice("0000:01:00.0", vendor=0x1AF4, device=0x1041, bars=(MiB,), reset=False)

CONTAINER = "/dev/vfio/vfio"
IDS_LE = (0x10D3 << 16 | 0x8086).to_bytes(4, "little")


def assert_clean(kernel: FakeKernel) -> None:
    assert kernel.open_nodes() == {}
    assert kernel.mmaps() == {}
    assert kernel.pinned_bytes == 0


@pytest.fixture
def fake() -> Iterator[FakeKernel]:
    kernel = FakeKernel()
    kernel.add_group(9, devices=[NIC])
    kernel.add_group(11, devices=[SMBUS, SATA], viable=False)
    kernel.add_group(12, devices=[NO_RESET])
    yield kernel
    assert_clean(kernel)


@pytest.fixture
def noiommu() -> Iterator[FakeKernel]:
    kernel = FakeKernel()
    kernel.add_group("noiommu-0", devices=[NIC])
    yield kernel
    assert_clean(kernel)


@pytest.fixture
def memfd() -> Iterator[int]:
    fd = os.memfd_create("vfiod-test-dma", os.MFD_CLOEXEC)
    os.ftruncate(fd, 4 * MiB)
    yield fd
    os.close(fd)


@contextlib.contextmanager
def legacy(kernel: FakeKernel, group: int | str = 9) -> Iterator[tuple[Container, Group]]:
    """A container holding ``group``, with its IOMMU model set."""
    with Container.open(kernel) as container, Group.open(kernel, group) as opened:
        opened.set_container(container)
        container.set_iommu()
        yield container, opened


@contextlib.contextmanager
def user_memory(kernel: FakeKernel, memfd: int, size: int) -> Iterator[int]:
    """``size`` bytes of ``memfd`` mapped into (fake) user memory."""
    vaddr = kernel.mmap_shared(memfd, size, 0)
    try:
        yield vaddr
    finally:
        kernel.munmap(vaddr, size)


@contextlib.contextmanager
def bound_cdev(kernel: FakeKernel) -> Iterator[tuple[IommuFd, Ioas, CdevDevice]]:
    """NIC's cdev bound to a new iommufd and attached to a new IOAS."""
    with (
        IommuFd.open(kernel) as iommufd,
        CdevDevice.open(kernel, kernel.cdev_path(NIC.address), NIC.address) as device,
    ):
        ioas = iommufd.alloc_ioas()
        device.bind(iommufd)
        device.attach(ioas)
        yield iommufd, ioas, device


# The syscall layer: one interface, two kernels.


def _public_methods(cls: type) -> set[str]:
    return {n for n, v in vars(cls).items() if not n.startswith("_") and callable(v)}


def test_kernels_expose_exactly_the_kernel_interface() -> None:
    interface = _public_methods(Kernel)
    assert _public_methods(LinuxKernel) == interface
    # The fake adds only its declared builder and introspection API.
    assert _public_methods(FakeKernel) - FakeKernel.TEST_API == interface
    assert _public_methods(FakeKernel) >= FakeKernel.TEST_API
    assert not FakeKernel.TEST_API & interface
    for name in sorted(interface):
        expected = inspect.signature(getattr(Kernel, name)).parameters
        for cls in (LinuxKernel, FakeKernel):
            got = inspect.signature(getattr(cls, name)).parameters
            assert [(p.name, p.kind) for p in got.values()] == [
                (p.name, p.kind) for p in expected.values()
            ], f"{cls.__name__}.{name}"


# Container.


def test_container_version_and_extensions(fake: FakeKernel) -> None:
    with Container.open(fake) as container:
        assert container.target == CONTAINER
        assert fake.get_api_version(container.fileno()) == abi.VFIO_API_VERSION
        assert container.check_extension(abi.IommuType.TYPE1v2)
        assert container.check_extension(abi.IommuType.TYPE1)
        assert container.check_extension(abi.IommuType.UNMAP_ALL)
        assert not container.check_extension(abi.IommuType.NOIOMMU)
        assert fake.open_nodes() == {container.fileno(): CONTAINER}


def test_set_iommu_prefers_type1v2(fake: FakeKernel) -> None:
    with Container.open(fake) as container, Group.open(fake, 9) as group:
        group.set_container(container)
        assert container.set_iommu() is abi.IommuType.TYPE1v2
        assert container.iommu_type is abi.IommuType.TYPE1v2
        assert not container.noiommu


def test_set_iommu_falls_back_to_type1() -> None:
    class Type1Only(FakeKernel):
        """A kernel whose type1 driver predates v2."""

        def check_extension(self, fd: int, extension: int) -> int:
            if extension == abi.IommuType.TYPE1v2:
                return 0
            return super().check_extension(fd, extension)

    kernel = Type1Only()
    kernel.add_group(9, devices=[NIC])
    with Container.open(kernel) as container, Group.open(kernel, 9) as group:
        group.set_container(container)
        assert container.set_iommu() is abi.IommuType.TYPE1
    assert_clean(kernel)


def test_set_iommu_without_type1_says_what_to_load() -> None:
    kernel = FakeKernel(type1=False)
    kernel.add_group(9, devices=[NIC])
    with Container.open(kernel) as container, Group.open(kernel, 9) as group:
        group.set_container(container)
        with pytest.raises(NotSupportedError) as refused:
            container.set_iommu()
        assert refused.value.errno == errno.EOPNOTSUPP
        assert "neither the type1v2 nor the type1 IOMMU model" in str(refused.value)
        assert "load vfio_iommu_type1" in str(refused.value)
        assert container.iommu_type is None
        # The kernel has no driver to offer either.
        with pytest.raises(OSError, match="No such device") as no_driver:
            kernel.set_iommu(container.fileno(), abi.IommuType.TYPE1v2)
        assert no_driver.value.errno == errno.ENODEV
    assert_clean(kernel)


def test_set_iommu_without_a_group_is_refused_clearly(fake: FakeKernel) -> None:
    with Container.open(fake) as container:
        with pytest.raises(VfioError) as refused:
            container.set_iommu()
        assert refused.value.errno == errno.EINVAL
        assert str(refused.value) == (
            "SET_IOMMU on /dev/vfio/vfio: the container has no group (EINVAL); "
            "attach a group with Group.set_container() first"
        )
        # The kernel refuses too: a group is what grants the privilege.
        with pytest.raises(OSError, match="Invalid argument") as kernel_refused:
            fake.set_iommu(container.fileno(), abi.IommuType.TYPE1v2)
        assert kernel_refused.value.errno == errno.EINVAL


def test_set_iommu_with_an_unsupported_type(fake: FakeKernel) -> None:
    with Container.open(fake) as container, Group.open(fake, 9) as group:
        group.set_container(container)
        with pytest.raises(VfioError) as refused:
            container.set_iommu(abi.IommuType.NOIOMMU)  # a real group needs an IOMMU
        assert refused.value.errno == errno.ENODEV
        assert container.iommu_type is None
        assert container.set_iommu() is abi.IommuType.TYPE1v2


def test_container_open_on_a_newer_api_is_refused() -> None:
    class FutureKernel(FakeKernel):
        def get_api_version(self, fd: int) -> int:
            super().get_api_version(fd)
            return 1

    kernel = FutureKernel()
    with pytest.raises(VfioError) as refused:
        Container.open(kernel)
    assert refused.value.errno == errno.EPROTO
    assert str(refused.value) == (
        "GET_API_VERSION on /dev/vfio/vfio: kernel VFIO API version 1, vfiod speaks 0 (EPROTO)"
    )
    assert_clean(kernel)


def test_container_info_reports_page_sizes_and_ranges(fake: FakeKernel) -> None:
    with legacy(fake) as (container, _):
        info = container.info()
        assert info.flags == abi.IommuInfoFlag.PGSIZES | abi.IommuInfoFlag.CAPS
        assert info.iova_pgsizes == DEFAULT_IOVA_PGSIZES == 4 * KiB | 2 * MiB | 1 << 30
        assert container.iova_ranges() == DEFAULT_IOVA_RANGES
        assert info.dma_avail == 65535


# Group.


def test_group_open_status_and_viability(fake: FakeKernel) -> None:
    with Container.open(fake) as container, Group.open(fake, 9) as group:
        assert group.target == "/dev/vfio/9"
        assert not group.noiommu
        assert group.status() == abi.GroupFlag.VIABLE
        assert group.viable
        group.set_container(container)
        assert group.status() == abi.GroupFlag.VIABLE | abi.GroupFlag.CONTAINER_SET
        assert (group.container, container.groups) == (container, [group])
        group.unset_container()
        assert group.status() == abi.GroupFlag.VIABLE
        assert (group.container, container.groups) == (None, [])
        group.unset_container()  # not in a container: nothing to do


def test_second_open_of_a_group_is_busy(fake: FakeKernel) -> None:
    with Group.open(fake, 9):
        with pytest.raises(VfioError) as second:
            Group.open(fake, 9)
        assert second.value.errno == errno.EBUSY
        assert str(second.value) == (
            "open on /dev/vfio/9: Device or resource busy (EBUSY); the group is already "
            "open: a VFIO group node opens only once, and stays busy until every device fd "
            "from it is closed; or one of its devices is in use through its cdev"
        )
        assert list(fake.open_nodes().values()) == ["/dev/vfio/9"]
    with Group.open(fake, 9) as again:  # closed: free again
        assert again.viable


def test_group_stays_busy_while_a_device_fd_from_it_is_open(fake: FakeKernel) -> None:
    with Container.open(fake) as container:
        group = Group.open(fake, 9)
        group.set_container(container)
        container.set_iommu()
        device = group.open_device(NIC.address)
        group.close()
        with pytest.raises(VfioError) as busy:
            Group.open(fake, 9)
        assert busy.value.errno == errno.EBUSY
        assert list(fake.open_nodes().values()) == [
            CONTAINER,
            f"device {NIC.address} of /dev/vfio/9",
        ]
        device.close()
        with Group.open(fake, 9) as again:
            # Its last fd gone, the group also left the container.
            assert again.status() == abi.GroupFlag.VIABLE


def test_non_viable_group_is_refused_a_container(fake: FakeKernel) -> None:
    with Container.open(fake) as container, Group.open(fake, 11) as group:
        assert not group.viable
        assert group.status() == abi.GroupFlag(0)
        with pytest.raises(VfioError) as refused:
            group.set_container(container)
        assert refused.value.errno == errno.EPERM
        assert str(refused.value) == (
            "GROUP_SET_CONTAINER on /dev/vfio/11: Operation not permitted (EPERM); the group "
            "is not viable: every device in it must be bound to vfio-pci (or pci-stub, "
            "pcieport) or have no driver"
        )
        assert group.container is None
        assert container.groups == []
        with pytest.raises(VfioError) as no_device:
            group.open_device(SMBUS.address)
        assert no_device.value.operation == "GROUP_GET_DEVICE_FD"
        assert "set a container and its IOMMU model first" in str(no_device.value)


def test_set_container_twice(fake: FakeKernel) -> None:
    with Container.open(fake) as container, Group.open(fake, 9) as group:
        group.set_container(container)
        with pytest.raises(VfioError) as twice:
            group.set_container(container)
        assert twice.value.errno == errno.EBUSY
        assert str(twice.value) == (
            "GROUP_SET_CONTAINER on /dev/vfio/9: already in container /dev/vfio/vfio (EBUSY); "
            "unset the container first"
        )
        # Past the layer, the kernel says EINVAL (vfio_group_ioctl_set_container).
        with pytest.raises(OSError, match="Invalid argument") as kernel_twice:
            fake.group_set_container(group.fileno(), container.fileno())
        assert kernel_twice.value.errno == errno.EINVAL


def test_set_container_with_something_else(fake: FakeKernel, memfd: int) -> None:
    with Group.open(fake, 9) as group:
        with pytest.raises(OSError, match="File descriptor in bad state") as not_container:
            fake.group_set_container(group.fileno(), memfd)
        assert not_container.value.errno == errno.EBADFD
        closed = os.dup(memfd)
        os.close(closed)
        with pytest.raises(OSError, match="Bad file descriptor") as bad:
            fake.group_set_container(group.fileno(), closed)
        assert bad.value.errno == errno.EBADF
        with pytest.raises(OSError, match="Invalid argument") as not_set:
            fake.group_unset_container(group.fileno())
        assert not_set.value.errno == errno.EINVAL
        assert group.status() == abi.GroupFlag.VIABLE


def test_unset_container_while_a_device_is_open(fake: FakeKernel) -> None:
    with legacy(fake) as (container, group), group.open_device(NIC.address):
        with pytest.raises(VfioError) as busy:
            group.unset_container()
        assert busy.value.errno == errno.EBUSY
        assert busy.value.operation == "GROUP_UNSET_CONTAINER"
        assert group.container is container


# Device.


def test_device_info_regions_and_ids(fake: FakeKernel) -> None:
    with legacy(fake) as (_, group), group.open_device("00:10.0") as device:  # short form
        assert device.name == NIC.address
        assert device.target == "device 0000:00:10.0 of /dev/vfio/9"
        info = device.info()
        assert info.flags == abi.DeviceFlag.PCI | abi.DeviceFlag.RESET
        assert (info.num_regions, info.num_irqs) == (9, 5)
        config = device.region_info(abi.PciRegion.CONFIG)
        assert config.flags == abi.RegionFlag.READ | abi.RegionFlag.WRITE
        assert (config.size, config.offset) == (4096, 7 << 40)
        assert device.region_info(abi.PciRegion.BAR0).size == 0  # not implemented
        assert device.read_config(0, 4) == IDS_LE
        assert (device.vendor_id, device.device_id) == (0x8086, 0x10D3)
        with pytest.raises(VfioError) as no_region:
            device.region_info(9)
        assert no_region.value.errno == errno.EINVAL


def test_write_config_reaches_the_device(fake: FakeKernel) -> None:
    with legacy(fake) as (_, group), group.open_device(NIC.address) as device:
        command = int.from_bytes(device.read_config(4, 2), "little")
        device.write_config(4, (command ^ 0x2).to_bytes(2, "little"))
        assert int.from_bytes(device.read_config(4, 2), "little") == command ^ 0x2
        assert fake.config_space(NIC.address)[4:6] == (command ^ 0x2).to_bytes(2, "little")
        # vfio-pci keeps the IDs read-only.
        device.write_config(0, b"\xff\xff\xff\xff")
        assert device.read_config(0, 4) == IDS_LE


def test_reset_is_counted_and_restores_config(fake: FakeKernel) -> None:
    with legacy(fake) as (_, group), group.open_device(NIC.address) as device:
        device.write_config(4, b"\x06\x00")
        assert fake.reset_count(NIC.address) == 0
        device.reset()
        device.reset()
        assert fake.reset_count(NIC.address) == 2
        assert device.read_config(4, 2) == b"\x00\x00"


def test_reset_without_a_reset_method(fake: FakeKernel) -> None:
    with legacy(fake, 12) as (_, group), group.open_device(NO_RESET.address) as device:
        assert not device.info().flags & abi.DeviceFlag.RESET
        with pytest.raises(VfioError) as refused:
            device.reset()
        assert str(refused.value) == (
            "DEVICE_RESET on device 0000:01:00.0 of /dev/vfio/12: Invalid argument (EINVAL); "
            "the device has no reset method (see reset_method in sysfs)"
        )
        assert fake.reset_count(NO_RESET.address) == 0


@pytest.mark.parametrize(
    ("offset", "size", "shown"),
    [(4095, 2, "4095..4097"), (4096, 1, "4096..4097"), (-1, 1, "-1..0"), (0, 4097, "0..4097")],
)
def test_config_access_out_of_range(fake: FakeKernel, offset: int, size: int, shown: str) -> None:
    with legacy(fake) as (_, group), group.open_device(NIC.address) as device:
        with pytest.raises(VfioError) as outside:
            device.read_config(offset, size)
        assert str(outside.value) == (
            f"config access on device 0000:00:10.0 of /dev/vfio/9: bytes {shown} are outside "
            "the 4096-byte config space (EINVAL)"
        )
        with pytest.raises(VfioError) as write_outside:
            device.write_config(offset, bytes(size))
        assert write_outside.value.errno == errno.EINVAL
        # The kernel itself answers EFAULT (vfio_config_do_rw).
        with pytest.raises(OSError, match="Bad address") as kernel_outside:
            fake.pread(device.fileno(), 2, (7 << 40) + 4095)
        assert kernel_outside.value.errno == errno.EFAULT


def test_conventional_pci_config_space_is_256_bytes(fake: FakeKernel) -> None:
    kernel = FakeKernel()
    kernel.add_group(3, devices=[FakePciDevice("0000:00:1f.3", config_size=256)])
    with legacy(kernel, 3) as (_, group), group.open_device("0000:00:1f.3") as device:
        assert device.region_info(abi.PciRegion.CONFIG).size == 256
        with pytest.raises(VfioError, match="outside the 256-byte config space"):
            device.read_config(255, 2)
    assert_clean(kernel)


def test_open_device_errors(fake: FakeKernel) -> None:
    with Container.open(fake) as container, Group.open(fake, 9) as group:
        with pytest.raises(VfioError) as no_container:
            group.open_device(NIC.address)
        assert str(no_container.value) == (
            "GROUP_GET_DEVICE_FD on /dev/vfio/9: Invalid argument (EINVAL); set a container "
            "and its IOMMU model first, and name a device of this group"
        )
        group.set_container(container)
        with pytest.raises(VfioError) as no_iommu:
            group.open_device(NIC.address)
        assert no_iommu.value.errno == errno.EINVAL
        container.set_iommu()
        with pytest.raises(VfioError) as foreign:
            group.open_device(SATA.address)  # in group 11
        assert foreign.value.errno == errno.ENODEV
        assert str(foreign.value).endswith(
            "(ENODEV); that device is not in this group (see /sys/kernel/iommu_groups/N/devices)"
        )
        with pytest.raises(VfioError) as malformed:
            group.open_device("00:10")
        assert malformed.value.errno == errno.EINVAL
        assert str(malformed.value) == (
            "GROUP_GET_DEVICE_FD on /dev/vfio/9: malformed PCI address '00:10': expected "
            "DDDD:BB:DD.F in hex (as in /sys/bus/pci/devices), for example 0000:00:10.0 (EINVAL)"
        )
        assert list(fake.open_nodes().values()) == [CONTAINER, "/dev/vfio/9"]


def test_device_bar_region_and_mmap(fake: FakeKernel) -> None:
    with legacy(fake, 12) as (_, group), group.open_device(NO_RESET.address) as device:
        bar = device.region_info(abi.PciRegion.BAR0)
        assert bar.flags == abi.RegionFlag.READ | abi.RegionFlag.WRITE | abi.RegionFlag.MMAP
        assert (bar.size, bar.offset) == (MiB, 0)
        address = fake.mmap_shared(device.fileno(), MiB, bar.offset)
        assert address % 4096 == 0
        assert fake.mmaps() == {address: MiB}
        fake.munmap(address, MiB)
        with pytest.raises(OSError, match="Invalid argument"):
            fake.mmap_shared(device.fileno(), 4096, 7 << 40)  # config space has no mmap
        assert fake.pread(device.fileno(), 4, 0) == bytes(4)


# DMA through a legacy container.


def test_map_memfd_at_iova_zero_and_unmap(fake: FakeKernel, memfd: int) -> None:
    with legacy(fake) as (container, _):
        with DmaMapping.map_memfd(fake, container, memfd, 0, 2 * MiB, iova=0) as mapping:
            assert mapping.iova == 0
            assert fake.mappings(container.fileno()) == (
                FakeDmaMapping(iova=0, size=2 * MiB, vaddr=mapping.vaddr, read=True, write=True),
            )
            assert fake.mmaps() == {mapping.vaddr: 2 * MiB}
            assert fake.pinned_bytes == 2 * MiB
        assert fake.mappings(container.fileno()) == ()
        assert fake.mmaps() == {}
        assert fake.pinned_bytes == 0
        mapping.unmap()  # once is enough


def test_unmap_returns_the_size_and_frees_the_range(fake: FakeKernel, memfd: int) -> None:
    with legacy(fake) as (container, _), user_memory(fake, memfd, MiB) as vaddr:
        container.map_dma(vaddr, 0x100000, MiB, write=False)
        assert fake.mappings(container.fileno())[0].write is False
        assert container.unmap_dma(0x100000, MiB) == MiB
        container.map_dma(vaddr, 0x100000, MiB)
        assert container.unmap_dma(0x100000, MiB) == MiB
        assert container.unmap_dma(0x100000, MiB) == 0  # type1: nothing there, nothing undone


def test_overlapping_map_is_refused(fake: FakeKernel, memfd: int) -> None:
    with (
        legacy(fake) as (container, _),
        DmaMapping.map_memfd(fake, container, memfd, 0, 2 * MiB, iova=0) as mapping,
    ):
        with pytest.raises(VfioError) as overlap:
            container.map_dma(mapping.vaddr, MiB, 4096)
        assert overlap.value.errno == errno.EEXIST
        assert str(overlap.value) == (
            "IOMMU_MAP_DMA on /dev/vfio/vfio: File exists (EEXIST); part of that IOVA range "
            "is mapped already; unmap it first"
        )
        assert len(fake.mappings(container.fileno())) == 1


@pytest.mark.parametrize(
    ("size", "iova"),
    [(2 * MiB, 123), (2 * MiB, 0x800), (4096 + 1, 0)],
    ids=["iova-123", "iova-2k", "size-4097"],
)
def test_unaligned_map_is_refused(fake: FakeKernel, memfd: int, size: int, iova: int) -> None:
    with legacy(fake) as (container, _):
        with pytest.raises(VfioError) as unaligned:
            DmaMapping.map_memfd(fake, container, memfd, 0, size, iova=iova)
        assert unaligned.value.errno == errno.EINVAL
        assert str(unaligned.value) == (
            "IOMMU_MAP_DMA on /dev/vfio/vfio: Invalid argument (EINVAL); the address, IOVA "
            "and size must be non-zero multiples of the IOMMU page size, inside one of the "
            "valid IOVA ranges"
        )
        assert fake.mmaps() == {}  # map_memfd undid its mmap


def test_unaligned_memfd_offset_is_refused_at_mmap(fake: FakeKernel, memfd: int) -> None:
    with legacy(fake) as (container, _):
        with pytest.raises(VfioError) as refused:
            DmaMapping.map_memfd(fake, container, memfd, 100, MiB, iova=0)
        assert refused.value.operation == "mmap"
        assert str(refused.value) == (
            f"mmap on fd {memfd}: Invalid argument (EINVAL); pass a memfd (or other shareable "
            "file) at least offset+size long, with page-aligned offset and size"
        )


def test_map_outside_the_iova_ranges_is_refused(fake: FakeKernel, memfd: int) -> None:
    with legacy(fake) as (container, _), user_memory(fake, memfd, MiB) as vaddr:
        with pytest.raises(VfioError) as msi_window:
            container.map_dma(vaddr, 0xFEE0_0000, MiB)
        assert msi_window.value.errno == errno.EINVAL
        assert "inside one of the valid IOVA ranges" in str(msi_window.value)
        with pytest.raises(VfioError) as beyond:
            container.map_dma(vaddr, 1 << 48, MiB)
        assert beyond.value.errno == errno.EINVAL


def test_custom_iova_ranges_and_page_sizes(memfd: int) -> None:
    kernel = FakeKernel(iova_ranges=[IovaRange(0x10_0000, 0xFFFF_FFFF)], iova_pgsizes=64 * KiB)
    kernel.add_group(9, devices=[NIC])
    with legacy(kernel) as (container, _), user_memory(kernel, memfd, MiB) as vaddr:
        assert container.iova_ranges() == (IovaRange(0x10_0000, 0xFFFF_FFFF),)
        assert container.info().iova_pgsizes == 64 * KiB
        with pytest.raises(VfioError, match="inside one of the valid IOVA ranges"):
            container.map_dma(vaddr, 0, MiB)
        with pytest.raises(VfioError, match="multiples of the IOMMU page size"):
            container.map_dma(vaddr, 0x10_0000 + 4 * KiB, 60 * KiB)
        container.map_dma(vaddr, 0x10_0000, MiB)
        assert container.unmap_dma(0x10_0000, MiB) == MiB
    assert_clean(kernel)


def test_map_over_the_memlock_limit_is_refused(fake: FakeKernel, memfd: int) -> None:
    fake.memlock_limit = 3 * MiB
    with (
        legacy(fake) as (container, _),
        DmaMapping.map_memfd(fake, container, memfd, 0, 2 * MiB, iova=0),
    ):
        with pytest.raises(VfioError) as over:
            DmaMapping.map_memfd(fake, container, memfd, 2 * MiB, 2 * MiB, iova=2 * MiB)
        assert over.value.errno == errno.ENOMEM
        assert str(over.value) == (
            "IOMMU_MAP_DMA on /dev/vfio/vfio: Cannot allocate memory (ENOMEM); pinning the "
            "pages exceeds RLIMIT_MEMLOCK; raise the limit of the process that maps "
            "(ulimit -l) or map less"
        )
        assert fake.pinned_bytes == 2 * MiB
        assert len(fake.mappings(container.fileno())) == 1
        assert len(fake.mmaps()) == 1


def test_map_of_memory_not_mapped_in_the_process(fake: FakeKernel, memfd: int) -> None:
    with legacy(fake) as (container, _):
        with pytest.raises(VfioError) as nowhere:
            container.map_dma(0x1000_0000, 0, 4096)
        assert nowhere.value.errno == errno.EFAULT
        assert str(nowhere.value).endswith(
            "(EFAULT); the virtual address is not mapped in this process"
        )
        # A mapping past the end of the memfd has no pages to pin.
        with pytest.raises(VfioError) as past_end:
            DmaMapping.map_memfd(fake, container, memfd, 2 * MiB, 4 * MiB, iova=0)
        assert past_end.value.errno == errno.EFAULT
        assert fake.mappings(container.fileno()) == ()


def test_map_before_set_iommu_is_refused(fake: FakeKernel, memfd: int) -> None:
    with (
        Container.open(fake) as container,
        Group.open(fake, 9) as group,
        user_memory(fake, memfd, MiB) as vaddr,
    ):
        group.set_container(container)
        with pytest.raises(VfioError) as refused:
            container.map_dma(vaddr, 0, MiB)
        assert str(refused.value) == (
            "IOMMU_MAP_DMA on /dev/vfio/vfio: no IOMMU model set (EINVAL); call set_iommu() "
            "after attaching a group"
        )
        # Without an IOMMU driver the container answers EINVAL to IOMMU ioctls.
        with pytest.raises(OSError, match="Invalid argument"):
            fake.iommu_map_dma(container.fileno(), vaddr, 0, MiB, abi.DmaMapFlag.READ)


def test_last_group_leaving_drops_the_iommu_and_its_mappings(fake: FakeKernel, memfd: int) -> None:
    with (
        Container.open(fake) as container,
        Group.open(fake, 9) as group,
        user_memory(fake, memfd, MiB) as vaddr,
    ):
        group.set_container(container)
        container.set_iommu()
        container.map_dma(vaddr, 0, MiB)
        assert fake.pinned_bytes == MiB
        group.unset_container()
        assert fake.mappings(container.fileno()) == ()
        assert fake.pinned_bytes == 0
        with pytest.raises(OSError, match="Invalid argument"):
            fake.iommu_get_info(container.fileno())
        # The container is back to its unset state: a group makes it usable again.
        group.set_container(container)
        assert container.set_iommu() is abi.IommuType.TYPE1v2


def test_container_forgets_its_iommu_model_with_its_last_group(
    fake: FakeKernel, memfd: int
) -> None:
    with (
        Container.open(fake) as container,
        Group.open(fake, 9) as group,
        user_memory(fake, memfd, MiB) as vaddr,
    ):
        group.set_container(container)
        container.set_iommu()
        group.unset_container()
        with pytest.raises(VfioError) as refused:
            container.map_dma(vaddr, 0, MiB)
        assert "no IOMMU model set" in str(refused.value)
        assert container.iommu_type is None


def test_set_iommu_twice_says_it_is_set(fake: FakeKernel) -> None:
    with legacy(fake) as (container, _):
        with pytest.raises(VfioError) as twice:
            container.set_iommu()
        assert "attach a group first" not in str(twice.value)
        assert "already" in str(twice.value)


# No-IOMMU mode.


def test_noiommu_container(noiommu: FakeKernel, memfd: int) -> None:
    with Container.open(noiommu) as container, Group.open(noiommu, "noiommu-0") as group:
        assert group.target == "/dev/vfio/noiommu-0"
        assert group.noiommu
        assert group.viable
        assert container.check_extension(abi.IommuType.NOIOMMU)
        group.set_container(container)
        # With a no-IOMMU group inside, only the no-IOMMU driver answers.
        assert not container.check_extension(abi.IommuType.TYPE1v2)
        assert container.set_iommu() is abi.IommuType.NOIOMMU
        assert container.noiommu
        with group.open_device(NIC.address) as device:
            assert (device.vendor_id, device.device_id) == (0x8086, 0x10D3)

        with pytest.raises(NotSupportedError) as refused:
            container.map_dma(0x10000, 0, 4096)
        assert refused.value.errno == errno.EOPNOTSUPP
        name = errno.errorcode[errno.EOPNOTSUPP]  # Python calls 95 ENOTSUP on Linux
        assert str(refused.value) == (
            "IOMMU_MAP_DMA on /dev/vfio/vfio: a no-IOMMU container has no IOMMU to translate "
            "DMA: the device reaches all of physical memory, and there is nothing to map "
            f"({name}); give the device's DMA addresses as physical addresses instead"
        )
        with pytest.raises(NotSupportedError, match="no-IOMMU container has no IOMMU"):
            container.iova_ranges()
        with pytest.raises(NotSupportedError, match="no-IOMMU container has no IOMMU"):
            DmaMapping.map_memfd(noiommu, container, memfd, 0, MiB, iova=0)
        assert noiommu.mmaps() == {}
        # Past the layer the no-IOMMU driver knows no IOMMU ioctl.
        with pytest.raises(OSError, match="Inappropriate ioctl") as kernel_refused:
            noiommu.iommu_get_info(container.fileno())
        assert kernel_refused.value.errno == errno.ENOTTY


def test_noiommu_group_needs_cap_sys_rawio(noiommu: FakeKernel) -> None:
    noiommu.cap_sys_rawio = False
    with pytest.raises(VfioError) as refused:
        Group.open(noiommu, "noiommu-0")
    assert refused.value.errno == errno.EPERM
    assert str(refused.value) == (
        "open on /dev/vfio/noiommu-0: Operation not permitted (EPERM); "
        "no-IOMMU groups need CAP_SYS_RAWIO"
    )
    assert noiommu.open_nodes() == {}


def test_noiommu_group_needs_its_name(noiommu: FakeKernel) -> None:
    with pytest.raises(VfioError) as missing:
        Group.open(noiommu, 0)
    assert missing.value.errno == errno.ENOENT


def test_mixing_noiommu_and_real_groups_says_why(fake: FakeKernel) -> None:
    fake.add_group("noiommu-3", devices=[FakePciDevice("0000:00:02.0")])
    with legacy(fake) as (container, _), Group.open(fake, "noiommu-3") as unsafe:
        assert unsafe.viable
        with pytest.raises(VfioError) as refused:
            unsafe.set_container(container)
        assert refused.value.errno == errno.EPERM
        assert "not viable" not in str(refused.value)


# iommufd and device cdevs.


def test_ioas_alloc_and_ranges(fake: FakeKernel) -> None:
    with IommuFd.open(fake) as iommufd:
        first, second = iommufd.alloc_ioas(), iommufd.alloc_ioas()
        assert (first.id, second.id) == (1, 2)  # iommufd object ids start at 1
        assert first.target == "IOAS 1 of /dev/iommu"
        # No device attached: nothing reserved yet.
        assert first.ranges() == fake.ioas_iova_ranges(iommufd.fileno(), 1)
        assert first.iova_ranges() == (IovaRange(0, (1 << 64) - 1),)
        assert first.ranges().alignment == 1
        second.destroy()
        with pytest.raises(VfioError) as gone:
            second.ranges()
        assert gone.value.errno == errno.ENOENT


def test_cdev_bind_attach_map_unmap_detach(fake: FakeKernel, memfd: int) -> None:
    path = fake.cdev_path(NIC.address)
    assert path == "/dev/vfio/devices/vfio0"
    with IommuFd.open(fake) as iommufd, CdevDevice.open(fake, path, NIC.address) as device:
        ioas = iommufd.alloc_ioas()
        # Until it is bound, the cdev fd can do nothing.
        with pytest.raises(VfioError) as unbound:
            device.info()
        assert unbound.value.operation == "DEVICE_GET_INFO"
        assert unbound.value.errno == errno.EINVAL

        devid = device.bind(iommufd)
        assert devid == device.devid == 2
        hwpt = device.attach(ioas)
        assert hwpt not in (ioas.id, devid)  # the kernel made a domain for the IOAS
        ranges = ioas.ranges()
        assert ranges.ranges == DEFAULT_IOVA_RANGES
        assert ranges.alignment == 4096
        assert (device.vendor_id, device.device_id) == (0x8086, 0x10D3)

        with DmaMapping.map_memfd(fake, ioas, memfd, 0, 2 * MiB, iova=0x200000) as mapping:
            assert fake.mappings(iommufd.fileno(), ioas.id) == (
                FakeDmaMapping(0x200000, 2 * MiB, mapping.vaddr, read=True, write=True),
            )
            assert fake.pinned_bytes == 2 * MiB
            with pytest.raises(VfioError) as overlap:
                ioas.map_dma(mapping.vaddr, 0x200000, 4096)
            assert overlap.value.errno == errno.EEXIST
            assert "unmap it first" in str(overlap.value)
        # IOVA 0 is a valid address here too; unmap reports what it undid.
        with user_memory(fake, memfd, MiB) as vaddr:
            ioas.map_dma(vaddr, 0, MiB)
            assert ioas.unmap_dma(0, MiB) == MiB

        device.detach()
        assert ioas.ranges().alignment == 1  # no domain left
        ioas.destroy()
        assert fake.open_nodes() == {iommufd.fileno(): "/dev/iommu", device.fileno(): path}


def test_cdev_bind_while_the_group_is_open_legacy(fake: FakeKernel) -> None:
    with (
        Group.open(fake, 9),
        IommuFd.open(fake) as iommufd,
        CdevDevice.open(fake, fake.cdev_path(NIC.address), NIC.address) as device,
    ):
        with pytest.raises(VfioError) as busy:
            device.bind(iommufd)
        assert busy.value.errno == errno.EBUSY
        assert str(busy.value).endswith("(EBUSY); its group is open through the legacy interface")
        assert device.devid is None


def test_group_open_while_a_cdev_is_bound(fake: FakeKernel) -> None:
    with bound_cdev(fake):
        with pytest.raises(VfioError) as busy:
            Group.open(fake, 9)
        assert busy.value.errno == errno.EBUSY
    with Group.open(fake, 9) as group:  # the cdev is closed: the group is free
        assert group.viable


def test_group_open_while_a_cdev_is_bound_says_why(fake: FakeKernel) -> None:
    with bound_cdev(fake), pytest.raises(VfioError) as busy:
        Group.open(fake, 9)
    assert "cdev" in str(busy.value) or "iommufd" in str(busy.value)


def test_cdev_bound_twice(fake: FakeKernel) -> None:
    with bound_cdev(fake) as (iommufd, _, device):
        with pytest.raises(VfioError) as twice:
            device.bind(iommufd)
        assert twice.value.operation == "DEVICE_BIND_IOMMUFD"
        # Linux answers EINVAL here (vfio_df_ioctl_bind_iommufd), not EBUSY.
        assert twice.value.errno == errno.EINVAL
        # A second cdev fd of the same device cannot bind either.
        with CdevDevice.open(fake, device.target, NIC.address) as other:
            with pytest.raises(VfioError) as second_fd:
                other.bind(iommufd)
            assert second_fd.value.errno == errno.EINVAL


def test_cdev_bound_twice_says_so(fake: FakeKernel) -> None:
    with bound_cdev(fake) as (iommufd, _, device), pytest.raises(VfioError) as twice:
        device.bind(iommufd)
    assert "already bound" in str(twice.value)


def test_attach_errors(fake: FakeKernel) -> None:
    with (
        IommuFd.open(fake) as iommufd,
        CdevDevice.open(fake, fake.cdev_path(NIC.address), NIC.address) as device,
    ):
        ioas = iommufd.alloc_ioas()
        with pytest.raises(VfioError) as unbound:
            device.attach(ioas)
        assert str(unbound.value) == (
            "DEVICE_ATTACH_IOMMUFD_PT on /dev/vfio/devices/vfio0: Invalid argument (EINVAL); "
            "bind the device to an iommufd first, and attach an IOAS of that iommufd"
        )
        device.bind(iommufd)
        with pytest.raises(VfioError) as unknown:
            device.attach(Ioas(iommufd, 4242))
        assert unknown.value.errno == errno.ENOENT
        with pytest.raises(VfioError) as not_a_pt:
            device.attach(Ioas(iommufd, device.devid or 0))  # a device is no page table
        assert not_a_pt.value.errno == errno.EINVAL
        device.detach()  # not attached: nothing to do


def test_unknown_ioas(fake: FakeKernel) -> None:
    with IommuFd.open(fake) as iommufd:
        with pytest.raises(VfioError) as unknown:
            Ioas(iommufd, 4242).iova_ranges()
        assert unknown.value.errno == errno.ENOENT
        assert str(unknown.value) == (
            "IOAS_IOVA_RANGES on IOAS 4242 of /dev/iommu: No such file or directory (ENOENT); "
            "the IOAS does not exist (destroyed, or from another iommufd)"
        )


def test_ioas_unmap_of_an_unmapped_range_blames_the_range(fake: FakeKernel) -> None:
    with IommuFd.open(fake) as iommufd:
        ioas = iommufd.alloc_ioas()
        with pytest.raises(VfioError) as nothing:
            ioas.unmap_dma(0, 4096)
        assert nothing.value.errno == errno.ENOENT
        assert "IOAS does not exist" not in str(nothing.value)


def test_ioas_unmap_refuses_to_split(fake: FakeKernel, memfd: int) -> None:
    with (
        IommuFd.open(fake) as iommufd,
        user_memory(fake, memfd, 2 * MiB) as vaddr,
    ):
        ioas = iommufd.alloc_ioas()
        ioas.map_dma(vaddr, 0, 2 * MiB)
        with pytest.raises(VfioError) as split:
            ioas.unmap_dma(0, MiB)
        assert split.value.errno == errno.ENOENT
        assert ioas.unmap_dma(0, 4 * MiB) == 2 * MiB  # a superset is fine


def test_ioas_map_without_fixed_iova_picks_one(fake: FakeKernel, memfd: int) -> None:
    with IommuFd.open(fake) as iommufd, user_memory(fake, memfd, 2 * MiB) as vaddr:
        ioas = iommufd.alloc_ioas()
        fd, flags = iommufd.fileno(), abi.IoasMapFlag.READABLE | abi.IoasMapFlag.WRITEABLE
        first = fake.ioas_map(fd, ioas.id, vaddr, MiB, 0, flags)
        second = fake.ioas_map(fd, ioas.id, vaddr + MiB, MiB, 0, flags)
        assert first != 0  # never IOVA 0
        assert first % MiB == second % MiB == 0
        assert abs(second - first) >= MiB
        assert fake.ioas_unmap(fd, ioas.id, 0, (1 << 64) - 1) == 2 * MiB  # everything
        with pytest.raises(OSError, match="Invalid argument"):
            fake.ioas_map(fd, ioas.id, vaddr, MiB, 0, abi.IoasMapFlag.FIXED_IOVA)  # no access


def test_ioas_pins_only_once_a_device_is_attached(fake: FakeKernel, memfd: int) -> None:
    fake.memlock_limit = MiB
    with (
        IommuFd.open(fake) as iommufd,
        CdevDevice.open(fake, fake.cdev_path(NIC.address), NIC.address) as device,
        user_memory(fake, memfd, 2 * MiB) as vaddr,
    ):
        ioas = iommufd.alloc_ioas()
        device.bind(iommufd)
        ioas.map_dma(vaddr, 0, 2 * MiB)
        assert fake.pinned_bytes == 0
        with pytest.raises(VfioError) as over:
            device.attach(ioas)  # the first domain pins every mapping
        assert over.value.errno == errno.ENOMEM
        assert ioas.unmap_dma(0, 2 * MiB) == 2 * MiB
        device.attach(ioas)
        with pytest.raises(VfioError) as over_at_map:
            ioas.map_dma(vaddr, 0, 2 * MiB)
        assert "RLIMIT_MEMLOCK" in str(over_at_map.value)


def test_ioas_in_use_cannot_be_destroyed(fake: FakeKernel) -> None:
    with bound_cdev(fake) as (_, ioas, device):
        with pytest.raises(VfioError) as busy:
            ioas.destroy()
        assert busy.value.errno == errno.EBUSY
        device.detach()
        ioas.destroy()


def test_iommufd_rlimit_mode(fake: FakeKernel) -> None:
    with IommuFd.open(fake) as iommufd:
        assert iommufd.rlimit_mode == 0
        iommufd.rlimit_mode = 1
        assert iommufd.rlimit_mode == 1
        iommufd.alloc_ioas()
        with pytest.raises(VfioError) as busy:
            iommufd.rlimit_mode = 0  # only while the iommufd holds no object
        assert busy.value.errno == errno.EBUSY
    with IommuFd.open(fake) as unprivileged:
        fake.cap_sys_resource = False
        with pytest.raises(VfioError) as refused:
            unprivileged.rlimit_mode = 1
        assert str(refused.value) == (
            "IOMMUFD_OPTION on /dev/iommu: Operation not permitted (EPERM); "
            "changing the RLIMIT mode needs CAP_SYS_RESOURCE"
        )


def test_no_iommufd() -> None:
    kernel = FakeKernel(iommufd=False)
    with pytest.raises(VfioError) as missing:
        IommuFd.open(kernel)
    assert str(missing.value) == (
        "open on /dev/iommu: No such file or directory (ENOENT); "
        "the kernel has no iommufd (needs CONFIG_IOMMUFD)"
    )
    assert_clean(kernel)


def test_closing_the_iommufd_first_keeps_the_bound_device_working(fake: FakeKernel) -> None:
    with bound_cdev(fake) as (iommufd, ioas, device):
        iommufd.close()
        with pytest.raises(VfioError) as closed:
            ioas.ranges()
        assert str(closed.value) == (
            "use on /dev/iommu: the iommufd is closed (EBADF); open the iommufd again"
        )
        device.detach()  # the device still holds the iommufd context
        assert device.vendor_id == 0x8086


# Bad input and misuse.


def test_nonexistent_group(fake: FakeKernel) -> None:
    with pytest.raises(VfioError) as missing:
        Group.open(fake, 999)
    assert missing.value.errno == errno.ENOENT
    assert str(missing.value) == (
        "open on /dev/vfio/999: No such file or directory (ENOENT); no such VFIO group: bind "
        "the group's devices to vfio-pci first (the node appears once one member is bound)"
    )
    assert fake.open_nodes() == {}


@pytest.mark.parametrize(
    "name",
    [
        "vfio",
        "../vfio",
        "9/../vfio",
        "-1",
        -1,
        "noiommu-",
        "",
        " 9",
        "\u0669",  # ARABIC-INDIC DIGIT NINE: decimal to Python, not a group name
    ],
)
def test_malformed_group_name(fake: FakeKernel, name: int | str) -> None:
    with pytest.raises(VfioError) as malformed:
        Group.open(fake, name)
    assert malformed.value.errno == errno.EINVAL
    assert str(malformed.value) == (
        f"open on group {str(name)!r}: not an IOMMU group name (EINVAL); give the group "
        "number (as in /sys/kernel/iommu_groups) or noiommu-N"
    )
    assert fake.open_nodes() == {}


def test_malformed_pci_address_for_a_cdev() -> None:
    with pytest.raises(VfioError) as malformed:
        cdev_path("0000:00:10")
    assert malformed.value.errno == errno.EINVAL
    assert "expected DDDD:BB:DD.F in hex" in str(malformed.value)


def test_container_node_opened_as_a_group(fake: FakeKernel) -> None:
    fake.add_link("/fake/7", CONTAINER)
    with pytest.raises(VfioError) as not_group:
        Group.open(fake, 7, dev_dir="/fake")
    assert str(not_group.value) == (
        "GROUP_GET_STATUS on /fake/7: Invalid argument (EINVAL); /fake/7 is not a VFIO group node"
    )
    assert fake.open_nodes() == {}


def test_group_node_opened_as_a_container(fake: FakeKernel) -> None:
    with pytest.raises(VfioError) as not_container:
        Container.open(fake, "/dev/vfio/9")
    assert not_container.value.errno == errno.ENOTTY
    assert str(not_container.value) == (
        "GET_API_VERSION on /dev/vfio/9: Inappropriate ioctl for device (ENOTTY); "
        "/dev/vfio/9 is not a VFIO container node (expected /dev/vfio/vfio)"
    )
    assert fake.open_nodes() == {}
    with Group.open(fake, 9) as group:  # the failed open left the group free
        assert group.viable


def test_foreign_file_opened_as_a_container(fake: FakeKernel) -> None:
    fake.add_file("/dev/null")
    with pytest.raises(VfioError) as wrong_type:
        Container.open(fake, "/dev/null")
    assert wrong_type.value.errno == errno.ENOTTY
    assert "/dev/null is not a VFIO container node" in str(wrong_type.value)
    assert fake.open_nodes() == {}


def test_ioctls_on_the_wrong_kind_of_fd(fake: FakeKernel, memfd: int) -> None:
    with legacy(fake) as (container, group), IommuFd.open(fake) as iommufd:
        for call in (
            lambda: fake.device_get_info(group.fileno()),
            lambda: fake.group_get_status(container.fileno()),  # passed to type1
            lambda: fake.get_api_version(group.fileno()),
            lambda: fake.ioas_alloc(container.fileno()),
            lambda: fake.get_api_version(iommufd.fileno()),  # VFIO compat: not modelled
            lambda: fake.device_reset(memfd),  # not a VFIO file at all
        ):
            with pytest.raises(OSError, match="Inappropriate ioctl for device") as wrong:
                call()
            assert wrong.value.errno == errno.ENOTTY
    # A container without an IOMMU driver answers EINVAL to what it does not know.
    with Container.open(fake) as bare, pytest.raises(OSError, match="Invalid argument"):
        fake.group_get_status(bare.fileno())


def test_closed_handles_refuse_to_be_used(fake: FakeKernel) -> None:
    with legacy(fake) as (container, group):
        device = group.open_device(NIC.address)
        device.close()
        with pytest.raises(VfioError) as closed_device:
            device.info()
        assert str(closed_device.value) == (
            "use on device 0000:00:10.0 of /dev/vfio/9: the device is closed (EBADF); "
            "open the device again"
        )
    assert group.closed
    assert container.closed
    with pytest.raises(VfioError) as closed_group:
        group.status()
    assert closed_group.value.errno == errno.EBADF
    assert str(closed_group.value) == (
        "use on /dev/vfio/9: the group is closed (EBADF); open the group again"
    )
    with pytest.raises(VfioError, match="the container is closed"):
        container.check_extension(abi.IommuType.TYPE1v2)
    group.close()  # closing twice is fine
    assert fake.open_nodes() == {}


def test_fd_closed_behind_the_layers_back(fake: FakeKernel) -> None:
    # The kernel's EBADF comes through for an fd closed outside the model.
    fd = fake.open(CONTAINER, os.O_RDWR)
    os.close(fd)
    with pytest.raises(OSError, match="Bad file descriptor") as badf:
        fake.get_api_version(fd)
    assert badf.value.errno == errno.EBADF
    assert fake.open_nodes() == {}

    group = Group.open(fake, 9)
    os.close(group.fileno())
    with pytest.raises(VfioError) as gone:
        group.status()
    assert str(gone.value) == "GROUP_GET_STATUS on /dev/vfio/9: Bad file descriptor (EBADF)"
    with Group.open(fake, 9) as again:  # closing the fd released the group node
        assert again.viable
    with pytest.raises(OSError, match="Bad file descriptor"):
        group.close()
    assert group.closed
    assert fake.open_nodes() == {}


def test_injected_failure_leaves_nothing_open(fake: FakeKernel) -> None:
    fake.fail_next("group_get_status", errno.EIO)
    with pytest.raises(VfioError) as failed:
        Group.open(fake, 9)
    assert str(failed.value) == "GROUP_GET_STATUS on /dev/vfio/9: Input/output error (EIO)"
    assert fake.open_nodes() == {}
    with Group.open(fake, 9) as group:  # only the next call failed
        assert group.viable
    with pytest.raises(ValueError, match="not a Kernel method"):
        fake.fail_next("add_group", errno.EIO)


# Fds that leave the model's sight: dups and fds passed over a socket.


def test_dup_of_a_device_fd_keeps_the_group_busy(fake: FakeKernel) -> None:
    with Container.open(fake) as container:
        with Group.open(fake, 9) as group:
            group.set_container(container)
            container.set_iommu()
            device = group.open_device(NIC.address)
            copy = os.dup(device.fileno())
            device.close()
            with pytest.raises(VfioError, match="Device or resource busy"):
                group.unset_container()  # the copy is still a device user
        with pytest.raises(VfioError, match="EBUSY"):
            Group.open(fake, 9)
        assert fake.device_get_info(copy).num_regions == 9  # works like the original
        fake.close(copy)
        with Group.open(fake, 9) as again:
            assert again.status() == abi.GroupFlag.VIABLE


def test_device_fd_passed_over_a_socket(fake: FakeKernel) -> None:
    sender, receiver = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with (
        sender,
        receiver,
        legacy(fake) as (_, group),
        group.open_device(NIC.address) as device,
    ):
        socket.send_fds(sender, [b"fd"], [device.fileno()])
        _, fds, _, _ = socket.recv_fds(receiver, 16, 1)
        (received,) = fds
        assert received != device.fileno()
        assert fake.device_get_info(received) == device.info()
        assert fake.pread(received, 4, 7 << 40) == IDS_LE
        fake.close(received)
        assert device.vendor_id == 0x8086  # the original is still open


# The fake's memory model.


def test_mmap_and_munmap(fake: FakeKernel, memfd: int) -> None:
    first = fake.mmap_shared(memfd, MiB, 0)
    second = fake.mmap_shared(memfd, 4097, MiB)
    assert first % 4096 == second % 4096 == 0
    assert fake.mmaps() == {first: MiB, second: 8192}  # rounded up to pages
    with pytest.raises(OSError, match="Invalid argument"):
        fake.munmap(first + 4096, MiB)  # only whole mappings
    fake.munmap(first, MiB)
    fake.munmap(second, 4097)
    with pytest.raises(OSError, match="Invalid argument"):
        fake.munmap(first, MiB)
    with pytest.raises(OSError, match="Invalid argument"):
        fake.mmap_shared(memfd, 0, 0)
    closed = os.dup(memfd)
    os.close(closed)
    with pytest.raises(OSError, match="Bad file descriptor"):
        fake.mmap_shared(closed, MiB, 0)
    with Group.open(fake, 9) as group, pytest.raises(OSError, match="No such device"):
        fake.mmap_shared(group.fileno(), MiB, 0)


def test_builder_refuses_impossible_hosts() -> None:
    kernel = FakeKernel()
    kernel.add_group(9, devices=[NIC])
    with pytest.raises(ValueError, match="exists already"):
        kernel.add_group("noiommu-9", devices=[SATA])
    with pytest.raises(ValueError, match="in a group already"):
        kernel.add_group(10, devices=[NIC])
    with pytest.raises(ValueError, match="in a group already"):
        kernel.add_group(10, devices=[SATA, SATA])
    with pytest.raises(ValueError, match="once a device of it is bound"):
        kernel.add_group(10, devices=[])
    with pytest.raises(ValueError, match="expected N or noiommu-N"):
        kernel.add_group("vfio", devices=[SATA])
    with pytest.raises(ValueError, match="malformed PCI address"):
        FakePciDevice("00:10")
    with pytest.raises(ValueError, match="config_size"):
        FakePciDevice("0000:00:10.0", config_size=512)
    assert FakePciDevice("00:10.0").address == "0000:00:10.0"
    assert kernel.add_group(10, devices=[SATA]).path == "/dev/vfio/10"
    assert_clean(kernel)
