"""Moving PCI devices between drivers the safe way, with a record to undo it.

Bind: set ``driver_override``, unbind from the current driver, ask the bus to
probe the device again (``drivers_probe``) — only the named driver may take it.
Never ``new_id``: that makes a driver grab every device with the same IDs.
Restore: unbind, put the old ``driver_override`` back, reprobe, and check that
the original driver came back.

The original driver is written to the state file *before* the first sysfs
write, so a crash at any point leaves a record that ``repair()`` acts on at
the next start.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import errno
import logging
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence

from vfiod.host.critical import find_critical
from vfiod.host.inventory import IommuGroup, PciDevice, is_dma_safe
from vfiod.host.sysfs import HostError, Sysfs
from vfiod.pci import PciAddress
from vfiod.state import BindingRecord, BindPhase, StateFile

log = logging.getLogger(__name__)

VFIO_PCI = "vfio-pci"

# Host-critical devices and why (see vfiod.host.critical).
CriticalDevices = Mapping[PciAddress, tuple[str, ...]]


class FaultPoint(enum.StrEnum):
    """Where a test may make the binding process die, to prove repair works."""

    AFTER_OVERRIDE = "after-override"
    AFTER_UNBIND = "after-unbind"


class Step(enum.StrEnum):
    """What a device is doing, as the progress of a bind or restore says."""

    BIND = "bind"  # leaving its driver for vfio-pci
    BOUND = "bound"
    RESTORE = "restore"  # going back to its driver
    RESTORED = "restored"
    FAILED = "failed"


# Told of each step: the device, the step, the driver it leaves or goes back to.
Progress = Callable[[PciAddress, Step, str], None]


def _quiet(_address: PciAddress, _step: Step, _driver: str) -> None:
    pass


@dataclasses.dataclass(frozen=True)
class RepairResult:
    address: str
    restored_to: str | None
    error: str | None


def _write(sysfs: Sysfs, path: str, value: str, what: str, address: PciAddress) -> None:
    try:
        sysfs.write(path, value)
    except OSError as e:
        err = e.errno if e.errno is not None else errno.EIO
        raise HostError(err, f"{what} for {address} failed: {os.strerror(err)}") from e


def _unbind(sysfs: Sysfs, device: str, address: PciAddress) -> None:
    """Take the device (its sysfs folder ``device``) from the driver it is on."""
    _write(sysfs, os.path.join(device, "driver", "unbind"), str(address), "unbind", address)


def _reprobe(sysfs: Sysfs, address: PciAddress) -> None:
    # The kernel ignores probe errors here (a refusing driver just leaves the
    # device unbound), but the write can fail for other reasons; either way
    # the callers check which driver holds the device afterwards and say so.
    with contextlib.suppress(OSError):
        sysfs.write(sysfs.path("bus/pci/drivers_probe"), str(address))


# Where modprobe is looked for: never the inherited PATH, which D-Bus
# activation without systemd leaves empty (and which root must not trust).
SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


def modprobe(module: str) -> str:
    """Load a kernel module; return what modprobe said on failure, else ""."""
    command = shutil.which("modprobe", path=SYSTEM_PATH)
    if command is None:
        return f"modprobe is not installed in {SYSTEM_PATH} (Debian: apt install kmod)"
    result = subprocess.run(
        [command, module],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        env={"PATH": SYSTEM_PATH},
    )
    return "" if result.returncode == 0 else result.stderr.strip() or "nothing"


ModuleLoader = Callable[[str], str]


def ensure_driver(sysfs: Sysfs, driver: str, load: ModuleLoader = modprobe) -> None:
    """Load the driver's module if the driver is not registered yet."""
    if os.path.isdir(sysfs.path("bus/pci/drivers", driver)):
        return
    said = load(driver)
    if not os.path.isdir(sysfs.path("bus/pci/drivers", driver)):
        raise HostError(
            errno.ENOENT,
            f"PCI driver {driver} is not available (modprobe {driver}: {said or 'no error'}); "
            f"install the kernel's {driver} module",
        )


def needs_binding(device: PciDevice, driver: str = VFIO_PCI) -> bool:
    """Must this group member move for the group to be assigned? Only members
    on a driver that claims DMA do: unbound members and bridges on pcieport
    keep the group viable where they are (vfio-pci would not take a bridge)."""
    return device.driver not in (None, driver) and not is_dma_safe(device.driver)


