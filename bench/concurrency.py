"""Concurrency: 64 clients, each its own bus connection, each doing 100
Acquire + Release cycles of a device of its own (one IOMMU group each: a
``scale:128`` fake host has 64 groups of two functions), all at once; then
the same clients doing the bare fd call (bench.bus_baseline's service)
instead, on the same private bus, in the same run.

An op is one Acquire + Release cycle (two round trips), and for the
baseline two bare calls, the same two round trips. Throughput: all ops over
the time from the first client's first call to the last client's last one.
Checked: no call failed, every client did all its ops, and the daemon holds
no fd afterwards that it did not hold before, by identity (what each fd is,
socket inodes included; draining leases given 3 s to be freed).

Clients run as uid 65534, one process per client by default, as 64 VMMs
would be, every client an ``AsyncClient`` on a connection of its own (the
daemon tells callers apart by connection). ``--processes N`` shares N
processes among the clients instead, with an asyncio loop each: that spends
less of the two cores on interpreters and flatters vfiod (by about a
quarter here), so it is for comparing, not the figure. Every process waits,
connected and warmed up (one CheckAccess per client), until all are, before
the clock starts.

Target (DESIGN.md section 8): no error, no leaked fd, >= 1,000 ops/s.

    python -m bench.concurrency [--clients N] [--cycles N] [--processes N]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from bench.bus_baseline import percentile
from bench.common import POLICY, bench_bus, cpu_seconds, leaked_fds, machine, settled_fds
from tests.bus import MANAGER_INTERFACE, NAME, NOBODY, TEST_PATH, PrivateBus, run_fd_service
from tests.bus.vfiod import Clients, Spawned, run_vfiod
from tests.fakehost import scale_address

TARGET_OPS = 1000.0
START_TIMEOUT = 120.0

# After the CLIENT prelude (tests.bus.vfiod). argv: cycles, then a device per
# client. Prints "ready" once every client is connected and has called
# once, starts on a line on stdin, prints its figures as JSON.
_BODY = """\
import asyncio
import sdbus
from vfiod.client import AsyncClient

cycles, devices = int(sys.argv[1]), sys.argv[2:]

async def client(connection, device):
    latencies, errors = [], []
    clock = time.monotonic
    start = clock()
    for _ in range(cycles):
        began = clock()
        try:
            await op(connection, device)
        except Exception as e:
            errors.append(f"{type(e).__name__}: {e}")
        else:
            latencies.append(clock() - began)
    end = clock()
    return {"start": start, "end": end, "latencies": latencies, "errors": errors}

async def main():
    connections = [sdbus.sd_bus_open_system() for _ in devices]
    await asyncio.gather(*(warm_up(c, d) for c, d in zip(connections, devices)))
    say("ready")
    await asyncio.to_thread(sys.stdin.readline)
    say(await asyncio.gather(*(client(c, d) for c, d in zip(connections, devices))))
    for connection in connections:
        connection.close()
"""

_VFIOD = """\
async def warm_up(connection, device):
    await AsyncClient(connection).check_access([device])

async def op(connection, device):
    vfiod = AsyncClient(connection)
    lease = await vfiod.acquire([device])
    lease.close()
    await vfiod.release(lease)
"""

_BARE = f"""\
def open_fd(connection):
    return connection.new_method_call_message(
        {NAME!r}, {TEST_PATH!r}, {MANAGER_INTERFACE!r}, "OpenFd"
    )

async def warm_up(connection, device):
    os.close((await connection.call_async(open_fd(connection))).get_contents())

async def op(connection, device):
    for _ in range(2):
        os.close((await connection.call_async(open_fd(connection))).get_contents())
