"""What the broker benchmarks share: a private system bus in a fresh
directory, the policy they run under, and ways to look at the daemon process
(its fds, its memory, when it said it was ready).

The directory is on /dev/shm when there is one: vfiod keeps its state file
in /run, a tmpfs on every systemd host, and the fake host keeps it in the
benchmark's directory, so a tmpfs there makes each state write (and its
fsync) cost what it costs in production rather than what a disk-backed
temporary directory costs.
"""

from __future__ import annotations

import collections
import contextlib
import os
import re
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from bench.bus_baseline import percentile
from tests.bus import PrivateBus, require_tools, start_private_bus
from tests.bus.vfiod import NOBODY_ANY_POLICY, VfiodProcess

# Every device to nobody, without managed binding: the scale hosts start
# with every device on vfio-pci, so each acquire is a warm one.
POLICY = NOBODY_ANY_POLICY

SHM = Path("/dev/shm")  # noqa: S108 (a fresh mkdtemp directory in it, see above)
_READY = re.compile(r"ready ([0-9.]+) s after start")


@contextlib.contextmanager
def bench_bus() -> Iterator[tuple[PrivateBus, Path]]:
    """A private system bus and a fresh directory (0700, removed afterwards)
    for the daemon's files; see the module docstring for where."""
    require_tools()
    parent = str(SHM) if SHM.is_dir() and os.access(SHM, os.W_OK) else None
    with (
        tempfile.TemporaryDirectory(prefix="vfiod-bench-", dir=parent) as name,
        start_private_bus(Path(name) / "bus") as bus,
    ):
        yield bus, Path(name)


def memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process, in bytes."""
    found: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                number, unit = value.split()
                assert unit == "kB", line
                found[key] = int(number) * 1024
    return found


def settled_fds(daemon: VfiodProcess, timeout: float = 5.0) -> list[str]:
    """The daemon's fds once two looks 50 ms apart agree (right after READY
    it may still hold a transient one)."""
    deadline = time.monotonic() + timeout
    last = daemon.fds()
    while True:
        time.sleep(0.05)
        now = daemon.fds()
        if sorted(now) == sorted(last) or time.monotonic() > deadline:
            return now
        last = now


def leaked_fds(daemon: VfiodProcess, before: list[str], timeout: float = 3.0) -> list[str]:
    """The fds the daemon holds now that it did not hold `before`, by what
    they are (a socket's inode included: one closed and another opened in its
    place is a leak too), after giving draining leases `timeout` seconds (the
    daemon rechecks them every 0.5 s) to be freed."""
    deadline = time.monotonic() + timeout
    while True:
        extra = collections.Counter(daemon.fds()) - collections.Counter(before)
        if not extra or time.monotonic() > deadline:
            return sorted(extra.elements())
        time.sleep(0.1)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (clock-tick resolution)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine() -> str:
    """The CPUs and the load when a benchmark ran: others' load skews it."""
    one, five, _ = os.getloadavg()
    return f"{os.cpu_count()} CPUs, load average {one:.2f} (1 min), {five:.2f} (5 min)"


def started_at(pid: int) -> float:
    """When a process was started (forked), on the wall clock (time.time()),
    from /proc's start time in clock ticks since boot."""
    with open(f"/proc/{pid}/stat") as f:
        ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    boot = time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def ready_at(daemon: VfiodProcess) -> float | None:
    """When the service manager's side of the notify socket wrote READY=1
    down, on the wall clock: its notices file changes with each message, so
    right after READY=1 its modification time is READY's. None without the
    file (a harness that keeps the notices in memory)."""
    try:
        return (daemon.directory / "notices.log").stat().st_mtime
    except FileNotFoundError:
        return None


def ready_after_start(daemon: VfiodProcess) -> float | None:
    """What the daemon logged as its start time ("ready X s after start":
    from its process start, by /proc ticks, to READY=1)."""
    found = _READY.search(daemon.log())
    return float(found.group(1)) if found else None


def us(seconds: float) -> str:
    return f"{seconds * 1e6:.0f} us"


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms"


def mib(size: int) -> str:
    return f"{size / (1 << 20):.1f} MiB"


def p50(times: list[float]) -> float:
    return percentile(times, 0.5)


def p90(times: list[float]) -> float:
    return percentile(times, 0.9)