def critical_refusal(
    addresses: Iterable[PciAddress],
    allow_critical: Collection[PciAddress],
    critical: CriticalDevices,
) -> str | None:
    """Why moving ``addresses`` would take a device the host needs, or None."""
    refused = [
        f"{address} {'; and '.join(critical[address])}"
        for address in addresses
        if address in critical and address not in allow_critical
    ]
    if not refused:
        return None
    return (
        f"host-critical: {'; '.join(refused)}. vfiod does not take a device the host needs "
        "away from its driver unless a policy rule names it by address"
    )


class Binder:
    """Binds and restores devices, keeping the state file true at every step."""

    def __init__(
        self,
        sysfs: Sysfs,
        state: StateFile,
        *,
        load_module: ModuleLoader = modprobe,
        critical: Callable[[], CriticalDevices] | None = None,
        fault: FaultPoint | None = None,
    ) -> None:
        self.sysfs = sysfs
        self.state = state
        self.load_module = load_module
        self.critical = critical or (lambda: find_critical(sysfs))
        self.fault = fault

    def refuse_critical(
        self,
        addresses: Iterable[PciAddress],
        allow_critical: Collection[PciAddress],
        critical: CriticalDevices | None = None,
    ) -> None:
        """Refuse, before anything changes, to move a device the host needs.
        ``critical``: a scan the caller made for this same operation (a scan
        reads every mount, swap, route and framebuffer: tens of ms)."""
        refusal = critical_refusal(
            addresses, allow_critical, self.critical() if critical is None else critical
        )
        if refusal is not None:
            raise HostError(errno.EPERM, refusal)

    def _maybe_die(self, point: FaultPoint) -> None:
        if self.fault is point:
            os.kill(os.getpid(), signal.SIGKILL)

    def bind(
        self,
        address: PciAddress,
        driver: str = VFIO_PCI,
        *,
        allow_critical: Collection[PciAddress] = (),
        critical: CriticalDevices | None = None,
        progress: Progress = _quiet,
    ) -> BindingRecord | None:
        """Bind one device to ``driver``. Returns the record of what it had,
        or None when it was on ``driver`` already (nothing to undo).
        Host-critical devices are refused unless in ``allow_critical``;
        ``critical`` is the caller's scan for this bind (None: scan now).
        The refusals here guard the moment of the write: the broker's plan
        decided before, on what the host looked like then."""
        device = self.sysfs.require_device(address)
        original = self.sysfs.driver(address)
        if original == driver:
            return None
        self.refuse_critical([address], allow_critical, critical)
        self._refuse_enabled_vfs(address, device, original)
        ensure_driver(self.sysfs, driver, self.load_module)
        record = BindingRecord(
            address=str(address),
            driver=driver,
            original_driver=original,
            original_override=self.sysfs.driver_override(address),
            phase=BindPhase.BINDING,
        )
        self.state.put_binding(record)
        progress(address, Step.BIND, original or "")
        try:
            self._move(address, device, original, driver)
        except HostError as e:
            progress(address, Step.FAILED, original or "")
            if not os.path.isdir(device):  # it went away meanwhile: nothing to undo
                self.forget(address)
                raise HostError(e.errno or errno.ENODEV, f"{e}; {address} is gone") from e
            # Undo at once rather than leave a half-done bind for repair().
            try:
                self.restore(address)
            except HostError as undo:
                raise HostError(
                    e.errno or errno.EIO, f"{e}; putting it back failed too: {undo}"
                ) from e
            raise HostError(
                e.errno or errno.EIO, f"{e}; the device was put back on {original or 'no driver'}"
            ) from e
        bound = dataclasses.replace(record, phase=BindPhase.BOUND)
        self.state.put_binding(bound)
        progress(address, Step.BOUND, original or "")
        return bound

    def _refuse_enabled_vfs(self, address: PciAddress, device: str, original: str | None) -> None:
        """Unbinding a PF destroys its VFs (and blocks on any a VMM holds)."""
        try:
            numvfs = int(self.sysfs.read(os.path.join(device, "sriov_numvfs")))
        except (OSError, ValueError):
            return  # not an SR-IOV PF
        if numvfs > 0 and original is not None:
            raise HostError(
                errno.EBUSY,
                f"{address} is an SR-IOV PF with {numvfs} enabled VF(s); unbinding it from "
                f"{original} would destroy them. Disable them first (echo 0 > "
                f"/sys/bus/pci/devices/{address}/sriov_numvfs)",
            )

    def _move(self, address: PciAddress, device: str, original: str | None, driver: str) -> None:
        override = os.path.join(device, "driver_override")
        _write(self.sysfs, override, driver, "setting driver_override", address)
        self._maybe_die(FaultPoint.AFTER_OVERRIDE)
        if original is not None:
            _unbind(self.sysfs, device, address)
        self._maybe_die(FaultPoint.AFTER_UNBIND)
        _reprobe(self.sysfs, address)
        now = self.sysfs.driver(address)
        if now != driver:
            raise HostError(
                errno.EIO,
                f"{driver} did not take {address} (it was left {now or 'unbound'}; see the "
                "kernel log)",
            )

    def bind_group(
        self,
        group: IommuGroup,
        driver: str = VFIO_PCI,
        *,
        allow_critical: Collection[PciAddress] = (),
    ) -> list[BindingRecord]:
        """Bind every member that must move; on any failure undo all of them.
        A host-critical member refuses the whole group before anything moves."""
        moving = [d.address for d in group.devices if needs_binding(d, driver)]
        return self.bind_all(moving, driver, allow_critical=allow_critical)

    def bind_all(
        self,
        addresses: Sequence[PciAddress],
        driver: str = VFIO_PCI,
        *,
        allow_critical: Collection[PciAddress] = (),
        critical: CriticalDevices | None = None,
        progress: Progress = _quiet,
        checkpoint: Callable[[], None] = lambda: None,
    ) -> list[BindingRecord]:
        """Bind each of ``addresses``, or none: a host-critical one refuses
        them all before anything moves, and a failure undoes those done.
        ``critical``: the caller's scan for this operation (None: scan now).
        ``checkpoint`` runs before each device and may raise to stop (the
        request was cancelled): what was done is undone, and it re-raises."""
        if critical is None:
            critical = self.critical()
        self.refuse_critical(addresses, allow_critical, critical)
        done: list[BindingRecord] = []
        try:
            for address in addresses:
                checkpoint()
                record = self.bind(
                    address,
                    driver,
                    allow_critical=allow_critical,
                    critical=critical,
                    progress=progress,
                )
                if record is not None:
                    done.append(record)
        except HostError as e:
            try:
                self.restore_all((PciAddress.parse(r.address) for r in reversed(done)), progress)
            except HostError as undo:
                raise HostError(e.errno or errno.EIO, f"{e}; putting back failed: {undo}") from e
            raise
        except BaseException:
            self.restore_all((PciAddress.parse(r.address) for r in reversed(done)), progress)
            raise
        return done

    def restore(self, address: PciAddress, progress: Progress = _quiet) -> str | None:
        """Give a device back to the driver recorded before it was bound;
        return that driver. The record goes only once that worked."""
        record = self.state.load().bindings.get(str(address))
        if record is None:
            raise HostError(
                errno.ENOENT,
                f"vfiod has no record of binding {address}; it was not moved by vfiod, "
                "so vfiod leaves it where it is",
            )
        progress(address, Step.RESTORE, record.original_driver or "")
        try:
            self._restore(address, record)
        except HostError:
            failed = dataclasses.replace(record, phase=BindPhase.RESTORE_FAILED)
            self.state.put_binding(failed)
            progress(address, Step.FAILED, record.original_driver or "")
            raise
        self.forget(str(address))
        progress(address, Step.RESTORED, record.original_driver or "")
        return record.original_driver

    def forget(self, address: str | PciAddress) -> None:
        """Drop the record of a device: vfiod will not give it back."""
        self.state.drop_binding(str(address))

    def _restore(self, address: PciAddress, record: BindingRecord) -> None:
        device = self.sysfs.require_device(address)
        if self.sysfs.driver(address) is not None:
            _unbind(self.sysfs, device, address)
        _write(
            self.sysfs,
            os.path.join(device, "driver_override"),
            record.original_override or "\n",
            "restoring driver_override",
            address,
        )
        if record.original_unknown:
            _reprobe(self.sysfs, address)  # whichever driver matches takes it
            return
        if record.original_driver is None:
            return
        ensure_driver(self.sysfs, record.original_driver, self.load_module)
        _reprobe(self.sysfs, address)
        now = self.sysfs.driver(address)
        if now != record.original_driver:
            raise HostError(
                errno.EIO,
                f"{address} did not go back to {record.original_driver} "
                f"(it is {now or 'unbound'}); see the kernel log, then try: "
                f"echo {address} > /sys/bus/pci/drivers_probe",
            )

    def restore_all(self, addresses: Iterable[PciAddress], progress: Progress = _quiet) -> None:
        """Restore each; report every failure, not just the first. A device
        that has gone away loses its record: nothing is left to restore."""
        errors: list[str] = []
        for address in addresses:
            if not os.path.isdir(self.sysfs.device_path(address)):
                log.warning("%s is gone from the host; nothing to give back", address)
                self.forget(address)
                continue
            try:
                self.restore(address, progress)
            except HostError as e:
                errors.append(str(e))
        if errors:
            raise HostError(errno.EIO, "; ".join(errors))

    def reserve(
        self, address: PciAddress, critical: CriticalDevices, progress: Progress = _quiet
    ) -> str | None:
        """Give a reserved device to vfio-pci for good: its driver_override
        stays vfio-pci, so no later probe gives it to another driver, and
        nothing is recorded to give back. Returns the driver it left (None:
        it was unbound or on vfio-pci). Host-critical devices and SR-IOV
        PFs with enabled VFs are refused, as for a lease."""
        device = self.sysfs.require_device(address)
        original = self.sysfs.driver(address)
        if original == VFIO_PCI:
            if self.sysfs.driver_override(address) != VFIO_PCI:
                override = os.path.join(device, "driver_override")
                _write(self.sysfs, override, VFIO_PCI, "setting driver_override", address)
            return None
        self.refuse_critical([address], (), critical)
        self._refuse_enabled_vfs(address, device, original)
        ensure_driver(self.sysfs, VFIO_PCI, self.load_module)
        progress(address, Step.BIND, original or "")
        try:
            self._move(address, device, original, VFIO_PCI)
        except HostError:
            progress(address, Step.FAILED, original or "")
            raise
        progress(address, Step.BOUND, original or "")
        return original

    def unreserve(self, address: PciAddress) -> str | None:
        """A device no longer reserved: clear the driver_override a
        reservation set and let whichever driver matches take it. Returns
        the driver it is on now."""
        device = self.sysfs.require_device(address)
        if self.sysfs.driver_override(address) != VFIO_PCI:
            return self.sysfs.driver(address)  # someone else set it since: theirs
        if self.sysfs.driver(address) == VFIO_PCI:
            _unbind(self.sysfs, device, address)
        _write(
            self.sysfs,
            os.path.join(device, "driver_override"),
            "\n",
            "clearing driver_override",
            address,
        )
        _reprobe(self.sysfs, address)
        return self.sysfs.driver(address)

    def reset(self, address: PciAddress) -> None:
        """Reset the device the way the kernel can (its reset_method list:
        flr, pm, bus, ...), as between two tenants; HostError (ENOTTY) when it
        has none: the kernel shows no ``reset`` attribute then."""
        device = self.sysfs.require_device(address)
        attribute = os.path.join(device, "reset")
        if not os.path.exists(attribute):
            raise HostError(
                errno.ENOTTY,
                f"{address} has no reset method (its reset_method in sysfs is empty): what the "
                "last tenant left in it stays there",
            )
        _write(self.sysfs, attribute, "1", "reset", address)

    def rebuild_records(self, addresses: Iterable[PciAddress], driver: str = VFIO_PCI) -> None:
        """Record devices vfiod moved whose records were lost (a damaged
        state file kept the lease but not its bindings), so that they are
        given back: to whichever driver takes them, as the original one is
        not known. Only devices on ``driver`` now: another one has moved on."""
        for address in addresses:
            known = self.state.load().bindings
            if str(address) in known or self.sysfs.driver(address) != driver:
                continue
            record = BindingRecord(
                address=str(address),
                driver=driver,
                original_driver=None,
                original_override=None,
                phase=BindPhase.BOUND,
                original_unknown=True,
            )
            self.state.put_binding(record)
            log.warning(
                "%s: its binding record was lost; it goes back to whichever driver takes it",
                address,
            )

    def repair(self, keep: Collection[str] = ()) -> list[RepairResult]:
        """After a crash or restart: restore every device vfiod moved, except
        those in ``keep`` (still leased). A device that has gone away loses
        its record — there is nothing left to restore."""
        results: list[RepairResult] = []
        for address, record in self.state.load().bindings.items():
            if address in keep and record.phase is BindPhase.BOUND:
                continue
            pci = PciAddress.parse(address)
            if not os.path.isdir(self.sysfs.device_path(pci)):
                self.forget(address)
                results.append(RepairResult(address, None, "the device is gone"))
                continue
            try:
                results.append(RepairResult(address, self.restore(pci), None))
            except HostError as e:
                results.append(RepairResult(address, None, str(e)))
        return results


def wait_for_node(path: str, timeout: float = 5.0) -> None:
    """Wait for a device node that udev or devtmpfs creates asynchronously."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise HostError(
                errno.ETIMEDOUT,
                f"{path} did not appear within {timeout:g} s; check that udev is running "
                "and the vfio modules are loaded",
            )
        time.sleep(0.02)
