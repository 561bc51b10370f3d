"""`vfiod check-policy`: validate the policy files, or explain one decision.

    vfiod check-policy [--root DIR] [--json]
    vfiod check-policy --explain ADDRESS --user NAME|UID [--group G|GID]... [--unit U]
                       [--slice S]... [--backend B] [--managed] [--unsafe-noiommu]

Exit codes: 0 the files are valid (and, with --explain, the device is
allowed); 1 errors in the files (or the device is denied); 2 bad arguments.
"""

from __future__ import annotations

import argparse
import errno
import grp
import json
import os
import pwd
import sys
from typing import Any

from vfiod.host.critical import find_critical
from vfiod.host.hwdb import HardwareDatabase
from vfiod.host.inventory import PciDevice, scan
from vfiod.host.sysfs import HostError, Sysfs
from vfiod.pci import AddressError, PciAddress
from vfiod.policy.decide import decide, format_decision
from vfiod.policy.load import LoadResult, PolicyError, Problem, format_size, load_policy
from vfiod.policy.model import BACKENDS, Caller, Effect, Policy, Request

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


class _UsageError(Exception):
    """Bad arguments; the message says which and what to give instead."""


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``check-policy`` on the ``vfiod`` command line."""
    p = subparsers.add_parser(
        "check-policy",
        help="validate the policy files, or explain the decision for one device and user",
        description=(
            "Validate /etc/vfiod/vfiod.toml and the rules in /etc/vfiod/policy.d and "
            "/usr/lib/vfiod/policy.d; with --explain, show what the policy decides for one "
            "device and caller, and why. Exit status: 0 valid (allowed), 1 errors (denied), "
            "2 bad arguments."
        ),
    )
    p.add_argument("--root", default="/", help="look for etc/vfiod and usr/lib/vfiod under DIR")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--explain", metavar="ADDRESS", help="explain the decision for this device")
    p.add_argument(
        "--user",
        metavar="NAME",
        help="the caller to explain for: a user name, or a uid (even one without a passwd entry)",
    )
    p.add_argument(
        "--group",
        metavar="G",
        action="append",
        default=[],
        help="an extra group for the caller (besides the user's own), by name or gid; repeatable",
    )
    p.add_argument("--unit", metavar="U", help='the caller\'s systemd unit, e.g. "vm@1.service"')
    p.add_argument(
        "--slice",
        metavar="S",
        action="append",
        default=[],
        help='a slice the caller runs under, e.g. "machine.slice"; repeatable',
    )
    p.add_argument(
        "--backend", choices=BACKENDS, help="the backend asked for (default: the policy's)"
    )
    p.add_argument("--managed", action="store_true", help="the request asks vfiod to rebind")
    p.add_argument(
        "--unsafe-noiommu", action="store_true", help="the request consents to no-IOMMU use"
    )
    p.add_argument("--sysfs", default="/sys", help=argparse.SUPPRESS)
    p.add_argument("--proc", default="/proc", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_check_policy)


def cmd_check_policy(args: argparse.Namespace) -> int:
    try:
        if args.explain is None:
            if args.user is not None:
                raise _UsageError("--user only means something with --explain ADDRESS")
            return _check(args)
        return _explain(args)
    except _UsageError as e:
        print(f"vfiod check-policy: {e}", file=sys.stderr)
        return EXIT_USAGE


def _load(root: str) -> tuple[LoadResult | None, PolicyError | None]:
    try:
        return load_policy(root), None
    except PolicyError as e:
        return None, e


def _summary(policy: Policy) -> str:
    deny = sum(rule.effect is Effect.DENY for rule in policy.rules)
    settings = policy.settings
    return (
        f"{len(policy.rules)} rule(s) ({len(policy.rules) - deny} allow, {deny} deny) read "
        f"from {len(policy.files)} file(s); allow-unsafe-noiommu = "
        f"{str(settings.allow_unsafe_noiommu).lower()}, default-backend = "
        f'"{settings.default_backend}", dma-limit = "{format_size(settings.dma_limit)}"'
    )


def _problem_lines(errors: tuple[Problem, ...], warnings: tuple[Problem, ...]) -> list[str]:
    return [f"error: {p}" for p in errors] + [f"warning: {p}" for p in warnings]


def _check(args: argparse.Namespace) -> int:
    result, error = _load(args.root)
    errors = error.problems if error else ()
    warnings = error.warnings if error else result.warnings if result else ()
    if args.json:
        report: dict[str, Any] = {
            "ok": error is None,
            "root": args.root,
            "errors": [p.to_json() for p in errors],
            "warnings": [p.to_json() for p in warnings],
        }
        if result is not None:
            report["files"] = list(result.policy.files)
            report["settings"] = {
                "allow-unsafe-noiommu": result.policy.settings.allow_unsafe_noiommu,
                "default-backend": result.policy.settings.default_backend,
                "dma-limit": result.policy.settings.dma_limit,
            }
            report["rules"] = [rule.to_json() for rule in result.policy.rules]
        json.dump(report, sys.stdout, indent=2)
        print()
    else:
        for line in _problem_lines(errors, warnings):
            print(line)
        if result is not None:
            print(f"policy is valid: {_summary(result.policy)}")
            if not result.policy.rules:
                print("no rules: every request is denied (the default)")
        else:
            print(
                f"{len(errors)} error(s), {len(warnings)} warning(s): fix them; until then "
                "a running vfiod keeps the last policy that loaded (deny-all if none did)"
            )
    return EXIT_OK if error is None else EXIT_FAILURE


_MAX_ID = 2**32 - 2  # (uid_t)-1 means "no id" to the kernel


def _numeric_id(text: str) -> int | None:
    """A uid or gid written as a number, else None."""
    if not (text.isascii() and text.isdigit()):
        return None
    number = int(text)
    if number > _MAX_ID:
        raise _UsageError(f"{text} is out of range for a uid or gid (0 to {_MAX_ID})")
    return number


def _passwd_entry(user: str) -> pwd.struct_passwd | None:
    """The user's passwd entry; None for a numeric uid without one."""
    uid = _numeric_id(user)
    try:
        return pwd.getpwnam(user) if uid is None else pwd.getpwuid(uid)
    except (KeyError, ValueError):
        if uid is not None:
            return None  # the daemon sees such callers too: explain by number
        raise _UsageError(
            f"no user {user!r} in the passwd database: give an existing user name or a uid"
        ) from None


