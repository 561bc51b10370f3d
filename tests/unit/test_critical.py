"""Host-critical device detection on fake /proc and /sys trees.

The trees are real files and relative symlinks laid out as Linux lays them
out, so the detector follows links exactly as on a host.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vfiod.host.critical import (
    Mount,
    Swap,
    find_critical,
    mount_holding,
    nearest_pci_function,
    parse_ipv4_default_routes,
    parse_ipv6_default_routes,
    parse_mountinfo,
    parse_swaps,
    unescape,
)
from vfiod.host.sysfs import Sysfs
from vfiod.pci import PciAddress

ROOT_PORT = "0000:00:1d.0"
NVME = PciAddress.parse("0000:01:00.0")  # behind ROOT_PORT
NVME_B = PciAddress.parse("0000:02:00.0")
AHCI = PciAddress.parse("0000:00:1f.2")
NIC_A = PciAddress.parse("0000:03:00.0")
NIC_B = PciAddress.parse("0000:03:00.1")
GPU = PciAddress.parse("0000:00:02.0")
VIRTIO_9P = PciAddress.parse("0000:00:04.0")
VIRTIO_FS = PciAddress.parse("0000:00:05.0")
PF = PciAddress.parse("0000:04:00.0")
VF = PciAddress.parse("0000:04:10.0")

NVME_DISK = f"devices/pci0000:00/{ROOT_PORT}/{NVME}/nvme/nvme0/nvme0n1"
NVME_B_DISK = f"devices/pci0000:00/0000:00:1c.0/{NVME_B}/nvme/nvme1/nvme1n1"
SATA_DISK = f"devices/pci0000:00/{AHCI}/ata1/host0/target0:0:0/0:0:0:0/block/sda"

PROC_MOUNTS = (
    "22 27 0:21 / /proc rw,relatime shared:12 - proc proc rw",
    "23 27 0:22 / /sys rw,relatime shared:2 - sysfs sysfs rw",
    "25 24 0:23 / /dev/shm rw,relatime shared:4 - tmpfs tmpfs rw",
)


class Host:
    """A fake host: ``proc`` and ``sys`` trees under one directory."""

    def __init__(self, root: Path) -> None:
        self.proc = root / "proc"
        self.sys = root / "sys"
        self.proc.mkdir()
        self.sys.mkdir()

    @property
    def sysfs(self) -> Sysfs:
        return Sysfs(str(self.sys))

    def critical(self) -> dict[PciAddress, tuple[str, ...]]:
        return find_critical(self.sysfs, proc_root=str(self.proc))

    def proc_file(self, name: str, *lines: str) -> None:
        path = self.proc / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(line + "\n" for line in lines))

    def mountinfo(self, *lines: str) -> None:
        self.proc_file("self/mountinfo", *PROC_MOUNTS, *lines)

    def write(self, path: str, text: str) -> None:
        full = self.sys / path
        full.parent.mkdir(parents=True, exist_ok=True)
        full.write_text(text)

    def mkdir(self, path: str) -> str:
        (self.sys / path).mkdir(parents=True, exist_ok=True)
        return path

    def link(self, link: str, target: str) -> None:
        """``sys/link`` -> ``sys/target``, relative as sysfs's links are."""
        full = self.sys / link
        full.parent.mkdir(parents=True, exist_ok=True)
        full.symlink_to(os.path.relpath(self.sys / target, full.parent))

    def block(self, path: str, number: str) -> str:
        """A block device (disk, partition or virtual) with its two links."""
        self.write(f"{path}/dev", number + "\n")
        name = os.path.basename(path)
        self.link(f"dev/block/{number}", path)
        self.link(f"class/block/{name}", path)
        return path

    def partition(self, disk: str, name: str, number: str) -> str:
        path = self.block(f"{disk}/{name}", number)
        self.write(f"{path}/partition", name[-1] + "\n")
        return path

    def dm(self, index: int, name: str, number: str, *slaves: str) -> str:
        path = self.block(f"devices/virtual/block/dm-{index}", number)
        self.write(f"{path}/dm/name", name + "\n")
        for slave in slaves:
            self.link(f"{path}/slaves/{os.path.basename(slave)}", slave)
        return path

    def netdev(self, name: str, address: PciAddress | None) -> str:
        if address is None:
            path = self.mkdir(f"devices/virtual/net/{name}")
        else:
            device = self.mkdir(f"devices/pci0000:00/0000:00:1c.0/{address}")
            path = self.mkdir(f"{device}/net/{name}")
            self.link(f"{path}/device", device)
        self.link(f"class/net/{name}", path)
        return path

    def pci_device(self, address: PciAddress, parent: str = "devices/pci0000:00") -> str:
        path = self.mkdir(f"{parent}/{address}")
        self.link(f"bus/pci/devices/{address}", path)
        return path


