"""What admins get beyond the policy's rules (fake host): devices reserved
for vfio-pci from boot, a device reset between two tenants (and refused
when a rule requires a reset it cannot have), and polkit asked after the
policy, only ever narrowing it."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from tests.fakehost import BRIDGE_GROUP, E1000_A, E1000_B, NIC, SATA
from tests.unit.test_broker import ALICE, BOB, LEGACY, ROOT, World, close_all, make_world
from vfiod import polkit
from vfiod.__main__ import main as vfiod_main
from vfiod.broker import MESSAGE_POLKIT, MESSAGE_RESERVED, MESSAGE_RESET, LeaseState
from vfiod.errors import PermissionDenied
from vfiod.host.reserve import RULES_FILE, udev_rules, write_rules
from vfiod.pci import PciAddress
from vfiod.policy.load import PolicyError, Source, parse_policy
from vfiod.policy.model import Reservation
from vfiod.reasons import Reason

ALICE_NIC = """
[[rule]]
name = "alice-nic"
effect = "allow"
address = "0000:00:10.0"
users = ["alice"]
managed = true
"""
RESERVE_NIC = """
[[reserve]]
name = "nic-for-vms"
address = "0000:00:10.0"
comment = "the host never uses it"
"""


def audit(caplog: pytest.LogCaptureFixture, message_id: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "MESSAGE_ID", None) == message_id]


def set_policy(world: World, text: str) -> None:
    (world.host.policy_root / "etc/vfiod/policy.d/50-test.toml").write_text(text)


def rules_file(world: World) -> Path:
    return world.host.policy_root / RULES_FILE


# -- [[reserve]] in the policy


def test_a_reservation_names_exact_addresses_once() -> None:
    policy = parse_policy(
        [
            Source(
                "a.toml",
                (RESERVE_NIC + '[[reserve]]\nname = "b"\naddress = ["01:00.0"]\n').encode(),
            )
        ]
    ).policy
    assert [(r.name, r.addresses) for r in policy.reservations] == [
        ("nic-for-vms", (NIC,)),
        ("b", (PciAddress.parse("0000:01:00.0"),)),
    ]
    assert policy.reserved[NIC].source == "a.toml:2"
    text = (
        '[[reserve]]\nname = "glob"\naddress = "0000:01:*"\n'  # 1-3
        '[[reserve]]\nname = "twice"\naddress = "00:10.0"\nwhen = 1\n'  # 4-7
        + RESERVE_NIC  # 8-12: a second reservation of 00:10.0
        + '[[reserve]]\naddress = "00:11.0"\n'  # 13-14: no name
    )
    with pytest.raises(PolicyError) as e:
        parse_policy([Source("b.toml", text.encode())])
    problems = [(p.line, p.key) for p in e.value.problems]
    assert problems == [(3, "address"), (7, "when"), (11, "address"), (13, "name")]
    assert "no globs" in str(e.value)
    assert "reserved at b.toml:4 already" in str(e.value)


def test_reservation_and_rule_names_are_one_namespace() -> None:
    clash = RESERVE_NIC.replace("nic-for-vms", "alice-nic")
    with pytest.raises(PolicyError, match="'alice-nic' is already used"):
        parse_policy([Source("a.toml", (ALICE_NIC + clash).encode())])


def test_the_udev_rules_set_the_override_before_drivers_load(tmp_path: Path) -> None:
    gpu = PciAddress.parse("0000:01:00.0")
    reservation = Reservation("gpus", "/etc/vfiod/policy.d/10.toml:1", (NIC, gpu))
    text = udev_rules([(reservation, gpu), (reservation, NIC)], {gpu: (0x10DE, 0x2204)})
    lines = text.splitlines()
    nic_rule = 'KERNEL=="0000:00:10.0", GOTO="vfiod_reserved"'  # not present: by address
    gpu_rule = (
        'KERNEL=="0000:01:00.0", ATTR{vendor}=="0x10de", ATTR{device}=="0x2204", '
        'GOTO="vfiod_reserved"'
    )
    assert lines.index(nic_rule) < lines.index(gpu_rule)
    # Only add events of PCI devices; the override first, vfio-pci last.
    assert lines.index('ACTION!="add", GOTO="vfiod_reserved_end"') < lines.index(
        'ATTR{driver_override}="vfio-pci"'
    )
    assert lines[-2] == 'ATTR{[drivers/pci:vfio-pci]bind}="$kernel"'
    assert udev_rules([]) == ""
    # A file name is text in a comment: a newline in it starts no rule.
    odd = Reservation("odd", '/etc/vfiod/policy.d/x\nRUN+="/bin/sh".toml:1', (gpu,))
    assert not any(line.startswith("RUN") for line in udev_rules([(odd, gpu)]).splitlines())
    # Written once, rewritten only when it changes, removed when empty.
    root = str(tmp_path)
    assert write_rules(root, text) is True
    path = tmp_path / RULES_FILE
    assert path.read_text() == text
    assert oct(path.stat().st_mode & 0o777) == "0o644"
    before = path.stat().st_ino
    assert write_rules(root, text) is False
    assert path.stat().st_ino == before
    assert write_rules(root, "") is True
    assert not path.exists()
    assert write_rules(root, "") is False
    assert os.listdir(path.parent) == []  # no temporary file left


# -- reservations applied


@pytest.fixture
def reserved(tmp_path: Path) -> Iterator[World]:
    world = make_world(tmp_path, policy=ALICE_NIC + RESERVE_NIC)
    world.broker.udev_root = str(world.host.policy_root)
    yield world
    world.broker.shutdown()


def test_a_reserved_device_goes_to_vfio_pci_and_stays_there(
    reserved: World, caplog: pytest.LogCaptureFixture
) -> None:
    world, sysfs = reserved, reserved.host.sysfs
    caplog.set_level(logging.INFO)
    assert sysfs.driver(NIC) == "e1000e"
    world.broker.recover()  # what vfiod does as it starts
    assert (sysfs.driver(NIC), sysfs.driver_override(NIC)) == ("vfio-pci", "vfio-pci")
    assert world.broker.reservation(NIC) is not None
    # The ids of the device seen now: another one found there at a later
    # boot (hardware moved) is not taken from its driver.
    assert (
        'KERNEL=="0000:00:10.0", ATTR{vendor}=="0x8086", ATTR{device}=="0x10d3", '
        'GOTO="vfiod_reserved"'
    ) in rules_file(world).read_text().splitlines()
    [applied] = audit(caplog, MESSAGE_RESERVED)
    assert applied.getMessage() == (
        "reservation 'nic-for-vms' applied: 0000:00:10.0 is on vfio-pci (it was on e1000e)"
    )
    assert getattr(applied, "RESERVATION") == "nic-for-vms"  # noqa: B009 - a journal field
    # Nothing moves for a lease (managed or not), and nothing goes back after it.
    grant = world.acquire(managed=False)
    assert grant.lease.moved == ()
    close_all(grant.fds)
    world.broker.release(grant.lease.id, ALICE)
    assert grant.lease.state is LeaseState.FREE
    assert sysfs.driver(NIC) == "vfio-pci"
    assert world.host.state.load().bindings == {}
    # Starting again changes nothing.
    world.broker.apply_reservations()
    assert sysfs.driver(NIC) == "vfio-pci"
    assert len(audit(caplog, MESSAGE_RESERVED)) == 1


def test_a_reservation_made_while_leased_keeps_the_device_after_the_lease(
    reserved: World,
) -> None:
    world, sysfs = reserved, reserved.host.sysfs
    set_policy(world, ALICE_NIC)
    world.broker.reload_policy()
    grant = world.acquire()  # managed: vfiod moves it and records e1000e
    assert grant.lease.moved == (NIC,)
    set_policy(world, ALICE_NIC + RESERVE_NIC)
    assert world.broker.reload_policy() == []
    assert str(NIC) not in world.host.state.load().bindings  # nothing to give back now
    close_all(grant.fds)
    world.broker.release(grant.lease.id, ALICE)
    assert (sysfs.driver(NIC), sysfs.driver_override(NIC)) == ("vfio-pci", "vfio-pci")


def test_a_dropped_reservation_gives_the_device_back(reserved: World) -> None:
    world, sysfs = reserved, reserved.host.sysfs
    world.broker.recover()
    assert sysfs.driver(NIC) == "vfio-pci"
    set_policy(world, ALICE_NIC)
    world.broker.reload_policy()
    assert (sysfs.driver(NIC), sysfs.driver_override(NIC)) == ("e1000e", None)
    assert world.broker.reservation(NIC) is None
    assert not rules_file(world).exists()


def test_a_host_critical_device_is_never_reserved(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    world = make_world(tmp_path, policy=RESERVE_NIC.replace("00:10.0", "00:1f.2"))
    world.broker.udev_root = str(world.host.policy_root)
    world.broker.binder.critical = lambda: {SATA: ("backs the mounted file system /",)}
    caplog.set_level(logging.INFO)
    world.broker.recover()
    assert world.host.sysfs.driver(SATA) == "ahci"
    assert world.broker.reservation(SATA) is None
    assert "host-critical" in world.broker.unreservable[SATA]
    assert not rules_file(world).exists()
    [refused] = audit(caplog, MESSAGE_RESERVED)
    assert refused.levelno == logging.WARNING
    assert "does not apply to 0000:00:1f.2" in (refused.getMessage())


# -- a clean device for the next tenant


def test_every_device_of_a_lease_is_reset_before_it_is_free(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    world = make_world(tmp_path)
    caplog.set_level(logging.INFO)
    grant = world.acquire()
    assert world.host.sysfs.resets() == []
    close_all(grant.fds)
    world.broker.release(grant.lease.id, ALICE)
    assert world.host.sysfs.resets() == [NIC]
    assert world.host.sysfs.driver(NIC) == "e1000e"  # and then given back
    [reset] = audit(caplog, MESSAGE_RESET)
    assert (getattr(reset, "RESET"), getattr(reset, "DEVICES")) == ("done", str(NIC))  # noqa: B009


def test_a_device_without_reset_is_said_loudly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The two conventional e1000 of the fake host have no reset method."""
    world = make_world(tmp_path)
    caplog.set_level(logging.INFO)
    grant = world.acquire(BOB, devices=(str(E1000_A), str(E1000_B)))
    close_all(grant.fds)
    world.broker.release(grant.lease.id, BOB)
    entries = audit(caplog, MESSAGE_RESET)
    assert {getattr(e, "DEVICES") for e in entries} == {str(E1000_A), str(E1000_B)}  # noqa: B009
    assert {getattr(e, "RESET") for e in entries} == {"impossible"}  # noqa: B009
    assert all(e.levelno == logging.WARNING for e in entries)
    assert "has no reset method" in entries[0].getMessage()
    assert world.host.sysfs.resets() == []


