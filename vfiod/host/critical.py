"""Host-critical PCI devices: the ones whose unbinding would hurt the host, and why.

vfiod refuses to bind these unless policy names them. Sources:

* block devices under mounted file systems and active swap
  (``/proc/self/mountinfo``, ``/proc/swaps``, ``/sys/dev/block``), through
  stacked devices (dm, md, bcache: ``slaves/``; NVMe multipath heads: the
  subsystem's controllers; multi-device btrfs: ``/sys/fs/btrfs/*/devices``);
* a root (or any) file system on virtio-9p or virtiofs, as in test VMs;
* the interfaces of the default routes (``/proc/net/route``,
  ``/proc/net/ipv6_route``) and their lower devices (bond, bridge, VLAN);
* framebuffers (``/sys/class/graphics/fb*``) and the boot VGA device.

A device on a sysfs path counts through the PCI function *nearest* the end of
the path (the controller), not the bridges above it: bridges stay on
pcieport, which vfiod never moves (vfio-pci refuses bridges), so marking
them would only make innocent devices behind the same root port look
critical. Whole-group effects are the caller's: a group holding a critical
function cannot be assigned without unbinding it. One exception goes
upwards: the PF of a critical SR-IOV VF is critical too, because unbinding a
PF's driver removes its VFs.

Parsing is in pure functions (text in, data out); reading files is at the
edges and never raises: an unreadable or missing file counts as empty.
"""

from __future__ import annotations

import dataclasses
import os
import re
import stat

from vfiod.host.sysfs import Sysfs
from vfiod.pci import AddressError, PciAddress

# Route flags from <linux/route.h> and <linux/ipv6_route.h>.
RTF_UP = 0x0001
RTF_REJECT = 0x0200

# File systems whose "device" is a virtio transport's mount tag.
VIRTIO_FILE_SYSTEMS = frozenset({"9p", "virtiofs"})

_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")
_IPV6_ANY = "0" * 32
# Stacking depth beyond which we stop following lower devices (cycle guard).
_MAX_DEPTH = 16


@dataclasses.dataclass(frozen=True)
class Mount:
    """One line of /proc/self/mountinfo."""

    major: int
    minor: int
    root: str  # the mounted subtree of the file system ("/" unless a bind mount)
    mount_point: str
    fs_type: str
    source: str


@dataclasses.dataclass(frozen=True)
class Swap:
    """One line of /proc/swaps."""

    path: str
    kind: str  # "partition" or "file"


@dataclasses.dataclass(frozen=True)
class Finding:
    address: PciAddress
    reason: str


# ---------------------------------------------------------------------------
# Pure parsing


def unescape(text: str) -> str:
    """Undo the kernel's octal escapes (``\\040`` for a space) in /proc paths."""
    return _OCTAL_ESCAPE.sub(lambda m: chr(int(m[1], 8)), text)


def parse_mountinfo(text: str) -> tuple[Mount, ...]:
    """Fields: id parent MAJ:MIN root mount-point options [optional...] - type source ..."""
    mounts = []
    for line in text.splitlines():
        fields = line.split()
        try:
            separator = fields.index("-", 6)
        except ValueError:
            continue
        if len(fields) < separator + 3:
            continue
        major, colon, minor = fields[2].partition(":")
        if not (colon and major.isdigit() and minor.isdigit()):
            continue
        mounts.append(
            Mount(
                major=int(major),
                minor=int(minor),
                root=unescape(fields[3]),
                mount_point=unescape(fields[4]),
                fs_type=fields[separator + 1],
                source=unescape(fields[separator + 2]),
            )
        )
    return tuple(mounts)


def parse_swaps(text: str) -> tuple[Swap, ...]:
    """Fields: Filename Type Size Used Priority, after a header line."""
    swaps = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 2 or fields[0] == "Filename":
            continue
        swaps.append(Swap(unescape(fields[0]), fields[1]))
    return tuple(swaps)


def _hex(text: str) -> int | None:
    try:
        return int(text, 16)
    except ValueError:
        return None


def _unique(items: list[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))


def parse_ipv4_default_routes(text: str) -> tuple[str, ...]:
    """Interfaces of the up IPv4 default routes in /proc/net/route (main table).

    Fields: Iface Destination Gateway Flags RefCnt Use Metric Mask MTU Window IRTT.
    """
    interfaces = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 8:
            continue
        flags = _hex(fields[3])
        if flags is None:  # the header line
            continue
        if _hex(fields[1]) == 0 and _hex(fields[7]) == 0 and flags & RTF_UP:
            interfaces.append(fields[0])
    return _unique(interfaces)


