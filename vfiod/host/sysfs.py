"""Reading and writing the PCI part of sysfs; the root is a parameter so tests
can build fake trees."""

from __future__ import annotations

import errno
import os

from vfiod.pci import PciAddress

_CHUNK = 4096  # a sysfs attribute is at most a page, read at once


class HostError(OSError):
    """A sysfs operation failed; the message names the device and the next step."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(err, message)

    def __str__(self) -> str:
        return str(self.strerror)


class Sysfs:
    def __init__(self, root: str = "/sys") -> None:
        self.root = root

    def path(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    def device_path(self, address: PciAddress) -> str:
        return self.path("bus/pci/devices", str(address))

    def require_device(self, address: PciAddress) -> str:
        path = self.device_path(address)
        if not os.path.isdir(path):
            raise HostError(
                errno.ENODEV,
                f"no PCI device {address}: see /sys/bus/pci/devices for the devices present",
            )
        return path

    def read(self, path: str) -> str:
        # os.read, not a file object: building one costs more than the read,
        # and a scan reads a dozen attributes of every device.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            chunks = [os.read(fd, _CHUNK)]
            while len(chunks[-1]) == _CHUNK:
                chunks.append(os.read(fd, _CHUNK))
        finally:
            os.close(fd)
        return b"".join(chunks).decode().strip()

    def write(self, path: str, value: str) -> None:
        # One write() per value: sysfs attributes act on each write call.
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, value.encode())
        finally:
            os.close(fd)

    def driver(self, address: PciAddress) -> str | None:
        link = os.path.join(self.require_device(address), "driver")
        try:
            return os.path.basename(os.readlink(link))
        except FileNotFoundError:
            return None

    def driver_override(self, address: PciAddress) -> str | None:
        value = self.read(os.path.join(self.require_device(address), "driver_override"))
        return None if value in ("", "(null)") else value

    def iommu_group(self, address: PciAddress) -> str | None:
        link = os.path.join(self.require_device(address), "iommu_group")
        try:
            return os.path.basename(os.readlink(link))
        except FileNotFoundError:
            return None

    def id_attr(self, address: PciAddress, name: str) -> int:
        return int(self.read(os.path.join(self.require_device(address), name)), 16)
