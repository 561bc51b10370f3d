"""Human names of PCI devices from the udev hardware database (hwdb.bin)."""

from __future__ import annotations

import logging
from typing import Any

import pyudev
from pyudev._util import udev_list_iterate

log = logging.getLogger(__name__)


class HardwareDatabase:
    """Looks up a device's modalias ("pci:v00008086d000010D3sv...") in hwdb.

    pyudev declares libudev's hwdb functions but wraps none of them, so this
    calls them through the library pyudev loaded. Without libudev or hwdb.bin
    every lookup answers None: names are a convenience, never a requirement.
    """

    def __init__(self) -> None:
        self._lib: Any = None
        self._hwdb: Any = None
        self._cache: dict[str, dict[str, str]] = {}
        try:
            context = pyudev.Context()
            self._lib = context._libudev
            self._hwdb = self._lib.udev_hwdb_new(context) or None
        except (ImportError, OSError, AttributeError) as e:  # no libudev, no hwdb.bin
            log.info("no udev hardware database: %s", e)

    def close(self) -> None:
        if self._hwdb is not None:
            self._lib.udev_hwdb_unref(self._hwdb)
            self._hwdb = None

    def properties(self, modalias: str) -> dict[str, str]:
        if self._hwdb is None:
            return {}
        found = self._cache.get(modalias)
        if found is None:
            entry = self._lib.udev_hwdb_get_properties_list_entry(self._hwdb, modalias.encode(), 0)
            found = {
                name.decode(errors="replace"): value.decode(errors="replace")
                for name, value in udev_list_iterate(self._lib, entry)
            }
            self._cache[modalias] = found
        return found

    def describe(self, modalias: str) -> str | None:
        """ "Intel Corporation 82574L Gigabit Network Connection", or None."""
        props = self.properties(modalias)
        parts = [props.get("ID_VENDOR_FROM_DATABASE"), props.get("ID_MODEL_FROM_DATABASE")]
        words = [p for p in parts if p]
        return " ".join(words) if words else None
