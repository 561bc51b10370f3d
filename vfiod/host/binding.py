"""Moving a PCI device between drivers the safe way.

Bind: set ``driver_override``, unbind from the current driver, ask the bus to
probe the device again (``drivers_probe``) — only the named driver may take it.
Never ``new_id``: that makes a driver grab every device with the same IDs.
Restore: unbind, clear ``driver_override``, reprobe, and check that the
original driver came back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import subprocess
import time

from vfiod.host.sysfs import HostError, Sysfs
from vfiod.pci import PciAddress

VFIO_PCI = "vfio-pci"


@dataclasses.dataclass(frozen=True)
class Binding:
    """What a device was bound to before vfiod moved it."""

    address: PciAddress
    original_driver: str | None
    original_override: str | None


def _write(sysfs: Sysfs, path: str, value: str, what: str, address: PciAddress) -> None:
    try:
        sysfs.write(path, value)
    except OSError as e:
        err = e.errno if e.errno is not None else errno.EIO
        raise HostError(err, f"{what} for {address} failed: {os.strerror(err)}") from e


def _reprobe(sysfs: Sysfs, address: PciAddress) -> None:
    # A driver that refuses the device makes this write fail; the callers
    # check which driver holds the device afterwards and say so.
    with contextlib.suppress(OSError):
        sysfs.write(sysfs.path("bus/pci/drivers_probe"), str(address))


def ensure_driver(sysfs: Sysfs, driver: str) -> None:
    """Load the driver's module if the driver is not registered yet."""
    if os.path.isdir(sysfs.path("bus/pci/drivers", driver)):
        return
    result = subprocess.run(
        ["modprobe", driver], capture_output=True, text=True, check=False, timeout=60
    )
    if not os.path.isdir(sysfs.path("bus/pci/drivers", driver)):
        raise HostError(
            errno.ENOENT,
            f"PCI driver {driver} is not available: modprobe {driver} said "
            f"{result.stderr.strip() or 'nothing'}; install the kernel's {driver} module",
        )


def bind(sysfs: Sysfs, address: PciAddress, driver: str = VFIO_PCI) -> Binding:
    """Bind one device to ``driver``; return what it had before."""
    device = sysfs.require_device(address)
    before = Binding(address, sysfs.driver(address), sysfs.driver_override(address))
    if before.original_driver == driver:
        return before
    ensure_driver(sysfs, driver)
    _write(
        sysfs, os.path.join(device, "driver_override"), driver, "setting driver_override", address
    )
    if before.original_driver is not None:
        _write(sysfs, os.path.join(device, "driver", "unbind"), str(address), "unbind", address)
    _reprobe(sysfs, address)
    now = sysfs.driver(address)
    if now != driver:
        restore(sysfs, before)
        raise HostError(
            errno.EIO,
            f"{driver} did not take {address} (it is {now or 'unbound'}); the device "
            f"was put back on {before.original_driver or 'no driver'}; see the kernel log",
        )
    return before


def restore(sysfs: Sysfs, binding: Binding) -> None:
    """Give the device back to the driver it had before ``bind``."""
    address = binding.address
    device = sysfs.require_device(address)
    if sysfs.driver(address) is not None:
        _write(sysfs, os.path.join(device, "driver", "unbind"), str(address), "unbind", address)
    _write(
        sysfs,
        os.path.join(device, "driver_override"),
        binding.original_override or "\n",
        "clearing driver_override",
        address,
    )
    if binding.original_driver is None:
        return
    ensure_driver(sysfs, binding.original_driver)
    _reprobe(sysfs, address)
    now = sysfs.driver(address)
    if now != binding.original_driver:
        raise HostError(
            errno.EIO,
            f"{address} did not go back to {binding.original_driver} "
            f"(it is {now or 'unbound'}); try: echo {address} > /sys/bus/pci/drivers_probe",
        )


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
