"""Scale: vfiod on a fake host of 4,096 devices in 2,048 IOMMU groups, against
the same measurements on a small host (scale:2, one group), in the same run.

- start: from spawning the daemon process (its start time in /proc, in
  clock ticks) to READY=1 reaching the notify socket the harness serves
  (the modification time of the file its listener writes the messages
  down in): the way systemd sees it, with the interpreter's start, the
  imports, the fake host's build, the inventory scan, exporting every
  object and owning the bus name. The fake host is built by the daemon
  process itself, before vfiod starts, so that much of the start is the
  test harness's: the fake host writes the policy file last, and its
  modification time splits the start into "spawn to fake host built" and
  "fake host built to READY" (vfiod's own start, but for the interpreter
  and the imports, which the small host's whole start shows). Printed too:
  the daemon's own figure ("ready X s after start" in its log, from its
  process start to just before it sends READY=1) and how long the harness
  took to see READY (it starts the listener first, then polls).
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
import time
from collections.abc import Callable

from bench.common import (
    POLICY,
    bench_bus,
    machine,
    memory,
    ready_after_start,
    ready_at,
    started_at,
)
from tests.bus import NOBODY
from tests.bus.vfiod import Clients, run_vfiod

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
    start_s: float  # spawn to READY=1 on the notify socket
    built_s: float  # spawn to the fake host built (its policy file written)
    logged_start_s: float | None  # the daemon's own "ready X s after start"
    harness_s: float  # run_vfiod() entered to READY=1 seen by the harness
    round_trips: list[float]  # GetManagedObjects, first call first
    decodes: list[float]
    inventory_s: float
    ready_rss: int  # VmRSS at READY=1
    rss: int  # VmRSS after the calls
    peak_rss: int  # VmHWM after the calls

    @property
    def vfiod_start_s(self) -> float:
        return self.start_s - self.built_s

    @property
    def first_call(self) -> float:
        return self.round_trips[0]

    @property
    def call_p50(self) -> float:
        return statistics.median(self.round_trips[1:] or self.round_trips)

    @property
    def decode_p50(self) -> float:
        return statistics.median(self.decodes)


@dataclasses.dataclass(frozen=True)
class Figures:
    big: HostFigures
    small: HostFigures
    machine: str


def measure(devices: int, calls: int) -> HostFigures:
    with bench_bus() as (bus, directory):
        entered = time.time()  # the wall clock, as /proc's start time and mtimes
        with run_vfiod(bus, directory / "vfiod", POLICY, f"scale:{devices}") as daemon:
            seen = time.time()
            spawned = started_at(daemon.pid)
            ready = ready_at(daemon)
            started = (seen if ready is None else ready) - spawned
            built = daemon.policy_file.stat().st_mtime - spawned
            ready_rss = memory(daemon.pid)["VmRSS"]
            result = Clients(bus).run(_GET_OBJECTS, str(calls), timeout=120 + calls * 10)
            rss = memory(daemon.pid)
            logged = ready_after_start(daemon)
    return HostFigures(
        devices=int(result["devices"]),
        groups=int(result["groups"]),
        objects=int(result["objects"]),
        start_s=started,
        built_s=built,
        logged_start_s=logged,
        harness_s=seen - entered,
        round_trips=[float(t) for t in result["round_trips"]],
        decodes=[float(t) for t in result["decodes"]],
        inventory_s=float(result["inventory_s"]),
        ready_rss=ready_rss,
        rss=rss["VmRSS"],
        peak_rss=rss["VmHWM"],
    )


def run(devices: int = 4096, baseline_devices: int = 2, calls: int = 10) -> Figures:
    if calls < 2:
        raise ValueError("calls: at least 2 (the first is reported on its own)")
    small = measure(baseline_devices, calls)
    big = measure(devices, calls)
    return Figures(big, small, machine())


def _verdict(value: float, target: float, unit: str, scale: float) -> str:
    return f"<= {target * scale:g} {unit}: {'met' if value <= target else 'MISSED'}"


def report(f: Figures) -> str:
    big, small = f.big, f.small

    def row(
        label: str, value: Callable[[HostFigures], float | None], unit: str, target: str = ""
    ) -> str:
        scale, digits = {"s": (1, 2), "ms": (1e3, 1), "MB": (1e-6, 1)}[unit]
        a, b = value(small), value(big)
        if a is None or b is None:
            return f"  {label:<42} {'-':>11} {'-':>11}"
        ratio = f"{b / a:9.1f} x" if a > 0 else " " * 11
        return (
            f"  {label:<42} {a * scale:>8.{digits}f} {unit:<2} "
            f"{b * scale:>8.{digits}f} {unit:<2} {ratio}  {target}"
        ).rstrip()

    return "\n".join(
        [
            f"scale: vfiod on a fake host of {big.devices} devices in {big.groups} IOMMU groups "
            f"({big.objects} objects), baseline {small.devices} devices in {small.groups} "
            f"group(s); clients uid {NOBODY}",
            f"  {'':<42} {f'scale:{small.devices}':>11} {f'scale:{big.devices}':>11} "
            f"{'ratio':>11}  target",
            row(
                "spawn -> READY=1 (notify socket)",
                lambda h: h.start_s,
                "s",
                _verdict(big.start_s, TARGET_START, "s", 1),
            ),
            row("  spawn -> fake host built (harness)", lambda h: h.built_s, "s"),
            row("  fake host built -> READY=1 (vfiod)", lambda h: h.vfiod_start_s, "s"),
            row("  the daemon's log: ready ... after start", lambda h: h.logged_start_s, "s"),
            row("  harness: run_vfiod() to READY=1 seen", lambda h: h.harness_s, "s"),
            row("GetManagedObjects, first call", lambda h: h.first_call, "ms"),
            row(
                f"GetManagedObjects, p50 of {len(big.round_trips) - 1} more",
                lambda h: h.call_p50,
                "ms",
                _verdict(big.call_p50, TARGET_OBJECTS, "ms", 1e3),
            ),
            row("  client decoding the reply (sdbus), p50", lambda h: h.decode_p50, "ms"),
            row("  client Client.inventory(), all of it", lambda h: h.inventory_s, "ms"),
            row("daemon VmRSS at READY=1", lambda h: h.ready_rss, "MB"),
            row(
                "daemon VmRSS after the calls",
                lambda h: h.rss,
                "MB",
                _verdict(big.rss, TARGET_RSS, "MB", 1e-6),
            ),
            row("daemon VmHWM (peak RSS)", lambda h: h.peak_rss, "MB"),
            f"  machine: {f.machine}",
        ]
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__)
    parser.add_argument("--devices", type=int, default=4096)
    parser.add_argument("--baseline-devices", type=int, default=2)
    parser.add_argument("--calls", type=int, default=10, help="GetManagedObjects calls")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args(argv)
    figures = run(args.devices, args.baseline_devices, args.calls)
    if args.json:
        print(json.dumps(dataclasses.asdict(figures)))
    else:
        print(report(figures))


if __name__ == "__main__":
    main(sys.argv[1:])
