"""`vfiod import-driverctl`: driverctl's vfio-pci overrides as reservations.

driverctl keeps one file per override, ``/etc/driverctl.d/BUS-DEVICE``
(``pci-0000:01:00.0``), holding the driver's name, and re-applies it from
a udev rule when the device appears. Each PCI override to vfio-pci becomes
a ``[[reserve]]`` of that address; overrides to other drivers are not
vfiod's business and are named on stderr, left to driverctl.

    vfiod import-driverctl [--root DIR] [--output FILE]

Exit codes: 0 written; 1 nothing to import, or it cannot be written; 2 bad
arguments.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from vfiod.pci import AddressError, PciAddress
from vfiod.policy.load import PolicyError, Source, parse_policy

EXIT_OK = 0
EXIT_FAILURE = 1
DRIVERCTL_DIR = "etc/driverctl.d"
VFIO_PCI = "vfio-pci"


@dataclasses.dataclass(frozen=True)
class Override:
    bus: str
    device: str
    driver: str
    path: str


def read_overrides(directory: str) -> list[Override]:
    """driverctl's overrides, in name order; a directory that is not there has none."""
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return []
    overrides = []
    for name in names:
        bus, dash, device = name.partition("-")
        path = os.path.join(directory, name)
        if not dash or name.startswith(".") or not os.path.isfile(path):
            continue
        with open(path, encoding="utf-8") as f:
            overrides.append(Override(bus, device, f.read().strip(), path))
    return overrides


def policy_text(overrides: list[Override], source: str) -> tuple[str, list[str]]:
    """The policy file's text for the vfio-pci overrides, and a sentence for
    each override left out."""
    reserved: list[PciAddress] = []
    skipped = []
    for override in overrides:
        try:
            address = PciAddress.parse(override.device) if override.bus == "pci" else None
        except AddressError:
            address = None
        if address is None:
            skipped.append(f"{override.path}: not a PCI device; driverctl keeps it")
        elif override.driver != VFIO_PCI:
            skipped.append(
                f"{override.path}: {address} to {override.driver or 'no driver'}, not vfio-pci; "
                "driverctl keeps it"
            )
        else:
            reserved.append(address)
    if not reserved:
        return "", skipped
    tables = "".join(
        f'\n[[reserve]]\nname = "driverctl-{address}"\naddress = "{address}"\n'
        f'comment = "from driverctl\'s override {source}/pci-{address}"\n'
        for address in dict.fromkeys(reserved)
    )
    header = (
        f"# Written by `vfiod import-driverctl` from {source}: vfio-pci owns these\n"
        "# devices from boot (see the [[reserve]] tables in vfiod's policy README).\n"
        "# Once vfiod runs with this file, drop driverctl's overrides of them\n"
        "# (driverctl unset-override ADDRESS) so that one tool owns each device.\n"
    )
    return header + tables, skipped


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "import-driverctl",
        help="turn driverctl's vfio-pci overrides into vfiod reservations",
        description=(
            "Read driverctl's overrides (/etc/driverctl.d) and write the [[reserve]] tables "
            "that give the same devices to vfio-pci from boot. Check the result with "
            "`vfiod check-policy`, apply it with `systemctl reload vfiod`."
        ),
    )
    p.add_argument("--root", default="/", help="look for etc/driverctl.d under DIR")
    p.add_argument(
        "--output",
        default="-",
        metavar="FILE",
        help="where to write the policy file, e.g. /etc/vfiod/policy.d/40-driverctl.toml "
        "(default: standard output); an existing file is not overwritten",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    directory = os.path.join(args.root, DRIVERCTL_DIR)
    text, skipped = policy_text(read_overrides(directory), "/" + DRIVERCTL_DIR)
    for sentence in skipped:
        print(f"vfiod: skipped {sentence}", file=sys.stderr)
    if not text:
        print(f"vfiod: no vfio-pci override of a PCI device in {directory}", file=sys.stderr)
        return EXIT_FAILURE
    try:  # what vfiod writes, vfiod must read back
        parse_policy([Source(args.output, text.encode())])
    except PolicyError as e:
        raise AssertionError(f"bug: import-driverctl wrote a policy vfiod refuses: {e}") from e
    if args.output == "-":
        sys.stdout.write(text)
        return EXIT_OK
    try:
        fd = os.open(args.output, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    except OSError as e:
        print(f"vfiod: cannot write {args.output}: {e.strerror}", file=sys.stderr)
        return EXIT_FAILURE
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"vfiod: wrote {args.output}; check it with `vfiod check-policy`", file=sys.stderr)
    return EXIT_OK