def test_require_reset_refuses_a_device_that_cannot_be_reset(tmp_path: Path) -> None:
    policy = (
        ALICE_NIC.replace("managed = true", "managed = true\nrequire-reset = true")
        + '[[rule]]\nname = "e1000s"\neffect = "allow"\naddress = "0000:02:0?.0"\n'
        'users = ["alice"]\nmanaged = true\nrequire-reset = true\n'
    )
    world = make_world(tmp_path, policy=policy)
    [access] = world.broker.check_access(ALICE, [str(E1000_A), str(E1000_B)], LEGACY)[:1]
    assert (access.allowed, access.code, access.blocker) == (False, Reason.NO_RESET, E1000_A)
    assert f"IOMMU group {BRIDGE_GROUP}" in access.reason
    assert "require-reset" in access.reason
    with pytest.raises(PermissionDenied) as e:
        world.acquire(devices=(str(E1000_A), str(E1000_B)))
    assert e.value.code is Reason.NO_RESET
    assert world.host.sysfs.driver(E1000_A) == "e1000"  # nothing moved
    # The NIC can be reset (flr, bus): the same kind of rule grants it.
    grant = world.acquire()
    close_all(grant.fds)
    world.broker.release(grant.lease.id, ALICE)
    world.broker.shutdown()


