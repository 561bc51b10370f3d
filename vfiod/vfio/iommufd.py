"""iommufd (/dev/iommu): I/O address spaces that cdev devices attach to."""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import Concatenate, ParamSpec, Self, TypeVar

from vfiod.vfio import abi
from vfiod.vfio.dma import MAP_HINTS
from vfiod.vfio.errors import VfioError
from vfiod.vfio.handle import Handle, checked_call, open_node
from vfiod.vfio.kernel import IoasRanges, IovaRange, Kernel

IOMMUFD_PATH = "/dev/iommu"

P = ParamSpec("P")
T = TypeVar("T")


class IommuFd(Handle):
    kind = "iommufd"

    @classmethod
    def open(cls, kernel: Kernel, path: str = IOMMUFD_PATH) -> Self:
        fd = open_node(kernel, path, "iommufd", "the kernel has no iommufd (needs CONFIG_IOMMUFD)")
        return cls(kernel, fd, path)

    def hint(self, operation: str, err: int) -> str:
        if err == errno.ENOTTY:
            return f"{self.target} is not an iommufd"
        if operation == "IOAS_MAP":
            return MAP_HINTS.get(err, super().hint(operation, err))
        if operation == "IOMMUFD_OPTION" and err == errno.EPERM:
            return "changing the RLIMIT mode needs CAP_SYS_RESOURCE"
        return super().hint(operation, err)

    def alloc_ioas(self) -> Ioas:
        ioas_id = self._call("IOAS_ALLOC", self.kernel.ioas_alloc)
        return Ioas(self, ioas_id)

    @property
    def rlimit_mode(self) -> int:
        """How pinned pages count against RLIMIT_MEMLOCK: 0 (the default) per
        user, 1 per process."""
        return self._call(
            "IOMMUFD_OPTION",
            self.kernel.iommufd_option,
            abi.IommufdOption.RLIMIT_MODE,
            abi.IommufdOptionOp.GET,
            0,
        )

    @rlimit_mode.setter
    def rlimit_mode(self, mode: int) -> None:
        self._call(
            "IOMMUFD_OPTION",
            self.kernel.iommufd_option,
            abi.IommufdOption.RLIMIT_MODE,
            abi.IommufdOptionOp.SET,
            mode,
        )


class Ioas:
    """An I/O address space inside an iommufd; lives as long as the iommufd."""

    def __init__(self, iommufd: IommuFd, ioas_id: int) -> None:
        self.iommufd = iommufd
        self.id = ioas_id
        self.target = f"IOAS {ioas_id} of {iommufd.target}"

    def _call(
        self,
        operation: str,
        fn: Callable[Concatenate[int, P], T],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        fd = self.iommufd.fileno()
        return checked_call(operation, self.target, self.hint, fn, fd, *args, **kwargs)

    def hint(self, operation: str, err: int) -> str:
        if operation == "IOAS_UNMAP" and err == errno.ENOENT:
            return "nothing is mapped there, or the range cuts a mapping: unmap whole mappings"
        if err == errno.ENOENT:
            return "the IOAS does not exist (destroyed, or from another iommufd)"
        return self.iommufd.hint(operation, err)

    def ranges(self) -> IoasRanges:
        return self._call("IOAS_IOVA_RANGES", self.iommufd.kernel.ioas_iova_ranges, self.id)

    def iova_ranges(self) -> tuple[IovaRange, ...]:
        return self.ranges().ranges

    def map_dma(
        self, vaddr: int, iova: int, size: int, *, read: bool = True, write: bool = True
    ) -> None:
        flags = abi.IoasMapFlag.FIXED_IOVA
        if read:
            flags |= abi.IoasMapFlag.READABLE
        if write:
            flags |= abi.IoasMapFlag.WRITEABLE
        mapped = self._call(
            "IOAS_MAP", self.iommufd.kernel.ioas_map, self.id, vaddr, size, iova, flags
        )
        if mapped != iova:
            raise VfioError(
                errno.EIO, "IOAS_MAP", self.target, f"asked for IOVA {iova:#x}, got {mapped:#x}"
            )

    def unmap_dma(self, iova: int, size: int) -> int:
        return self._call("IOAS_UNMAP", self.iommufd.kernel.ioas_unmap, self.id, iova, size)

    def destroy(self) -> None:
        self._call("IOMMUFD_DESTROY", self.iommufd.kernel.iommufd_destroy, self.id)
