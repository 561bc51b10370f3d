"""An in-memory Linux VFIO + iommufd kernel behind the ``Kernel`` interface.

``FakeKernel`` answers every ``Kernel`` call the way Linux (6.12, vfio-pci on
x86 with VT-d) does, with the kernel's errnos, so the object layer and the
layers above it can be tested without a VFIO host:

    fake = FakeKernel()
    fake.add_group(9, devices=[FakePciDevice("0000:00:10.0", vendor=0x8086, device=0x10D3)])
    with Container.open(fake) as container, Group.open(fake, 9) as group: ...

Every fd it hands out is a real memfd named ``vfio-fake:<node>``, so fd
counting, ``os.dup`` and fd passing (SCM_RIGHTS, D-Bus) behave as with real
nodes. An fd stands for one open file of the model; the model finds it by fd
number, or by the memfd's inode for an fd it has not seen (a dup or a received
fd), and releases the file, as the kernel does, once no fd in this process
refers to it any more, however it was closed.

Modelled: the container (type1 and no-IOMMU drivers, CHECK_EXTENSION,
SET_IOMMU, MAP/UNMAP_DMA with RLIMIT_MEMLOCK accounting), groups (single open,
viability, container attach and detach, busy while device fds live), vfio-pci
devices (info, regions, config space, reset, BARs), device cdevs and iommufd
(bind, attach with auto-allocated HWPTs, IOAS map/unmap/ranges/destroy, the
RLIMIT_MODE option), and ``mmap``/``munmap`` with fake addresses that DMA maps
must point into. Not modelled: iommufd's VFIO-container compatibility (VFIO
ioctls on /dev/iommu, an iommufd given to GROUP_SET_CONTAINER), cdevs of
no-IOMMU devices, interrupts, hot reset, dirty tracking, migration.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import errno
import functools
import os
import stat
import struct
import threading
from collections.abc import Callable, Collection, Iterable
from typing import TYPE_CHECKING, ClassVar, Concatenate, ParamSpec, TypeVar

from vfiod.pci import PciAddress
from vfiod.vfio import abi
from vfiod.vfio.kernel import DeviceInfo, IoasRanges, IommuInfo, IovaRange, Kernel, RegionInfo

PAGE_SIZE = 4096
CONTAINER_PATH = "/dev/vfio/vfio"
DEV_VFIO = "/dev/vfio"
DEV_VFIO_DEVICES = "/dev/vfio/devices"
IOMMUFD_PATH = "/dev/iommu"

# What VT-d offers on x86: 4K, 2M and 1G pages; a 48-bit aperture without the
# MSI window at 0xfee00000..0xfeefffff that every device reserves.
DEFAULT_IOVA_PGSIZES = (4 << 10) | (2 << 20) | (1 << 30)
DEFAULT_IOVA_RANGES = (IovaRange(0, 0xFEDF_FFFF), IovaRange(0xFEF0_0000, (1 << 48) - 1))
# vfio_iommu_type1's dma_entry_limit module parameter default.
DEFAULT_DMA_ENTRY_LIMIT = 65535

_U64 = (1 << 64) - 1
# vfio-pci places region N at file offset N << 40 (VFIO_PCI_OFFSET_SHIFT).
_REGION_SHIFT = 40
_REGION_MASK = (1 << _REGION_SHIFT) - 1
_NUM_REGIONS = 9  # VFIO_PCI_NUM_REGIONS: BAR0-5, ROM, CONFIG, VGA
_NUM_IRQS = 5  # VFIO_PCI_NUM_IRQS: INTx, MSI, MSI-X, ERR, REQ
# Config space bytes vfio-pci does not let the user change: IDs, revision and
# class code, header type.
_CONFIG_READ_ONLY = frozenset(range(0, 4)) | frozenset(range(8, 12)) | {0x0E}
# type1 CHECK_EXTENSION arguments without an IommuType member.
_DMA_CC_IOMMU = 4
_UPDATE_VADDR = 10
# Fake user addresses start high and leave a guard page between mappings, so
# two mappings are never contiguous by accident.
_MMAP_BASE = 0x7F00_0000_0000


def _error(code: int) -> OSError:
    return OSError(code, os.strerror(code))


def _page_up(value: int) -> int:
    return (value + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)


def _merged(ranges: Iterable[IovaRange]) -> list[IovaRange]:
    """Sorted ranges with touching or overlapping ones joined."""
    out: list[IovaRange] = []
    for r in sorted(ranges, key=lambda r: r.start):
        if out and r.start <= out[-1].last + 1:
            out[-1] = IovaRange(out[-1].start, max(out[-1].last, r.last))
        else:
            out.append(r)
    return out


def _within(ranges: Iterable[IovaRange], iova: int, size: int) -> bool:
    return any(r.contains(iova, size) for r in _merged(ranges))


# Builder data: what the host looks like.


@dataclasses.dataclass(frozen=True)
class FakePciDevice:
    """A PCI function bound to vfio-pci.

    ``bars`` are the sizes of memory BARs 0.. (0: not implemented), ``reset``
    whether it has a reset method, ``config_size`` 4096 for PCIe, 256 for PCI.
    """

    address: str
    vendor: int = 0x8086
    device: int = 0x10D3
    class_code: int = 0x020000
    revision: int = 0
    config_size: int = 4096
    bars: tuple[int, ...] = ()
    reset: bool = True

    def __post_init__(self) -> None:
        # The kernel's spelling, so GROUP_GET_DEVICE_FD matches it exactly.
        object.__setattr__(self, "address", str(PciAddress.parse(self.address)))
        for name in ("vendor", "device"):
            if not 0 <= getattr(self, name) <= 0xFFFF:
                raise ValueError(f"{name} ID must fit in 16 bits")
        if not 0 <= self.class_code <= 0xFFFFFF or not 0 <= self.revision <= 0xFF:
            raise ValueError("class code is 24 bits, revision 8")
        if self.config_size not in (256, 4096):
            raise ValueError("config_size is 256 (PCI) or 4096 (PCIe)")
        if len(self.bars) > 6 or any(s < 0 or s & (s - 1) for s in self.bars):
            raise ValueError("at most 6 BARs, each 0 or a power of two in size")

    def config_space(self) -> bytes:
        """The config space right after reset."""
        config = bytearray(self.config_size)
        config[0:2] = self.vendor.to_bytes(2, "little")
        config[2:4] = self.device.to_bytes(2, "little")
        config[8] = self.revision
        config[9:12] = self.class_code.to_bytes(3, "little")
        return bytes(config)


@dataclasses.dataclass(frozen=True)
class FakeGroup:
    """An IOMMU group with a VFIO node: ``name`` is "9" or "noiommu-0"."""

    name: str
    devices: tuple[FakePciDevice, ...]
    viable: bool

    @property
    def path(self) -> str:
        return f"{DEV_VFIO}/{self.name}"

    @property
    def noiommu(self) -> bool:
        return self.name.startswith("noiommu-")


@dataclasses.dataclass(frozen=True)
class FakeDmaMapping:
    """One IOVA mapping of a container or IOAS, for tests to look at."""

    iova: int
    size: int
    vaddr: int
    read: bool
    write: bool


# Kernel state. Objects outlive the fds that created them where Linux's do:
# a container lives while groups are in it, a group stays open while device
# fds from it live, an iommufd while devices are bound to it.


@dataclasses.dataclass(eq=False)
class _Dma:
    iova: int
    size: int
    vaddr: int
    read: bool
    write: bool
    pinned: int = 0  # bytes counted against the memlock limit

    @property
    def last(self) -> int:
        return self.iova + self.size - 1

    def view(self) -> FakeDmaMapping:
        return FakeDmaMapping(self.iova, self.size, self.vaddr, self.read, self.write)


@dataclasses.dataclass(eq=False)
class _Container:
    groups: list[_Group] = dataclasses.field(default_factory=list)
    driver: abi.IommuType | None = None
    noiommu: bool = False  # decided by the first group, like container->noiommu
    dmas: list[_Dma] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(eq=False)
class _Group:
    spec: FakeGroup
    fd_open: bool = False
    device_fds: int = 0  # device fds from GROUP_GET_DEVICE_FD; each holds the group open
    container: _Container | None = None
    cdev_bound: int = 0  # devices bound through their cdev (cdev_device_open_cnt)

    @property
    def opened(self) -> bool:
        return self.fd_open or self.device_fds > 0


@dataclasses.dataclass(eq=False)
class _Device:
    spec: FakePciDevice
    group: _Group
    cdev: str | None
    open_count: int = 0
    resets: int = 0
    _config: bytearray | None = None

    @property
    def config(self) -> bytearray:
        """The config space as the device sees it, made on first use: 4 KiB
        a device, which a host of thousands mostly never reads."""
        if self._config is None:
            self._config = bytearray(self.spec.config_space())
        return self._config


@dataclasses.dataclass(eq=False)
class _Ioas:
    id: int
    areas: list[_Dma] = dataclasses.field(default_factory=list)
    hwpts: list[_Hwpt] = dataclasses.field(default_factory=list)

    @property
    def attached(self) -> bool:
        return bool(self.hwpts)


@dataclasses.dataclass(eq=False)
class _Hwpt:
    """A paging domain iommufd created for an IOAS on attach."""

    id: int
    ioas: _Ioas
    devices: set[_DeviceFile] = dataclasses.field(default_factory=set)


@dataclasses.dataclass(eq=False)
class _Idev:
    id: int


@dataclasses.dataclass(eq=False)
class _Ictx:
    file_open: bool = True
    bound: int = 0  # bound device fds, each holding the context
    objects: dict[int, _Ioas | _Hwpt | _Idev] = dataclasses.field(default_factory=dict)
    next_id: int = 1  # ids start at 1 (XA_FLAGS_ALLOC1)
    account_mode: int = 0

    def new_id(self) -> int:
        self.next_id += 1
        return self.next_id - 1


class _InodeEvictions:
    """Which memfds have no reference left in any process: inotify reports
    IN_IGNORED once the inode is evicted, after its last file reference —
    in this process, another one, or a message in flight — is gone."""

    _IN_CLOSE = 0x18  # IN_CLOSE_WRITE | IN_CLOSE_NOWRITE; eviction comes as IN_IGNORED
    _IN_IGNORED = 0x8000
    _EVENT = struct.Struct("iIII")

    def __init__(self) -> None:
        libc = ctypes.util.find_library("c")
        self._libc = ctypes.CDLL(libc, use_errno=True)
        fd = self._libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_init1: {os.strerror(err)}")
        self.fd: int = fd
        self._watched: dict[int, _File] = {}

    def watch(self, fd: int, file: _File) -> None:
        wd = self._libc.inotify_add_watch(self.fd, f"/proc/self/fd/{fd}".encode(), self._IN_CLOSE)
        if wd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_add_watch: {os.strerror(err)}")
        self._watched[wd] = file

    def evicted(self) -> list[_File]:
        gone: list[_File] = []
        while True:
            try:
                data = os.read(self.fd, 64 * self._EVENT.size)
            except BlockingIOError:
                return gone
            offset = 0
            while offset < len(data):
                wd, mask, _cookie, length = self._EVENT.unpack_from(data, offset)
                offset += self._EVENT.size + length
                file = self._watched.pop(wd, None) if mask & self._IN_IGNORED else None
                if file is not None:
                    gone.append(file)


# Open files, one per memfd inode.


class _File:
    def __init__(self, node: str) -> None:
        self.node = node
        self.ident = (0, 0)
        self.fds: set[int] = set()


class _ContainerFile(_File):
    def __init__(self) -> None:
        super().__init__(CONTAINER_PATH)
        self.container = _Container()


class _GroupFile(_File):
    def __init__(self, group: _Group) -> None:
        super().__init__(group.spec.path)
        self.group = group


class _DeviceFile(_File):
    def __init__(self, node: str, device: _Device, *, via_group: bool) -> None:
        super().__init__(node)
        self.device = device
        self.via_group = via_group
        self.ictx: _Ictx | None = None
        self.devid = 0
        self.hwpt: _Hwpt | None = None

    @property
    def access(self) -> bool:
        """Whether device ioctls work: always from a group, after BIND on a cdev."""
        return self.via_group or self.ictx is not None


class _IommufdFile(_File):
    def __init__(self) -> None:
        super().__init__(IOMMUFD_PATH)
        self.ictx = _Ictx()


@dataclasses.dataclass(frozen=True)
class _Mmap:
    address: int
    length: int
    backed: int  # bytes from address on that a pin may touch (a memfd ends early)


P = ParamSpec("P")
T = TypeVar("T")

_KERNEL_METHODS = frozenset(name for name in vars(Kernel) if not name.startswith("_"))


def _syscall(
    fn: Callable[Concatenate[FakeKernel, P], T],
) -> Callable[Concatenate[FakeKernel, P], T]:
    """One kernel entry: serialised, after forgetting fds closed behind the
    model's back, and failing instead if a test asked for that."""

    @functools.wraps(fn)
    def enter(self: FakeKernel, /, *args: P.args, **kwargs: P.kwargs) -> T:
        with self._lock:
            self._forget_closed()
            pending = self._faults.get(fn.__name__)
            if pending:
                raise _error(pending.pop(0))
            return fn(self, *args, **kwargs)

    return enter


