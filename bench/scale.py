"""Scale: vfiod on a fake host of 4,096 devices in 2,048 IOMMU groups, against
the same measurements on a small host (scale:2, one group), in the same run.

- start: from spawning the daemon process to READY=1 on the notify socket
  the harness holds (the way systemd sees it: interpreter start, imports,
  the fake host's build, the inventory scan, exporting every object, owning
  the bus name). The daemon's own figure ("ready X s after start" in its
  log, from its process start by /proc ticks) is printed too, and so is the
  time to build the same fake host in this process: the fake host is built
  by the daemon process before vfiod's start, so that much of the start is
  the test harness's, not vfiod's.
- GetManagedObjects, as a client (uid 65534, its own process): the round
  trip until the reply is in, first call and p50 of the rest; decoding the
  reply into Python values (sdbus) and the project client's
  ``inventory()`` are client-side costs, printed beside it.
- memory: the daemon's VmRSS after the calls, and its peak (VmHWM).

Targets (DESIGN.md section 8) at 4,096 devices: start <= 2 s,
GetManagedObjects <= 200 ms, RSS <= 100 MB.

    python -m bench.scale [--devices N] [--baseline-devices N] [--calls N]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.common import (
    POLICY,
    SHM,
    bench_bus,
    memory,
    ready_after_start,
)
from tests.bus import NOBODY
from tests.bus.vfiod import Clients, run_vfiod
from tests.fakehost import build

TARGET_START = 2.0  # seconds
TARGET_OBJECTS = 0.2  # seconds
TARGET_RSS = 100_000_000  # bytes

# After the CLIENT prelude (tests.bus.vfiod): raw calls, to tell the round
# trip from decoding, then the project client's inventory().
_GET_OBJECTS = """\
import sdbus
bus = sdbus.sd_bus_open_system()
calls = int(sys.argv[1])
clock = time.perf_counter
round_trips, decodes, objects = [], [], 0
for _ in range(calls):
    message = bus.new_method_call_message(
        "org.vfiod1", "/org/vfiod1", "org.freedesktop.DBus.ObjectManager", "GetManagedObjects"
    )
    start = clock()
    reply = bus.call(message)
    received = clock()
    objects = len(reply.get_contents())
    decoded = clock()
    round_trips.append(received - start)
    decodes.append(decoded - received)
