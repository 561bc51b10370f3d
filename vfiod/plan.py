"""What an Acquire would do, decided before anything changes: which devices
the lease would let the caller reach, which of them must move to vfio-pci,
and, if it cannot be granted, the one reason why. CheckAccess and Acquire
both answer from this plan, so they cannot disagree.

A lease covers whole IOMMU groups, and a group fd opens the device fd of
every member on vfio-pci. So every member that is on vfio-pci, or would be
moved there, is *reachable*, and each must pass this caller's policy:

* a requested device by its own allow rule;
* a companion (a member not asked for) by its own allow rule, or by
  ``companions = true`` in the rule that allowed a requested device of its
  group, when no rule matches the companion itself;
* a deny rule matching any reachable member refuses the lease, whatever
  allows it; so does a host-critical member that no rule names by address.

Moving a member needs the caller's ``managed`` option and ``managed = true``
in the rule that lets it be reached; moving a companion also needs
``companions = true``. An SR-IOV PF with enabled VFs is never moved:
unbinding it from its driver destroys the VFs (and waits forever on any VF a
VMM still holds).

Every refusal carries its reason code (vfiod.reasons) and the member that
refuses, so CheckAccess answers programs without words to parse.

Pure: data in, plan out. The broker does the I/O (resolving addresses,
scanning host-critical devices) before and the binding after.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from vfiod.errors import (
    BrokerError,
    HostCritical,
    InvalidArgument,
    NotViable,
    PermissionDenied,
    Unsafe,
)
from vfiod.host.binding import CriticalDevices, critical_refusal, needs_binding
from vfiod.host.inventory import IommuGroup, PciDevice, is_vfio_driver
from vfiod.pci import PciAddress
from vfiod.policy.decide import decide
from vfiod.policy.model import Caller, Decision, Policy, Refusal, Request, Rule
from vfiod.reasons import Reason


@dataclasses.dataclass(frozen=True)
class Target:
    """A requested device and its IOMMU group; ``group`` None: the device
    has none, and unsafe no-IOMMU mode would give it one of its own."""

    device: PciDevice
    group: IommuGroup | None


@dataclasses.dataclass(frozen=True)
class Member:
    """A device the lease would let the caller reach."""

    device: PciDevice
    requested: bool
    moves: bool  # must go to vfio-pci first
    decision: Decision  # this caller's own decision for it
    via: Rule | None  # the rule that lets the lease reach it; None when refused


@dataclasses.dataclass(frozen=True)
class GroupPlan:
    """One group of the lease (or one device without a group)."""

    group: IommuGroup | None
    requested: tuple[PciAddress, ...]
    decisions: Mapping[PciAddress, Decision]  # of the requested devices
    members: tuple[Member, ...]  # the reachable ones
    refusal: BrokerError | None

    @property
    def name(self) -> str:
        if self.group is not None:
            return f"IOMMU group {self.group.id}"
        return str(self.requested[0])

    @property
    def moving(self) -> tuple[PciAddress, ...]:
        return tuple(m.device.address for m in self.members if m.moves)

    @property
    def companions(self) -> tuple[PciAddress, ...]:
        """The members the lease would reach that were not asked for."""
        return tuple(m.device.address for m in self.members if not m.requested)


@dataclasses.dataclass(frozen=True)
class Plan:
    groups: tuple[GroupPlan, ...]

    @property
    def decisions(self) -> dict[PciAddress, Decision]:
        """This caller's decisions on the requested devices."""
        return {a: d for g in self.groups for a, d in g.decisions.items()}

    @property
    def refusal(self) -> BrokerError | None:
        return next((g.refusal for g in self.groups if g.refusal is not None), None)

    @property
    def moving(self) -> tuple[PciAddress, ...]:
        return tuple(a for g in self.groups for a in g.moving)

    @property
    def allow_critical(self) -> frozenset[PciAddress]:
        """Moving members whose host-critical use the plan found authorised."""
        return frozenset(
            m.device.address
            for g in self.groups
            if g.refusal is None
            for m in g.members
            if m.moves and m.via is not None and m.device.address in m.via.exact_addresses
        )

    @property
    def rules(self) -> tuple[Rule, ...]:
        """The allow rules a lease from this plan is held under: those that
        allowed the requested devices, then those that let it reach the rest."""
        found: dict[str, Rule] = {}
        for group_plan in self.groups:
            for decision in group_plan.decisions.values():
                if decision.allowed and decision.rule is not None:
                    found.setdefault(decision.rule.name, decision.rule)
        for group_plan in self.groups:
            for member in group_plan.members:
                if member.via is not None:
                    found.setdefault(member.via.name, member.via)
        return tuple(found.values())

    @property
    def reachable(self) -> tuple[PciAddress, ...]:
        return tuple(m.device.address for g in self.groups for m in g.members)

    def group_of(self, address: PciAddress) -> GroupPlan:
        return next(g for g in self.groups if address in g.requested)


BRIDGE_CLASS = 0x06  # PCI base class of host, PCI and other bridges


