"""Pin ``vfiod.vfio.abi`` to the kernel's UAPI, number by number.

Every literal below was read from Linux 6.12's ``include/uapi/linux/vfio.h``
and ``include/uapi/linux/iommufd.h`` and checked by compiling those headers
(``sizeof``/``offsetof`` on x86_64). None is recomputed with abi's own
formulas, so a wrong formula there cannot agree with itself here. Each table
is also checked to cover its side of abi completely: adding an ioctl, enum
member, struct or field to abi without pinning it here fails.
"""

from __future__ import annotations

import ctypes
import enum

import pytest

from vfiod.vfio import abi

# Ioctl member -> (header macro, request number). All are _IO(';', nr).
IOCTLS: dict[str, tuple[str, int]] = {
    # vfio.h
    "GET_API_VERSION": ("VFIO_GET_API_VERSION", 0x3B64),
    "CHECK_EXTENSION": ("VFIO_CHECK_EXTENSION", 0x3B65),
    "SET_IOMMU": ("VFIO_SET_IOMMU", 0x3B66),
    "GROUP_GET_STATUS": ("VFIO_GROUP_GET_STATUS", 0x3B67),
    "GROUP_SET_CONTAINER": ("VFIO_GROUP_SET_CONTAINER", 0x3B68),
    "GROUP_UNSET_CONTAINER": ("VFIO_GROUP_UNSET_CONTAINER", 0x3B69),
    "GROUP_GET_DEVICE_FD": ("VFIO_GROUP_GET_DEVICE_FD", 0x3B6A),
    "DEVICE_GET_INFO": ("VFIO_DEVICE_GET_INFO", 0x3B6B),
    "DEVICE_GET_REGION_INFO": ("VFIO_DEVICE_GET_REGION_INFO", 0x3B6C),
    "DEVICE_GET_IRQ_INFO": ("VFIO_DEVICE_GET_IRQ_INFO", 0x3B6D),
    "DEVICE_RESET": ("VFIO_DEVICE_RESET", 0x3B6F),
    "IOMMU_GET_INFO": ("VFIO_IOMMU_GET_INFO", 0x3B70),
    "IOMMU_MAP_DMA": ("VFIO_IOMMU_MAP_DMA", 0x3B71),
    "IOMMU_UNMAP_DMA": ("VFIO_IOMMU_UNMAP_DMA", 0x3B72),
    "DEVICE_BIND_IOMMUFD": ("VFIO_DEVICE_BIND_IOMMUFD", 0x3B76),
    "DEVICE_ATTACH_IOMMUFD_PT": ("VFIO_DEVICE_ATTACH_IOMMUFD_PT", 0x3B77),
    "DEVICE_DETACH_IOMMUFD_PT": ("VFIO_DEVICE_DETACH_IOMMUFD_PT", 0x3B78),
    # iommufd.h
    "IOMMUFD_DESTROY": ("IOMMU_DESTROY", 0x3B80),
    "IOAS_ALLOC": ("IOMMU_IOAS_ALLOC", 0x3B81),
    "IOAS_IOVA_RANGES": ("IOMMU_IOAS_IOVA_RANGES", 0x3B84),
    "IOAS_MAP": ("IOMMU_IOAS_MAP", 0x3B85),
    "IOAS_UNMAP": ("IOMMU_IOAS_UNMAP", 0x3B86),
    "IOMMUFD_OPTION": ("IOMMU_OPTION", 0x3B87),
}

