"""`vfioctl`: ask vfiod for VFIO devices from the command line.

    vfioctl list [--json]
    vfioctl show ADDRESS|GROUP [--json] [--backend B] [--managed] [--unsafe-noiommu]
    vfioctl check ADDRESS... [--json] [--backend B] [--managed] [--unsafe-noiommu]
                             [--user NAME [--root DIR]]
    vfioctl acquire ADDRESS... [--json] [--backend B] [--managed] [--unsafe-noiommu]
                               [--no-open-devices] [--label L]
    vfioctl release LEASE
    vfioctl run --device ADDRESS... [--backend B] [--managed] [--unsafe-noiommu]
                [--no-open-devices] [--label L] -- COMMAND [ARG...]

Everything goes through vfiod on the system bus as the calling user (the
daemon decides from the bus's credentials), except ``check --user``, which
explains the policy files for another user the way ``vfiod check-policy
--explain`` does.

Exit status: 0 done (for ``check``: every device allowed); 1 vfiod refused
or failed, or a device was denied; 2 bad arguments; ``run`` exits with its
command's status (128 + the signal number when a signal ended it).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import difflib
import errno
import functools
import io
import json
import os
import re
import select
import signal
import stat
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

from vfiod import __version__
from vfiod.client import (
    ACQUIRE_TIMEOUT,
    ERROR_PREFIX,
    MANAGER_PATH,
    Access,
    Client,
    DeviceInfo,
    GroupInfo,
    Inventory,
    Lease,
    LeaseInfo,
    Progress,
    VfiodError,
    lease_path,
)
from vfiod.hotplug import UNPLUG_TIMEOUT, HotplugError, Monitor, check_id, qmp_monitor
from vfiod.pci import AddressError, PciAddress
from vfiod.reasons import Reason
from vfiod.report import table

PROG = "vfioctl"
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_CANNOT_RUN = 126  # as shells: found but not executable
EXIT_NOT_FOUND = 127  # as shells: no such command

NO_OBJECT = "/"
BRIDGE_CLASS = 0x06  # PCI base class: bridge
LEASE_PREFIX = f"{MANAGER_PATH}/lease/"
_LEASE_ID = re.compile(r"[A-Za-z0-9_]+")
# Signals `run` passes on to its command, and `acquire` ends on.
RELAYED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
SI_KERNEL = 0x80  # siginfo si_code of a signal the kernel sent (a terminal's ^C)


class UsageError(Exception):
    """Bad input to vfioctl itself: exit status 2."""


class CommandFailedError(Exception):
    """Something vfioctl could not do, in words: exit status 1."""


# -- output


def say(*lines: str) -> None:
    """Progress and notes, for people: on stderr, so stdout stays the answer."""
    for line in lines:
        print(f"{PROG}: {line}", file=sys.stderr, flush=True)


def print_json(value: object) -> None:
    json.dump(value, sys.stdout, indent=2)
    print()


def node_name(group: GroupInfo) -> str:
    """A group's name as in /dev/vfio and in fd names: "10", "noiommu-0"."""
    return f"noiommu-{group.id}" if group.noiommu else group.id


def lease_id(path: str) -> str | None:
    return None if path == NO_OBJECT else path.rsplit("/", 1)[-1]


def _yes(value: bool) -> str:
    return "yes" if value else "no"


def _is_bridge(device: DeviceInfo) -> bool:
    """Host, ISA, PCI bridges...: never given to a VM themselves."""
    return device.pci_class >> 16 == BRIDGE_CLASS


def _created(lease: LeaseInfo) -> str:
    moment = datetime.datetime.fromtimestamp(lease.created / 1e6, datetime.UTC).astimezone()
    return moment.isoformat(timespec="seconds")


def _holder(lease: LeaseInfo) -> str:
    if lease.details is None:  # not yours: vfiod tells only who (uid) holds it
        return f"uid {lease.uid} (lease {lease.id})"
    who = f"{lease.label} " if lease.label else ""
    return f"{who}(uid {lease.uid}, pid {lease.pid}, lease {lease.id})"


# -- reading the inventory


class View:
    """The inventory with lookups the commands need."""

    def __init__(self, inventory: Inventory) -> None:
        self.inventory = inventory

    @functools.cached_property
    def by_path(self) -> dict[str, DeviceInfo]:
        return {d.path: d for d in self.inventory.devices.values()}

    def members(self, group: GroupInfo) -> list[DeviceInfo]:
        by_path = self.by_path
        return [by_path[p] for p in group.devices if p in by_path]

    def group_of(self, device: DeviceInfo) -> GroupInfo | None:
        return self.inventory.group_of(device)

    def lease(self, path: str) -> LeaseInfo | None:
        return self.inventory.leases.get(path)

    def sorted_groups(self) -> list[GroupInfo]:
        def key(group: GroupInfo) -> tuple[bool, int, str]:
            return (group.noiommu, int(group.id) if group.id.isdigit() else -1, group.id)

        return sorted(self.inventory.groups.values(), key=key)

    def ungrouped(self) -> list[DeviceInfo]:
        return [d for d in self.inventory.devices.values() if d.group not in self.inventory.groups]

    def find_group(self, text: str) -> GroupInfo | None:
        name = text.removeprefix("group:")
        for group in self.inventory.groups.values():
            if name in (node_name(group), group.path) or (not group.noiommu and name == group.id):
                return group
        return None


def _address(text: str) -> str:
    """A PCI address in the kernel's form; the text itself if it is not one."""
    try:
        return str(PciAddress.parse(text))
    except AddressError:
        return text


def _addresses(texts: Sequence[str]) -> list[str]:
    """PCI addresses in the kernel's form (short BB:DD.F is domain 0), or a
    UsageError naming the malformed one."""
    out = []
    for text in texts:
        try:
            out.append(str(PciAddress.parse(text)))
        except AddressError as e:
            raise UsageError(f"{e}; `{PROG} list` shows the devices") from None
    return out


# -- the bus


@contextlib.contextmanager
def connect() -> Iterator[Client]:
    """A client on the system bus (a VfiodError that says why there is none)."""
    client = Client()
    try:
        yield client
    finally:
        client.close()


def _device_json(view: View, device: DeviceInfo) -> dict[str, object]:
    group = view.group_of(device)
    return {
        "address": device.address,
        "ids": device.ids,
        "vendor": device.vendor,
        "device": device.device,
        "class": f"{device.pci_class:06x}",
        "description": device.description,
        "driver": device.driver or None,
        "original_driver": device.original_driver or None,
        "group": node_name(group) if group is not None else None,
        "noiommu": device.noiommu,
        "host_critical": list(device.host_critical),
        "reset_methods": list(device.reset_methods),
        "reservation": device.reservation or None,
        "lease": lease_id(device.lease),
    }


