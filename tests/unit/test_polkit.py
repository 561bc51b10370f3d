"""pin_subject on a fake /proc, and what each of polkit's answers tells the
caller (tests/bus/test_polkit.py asks a real polkitd)."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest

from vfiod import polkit
from vfiod.host.process import exited
from vfiod.host.sysfs import HostError
from vfiod.polkit import Answer, Subject, Verdict, answer_of, pin_subject, unavailable

START_TIME = 4242424


def stat_line(pid: int, comm: str, start_time: int = START_TIME) -> str:
    """/proc/PID/stat as Linux writes it: field 22 is the start time."""
    after = ["S", *[str(n) for n in range(4, 22)], str(start_time), "100", "200"]
    return f"{pid} ({comm}) {' '.join(after)}\n"


def fake_proc(tmp_path: Path, pid: int, comm: str = "qemu", uid: int = 65534) -> str:
    process = tmp_path / "proc" / str(pid)
    process.mkdir(parents=True)
    (process / "stat").write_text(stat_line(pid, comm))
    (process / "status").write_text(f"Name:\t{comm}\nUid:\t{uid}\t0\t0\t0\nGid:\t0\t0\t0\t0\n")
    return str(tmp_path / "proc")


@pytest.mark.parametrize("comm", ["qemu", "a b", "x) 1 2 (y", ") )", "(("])
def test_the_start_time_is_read_after_the_last_parenthesis(tmp_path: Path, comm: str) -> None:
    proc = fake_proc(tmp_path, os.getpid(), comm)
    subject, pidfd = pin_subject(os.getpid(), 65534, proc)
    os.close(pidfd)
    assert subject == Subject(os.getpid(), START_TIME, 65534)


def test_the_start_time_of_a_real_process_is_what_proc_says() -> None:
    subject, pidfd = pin_subject(os.getpid(), os.getuid())
    try:
        with open(f"/proc/{os.getpid()}/stat") as f:
            assert str(subject.start_time) == f.read().rsplit(")", 1)[1].split()[19]
        assert not exited(pidfd)
    finally:
        os.close(pidfd)


def test_another_uid_is_refused_and_the_pidfd_closed(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, os.getpid(), uid=1000)
    with pytest.raises(HostError) as raised:
        pin_subject(os.getpid(), 65534, proc)  # the leak fixture sees the pidfd closed
    assert raised.value.errno == errno.ESRCH
    assert "runs as uid 1000, not as the caller's uid 65534" in str(raised.value)


@pytest.mark.parametrize("broken", ["stat", "status"])
def test_unreadable_proc_files_mean_it_has_exited(tmp_path: Path, broken: str) -> None:
    proc = fake_proc(tmp_path, os.getpid())
    (Path(proc) / str(os.getpid()) / broken).write_text("garbage\n")
    with pytest.raises(HostError) as raised:
        pin_subject(os.getpid(), 65534, proc)
    assert raised.value.errno == errno.ESRCH
    assert "has exited" in str(raised.value)


def test_a_process_that_exited_is_refused() -> None:
    child = subprocess.Popen(["true"])
    child.wait()
    with pytest.raises(HostError) as raised:
        pin_subject(child.pid, os.getuid())
    assert raised.value.errno == errno.ESRCH


def test_a_zombie_is_refused(tmp_path: Path) -> None:
    """Exited but not reaped: its /proc files are there still; its pidfd
    says it exited."""
    child = subprocess.Popen(["true"])
    try:
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # exited, left a zombie
        with pytest.raises(HostError) as raised:
            pin_subject(child.pid, os.getuid())
        assert "has exited" in str(raised.value)
    finally:
        child.wait()


def test_no_pid_is_an_error_with_its_errno() -> None:
    with pytest.raises(HostError) as raised:
        pin_subject(0, 0)
    assert raised.value.errno == errno.EINVAL


def test_the_subject_as_polkit_takes_it() -> None:
    assert Subject(12, 34, 56).to_dbus() == (
        "unix-process",
        {"pid": ("u", 12), "start-time": ("t", 34), "uid": ("i", 56)},
    )


def test_answers_and_their_texts() -> None:
    assert answer_of(polkit.ACQUIRE, 1000, True, False) == Answer(Verdict.YES, "")
    assert answer_of(polkit.ACQUIRE, 1000, True, True).allowed  # authorized wins
    no = answer_of(polkit.RELOAD, 1000, False, False)
    assert no == Answer(Verdict.NO, "polkit refuses org.vfiod1.reload for uid 1000")
    challenge = answer_of(polkit.ACQUIRE_UNSAFE, 1000, False, True)
    assert challenge.verdict is Verdict.CHALLENGE
    assert not challenge.allowed
    assert "org.vfiod1.acquire-unsafe" in challenge.text
    assert "authentication, which vfiod cannot ask for" in challenge.text
    assert "/etc/polkit-1/rules.d" in challenge.text
    gone = unavailable("org.freedesktop.DBus.Error.ServiceUnknown: no polkitd")
    assert gone.verdict is Verdict.UNAVAILABLE
    assert not gone.allowed
    assert "polkit is enabled in vfiod.toml but polkitd did not answer" in gone.text
    assert "ServiceUnknown: no polkitd" in gone.text
    assert gone.text.endswith("or set polkit = false")
