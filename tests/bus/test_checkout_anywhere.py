"""The tests do not care where the checkout is: a copy of it in a folder
only root may enter (a 0700 home folder, `mktemp -d`), under a path with a
space, runs the bus tests whose clients are uid 65534."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.bus import NOBODY, PROJECT, _tool

# One test that needs nobody to import vfiod and sdbus, and one that runs
# vfioctl as nobody.
TESTS = (
    "tests/bus/test_vfiod.py::test_nobody_acquires_real_fds_and_release_restores",
    "tests/bus/test_vfioctl.py::test_list_shows_groups_blockers_and_leases",
)


def test_a_checkout_in_a_private_folder_with_a_space(tmp_path: Path) -> None:
    private = tmp_path / "home of root"
    private.mkdir(mode=0o700)
    copy = private / "vfiod checkout"
    shutil.copytree(
        PROJECT,
        copy,
        ignore=shutil.ignore_patterns(".git", ".venv", "build", "__pycache__", "*.egg-info"),
    )
    hidden = subprocess.run(
        [_tool("setpriv"), f"--reuid={NOBODY}", f"--regid={NOBODY}", "--", "ls", str(copy)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert hidden.returncode != 0, "the copy should be out of nobody's reach"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TESTS],
        cwd=copy,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert f"{len(TESTS)} passed" in result.stdout