def _group_json(view: View, group: GroupInfo) -> dict[str, object]:
    return {
        "id": node_name(group),
        "node": f"/dev/vfio/{node_name(group)}",
        "noiommu": group.noiommu,
        "viable": group.viable,
        "blockers": [{"address": a, "reason": r} for a, r in group.blockers],
        "devices": [d.address for d in view.members(group)],
        "lease": lease_id(group.lease),
    }


def _lease_json(lease: LeaseInfo) -> dict[str, object]:
    details = lease.details
    return {
        "id": lease.id,
        "path": lease.path,
        "uid": lease.uid,
        "devices": list(lease.devices),
        "groups": list(lease.groups),
        "backend": lease.backend,
        "unsafe": lease.unsafe,
        "created": lease.created,
        # Who holds it: for your own leases (all of them, as root); else null.
        "details": None
        if details is None
        else {
            "owner": details.owner,
            "pid": details.pid,
            "owner_pid": details.owner_pid,
            "unit": details.unit,
            "label": details.label,
            "state": details.state,
        },
    }


def _access_json(access: Access) -> dict[str, object]:
    """CheckAccess's answer as vfiod gave it, and vfioctl's next step for it."""
    return {
        "device": access.device,
        "allowed": access.allowed,
        "reason": access.reason,
        "code": access.code,
        "move": list(access.move),
        "blocker": access.blocker or None,
        "group": access.group or None,
        "holder": lease_id(access.holder),
        "companions": list(access.companions),
        "backends": list(access.backends),
        "next": _advice(access),
    }


def _device_row(device: DeviceInfo) -> tuple[str, str, str, str, str]:
    resets = ",".join(device.reset_methods) or "none"
    return (device.address, device.ids, device.driver or "-", resets, device.description)


def _device_notes(device: DeviceInfo) -> list[str]:
    notes = [f"host-critical: {reason}" for reason in device.host_critical]
    if device.reservation:
        notes.append(
            f"reserved for vfio-pci from boot (reservation {device.reservation!r}): "
            "it stays there when leases end"
        )
    if device.original_driver and device.original_driver != device.driver:
        notes.append(f"vfiod moved it from {device.original_driver}")
    return notes


def _lease_table(leases: Sequence[LeaseInfo]) -> str:
    rows = [
        (
            lease.id,
            str(lease.uid),
            str(lease.pid) if lease.details is not None else "-",
            lease.label or "-",
            _created(lease),
            lease.backend + (" UNSAFE" if lease.unsafe else ""),
            ",".join(lease.groups),
            " ".join(lease.devices),
        )
        for lease in leases
    ]
    return table(("LEASE", "UID", "PID", "LABEL", "SINCE", "BACKEND", "GROUPS", "DEVICES"), rows)


# -- list


def cmd_list(args: argparse.Namespace) -> int:
    with connect() as client:
        view = View(client.inventory())
    inventory = view.inventory
    if args.json:
        print_json(
            {
                "groups": [_group_json(view, g) for g in view.sorted_groups()],
                "devices": [_device_json(view, d) for d in inventory.devices.values()],
                "leases": [_lease_json(lease) for lease in inventory.leases.values()],
            }
        )
        return EXIT_OK
    rows: list[Sequence[str] | str] = []
    for group in view.sorted_groups():
        for i, device in enumerate(view.members(group)):
            first = (node_name(group), _yes(group.viable)) if i == 0 else ("", "")
            rows.append((*first, *_device_row(device)))
            rows.extend(_device_notes(device))
        rows.extend(f"not viable: {reason}" for _address, reason in group.blockers)
        lease = view.lease(group.lease)
        if lease is not None:
            rows.append(f"leased to {_holder(lease)}")
    for device in view.ungrouped():
        rows.append(("-", "-", *_device_row(device)))
        rows.extend(_device_notes(device))
        rows.append("no IOMMU group: assignable only in unsafe no-IOMMU mode")
    print(table(("GROUP", "VIABLE", "DEVICE", "IDS", "DRIVER", "RESET", "DESCRIPTION"), rows))
    if inventory.leases:
        print()
        print(_lease_table(sorted(inventory.leases.values(), key=lambda lease: lease.created)))
    return EXIT_OK


# -- the request options of show, check, acquire and run


def _request_options(args: argparse.Namespace) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if args.backend is not None:
        options["backend"] = args.backend
    if args.managed:
        options["managed"] = True
    if args.unsafe_noiommu:
        options["unsafe_noiommu"] = True
    return options


# -- what to do next: from CheckAccess's reason codes, never from its words


def _wait(access: Access) -> str:
    held = lease_id(access.holder)
    return f"wait for lease {held} to end" if held else "wait for that request to end"


# The next step on vfioctl's command line, by vfiod's reason code. Codes not
# here need no option of ours: vfiod's reason says who can change them.
_ADVICE: dict[str, Callable[[Access], str | None]] = {
    Reason.NEEDS_MANAGED: lambda a: (
        f"ask with --managed: vfiod moves {', '.join(a.move)} to vfio-pci where policy allows it"
    ),
    Reason.UNSAFE_CONSENT: lambda a: (
        "ask with --unsafe-noiommu, if whoever holds the device may reach all of the host's memory"
    ),
    Reason.BACKEND: lambda a: (
        "ask with " + " or ".join(f"--backend {b}" for b in a.backends) if a.backends else None
    ),
    Reason.TOO_MANY_FDS: lambda a: (
        f"ask with --no-open-devices (`{PROG} acquire` and `{PROG} run` take it), or for "
        "fewer devices at a time"
    ),
    Reason.MAX_LEASES: lambda a: f"release one of your leases first (`{PROG} list` shows them)",
    Reason.BUSY: _wait,
}


def _advice(access: Access) -> str | None:
    """The next step for ``access`` on our command line, or None."""
    advise = _ADVICE.get(access.code)
    return advise(access) if advise is not None else None


def _option_words(args: argparse.Namespace) -> str:
    """The request options of ``args`` as typed, to repeat in advice."""
    words = [f"--backend {args.backend}"] if args.backend is not None else []
    words += ["--managed"] if args.managed else []
    words += ["--unsafe-noiommu"] if args.unsafe_noiommu else []
    return "".join(f"{w} " for w in words)


