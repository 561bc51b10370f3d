"""Logging: structured journal entries under systemd, plain lines elsewhere.

Audit entries carry their fields (MESSAGE_ID, LEASE, CALLER_UID, ...) as
``extra=`` keys in upper case; the journal handler sends every one of them.
"""

from __future__ import annotations

import logging
import os
import sys

try:
    from systemd.journal import JournalHandler
except ImportError:  # the extra "journal" is not installed
    JournalHandler = None


def _stderr_is_journal() -> bool:
    """Is stderr connected to the journal ($JOURNAL_STREAM names its device and inode)?"""
    stream = os.environ.get("JOURNAL_STREAM", "")
    try:
        device, inode = (int(x) for x in stream.split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (device, inode)


def setup(level: int = logging.INFO) -> None:
    """Without systemd-python, the journal still gets plain lines, without fields."""
    handler: logging.Handler | None = None
    if _stderr_is_journal() and JournalHandler is not None:
        handler = JournalHandler(SYSLOG_IDENTIFIER="vfiod")
    if handler is None:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("vfiod: %(levelname)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
