"""Cold acquire (VM): vfiod's managed bind + Acquire of a device on its host
driver, against the raw sysfs + ioctl sequence doing the same work, in one
boot of the test VM.

It boots Debian's kernel under QEMU TCG on the IOMMU topology (e1000e at
0000:00:10.0 alone in its IOMMU group) and runs bench.cold_acquire_guest
there: rounds alternating which side goes first, each from e1000e on its
driver back to it.

- vfiod: the real daemon on a private system bus; a blocking
  ``vfiod.client.Client`` as uid 65534 (allowed e1000e, managed, by a policy
  rule) times Acquire(managed=true) until the reply with its fds is in, then
  Release (which returns once e1000e is back on its driver).
- raw: as root in the guest script's process, driver_override, unbind,
  drivers_probe, wait for /dev/vfio/N, open the container and the group,
  GROUP_SET_CONTAINER, SET_IOMMU, GROUP_GET_DEVICE_FD; the undo (close,
  unbind, clear the override, reprobe) is timed apart.

Ratio: p50 vfiod Acquire over p50 raw sequence; target <= 1.3 (DESIGN.md
section 8). Under TCG both sides run many times slower than on hardware, the
kernel's driver unbind and probe most of all.

    python -m bench.cold_acquire [--rounds N] [--json] [--profile]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import machine
from tests.vm import harness
from tests.vm.topology import E1000E, IOMMU, KernelKind

TARGET_RATIO = 1.3
GUEST_UP = "cold-acquire: guest command running"
RESULTS = Path(os.environ.get("VFIOD_VM_RESULTS", harness.PROJECT / "build/vm-results"))
SHARED = RESULTS / "bench-cold-acquire"


@dataclasses.dataclass(frozen=True)
class Figures:
    kernel: str
    boot_s: float  # QEMU start to the guest command, as seen from the host
    guest_uptime_s: float  # the guest's own clock when the measurement began
    vm_s: float  # the whole VM run
    acquire: list[float]  # vfiod: Acquire call to reply with fds
    release: list[float]  # vfiod: Release call to its reply
    back: list[float]  # vfiod: Release reply to e1000e seen on its driver
    daemon_cpu: list[float]  # vfiod's CPU seconds per Acquire + Release round
    raw_steps: dict[str, list[float]]  # each step of the raw sequence
    raw_undo: list[float]
    first: list[dict[str, Any]]  # the untimed warm-up rounds, as the guest gave them
    failures: list[dict[str, Any]]  # vfiod Acquires that failed (their rounds are left out)
    raw_node_missing: int  # raw rounds where /dev/vfio/N was not there after drivers_probe
    fds: list[str]
    machine_before: str
    machine_after: str
    profile: str | None

    @property
    def raw(self) -> list[float]:
        return [sum(step) for step in zip(*self.raw_steps.values(), strict=True)]

    @property
    def ratio(self) -> float:
        return statistics.median(self.acquire) / statistics.median(self.raw)


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms"


def _figures_from(
    result: dict[str, Any], run: harness.VmRun, boot_s: float, before: str, after: str
) -> Figures:
    vfiod, raw = result["vfiod"], result["raw"]
    if not vfiod:
        raise RuntimeError(f"every vfiod Acquire failed: {result['failures']}")
    names = list(raw[0]["steps"])
    return Figures(
        kernel=str(result["kernel"]),
        boot_s=boot_s,
        guest_uptime_s=float(result["guest_uptime_s"]),
        vm_s=run.seconds,
        acquire=[float(r["acquire"]) for r in vfiod],
        release=[float(r["release"]) for r in vfiod],
        back=[float(r["back"]) for r in vfiod],
        daemon_cpu=[float(r["daemon_cpu"]) for r in vfiod],
        raw_steps={name: [float(r["steps"][name]) for r in raw] for name in names},
        raw_undo=[float(r["undo"]) for r in raw],
        first=list(result["first"]),
        failures=list(result["failures"]),
        raw_node_missing=sum(1 for r in raw if r["node_missing"]),
        fds=list(vfiod[0]["fds"]),
        machine_before=before,
        machine_after=after,
        profile=result.get("profile"),
    )


def run(
    rounds: int = 10,
    *,
    warmup: int = 1,
    profile: bool = False,
    progress: Callable[[str], None] = lambda line: None,
) -> Figures:
    """Boot the VM once and measure ``rounds`` rounds of both sides in it."""
    if rounds < 1:
        raise ValueError("rounds: at least 1")
    kernel = harness.kernel_for(KernelKind.STOCK)
    harness.vng_path()  # raises NotInstalledError with what to install
    SHARED.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="vfiod-bench-", dir=harness.SCRATCH) as scratch:
        return _run(Path(scratch), kernel, rounds, warmup, profile, progress)


def _run(
    shared: Path,
    kernel: Path,
    rounds: int,
    warmup: int,
    profile: bool,
    progress: Callable[[str], None],
) -> Figures:
    """The boot, with ``shared`` shared with the guest; what it leaves goes to SHARED."""
    out = shared / "result.json"
    stats = shared / "vfiod.prof"
    guest = [sys.executable, "-m", "bench.cold_acquire_guest"]
    guest += ["--rounds", str(rounds), "--warmup", str(warmup), "--out", str(out)]
    if profile:
        guest += ["--profile", str(stats)]
    command = (
        f"echo {shlex.quote(GUEST_UP)} && cd {shlex.quote(str(harness.PROJECT))} && "
        f"env VFIOD_GUEST=1 PYTHONDONTWRITEBYTECODE=1 {shlex.join(guest)}"
    )
    before = machine()
    started = time.monotonic()
    boot_s = 0.0

    def on_line(line: str) -> None:
        nonlocal boot_s
        if line.strip() == GUEST_UP and not boot_s:
            boot_s = time.monotonic() - started
            progress(f"[vm] booted in {boot_s:.0f} s; measuring {warmup} + {rounds} rounds")
        else:
            progress(f"[vm] {line}")

    progress(f"[vm] booting {kernel.name} on {IOMMU.name} under QEMU TCG ({before})")
    vm = harness.run_vm(
        kernel,
        IOMMU,
        command,
        shared_dir=shared,
        progress=on_line,
        timeout=600 + 60 * (rounds + warmup),
    )
    (SHARED / "console.log").write_text(vm.output)
    if stats.exists():
        shutil.copyfile(stats, SHARED / "vfiod.prof")
    if vm.returncode != 0 or not out.exists():
        stalled = (
            " The guest's CPUs stalled (RCU stall warnings): QEMU got no host CPU for "
            "seconds; run it again on a quieter host."
            if "rcu_preempt detected stalls" in vm.output
            else ""
        )
        raise RuntimeError(
            f"the guest part failed (exit {vm.returncode}) after {vm.seconds:.0f} s.{stalled} "
            f"Console in {SHARED / 'console.log'}:\n{vm.output[-4000:]}"
        )
    progress(f"[vm] done in {vm.seconds:.0f} s")
    result = json.loads(out.read_text())
    (SHARED / "vfiod.log").write_text(result.pop("vfiod_log", ""))
    return _figures_from(result, vm, boot_s, before, machine())


def _line(label: str, times: list[float], raw: list[float] | None = None) -> str:
    text = (
        f"  {label:<34} p50 {_ms(statistics.median(times)):>9}  "
        f"min {_ms(min(times)):>9}  max {_ms(max(times)):>9}"
    )
    if raw is not None:
        text += f"  ({statistics.median(times) / statistics.median(raw):.2f} x raw)"
    return text


def report(f: Figures) -> str:
    verdict = "met" if f.ratio <= TARGET_RATIO else "MISSED"
    lines = [
        f"cold acquire (VM): {E1000E} (e1000e, alone in its group) from e1000e to a "
        f"legacy VFIO lease; {len(f.acquire)} rounds of each side after {len(f.first)} "
        f"warm-up round(s); guest kernel {f.kernel}, QEMU TCG, 2 vCPUs",
        f"  boot: {f.boot_s:.1f} s to the guest command (guest clock "
        f"{f.guest_uptime_s:.1f} s at the start of the measurement); whole VM run {f.vm_s:.0f} s",
        f"  vfiod (Client as uid 65534, reply carries {', '.join(f.fds)}):",
        _line("Acquire(managed=true) to reply", f.acquire, f.raw),
        _line("Release (e1000e back)", f.release),
        _line("after Release until e1000e seen", f.back),
        _line("vfiod CPU per Acquire + Release", f.daemon_cpu),
        "  raw sysfs + ioctl sequence (root, in-process):",
        _line("total", f.raw),
        *(_line(f"- {name}", times) for name, times in f.raw_steps.items()),
        _line("undo (untimed in the ratio)", f.raw_undo),
        f"  /dev/vfio/N not there yet when drivers_probe returned: {f.raw_node_missing} of "
        f"{len(f.raw_undo)} raw rounds",
        f"  ratio (p50 vfiod Acquire / p50 raw sequence): {f.ratio:.3f}; "
        f"target <= {TARGET_RATIO}: {verdict}",
        f"  vfiod's extra per acquire (p50 difference): "
        f"{_ms(statistics.median(f.acquire) - statistics.median(f.raw))}",
        f"  machine: before {f.machine_before}; after {f.machine_after}",
    ]
    for failure in f.failures:
        lines.append(
            f"  FAILED vfiod Acquire ({failure['round']}, after {_ms(failure['after'])}): "
            f"{failure['error']}; then /dev/vfio held {', '.join(failure['dev_vfio'])} and "
            f"{E1000E} was on {failure['driver']}"
        )
    if f.profile:
        lines += ["", "vfiod under cProfile (these rounds' times include its overhead):", f.profile]
    return "\n".join(lines)


def as_json(f: Figures) -> dict[str, Any]:
    summary = {
        name: {
            "p50_s": statistics.median(times),
            "min_s": min(times),
            "max_s": max(times),
        }
        for name, times in (
            ("vfiod_acquire", f.acquire),
            ("vfiod_release", f.release),
            ("vfiod_back", f.back),
            ("vfiod_cpu", f.daemon_cpu),
            ("raw", f.raw),
            ("raw_undo", f.raw_undo),
            *((f"raw_{name}", times) for name, times in f.raw_steps.items()),
        )
    }
    return {
        "kernel": f.kernel,
        "rounds": len(f.acquire),
        "boot_s": f.boot_s,
        "guest_uptime_s": f.guest_uptime_s,
        "vm_s": f.vm_s,
        "fds": f.fds,
        **summary,
        "failures": f.failures,
        "raw_node_missing": f.raw_node_missing,
        "ratio_p50": f.ratio,
        "target_ratio": TARGET_RATIO,
        "machine_before": f.machine_before,
        "machine_after": f.machine_after,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cold_acquire", description=__doc__)
    parser.add_argument("--rounds", type=int, default=10, help="timed rounds of each side")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument(
        "--profile", action="store_true", help="run vfiod under cProfile and print its top calls"
    )
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.warmup < 0:
        parser.error("--rounds: at least 1; --warmup: at least 0")

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    try:
        figures = run(args.rounds, warmup=args.warmup, profile=args.profile, progress=progress)
    except harness.NotInstalledError as e:
        print(f"cold acquire: cannot boot the VM: {e}", file=sys.stderr)
        return 2
    print(json.dumps(as_json(figures)) if args.json else report(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