def mount(number: str, point: str, fs_type: str, source: str, root: str = "/") -> str:
    return f"30 1 {number} {root} {point} rw,relatime shared:1 - {fs_type} {source} rw"


def route(iface: str, destination: str, mask: str, flags: str = "0003") -> str:
    return f"{iface}\t{destination}\t0102A8C0\t{flags}\t0\t0\t100\t{mask}\t0\t0\t0"


ROUTE_HEADER = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT"
V6_DEFAULT_ETH0 = (
    "00000000000000000000000000000000 00 00000000000000000000000000000000 00 "
    "fe800000000000000000000000000001 00000400 00000002 00000000 00000003     eth0"
)
V6_UNREACHABLE_LO = (
    "00000000000000000000000000000000 00 00000000000000000000000000000000 00 "
    "00000000000000000000000000000000 ffffffff 00000001 00000000 00200200       lo"
)
V6_LINK_LOCAL = (
    "fe800000000000000000000000000000 40 00000000000000000000000000000000 00 "
    "00000000000000000000000000000000 00000100 00000001 00000000 00000001     eth0"
)


@pytest.fixture
def host(tmp_path: Path) -> Host:
    return Host(tmp_path)


@pytest.fixture
def nvme(host: Host) -> Host:
    """An NVMe disk with three partitions: /boot, / and swap."""
    host.block(NVME_DISK, "259:0")
    host.partition(NVME_DISK, "nvme0n1p1", "259:1")
    host.partition(NVME_DISK, "nvme0n1p2", "259:2")
    host.partition(NVME_DISK, "nvme0n1p3", "259:3")
    return host


@pytest.fixture
def sata(host: Host) -> Host:
    host.block(SATA_DISK, "8:0")
    host.partition(SATA_DISK, "sda1", "8:1")
    host.partition(SATA_DISK, "sda2", "8:2")
    return host


# --- pure parsing ------------------------------------------------------------


def test_unescape_undoes_the_kernels_octal_escapes() -> None:
    assert unescape(r"/mnt/my\040disk\011x\134y") == "/mnt/my disk\tx\\y"


def test_parse_mountinfo_skips_optional_fields_and_junk() -> None:
    text = (
        "36 35 98:0 /mnt1 /mnt/a\\040b rw,noatime master:1 shared:7 - ext3 /dev/root rw\n"
        "garbage line\n"
        "37 35 x:y / /bad rw - ext4 /dev/sda1 rw\n"
    )
    assert parse_mountinfo(text) == (Mount(98, 0, "/mnt1", "/mnt/a b", "ext3", "/dev/root"),)


def test_parse_swaps() -> None:
    text = (
        "Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n"
        "/dev/nvme0n1p3                          partition\t8388604\t\t0\t\t-2\n"
        "/swap\\040file                           file\t\t1048572\t\t0\t\t-3\n"
    )
    assert parse_swaps(text) == (
        Swap("/dev/nvme0n1p3", "partition"),
        Swap("/swap file", "file"),
    )


