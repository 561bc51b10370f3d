"""One interface over the two kinds of I/O address space (legacy container, iommufd IOAS)."""

from __future__ import annotations

import errno
from types import TracebackType
from typing import Protocol, Self

from vfiod.vfio.errors import VfioError
from vfiod.vfio.kernel import IovaRange, Kernel

MAP_HINTS = {
    errno.EINVAL: "the address, IOVA and size must be non-zero multiples of the IOMMU "
    "page size, inside one of the valid IOVA ranges",
    errno.EEXIST: "part of that IOVA range is mapped already; unmap it first",
    errno.ENOMEM: "pinning the pages exceeds RLIMIT_MEMLOCK; raise the limit of the "
    "process that maps (ulimit -l) or map less",
    errno.EFAULT: "the virtual address is not mapped in this process",
}


class AddressSpace(Protocol):
    """Where a device's DMA addresses (IOVAs) are translated."""

    target: str

    def iova_ranges(self) -> tuple[IovaRange, ...]: ...

    def map_dma(
        self, vaddr: int, iova: int, size: int, *, read: bool = True, write: bool = True
    ) -> None: ...

    def unmap_dma(self, iova: int, size: int) -> int: ...


class DmaMapping:
    """A memfd window mapped into this process and then into an address space.

    IOVA 0 is a valid address: ``iova`` is always explicit.
    """

    def __init__(
        self,
        kernel: Kernel,
        space: AddressSpace,
        vaddr: int,
        iova: int,
        size: int,
        *,
        window: bool = True,
    ) -> None:
        self.kernel = kernel
        self.space = space
        self.vaddr = vaddr
        self.iova = iova
        self.size = size
        self.window = window  # the memory is mapped at vaddr in this process
        self._mapped = True

    @classmethod
    def map_memfd(
        cls,
        kernel: Kernel,
        space: AddressSpace,
        memfd: int,
        offset: int,
        size: int,
        iova: int,
        *,
        read: bool = True,
        write: bool = True,
    ) -> Self:
        try:
            vaddr = kernel.mmap_shared(memfd, size, offset)
        except OSError as e:
            err = e.errno if e.errno is not None else errno.EIO
            raise VfioError(
                err,
                "mmap",
                f"fd {memfd}",
                hint="pass a memfd (or other shareable file) at least offset+size long, "
                "with page-aligned offset and size",
            ) from e
        try:
            space.map_dma(vaddr, iova, size, read=read, write=write)
        except BaseException:
            kernel.munmap(vaddr, size)
            raise
        return cls(kernel, space, vaddr, iova, size)

    @classmethod
    def adopt(cls, kernel: Kernel, space: AddressSpace, iova: int, size: int) -> Self:
        """A mapping an earlier process of ours made: its memory is pinned by
        the address space alone (that process's window into it is gone)."""
        return cls(kernel, space, 0, iova, size, window=False)

    def unmap(self) -> None:
        if not self._mapped:
            return
        self._mapped = False
        try:
            self.space.unmap_dma(self.iova, self.size)
        finally:
            if self.window:
                self.kernel.munmap(self.vaddr, self.size)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.unmap()
