"""`make demo`: boot the test VM and walk through what vfiod does, on a real kernel."""

from __future__ import annotations

import shlex
import sys
import tempfile
from pathlib import Path

from tests.vm import harness
from tests.vm.topology import IOMMU, KernelKind


def main() -> int:
    try:
        kernel = harness.kernel_for(KernelKind.TEST)
    except harness.NotInstalledError:
        kernel = harness.kernel_for(KernelKind.STOCK)
    print(f"booting {kernel.name} under QEMU (TCG, about 30 s): {IOMMU.description}", flush=True)
    command = (
        f"cd {shlex.quote(str(harness.PROJECT))} && "
        f"env PYTHONDONTWRITEBYTECODE=1 {shlex.quote(sys.executable)} -m tests.vm.demo_guest"
    )
    with tempfile.TemporaryDirectory() as shared:
        run = harness.run_vm(
            kernel,
            IOMMU,
            command,
            shared_dir=Path(shared),
            progress=lambda line: print(line, flush=True),
        )
    if run.returncode != 0:
        print(f"demo failed (exit {run.returncode}) after {run.seconds:.0f} s", file=sys.stderr)
        return 1
    print(f"\ndemo done in {run.seconds:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