def _next_step(
    view: View, accesses: Sequence[Access], args: argparse.Namespace
) -> tuple[bool, str]:
    """Could the caller acquire these devices now, and what to do next:
    from vfiod's answer, by its codes."""
    refused = next((a for a in accesses if not a.allowed), None)
    if refused is not None:
        by = f", by {refused.blocker}" if refused.blocker not in ("", refused.device) else ""
        advice = _advice(refused) or "vfiod says why, and who can change that"
        return False, f"no ({refused.code}{by}): {advice}"
    busy = next((a for a in accesses if a.code == Reason.BUSY), None)
    if busy is not None:
        return False, f"not now: {_advice(busy)}"
    addresses = " ".join(a.device for a in accesses)
    command = f"`{PROG} acquire {_option_words(args)}{addresses}`"
    moving = list(dict.fromkeys(m for a in accesses for m in a.move))
    companions = list(dict.fromkeys(c for a in accesses for c in a.companions))
    also = (
        f"; the lease also reaches {', '.join(companions)} (same IOMMU group)" if companions else ""
    )
    if moving:
        devices = view.inventory.devices
        names = ", ".join(
            f"{m} ({devices[m].driver or 'no driver'})" if m in devices else m for m in moving
        )
        return True, f"yes: {command} moves {names} to vfio-pci and back afterwards{also}"
    return True, f"yes: {command}, or `{PROG} run --device ...`{also}"


# -- show


def _you(access: Access) -> str:
    """vfiod's answer for one device, in one line."""
    verdict = "allowed" if access.allowed else "denied"
    code = "" if access.code == Reason.ALLOWED else f" ({access.code})"
    return f"{verdict}{code}: {access.reason}"


def _show_device(client: Client, view: View, device: DeviceInfo, args: argparse.Namespace) -> int:
    group = view.group_of(device)
    lease = view.lease(device.lease)
    [access] = client.check_access([device.address], **_request_options(args))
    members = view.members(group) if group is not None else [device]
    ok, verdict = _next_step(view, [access], args)
    if args.json:
        print_json(
            {
                "device": _device_json(view, device),
                "group": _group_json(view, group) if group is not None else None,
                "members": [_device_json(view, d) for d in members],
                "lease": _lease_json(lease) if lease is not None else None,
                "access": _access_json(access),
                "assignable": ok,
                "verdict": verdict,
            }
        )
        return EXIT_OK
    lines = [
        ("device", f"{device.address}  {device.ids}  {device.description}"),
        ("class", f"{device.pci_class:06x}"),
        ("driver", device.driver or "none"),
    ]
    if device.original_driver:
        lines.append(("original", f"{device.original_driver} (vfiod gives it back)"))
    lines.append(("reset", ", ".join(device.reset_methods) or "none: the kernel cannot reset it"))
    if device.reservation:
        lines.append(("reserved", f"for vfio-pci from boot (reservation {device.reservation!r})"))
    lines.append(("critical", "; ".join(device.host_critical) or "no"))
    if group is None:
        lines.append(("group", "none: no IOMMU, so only unsafe no-IOMMU mode can assign it"))
    else:
        viable = "viable" if group.viable else "not viable"
        others = [d.address for d in members if d.address != device.address]
        lines.append(("group", f"{node_name(group)} ({viable}), /dev/vfio/{node_name(group)}"))
        if others:
            lines.append(("", f"shared with {', '.join(others)}: a lease takes the whole group"))
        lines += [("", f"not viable: {reason}") for _a, reason in group.blockers]
    lines.append(("lease", _holder(lease) if lease is not None else "none"))
    lines.append(("you", _you(access)))
    lines.append(("verdict", verdict))
    _print_fields(lines)
    return EXIT_OK


def _show_group(client: Client, view: View, group: GroupInfo, args: argparse.Namespace) -> int:
    members = view.members(group)
    asked = [d for d in members if not _is_bridge(d)]
    accesses = (
        client.check_access([d.address for d in asked], **_request_options(args)) if asked else []
    )
    by_device = {a.device: a for a in accesses}
    lease = view.lease(group.lease)
    ok, verdict = (
        _next_step(view, accesses, args)
        if asked
        else (False, "no: nothing in this group can be given to a VM")
    )
    if args.json:
        print_json(
            {
                "group": _group_json(view, group),
                "members": [_device_json(view, d) for d in members],
                "lease": _lease_json(lease) if lease is not None else None,
                "access": [_access_json(a) for a in accesses],
                "assignable": ok,
                "verdict": verdict,
            }
        )
        return EXIT_OK
    _print_fields(
        [
            (
                "group",
                f"{node_name(group)} ({'viable' if group.viable else 'not viable'}), "
                f"/dev/vfio/{node_name(group)}" + (", UNSAFE no-IOMMU" if group.noiommu else ""),
            ),
            ("lease", _holder(lease) if lease is not None else "none"),
        ]
    )
    rows: list[Sequence[str] | str] = []
    blockers = {a.blocker: a.code for a in accesses if not a.allowed and a.blocker}
    for device in members:
        access = by_device.get(device.address)
        you = "-" if access is None else ("allowed" if access.allowed else "denied")
        rows.append((device.address, you, *_device_row(device)[1:]))
        rows.extend(_device_notes(device))
        if device.address in blockers:
            rows.append(f"refuses the lease: {blockers[device.address]}")
    rows.extend(f"not viable: {reason}" for _a, reason in group.blockers)
    print(table(("DEVICE", "YOU", "IDS", "DRIVER", "RESET", "DESCRIPTION"), rows))
    # One request for the whole group: its members share vfiod's answer.
    answer = next((a for a in accesses if not a.allowed), accesses[0] if accesses else None)
    _print_fields([*([("you", _you(answer))] if answer is not None else []), ("verdict", verdict)])
    return EXIT_OK


def _print_fields(lines: Sequence[tuple[str, str]]) -> None:
    width = max(len(key) for key, _ in lines)
    for key, value in lines:
        print(f"{key.ljust(width)}  {value}".rstrip() if key else f"{'':{width}}  {value}")


def cmd_show(args: argparse.Namespace) -> int:
    with connect() as client:
        view = View(client.inventory())
        device = view.inventory.devices.get(_address(args.what))
        if device is not None:
            return _show_device(client, view, device, args)
        group = view.find_group(args.what)
        if group is not None:
            return _show_group(client, view, group, args)
    raise CommandFailedError(
        f"no device or IOMMU group {args.what!r} on this host; `{PROG} list` shows them "
        "(a device is a PCI address like 0000:00:10.0, a group an id like 10 or noiommu-0)"
    )


