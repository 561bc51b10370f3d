"""Hot attach and detach of a vfiod device into a running QEMU, over QMP.

Attach: vfiod leases the device (iommufd backend) with the QEMU process as
the lease's owner, so the lease ends when that QEMU exits, whoever asked;
the two fds go to QEMU with ``getfd``, then ``object-add iommufd`` and
``device_add vfio-pci`` use them by name. The iommufd object is named
``vfiod-<lease id>``: that is how detach finds the lease again from nothing
but QEMU's device id. Any failure undoes it all: fds QEMU did not consume
are closed (``closefd``), the object deleted, the lease released (vfiod
puts the device back on its driver).

Detach: ``device_del``, then the device's end (``DEVICE_DELETED``: the
guest's consent, for PCIe native and ACPI hotplug alike), then
``object-del``, then Release. A guest that never lets go leaves device and
lease in place.

QMP reaches QEMU through a Monitor: QEMU's own socket (``qmp_monitor``,
here) or libvirt's connection to it (vfiod.libvirt_monitor).

QEMU keeps a passed iommufd open until it exits (it closes only an iommufd
it opened itself, QEMU 10.0), so each attach leaves one idle fd in QEMU; it
has no device and pins nothing once the device is gone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from vfiod import qmp
from vfiod.pci import PciAddress

if TYPE_CHECKING:
    from vfiod.client import Client, Lease, ProgressCallback

QMP_TIMEOUT = 30.0  # seconds for one QMP command
UNPLUG_TIMEOUT = 60.0  # seconds a guest gets to let go of a device
OBJECT_PREFIX = "vfiod-"
LEASE_PATH_PREFIX = "/org/vfiod1/lease/"
_OBJECT = re.compile(rf"(?:/objects/)?{OBJECT_PREFIX}([0-9a-f]{{16}})")
_QOM_ID = re.compile(r"[A-Za-z][A-Za-z0-9._-]*")
# What QMP may fail with on the way, besides an error answer.
QMP_FAILURES = (ConnectionError, TimeoutError, qmp.QmpProtocolError)

Say = Callable[[str], None]


def _quiet(line: str) -> None:
    pass


class HotplugError(Exception):
    """Attach or detach failed; the message says what happened to the
    device and the lease, and what to do."""


@dataclasses.dataclass(frozen=True)
class Vmm:
    """The QEMU process behind a monitor."""

    pid: int
    uid: int
    version: str
    name: str  # its -name, or "" (the lease's label by default)

    def __str__(self) -> str:
        return f"QEMU {self.version}, pid {self.pid}, uid {self.uid}"


class Monitor(Protocol):
    """QMP to one QEMU. ``pidfd`` pins its process (the monitor's own: it is
    closed with the monitor)."""

    vmm: Vmm
    pidfd: int

    def execute(
        self, command: str, arguments: Mapping[str, Any] | None = None, *, fds: Sequence[int] = ()
    ) -> Any:
        """The command's return value; QmpError for an error answer."""
        ...

    def wait_deleted(self, device_id: str, timeout: float) -> None:
        """Until QEMU has removed the device; TimeoutError if it has not in time."""
        ...


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


def check_id(device_id: str) -> str:
    """``device_id`` if QEMU takes it as an id, else HotplugError."""
    if not _QOM_ID.fullmatch(device_id):
        raise HotplugError(
            f"{device_id!r} is not a QEMU id: a letter, then letters, digits, '-', '.' or '_'"
        )
    return device_id


def object_id(lease_id: str) -> str:
    return OBJECT_PREFIX + lease_id


def lease_of_object(path: str) -> str | None:
    """The lease id an iommufd object of ours names; None for anyone else's."""
    found = _OBJECT.fullmatch(path)
    return found.group(1) if found else None


# -- QEMU's own QMP socket


class QmpMonitor:
    """QMP on QEMU's socket; the socket's peer is the QEMU (it made it)."""

    def __init__(self, session: qmp.Qmp, vmm: Vmm, pidfd: int, timeout: float) -> None:
        self.session = session
        self.vmm = vmm
        self.pidfd = pidfd
        self.timeout = timeout

    def execute(
        self, command: str, arguments: Mapping[str, Any] | None = None, *, fds: Sequence[int] = ()
    ) -> Any:
        return self.session.execute(command, arguments, fds=fds, timeout=self.timeout)

    def wait_deleted(self, device_id: str, timeout: float) -> None:
        path = f"/machine/peripheral/{device_id}"
        self.session.wait_event(
            "DEVICE_DELETED",
            lambda d: d.get("device") == device_id or d.get("path") == path,
            timeout,
        )