class FakeKernel:
    """Linux's VFIO and iommufd, in memory. See the module docstring."""

    # Public names beyond the Kernel interface: building the host, looking at it.
    TEST_API: ClassVar[frozenset[str]] = frozenset(
        {
            "add_group",
            "add_file",
            "add_link",
            "cdev_path",
            "config_space",
            "fail_next",
            "mappings",
            "mmaps",
            "open_nodes",
            "reset_count",
        }
    )

    def __init__(
        self,
        *,
        iommufd: bool = True,
        cdev: bool = True,
        type1: bool = True,
        noiommu_mode: bool = False,
        iova_ranges: Iterable[IovaRange] = DEFAULT_IOVA_RANGES,
        iova_pgsizes: int = DEFAULT_IOVA_PGSIZES,
        memlock_limit: int | None = None,
        dma_entry_limit: int = DEFAULT_DMA_ENTRY_LIMIT,
        cross_process: bool = False,
    ) -> None:
        """``iommufd``: /dev/iommu exists; ``cdev``: devices get /dev/vfio/devices
        nodes; ``type1``: vfio_iommu_type1 is loaded; ``noiommu_mode``:
        enable_unsafe_noiommu_mode (a no-IOMMU group turns it on);
        ``memlock_limit``: RLIMIT_MEMLOCK in bytes for pinned DMA memory, None
        for CAP_IPC_LOCK (no limit); ``cross_process``: fds this process hands
        to others (over D-Bus) keep their files open until closed there too,
        as Linux does — the model then learns of the last close from inotify
        (the memfd's inode is evicted), which also covers fds in flight."""
        if iova_pgsizes <= 0 or iova_pgsizes & (PAGE_SIZE - 1):
            raise ValueError("iova_pgsizes needs page sizes of at least 4 KiB")
        self.has_iommufd = iommufd
        self.has_cdev = cdev
        self.has_type1 = type1
        self.noiommu_mode = noiommu_mode
        self.iova_ranges = tuple(iova_ranges)
        self.iova_pgsizes = iova_pgsizes
        self.memlock_limit = memlock_limit
        self.dma_entry_limit = dma_entry_limit
        # Capabilities of the calling process.
        self.cap_sys_rawio = True
        self.cap_sys_resource = True

        self._lock = threading.RLock()
        self._groups: dict[str, _Group] = {}
        self._group_numbers: set[str] = set()  # "9" for group 9 and for noiommu-9
        self._devices: dict[str, _Device] = {}
        self._cdevs: dict[str, _Device] = {}
        self._links: dict[str, str] = {}
        self._foreign: set[str] = set()
        self._files: dict[int, _File] = {}
        self._by_ident: dict[tuple[int, int], _File] = {}
        self._mmaps: dict[int, _Mmap] = {}
        self._next_address = _MMAP_BASE
        self._pinned = 0
        self._faults: dict[str, list[int]] = {}
        self._evictions = _InodeEvictions() if cross_process else None

    # Building the host.

    def add_group(
        self, group: int | str, devices: Iterable[FakePciDevice], *, viable: bool = True
    ) -> FakeGroup:
        """A group whose ``devices`` are bound to vfio-pci: node /dev/vfio/N, or
        /dev/vfio/noiommu-N for ``"noiommu-N"`` (which turns no-IOMMU mode on).
        ``viable=False``: another member of the group is on a host driver."""
        name = str(group)
        number = name.removeprefix("noiommu-")
        if not (number.isascii() and number.isdecimal()):
            raise ValueError(f"group name {name!r}: expected N or noiommu-N")
        spec = FakeGroup(name, tuple(devices), viable)
        if not spec.devices:
            raise ValueError("a group has a VFIO node only once a device of it is bound")
        if spec.noiommu and not viable:
            raise ValueError("no-IOMMU groups have one device and are always viable")
        if number in self._group_numbers:
            raise ValueError(f"IOMMU group {number} exists already")
        state = _Group(spec)
        addresses = [dev.address for dev in spec.devices]
        for address in addresses:
            if address in self._devices or addresses.count(address) > 1:
                raise ValueError(f"device {address} is in a group already")
        for dev in spec.devices:
            # No-IOMMU devices get no cdev here (the kernel names theirs
            # noiommu-vfioN and binds them without an iommufd).
            cdev = None
            if self.has_cdev and not spec.noiommu:
                cdev = f"{DEV_VFIO_DEVICES}/vfio{len(self._cdevs)}"
            device = _Device(dev, state, cdev)
            self._devices[dev.address] = device
            if cdev is not None:
                self._cdevs[cdev] = device
        self._groups[name] = state
        self._group_numbers.add(number)
        if spec.noiommu:
            self.noiommu_mode = True
        return spec

    def add_file(self, path: str) -> None:
        """A node that is no VFIO object (like /dev/null): opens, answers no ioctl."""
        self._foreign.add(os.path.normpath(path))

    def add_link(self, path: str, target: str) -> None:
        """A symlink: opening ``path`` opens ``target``."""
        self._links[os.path.normpath(path)] = os.path.normpath(target)

    # Looking at it.

    def open_nodes(self) -> dict[int, str]:
        """Every fd of this process that holds a model object open, and what it is."""
        with self._lock:
            self._sweep()
            return {fd: self._files[fd].node for fd in sorted(self._files)}

    def mappings(self, fd: int, ioas_id: int | None = None) -> tuple[FakeDmaMapping, ...]:
        """The DMA mappings of the container open at ``fd``, or of IOAS
        ``ioas_id`` of the iommufd open at ``fd``, by IOVA."""
        with self._lock:
            self._sweep()
            file = self._files.get(fd)
            if isinstance(file, _ContainerFile) and ioas_id is None:
                dmas = file.container.dmas
            elif isinstance(file, _IommufdFile) and ioas_id is not None:
                ioas = file.ictx.objects.get(ioas_id)
                if not isinstance(ioas, _Ioas):
                    raise LookupError(f"iommufd fd {fd} has no IOAS {ioas_id}")
                dmas = ioas.areas
            else:
                raise LookupError(f"fd {fd} is no container (or iommufd with an IOAS id) here")
            return tuple(d.view() for d in sorted(dmas, key=lambda d: d.iova))

    def reset_count(self, address: str) -> int:
        """How often DEVICE_RESET reset the device."""
        return self._device_spec(address).resets

    def config_space(self, address: str) -> bytes:
        """The device's config space as the device sees it now."""
        return bytes(self._device_spec(address).config)

    def cdev_path(self, address: str) -> str:
        """The /dev/vfio/devices node of a device."""
        device = self._device_spec(address)
        if device.cdev is None:
            raise LookupError(f"{address} has no cdev in this FakeKernel")
        return device.cdev

    def mmaps(self) -> dict[int, int]:
        """Live mmap_shared mappings: address -> length."""
        with self._lock:
            return {a: m.length for a, m in sorted(self._mmaps.items())}

    @property
    def pinned_bytes(self) -> int:
        """Memory pinned for DMA, as counted against ``memlock_limit``."""
        return self._pinned

    def fail_next(self, method: str, err: int) -> None:
        """Make the next call of Kernel method ``method`` fail with ``err``."""
        if method not in _KERNEL_METHODS:
            raise ValueError(f"{method!r} is not a Kernel method")
        with self._lock:
            self._faults.setdefault(method, []).append(err)

    def _device_spec(self, address: str) -> _Device:
        name = str(PciAddress.parse(address))
        if name not in self._devices:
            raise LookupError(f"no device {name} in this FakeKernel")
        return self._devices[name]

    # Files and fds.

    def _ident_of(self, fd: int) -> tuple[int, int] | None:
        try:
            st = os.fstat(fd)
        except OSError:
            return None
        return (st.st_dev, st.st_ino)

    def _new_file(self, file: _File) -> int:
        fd = os.memfd_create(f"vfio-fake:{file.node}", os.MFD_CLOEXEC)
        ident = self._ident_of(fd)
        assert ident is not None
        file.ident = ident
        file.fds.add(fd)
        self._files[fd] = file
        self._by_ident[ident] = file
        if self._evictions is not None:
            self._evictions.watch(fd, file)
        return fd

    def _forget_closed(self) -> None:
        """Before each call: catch up with fds closed behind the model's back.
        Across processes, the inode evictions say when a file's last
        reference anywhere is gone, and the one fd a call names is checked
        when it is looked up (``_file_or_foreign``), so the model does not
        fstat every fd it knows on every call (its cost grew with the leases
        a daemon holds, and with it every call's)."""
        if self._evictions is None:
            self._sweep()
        else:
            self._release_evicted()

    def _sweep(self) -> None:
        """Forget fds no longer open on their memfd (closed with os.close, or
        the number reused), and release files no fd refers to any more."""
        orphans: list[_File] = []
        for fd, file in list(self._files.items()):
            if self._ident_of(fd) != file.ident:
                del self._files[fd]
                file.fds.discard(fd)
                if not file.fds:
                    orphans.append(file)
        for file in orphans:
            self._drop_if_unreferenced(file)
        self._release_evicted()

    def _release_evicted(self) -> None:
        """Release files whose every fd, in any process, is closed."""
        if self._evictions is None:
            return
        for file in self._evictions.evicted():
            if self._by_ident.get(file.ident) is not file:
                continue
            # Its inode is gone, so no fd anywhere refers to it: the fds the
            # model still lists for it were closed behind its back.
            for fd in file.fds:
                if self._files.get(fd) is file:
                    del self._files[fd]
            file.fds.clear()
            del self._by_ident[file.ident]
            self._release(file)

    def _drop_if_unreferenced(self, file: _File) -> None:
        if self._evictions is not None:
            # Evictions tell when no fd is left in any process, dups in this
            # one included: no need to look through /proc/self/fd for them.
            self._release_evicted()
            return
        # A dup or a received copy may still hold the file open, as in Linux.
        for name in self._fd_names():
            try:
                st = os.stat(f"/proc/self/fd/{name}")
            except OSError:
                continue
            if (st.st_dev, st.st_ino) == file.ident:
                file.fds.add(int(name))
                self._files[int(name)] = file
        if not file.fds:
            del self._by_ident[file.ident]
            self._release(file)

    @staticmethod
    def _fd_names() -> list[str]:
        try:
            return os.listdir("/proc/self/fd")
        except OSError:
            return []

    def _file_or_foreign(self, fd: int) -> _File | None:
        """The model's file at ``fd``; None for an open file it does not model."""
        file = self._files.get(fd)
        if file is not None and self._evictions is None:
            return file  # swept before this call
        ident = self._ident_of(fd)
        if file is not None:
            if ident == file.ident:
                return file
            # Closed behind the model's back, and the number reused.
            del self._files[fd]
            file.fds.discard(fd)
        if ident is None:
            raise _error(errno.EBADF)
        file = self._by_ident.get(ident)
        if file is not None:  # a dup or received fd: adopt it
            file.fds.add(fd)
            self._files[fd] = file
        return file

    def _file(self, fd: int) -> _File:
        file = self._file_or_foreign(fd)
        if file is None:
            raise _error(errno.ENOTTY)
        return file

    @staticmethod
    def _wrong_type(file: _File) -> OSError:
        # A container hands ioctls it does not know to its IOMMU driver and
        # answers EINVAL without one; an unbound cdev answers EINVAL to all but
        # BIND; everything else says ENOTTY.
        if isinstance(file, _ContainerFile) and file.container.driver is None:
            return _error(errno.EINVAL)
        if isinstance(file, _DeviceFile) and not file.access:
            return _error(errno.EINVAL)
        return _error(errno.ENOTTY)

    def _container(self, fd: int) -> _Container:
        file = self._file(fd)
        if not isinstance(file, _ContainerFile):
            raise self._wrong_type(file)
        return file.container

    def _type1(self, fd: int) -> _Container:
        """A container whose type1 driver takes IOMMU_* ioctls."""
        container = self._container(fd)
        if container.driver is None:
            raise _error(errno.EINVAL)
        if container.driver == abi.IommuType.NOIOMMU:
            raise _error(errno.ENOTTY)
        return container

    def _group(self, fd: int) -> _Group:
        file = self._file(fd)
        if not isinstance(file, _GroupFile):
            raise self._wrong_type(file)
        return file.group

    def _device_file(self, fd: int) -> _DeviceFile:
        file = self._file(fd)
        if not isinstance(file, _DeviceFile) or not file.access:
            raise self._wrong_type(file)
        return file

    def _ictx(self, fd: int) -> _Ictx:
        file = self._file(fd)
        if not isinstance(file, _IommufdFile):
            raise self._wrong_type(file)
        return file.ictx

    def _ioas(self, ictx: _Ictx, ioas_id: int) -> _Ioas:
        ioas = ictx.objects.get(ioas_id)
        if not isinstance(ioas, _Ioas):
            raise _error(errno.ENOENT)
        return ioas

    # Releasing what the last fd of a file held.

    def _release(self, file: _File) -> None:
        if isinstance(file, _GroupFile):
            file.group.fd_open = False
            self._group_maybe_released(file.group)
        elif isinstance(file, _DeviceFile):
            self._device_file_released(file)
        elif isinstance(file, _IommufdFile):
            file.ictx.file_open = False
            self._ictx_maybe_released(file.ictx)
        # A container lives on in the groups still attached to it.

    def _group_maybe_released(self, group: _Group) -> None:
        if not group.opened and group.container is not None:
            self._detach_group(group)

    def _detach_group(self, group: _Group) -> None:
        container = group.container
        assert container is not None
        container.groups.remove(group)
        group.container = None
        if not container.groups and container.driver is not None:
            # The last group out takes the IOMMU driver and every mapping along.
            for dma in container.dmas:
                self._unpin(dma)
            container.dmas.clear()
            container.driver = None

    def _device_file_released(self, file: _DeviceFile) -> None:
        device = file.device
        if file.via_group:
            device.open_count -= 1
            device.group.device_fds -= 1
            self._group_maybe_released(device.group)
        elif file.ictx is not None:
            self._detach_device(file)
            ictx = file.ictx
            del ictx.objects[file.devid]
            ictx.bound -= 1
            device.group.cdev_bound -= 1
            device.open_count = 0
            file.ictx = None
            self._ictx_maybe_released(ictx)

    def _ictx_maybe_released(self, ictx: _Ictx) -> None:
        if not ictx.file_open and not ictx.bound:
            # Nothing is attached any more, so nothing is pinned.
            ictx.objects.clear()

    def _detach_device(self, file: _DeviceFile) -> None:
        hwpt, file.hwpt = file.hwpt, None
        if hwpt is None:
            return
        hwpt.devices.discard(file)
        if not hwpt.devices:  # an automatic domain goes with its last device
            assert file.ictx is not None
            hwpt.ioas.hwpts.remove(hwpt)
            del file.ictx.objects[hwpt.id]
            if not hwpt.ioas.attached:
                for area in hwpt.ioas.areas:
                    self._unpin(area)

    # Pinning user memory for DMA.

    def _pin(self, dma: _Dma) -> None:
        start = dma.vaddr & ~(PAGE_SIZE - 1)
        end = _page_up(dma.vaddr + dma.size)
        if not self._user_memory(start, end):
            raise _error(errno.EFAULT)
        length = end - start
        if self.memlock_limit is not None and self._pinned + length > self.memlock_limit:
            raise _error(errno.ENOMEM)
        self._pinned += length
        dma.pinned = length

    def _unpin(self, dma: _Dma) -> None:
        self._pinned -= dma.pinned
        dma.pinned = 0

    def _user_memory(self, start: int, end: int) -> bool:
        """Whether [start, end) is all mapped, with pages behind it."""
        while start < end:
            for m in self._mmaps.values():
                if m.address <= start < m.address + m.backed:
                    start = m.address + m.backed
                    break
            else:
                return False
        return True

    # Kernel: files and memory.

    @_syscall
    def open(self, path: str, flags: int) -> int:
        target = os.path.normpath(path)
        for _ in range(40):  # MAXSYMLINKS
            if target not in self._links:
                break
            target = self._links[target]
        else:
            raise _error(errno.ELOOP)
        if target == CONTAINER_PATH:
            return self._new_file(_ContainerFile())
        if target == IOMMUFD_PATH and self.has_iommufd:
            return self._new_file(_IommufdFile())
        if target in self._foreign:
            # A file of its own; the model does not know it, as with /dev/null.
            return os.memfd_create(f"vfio-fake-foreign:{target}", os.MFD_CLOEXEC)
        if target in self._cdevs:
            device = self._cdevs[target]
            return self._new_file(_DeviceFile(target, device, via_group=False))
        head, name = os.path.split(target)
        group = self._groups.get(name) if head == DEV_VFIO else None
        if group is None:
            raise _error(errno.ENOENT)
        if group.spec.noiommu and not self.cap_sys_rawio:
            raise _error(errno.EPERM)
        if group.cdev_bound or group.opened:
            raise _error(errno.EBUSY)
        group.fd_open = True
        return self._new_file(_GroupFile(group))

    @_syscall
    def close(self, fd: int) -> None:
        file = self._files.pop(fd, None)
        try:
            os.close(fd)
        finally:
            if file is not None:
                file.fds.discard(fd)
                if not file.fds:
                    self._drop_if_unreferenced(file)

    @_syscall
    def node_of(self, fd: int, nodes: Collection[str]) -> str:
        file = self._file_or_foreign(fd)
        return file.node if file is not None and file.node in nodes else ""

    def _region(self, device: _Device, index: int) -> RegionInfo:
        if not 0 <= index < _NUM_REGIONS:
            raise _error(errno.EINVAL)
        offset = index << _REGION_SHIFT
        rw = abi.RegionFlag.READ | abi.RegionFlag.WRITE
        if index == abi.PciRegion.CONFIG:
            return RegionInfo(index, rw, device.spec.config_size, offset)
        if index <= abi.PciRegion.BAR5 and index < len(device.spec.bars):
            size = device.spec.bars[index]
            if size:
                flags = rw | (abi.RegionFlag.MMAP if size >= PAGE_SIZE else 0)
                return RegionInfo(index, flags, size, offset)
        return RegionInfo(index, abi.RegionFlag(0), 0, offset)

    def _region_access(self, fd: int, size: int, offset: int) -> tuple[_Device, int, int]:
        """Device, region index and offset in it for a read or write at ``offset``."""
        file = self._file_or_foreign(fd)
        assert file is not None
        if not isinstance(file, _DeviceFile) or not file.access:
            raise _error(errno.EINVAL)  # no read/write method, or not bound yet
        if size < 0 or offset < 0:
            raise _error(errno.EINVAL)
        index, pos = offset >> _REGION_SHIFT, offset & _REGION_MASK
        region = self._region(file.device, index)
        if index == abi.PciRegion.CONFIG:
            if pos >= region.size or pos + size > region.size:
                raise _error(errno.EFAULT)
        elif not region.size or pos >= region.size:
            raise _error(errno.EINVAL)
        return file.device, index, pos

    @_syscall
    def pread(self, fd: int, size: int, offset: int) -> bytes:
        if self._file_or_foreign(fd) is None:
            return os.pread(fd, size, offset)
        if size == 0:
            return b""
        device, index, pos = self._region_access(fd, size, offset)
        if index == abi.PciRegion.CONFIG:
            return bytes(device.config[pos : pos + size])
        return bytes(min(size, device.spec.bars[index] - pos))  # BARs read as zeros

    @_syscall
    def pwrite(self, fd: int, data: bytes, offset: int) -> int:
        if self._file_or_foreign(fd) is None:
            return os.pwrite(fd, data, offset)
        if not data:
            return 0
        device, index, pos = self._region_access(fd, len(data), offset)
        if index != abi.PciRegion.CONFIG:
            return min(len(data), device.spec.bars[index] - pos)  # BAR writes vanish
        for i, byte in enumerate(data):
            if pos + i not in _CONFIG_READ_ONLY:
                device.config[pos + i] = byte
        return len(data)

    @_syscall
    def mmap_shared(self, fd: int, size: int, offset: int) -> int:
        file = self._file_or_foreign(fd)
        if size <= 0 or offset < 0 or offset % PAGE_SIZE:
            raise _error(errno.EINVAL)
        length = _page_up(size)
        if file is None:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise _error(errno.ENODEV)
            # Pages past the end of the file are mapped but not there (SIGBUS).
            backed = max(0, min(length, _page_up(st.st_size) - offset))
        elif isinstance(file, _DeviceFile):
            if not file.access:
                raise _error(errno.EINVAL)
            region = self._region(file.device, offset >> _REGION_SHIFT)
            pos = offset & _REGION_MASK
            if not region.flags & abi.RegionFlag.MMAP or pos + length > region.size:
                raise _error(errno.EINVAL)
            backed = length
        else:
            raise _error(errno.ENODEV)
        address = self._next_address
        self._next_address += length + PAGE_SIZE
        self._mmaps[address] = _Mmap(address, length, backed)
        return address

    @_syscall
    def munmap(self, address: int, size: int) -> None:
        # Stricter than Linux on purpose: only whole mappings from mmap_shared,
        # so a test notices an unmap of the wrong address or size.
        mapping = self._mmaps.get(address)
        if mapping is None or size <= 0 or _page_up(size) != mapping.length:
            raise _error(errno.EINVAL)
        del self._mmaps[address]

    # Kernel: container.

    def _drivers(self) -> list[abi.IommuType]:
        """Registered IOMMU drivers, by the type that names them."""
        drivers = [abi.IommuType.TYPE1] if self.has_type1 else []
        return [*drivers, abi.IommuType.NOIOMMU]  # CONFIG_VFIO_NOIOMMU

    def _driver_extension(self, driver: abi.IommuType, extension: int, *, opened: bool) -> int:
        if driver == abi.IommuType.NOIOMMU:
            return int(self.noiommu_mode and extension == abi.IommuType.NOIOMMU)
        if extension in (
            abi.IommuType.TYPE1,
            abi.IommuType.TYPE1v2,
            abi.IommuType.UNMAP_ALL,
            _UPDATE_VADDR,
        ):
            return 1
        return int(extension == _DMA_CC_IOMMU and opened)

    @staticmethod
    def _driver_allowed(container: _Container, driver: abi.IommuType) -> bool:
        # Only no-IOMMU containers use vfio-noiommu, and they use only that.
        return container.noiommu == (driver == abi.IommuType.NOIOMMU)

    @staticmethod
    def _driver_of(iommu_type: abi.IommuType) -> abi.IommuType:
        if iommu_type == abi.IommuType.NOIOMMU:
            return iommu_type
        return abi.IommuType.TYPE1

    @_syscall
    def get_api_version(self, fd: int) -> int:
        self._container(fd)
        return abi.VFIO_API_VERSION

    @_syscall
    def check_extension(self, fd: int, extension: int) -> int:
        container = self._container(fd)
        if container.driver is not None:
            driver = self._driver_of(container.driver)
            return self._driver_extension(driver, extension, opened=True)
        # No driver yet: the first registered one that says yes answers.
        for driver in self._drivers():
            if container.groups and not self._driver_allowed(container, driver):
                continue
            answer = self._driver_extension(driver, extension, opened=False)
            if answer > 0:
                return answer
        return 0

    @_syscall
    def set_iommu(self, fd: int, iommu_type: int) -> None:
        container = self._container(fd)
        if not container.groups or container.driver is not None:
            raise _error(errno.EINVAL)
        result = errno.ENODEV
        for driver in self._drivers():
            if not self._driver_allowed(container, driver):
                continue
            if self._driver_extension(driver, iommu_type, opened=False) <= 0:
                continue
            # The driver's open() takes only the types it implements.
            if driver == abi.IommuType.TYPE1 and iommu_type not in (
                abi.IommuType.TYPE1,
                abi.IommuType.TYPE1v2,
            ):
                result = errno.EINVAL
                continue
            if driver == abi.IommuType.NOIOMMU and not self.cap_sys_rawio:
                result = errno.EPERM
                continue
            container.driver = abi.IommuType(iommu_type)
            return
        raise _error(result)

    @_syscall
    def iommu_get_info(self, fd: int) -> IommuInfo:
        container = self._type1(fd)
        flags = abi.IommuInfoFlag.PGSIZES | abi.IommuInfoFlag.CAPS
        avail = self.dma_entry_limit - len(container.dmas)
        return IommuInfo(flags, self.iova_pgsizes, self.iova_ranges, avail)

    @_syscall
    def iommu_map_dma(
        self, fd: int, vaddr: int, iova: int, size: int, flags: abi.DmaMapFlag
    ) -> None:
        container = self._type1(fd)
        vaddr, iova, size, flags_ = vaddr & _U64, iova & _U64, size & _U64, int(flags)
        rw = int(abi.DmaMapFlag.READ | abi.DmaMapFlag.WRITE)
        if flags_ & ~rw or not flags_ & rw or not size:
            raise _error(errno.EINVAL)
        pgsize = self.iova_pgsizes & -self.iova_pgsizes  # the smallest one
        if (size | iova | vaddr) & (pgsize - 1):
            raise _error(errno.EINVAL)
        if iova + size - 1 > _U64 or vaddr + size - 1 > _U64:  # no wrap-around
            raise _error(errno.EINVAL)
        if any(d.iova <= iova + size - 1 and iova <= d.last for d in container.dmas):
            raise _error(errno.EEXIST)
        if len(container.dmas) >= self.dma_entry_limit:
            raise _error(errno.ENOSPC)
        if not _within(self.iova_ranges, iova, size):
            raise _error(errno.EINVAL)
        read, write = bool(flags_ & abi.DmaMapFlag.READ), bool(flags_ & abi.DmaMapFlag.WRITE)
        dma = _Dma(iova, size, vaddr, read, write)
        self._pin(dma)  # type1 pins at map time: the container has a domain
        container.dmas.append(dma)

    @_syscall
    def iommu_unmap_dma(self, fd: int, iova: int, size: int) -> int:
        container = self._type1(fd)
        iova, size = iova & _U64, size & _U64
        pgsize = self.iova_pgsizes & -self.iova_pgsizes
        if not size or (size | iova) & (pgsize - 1) or iova + size - 1 > _U64:
            raise _error(errno.EINVAL)
        last = iova + size - 1
        hit = [d for d in container.dmas if d.iova <= last and iova <= d.last]
        # v2 refuses to split a mapping; v1 unmaps every mapping it touches.
        if container.driver == abi.IommuType.TYPE1v2 and any(
            d.iova < iova or d.last > last for d in hit
        ):
            raise _error(errno.EINVAL)
        for dma in hit:
            self._unpin(dma)
            container.dmas.remove(dma)
        return sum(d.size for d in hit)

    # Kernel: group.

    @_syscall
    def group_get_status(self, fd: int) -> abi.GroupFlag:
        group = self._group(fd)
        if group.container is not None:
            return abi.GroupFlag.VIABLE | abi.GroupFlag.CONTAINER_SET
        return abi.GroupFlag.VIABLE if group.spec.viable else abi.GroupFlag(0)

    @_syscall
    def group_set_container(self, fd: int, container_fd: int) -> None:
        group = self._group(fd)
        if self._ident_of(container_fd) is None:
            raise _error(errno.EBADF)
        if group.container is not None:
            raise _error(errno.EINVAL)
        file = self._file_or_foreign(container_fd)
        if not isinstance(file, _ContainerFile):
            raise _error(errno.EBADFD)  # not a container
        container = file.container
        if group.spec.noiommu and not self.cap_sys_rawio:
            raise _error(errno.EPERM)
        if container.groups and container.noiommu != group.spec.noiommu:
            raise _error(errno.EPERM)  # real and no-IOMMU groups cannot mix
        if not group.spec.noiommu and not group.spec.viable:
            raise _error(errno.EPERM)  # a host driver owns DMA in this group
        group.container = container
        container.groups.append(group)
        container.noiommu = group.spec.noiommu

    @_syscall
    def group_unset_container(self, fd: int) -> None:
        group = self._group(fd)
        if group.container is None:
            raise _error(errno.EINVAL)
        if group.device_fds:
            raise _error(errno.EBUSY)
        self._detach_group(group)

    @_syscall
    def group_get_device_fd(self, fd: int, name: str) -> int:
        group = self._group(fd)
        device = self._devices.get(name)
        if device is None or device.group is not group:
            raise _error(errno.ENODEV)
        if group.container is None or group.container.driver is None:
            raise _error(errno.EINVAL)
        if group.spec.noiommu and not self.cap_sys_rawio:
            raise _error(errno.EPERM)
        device.open_count += 1
        group.device_fds += 1
        file = _DeviceFile(f"device {name} of {group.spec.path}", device, via_group=True)
        return self._new_file(file)

    # Kernel: device.

    @_syscall
    def device_get_info(self, fd: int) -> DeviceInfo:
        spec = self._device_file(fd).device.spec
        flags = abi.DeviceFlag.PCI | (abi.DeviceFlag.RESET if spec.reset else 0)
        return DeviceInfo(flags, _NUM_REGIONS, _NUM_IRQS)

    @_syscall
    def device_get_region_info(self, fd: int, index: int) -> RegionInfo:
        return self._region(self._device_file(fd).device, index)

    @_syscall
    def device_reset(self, fd: int) -> None:
        device = self._device_file(fd).device
        if not device.spec.reset:
            raise _error(errno.EINVAL)
        device.resets += 1
        device.config[:] = device.spec.config_space()

    @_syscall
    def device_bind_iommufd(self, fd: int, iommufd: int) -> int:
        file = self._file(fd)
        if not isinstance(file, _DeviceFile):
            raise self._wrong_type(file)
        if iommufd < 0 or file.via_group:  # BIND is for cdev fds only
            raise _error(errno.EINVAL)
        device = file.device
        if device.group.opened:  # the legacy interface has the group
            raise _error(errno.EBUSY)
        if file.ictx is not None:  # one fd binds once
            raise _error(errno.EINVAL)
        if self._ident_of(iommufd) is None:
            raise _error(errno.EBADF)
        ictx_file = self._file_or_foreign(iommufd)
        if not isinstance(ictx_file, _IommufdFile):
            raise _error(errno.EBADFD)
        if device.open_count:  # a cdev opens a device only once
            raise _error(errno.EINVAL)
        if not device.group.spec.viable:
            raise _error(errno.EPERM)  # a host driver owns DMA in this group
        ictx = ictx_file.ictx
        file.ictx = ictx
        file.devid = ictx.new_id()
        ictx.objects[file.devid] = _Idev(file.devid)
        ictx.bound += 1
        device.group.cdev_bound += 1
        device.open_count = 1
        return file.devid

    @_syscall
    def device_attach_iommufd_pt(self, fd: int, pt_id: int) -> int:
        file = self._device_file(fd)
        ictx = file.ictx
        if ictx is None:  # a device from a group has no iommufd device
            raise _error(errno.EINVAL)
        target = ictx.objects.get(pt_id)
        if target is None:
            raise _error(errno.ENOENT)
        if isinstance(target, _Hwpt):
            hwpt: _Hwpt | None = target
            ioas = target.ioas
        elif isinstance(target, _Ioas):
            ioas = target
            hwpt = ioas.hwpts[0] if ioas.hwpts else None  # reuse the automatic domain
        else:
            raise _error(errno.EINVAL)
        if hwpt is not None and hwpt is file.hwpt:
            return hwpt.id
        if not ioas.attached:
            self._first_domain(ioas)
        if hwpt is None:
            hwpt = _Hwpt(ictx.new_id(), ioas)
            ictx.objects[hwpt.id] = hwpt
            ioas.hwpts.append(hwpt)
        hwpt.devices.add(file)
        self._detach_device(file)  # replaces an earlier attachment
        file.hwpt = hwpt
        return hwpt.id

    def _first_domain(self, ioas: _Ioas) -> None:
        """Load the IOAS into its first domain: the host's reserved ranges and
        page size now apply, and every area gets pinned."""
        alignment = self.iova_pgsizes & -self.iova_pgsizes
        for area in ioas.areas:
            if not _within(self.iova_ranges, area.iova, area.size) or (
                (area.iova | area.size | area.vaddr % PAGE_SIZE) & (alignment - 1)
            ):
                raise _error(errno.EADDRINUSE)
        done: list[_Dma] = []
        try:
            for area in ioas.areas:
                self._pin(area)
                done.append(area)
        except OSError:
            for area in done:
                self._unpin(area)
            raise

    @_syscall
    def device_detach_iommufd_pt(self, fd: int) -> None:
        file = self._device_file(fd)
        if file.ictx is not None:
            self._detach_device(file)

    # Kernel: iommufd.

    @_syscall
    def iommufd_destroy(self, fd: int, object_id: int) -> None:
        ictx = self._ictx(fd)
        obj = ictx.objects.get(object_id)
        if obj is None:
            raise _error(errno.ENOENT)
        if not isinstance(obj, _Ioas) or obj.attached:
            raise _error(errno.EBUSY)  # still in use by a device or domain
        del ictx.objects[object_id]

    @_syscall
    def ioas_alloc(self, fd: int) -> int:
        ictx = self._ictx(fd)
        ioas = _Ioas(ictx.new_id())
        ictx.objects[ioas.id] = ioas
        return ioas.id

    def _ioas_layout(self, ioas: _Ioas) -> IoasRanges:
        if not ioas.attached:  # no domain: nothing reserved, any alignment
            return IoasRanges((IovaRange(0, _U64),), 1)
        pgsize = self.iova_pgsizes & -self.iova_pgsizes
        return IoasRanges(tuple(_merged(self.iova_ranges)), pgsize)

    @_syscall
    def ioas_iova_ranges(self, fd: int, ioas_id: int) -> IoasRanges:
        return self._ioas_layout(self._ioas(self._ictx(fd), ioas_id))

    @_syscall
    def ioas_map(
        self,
        fd: int,
        ioas_id: int,
        vaddr: int,
        length: int,
        iova: int,
        flags: abi.IoasMapFlag,
    ) -> int:
        ictx = self._ictx(fd)
        vaddr, length, iova, flags_ = vaddr & _U64, length & _U64, iova & _U64, int(flags)
        known = int(
            abi.IoasMapFlag.FIXED_IOVA | abi.IoasMapFlag.READABLE | abi.IoasMapFlag.WRITEABLE
        )
        if flags_ & ~known:
            raise _error(errno.EOPNOTSUPP)
        if iova >= _U64 or length >= _U64:
            raise _error(errno.EOVERFLOW)
        if not flags_ & (abi.IoasMapFlag.READABLE | abi.IoasMapFlag.WRITEABLE):
            raise _error(errno.EINVAL)
        ioas = self._ioas(ictx, ioas_id)
        if not length or length > _U64 - PAGE_SIZE:
            raise _error(errno.EINVAL)
        if vaddr + length > _U64:
            raise _error(errno.EOVERFLOW)
        layout = self._ioas_layout(ioas)
        if length & (layout.alignment - 1):
            raise _error(errno.EINVAL)
        if flags_ & abi.IoasMapFlag.FIXED_IOVA:
            self._check_iova(ioas, layout, iova, length)
        else:
            iova = self._alloc_iova(ioas, layout, vaddr, length)
        if (vaddr % PAGE_SIZE) & (layout.alignment - 1):
            raise _error(errno.EINVAL)
        area = _Dma(
            iova,
            length,
            vaddr,
            bool(flags_ & abi.IoasMapFlag.READABLE),
            bool(flags_ & abi.IoasMapFlag.WRITEABLE),
        )
        if ioas.attached:  # with a domain, pages are pinned at map time
            self._pin(area)
        ioas.areas.append(area)
        return iova

    @staticmethod
    def _check_iova(ioas: _Ioas, layout: IoasRanges, iova: int, length: int) -> None:
        """iopt_check_iova: a caller-chosen IOVA must be aligned, free and not reserved."""
        if iova & (layout.alignment - 1):
            raise _error(errno.EINVAL)
        if iova + length - 1 > _U64:
            raise _error(errno.EOVERFLOW)
        if not _within(layout.ranges, iova, length):
            raise _error(errno.EINVAL)
        if any(a.iova <= iova + length - 1 and iova <= a.last for a in ioas.areas):
            raise _error(errno.EEXIST)

    @staticmethod
    def _alloc_iova(ioas: _Ioas, layout: IoasRanges, vaddr: int, length: int) -> int:
        """iopt_alloc_iova: the lowest free IOVA, never 0, aligned like the
        user address (up to the length's power of two) to allow huge pages."""
        if length >= _U64 // 2:
            raise _error(errno.EOVERFLOW)
        alignment = 1 << (length - 1).bit_length()
        if vaddr:
            alignment = min(alignment, vaddr & -vaddr)
        if alignment < layout.alignment:
            raise _error(errno.EINVAL)
        page_offset = vaddr % PAGE_SIZE
        used = sorted(ioas.areas, key=lambda a: a.iova)
        for allowed in layout.ranges:
            start = max(allowed.start, PAGE_SIZE)
            last = min(allowed.last, _U64 - PAGE_SIZE)
            holes: list[tuple[int, int]] = []
            for area in used:
                if area.last < start or area.iova > last:
                    continue
                if area.iova > start:
                    holes.append((start, area.iova - 1))
                start = max(start, area.last + 1)
            holes.append((start, last))
            for hole_start, hole_last in holes:
                candidate = ((hole_start + alignment - 1) & -alignment) | page_offset
                if candidate <= hole_last and hole_last - candidate >= length - 1:
                    return candidate
        raise _error(errno.ENOSPC)

    @_syscall
    def ioas_unmap(self, fd: int, ioas_id: int, iova: int, length: int) -> int:
        ioas = self._ioas(self._ictx(fd), ioas_id)
        iova, length = iova & _U64, length & _U64
        if iova == 0 and length == _U64:  # everything; fine if nothing is mapped
            unmapped = sum(a.size for a in ioas.areas)
            for area in ioas.areas:
                self._unpin(area)
            ioas.areas.clear()
            return unmapped
        if iova >= _U64 or length >= _U64:
            raise _error(errno.EOVERFLOW)
        if not length:
            raise _error(errno.EINVAL)
        last = iova + length - 1
        if last > _U64:
            raise _error(errno.EOVERFLOW)
        unmapped = 0
        for area in sorted(ioas.areas, key=lambda a: a.iova):
            if area.last < iova or area.iova > last:
                continue
            if area.iova < iova or area.last > last:
                # No splitting; what was unmapped before this stays unmapped.
                raise _error(errno.ENOENT)
            self._unpin(area)
            ioas.areas.remove(area)
            unmapped += area.size
        if not unmapped:
            raise _error(errno.ENOENT)
        return unmapped

    @_syscall
    def iommufd_option(
        self, fd: int, option: abi.IommufdOption, op: abi.IommufdOptionOp, value: int
    ) -> int:
        ictx = self._ictx(fd)
        if option == abi.IommufdOption.HUGE_PAGES:
            self._ioas(ictx, 0)  # per IOAS, and the interface passes object_id 0
        if option != abi.IommufdOption.RLIMIT_MODE:
            raise _error(errno.EOPNOTSUPP)
        if op == abi.IommufdOptionOp.GET:
            return ictx.account_mode
        if op != abi.IommufdOptionOp.SET:
            raise _error(errno.EOPNOTSUPP)
        if not self.cap_sys_resource:
            raise _error(errno.EPERM)
        if ictx.objects:
            raise _error(errno.EBUSY)
        if value not in (0, 1):
            raise _error(errno.EINVAL)
        ictx.account_mode = value
        return value


if TYPE_CHECKING:
    # FakeKernel must stay a drop-in Kernel.
    _: Kernel = FakeKernel()
