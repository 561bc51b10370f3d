"""The kernel's VFIO and iommufd ABI: ioctl numbers and struct layouts.

Everything here comes from two UAPI headers and nowhere else:
``include/uapi/linux/vfio.h`` (VFIO_*, struct vfio_*) and
``include/uapi/linux/iommufd.h`` (IOMMU_*, struct iommu_*), checked against
Linux 6.12. ``tests/unit/test_abi.py`` pins every number, size and offset.

All of these ioctls are ``_IO(';', n)``: the request carries no size or
direction, so a struct grows through its leading ``argsz`` (VFIO) or ``size``
(iommufd) field, which the caller sets to the size it knows.
"""

from __future__ import annotations

import ctypes
import enum
from typing import ClassVar, Self

# include/uapi/asm-generic/ioctl.h: _IO(type, nr) = (type << 8) | nr when
# direction and size are both zero.
_IOC_TYPESHIFT = 8

VFIO_TYPE = ord(";")
VFIO_BASE = 100
IOMMUFD_TYPE = ord(";")
IOMMUFD_CMD_BASE = 0x80


def _io(type_: int, nr: int) -> int:
    return (type_ << _IOC_TYPESHIFT) | nr


class Ioctl(enum.IntEnum):
    """Request numbers. Names are the kernel's, without the leading ``VFIO_``
    or ``IOMMU_`` where it would only repeat the type."""

    # vfio.h; container (/dev/vfio/vfio) ioctls
    GET_API_VERSION = _io(VFIO_TYPE, VFIO_BASE + 0)
    CHECK_EXTENSION = _io(VFIO_TYPE, VFIO_BASE + 1)
    SET_IOMMU = _io(VFIO_TYPE, VFIO_BASE + 2)
    # group (/dev/vfio/N) ioctls
    GROUP_GET_STATUS = _io(VFIO_TYPE, VFIO_BASE + 3)
    GROUP_SET_CONTAINER = _io(VFIO_TYPE, VFIO_BASE + 4)
    GROUP_UNSET_CONTAINER = _io(VFIO_TYPE, VFIO_BASE + 5)
    GROUP_GET_DEVICE_FD = _io(VFIO_TYPE, VFIO_BASE + 6)
    # device fd ioctls (from a group or a cdev)
    DEVICE_GET_INFO = _io(VFIO_TYPE, VFIO_BASE + 7)
    DEVICE_GET_REGION_INFO = _io(VFIO_TYPE, VFIO_BASE + 8)
    DEVICE_GET_IRQ_INFO = _io(VFIO_TYPE, VFIO_BASE + 9)
    DEVICE_RESET = _io(VFIO_TYPE, VFIO_BASE + 11)
    # type1 container ioctls; 12..14 mean other things on device fds
    IOMMU_GET_INFO = _io(VFIO_TYPE, VFIO_BASE + 12)
    IOMMU_MAP_DMA = _io(VFIO_TYPE, VFIO_BASE + 13)
    IOMMU_UNMAP_DMA = _io(VFIO_TYPE, VFIO_BASE + 14)
    # device cdev (/dev/vfio/devices/vfioX) ioctls
    DEVICE_BIND_IOMMUFD = _io(VFIO_TYPE, VFIO_BASE + 18)
    DEVICE_ATTACH_IOMMUFD_PT = _io(VFIO_TYPE, VFIO_BASE + 19)
    DEVICE_DETACH_IOMMUFD_PT = _io(VFIO_TYPE, VFIO_BASE + 20)
    # iommufd.h; /dev/iommu ioctls
    IOMMUFD_DESTROY = _io(IOMMUFD_TYPE, IOMMUFD_CMD_BASE + 0)
    IOAS_ALLOC = _io(IOMMUFD_TYPE, IOMMUFD_CMD_BASE + 1)
    IOAS_IOVA_RANGES = _io(IOMMUFD_TYPE, IOMMUFD_CMD_BASE + 4)
    IOAS_MAP = _io(IOMMUFD_TYPE, IOMMUFD_CMD_BASE + 5)
    IOAS_UNMAP = _io(IOMMUFD_TYPE, IOMMUFD_CMD_BASE + 6)
    IOMMUFD_OPTION = _io(IOMMUFD_TYPE, IOMMUFD_CMD_BASE + 7)


VFIO_API_VERSION = 0


class IommuType(enum.IntEnum):
    """Arguments of CHECK_EXTENSION and SET_IOMMU."""

    TYPE1 = 1
    TYPE1v2 = 3
    NOIOMMU = 8
    UNMAP_ALL = 9


class GroupFlag(enum.IntFlag):
    VIABLE = 1 << 0
    CONTAINER_SET = 1 << 1


class DeviceFlag(enum.IntFlag):
    RESET = 1 << 0
    PCI = 1 << 1
    PLATFORM = 1 << 2
    AMBA = 1 << 3
    CCW = 1 << 4
    AP = 1 << 5
    FSL_MC = 1 << 6
    CAPS = 1 << 7
    CDX = 1 << 8


class RegionFlag(enum.IntFlag):
    READ = 1 << 0
    WRITE = 1 << 1
    MMAP = 1 << 2
    CAPS = 1 << 3


class PciRegion(enum.IntEnum):
    """Region indexes of a vfio-pci device (VFIO_PCI_*_REGION_INDEX)."""

    BAR0 = 0
    BAR1 = 1
    BAR2 = 2
    BAR3 = 3
    BAR4 = 4
    BAR5 = 5
    ROM = 6
    CONFIG = 7
    VGA = 8


class DmaMapFlag(enum.IntFlag):
    READ = 1 << 0
    WRITE = 1 << 1


class IommuInfoFlag(enum.IntFlag):
    PGSIZES = 1 << 0
    CAPS = 1 << 1