# -- polkit inside the policy's ceiling


@dataclasses.dataclass
class FakeAuthority:
    """polkit's answers, set by the test; what vfiod asked, recorded."""

    verdicts: dict[str, polkit.Verdict]
    asked: list[tuple[polkit.Subject, str, dict[str, str]]] = dataclasses.field(
        default_factory=list
    )

    async def check(
        self, subject: polkit.Subject, action: str, details: Mapping[str, str]
    ) -> polkit.Answer:
        self.asked.append((subject, action, dict(details)))
        verdict = self.verdicts.get(details.get("device", ""), polkit.Verdict.NO)
        if verdict is polkit.Verdict.UNAVAILABLE:
            return polkit.unavailable("polkitd is not on the bus")
        return polkit.answer_of(
            action, subject.uid, verdict is polkit.Verdict.YES, verdict is polkit.Verdict.CHALLENGE
        )


ROOT_NIC = ALICE_NIC.replace('users = ["alice"]', 'users = ["root"]')


def polkit_world(tmp_path: Path, verdicts: dict[str, polkit.Verdict], on: bool = True) -> World:
    world = make_world(tmp_path, policy=ROOT_NIC, settings=f"polkit = {str(on).lower()}\n")
    world.broker.authority = FakeAuthority(verdicts)
    return world


