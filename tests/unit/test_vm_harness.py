"""The VM harness owns its VMs: whatever ends a boot — the guest powers off,
the boot times out, the caller fails or is interrupted, pytest is killed —
no process of it survives. Stand-in process trees take the VM's place: a
background child, one in a session of its own (as QEMU would be if it left
the group), one that ignores SIGTERM, and one left behind after the command
itself ends (as QEMU outlives a killed vng)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.vm import harness

# Each stand-in sleeps for a duration no other process on the machine uses.
TREE = """\
sleep {mark}1 &
setsid sleep {mark}2 &
(trap '' TERM; exec sleep {mark}3) &
echo started
{tail}
"""


def survivors(mark: str) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if any(arg.startswith(mark.encode()) for arg in argv[1:]):
            found.append(int(name))
    return found


def gone(mark: str, within: float = 10.0) -> list[int]:
    deadline = time.monotonic() + within
    while (left := survivors(mark)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


@pytest.fixture
def mark() -> str:
    return f"4{os.getpid() % 1000:03d}{time.monotonic_ns() % 10**6:06d}.5"


def tree(mark: str, tail: str) -> list[str]:
    return ["/bin/sh", "-c", TREE.format(mark=mark, tail=tail)]


def test_a_boot_that_times_out_leaves_nothing(mark: str) -> None:
    run = harness.run_supervised(tree(mark, "wait"), timeout=2)
    assert "started" in run.output
    assert "[harness] VM stopped after" in run.output
    assert gone(mark) == []


def test_a_command_that_ends_takes_its_leftovers_along(mark: str) -> None:
    run = harness.run_supervised(tree(mark, "exit 3"), timeout=60)
    assert run.returncode == 3
    assert run.seconds < 30
    assert gone(mark) == []


def test_a_caller_that_fails_or_is_interrupted_leaves_nothing(mark: str) -> None:
    def interrupt(line: str) -> None:
        raise KeyboardInterrupt

    command = tree(mark, f"echo {harness.GUEST_START}; echo guest says hello; wait")
    with pytest.raises(KeyboardInterrupt):
        harness.run_supervised(command, progress=interrupt, timeout=60)
    assert gone(mark) == []


def test_a_killed_pytest_leaves_nothing(mark: str, tmp_path: Path) -> None:
    """The harness's own process dies at once (SIGKILL): the supervisor hears
    of its parent's death and ends the tree itself."""
    started = tmp_path / "started"
    code = (
        "import sys\n"
        "from tests.vm import harness\n"
        "harness.run_supervised(sys.argv[1:], timeout=600, progress=lambda l: None)\n"
    )
    command = tree(mark, f"touch {started}; wait")
    parent = subprocess.Popen(
        [sys.executable, "-c", code, *command], cwd=harness.PROJECT, stdout=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 30
        while not started.exists() or len(survivors(mark)) < 3:
            assert time.monotonic() < deadline, "the stand-in VM did not start"
            time.sleep(0.05)
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    assert gone(mark) == []


def test_the_guest_command_stays_off_the_kernel_command_line(tmp_path: Path) -> None:
    """virtme-ng passes --exec on the kernel command line, which Linux cuts at
    2048 bytes: the stock boot's command from a checkout under a long path
    with a space was cut, and the guest's init died. It goes in a script."""
    deep = "/srv/a checkout with a space" + "/deeper" * 40
    command = f"cd {deep!r} && " + " ".join(f"tests/vm/guest/test_{i}.py" for i in range(100))
    line = harness.guest_script(tmp_path, "echo 'it ran'  # " + command)
    assert len(line) < 200
    assert "checkout" not in line
    ran = subprocess.run(["/bin/sh", "-c", line], capture_output=True, text=True, check=True)
    assert ran.stdout.splitlines() == [harness.GUEST_START, "it ran"]


def test_virtme_ng_runs_from_a_path_without_whitespace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """virtme-ng puts its own files' paths on the kernel command line
    (init=<guest tools>/... for a modular kernel), and runs its other
    scripts (virtme-run) from PATH: from a venv under a path with a space,
    both run with a Python whose packages are under a path without one."""
    venv = tmp_path / "a checkout" / ".venv"
    (venv / "bin").mkdir(parents=True)
    shutil.copy(Path(sys.prefix) / "pyvenv.cfg", venv / "pyvenv.cfg")
    (venv / "bin/python").symlink_to(os.path.realpath(sys.executable))
    says_prefix = "#!/bin/false\nimport sys\nprint(sys.prefix, sys.argv[1:])\n"
    for name in ("vng", "virtme-run"):
        (venv / "bin" / name).write_text(says_prefix)
    monkeypatch.setattr(sys, "prefix", str(venv))
    monkeypatch.setattr(sys, "executable", str(venv / "bin/python"))
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}")
    argv = harness.vng_argv()
    try:
        assert harness.vng_argv() == argv, "made once"
        for name in ("vng", "virtme-run"):
            script = Path(argv[0]).with_name(name)
            ran = subprocess.run([script, "x y"], capture_output=True, text=True, check=True)
            prefix, args = ran.stdout.strip().split(" ", 1)
            assert not any(c.isspace() for c in prefix), prefix
            assert Path(prefix).resolve() == venv.resolve()
            assert args == "['x y']"
    finally:
        wrappers = Path(argv[0]).parent
        shutil.rmtree(wrappers)
        Path(str(wrappers).removesuffix(".bin")).unlink()