def _add_group(group: str, gids: list[int], names: list[str]) -> None:
    """Add a --group, by name or gid, to the caller's groups (rules may name
    either), whether or not the group database knows it."""
    gid = _numeric_id(group)
    name = group if gid is None else None
    try:
        if gid is None:
            gid = grp.getgrnam(group).gr_gid
        else:
            name = grp.getgrgid(gid).gr_name
    except KeyError:
        pass  # explain as if the group existed: rules name groups by name or gid
    if gid is not None and gid not in gids:
        gids.append(gid)
    if name is not None and name not in names:
        names.append(name)


def resolve_caller(user: str, groups: list[str], unit: str | None, slices: list[str]) -> Caller:
    """A Caller for a user of this host, as the daemon would see it. A
    numeric uid without a passwd entry has no name and only ``groups``."""
    entry = _passwd_entry(user)
    if entry is None:
        uid, name, gids = int(user), None, []
    else:
        uid, name = entry.pw_uid, entry.pw_name
        gids = list(dict.fromkeys(os.getgrouplist(entry.pw_name, entry.pw_gid)))
    names = []
    for gid in gids:
        try:
            names.append(grp.getgrgid(gid).gr_name)
        except KeyError:
            continue  # a gid without a name still counts by number
    for group in groups:
        _add_group(group, gids, names)
    return Caller(
        uid=uid,
        user=name,
        gids=tuple(gids),
        groups=tuple(names),
        unit=unit,
        slices=tuple(slices),
    )