def parse_ipv6_default_routes(text: str) -> tuple[str, ...]:
    """Interfaces of the up IPv6 default routes in /proc/net/ipv6_route.

    Fields: dest dest-prefix src src-prefix next-hop metric refcnt use flags iface.
    The kernel keeps unreachable defaults on lo (flags REJECT, not UP); they
    fall out here.
    """
    interfaces = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 10:
            continue
        flags = _hex(fields[8])
        if (
            fields[0] == _IPV6_ANY
            and _hex(fields[1]) == 0
            and flags is not None
            and flags & RTF_UP
            and not flags & RTF_REJECT
        ):
            interfaces.append(fields[9])
    return _unique(interfaces)


def nearest_pci_function(device_path: str) -> PciAddress | None:
    """The PCI function nearest the end of a sysfs device path, if any.

    Only the full DDDD:BB:DD.F form counts, so that names such as USB's
    ``2-1:1.0`` are never taken for short PCI addresses. Functions in
    domains wider than four digits (Intel VMD's 10000:...) do not parse; the
    VMD endpoint above them, which hosts them, is found instead.
    """
    for part in reversed(device_path.split("/")):
        if len(part) != 12:
            continue
        try:
            return PciAddress.parse(part)
        except AddressError:
            continue
    return None


def mount_holding(mounts: tuple[Mount, ...], path: str) -> Mount | None:
    """The mount a path lies on: the longest mount point above it; of mounts
    stacked on the same point, the last one (it hides the others)."""
    best: Mount | None = None
    for mount in mounts:
        point = mount.mount_point.rstrip("/") + "/"
        if (path + "/").startswith(point) and (
            best is None or len(mount.mount_point) >= len(best.mount_point)
        ):
            best = mount
    return best


def file_systems(mounts: tuple[Mount, ...]) -> tuple[Mount, ...]:
    """One mount per file system, the first that shows its whole tree.

    Bind mounts and btrfs subvolumes repeat a file system's device number;
    one reason per file system is enough to explain a device.
    """
    chosen: dict[tuple[int, int], Mount] = {}
    for mount in mounts:
        key = (mount.major, mount.minor)
        if key not in chosen or (chosen[key].root != "/" and mount.root == "/"):
            chosen[key] = mount
    return tuple(chosen.values())


def collect(findings: list[Finding]) -> dict[PciAddress, tuple[str, ...]]:
    """Reasons per device, in the order found, without repeats."""
    reasons: dict[PciAddress, list[str]] = {}
    for finding in findings:
        reasons.setdefault(finding.address, []).append(finding.reason)
    return {address: _unique(items) for address, items in sorted(reasons.items())}


# ---------------------------------------------------------------------------
# Reading, never raising


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="backslashreplace") as f:
            return f.read()
    except OSError:
        return ""


def _listdir(path: str) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except OSError:
        return []


def _device_path(sysfs: Sysfs, link: str) -> str | None:
    """Where a sysfs link or directory really is, relative to the sysfs root
    (``devices/pci0000:00/...``); None if it is missing or leads outside."""
    real = os.path.realpath(link)
    if not os.path.exists(real):
        return None
    relative = os.path.relpath(real, os.path.realpath(sysfs.root))
    if relative == ".." or relative.startswith("../"):
        return None
    return relative


def _pci_behind(sysfs: Sysfs, link: str) -> PciAddress | None:
    path = _device_path(sysfs, link)
    return None if path is None else nearest_pci_function(path)


def read_mounts(proc_root: str = "/proc") -> tuple[Mount, ...]:
    return parse_mountinfo(_read(os.path.join(proc_root, "self/mountinfo")))


def read_swaps(proc_root: str = "/proc") -> tuple[Swap, ...]:
    return parse_swaps(_read(os.path.join(proc_root, "swaps")))


def read_default_route_interfaces(proc_root: str = "/proc") -> tuple[str, ...]:
    """IPv4 then IPv6; a missing ipv6_route (IPv6 off) reads as no routes."""
    v4 = parse_ipv4_default_routes(_read(os.path.join(proc_root, "net/route")))
    v6 = parse_ipv6_default_routes(_read(os.path.join(proc_root, "net/ipv6_route")))
    return _unique([*v4, *v6])


# ---------------------------------------------------------------------------
# Storage


def _dm_by_name(sysfs: Sysfs, name: str) -> str | None:
    for entry in _listdir(sysfs.path("class/block")):
        if (
            entry.startswith("dm-")
            and _read(sysfs.path("class/block", entry, "dm/name")).strip() == name
        ):
            return _device_path(sysfs, sysfs.path("class/block", entry))
    return None


