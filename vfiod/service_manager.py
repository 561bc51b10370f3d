"""What vfiod needs from systemd beyond sd_notify: the fd store that carries
leases across a restart, and whether a SIGTERM means "restart" or "stop".

A restart (``systemctl restart``, or Restart= after a crash) keeps the fd
store, so vfiod leaves its leases as they are and the next process adopts
them. A stop empties it, so vfiod ends every lease and gives devices back
first. systemd tells the two apart only through the job it is running on
the unit; vfiod asks for it over the system bus.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

from sdbus.sd_bus_internals import SdBus

from vfiod import notify
from vfiod.bus.credentials import SYSTEMD, systemd_property

log = logging.getLogger(__name__)

RESTART_JOBS = frozenset({"restart", "try-restart", "reload-or-restart", "reload-or-try-restart"})


SCM_MAX_FD = 253  # the kernel's limit of fds in one message


class SystemdFdStore:
    """FDSTORE=1 / FDSTOREREMOVE=1 with FDNAME=; a no-op outside systemd.
    systemd gives every fd of one message the message's FDNAME, so a
    lease's fds go in one message (or a few, past SCM_MAX_FD)."""

    def keep(self, name: str, fds: Sequence[int]) -> None:
        for at in range(0, len(fds), SCM_MAX_FD):
            notify.notify("FDSTORE=1", f"FDNAME={name}", fds=fds[at : at + SCM_MAX_FD])

    def drop(self, name: str) -> None:
        notify.notify("FDSTOREREMOVE=1", f"FDNAME={name}")


def own_unit(proc: str = "/proc") -> str | None:
    """vfiod's own unit, from its own cgroup path (which nobody else names)."""
    try:
        with open(os.path.join(proc, "self/cgroup")) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    path = next((line.split(":", 2)[2] for line in lines if line.startswith("0::")), "")
    units = [p for p in path.split("/") if p.endswith((".service", ".scope"))]
    return units[-1] if units else None


async def pending_job(bus: SdBus, unit: str | None = None) -> str | None:
    """The type of the job systemd runs on our unit now ("restart", "stop",
    ...), or None (no job, no systemd, or no unit of ours)."""
    if unit is None:
        unit = own_unit()
    if unit is None or not os.environ.get("NOTIFY_SOCKET"):
        return None
    try:
        message = bus.new_method_call_message(
            SYSTEMD, "/org/freedesktop/systemd1", f"{SYSTEMD}.Manager", "GetUnit"
        )
        message.append_data("s", unit)
        unit_path = str((await bus.call_async(message)).get_contents())
        _job_id, job_path = await systemd_property(bus, unit_path, f"{SYSTEMD}.Unit", "Job")
        if job_path == "/":
            return None
        return str(await systemd_property(bus, job_path, f"{SYSTEMD}.Job", "JobType"))
    except Exception as e:
        log.warning("cannot ask systemd why vfiod is stopping (%s); ending leases", e)
        return None
