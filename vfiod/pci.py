"""PCI addresses as the kernel writes them: DDDD:BB:DD.F."""

from __future__ import annotations

import dataclasses
import re

_ADDRESS = re.compile(
    r"(?P<domain>[0-9a-f]{4}):(?P<bus>[0-9a-f]{2}):(?P<slot>[01][0-9a-f])\.(?P<function>[0-7])"
)


class AddressError(ValueError):
    """A string that is not a PCI address."""


@dataclasses.dataclass(frozen=True, order=True)
class PciAddress:
    domain: int
    bus: int
    slot: int
    function: int

    @classmethod
    def parse(cls, text: str) -> PciAddress:
        """Parse the kernel's form; also accept the short BB:DD.F for domain 0."""
        candidate = text.strip().lower()
        if len(candidate) == 7:
            candidate = "0000:" + candidate
        m = _ADDRESS.fullmatch(candidate)
        if m is None:
            raise AddressError(
                f"malformed PCI address {text!r}: expected DDDD:BB:DD.F in hex "
                "(as in /sys/bus/pci/devices), for example 0000:00:10.0"
            )
        return cls(int(m["domain"], 16), int(m["bus"], 16), int(m["slot"], 16), int(m["function"]))

    def __str__(self) -> str:
        return f"{self.domain:04x}:{self.bus:02x}:{self.slot:02x}.{self.function}"
