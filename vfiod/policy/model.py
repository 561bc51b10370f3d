"""The policy as data: rules, grants, settings, and the decisions made from them.

Everything here is a frozen dataclass or a StrEnum. The loader
(vfiod.policy.load) builds these from TOML; vfiod.policy.decide evaluates
them. A rule's selectors are stored normalised (lower-case hex, full PCI
addresses) so matching never has to parse.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
from typing import Any

from vfiod.pci import AddressError, PciAddress

BACKENDS = ("legacy", "iommufd")
DEFAULT_DMA_LIMIT = 2**30  # 1 GiB
GLOB_CHARACTERS = frozenset("*?[")
WILDCARD = "*"


class Effect(enum.StrEnum):
    ALLOW = "allow"
    DENY = "deny"


class Refusal(enum.StrEnum):
    """Why a decision refused; the broker maps each to a D-Bus error class."""

    NO_RULE = "no-rule"  # PermissionDenied
    DENY_RULE = "deny-rule"  # PermissionDenied
    HOST_CRITICAL = "host-critical"  # HostCritical
    UNSAFE_NOIOMMU = "unsafe-noiommu"  # Unsafe
    BACKEND = "backend"  # PermissionDenied


class Outcome(enum.StrEnum):
    """What happened to one rule during a decision."""

    WON = "won"  # the rule that decided
    MATCHED = "matched"  # matched, but another rule decided
    NOT_MATCHED = "not-matched"
    SKIPPED = "skipped"  # summary of rules an index ruled out without evaluating them


@dataclasses.dataclass(frozen=True)
class Caller:
    """Who calls, from the bus's credentials (names resolved by the caller of
    decide). Root is not special: uid 0 needs a rule like anyone."""

    uid: int
    user: str | None
    gids: tuple[int, ...]
    groups: tuple[str, ...]
    unit: str | None  # "vm-win10.service", "machine-qemu\\x2d1.scope"
    slices: tuple[str, ...]  # ("machine.slice",)

    def describe(self) -> str:
        who = f"user {self.user} (uid {self.uid})" if self.user else f"uid {self.uid}"
        if self.unit:
            who += f" in {self.unit}"
        return who


@dataclasses.dataclass(frozen=True)
class Request:
    """What the caller asks for. ``backend`` None means the policy's default
    backend (the broker normally resolves it before calling decide)."""

    backend: str | None = None
    managed: bool = False
    unsafe_noiommu: bool = False  # the caller's own consent


@dataclasses.dataclass(frozen=True)
class Grants:
    """What an allow rule grants; the defaults are what a rule gets for keys it omits."""

    managed: bool = False
    companions: bool = False
    unsafe_noiommu: bool = False
    backends: tuple[str, ...] = BACKENDS
    max_leases: int | None = None  # None: unlimited
    max_locked_memory: int | None = None  # bytes; None: leave RLIMIT_MEMLOCK alone
    restore_driver: bool = True
    require_reset: bool = False  # refuse devices the kernel cannot reset

    def to_json(self) -> dict[str, Any]:
        return {
            "managed": self.managed,
            "companions": self.companions,
            "unsafe-noiommu": self.unsafe_noiommu,
            "backends": list(self.backends),
            "max-leases": self.max_leases,
            "max-locked-memory": self.max_locked_memory,
            "restore-driver": self.restore_driver,
            "require-reset": self.require_reset,
        }


def is_glob(pattern: str) -> bool:
    return not GLOB_CHARACTERS.isdisjoint(pattern)


@dataclasses.dataclass(frozen=True)
class Rule:
    """One ``[[rule]]``. Each selector is a tuple meaning "any of"; an empty
    tuple means the rule does not use that selector. A device (or caller)
    matches when every selector the rule uses matches."""

    name: str
    effect: Effect
    source: str  # "path:line" of the [[rule]] header
    # Device selectors.
    addresses: tuple[str, ...] = ()  # fnmatch globs over "dddd:bb:dd.f", lower-case
    vendors: tuple[int, ...] = ()
    devices: tuple[int, ...] = ()
    subsystem_vendors: tuple[int, ...] = ()
    subsystem_devices: tuple[int, ...] = ()
    classes: tuple[str, ...] = ()  # hex prefixes of the 6-digit class code
    iommu_groups: tuple[str, ...] = ()
    drivers: tuple[str, ...] = ()  # globs over the current driver, "none" when unbound
    # Caller selectors.
    users: tuple[str, ...] = ()  # names, or "*" for everyone
    uids: tuple[int, ...] = ()
    groups: tuple[str, ...] = ()  # names, or "*"
    gids: tuple[int, ...] = ()
    units: tuple[str, ...] = ()  # globs over the caller's systemd unit
    slices: tuple[str, ...] = ()  # globs over the caller's slices
    grants: Grants = Grants()
    comment: str | None = None

    @functools.cached_property
    def exact_addresses(self) -> frozenset[PciAddress]:
        """Addresses named without glob characters: only these may open a
        host-critical device."""
        exact = set()
        for pattern in self.addresses:
            if is_glob(pattern):
                continue
            try:
                exact.add(PciAddress.parse(pattern))
            except AddressError:
                continue  # the loader never lets one through; a hand-built rule might
        return frozenset(exact)

    @property
    def caller_selectors(self) -> int:
        """How many caller selectors narrow the rule ("*" does not)."""
        return (
            bool(self.uids or (self.users and WILDCARD not in self.users))
            + bool(self.gids or (self.groups and WILDCARD not in self.groups))
            + bool(self.units)
            + bool(self.slices)
        )

    @property
    def device_selectors(self) -> int:
        """How many device selectors narrow the rule (address "*" does not)."""
        return (
            bool(self.addresses and WILDCARD not in self.addresses)
            + bool(self.vendors)
            + bool(self.devices)
            + bool(self.subsystem_vendors)
            + bool(self.subsystem_devices)
            + bool(self.classes)
            + bool(self.iommu_groups)
            + bool(self.drivers)
        )

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"name": self.name, "effect": str(self.effect)}
        data["source"] = self.source
        for key, value in (
            ("address", list(self.addresses)),
            ("vendor", [f"{v:04x}" for v in self.vendors]),
            ("device", [f"{v:04x}" for v in self.devices]),
            ("subsystem-vendor", [f"{v:04x}" for v in self.subsystem_vendors]),
            ("subsystem-device", [f"{v:04x}" for v in self.subsystem_devices]),
            ("class", list(self.classes)),
            ("iommu-group", list(self.iommu_groups)),
            ("driver", list(self.drivers)),
            ("users", [*self.users, *self.uids]),
            ("groups", [*self.groups, *self.gids]),
            ("units", list(self.units)),
            ("slices", list(self.slices)),
        ):
            if value:
                data[key] = value
        if self.effect is Effect.ALLOW:
            data["grants"] = self.grants.to_json()
        if self.comment:
            data["comment"] = self.comment
        return data


@dataclasses.dataclass(frozen=True)
class Settings:
    """Daemon settings from vfiod.toml."""

    allow_unsafe_noiommu: bool = False
    default_backend: str = "legacy"
    # Bytes MapDma may pin (in vfiod itself) for one lease whose rule sets no
    # max-locked-memory: without it such a rule would mean unlimited pinning.
    dma_limit: int = DEFAULT_DMA_LIMIT
    # Each grant also needs polkit's yes (org.vfiod1.acquire...): narrows only.
    polkit: bool = False


@dataclasses.dataclass(frozen=True)
class Reservation:
    """One ``[[reserve]]``: devices, by exact address, that vfio-pci owns
    from the moment they appear (boot or hotplug), before any native driver."""

    name: str
    source: str  # "path:line" of the [[reserve]] header
    addresses: tuple[PciAddress, ...]
    comment: str | None = None

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "name": self.name,
            "source": self.source,
            "address": [str(a) for a in self.addresses],
        }
        if self.comment:
            data["comment"] = self.comment
        return data


@dataclasses.dataclass(frozen=True)
class Policy:
    """Settings and rules in the order they were read (file name order, then
    position in the file). The empty Policy() denies everything."""

    settings: Settings = Settings()
    rules: tuple[Rule, ...] = ()
    files: tuple[str, ...] = ()
    reservations: tuple[Reservation, ...] = ()
    # Indexes vfiod.policy.decide builds on first use; not part of the value.
    cache: dict[str, Any] = dataclasses.field(
        default_factory=dict, init=False, repr=False, compare=False, hash=False
    )

    @functools.cached_property
    def reserved(self) -> dict[PciAddress, Reservation]:
        """The reservation of each reserved address."""
        return {a: r for r in self.reservations for a in r.addresses}


@dataclasses.dataclass(frozen=True)
class TraceEntry:
    """One line of a decision's trace: a rule and why it matched or not, or
    (outcome SKIPPED) a count of rules an index ruled out."""

    rule: str  # rule name; "" for a summary line
    source: str  # "path:line"; "" for a summary line
    effect: Effect | None
    outcome: Outcome
    detail: str
    count: int = 1

    def __str__(self) -> str:
        if self.outcome is Outcome.SKIPPED:
            return f"{self.count} rule(s) skipped: {self.detail}"
        return f"{self.outcome:<11} {self.effect} {self.rule!r} ({self.source}): {self.detail}"

    def to_json(self) -> dict[str, Any]:
        return {
            "rule": self.rule or None,
            "source": self.source or None,
            "effect": str(self.effect) if self.effect else None,
            "outcome": str(self.outcome),
            "detail": self.detail,
            "count": self.count,
        }


@dataclasses.dataclass(frozen=True)
class Decision:
    """The answer for one device. ``reasons`` are sentences for the caller (in
    an error reply); ``trace`` is for admins (check-policy --explain)."""

    allowed: bool
    rule: Rule | None  # the rule that decided: the winning allow rule or the deny rule
    grants: Grants | None  # set when allowed
    reasons: tuple[str, ...]
    trace: tuple[TraceEntry, ...]
    refusal: Refusal | None  # set when refused

    def to_json(self) -> dict[str, Any]:
        return {
            "allowed": self.allowed,
            "refusal": str(self.refusal) if self.refusal else None,
            "rule": self.rule.to_json() if self.rule else None,
            "grants": self.grants.to_json() if self.grants else None,
            "reasons": list(self.reasons),
            "trace": [entry.to_json() for entry in self.trace],
        }
