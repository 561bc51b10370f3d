"""`make install` puts every file where systemd, dbus-daemon and udev look."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[2]

FILES = {
    "usr/share/dbus-1/system.d/org.vfiod1.conf",
    "usr/share/dbus-1/system-services/org.vfiod1.service",
    "usr/lib/systemd/system/vfiod.service",
    "usr/lib/tmpfiles.d/vfiod.conf",
    "usr/lib/udev/rules.d/70-vfiod.rules",
    "usr/lib/modules-load.d/vfiod.conf",
    "usr/lib/vfiod/vfiod.toml",
    "usr/lib/vfiod/libvirt-qemu-hook",
    "usr/share/doc/vfiod/README.md",
    "usr/share/doc/vfiod/examples/10-gpu-for-alice.toml",
    "usr/share/polkit-1/actions/org.vfiod1.policy",
    "usr/share/doc/vfiod/examples/50-vfiod.rules",
}


def install_files(destdir: Path, prefix: str = "/usr") -> list[str]:
    make = shutil.which("make")
    if make is None:
        pytest.skip("make is not installed (apt-get install make)")
    subprocess.run(
        [make, "-s", "install-files", f"DESTDIR={destdir}", f"PREFIX={prefix}"],
        cwd=PROJECT,
        check=True,
        capture_output=True,
        timeout=60,
    )
    return sorted(str(p.relative_to(destdir)) for p in destdir.rglob("*") if p.is_file())


def test_install_files_puts_everything_in_place(tmp_path: Path) -> None:
    installed = install_files(tmp_path, "/usr/local")
    assert set(installed) >= FILES
    assert (tmp_path / "etc/vfiod/policy.d").is_dir()
    assert (tmp_path / "usr/lib/vfiod/policy.d").is_dir()
    assert os.access(tmp_path / "usr/lib/vfiod/libvirt-qemu-hook", os.X_OK)
    unit = (tmp_path / "usr/lib/systemd/system/vfiod.service").read_text()
    assert "ExecStart=/usr/local/bin/vfiod daemon\n" in unit
    assert "@" not in unit.replace("@system-service", "").replace("@resources", "")
    activation = (tmp_path / "usr/share/dbus-1/system-services/org.vfiod1.service").read_text()
    assert "Exec=/usr/local/bin/vfiod daemon\n" in activation
    assert "SystemdService=vfiod.service\n" in activation
    assert not list(PROJECT.glob("build-*.tmp")), "make left temporary files in the checkout"


def test_the_unit_names_the_bus_name_and_is_notify() -> None:
    unit = (PROJECT / "systemd/vfiod.service.in").read_text()
    for line in (
        "Type=notify",
        "BusName=org.vfiod1",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "FileDescriptorStoreMax=32768",
        "RuntimeDirectoryPreserve=yes",
        "Alias=dbus-org.vfiod1.service",
    ):
        assert f"\n{line}\n" in unit, line


def test_make_install_builds_a_working_venv(tmp_path: Path) -> None:
    """The whole `make install`, staged in a folder with a space in its path:
    the virtualenv with vfiod and its dependencies, its scripts naming the
    interpreter where it will be, and the commands linked into BINDIR.
    (Downloads from PyPI unless pip's cache has the packages: `make venv`
    has filled it.)"""
    make = shutil.which("make")
    if make is None:
        pytest.skip("make is not installed (apt-get install make)")
    tmp_path = tmp_path / "staged root"
    result = subprocess.run(
        [make, "-s", "install", f"DESTDIR={tmp_path}", "PREFIX=/usr", f"PYTHON={sys.executable}"],
        cwd=PROJECT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    venv = tmp_path / "usr/lib/vfiod/venv"
    for command in ("vfiod", "vfioctl"):
        assert os.readlink(tmp_path / "usr/bin" / command) == f"/usr/lib/vfiod/venv/bin/{command}"
        # A plain shebang, or (the staged path has a space) pip's sh trampoline.
        head = (venv / "bin" / command).read_text().splitlines()[:3]
        assert str(tmp_path) not in "\n".join(head), head
        assert head[0] == "#!/usr/lib/vfiod/venv/bin/python" or (
            head[0] == "#!/bin/sh" and '"/usr/lib/vfiod/venv/bin/python"' in head[1]
        ), head
    check = subprocess.run(
        [str(venv / "bin/python"), "-c", "import vfiod.daemon, vfiod.cli, systemd.journal"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd="/",
    )
    assert check.returncode == 0, check.stderr
    assert {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()} >= FILES
