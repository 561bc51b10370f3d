"""vfiod's viability verdict against the kernel's VIABLE flag."""

from __future__ import annotations

import logging

import pytest

from vfiod.host.inventory import (
    IommuGroup,
    PciDevice,
    cross_check_viability,
    viability_disagreement,
)
from vfiod.pci import PciAddress


def _device(address: str, driver: str | None, pci_class: int = 0x020000) -> PciDevice:
    return PciDevice(
        address=PciAddress.parse(address),
        vendor=0x8086,
        device=0x10D3,
        subsystem_vendor=0x8086,
        subsystem_device=0,
        pci_class=pci_class,
        driver=driver,
        group="7",
        reset_methods=(),
        physfn=None,
        virtfns=(),
    )


def test_agreement_is_silent() -> None:
    viable = IommuGroup("7", False, (_device("0000:00:10.0", "vfio-pci"),))
    blocked = IommuGroup("7", False, (_device("0000:00:10.0", "e1000e"),))
    assert viability_disagreement(viable, kernel_viable=True) is None
    assert viability_disagreement(blocked, kernel_viable=False) is None


def test_disagreement_names_both_verdicts_and_our_blockers() -> None:
    blocked = IommuGroup("7", False, (_device("0000:00:10.0", "new_dma_safe_driver"),))
    assert viability_disagreement(blocked, kernel_viable=True) == (
        "IOMMU group 7: vfiod finds it not viable (0000:00:10.0 (Ethernet controller) is "
        "bound to new_dma_safe_driver), the kernel says viable; the kernel's answer stands"
    )
    viable = IommuGroup("7", False, (_device("0000:00:10.0", None),))
    assert viability_disagreement(viable, kernel_viable=False) == (
        "IOMMU group 7: vfiod finds it viable, the kernel says not viable; "
        "the kernel's answer stands"
    )


def test_cross_check_logs_a_disagreement(caplog: pytest.LogCaptureFixture) -> None:
    blocked = IommuGroup("7", False, (_device("0000:00:10.0", "new_dma_safe_driver"),))
    with caplog.at_level(logging.WARNING, logger="vfiod.host.inventory"):
        assert cross_check_viability(blocked, kernel_viable=False)
        assert caplog.records == []
        assert not cross_check_viability(blocked, kernel_viable=True)
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert record.getMessage().startswith("IOMMU group 7: vfiod finds it not viable")