def test_parse_ipv4_default_routes() -> None:
    text = "\n".join(
        [
            ROUTE_HEADER,
            route("eth0", "00000000", "00000000"),
            route("eth1", "0002A8C0", "00FFFFFF", "0001"),
            route("eth2", "00000000", "00000000", "0000"),  # not up
            route("eth0", "00000000", "00000000"),  # a second default, another metric
        ]
    )
    assert parse_ipv4_default_routes(text) == ("eth0",)


def test_parse_ipv6_default_routes_skips_unreachable_and_prefixes() -> None:
    text = "\n".join([V6_LINK_LOCAL, V6_UNREACHABLE_LO, V6_DEFAULT_ETH0])
    assert parse_ipv6_default_routes(text) == ("eth0",)


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        pytest.param(NVME_DISK + "/nvme0n1p2", NVME, id="nearest-not-bridge"),
        pytest.param(
            f"devices/pci0000:00/{ROOT_PORT}/usb2/2-1/2-1:1.0/host6/target6:0:0/6:0:0:0/block/sdb",
            PciAddress.parse(ROOT_PORT),
            id="usb-names-are-not-addresses",
        ),
        pytest.param("devices/virtual/block/dm-0", None, id="virtual"),
        pytest.param(
            "devices/pci0000:00/0000:00:0e.0/pci10000:e0/10000:e0:1d.0/10000:e1:00.0/nvme/nvme0",
            PciAddress.parse("0000:00:0e.0"),
            id="vmd-domain",
        ),
    ],
)
def test_nearest_pci_function(path: str, expected: PciAddress | None) -> None:
    assert nearest_pci_function(path) == expected


def test_mount_holding_takes_the_longest_and_last_mount_point() -> None:
    root = Mount(259, 2, "/", "/", "ext4", "/dev/nvme0n1p2")
    var = Mount(8, 1, "/", "/var", "xfs", "/dev/sda1")
    var_over = Mount(8, 2, "/", "/var", "xfs", "/dev/sda2")
    varnish = Mount(8, 3, "/", "/varnish", "xfs", "/dev/sda3")
    mounts = (root, var, varnish, var_over)
    assert mount_holding(mounts, "/var/swap") == var_over
    assert mount_holding(mounts, "/variable/swap") == root
    assert mount_holding(mounts, "/varnish/swap") == varnish
    assert mount_holding((), "/swap") is None


# --- storage -----------------------------------------------------------------


def test_root_on_an_nvme_partition(nvme: Host) -> None:
    nvme.mountinfo(
        mount("259:2", "/", "ext4", "/dev/nvme0n1p2"),
        mount("259:1", "/boot", "vfat", "/dev/nvme0n1p1"),
        # A bind mount of the same file system adds no reason.
        mount("259:2", "/srv/www", "ext4", "/dev/nvme0n1p2", root="/var/www"),
    )
    assert nvme.critical() == {
        NVME: ("backs / (ext4 on /dev/nvme0n1p2)", "backs /boot (vfat on /dev/nvme0n1p1)")
    }


def test_a_bind_mount_listed_first_yields_to_the_whole_file_system(nvme: Host) -> None:
    nvme.mountinfo(
        mount("259:2", "/srv/www", "ext4", "/dev/nvme0n1p2", root="/var/www"),
        mount("259:2", "/", "ext4", "/dev/nvme0n1p2"),
    )
    assert nvme.critical() == {NVME: ("backs / (ext4 on /dev/nvme0n1p2)",)}


def test_a_mount_on_dm_over_sata_follows_the_slaves(sata: Host) -> None:
    # LVM on LUKS on sda2: dm-1 (the LV) -> dm-0 (the crypt) -> sda2.
    crypt = sata.dm(0, "luks-1234", "253:0", f"{SATA_DISK}/sda2")
    sata.dm(1, "vg-srv", "253:1", crypt)
    sata.mountinfo(mount("253:1", "/srv", "xfs", "/dev/mapper/vg-srv"))
    assert sata.critical() == {AHCI: ("backs /srv (xfs on /dev/mapper/vg-srv)",)}


