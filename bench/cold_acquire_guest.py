"""The in-guest part of the cold acquire benchmark (bench.cold_acquire boots
the VM and runs this in it). It moves a real device between drivers, so it
runs only where the VM harness sets VFIOD_GUEST.

Rounds alternate which side goes first; each side starts from e1000e on its
own driver and leaves it there again:

- vfiod: the real daemon on a private system bus; a blocking
  ``vfiod.client.Client`` as uid 65534 in a process of its own (a policy rule
  lets it have e1000e, managed) times Acquire(managed=true) until the reply
  with its fds is in, closes them, and times Release. Then the time until
  e1000e is back on its driver is taken too (Release waits for it, mostly).
- raw: the same work done by hand as root in this process: driver_override,
  unbind, drivers_probe, wait for /dev/vfio/N, open the container and the
  group, GROUP_SET_CONTAINER, SET_IOMMU, GROUP_GET_DEVICE_FD (vfiod.vfio's
  thin ioctl wrappers), each step timed. The undo (close, unbind, clear the
  override, reprobe, wait for e1000e) is timed apart.

The results go to ``--out`` as JSON; a line per round goes to stdout.

    python -m bench.cold_acquire_guest --rounds N --out FILE [--profile FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import pstats
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import tests.bus.vfiod
from bench.common import bench_bus, cpu_seconds
from tests.bus import PrivateBus
from tests.bus.vfiod import Clients, Spawned, VfiodProcess, run_real_vfiod
from tests.vm.topology import E1000E
from vfiod.host.sysfs import Sysfs
from vfiod.pci import PciAddress
from vfiod.vfio import Container, Group, LinuxKernel
from vfiod.vfio.device import Device

ADDRESS = PciAddress.parse(E1000E)
DRIVER = "e1000e"
SETTLE = 0.5  # seconds between timed operations: uevents of the last one are handled
TIMEOUT = 120.0  # seconds for one operation under TCG before the run fails

POLICY = f"""
[[rule]]
name = "bench-cold"
effect = "allow"
address = "{E1000E}"
users = ["nobody"]
managed = true
"""

# After tests.bus.vfiod's CLIENT prelude: one Acquire + Release per line read;
# a refused Acquire is reported, not raised.
_CLIENT = """\
clock = time.perf_counter
say("ready")
for _ in sys.stdin:
    start = clock()
    try:
        lease = vfiod.acquire([sys.argv[1]], managed=True, backend="legacy", label="bench")
    except VfiodError as e:
        say({"error": f"{e.kind}: {e.message}", "after": clock() - start})
        continue
    granted = clock()
    fds = sorted(lease.fds)
    lease.close()
    closed = clock()
    vfiod.release(lease)
    released = clock()
    say({"acquire": granted - start, "release": released - closed, "fds": fds})