def _block_by_node(sysfs: Sysfs, node: str) -> str | None:
    """The sysfs directory of the block device behind a /dev path.

    devtmpfs names nodes after the kernel's names and device-mapper names
    its nodes in /dev/mapper, so both resolve in sysfs alone; anything else
    (/dev/disk/by-*, /dev/<vg>/<lv>) is looked up by its device number.
    """
    directory, name = os.path.split(node)
    if directory == "/dev":
        path = _device_path(sysfs, sysfs.path("class/block", name))
        if path is not None:
            return path
    if directory == "/dev/mapper":
        path = _dm_by_name(sysfs, name)
        if path is not None:
            return path
    try:
        st = os.stat(node)
    except OSError:
        return None
    if not stat.S_ISBLK(st.st_mode):
        return None
    return _device_path(
        sysfs, sysfs.path("dev/block", f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}")
    )


def _btrfs_members(sysfs: Sysfs, device: str) -> list[str]:
    """All devices of the btrfs holding ``device``: mountinfo names only one."""
    name = os.path.basename(device)
    for fsid in _listdir(sysfs.path("fs/btrfs")):
        members = sysfs.path("fs/btrfs", fsid, "devices")
        entries = _listdir(members)
        if name in entries:
            paths = (_device_path(sysfs, os.path.join(members, e)) for e in entries)
            return [p for p in paths if p is not None]
    return [device]


def _virtio_tag_device(sysfs: Sysfs, tag: str) -> str | None:
    """The virtio device exporting a 9p ``mount_tag`` or virtiofs ``tag``."""
    devices = sysfs.path("bus/virtio/devices")
    for entry in _listdir(devices):
        for attribute in ("mount_tag", "tag"):
            # 9p's mount_tag ends in a NUL, virtiofs's tag in a newline.
            value = _read(os.path.join(devices, entry, attribute)).replace("\0", "").strip()
            if value == tag:
                return _device_path(sysfs, os.path.join(devices, entry))
    return None


def mount_devices(sysfs: Sysfs, mount: Mount) -> list[str]:
    """The sysfs paths of the devices a mount's file system lives on directly."""
    if mount.fs_type in VIRTIO_FILE_SYSTEMS:
        device = _virtio_tag_device(sysfs, mount.source)
        return [] if device is None else [device]
    if mount.major != 0:
        device = _device_path(sysfs, sysfs.path("dev/block", f"{mount.major}:{mount.minor}"))
        devices = [] if device is None else [device]
    else:
        # Anonymous device numbers: virtual file systems (skipped: their
        # source is no /dev path), but also btrfs and bcachefs, whose source
        # names the device(s), bcachefs's joined by colons.
        nodes = mount.source.split(":")
        if not all(node.startswith("/dev/") for node in nodes):
            return []
        found = (_block_by_node(sysfs, node) for node in nodes)
        devices = [d for d in found if d is not None]
    if mount.fs_type == "btrfs":
        devices = [m for d in devices for m in _btrfs_members(sysfs, d)]
    return devices


def _lower_block_devices(sysfs: Sysfs, device: str) -> list[str]:
    """Devices under a stacked block device.

    ``slaves/`` lists what dm, md and bcache devices sit on; a partition
    inherits its disk's. An NVMe multipath head disk lives under its
    subsystem (devices/virtual/nvme-subsystem/nvme-subsysN), which links to
    every controller of the namespace.

    Loop devices are not followed to their ``loop/backing_file``: that file
    lies on a mounted file system, which is reported for its own mount.
    """
    full = sysfs.path(device)
    lower = [
        p
        for p in (
            _device_path(sysfs, os.path.join(full, "slaves", e))
            for e in _listdir(os.path.join(full, "slaves"))
        )
        if p is not None
    ]
    parent = os.path.dirname(device)
    if os.path.exists(os.path.join(full, "partition")):
        lower += _lower_block_devices(sysfs, parent)
    if os.path.basename(parent).startswith("nvme-subsys"):
        for entry in _listdir(sysfs.path(parent)):
            link = sysfs.path(parent, entry)
            if re.fullmatch(r"nvme\d+", entry) and os.path.islink(link):
                path = _device_path(sysfs, link)
                if path is not None:
                    lower.append(path)
    return lower


