"""vfiod's D-Bus methods: sdbus's method, with what a privileged service
taking calls from anyone needs and sdbus does not do.

1. A call sd-bus cannot read whole is refused before sdbus parses it.
   sdbus (0.14.3) parses a call's arguments in C and duplicates each fd
   ('h') it meets (F_DUPFD_CLOEXEC) into a Python int. When a later value
   cannot be read (an 'h' whose index points past the fds the message
   carries: dbus-daemon does not look into bodies) the parse fails and the
   duplicates made so far are dropped, never closed; and when a dict has a
   key twice, the first value (and any fd in it) is dropped the same way.
   Any local user could so make vfiod leak fds until it hits its limit.
   So each call whose signature can carry fds (an 'h' or a 'v') is first
   read by sd-bus itself: ``sd_bus_message_skip`` reads every value (and
   checks every fd index) without duplicating anything; dicts whose values
   can carry fds are walked entry by entry for repeated keys. A call that
   fails is answered InvalidArgument and never reaches sdbus's parser.

   This calls sd-bus through ctypes, which relies on two things, checked
   when the first object is exported (and pinned in the unit tests): the
   sd-bus symbols are those of sdbus's extension module (its wheel links
   libsystemd statically; built against the system's, they resolve through
   it), and an SdBusMessage object is PyObject_HEAD followed by its
   ``sd_bus_message*`` (sdbus's sd_bus_internals.h). Both hold for the sdbus
   versions in SDBUS_VERSIONS.

2. Every fd a call carried, wherever it sits (arrays, structs, dicts,
   variants in variants), is closed when the call is done, whatever its
   outcome: the method only borrows them; the broker dups what it keeps.

3. Every error it answers is an org.vfiod1.Error.*: a BrokerError with its
   own name; anything else is a bug, logged with its traceback and answered
   org.vfiod1.Error.Failed. (sdbus answers an exception whose class it has
   no name for with org.freedesktop.DBus.Error.Failed.) And every call is
   answered: one cancelled because its object went away (sdbus cancels the
   calls in flight when an object is unexported) gets NotFound, where sdbus
   would leave the caller waiting for its timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import errno
import functools
import importlib.metadata
import logging
import os
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, overload

from sdbus import DbusUnprivilegedFlag, sd_bus_internals
from sdbus.dbus_common_elements import DbusLocalObjectMeta, DbusRemoteObjectMeta
from sdbus.dbus_proxy_async_method import (
    CURRENT_MESSAGE,
    DbusLocalMethodAsync,
    DbusMethodAsync,
)
from sdbus.sd_bus_internals import SdBusMessage

from vfiod.errors import BrokerError, InternalError, InvalidArgument, NotFound

if TYPE_CHECKING:
    from sdbus.dbus_proxy_async_interface_base import DbusInterfaceBaseAsync

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

# [lowest, above the highest): the versions whose SdBusMessage layout and
# parser this module was checked against. setup.cfg asks for the same.
SDBUS_VERSIONS = ((0, 14, 3), (0, 15))
# PyObject_HEAD: where an SdBusMessage keeps its sd_bus_message*.
MESSAGE_POINTER_OFFSET = object.__basicsize__


# -- sd-bus, called directly


class UnsupportedSdbusError(RuntimeError):
    """This sdbus is not one vfiod can check messages with."""


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for part in text.split("."):
        digits = "".join(c for c in part if c.isdigit()) or "0"
        parts.append(int(digits))
        if not part.isdigit():
            break
    return tuple(parts)


def check_sdbus(version: str, message_size: int) -> None:
    """Raise UnsupportedSdbusError unless sdbus ``version`` (with SdBusMessage
    objects of ``message_size`` bytes) is one this module relies on."""
    low, high = SDBUS_VERSIONS
    if not low <= _version(version) < high:
        raise UnsupportedSdbusError(
            f"sdbus {version} is not supported: vfiod checks each call's fds with sd-bus "
            "directly, which was verified with sdbus >= "
            f"{'.'.join(map(str, low))}, < {'.'.join(map(str, high))}; install one of those"
        )
    expected = MESSAGE_POINTER_OFFSET + ctypes.sizeof(ctypes.c_void_p)
    if message_size != expected:
        raise UnsupportedSdbusError(
            f"sdbus {version}: an SdBusMessage is {message_size} bytes, not {expected} "
            "(PyObject_HEAD and an sd_bus_message pointer): vfiod cannot read its messages"
        )


class _SdBus:
    """The few sd-bus calls that read a message without duplicating its fds."""

    def __init__(self) -> None:
        lib = ctypes.CDLL(sd_bus_internals.__file__)
        message, text = ctypes.c_void_p, ctypes.c_char_p
        self.skip = c_function(lib, "sd_bus_message_skip", message, text)
        self.rewind = c_function(lib, "sd_bus_message_rewind", message, ctypes.c_int)
        self.enter = c_function(lib, "sd_bus_message_enter_container", message, ctypes.c_char, text)
        self.exit = c_function(lib, "sd_bus_message_exit_container", message)
        self.peek = c_function(
            lib,
            "sd_bus_message_peek_type",
            message,
            ctypes.POINTER(ctypes.c_char),
            ctypes.POINTER(ctypes.c_char_p),
        )
        self.read_basic = c_function(
            lib, "sd_bus_message_read_basic", message, ctypes.c_char, ctypes.c_void_p
        )
        self.get_member = c_function(
            lib, "sd_bus_message_get_member", message, restype=ctypes.c_char_p
        )
        self.get_signature = c_function(
            lib, "sd_bus_message_get_signature", message, ctypes.c_int, restype=ctypes.c_char_p
        )
        # (sdbus's own SdBusMessage.destination cannot be set.)
        self.set_destination = c_function(lib, "sd_bus_message_set_destination", message, text)


def c_function(lib: ctypes.CDLL, name: str, *argtypes: Any, restype: Any = ctypes.c_int) -> Any:
    """``name`` of ``lib``, typed (sd-bus's functions answer an int, < 0 an errno)."""
    function = getattr(lib, name)
    function.argtypes = argtypes
    function.restype = restype
    return function


@functools.cache
def sd_bus() -> _SdBus:
    """sd-bus's message functions, once this sdbus is known to be one they
    can be used with (else UnsupportedSdbusError)."""
    check_sdbus(importlib.metadata.version("sdbus"), SdBusMessage.__basicsize__)
    return _SdBus()


def message_pointer(message: SdBusMessage) -> int:
    """The sd_bus_message* of an sdbus message (see the module docstring)."""
    pointer = ctypes.c_void_p.from_address(id(message) + MESSAGE_POINTER_OFFSET).value
    assert pointer is not None
    return pointer


def set_destination(message: SdBusMessage, destination: str) -> None:
    """Address a message (a signal for one connection alone) before it is sent."""
    result = sd_bus().set_destination(message_pointer(message), destination.encode())
    if result < 0:
        raise OSError(-result, f"addressing a message to {destination}: {os.strerror(-result)}")


# -- signatures


def complete_types(signature: str) -> list[str]:
    """A (valid) signature's complete types: "asa{sv}" -> ["as", "a{sv}"]."""
    types: list[str] = []
    i = 0
    while i < len(signature):
        start = i
        while signature[i] == "a":
            i += 1
        if signature[i] in "({":
            depth = 0
            while True:
                depth += signature[i] in "({"
                depth -= signature[i] in ")}"
                i += 1
                if depth == 0:
                    break
        else:
            i += 1
        types.append(signature[start:i])
    return types


def _may_carry_fds(signature: str) -> bool:
    return "h" in signature or "v" in signature


class UnreadableError(Exception):
    """sd-bus cannot read the message whole, or a dict in it has a key twice."""


_KEY_BUFFERS: dict[str, type[ctypes._SimpleCData[Any]]] = {
    "y": ctypes.c_uint8,
    "b": ctypes.c_int,
    "n": ctypes.c_int16,
    "q": ctypes.c_uint16,
    "i": ctypes.c_int32,
    "u": ctypes.c_uint32,
    "x": ctypes.c_int64,
    "t": ctypes.c_uint64,
    "d": ctypes.c_double,
    "h": ctypes.c_int,  # the message's own fd: read, never duplicated
    "s": ctypes.c_char_p,
    "o": ctypes.c_char_p,
    "g": ctypes.c_char_p,
}

Step = Callable[[_SdBus, int], None]

# Where peek_type puts a variant's signature: the checks run in the event
# loop's thread only (sd-bus dispatches there), one at a time.
_CONTENTS = ctypes.c_char_p()
_CONTENTS_AT = ctypes.byref(_CONTENTS)


def _fail(result: int, what: str, signature: str | bytes) -> UnreadableError:
    """The error for an sd-bus call that returned ``result`` (built only
    when it failed: the checks' cost is in the successful calls)."""
    shown = signature.decode() if isinstance(signature, bytes) else signature
    reason = errno.errorcode.get(-result, str(-result)) if result < 0 else "no value"
    return UnreadableError(f"{what} {shown!r}: {reason}")


def _skip(signature: str) -> Step:
    """Reads a value in one sd-bus call, which checks each fd index."""
    encoded = signature.encode()

    def skip(bus: _SdBus, m: int) -> None:
        result = bus.skip(m, encoded)
        if result <= 0:
            raise _fail(result, "reading", signature)

    return skip


@functools.lru_cache(maxsize=512)  # bounded: variants bring signatures of the caller's choosing
def _reader(signature: str) -> Step:
    """Reads one value of the complete type ``signature``, fds included (no
    duplicate made), and refuses repeated keys in dicts whose values can
    carry fds."""
    if "{" not in signature and "v" not in signature:
        return _skip(signature)
    if signature == "v":
        return _read_variant
    if signature.startswith("a{"):
        key, value = complete_types(signature[2:-1])
        if not _may_carry_fds(value):  # a value lost to a repeated key holds no fd
            return _skip(signature)
        return _dict_reader(signature, key, value)
    if signature.startswith("a"):
        element = _reader(signature[1:])
        contents = signature[1:].encode()

        def array(bus: _SdBus, m: int) -> None:
            result = bus.enter(m, b"a", contents)
            if result <= 0:
                raise _fail(result, "entering", signature)
            while (result := bus.peek(m, None, None)) > 0:
                element(bus, m)
            if result < 0 or (result := bus.exit(m)) < 0:
                raise _fail(result, "reading", signature)

        return array
    assert signature.startswith("("), signature
    fields = [_reader(t) for t in complete_types(signature[1:-1])]
    inner = signature[1:-1].encode()

    def struct(bus: _SdBus, m: int) -> None:
        result = bus.enter(m, b"r", inner)
        if result <= 0:
            raise _fail(result, "entering", signature)
        for field in fields:
            field(bus, m)
        if (result := bus.exit(m)) < 0:
            raise _fail(result, "leaving", signature)

    return struct


def _read_variant(bus: _SdBus, m: int) -> None:
    result = bus.peek(m, None, _CONTENTS_AT)
    inner = _CONTENTS.value
    if result <= 0 or inner is None:
        raise _fail(result, "reading", "v")
    if b"{" not in inner and b"v" not in inner:  # read whole, in one call
        if (result := bus.skip(m, b"v")) <= 0:
            raise _fail(result, "reading a variant of", inner)
        return
    if (result := bus.enter(m, b"v", inner)) <= 0:
        raise _fail(result, "entering a variant of", inner)
    _reader(inner.decode())(bus, m)
    if (result := bus.exit(m)) < 0:
        raise _fail(result, "leaving a variant of", inner)


def _dict_reader(signature: str, key: str, value: str) -> Step:
    entry = (key + value).encode()
    contents = signature[1:].encode()
    key_code = key.encode()
    buffer_type = _KEY_BUFFERS[key]
    read_value = _reader(value)
    repeats_lose = key != "h"  # fd keys are distinct fds (dups): no value is lost

    def read(bus: _SdBus, m: int) -> None:
        if (result := bus.enter(m, b"a", contents)) <= 0:
            raise _fail(result, "entering", signature)
        seen: set[Any] = set()
        buffer = buffer_type()
        where = ctypes.byref(buffer)
        while (result := bus.enter(m, b"e", entry)) > 0:  # 0: the end of the array
            if (result := bus.read_basic(m, key_code, where)) <= 0:
                raise _fail(result, "reading a key of", signature)
            found = buffer.value
            if repeats_lose:
                if found in seen:
                    shown = found.decode(errors="replace") if isinstance(found, bytes) else found
                    raise UnreadableError(f"the key {shown!r} is given twice in {signature!r}")
                seen.add(found)
            read_value(bus, m)
            if (result := bus.exit(m)) < 0:
                raise _fail(result, "leaving an entry of", signature)
        if result < 0 or (result := bus.exit(m)) < 0:
            raise _fail(result, "reading", signature)

    return read


@dataclasses.dataclass(frozen=True)
class MessageCheck:
    """How to read a call of one signature without duplicating its fds."""

    signature: str
    steps: tuple[Step, ...]

    @classmethod
    def of(cls, signature: str) -> MessageCheck | None:
        """None when a call of ``signature`` carries no fds (no 'h', no 'v')."""
        if not _may_carry_fds(signature):
            return None
        steps: list[Step] = []
        plain = ""  # a run of types sd-bus reads in one call
        for kind in complete_types(signature):
            if "{" in kind or "v" in kind:
                if plain:
                    steps.append(_skip(plain))
                    plain = ""
                steps.append(_reader(kind))
            else:
                plain += kind
        if plain:
            steps.append(_skip(plain))
        return cls(signature, tuple(steps))

    def refusal(self, message: SdBusMessage) -> str | None:
        """Why sd-bus cannot read ``message`` whole (a call sd-bus dispatched
        to a method of this signature), or None; it is rewound either way."""
        bus = sd_bus()
        m = message_pointer(message)
        try:
            for step in self.steps:
                step(bus, m)
        except UnreadableError as e:
            return str(e)
        finally:
            bus.rewind(m, 1)
        return None


# -- the fds in parsed arguments


Collect = Callable[[Any, list[int]], None]


@functools.lru_cache(maxsize=512)  # bounded, as _reader
def _collector(signature: str) -> Collect | None:
    """Appends the fds in a value of complete type ``signature`` as sdbus
    parsed it (variants are (signature, value)); None when it has none."""
    if not _may_carry_fds(signature):
        return None
    if signature == "h":
        return lambda value, out: out.append(value)
    if signature == "v":

        def variant(value: Any, out: list[int]) -> None:
            inner, item = value
            collect = _collector(inner)
            if collect is not None:
                collect(item, out)

        return variant
    if signature.startswith("a{"):
        key, item = (_collector(t) for t in complete_types(signature[2:-1]))

        def mapping(value: Any, out: list[int]) -> None:
            for k, v in value.items():
                if key is not None:
                    key(k, out)
                if item is not None:
                    item(v, out)

        return mapping
    if signature.startswith("a"):
        element = _collector(signature[1:])
        assert element is not None

        def array(value: Any, out: list[int]) -> None:
            for v in value:
                element(v, out)

        return array
    return _struct_collector(complete_types(signature[1:-1]))


def _struct_collector(types: Sequence[str]) -> Collect:
    fields = [(i, c) for i, c in enumerate(_collector(t) for t in types) if c is not None]

    def struct(value: Any, out: list[int]) -> None:
        for i, collect in fields:
            collect(value[i], out)

    return struct


def received_fds(signature: str, args: Sequence[Any]) -> list[int]:
    """Every fd in a call's arguments of ``signature``, as sdbus parsed them."""
    fds: list[int] = []
    collect = _collector(f"({signature})")
    if collect is not None:
        collect(args, fds)
    return fds


def close_received(fds: Sequence[int], method: str) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError as e:  # closed by someone else: a bug, and maybe another fd's number
            log.error("bug: %s: a received fd (%d) was closed already: %s", method, fd, e)


# -- the method


def guarded(
    method: Callable[P, Coroutine[Any, Any, T]],
) -> Callable[P, Coroutine[Any, Any, T]]:
    """Answer BrokerErrors as they are; log anything else with its traceback
    as the bug it is, and answer with a generic error instead of its text."""

    @functools.wraps(method)
    async def call(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await method(*args, **kwargs)
        except BrokerError:
            raise
        except Exception as e:
            raise bug(method.__qualname__, e) from e

    return call


def bug(what: str, error: Exception) -> InternalError:
    """Log ``error`` as a bug in ``what``; the error to answer instead."""
    log.error("bug: %s failed", what, exc_info=error)
    return InternalError(
        f"vfiod failed unexpectedly ({type(error).__name__}); this is a bug, logged in "
        "vfiod's journal: please report it"
    )


@dataclasses.dataclass(frozen=True)
class _Served:
    """What serving one method needs, worked out once."""

    name: str
    input_signature: str
    result_signature: str
    results: int  # complete types in the result
    check: MessageCheck | None
    call: Callable[..., Coroutine[Any, Any, Any]]


class VfiodMethod(DbusMethodAsync):
    """A served vfiod method (see the module docstring); as a proxy, sdbus's."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.served = _Served(
            name=self.method_name,
            input_signature=self.input_signature,
            result_signature=self.result_signature,
            results=len(complete_types(self.result_signature)),
            check=MessageCheck.of(self.input_signature),
            call=guarded(self.original_method),
        )

    @overload
    def __get__(self, obj: None, obj_class: type[DbusInterfaceBaseAsync]) -> DbusMethodAsync: ...

    @overload
    def __get__(
        self, obj: DbusInterfaceBaseAsync, obj_class: type[DbusInterfaceBaseAsync]
    ) -> Callable[..., Any]: ...

    def __get__(
        self,
        obj: DbusInterfaceBaseAsync | None,
        obj_class: type[DbusInterfaceBaseAsync] | None = None,
    ) -> Callable[..., Any] | DbusMethodAsync:
        if obj is None or isinstance(obj._dbus, DbusRemoteObjectMeta):
            return super().__get__(obj, obj_class)  # type: ignore[arg-type]
        sd_bus()  # fail when exporting with an sdbus whose messages cannot be checked
        return _LocalVfiodMethod(self, obj)


class _LocalVfiodMethod(DbusLocalMethodAsync):
    def __init__(self, method: VfiodMethod, local_object: DbusInterfaceBaseAsync) -> None:
        super().__init__(method, local_object)
        self.served = method.served

    def _dbus_reply_call(self, request_message: SdBusMessage) -> None:
        """sd-bus dispatches a call: refuse it if it cannot be read whole
        (nothing is parsed, nothing duplicated); else answer it in a task."""
        method = self.served
        check = method.check
        if check is not None:
            refusal = check.refusal(request_message)
            if refusal is not None:
                log.warning(
                    "refused a %s call from %s: %s",
                    method.name,
                    request_message.sender,
                    refusal,
                )
                if request_message.expect_reply:
                    request_message.create_error_reply(
                        InvalidArgument.dbus_name,
                        f"{method.name}: the message cannot be read ({refusal}): an fd "
                        "index past the fds it carries, or a key given twice; nothing was done",
                    ).send()
                return
        # As sdbus does it, and one callback more: a call whose task is
        # cancelled (its object unexported: a lease freed meanwhile, even
        # before the task started; or vfiod stopping) is still answered.
        local_object = self.local_object_ref()
        if local_object is None:
            raise RuntimeError("Local object no longer exists!")
        local_meta = local_object._dbus
        if not isinstance(local_meta, DbusLocalObjectMeta):
            raise RuntimeError("D-Bus object is a remote proxy!")
        answer = _Answer(request_message, method.name)
        task = asyncio.get_running_loop().create_task(self._answer(local_object, answer))
        local_meta.tasks.add(task)
        task.add_done_callback(local_meta.tasks.discard)
        task.add_done_callback(answer.cancelled)

    async def _answer(self, local_object: DbusInterfaceBaseAsync, answer: _Answer) -> None:
        method = self.served
        request_message = answer.request
        try:
            result = await self._call(local_object, request_message)
        except BrokerError as e:
            name, text = e.dbus_name, e.message
            forget_frames(e)
        else:
            if not request_message.expect_reply:
                return
            try:
                reply = request_message.create_reply()
                if method.results == 1:
                    reply.append_data(method.result_signature, result)
                elif method.results > 1:
                    reply.append_data(method.result_signature, *result)
                answer.send(reply)
                return
            except Exception as e:
                error = bug(f"the reply to {method.name}", e)
                name, text = error.dbus_name, error.message
                forget_frames(e)
        if request_message.expect_reply:
            answer.send(request_message.create_error_reply(name, text))

    async def _call(
        self, local_object: DbusInterfaceBaseAsync, request_message: SdBusMessage
    ) -> Any:
        method = self.served
        CURRENT_MESSAGE.set(request_message)
        try:
            args = request_message.parse_to_tuple()
        except Exception as e:  # it was read whole already: the host (fds, memory), not the caller
            raise bug(f"parsing a {method.name} call", e) from e
        fds = received_fds(method.input_signature, args) if method.check is not None else []
        try:
            return await method.call(local_object, *args)
        finally:
            close_received(fds, method.name)


def forget_frames(error: BaseException) -> None:
    """Drop the frames an answered error (and the errors it came from) hold.
    A refusal raised where a frame keeps it (a local variable) makes a cycle
    through every frame it passed, this method's included: they would hold
    the call's message, and the fds it carries, until the garbage collector
    runs."""
    stack: list[BaseException | None] = [error]
    seen: set[int] = set()
    while stack:
        found = stack.pop()
        if found is None or id(found) in seen:
            continue
        seen.add(id(found))
        found.__traceback__ = None
        stack += [found.__cause__, found.__context__]


class _Answer:
    """The answer to one call, sent once."""

    def __init__(self, request: SdBusMessage, method: str) -> None:
        self.request = request
        self.method = method
        self.sent = False

    def send(self, reply: SdBusMessage) -> None:
        self.sent = True
        reply.send()

    def cancelled(self, task: asyncio.Task[None]) -> None:
        """sdbus cancels the calls in flight on an object it unexports, and
        leaves their callers waiting for their timeout: answer them."""
        if not task.cancelled() or self.sent or not self.request.expect_reply:
            return
        with contextlib.suppress(Exception):  # the bus may be closing
            self.send(
                self.request.create_error_reply(
                    NotFound.dbus_name,
                    f"{self.request.path} went away during the {self.method} call (a lease "
                    "that ended, or vfiod stopping); look it up again",
                )
            )


def vfiod_method(
    input_signature: str = "",
    result_signature: str = "",
    *,
    input_args_names: Sequence[str] | None = None,
    result_args_names: Sequence[str] | None = None,
    method_name: str | None = None,
    flags: int = DbusUnprivilegedFlag,
) -> Callable[[T], T]:
    """As sdbus's dbus_method_async, for a method vfiod serves. Unprivileged
    by default: sd-bus refuses other callers than root otherwise."""

    def decorate(original: T) -> T:
        method = VfiodMethod(
            original_method=original,
            method_name=method_name,
            input_signature=input_signature,
            result_signature=result_signature,
            input_args_names=input_args_names,
            result_args_names=result_args_names,
            flags=flags,
        )
        return method  # type: ignore[return-value]

    return decorate
