"""Baseline for the broker benchmarks: one D-Bus round trip of a method that
returns one fd, on a private system bus with vfiod's policy.

The service (tests.bus's test service) runs as root in its own process, as
vfiod will, and returns an fd it holds; sd-bus duplicates it into each
reply. Two clients: an asyncio one in this process (root), and a blocking
one as uid 65534 in its own process, the way a VMM calls vfiod.

    python -m bench.bus_baseline [--calls N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from tests.bus import (
    MANAGER_INTERFACE,
    NAME,
    NOBODY,
    TEST_PATH,
    PrivateBus,
    message,
    reply_value,
    run_fd_service,
    start_private_bus,
)

WARMUP = 20

# Times `count` OpenFd calls after WARMUP; prints the seconds of each as JSON.
_CLIENT = f"""\
import json, os, sys, time
import sdbus

bus = sdbus.sd_bus_open_system()
count, warmup = int(sys.argv[1]), int(sys.argv[2])
times = []
for i in range(warmup + count):
    message = bus.new_method_call_message({NAME!r}, {TEST_PATH!r}, {MANAGER_INTERFACE!r}, "OpenFd")
    start = time.perf_counter()
    fd = bus.call(message).get_contents()
    elapsed = time.perf_counter() - start
    os.close(fd)
    if i >= warmup:
        times.append(elapsed)
print(json.dumps(times))
"""


def time_fd_calls(bus: PrivateBus, count: int) -> list[float]:
    """Seconds of each of `count` calls returning one fd, from an asyncio
    client in this process (root) to the test service's process."""

    async def client() -> list[float]:
        connection = bus.connect()
        try:
            times: list[float] = []
            for i in range(WARMUP + count):
                start = time.perf_counter()
                fd = reply_value(await connection.call_async(message(connection, "OpenFd")))
                elapsed = time.perf_counter() - start
                os.close(fd)
                if i >= WARMUP:
                    times.append(elapsed)
            return times
        finally:
            connection.close()

    with run_fd_service(bus):
        return asyncio.run(client())


def time_fd_calls_as(bus: PrivateBus, count: int, uid: int = NOBODY) -> list[float]:
    """The same calls from a client process running as `uid`, with sdbus's
    blocking calls."""
    with run_fd_service(bus):
        result = bus.run_as(_CLIENT, args=[str(count), str(WARMUP)], uid=uid, timeout=600)
    times = json.loads(result.check().stdout)
    assert isinstance(times, list)
    return [float(t) for t in times]


def percentile(times: list[float], fraction: float) -> float:
    """The `fraction` quantile of `times` (0 < fraction < 1)."""
    return statistics.quantiles(times, n=100, method="inclusive")[round(fraction * 100) - 1]


def summary(label: str, times: list[float]) -> str:
    return (
        f"{label}: {len(times)} calls, p50 {percentile(times, 0.5) * 1e6:.0f} us, "
        f"p90 {percentile(times, 0.9) * 1e6:.0f} us"
    )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.bus_baseline", description=__doc__)
    parser.add_argument("--calls", type=int, default=2000, help="timed calls per client")
    args = parser.parse_args()
    with (
        tempfile.TemporaryDirectory(prefix="vfiod-bench-") as directory,
        start_private_bus(Path(directory) / "bus") as bus,
    ):
        root_async = time_fd_calls(bus, args.calls)
        nobody_blocking = time_fd_calls_as(bus, args.calls)
    print("one call returning one fd, over a private system bus, service in its own process")
    print(summary("  asyncio client (root)", root_async))
    print(summary(f"  blocking client (uid {NOBODY})", nobody_blocking))


if __name__ == "__main__":
    main()
