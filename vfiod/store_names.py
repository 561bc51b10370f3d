"""Names for the fd store's entries: one per lease, as short as they can be.

systemd hands the fd store back at start with one name per fd, joined by
":" in LISTEN_FDNAMES, and execve(2) refuses any environment string longer
than 128 KiB with its NUL (MAX_ARG_STRLEN): with a lease's 16-character id as its
name, a store of more than about 7,700 fds would make every later start of
vfiod fail with E2BIG. Names here are 1 to 3 characters, the smallest free
first, so a full store (FileDescriptorStoreMax=, one fd per lease at
worst) stays under the limit; ``fdnames_bytes`` says how much it takes.

A name is given back once no lease record names it any more (the broker
drops a lease's record after its fds left the store), and may then name
another lease's: systemd reads the notify socket in order, so the
FDSTOREREMOVE=1 of the first comes before the FDSTORE=1 of the next.
"""

from __future__ import annotations

import heapq
import string
from collections.abc import Iterable

# systemd takes any printable ASCII but ":" in a name; these are safe in a shell too.
ALPHABET = string.digits + string.ascii_letters + "_-"
WIDTHS = (1, 2, 3)
MAX_ARG_STRLEN = 131072  # bytes of one argv or environment string, its NUL included
_BASE = len(ALPHABET)
_DIGIT = {c: i for i, c in enumerate(ALPHABET)}
_COUNT: dict[int, int] = {w: _BASE**w for w in WIDTHS}  # names of each width
_FIRST = {w: sum(n for v, n in _COUNT.items() if v < w) for w in WIDTHS}  # index of each first


def store_name(index: int) -> str:
    """The index-th name: the 64 one-character ones, then the two-character
    ones, then the three-character ones."""
    for width in WIDTHS:
        n = index - _FIRST[width]
        if 0 <= n < _COUNT[width]:
            chars = []
            for _ in range(width):
                n, digit = divmod(n, _BASE)
                chars.append(ALPHABET[digit])
            return "".join(reversed(chars))
    raise ValueError(f"no fd store name has index {index}")


def store_index(name: str) -> int | None:
    """The index of a name ``store_name`` gives; None for any other (an
    older vfiod named a lease's fds by its id)."""
    if not 0 < len(name) <= WIDTHS[-1] or any(c not in _DIGIT for c in name):
        return None
    n = 0
    for c in name:
        n = n * _BASE + _DIGIT[c]
    return _FIRST[len(name)] + n


def fdnames_bytes(names: Iterable[str]) -> int:
    """The size of the LISTEN_FDNAMES= string systemd builds for the store's
    fds (one name each), with its NUL: execve takes at most MAX_ARG_STRLEN."""
    listed = list(names)
    return len("LISTEN_FDNAMES=") + sum(len(n) for n in listed) + max(len(listed) - 1, 0) + 1


class StoreNames:
    """The names in use, and the smallest free one to give next."""

    def __init__(self, held: Iterable[str] = ()) -> None:
        indexes = {i for i in map(store_index, held) if i is not None}
        self._next = max(indexes, default=-1) + 1
        self._free = [i for i in range(self._next) if i not in indexes]  # sorted: a heap

    def take(self) -> str:
        if self._free:
            return store_name(heapq.heappop(self._free))
        self._next += 1
        return store_name(self._next - 1)

    def give_back(self, name: str) -> None:
        index = store_index(name)
        if index is not None:
            heapq.heappush(self._free, index)
