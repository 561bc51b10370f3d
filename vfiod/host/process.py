"""The process a lease follows: identified by a pidfd the client passed, checked
to belong to the caller, and given the locked-memory limit its DMA needs.

A pidfd names one process for good: the pid behind it cannot be reused while
the pidfd is open, and it becomes readable when the process exits. The pid
is read from ``/proc/self/fdinfo`` (Linux >= 5.10 writes it there; -1 once the
process has exited).
"""

from __future__ import annotations

import dataclasses
import errno
import os
import resource
import select

from vfiod.host.sysfs import HostError


@dataclasses.dataclass(frozen=True)
class OwnerProcess:
    pid: int
    uid: int  # real uid


def pidfd_pid(pidfd: int, proc: str = "/proc") -> int | None:
    """The pid a pidfd names (-1 once it has exited, 0 outside our pid
    namespace), from its fdinfo; None when ``pidfd`` is no pidfd."""
    try:
        with open(os.path.join(proc, "self/fdinfo", str(pidfd))) as f:
            for line in f:
                if line.startswith("Pid:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def uids(pid: int, proc: str = "/proc") -> tuple[int, int] | None:
    """The real and effective uid of process ``pid`` (None: it is gone)."""
    try:
        with open(os.path.join(proc, str(pid), "status")) as f:
            for line in f:
                if line.startswith("Uid:"):
                    real, effective = line.split()[1:3]
                    return int(real), int(effective)
    except (OSError, ValueError):
        pass
    return None


def real_uid(pid: int, proc: str = "/proc") -> int | None:
    found = uids(pid, proc)
    return found[0] if found is not None else None


def exited(pidfd: int) -> bool:
    """Has the process behind ``pidfd`` exited? (Never blocks.) poll(2), not
    select(2): a daemon with many leases holds fds past select's 1024."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(0))


def owner_process(pidfd: int, proc: str = "/proc") -> OwnerProcess:
    """The live process behind ``pidfd`` and its real uid, or a HostError that
    says what was wrong with the fd."""
    pid = pidfd_pid(pidfd, proc)
    if pid is None:
        raise HostError(
            errno.EBADF,
            "owner-pidfd is not a pidfd; pass one from pidfd_open(2) "
            "(Python: os.pidfd_open(pid)) or clone3(CLONE_PIDFD)",
        )
    if pid < 0:
        raise HostError(errno.ESRCH, "the owner-pidfd's process has exited already")
    if pid == 0:  # the kernel's answer for a process outside our pid namespace
        raise HostError(
            errno.EINVAL,
            "owner-pidfd names a process in another pid namespace; pass a pidfd "
            "of a process vfiod can see",
        )
    uid = real_uid(pid, proc)
    # Read the uid, then check the pidfd still names a live process: the pid
    # cannot have been reused for another process in between.
    if uid is None or exited(pidfd):
        raise HostError(errno.ESRCH, "the owner-pidfd's process has exited already")
    return OwnerProcess(pid, uid)


def raise_memlock(pid: int, limit: int) -> tuple[int, int]:
    """Raise the RLIMIT_MEMLOCK of ``pid`` to at least ``limit`` bytes (both
    soft and hard); never lower it. Returns the limits now in force.

    A VMM pins all guest memory for DMA against this limit; the default (8 MiB)
    makes QEMU fail with ENOMEM. Needs CAP_SYS_RESOURCE to raise the hard limit.
    """
    infinity = resource.RLIM_INFINITY
    try:
        soft, hard = resource.prlimit(pid, resource.RLIMIT_MEMLOCK)
        new_soft = soft if soft == infinity or soft >= limit else limit
        new_hard = hard if hard == infinity or hard >= limit else limit
        if (new_soft, new_hard) != (soft, hard):
            resource.prlimit(pid, resource.RLIMIT_MEMLOCK, (new_soft, new_hard))
    except OSError as e:
        err = e.errno if e.errno is not None else errno.EIO
        raise HostError(
            err,
            f"raising RLIMIT_MEMLOCK of pid {pid} to {limit} bytes failed: {os.strerror(err)}; "
            "vfiod needs CAP_SYS_RESOURCE",
        ) from e
    return new_soft, new_hard


def raise_fd_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit, and return
    it: every lease holds fds (and systemd hands them all back at once after
    a restart), and vfiod waits on them with poll(2), which takes any fd
    number. (The soft limit stays at 1024 by default for select(2)'s sake.)"""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard
