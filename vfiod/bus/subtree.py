"""Objects of one read-only interface (devices, groups), served by sd-bus
from one vtable for all of them.

sdbus exports every object with a vtable of its own: about 65 µs and 8 KB of
sd-bus and sdbus state an object, which at 16,384 devices (and their groups)
was most of vfiod's start and of its memory. sd-bus can instead serve a whole
subtree from one *fallback* vtable: it asks which paths exist (``find``),
lists them (a node enumerator: for GetManagedObjects and introspection) and
reads each property of a path through a getter. So an object here is a view
in a dict, and adding one costs a dict entry (and its InterfacesAdded signal).

The property table is the interface's sdbus class (vfiod.bus.interfaces), the
one the client uses as a proxy: names, signatures, flags and getters are read
from it, so both ends keep one definition of the contract. Values are written
into sd-bus's reply by sdbus's own encoder (an SdBusMessage wrapped around
the reply for the call), not by code of ours.

This calls sd-bus through ctypes (as vfiod.bus.checked does, on the same
terms: sdbus's extension carries the symbols) and relies on the layout of
``sd_bus_vtable`` (systemd 243 and later: a start element naming its size and
the format 242) and of sdbus's SdBus object (PyObject_HEAD, then its
``sd_bus*``); both are checked when a subtree is made, and pinned in the unit
tests. Every call that touches the bus keeps the GIL (``ctypes.PyDLL``), as
sdbus does, so nothing else runs on the bus meanwhile.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import functools
import logging
import traceback
from collections.abc import Callable, Iterator
from typing import Any

from sdbus import DbusPropertyEmitsChangeFlag, sd_bus_internals
from sdbus.dbus_proxy_async_method import DbusMethodAsync
from sdbus.dbus_proxy_async_property import DbusPropertyAsync
from sdbus.dbus_proxy_async_signal import DbusSignalAsync
from sdbus.sd_bus_internals import SdBus, SdBusMessage

from vfiod.bus.checked import (
    MESSAGE_POINTER_OFFSET,
    UnsupportedSdbusError,
    c_function,
    message_pointer,
    sd_bus,
)

log = logging.getLogger(__name__)

# sd-bus-vtable.h
VTABLE_START = ord("<")
VTABLE_END = ord(">")
VTABLE_PROPERTY = ord("P")
VTABLE_PARAM_NAMES = 1 << 0
VTABLE_FORMAT = 242  # sd_bus_object_vtable_format: systemd >= 243
# PyObject_HEAD, sd_bus* sd_bus_ref, three PyObject*, two ints (sd_bus_internals.h)
BUS_POINTER_OFFSET = object.__basicsize__
BUS_OBJECT_SIZE = BUS_POINTER_OFFSET + 4 * ctypes.sizeof(ctypes.c_void_p) + 2 * 4


class _Start(ctypes.Structure):
    _fields_ = (
        ("element_size", ctypes.c_size_t),
        ("features", ctypes.c_uint64),
        ("vtable_format_reference", ctypes.c_void_p),
    )


class _Property(ctypes.Structure):
    _fields_ = (
        ("member", ctypes.c_char_p),
        ("signature", ctypes.c_char_p),
        ("get", ctypes.c_void_p),
        ("set", ctypes.c_void_p),
        ("offset", ctypes.c_size_t),
    )


class _Method(ctypes.Structure):  # only for the union's size: member .. names
    _fields_ = tuple((f"field{i}", ctypes.c_void_p) for i in range(6))


class _Members(ctypes.Union):
    _fields_ = (("start", _Start), ("property", _Property), ("method", _Method))


class VtableEntry(ctypes.Structure):
    # uint8_t type:8; uint64_t flags:56 -- one little-endian word
    _fields_ = (("type_and_flags", ctypes.c_uint64), ("x", _Members))


_GET = ctypes.CFUNCTYPE(
    ctypes.c_int,
    ctypes.c_void_p,  # sd_bus *bus
    ctypes.c_char_p,  # const char *path
    ctypes.c_void_p,  # const char *interface (one getter per property: not read)
    ctypes.c_void_p,  # const char *property
    ctypes.c_void_p,  # sd_bus_message *reply
    ctypes.c_void_p,  # void *userdata
    ctypes.c_void_p,  # sd_bus_error *ret_error
)
_FIND = ctypes.CFUNCTYPE(
    ctypes.c_int,
    ctypes.c_void_p,  # sd_bus *bus
    ctypes.c_char_p,  # const char *path
    ctypes.c_char_p,  # const char *interface
    ctypes.c_void_p,  # void *userdata
    ctypes.POINTER(ctypes.c_void_p),  # void **ret_found
    ctypes.c_void_p,  # sd_bus_error *ret_error
)
_ENUMERATE = ctypes.CFUNCTYPE(
    ctypes.c_int,
    ctypes.c_void_p,  # sd_bus *bus
    ctypes.c_char_p,  # const char *prefix
    ctypes.c_void_p,  # void *userdata
    ctypes.POINTER(ctypes.c_void_p),  # char ***ret_nodes
    ctypes.c_void_p,  # sd_bus_error *ret_error
)


class _SdBusObjects:
    """The sd-bus calls that serve a subtree (and drive a bus fairly)."""

    def __init__(self) -> None:
        lib = ctypes.PyDLL(sd_bus_internals.__file__)
        pointer, text = ctypes.c_void_p, ctypes.c_char_p
        slot_out = ctypes.POINTER(ctypes.c_void_p)
        self.format = ctypes.addressof(ctypes.c_uint.in_dll(lib, "sd_bus_object_vtable_format"))
        self.add_fallback_vtable = c_function(
            lib,
            "sd_bus_add_fallback_vtable",
            pointer,
            slot_out,
            text,
            text,
            pointer,
            _FIND,
            pointer,
        )
        self.add_node_enumerator = c_function(
            lib, "sd_bus_add_node_enumerator", pointer, slot_out, text, _ENUMERATE, pointer
        )
        self.emit_properties_changed = c_function(
            lib, "sd_bus_emit_properties_changed_strv", pointer, text, text, pointer
        )
        self.process = c_function(lib, "sd_bus_process", pointer, pointer)  # (vfiod.bus.fair)
        self.slot_unref = c_function(lib, "sd_bus_slot_unref", pointer, restype=pointer)
        self.message_get_bus = c_function(lib, "sd_bus_message_get_bus", pointer, restype=pointer)
        libc = ctypes.CDLL(None)
        self.malloc = c_function(libc, "malloc", ctypes.c_size_t, restype=pointer)
        self.strdup = c_function(libc, "strdup", text, restype=pointer)


@functools.cache
def sd_bus_calls() -> _SdBusObjects:
    sd_bus()  # this sdbus is one whose layouts are known (else UnsupportedSdbusError)
    if SdBus.__basicsize__ != BUS_OBJECT_SIZE:
        raise UnsupportedSdbusError(
            f"an sdbus SdBus object is {SdBus.__basicsize__} bytes, not {BUS_OBJECT_SIZE}: "
            "vfiod cannot find its sd_bus"
        )
    calls = _SdBusObjects()
    if ctypes.c_uint.from_address(calls.format).value != VTABLE_FORMAT:
        raise UnsupportedSdbusError("this sd-bus has a vtable format vfiod was not checked with")
    return calls


def bus_pointer(bus: SdBus) -> int:
    """The sd_bus* of an sdbus bus, checked against what a message of it says."""
    pointer = ctypes.c_void_p.from_address(id(bus) + BUS_POINTER_OFFSET).value
    probe = bus.new_method_call_message(
        "org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus.Peer", "Ping"
    )
    if pointer is None or sd_bus_calls().message_get_bus(message_pointer(probe)) != pointer:
        raise UnsupportedSdbusError("this sdbus keeps its sd_bus elsewhere than vfiod expects")
    return pointer


@dataclasses.dataclass(frozen=True)
class Property:
    """One property of a served interface, as its sdbus class declares it."""

    name: str
    signature: str
    flags: int  # sd-bus's SD_BUS_VTABLE_* (sdbus uses the same numbers)
    getter: Callable[[Any], Any]  # of an object with a ``view``

    @property
    def changes(self) -> bool:
        return bool(self.flags & DbusPropertyEmitsChangeFlag)


def properties_of(interface: type) -> tuple[str, tuple[Property, ...]]:
    """The D-Bus name and the properties of an sdbus interface class that
    serves properties only (what a subtree can serve)."""
    found: dict[str, Property] = {}
    names = set()
    for member in vars(interface).values():  # its own, not DbusInterfaceCommonAsync's
        if isinstance(member, DbusPropertyAsync):
            names.add(member.interface_name)
            found[member.property_name] = Property(
                member.property_name,
                member.property_signature,
                member.flags,
                member.property_getter,
            )
        elif isinstance(member, (DbusMethodAsync, DbusSignalAsync)):
            raise TypeError(f"{interface.__name__} has methods or signals: not a subtree's")
    if len(names) != 1:
        raise TypeError(f"{interface.__name__}: expected the properties of one interface")
    return names.pop(), tuple(found.values())


class _Viewed:
    """What an interface's getters read: ``self.view``."""

    __slots__ = ("view",)

    def __init__(self, view: Any) -> None:
        self.view = view