# Enum class -> {member: (header name, value)}.
ENUMS: dict[type[enum.Enum], dict[str, tuple[str, int]]] = {
    abi.IommuType: {
        "TYPE1": ("VFIO_TYPE1_IOMMU", 1),
        "TYPE1v2": ("VFIO_TYPE1v2_IOMMU", 3),
        "NOIOMMU": ("VFIO_NOIOMMU_IOMMU", 8),
        "UNMAP_ALL": ("VFIO_UNMAP_ALL", 9),
    },
    abi.GroupFlag: {
        "VIABLE": ("VFIO_GROUP_FLAGS_VIABLE", 0x1),
        "CONTAINER_SET": ("VFIO_GROUP_FLAGS_CONTAINER_SET", 0x2),
    },
    abi.DeviceFlag: {
        "RESET": ("VFIO_DEVICE_FLAGS_RESET", 0x1),
        "PCI": ("VFIO_DEVICE_FLAGS_PCI", 0x2),
        "PLATFORM": ("VFIO_DEVICE_FLAGS_PLATFORM", 0x4),
        "AMBA": ("VFIO_DEVICE_FLAGS_AMBA", 0x8),
        "CCW": ("VFIO_DEVICE_FLAGS_CCW", 0x10),
        "AP": ("VFIO_DEVICE_FLAGS_AP", 0x20),
        "FSL_MC": ("VFIO_DEVICE_FLAGS_FSL_MC", 0x40),
        "CAPS": ("VFIO_DEVICE_FLAGS_CAPS", 0x80),
        "CDX": ("VFIO_DEVICE_FLAGS_CDX", 0x100),
    },
    abi.RegionFlag: {
        "READ": ("VFIO_REGION_INFO_FLAG_READ", 0x1),
        "WRITE": ("VFIO_REGION_INFO_FLAG_WRITE", 0x2),
        "MMAP": ("VFIO_REGION_INFO_FLAG_MMAP", 0x4),
        "CAPS": ("VFIO_REGION_INFO_FLAG_CAPS", 0x8),
    },
    abi.PciRegion: {
        "BAR0": ("VFIO_PCI_BAR0_REGION_INDEX", 0),
        "BAR1": ("VFIO_PCI_BAR1_REGION_INDEX", 1),
        "BAR2": ("VFIO_PCI_BAR2_REGION_INDEX", 2),
        "BAR3": ("VFIO_PCI_BAR3_REGION_INDEX", 3),
        "BAR4": ("VFIO_PCI_BAR4_REGION_INDEX", 4),
        "BAR5": ("VFIO_PCI_BAR5_REGION_INDEX", 5),
        "ROM": ("VFIO_PCI_ROM_REGION_INDEX", 6),
        "CONFIG": ("VFIO_PCI_CONFIG_REGION_INDEX", 7),
        "VGA": ("VFIO_PCI_VGA_REGION_INDEX", 8),
    },
    abi.DmaMapFlag: {
        "READ": ("VFIO_DMA_MAP_FLAG_READ", 0x1),
        "WRITE": ("VFIO_DMA_MAP_FLAG_WRITE", 0x2),
    },
    abi.IommuInfoFlag: {
        "PGSIZES": ("VFIO_IOMMU_INFO_PGSIZES", 0x1),
        "CAPS": ("VFIO_IOMMU_INFO_CAPS", 0x2),
    },
    abi.IoasMapFlag: {
        "FIXED_IOVA": ("IOMMU_IOAS_MAP_FIXED_IOVA", 0x1),
        "WRITEABLE": ("IOMMU_IOAS_MAP_WRITEABLE", 0x2),
        "READABLE": ("IOMMU_IOAS_MAP_READABLE", 0x4),
    },
    abi.IommufdOption: {
        "RLIMIT_MODE": ("IOMMU_OPTION_RLIMIT_MODE", 0),
        "HUGE_PAGES": ("IOMMU_OPTION_HUGE_PAGES", 1),
    },
    abi.IommufdOptionOp: {
        "SET": ("IOMMU_OPTION_OP_SET", 0),
        "GET": ("IOMMU_OPTION_OP_GET", 1),
    },
    # iommufd.h gives these as val64 of IOMMU_OPTION_RLIMIT_MODE, unnamed.
    abi.RlimitMode: {
        "USER": ("IOMMU_OPTION_RLIMIT_MODE user", 0),
        "PROCESS": ("IOMMU_OPTION_RLIMIT_MODE process", 1),
    },
}

# Module-level constants; their names are the header's.
CONSTANTS: dict[str, int] = {
    "VFIO_API_VERSION": 0,
    "VFIO_TYPE": 0x3B,
    "VFIO_BASE": 100,
    "IOMMUFD_TYPE": 0x3B,
    "IOMMUFD_CMD_BASE": 0x80,
    "VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE": 1,
    "VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION": 2,
    "VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL": 3,
}

U16 = ctypes.c_uint16
U32 = ctypes.c_uint32
S32 = ctypes.c_int32
U64 = ctypes.c_uint64