"""

_RUN = """
asyncio.run(main())
"""


@dataclasses.dataclass(frozen=True)
class Run:
    """One kind of client, all clients together."""

    ops: int
    seconds: float  # first client's start to last client's end
    latencies: list[float]  # of each op that succeeded
    errors: list[str]
    service_cpu: float  # CPU seconds per op of the service (vfiod, or the test service)
    bus_cpu: float  # and of dbus-daemon

    @property
    def throughput(self) -> float:
        return self.ops / self.seconds


@dataclasses.dataclass(frozen=True)
class Figures:
    clients: int
    cycles: int
    processes: int
    vfiod: Run
    baseline: Run
    fds_before: int
    leaked: list[str]
    machine: str


def _split(items: list[str], parts: int) -> list[list[str]]:
    return [items[i::parts] for i in range(parts) if items[i::parts]]


def run_clients(
    bus: PrivateBus, service: int, body: str, cycles: int, devices: list[str], processes: int
) -> Run:
    """Start the client processes, wait for all to be ready, start them
    together, collect what they measured, and what CPU the service (pid
    `service`) and dbus-daemon spent meanwhile."""
    nobody = Clients(bus, NOBODY)
    spawned: list[Spawned] = []
    try:
        for share in _split(devices, processes):
            spawned.append(nobody.spawn(_BODY + body + _RUN, str(cycles), *share))
        for process in spawned:
            said = process.read(timeout=START_TIMEOUT)
            assert said == "ready", said
        service_cpu, bus_cpu = cpu_seconds(service), cpu_seconds(bus.pid)
        for process in spawned:
            process.send("go")
        results = [
            client
            for process in spawned
            for client in process.read(timeout=START_TIMEOUT + cycles * len(devices))
        ]
        service_cpu, bus_cpu = cpu_seconds(service) - service_cpu, cpu_seconds(bus.pid) - bus_cpu
        for process in spawned:
            process.finish()
    except BaseException:
        for process in spawned:
            if process.process.poll() is None:
                process.kill()
        raise
    latencies = [float(t) for r in results for t in r["latencies"]]
    ops = cycles * len(devices)
    return Run(
        ops=len(latencies),
        seconds=max(r["end"] for r in results) - min(r["start"] for r in results),
        latencies=latencies,
        errors=[str(e) for r in results for e in r["errors"]],
        service_cpu=service_cpu / ops,
        bus_cpu=bus_cpu / ops,
    )


def run(clients: int = 64, cycles: int = 100, processes: int | None = None) -> Figures:
    processes = clients if processes is None else max(1, min(processes, clients))
    # Function 0 of group i, for client i: every client its own group.
    devices = [str(scale_address(2 * i)) for i in range(clients)]
    with bench_bus() as (bus, directory):
        with run_fd_service(bus) as service:
            baseline = run_clients(bus, service.pid, _BARE, cycles, devices, processes)
        with run_vfiod(bus, directory / "vfiod", POLICY, f"scale:{2 * clients}") as daemon:
            before = settled_fds(daemon)
            measured = run_clients(bus, daemon.pid, _VFIOD, cycles, devices, processes)
            leaked = leaked_fds(daemon, before)
    return Figures(clients, cycles, processes, measured, baseline, len(before), leaked, machine())


def _describe(label: str, r: Run, expected: int, service: str) -> str:
    latency = (
        f"op p50 {percentile(r.latencies, 0.5) * 1e3:.1f} ms, "
        f"p90 {percentile(r.latencies, 0.9) * 1e3:.1f} ms"
        if len(r.latencies) >= 2
        else "no latencies"
    )
    return (
        f"  {label:<34} {r.ops}/{expected} ops in {r.seconds:.2f} s: "
        f"{r.throughput:7.0f} ops/s; {latency}; {len(r.errors)} error(s)\n"
        f"  {'':<34} CPU per op: {service} {r.service_cpu * 1e6:.0f} us, "
        f"dbus-daemon {r.bus_cpu * 1e6:.0f} us"
    )


def report(f: Figures) -> str:
    expected = f.clients * f.cycles
    ok = not f.vfiod.errors and f.vfiod.ops == expected and not f.leaked
    throughput_met = f.vfiod.throughput >= TARGET_OPS
    lines = [
        f"concurrency: {f.clients} clients x {f.cycles} cycles, one IOMMU group each "
        f"(scale:{2 * f.clients}), uid {NOBODY}, {f.processes} client processes "
        f"({f.clients // f.processes}-{-(-f.clients // f.processes)} connections each)",
        _describe("bare fd calls (2 per op)", f.baseline, expected, "test service"),
        _describe("vfiod Acquire + Release", f.vfiod, expected, "vfiod"),
        f"  ratio of throughputs (vfiod / bare): {f.vfiod.throughput / f.baseline.throughput:.2f}",
        f"  daemon fds: {f.fds_before} before, "
        + (f"LEAKED {len(f.leaked)}: {', '.join(f.leaked)}" if f.leaked else "none leaked"),
    ]
    for error in f.vfiod.errors[:5]:
        lines.append(f"  error: {error}")
    lines.append(
        f"  no error, no leak: {'met' if ok else 'MISSED'}; "
        f">= {TARGET_OPS:g} ops/s: {'met' if throughput_met else 'MISSED'}"
    )
    lines.append(f"  machine: {f.machine}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.concurrency", description=__doc__)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--cycles", type=int, default=100, help="Acquire + Release per client")
    parser.add_argument(
        "--processes", type=int, default=None, help="client processes (default: one per client)"
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args(argv)
    figures = run(args.clients, args.cycles, args.processes)
    if args.json:
        summary = {
            name: {
                "ops": r.ops,
                "seconds": r.seconds,
                "ops_per_s": r.throughput,
                "errors": r.errors,
                "service_cpu_s": r.service_cpu,
                "bus_cpu_s": r.bus_cpu,
            }
            for name, r in (("vfiod", figures.vfiod), ("baseline", figures.baseline))
        }
        print(
            json.dumps(
                {
                    **summary,
                    "fds_before": figures.fds_before,
                    "leaked": figures.leaked,
                    "machine": figures.machine,
                }
            )
        )
    else:
        print(report(figures))


if __name__ == "__main__":
    main(sys.argv[1:])
