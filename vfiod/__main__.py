"""`vfiod` command line: admin tools now, the daemon itself later."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from vfiod import __version__
from vfiod.host.critical import find_critical
from vfiod.host.hwdb import HardwareDatabase
from vfiod.host.inventory import scan
from vfiod.host.sysfs import HostError, Sysfs
from vfiod.report import inventory_json, inventory_table
from vfiod.vfio import VfioError

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


def cmd_inventory(args: argparse.Namespace) -> int:
    sysfs = Sysfs(args.sysfs)
    hwdb = HardwareDatabase()
    try:
        inventory = scan(sysfs, hwdb)
    finally:
        hwdb.close()
    critical = find_critical(sysfs, args.proc)
    if args.json:
        json.dump(inventory_json(inventory, critical), sys.stdout, indent=2)
        print()
    else:
        print(inventory_table(inventory, critical))
    return EXIT_OK


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vfiod", description="VFIO device assignment broker")
    p.add_argument("--version", action="version", version=f"vfiod {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    inv = sub.add_parser(
        "inventory", help="list IOMMU groups and devices, and why a group is not viable"
    )
    inv.add_argument("--json", action="store_true", help="machine-readable output")
    inv.add_argument("--sysfs", default="/sys", help=argparse.SUPPRESS)
    inv.add_argument("--proc", default="/proc", help=argparse.SUPPRESS)
    inv.set_defaults(func=cmd_inventory)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        result: int = args.func(args)
    except (HostError, VfioError) as e:
        print(f"vfiod: {e}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130
    return result


if __name__ == "__main__":
    sys.exit(main())