# Struct -> (sizeof, [(field, offset, ctypes type)] in declaration order).
# Flexible array members (``iova_ranges[]``, ``data[]``) add no size and are
# left out of abi, so they are left out here too.
STRUCTS: dict[type[ctypes.Structure], tuple[int, list[tuple[str, int, type[object]]]]] = {
    # vfio.h
    abi.vfio_group_status: (8, [("argsz", 0, U32), ("flags", 4, U32)]),
    abi.vfio_device_info: (
        24,
        [
            ("argsz", 0, U32),
            ("flags", 4, U32),
            ("num_regions", 8, U32),
            ("num_irqs", 12, U32),
            ("cap_offset", 16, U32),
            ("pad", 20, U32),
        ],
    ),
    abi.vfio_region_info: (
        32,
        [
            ("argsz", 0, U32),
            ("flags", 4, U32),
            ("index", 8, U32),
            ("cap_offset", 12, U32),
            ("size", 16, U64),
            ("offset", 24, U64),
        ],
    ),
    abi.vfio_irq_info: (
        16,
        [("argsz", 0, U32), ("flags", 4, U32), ("index", 8, U32), ("count", 12, U32)],
    ),
    abi.vfio_info_cap_header: (8, [("id", 0, U16), ("version", 2, U16), ("next", 4, U32)]),
    abi.vfio_iommu_type1_info: (
        24,
        [
            ("argsz", 0, U32),
            ("flags", 4, U32),
            ("iova_pgsizes", 8, U64),
            ("cap_offset", 16, U32),
            ("pad", 20, U32),
        ],
    ),
    abi.vfio_iova_range: (16, [("start", 0, U64), ("end", 8, U64)]),
    abi.vfio_iommu_type1_info_cap_iova_range: (
        16,
        [
            ("header", 0, abi.vfio_info_cap_header),
            ("nr_iovas", 8, U32),
            ("reserved", 12, U32),
        ],
    ),
    abi.vfio_iommu_type1_dma_map: (
        32,
        [
            ("argsz", 0, U32),
            ("flags", 4, U32),
            ("vaddr", 8, U64),
            ("iova", 16, U64),
            ("size", 24, U64),
        ],
    ),
    abi.vfio_iommu_type1_dma_unmap: (
        24,
        [("argsz", 0, U32), ("flags", 4, U32), ("iova", 8, U64), ("size", 16, U64)],
    ),
    abi.vfio_device_bind_iommufd: (
        16,
        [("argsz", 0, U32), ("flags", 4, U32), ("iommufd", 8, S32), ("out_devid", 12, U32)],
    ),
    abi.vfio_device_attach_iommufd_pt: (
        12,
        [("argsz", 0, U32), ("flags", 4, U32), ("pt_id", 8, U32)],
    ),
    abi.vfio_device_detach_iommufd_pt: (8, [("argsz", 0, U32), ("flags", 4, U32)]),
    # iommufd.h
    abi.iommu_destroy: (8, [("size", 0, U32), ("id", 4, U32)]),
    abi.iommu_ioas_alloc: (
        12,
        [("size", 0, U32), ("flags", 4, U32), ("out_ioas_id", 8, U32)],
    ),
    abi.iommu_iova_range: (16, [("start", 0, U64), ("last", 8, U64)]),
    abi.iommu_ioas_iova_ranges: (
        32,
        [
            ("size", 0, U32),
            ("ioas_id", 4, U32),
            ("num_iovas", 8, U32),
            ("__reserved", 12, U32),
            ("allowed_iovas", 16, U64),
            ("out_iova_alignment", 24, U64),
        ],
    ),
    abi.iommu_ioas_map: (
        40,
        [
            ("size", 0, U32),
            ("flags", 4, U32),
            ("ioas_id", 8, U32),
            ("__reserved", 12, U32),
            ("user_va", 16, U64),
            ("length", 24, U64),
            ("iova", 32, U64),
        ],
    ),
    abi.iommu_ioas_unmap: (
        24,
        [("size", 0, U32), ("ioas_id", 4, U32), ("iova", 8, U64), ("length", 16, U64)],
    ),
    abi.iommu_option: (
        24,
        [
            ("size", 0, U32),
            ("option_id", 4, U32),
            ("op", 8, U16),
            ("__reserved", 10, U16),
            ("object_id", 12, U32),
            ("val64", 16, U64),
        ],
    ),
}

# Structs that carry their own size, and the field that holds it.
# abi._Struct is the base that gives them ``new()``.
SIZED: dict[type[abi._Struct], str] = {
    abi.vfio_group_status: "argsz",
    abi.vfio_device_info: "argsz",
    abi.vfio_region_info: "argsz",
    abi.vfio_irq_info: "argsz",
    abi.vfio_iommu_type1_info: "argsz",
    abi.vfio_iommu_type1_dma_map: "argsz",
    abi.vfio_iommu_type1_dma_unmap: "argsz",
    abi.vfio_device_bind_iommufd: "argsz",
    abi.vfio_device_attach_iommufd_pt: "argsz",
    abi.vfio_device_detach_iommufd_pt: "argsz",
    abi.iommu_destroy: "size",
    abi.iommu_ioas_alloc: "size",
    abi.iommu_ioas_iova_ranges: "size",
    abi.iommu_ioas_map: "size",
    abi.iommu_ioas_unmap: "size",
    abi.iommu_option: "size",
}