# -- check


def cmd_check(args: argparse.Namespace) -> int:
    addresses = _addresses(args.devices)
    if args.user is not None:
        return _explain(args, addresses)
    if args.root is not None:
        raise UsageError("--root only means something with --user")
    with connect() as client:
        accesses = client.check_access(addresses, **_request_options(args))
    if args.json:
        print_json([_access_json(a) for a in accesses])
    else:
        rows: list[Sequence[str] | str] = []
        for a in accesses:
            rows.append((a.device, "allowed" if a.allowed else "denied", a.code, a.reason))
            if a.move:
                rows.append(f"moves to vfio-pci: {', '.join(a.move)}")
            if a.companions:
                rows.append(f"also reaches: {', '.join(a.companions)} (not asked for)")
            if a.holder != NO_OBJECT and a.code != Reason.BUSY:
                rows.append(f"leased now: lease {lease_id(a.holder)}")
            advice = _advice(a)
            if advice is not None:
                rows.append(f"next: {advice}")
        print(table(("DEVICE", "YOU", "CODE", "REASON"), rows))
    return EXIT_OK if all(a.allowed for a in accesses) else EXIT_FAILURE


def _explain(args: argparse.Namespace, addresses: Sequence[str]) -> int:
    """``vfiod check-policy --explain`` for each address: the policy files on
    this host, read here, for another user (vfiod answers only for its caller)."""
    from vfiod.host.sysfs import HostError  # noqa: PLC0415 - only this path reads the host
    from vfiod.policy.cli import add_parser  # noqa: PLC0415

    parser = argparse.ArgumentParser(prog="vfiod")
    add_parser(parser.add_subparsers(dest="command"))
    common = ["--user", args.user, "--root", args.root or "/", "--sysfs", args.sysfs]
    if args.backend is not None:
        common += ["--backend", args.backend]
    if args.managed:
        common.append("--managed")
    if args.unsafe_noiommu:
        common.append("--unsafe-noiommu")
    if args.json:
        common.append("--json")
    if not args.json:
        say(
            "explaining the policy files for another user, as `vfiod check-policy "
            "--explain` does; a running vfiod uses the policy it last loaded"
        )
    status = EXIT_OK
    reports: list[object] = []
    for i, address in enumerate(addresses):
        explain = parser.parse_args(["check-policy", "--explain", address, *common])
        out = io.StringIO()
        try:
            with contextlib.redirect_stdout(out):
                code: int = explain.func(explain)
        except HostError as e:
            raise CommandFailedError(str(e)) from None
        if code == EXIT_USAGE:
            raise UsageError(out.getvalue().strip() or f"cannot explain {address}")
        status = max(status, code)
        if args.json:
            reports.append(json.loads(out.getvalue()))
        else:
            print(("\n" if i else "") + out.getvalue().rstrip())
    if args.json:
        print_json(reports)
    return status


# -- acquire and release


class _Moves:
    """vfiod's progress on the devices it moves for our request, as lines on
    stderr; which devices it moved, and from which driver."""

    def __init__(self) -> None:
        self.moved: dict[str, str] = {}  # address -> the driver it left

    def __call__(self, step: Progress) -> None:
        driver = step.driver or "no driver"
        if step.step == "bind":
            say(f"moving {step.device} from {driver} to vfio-pci")
        elif step.step == "moving":
            say(f"still moving {step.device} from {driver}: {step.elapsed:.0f} s so far")
        elif step.step == "bound":
            self.moved[step.device] = step.driver
            say(f"{step.device} is on vfio-pci ({step.elapsed:.1f} s)")
        elif step.step == "restore":
            say(f"putting {step.device} back on {driver}")
        elif step.step == "restored":
            self.moved.pop(step.device, None)
            say(f"{step.device} is back on {driver} ({step.elapsed:.1f} s)")
        elif step.step == "failed":
            say(f"{step.device} did not move after {step.elapsed:.1f} s (vfiod says why)")


def _acquire(
    client: Client, addresses: Sequence[str], args: argparse.Namespace, **extra: Any
) -> tuple[Lease, dict[str, str]]:
    """Acquire, with a line on stderr for each step of each device vfiod
    moves; the lease and the devices moved to vfio-pci, with the drivers
    they left."""
    options = _request_options(args)
    if not args.open_devices:
        options["open_devices"] = False
    if args.label is not None:
        options["label"] = args.label
    moves = _Moves()
    lease = client.acquire(addresses, timeout=args.timeout, progress=moves, **options, **extra)
    return lease, moves.moved


def _release(client: Client, lease: Lease, moved: Mapping[str, str] | None = None) -> None:
    lease.close()
    try:
        client.release(lease)
    except VfiodError as e:
        if e.kind != "NotFound":
            raise
        say(f"lease {lease.id} had ended already")
    back = ", ".join(f"{a} back on {d}" for a, d in (moved or {}).items() if d)
    if back:
        say(f"vfiod puts {back}")


