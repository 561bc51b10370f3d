"""Slow rebinds: what other callers wait while one client's managed Acquire
moves a two-device IOMMU group whose unbinds take S seconds each (a GPU's
take seconds), and again while its Release gives them back.

A fake host whose every unbind waits S (tests.fakehost.SlowSysfs), vfiod on a
private bus. A client as uid 65534 acquires the bridged e1000 pair (group 4:
two unbinds to move, two to restore) and releases it; meanwhile this process,
on a connection of its own, calls Peer.Ping, GetManagedObjects and
CheckAccess over and over. The baseline is the same calls with nothing
moving, in the same run. Reported per S: the slowest and the median of each
call while the group moves and while it goes back, as a ratio to the
baseline median, and the requester's own Acquire time (about 2 S).

Target: no call waits on another's rebind (before the worker threads, each
stalled for the whole binding: 2 S; see the README).

    python -m bench.slow_rebind [--unbind 0.5,2] [--baseline-calls N]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from collections.abc import Callable

from bench.bus_baseline import percentile
from bench.common import bench_bus, machine
from tests.bus.vfiod import Clients, run_vfiod
from tests.fakehost import E1000_A, E1000_B, NIC
from vfiod.client import Client, _call

POLICY = """
[[rule]]
name = "bench-nobody"
effect = "allow"
address = "0000:02:0[12].0"
users = ["nobody"]
managed = true
companions = true
"""

# After the CLIENT prelude (tests.bus.vfiod): acquire, say so, wait for a
# line, release, say so.
_HOLDER = """\
began = time.monotonic()
lease = vfiod.acquire(sys.argv[1:], managed=True)
say({"acquired": time.monotonic() - began})
sys.stdin.readline()
lease.close()
began = time.monotonic()
vfiod.release(lease)
say({"released": time.monotonic() - began})
"""

CALLS: dict[str, Callable[[Client], object]] = {
    "Ping": lambda c: c._send(_call(c.bus, "org.freedesktop.DBus.Peer", "Ping")),
    "GetManagedObjects": lambda c: c.inventory(),
    "CheckAccess": lambda c: c.check_access([str(NIC)]),
}


@dataclasses.dataclass(frozen=True)
class Phase:
    """Latencies of each call, in seconds."""

    latencies: dict[str, list[float]]

    def worst(self, call: str) -> float:
        return max(self.latencies[call])

    def median(self, call: str) -> float:
        return statistics.median(self.latencies[call])


@dataclasses.dataclass(frozen=True)
class Figures:
    unbind: float
    baseline: Phase
    moving: Phase
    restoring: Phase
    acquire: float  # the requester's Acquire, seconds
    release: float
    machine: str


def _calls_until(client: Client, done: Callable[[], bool], at_least: int = 1) -> Phase:
    latencies: dict[str, list[float]] = {name: [] for name in CALLS}
    rounds = 0
    while rounds < at_least or not done():
        for name, call in CALLS.items():
            began = time.monotonic()
            call(client)
            latencies[name].append(time.monotonic() - began)
        rounds += 1
    return Phase(latencies)


def run(unbind: float, baseline_calls: int = 50) -> Figures:
    with (
        bench_bus() as (bus, directory),
        run_vfiod(bus, directory / "vfiod", POLICY, slow_unbind=unbind) as daemon,
        Client(bus.connect()) as observer,
    ):
        count = iter(range(baseline_calls))
        baseline = _calls_until(observer, lambda: next(count, None) is None)
        holder = Clients(bus).spawn(_HOLDER, str(E1000_A), str(E1000_B))
        try:
            # (driver_override is set just before the unbind)
            daemon.wait_for(
                lambda: daemon.sysfs.driver_override(E1000_A) == "vfio-pci",
                "the first unbind",
                timeout=30,
            )
            moving = _calls_until(observer, lambda: daemon.driver(str(E1000_B)) == "vfio-pci")
            acquired = holder.read(timeout=10 * unbind + 30)["acquired"]
            holder.send()
            restoring = _calls_until(observer, lambda: daemon.driver(str(E1000_B)) == "e1000")
            released = holder.read(timeout=10 * unbind + 30)["released"]
            holder.finish()
        finally:
            if holder.process.poll() is None:
                holder.kill()
    return Figures(unbind, baseline, moving, restoring, acquired, released, machine())


def report(figures: Figures) -> str:
    base = figures.baseline
    lines = [
        f"unbinds of {figures.unbind:g} s: the requester's Acquire took "
        f"{figures.acquire:.2f} s, its Release {figures.release:.2f} s "
        "(vfiod answers it within its second; the devices go back after)",
        "  baseline (nothing moving): "
        + ", ".join(
            f"{c} p50 {base.median(c) * 1e3:.2f} ms p90 "
            f"{percentile(base.latencies[c], 0.9) * 1e3:.2f} ms"
            for c in CALLS
        ),
    ]
    for label, phase in (
        ("while the group moves", figures.moving),
        ("while it goes back", figures.restoring),
    ):
        parts = []
        for call in CALLS:
            parts.append(
                f"{call} {len(phase.latencies[call])} calls, p50 {phase.median(call) * 1e3:.2f} ms "
                f"({phase.median(call) / base.median(call):.1f} x), slowest "
                f"{phase.worst(call) * 1e3:.1f} ms ({phase.worst(call) / base.median(call):.1f} x)"
            )
        lines.append(f"  {label}: " + "; ".join(parts))
    stall = max(p.worst(c) for p in (figures.moving, figures.restoring) for c in CALLS)
    lines.append(
        f"  longest wait of another caller: {stall * 1e3:.1f} ms, "
        f"{stall / (2 * figures.unbind):.3f} of the 2 x {figures.unbind:g} s a stalled loop "
        "would make it wait"
    )
    lines.append(f"  ({figures.machine})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.slow_rebind")
    parser.add_argument("--unbind", default="0.5,2", help="seconds per unbind, comma-separated")
    parser.add_argument("--baseline-calls", type=int, default=50)
    args = parser.parse_args(argv)
    for seconds in (float(s) for s in args.unbind.split(",")):
        print(report(run(seconds, args.baseline_calls)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
