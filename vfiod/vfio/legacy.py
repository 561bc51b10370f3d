"""The legacy VFIO interface: a container (/dev/vfio/vfio) holding groups (/dev/vfio/N)."""

from __future__ import annotations

import errno
import os
import re
from typing import Self

from vfiod.pci import AddressError, PciAddress
from vfiod.vfio import abi
from vfiod.vfio.device import Device
from vfiod.vfio.dma import MAP_HINTS
from vfiod.vfio.errors import NotSupportedError, VfioError
from vfiod.vfio.handle import Handle, open_node
from vfiod.vfio.kernel import IommuInfo, IovaRange, Kernel

DEV_VFIO = "/dev/vfio"
CONTAINER_PATH = "/dev/vfio/vfio"

NOIOMMU_PREFIX = "noiommu-"
_DMA_IMPOSSIBLE = (
    "a no-IOMMU container has no IOMMU to translate DMA: the device reaches all of "
    "physical memory, and there is nothing to map"
)


class Container(Handle):
    """A VFIO container: the IOMMU context its groups share."""

    kind = "container"

    def __init__(self, kernel: Kernel, fd: int, target: str) -> None:
        super().__init__(kernel, fd, target)
        self.groups: list[Group] = []
        self.iommu_type: abi.IommuType | None = None

    @classmethod
    def open(cls, kernel: Kernel, path: str = CONTAINER_PATH) -> Self:
        fd = open_node(kernel, path, "container", "load the vfio module (modprobe vfio-pci)")
        container = cls(kernel, fd, path)
        try:
            version = container._call("GET_API_VERSION", kernel.get_api_version)
            if version != abi.VFIO_API_VERSION:
                raise VfioError(
                    errno.EPROTO,
                    "GET_API_VERSION",
                    path,
                    f"kernel VFIO API version {version}, vfiod speaks {abi.VFIO_API_VERSION}",
                )
        except BaseException:
            container.close()
            raise
        return container

    @classmethod
    def adopt(
        cls, kernel: Kernel, fd: int, iommu_type: abi.IommuType | None, path: str = CONTAINER_PATH
    ) -> Self:
        """A container set up by an earlier process of ours (kept in systemd's
        fd store): its IOMMU model is set; its groups are adopted next.
        Checked with GET_API_VERSION; takes the fd even on error."""
        container = cls(kernel, fd, path)
        try:
            container._call("GET_API_VERSION", kernel.get_api_version)
        except BaseException:
            container.close()
            raise
        container.iommu_type = iommu_type
        return container

    def hint(self, operation: str, err: int) -> str:
        if operation == "GET_API_VERSION" and err == errno.ENOTTY:
            return f"{self.target} is not a VFIO container node (expected {CONTAINER_PATH})"
        if operation == "SET_IOMMU" and err == errno.EINVAL:
            return "attach a group first, and pick an IOMMU type the kernel supports"
        if operation == "IOMMU_MAP_DMA":
            return MAP_HINTS.get(err, super().hint(operation, err))
        return super().hint(operation, err)

    def check_extension(self, extension: abi.IommuType) -> bool:
        return self._call("CHECK_EXTENSION", self.kernel.check_extension, extension) > 0

    def set_iommu(self, iommu_type: abi.IommuType | None = None) -> abi.IommuType:
        """Choose the IOMMU model; the kernel needs at least one group attached.

        Without an explicit type: NOIOMMU when every group is a no-IOMMU group,
        else the best of TYPE1v2 and TYPE1 the kernel has.
        """
        if not self.groups:
            raise VfioError(
                errno.EINVAL,
                "SET_IOMMU",
                self.target,
                "the container has no group",
                "attach a group with Group.set_container() first",
            )
        if self.iommu_type is not None:
            raise VfioError(
                errno.EBUSY,
                "SET_IOMMU",
                self.target,
                f"the IOMMU model is already set ({self.iommu_type.name})",
                "it stays until the last group leaves the container",
            )
        if iommu_type is None:
            iommu_type = self._best_iommu_type()
        self._call("SET_IOMMU", self.kernel.set_iommu, iommu_type)
        self.iommu_type = iommu_type
        return iommu_type

    def _best_iommu_type(self) -> abi.IommuType:
        if all(group.noiommu for group in self.groups):
            return abi.IommuType.NOIOMMU
        for candidate in (abi.IommuType.TYPE1v2, abi.IommuType.TYPE1):
            if self.check_extension(candidate):
                return candidate
        raise NotSupportedError(
            "SET_IOMMU",
            self.target,
            "the kernel offers neither the type1v2 nor the type1 IOMMU model",
            "load vfio_iommu_type1 and boot with the IOMMU on (intel_iommu=on or amd_iommu=on)",
        )

    @property
    def noiommu(self) -> bool:
        return self.iommu_type == abi.IommuType.NOIOMMU

    def _require_iommu(self, operation: str) -> None:
        if self.iommu_type is None:
            raise VfioError(
                errno.EINVAL,
                operation,
                self.target,
                "no IOMMU model set",
                "call set_iommu() after attaching a group",
            )
        if self.noiommu:
            raise NotSupportedError(
                operation,
                self.target,
                _DMA_IMPOSSIBLE,
                "give the device's DMA addresses as physical addresses instead",
            )

    def info(self) -> IommuInfo:
        self._require_iommu("IOMMU_GET_INFO")
        return self._call("IOMMU_GET_INFO", self.kernel.iommu_get_info)

    def iova_ranges(self) -> tuple[IovaRange, ...]:
        return self.info().iova_ranges

    def map_dma(
        self, vaddr: int, iova: int, size: int, *, read: bool = True, write: bool = True
    ) -> None:
        self._require_iommu("IOMMU_MAP_DMA")
        flags = abi.DmaMapFlag(0)
        if read:
            flags |= abi.DmaMapFlag.READ
        if write:
            flags |= abi.DmaMapFlag.WRITE
        self._call("IOMMU_MAP_DMA", self.kernel.iommu_map_dma, vaddr, iova, size, flags)

    def unmap_dma(self, iova: int, size: int) -> int:
        self._require_iommu("IOMMU_UNMAP_DMA")
        return self._call("IOMMU_UNMAP_DMA", self.kernel.iommu_unmap_dma, iova, size)