start = clock()
inventory = vfiod.inventory()
inventory_s = clock() - start
say({
    "round_trips": round_trips,
    "decodes": decodes,
    "objects": objects,
    "inventory_s": inventory_s,
    "devices": len(inventory.devices),
    "groups": len(inventory.groups),
})
"""


@dataclasses.dataclass(frozen=True)
class HostFigures:
    devices: int
    groups: int
    objects: int  # what GetManagedObjects returned
    start_s: float  # spawn to READY=1, seen on the notify socket
    logged_start_s: float | None  # the daemon's own "ready X s after start"
    build_s: float  # building the same fake host in this process
    round_trips: list[float]  # GetManagedObjects, first call first
    decodes: list[float]
    inventory_s: float
    rss: int  # after the calls
    peak_rss: int

    @property
    def first_call(self) -> float:
        return self.round_trips[0]

    @property
    def call_p50(self) -> float:
        rest = self.round_trips[1:] or self.round_trips
        return statistics.median(rest)

    @property
    def decode_p50(self) -> float:
        return statistics.median(self.decodes)


@dataclasses.dataclass(frozen=True)
class Figures:
    big: HostFigures
    small: HostFigures


def time_build(devices: int) -> float:
    """Seconds to build the fake host of scale:`devices` in this process."""
    parent = str(SHM) if SHM.is_dir() else None
    with tempfile.TemporaryDirectory(prefix="vfiod-bench-host-", dir=parent) as name:
        start = time.perf_counter()
        build(Path(name) / "host", f"scale:{devices}")
        return time.perf_counter() - start


def measure(devices: int, calls: int) -> HostFigures:
    with bench_bus() as (bus, directory):
        start = time.monotonic()
        with run_vfiod(bus, directory / "vfiod", POLICY, f"scale:{devices}") as daemon:
            started = time.monotonic() - start
            result = Clients(bus).run(_GET_OBJECTS, str(calls), timeout=120 + calls * 10)
            rss = memory(daemon.pid)
            logged = ready_after_start(daemon)
    return HostFigures(
        devices=int(result["devices"]),
        groups=int(result["groups"]),
        objects=int(result["objects"]),
        start_s=started,
        logged_start_s=logged,
        build_s=time_build(devices),
        round_trips=[float(t) for t in result["round_trips"]],
        decodes=[float(t) for t in result["decodes"]],
        inventory_s=float(result["inventory_s"]),
        rss=rss["VmRSS"],
        peak_rss=rss["VmHWM"],
    )


def run(devices: int = 4096, baseline_devices: int = 2, calls: int = 10) -> Figures:
    if calls < 2:
        raise ValueError("calls: at least 2 (the first is reported on its own)")
    small = measure(baseline_devices, calls)
    big = measure(devices, calls)
    return Figures(big, small)


def _verdict(value: float, target: float) -> str:
    return "met" if value <= target else "MISSED"


def report(f: Figures) -> str:
    big, small = f.big, f.small
    width = 12

    def row(label: str, a: float, b: float, unit: str, scale: float, target: str = "") -> str:
        ratio = f"{b / a:8.1f} x" if a > 0 else " " * 10
        return (
            f"  {label:<44} {a * scale:>{width - 3}.1f} {unit:<2} "
            f"{b * scale:>{width - 3}.1f} {unit:<2} {ratio}  {target}"
        )

    def logged(h: HostFigures) -> float:
        return h.logged_start_s if h.logged_start_s is not None else float("nan")

    head = f"scale:{small.devices}", f"scale:{big.devices}"
    lines = [
        f"scale: vfiod on a fake host of {big.devices} devices in {big.groups} groups "
        f"({big.objects} objects), baseline {small.devices} devices in {small.groups} "
        f"group(s); client uid {NOBODY}",
        f"  {'':<44} {head[0]:>{width}} {head[1]:>{width}} {'ratio':>10}  target",
        row(
            "spawn -> READY=1 (notify socket)",
            small.start_s,
            big.start_s,
            "s",
            1,
            f"<= {TARGET_START:g} s: {_verdict(big.start_s, TARGET_START)}",
        ),
        row("  the daemon's log: ready ... after start", logged(small), logged(big), "s", 1),
        row("  of which building the fake host (harness)", small.build_s, big.build_s, "s", 1),
        row(
            "  spawn -> READY=1 less the fake host",
            small.start_s - small.build_s,
            big.start_s - big.build_s,
            "s",
            1,
        ),
        row("GetManagedObjects, first call", small.first_call, big.first_call, "ms", 1e3),
        row(
            f"GetManagedObjects, p50 of {len(big.round_trips) - 1} more",
            small.call_p50,
            big.call_p50,
            "ms",
            1e3,
            f"<= {TARGET_OBJECTS * 1e3:g} ms: {_verdict(big.call_p50, TARGET_OBJECTS)}",
        ),
        row("  client: decoding the reply (sdbus), p50", small.decode_p50, big.decode_p50, "ms", 1e3),
        row("  client: Client.inventory(), whole", small.inventory_s, big.inventory_s, "ms", 1e3),
        row(
            "daemon VmRSS after the calls",
            small.rss,
            big.rss,
            "MB",
            1e-6,
            f"<= {TARGET_RSS / 1e6:g} MB: {_verdict(big.rss, TARGET_RSS)}",
        ),
        row("daemon VmHWM (peak RSS)", small.peak_rss, big.peak_rss, "MB", 1e-6),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__)
    parser.add_argument("--devices", type=int, default=4096)
    parser.add_argument("--baseline-devices", type=int, default=2)
    parser.add_argument("--calls", type=int, default=10, help="GetManagedObjects calls")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args(argv)
    figures = run(args.devices, args.baseline_devices, args.calls)
    if args.json:
        print(json.dumps({"big": dataclasses.asdict(figures.big), "small": dataclasses.asdict(figures.small)}))
    else:
        print(report(figures))


if __name__ == "__main__":
    main(sys.argv[1:])
