"""Run the in-guest tests (tests/vm/guest) on real kernels, one boot each."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.vm import harness
from tests.vm.topology import BOOTS, Boot

RESULTS = Path(os.environ.get("VFIOD_VM_RESULTS", harness.PROJECT / "build/vm-results"))


@pytest.mark.vm
@pytest.mark.parametrize("boot", BOOTS, ids=[b.name for b in BOOTS])
def test_guest(boot: Boot, capsys: pytest.CaptureFixture[str]) -> None:
    try:
        harness.kernel_for(boot.kernel)
        harness.vng_path()
    except harness.NotInstalledError as e:
        pytest.skip(str(e))

    def progress(line: str) -> None:
        with capsys.disabled():
            print(line, flush=True)

    result = harness.run_boot(boot, RESULTS / boot.name, progress)
    if not result.tests and harness.STALLED in result.run.output:
        # The emulated machine's timers stopped (TCG on a busy host), not a
        # test: once more, from the start.
        progress(f"[vm {boot.name}] the guest stalled (RCU): booting it once more")
        result = harness.run_boot(boot, RESULTS / boot.name, progress)
    left = harness.processes_naming(Path(harness.SCRATCH) / f"vfiod-vm-{boot.name}-")
    assert not left, f"processes of the {boot.name} boot outlived it: {left}"
    if not result.tests:
        pytest.fail(
            f"no guest test results from {boot.name} (exit {result.run.returncode}); "
            f"console:\n{result.run.output[-8000:]}"
        )
    failures = result.failures()
    if failures:
        report = "\n\n".join(f"{t.name} {t.outcome.upper()}\n{t.message}" for t in failures)
        pytest.fail(
            f"{len(failures)} of {len(result.tests)} guest tests failed on "
            f"{result.kernel.name}:\n\n{report}\n\nconsole tail:\n{result.run.output[-4000:]}"
        )
    skipped = [t for t in result.tests if t.outcome == "skipped"]
    assert not skipped, "guest tests skipped: " + "; ".join(
        f"{t.name}: {t.message}" for t in skipped
    )
    assert result.run.returncode == 0, result.run.output[-4000:]