def test_md_raid_over_two_disks_marks_both_controllers(nvme: Host, sata: Host) -> None:
    md = nvme.block("devices/virtual/block/md0", "9:0")
    nvme.link(f"{md}/slaves/nvme0n1p2", f"{NVME_DISK}/nvme0n1p2")
    nvme.link(f"{md}/slaves/sda1", f"{SATA_DISK}/sda1")
    # A partition of the array inherits the array's slaves.
    nvme.partition(md, "md0p1", "259:9")
    nvme.mountinfo(mount("259:9", "/data", "ext4", "/dev/md0p1"))
    reason = ("backs /data (ext4 on /dev/md0p1)",)
    assert nvme.critical() == {AHCI: reason, NVME: reason}


def test_a_loop_mount_is_covered_by_the_mount_of_its_backing_file(nvme: Host) -> None:
    loop = nvme.block("devices/virtual/block/loop0", "7:0")
    nvme.write(f"{loop}/loop/backing_file", "/var/lib/snapd/snaps/core_1.snap\n")
    nvme.mountinfo(
        mount("259:2", "/", "ext4", "/dev/nvme0n1p2"),
        mount("7:0", "/snap/core/1", "squashfs", "/dev/loop0"),
    )
    assert nvme.critical() == {NVME: ("backs / (ext4 on /dev/nvme0n1p2)",)}


def test_btrfs_raid1_root_marks_every_member(nvme: Host) -> None:
    nvme.block(NVME_B_DISK, "259:4")
    nvme.partition(NVME_B_DISK, "nvme1n1p2", "259:6")
    members = "fs/btrfs/0f5e2b6a-6e35-4ac8-9a6d-1b4a4f6b0c3e/devices"
    nvme.link(f"{members}/nvme0n1p2", f"{NVME_DISK}/nvme0n1p2")
    nvme.link(f"{members}/nvme1n1p2", f"{NVME_B_DISK}/nvme1n1p2")
    # btrfs shows an anonymous device number; the source names one member.
    nvme.mountinfo(
        mount("0:31", "/", "btrfs", "/dev/nvme0n1p2", root="/@"),
        mount("0:31", "/home", "btrfs", "/dev/nvme0n1p2", root="/@home"),
    )
    reason = ("backs / (btrfs on /dev/nvme0n1p2)",)
    assert nvme.critical() == {NVME: reason, NVME_B: reason}


def test_btrfs_on_luks_by_mapper_name(sata: Host) -> None:
    sata.dm(0, "luks-root", "253:0", f"{SATA_DISK}/sda2")
    sata.mountinfo(mount("0:31", "/", "btrfs", "/dev/mapper/luks-root", root="/@"))
    assert sata.critical() == {AHCI: ("backs / (btrfs on /dev/mapper/luks-root)",)}


def test_nvme_multipath_head_marks_each_controller(host: Host) -> None:
    a = host.mkdir(f"devices/pci0000:00/{ROOT_PORT}/{NVME}/nvme/nvme0")
    b = host.mkdir(f"devices/pci0000:00/0000:00:1c.0/{NVME_B}/nvme/nvme1")
    subsystem = "devices/virtual/nvme-subsystem/nvme-subsys0"
    host.link(f"{subsystem}/nvme0", a)
    host.link(f"{subsystem}/nvme1", b)
    host.block(f"{subsystem}/nvme0n1", "259:0")
    host.partition(f"{subsystem}/nvme0n1", "nvme0n1p1", "259:1")
    host.mountinfo(mount("259:1", "/", "xfs", "/dev/nvme0n1p1"))
    reason = ("backs / (xfs on /dev/nvme0n1p1)",)
    assert host.critical() == {NVME: reason, NVME_B: reason}


