"""Hot attach and detach of a vfiod device into a running QEMU, over QMP.

Attach: vfiod leases the device (iommufd backend) with the QEMU process
behind the socket as the lease's owner, so the lease ends when that QEMU
exits, whoever asked; the two fds go to QEMU with ``getfd``, then
``object-add iommufd`` and ``device_add vfio-pci`` use them by name. The
iommufd object is named ``vfiod-<lease id>``: that is how detach finds the
lease again from nothing but QEMU's device id. Any failure undoes it all:
fds QEMU did not consume are closed (``closefd``), the object deleted, the
lease released (vfiod puts the device back on its driver).

Detach: ``device_del``, then ``DEVICE_DELETED`` (the guest's consent, for
PCIe native and ACPI hotplug alike), then ``object-del``, then Release. A
guest that never acknowledges leaves device and lease in place.

QEMU keeps a passed iommufd open until it exits (it closes only an iommufd
it opened itself, QEMU 10.0), so each attach leaves one idle fd in QEMU; it
has no device and pins nothing once the device is gone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from vfiod import qmp
from vfiod.pci import PciAddress

if TYPE_CHECKING:
    from vfiod.client import Client, Lease, ProgressCallback

QMP_TIMEOUT = 30.0  # seconds for one QMP command
UNPLUG_TIMEOUT = 60.0  # seconds a guest gets to acknowledge an unplug
OBJECT_PREFIX = "vfiod-"
_OBJECT = re.compile(rf"(?:/objects/)?{OBJECT_PREFIX}([0-9a-f]{{16}})")
_QOM_ID = re.compile(r"[A-Za-z][A-Za-z0-9._-]*")

Say = Callable[[str], None]


def _quiet(line: str) -> None:
    pass


class HotplugError(Exception):
    """Attach or detach failed; the message says what happened to the
    device and the lease, and what to do."""


@dataclasses.dataclass(frozen=True)
class Attached:
    lease: str  # the lease's object path
    device: str  # the host's PCI address
    id: str  # QEMU's device id
    object: str  # QEMU's iommufd object id
    qemu_pid: int
    qemu_version: str
    guest_address: str  # bus:slot.function in the guest, "" if QEMU did not list it


@dataclasses.dataclass(frozen=True)
class Detached:
    lease: str  # the lease's object path
    id: str
    object: str
    qemu_pid: int
    released: bool  # False: the lease had ended already


def default_id(address: str) -> str:
    """QEMU's device id for a host device: ``vfio-0000_00_10_0``."""
    return "vfio-" + re.sub(r"[:.]", "_", address)


def object_id(lease_id: str) -> str:
    return OBJECT_PREFIX + lease_id


def lease_of_object(path: str) -> str | None:
    """The lease id an iommufd object of ours names; None for anyone else's."""
    found = _OBJECT.fullmatch(path)
    return found.group(1) if found else None


@contextlib.contextmanager
def _session(socket_path: str, timeout: float, say: Say) -> Any:
    try:
        sock = qmp.connect(socket_path, timeout)
    except OSError as e:
        raise HotplugError(
            f"{e.strerror}: give the QMP socket QEMU listens on (-qmp unix:PATH,server=on,wait=off)"
        ) from None
    with sock:
        session = qmp.Qmp(sock)
        try:
            version = session.negotiate(timeout)
        except (ConnectionError, TimeoutError, qmp.QmpProtocolError) as e:
            raise HotplugError(f"{socket_path} does not answer as QMP: {e}") from None
        yield session, version


def _children(session: qmp.Qmp, path: str) -> set[str]:
    """The ids of the QOM objects under ``path`` (not its properties)."""
    found = session.execute("qom-list", {"path": path})
    return {str(e.get("name")) for e in found if str(e.get("type", "")).startswith("child<")}


def _guest_address(session: qmp.Qmp, device_id: str) -> str:
    for bus in session.execute("query-pci"):
        pending = list(bus.get("devices", []))
        while pending:
            d = pending.pop()
            if d.get("qdev_id") == device_id:
                return f"{d['bus']:02x}:{d['slot']:02x}.{d['function']:x}"
            pending += d.get("pci_bridge", {}).get("devices", [])
    return ""


def _device_fd_name(lease: Lease, address: str) -> str:
    for name in lease.fds:
        if name == f"device:{address}":
            return name
    raise HotplugError(
        f"vfiod's lease has no device fd for {address} (it gave {', '.join(lease.fds) or 'none'})"
    )