def refusal_error(
    decision: Decision,
    device: PciDevice,
    policy: Policy,
    request: Request,
    *,
    companion: bool = False,
    prefix: str = "",
) -> BrokerError:
    """The error a refused decision on ``device`` is answered with."""
    assert decision.refusal is not None, "a refused decision says why"
    text = prefix + (" ".join(decision.reasons) or "denied by policy")
    rule = decision.rule
    code = Reason.COMPANION_DENIED if companion else _REFUSAL_CODES[decision.refusal]
    backends: tuple[str, ...] = ()
    if code is Reason.BACKEND and rule is not None:
        backends = rule.grants.backends
    if (
        code is Reason.UNSAFE_NOT_ALLOWED
        and policy.settings.allow_unsafe_noiommu
        and rule is not None
        and rule.grants.unsafe_noiommu
        and not request.unsafe_noiommu
    ):
        code = Reason.UNSAFE_CONSENT  # what is missing is the caller's to give
    error_class: type[BrokerError] = PermissionDenied
    if decision.refusal is Refusal.HOST_CRITICAL:
        error_class = HostCritical
    elif decision.refusal is Refusal.UNSAFE_NOIOMMU:
        error_class = Unsafe
    return error_class(text, code=code, blocker=device.address, backends=backends)


_REFUSAL_CODES = {
    Refusal.NO_RULE: Reason.NO_RULE,
    Refusal.DENY_RULE: Reason.DENY_RULE,
    Refusal.HOST_CRITICAL: Reason.HOST_CRITICAL,
    Refusal.UNSAFE_NOIOMMU: Reason.UNSAFE_NOT_ALLOWED,
    Refusal.BACKEND: Reason.BACKEND,
}


def reachable(device: PciDevice) -> bool:
    """Would a lease on its group reach it: is it on vfio-pci, or would it
    have to move there? (Bridges on pcieport and unbound members have no
    device fd.)"""
    return is_vfio_driver(device.driver) or needs_binding(device)


def plan(
    policy: Policy,
    caller: Caller,
    request: Request,
    targets: Sequence[Target],
    *,
    managed: bool,
    critical: CriticalDevices,
) -> Plan:
    """The plan for ``caller`` asking for ``targets`` with ``request``."""
    by_group: dict[str, list[Target]] = {}
    for target in targets:
        key = target.group.id if target.group is not None else f"noiommu:{target.device.address}"
        by_group.setdefault(key, []).append(target)
    return Plan(
        tuple(
            _plan_group(policy, caller, request, members, managed, critical)
            for members in by_group.values()
        )
    )


def _decide(
    policy: Policy,
    caller: Caller,
    request: Request,
    device: PciDevice,
    group: IommuGroup | None,
    critical: CriticalDevices,
) -> Decision:
    return decide(
        policy,
        caller,
        device,
        request,
        host_critical=critical.get(device.address, ()),
        noiommu=group is None or group.noiommu,
    )


def _plan_group(
    policy: Policy,
    caller: Caller,
    request: Request,
    targets: Sequence[Target],
    managed: bool,
    critical: CriticalDevices,
) -> GroupPlan:
    group = targets[0].group
    requested = tuple(t.device.address for t in targets)
    # A device without an IOMMU group is a group of one once vfio-pci takes it.
    candidates = group.devices if group is not None else (targets[0].device,)
    decided = {
        d.address: _decide(policy, caller, request, d, group, critical)
        for d in candidates
        if reachable(d) or d.address in requested
    }
    requesting = [
        decision.rule
        for address in requested
        if (decision := decided[address]).allowed and decision.rule is not None
    ]
    carrying = next((rule for rule in requesting if rule.grants.companions), None)

    members = []
    refusal: BrokerError | None = None
    for target in targets:  # the caller's own requests decide first
        if not decided[target.device.address].allowed and refusal is None:
            refusal = refusal_error(decided[target.device.address], target.device, policy, request)
    for target in targets:
        if refusal is None and target.device.pci_class >> 16 == BRIDGE_CLASS:
            refusal = InvalidArgument(
                f"{_describe(target.device)} is a bridge, which vfio-pci does not take: ask "
                "for the devices behind it",
                code=Reason.BRIDGE,
                blocker=target.device.address,
            )
    for device in candidates:
        is_requested = device.address in requested
        if not (reachable(device) or is_requested) and group is not None:
            continue
        decision = decided[device.address]
        via: Rule | None = decision.rule if decision.allowed else None
        if not is_requested and via is None:
            if decision.refusal is Refusal.NO_RULE and carrying is not None:
                via = carrying
            elif refusal is None:
                refusal = _companion_refusal(group, device, decision, carrying, policy, request)
        members.append(
            Member(
                device=device,
                requested=is_requested,
                # A requested device needs a device fd: unbound or on pci-stub, it moves too.
                moves=needs_binding(device) or not is_vfio_driver(device.driver),
                decision=decision,
                via=via,
            )
        )
    if refusal is None:
        refusal = _move_refusal(group, targets[0].device, members, managed, carrying, critical)
    if refusal is None:
        refusal = _reset_refusal(group, members)
    return GroupPlan(group, requested, {a: decided[a] for a in requested}, tuple(members), refusal)


