"""Driving the bus a few messages at a time, so that no caller waits on
everyone else's calls.

sdbus drives a bus from asyncio with ``SdBus.process``, which runs
sd_bus_process until nothing is queued. What sd-bus answers inside it
(GetManagedObjects, Properties.Get and GetAll, Introspect: thousands of
property reads on a large host) never yields, so a few clients calling it
back to back keep that loop running for good, and every method that awaits
(Acquire, Release), every timer and the SIGTERM handler wait with it:
two clients looping GetManagedObjects at 4,096 devices kept 20 Acquire +
Release cycles from ending within 300 s, and vfiod from stopping.

FairLoop hands every callback that is an SdBus's ``process`` (on the bus's
fd, its timer fd, and call_soon) to a FairDriver instead, which dispatches at
most BATCH messages, then lets the loop run what is ready before it goes
on. Once nothing is queued it calls ``process`` itself, for sdbus to update
its watchers (only ``process`` does, and the write queue and the timer need
them). That ``process`` still runs until nothing is queued: a message that
arrives between the two is dispatched by it, and should a flood keep the
queue from ever emptying from then on, it would hold the loop again.
Updating the watchers without it needs sdbus's help (not in 0.14.3).
"""

from __future__ import annotations

import asyncio
import contextvars
import errno
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVarTuple, Unpack, cast

from sdbus.sd_bus_internals import SdBus

from vfiod.bus.subtree import bus_pointer, sd_bus_calls

if TYPE_CHECKING:
    from _typeshed import FileDescriptorLike

Ts = TypeVarTuple("Ts")

BATCH = 1  # messages dispatched before the loop runs what else is ready
_CLOSED = (errno.ECONNRESET, errno.ENOTCONN)


class FairDriver:
    """sd_bus_process for one bus, BATCH messages at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop, bus: SdBus) -> None:
        self._loop = loop
        self._bus = bus
        self._pointer = bus_pointer(bus)
        self._process = sd_bus_calls().process
        self._again = False

    def __call__(self) -> None:
        self._again = False
        for _ in range(BATCH):
            result = self._process(self._pointer, None)  # (a Python error raised in it: raised)
            if result == 0:
                break
            if result < 0:
                if -result in _CLOSED:
                    return
                raise OSError(-result, f"sd_bus_process: {os.strerror(-result)}")
        else:  # more may be queued: after what the loop has ready
            if not self._again:
                self._again = True
                self._loop.call_soon(self)
            return
        self._bus.process()


class FairLoop(asyncio.SelectorEventLoop):
    """An event loop that drives sdbus buses with a FairDriver each."""

    def __init__(self) -> None:
        super().__init__()
        self._drivers: dict[SdBus, FairDriver] = {}

    def _fair(self, callback: Callable[[Unpack[Ts]], object]) -> Callable[[Unpack[Ts]], object]:
        bus = getattr(callback, "__self__", None)
        if type(bus) is not SdBus or getattr(callback, "__name__", "") != "process":
            return callback
        driver = self._drivers.get(bus)
        if driver is None:
            driver = self._drivers[bus] = FairDriver(self, bus)
        # (process takes no arguments, nor does the driver)
        return cast(Callable[[Unpack[Ts]], object], driver)

    def add_reader(
        self, fd: FileDescriptorLike, callback: Callable[[Unpack[Ts]], Any], *args: *Ts
    ) -> None:
        super().add_reader(fd, self._fair(callback), *args)

    def add_writer(
        self, fd: FileDescriptorLike, callback: Callable[[Unpack[Ts]], Any], *args: *Ts
    ) -> None:
        super().add_writer(fd, self._fair(callback), *args)

    def call_soon(
        self,
        callback: Callable[[Unpack[Ts]], object],
        *args: *Ts,
        context: contextvars.Context | None = None,
    ) -> asyncio.Handle:
        return super().call_soon(self._fair(callback), *args, context=context)

    def close(self) -> None:
        self._drivers.clear()
        super().close()