def attach(
    client: Client,
    socket_path: str,
    device: str,
    *,
    device_id: str | None = None,
    bus: str | None = None,
    managed: bool = False,
    unsafe_noiommu: bool = False,
    label: str | None = None,
    acquire_timeout: float = 300.0,
    timeout: float = QMP_TIMEOUT,
    moves: ProgressCallback | None = None,
    say: Say = _quiet,
) -> Attached:
    """Lease ``device`` for the QEMU at ``socket_path`` and hot-add it there."""
    address = str(PciAddress.parse(device))
    device_id = device_id if device_id is not None else default_id(address)
    if not _QOM_ID.fullmatch(device_id):
        raise HotplugError(
            f"{device_id!r} is not a QEMU id: a letter, then letters, digits, '-', '.' or '_'"
        )
    with _session(socket_path, timeout, say) as (session, version):
        try:
            who, pidfd = qmp.peer_pidfd(session.sock)
        except OSError as e:
            raise HotplugError(f"cannot tell which process serves {socket_path}: {e}") from None
        try:
            say(f"QMP: QEMU {version}, pid {who.pid}, uid {who.uid}")
            if device_id in _children(session, "/machine/peripheral"):
                raise HotplugError(
                    f"QEMU (pid {who.pid}) has a device with id {device_id!r} already: "
                    "give another with --id"
                )
            if label is None:
                name = session.execute("query-name").get("name")
                label = str(name) if name else f"qemu pid {who.pid}"
            lease = client.acquire(
                [address],
                backend="iommufd",
                managed=managed,
                unsafe_noiommu=unsafe_noiommu,
                owner_pidfd=pidfd,
                label=label,
                timeout=acquire_timeout,
                progress=moves,
            )
        finally:
            os.close(pidfd)  # vfiod keeps its own copy
        say(f"lease {lease.id}: {address} for QEMU pid {who.pid} (it ends when QEMU exits)")
        try:
            return _hot_add(session, lease, address, device_id, bus, who.pid, version, say)
        except BaseException as e:
            _undo(client, session, lease, say)
            if isinstance(e, qmp.QmpError):
                raise HotplugError(
                    f"QEMU refused {e.command}: {e.desc}; vfiod released lease {lease.id}"
                    + (" and puts the device back on its driver" if managed else "")
                ) from None
            if isinstance(e, (ConnectionError, TimeoutError, qmp.QmpProtocolError)):
                raise HotplugError(
                    f"QMP failed during the attach ({e}); vfiod released lease {lease.id}"
                ) from None
            raise


def _hot_add(
    session: qmp.Qmp,
    lease: Lease,
    address: str,
    device_id: str,
    bus: str | None,
    pid: int,
    version: str,
    say: Say,
) -> Attached:
    object_name = object_id(lease.id)
    device_fd = lease.fds[_device_fd_name(lease, address)]
    iommufd_fd = lease.fds.get("iommufd")
    if iommufd_fd is None:
        raise HotplugError(f"vfiod's lease {lease.id} has no iommufd")
    names = {"iommufd": f"{object_name}-iommufd", "device": f"{object_name}-device"}
    session.execute("getfd", {"fdname": names["iommufd"]}, fds=[iommufd_fd])
    session.execute("getfd", {"fdname": names["device"]}, fds=[device_fd])
    lease.close()  # QEMU has them now
    say(f"QMP getfd: {names['iommufd']}, {names['device']}")
    session.execute(
        "object-add", {"qom-type": "iommufd", "id": object_name, "fd": names["iommufd"]}
    )
    say(f"QMP object-add iommufd {object_name}")
    arguments = {
        "driver": "vfio-pci",
        "id": device_id,
        "iommufd": object_name,
        "fd": names["device"],
    }
    if bus is not None:
        arguments["bus"] = bus
    session.execute("device_add", arguments)
    guest = _guest_address(session, device_id)
    say(f"QMP device_add vfio-pci {device_id}" + (f": guest {guest}" if guest else ""))
    return Attached(
        lease=lease.path,
        device=address,
        id=device_id,
        object=object_name,
        qemu_pid=pid,
        qemu_version=version,
        guest_address=guest,
    )


def _undo(client: Client, session: qmp.Qmp, lease: Lease, say: Say) -> None:
    """Take back what a failed attach left: QEMU's unconsumed fds and the
    object (if QEMU still answers), our fds, the lease."""
    from vfiod.client import VfiodError  # noqa: PLC0415 - vfiod.client imports this module

    object_name = object_id(lease.id)
    quiet = (qmp.QmpError, ConnectionError, TimeoutError, qmp.QmpProtocolError, OSError)
    for suffix in ("iommufd", "device"):
        with contextlib.suppress(*quiet):  # "not found": QEMU consumed it
            session.execute("closefd", {"fdname": f"{object_name}-{suffix}"})
    with contextlib.suppress(*quiet):  # not there: it was never added
        session.execute("object-del", {"id": object_name})
    lease.close()
    try:
        client.release(lease)
    except VfiodError as e:
        if e.kind != "NotFound":
            raise
    say(f"undone: QEMU's fds closed, lease {lease.id} released")


