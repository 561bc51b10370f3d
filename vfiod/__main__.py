"""`vfiod` command line: admin tools now, the daemon itself later."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from vfiod import __version__, daemon, log
from vfiod.host.critical import find_critical
from vfiod.host.hwdb import HardwareDatabase
from vfiod.host.inventory import scan
from vfiod.host.sysfs import HostError, Sysfs
from vfiod.policy.cli import add_parser as add_check_policy
from vfiod.policy.driverctl import add_parser as add_import_driverctl
from vfiod.report import inventory_json, inventory_table
from vfiod.state import StateFile
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


def cmd_daemon(args: argparse.Namespace) -> int:
    log.setup(logging.DEBUG if args.debug else logging.INFO)
    parts = daemon.Parts(
        sysfs=Sysfs(args.sysfs), state=StateFile(args.state), policy_root=args.root
    )
    try:
        daemon.run(parts)
    except daemon.StartupError as e:
        print(f"vfiod: {e}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vfiod",
        description="VFIO device assignment broker. Without a command, runs the daemon.",
    )
    p.add_argument("--version", action="version", version=f"vfiod {__version__}")
    sub = p.add_subparsers(dest="command")
    run = sub.add_parser("daemon", help="run the daemon (the default; systemd starts it)")
    run.add_argument("--debug", action="store_true", help="log debug messages")
    run.add_argument("--root", default="/", help="where etc/vfiod and usr/lib/vfiod are")
    run.add_argument("--sysfs", default="/sys", help=argparse.SUPPRESS)
    run.add_argument("--state", default="/run/vfiod/state.json", help=argparse.SUPPRESS)
    run.set_defaults(func=cmd_daemon)
    inv = sub.add_parser(
        "inventory", help="list IOMMU groups and devices, and why a group is not viable"
    )
    inv.add_argument("--json", action="store_true", help="machine-readable output")
    inv.add_argument("--sysfs", default="/sys", help=argparse.SUPPRESS)
    inv.add_argument("--proc", default="/proc", help=argparse.SUPPRESS)
    inv.set_defaults(func=cmd_inventory)
    add_check_policy(sub)
    add_import_driverctl(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if not arguments or (
        arguments[0].startswith("-") and arguments[0] not in ("-h", "--help", "--version")
    ):
        arguments.insert(0, "daemon")
    args = parser().parse_args(arguments)
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
