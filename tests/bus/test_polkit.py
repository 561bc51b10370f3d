"""vfiod.polkit against a real polkitd (tests/polkitd.py) on a private bus,
with this checkout's org.vfiod1.policy and a test rule: subjects are real
processes of other uids, so polkitd reads them from /proc as it would in
production."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import pwd
import select
import subprocess
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from tests.bus import NOBODY, BusUnavailableError, PrivateBus, require_tools, start_private_bus
from tests.polkitd import (
    ACTIONS,
    BUS_POLICY,
    Polkitd,
    PolkitdUnavailableError,
    require_polkitd,
    running_polkitd,
)
from vfiod import polkit
from vfiod.host.process import exited
from vfiod.host.sysfs import HostError
from vfiod.polkit import Answer, PolkitAuthority, Subject, Verdict, pin_subject

DAEMON, BIN = 1, 2  # Debian's "daemon" and "bin"
DEVICE = "0000:00:10.0"
DETAILS = {"device": DEVICE, "group": "10", "label": "vm1", "backend": "iommufd"}
TIMEOUT = 5.0
PROMPT = 1.5  # an answer that needs no one to wait for: well under TIMEOUT


def _user(uid: int) -> str:
    return pwd.getpwuid(uid).pw_name


def _rules() -> dict[str, str]:
    """acquire: YES for nobody, NO for daemon, AUTH_ADMIN for bin (anyone
    else: the action's defaults); acquire-unsafe for nobody only with the
    details of DEVICE."""
    return {
        "10-vfiod-test.rules": f"""\
polkit.addRule(function(action, subject) {{
    if (action.id == "{polkit.ACQUIRE}") {{
        if (subject.user == "{_user(NOBODY)}") return polkit.Result.YES;
        if (subject.user == "{_user(DAEMON)}") return polkit.Result.NO;
        if (subject.user == "{_user(BIN)}") return polkit.Result.AUTH_ADMIN;
    }}
    if (action.id == "{polkit.ACQUIRE_UNSAFE}" && subject.user == "{_user(NOBODY)}") {{
        polkit.log("vfiod test: " + action.lookup("device") + " group "
                   + action.lookup("group") + " label " + action.lookup("label"));
        if (action.lookup("device") == "{DEVICE}" && action.lookup("group") == "10"
            && action.lookup("label") == "vm1" && action.lookup("backend") == "iommufd")
            return polkit.Result.YES;
        return polkit.Result.NO;
    }}
    return polkit.Result.NOT_HANDLED;
}});
"""
    }


@pytest.fixture
def polkit_bus(tmp_path: Path) -> Iterator[PrivateBus]:
    """A private bus on which polkitd may own its name."""
    try:
        require_tools()
        require_polkitd()
    except (BusUnavailableError, PolkitdUnavailableError) as e:
        pytest.skip(str(e))
    with start_private_bus(tmp_path / "bus", extra_config=BUS_POLICY) as bus:
        yield bus


@pytest.fixture
def polkitd(polkit_bus: PrivateBus, tmp_path: Path) -> Iterator[Polkitd]:
    with running_polkitd(polkit_bus, ACTIONS, _rules(), tmp_path / "polkitd") as daemon:
        yield daemon


@contextlib.contextmanager
def process_as(uid: int) -> Iterator[subprocess.Popen[bytes]]:
    """A process running as real uid ``uid`` (its primary group, no others)
    until the block ends."""
    gid = pwd.getpwuid(uid).pw_gid
    process = subprocess.Popen(
        [
            "setpriv",
            f"--reuid={uid}",
            f"--regid={gid}",
            "--clear-groups",
            "--",
            "/bin/sh",
            "-c",
            "echo ready && exec sleep 60",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        cwd="/",
    )
    assert process.stdout is not None
    try:
        # The line comes once setpriv has set the uid: from then on the pid is uid's.
        ready, _, _ = select.select([process.stdout], [], [], 10)
        assert ready, "the subject did not start in 10 s"
        assert process.stdout.readline() == b"ready\n", "the subject did not start"
        yield process
    finally:
        process.kill()
        process.wait()
        process.stdout.close()


def check(
    bus: PrivateBus,
    subject: Subject,
    action: str = polkit.ACQUIRE,
    details: Mapping[str, str] = DETAILS,
    timeout: float = TIMEOUT,
) -> tuple[Answer, float]:
    """One check over a fresh connection of this process (root), and how
    long it took."""

    async def run() -> Answer:
        connection = bus.connect()
        try:
            return await PolkitAuthority(connection, timeout).check(subject, action, details)
        finally:
            connection.close()

    start = time.monotonic()
    answer = asyncio.run(run())
    return answer, time.monotonic() - start


def check_process(
    bus: PrivateBus, uid: int, action: str = polkit.ACQUIRE, details: Mapping[str, str] = DETAILS
) -> tuple[Answer, float]:
    """``check`` for a process pinned as pin_subject pins it; asserts the
    process is the same after the answer, as vfiod does."""
    with process_as(uid) as process:
        subject, pidfd = pin_subject(process.pid, uid)
        try:
            answer, took = check(bus, subject, action, details)
            assert not exited(pidfd)
        finally:
            os.close(pidfd)
    return answer, took


def test_a_rule_says_yes(polkitd: Polkitd) -> None:
    answer, took = check_process(polkitd.bus, NOBODY)
    assert answer == Answer(Verdict.YES, "")
    assert answer.allowed
    assert took < PROMPT


def test_a_rule_says_no_and_the_text_names_action_and_uid(polkitd: Polkitd) -> None:
    answer, _ = check_process(polkitd.bus, DAEMON)
    assert answer.verdict is Verdict.NO
    assert not answer.allowed
    assert answer.text == f"polkit refuses {polkit.ACQUIRE} for uid {DAEMON}"


def test_auth_admin_is_a_prompt_refusal_not_a_wait_for_an_agent(polkitd: Polkitd) -> None:
    answer, took = check_process(polkitd.bus, BIN)
    assert answer.verdict is Verdict.CHALLENGE
    assert not answer.allowed
    assert took < PROMPT, f"{took:.1f} s: polkitd waited for an authentication agent"
    assert "authentication" in answer.text
    assert "/etc/polkit-1/rules.d" in answer.text


def test_the_actions_defaults_apply_without_a_rule(polkitd: Polkitd) -> None:
    """No rule for daemon on reload, and no session: allow_any,
    auth_admin_keep, a challenge."""
    answer, took = check_process(polkitd.bus, DAEMON, polkit.RELOAD)
    assert answer.verdict is Verdict.CHALLENGE
    assert took < PROMPT


def test_root_is_always_authorized(polkitd: Polkitd) -> None:
    """polkitd's own rule: no rule here names root, and acquire-unsafe
    defaults to auth_admin everywhere."""
    subject, pidfd = pin_subject(os.getpid(), 0)
    try:
        answer, _ = check(polkitd.bus, subject, polkit.ACQUIRE_UNSAFE)
    finally:
        os.close(pidfd)
    assert answer.verdict is Verdict.YES


def test_details_reach_the_rules(polkitd: Polkitd) -> None:
    answer, _ = check_process(polkitd.bus, NOBODY, polkit.ACQUIRE_UNSAFE)
    assert answer.verdict is Verdict.YES
    with process_as(NOBODY) as process:
        subject, pidfd = pin_subject(process.pid, NOBODY)
        os.close(pidfd)
        other, _ = check(
            polkitd.bus, subject, polkit.ACQUIRE_UNSAFE, {**DETAILS, "device": "0000:00:02.0"}
        )
        none, _ = check(polkitd.bus, subject, polkit.ACQUIRE_UNSAFE, {})
    assert other.verdict is Verdict.NO
    assert none.verdict is Verdict.NO
    assert f"vfiod test: {DEVICE} group 10 label vm1" in polkitd.log()


def test_an_unknown_action_is_unavailable_with_polkitds_reason(polkitd: Polkitd) -> None:
    answer, took = check_process(polkitd.bus, NOBODY, "org.vfiod1.no-such-action")
    assert answer.verdict is Verdict.UNAVAILABLE
    assert not answer.allowed
    assert "org.vfiod1.no-such-action" in answer.text
    assert "not registered" in answer.text
    assert "polkit = false" in answer.text
    assert took < PROMPT


def test_without_polkitd_on_the_bus_it_is_unavailable(polkitd: Polkitd) -> None:
    polkitd.stop()
    answer, took = check_process(polkitd.bus, NOBODY)
    assert answer.verdict is Verdict.UNAVAILABLE
    assert "org.freedesktop.DBus.Error.ServiceUnknown" in answer.text
    assert answer.text.endswith("start polkit (systemctl start polkit) or set polkit = false")
    assert took < PROMPT


def test_a_polkitd_that_does_not_answer_is_unavailable_within_the_timeout(
    polkitd: Polkitd,
) -> None:
    with process_as(NOBODY) as process:
        subject, pidfd = pin_subject(process.pid, NOBODY)
        os.close(pidfd)
        polkitd.pause()
        try:
            answer, took = check(polkitd.bus, subject, timeout=1.0)
        finally:
            polkitd.resume()
        # Still working after that: the cancelled check left nothing behind.
        again, _ = check(polkitd.bus, subject)
    assert answer.verdict is Verdict.UNAVAILABLE
    assert "no answer to org.vfiod1.acquire within 1 s" in answer.text
    assert 1.0 <= took < 1.0 + PROMPT
    assert again.verdict is Verdict.YES


def test_a_subject_with_another_start_time_is_refused_by_polkitd(polkitd: Polkitd) -> None:
    """polkitd itself checks the start time against the process with that
    pid: a subject for a process that was replaced gets no verdict."""
    with process_as(NOBODY) as process:
        subject, pidfd = pin_subject(process.pid, NOBODY)
        os.close(pidfd)
        stale = Subject(subject.pid, subject.start_time - 1, subject.uid)
        answer, _ = check(polkitd.bus, stale)
    assert answer.verdict is Verdict.UNAVAILABLE
    assert f"process with PID {subject.pid} has been replaced" in answer.text


def test_polkitd_judges_the_uid_the_subject_names(polkitd: Polkitd) -> None:
    """From a root caller polkitd takes the subject's uid as given: why
    pin_subject checks it is the process's own."""
    with process_as(NOBODY) as process:
        subject, pidfd = pin_subject(process.pid, NOBODY)
        os.close(pidfd)
        as_daemon, _ = check(polkitd.bus, Subject(subject.pid, subject.start_time, DAEMON))
    assert as_daemon.verdict is Verdict.NO


def test_pin_subject_refuses_another_uids_process(polkit_bus: PrivateBus) -> None:
    with process_as(DAEMON) as process, pytest.raises(HostError) as raised:
        pin_subject(process.pid, NOBODY)
    assert raised.value.errno == errno.ESRCH
    assert f"runs as uid {DAEMON}, not as the caller's uid {NOBODY}" in str(raised.value)


def test_pin_subject_refuses_a_process_that_exited(polkit_bus: PrivateBus) -> None:
    with process_as(NOBODY) as process:
        pass
    with pytest.raises(HostError) as raised:
        pin_subject(process.pid, NOBODY)
    assert raised.value.errno == errno.ESRCH
    assert "has exited" in str(raised.value)


def test_pin_subject_pins_the_process(polkit_bus: PrivateBus) -> None:
    with process_as(NOBODY) as process:
        subject, pidfd = pin_subject(process.pid, NOBODY)
        try:
            assert subject.pid == process.pid
            assert subject.uid == NOBODY
            assert not exited(pidfd)
            process.kill()
            process.wait()
            assert exited(pidfd)  # what the caller checks after polkit's answer
        finally:
            os.close(pidfd)
