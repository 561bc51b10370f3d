"""Scale: how vfiod grows with the devices of a host and with the leases it
holds, each series against its own baseline measured in the same run.

Devices: vfiod on fake hosts of 256, 1,024, 4,096 and 16,384 devices (two
functions per IOMMU group, so half as many groups), and on one of 2 (the
baseline: the interpreter, the imports, the bus).

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
  and the imports, which the small host's whole start shows). The start
  "on a host", which the targets judge, is the baseline's spawn to fake
  host built (the interpreter and the imports) plus vfiod's own start.
- GetManagedObjects, as a client (uid 65534, its own process): the round
  trip until the reply is in, first call and p50 of the rest; decoding the
  reply into Python values (sdbus) is a client-side cost, printed beside
  it. The project client's ``inventory()`` (Manager.GetInventory, decoded
  into its dataclasses), first call and p50 of the rest.
- memory: the daemon's VmRSS after the calls, and its peak (VmHWM).
- growth: each figure per 1,000 devices between one host and the next
  (flat when the cost is linear).

Leases: one vfiod on a host with a group for each lease and 32 more; a
client (uid 65534) takes leases until 100, 1,000 and 10,000 are held, and
at each step (and with none) another client times Acquire + Release
cycles on the 32 free groups, as bench.warm_acquire does. Printed per
step: the cycle's p50 and its ratio to the cycle with no lease held, what
taking the leases of the step cost each, the daemon's RSS and fds, and the
size of its state file and journal.

Targets (DESIGN.md section 8 and the scale issue): at 4,096 devices start
<= 2 s, GetManagedObjects <= 200 ms, RSS <= 100 MB, Client.inventory() <=
100 ms; at 16,384 devices start <= 4 s and RSS <= 250 MB; the cycle with
1,000 leases held <= 1.2 x the cycle with none.

    python -m bench.scale [--devices N,N,...] [--baseline-devices N] [--calls N]
                          [--leases N,N,...] [--cycles N]
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from bench.common import (
    POLICY,
    bench_bus,
    machine,
    memory,
    p50,
    ready_after_start,
    ready_at,
    started_at,
)
from bench.warm_acquire import _CYCLES, WARMUP
from tests.bus import NOBODY
from tests.bus.vfiod import FDS_PER_LEASE, Clients, run_vfiod
from tests.fakehost import scale_address
from vfiod.state import JOURNAL_SUFFIX

DEVICES = (256, 1024, 4096, 16384)
LEASES = (0, 100, 1000, 10000)
CYCLING_GROUPS = 32  # free groups the cycles take in turn, beyond the held ones

TARGET_START = {4096: 2.0, 16384: 4.0}  # seconds
TARGET_OBJECTS = 0.2  # seconds, at 4,096 devices
TARGET_INVENTORY = 0.1  # seconds, at 4,096 devices
TARGET_RSS = {4096: 100_000_000, 16384: 250_000_000}  # bytes
TARGET_HELD_RATIO = 1.2  # at 1,000 leases

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
inventories = []
for _ in range(calls):
    start = clock()
    inventory = vfiod.inventory()
    inventories.append(clock() - start)
say({
    "round_trips": round_trips,
    "decodes": decodes,
    "objects": objects,
    "inventories": inventories,
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
    inventories: list[float]  # Client.inventory(), first call first
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

    @property
    def inventory_p50(self) -> float:
        return statistics.median(self.inventories[1:] or self.inventories)


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
        inventories=[float(t) for t in result["inventories"]],
        ready_rss=ready_rss,
        rss=rss["VmRSS"],
        peak_rss=rss["VmHWM"],
    )


# After the CLIENT prelude: for each line (a number), take leases of the first
# function of the next groups of a scale host until that many are held.
_HOLD_UP_TO = """\
backend, held = sys.argv[1], 0
for line in sys.stdin:
    wanted = int(line)
    start = time.perf_counter()
    while held < wanted:
        lease = vfiod.acquire([str(scale_address(2 * held))], backend=backend, open_devices=False)
        lease.close()  # vfiod keeps its own; the lease follows this connection
        held += 1
    say({"held": held, "seconds": time.perf_counter() - start})