class _SignalledError(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _watch_stdin() -> bool:
    """Does the end of stdin mean "stop"? Yes for a terminal, pipe or
    socket; not for /dev/null or a file (as a backgrounded `vfioctl acquire`
    has), which would end at once."""
    try:
        mode = os.fstat(sys.stdin.fileno()).st_mode
    except (OSError, ValueError, AttributeError):
        return False
    return os.isatty(sys.stdin.fileno()) or stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


@contextlib.contextmanager
def _signals_raise(signals: Sequence[signal.Signals]) -> Iterator[None]:
    """While in the block, each of ``signals`` raises _SignalledError where
    the program is, so that what it began is undone on the way out."""

    def stop(signum: int, _frame: object) -> NoReturn:
        raise _SignalledError(signum)

    previous = {s: signal.signal(s, stop) for s in signals}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _hold() -> str:
    """Wait for SIGINT, SIGTERM, SIGHUP, SIGQUIT or the end of stdin; what ended it."""
    try:
        with _signals_raise(RELAYED):
            # A signal that came since cmd_acquire blocked them is delivered now.
            signal.pthread_sigmask(signal.SIG_UNBLOCK, RELAYED)
            if _watch_stdin():
                fd = sys.stdin.fileno()
                readable = select.poll()
                readable.register(fd, select.POLLIN)
                while True:
                    readable.poll()
                    if not os.read(fd, 4096):
                        return "end of input"
            while True:
                signal.pause()
    except _SignalledError as e:
        return signal.Signals(e.signum).name


def cmd_acquire(args: argparse.Namespace) -> int:
    addresses = _addresses(args.devices)
    # Held until _hold() is ready for them, so a SIGTERM that comes as soon
    # as the lease is printed still releases it.
    signal.pthread_sigmask(signal.SIG_BLOCK, RELAYED)
    with connect() as client:
        lease, moved = _acquire(client, addresses, args)
        try:
            info = client.inventory().leases.get(lease.path)
            devices = list(info.devices) if info else addresses
            groups = list(info.groups) if info else []
            if args.json:
                grant = {
                    "lease": lease.id,
                    "path": lease.path,
                    "pid": os.getpid(),
                    "fds": dict(lease.fds),
                    "devices": devices,
                    "groups": groups,
                    "backend": info.backend if info else None,
                }
                print(json.dumps(grant), flush=True)
            else:
                fds = "  ".join(f"{name}={fd}" for name, fd in lease.fds.items())
                print(
                    f"lease {lease.id} ({lease.path}): {' '.join(devices)}, "
                    f"IOMMU group(s) {', '.join(groups) or '?'}"
                )
                print(f"fds in vfioctl (pid {os.getpid()}): {fds or 'none'}", flush=True)
            how = "Ctrl-C, SIGTERM" + (" or the end of input" if _watch_stdin() else "")
            say(
                f"holding the lease until {how}; it ends when vfioctl exits. To give a "
                f"program the fds, use `{PROG} run --device ... -- COMMAND`"
            )
            why = _hold()
        finally:
            lease.close()
        say(f"{why}: releasing lease {lease.id}")
        _release(client, lease, moved)
    return EXIT_OK


def cmd_release(args: argparse.Namespace) -> int:
    text = args.lease.removeprefix(LEASE_PREFIX)
    if not _LEASE_ID.fullmatch(text):
        raise UsageError(
            f"malformed lease {args.lease!r}: give its id (or {LEASE_PREFIX}ID) as "
            f"`{PROG} list` shows it"
        )
    with connect() as client:
        client.release(lease_path(text))
    say(f"released lease {text}")
    return EXIT_OK


# -- run

# {name} stands for the fd vfiod named so: "container", "group:10",
# "device:0000:00:10.0", "iommufd", or a name vfiod adds later. Other braces
# stay as they are (a Python f-string's {fd}, JSON, find's {}, a{b,c}, the
# shell's ${VAR}), except a word that looks like a misspelt placeholder
# ({iommfd}), which is an error. {{name}} is a literal {name}.
_WORD = r"[a-z][a-z0-9_-]*(?::[A-Za-z0-9_.:-]+)?"
_PLACEHOLDER = re.compile(rf"\{{\{{(?P<literal>{_WORD})\}}\}}|(?<!\$)\{{(?P<name>{_WORD})\}}")
_KINDS = ("container", "iommufd", "group", "device")
_FORMS = ("{container}", "{iommufd}", "{group:ID}", "{device:ADDRESS}")


def _placeholder(word: str, fds: Sequence[str] = ()) -> str | None:
    """The fd name ``{word}`` stands for (device addresses in the kernel's
    form), None when it is no placeholder, or a UsageError for one that is
    wrong."""
    if word in fds:
        return word
    kind, _, rest = word.partition(":")
    if word in ("container", "iommufd") or (kind == "group" and rest):
        return word
    if kind == "device" and rest:
        try:
            return f"device:{PciAddress.parse(rest)}"
        except AddressError as e:
            raise UsageError(f"placeholder {{{word}}}: {e}") from None
    names = [*_KINDS, *(name.partition(":")[0] for name in fds)]
    if kind in _KINDS or difflib.get_close_matches(kind, names, n=1, cutoff=0.75):
        raise UsageError(
            f"unknown placeholder {{{word}}}; placeholders are {', '.join(_FORMS)} "
            f"(write {{{{{word}}}}} for a literal {{{word}}})"
        )
    return None


def placeholders(command: Sequence[str]) -> list[str]:
    """The fd names ``command`` refers to (UsageError for a wrong one)."""
    found = (
        _placeholder(m["name"]) for arg in command for m in _PLACEHOLDER.finditer(arg) if m["name"]
    )
    return [name for name in found if name is not None]


def substitute(command: Sequence[str], fds: dict[str, int]) -> list[str]:
    """``command`` with each {name} replaced by its fd number; a UsageError
    naming the fds there are when one is missing."""

    def replace(match: re.Match[str]) -> str:
        if match["literal"]:
            if _placeholder(match["literal"], list(fds)) is None:
                return match[0]
            return "{" + match["literal"] + "}"
        name = _placeholder(match["name"], list(fds))
        if name is None:
            return match[0]
        if name not in fds:
            raise UsageError(
                f"placeholder {{{match['name']}}} names no fd of this lease; it has "
                + (", ".join(f"{{{n}}}" for n in fds) or "no fds")
            )
        return str(fds[name])

    return [_PLACEHOLDER.sub(replace, arg) for arg in command]


def _spawn(argv: Sequence[str], fds: Sequence[int]) -> int:
    """Start ``argv`` with ``fds`` inherited at their numbers, every signal
    unblocked and SIGPIPE/SIGXFSZ at their defaults (as subprocess does)."""
    for fd in fds:
        os.set_inheritable(fd, True)
    try:
        return os.posix_spawnp(
            argv[0],
            list(argv),
            dict(os.environ),
            setsigmask=(),
            setsigdef=(signal.SIGPIPE, signal.SIGXFSZ),
        )
    finally:
        for fd in fds:
            os.set_inheritable(fd, False)


def _supervise(pid: int, waited: set[signal.Signals]) -> int:
    """Pass signals on to ``pid`` until it exits; its exit status, shell
    style. (Signals are blocked and taken with sigwaitinfo, so one sent by
    a terminal to the whole foreground process group, the command
    included, is not passed on a second time.)"""
    while True:
        info = signal.sigwaitinfo(waited)
        if info.si_signo == signal.SIGCHLD:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done == pid:
                code = os.waitstatus_to_exitcode(status)
                return 128 - code if code < 0 else code
        elif info.si_code != SI_KERNEL and info.si_pid != pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, info.si_signo)


