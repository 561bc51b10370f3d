"""The bus layer: broker errors are answered as they are, anything else
becomes a logged bug with a generic message (no traceback crosses the bus);
what vfiod.bus.checked and vfiod.bus.subtree rely on in sdbus, and how it finds the fds in a
call's arguments."""

from __future__ import annotations

import asyncio
import ctypes
import importlib.metadata
import logging
from pathlib import Path
from typing import Any

import pytest
import sdbus
from sdbus import DbusInterfaceCommonAsync
from sdbus.dbus_proxy_async_method import DbusLocalMethodAsync, DbusMethodAsync
from sdbus.sd_bus_internals import SdBus, SdBusMessage

from vfiod.bus import checked, subtree
from vfiod.bus.checked import (
    MESSAGE_POINTER_OFFSET,
    SDBUS_VERSIONS,
    MessageCheck,
    UnsupportedSdbusError,
    VfiodMethod,
    check_sdbus,
    complete_types,
    guarded,
    received_fds,
    sd_bus,
)
from vfiod.bus.interfaces import InternalError, LeaseInterface, Manager, ManagerInterface
from vfiod.errors import Busy

SETUP_CFG = Path(__file__).resolve().parents[2] / "setup.cfg"


@guarded
async def refuses() -> None:
    raise Busy("IOMMU group 10 is leased to vm-1")


@guarded
async def breaks() -> None:
    raise KeyError("secret internal detail")


def test_broker_errors_pass_unchanged() -> None:
    with pytest.raises(Busy, match="leased to vm-1"):
        asyncio.run(refuses())


def test_other_exceptions_become_a_logged_bug(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR)
    with pytest.raises(InternalError) as bug:
        asyncio.run(breaks())
    assert bug.value.dbus_name == "org.vfiod1.Error.Failed"
    assert "secret internal detail" not in bug.value.message
    assert "this is a bug, logged in vfiod's journal" in bug.value.message
    (record,) = caplog.records
    assert record.exc_info is not None
    assert "bug: breaks failed" in record.getMessage()


# -- what vfiod.bus.checked relies on in sdbus


def test_the_installed_sdbus_is_one_checked_supports() -> None:
    """The version range the module was verified with, and the layout it
    reads: an SdBusMessage is PyObject_HEAD then one sd_bus_message*."""
    version = importlib.metadata.version("sdbus")
    check_sdbus(version, SdBusMessage.__basicsize__)
    assert MESSAGE_POINTER_OFFSET == object.__basicsize__ == 2 * ctypes.sizeof(ctypes.c_void_p)
    assert SdBusMessage.__basicsize__ == MESSAGE_POINTER_OFFSET + ctypes.sizeof(ctypes.c_void_p)
    assert SdBusMessage.__itemsize__ == 0
    low, high = SDBUS_VERSIONS
    assert low == (0, 14, 3)  # sdbus <= 0.14.2 hands receivers closed fds
    assert high == (0, 15)


def test_setup_cfg_asks_for_an_sdbus_checked_supports() -> None:
    text = SETUP_CFG.read_text()
    requirement = next(line.strip() for line in text.splitlines() if "sdbus" in line)
    assert requirement.replace(" ", "").startswith("sdbus>=0.14.3"), requirement


@pytest.mark.parametrize(
    ("version", "size", "complaint"),
    [
        ("0.14.2", 24, "not supported"),
        ("0.15.0", 24, "not supported"),
        ("1.0", 24, "not supported"),
        ("0.14.3", 32, "an SdBusMessage is 32 bytes"),
    ],
)
def test_another_sdbus_is_refused_clearly(version: str, size: int, complaint: str) -> None:
    with pytest.raises(UnsupportedSdbusError, match=complaint):
        check_sdbus(version, size)
    check_sdbus("0.14.3", 24)
    check_sdbus("0.14.9rc1", 24)


def test_sd_bus_is_reached_through_the_extension_module() -> None:
    """The symbols come from sdbus's own sd_bus_internals (the wheel links
    libsystemd into it), so they act on the very messages sdbus made."""
    bus = sd_bus()
    for function in (bus.skip, bus.rewind, bus.enter, bus.exit, bus.peek, bus.read_basic):
        assert function.restype is ctypes.c_int
    assert bus.get_member.restype is ctypes.c_char_p


class _Interface(DbusInterfaceCommonAsync, interface_name="org.vfiod1.test.Edge"):
    @checked.vfiod_method("ah", "s")
    async def take(self, fds: list[int]) -> str:
        return str(fds)


