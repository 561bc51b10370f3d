"""An owned file descriptor of a VFIO object, and the error wrapping of calls on it."""

from __future__ import annotations

import errno
import os
import warnings
from collections.abc import Callable
from types import TracebackType
from typing import ClassVar, Concatenate, ParamSpec, Self, TypeVar

from vfiod.vfio.errors import VfioError
from vfiod.vfio.kernel import Kernel

P = ParamSpec("P")
T = TypeVar("T")

# What to do next, by errno, whatever the call was.
_GENERIC_HINTS = {
    errno.EACCES: "vfiod must run as root (VFIO nodes are root-only)",
    errno.EPERM: "vfiod needs root (CAP_SYS_ADMIN, and CAP_SYS_RAWIO for no-IOMMU)",
}


class Handle:
    """Owns one fd of a VFIO object; closes it exactly once.

    Every kernel call goes through ``_call`` so a failure names the operation
    and the node, and a call on a closed handle is refused before it could
    reach whatever unrelated file now has the same fd number.
    """

    kind: ClassVar[str] = "object"

    def __init__(self, kernel: Kernel, fd: int, target: str) -> None:
        self.kernel = kernel
        self.target = target
        self._fd: int | None = fd

    @property
    def closed(self) -> bool:
        return self._fd is None

    def fileno(self) -> int:
        if self._fd is None:
            raise VfioError(
                errno.EBADF,
                "use",
                self.target,
                f"the {self.kind} is closed",
                f"open the {self.kind} again",
            )
        return self._fd

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            self.kernel.close(fd)

    def detach(self) -> int | None:
        """Let go of the fd without closing it or undoing anything (it lives
        on elsewhere, e.g. in systemd's fd store); returns it."""
        fd, self._fd = self._fd, None
        return fd

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        # A handle dropped without close() is a bug in the caller (tests turn
        # the warning into a failure), but the fd must not outlive the object.
        if getattr(self, "_fd", None) is not None:
            warnings.warn(f"unclosed {self.kind} {self.target}", ResourceWarning, stacklevel=1)
            self.close()

    def hint(self, operation: str, err: int) -> str:
        """What to do when ``operation`` failed with ``err``; subclasses add theirs."""
        return _GENERIC_HINTS.get(err, "")

    def _call(
        self,
        operation: str,
        fn: Callable[Concatenate[int, P], T],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        return checked_call(operation, self.target, self.hint, fn, self.fileno(), *args, **kwargs)


def checked_call(
    operation: str,
    target: str,
    hint: Callable[[str, int], str],
    fn: Callable[Concatenate[int, P], T],
    fd: int,
    *args: P.args,
    **kwargs: P.kwargs,
) -> T:
    """Call ``fn(fd, ...)``; turn its OSError into a VfioError naming
    ``operation``, ``target`` and, from ``hint``, what to do next."""
    try:
        return fn(fd, *args, **kwargs)
    except VfioError:
        raise
    except OSError as e:
        err = e.errno if e.errno is not None else errno.EIO
        raise VfioError(err, operation, target, hint=hint(operation, err)) from e


def open_node(kernel: Kernel, path: str, kind: str, missing_hint: str) -> int:
    """Open a VFIO or iommufd node read-write, with errors that say what to do."""
    try:
        return kernel.open(path, os.O_RDWR)
    except OSError as e:
        err = e.errno if e.errno is not None else errno.EIO
        hints = {
            errno.ENOENT: missing_hint,
            errno.EBUSY: f"the {kind} is already open: a VFIO {kind} node opens only once, "
            "and stays busy until every device fd from it is closed"
            + ("; or one of its devices is in use through its cdev" if kind == "group" else ""),
            errno.EACCES: f"{path} is root-only; ask vfiod for it instead of opening it",
            errno.EPERM: "no-IOMMU groups need CAP_SYS_RAWIO",
        }
        raise VfioError(err, "open", path, hint=hints.get(err, "")) from e