"""


@dataclasses.dataclass(frozen=True)
class LeaseStep:
    leases: int  # held during the cycles
    cycle: list[float]  # Acquire + Release, seconds each
    taking_s: float  # taking this step's new leases, all of them
    taken: int  # how many that was
    rss: int
    fds: int  # the daemon's open fds
    state_bytes: int  # state.json and its journal

    @property
    def cycle_p50(self) -> float:
        return p50(self.cycle)


@dataclasses.dataclass(frozen=True)
class Figures:
    hosts: list[HostFigures]  # by devices; the baseline first
    steps: list[LeaseStep]  # by leases held; the first with none
    held_backend: str  # of the held leases
    machine: str

    @property
    def baseline(self) -> HostFigures:
        return self.hosts[0]

    def host(self, devices: int) -> HostFigures | None:
        return next((h for h in self.hosts[1:] if h.devices == devices), None)

    def step(self, leases: int) -> LeaseStep | None:
        return next((s for s in self.steps if s.leases == leases), None)


def measure_leases(steps: Sequence[int], cycles: int, backend: str) -> list[LeaseStep]:
    """One vfiod; the leases held grow step by step, the cycles run at each."""
    most = max(steps)
    cycling = [str(scale_address(2 * (most + i))) for i in range(CYCLING_GROUPS)]
    with bench_bus() as (bus, directory):
        host = f"scale:{2 * (most + CYCLING_GROUPS)}"
        with run_vfiod(bus, directory / "vfiod", POLICY, host, list_fd_store=False) as daemon:
            holding = "from tests.fakehost import scale_address\n" + _HOLD_UP_TO
            holder = Clients(bus).spawn(holding, backend)
            found: list[LeaseStep] = []
            held = 0
            try:
                for leases in sorted(steps):
                    holder.send(str(leases))
                    taken = holder.read(timeout=60 + (leases - held) * 0.05)
                    if taken["held"] != leases:
                        raise RuntimeError(f"the holder got {taken['held']} of {leases} leases")
                    result = Clients(bus).run(
                        _CYCLES,
                        str(cycles),
                        str(WARMUP),
                        "legacy",
                        *cycling,
                        timeout=60 + cycles * 0.05,
                    )
                    found.append(
                        LeaseStep(
                            leases=leases,
                            cycle=[
                                a + r
                                for a, r in zip(result["acquire"], result["release"], strict=True)
                            ],
                            taking_s=float(taken["seconds"]),
                            taken=leases - held,
                            rss=memory(daemon.pid)["VmRSS"],
                            fds=len(os.listdir(f"/proc/{daemon.pid}/fd")),
                            state_bytes=_size(daemon.state_path)
                            + _size(Path(str(daemon.state_path) + JOURNAL_SUFFIX)),
                        )
                    )
                    held = leases
                holder.finish(timeout=60 + held * 0.01)  # its stdin closes: it ends
            finally:
                if holder.process.poll() is None:
                    holder.kill()
    return found


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _backend_for(leases: int) -> str:
    """The backend of the held leases: legacy (a container and a group fd
    each, in vfiod and in the stand-in fd store, which inherit this
    process's limit) when the hard RLIMIT_NOFILE allows it or root may raise
    it (as systemd's LimitNOFILE= does for the unit), else iommufd (one fd
    each)."""
    needed = FDS_PER_LEASE["legacy"] * leases + 4096
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < needed:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (needed, needed))
        except (ValueError, OSError):  # no CAP_SYS_RESOURCE (a container)
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            return "iommufd"
    elif soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return "legacy"


def run(
    devices: Sequence[int] = DEVICES,
    baseline_devices: int = 2,
    calls: int = 10,
    leases: Sequence[int] = LEASES,
    cycles: int = 500,
) -> Figures:
    if calls < 2:
        raise ValueError("calls: at least 2 (the first is reported on its own)")
    if leases and 0 not in leases:
        raise ValueError("leases: the series starts with 0 (the cycles' baseline)")
    backend = _backend_for(max(leases)) if leases else "legacy"
    hosts = [measure(n, calls) for n in (baseline_devices, *sorted(devices))]
    steps = measure_leases(leases, cycles, backend) if leases else []
    return Figures(hosts, steps, backend, machine())


def _verdict(met: bool) -> str:
    return "met" if met else "MISSED"


def report(f: Figures) -> str:
    lines = [_devices_report(f)] if len(f.hosts) > 1 else []
    if f.steps:
        lines.append(_leases_report(f))
    lines.append(f"  machine: {f.machine}")
    return "\n".join(lines)


def _devices_report(f: Figures) -> str:
    base, hosts = f.baseline, f.hosts[1:]
    scales = {"": (1, 0), "s": (1, 2), "ms": (1e3, 1), "MB": (1e-6, 1)}

    def row(label: str, value: Callable[[HostFigures], float | None], unit: str) -> str:
        scale, digits = scales[unit]
        cells = []
        for h in (base, *hosts):
            v = value(h)
            cells.append(f"{'-':>9}" if v is None else f"{v * scale:>9.{digits}f}")
        return f"  {label + (f' ({unit})' if unit else ''):<46}" + "".join(cells)

    def growth(label: str, value: Callable[[HostFigures], float], unit: str) -> str:
        scale, digits = scales[unit]
        cells = [f"{'':>9}", f"{'':>9}"]
        for a, b in itertools.pairwise(hosts):
            per = (value(b) - value(a)) / ((b.devices - a.devices) / 1000)
            cells.append(f"{per * scale:>9.{digits}f}")
        return f"  {label + (f' ({unit})' if unit else ''):<46}" + "".join(cells)

    def host_start(h: HostFigures) -> float:
        # What a real host's start would be: the interpreter and the imports
        # (the baseline's spawn -> built: its fake host is two devices), then
        # vfiod's own part; the fake host's build is the harness's.
        return base.built_s + h.vfiod_start_s

    header = "".join(f"{h.devices:>9}" for h in (base, *hosts))
    lines = [
        f"scale, devices: vfiod on fake hosts (two functions per IOMMU group); "
        f"baseline {base.devices} devices; clients uid {NOBODY}",
        f"  {'devices':<46}{header}",
        row("objects exported", lambda h: h.objects, ""),
        row("spawn -> READY=1 (notify socket)", lambda h: h.start_s, "s"),
        row("  spawn -> fake host built (harness)", lambda h: h.built_s, "s"),
        row("  fake host built -> READY=1 (vfiod)", lambda h: h.vfiod_start_s, "s"),
        row("  the daemon's log: ready ... after start", lambda h: h.logged_start_s, "s"),
        row("start on a host (no fake host's build)", host_start, "s"),
        row("GetManagedObjects, first call", lambda h: h.first_call, "ms"),
        row("GetManagedObjects, p50 of the rest", lambda h: h.call_p50, "ms"),
        row("  client decoding the reply (sdbus), p50", lambda h: h.decode_p50, "ms"),
        row("Client.inventory(), first call", lambda h: h.inventories[0], "ms"),
        row("Client.inventory(), p50 of the rest", lambda h: h.inventory_p50, "ms"),
        row("daemon VmRSS at READY=1", lambda h: h.ready_rss, "MB"),
        row("daemon VmRSS after the calls", lambda h: h.rss, "MB"),
        row("daemon VmHWM (peak RSS)", lambda h: h.peak_rss, "MB"),
        "  growth per 1,000 devices, from the host before:",
        growth("  vfiod's start", lambda h: h.vfiod_start_s, "s"),
        growth("  GetManagedObjects p50", lambda h: h.call_p50, "ms"),
        growth("  Client.inventory() p50", lambda h: h.inventory_p50, "ms"),
        growth("  VmRSS after the calls", lambda h: h.rss, "MB"),
    ]
    for devices, target in sorted(TARGET_START.items()):
        h = f.host(devices)
        if h is not None:
            lines.append(
                f"  target: start at {devices} devices <= {target:g} s (on a host): "
                f"{host_start(h):.2f} s, {_verdict(host_start(h) <= target)}"
            )
    for devices, rss in sorted(TARGET_RSS.items()):
        h = f.host(devices)
        if h is not None:
            lines.append(
                f"  target: RSS at {devices} devices <= {rss / 1e6:g} MB: "
                f"{h.rss / 1e6:.1f} MB, {_verdict(h.rss <= rss)}"
            )
    h = f.host(4096)
    if h is not None:
        lines.append(
            f"  target: GetManagedObjects at 4096 devices <= {TARGET_OBJECTS * 1e3:g} ms: "
            f"{h.call_p50 * 1e3:.1f} ms, {_verdict(h.call_p50 <= TARGET_OBJECTS)}"
        )
        lines.append(
            f"  target: Client.inventory() at 4096 devices <= {TARGET_INVENTORY * 1e3:g} ms: "
            f"{h.inventory_p50 * 1e3:.1f} ms, {_verdict(h.inventory_p50 <= TARGET_INVENTORY)}"
        )
    return "\n".join(lines)


def _leases_report(f: Figures) -> str:
    none = f.steps[0]
    lines = [
        f"scale, leases: one vfiod, {f.held_backend} leases of one group each held by one "
        "client; "
        f"{len(none.cycle)} Acquire + Release cycles on {CYCLING_GROUPS} free groups at each step",
        f"  {'leases held':>11} {'cycle p50':>10} {'x none':>7} {'taking each':>12} "
        f"{'VmRSS':>9} {'fds':>7} {'state':>9}",
    ]
    for s in f.steps:
        taking = f"{s.taking_s / s.taken * 1e3:9.2f} ms" if s.taken else f"{'-':>12}"
        lines.append(
            f"  {s.leases:>11} {s.cycle_p50 * 1e3:7.2f} ms {s.cycle_p50 / none.cycle_p50:6.2f}x "
            f"{taking} {s.rss / 1e6:6.1f} MB {s.fds:>7} {s.state_bytes / 1e3:6.1f} kB"
        )
    step = f.step(1000)
    if step is not None:
        ratio = step.cycle_p50 / none.cycle_p50
        lines.append(
            f"  target: cycle with 1000 leases held <= {TARGET_HELD_RATIO} x none: "
            f"{ratio:.2f}, {_verdict(ratio <= TARGET_HELD_RATIO)}"
        )
    return "\n".join(lines)


def _numbers(text: str) -> list[int]:
    return [int(n) for n in text.split(",") if n.strip()]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__)
    parser.add_argument("--devices", type=_numbers, default=list(DEVICES), help="host sizes")
    parser.add_argument("--baseline-devices", type=int, default=2)
    parser.add_argument("--calls", type=int, default=10, help="GetManagedObjects calls")
    parser.add_argument("--leases", type=_numbers, default=list(LEASES), help="leases held")
    parser.add_argument("--cycles", type=int, default=500, help="cycles at each lease step")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args(argv)
    figures = run(args.devices, args.baseline_devices, args.calls, args.leases, args.cycles)
    if args.json:
        print(json.dumps(dataclasses.asdict(figures)))
    else:
        print(report(figures))


if __name__ == "__main__":
    main(sys.argv[1:])