def _reset_refusal(group: IommuGroup | None, members: Sequence[Member]) -> BrokerError | None:
    """A rule with require-reset = true lets the lease reach a member the
    kernel cannot reset: the next tenant would get what this one left in it."""
    requiring = next(
        (m.via for m in members if m.via is not None and m.via.grants.require_reset), None
    )
    if requiring is None:
        return None
    blocker = next((m.device for m in members if not m.device.reset_methods), None)
    if blocker is None:
        return None
    where = f" (IOMMU group {group.id})" if group is not None and len(members) > 1 else ""
    return PermissionDenied(
        f"{_describe(blocker)}{where} has no reset method the kernel can use (its "
        "reset_method in sysfs is empty), so what one tenant leaves in it would reach the "
        f"next, and rule {requiring.name!r} says require-reset = true; ask for a device "
        "that can be reset (`vfioctl show` says which methods each has)",
        code=Reason.NO_RESET,
        blocker=blocker.address,
    )


def _describe(device: PciDevice) -> str:
    return f"{device.address} ({device.class_name}, {device.driver or 'no driver'})"


def _companion_refusal(
    group: IommuGroup | None,
    device: PciDevice,
    decision: Decision,
    carrying: Rule | None,
    policy: Policy,
    request: Request,
) -> BrokerError:
    """A member the caller did not ask for, which the lease would reach,
    and which policy does not let this caller have."""
    holds = (
        f"IOMMU group {group.id if group else '-'} also holds {_describe(device)}, which the "
        "lease would let you open: "
    )
    if decision.refusal is Refusal.NO_RULE:
        assert carrying is None
        return PermissionDenied(
            holds + "no policy rule lets you have it, and the rule that allows what you asked "
            "for does not say companions = true; ask an admin for either",
            code=Reason.COMPANION_NOT_ALLOWED,
            blocker=device.address,
        )
    return refusal_error(decision, device, policy, request, companion=True, prefix=holds)


def _move_refusal(
    group: IommuGroup | None,
    device: PciDevice,
    members: Sequence[Member],
    managed: bool,
    carrying: Rule | None,
    critical: CriticalDevices,
) -> BrokerError | None:
    """Why the members that must move to vfio-pci cannot, or None."""
    moving = [m for m in members if m.moves]
    if not moving:
        return None
    if group is None:
        what = f"{device.address} has no IOMMU group"
        fix = "bind it to vfio-pci in unsafe no-IOMMU mode"
    elif group.viable:
        what = ", ".join(_describe(m.device) for m in moving) + " must be on vfio-pci first"
        fix = "bind it to vfio-pci"
    else:
        what = f"IOMMU group {group.id} is not viable: " + "; ".join(
            b.reason for b in group.blockers()
        )
        fix = "bind it to vfio-pci"
    if not managed:
        return NotViable(
            f"{what}. Ask with managed=true to let vfiod {fix}",
            code=Reason.NEEDS_MANAGED,
            blocker=moving[0].device.address,
        )
    unmanaged = [m for m in moving if m.via is None or not m.via.grants.managed]
    if unmanaged:
        return PermissionDenied(
            f"{what}, and policy does not let vfiod rebind it for you (no 'managed = "
            "true' in the matching rule); bind it to vfio-pci yourself, or ask an admin",
            code=Reason.MANAGED_NOT_ALLOWED,
            blocker=unmanaged[0].device.address,
        )
    companions = [m.device.address for m in moving if not m.requested]
    if companions and carrying is None:
        return PermissionDenied(
            f"IOMMU group {group.id if group else '-'} also holds "
            + ", ".join(str(a) for a in companions)
            + ", which would have to move to vfio-pci too, and policy does not allow "
            "that ('companions = true' missing in the matching rule); name them in the "
            "request, or ask an admin",
            code=Reason.COMPANIONS_CANNOT_MOVE,
            blocker=companions[0],
        )
    pfs = [m.device for m in moving if m.device.virtfns]
    if pfs:
        pf = pfs[0]
        return PermissionDenied(
            f"{pf.address} is an SR-IOV physical function with {len(pf.virtfns)} enabled "
            f"virtual function(s) ({', '.join(str(v) for v in pf.virtfns)}); taking it from "
            f"{pf.driver} would destroy them, so vfiod never does. Disable them first "
            f"(echo 0 > /sys/bus/pci/devices/{pf.address}/sriov_numvfs), or bind it to "
            "vfio-pci yourself",
            code=Reason.PF_WITH_VFS,
            blocker=pf.address,
        )
    allowed = {
        m.device.address
        for m in moving
        if m.via is not None and m.device.address in m.via.exact_addresses
    }
    addresses = [m.device.address for m in moving]
    text = critical_refusal(addresses, allowed, critical)
    blocker = next((a for a in addresses if a in critical and a not in allowed), None)
    return None if text is None else HostCritical(text, code=Reason.HOST_CRITICAL, blocker=blocker)
