"""The policy mutation suite. A tree of the shipped examples, the shipped
vfiod.toml and a base policy is mutated: in content (byte flips,
truncation, lines duplicated or removed, values of another type), as files
(writable by others, owned by nobody, replaced by a FIFO, a device, a
directory, a socket, a symlink to nothing, too big, unreadable) and as
directories (writable by others, owned by nobody, unlistable). After each
mutation PolicyHolder.reload() must either put a policy in force, or raise
PolicyError naming a file of the tree and keep the previous policy object in
force. Nothing else may be raised and no reload may hang: every scenario
runs in a forked child with a deadline and a memory cap (``isolated``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
import socket
import stat
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit.test_policy_files import NOBODY, USERS_GID, isolated
from vfiod.policy.load import (
    FILE_KEY,
    MAX_FILE_SIZE,
    POLICY_TREE,
    PolicyError,
    PolicyHolder,
    Problem,
)

PROJECT = Path(__file__).resolve().parents[2]
BASE_POLICY = """\
# The base policy a package might ship.
[[rule]]
name = "base-nic-for-everyone"
effect = "allow"
comment = "the NIC, through iommufd only"
address = "0000:00:10.0"
users = ["*"]
backends = ["iommufd"]
max-locked-memory = "2G"

[[rule]]
name = "base-never-storage"
effect = "deny"
class = ["0106", "0108"]
groups = ["*"]
"""
SHIPPED: dict[str, bytes] = {
    "etc/vfiod/vfiod.toml": (PROJECT / "policy/vfiod.toml").read_bytes(),
    **{
        f"etc/vfiod/policy.d/{example.name}": example.read_bytes()
        for example in sorted((PROJECT / "policy/examples").glob("*.toml"))
    },
    "usr/lib/vfiod/policy.d/50-base.toml": BASE_POLICY.encode(),
}
FILES = sorted(SHIPPED)
RULES = sum(data.count(b"\n[[rule]]\n") for data in SHIPPED.values())  # as shipped
HYPOTHESIS = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])


@contextlib.contextmanager
def policy_tree() -> Iterator[Path]:
    """The unmutated tree, in a directory of its own that any user may
    traverse (for the scenarios run as nobody)."""
    base = Path(tempfile.mkdtemp(prefix="vfiod-policy-"))
    try:
        base.chmod(0o755)
        root = base / "root"
        for relative, data in SHIPPED.items():
            path = root / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        yield root
    finally:
        shutil.rmtree(base)


def holder_of(root: Path) -> PolicyHolder:
    holder = PolicyHolder(str(root), user_exists=lambda _: True, group_exists=lambda _: True)
    assert holder.error is None, holder.error
    assert len(holder.current.rules) == RULES
    return holder


# ---------------------------------------------------------------------------
# Mutations of content


def _retype(text: str, line: int, value: str) -> str:
    """Give the value of the ``line``-th key of ``text`` another type."""
    lines = text.split("\n")
    keyed = [i for i, entry in enumerate(lines) if re.match(r"\s*[A-Za-z_-]+\s*=", entry)]
    if not keyed:
        return text
    at = keyed[line % len(keyed)]
    lines[at] = lines[at].split("=", 1)[0] + "= " + value
    return "\n".join(lines)


OTHER_TYPES = ["1", "-1", "0", "1.5", "true", '"x"', '"16G"', "[]", '[1, "a"]', "{a = 1}"]
OTHER_TYPES += ["1979-05-27", "'*'", '"0000:00:10.0"', "[[1]]", '"""\nmulti\n"""']


@st.composite
def content_mutation(draw: st.DrawFn, data: bytes) -> bytes:
    """``data`` changed one to three times."""
    for _ in range(draw(st.integers(1, 3))):
        operation = draw(st.sampled_from(["flip", "truncate", "duplicate", "remove", "retype"]))
        lines = data.split(b"\n")
        if operation == "flip" and data:
            at = draw(st.integers(0, len(data) - 1))
            data = data[:at] + bytes([data[at] ^ draw(st.integers(1, 255))]) + data[at + 1 :]
        elif operation == "truncate":
            data = data[: draw(st.integers(0, len(data)))]
        elif operation == "duplicate":
            at = draw(st.integers(0, len(lines) - 1))
            data = b"\n".join([*lines[: at + 1], *lines[at:]])
        elif operation == "remove":
            at = draw(st.integers(0, len(lines) - 1))
            data = b"\n".join(lines[:at] + lines[at + 1 :])
        elif operation == "retype":
            text = data.decode("utf-8", "surrogateescape")
            retyped = _retype(text, draw(st.integers(0, 99)), draw(st.sampled_from(OTHER_TYPES)))
            data = retyped.encode("utf-8", "surrogateescape")
    return data


# ---------------------------------------------------------------------------
# Mutations of files and directories (each on a regular file it first
# writes afresh, so no chmod or chown ever goes through a symlink)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _fresh(path: Path, data: bytes) -> None:
    _remove(path)
    path.write_bytes(data)


def _socket(path: Path) -> None:
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))  # the socket file stays after the socket closes


def _symlink(target: str) -> Callable[[Path], None]:
    return lambda path: path.symlink_to(target)


def _mode(mode: int, gid: int = -1) -> Callable[[Path], None]:
    def change(path: Path) -> None:
        os.chown(path, -1, gid)
        path.chmod(mode)

    return change


@dataclasses.dataclass(frozen=True)
class FileMutation:
    name: str
    apply: Callable[[Path], None]  # on a fresh regular file (keep) or on nothing
    keep: bool  # start from the file as shipped (else from no file at all)
    refused: bool  # the file must be named in a PolicyError


FILE_MUTATIONS = [
    FileMutation("mode 0666", _mode(0o666), keep=True, refused=True),
    FileMutation("mode 0646", _mode(0o646), keep=True, refused=True),
    FileMutation("owned by nobody", lambda p: os.chown(p, NOBODY, NOBODY), keep=True, refused=True),
    FileMutation("group users may write", _mode(0o664, USERS_GID), keep=True, refused=True),
    FileMutation("group root may write", _mode(0o664, 0), keep=True, refused=False),
    FileMutation("mode 0400", _mode(0o400), keep=True, refused=False),
    FileMutation("too big", lambda p: os.truncate(p, MAX_FILE_SIZE + 1), keep=True, refused=True),
    FileMutation("a FIFO", os.mkfifo, keep=False, refused=True),
    FileMutation("a symlink to /dev/zero", _symlink("/dev/zero"), keep=False, refused=True),
    FileMutation("a symlink to /dev/random", _symlink("/dev/random"), keep=False, refused=True),
    FileMutation("a directory", Path.mkdir, keep=False, refused=True),
    FileMutation("a socket", _socket, keep=False, refused=True),
    FileMutation("a dangling symlink", _symlink("gone.toml"), keep=False, refused=True),
    FileMutation("a symlink to itself", lambda p: p.symlink_to(p.name), keep=False, refused=True),
    FileMutation("a symlink to /dev/null", _symlink(os.devnull), keep=False, refused=False),
    FileMutation("empty", lambda p: _fresh(p, b""), keep=False, refused=False),
]


def mutate_file(root: Path, relative: str, mutation: FileMutation) -> None:
    path = root / relative
    if mutation.keep:
        _fresh(path, SHIPPED[relative])
    else:
        _remove(path)
    mutation.apply(path)


DIRECTORY_MUTATIONS: dict[str, Callable[[Path], None]] = {
    "mode 0777": _mode(0o777),
    "mode 1777": _mode(0o1777),
    "mode 0757": _mode(0o757),
    "group users may write": _mode(0o775, USERS_GID),
    "owned by nobody": lambda p: os.chown(p, NOBODY, NOBODY),
}


def restore_directory(path: Path) -> None:
    os.chown(path, 0, 0)
    path.chmod(0o755)


# ---------------------------------------------------------------------------
# Scenarios and what every reload must do


Step = tuple[str, Callable[[], None]]  # what it does, in words; doing it


def run_scenario(holder: PolicyHolder, steps: Sequence[Step]) -> list[dict[str, Any]]:
    """Each step then a reload, in this (child) process: what each reload did."""
    reports = []
    for what, step in steps:
        step()
        previous = holder.current
        report: dict[str, Any] = {"step": what}
        try:
            policy = holder.reload()
        except PolicyError as e:
            report["problems"] = [p.to_json() for p in e.problems]
            report["in_force"] = holder.current is previous and holder.error is e
        else:
            report["problems"] = None
            report["in_force"] = holder.current is policy and holder.error is None
        reports.append(report)
    return reports


def scenario(
    holder: PolicyHolder, steps: Sequence[Step], *, uid: int | None = None
) -> list[dict[str, Any]]:
    """run_scenario in a child with a deadline (isolated), each reload checked."""
    reports: list[dict[str, Any]] = isolated(lambda: run_scenario(holder, steps), uid=uid)
    assert [r["step"] for r in reports] == [what for what, _ in steps]
    return reports


def problems_of(report: dict[str, Any], root: Path, *, content: bool) -> list[Problem] | None:
    """The problems of a reload that raised, None if it loaded; checks what
    every reload must do."""
    step = report["step"]
    if report["problems"] is None:
        assert report["in_force"], f"{step}: the policy loaded but is not in force"
        return None
    assert report["in_force"], f"{step}: the previous policy is no longer in force"
    problems = [Problem(**p) for p in report["problems"]]
    assert problems, f"{step}: a PolicyError without problems"
    for problem in problems:
        assert problem.file.startswith(f"{root}{os.sep}"), f"{step}: {problem}"
        assert problem.key, f"{step}: {problem}"
        assert problem.message, f"{step}: {problem}"
        if content or problem.key != FILE_KEY:
            assert problem.line >= 1, f"{step}: a content problem without a line: {problem}"
    return problems


def names(problems: list[Problem] | None, path: Path) -> bool:
    """Does some problem name ``path`` (or something under it) as a whole?"""
    return any(
        p.file == str(path) or p.file.startswith(f"{path}{os.sep}")
        for p in problems or ()
        if p.line == 0 and p.key == FILE_KEY
    )


# ---------------------------------------------------------------------------
# The suite


@settings(HYPOTHESIS, max_examples=150)
@given(
    st.sampled_from(FILES).flatmap(lambda f: st.tuples(st.just(f), content_mutation(SHIPPED[f])))
)
def test_content_mutations(mutation: tuple[str, bytes]) -> None:
    relative, data = mutation
    with policy_tree() as root:
        holder = holder_of(root)
        [report] = scenario(
            holder, [(f"{relative} mutated", lambda: _fresh(root / relative, data))]
        )
        problems_of(report, root, content=True)


@pytest.mark.parametrize("mutation", FILE_MUTATIONS, ids=lambda m: m.name)
@pytest.mark.parametrize("relative", FILES)
def test_file_mutations(relative: str, mutation: FileMutation) -> None:
    with policy_tree() as root:
        holder = holder_of(root)
        steps = [
            (f"{relative}: {mutation.name}", lambda: mutate_file(root, relative, mutation)),
            (f"{relative} restored", lambda: _fresh(root / relative, SHIPPED[relative])),
        ]
        refused, restored = scenario(holder, steps)
        problems = problems_of(refused, root, content=False)
        assert names(problems, root / relative) is mutation.refused, problems
        if not mutation.refused:
            assert problems is None, problems
        assert problems_of(restored, root, content=False) is None


@pytest.mark.parametrize("mutation", DIRECTORY_MUTATIONS)
@pytest.mark.parametrize("directory", POLICY_TREE)
def test_directory_mutations(directory: str, mutation: str) -> None:
    with policy_tree() as root:
        holder = holder_of(root)
        path = root / directory
        steps = [
            (f"{directory}: {mutation}", lambda: DIRECTORY_MUTATIONS[mutation](path)),
            (f"{directory} restored", lambda: restore_directory(path)),
        ]
        refused, restored = scenario(holder, steps)
        problems = problems_of(refused, root, content=False)
        assert problems is not None
        assert [(p.file, p.line, p.key) for p in problems] == [(str(path), 0, FILE_KEY)]
        assert problems_of(restored, root, content=False) is None


@pytest.mark.parametrize(
    "relative", ["etc/vfiod/policy.d", "usr/lib/vfiod/policy.d", "etc/vfiod/vfiod.toml"]
)
def test_a_policy_directory_or_file_replaced_by_the_other(relative: str) -> None:
    with policy_tree() as root:
        holder = holder_of(root)
        path = root / relative

        def swap() -> None:
            is_directory = path.is_dir()
            _remove(path)
            if is_directory:
                path.write_bytes(b"")
            else:
                path.mkdir()

        [report] = scenario(holder, [(f"{relative} swapped", swap)])
        assert names(problems_of(report, root, content=False), path)


@pytest.mark.parametrize(
    ("relative", "mode"),
    [
        ("etc/vfiod/policy.d/10-gpu-for-alice.toml", 0o000),
        ("etc/vfiod/vfiod.toml", 0o200),
        ("etc/vfiod/policy.d", 0o700),
        ("usr/lib/vfiod/policy.d", 0o311),
        ("etc/vfiod", 0o700),
    ],
)
def test_unreadable_to_the_user_who_loads(relative: str, mode: int) -> None:
    """Root reads every file; check-policy run by another user may not."""
    with policy_tree() as root:
        holder = holder_of(root)
        (root / relative).chmod(mode)
        [report] = scenario(holder, [(f"{relative} mode {mode:04o}", lambda: None)], uid=NOBODY)
        assert names(problems_of(report, root, content=False), root / relative)


def draw_step(data: st.DataObject, root: Path) -> Step:
    """One mutation (or a repair) of the tree at ``root``, drawn by hypothesis."""
    kind = data.draw(st.sampled_from(["content", "file", "directory", "restore"]))
    if kind == "directory":
        directory = root / data.draw(st.sampled_from(POLICY_TREE))
        name = data.draw(st.sampled_from(sorted(DIRECTORY_MUTATIONS)))
        return f"{directory}: {name}", lambda: DIRECTORY_MUTATIONS[name](directory)
    relative = data.draw(st.sampled_from(FILES))
    path = root / relative
    if kind == "content":
        mutated = data.draw(content_mutation(SHIPPED[relative]))
        return f"{relative} mutated", lambda: _fresh(path, mutated)
    if kind == "file":
        mutation = data.draw(st.sampled_from(FILE_MUTATIONS))
        return f"{relative}: {mutation.name}", lambda: mutate_file(root, relative, mutation)
    return f"{relative} restored", lambda: _fresh(path, SHIPPED[relative])


@settings(HYPOTHESIS, max_examples=60)
@given(st.data())
def test_sequences_of_mutations(data: st.DataObject) -> None:
    """Mutations on top of each other, a reload after each: whatever loaded
    last stays in force until the next policy that loads."""
    with policy_tree() as root:
        steps = [draw_step(data, root) for _ in range(data.draw(st.integers(2, 5)))]
        for report in scenario(holder_of(root), steps):
            problems_of(report, root, content=False)


def test_the_suite_leaves_devices_alone() -> None:
    """No mutation may change what a symlink points at (chmod and chown follow them)."""
    for device in ("/dev/zero", "/dev/random", os.devnull):
        status = os.stat(device)
        assert (status.st_uid, stat.S_IMODE(status.st_mode)) == (0, 0o666), device
