"""The kernel's unsafe no-IOMMU mode: a vfio module parameter, writable at run time.

With it on, a device on a host without an IOMMU that is bound to vfio-pci gets
a group of its own (named ``vfio-noiommu``, node ``/dev/vfio/noiommu-N``) that
gives its holder DMA to all of physical memory, and taints the kernel.
"""

from __future__ import annotations

import errno
import os

from vfiod.host.sysfs import HostError, Sysfs

PARAMETER = "module/vfio/parameters/enable_unsafe_noiommu_mode"


def supported(sysfs: Sysfs) -> bool:
    """Was the kernel built with CONFIG_VFIO_NOIOMMU (and vfio loaded)?"""
    return os.path.exists(sysfs.path(PARAMETER))


def enabled(sysfs: Sysfs) -> bool:
    try:
        return sysfs.read(sysfs.path(PARAMETER)) in ("Y", "y", "1")
    except OSError:
        return False


def enable(sysfs: Sysfs) -> None:
    if not supported(sysfs):
        raise HostError(
            errno.EOPNOTSUPP,
            "this kernel has no unsafe no-IOMMU mode (CONFIG_VFIO_NOIOMMU); boot with the "
            "IOMMU on (intel_iommu=on or amd_iommu=on) instead",
        )
    try:
        sysfs.write(sysfs.path(PARAMETER), "Y")
    except OSError as e:
        err = e.errno if e.errno is not None else errno.EIO
        raise HostError(err, f"turning on unsafe no-IOMMU mode failed: {os.strerror(err)}") from e
