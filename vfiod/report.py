"""Inventory output: tables for people, JSON for programs."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

from vfiod.host.binding import CriticalDevices
from vfiod.host.inventory import Inventory


def inventory_json(inventory: Inventory, critical: CriticalDevices) -> dict[str, object]:
    """IOMMU groups and devices, for programs."""
    return {
        "groups": [
            {
                "id": group.id,
                "node": f"/dev/vfio/{group.node_name}",
                "noiommu": group.noiommu,
                "viable": group.viable,
                "blockers": [
                    {"address": str(b.address), "reason": b.reason} for b in group.blockers()
                ],
                "devices": [str(d.address) for d in group.devices],
            }
            for group in inventory.groups.values()
        ],
        "devices": [
            {
                **{k: v for k, v in dataclasses.asdict(d).items() if k not in ("address",)},
                "address": str(d.address),
                "class_name": d.class_name,
                "physfn": str(d.physfn) if d.physfn else None,
                "virtfns": [str(v) for v in d.virtfns],
                "host_critical": list(critical.get(d.address, ())),
            }
            for d in inventory.devices.values()
        ],
    }


def table(header: Sequence[str], rows: Iterable[Sequence[str] | str]) -> str:
    """Columns as wide as their widest cell. A row that is a plain string is a
    note under the row before it, starting at the third column."""
    rows = list(rows)
    cells = [header, *(r for r in rows if not isinstance(r, str))]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    indent = " " * (widths[0] + widths[1] + 4)

    def line(row: Sequence[str]) -> str:
        return "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()

    return "\n".join(indent + row if isinstance(row, str) else line(row) for row in [header, *rows])


def inventory_table(inventory: Inventory, critical: CriticalDevices) -> str:
    """IOMMU groups with their devices, for people."""
    rows: list[Sequence[str] | str] = []
    for group in sorted(inventory.groups.values(), key=lambda g: (g.noiommu, int(g.id))):
        viable = "yes" if group.viable else "no"
        for i, device in enumerate(group.devices):
            name, shown = (group.node_name, viable) if i == 0 else ("", "")
            rows.append(
                (
                    name,
                    shown,
                    str(device.address),
                    device.ids,
                    device.driver or "-",
                    device.description or device.class_name,
                )
            )
            rows.extend(f"host-critical: {reason}" for reason in critical.get(device.address, ()))
        rows.extend(f"not viable: {blocker.reason}" for blocker in group.blockers())
    return table(("GROUP", "VIABLE", "DEVICE", "IDS", "DRIVER", "DESCRIPTION"), rows)
