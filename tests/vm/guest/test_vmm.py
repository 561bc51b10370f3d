"""A stock QEMU, run as an unprivileged user, takes the VFIO fds a broker opened.

Runs in the test VM (test kernel, emulated Intel IOMMU) as root, which plays
vfiod: it binds the e1000e to vfio-pci, opens /dev/iommu and the device's cdev
(not bound to the iommufd: QEMU binds it), and starts QEMU as uid 65534 with
both fds inherited. QEMU builds a paused q35 machine with the device passed
through and QMP ``query-pci`` says whether it realized it. See tests/vm/vmm.py
for the locked-memory rules and why legacy fds cannot work.
"""

from __future__ import annotations

import contextlib
import resource
from collections.abc import Iterator

import pytest

from tests.vm.guest.conftest import Bound
from tests.vm.topology import E1000E, E1000E_IDS
from tests.vm.vmm import (
    KERNEL_DEFAULT_MEMLOCK,
    MiB,
    Progress,
    QemuError,
    QemuNotFoundError,
    find_qemu,
    memlock_needed,
    run_qemu,
)
from vfiod.host.binding import wait_for_node
from vfiod.host.sysfs import Sysfs
from vfiod.pci import PciAddress
from vfiod.vfio import CdevDevice, Container, Group, IommuFd, LinuxKernel, cdev_path, group_path

NOBODY = 65534
GUEST_RAM_MIB = 64
ENOUGH = memlock_needed(GUEST_RAM_MIB)
DEVICE_FD = f"device:{E1000E}"
# What `vfioctl run ... -- qemu-system-x86_64 ...` will be given.
PASSTHROUGH = (
    "-object",
    "iommufd,id=i0,fd={iommufd}",
    "-device",
    f"vfio-pci,id=hostdev0,iommufd=i0,fd={{{DEVICE_FD}}}",
)


@pytest.fixture(scope="module")
def qemu() -> str:
    try:
        path, _ = find_qemu()
    except QemuNotFoundError as e:
        pytest.skip(str(e))
    return path


@pytest.fixture
def progress(capsys: pytest.CaptureFixture[str]) -> Progress:
    first = True

    def show(line: str) -> None:
        nonlocal first
        with capsys.disabled():
            # The first line would otherwise continue pytest's "test name" line.
            print(("\n" if first else "") + f"    [qemu] {line}", flush=True)
        first = False

    return show


@contextlib.contextmanager
def brokered_fds(kernel: LinuxKernel) -> Iterator[dict[str, int]]:
    """What vfiod hands out for the iommufd backend: an iommufd and the device's
    cdev, opened by root, the cdev not bound (the VMM binds it)."""
    path = cdev_path(E1000E)
    wait_for_node(path)
    with IommuFd.open(kernel) as iommufd, CdevDevice.open(kernel, path, E1000E) as device:
        yield {"iommufd": iommufd.fileno(), DEVICE_FD: device.fileno()}


def test_unprivileged_qemu_realizes_brokered_device(
    kernel: LinuxKernel, bind_vfio: Bound, qemu: str, progress: Progress
) -> None:
    assert bind_vfio(E1000E).original_driver == "e1000e"
    with brokered_fds(kernel) as fds:
        run = run_qemu(
            PASSTHROUGH,
            fds=fds,
            uid=NOBODY,
            memlock=ENOUGH,
            memory_mib=GUEST_RAM_MIB,
            binary=qemu,
            progress=progress,
        )
        # The fds cannot serve a second VMM: the cdev stays bound to the iommufd
        # for as long as the open file lives (here: our copies), not the process.
        with pytest.raises(QemuError) as again:
            run_qemu(
                PASSTHROUGH, fds=fds, uid=NOBODY, memlock=ENOUGH, binary=qemu, progress=progress
            )
        assert "Invalid argument" in again.value.output
        assert "open the cdev again" in str(again.value)

    assert run.process.uid == run.process.gid == NOBODY
    assert run.process.groups == ()
    assert run.process.memlock_soft == run.process.memlock_hard == ENOUGH
    passed = [f for f in run.pci if f.qdev_id == "hostdev0"]
    assert len(passed) == 1, f"hostdev0 not in QEMU's guest: {[str(f) for f in run.pci]}"
    assert passed[0].ids == E1000E_IDS
    assert run.returncode == 0
    assert "SHUTDOWN" in run.events


@pytest.mark.parametrize("memlock", [KERNEL_DEFAULT_MEMLOCK, None], ids=["8MiB", "inherited"])
def test_default_memlock_is_too_small(
    kernel: LinuxKernel, bind_vfio: Bound, qemu: str, progress: Progress, memlock: int | None
) -> None:
    """Why vfiod must raise the VMM's RLIMIT_MEMLOCK: Linux's default (8 MiB,
    also what root's processes here inherit) cannot pin 64 MiB of guest RAM."""
    if memlock is None:
        inherited = resource.getrlimit(resource.RLIMIT_MEMLOCK)
        assert inherited == (KERNEL_DEFAULT_MEMLOCK, KERNEL_DEFAULT_MEMLOCK), (
            f"expected Linux's default RLIMIT_MEMLOCK in the guest, not {inherited}"
        )
    bind_vfio(E1000E)
    with brokered_fds(kernel) as fds, pytest.raises(QemuError) as failed:
        run_qemu(
            PASSTHROUGH,
            fds=fds,
            uid=NOBODY,
            memlock=memlock,
            memory_mib=GUEST_RAM_MIB,
            binary=qemu,
            progress=progress,
        )
    error = failed.value
    assert error.returncode not in (None, 0)
    assert "vfio_container_dma_map" in error.output
    assert "Cannot allocate memory" in error.output
    assert "RLIMIT_MEMLOCK (8 MiB)" in error.hint
    assert "raise the VMM's limit" in str(error)


def test_stock_qemu_takes_no_legacy_fds(
    sysfs: Sysfs, kernel: LinuxKernel, bind_vfio: Bound, qemu: str, progress: Progress
) -> None:
    """A broker holding the group, container and device fds cannot give them to
    a stock QEMU: the device fd needs an iommufd, and QEMU opens groups by path."""
    bind_vfio(E1000E)
    group_id = sysfs.iommu_group(PciAddress.parse(E1000E))
    assert group_id is not None
    wait_for_node(group_path(group_id))
    with Container.open(kernel) as container, Group.open(kernel, group_id) as group:
        group.set_container(container)
        container.set_iommu()
        with group.open_device(E1000E) as device:
            fds = {
                "container": container.fileno(),
                f"group:{group_id}": group.fileno(),
                DEVICE_FD: device.fileno(),
            }
            legacy = ("-device", f"vfio-pci,fd={{{DEVICE_FD}}}")
            by_path = ("-device", f"vfio-pci,host={E1000E}")
            attempts = (
                (legacy, NOBODY, "Use FD passing only with iommufd backend"),
                (by_path, NOBODY, "Permission denied"),  # group nodes are root-only
                (by_path, None, "Device or resource busy"),  # as root: we hold the group
            )
            for extra, uid, refusal in attempts:
                with pytest.raises(QemuError) as refused:
                    run_qemu(
                        extra, fds=fds, uid=uid, memlock=ENOUGH, binary=qemu, progress=progress
                    )
                assert refusal in refused.value.output
                if extra == by_path:
                    assert f"/dev/vfio/{group_id}" in refused.value.output
                assert refused.value.hint, refused.value.output


def test_enough_memlock_is_more_than_the_guest_and_the_default() -> None:
    assert ENOUGH > GUEST_RAM_MIB * MiB > KERNEL_DEFAULT_MEMLOCK
