"""Reading a file vfiod acts on (policy, its own state): only a regular
file of bounded size, checked on the fd actually read. Opening a FIFO
blocks, a device node may act when opened, and /dev/zero never ends."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable

_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
_CHUNK = 1 << 20
_KINDS: tuple[tuple[Callable[[int], bool], str], ...] = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISLNK, "a symbolic link"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


class NotRegularError(Exception):
    """The path is no regular file; ``kind`` says what it is, in words."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


class TooLargeError(Exception):
    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"{size} bytes, more than {limit}")
        self.size = size
        self.limit = limit


def kind_of(mode: int) -> str | None:
    """What a file that is not a regular one is; None for a regular one."""
    if stat.S_ISREG(mode):
        return None
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def _check(status: os.stat_result, limit: int, trust: Callable[[os.stat_result], None]) -> None:
    kind = kind_of(status.st_mode)
    if kind is not None:
        raise NotRegularError(kind)
    trust(status)
    if status.st_size > limit:
        raise TooLargeError(status.st_size, limit)


def _trust_any(_status: os.stat_result) -> None:
    pass


def read_regular(
    path: str,
    limit: int,
    *,
    follow: bool = True,
    trust: Callable[[os.stat_result], None] = _trust_any,
) -> bytes:
    """The bytes of the regular file at ``path``, at most ``limit`` of them.
    Nothing else is opened; the file's status is checked before opening and
    again on the open fd (``trust`` may raise on it too), so a file swapped
    in between is caught; a file that grows past ``limit`` while read is
    refused. ``follow``: whether a symbolic link is followed (else it is
    refused). Raises NotRegularError, TooLargeError, or OSError."""
    _check(os.stat(path) if follow else os.lstat(path), limit, trust)
    fd = os.open(path, _OPEN_FLAGS | (0 if follow else os.O_NOFOLLOW))
    try:
        _check(os.fstat(fd), limit, trust)
        chunks = []
        size = 0
        while size <= limit:
            chunk = os.read(fd, min(_CHUNK, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    if size > limit:
        raise TooLargeError(size, limit)
    return b"".join(chunks)