class Subtree:
    """The objects of one interface under ``prefix`` (each ``prefix/NAME``),
    each a view of the type the interface's getters read."""

    def __init__(self, bus: SdBus, prefix: str, interface: type) -> None:
        self._calls = sd_bus_calls()
        self._bus = bus
        self._pointer = bus_pointer(bus)
        self.prefix = prefix
        self.interface, self.properties = properties_of(interface)
        self._changing = tuple(p for p in self.properties if p.changes)
        self._objects: dict[bytes, _Viewed] = {}
        # sdbus's encoder writes into the reply of each get: an SdBusMessage
        # that points at it for the call's length (never owning a reference).
        self._reply = SdBusMessage()
        self._reply_pointer = ctypes.c_void_p.from_address(id(self._reply) + MESSAGE_POINTER_OFFSET)
        # Kept as long as sd-bus may call them: the vtable and the callbacks.
        self._getters = [_GET(functools.partial(self._get_property, p)) for p in self.properties]
        self._find = _FIND(self._find_object)
        self._enumerate = _ENUMERATE(self._enumerate_objects)
        self._vtable = self._make_vtable()
        self._slots: list[ctypes.c_void_p] = []
        vtable_slot, enumerator_slot = ctypes.c_void_p(), ctypes.c_void_p()
        _check(
            self._calls.add_fallback_vtable(
                self._pointer,
                ctypes.byref(vtable_slot),
                prefix.encode(),
                self.interface.encode(),
                ctypes.cast(self._vtable, ctypes.c_void_p),
                self._find,
                None,
            ),
            f"serving {self.interface} under {prefix}",
        )
        self._slots.append(vtable_slot)
        _check(
            self._calls.add_node_enumerator(
                self._pointer, ctypes.byref(enumerator_slot), prefix.encode(), self._enumerate, None
            ),
            f"listing the objects under {prefix}",
        )
        self._slots.append(enumerator_slot)

    def _make_vtable(self) -> ctypes.Array[VtableEntry]:
        entries = (VtableEntry * (len(self.properties) + 2))()
        entries[0].type_and_flags = VTABLE_START
        entries[0].x.start = _Start(
            ctypes.sizeof(VtableEntry), VTABLE_PARAM_NAMES, self._calls.format
        )
        for entry, prop, getter in zip(entries[1:-1], self.properties, self._getters, strict=True):
            entry.type_and_flags = VTABLE_PROPERTY | (prop.flags << 8)
            get = ctypes.cast(getter, ctypes.c_void_p).value
            entry.x.property = _Property(prop.name.encode(), prop.signature.encode(), get, None, 0)
        entries[-1].type_and_flags = VTABLE_END
        return entries

    # -- what is served

    def __contains__(self, path: str) -> bool:
        return path.encode() in self._objects

    def __len__(self) -> int:
        return len(self._objects)

    def view(self, path: str) -> Any:
        """The view served at ``path`` (KeyError if none)."""
        return self._objects[path.encode()].view

    def items(self) -> Iterator[tuple[str, Any]]:
        """Every object served: its path and its view."""
        for key, viewed in self._objects.items():
            yield key.decode(), viewed.view

    def add(self, path: str, view: Any, *, announce: bool = True) -> None:
        """Serve ``view`` at ``path`` (a new object: InterfacesAdded, unless
        the bus is not announced yet)."""
        if not path.startswith(self.prefix + "/"):
            raise ValueError(f"{path} is not under {self.prefix}")
        self._objects[path.encode()] = _Viewed(view)
        if announce:
            self._bus.emit_object_added(path)

    def update(self, path: str, view: Any) -> None:
        """Serve ``view`` at ``path`` instead; PropertiesChanged names what changed."""
        viewed = self._objects[path.encode()]
        if viewed.view == view:  # most syncs change nothing: no getter runs
            return
        before = _Viewed(viewed.view)
        viewed.view = view
        changed = [p.name for p in self._changing if p.getter(viewed) != p.getter(before)]
        if changed:
            names = (ctypes.c_char_p * (len(changed) + 1))(*(n.encode() for n in changed), None)
            result = self._calls.emit_properties_changed(
                self._pointer,
                path.encode(),
                self.interface.encode(),
                ctypes.cast(names, ctypes.c_void_p),
            )
            if result < 0:
                log.warning(
                    "%s: PropertiesChanged not sent: %s", path, errno.errorcode.get(-result)
                )

    def remove(self, path: str) -> None:
        """Stop serving ``path``: InterfacesRemoved (sent while it is still
        served: sd-bus reads what it removes), then it is gone."""
        key = path.encode()
        if key in self._objects:
            self._bus.emit_object_removed(path)
            del self._objects[key]

    def close(self) -> None:
        """Serve nothing any more (no signals)."""
        for slot in self._slots:
            self._calls.slot_unref(slot)
        self._slots.clear()
        self._objects.clear()

    # -- what sd-bus calls (never raising: an exception cannot cross C)

    def _find_object(
        self, _bus: int, path: bytes, _interface: bytes, _userdata: int, found: Any, _error: int
    ) -> int:
        if path not in self._objects:
            return 0
        found[0] = 1  # the userdata of the getters: unused, but not NULL
        return 1

    def _enumerate_objects(
        self, _bus: int, _prefix: bytes, _userdata: int, nodes: Any, _error: int
    ) -> int:
        try:
            # A NULL-terminated strv that sd-bus frees, string by string.
            paths = list(self._objects)
            array = self._calls.malloc((len(paths) + 1) * ctypes.sizeof(ctypes.c_void_p))
            if not array:
                return -errno.ENOMEM
            strv = (ctypes.c_void_p * (len(paths) + 1)).from_address(array)
            for i, path in enumerate(paths):
                strv[i] = self._calls.strdup(path)
            strv[len(paths)] = None
            nodes[0] = array
            return 0
        except Exception:
            _bug(f"listing the objects under {self.prefix}")
            return -errno.EIO

    def _get_property(
        self,
        prop: Property,
        _bus: int,
        path: bytes,
        _interface: int,
        _property: int,
        reply: int,
        _userdata: int,
        _error: int,
    ) -> int:
        try:
            value = prop.getter(self._objects[path])
            self._reply_pointer.value = reply
            try:
                self._reply.append_data(prop.signature, value)
            finally:
                self._reply_pointer.value = None
            return 0
        except Exception:
            _bug(f"reading {prop.name} of {path.decode(errors='replace')}")
            return -errno.EIO


def _bug(what: str) -> None:
    """Log the exception being handled, as text: a record holding it would
    keep the frames of a call from sd-bus (and the bus) alive."""
    log.error("bug: %s failed\n%s", what, traceback.format_exc().rstrip())


def _check(result: int, what: str) -> None:
    if result < 0:
        raise OSError(-result, f"{what}: {errno.errorcode.get(-result, '?')}")