def _declared_structs() -> set[type[ctypes.Structure]]:
    """Every public ctypes struct abi defines."""
    return {
        value
        for name, value in vars(abi).items()
        if not name.startswith("_")
        and isinstance(value, type)
        and issubclass(value, ctypes.Structure)
        and value.__module__ == abi.__name__
    }


def _declared_fields(struct: type[ctypes.Structure]) -> list[tuple[str, type[object]]]:
    return [(field[0], field[1]) for field in struct._fields_]


# ioctls


def test_every_ioctl_is_pinned() -> None:
    assert set(abi.Ioctl.__members__) == set(IOCTLS)


@pytest.mark.parametrize(
    ("member", "macro", "number"),
    [pytest.param(member, macro, number, id=macro) for member, (macro, number) in IOCTLS.items()],
)
def test_ioctl_number(member: str, macro: str, number: int) -> None:
    assert abi.Ioctl[member] == number, f"{macro}: {abi.Ioctl[member]:#x} != {number:#x}"


def test_ioctl_numbers_are_distinct() -> None:
    numbers = [number for _, number in IOCTLS.values()]
    assert len(set(numbers)) == len(numbers)


# enums, flags and constants


@pytest.mark.parametrize("enum_class", [pytest.param(cls, id=cls.__name__) for cls in ENUMS])
def test_every_enum_member_is_pinned(enum_class: type[enum.Enum]) -> None:
    assert set(enum_class.__members__) == set(ENUMS[enum_class])


@pytest.mark.parametrize(
    ("enum_class", "member", "value"),
    [
        pytest.param(cls, member, value, id=name)
        for cls, members in ENUMS.items()
        for member, (name, value) in members.items()
    ],
)
def test_enum_value(enum_class: type[enum.Enum], member: str, value: int) -> None:
    assert enum_class[member].value == value


@pytest.mark.parametrize(
    ("name", "value"), [pytest.param(name, value, id=name) for name, value in CONSTANTS.items()]
)
def test_constant(name: str, value: int) -> None:
    assert getattr(abi, name) == value


# structs


def test_every_struct_is_pinned() -> None:
    assert _declared_structs() == set(STRUCTS)


@pytest.mark.parametrize(
    ("struct", "size"),
    [pytest.param(struct, size, id=struct.__name__) for struct, (size, _) in STRUCTS.items()],
)
def test_struct_size(struct: type[ctypes.Structure], size: int) -> None:
    assert ctypes.sizeof(struct) == size


@pytest.mark.parametrize(
    ("struct", "fields"),
    [pytest.param(struct, fields, id=struct.__name__) for struct, (_, fields) in STRUCTS.items()],
)
def test_struct_fields_in_order(
    struct: type[ctypes.Structure], fields: list[tuple[str, int, type[object]]]
) -> None:
    """Names and types, in the header's order, and nothing more."""
    assert _declared_fields(struct) == [(name, ctype) for name, _, ctype in fields]


@pytest.mark.parametrize(
    ("struct", "field", "offset"),
    [
        pytest.param(struct, field, offset, id=f"{struct.__name__}.{field}")
        for struct, (_, fields) in STRUCTS.items()
        for field, offset, _ in fields
    ],
)
def test_field_offset(struct: type[ctypes.Structure], field: str, offset: int) -> None:
    assert getattr(struct, field).offset == offset


# the size field


def test_every_sized_struct_is_pinned() -> None:
    assert {s for s in _declared_structs() if issubclass(s, abi._Struct)} == set(SIZED)


@pytest.mark.parametrize(
    ("struct", "size_field"),
    [pytest.param(struct, field, id=struct.__name__) for struct, field in SIZED.items()],
)
def test_new_sets_own_size(struct: type[abi._Struct], size_field: str) -> None:
    size, fields = STRUCTS[struct]
    assert fields[0][:2] == (size_field, 0)
    obj = struct.new()
    assert getattr(obj, size_field) == size
    assert bytes(obj)[4:] == bytes(size - 4)


def test_new_passes_fields_through() -> None:
    arg = abi.vfio_iommu_type1_dma_map.new(flags=3, vaddr=0x7F00_0000_0000, iova=0x1000, size=8192)
    assert (arg.argsz, arg.flags, arg.vaddr, arg.iova, arg.size) == (
        32,
        3,
        0x7F00_0000_0000,
        0x1000,
        8192,
    )
    opt = abi.iommu_option.new(option_id=1, op=1, object_id=7)
    assert (opt.size, opt.option_id, opt.op, opt.object_id, opt.val64) == (24, 1, 1, 7, 0)
