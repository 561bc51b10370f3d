"""The daemon: the host, the broker and the bus on one asyncio loop.

Start: policy, inventory scan, leases of an earlier run (adopted with their
fds from systemd's fd store, or drained), objects exported, bus name owned,
then READY=1. Runs until SIGTERM/SIGINT;
SIGHUP (``systemctl reload``) re-reads the policy.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import logging
import os
import signal
import time
from collections.abc import Callable, Coroutine
from typing import Any

from sdbus import sd_bus_open_system
from sdbus.sd_bus_internals import SdBus

from vfiod import notify, service_manager
from vfiod.broker import Broker, FdStore, LeaseState
from vfiod.bus.credentials import BusDriver, Callers, SystemdUnits
from vfiod.bus.fair import FairLoop
from vfiod.bus.service import BusService
from vfiod.host.binding import Binder, CriticalDevices, ModuleLoader, modprobe
from vfiod.host.hwdb import HardwareDatabase
from vfiod.host.process import raise_fd_limit
from vfiod.host.sysfs import Sysfs
from vfiod.host.watcher import Host, UEventMonitor
from vfiod.policy.load import PolicyError, PolicyHolder
from vfiod.polkit import PolkitAuthority
from vfiod.service_manager import SystemdFdStore
from vfiod.state import STATE_PATH, StateError, StateFile
from vfiod.vfio import Kernel, LinuxKernel
from vfiod.worker import ThreadWorker

log = logging.getLogger(__name__)

BUS_NAME = "org.vfiod1"
DRAIN_INTERVAL = 0.5  # seconds between checks whether draining groups are free
CRITICAL_INTERVAL = 10.0  # seconds between rescans of host-critical devices
STOP_DRAIN_TIME = 5.0  # seconds a stopping vfiod waits for ended leases to become free


class StartupError(Exception):
    """vfiod cannot start; the message says why and what to do."""


@dataclasses.dataclass
class Parts:
    """What the daemon runs on: the real host by default, a fake one in tests."""

    sysfs: Sysfs = dataclasses.field(default_factory=Sysfs)
    kernel: Kernel = dataclasses.field(default_factory=LinuxKernel)
    state: StateFile = dataclasses.field(default_factory=lambda: StateFile(STATE_PATH))
    policy_root: str = "/"
    dev_vfio: str = "/dev/vfio"
    proc: str = "/proc"
    hwdb: bool = True  # describe devices from the udev hardware database
    hotplug: bool = True  # follow uevents
    udev_rules: bool = True  # write reservations' udev rules under policy_root
    load_module: ModuleLoader = modprobe
    critical: Callable[[], CriticalDevices] | None = None  # None: scan the real host
    open_bus: Callable[[], SdBus] = sd_bus_open_system
    fd_store: FdStore = dataclasses.field(default_factory=SystemdFdStore)
    stored_fds: Callable[[], dict[str, list[int]]] = notify.listen_fds


def _process_start() -> float:
    """When this process started, on the CLOCK_BOOTTIME scale (so "ready in"
    counts the interpreter's start and imports too)."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        return ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.clock_gettime(time.CLOCK_BOOTTIME)


class LoopProcessWatcher:
    """Process exits, from pidfds becoming readable on the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop

    def watch(self, pidfd: int, on_exit: Callable[[], None]) -> Callable[[], None]:
        def exited() -> None:
            self.loop.remove_reader(pidfd)
            on_exit()

        def stop() -> None:
            self.loop.remove_reader(pidfd)

        self.loop.add_reader(pidfd, exited)
        return stop


async def _every(seconds: float, action: Callable[[], object]) -> None:
    while True:
        await asyncio.sleep(seconds)
        try:
            done = action()
            if inspect.isawaitable(done):
                await done
        except Exception:
            log.exception("bug: periodic %s failed", getattr(action, "__name__", action))


class Daemon:
    def __init__(self, parts: Parts) -> None:
        self.parts = parts
        self.stop = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []
        self.hwdb: HardwareDatabase | None = None
        self.monitor: UEventMonitor | None = None
        self.bus: SdBus | None = None
        self.service: BusService | None = None
        self.broker: Broker | None = None
        self.worker: ThreadWorker | None = None
        self.started = _process_start()
        self.repaired = ""  # what start-up had to repair, for the status line

    def _status(self, text: str) -> None:
        notify.notify(f"STATUS={text}")

    def build(self) -> Broker:
        parts = self.parts
        log.debug("up to %d fds", raise_fd_limit())
        policy = PolicyHolder(parts.policy_root)
        if policy.error is not None:
            log.error(
                "the policy has errors; vfiod denies everything until they are fixed: %s",
                policy.error,
            )
        for warning in policy.warnings:
            log.warning("policy: %s", warning)
        # Under D-Bus activation without systemd nobody made /run/vfiod (tmpfiles).
        os.makedirs(os.path.dirname(parts.state.path) or ".", mode=0o700, exist_ok=True)
        try:
            parts.state.load()  # a damaged file is repaired (and said so) here
        except StateError as e:
            raise StartupError(
                f"cannot read vfiod's state ({e}); fix that (vfiod will not start afresh "
                "over records of devices it moved)"
            ) from e
        if parts.state.problems:
            self.repaired = (
                f"state file repaired ({len(parts.state.problems)} problem(s); the damaged "
                f"one is kept as {parts.state.moved_aside})"
            )
        self._status("scanning PCI devices")
        binder = Binder(
            parts.sysfs, parts.state, load_module=parts.load_module, critical=parts.critical
        )
        self.hwdb = HardwareDatabase() if parts.hwdb else None
        if parts.hotplug:
            # Listen before the scan, so nothing that changes during it is lost.
            self.monitor = UEventMonitor()
        host = Host(parts.sysfs, parts.state, self.hwdb)
        self.worker = ThreadWorker(asyncio.get_running_loop())
        self.broker = Broker(
            host,
            binder,
            parts.kernel,
            policy,
            LoopProcessWatcher(asyncio.get_running_loop()),
            fd_store=parts.fd_store,
            dev_vfio=parts.dev_vfio,
            proc=parts.proc,
            worker=self.worker,
            udev_root=parts.policy_root if parts.udev_rules else None,
        )
        self.broker.recover(parts.stored_fds())
        return self.broker

    async def start(self) -> None:
        broker = self.build()
        self.bus = self.parts.open_bus()
        driver = BusDriver.new_proxy("org.freedesktop.DBus", "/org/freedesktop/DBus", self.bus)
        callers = Callers(driver, SystemdUnits(self.bus), self.parts.proc)
        broker.authority = PolkitAuthority(self.bus)
        self.service = BusService(broker, self.bus, callers)
        self.service.export()
        self.tasks.append(asyncio.create_task(self._watch_names(driver, callers)))
        try:
            await self.bus.request_name_async(BUS_NAME, 0)
        except Exception as e:
            raise StartupError(
                f"cannot own {BUS_NAME} on the system bus ({e}): is another vfiod running, "
                "is vfiod running as root, and is dbus/org.vfiod1.conf installed in "
                "/usr/share/dbus-1/system.d?"
            ) from e
        await self._check_owners(driver)
        # Ended leases whose clients still held fds: free them once they let go.
        self.tasks.append(asyncio.create_task(_every(DRAIN_INTERVAL, broker.drain)))
        self.tasks.append(
            asyncio.create_task(_every(CRITICAL_INTERVAL, self.service.refresh_critical))
        )
        if self.monitor is not None:
            self.tasks.append(asyncio.create_task(broker.host.run(self.monitor)))
        interval = notify.watchdog_interval()
        if interval is not None:
            self.tasks.append(asyncio.create_task(_every(interval, self._keep_alive)))
        inventory = broker.host.inventory
        status = (
            f"serving {len(inventory.devices)} PCI devices in {len(inventory.groups)} IOMMU "
            f"groups; {len(broker.leases)} lease(s)"
            + (f"; {self.repaired}" if self.repaired else "")
        )
        started = time.clock_gettime(time.CLOCK_BOOTTIME) - self.started
        log.info("ready %.2f s after start: %s", started, status)
        notify.notify("READY=1", f"STATUS={status}")

    async def _check_owners(self, driver: BusDriver) -> None:
        """Leases adopted after a restart whose caller's connection closed
        while vfiod was down end now (those following a process are watched)."""
        assert self.broker is not None
        for lease in list(self.broker.leases.values()):
            follows_connection = lease.state is LeaseState.ACTIVE and lease.owner_pidfd is None
            if follows_connection and not await driver.name_has_owner(lease.owner):
                self.broker.end(lease, f"its bus connection {lease.owner} closed")

    async def _drain_for(self, seconds: float) -> None:
        """Give ended leases up to ``seconds`` to become free (their fds leave
        the fd store asynchronously; clients may be closing theirs). What is
        still busy then is given back at the next start."""
        assert self.broker is not None
        deadline = time.monotonic() + seconds
        while self.broker.busy and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
            self.broker.drain()
        for lease in self.broker.leases.values():
            log.warning(
                "lease %s is still held by its client; its devices are given back at the next "
                "start",
                lease.id,
            )

    @staticmethod
    def _keep_alive() -> None:
        notify.notify("WATCHDOG=1")

    async def _watch_names(self, driver: BusDriver, callers: Callers) -> None:
        assert self.broker is not None
        async for name, _old, new in driver.name_owner_changed.catch():
            if name.startswith(":") and not new:
                callers.forget(name)
                self.broker.end_owner(name, f"its bus connection {name} closed")

    def reload(self) -> None:
        if self.service is None:
            log.warning("asked to reload before vfiod was ready; the policy read at start stands")
            return
        notify.notify("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")
        try:
            self.service.reload()
        except PolicyError as e:
            log.error("policy not reloaded, the previous one stays in force: %s", e)
        notify.notify("READY=1", "STATUS=policy reloaded")

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.stop.set)
        loop.add_signal_handler(signal.SIGINT, self.stop.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        try:
            await self.start()
            await self.stop.wait()
        finally:
            restarting = (
                self.bus is not None and await service_manager.pending_job(self.bus)
            ) in service_manager.RESTART_JOBS
            await self.close(keep_leases=restarting)
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(signum)

    async def close(self, *, keep_leases: bool = False) -> None:
        """Stop: end every lease and give devices back; or, when systemd
        restarts vfiod and keeps the fds, leave the leases to the next process."""
        if self.broker is not None:
            if keep_leases:
                kept = self.broker.abandon()
                notify.notify("STOPPING=1", f"STATUS=restarting: {kept} lease(s) kept")
                log.info("restarting: %d lease(s) stay with their fds in systemd's fd store", kept)
            else:
                notify.notify("STOPPING=1", "STATUS=stopping: ending leases")
                self.broker.shutdown()
                await self._drain_for(STOP_DRAIN_TIME)
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.tasks.clear()
        if self.service is not None:
            self.service.close()
        if self.bus is not None:
            self.bus.close()
        if self.monitor is not None:
            self.monitor.close()
        if self.hwdb is not None:
            self.hwdb.close()
        if self.worker is not None:
            # A sysfs write in progress cannot be interrupted: wait for it
            # (the request it serves has been stopped, and undoes itself).
            await asyncio.get_running_loop().run_in_executor(None, self.worker.close)


def run(parts: Parts, main: Callable[[Daemon], Coroutine[Any, Any, None]] | None = None) -> None:
    daemon = Daemon(parts)
    # (FairLoop: no caller's calls keep the others' from being served.)
    with asyncio.Runner(loop_factory=FairLoop) as runner:
        runner.run(main(daemon) if main is not None else daemon.run())
