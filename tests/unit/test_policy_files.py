"""Which policy files vfiod reads: only regular files and directories that
root alone may change, never a FIFO or a device, never more than
MAX_FILE_SIZE. Loads that could block or never end run in a forked child
with a deadline and a memory cap (``isolated``), so that a regression fails
the test instead of hanging it or exhausting the machine."""

from __future__ import annotations

import contextlib
import io
import json
import os
import resource
import select
import signal
import socket
import stat
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest

from bench.policy_eval import make_devices, make_rules, to_toml
from tests.unit.test_policy import POLICY_D, USR_POLICY_D, allow, load, put
from vfiod.__main__ import main
from vfiod.policy.load import (
    FILE_KEY,
    MAX_FILE_SIZE,
    POLICY_TREE,
    SYNTAX_KEY,
    PolicyError,
    PolicyHolder,
    Problem,
)
from vfiod.policy.model import Policy

NOBODY = 65534
USERS_GID = 100  # a group that is not root's
ANYONE_ANYTHING = allow('address = "*"\nusers = ["*"]\nmanaged = true', "anyone")
DEADLINE = 10.0  # seconds for one isolated load; a load takes milliseconds
MEMORY_HEADROOM = 512 * 2**20  # what an isolated load may allocate


# ---------------------------------------------------------------------------
# Running a load in a child with a deadline and a memory cap


def _limit_memory() -> None:
    pages = int(Path("/proc/self/statm").read_text().split()[0])
    limit = pages * os.sysconf("SC_PAGE_SIZE") + MEMORY_HEADROOM
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _child(work: Callable[[], Any], out: int, uid: int | None) -> NoReturn:
    try:
        _limit_memory()
        if uid is not None:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
        report = {"result": work()}
    except BaseException:
        report = {"exception": traceback.format_exc()}
    try:
        with os.fdopen(out, "w") as f:
            json.dump(report, f)
    finally:
        os._exit(0)


def _read_all(fd: int, deadline: float) -> bytes | None:
    """What the child writes until it closes the pipe; None at the deadline."""
    chunks: list[bytes] = []
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
    return None


