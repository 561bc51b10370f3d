"""Reading only regular files of bounded size (vfiod.files)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from vfiod.files import NotRegularError, TooLargeError, kind_of, read_regular


def test_a_regular_file_is_read_whole(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x" * 3000)
    assert read_regular(str(path), 3000) == b"x" * 3000


def test_a_file_larger_than_the_limit_is_refused_unread(tmp_path: Path) -> None:
    path = tmp_path / "sparse"
    with open(path, "wb") as f:
        f.truncate(100 << 20)  # sparse: reading it all would cost 100 MB
    with pytest.raises(TooLargeError) as e:
        read_regular(str(path), 1 << 20)
    assert (e.value.size, e.value.limit) == (100 << 20, 1 << 20)


def test_the_read_stops_at_the_limit_whatever_the_size_said() -> None:
    """/proc files say size 0 and have content, as a file that grew since
    its size was checked does."""
    assert os.stat("/proc/self/status").st_size == 0
    with pytest.raises(TooLargeError) as e:
        read_regular("/proc/self/status", 16)
    assert e.value.size == 17


def test_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(NotRegularError) as e:
        read_regular(str(tmp_path / "fifo"), 100)
    assert e.value.kind == "a FIFO (named pipe)"


@pytest.mark.parametrize(
    ("path", "kind"),
    [("/dev/zero", "a character device"), ("/", "a directory")],
)
def test_other_kinds_are_refused_and_named(path: str, kind: str) -> None:
    with pytest.raises(NotRegularError) as e:
        read_regular(path, 100)
    assert e.value.kind == kind


def test_a_symbolic_link_is_followed_only_when_asked(tmp_path: Path) -> None:
    (tmp_path / "target").write_text("data")
    (tmp_path / "link").symlink_to(tmp_path / "target")
    assert read_regular(str(tmp_path / "link"), 100) == b"data"
    with pytest.raises(NotRegularError) as e:
        read_regular(str(tmp_path / "link"), 100, follow=False)
    assert e.value.kind == "a symbolic link"


def test_trust_is_asked_before_opening_and_of_the_open_fd(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_text("data")
    asked: list[int] = []

    def trust(status: os.stat_result) -> None:
        asked.append(status.st_ino)

    assert read_regular(str(path), 100, trust=trust) == b"data"
    assert asked == [path.stat().st_ino] * 2


def test_kind_of() -> None:
    assert kind_of(stat.S_IFREG | 0o644) is None
    assert kind_of(stat.S_IFSOCK) == "a socket"
