"""The syscall layer: one small method per VFIO/iommufd ioctl.

``Kernel`` is the interface every higher layer uses; ``LinuxKernel`` is the
real one (``fcntl.ioctl`` on ``abi`` structs) and ``vfiod.vfio.fake.FakeKernel``
an in-memory kernel model behind the same interface for unit tests. Methods
take and return plain Python values and raise ``OSError`` with the kernel's
errno; the object layer adds what was being done to what.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import dataclasses
import errno
import fcntl
import mmap
import os
import stat
from collections.abc import Collection
from typing import Protocol

from vfiod.vfio import abi


@dataclasses.dataclass(frozen=True)
class IovaRange:
    """An inclusive range of I/O virtual addresses: [start, last]."""

    start: int
    last: int

    @property
    def size(self) -> int:
        return self.last - self.start + 1

    def contains(self, iova: int, size: int) -> bool:
        return size > 0 and self.start <= iova and iova + size - 1 <= self.last


@dataclasses.dataclass(frozen=True)
class IommuInfo:
    """What VFIO_IOMMU_GET_INFO tells about a type1 container."""

    flags: abi.IommuInfoFlag
    iova_pgsizes: int
    iova_ranges: tuple[IovaRange, ...]
    dma_avail: int | None


@dataclasses.dataclass(frozen=True)
class DeviceInfo:
    flags: abi.DeviceFlag
    num_regions: int
    num_irqs: int


@dataclasses.dataclass(frozen=True)
class RegionInfo:
    index: int
    flags: abi.RegionFlag
    size: int
    offset: int


@dataclasses.dataclass(frozen=True)
class IoasRanges:
    ranges: tuple[IovaRange, ...]
    alignment: int


class Kernel(Protocol):
    """The kernel as vfiod sees it. Every method raises OSError on failure."""

    # files and memory
    def open(self, path: str, flags: int) -> int: ...
    def close(self, fd: int) -> None: ...
    # which of ``nodes`` (paths of character devices) ``fd`` is open on; "" if none
    def node_of(self, fd: int, nodes: Collection[str]) -> str: ...
    def pread(self, fd: int, size: int, offset: int) -> bytes: ...
    def pwrite(self, fd: int, data: bytes, offset: int) -> int: ...
    def mmap_shared(self, fd: int, size: int, offset: int) -> int: ...
    def munmap(self, address: int, size: int) -> None: ...

    # container (/dev/vfio/vfio)
    def get_api_version(self, fd: int) -> int: ...
    def check_extension(self, fd: int, extension: int) -> int: ...
    def set_iommu(self, fd: int, iommu_type: int) -> None: ...
    def iommu_get_info(self, fd: int) -> IommuInfo: ...
    def iommu_map_dma(
        self, fd: int, vaddr: int, iova: int, size: int, flags: abi.DmaMapFlag
    ) -> None: ...
    def iommu_unmap_dma(self, fd: int, iova: int, size: int) -> int: ...

    # group (/dev/vfio/N, /dev/vfio/noiommu-N)
    def group_get_status(self, fd: int) -> abi.GroupFlag: ...
    def group_set_container(self, fd: int, container_fd: int) -> None: ...
    def group_unset_container(self, fd: int) -> None: ...
    def group_get_device_fd(self, fd: int, name: str) -> int: ...

    # device (from a group, or a cdev /dev/vfio/devices/vfioX)
    def device_get_info(self, fd: int) -> DeviceInfo: ...
    def device_get_region_info(self, fd: int, index: int) -> RegionInfo: ...
    def device_reset(self, fd: int) -> None: ...
    def device_bind_iommufd(self, fd: int, iommufd: int) -> int: ...
    def device_attach_iommufd_pt(self, fd: int, pt_id: int) -> int: ...
    def device_detach_iommufd_pt(self, fd: int) -> None: ...

    # iommufd (/dev/iommu)
    def iommufd_destroy(self, fd: int, object_id: int) -> None: ...
    def ioas_alloc(self, fd: int) -> int: ...
    def ioas_iova_ranges(self, fd: int, ioas_id: int) -> IoasRanges: ...
    def ioas_map(
        self,
        fd: int,
        ioas_id: int,
        vaddr: int,
        length: int,
        iova: int,
        flags: abi.IoasMapFlag,
    ) -> int: ...
    def ioas_unmap(self, fd: int, ioas_id: int, iova: int, length: int) -> int: ...
    def iommufd_option(
        self, fd: int, option: abi.IommufdOption, op: abi.IommufdOptionOp, value: int
    ) -> int: ...


_CData = ctypes.Structure | ctypes.Array[ctypes.c_char] | ctypes.c_int32


def _ioctl(fd: int, request: abi.Ioctl, arg: _CData | int = 0) -> int:
    """Issue one ioctl and return its result.

    A ctypes argument goes in as a mutable buffer (mutate_flag=True), so the
    kernel's writes are copied back into ``arg`` and the syscall's return value
    comes back too — GROUP_GET_DEVICE_FD returns the new fd that way.
    """
    if isinstance(arg, int):
        return fcntl.ioctl(fd, request, arg)
    buf = bytearray(bytes(arg))
    try:
        result: int = fcntl.ioctl(fd, request, buf, True)
    finally:
        # Copy back on failure too: some errors come with an answer, e.g.
        # IOAS_IOVA_RANGES sets num_iovas along with EMSGSIZE.
        ctypes.memmove(ctypes.addressof(arg), bytes(buf), len(buf))
    return result


_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_libc.munmap.restype = ctypes.c_int
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_FAILED = ctypes.c_void_p(-1).value


def _raise_errno() -> None:
    err = ctypes.get_errno()
    raise OSError(err, os.strerror(err))


def _parse_iova_caps(buf: bytes, first: int) -> tuple[tuple[IovaRange, ...], int | None]:
    """Walk the vfio_info_cap_header chain of an IOMMU_GET_INFO reply."""
    ranges: list[IovaRange] = []
    dma_avail: int | None = None
    offset = first
    seen: set[int] = set()
    header_size = ctypes.sizeof(abi.vfio_info_cap_header)
    while offset and offset not in seen and offset + header_size <= len(buf):
        seen.add(offset)
        header = abi.vfio_info_cap_header.from_buffer_copy(buf, offset)
        if header.id == abi.VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE:
            cap = abi.vfio_iommu_type1_info_cap_iova_range.from_buffer_copy(buf, offset)
            entry = offset + ctypes.sizeof(abi.vfio_iommu_type1_info_cap_iova_range)
            for i in range(cap.nr_iovas):
                r = abi.vfio_iova_range.from_buffer_copy(
                    buf, entry + i * ctypes.sizeof(abi.vfio_iova_range)
                )
                ranges.append(IovaRange(r.start, r.end))
        elif header.id == abi.VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL:
            dma_avail = ctypes.c_uint32.from_buffer_copy(buf, offset + header_size).value
        offset = header.next
    return tuple(ranges), dma_avail


class LinuxKernel:
    """The real kernel."""

    def open(self, path: str, flags: int) -> int:
        return os.open(path, flags | os.O_CLOEXEC)

    def close(self, fd: int) -> None:
        os.close(fd)

    def node_of(self, fd: int, nodes: Collection[str]) -> str:
        # By device number, not by /proc/self/fd's link: an fd opened in a
        # mount namespace that is gone (vfiod's before a restart under
        # ProtectSystem=) reads as "/vfio/7", relative to its dead mount.
        st = os.fstat(fd)
        if not stat.S_ISCHR(st.st_mode):
            return ""
        for node in nodes:
            with contextlib.suppress(FileNotFoundError):
                if os.stat(node).st_rdev == st.st_rdev:
                    return node
        return ""

    def pread(self, fd: int, size: int, offset: int) -> bytes:
        return os.pread(fd, size, offset)

    def pwrite(self, fd: int, data: bytes, offset: int) -> int:
        return os.pwrite(fd, data, offset)

    def mmap_shared(self, fd: int, size: int, offset: int) -> int:
        prot = mmap.PROT_READ | mmap.PROT_WRITE
        address = _libc.mmap(None, size, prot, mmap.MAP_SHARED, fd, offset)
        if address is None or address == _MAP_FAILED:
            _raise_errno()
        assert isinstance(address, int)
        return address

    def munmap(self, address: int, size: int) -> None:
        if _libc.munmap(address, size) != 0:
            _raise_errno()

    def get_api_version(self, fd: int) -> int:
        return _ioctl(fd, abi.Ioctl.GET_API_VERSION)

    def check_extension(self, fd: int, extension: int) -> int:
        return _ioctl(fd, abi.Ioctl.CHECK_EXTENSION, extension)

    def set_iommu(self, fd: int, iommu_type: int) -> None:
        _ioctl(fd, abi.Ioctl.SET_IOMMU, iommu_type)

    def iommu_get_info(self, fd: int) -> IommuInfo:
        info = abi.vfio_iommu_type1_info.new()
        _ioctl(fd, abi.Ioctl.IOMMU_GET_INFO, info)
        flags = abi.IommuInfoFlag(info.flags)
        if not flags & abi.IommuInfoFlag.CAPS or info.argsz <= ctypes.sizeof(info):
            return IommuInfo(flags, info.iova_pgsizes, (), None)
        # The kernel raised argsz to the size the capability chain needs.
        full = (ctypes.c_char * info.argsz)()
        head = abi.vfio_iommu_type1_info.new()
        head.argsz = info.argsz
        ctypes.memmove(full, ctypes.addressof(head), ctypes.sizeof(head))
        _ioctl(fd, abi.Ioctl.IOMMU_GET_INFO, full)
        raw = bytes(full)
        head = abi.vfio_iommu_type1_info.from_buffer_copy(raw)
        ranges, dma_avail = _parse_iova_caps(raw, head.cap_offset)
        return IommuInfo(abi.IommuInfoFlag(head.flags), head.iova_pgsizes, ranges, dma_avail)

    def iommu_map_dma(
        self, fd: int, vaddr: int, iova: int, size: int, flags: abi.DmaMapFlag
    ) -> None:
        arg = abi.vfio_iommu_type1_dma_map.new(flags=flags, vaddr=vaddr, iova=iova, size=size)
        _ioctl(fd, abi.Ioctl.IOMMU_MAP_DMA, arg)

    def iommu_unmap_dma(self, fd: int, iova: int, size: int) -> int:
        arg = abi.vfio_iommu_type1_dma_unmap.new(iova=iova, size=size)
        _ioctl(fd, abi.Ioctl.IOMMU_UNMAP_DMA, arg)
        return int(arg.size)

    def group_get_status(self, fd: int) -> abi.GroupFlag:
        status = abi.vfio_group_status.new()
        _ioctl(fd, abi.Ioctl.GROUP_GET_STATUS, status)
        return abi.GroupFlag(status.flags)

    def group_set_container(self, fd: int, container_fd: int) -> None:
        _ioctl(fd, abi.Ioctl.GROUP_SET_CONTAINER, ctypes.c_int32(container_fd))

    def group_unset_container(self, fd: int) -> None:
        _ioctl(fd, abi.Ioctl.GROUP_UNSET_CONTAINER)

    def group_get_device_fd(self, fd: int, name: str) -> int:
        return _ioctl(fd, abi.Ioctl.GROUP_GET_DEVICE_FD, ctypes.create_string_buffer(name.encode()))

    def device_get_info(self, fd: int) -> DeviceInfo:
        info = abi.vfio_device_info.new()
        _ioctl(fd, abi.Ioctl.DEVICE_GET_INFO, info)
        return DeviceInfo(abi.DeviceFlag(info.flags), info.num_regions, info.num_irqs)

    def device_get_region_info(self, fd: int, index: int) -> RegionInfo:
        info = abi.vfio_region_info.new(index=index)
        _ioctl(fd, abi.Ioctl.DEVICE_GET_REGION_INFO, info)
        return RegionInfo(index, abi.RegionFlag(info.flags), info.size, info.offset)

    def device_reset(self, fd: int) -> None:
        _ioctl(fd, abi.Ioctl.DEVICE_RESET)

    def device_bind_iommufd(self, fd: int, iommufd: int) -> int:
        arg = abi.vfio_device_bind_iommufd.new(iommufd=iommufd)
        _ioctl(fd, abi.Ioctl.DEVICE_BIND_IOMMUFD, arg)
        return int(arg.out_devid)

    def device_attach_iommufd_pt(self, fd: int, pt_id: int) -> int:
        arg = abi.vfio_device_attach_iommufd_pt.new(pt_id=pt_id)
        _ioctl(fd, abi.Ioctl.DEVICE_ATTACH_IOMMUFD_PT, arg)
        # The kernel may replace pt_id with the hardware page table it used.
        return int(arg.pt_id)

    def device_detach_iommufd_pt(self, fd: int) -> None:
        _ioctl(fd, abi.Ioctl.DEVICE_DETACH_IOMMUFD_PT, abi.vfio_device_detach_iommufd_pt.new())

    def iommufd_destroy(self, fd: int, object_id: int) -> None:
        _ioctl(fd, abi.Ioctl.IOMMUFD_DESTROY, abi.iommu_destroy.new(id=object_id))

    def ioas_alloc(self, fd: int) -> int:
        arg = abi.iommu_ioas_alloc.new()
        _ioctl(fd, abi.Ioctl.IOAS_ALLOC, arg)
        return int(arg.out_ioas_id)

    def ioas_iova_ranges(self, fd: int, ioas_id: int) -> IoasRanges:
        # First ask how many ranges there are (EMSGSIZE with num_iovas set),
        # then fetch them into an array the kernel writes through a pointer.
        count = 0
        while True:
            ranges = (abi.iommu_iova_range * max(count, 1))()
            arg = abi.iommu_ioas_iova_ranges.new(
                ioas_id=ioas_id, num_iovas=count, allowed_iovas=ctypes.addressof(ranges)
            )
            try:
                _ioctl(fd, abi.Ioctl.IOAS_IOVA_RANGES, arg)
            except OSError as e:
                if e.errno == errno.EMSGSIZE and arg.num_iovas > count:
                    count = arg.num_iovas
                    continue
                raise
            found = tuple(IovaRange(ranges[i].start, ranges[i].last) for i in range(arg.num_iovas))
            return IoasRanges(found, int(arg.out_iova_alignment))

    def ioas_map(
        self,
        fd: int,
        ioas_id: int,
        vaddr: int,
        length: int,
        iova: int,
        flags: abi.IoasMapFlag,
    ) -> int:
        arg = abi.iommu_ioas_map.new(
            flags=flags, ioas_id=ioas_id, user_va=vaddr, length=length, iova=iova
        )
        _ioctl(fd, abi.Ioctl.IOAS_MAP, arg)
        return int(arg.iova)

    def ioas_unmap(self, fd: int, ioas_id: int, iova: int, length: int) -> int:
        arg = abi.iommu_ioas_unmap.new(ioas_id=ioas_id, iova=iova, length=length)
        _ioctl(fd, abi.Ioctl.IOAS_UNMAP, arg)
        return int(arg.length)

    def iommufd_option(
        self, fd: int, option: abi.IommufdOption, op: abi.IommufdOptionOp, value: int
    ) -> int:
        arg = abi.iommu_option.new(option_id=option, op=op, val64=value)
        _ioctl(fd, abi.Ioctl.IOMMUFD_OPTION, arg)
        return int(arg.val64)