@contextlib.contextmanager
def qmp_monitor(socket_path: str, timeout: float = QMP_TIMEOUT) -> Iterator[QmpMonitor]:
    """QMP at ``socket_path``, negotiated, with its QEMU pinned."""
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
            who, pidfd = qmp.peer_pidfd(sock)
        except (*QMP_FAILURES, qmp.QmpError) as e:
            raise HotplugError(f"{socket_path} does not answer as QMP: {e}") from None
        except OSError as e:
            raise HotplugError(f"cannot tell which process serves {socket_path}: {e}") from None
        try:
            name = _name(session.execute("query-name", timeout=timeout))
            vmm = Vmm(pid=who.pid, uid=who.uid, version=version, name=name)
            yield QmpMonitor(session, vmm, pidfd, timeout)
        finally:
            os.close(pidfd)


def _name(answer: Any) -> str:
    return str(answer.get("name") or "") if isinstance(answer, dict) else ""


# -- attach


def _children(monitor: Monitor, path: str) -> set[str]:
    """The ids of the QOM objects under ``path`` (not its properties)."""
    found = monitor.execute("qom-list", {"path": path})
    return {str(e.get("name")) for e in found if str(e.get("type", "")).startswith("child<")}


def _guest_address(monitor: Monitor, device_id: str) -> str:
    for bus in monitor.execute("query-pci"):
        pending = list(bus.get("devices", []))
        while pending:
            d = pending.pop()
            if d.get("qdev_id") == device_id:
                return f"{d['bus']:02x}:{d['slot']:02x}.{d['function']:x}"
            pending += d.get("pci_bridge", {}).get("devices", [])
    return ""


def attach(
    client: Client,
    monitor: Monitor,
    device: str,
    *,
    device_id: str | None = None,
    bus: str | None = None,
    managed: bool = False,
    unsafe_noiommu: bool = False,
    label: str | None = None,
    acquire_timeout: float = 300.0,
    moves: ProgressCallback | None = None,
    say: Say = _quiet,
) -> Attached:
    """Lease ``device`` for the QEMU behind ``monitor`` and hot-add it there."""
    address = str(PciAddress.parse(device))
    device_id = check_id(device_id if device_id is not None else default_id(address))
    vmm = monitor.vmm
    say(f"QMP: {vmm}")
    try:
        taken = device_id in _children(monitor, "/machine/peripheral")
    except (*QMP_FAILURES, qmp.QmpError) as e:
        raise HotplugError(f"QMP failed before anything was done: {e}") from None
    if taken:
        raise HotplugError(
            f"QEMU (pid {vmm.pid}) has a device with id {device_id!r} already: "
            "give another with --id"
        )
    lease = client.acquire(
        [address],
        backend="iommufd",
        managed=managed,
        unsafe_noiommu=unsafe_noiommu,
        owner_pidfd=monitor.pidfd,
        label=label if label is not None else (vmm.name or f"qemu pid {vmm.pid}"),
        timeout=acquire_timeout,
        progress=moves,
    )
    say(f"lease {lease.id}: {address} for QEMU pid {vmm.pid} (it ends when QEMU exits)")
    try:
        return _hot_add(monitor, lease, address, device_id, bus, say)
    except BaseException as e:
        _undo(client, monitor, lease, say)
        back = " and puts the device back on its driver" if managed else ""
        if isinstance(e, qmp.QmpError):
            raise HotplugError(
                f"QEMU refused {e.command}: {e.desc}; vfiod released lease {lease.id}{back}"
            ) from None
        if isinstance(e, QMP_FAILURES):
            raise HotplugError(
                f"QMP failed during the attach ({e}); vfiod released lease {lease.id}{back}"
            ) from None
        raise