def group_path(group: int | str, dev_dir: str = DEV_VFIO) -> str:
    """The node of a group: 9 -> /dev/vfio/9, "noiommu-0" -> /dev/vfio/noiommu-0."""
    name = str(group)
    number = name.removeprefix(NOIOMMU_PREFIX)
    if not re.fullmatch(r"[0-9]+", number):
        raise VfioError(
            errno.EINVAL,
            "open",
            f"group {name!r}",
            "not an IOMMU group name",
            "give the group number (as in /sys/kernel/iommu_groups) or noiommu-N",
        )
    return os.path.join(dev_dir, name)


class Group(Handle):
    """An open IOMMU group. Holding it open is owning it: a second open gets EBUSY."""

    kind = "group"

    def __init__(self, kernel: Kernel, fd: int, target: str, name: str) -> None:
        super().__init__(kernel, fd, target)
        self.name = name
        self.container: Container | None = None

    @classmethod
    def open(cls, kernel: Kernel, group: int | str, *, dev_dir: str = DEV_VFIO) -> Self:
        path = group_path(group, dev_dir)
        fd = open_node(
            kernel,
            path,
            "group",
            "no such VFIO group: bind the group's devices to vfio-pci first "
            "(the node appears once one member is bound)",
        )
        opened = cls(kernel, fd, path, str(group))
        try:
            opened.status()  # proves that the node is a group
        except BaseException:
            opened.close()
            raise
        return opened

    @classmethod
    def adopt(
        cls,
        kernel: Kernel,
        fd: int,
        name: str,
        container: Container | None,
        *,
        dev_dir: str = DEV_VFIO,
    ) -> Self:
        """A group fd an earlier process of ours opened (and maybe attached to
        ``container``); checked with GROUP_GET_STATUS. Takes the fd even on error."""
        group = cls(kernel, fd, group_path(name, dev_dir), name)
        try:
            attached = bool(group.status() & abi.GroupFlag.CONTAINER_SET)
        except BaseException:
            group.close()
            raise
        if container is not None:
            if not attached:
                group.close()
                raise VfioError(errno.EINVAL, "adopt", group.target, "the group is in no container")
            group.container = container
            container.groups.append(group)
        return group

    @property
    def noiommu(self) -> bool:
        return self.name.startswith(NOIOMMU_PREFIX)

    def hint(self, operation: str, err: int) -> str:
        if err == errno.ENOTTY or (operation == "GROUP_GET_STATUS" and err == errno.EINVAL):
            return f"{self.target} is not a VFIO group node"
        if operation == "GROUP_SET_CONTAINER" and err == errno.EPERM:
            return (
                "the group is not viable: every device in it must be bound to "
                "vfio-pci (or pci-stub, pcieport) or have no driver"
            )
        if operation == "GROUP_GET_DEVICE_FD" and err in (errno.EINVAL, errno.EPERM):
            return "set a container and its IOMMU model first, and name a device of this group"
        if operation == "GROUP_GET_DEVICE_FD" and err == errno.ENODEV:
            return "that device is not in this group (see /sys/kernel/iommu_groups/N/devices)"
        return super().hint(operation, err)

    def status(self) -> abi.GroupFlag:
        return self._call("GROUP_GET_STATUS", self.kernel.group_get_status)

    @property
    def viable(self) -> bool:
        return bool(self.status() & abi.GroupFlag.VIABLE)

    def set_container(self, container: Container) -> None:
        if self.container is not None:
            raise VfioError(
                errno.EBUSY,
                "GROUP_SET_CONTAINER",
                self.target,
                f"already in container {self.container.target}",
                "unset the container first",
            )
        if any(group.noiommu != self.noiommu for group in container.groups):
            raise VfioError(
                errno.EPERM,
                "GROUP_SET_CONTAINER",
                self.target,
                "a no-IOMMU group cannot share a container with IOMMU-backed groups",
                "use a container of its own for each kind",
            )
        self._call("GROUP_SET_CONTAINER", self.kernel.group_set_container, container.fileno())
        self.container = container
        container.groups.append(self)

    def unset_container(self) -> None:
        if self.container is None:
            return
        self._call("GROUP_UNSET_CONTAINER", self.kernel.group_unset_container)
        self._leave_container()

    def _leave_container(self) -> None:
        assert self.container is not None
        self.container.groups.remove(self)
        # The kernel drops the IOMMU model, and every mapping, with the last group.
        if not self.container.groups:
            self.container.iommu_type = None
        self.container = None

    def open_device(self, address: str | PciAddress) -> Device:
        try:
            name = str(PciAddress.parse(str(address)))
        except AddressError as e:
            raise VfioError(errno.EINVAL, "GROUP_GET_DEVICE_FD", self.target, str(e)) from e
        fd = self._call("GROUP_GET_DEVICE_FD", self.kernel.group_get_device_fd, name)
        return Device(self.kernel, fd, f"device {name} of {self.target}", name)

    def close(self) -> None:
        # Leave the container first so its group list stays true; the kernel
        # does the same on close, so a failure here must not keep the fd open.
        if self.container is not None and not self.closed:
            try:
                self.unset_container()
            except VfioError:
                self._leave_container()
        super().close()