def cmd_run(args: argparse.Namespace) -> int:
    command = list(args.command)
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        raise UsageError(
            "run needs a command after --, e.g. `vfioctl run --device ADDR -- qemu ...`"
        )
    if not args.device:
        raise UsageError("run needs at least one --device ADDRESS")
    addresses = _addresses(args.device)
    placeholders(command)  # bad ones stop here, before anything changes
    if args.label is None:
        args.label = os.path.basename(command[0])
    with connect() as client:
        # The lease follows this process (and so outlives nothing it should):
        # vfiod raises this process's RLIMIT_MEMLOCK, which the command inherits.
        me = os.pidfd_open(os.getpid())
        try:
            lease, moved = _acquire(client, addresses, args, owner_pidfd=me)
        finally:
            os.close(me)
        try:
            argv = substitute(command, lease.fds)
        except UsageError:
            _release(client, lease, moved)
            raise
        waited = {signal.SIGCHLD, *RELAYED}
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, waited)
        try:
            try:
                pid = _spawn(argv, list(lease.fds.values()))
            except OSError as e:
                say(f"cannot run {argv[0]}: {e.strerror}")
                return EXIT_NOT_FOUND if e.errno == errno.ENOENT else EXIT_CANNOT_RUN
            finally:
                lease.close()  # the command has them; the group frees when it closes them
            status = _supervise(pid, waited)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
            with _released_anyway(lease):
                _release(client, lease, moved)
    return status


@contextlib.contextmanager
def _released_anyway(lease: Lease) -> Iterator[None]:
    """A failed Release after the command ended is a note, not a failure:
    the lease follows this process, which is about to exit."""
    try:
        yield
    except VfiodError as e:
        say(f"releasing lease {lease.id} failed ({e.message}); it ends as vfioctl exits")


# -- hot attach and detach over QMP


def _monitor(args: argparse.Namespace) -> contextlib.AbstractContextManager[Monitor]:
    """QMP to the QEMU the arguments name: its socket, or a libvirt domain."""
    if args.libvirt is not None:
        if args.domain is None:
            raise UsageError("--libvirt needs --domain NAME: the running domain to change")
        from vfiod.libvirt_monitor import domain_monitor  # noqa: PLC0415 - optional libvirt

        return domain_monitor(args.libvirt, args.domain)
    if args.domain is not None:
        raise UsageError("--domain goes with --libvirt URI")
    return qmp_monitor(args.qmp)


def cmd_attach(args: argparse.Namespace) -> int:
    (address,) = _addresses([args.device])
    if args.backend == "legacy":
        raise UsageError(
            "QEMU takes a device fd only with the iommufd backend (it opens legacy "
            "groups by path itself): use --backend iommufd"
        )
    moves = _Moves()
    with connect() as client:
        try:
            if args.id is not None:
                check_id(args.id)  # before anything is asked of QEMU or vfiod
            # SIGTERM, SIGHUP and SIGQUIT stop it as ^C does: undoing what it began.
            with _signals_raise(RELAYED[1:]), _monitor(args) as monitor:
                attached = client.attach(
                    monitor,
                    address,
                    device_id=args.id,
                    bus=args.bus,
                    managed=args.managed,
                    unsafe_noiommu=args.unsafe_noiommu,
                    label=args.label,
                    acquire_timeout=args.timeout,
                    moves=moves,
                    say=say,
                )
        except HotplugError as e:
            raise CommandFailedError(str(e)) from None
        except (_SignalledError, KeyboardInterrupt) as e:
            signum = e.signum if isinstance(e, _SignalledError) else signal.SIGINT
            say(f"{signal.Signals(signum).name}: stopped; nothing stays leased or attached")
            return 128 + signum
    if args.json:
        print_json(dataclasses.asdict(attached))
    else:
        where = f" at guest {attached.guest_address}" if attached.guest_address else ""
        print(
            f"{attached.device} is in QEMU pid {attached.qemu_pid} as {attached.id}{where}, "
            f"lease {lease_id(attached.lease)}"
        )
        target = (
            f"--libvirt {args.libvirt} --domain {args.domain}"
            if args.libvirt is not None
            else f"--qmp {args.qmp}"
        )
        say(
            f"the lease ends when that QEMU exits; detach with `{PROG} detach {target} "
            f"--id {attached.id}`"
        )
    return EXIT_OK


def cmd_detach(args: argparse.Namespace) -> int:
    with connect() as client:
        try:
            with _monitor(args) as monitor:
                detached = client.detach(monitor, args.id, timeout=args.timeout, say=say)
        except HotplugError as e:
            raise CommandFailedError(str(e)) from None
    if args.json:
        print_json(dataclasses.asdict(detached))
    else:
        ended = "released" if detached.released else "had ended already"
        print(
            f"{detached.id} is out of QEMU pid {detached.qemu_pid}; lease "
            f"{lease_id(detached.lease)} {ended}"
        )
    return EXIT_OK


def _qemu_arguments(p: argparse.ArgumentParser) -> None:
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--qmp", metavar="SOCKET", help="the QMP socket QEMU listens on (-qmp unix:...)"
    )
    where.add_argument(
        "--libvirt",
        metavar="URI",
        help="a libvirt connection (qemu:///session, qemu:///system) whose --domain to change",
    )
    p.add_argument("--domain", metavar="NAME", help="with --libvirt: the running domain")


# -- libvirt's qemu hook


def cmd_libvirt_hook(args: argparse.Namespace) -> int:
    from vfiod import libvirt_hook  # noqa: PLC0415 - only libvirt's hook needs it

    operation = (args.operation, args.sub_operation)
    if operation not in (("prepare", "begin"), ("release", "end")):
        return EXIT_OK  # every other step of a domain's life is libvirt's alone
    try:
        holder = libvirt_hook.Holder(Path(args.run_dir), args.domain)
        if operation == ("release", "end"):
            if libvirt_hook.release(holder):
                say(f"released {holder.label}'s lease: vfiod gives its devices back")
            return EXIT_OK
        addresses = libvirt_hook.unmanaged_pci_hostdevs(sys.stdin.read())
        if not addresses:
            return EXIT_OK
        lease = libvirt_hook.prepare(holder, addresses)
    except libvirt_hook.HookError as e:
        raise CommandFailedError(f"{args.domain}: {e}") from None
    say(f"{args.domain}: {', '.join(addresses)} on vfio-pci for libvirt, lease {lease}")
    return EXIT_OK


# -- the command line


