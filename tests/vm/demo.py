"""`make demo`: boot the test VM and tell the story of one device, from the
admin's policy to an unprivileged QEMU that gets it through vfiod and back.

The story itself runs in the guest (tests/vm/demo_guest.py). With the test
kernel (iommufd and device cdevs) it ends with a stock QEMU run by nobody
through `vfioctl run`; with Debian's kernel only the legacy part can be shown,
and the demo says how to get the test kernel.
"""

from __future__ import annotations

import shlex
import sys
import tempfile
import threading
import time
from pathlib import Path

from tests.vm import harness
from tests.vm.demo_guest import DONE
from tests.vm.topology import IOMMU, KernelKind

BOOT_NOTE_EVERY = 10.0  # seconds between "still booting" lines
GUEST_PYCACHE = "/tmp/vfiod-demo-pycache"
CONSOLE_LOG = harness.PROJECT / "build" / "demo-console.log"


class BootProgress:
    """A line every few seconds until the guest says its first word."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.guest_spoke = threading.Event()
        self._thread = threading.Thread(target=self._tick, daemon=True)

    def __enter__(self) -> BootProgress:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.guest_spoke.set()
        self._thread.join()

    def _tick(self) -> None:
        while not self.guest_spoke.wait(BOOT_NOTE_EVERY):
            print(f"# booting ({time.monotonic() - self.started:.0f} s so far)", flush=True)

    def line(self, text: str) -> None:
        if not self.guest_spoke.is_set():
            self.guest_spoke.set()
            print(f"# the guest is up after {time.monotonic() - self.started:.0f} s", flush=True)
        print(text, flush=True)


def pick_kernel() -> tuple[Path, KernelKind]:
    try:
        return harness.test_kernel(), KernelKind.TEST
    except harness.NotInstalledError as e:
        why = str(e)
    try:
        kernel = harness.stock_kernel()
    except harness.NotInstalledError as e:
        raise SystemExit(f"demo cannot run: {e}") from None
    print(f"# no test kernel: {why}", flush=True)
    if why != harness.HOW_TO_GET_TEST_KERNEL:
        print(f"# {harness.HOW_TO_GET_TEST_KERNEL}", flush=True)
    print(
        "# the iommufd part (an unprivileged QEMU given the device by `vfioctl run`) needs "
        "the test kernel; Debian's kernel shows the legacy part: a lease held by `vfioctl "
        "acquire`, and the device read through its fd",
        flush=True,
    )
    return kernel, KernelKind.STOCK


def main() -> int:
    kernel, kind = pick_kernel()
    print(
        f"# booting {kernel.name} under QEMU (TCG, 20-100 s) on {IOMMU.description}",
        flush=True,
    )
    # The guest sees this checkout read-only: its Python keeps bytecode in /tmp.
    command = (
        f"cd {shlex.quote(str(harness.PROJECT))} && env -u PYTHONDONTWRITEBYTECODE "
        f"PYTHONPYCACHEPREFIX={GUEST_PYCACHE} VFIOD_VM_KERNEL={kind} "
        f"{shlex.quote(sys.executable)} -m tests.vm.demo_guest"
    )
    with (
        tempfile.TemporaryDirectory(prefix="vfiod-demo-", dir=harness.SCRATCH) as shared,
        BootProgress() as progress,
    ):
        run = harness.run_vm(
            kernel, IOMMU, command, shared_dir=Path(shared), progress=progress.line
        )
    CONSOLE_LOG.parent.mkdir(parents=True, exist_ok=True)
    CONSOLE_LOG.write_text(run.output)
    log = CONSOLE_LOG.relative_to(harness.PROJECT)
    finished = any(line.strip() == DONE for line in run.output.splitlines())
    if run.returncode != 0 or not finished:
        reason = f"the VM exited with status {run.returncode}" if run.returncode else ""
        reason = reason or "the guest did not finish the story"
        print(
            f"\ndemo FAILED after {run.seconds:.0f} s: {reason} (the guest's lines above say "
            f"which step and why; the whole console is in {log})",
            file=sys.stderr,
            flush=True,
        )
        return 1
    print(f"\n# demo done in {run.seconds:.0f} s (console log: {log})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