"""

EXPECTED_FDS = ["container", f"device:{E1000E}", "group:10"]

# The raw sequence's steps, in order (each timed from the end of the last).
RAW_STEPS = (
    "driver_override",
    "unbind",
    "drivers_probe",
    "group node",
    "open container",
    "open group",
    "GROUP_SET_CONTAINER",
    "SET_IOMMU",
    "GROUP_GET_DEVICE_FD",
)

clock = time.perf_counter


def say(text: str) -> None:
    print(text, flush=True)


def wait_until(condition: Callable[[], bool], what: str, poll: float = 0.001) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not happen in {TIMEOUT:g} s")
        time.sleep(poll)


class Raw:
    """The raw sysfs + ioctl sequence, by hand."""

    def __init__(self, sysfs: Sysfs, kernel: LinuxKernel) -> None:
        self.sysfs = sysfs
        self.kernel = kernel
        self.device_dir = sysfs.device_path(ADDRESS)
        self.node_missing = False  # the group node was not there when drivers_probe returned

    def _write(self, path: str, value: str) -> None:
        self.sysfs.write(path, value)

    def acquire(self) -> tuple[dict[str, float], tuple[Device, Group, Container]]:
        marks = [clock()]
        self._write(os.path.join(self.device_dir, "driver_override"), "vfio-pci")
        marks.append(clock())
        self._write(os.path.join(self.device_dir, "driver/unbind"), E1000E)
        marks.append(clock())
        self._write(self.sysfs.path("bus/pci/drivers_probe"), E1000E)
        marks.append(clock())
        group_id = os.path.basename(os.readlink(os.path.join(self.device_dir, "iommu_group")))
        node = f"/dev/vfio/{group_id}"
        self.node_missing = not os.path.exists(node)
        wait_until(lambda: os.path.exists(node), f"{node} appearing")
        marks.append(clock())
        container = Container.open(self.kernel)
        marks.append(clock())
        group = Group.open(self.kernel, group_id)
        marks.append(clock())
        group.set_container(container)
        marks.append(clock())
        container.set_iommu()
        marks.append(clock())
        device = group.open_device(E1000E)
        marks.append(clock())
        steps = {name: marks[i + 1] - marks[i] for i, name in enumerate(RAW_STEPS)}
        return steps, (device, group, container)

    def undo(self, handles: tuple[Device, Group, Container]) -> None:
        for handle in handles:
            handle.close()
        self._write(os.path.join(self.device_dir, "driver/unbind"), E1000E)
        self._write(os.path.join(self.device_dir, "driver_override"), "\n")
        self._write(self.sysfs.path("bus/pci/drivers_probe"), E1000E)
        wait_until(lambda: self.sysfs.driver(ADDRESS) == DRIVER, f"{E1000E} back on {DRIVER}")


class Brokered:
    """Acquire + Release through vfiod, from a client process as nobody."""

    def __init__(self, daemon: VfiodProcess, bus: PrivateBus, sysfs: Sysfs) -> None:
        self.daemon = daemon
        self.bus = bus
        self.sysfs = sysfs
        self.client: Spawned = Clients(bus).spawn(_CLIENT, E1000E)
        if self.client.read(timeout=TIMEOUT) != "ready":
            raise RuntimeError("the client did not start")

    def round(self) -> dict[str, Any]:
        cpu = cpu_seconds(self.daemon.pid), cpu_seconds(self.bus.pid)
        self.client.send()
        out: dict[str, Any] = self.client.read(timeout=TIMEOUT)
        replied = clock()
        if "error" in out:
            out["dev_vfio"] = sorted(os.listdir("/dev/vfio"))
            out["driver"] = self.sysfs.driver(ADDRESS)
        wait_until(lambda: self.sysfs.driver(ADDRESS) == DRIVER, f"{E1000E} back on {DRIVER}")
        out["back"] = clock() - replied
        out["daemon_cpu"] = cpu_seconds(self.daemon.pid) - cpu[0]
        out["bus_cpu"] = cpu_seconds(self.bus.pid) - cpu[1]
        return out

    def close(self) -> None:
        self.client.finish(timeout=TIMEOUT)


# vfiod's start (imports over the guest's 9p root, then the scan) takes 5-10 s
# under TCG on a quiet host, several times that on a busy one.
tests.bus.vfiod.START_TIMEOUT = 120.0


@contextlib.contextmanager
def daemon_on(bus: PrivateBus, directory: Path, profile: Path | None) -> Iterator[VfiodProcess]:
    """The real vfiod; under cProfile (writing ``profile``) when asked."""
    with run_real_vfiod(bus, directory, POLICY) as daemon:
        if profile is not None:
            # Restart it the same way, under the profiler; run_real_vfiod
            # stops whichever process runs at its end.
            daemon.stop()
            python, flag, *rest = daemon.argv
            assert rest[:2] == ["-m", "vfiod"], daemon.argv
            daemon.argv = [python, flag, "-m", "cProfile", "-o", str(profile), *rest]
            daemon.start()
        yield daemon


def check_idle(daemon: VfiodProcess, sysfs: Sysfs) -> None:
    if sysfs.driver(ADDRESS) != DRIVER or sysfs.driver_override(ADDRESS) is not None:
        raise RuntimeError(f"{E1000E} is not on {DRIVER} without an override")
    state = daemon.state()
    if state.get("bindings") or state.get("leases"):
        raise RuntimeError(f"vfiod still holds something: {state}")


def measure(rounds: int, warmup: int, profile: Path | None) -> dict[str, Any]:
    sysfs = Sysfs()
    kernel = LinuxKernel()
    subprocess.run(["modprobe", "vfio-pci"], check=True, timeout=60)
    if sysfs.driver(ADDRESS) != DRIVER:
        raise RuntimeError(f"{E1000E} is on {sysfs.driver(ADDRESS)}, not {DRIVER}")
    raw = Raw(sysfs, kernel)
    result: dict[str, Any] = {
        "kernel": os.uname().release,
        "cpus": os.cpu_count(),
        "guest_uptime_s": time.clock_gettime(time.CLOCK_BOOTTIME),
        "rounds": rounds,
        "warmup": warmup,
        "vfiod": [],
        "raw": [],
        "first": [],
        "failures": [],
    }
    with bench_bus() as (bus, directory), daemon_on(bus, directory / "vfiod", profile) as daemon:
        brokered = Brokered(daemon, bus, sysfs)
        for i in range(warmup + rounds):
            label = f"round {i + 1 - warmup}/{rounds}" if i >= warmup else "warm-up"
            took: dict[str, Any] = {}
            for side in ("vfiod", "raw") if i % 2 == 0 else ("raw", "vfiod"):
                check_idle(daemon, sysfs)
                time.sleep(SETTLE)
                if side == "vfiod":
                    took["vfiod"] = brokered.round()
                    fds = took["vfiod"].get("fds", [])
                    if "error" not in took["vfiod"] and fds != EXPECTED_FDS:
                        raise RuntimeError(f"unexpected fds: {fds}")
                else:
                    steps, handles = raw.acquire()
                    start = clock()
                    raw.undo(handles)
                    took["raw"] = {
                        "steps": steps,
                        "undo": clock() - start,
                        "node_missing": raw.node_missing,
                    }
            v, r = took["vfiod"], took["raw"]
            raw_total = sum(r["steps"].values())
            vfiod_text = (
                f"vfiod FAILED after {v['after'] * 1e3:.1f} ms: {v['error']} "
                f"(now: /dev/vfio has {' '.join(v['dev_vfio'])}; {E1000E} on {v['driver']})"
                if "error" in v
                else f"vfiod acquire {v['acquire'] * 1e3:.1f} ms "
                f"(release {v['release'] * 1e3:.1f} ms)"
            )
            raw_text = f"raw {raw_total * 1e3:.1f} ms (undo {r['undo'] * 1e3:.1f} ms)"
            say(f"{label}: {vfiod_text}, {raw_text}")
            if "error" in v:
                result["failures"].append({"round": label, **v})
            elif i >= warmup:
                result["vfiod"].append(v)
                result["raw"].append(r)
            else:
                result["first"].append(took)
        brokered.close()
        check_idle(daemon, sysfs)
        time.sleep(SETTLE)
        result["vfiod_log"] = daemon.log()
    if profile is not None:
        text = io.StringIO()
        pstats.Stats(str(profile), stream=text).sort_stats("cumulative").print_stats("vfiod", 50)
        result["profile"] = text.getvalue()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cold_acquire_guest", description=__doc__)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--out", type=Path, required=True, help="where the JSON goes")
    parser.add_argument("--profile", type=Path, help="run vfiod under cProfile, stats here")
    args = parser.parse_args(argv)
    if os.environ.get("VFIOD_GUEST") != "1":
        parser.error(
            f"this moves {E1000E} between drivers: it runs only in the test VM "
            "(python -m bench.cold_acquire boots it)"
        )
    if args.rounds < 1 or args.warmup < 0:
        parser.error("--rounds: at least 1; --warmup: at least 0")
    if os.getuid() != 0:
        parser.error("run it as root (the VM's guest command is)")
    result = measure(args.rounds, args.warmup, args.profile)
    args.out.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