def isolated(work: Callable[[], Any], *, uid: int | None = None) -> Any:
    """``work()`` (returning JSON data) run in a forked child, as ``uid``
    if given; fails the test when the child takes longer than DEADLINE or
    raises (a MemoryError past MEMORY_HEADROOM included)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        _child(work, write_end, uid)
    os.close(write_end)
    try:
        data = _read_all(read_end, time.monotonic() + DEADLINE)
    finally:
        os.close(read_end)
        if data is None:
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    if data is None:
        pytest.fail(f"did not finish within {DEADLINE} s: a policy read blocks or never ends")
    report = json.loads(data or b'{"exception": "the child died without a word"}')
    if "exception" in report:
        pytest.fail(f"raised in the child:\n{report['exception']}")
    return report["result"]


def load_problems(root: Path) -> list[Problem]:
    """The problems of loading ``root``, loaded in an isolated child ([] if it loads)."""

    def work() -> list[dict[str, Any]]:
        try:
            load(root)
        except PolicyError as e:
            return [p.to_json() for p in e.problems]
        return []

    return [Problem(**p) for p in isolated(work)]


def check_policy(*argv: str) -> tuple[int, str]:
    """`vfiod check-policy ARGV` in an isolated child: exit status and output."""

    def work() -> tuple[int, str]:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            status = main(["check-policy", *argv])
        return status, out.getvalue()

    status, output = isolated(work)
    return status, output


# ---------------------------------------------------------------------------
# Only what root alone may change


def _writable_by_others(path: Path, how: str) -> str:
    """Make ``path`` changeable by someone besides root; who, as vfiod says it."""
    if how == "mode 0666":
        path.chmod(0o666)
        return "everyone"
    if how == "mode 0602":
        path.chmod(0o602)
        return "everyone"
    if how == "owner nobody":
        os.chown(path, NOBODY, -1)
        return f"its owner uid {NOBODY}"
    assert how == "group users"
    os.chown(path, -1, USERS_GID)
    path.chmod(0o664)
    return f"group {USERS_GID}"


HOW = ["mode 0666", "mode 0602", "owner nobody", "group users"]


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize(
    ("where", "text"),
    [
        (f"{POLICY_D}/50-x.toml", ANYONE_ANYTHING),
        (f"{USR_POLICY_D}/50-x.toml", ANYONE_ANYTHING),
        ("etc/vfiod/vfiod.toml", "allow-unsafe-noiommu = true\n"),
        ("usr/lib/vfiod/vfiod.toml", "allow-unsafe-noiommu = true\n"),
    ],
    ids=lambda value: value if value.endswith(".toml") else "",
)
def test_a_file_anyone_but_root_may_change_is_refused(
    tmp_path: Path, where: str, text: str, how: str
) -> None:
    path = put(tmp_path, where, text)
    writers = _writable_by_others(path, how)
    status = path.stat()
    with pytest.raises(PolicyError) as raised:
        load(tmp_path)
    assert raised.value.problems == (
        Problem(
            str(path),
            0,
            FILE_KEY,
            f"can be changed by {writers}, not only by root (owner {status.st_uid}:"
            f"{status.st_gid}, mode {stat.S_IMODE(status.st_mode):04o}), so vfiod does not "
            f"trust it: `chown root:root {path} && chmod go-w {path}`",
        ),
    )


def test_the_exact_message_for_a_file_owned_by_nobody(tmp_path: Path) -> None:
    path = put(tmp_path, f"{POLICY_D}/50-x.toml", ANYONE_ANYTHING)
    os.chown(path, NOBODY, 0)
    path.chmod(0o644)
    with pytest.raises(PolicyError) as raised:
        load(tmp_path)
    assert str(raised.value) == (
        f"{path}: (file): can be changed by its owner uid 65534, not only by root (owner "
        f"65534:0, mode 0644), so vfiod does not trust it: `chown root:root {path} && "
        f"chmod go-w {path}`"
    )


@pytest.mark.parametrize(("mode", "gid"), [(0o664, 0), (0o444, USERS_GID), (0o600, 0)])
def test_files_only_root_may_change_are_read(tmp_path: Path, mode: int, gid: int) -> None:
    path = put(tmp_path, f"{POLICY_D}/50-x.toml", ANYONE_ANYTHING)
    os.chown(path, 0, gid)
    path.chmod(mode)
    assert [r.name for r in load(tmp_path).policy.rules] == ["anyone"]


def test_a_symlink_counts_as_the_file_it_points_to(tmp_path: Path) -> None:
    elsewhere = put(tmp_path, "elsewhere/rules.toml", ANYONE_ANYTHING)
    link = tmp_path / POLICY_D / "50-x.toml"
    link.parent.mkdir(parents=True)
    link.symlink_to(elsewhere)
    assert [r.name for r in load(tmp_path).policy.rules] == ["anyone"]
    os.chown(elsewhere, NOBODY, -1)
    with pytest.raises(PolicyError) as raised:
        load(tmp_path)
    [problem] = raised.value.problems
    assert (problem.file, problem.line) == (str(link), 0)
    assert problem.message.startswith(f"can be changed by its owner uid {NOBODY}")


@pytest.mark.parametrize("how", [*HOW, "mode 1777"])
@pytest.mark.parametrize("directory", POLICY_TREE)
def test_a_directory_anyone_but_root_may_change_is_refused(
    tmp_path: Path, directory: str, how: str
) -> None:
    """Even an empty one: a file could be put in it, or replace root's."""
    for policy_directory in (POLICY_D, USR_POLICY_D):
        (tmp_path / policy_directory).mkdir(parents=True)
    path = tmp_path / directory
    if how == "mode 1777":
        path.chmod(0o1777)
        writers = "everyone"
    else:
        writers = _writable_by_others(path, how)
    status = path.stat()
    with pytest.raises(PolicyError) as raised:
        load(tmp_path)
    assert raised.value.problems == (
        Problem(
            str(path),
            0,
            FILE_KEY,
            f"is a policy directory that {writers} can change, not only root (owner "
            f"{status.st_uid}:{status.st_gid}, mode {stat.S_IMODE(status.st_mode):04o}), so "
            f"vfiod trusts no file in it: `chown root:root {path} && chmod go-w {path}`",
        ),
    )


def test_the_directories_checked_are_the_ones_read() -> None:
    assert POLICY_TREE == (
        "etc/vfiod",
        "etc/vfiod/policy.d",
        "usr/lib/vfiod",
        "usr/lib/vfiod/policy.d",
    )


def test_the_root_and_what_is_above_the_policy_are_not_checked(tmp_path: Path) -> None:
    """On a host the root is /; here it sits in a world-writable temporary directory."""
    root = tmp_path / "root"
    put(root, f"{POLICY_D}/50-x.toml", ANYONE_ANYTHING)
    root.chmod(0o1777)
    (root / "etc").chmod(0o777)
    os.chown(root / "etc", NOBODY, NOBODY)
    assert [r.name for r in load(root).policy.rules] == ["anyone"]