# vfio_info_cap_header ids of the type1 IOMMU info chain
VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE = 1
VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION = 2
VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL = 3


class IoasMapFlag(enum.IntFlag):
    FIXED_IOVA = 1 << 0
    WRITEABLE = 1 << 1
    READABLE = 1 << 2


class IommufdOption(enum.IntEnum):
    RLIMIT_MODE = 0
    HUGE_PAGES = 1


class RlimitMode(enum.IntEnum):
    """IOMMU_OPTION_RLIMIT_MODE's values: whose RLIMIT_MEMLOCK pinned pages count against."""

    USER = 0  # the user's, shared by all of its processes (the default)
    PROCESS = 1  # the mapping process's own (setting it needs CAP_SYS_RESOURCE)


class IommufdOptionOp(enum.IntEnum):
    SET = 0
    GET = 1


class _Struct(ctypes.Structure):
    """A kernel struct whose first field holds its own size."""

    _size_field: ClassVar[str] = "argsz"

    @classmethod
    def new(cls, **fields: int) -> Self:
        obj = cls(**fields)
        setattr(obj, cls._size_field, ctypes.sizeof(cls))
        return obj


# vfio.h


class vfio_group_status(_Struct):
    _fields_ = [("argsz", ctypes.c_uint32), ("flags", ctypes.c_uint32)]


class vfio_device_info(_Struct):
    _fields_ = [
        ("argsz", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("num_regions", ctypes.c_uint32),
        ("num_irqs", ctypes.c_uint32),
        ("cap_offset", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
    ]


class vfio_region_info(_Struct):
    _fields_ = [
        ("argsz", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("index", ctypes.c_uint32),
        ("cap_offset", ctypes.c_uint32),
        ("size", ctypes.c_uint64),
        ("offset", ctypes.c_uint64),
    ]


class vfio_irq_info(_Struct):
    _fields_ = [
        ("argsz", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("index", ctypes.c_uint32),
        ("count", ctypes.c_uint32),
    ]


class vfio_info_cap_header(ctypes.Structure):
    _fields_ = [
        ("id", ctypes.c_uint16),
        ("version", ctypes.c_uint16),
        ("next", ctypes.c_uint32),
    ]


class vfio_iommu_type1_info(_Struct):
    _fields_ = [
        ("argsz", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("iova_pgsizes", ctypes.c_uint64),
        ("cap_offset", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
    ]


class vfio_iova_range(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("end", ctypes.c_uint64)]


class vfio_iommu_type1_info_cap_iova_range(ctypes.Structure):
    """Followed in memory by ``nr_iovas`` vfio_iova_range entries."""

    _fields_ = [
        ("header", vfio_info_cap_header),
        ("nr_iovas", ctypes.c_uint32),
        ("reserved", ctypes.c_uint32),
    ]


class vfio_iommu_type1_dma_map(_Struct):
    _fields_ = [
        ("argsz", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("vaddr", ctypes.c_uint64),
        ("iova", ctypes.c_uint64),
        ("size", ctypes.c_uint64),
    ]


class vfio_iommu_type1_dma_unmap(_Struct):
    _fields_ = [
        ("argsz", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("iova", ctypes.c_uint64),
        ("size", ctypes.c_uint64),
    ]


class vfio_device_bind_iommufd(_Struct):
    _fields_ = [
        ("argsz", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("iommufd", ctypes.c_int32),
        ("out_devid", ctypes.c_uint32),
    ]


class vfio_device_attach_iommufd_pt(_Struct):
    # Linux 6.15 appended ``pasid``; argsz tells the kernel we stop here.
    _fields_ = [
        ("argsz", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("pt_id", ctypes.c_uint32),
    ]


class vfio_device_detach_iommufd_pt(_Struct):
    _fields_ = [("argsz", ctypes.c_uint32), ("flags", ctypes.c_uint32)]


# iommufd.h


class _IommufdStruct(_Struct):
    _size_field = "size"


class iommu_destroy(_IommufdStruct):
    _fields_ = [("size", ctypes.c_uint32), ("id", ctypes.c_uint32)]


class iommu_ioas_alloc(_IommufdStruct):
    _fields_ = [
        ("size", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("out_ioas_id", ctypes.c_uint32),
    ]


class iommu_iova_range(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("last", ctypes.c_uint64)]


class iommu_ioas_iova_ranges(_IommufdStruct):
    _fields_ = [
        ("size", ctypes.c_uint32),
        ("ioas_id", ctypes.c_uint32),
        ("num_iovas", ctypes.c_uint32),
        ("__reserved", ctypes.c_uint32),
        ("allowed_iovas", ctypes.c_uint64),
        ("out_iova_alignment", ctypes.c_uint64),
    ]


class iommu_ioas_map(_IommufdStruct):
    _fields_ = [
        ("size", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("ioas_id", ctypes.c_uint32),
        ("__reserved", ctypes.c_uint32),
        ("user_va", ctypes.c_uint64),
        ("length", ctypes.c_uint64),
        ("iova", ctypes.c_uint64),
    ]


class iommu_ioas_unmap(_IommufdStruct):
    _fields_ = [
        ("size", ctypes.c_uint32),
        ("ioas_id", ctypes.c_uint32),
        ("iova", ctypes.c_uint64),
        ("length", ctypes.c_uint64),
    ]


class iommu_option(_IommufdStruct):
    _fields_ = [
        ("size", ctypes.c_uint32),
        ("option_id", ctypes.c_uint32),
        ("op", ctypes.c_uint16),
        ("__reserved", ctypes.c_uint16),
        ("object_id", ctypes.c_uint32),
        ("val64", ctypes.c_uint64),
    ]