def test_swap_partition(nvme: Host) -> None:
    nvme.mountinfo()
    nvme.proc_file(
        "swaps",
        "Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority",
        "/dev/nvme0n1p3                          partition\t8388604\t\t0\t\t-2",
        "/dev/zram0                              partition\t4194300\t\t0\t\t100",
    )
    nvme.block("devices/virtual/block/zram0", "252:0")
    assert nvme.critical() == {NVME: ("backs swap /dev/nvme0n1p3",)}


def test_swap_file_counts_for_the_mount_holding_it(nvme: Host, sata: Host) -> None:
    nvme.mountinfo(
        mount("259:2", "/", "ext4", "/dev/nvme0n1p2"),
        mount("8:1", "/var", "xfs", "/dev/sda1"),
    )
    nvme.proc_file(
        "swaps",
        "Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority",
        "/var/swap\\040file                       file\t\t1048572\t\t0\t\t-2",
    )
    assert nvme.critical() == {
        AHCI: ("backs /var (xfs on /dev/sda1)", "backs swap /var/swap file"),
        NVME: ("backs / (ext4 on /dev/nvme0n1p2)",),
    }


def test_root_on_9p_and_a_virtiofs_share(host: Host) -> None:
    for address, virtio, attribute, tag in (
        (VIRTIO_9P, "virtio3", "mount_tag", "/dev/root\0"),  # 9p ends its tag in NUL
        (VIRTIO_FS, "virtio4", "tag", "shared\n"),
    ):
        device = host.mkdir(f"devices/pci0000:00/{address}/{virtio}")
        host.write(f"{device}/{attribute}", tag)
        host.link(f"bus/virtio/devices/{virtio}", device)
    host.mountinfo(
        mount("0:24", "/", "9p", "/dev/root"),
        mount("0:25", "/mnt/shared", "virtiofs", "shared"),
        mount("0:26", "/mnt/gone", "virtiofs", "no-such-tag"),
    )
    assert host.critical() == {
        VIRTIO_9P: ("backs / (9p on /dev/root)",),
        VIRTIO_FS: ("backs /mnt/shared (virtiofs on shared)",),
    }


# --- network -----------------------------------------------------------------


def test_ipv4_default_route(host: Host) -> None:
    host.netdev("eth0", NIC_A)
    host.netdev("eth1", NIC_B)
    host.proc_file(
        "net/route",
        ROUTE_HEADER,
        route("eth0", "00000000", "00000000"),
        route("eth1", "0002A8C0", "00FFFFFF", "0001"),
    )
    # No net/ipv6_route: IPv6 is off, which is normal.
    assert host.critical() == {NIC_A: ("carries the default route (eth0)",)}


def test_ipv6_default_route(host: Host) -> None:
    host.netdev("eth0", NIC_A)
    host.netdev("lo", None)
    host.proc_file("net/route", ROUTE_HEADER)
    host.proc_file("net/ipv6_route", V6_LINK_LOCAL, V6_UNREACHABLE_LO, V6_DEFAULT_ETH0)
    assert host.critical() == {NIC_A: ("carries the default route (eth0)",)}


def test_ipv4_and_ipv6_defaults_on_one_nic_give_one_reason(host: Host) -> None:
    host.netdev("eth0", NIC_A)
    host.proc_file("net/route", ROUTE_HEADER, route("eth0", "00000000", "00000000"))
    host.proc_file("net/ipv6_route", V6_DEFAULT_ETH0)
    assert host.critical() == {NIC_A: ("carries the default route (eth0)",)}


def test_no_default_route(host: Host) -> None:
    host.netdev("eth0", NIC_A)
    host.netdev("lo", None)
    host.proc_file("net/route", ROUTE_HEADER, route("eth0", "0002A8C0", "00FFFFFF", "0001"))
    host.proc_file("net/ipv6_route", V6_LINK_LOCAL, V6_UNREACHABLE_LO)
    assert host.critical() == {}