RUN_HELP = """\
Lease the devices, start COMMAND with the lease's fds open, and when it
exits release the lease and exit with its status (128 + N when signal N
ended it; 127 when COMMAND is not found).

In COMMAND, {name} stands for the number of the fd vfiod gave that name:
  legacy backend:   {container}  {group:10}  {device:0000:00:10.0}
  iommufd backend:  {iommufd}  {device:0000:00:10.0}
  no-IOMMU:         {container}  {group:noiommu-0}  {device:0000:00:10.0}
A placeholder the lease has no fd for, or a misspelt one ({iommfd}), is an
error before COMMAND starts. Other braces are left as they are (${VAR}, a
Python f-string's {x}, JSON); {{name}} is a literal {name}.

The lease follows vfioctl's process (owner-pidfd), so it ends if vfioctl is
killed; vfiod raises vfioctl's locked-memory limit to the policy's
max-locked-memory, and COMMAND inherits it. SIGINT, SIGTERM, SIGHUP and
SIGQUIT sent to vfioctl are passed on to COMMAND (a terminal's ^C reaches
both once). The label defaults to COMMAND's name.

Example:
  vfioctl run --device 0000:00:10.0 --backend iommufd --managed -- \\
      qemu-system-x86_64 -object iommufd,id=i0,fd={iommufd} \\
      -device vfio-pci,iommufd=i0,fd={device:0000:00:10.0} ...
"""


def _request_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--backend",
        choices=("legacy", "iommufd"),
        help="legacy VFIO (container, group and device fds) or iommufd (iommufd and "
        "device cdev fds, for QEMU >= 9); default: the policy's",
    )
    p.add_argument(
        "--managed",
        action="store_true",
        help="let vfiod bind the group's devices to vfio-pci (and back afterwards), "
        "where policy allows it",
    )
    p.add_argument(
        "--unsafe-noiommu",
        action="store_true",
        help="consent to a device without an IOMMU: whoever holds its fds can DMA "
        "anywhere in host memory",
    )


def _lease_arguments(p: argparse.ArgumentParser) -> None:
    _request_arguments(p)
    p.add_argument(
        "--no-open-devices",
        dest="open_devices",
        action="store_false",
        help="get group and container (or unbound cdev) fds but no opened device fds, "
        "for VMMs that add the group to KVM first",
    )
    p.add_argument("--label", help="a name for the lease in vfiod's audit log (the VM's name)")
    p.add_argument(
        "--timeout",
        type=_seconds,
        default=ACQUIRE_TIMEOUT,
        metavar="SECONDS",
        help="how long to wait for vfiod to move the devices and grant the lease; past it "
        f"vfiod puts back what it moved (default: {ACQUIRE_TIMEOUT:g})",
    )


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1
    if not 1 <= value <= 3600:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds from 1 to 3600")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Ask vfiod for VFIO devices: see what can be assigned and why, "
        "get devices for a VM, give them back.",
        epilog="Exit status: 0 done; 1 vfiod refused or failed (or, for check, a device "
        "is denied); 2 bad arguments; run: its command's status.",
    )
    p.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = p.add_subparsers(dest="command_name", metavar="COMMAND", required=True)

    cmd = sub.add_parser(
        "list",
        help="devices and IOMMU groups, whether each can be assigned, and leases",
        description="Every PCI device by IOMMU group: driver, viability and what blocks "
        "it, host-critical devices, and the leases vfiod holds.",
    )
    cmd.add_argument("--json", action="store_true", help="machine-readable output")
    cmd.set_defaults(func=cmd_list)

    cmd = sub.add_parser(
        "show",
        help="one device or IOMMU group: why it can or cannot be assigned to you",
        description="One device (PCI address, e.g. 0000:00:10.0 or 00:10.0) or IOMMU "
        "group (e.g. 10 or noiommu-0): its group and what keeps the group from being "
        "viable, host-critical reasons, its lease, vfiod's verdict for you, and what to "
        "do next. The request options ask the verdict for that kind of request.",
    )
    cmd.add_argument("what", metavar="ADDRESS|GROUP")
    cmd.add_argument("--json", action="store_true", help="machine-readable output")
    _request_arguments(cmd)
    cmd.set_defaults(func=cmd_show)

    cmd = sub.add_parser(
        "check",
        help="may you (or --user) have these devices, and why",
        description="Ask vfiod whether it would give you the devices, and why (not): per "
        "device its reason code and reason, what would move to vfio-pci, the group members "
        "the lease would also reach, and the next step. "
        "vfiod answers only for its caller: with --user NAME, vfioctl instead explains "
        "the policy files on this host for that user, as `vfiod check-policy --explain "
        "ADDRESS --user NAME` does (it needs to read /etc/vfiod, and a running vfiod "
        "follows the policy it last loaded). Exit status 0 when every device is allowed, "
        "1 when one is denied.",
    )
    cmd.add_argument("devices", metavar="ADDRESS", nargs="+")
    cmd.add_argument("--json", action="store_true", help="machine-readable output")
    cmd.add_argument("--user", metavar="NAME", help="explain the policy files for this user")
    cmd.add_argument(
        "--root", metavar="DIR", help="with --user: look for etc/vfiod and usr/lib/vfiod under DIR"
    )
    cmd.add_argument("--sysfs", default="/sys", help=argparse.SUPPRESS)
    _request_arguments(cmd)
    cmd.set_defaults(func=cmd_check)

    cmd = sub.add_parser(
        "acquire",
        help="lease devices and hold them until interrupted",
        description="Lease the IOMMU groups of the devices and hold them: vfioctl prints "
        "the lease and its fds, then waits for Ctrl-C, SIGTERM, SIGHUP or (when stdin is "
        "a terminal, pipe or socket) the end of its input, and releases. A lease ends "
        "when the connection that made it closes, so it cannot outlive vfioctl, and its "
        "fds stay in vfioctl: this is for holding devices (bound to vfio-pci, kept from "
        "others) and for trying a request. To hand the fds to a VMM, use `vfioctl run`. "
        "With --json, the grant is one JSON line on stdout, printed before waiting.",
    )
    cmd.add_argument("devices", metavar="ADDRESS", nargs="+")
    cmd.add_argument("--json", action="store_true", help="machine-readable output")
    _lease_arguments(cmd)
    cmd.set_defaults(func=cmd_acquire)

    cmd = sub.add_parser(
        "release",
        help="end a lease",
        description="End a lease by id (as `vfioctl list` shows it): your own, or any as "
        "root. vfiod gives the devices back to their drivers once their fds are closed.",
    )
    cmd.add_argument("lease", metavar="LEASE")
    cmd.set_defaults(func=cmd_release)

    cmd = sub.add_parser(
        "run",
        help="run a command (a VMM) with devices, and give them back when it exits",
        usage=f"{PROG} run --device ADDRESS [--device ADDRESS ...] [options] -- COMMAND [ARG ...]",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=RUN_HELP,
    )
    cmd.add_argument(
        "--device",
        metavar="ADDRESS",
        action="append",
        default=[],
        help="a device to lease (its whole IOMMU group comes with it); repeatable",
    )
    _lease_arguments(cmd)
    cmd.set_defaults(label=None)
    cmd.add_argument("command", metavar="COMMAND", nargs=argparse.REMAINDER)
    cmd.set_defaults(func=cmd_run)

    _add_vm_manager_commands(sub)
    return p


