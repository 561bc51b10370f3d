"""Errors of the VFIO layer: an OSError that says what was being done to what."""

from __future__ import annotations

import errno as errno_
import os


class VfioError(OSError):
    """A VFIO operation failed.

    ``errno`` is the kernel's (or the one the layer chose for a refusal it made
    itself), ``operation`` the ioctl or step ("GROUP_SET_CONTAINER"), ``target``
    the node or object it was done on ("/dev/vfio/9"), ``hint`` what to do.
    """

    def __init__(self, errno: int, operation: str, target: str, detail: str = "", hint: str = ""):
        self.operation = operation
        self.target = target
        self.hint = hint
        name = errno_.errorcode.get(errno, str(errno))
        reason = detail or os.strerror(errno)
        message = f"{operation} on {target}: {reason} ({name})"
        if hint:
            message += f"; {hint}"
        super().__init__(errno, message)
        self.errno_name = name

    def __str__(self) -> str:
        return str(self.strerror)


class NotSupportedError(VfioError):
    """The object cannot do this at all (e.g. DMA mapping on a no-IOMMU container)."""

    def __init__(self, operation: str, target: str, detail: str, hint: str = ""):
        super().__init__(errno_.EOPNOTSUPP, operation, target, detail, hint)