def test_bond_marks_its_lower_nics(host: Host) -> None:
    eth0 = host.netdev("eth0", NIC_A)
    eth1 = host.netdev("eth1", NIC_B)
    bond = host.netdev("bond0", None)
    vlan = host.netdev("bond0.100", None)
    host.link(f"{bond}/lower_eth0", eth0)
    host.link(f"{bond}/lower_eth1", eth1)
    host.link(f"{vlan}/lower_bond0", bond)
    host.link(f"{eth0}/upper_bond0", bond)  # upper links lead nowhere new
    host.proc_file("net/route", ROUTE_HEADER, route("bond0.100", "00000000", "00000000"))
    assert host.critical() == {
        NIC_A: ("carries the default route (eth0 under bond0 under bond0.100)",),
        NIC_B: ("carries the default route (eth1 under bond0 under bond0.100)",),
    }


def test_the_pf_of_a_critical_vf_is_critical(host: Host) -> None:
    pf = host.pci_device(PF, f"devices/pci0000:00/{ROOT_PORT}")
    vf = host.pci_device(VF, f"devices/pci0000:00/{ROOT_PORT}")
    host.link(f"{vf}/physfn", pf)
    host.link(f"{pf}/virtfn0", vf)
    net = host.mkdir(f"{vf}/net/eth0")
    host.link("class/net/eth0", net)
    host.proc_file("net/route", ROUTE_HEADER, route("eth0", "00000000", "00000000"))
    assert host.critical() == {
        PF: (f"carries the default route (eth0) through its VF {VF}",),
        VF: ("carries the default route (eth0)",),
    }


# --- display -----------------------------------------------------------------


def test_boot_vga(host: Host) -> None:
    gpu = host.pci_device(GPU)
    other = host.pci_device(PciAddress.parse("0000:05:00.0"))
    host.write(f"{gpu}/boot_vga", "1\n")
    host.write(f"{other}/boot_vga", "0\n")
    assert host.critical() == {GPU: ("is the boot VGA device",)}


def test_framebuffer(host: Host) -> None:
    gpu = host.pci_device(GPU)
    host.write(f"{gpu}/boot_vga", "1\n")
    fb0 = host.mkdir(f"{gpu}/graphics/fb0")
    host.link(f"{fb0}/device", gpu)
    host.link("class/graphics/fb0", fb0)
    efifb = host.mkdir("devices/platform/efi-framebuffer.0")
    fb1 = host.mkdir(f"{efifb}/graphics/fb1")
    host.link(f"{fb1}/device", efifb)
    host.link("class/graphics/fb1", fb1)
    host.link("class/graphics/fbcon", host.mkdir("devices/virtual/graphics/fbcon"))
    assert host.critical() == {
        GPU: ("drives the console framebuffer fb0", "is the boot VGA device"),
    }


# --- nothing critical --------------------------------------------------------


def test_empty_trees(host: Host) -> None:
    assert host.critical() == {}


def test_a_host_with_nothing_critical(host: Host) -> None:
    host.mountinfo(
        mount("0:30", "/", "tmpfs", "tmpfs"),
        mount("0:31", "/mnt/nfs", "nfs4", "server:/export"),
        mount("8:1", "/mnt/gone", "ext4", "/dev/sdz1"),  # no such device in sysfs
    )
    host.proc_file("swaps", "Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority")
    host.proc_file("net/route", ROUTE_HEADER)
    host.pci_device(NIC_A)
    host.netdev("lo", None)
    assert host.critical() == {}


def test_unreadable_files_read_as_empty(host: Host) -> None:
    for name in ("self/mountinfo", "swaps", "net/route", "net/ipv6_route"):
        (host.proc / name).mkdir(parents=True)  # reading a directory fails
    assert host.critical() == {}


def test_links_leading_out_of_sysfs_are_ignored(host: Host, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere" / f"{NIC_A}" / "net" / "eth0"
    outside.mkdir(parents=True)
    (host.sys / "class/net").mkdir(parents=True)
    (host.sys / "class/net/eth0").symlink_to(outside)
    host.proc_file("net/route", ROUTE_HEADER, route("eth0", "00000000", "00000000"))
    assert host.critical() == {}
