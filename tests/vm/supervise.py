"""Run a command so that nothing it starts outlives it, or outlives us.

    python -m tests.vm.supervise -- vng --run ... (a VM boot)

virtme-ng runs QEMU as a grandchild (vng -> sh -> virtme-run -> qemu): killing
vng leaves QEMU running, reparented to PID 1. This supervisor is a child
subreaper, so every orphan of the tree becomes its child; it knows all of
them, and kills and reaps them all when the command ends, when it is asked
to stop (SIGTERM, SIGINT, SIGHUP), and when its own parent dies (the kernel
sends it SIGTERM then: PR_SET_PDEATHSIG), so a killed pytest leaves no VM.
Its exit status is the command's (128 + signal when stopped).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class _StoppedError(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _prctl(option: int, value: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, value, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``, from /proc (children before theirs)."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
        children.setdefault(ppid, []).append(int(name))
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_all_below(pid: int) -> None:
    """SIGKILL every descendant of ``pid`` until none is left, reaping ours."""
    for _ in range(100):
        below = descendants(pid)
        if not below:
            return
        for child in below:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
        _reap(pid)
        time.sleep(0.02)


def _reap(pid: int) -> None:
    if pid != os.getpid():
        return
    while True:
        try:
            reaped, _status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if reaped == 0:
            return


def supervise(argv: Sequence[str]) -> int:
    parent = os.getppid()
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # it died before we asked to hear of it
        return 128 + signal.SIGTERM

    def stop(signum: int, _frame: object) -> None:
        raise _StoppedError(signum)

    for signum in STOP_SIGNALS:
        signal.signal(signum, stop)
    child: subprocess.Popen[bytes] | None = None
    try:
        child = subprocess.Popen(argv)
        return child.wait()
    except _StoppedError as e:
        return 128 + e.signum
    except OSError as e:
        print(f"supervise: cannot run {argv[0]}: {e.strerror}", file=sys.stderr)
        return 127 if e.errno == errno.ENOENT else 126
    finally:
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)
        kill_all_below(os.getpid())


def main(args: Sequence[str]) -> int:
    if not args or args[0] != "--" or len(args) < 2:
        print("usage: python -m tests.vm.supervise -- COMMAND [ARG...]", file=sys.stderr)
        return 2
    return supervise(args[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
