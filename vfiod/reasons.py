"""Reason codes: why CheckAccess allows a device or not, for programs (the
reason text says it for people). Each refusal the plan and the broker's
request checks can make has one, set where the error is built
(``BrokerError.code``), so CheckAccess and vfioctl never read English.

A code keeps its meaning; new codes may appear later: a client treats one it
does not know as a refusal whose text says what to do.
"""

from __future__ import annotations

import enum


class Reason(enum.StrEnum):
    # Granted: Acquire with these options would lease it now.
    ALLOWED = "allowed"
    # Allowed, but its group is leased (or being prepared for another
    # request) now: Acquire answers Busy until that ends.
    BUSY = "busy"

    # The caller's policy for a requested device (PermissionDenied, Unsafe,
    # HostCritical).
    NO_RULE = "no-rule"  # no allow rule matches it
    DENY_RULE = "deny-rule"  # a deny rule matches it
    BACKEND = "backend"  # not with this backend: ask with one of ``backends``
    UNSAFE_CONSENT = "unsafe-consent"  # no-IOMMU: only the caller's unsafe-noiommu is missing
    UNSAFE_NOT_ALLOWED = "unsafe-not-allowed"  # no-IOMMU: the admin's setting or rule is missing
    HOST_CRITICAL = "host-critical"  # the host needs it; only a rule naming its address may
    BRIDGE = "bridge"  # vfio-pci does not take bridges (InvalidArgument)

    # Members of the group the caller did not ask for (companions).
    COMPANION_DENIED = "companion-denied"  # policy refuses it to the caller
    COMPANION_NOT_ALLOWED = "companion-not-allowed"  # no rule, and no companions = true

    # Members that must move to vfio-pci first (``move``).
    NEEDS_MANAGED = "needs-managed"  # the caller did not ask with managed (NotViable)
    MANAGED_NOT_ALLOWED = "managed-not-allowed"  # the rule has no managed = true
    COMPANIONS_CANNOT_MOVE = "companions-cannot-move"  # the rule has no companions = true
    PF_WITH_VFS = "pf-with-vfs"  # an SR-IOV PF with enabled VFs: never moved
    NO_RESET = "no-reset"  # the rule says require-reset, and the kernel cannot reset it
    POLKIT = "polkit"  # polkit (enabled in vfiod.toml) did not authorize it

    # The request as a whole.
    MAX_LEASES = "max-leases"  # the rule's max-leases are held
    TOO_MANY_FDS = "too-many-fds"  # more fds than one reply carries
    OWNER_PIDFD = "owner-pidfd"  # not a pidfd, or of another uid

    # The address itself.
    INVALID_ADDRESS = "invalid-address"
    NOT_FOUND = "not-found"
    NO_IOMMU_GROUP = "no-iommu-group"  # and the kernel has no unsafe no-IOMMU mode
