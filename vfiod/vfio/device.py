"""VFIO device fds: from a group (legacy) or a cdev (/dev/vfio/devices/vfioX)."""

from __future__ import annotations

import errno
import os
from typing import TYPE_CHECKING, Self

from vfiod.pci import AddressError, PciAddress
from vfiod.vfio import abi
from vfiod.vfio.errors import VfioError
from vfiod.vfio.handle import Handle, open_node
from vfiod.vfio.kernel import DeviceInfo, Kernel, RegionInfo

if TYPE_CHECKING:
    from vfiod.vfio.iommufd import Ioas, IommuFd

SYSFS = "/sys"
DEV_VFIO_DEVICES = "/dev/vfio/devices"


class Device(Handle):
    """An open VFIO device: info, regions, PCI config space, reset."""

    kind = "device"

    def __init__(self, kernel: Kernel, fd: int, target: str, name: str) -> None:
        super().__init__(kernel, fd, target)
        self.name = name

    def hint(self, operation: str, err: int) -> str:
        if err == errno.ENOTTY:
            return f"{self.target} is not a VFIO device fd"
        if operation == "DEVICE_RESET" and err == errno.EINVAL:
            return "the device has no reset method (see reset_method in sysfs)"
        return super().hint(operation, err)

    def info(self) -> DeviceInfo:
        return self._call("DEVICE_GET_INFO", self.kernel.device_get_info)

    def region_info(self, index: int) -> RegionInfo:
        return self._call("DEVICE_GET_REGION_INFO", self.kernel.device_get_region_info, index)

    def _config_region(self, offset: int, size: int) -> RegionInfo:
        region = self.region_info(abi.PciRegion.CONFIG)
        if offset < 0 or size < 0 or offset + size > region.size:
            raise VfioError(
                errno.EINVAL,
                "config access",
                self.target,
                f"bytes {offset}..{offset + size} are outside the {region.size}-byte config space",
            )
        return region

    def read_config(self, offset: int, size: int) -> bytes:
        region = self._config_region(offset, size)
        data = self._call("config read", self.kernel.pread, size, region.offset + offset)
        if len(data) != size:
            raise VfioError(errno.EIO, "config read", self.target, "short read")
        return data

    def write_config(self, offset: int, data: bytes) -> None:
        region = self._config_region(offset, len(data))
        written = self._call("config write", self.kernel.pwrite, data, region.offset + offset)
        if written != len(data):
            raise VfioError(errno.EIO, "config write", self.target, "short write")

    @property
    def vendor_id(self) -> int:
        return int.from_bytes(self.read_config(0, 2), "little")

    @property
    def device_id(self) -> int:
        return int.from_bytes(self.read_config(2, 2), "little")

    def reset(self) -> None:
        self._call("DEVICE_RESET", self.kernel.device_reset)


def cdev_path(address: str | PciAddress, *, sysfs: str = SYSFS) -> str:
    """The cdev node of a vfio-pci bound device, found under its vfio-dev/ in sysfs."""
    try:
        name = str(PciAddress.parse(str(address)))
    except AddressError as e:
        raise VfioError(errno.EINVAL, "open", "device cdev", str(e)) from e
    vfio_dev = os.path.join(sysfs, "bus/pci/devices", name, "vfio-dev")
    try:
        entries = sorted(e for e in os.listdir(vfio_dev) if e.startswith("vfio"))
    except FileNotFoundError:
        entries = []
    if not entries:
        raise VfioError(
            errno.ENOENT,
            "open",
            f"device cdev of {name}",
            "the device has no VFIO cdev",
            "bind it to vfio-pci; cdevs need Linux >= 6.6 with CONFIG_VFIO_DEVICE_CDEV",
        )
    return os.path.join(DEV_VFIO_DEVICES, entries[0])


class CdevDevice(Device):
    """A device opened through its cdev; usable once bound to an iommufd."""

    def __init__(self, kernel: Kernel, fd: int, target: str, name: str) -> None:
        super().__init__(kernel, fd, target, name)
        self.devid: int | None = None

    @classmethod
    def open(cls, kernel: Kernel, path: str, name: str) -> Self:
        fd = open_node(
            kernel,
            path,
            "device",
            "no such cdev: bind the device to vfio-pci (Linux >= 6.6, CONFIG_VFIO_DEVICE_CDEV)",
        )
        return cls(kernel, fd, path, name)

    def hint(self, operation: str, err: int) -> str:
        if operation == "DEVICE_BIND_IOMMUFD" and err == errno.EINVAL:
            return "the device is already bound to an iommufd (one bind per device)"
        if operation == "DEVICE_BIND_IOMMUFD" and err == errno.EBUSY:
            return "its group is open through the legacy interface"
        if operation == "DEVICE_ATTACH_IOMMUFD_PT" and err == errno.EINVAL:
            return "bind the device to an iommufd first, and attach an IOAS of that iommufd"
        return super().hint(operation, err)

    def bind(self, iommufd: IommuFd) -> int:
        self.devid = self._call(
            "DEVICE_BIND_IOMMUFD", self.kernel.device_bind_iommufd, iommufd.fileno()
        )
        return self.devid

    def attach(self, ioas: Ioas) -> int:
        return self._call("DEVICE_ATTACH_IOMMUFD_PT", self.kernel.device_attach_iommufd_pt, ioas.id)

    def detach(self) -> None:
        self._call("DEVICE_DETACH_IOMMUFD_PT", self.kernel.device_detach_iommufd_pt)
