"""libvirt's qemu hook for `<hostdev managed='no'>`: vfiod does the binding.

libvirt runs ``/etc/libvirt/hooks/qemu`` (and each script in
``/etc/libvirt/hooks/qemu.d/``, libvirt 6.5 and later) as root with the
domain's name, an operation and a sub-operation, and the domain XML on
stdin. With ``vfioctl libvirt-hook`` there:

- ``prepare begin`` (before libvirt sets up host devices): the domain's PCI
  hostdevs that libvirt does not manage itself are leased from vfiod for
  ``libvirt:NAME``: the policy, viability and host-critical checks decide,
  vfiod binds the devices to vfio-pci and records their drivers. A refusal
  makes the hook fail, and libvirt does not start the domain; it shows
  vfiod's words.
- ``release end`` (the domain is gone, its QEMU closed the devices): the
  lease ends and vfiod puts each device back on the driver it recorded,
  where libvirt's own managed hostdevs reprobe instead.

The lease is held by a `vfioctl acquire` of its own (the holder), started
in a session of its own so that it outlives the hook, on the iommufd
backend: it keeps the devices' cdevs open but unbound, which leaves the
groups free for libvirt's QEMU to open the legacy way. Its pid and output
are in the run directory; ``release end`` stops it with SIGTERM.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

from vfiod.pci import AddressError, PciAddress

RUN_DIR = "/run/vfioctl-libvirt"
LABEL_PREFIX = "libvirt:"
GRANT_TIMEOUT = 300.0  # seconds the holder may take to get the lease
STOP_TIMEOUT = 120.0  # seconds it may take to release it


class HookError(Exception):
    """The hook refuses: libvirt shows the message and stops."""


def unmanaged_pci_hostdevs(domain_xml: str) -> list[str]:
    """The addresses of the domain's PCI hostdevs with managed='no' (libvirt's
    default), in the kernel's form."""
    try:
        root = ET.fromstring(domain_xml)  # noqa: S314 - libvirtd's own XML, as root
    except ET.ParseError as e:
        raise HookError(f"libvirt passed no domain XML on stdin: {e}") from None
    found = []
    for hostdev in root.iterfind("./devices/hostdev"):
        if hostdev.get("mode", "subsystem") != "subsystem" or hostdev.get("type") != "pci":
            continue
        if hostdev.get("managed", "no") == "yes":
            continue  # libvirt binds those itself
        address = hostdev.find("./source/address")
        if address is None:
            raise HookError("a PCI hostdev has no <source><address .../></source>")
        try:
            d, b, s, f = (
                int(address.get(k, "0"), 0) for k in ("domain", "bus", "slot", "function")
            )
            found.append(str(PciAddress.parse(f"{d:04x}:{b:02x}:{s:02x}.{f:x}")))
        except (ValueError, TypeError, AddressError) as e:
            raise HookError(f"a PCI hostdev's address is malformed: {e}") from None
    return found


class Holder:
    """The files of the `vfioctl acquire` that holds a domain's lease."""

    def __init__(self, run_dir: Path, domain: str) -> None:
        if not domain or "/" in domain or domain.startswith("."):
            raise HookError(f"{domain!r} is not a domain name vfioctl can keep files for")
        self.pid_file = run_dir / f"{domain}.pid"
        self.grant_file = run_dir / f"{domain}.grant"
        self.log_file = run_dir / f"{domain}.log"
        self.label = LABEL_PREFIX + domain

    def pid(self) -> int | None:
        """The holder's pid while it runs (and is that holder)."""
        try:
            pid = int(self.pid_file.read_text())
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except (OSError, ValueError):
            return None
        return pid if self.label.encode() in argv and b"acquire" in argv else None

    def log(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def remove(self) -> None:
        for path in (self.pid_file, self.grant_file, self.log_file):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def prepare(holder: Holder, addresses: Sequence[str], python: str = sys.executable) -> str:
    """Start the holder and wait for its lease; the lease id."""
    if holder.pid() is not None:
        return "(held already)"
    holder.pid_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    argv = [python, "-m", "vfiod.cli", "acquire", "--json", "--backend", "iommufd"]
    argv += ["--managed", "--label", holder.label, *addresses]
    with open(holder.grant_file, "wb") as out, open(holder.log_file, "wb") as err:
        # Its own session, files for its output, /dev/null for its input: it
        # waits for SIGTERM and outlives this hook, which libvirt waits for.
        process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True
        )
    holder.pid_file.write_text(str(process.pid))
    deadline = time.monotonic() + GRANT_TIMEOUT
    while True:
        line = holder.grant_file.read_text().partition("\n")[0]
        if line:
            grant = json.loads(line)
            return str(grant["lease"])
        if process.poll() is not None:
            said = holder.log().strip()
            holder.remove()
            raise HookError(said or f"vfioctl acquire exited with status {process.returncode}")
        if time.monotonic() > deadline:
            process.kill()
            process.wait()
            holder.remove()
            raise HookError(f"vfiod did not grant {', '.join(addresses)} in {GRANT_TIMEOUT:g} s")
        time.sleep(0.05)


def release(holder: Holder) -> bool:
    """Stop the holder (it releases the lease; vfiod gives the devices back);
    False if there was none."""
    pid = holder.pid()
    if pid is None:
        holder.remove()
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # a holder this process started itself
        time.sleep(0.05)
    holder.remove()
    return True