def test_check_policy_refuses_a_file_anyone_may_change(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = put(tmp_path, f"{POLICY_D}/50-x.toml", ANYONE_ANYTHING)
    path.chmod(0o666)
    assert main(["check-policy", "--root", str(tmp_path)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0] == (
        f"error: {path}: (file): can be changed by everyone, not only by root (owner 0:0, mode "
        f"0666), so vfiod does not trust it: `chown root:root {path} && chmod go-w {path}`"
    )
    assert out[1].startswith("1 error(s), 0 warning(s): fix them")


def test_the_holder_denies_at_start_and_keeps_its_policy_on_reload(tmp_path: Path) -> None:
    path = put(tmp_path, f"{POLICY_D}/50-x.toml", ANYONE_ANYTHING)
    os.chown(path, NOBODY, -1)
    holder = PolicyHolder(str(tmp_path))
    assert holder.current == Policy()
    assert holder.error is not None
    os.chown(path, 0, -1)
    good = holder.reload()
    assert [r.name for r in good.rules] == ["anyone"]
    (tmp_path / POLICY_D).chmod(0o777)
    with pytest.raises(PolicyError, match="is a policy directory that everyone can change"):
        holder.reload()
    assert holder.current is good


# ---------------------------------------------------------------------------
# Only regular files, and not too big


@contextlib.contextmanager
def unix_socket(path: Path) -> Iterator[None]:
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
        yield


def _make(path: Path, kind: str) -> str:
    """Make ``path`` a ``kind`` of non-regular file; what vfiod calls it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "fifo":
        os.mkfifo(path)
        return "is a FIFO (named pipe), not a regular file"
    if kind == "directory":
        path.mkdir()
        return "is a directory, not a regular file"
    if kind == "/dev/zero":
        path.symlink_to("/dev/zero")
        return "is a character device (a symlink to /dev/zero), not a regular file"
    assert kind == "/dev/full"
    path.symlink_to("/dev/full")
    return "is a character device (a symlink to /dev/full), not a regular file"


KINDS = ["fifo", "directory", "/dev/zero", "/dev/full"]
WHAT_TO_DO = ": vfiod reads policy only from regular files; replace it with one, or remove it"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("where", [f"{POLICY_D}/50-x.toml", "etc/vfiod/vfiod.toml"])
def test_a_file_that_is_not_regular_is_refused_without_reading_it(
    tmp_path: Path, where: str, kind: str
) -> None:
    put(tmp_path, f"{POLICY_D}/10-ok.toml", ANYONE_ANYTHING)
    what = _make(tmp_path / where, kind)
    assert load_problems(tmp_path) == [
        Problem(str(tmp_path / where), 0, FILE_KEY, what + WHAT_TO_DO)
    ]


def test_a_socket_is_refused(tmp_path: Path) -> None:
    path = tmp_path / POLICY_D / "50-x.toml"
    path.parent.mkdir(parents=True)
    with unix_socket(path):
        assert load_problems(tmp_path) == [
            Problem(str(path), 0, FILE_KEY, "is a socket, not a regular file" + WHAT_TO_DO)
        ]


@pytest.mark.parametrize("kind", ["fifo", "/dev/zero"])
def test_check_policy_never_hangs_on_a_file_that_is_not_regular(tmp_path: Path, kind: str) -> None:
    path = tmp_path / POLICY_D / "50-x.toml"
    what = _make(path, kind)
    status, output = check_policy("--root", str(tmp_path))
    assert status == 1
    assert output.splitlines()[0] == f"error: {path}: (file): {what}{WHAT_TO_DO}"


def test_dev_null_still_masks(tmp_path: Path) -> None:
    put(tmp_path, f"{USR_POLICY_D}/50-x.toml", ANYONE_ANYTHING)
    (tmp_path / POLICY_D).mkdir(parents=True)
    (tmp_path / POLICY_D / "50-x.toml").symlink_to(os.devnull)
    assert load(tmp_path).policy.rules == ()


@pytest.mark.parametrize("where", [f"{POLICY_D}/50-x.toml", "etc/vfiod/vfiod.toml"])
def test_a_file_too_big_is_refused(tmp_path: Path, where: str) -> None:
    path = put(tmp_path, where, "")
    os.truncate(path, MAX_FILE_SIZE + 1)  # sparse: no disk, and never read
    assert load_problems(tmp_path) == [
        Problem(
            str(path),
            0,
            FILE_KEY,
            f"is {MAX_FILE_SIZE + 1} bytes, more than the 16 MiB a policy file may hold: "
            "split it into several files",
        )
    ]


def test_a_file_of_the_largest_size_is_read(tmp_path: Path) -> None:
    path = put(tmp_path, f"{POLICY_D}/50-x.toml", "# a comment\n")
    os.truncate(path, MAX_FILE_SIZE)  # read, then refused for its NUL bytes, not its size
    [problem] = load_problems(tmp_path)
    assert (problem.file, problem.line, problem.key) == (str(path), 2, SYNTAX_KEY)


def test_the_size_cap_leaves_room_for_a_big_policy() -> None:
    ten_thousand_rules = len(to_toml(make_rules(10_000, make_devices(4_096))).encode())
    assert ten_thousand_rules * 8 < MAX_FILE_SIZE


def test_a_dangling_symlink_cannot_be_read(tmp_path: Path) -> None:
    path = tmp_path / POLICY_D / "50-x.toml"
    path.parent.mkdir(parents=True)
    path.symlink_to(tmp_path / "gone.toml")
    assert load_problems(tmp_path) == [
        Problem(
            str(path),
            0,
            FILE_KEY,
            "cannot be read (No such file or directory): make it a readable file, or remove it",
        )
    ]