def _hot_add(
    monitor: Monitor, lease: Lease, address: str, device_id: str, bus: str | None, say: Say
) -> Attached:
    object_name = object_id(lease.id)
    device_fd = lease.fds.get(f"device:{address}")
    iommufd_fd = lease.fds.get("iommufd")
    if device_fd is None or iommufd_fd is None:
        raise HotplugError(
            f"vfiod's lease {lease.id} has no iommufd and device fd for {address} "
            f"(it gave {', '.join(lease.fds) or 'none'})"
        )
    names = {"iommufd": f"{object_name}-iommufd", "device": f"{object_name}-device"}
    monitor.execute("getfd", {"fdname": names["iommufd"]}, fds=[iommufd_fd])
    monitor.execute("getfd", {"fdname": names["device"]}, fds=[device_fd])
    lease.close()  # QEMU has them now
    say(f"QMP getfd: {names['iommufd']}, {names['device']}")
    monitor.execute(
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
    monitor.execute("device_add", arguments)
    guest = _guest_address(monitor, device_id)
    say(f"QMP device_add vfio-pci {device_id}" + (f": guest {guest}" if guest else ""))
    return Attached(
        lease=lease.path,
        device=address,
        id=device_id,
        object=object_name,
        qemu_pid=monitor.vmm.pid,
        qemu_version=monitor.vmm.version,
        guest_address=guest,
    )


def _undo(client: Client, monitor: Monitor, lease: Lease, say: Say) -> None:
    """Take back what a failed attach left: QEMU's unconsumed fds and the
    object (if QEMU still answers), our fds, the lease."""
    object_name = object_id(lease.id)
    quiet = (*QMP_FAILURES, qmp.QmpError, OSError)
    for suffix in ("iommufd", "device"):
        with contextlib.suppress(*quiet):  # "not found": QEMU consumed it
            monitor.execute("closefd", {"fdname": f"{object_name}-{suffix}"})
    with contextlib.suppress(*quiet):  # not there: it was never added
        monitor.execute("object-del", {"id": object_name})
    lease.close()
    _release(client, LEASE_PATH_PREFIX + lease.id)
    say(f"undone: QEMU's fds closed, lease {lease.id} released")


def _release(client: Client, lease_path: str) -> bool:
    """Release; False if the lease had ended already."""
    from vfiod.client import VfiodError  # noqa: PLC0415 - vfiod.client imports this module

    try:
        client.release(lease_path)
    except VfiodError as e:
        if e.kind != "NotFound":
            raise
        return False
    return True


# -- detach


def detach(
    client: Client,
    monitor: Monitor,
    device_id: str,
    *,
    timeout: float = UNPLUG_TIMEOUT,
    say: Say = _quiet,
) -> Detached:
    """Unplug QEMU's device ``device_id`` (one vfiod attached), wait for the
    guest to let go, delete its iommufd object and release its lease."""
    vmm = monitor.vmm
    say(f"QMP: {vmm}")
    try:
        link = monitor.execute(
            "qom-get", {"path": f"/machine/peripheral/{device_id}", "property": "iommufd"}
        )
    except qmp.QmpError as e:
        if e.error_class == "DeviceNotFound":
            raise HotplugError(f"QEMU (pid {vmm.pid}) has no device {device_id!r}") from None
        raise HotplugError(
            f"QEMU's device {device_id!r} is not a vfio-pci device on an iommufd ({e.desc})"
        ) from None
    except QMP_FAILURES as e:
        raise HotplugError(f"QMP failed before anything was done: {e}") from None
    lease_id = lease_of_object(str(link))
    if lease_id is None:
        raise HotplugError(
            f"QEMU's device {device_id!r} was not attached by vfiod (its iommufd is "
            f"{str(link) or 'none'}): unplug it with QMP device_del yourself"
        )
    object_name = object_id(lease_id)
    lease_path = LEASE_PATH_PREFIX + lease_id
    live = _check_lease(client, lease_path, vmm.pid)
    _unplug(monitor, device_id, lease_id, timeout, say)
    try:
        monitor.execute("object-del", {"id": object_name})
        say(f"QMP object-del {object_name}")
    except qmp.QmpError as e:
        say(f"QEMU kept the iommufd object {object_name}: {e.desc}")
    released = live and _release(client, lease_path)
    say(f"released lease {lease_id}" if released else f"lease {lease_id} had ended already")
    return Detached(
        lease=lease_path, id=device_id, object=object_name, qemu_pid=vmm.pid, released=released
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


def _unplug(monitor: Monitor, device_id: str, lease_id: str, timeout: float, say: Say) -> None:
    pid = monitor.vmm.pid
    try:
        monitor.execute("device_del", {"id": device_id})
        say(f"QMP device_del {device_id}: waiting up to {timeout:g} s for the guest")
    except qmp.QmpError as e:
        if "already in the process of unplug" not in e.desc:
            raise HotplugError(f"QEMU refused device_del {device_id}: {e.desc}") from None
        say(f"{device_id} is being unplugged already: waiting up to {timeout:g} s for the guest")
    try:
        monitor.wait_deleted(device_id, timeout)
    except TimeoutError:
        raise HotplugError(
            f"the guest of QEMU pid {pid} did not let go of {device_id} within {timeout:g} s "
            f"(no DEVICE_DELETED): the device stays in the VM and lease {lease_id} stays; "
            "detach again once the guest runs and handles hotplug, or stop the VM"
        ) from None
    except (ConnectionError, qmp.QmpProtocolError):
        raise HotplugError(
            f"QEMU stopped answering while {device_id} was being unplugged; its lease "
            f"{lease_id} ends when QEMU exits"
        ) from None
    say(f"QMP DEVICE_DELETED {device_id}")