def test_served_methods_are_vfiod_methods() -> None:
    """Every method vfiod serves is checked, as a proxy it stays sdbus's."""
    for cls in (ManagerInterface, LeaseInterface):
        methods = [m for m in vars(cls).values() if isinstance(m, DbusMethodAsync)]
        assert methods
        assert all(isinstance(m, VfiodMethod) for m in methods), cls
    bound = _Interface().take
    assert isinstance(bound, DbusLocalMethodAsync)
    assert type(bound).__name__ == "_LocalVfiodMethod"
    assert issubclass(Manager, ManagerInterface)


def test_checks_only_for_calls_that_can_carry_fds() -> None:
    assert MessageCheck.of("") is None
    assert MessageCheck.of("o") is None
    assert MessageCheck.of("tt") is None
    assert MessageCheck.of("asa(sbs)") is None
    acquire = MessageCheck.of("asa{sv}")
    assert acquire is not None
    assert len(acquire.steps) == 2  # "as" in one read, then the dict
    map_dma = MessageCheck.of("httta{sv}")
    assert map_dma is not None
    assert len(map_dma.steps) == 2  # "httt" in one read


def test_complete_types() -> None:
    assert complete_types("asa{sv}") == ["as", "a{sv}"]
    assert complete_types("httta{sv}") == ["h", "t", "t", "t", "a{sv}"]
    assert complete_types("a(sa{sv})vaah(h(hv))") == ["a(sa{sv})", "v", "aah", "(h(hv))"]
    assert complete_types("") == []


@pytest.mark.parametrize(
    ("signature", "args", "fds"),
    [
        ("asa{sv}", (["a"], {"owner-pidfd": ("h", 5), "label": ("s", "x")}), [5]),
        ("asa{sv}", (["a"], {"x": ("ah", [5, 6, 7])}), [5, 6, 7]),
        ("asa{sv}", ([], {"x": ("a{sh}", {"a": 5, "b": 6})}), [5, 6]),
        ("asa{sv}", ([], {"x": ("a{hs}", {5: "a"})}), [5]),
        ("asa{sv}", ([], {"x": ("v", ("h", 5))}), [5]),
        ("asa{sv}", ([], {"x": ("(hh)", (5, 6))}), [5, 6]),
        ("asa{sv}", ([], {"x": ("v", ("v", ("ah", [5, 6])))}), [5, 6]),
        ("asa{sv}", ([], {"x": ("aa{sv}", [{"y": ("h", 5)}, {"z": ("as", ["h"])}])}), [5]),
        ("asa{sv}", ([], {"x": ("ay", b"h"), "y": ("s", "h"), "z": ("ah", [])}), []),
        ("httta{sv}", (4, 0, 4096, 0, {"x": ("(h)", (5,))}), [4, 5]),
        ("tt", (1, 2), []),
        ("o", ("/org/vfiod1/lease/x",), []),
    ],
)
def test_received_fds_are_found_wherever_they_sit(
    signature: str, args: tuple[Any, ...], fds: list[int]
) -> None:
    assert sorted(received_fds(signature, args)) == fds


# -- what vfiod.bus.subtree relies on in sd-bus and sdbus


def test_the_vtable_layout_is_sd_bus_vtable() -> None:
    """struct sd_bus_vtable (sd-bus-vtable.h, systemd >= 243): a word of type
    and flags, then a union of which the method member is the largest."""
    pointer = ctypes.sizeof(ctypes.c_void_p)
    assert ctypes.sizeof(subtree.VtableEntry) == 8 + 6 * pointer
    assert subtree.VtableEntry.x.offset == 8
    assert subtree._Property.get.offset == 2 * pointer
    assert subtree._Start.vtable_format_reference.offset == 16
    assert (subtree.VTABLE_START, subtree.VTABLE_END, subtree.VTABLE_PROPERTY) == (60, 62, 80)


def test_sdbus_flags_are_sd_bus_vtable_flags() -> None:
    """The flags of the interface classes go into the vtable as they are."""
    assert sdbus.DbusDeprecatedFlag == 1 << 0
    assert sdbus.DbusHiddenFlag == 1 << 1
    assert sdbus.DbusPropertyConstFlag == 1 << 4
    assert sdbus.DbusPropertyEmitsChangeFlag == 1 << 5


def test_the_installed_sdbus_is_one_subtree_supports() -> None:
    assert SdBus.__basicsize__ == subtree.BUS_OBJECT_SIZE
    calls = subtree.sd_bus_calls()
    assert ctypes.c_uint.from_address(calls.format).value == subtree.VTABLE_FORMAT