def _add_vm_manager_commands(sub: Any) -> None:
    """attach, detach and libvirt-hook: for VMs that run, and their managers."""
    cmd = sub.add_parser(
        "attach",
        help="lease a device and hot-add it to a running QEMU over QMP",
        description="Lease the device's IOMMU group for a running QEMU (>= 9): the one that "
        "listens on the QMP socket (-qmp unix:PATH,server=on,wait=off), or a libvirt "
        "domain's, reached through libvirt (libvirt >= 8.2) — and hot-add it as vfio-pci "
        "with an iommufd: the fds go to QEMU with getfd, then object-add iommufd and "
        "device_add. The lease follows that QEMU process, so it ends "
        "when QEMU exits, after vfioctl has gone. If QEMU refuses (an id in use, no free "
        "hotplug slot), everything is undone and QEMU's words are shown.",
    )
    _qemu_arguments(cmd)
    cmd.add_argument("--device", metavar="ADDRESS", required=True, help="the host device")
    cmd.add_argument(
        "--id", metavar="NAME", help="QEMU's id for the device (default: vfio-0000_BB_DD_F)"
    )
    cmd.add_argument(
        "--bus", metavar="BUS", help="QEMU's bus for it, e.g. a free pcie-root-port's id"
    )
    cmd.add_argument("--json", action="store_true", help="machine-readable output")
    _request_arguments(cmd)
    cmd.add_argument("--label", help="a name for the lease (default: QEMU's -name)")
    cmd.add_argument(
        "--timeout",
        type=_seconds,
        default=ACQUIRE_TIMEOUT,
        metavar="SECONDS",
        help=f"how long vfiod may take to move the device (default: {ACQUIRE_TIMEOUT:g})",
    )
    cmd.set_defaults(func=cmd_attach)

    cmd = sub.add_parser(
        "detach",
        help="hot-remove a device `attach` added, and release its lease",
        description="Unplug the device from QEMU (device_del), wait for the guest to let "
        "go of it (DEVICE_DELETED), delete its iommufd object and release the lease: vfiod "
        "gives the device back to its driver. A guest that does not let go in time leaves "
        "the device in the VM and the lease in place.",
    )
    _qemu_arguments(cmd)
    cmd.add_argument("--id", metavar="NAME", required=True, help="QEMU's id for the device")
    cmd.add_argument(
        "--timeout",
        type=_seconds,
        default=UNPLUG_TIMEOUT,
        metavar="SECONDS",
        help=f"how long the guest gets to let go (default: {UNPLUG_TIMEOUT:g})",
    )
    cmd.add_argument("--json", action="store_true", help="machine-readable output")
    cmd.set_defaults(func=cmd_detach)

    cmd = sub.add_parser(
        "libvirt-hook",
        help="libvirt's qemu hook: vfiod binds a domain's <hostdev managed='no'>",
        description="Run by libvirt as /etc/libvirt/hooks/qemu (or a script in "
        "/etc/libvirt/hooks/qemu.d/), as root, with the domain XML on stdin. At prepare "
        "begin the domain's PCI hostdevs with managed='no' are leased from vfiod for "
        "libvirt:DOMAIN (the policy decides; vfiod binds them to vfio-pci), held by a "
        "vfioctl acquire of their own; a refusal stops the domain's start with vfiod's "
        "reason. At release end the lease ends and vfiod puts each device back on the "
        "driver it had. Other operations do nothing.",
    )
    cmd.add_argument("domain", metavar="DOMAIN")
    cmd.add_argument("operation", metavar="OPERATION")
    cmd.add_argument("sub_operation", metavar="SUB_OPERATION")
    cmd.add_argument("extra", metavar="EXTRA", nargs="?")
    cmd.add_argument("--run-dir", default="/run/vfioctl-libvirt", help=argparse.SUPPRESS)
    cmd.set_defaults(func=cmd_libvirt_hook)


# The errors a refusal of Acquire's plan comes as.
_PLAN_ERRORS = frozenset(
    ERROR_PREFIX + kind
    for kind in (
        "PermissionDenied",
        "NotViable",
        "Unsafe",
        "HostCritical",
        "InvalidArgument",
        "NotSupported",
    )
)


def _refusal_hint(args: argparse.Namespace, error: VfiodError) -> str | None:
    """After a refused acquire or run, the next step on our command line:
    CheckAccess with the same options finds the same refusal when it came
    from the plan, and its code says what to do."""
    if args.command_name not in ("acquire", "run") or error.name not in _PLAN_ERRORS:
        return None
    options = _request_options(args)
    if not args.open_devices:
        options["open_devices"] = False
    devices = args.devices if args.command_name == "acquire" else args.device
    try:
        with connect() as client:
            accesses = client.check_access(_addresses(devices), **options)
    except VfiodError:
        return None  # no hint, then: the refusal itself is said
    same = (a for a in accesses if not a.allowed and a.reason == error.message)
    return next((advice for a in same if (advice := _advice(a)) is not None), None)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parser().parse_args(argv)
    except SystemExit as e:  # --help, --version, or a usage error argparse printed
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except (UsageError, CommandFailedError, VfiodError) as e:
        print(f"{PROG}: {e.message if isinstance(e, VfiodError) else e}", file=sys.stderr)
        hint = _refusal_hint(args, e) if isinstance(e, VfiodError) else None
        if hint is not None:
            print(f"{PROG}: {hint}", file=sys.stderr)
        return EXIT_USAGE if isinstance(e, UsageError) else EXIT_FAILURE
    except KeyboardInterrupt:
        return 128 + signal.SIGINT
    except BrokenPipeError:  # `vfioctl list | head`
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
