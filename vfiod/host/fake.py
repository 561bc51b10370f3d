"""A fake PCI sysfs for tests: a real directory tree laid out like Linux's,
and a ``write()`` that acts on it the way the kernel acts on its control files.

The unchanged ``Sysfs`` read methods and ``inventory.scan()`` read the tree with
ordinary file calls, so they run against the fake exactly as against /sys.
Only writes are intercepted, because in sysfs a write is a request to the
kernel, not a store. The tree itself holds all the changing state (which
driver a device is on, its ``driver_override``, its VFs); the frozen
descriptions below hold only what the hardware is, which is what ``rescan``
finds again after a ``remove``.

Build one with the builder methods::

    fs = FakeSysfs(tmp_path)
    fs.add_driver("vfio-pci")
    fs.add_device("0000:00:10.0", vendor=0x8086, device=0x10D3, pci_class=0x020000,
                  driver="e1000e", group=10, reset_methods=("flr",))

Layout (all links relative, as in Linux, so the tree can move)::

    devices/pci0000:00/0000:00:1c.0/0000:01:00.0/   a device behind a bridge
        vendor device subsystem_vendor subsystem_device class modalias
        driver_override reset_method remove [sriov_totalvfs sriov_numvfs]
        driver -> bus/pci/drivers/<name>   iommu_group -> kernel/iommu_groups/<n>
        physfn -> ../<PF>   virtfn<i> -> ../<VF>
    bus/pci/devices/<addr> -> devices/.../<addr>
    bus/pci/drivers/<name>/{bind,unbind,<addr> -> device}
    bus/pci/drivers_probe   bus/pci/rescan
    kernel/iommu_groups/<n>/devices/<addr> -> device   [name: "vfio-noiommu"]
    module/vfio/parameters/enable_unsafe_noiommu_mode
"""

from __future__ import annotations

import dataclasses
import errno
import os
import shutil
import threading
from collections.abc import Sequence

from vfiod.host.sysfs import Sysfs
from vfiod.pci import PciAddress

VFIO_PCI = "vfio-pci"
NOIOMMU_GROUP_NAME = "vfio-noiommu"
NOIOMMU_PARAMETER = "module/vfio/parameters/enable_unsafe_noiommu_mode"

# Class codes (base, sub) of devices with a type 1 or 2 config header (PCI,
# semi-transparent and CardBus bridges): vfio-pci's probe refuses them.
_BRIDGE_CLASSES = frozenset({0x0604, 0x0607, 0x0609})

# Per-device attributes whose writes the kernel acts on.
_DEVICE_CONTROLS = frozenset({"driver_override", "sriov_numvfs", "remove", "reset"})
# Not sysfs: where the fake notes each device reset, one address a line, for tests.
RESET_LOG = "fake-resets.log"


@dataclasses.dataclass(frozen=True)
class SriovCapability:
    """A PF's SR-IOV capability. VF i gets routing ID PF + offset + i * stride,
    the kernel's formula from the capability's First VF Offset and VF Stride."""

    total_vfs: int
    vf_device: int  # the VFs' device ID; vendor, subsystem and class are the PF's
    vf_driver: str | None = None  # autoprobed onto new VFs when registered
    offset: int = 1
    stride: int = 1
    vf_reset_methods: tuple[str, ...] = ("flr",)
    # Behind ACS every VF is an IOMMU group of its own; without (a switch
    # with no ACS) the VFs join their PF's group.
    acs: bool = True


@dataclasses.dataclass(frozen=True)
class FakeDevice:
    """What a PCI function is, not what state it is in."""

    address: PciAddress
    vendor: int
    device: int
    subsystem_vendor: int
    subsystem_device: int
    pci_class: int
    native_driver: str | None  # the driver whose ID table matches it
    group: int | None  # IOMMU group; None without an IOMMU
    parent: PciAddress | None  # the bridge it sits behind
    reset_methods: tuple[str, ...]
    sriov: SriovCapability | None = None
    physfn: PciAddress | None = None  # set on VFs, which rescan does not bring back


@dataclasses.dataclass(frozen=True)
class FakeDriver:
    name: str
    refuses: bool = False  # its probe fails every device with ENODEV


@dataclasses.dataclass
class _Fault:
    suffix: str
    err: int


