"""Python over the kernel's VFIO and iommufd interfaces.

Legacy: ``Container`` + ``Group`` -> ``Device``. iommufd: ``IommuFd`` ->
``Ioas`` + ``CdevDevice``. Both address spaces (``Container``, ``Ioas``) are an
``AddressSpace``; both device kinds are a ``Device``.
"""

from vfiod.vfio.device import CdevDevice, Device, cdev_path
from vfiod.vfio.dma import AddressSpace, DmaMapping
from vfiod.vfio.errors import NotSupportedError, VfioError
from vfiod.vfio.iommufd import Ioas, IommuFd
from vfiod.vfio.kernel import Kernel, LinuxKernel
from vfiod.vfio.legacy import Container, Group, group_path

__all__ = [
    "AddressSpace",
    "CdevDevice",
    "Container",
    "Device",
    "DmaMapping",
    "Group",
    "Ioas",
    "IommuFd",
    "Kernel",
    "LinuxKernel",
    "NotSupportedError",
    "VfioError",
    "cdev_path",
    "group_path",
]