def _device(sysfs: Sysfs, address: PciAddress) -> tuple[PciDevice, bool]:
    """The device and whether its group is a no-IOMMU group."""
    hwdb = HardwareDatabase()
    try:
        inventory = scan(sysfs, hwdb)
    finally:
        hwdb.close()
    device = inventory.devices.get(address)
    if device is None:
        raise HostError(
            errno.ENODEV, f"no PCI device {address}: see `vfiod inventory` for the devices"
        )
    if device.group is None:
        return device, True  # only unsafe no-IOMMU mode could give it a group
    group = inventory.groups.get(device.group)
    return device, group is not None and group.noiommu


def _explain(args: argparse.Namespace) -> int:
    if args.user is None:
        raise _UsageError("--explain needs --user NAME: whose request to explain")
    try:
        address = PciAddress.parse(args.explain)
    except AddressError as e:
        raise _UsageError(str(e)) from None
    caller = resolve_caller(args.user, args.group, args.unit, args.slice)
    result, error = _load(args.root)
    if error is not None:
        if args.json:
            json.dump(
                {"ok": False, "errors": [p.to_json() for p in error.problems]},
                sys.stdout,
                indent=2,
            )
            print()
        else:
            for line in _problem_lines(error.problems, error.warnings):
                print(line)
            print("the policy has errors: fix them before explaining a decision")
        return EXIT_FAILURE
    assert result is not None
    policy = result.policy
    sysfs = Sysfs(args.sysfs)
    device, noiommu = _device(sysfs, address)
    critical = find_critical(sysfs, args.proc).get(address, ())
    request = Request(
        backend=args.backend or policy.settings.default_backend,
        managed=args.managed,
        unsafe_noiommu=args.unsafe_noiommu,
    )
    decision = decide(
        policy, caller, device, request, host_critical=critical, noiommu=noiommu, explain=True
    )
    if args.json:
        json.dump(
            {
                "ok": True,
                "caller": {
                    "uid": caller.uid,
                    "user": caller.user,
                    "gids": list(caller.gids),
                    "groups": list(caller.groups),
                    "unit": caller.unit,
                    "slices": list(caller.slices),
                },
                "device": {
                    "address": str(device.address),
                    "ids": device.ids,
                    "class": f"{device.pci_class:06x}",
                    "class_name": device.class_name,
                    "description": device.description,
                    "driver": device.driver,
                    "iommu_group": device.group,
                    "noiommu": noiommu,
                    "host_critical": list(critical),
                },
                "request": {
                    "backend": request.backend,
                    "managed": request.managed,
                    "unsafe-noiommu": request.unsafe_noiommu,
                },
                "warnings": [p.to_json() for p in result.warnings],
                **decision.to_json(),
            },
            sys.stdout,
            indent=2,
        )
        print()
    else:
        for line in _problem_lines((), result.warnings):
            print(line)
        groups = ", ".join(caller.groups) or "none"
        print(
            f"caller:  {caller.describe()}, groups {groups}"
            + (f", slices {', '.join(caller.slices)}" if caller.slices else "")
        )
        print(
            f"device:  {device.address} {device.ids} {device.class_name}"
            + (f" ({device.description})" if device.description else "")
            + f", driver {device.driver or 'none'}, IOMMU group "
            + (f"{device.group}{' (no-IOMMU)' if noiommu else ''}" if device.group else "none")
            + (
                " (no IOMMU: only unsafe no-IOMMU mode could hand it out)"
                if not device.group
                else ""
            )
        )
        for reason in critical:
            print(f"         host-critical: {reason}")
        print(
            f"request: backend {request.backend}, managed {str(request.managed).lower()}, "
            f"unsafe-noiommu {str(request.unsafe_noiommu).lower()}"
        )
        print(format_decision(decision))
    return EXIT_OK if decision.allowed else EXIT_FAILURE