def _address(value: str | PciAddress) -> PciAddress:
    return value if isinstance(value, PciAddress) else PciAddress.parse(value)


def _os_error(err: int, path: str) -> OSError:
    return OSError(err, os.strerror(err), path)


def _parse_unsigned(value: str, path: str) -> int:
    """kstrtoul(buf, 0, ...): one trailing newline allowed, else EINVAL."""
    text = value[:-1] if value.endswith("\n") else value
    try:
        number = int(text, 0)
    except ValueError:
        raise _os_error(errno.EINVAL, path) from None
    if number < 0:
        raise _os_error(errno.EINVAL, path)
    return number


def _modalias(d: FakeDevice) -> str:
    prog_if = d.pci_class & 0xFF
    base, sub = d.pci_class >> 16, (d.pci_class >> 8) & 0xFF
    return (
        f"pci:v{d.vendor:08X}d{d.device:08X}sv{d.subsystem_vendor:08X}"
        f"sd{d.subsystem_device:08X}bc{base:02X}sc{sub:02X}i{prog_if:02X}"
    )


class FakeSysfs(Sysfs):
    def __init__(self, root: str | os.PathLike[str], *, noiommu: bool = False) -> None:
        super().__init__(os.fspath(root))
        # Resolved once: write() maps every path to its target inside the tree.
        self._real_root = os.path.realpath(self.root)
        self._devices: dict[PciAddress, FakeDevice] = {}
        # Devices that can have VFs (their addresses are reserved), and where
        # each device's directory is: resolving its symlink with realpath()
        # every time cost more than the rest of building a big host.
        self._sriov: list[FakeDevice] = []
        self._dirs: dict[PciAddress, str] = {}
        self._drivers: dict[str, FakeDriver] = {}
        self._faults: list[_Fault] = []
        self._lock = threading.Lock()
        # Every write attempted, as (path resolved relative to the root, value).
        self.writes: list[tuple[str, str]] = []
        for directory in ("devices", "bus/pci/devices", "bus/pci/drivers", "kernel/iommu_groups"):
            os.makedirs(self.path(directory), exist_ok=True)
        for control in ("bus/pci/drivers_probe", "bus/pci/rescan"):
            self._put(self.path(control), "")
        os.makedirs(os.path.dirname(self.path(NOIOMMU_PARAMETER)), exist_ok=True)
        self._put(self.path(NOIOMMU_PARAMETER), "Y" if noiommu else "N")

    # builder

    def add_driver(self, name: str, *, refuses: bool = False) -> None:
        """Register a PCI driver. Like the kernel on driver_register(), it then
        probes every unbound device it matches."""
        if name in self._drivers:
            raise ValueError(f"driver {name} is registered already")
        self._drivers[name] = FakeDriver(name, refuses)
        directory = self.path("bus/pci/drivers", name)
        os.makedirs(directory)
        for control in ("bind", "unbind"):
            self._put(os.path.join(directory, control), "")
        for address in self.present():
            if self._bound(address) is None and self._matches(address, name):
                self._attach(address, name)

    def add_device(
        self,
        address: str | PciAddress,
        *,
        vendor: int,
        device: int,
        pci_class: int,
        driver: str | None = None,
        native_driver: str | None = None,
        group: int | None = None,
        parent: str | PciAddress | None = None,
        reset_methods: Sequence[str] = (),
        subsystem_vendor: int | None = None,
        subsystem_device: int | None = None,
        driver_override: str | None = None,
        sriov: SriovCapability | None = None,
    ) -> PciAddress:
        """Add a device as the kernel left it at boot: bound to ``driver``
        (registered here if need be), whose ID table matches it unless
        ``native_driver`` names another. ``parent`` must be added first."""
        pci = _address(address)
        fake = FakeDevice(
            address=pci,
            vendor=vendor,
            device=device,
            subsystem_vendor=vendor if subsystem_vendor is None else subsystem_vendor,
            subsystem_device=device if subsystem_device is None else subsystem_device,
            pci_class=pci_class,
            native_driver=driver if native_driver is None else native_driver,
            group=group,
            parent=None if parent is None else _address(parent),
            reset_methods=tuple(reset_methods),
            sriov=sriov,
        )
        self._check_free(fake)
        if fake.parent is not None and fake.parent not in self.present():
            raise ValueError(f"add the bridge {fake.parent} before {pci}")
        self._devices[pci] = fake
        if fake.sriov is not None:
            self._sriov.append(fake)
        self._create(fake)
        if driver_override is not None:
            self._put(os.path.join(self._device_dir(pci), "driver_override"), driver_override)
        if driver is not None:
            if driver not in self._drivers:
                self.add_driver(driver)
            if self._bound(pci) is None:  # add_driver may have bound it already
                err = self._attach(pci, driver)
                if err is not None:
                    raise ValueError(f"{driver} refuses {pci}: {os.strerror(err)}")
        return pci

    def fail_next_write(self, path_suffix: str, err: int) -> None:
        """Make the next write to a path ending in ``path_suffix`` fail with
        ``err`` and change nothing. The suffix is matched against the path as
        written and as resolved (so "e1000e/unbind" matches a write to
        ``devices/<addr>/driver/unbind``). Each call fails one write."""
        self._faults.append(_Fault(path_suffix, err))

    # queries

    def resets(self) -> list[PciAddress]:
        """The devices reset so far, in order (each time)."""
        try:
            with open(self.path(RESET_LOG), encoding="utf-8") as log:
                return [PciAddress.parse(line) for line in log.read().split()]
        except FileNotFoundError:
            return []

    def present(self) -> list[PciAddress]:
        return sorted(PciAddress.parse(n) for n in os.listdir(self.path("bus/pci/devices")))

    def description(self, address: str | PciAddress) -> FakeDevice:
        return self._devices[_address(address)]

    # the kernel's side of writes

    def write(self, path: str, value: str) -> None:
        # Binding jobs write from threads: one write acts at a time, as if
        # under the kernel's device lock.
        with self._lock:
            self._act(path, value)

    def _act(self, path: str, value: str) -> None:
        real = os.path.realpath(path)
        rel = os.path.relpath(real, self._real_root)
        if rel.startswith(os.pardir):
            raise ValueError(f"{path} is outside the fake sysfs")
        self.writes.append((rel, value))
        self._maybe_fail(path, rel)
        match rel.split(os.sep):
            case ["bus", "pci", "drivers_probe"]:
                self._drivers_probe(self._lookup(value, path))
            case ["bus", "pci", "rescan"]:
                if _parse_unsigned(value, path):
                    self._rescan()
            case ["bus", "pci", "drivers", name, "bind"]:
                self._bind_store(name, self._lookup(value, path), path)
            case ["bus", "pci", "drivers", name, "unbind"]:
                self._unbind_store(name, self._lookup(value, path), path)
            case ["devices", *_, device, control] if control in _DEVICE_CONTROLS and os.path.isfile(
                real
            ):
                self._device_control(PciAddress.parse(device), control, value, path)
            case _:
                # An attribute the fake gives no meaning: store the value.
                # No O_CREAT, as sysfs cannot create files.
                fd = os.open(real, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
                try:
                    os.write(fd, value.encode())
                finally:
                    os.close(fd)

    def _maybe_fail(self, path: str, rel: str) -> None:
        for fault in self._faults:
            if os.path.normpath(path).endswith(fault.suffix) or rel.endswith(fault.suffix):
                self._faults.remove(fault)
                raise _os_error(fault.err, path)

    def _lookup(self, value: str, path: str) -> PciAddress:
        """bus_find_device_by_name(): the exact name, one trailing newline allowed."""
        name = value[:-1] if value.endswith("\n") else value
        for address in self.present():
            if str(address) == name:
                return address
        raise _os_error(errno.ENODEV, path)

    def _drivers_probe(self, address: PciAddress) -> None:
        # The kernel ignores a probe error here so that the next driver may
        # try; the write succeeds and the device stays unbound.
        if self._bound(address) is None:
            self._autoprobe(address)

    def _bind_store(self, name: str, address: PciAddress, path: str) -> None:
        if not self._matches(address, name):
            raise _os_error(errno.ENODEV, path)
        if self._bound(address) is not None:
            raise _os_error(errno.EBUSY, path)
        err = self._attach(address, name)
        if err is not None:  # since Linux 5.14 bind returns the probe's error
            raise _os_error(err, path)

    def _unbind_store(self, name: str, address: PciAddress, path: str) -> None:
        if self._bound(address) != name:
            raise _os_error(errno.ENODEV, path)
        self._detach(address)

    def _device_control(self, address: PciAddress, control: str, value: str, path: str) -> None:
        attribute = os.path.join(self._device_dir(address), control)
        if control == "driver_override":
            # driver_set_override(): up to the first newline; empty clears.
            name = value.split("\n", 1)[0]
            self._put(attribute, name or "(null)")
        elif control == "sriov_numvfs":
            self._set_num_vfs(address, _parse_unsigned(value, path), path)
        elif control == "reset":
            if _parse_unsigned(value, path) != 1:  # reset_store(): only "1" resets
                raise _os_error(errno.EINVAL, path)
            with open(self.path(RESET_LOG), "a", encoding="utf-8") as log:
                log.write(f"{address}\n")
        elif _parse_unsigned(value, path):  # remove
            self._remove(address)

    # drivers

    def _bound(self, address: PciAddress) -> str | None:
        try:
            return os.path.basename(os.readlink(os.path.join(self._device_dir(address), "driver")))
        except FileNotFoundError:
            return None

    def _override(self, address: PciAddress) -> str | None:
        value = self._get(os.path.join(self._device_dir(address), "driver_override"))
        return None if value == "(null)" else value

    def _matches(self, address: PciAddress, name: str) -> bool:
        """pci_match_device(): a driver_override admits only the driver it
        names (whatever its ID table); without one, the ID table decides."""
        override = self._override(address)
        if override is not None:
            return override == name
        return self._devices[address].native_driver == name

    def _autoprobe(self, address: PciAddress) -> None:
        """device_attach(): bind to the one driver that matches, if registered."""
        for name in self._drivers:
            if self._matches(address, name):
                self._attach(address, name)
                return

    def _probe_error(self, address: PciAddress, name: str) -> int | None:
        if self._drivers[name].refuses:
            return errno.ENODEV
        if name == VFIO_PCI:
            fake = self._devices[address]
            if fake.pci_class >> 8 in _BRIDGE_CLASSES:
                return errno.EINVAL  # vfio_pci_probe(): only normal headers
            if self._group(address) is None and not self._noiommu_enabled():
                return errno.EINVAL  # vfio_group_find_or_alloc(): no IOMMU group
        return None

    def _attach(self, address: PciAddress, name: str) -> int | None:
        """Probe ``name`` on the device; return the probe's errno if it refused."""
        err = self._probe_error(address, name)
        if err is not None:
            return err
        if name == VFIO_PCI and self._group(address) is None:
            # vfio-pci in unsafe no-IOMMU mode makes the device a group of its own.
            group = self._new_group_id()
            self._join_group(address, group)
            self._put(self.path("kernel/iommu_groups", str(group), "name"), NOIOMMU_GROUP_NAME)
        device_dir = self._device_dir(address)
        driver_dir = self.path("bus/pci/drivers", name)
        self._link(driver_dir, os.path.join(device_dir, "driver"))
        self._link(device_dir, os.path.join(driver_dir, str(address)))
        return None

    def _detach(self, address: PciAddress) -> None:
        name = self._bound(address)
        if name is None:
            return
        if self._devices[address].sriov is not None and self._vfs(address):
            # The PF driver's remove() disables SR-IOV: its VFs go away.
            for vf in reversed(self._vfs(address)):
                self._remove(vf)
            self._put(os.path.join(self._device_dir(address), "sriov_numvfs"), "0")
        os.unlink(os.path.join(self._device_dir(address), "driver"))
        os.unlink(self.path("bus/pci/drivers", name, str(address)))
        group = self._group(address)
        if name == VFIO_PCI and group is not None and self._is_noiommu_group(group):
            self._leave_group(address)  # vfio made the group; it goes with the binding

    def _noiommu_enabled(self) -> bool:
        return self._get(self.path(NOIOMMU_PARAMETER)) in ("Y", "y", "1")

    # IOMMU groups

    def _group(self, address: PciAddress) -> int | None:
        try:
            return int(
                os.path.basename(
                    os.readlink(os.path.join(self._device_dir(address), "iommu_group"))
                )
            )
        except FileNotFoundError:
            return None

    def _is_noiommu_group(self, group: int) -> bool:
        name = self.path("kernel/iommu_groups", str(group), "name")
        return os.path.exists(name) and self._get(name) == NOIOMMU_GROUP_NAME

    def _new_group_id(self) -> int:
        """The lowest number neither in use nor declared for a device that a
        rescan may bring back (the kernel takes the lowest free one)."""
        used = {int(n) for n in os.listdir(self.path("kernel/iommu_groups"))}
        used |= {d.group for d in self._devices.values() if d.group is not None}
        return min(set(range(len(used) + 1)) - used)

    def _join_group(self, address: PciAddress, group: int) -> None:
        group_dir = self.path("kernel/iommu_groups", str(group))
        os.makedirs(os.path.join(group_dir, "devices"), exist_ok=True)
        device_dir = self._device_dir(address)
        self._link(device_dir, os.path.join(group_dir, "devices", str(address)))
        self._link(group_dir, os.path.join(device_dir, "iommu_group"))

    def _leave_group(self, address: PciAddress) -> None:
        group = self._group(address)
        if group is None:
            return
        group_dir = self.path("kernel/iommu_groups", str(group))
        os.unlink(os.path.join(group_dir, "devices", str(address)))
        os.unlink(os.path.join(self._device_dir(address), "iommu_group"))
        if not os.listdir(os.path.join(group_dir, "devices")):
            shutil.rmtree(group_dir)  # the kernel frees an empty group

    # device lifetime

    def _device_dir(self, address: PciAddress) -> str:
        cached = self._dirs.get(address)
        return cached if cached is not None else os.path.realpath(self.device_path(address))

    def _create(self, fake: FakeDevice, vf_index: int | None = None) -> None:
        if fake.physfn is not None:
            parent_dir = os.path.dirname(self._device_dir(fake.physfn))  # VFs sit beside the PF
        elif fake.parent is not None:
            parent_dir = self._device_dir(fake.parent)
        else:
            parent_dir = self.path(
                "devices", f"pci{fake.address.domain:04x}:{fake.address.bus:02x}"
            )
        device_dir = os.path.join(parent_dir, str(fake.address))
        os.makedirs(device_dir)
        self._dirs[fake.address] = os.path.realpath(device_dir)
        attributes = {
            "vendor": f"0x{fake.vendor:04x}",
            "device": f"0x{fake.device:04x}",
            "subsystem_vendor": f"0x{fake.subsystem_vendor:04x}",
            "subsystem_device": f"0x{fake.subsystem_device:04x}",
            "class": f"0x{fake.pci_class:06x}",
            "modalias": _modalias(fake),
            "driver_override": "(null)",
        }
        if fake.reset_methods:  # the kernel hides the attribute without a method
            attributes["reset_method"] = " ".join(fake.reset_methods)
        if fake.sriov is not None:
            attributes["sriov_totalvfs"] = str(fake.sriov.total_vfs)
            attributes["sriov_numvfs"] = "0"
        for name, text in attributes.items():
            self._put(os.path.join(device_dir, name), text)
        self._put(os.path.join(device_dir, "remove"), "")  # write-only in the kernel
        if fake.reset_methods:  # pci_dev_reset_attr_is_visible(): only with a method
            self._put(os.path.join(device_dir, "reset"), "")
        self._link(device_dir, self.device_path(fake.address))
        if fake.physfn is not None:
            self._link(self._device_dir(fake.physfn), os.path.join(device_dir, "physfn"))
            pf_dir = self._device_dir(fake.physfn)
            self._link(device_dir, os.path.join(pf_dir, f"virtfn{vf_index}"))
        if fake.group is not None:
            self._join_group(fake.address, fake.group)

    def _children(self, address: PciAddress) -> list[PciAddress]:
        device_dir = self._device_dir(address)
        return [a for a in self.present() if os.path.dirname(self._device_dir(a)) == device_dir]

    def _vfs(self, pf: PciAddress) -> list[PciAddress]:
        pf_dir = self._device_dir(pf)
        links = sorted(
            (int(entry.removeprefix("virtfn")), entry)
            for entry in os.listdir(pf_dir)
            if entry.startswith("virtfn")
        )
        return [
            PciAddress.parse(os.path.basename(os.readlink(os.path.join(pf_dir, e))))
            for _, e in links
        ]

    def _remove(self, address: PciAddress) -> None:
        """pci_stop_and_remove_bus_device(): VFs and devices behind it first."""
        for vf in reversed(self._vfs(address)):
            self._remove(vf)
        while children := self._children(address):
            self._remove(children[-1])
        self._detach(address)
        self._leave_group(address)
        device_dir = self._device_dir(address)
        fake = self._devices[address]
        if fake.physfn is not None:
            pf_dir = self._device_dir(fake.physfn)
            for entry in os.listdir(pf_dir):
                link = os.path.join(pf_dir, entry)
                if entry.startswith("virtfn") and os.path.basename(os.readlink(link)) == str(
                    address
                ):
                    os.unlink(link)
            del self._devices[address]  # only re-enabling SR-IOV makes it again
        os.unlink(self.device_path(address))
        shutil.rmtree(device_dir)
        del self._dirs[address]

    def _rescan(self) -> None:
        """Bring back every removed device whose bridge is there, bridges
        first, each fresh (no override) and probed with its native driver."""
        progress = True
        while progress:
            progress = False
            present = set(self.present())
            for address, fake in sorted(self._devices.items()):
                if address not in present and (fake.parent is None or fake.parent in present):
                    self._create(fake)
                    self._autoprobe(address)
                    present.add(address)
                    progress = True

    def _set_num_vfs(self, pf: PciAddress, count: int, path: str) -> None:
        """sriov_numvfs_store(), with its checks in the kernel's order."""
        sriov = self._devices[pf].sriov
        assert sriov is not None  # only PFs have the attribute
        numvfs = os.path.join(self._device_dir(pf), "sriov_numvfs")
        current = int(self._get(numvfs))
        if count > sriov.total_vfs:
            raise _os_error(errno.ERANGE, path)
        if count == current:
            return
        if self._bound(pf) is None:
            raise _os_error(errno.ENOENT, path)  # no PF driver to configure it
        if count == 0:
            for vf in reversed(self._vfs(pf)):
                self._remove(vf)
        elif current != 0:
            raise _os_error(errno.EBUSY, path)  # disable before changing the count
        else:
            for index in range(count):
                self._add_vf(pf, sriov, index)
        self._put(numvfs, str(count))

    def _vf_address(self, pf: PciAddress, sriov: SriovCapability, index: int) -> PciAddress:
        rid = (pf.bus << 8 | pf.slot << 3 | pf.function) + sriov.offset + index * sriov.stride
        return PciAddress(pf.domain, rid >> 8 & 0xFF, rid >> 3 & 0x1F, rid & 0x7)

    def _add_vf(self, pf: PciAddress, sriov: SriovCapability, index: int) -> None:
        parent = self._devices[pf]
        vf = FakeDevice(
            address=self._vf_address(pf, sriov, index),
            vendor=parent.vendor,
            device=sriov.vf_device,
            subsystem_vendor=parent.subsystem_vendor,
            subsystem_device=parent.subsystem_device,
            pci_class=parent.pci_class,
            native_driver=sriov.vf_driver,
            group=self._new_group_id() if sriov.acs else self._group(pf),
            parent=parent.parent,
            reset_methods=sriov.vf_reset_methods,
            physfn=pf,
        )
        self._devices[vf.address] = vf
        self._create(vf, vf_index=index)
        self._autoprobe(vf.address)  # sriov_drivers_autoprobe is on by default

    def _check_free(self, fake: FakeDevice) -> None:
        """Two functions may not share an address, VFs-to-be included."""
        vfs = {
            self._vf_address(other.address, other.sriov, i)
            for other in self._sriov
            if other.sriov is not None
            for i in range(other.sriov.total_vfs)
        }
        mine = {fake.address}
        if fake.sriov is not None:
            mine |= {
                self._vf_address(fake.address, fake.sriov, i) for i in range(fake.sriov.total_vfs)
            }
        if clash := sorted(a for a in mine if a in self._devices or a in vfs):
            raise ValueError(f"address {clash[0]} is taken (VFs included)")

    # files

    def _put(self, path: str, text: str) -> None:
        """Set an attribute as the kernel shows it: the value and a newline."""
        with open(path, "w") as f:
            f.write(f"{text}\n" if text else "")

    def _get(self, path: str) -> str:
        with open(path) as f:
            return f.read().strip()

    def _link(self, target: str, link: str) -> None:
        os.symlink(os.path.relpath(target, os.path.dirname(link)), link)