def acquire_as_this_process(world: World) -> object:
    """As root, from this very process: polkit's subject must be a live one."""
    return asyncio.run(
        world.broker.acquire(
            ROOT, os.getpid(), ":1.9", [str(NIC)], dataclasses.replace(LEGACY, label="vm7")
        )
    )


def test_polkit_yes_grants_what_the_policy_allows(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    world = polkit_world(tmp_path, {str(NIC): polkit.Verdict.YES})
    caplog.set_level(logging.INFO)
    grant = acquire_as_this_process(world)
    authority = world.broker.authority
    assert isinstance(authority, FakeAuthority)
    [(subject, action, details)] = authority.asked
    assert (subject.pid, subject.uid, action) == (os.getpid(), 0, polkit.ACQUIRE)
    assert details == {"device": str(NIC), "group": "10", "label": "vm7", "backend": "legacy"}
    [said] = audit(caplog, MESSAGE_POLKIT)
    assert getattr(said, "VERDICT") == "yes"  # noqa: B009 - a journal field
    close_all(grant.fds)  # type: ignore[attr-defined]
    world.broker.release(grant.lease.id, ROOT)  # type: ignore[attr-defined]
    world.broker.shutdown()


@pytest.mark.parametrize(
    ("verdict", "words"),
    [
        (polkit.Verdict.NO, "polkit refuses"),
        (polkit.Verdict.CHALLENGE, "authentication"),
        (polkit.Verdict.UNAVAILABLE, "polkitd is not on the bus"),
    ],
)
def test_polkit_narrows_never_widens(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, verdict: polkit.Verdict, words: str
) -> None:
    world = polkit_world(tmp_path, {str(NIC): verdict})
    caplog.set_level(logging.INFO)
    with pytest.raises(PermissionDenied) as e:
        acquire_as_this_process(world)
    assert (e.value.code, e.value.blocker) == (Reason.POLKIT, NIC)
    assert words in e.value.message
    assert world.host.sysfs.driver(NIC) == "e1000e"  # nothing moved
    assert world.broker.leases == {}
    assert world.host.kernel.open_nodes() == {}
    [said] = audit(caplog, MESSAGE_POLKIT)
    assert (said.levelno, getattr(said, "VERDICT")) == (logging.WARNING, str(verdict))  # noqa: B009
    # What the policy refuses, polkit is never asked about.
    authority = world.broker.authority
    assert isinstance(authority, FakeAuthority)
    authority.asked.clear()
    with pytest.raises(PermissionDenied) as e:
        world.acquire(ALICE)
    assert e.value.code is Reason.NO_RULE
    assert authority.asked == []
    world.broker.shutdown()


def test_polkit_off_asks_nobody(tmp_path: Path) -> None:
    world = polkit_world(tmp_path, {}, on=False)
    grant = acquire_as_this_process(world)
    authority = world.broker.authority
    assert isinstance(authority, FakeAuthority)
    assert authority.asked == []
    close_all(grant.fds)  # type: ignore[attr-defined]
    world.broker.release(grant.lease.id, ROOT)  # type: ignore[attr-defined]
    world.broker.shutdown()


def test_polkit_decides_for_a_live_process_of_the_callers_uid(tmp_path: Path) -> None:
    """A pid whose process runs as another uid (a reused pid, a handed-on
    connection) must not lend its identity: refused before polkit is asked."""
    world = polkit_world(tmp_path, {str(NIC): polkit.Verdict.YES})
    other = dataclasses.replace(ROOT, uid=4321)
    with pytest.raises(PermissionDenied) as e:
        asyncio.run(world.broker.acquire(other, os.getpid(), ":1.9", [str(NIC)], LEGACY))
    assert e.value.code in (Reason.NO_RULE, Reason.POLKIT)
    authority = world.broker.authority
    assert isinstance(authority, FakeAuthority)
    assert authority.asked == []
    world.broker.shutdown()


# -- vfiod import-driverctl


def test_import_driverctl_writes_reservations_vfiod_reads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    overrides = tmp_path / "etc/driverctl.d"
    overrides.mkdir(parents=True)
    (overrides / "pci-0000:01:00.0").write_text("vfio-pci\n")
    (overrides / "pci-0000:01:00.1").write_text("vfio-pci\n")
    (overrides / "pci-0000:02:00.0").write_text("pci-stub\n")
    (overrides / "usb-1-1").write_text("vfio-pci\n")
    (overrides / ".pci-0000:03:00.0.swp").write_text("x")
    output = tmp_path / "40-driverctl.toml"
    argv = ["import-driverctl", "--root", str(tmp_path), "--output", str(output)]
    assert vfiod_main(argv) == 0
    err = capsys.readouterr().err
    assert "0000:02:00.0 to pci-stub, not vfio-pci; driverctl keeps it" in err
    assert "usb-1-1: not a PCI device" in err
    policy = parse_policy([Source(str(output), output.read_bytes())]).policy
    assert [(r.name, r.addresses) for r in policy.reservations] == [
        ("driverctl-0000:01:00.0", (PciAddress.parse("0000:01:00.0"),)),
        ("driverctl-0000:01:00.1", (PciAddress.parse("0000:01:00.1"),)),
    ]
    # Never over an existing file; nothing to import is a failure that says so.
    assert vfiod_main(argv) == 1
    assert "cannot write" in capsys.readouterr().err
    assert vfiod_main(["import-driverctl", "--root", str(tmp_path / "none")]) == 1
    assert "no vfio-pci override" in capsys.readouterr().err


def test_polkit_can_refuse_a_reload(tmp_path: Path) -> None:
    world = polkit_world(tmp_path, {})  # no for everything
    with pytest.raises(PermissionDenied) as e:
        asyncio.run(world.broker.authorize_reload(ROOT, os.getpid()))
    assert e.value.code is Reason.POLKIT
    authority = world.broker.authority
    assert isinstance(authority, FakeAuthority)
    assert [(action, details) for _, action, details in authority.asked] == [(polkit.RELOAD, {})]
    world.broker.shutdown()
