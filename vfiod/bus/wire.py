"""Inputs from the wire, read through checked getters: a known key, the right
type, or a clear InvalidArgument naming both. sdbus hands an a{sv} over as
{key: (signature, value)}.

An fd among the options is borrowed: the method that received the call
closes every fd it carried, wherever it sits, once the call is done
(vfiod.bus.checked); whoever keeps one (the broker) keeps a dup."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from vfiod.broker import DEFAULT_TIMEOUT, AcquireOptions, Backend
from vfiod.errors import InvalidArgument

Variants = Mapping[str, tuple[str, Any]]

# Bounds of Acquire's timeout option, in milliseconds.
MIN_TIMEOUT_MS = 1_000
MAX_TIMEOUT_MS = 3_600_000
MAX_REQUEST_ID = 128


class OptionReader:
    def __init__(self, options: Variants, method: str) -> None:
        self.options = dict(options)
        self.method = method

    def _take(self, key: str, signature: str, kind: str) -> Any:
        if key not in self.options:
            return None
        found, value = self.options.pop(key)
        if found != signature:
            raise InvalidArgument(
                f"{self.method} option {key!r} must be {kind} ({signature!r}), not {found!r}"
            )
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self._take(key, "b", "a boolean")
        return default if value is None else bool(value)

    def string(self, key: str) -> str | None:
        value = self._take(key, "s", "a string")
        return None if value is None else str(value)

    def uint32(self, key: str) -> int | None:
        value = self._take(key, "u", "an unsigned 32-bit integer")
        return None if value is None else int(value)

    def fd(self, key: str) -> int | None:
        value = self._take(key, "h", "a file descriptor")
        return None if value is None else int(value)

    def done(self) -> None:
        if self.options:
            raise InvalidArgument(
                f"unknown {self.method} option(s): {', '.join(sorted(self.options))}; "
                "see the org.vfiod1 API for the options each method takes"
            )


def acquire_options(options: Variants, method: str = "Acquire") -> AcquireOptions:
    """Acquire's (and CheckAccess's) options. owner-pidfd is borrowed (see
    the module docstring)."""
    reader = OptionReader(options, method)
    backend = reader.string("backend")
    if backend is not None and backend not in {b.value for b in Backend}:
        raise InvalidArgument(
            f"option backend={backend!r} is unknown; use one of: "
            + ", ".join(b.value for b in Backend)
        )
    label = reader.string("label") or ""
    if len(label) > 256 or not label.isprintable():
        raise InvalidArgument("option label must be printable and at most 256 characters")
    request_id = reader.string("request-id") or ""
    if len(request_id) > MAX_REQUEST_ID or not request_id.isprintable():
        raise InvalidArgument(
            f"option request-id must be printable and at most {MAX_REQUEST_ID} characters"
        )
    timeout_ms = reader.uint32("timeout")
    if timeout_ms is not None and not MIN_TIMEOUT_MS <= timeout_ms <= MAX_TIMEOUT_MS:
        raise InvalidArgument(
            f"option timeout is in milliseconds, from {MIN_TIMEOUT_MS} to {MAX_TIMEOUT_MS}; "
            "give the time you will wait for the reply (your D-Bus call's timeout)"
        )
    result = AcquireOptions(
        backend=Backend(backend) if backend is not None else None,
        open_devices=reader.boolean("open-devices", True),
        managed=reader.boolean("managed", False),
        unsafe_noiommu=reader.boolean("unsafe-noiommu", False),
        owner_pidfd=reader.fd("owner-pidfd"),
        label=label,
        request_id=request_id,
        timeout=DEFAULT_TIMEOUT if timeout_ms is None else timeout_ms / 1000,
    )
    reader.done()
    return result


def map_options(options: Variants) -> bool:
    """MapDma's options; returns allocate-iova."""
    reader = OptionReader(options, "MapDma")
    allocate = reader.boolean("allocate-iova", False)
    reader.done()
    return allocate


def inventory_options(options: Variants) -> None:
    """GetInventory takes no option yet: any is refused, so a client that
    sends one learns its vfiod does not know it."""
    OptionReader(options, "GetInventory").done()
