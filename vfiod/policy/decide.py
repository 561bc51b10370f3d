"""Deciding: may this caller have this device, and with what grants.

Order of evaluation (policy/README.md says the same to admins):

1. Rules that match both the caller and the device are found (every selector
   a rule uses must match; a list in a selector means any of).
2. A matching deny rule refuses, whatever allows (the first one in policy
   order is named).
3. Without a matching allow rule, the default is to refuse.
4. Of several matching allow rules, the most specific wins: first one that
   names the device by exact address, then the one with more device
   selectors, then more caller selectors; ties go to the rule read first.
5. The winner must name a host-critical device by exact address; a device
   in a no-IOMMU group needs the daemon setting, the winner's
   ``unsafe-noiommu = true`` and the request's consent; the requested backend
   must be among the winner's backends. Every failed check is a reason; the
   first one is the refusal.

The broker calls this per device per Acquire, so the usual path uses
indexes built once per policy (by caller name, id and wildcard, then per
caller by exact address and vendor) and traces only the rules that matched.
``explain=True`` evaluates every rule without indexes and traces each.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Generic, TypeVar

from vfiod.host.inventory import PciDevice
from vfiod.policy.model import (
    WILDCARD,
    Caller,
    Decision,
    Effect,
    Outcome,
    Policy,
    Refusal,
    Request,
    Rule,
    TraceEntry,
    is_glob,
)

POLICY_DIRECTORY = "/etc/vfiod/policy.d/"
SETTINGS_FILE = "/etc/vfiod/vfiod.toml"
_CACHE_KEY = "decide"
_MAX_CALLER_VIEWS = 256  # callers whose candidate rules are remembered per policy

T = TypeVar("T")


@dataclasses.dataclass(frozen=True, slots=True)
class _Facts:
    """The device as rules see it, formatted once per decision."""

    address: str
    vendor: int
    device: int
    subsystem_vendor: int
    subsystem_device: int
    pci_class: str  # 6 hex digits
    group: str | None
    driver: str  # "none" when unbound

    @classmethod
    def of(cls, device: PciDevice) -> _Facts:
        return cls(
            address=str(device.address),
            vendor=device.vendor,
            device=device.device,
            subsystem_vendor=device.subsystem_vendor,
            subsystem_device=device.subsystem_device,
            pci_class=f"{device.pci_class:06x}",
            group=device.group,
            driver=device.driver or "none",
        )


@dataclasses.dataclass(frozen=True, slots=True)
class _Check(Generic[T]):
    key: str
    test: Callable[[T], bool]
    wanted: str  # what the rule asks for, in words
    actual: Callable[[T], str]  # what the subject has, in words (trace only)


def _glob_regex(patterns: Iterable[str]) -> re.Pattern[str]:
    return re.compile("|".join(fnmatch.translate(p) for p in patterns))


def _listing(values: Iterable[object]) -> str:
    items = [str(v) for v in values]
    return items[0] if len(items) == 1 else "one of " + ", ".join(items)


def _hex_listing(values: Iterable[int]) -> str:
    return _listing(f"{v:04x}" for v in values)


def _device_checks(rule: Rule) -> tuple[_Check[_Facts], ...]:
    checks: list[_Check[_Facts]] = []
    if rule.addresses and WILDCARD not in rule.addresses:
        address = _glob_regex(rule.addresses)
        checks.append(
            _Check(
                "address",
                lambda f: address.match(f.address) is not None,
                _listing(rule.addresses),
                lambda f: f.address,
            )
        )

    def ids(key: str, values: tuple[int, ...], field: Callable[[_Facts], int]) -> None:
        if values:
            wanted = frozenset(values)
            checks.append(
                _Check(
                    key,
                    lambda f: field(f) in wanted,
                    _hex_listing(values),
                    lambda f: f"{field(f):04x}",
                )
            )

    ids("vendor", rule.vendors, lambda f: f.vendor)
    ids("device", rule.devices, lambda f: f.device)
    ids("subsystem-vendor", rule.subsystem_vendors, lambda f: f.subsystem_vendor)
    ids("subsystem-device", rule.subsystem_devices, lambda f: f.subsystem_device)
    if rule.classes:
        prefixes = rule.classes
        checks.append(
            _Check(
                "class",
                lambda f: f.pci_class.startswith(prefixes),
                "a class starting with " + _listing(prefixes),
                lambda f: f.pci_class,
            )
        )
    if rule.iommu_groups:
        groups = frozenset(rule.iommu_groups)
        checks.append(
            _Check(
                "iommu-group",
                lambda f: f.group in groups,
                _listing(rule.iommu_groups),
                lambda f: f.group or "none (no IOMMU)",
            )
        )
    if rule.drivers:
        driver = _glob_regex(rule.drivers)
        checks.append(
            _Check(
                "driver",
                lambda f: driver.match(f.driver) is not None,
                _listing(rule.drivers),
                lambda f: f.driver,
            )
        )
    return tuple(checks)


def _caller_checks(rule: Rule) -> tuple[_Check[Caller], ...]:
    checks: list[_Check[Caller]] = []
    if (rule.users or rule.uids) and WILDCARD not in rule.users:
        users, uids = frozenset(rule.users), frozenset(rule.uids)
        checks.append(
            _Check(
                "users",
                lambda c: c.user in users or c.uid in uids,
                _listing([*rule.users, *(f"uid {u}" for u in rule.uids)]),
                lambda c: f"{c.user or '(no name)'} (uid {c.uid})",
            )
        )
    if (rule.groups or rule.gids) and WILDCARD not in rule.groups:
        groups, gids = frozenset(rule.groups), frozenset(rule.gids)
        checks.append(
            _Check(
                "groups",
                lambda c: not (groups.isdisjoint(c.groups) and gids.isdisjoint(c.gids)),
                "a member of " + _listing([*rule.groups, *(f"gid {g}" for g in rule.gids)]),
                lambda c: "in groups " + (", ".join(c.groups) or "(none)"),
            )
        )
    if rule.units:
        unit = _glob_regex(rule.units)
        checks.append(
            _Check(
                "units",
                lambda c: c.unit is not None and unit.match(c.unit) is not None,
                "running in " + _listing(rule.units),
                lambda c: f"in {c.unit}" if c.unit else "in no systemd unit",
            )
        )
    if rule.slices:
        slice_ = _glob_regex(rule.slices)
        checks.append(
            _Check(
                "slices",
                lambda c: any(slice_.match(s) is not None for s in c.slices),
                "running under " + _listing(rule.slices),
                lambda c: "under " + (", ".join(c.slices) or "no slice"),
            )
        )
    return tuple(checks)


class _Compiled:
    """A rule ready to evaluate. Its checks are compiled on first use: most
    rules of a big policy are for other callers and are never tested."""

    __slots__ = ("_caller_checks", "_device_checks", "_exact", "order", "rule", "score")

    def __init__(self, rule: Rule, order: int) -> None:
        self.rule = rule
        self.order = order  # position in the policy: file name order, then in the file
        self.score = (rule.device_selectors, rule.caller_selectors)
        self._device_checks: tuple[_Check[_Facts], ...] | None = None
        self._caller_checks: tuple[_Check[Caller], ...] | None = None
        self._exact: frozenset[str] | None = None

    @property
    def device_checks(self) -> tuple[_Check[_Facts], ...]:
        if self._device_checks is None:
            self._device_checks = _device_checks(self.rule)
        return self._device_checks

    @property
    def caller_checks(self) -> tuple[_Check[Caller], ...]:
        if self._caller_checks is None:
            self._caller_checks = _caller_checks(self.rule)
        return self._caller_checks

    @property
    def exact(self) -> frozenset[str]:
        """Addresses named without globs, as strings."""
        if self._exact is None:
            self._exact = frozenset(str(a) for a in self.rule.exact_addresses)
        return self._exact

    def matches_device(self, facts: _Facts) -> bool:
        return all(check.test(facts) for check in self.device_checks)

    def matches_caller(self, caller: Caller) -> bool:
        return all(check.test(caller) for check in self.caller_checks)

    def specificity(self, facts: _Facts) -> tuple[bool, int, int, int]:
        """Higher wins; the last element prefers earlier rules on ties."""
        return (facts.address in self.exact, *self.score, -self.order)


_BUS_PREFIX = len("dddd:bb:")


@dataclasses.dataclass(frozen=True, slots=True)
class _CallerView:
    """The rules that apply to one caller, indexed by what they need of a
    device; each rule is in one kind of bucket, so no rule is found twice."""

    by_address: dict[str, tuple[_Compiled, ...]]  # only exact addresses
    by_bus: dict[str, tuple[_Compiled, ...]]  # address globs with a literal "dddd:bb:"
    by_vendor: dict[int, tuple[_Compiled, ...]]
    rest: tuple[_Compiled, ...]
    count: int  # rules that apply to this caller


@dataclasses.dataclass(slots=True)
class _Index:
    compiled: tuple[_Compiled, ...]
    by_user: dict[str, list[_Compiled]]
    by_uid: dict[int, list[_Compiled]]
    by_group: dict[str, list[_Compiled]]
    by_gid: dict[int, list[_Compiled]]
    anyone: list[_Compiled]  # users = ["*"] or groups = ["*"] (and no user names)
    by_pattern: list[_Compiled]  # only units or slices: checked by glob
    views: dict[Caller, _CallerView]
    last: tuple[Caller, _CallerView] | None = None  # the broker asks per device of one caller


def _build_index(policy: Policy) -> _Index:
    compiled = tuple(_Compiled(rule, i) for i, rule in enumerate(policy.rules))
    index = _Index(compiled, {}, {}, {}, {}, [], [], {})
    for item in compiled:
        rule = item.rule
        # File each rule under one caller selector: all selectors must match,
        # so a rule can only apply to callers that its first selector admits.
        if rule.users or rule.uids:
            if WILDCARD in rule.users:
                index.anyone.append(item)
            for user in rule.users:
                index.by_user.setdefault(user, []).append(item)
            for uid in rule.uids:
                index.by_uid.setdefault(uid, []).append(item)
        elif rule.groups or rule.gids:
            if WILDCARD in rule.groups:
                index.anyone.append(item)
            for group in rule.groups:
                index.by_group.setdefault(group, []).append(item)
            for gid in rule.gids:
                index.by_gid.setdefault(gid, []).append(item)
        else:
            index.by_pattern.append(item)
    return index


def _index_of(policy: Policy) -> _Index:
    index = policy.cache.get(_CACHE_KEY)
    if not isinstance(index, _Index):
        index = _build_index(policy)
        policy.cache[_CACHE_KEY] = index
    return index


def _bus_prefixes(addresses: tuple[str, ...]) -> set[str] | None:
    """The literal "dddd:bb:" of every address glob, or None if one has none."""
    prefixes = set()
    for pattern in addresses:
        prefix = pattern[:_BUS_PREFIX]
        if len(prefix) < _BUS_PREFIX or is_glob(prefix):
            return None
        prefixes.add(prefix)
    return prefixes


def _view_of(index: _Index, caller: Caller) -> _CallerView:
    if index.last is not None and index.last[0] is caller:
        return index.last[1]
    view = index.views.get(caller)
    if view is None:
        view = _build_view(index, caller)
        if len(index.views) >= _MAX_CALLER_VIEWS:
            index.views.clear()  # callers come and go; a rebuild is cheap
        index.views[caller] = view
    index.last = (caller, view)
    return view


def _build_view(index: _Index, caller: Caller) -> _CallerView:
    found: dict[int, _Compiled] = {}
    buckets: list[Iterable[_Compiled]] = [index.anyone, index.by_pattern]
    if caller.user is not None:
        buckets.append(index.by_user.get(caller.user, ()))
    buckets.append(index.by_uid.get(caller.uid, ()))
    buckets.extend(index.by_group.get(g, ()) for g in caller.groups)
    buckets.extend(index.by_gid.get(g, ()) for g in caller.gids)
    for bucket in buckets:
        for item in bucket:
            if item.order not in found and item.matches_caller(caller):
                found[item.order] = item
    by_address: dict[str, list[_Compiled]] = {}
    by_bus: dict[str, list[_Compiled]] = {}
    by_vendor: dict[int, list[_Compiled]] = {}
    rest: list[_Compiled] = []
    for item in sorted(found.values(), key=lambda c: c.order):
        rule = item.rule
        addresses = () if WILDCARD in rule.addresses else rule.addresses
        buses = _bus_prefixes(addresses) if addresses else None
        if addresses and not any(is_glob(a) for a in addresses):
            for address in item.exact:
                by_address.setdefault(address, []).append(item)
        elif buses is not None:
            for bus in buses:
                by_bus.setdefault(bus, []).append(item)
        elif rule.vendors:
            for vendor in rule.vendors:
                by_vendor.setdefault(vendor, []).append(item)
        else:
            rest.append(item)
    return _CallerView(
        {k: tuple(v) for k, v in by_address.items()},
        {k: tuple(v) for k, v in by_bus.items()},
        {k: tuple(v) for k, v in by_vendor.items()},
        tuple(rest),
        len(found),
    )


def _matching(
    policy: Policy, caller: Caller, facts: _Facts
) -> tuple[list[_Compiled], tuple[TraceEntry, ...]]:
    """The rules matching caller and device (in policy order), by the indexes,
    and a summary of the rest for the trace."""
    index = _index_of(policy)
    view = _view_of(index, caller)
    address = facts.address
    candidates = (
        view.by_address.get(address, ())
        + view.by_bus.get(address[:_BUS_PREFIX], ())
        + view.by_vendor.get(facts.vendor, ())
        + view.rest
    )
    matched = [c for c in candidates if c.matches_device(facts)]
    if len(matched) > 1:
        matched.sort(key=lambda c: c.order)
    summary = []
    other_callers = len(index.compiled) - view.count
    if other_callers:
        summary.append(
            TraceEntry(
                "",
                "",
                None,
                Outcome.SKIPPED,
                "they do not apply to this caller (other users, groups, units or slices)",
                other_callers,
            )
        )
    other_devices = view.count - len(matched)
    if other_devices:
        summary.append(
            TraceEntry(
                "",
                "",
                None,
                Outcome.SKIPPED,
                "they apply to this caller but not to this device",
                other_devices,
            )
        )
    return matched, tuple(summary)


def _mismatches(checks: Sequence[_Check[T]], subject: T) -> list[str]:
    return [
        f"{check.key}: wants {check.wanted}, has {check.actual(subject)}"
        for check in checks
        if not check.test(subject)
    ]


def _matching_explained(
    policy: Policy, caller: Caller, facts: _Facts
) -> tuple[list[_Compiled], dict[int, str]]:
    """Every rule evaluated, no index: the matches and, per rule, why not."""
    matched = []
    why_not: dict[int, str] = {}
    for item in _index_of(policy).compiled:
        problems = _mismatches(item.caller_checks, caller) + _mismatches(item.device_checks, facts)
        if problems:
            why_not[item.order] = "; ".join(problems)
        else:
            matched.append(item)
    return matched, why_not


def _why_lost(loser: _Compiled, winner: _Compiled, facts: _Facts) -> str:
    w, lost = winner.specificity(facts), loser.specificity(facts)
    name = f"{winner.rule.name!r} ({winner.rule.source})"
    if w[0] != lost[0]:
        return f"matches, but {name} names {facts.address} by exact address and this rule does not"
    if w[1] != lost[1]:
        return (
            f"matches, but {name} is more specific: {w[1]} device selector(s) "
            f"against {lost[1]} here"
        )
    if w[2] != lost[2]:
        return (
            f"matches, but {name} is more specific: {w[2]} caller selector(s) "
            f"against {lost[2]} here"
        )
    return f"matches, as specific as {name}, which comes first in the policy"


def _why_won(winner: _Compiled, facts: _Facts, rivals: int) -> str:
    exact, devices, callers, _ = winner.specificity(facts)
    how = (
        f"names {facts.address} by exact address"
        if exact
        else f"matches {facts.address} by glob or ids"
    )
    text = f"matches and decides: {how}, {devices} device and {callers} caller selector(s)"
    if rivals:
        text += f"; the most specific of {rivals + 1} matching allow rules"
    return text


def _names(rule: Rule) -> str:
    return f"rule {rule.name!r} ({rule.source})"


def decide(
    policy: Policy,
    caller: Caller,
    device: PciDevice,
    request: Request,
    *,
    host_critical: tuple[str, ...] = (),
    noiommu: bool = False,
    explain: bool = False,
) -> Decision:
    """May ``caller`` have ``device`` as ``request`` asks? ``host_critical``
    are the reasons the device is host-critical (empty if it is not);
    ``noiommu`` says its group is an unsafe no-IOMMU group. ``explain``
    traces every rule (slower: no indexes)."""
    facts = _Facts.of(device)
    if explain:
        matched, why_not = _matching_explained(policy, caller, facts)
        summary: tuple[TraceEntry, ...] = ()
    else:
        matched, summary = _matching(policy, caller, facts)
        why_not = {}
    denies = [m for m in matched if m.rule.effect is Effect.DENY]
    allows = [m for m in matched if m.rule.effect is Effect.ALLOW]
    winner: _Compiled | None = None
    if denies:
        winner = denies[0]
    elif len(allows) == 1:
        winner = allows[0]
    elif allows:
        winner = max(allows, key=lambda m: m.specificity(facts))

    trace: list[TraceEntry] = list(summary)
    matched_orders = {m.order for m in matched}
    for item in _index_of(policy).compiled if explain else matched:
        rule = item.rule
        if item.order not in matched_orders:
            outcome, detail = Outcome.NOT_MATCHED, why_not[item.order]
        elif item is winner:
            outcome = Outcome.WON
            detail = (
                "matches and decides: deny rules win over allow rules"
                if rule.effect is Effect.DENY
                else _why_won(item, facts, len(allows) - 1)
            )
        elif winner is not None and winner.rule.effect is Effect.DENY:
            detail = (
                f"matches too; {_names(winner.rule)} came first"
                if rule.effect is Effect.DENY
                else f"matches, but deny {_names(winner.rule)} matches too and deny rules win"
            )
            outcome = Outcome.MATCHED
        else:
            assert winner is not None
            outcome, detail = Outcome.MATCHED, _why_lost(item, winner, facts)
        trace.append(TraceEntry(rule.name, rule.source, rule.effect, outcome, detail))

    return _verdict(
        policy, caller, device, facts, request, winner, host_critical, noiommu, tuple(trace)
    )


def _verdict(
    policy: Policy,
    caller: Caller,
    device: PciDevice,
    facts: _Facts,
    request: Request,
    winner: _Compiled | None,
    host_critical: tuple[str, ...],
    noiommu: bool,
    trace: tuple[TraceEntry, ...],
) -> Decision:
    address = facts.address
    what = (
        f"{address} ({device.ids} {device.class_name})"
        if winner is None or (winner.rule.effect is Effect.DENY)
        else address
    )
    if winner is not None and winner.rule.effect is Effect.DENY:
        return Decision(
            allowed=False,
            rule=winner.rule,
            grants=None,
            reasons=(
                f"{what} is denied to {caller.describe()} by deny {_names(winner.rule)}; "
                "deny rules win over allow rules: ask an admin to change that rule if "
                "this device should be yours.",
            ),
            trace=trace,
            refusal=Refusal.DENY_RULE,
        )

    failures: list[tuple[Refusal, str]] = []
    if winner is None:
        who = caller.user or str(caller.uid)
        failures.append(
            (
                Refusal.NO_RULE,
                f"No policy rule allows {caller.describe()} to use {what}, and policy denies "
                f"by default: ask an admin to add an allow rule in {POLICY_DIRECTORY} "
                f"(`vfiod check-policy --explain {address} --user {who}` shows why none "
                "matches).",
            )
        )
    rule = winner.rule if winner is not None else None
    if host_critical and (winner is None or address not in winner.exact):
        text = (
            f"{address} is host-critical ({'; '.join(host_critical)}): only a rule naming it "
            f'by exact address (address = "{address}") may hand it out'
        )
        if rule is not None:
            text += (
                f", and {_names(rule)} matches it by glob or ids. Move what uses it off the "
                "device first, then ask an admin for such a rule"
            )
        failures.append((Refusal.HOST_CRITICAL, text + "."))
    if noiommu:
        failures.extend(
            (Refusal.UNSAFE_NOIOMMU, text)
            for text in _noiommu_missing(policy, address, rule, request)
        )
    backend = request.backend or policy.settings.default_backend
    if rule is not None and backend not in rule.grants.backends:
        failures.append(
            (
                Refusal.BACKEND,
                f"Rule {rule.name!r} ({rule.source}) allows {address} only with backend "
                f"{' or '.join(rule.grants.backends)}, not {backend}: ask for that backend, or "
                f"ask an admin to add {backend!r} to the rule's backends.",
            )
        )

    if failures:
        return Decision(
            allowed=False,
            rule=rule,
            grants=None,
            reasons=tuple(text for _, text in failures),
            trace=trace,
            refusal=failures[0][0],
        )
    assert rule is not None
    reasons = [f"Allowed by {_names(rule)}."]
    if request.managed and not rule.grants.managed:
        reasons.append(
            "The rule does not let vfiod rebind the device (no managed = true): bind it to "
            "vfio-pci yourself."
        )
    return Decision(
        allowed=True,
        rule=rule,
        grants=rule.grants,
        reasons=tuple(reasons),
        trace=trace,
        refusal=None,
    )


def _noiommu_missing(
    policy: Policy, address: str, rule: Rule | None, request: Request
) -> list[str]:
    """The missing pieces of the three no-IOMMU needs, each in words."""
    missing = []
    if not policy.settings.allow_unsafe_noiommu:
        missing.append(
            f"the daemon setting allow-unsafe-noiommu = true in {SETTINGS_FILE} (an admin's "
            "choice; it is off)"
        )
    if rule is None or not rule.grants.unsafe_noiommu:
        missing.append(
            "a matching allow rule with unsafe-noiommu = true"
            + (f" ({_names(rule)} does not grant it)" if rule is not None else "")
        )
    if not request.unsafe_noiommu:
        missing.append("your own consent: ask with the option unsafe-noiommu = true")
    if not missing:
        return []
    return [
        f"{address} is in an unsafe no-IOMMU group (it can DMA to all of the host's memory) "
        f"and needs three things; missing: {missing[0]}.",
        *(f"Missing: {text}." for text in missing[1:]),
    ]


def format_decision(decision: Decision) -> str:
    """The decision and its trace, for people."""
    lines = [
        "ALLOWED" if decision.allowed else f"DENIED ({decision.refusal})",
        *(f"  {reason}" for reason in decision.reasons),
    ]
    if decision.grants is not None:
        g = decision.grants
        memory = "unlimited" if g.max_locked_memory is None else f"{g.max_locked_memory} bytes"
        lines.append(
            f"  grants: managed={str(g.managed).lower()} companions={str(g.companions).lower()} "
            f"unsafe-noiommu={str(g.unsafe_noiommu).lower()} backends={','.join(g.backends)} "
            f"max-leases={g.max_leases if g.max_leases is not None else 'unlimited'} "
            f"max-locked-memory={memory} restore-driver={str(g.restore_driver).lower()}"
        )
    lines.append("trace:")
    lines.extend(f"  {entry}" for entry in decision.trace)
    if not decision.trace:
        lines.append("  (no rules)")
    return "\n".join(lines)