def detach(
    client: Client,
    socket_path: str,
    device_id: str,
    *,
    timeout: float = UNPLUG_TIMEOUT,
    say: Say = _quiet,
) -> Detached:
    """Unplug QEMU's device ``device_id`` (one vfiod attached), wait for the guest to
    let go, delete its iommufd object and release its lease."""
    from vfiod.client import VfiodError  # noqa: PLC0415 - vfiod.client imports this module

    with _session(socket_path, QMP_TIMEOUT, say) as (session, version):
        who = qmp.peer(session.sock)
        say(f"QMP: QEMU {version}, pid {who.pid}, uid {who.uid}")
        try:
            link = session.execute(
                "qom-get", {"path": f"/machine/peripheral/{device_id}", "property": "iommufd"}
            )
        except qmp.QmpError as e:
            if e.error_class == "DeviceNotFound":
                raise HotplugError(f"QEMU (pid {who.pid}) has no device {device_id!r}") from None
            raise HotplugError(
                f"QEMU's device {device_id!r} is not a vfio-pci device on an iommufd ({e.desc})"
            ) from None
        lease_id = lease_of_object(str(link))
        if lease_id is None:
            raise HotplugError(
                f"QEMU's device {device_id!r} was not attached by vfiod (its iommufd is "
                f"{str(link) or 'none'}): unplug it with QMP device_del yourself"
            )
        object_name = object_id(lease_id)
        lease_path = f"/org/vfiod1/lease/{lease_id}"
        live = _check_lease(client, lease_path, who.pid)
        _unplug(session, device_id, who.pid, lease_id, timeout, say)
        try:
            session.execute("object-del", {"id": object_name})
            say(f"QMP object-del {object_name}")
        except qmp.QmpError as e:
            say(f"QEMU kept the iommufd object {object_name}: {e.desc}")
        released = False
        if live:
            try:
                client.release(lease_path)
                released = True
                say(f"released lease {lease_id}")
            except VfiodError as e:
                if e.kind != "NotFound":
                    raise
        if not released:
            say(f"lease {lease_id} had ended already")
        return Detached(
            lease=lease_path, id=device_id, object=object_name, qemu_pid=who.pid, released=released
        )


def _check_lease(client: Client, lease_path: str, qemu_pid: int) -> bool:
    """Is the lease there (False: it ended; the device may still be unplugged)?
    Refuses a lease that follows another process than this QEMU."""
    from vfiod.client import VfiodError  # noqa: PLC0415 - vfiod.client imports this module

    lease_id = lease_path.rsplit("/", 1)[-1]
    try:
        info = client.lease_info(lease_path)
    except VfiodError as e:
        if e.kind in ("NotFound", "UnknownObject", "UnknownMethod"):
            return False
        raise
    if info.details is None:
        raise HotplugError(f"lease {lease_id} is not yours (uid {info.uid} holds it)")
    if info.details.owner_pid != qemu_pid:
        raise HotplugError(
            f"lease {lease_id} follows process {info.details.owner_pid or 'none'}, not this "
            f"QEMU (pid {qemu_pid}): refusing to release it"
        )
    return True


def _unplug(
    session: qmp.Qmp, device_id: str, pid: int, lease_id: str, timeout: float, say: Say
) -> None:
    try:
        session.execute("device_del", {"id": device_id})
        say(f"QMP device_del {device_id}: waiting up to {timeout:g} s for the guest")
    except qmp.QmpError as e:
        if "already in the process of unplug" not in e.desc:
            raise HotplugError(f"QEMU refused device_del {device_id}: {e.desc}") from None
        say(f"{device_id} is being unplugged already: waiting up to {timeout:g} s for the guest")
    path = f"/machine/peripheral/{device_id}"
    try:
        session.wait_event(
            "DEVICE_DELETED",
            lambda d: d.get("device") == device_id or d.get("path") == path,
            timeout,
        )
    except TimeoutError:
        raise HotplugError(
            f"the guest of QEMU pid {pid} did not let go of {device_id} within {timeout:g} s "
            f"(no DEVICE_DELETED): the device stays in the VM and lease {lease_id} stays; "
            "detach again once the guest runs and handles hotplug, or stop the VM"
        ) from None
    except ConnectionError:
        raise HotplugError(
            f"QEMU closed QMP while {device_id} was being unplugged; its lease {lease_id} "
            "ends when QEMU exits"
        ) from None
    say(f"QMP DEVICE_DELETED {device_id}")
