"""The systemd service protocol, in the standard library: sd_notify(3)
messages (with fds for the fd store), the watchdog interval, and fds passed
back at start (sd_listen_fds_with_names(3)).

Everything is a no-op outside systemd (no $NOTIFY_SOCKET), so the daemon runs
the same by hand, under D-Bus activation without systemd, and in tests.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping, Sequence

LISTEN_FDS_START = 3

log = logging.getLogger(__name__)


def _address() -> str | None:
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return None
    # A leading @ names a socket in the abstract namespace.
    return "\0" + address[1:] if address.startswith("@") else address


def notify(*assignments: str, fds: Sequence[int] = ()) -> bool:
    """Send "KEY=value" lines (and fds, for FDSTORE=1) to the service
    manager. Returns False when there is none to tell."""
    address = _address()
    if address is None:
        return False
    message = "\n".join(assignments).encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.connect(address)
            if fds:
                socket.send_fds(sock, [message], list(fds))
            else:
                sock.sendall(message)
        except OSError as e:
            # Like sd_notify(3): the manager going away is not the daemon's failure.
            log.warning("telling the service manager %s failed: %s", assignments[0], e)
            return False
    return True


def watchdog_interval() -> float | None:
    """Seconds between keep-alives (half of WatchdogSec=), or None when the
    watchdog is off or meant for another process."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 2_000_000
    except ValueError:
        return None


def listen_fds(environ: Mapping[str, str] | None = None) -> dict[str, list[int]]:
    """Fds the service manager passed at start (the fd store after a
    restart), by name; several may share one name. Marks them close-on-exec."""
    env = os.environ if environ is None else environ
    if env.get("LISTEN_PID") != str(os.getpid()):
        return {}
    try:
        count = int(env.get("LISTEN_FDS", "0"))
    except ValueError:
        return {}
    names = env.get("LISTEN_FDNAMES", "").split(":") if count else []
    passed: dict[str, list[int]] = {}
    for i in range(count):
        fd = LISTEN_FDS_START + i
        os.set_inheritable(fd, False)
        name = names[i] if i < len(names) and names[i] else "unknown"
        passed.setdefault(name, []).append(fd)
    return passed
