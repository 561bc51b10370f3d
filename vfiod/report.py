"""Inventory output: tables for people, JSON for programs."""

from __future__ import annotations

import dataclasses

from vfiod.host.inventory import Inventory


def inventory_json(inventory: Inventory) -> dict[str, object]:
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
            }
            for d in inventory.devices.values()
        ],
    }


def inventory_table(inventory: Inventory) -> str:
    """IOMMU groups with their devices, for people."""
    lines = [f"{'GROUP':>7}  {'VIABLE':6}  {'DEVICE':12}  {'IDS':9}  {'DRIVER':14}  DESCRIPTION"]
    for group in sorted(inventory.groups.values(), key=lambda g: (g.noiommu, int(g.id))):
        viable = "yes" if group.viable else "no"
        for i, device in enumerate(group.devices):
            name, shown = (group.node_name, viable) if i == 0 else ("", "")
            lines.append(
                f"{name:>7}  {shown:6}  {device.address!s:12}  {device.ids:9}  "
                f"{device.driver or '-':14}  {device.description or device.class_name}"
            )
        for blocker in group.blockers():
            lines.append(f"{'':>7}  {'':6}  not viable: {blocker.reason}")
    return "\n".join(lines)
