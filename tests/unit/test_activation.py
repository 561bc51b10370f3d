"""vfiod as D-Bus activation without systemd starts it: no PATH in its
environment, no tmpfiles run before it."""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

import pytest

from tests.fakehost import build, no_modules
from vfiod import daemon
from vfiod.host.binding import modprobe
from vfiod.state import StateFile


def test_modprobe_is_found_without_a_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PATH", raising=False)
    said = modprobe("vfiod-test-no-such-module")
    assert "vfiod-test-no-such-module" in said  # modprobe's own words: it ran


def test_the_state_directory_is_made_root_only_at_start(tmp_path: Path) -> None:
    host = build(tmp_path / "host", "small")
    state = tmp_path / "run/vfiod/state.json"
    parts = daemon.Parts(
        sysfs=host.sysfs,
        kernel=host.kernel,
        state=StateFile(str(state)),
        policy_root=str(host.policy_root),
        hwdb=False,
        hotplug=False,
        load_module=no_modules,
        critical=dict,
        stored_fds=dict,
    )

    async def start() -> None:
        daemon.Daemon(parts).build()

    asyncio.run(start())
    mode = os.stat(state.parent).st_mode
    assert stat.S_ISDIR(mode)
    assert stat.S_IMODE(mode) == 0o700