def block_pci_functions(sysfs: Sysfs, devices: list[str]) -> list[PciAddress]:
    """The PCI functions that block devices (sysfs paths) depend on."""
    found: list[PciAddress] = []
    seen: set[str] = set()

    def walk(device: str, depth: int) -> None:
        if device in seen or depth > _MAX_DEPTH:
            return
        seen.add(device)
        address = nearest_pci_function(device)
        if address is not None and address not in found:
            found.append(address)
        for lower in _lower_block_devices(sysfs, device):
            walk(lower, depth + 1)

    for device in devices:
        walk(device, 0)
    return found


def storage_findings(
    sysfs: Sysfs, mounts: tuple[Mount, ...], swaps: tuple[Swap, ...]
) -> list[Finding]:
    findings = []
    for mount in file_systems(mounts):
        reason = f"backs {mount.mount_point} ({mount.fs_type} on {mount.source})"
        for address in block_pci_functions(sysfs, mount_devices(sysfs, mount)):
            findings.append(Finding(address, reason))
    for swap in swaps:
        if swap.kind == "file":
            holder = mount_holding(mounts, swap.path)
            devices = [] if holder is None else mount_devices(sysfs, holder)
        else:
            device = _block_by_node(sysfs, swap.path)
            devices = [] if device is None else [device]
        for address in block_pci_functions(sysfs, devices):
            findings.append(Finding(address, f"backs swap {swap.path}"))
    return findings


# ---------------------------------------------------------------------------
# Network


def interface_pci_functions(sysfs: Sysfs, interface: str) -> list[tuple[PciAddress, str]]:
    """The PCI functions under a network interface, each with the chain of
    interfaces that leads to it ("eth0 under bond0").

    Bonds, bridges, VLANs and macvlans link their lower devices as
    ``lower_<name>``. Only the main routing table shows in /proc/net/route,
    and only the first next hop of an IPv4 multipath route.
    """
    found: list[tuple[PciAddress, str]] = []
    seen: set[str] = set()

    def walk(name: str, chain: str, depth: int) -> None:
        if name in seen or depth > _MAX_DEPTH:
            return
        seen.add(name)
        directory = sysfs.path("class/net", name)
        address = _pci_behind(sysfs, directory)
        if address is not None:
            found.append((address, chain))
        for entry in _listdir(directory):
            if entry.startswith("lower_"):
                lower = entry.removeprefix("lower_")
                walk(lower, f"{lower} under {chain}", depth + 1)

    walk(interface, interface, 0)
    return found


def route_findings(sysfs: Sysfs, interfaces: tuple[str, ...]) -> list[Finding]:
    return [
        Finding(address, f"carries the default route ({chain})")
        for interface in interfaces
        for address, chain in interface_pci_functions(sysfs, interface)
    ]


# ---------------------------------------------------------------------------
# Display


def display_findings(sysfs: Sysfs) -> list[Finding]:
    """Framebuffers (consoles can be mapped to any of them) and the boot VGA
    device. Framebuffers of efifb and simpledrm sit on platform devices, not
    PCI; the boot VGA flag still names the GPU behind them."""
    findings = []
    for fb in _listdir(sysfs.path("class/graphics")):
        if not re.fullmatch(r"fb\d+", fb):
            continue
        address = _pci_behind(sysfs, sysfs.path("class/graphics", fb, "device"))
        if address is not None:
            findings.append(Finding(address, f"drives the console framebuffer {fb}"))
    for name in _listdir(sysfs.path("bus/pci/devices")):
        if _read(sysfs.path("bus/pci/devices", name, "boot_vga")).strip() == "1":
            try:
                findings.append(Finding(PciAddress.parse(name), "is the boot VGA device"))
            except AddressError:
                continue
    return findings


# ---------------------------------------------------------------------------


def _physical_functions(sysfs: Sysfs, findings: list[Finding]) -> list[Finding]:
    """Unbinding a PF's driver disables SR-IOV and removes its VFs, so the PF
    of a critical VF is critical for the same reason."""
    extra = []
    for finding in findings:
        address = _pci_behind(sysfs, os.path.join(sysfs.device_path(finding.address), "physfn"))
        if address is not None and address != finding.address:
            extra.append(Finding(address, f"{finding.reason} through its VF {finding.address}"))
    return extra


def find_critical(sysfs: Sysfs, proc_root: str = "/proc") -> dict[PciAddress, tuple[str, ...]]:
    """Every host-critical PCI function with the reasons it is critical."""
    mounts = read_mounts(proc_root)
    findings = [
        *storage_findings(sysfs, mounts, read_swaps(proc_root)),
        *route_findings(sysfs, read_default_route_interfaces(proc_root)),
        *display_findings(sysfs),
    ]
    findings += _physical_functions(sysfs, findings)
    return collect(findings)
