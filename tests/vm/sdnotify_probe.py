"""A tiny service that proves the systemd namespace harness
(tests/vm/systemd_ns.py) the way vfiod will use systemd: Type=notify, D-Bus
activated, an fd kept in the fd store across restarts, reload by
RELOADING=1/READY=1, journal entries with a MESSAGE_ID.

Run by systemd as `python -m tests.vm.sdnotify_probe`. On start it looks
for the fd named FDNAME among the fds systemd passed (LISTEN_FDNAMES): found,
it reads the token in it; not found, it makes a memfd holding a new token
and stores it (FDSTORE=1). Then it owns NAME on the system bus, logs
MESSAGE_STARTED and says READY=1. SIGHUP reloads, SIGTERM stops.
`Status()` answers (token, adopted, reloads, pid).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import uuid
from pathlib import Path

import sdbus
from sdbus import DbusInterfaceCommonAsync, dbus_method_async

from tests.vm.systemd_ns import (
    journal_send,
    listen_fds,
    notify,
    notify_ready,
    notify_reloading,
    store_fds,
)

NAME = "org.vfiod1.test.Probe"
INTERFACE = NAME
OBJECT_PATH = "/org/vfiod1/test/Probe"
UNIT = "vfiod-test-probe.service"
FDNAME = "x"
MESSAGE_STARTED = "1f269a8b75d34d93bd16ad9c4cf8f7d3"
MESSAGE_RELOADED = "2b8c07aeada54d0f97208b2f262b833b"
RELOAD_SECONDS_VARIABLE = "PROBE_RELOAD_SECONDS"

PROJECT = Path(__file__).resolve().parents[2]

# Root owns the name; anyone may call the probe's interface and Peer.
BUS_POLICY = f"""\
<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <policy user="root">
    <allow own="{NAME}"/>
  </policy>
  <policy context="default">
    <allow send_destination="{NAME}" send_interface="{INTERFACE}"/>
    <allow send_destination="{NAME}" send_interface="org.freedesktop.DBus.Peer"/>
  </policy>
</busconfig>
"""

ACTIVATION = f"""\
[D-BUS Service]
Name={NAME}
Exec=/bin/false
User=root
SystemdService={UNIT}
"""


def unit_text(reload_seconds: float = 0.0) -> str:
    """The probe's unit; a reload takes `reload_seconds` between RELOADING=1
    and READY=1 (so that the reloading state can be seen)."""
    return f"""\
[Unit]
Description=vfiod test probe (Type=notify, fd store, reload, journal)
StartLimitIntervalSec=0

[Service]
Type=notify
NotifyAccess=main
ExecStart={sys.executable} -s -m tests.vm.sdnotify_probe
ExecReload=/bin/kill -HUP $MAINPID
WorkingDirectory={PROJECT}
Environment=PYTHONPATH={PROJECT} PYTHONDONTWRITEBYTECODE=1
Environment={RELOAD_SECONDS_VARIABLE}={reload_seconds}
FileDescriptorStoreMax=4
Restart=on-failure
RestartSec=100ms
TimeoutStartSec=120
"""


def main() -> None:
    asyncio.run(_serve())


async def _serve() -> None:
    passed = listen_fds()
    stored = passed.pop(FDNAME, [])
    for fds in passed.values():  # nothing else is expected; do not leak it
        for fd in fds:
            os.close(fd)
    if stored:
        fd = stored[0]
        token = os.pread(fd, 64, 0).decode()
        adopted = True
    else:
        fd = os.memfd_create("probe-token", os.MFD_CLOEXEC)
        token = uuid.uuid4().hex
        os.write(fd, token.encode())
        store_fds(FDNAME, fd)
        adopted = False
    reloads = 0
    reload_seconds = float(os.environ.get(RELOAD_SECONDS_VARIABLE, "0"))

    class Probe(DbusInterfaceCommonAsync, interface_name=INTERFACE):
        @dbus_method_async(result_signature="sbuu")
        async def status(self) -> tuple[str, bool, int, int]:
            return token, adopted, reloads, os.getpid()

    async def reload() -> None:
        nonlocal reloads
        notify_reloading()
        await asyncio.sleep(reload_seconds)
        reloads += 1
        journal_send(
            f"probe reloaded ({reloads})",
            MESSAGE_ID=MESSAGE_RELOADED,
            PROBE_TOKEN=token,
            PROBE_RELOADS=str(reloads),
        )
        notify_ready(f"reloaded {reloads} times")

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    tasks: set[asyncio.Task[None]] = set()

    def on_hangup() -> None:
        task = loop.create_task(reload())
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGHUP, on_hangup)

    bus = sdbus.sd_bus_open_system()
    probe = Probe()
    try:
        with probe.export_to_dbus(OBJECT_PATH, bus):
            await bus.request_name_async(NAME, 0)
            journal_send(
                f"probe started ({'adopted the stored fd' if adopted else 'stored a new fd'})",
                MESSAGE_ID=MESSAGE_STARTED,
                PROBE_TOKEN=token,
                PROBE_ADOPTED="1" if adopted else "0",
            )
            notify_ready(f"token {token}")
            await stop.wait()
            notify("STOPPING=1")
    finally:
        bus.close()
        os.close(fd)


if __name__ == "__main__":
    main()
