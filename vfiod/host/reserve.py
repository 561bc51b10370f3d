"""Reservations: devices vfio-pci owns from the moment they appear.

``vfio-pci.ids=`` on the kernel command line matches vendor:device, so it
cannot pick one of two identical GPUs. A reservation names devices by
address, and vfiod keeps a udev rules file that acts on each one's ``add``
event: it sets ``driver_override`` to vfio-pci before udev loads any native
driver module for it (rules.d files run before 80-drivers.rules, and a
native driver loaded later passes over a device whose override names
another driver), loads vfio-pci and binds the device to it. A device that a
driver took before udev saw it (a driver built into the kernel, or a
hotplug while the native driver is loaded: the kernel probes before it
tells udev) is unbound and given to vfio-pci at once.

The rules use udev's own keys only, no program: they work before vfiod
starts, in any boot phase udev runs, and without vfiod installed.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Mapping
from types import MappingProxyType

from vfiod.pci import PciAddress
from vfiod.policy.model import Reservation

# Under the policy root ("/" on a host). In /etc, not /run: the rules must be
# there at the next boot, when udev adds the devices, before vfiod starts.
RULES_FILE = "etc/udev/rules.d/61-vfiod-reserved.rules"

_HEADER = """\
# Written by vfiod from the [[reserve]] tables of its policy
# (/etc/vfiod/policy.d/*.toml); vfiod rewrites it at every start and reload,
# so change the policy, not this file. vfio-pci owns these devices from the
# moment they appear: driver_override is set before udev loads a native
# driver for them (80-drivers.rules), and a device a driver took first
# (built into the kernel, or hotplugged while the driver is loaded) is
# unbound and given to vfio-pci.
ACTION!="add", GOTO="vfiod_reserved_end"
SUBSYSTEM!="pci", GOTO="vfiod_reserved_end"
"""

_ACTIONS = """\
GOTO="vfiod_reserved_end"
LABEL="vfiod_reserved"
ATTR{driver_override}="vfio-pci"
IMPORT{builtin}="kmod load vfio-pci"
DRIVER=="vfio-pci", GOTO="vfiod_reserved_end"
TEST=="driver", ATTR{driver/unbind}="$kernel"
ATTR{[drivers/pci:vfio-pci]bind}="$kernel"
LABEL="vfiod_reserved_end"
"""


def udev_rules(
    reserved: Iterable[tuple[Reservation, PciAddress]],
    ids: Mapping[PciAddress, tuple[int, int]] = MappingProxyType({}),
) -> str:
    """The rules file for these (reservation, address) pairs; "" for none.
    ``ids``: the vendor and device id of those present now. Their rules
    match the ids too, so that another device found at that address at a
    later boot (hardware moved or swapped: a disk controller, say) is not
    taken from its driver before vfiod has looked at it."""
    pairs = sorted(reserved, key=lambda pair: pair[1])
    if not pairs:
        return ""
    matches = "".join(
        f"# reservation {r.name!r} ({_printable(r.source)})\n"
        f'KERNEL=="{address}", {_ids_match(ids.get(address))}GOTO="vfiod_reserved"\n'
        for r, address in pairs
    )
    return _HEADER + matches + _ACTIONS


def _ids_match(ids: tuple[int, int] | None) -> str:
    if ids is None:
        return ""
    vendor, device = ids
    return f'ATTR{{vendor}}=="0x{vendor:04x}", ATTR{{device}}=="0x{device:04x}", '


def _printable(text: str) -> str:
    """A file name in a comment line: a newline in it must not start a rule."""
    return "".join(c if c.isprintable() else "?" for c in text)


def write_rules(root: str, text: str) -> bool:
    """Put ``text`` in the rules file under ``root`` (remove the file for "");
    atomically, and only when it changes. Returns whether it changed."""
    path = os.path.join(root, RULES_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            if f.read() == text:
                return False
    except FileNotFoundError:
        if not text:
            return False
    if not text:
        os.unlink(path)
        return True
    directory = os.path.dirname(path)
    os.makedirs(directory, mode=0o755, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=directory, prefix=".vfiod-reserved.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fchmod(f.fileno(), 0o644)  # udev and admins read it
            os.fsync(f.fileno())
        os.rename(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise
    return True
