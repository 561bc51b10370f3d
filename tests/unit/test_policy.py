"""The policy: loading TOML files (drop-ins, errors with file:line), matching,
precedence, the no-IOMMU and host-critical checks, the shipped examples, and
`vfiod check-policy`."""

from __future__ import annotations

import ast
import dataclasses
import grp
import json
import os
import pwd
import shutil
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.fakehost import NIC, add_e1000e
from vfiod.__main__ import main
from vfiod.host.fake import FakeSysfs
from vfiod.host.inventory import PciDevice
from vfiod.pci import PciAddress
from vfiod.policy.decide import decide, format_decision
from vfiod.policy.load import (
    FILE_KEY,
    MAX_NESTING,
    SETTINGS_KEYS,
    SYNTAX_KEY,
    KeyLines,
    LoadResult,
    PolicyError,
    PolicyHolder,
    Problem,
    Source,
    load_policy,
    parse_policy,
    parse_size,
)
from vfiod.policy.model import (
    Caller,
    Decision,
    Effect,
    Grants,
    Outcome,
    Policy,
    Refusal,
    Request,
    Rule,
    Settings,
)

PROJECT = Path(__file__).resolve().parents[2]
EXAMPLES = PROJECT / "policy" / "examples"
KNOWN_USERS = {"alice", "bob", "libvirt-qemu", "root"}
KNOWN_GROUPS = {"alice", "bob", "kvm", "libvirt"}
POLICY_D = "etc/vfiod/policy.d"
USR_POLICY_D = "usr/lib/vfiod/policy.d"

ALICE = Caller(
    uid=1000, user="alice", gids=(1000, 107), groups=("alice", "kvm"), unit=None, slices=()
)
BOB = Caller(uid=1001, user="bob", gids=(1001,), groups=("bob",), unit=None, slices=())
ROOT = Caller(uid=0, user="root", gids=(0,), groups=("root",), unit=None, slices=())
VMM = Caller(
    uid=64055,
    user="libvirt-qemu",
    gids=(64055,),
    groups=("libvirt-qemu",),
    unit="machine-qemu\\x2d1\\x2dwin10.scope",
    slices=("machine.slice",),
)
LEGACY = Request(backend="legacy", managed=False, unsafe_noiommu=False)


def pci(
    address: str = "0000:00:10.0",
    *,
    vendor: int = 0x8086,
    device: int = 0x10D3,
    subsystem_vendor: int = 0x8086,
    subsystem_device: int = 0xA01F,
    pci_class: int = 0x020000,
    driver: str | None = "e1000e",
    group: str | None = "10",
) -> PciDevice:
    return PciDevice(
        address=PciAddress.parse(address),
        vendor=vendor,
        device=device,
        subsystem_vendor=subsystem_vendor,
        subsystem_device=subsystem_device,
        pci_class=pci_class,
        driver=driver,
        group=group,
        reset_methods=("flr",),
        physfn=None,
        virtfns=(),
    )


def put(root: Path, relative: str, text: str) -> Path:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def load(root: Path) -> LoadResult:
    return load_policy(
        str(root),
        user_exists=KNOWN_USERS.__contains__,
        group_exists=KNOWN_GROUPS.__contains__,
    )


def parse(*texts: str, settings: str | None = None) -> LoadResult:
    """Parse texts as policy.d files named 10-test.toml, 20-test.toml, ..."""
    return parse_policy(
        [Source(f"{10 * (i + 1)}-test.toml", t.encode()) for i, t in enumerate(texts)],
        Source("vfiod.toml", settings.encode()) if settings is not None else None,
        user_exists=KNOWN_USERS.__contains__,
        group_exists=KNOWN_GROUPS.__contains__,
    )


def policy_of(*texts: str, settings: str | None = None) -> Policy:
    return parse(*texts, settings=settings).policy


def problems_of(*texts: str, settings: str | None = None) -> tuple[Problem, ...]:
    with pytest.raises(PolicyError) as raised:
        parse(*texts, settings=settings)
    return raised.value.problems


def rule(body: str, name: str = "r", effect: str = "allow") -> str:
    """A [[rule]] at line 1 with name (line 2) and effect (line 3); body from line 4."""
    return f'[[rule]]\nname = "{name}"\neffect = "{effect}"\n{body}\n'


def allow(body: str, name: str = "r") -> str:
    return rule(body, name)


def decide_one(
    policy: Policy,
    caller: Caller = ALICE,
    device: PciDevice | None = None,
    request: Request = LEGACY,
    *,
    host_critical: tuple[str, ...] = (),
    noiommu: bool = False,
) -> Decision:
    """decide() with the full trace, checked against the indexed fast path."""
    device = device or pci()
    fast = decide(policy, caller, device, request, host_critical=host_critical, noiommu=noiommu)
    full = decide(
        policy, caller, device, request, host_critical=host_critical, noiommu=noiommu, explain=True
    )
    # The indexes must never change the answer, only the trace.
    assert (fast.allowed, fast.rule, fast.grants, fast.reasons, fast.refusal) == (
        full.allowed,
        full.rule,
        full.grants,
        full.reasons,
        full.refusal,
    )
    return full


# ---------------------------------------------------------------------------
# The format


def test_the_broker_test_policy_loads_and_decides() -> None:
    """tests/unit/test_broker.py writes its POLICY as a policy file: it must load."""
    source = (PROJECT / "tests/unit/test_broker.py").read_text()
    [text] = [
        node.value.value
        for node in ast.parse(source).body
        if isinstance(node, ast.Assign)
        and any(isinstance(t, ast.Name) and t.id == "POLICY" for t in node.targets)
        and isinstance(node.value, ast.Constant)
        and isinstance(node.value.value, str)
    ]
    policy = policy_of(text)
    assert policy.rules
    alice_nic = next(r for r in policy.rules if r.name == "alice-nic")
    assert alice_nic.exact_addresses == frozenset({NIC})
    assert alice_nic.grants.managed
    decision = decide_one(policy, ALICE, pci(), Request("legacy", True, False))
    assert decision.allowed
    assert decision.rule == alice_nic
    assert decision.grants == alice_nic.grants
    assert decide_one(policy, BOB).refusal is Refusal.NO_RULE


def test_every_key_is_read_and_normalised() -> None:
    text = """\
[[rule]]
name = "everything"
effect = "allow"
comment = "all the keys"
address = ["0000:0A:00.0", "01:00.1", "0000:02:1[0-7].*"]
vendor = ["10DE", 0x8086]
device = "0x2204"
subsystem-vendor = "10de"
subsystem-device = "1467"
class = ["03", "0403"]
iommu-group = [14, "15"]
driver = ["nvidia", "*_vfio_pci", "none"]
users = ["alice", 1000]
groups = ["kvm", 107]
units = ["vm@*.service"]
slices = "machine.slice"
managed = true
companions = true
unsafe-noiommu = false
backends = "iommufd"
max-leases = 2
max-locked-memory = "16G"
restore-driver = false
"""
    [r] = policy_of(text).rules
    assert r == Rule(
        name="everything",
        effect=Effect.ALLOW,
        source="10-test.toml:1",
        addresses=("0000:0a:00.0", "0000:01:00.1", "0000:02:1[0-7].*"),
        vendors=(0x10DE, 0x8086),
        devices=(0x2204,),
        subsystem_vendors=(0x10DE,),
        subsystem_devices=(0x1467,),
        classes=("03", "0403"),
        iommu_groups=("14", "15"),
        drivers=("nvidia", "*_vfio_pci", "none"),
        users=("alice",),
        uids=(1000,),
        groups=("kvm",),
        gids=(107,),
        units=("vm@*.service",),
        slices=("machine.slice",),
        grants=Grants(
            managed=True,
            companions=True,
            unsafe_noiommu=False,
            backends=("iommufd",),
            max_leases=2,
            max_locked_memory=16 * 2**30,
            restore_driver=False,
        ),
        comment="all the keys",
    )
    assert r.exact_addresses == frozenset(
        {PciAddress.parse("0000:0a:00.0"), PciAddress.parse("0000:01:00.1")}
    )


def test_grants_default_to_the_documented_values() -> None:
    [r] = policy_of(allow('address = "*"\nusers = ["*"]')).rules
    assert r.grants == Grants()
    assert Grants() == Grants(
        managed=False,
        companions=False,
        unsafe_noiommu=False,
        backends=("legacy", "iommufd"),
        max_leases=None,
        max_locked_memory=None,
        restore_driver=True,
    )


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("4096", 4096),
        ("1K", 1024),
        ("512M", 512 * 2**20),
        ("16G", 16 * 2**30),
        ("16g", 16 * 2**30),
        ("16GiB", 16 * 2**30),
        ("16 GB", 16 * 2**30),
        ("2T", 2 * 2**40),
        ("1P", 2**50),
        ("7E", 7 * 2**60),
        ("100B", 100),
        (65536, 65536),
    ],
)
def test_sizes(text: str | int, size: int) -> None:
    assert parse_size(text) == size
    value = f'"{text}"' if isinstance(text, str) else str(text)
    [r] = policy_of(allow(f'address = "*"\nusers = ["*"]\nmax-locked-memory = {value}')).rules
    assert r.grants.max_locked_memory == size


def test_settings(tmp_path: Path) -> None:
    assert load(tmp_path).policy.settings == Settings()  # no file: the defaults
    put(tmp_path, "usr/lib/vfiod/vfiod.toml", 'default-backend = "iommufd"\n')
    assert load(tmp_path).policy.settings == Settings(default_backend="iommufd")
    put(tmp_path, "etc/vfiod/vfiod.toml", "allow-unsafe-noiommu = true\n")
    # The file in etc replaces the one in usr/lib as a whole.
    assert load(tmp_path).policy.settings == Settings(allow_unsafe_noiommu=True)
    (tmp_path / "etc/vfiod/vfiod.toml").unlink()
    (tmp_path / "etc/vfiod/vfiod.toml").symlink_to(os.devnull)
    assert load(tmp_path).policy.settings == Settings()


def test_dma_limit_defaults_to_1g_and_reads_sizes(tmp_path: Path) -> None:
    assert Settings().dma_limit == 2**30
    assert load(tmp_path).policy.settings.dma_limit == 2**30
    assert policy_of(settings='dma-limit = "4G"\n').settings == Settings(dma_limit=4 * 2**30)
    assert policy_of(settings="dma-limit = 65536\n").settings.dma_limit == 65536
    put(tmp_path, "etc/vfiod/vfiod.toml", 'dma-limit = "512M"\n')
    assert load(tmp_path).policy.settings.dma_limit == 512 * 2**20


@pytest.mark.parametrize("value", ["0", "-1", '"0"', '"lots"', '"1X"', "true", "1.5", '["1G"]'])
def test_a_dma_limit_that_is_not_a_size_is_an_error(value: str) -> None:
    [problem] = problems_of(settings=f"# pinning in vfiod\n\ndma-limit = {value}\n")
    assert (problem.file, problem.line, problem.key) == ("vfiod.toml", 3, "dma-limit")
    assert problem.message.startswith('expected a size like "16G" or "512M"')


def test_the_shipped_settings_are_the_defaults(tmp_path: Path) -> None:
    shutil.copy(PROJECT / "policy/vfiod.toml", put(tmp_path, "etc/vfiod/vfiod.toml", ""))
    assert load(tmp_path).policy.settings == Settings()
    # Every setting is there, set to its default, for the admin to see.
    shipped = tomllib.loads((PROJECT / "policy/vfiod.toml").read_text())
    assert set(shipped) == set(SETTINGS_KEYS)
    assert shipped["dma-limit"] == "1G"


# ---------------------------------------------------------------------------
# Drop-ins


def test_etc_replaces_usr_lib_by_file_name(tmp_path: Path) -> None:
    put(
        tmp_path,
        f"{USR_POLICY_D}/50-vendor.toml",
        allow('address = "*"\nusers = ["bob"]', "vendor"),
    )
    put(tmp_path, f"{POLICY_D}/50-vendor.toml", allow('address = "*"\nusers = ["alice"]', "admin"))
    result = load(tmp_path)
    assert [r.name for r in result.policy.rules] == ["admin"]
    assert result.policy.files == (str(tmp_path / POLICY_D / "50-vendor.toml"),)
    assert decide_one(result.policy, ALICE).allowed
    assert not decide_one(result.policy, BOB).allowed


def test_files_are_read_in_name_order_across_both_directories(tmp_path: Path) -> None:
    same = 'address = "*"\nusers = ["alice"]'
    put(tmp_path, f"{POLICY_D}/30-c.toml", allow(same, "c"))
    put(tmp_path, f"{USR_POLICY_D}/10-a.toml", allow(same, "a"))
    put(tmp_path, f"{POLICY_D}/20-b.toml", allow(same, "b"))
    policy = load(tmp_path).policy
    assert [r.name for r in policy.rules] == ["a", "b", "c"]
    # Equally specific rules: the one read first wins.
    decision = decide_one(policy)
    assert decision.rule is not None
    assert decision.rule.name == "a"
    assert "which comes first in the policy" in str(decision.trace)


@pytest.mark.parametrize("mask", ["empty", "devnull"])
def test_an_empty_or_dev_null_file_in_etc_masks_its_namesake(tmp_path: Path, mask: str) -> None:
    put(tmp_path, f"{USR_POLICY_D}/50-vendor.toml", allow('address = "*"\nusers = ["*"]'))
    path = put(tmp_path, f"{POLICY_D}/50-vendor.toml", "")
    if mask == "devnull":
        path.unlink()
        path.symlink_to(os.devnull)
    assert load(tmp_path).policy.rules == ()


def test_only_toml_files_count(tmp_path: Path) -> None:
    body = 'address = "*"\nusers = ["*"]'
    put(tmp_path, f"{POLICY_D}/README", "not toml at all [")
    put(tmp_path, f"{POLICY_D}/50-x.toml~", "not toml at all [")
    put(tmp_path, f"{POLICY_D}/.50-x.toml.swp", "not toml at all [")
    put(tmp_path, f"{POLICY_D}/.hidden.toml", "not toml at all [")
    put(tmp_path, f"{POLICY_D}/50-x.toml", allow(body))
    assert [r.name for r in load(tmp_path).policy.rules] == ["r"]


def test_no_files_is_deny_all(tmp_path: Path) -> None:
    policy = load(tmp_path).policy
    assert policy == Policy()
    for caller in (ALICE, ROOT):
        decision = decide_one(policy, caller)
        assert not decision.allowed
        assert decision.refusal is Refusal.NO_RULE


def test_rule_names_are_unique_across_files() -> None:
    body = 'address = "*"\nusers = ["*"]'
    [problem] = problems_of(allow(body, "same"), allow(body, "same"))
    assert str(problem) == (
        "20-test.toml:2: name: the name 'same' is already used at 10-test.toml:1; rename one"
    )


# ---------------------------------------------------------------------------
# Matching


@pytest.mark.parametrize(
    ("selector", "matches"),
    [
        ('address = "0000:00:10.0"', True),
        ('address = "00:10.0"', True),
        ('address = "0000:00:11.0"', False),
        ('address = "0000:00:1?.*"', True),
        ('address = "0000:00:1[1-f].*"', False),
        ('address = "*:10.[!1-7]"', True),
        ('address = ["0000:00:11.0", "0000:00:10.*"]', True),
        ('address = "*"', True),
        ('vendor = "8086"', True),
        ('vendor = ["10de", "1002"]', False),
        ('device = "10d3"', True),
        ('device = "10d4"', False),
        ('subsystem-vendor = "8086"', True),
        ('subsystem-device = "a01f"', True),
        ('subsystem-device = "a020"', False),
        ('class = "02"', True),
        ('class = "0200"', True),
        ('class = "020000"', True),
        ('class = "0300"', False),
        ("iommu-group = 10", True),
        ('iommu-group = ["9", 11]', False),
        ('driver = "e1000e"', True),
        ('driver = "e1000*"', True),
        ('driver = "none"', False),
        ('address = "0000:00:10.0"\nvendor = "8086"\nclass = "02"', True),
        ('address = "0000:00:10.0"\nvendor = "10de"', False),
    ],
)
def test_device_selectors(selector: str, matches: bool) -> None:
    policy = policy_of(allow(f'{selector}\nusers = ["alice"]'))
    assert decide_one(policy).allowed is matches


def test_driver_none_matches_an_unbound_device() -> None:
    policy = policy_of(allow('driver = "none"\nusers = ["alice"]'))
    assert decide_one(policy, device=pci(driver=None)).allowed
    assert not decide_one(policy, device=pci(driver="e1000e")).allowed


def test_iommu_group_never_matches_a_device_without_one() -> None:
    policy = policy_of(allow('iommu-group = 10\nusers = ["alice"]'))
    assert not decide_one(policy, device=pci(group=None)).allowed


@pytest.mark.parametrize(
    ("selector", "caller", "matches"),
    [
        ('users = ["alice"]', ALICE, True),
        ('users = ["alice"]', BOB, False),
        ('users = "alice"', ALICE, True),
        ('users = ["bob", 1000]', ALICE, True),
        ("users = [0]", ROOT, True),
        ('users = ["*"]', BOB, True),
        ('groups = ["kvm"]', ALICE, True),
        ('groups = ["kvm"]', BOB, False),
        ("groups = [107]", ALICE, True),
        ('groups = ["*"]', BOB, True),
        ('units = ["machine-qemu*.scope"]', VMM, True),
        ("units = ['machine-qemu\\x2d1\\x2d*.scope']", VMM, True),
        ('units = ["vm@*.service"]', VMM, False),
        ('units = ["*"]', ALICE, False),  # alice runs in no unit
        ('slices = ["machine.slice"]', VMM, True),
        ('slices = ["machine.slice"]', ALICE, False),
        ('slices = ["user-*.slice", "machine*"]', VMM, True),
        ('users = ["libvirt-qemu"]\nslices = ["machine.slice"]', VMM, True),
        ('users = ["alice"]\nslices = ["machine.slice"]', VMM, False),
    ],
)
def test_caller_selectors(selector: str, caller: Caller, matches: bool) -> None:
    policy = policy_of(allow(f'address = "*"\n{selector}'))
    assert decide_one(policy, caller).allowed is matches


def test_every_selector_must_match() -> None:
    policy = policy_of(allow('address = "*"\nusers = ["alice"]\nunits = ["vm@*.service"]'))
    in_vm = dataclasses.replace(ALICE, unit="vm@win10.service")
    assert decide_one(policy, in_vm).allowed
    decision = decide_one(policy, ALICE)
    assert not decision.allowed
    [entry] = decision.trace
    assert entry.outcome is Outcome.NOT_MATCHED
    assert entry.detail == "units: wants running in vm@*.service, has in no systemd unit"
    assert not decide_one(policy, dataclasses.replace(BOB, unit="vm@win10.service")).allowed


def test_root_is_not_special() -> None:
    policy = policy_of(allow('address = "*"\nusers = ["alice"]'))
    decision = decide_one(policy, ROOT)
    assert decision.refusal is Refusal.NO_RULE
    assert decision.reasons == (
        "No policy rule allows user root (uid 0) to use 0000:00:10.0 (8086:10d3 Ethernet "
        "controller), and policy denies by default: ask an admin to add an allow rule in "
        "/etc/vfiod/policy.d/ (`vfiod check-policy --explain 0000:00:10.0 --user root` shows "
        "why none matches).",
    )


# ---------------------------------------------------------------------------
# Precedence


def test_deny_wins_over_any_allow() -> None:
    policy = policy_of(
        allow('address = "0000:00:10.0"\nusers = ["alice"]\nmanaged = true', "exact-allow"),
        rule('class = "02"\ngroups = ["*"]', "no-nics", effect="deny"),
    )
    decision = decide_one(policy)
    assert not decision.allowed
    assert decision.refusal is Refusal.DENY_RULE
    assert decision.grants is None
    assert decision.rule is not None
    assert decision.rule.name == "no-nics"
    assert decision.reasons == (
        "0000:00:10.0 (8086:10d3 Ethernet controller) is denied to user alice (uid 1000) by "
        "deny rule 'no-nics' (20-test.toml:1); deny rules win over allow rules: ask an admin to "
        "change that rule if this device should be yours.",
    )
    outcomes = {e.rule: (e.outcome, e.detail) for e in decision.trace}
    assert outcomes["no-nics"] == (
        Outcome.WON,
        "matches and decides: deny rules win over allow rules",
    )
    assert outcomes["exact-allow"] == (
        Outcome.MATCHED,
        "matches, but deny rule 'no-nics' (20-test.toml:1) matches too and deny rules win",
    )
    # The deny rule is only for what it matches.
    assert decide_one(policy, device=pci(pci_class=0x030000)).allowed


def test_an_exact_address_beats_globs_and_ids() -> None:
    policy = policy_of(
        allow('address = "0000:00:*"\nvendor = "8086"\nclass = "02"\nusers = ["alice"]', "broad"),
        allow('address = "0000:00:10.0"\nusers = ["alice"]\nmanaged = true', "exact"),
    )
    decision = decide_one(policy)
    assert decision.rule is not None
    assert decision.rule.name == "exact"
    assert decision.grants == Grants(managed=True)
    outcomes = {e.rule: e for e in decision.trace}
    assert outcomes["exact"].detail == (
        "matches and decides: names 0000:00:10.0 by exact address, 1 device and 1 caller "
        "selector(s); the most specific of 2 matching allow rules"
    )
    assert outcomes["broad"].detail == (
        "matches, but 'exact' (20-test.toml:1) names 0000:00:10.0 by exact address and this "
        "rule does not"
    )


def test_more_device_selectors_win_then_more_caller_selectors() -> None:
    policy = policy_of(
        allow('address = "0000:00:*"\ngroups = ["kvm"]\nusers = ["alice"]', "one-device-key"),
        allow('address = "0000:00:*"\nvendor = "8086"\ngroups = ["*"]', "two-device-keys"),
        allow('address = "0000:00:*"\nvendor = "8086"\nusers = ["alice"]\nmax-leases = 1', "w"),
    )
    decision = decide_one(policy)
    assert decision.rule is not None
    assert decision.rule.name == "w"
    outcomes = {e.rule: e.detail for e in decision.trace}
    assert outcomes["one-device-key"] == (
        "matches, but 'w' (30-test.toml:1) is more specific: 2 device selector(s) against 1 here"
    )
    assert outcomes["two-device-keys"] == (
        "matches, but 'w' (30-test.toml:1) is more specific: 1 caller selector(s) against 0 here"
    )


def test_explain_traces_every_rule_and_the_fast_path_summarises() -> None:
    policy = policy_of(
        allow('address = "0000:00:10.0"\nusers = ["bob"]', "bobs"),
        allow('vendor = "10de"\nusers = ["alice"]', "alice-nvidia"),
        allow('address = "0000:00:10.0"\nusers = ["alice"]', "alices"),
    )
    full = decide(policy, ALICE, pci(), LEGACY, explain=True)
    assert [(e.rule, e.outcome) for e in full.trace] == [
        ("bobs", Outcome.NOT_MATCHED),
        ("alice-nvidia", Outcome.NOT_MATCHED),
        ("alices", Outcome.WON),
    ]
    assert full.trace[0].detail == "users: wants bob, has alice (uid 1000)"
    assert full.trace[1].detail == "vendor: wants 10de, has 8086"
    fast = decide(policy, ALICE, pci(), LEGACY)
    assert [(e.outcome, e.count, e.rule) for e in fast.trace] == [
        (Outcome.SKIPPED, 1, ""),
        (Outcome.SKIPPED, 1, ""),
        (Outcome.WON, 1, "alices"),
    ]
    assert str(fast.trace[0]) == (
        "1 rule(s) skipped: they do not apply to this caller (other users, groups, units or slices)"
    )
    assert (
        str(fast.trace[1]) == "1 rule(s) skipped: they apply to this caller but not to this device"
    )
    text = format_decision(full)
    assert text.startswith("ALLOWED\n  Allowed by rule 'alices' (30-test.toml:1).\n  grants: ")
    assert "not-matched allow 'bobs' (10-test.toml:1): users: wants bob" in text


def test_a_repeated_or_equal_caller_gets_the_same_answer() -> None:
    policy = policy_of(allow('address = "*"\ngroups = ["kvm"]'))
    twin = dataclasses.replace(ALICE)
    assert decide(policy, ALICE, pci(), LEGACY).allowed
    assert decide(policy, twin, pci(), LEGACY).allowed
    assert not decide(policy, BOB, pci(), LEGACY).allowed
    assert decide(policy, ALICE, pci(), LEGACY).allowed


# ---------------------------------------------------------------------------
# Host-critical, no-IOMMU, backends


CRITICAL = ("backs / (ext4 on /dev/nvme0n1p2)",)


def test_a_host_critical_device_needs_a_rule_naming_it_exactly() -> None:
    glob = policy_of(allow('address = "0000:00:1*"\nusers = ["alice"]\nmanaged = true', "glob"))
    decision = decide_one(glob, host_critical=CRITICAL)
    assert decision.refusal is Refusal.HOST_CRITICAL
    assert decision.grants is None
    assert decision.reasons == (
        "0000:00:10.0 is host-critical (backs / (ext4 on /dev/nvme0n1p2)): only a rule naming "
        "it by exact address (address = \"0000:00:10.0\") may hand it out, and rule 'glob' "
        "(10-test.toml:1) matches it by glob or ids. Move what uses it off the device first, "
        "then ask an admin for such a rule.",
    )
    exact = policy_of(allow('address = "0000:00:10.0"\nusers = ["alice"]\nmanaged = true'))
    assert decide_one(exact, host_critical=CRITICAL).allowed
    # Without any rule: the usual refusal, and what a rule would need.
    decision = decide_one(Policy(), host_critical=CRITICAL)
    assert decision.refusal is Refusal.NO_RULE
    assert decision.reasons[1] == (
        "0000:00:10.0 is host-critical (backs / (ext4 on /dev/nvme0n1p2)): only a rule naming "
        'it by exact address (address = "0000:00:10.0") may hand it out.'
    )


@pytest.mark.parametrize("setting", [False, True])
@pytest.mark.parametrize("granted", [False, True])
@pytest.mark.parametrize("consent", [False, True])
def test_no_iommu_needs_all_three(setting: bool, granted: bool, consent: bool) -> None:
    policy = policy_of(
        allow(f'address = "*"\nusers = ["alice"]\nunsafe-noiommu = {str(granted).lower()}'),
        settings=f"allow-unsafe-noiommu = {str(setting).lower()}\n",
    )
    request = Request(backend="legacy", managed=False, unsafe_noiommu=consent)
    decision = decide_one(policy, request=request, noiommu=True)
    assert decision.allowed is (setting and granted and consent)
    text = " ".join(decision.reasons)
    assert ("allow-unsafe-noiommu = true in /etc/vfiod/vfiod.toml" in text) is not setting
    assert ("rule 'r' (10-test.toml:1) does not grant it" in text) is not granted
    assert ("your own consent" in text) is not consent
    if not decision.allowed:
        assert decision.refusal is Refusal.UNSAFE_NOIOMMU
        assert decision.reasons[0].startswith(
            "0000:00:10.0 is in an unsafe no-IOMMU group (it can DMA to all of the host's "
            "memory) and needs three things; missing: "
        )
    # The same device outside a no-IOMMU group needs none of it.
    assert decide_one(policy, request=request).allowed


def test_no_iommu_without_any_rule_names_every_missing_piece() -> None:
    decision = decide_one(Policy(), noiommu=True)
    assert decision.refusal is Refusal.NO_RULE
    assert len(decision.reasons) == 4
    assert decision.reasons[1] == (
        "0000:00:10.0 is in an unsafe no-IOMMU group (it can DMA to all of the host's memory) "
        "and needs three things; missing: the daemon setting allow-unsafe-noiommu = true in "
        "/etc/vfiod/vfiod.toml (an admin's choice; it is off)."
    )
    assert decision.reasons[2] == "Missing: a matching allow rule with unsafe-noiommu = true."
    assert decision.reasons[3] == (
        "Missing: your own consent: ask with the option unsafe-noiommu = true."
    )


def test_the_backend_must_be_granted() -> None:
    policy = policy_of(allow('address = "*"\nusers = ["alice"]\nbackends = ["legacy"]'))
    decision = decide_one(policy, request=Request("iommufd", False, False))
    assert decision.refusal is Refusal.BACKEND
    assert decision.reasons == (
        "Rule 'r' (10-test.toml:1) allows 0000:00:10.0 only with backend legacy, not iommufd: "
        "ask for that backend, or ask an admin to add 'iommufd' to the rule's backends.",
    )
    assert decide_one(policy, request=Request("legacy", False, False)).allowed
    # No backend in the request: the policy's default.
    assert decide_one(policy, request=Request(None, False, False)).allowed
    iommufd_default = policy_of(
        allow('address = "*"\nusers = ["alice"]\nbackends = ["legacy"]'),
        settings='default-backend = "iommufd"',
    )
    assert not decide_one(iommufd_default, request=Request(None, False, False)).allowed


def test_every_failed_check_is_a_reason_the_first_is_the_refusal() -> None:
    policy = policy_of(allow('address = "*"\nusers = ["alice"]\nbackends = ["iommufd"]'))
    decision = decide_one(policy, host_critical=CRITICAL, noiommu=True)
    assert decision.refusal is Refusal.HOST_CRITICAL
    assert len(decision.reasons) == 5
    assert "is host-critical" in decision.reasons[0]
    assert "unsafe no-IOMMU group" in decision.reasons[1]
    assert "does not grant it" in decision.reasons[2]
    assert "your own consent" in decision.reasons[3]
    assert "only with backend iommufd, not legacy" in decision.reasons[4]


def test_allowed_without_managed_says_so_when_asked() -> None:
    policy = policy_of(allow('address = "*"\nusers = ["alice"]'))
    decision = decide_one(policy, request=Request("legacy", True, False))
    assert decision.allowed
    assert decision.reasons == (
        "Allowed by rule 'r' (10-test.toml:1).",
        "The rule does not let vfiod rebind the device (no managed = true): bind it to "
        "vfio-pci yourself.",
    )


# ---------------------------------------------------------------------------
# Errors: every one names file, line, key and what is expected


BASE = 'address = "*"\nusers = ["*"]'  # lines 4 and 5 of rule()


@pytest.mark.parametrize(
    ("text", "line", "key", "message"),
    [
        (
            allow(f'{BASE}\nvendr = "10de"'),
            6,
            "vendr",
            "unknown key 'vendr' in rule 'r'; did you mean 'vendor'?",
        ),
        (
            allow(f"{BASE}\nmax_leases = 1"),
            6,
            "max_leases",
            "unknown key 'max_leases' in rule 'r'; did you mean 'max-leases'?",
        ),
        (
            allow(f"{BASE}\nxyzzy = 1"),
            6,
            "xyzzy",
            "unknown key 'xyzzy' in rule 'r'; expected one of: name, effect, comment, address, ",
        ),
        (
            allow(f'{BASE}\n"quoted key" = 1'),
            6,
            "quoted key",
            "unknown key 'quoted key' in rule 'r'",
        ),
        (allow(f"{BASE}\n[rule.extra]\nx = 1"), 6, "extra", "unknown key 'extra' in rule 'r'"),
        (
            allow('address = 10\nusers = ["*"]'),
            4,
            "address",
            "expected a PCI address DDDD:BB:DD.F in hex or a glob of one, like "
            '"0000:01:00.*", got an integer (10)',
        ),
        (
            allow('address = "0000:00:1[0-7.*"\nusers = ["*"]'),
            4,
            "address",
            "the glob '0000:00:1[0-7.*' has a '[' without its ']'",
        ),
        (
            allow('address = "0000:00:2?.*"\nusers = ["*"]'),
            4,
            "address",
            "the glob '0000:00:2?.*' can never match a PCI address",
        ),
        (
            allow('address = "0000:00:10"\nusers = ["*"]'),
            4,
            "address",
            "expected a PCI address DDDD:BB:DD.F in hex or a glob of one, like "
            "\"0000:01:00.*\", got '0000:00:10'",
        ),
        (
            allow('address = "10de*"\nusers = ["*"]'),
            4,
            "address",
            "'10de*' does not look like an address",
        ),
        (
            allow('address = ""\nusers = ["*"]'),
            4,
            "address",
            '(or "*" for every device), got an empty string',
        ),
        (
            allow('address = []\nusers = ["*"]'),
            4,
            "address",
            "expected a PCI address or glob or a non-empty array of them, got an empty array",
        ),
        (
            allow('vendor = "nvidia"\nusers = ["*"]'),
            4,
            "vendor",
            "expected a 4-digit hex id as a string like \"10de\", got 'nvidia'",
        ),
        (
            allow('device = 0x10000\nusers = ["*"]'),
            4,
            "device",
            "got 65536, which is out of range",
        ),
        (
            allow('subsystem-vendor = true\nusers = ["*"]'),
            4,
            "subsystem-vendor",
            "got a boolean (true)",
        ),
        (
            allow('subsystem-device = ["1467", 1.5]\nusers = ["*"]'),
            4,
            "subsystem-device",
            "got a float (1.5)",
        ),
        (
            allow('class = 3\nusers = ["*"]'),
            4,
            "class",
            "expected a class code prefix as a string of 2, 4 or 6 hex digits",
        ),
        (allow('class = "030"\nusers = ["*"]'), 4, "class", "got '030'"),
        (
            allow('iommu-group = "one"\nusers = ["*"]'),
            4,
            "iommu-group",
            "expected an IOMMU group number, like 14, got a string ('one')",
        ),
        (
            allow('driver = "nvidia driver"\nusers = ["*"]'),
            4,
            "driver",
            'expected a driver name or glob ("none" for no driver), like "nvidia" or '
            "\"*_vfio_pci\", got 'nvidia driver'",
        ),
        (
            allow('driver = "[nv"\nusers = ["*"]'),
            4,
            "driver",
            "the glob '[nv' has a '[' without its ']'",
        ),
        (
            allow('address = "*"\nusers = ["al*"]'),
            5,
            "users",
            "user names are exact (or \"*\" for everyone), got the glob 'al*'; put the users "
            "in a group and name the group",
        ),
        (
            allow('address = "*"\nusers = [true]'),
            5,
            "users",
            'expected a user name, a numeric id or "*", got a boolean (true)',
        ),
        (
            allow('address = "*"\nusers = [-1]'),
            5,
            "users",
            "expected a user name or a numeric id, got -1, out of range",
        ),
        (
            allow('address = "*"\ngroups = ["a b"]'),
            5,
            "groups",
            "expected a group name (letters, digits, _ . @ $ -), got 'a b'",
        ),
        (
            allow('address = "*"\nunits = ["vm1"]'),
            5,
            "units",
            "expected a systemd unit name or glob ending in .service or .scope (or *), like "
            "\"vm@*.service\", got 'vm1'",
        ),
        (
            allow('address = "*"\nunits = ["vm@[.service"]'),
            5,
            "units",
            "the glob 'vm@[.service' has a '[' without its ']'",
        ),
        (
            allow('address = "*"\nslices = ["machine"]'),
            5,
            "slices",
            "expected a systemd slice name or glob ending in .slice (or *), like "
            "\"machine.slice\", got 'machine'",
        ),
        (
            allow(f'{BASE}\nmanaged = "yes"'),
            6,
            "managed",
            "expected true or false, got a string ('yes')",
        ),
        (
            allow(f"{BASE}\ncompanions = true"),
            6,
            "companions",
            "companions = true in rule 'r' lets vfiod rebind group companions, which needs "
            "managed = true too: add it, or remove companions",
        ),
        (allow(f"{BASE}\nunsafe-noiommu = 1"), 6, "unsafe-noiommu", "got an integer (1)"),
        (
            allow(f'{BASE}\nbackends = ["vfio"]'),
            6,
            "backends",
            'expected "legacy" or "iommufd" (or an array of them), got a string (\'vfio\')',
        ),
        (
            allow(f'{BASE}\nbackends = ["legacy", "legacy"]'),
            6,
            "backends",
            "'legacy' is listed twice; list each backend once",
        ),
        (allow(f"{BASE}\nbackends = []"), 6, "backends", "got an empty array"),
        (
            allow(f"{BASE}\nmax-leases = 0"),
            6,
            "max-leases",
            "expected a whole number of leases of at least 1 (leave the key out for no limit; "
            'use effect = "deny" to refuse), got an integer (0)',
        ),
        (allow(f"{BASE}\nmax-leases = 1.0"), 6, "max-leases", "got a float (1.0)"),
        (
            allow(f'{BASE}\nmax-locked-memory = "16X"'),
            6,
            "max-locked-memory",
            'expected a size like "16G" or "512M" (K, M, G, T: powers of 1024) or a number of '
            "bytes, at least 1, got a string ('16X')",
        ),
        (
            allow(f"{BASE}\nmax-locked-memory = 0"),
            6,
            "max-locked-memory",
            "0 is out of range (1 byte to 8 EiB)",
        ),
        (
            allow(f'{BASE}\nmax-locked-memory = "9E"'),
            6,
            "max-locked-memory",
            "'9E' is out of range (1 byte to 8 EiB)",
        ),
        (allow(f'{BASE}\nrestore-driver = "no"'), 6, "restore-driver", "got a string ('no')"),
        (allow(f"{BASE}\ncomment = 5"), 6, "comment", "expected a string, got an integer (5)"),
        (
            f'[[rule]]\neffect = "allow"\n{BASE}\n',
            1,
            "name",
            'the [[rule]] at line 1 has no name: add name = "..." (unique across all policy files)',
        ),
        (
            rule(BASE, name="two words"),
            2,
            "name",
            'expected a name like "alice-gpu" (letters, digits and _ . : @ + -, at most 128, '
            "unique across all policy files), got a string ('two words')",
        ),
        (
            f'[[rule]]\nname = "r"\n{BASE}\n',
            1,
            "effect",
            'rule \'r\' has no effect: add effect = "allow" or effect = "deny"',
        ),
        (
            rule(BASE, effect="permit"),
            3,
            "effect",
            'expected "allow" or "deny", got a string (\'permit\')',
        ),
        (
            allow('users = ["alice"]'),
            1,
            "address",
            "rule 'r' names no device: add address, vendor, device, subsystem-vendor, "
            'subsystem-device, class, iommu-group or driver (address = "*" for every device)',
        ),
        (
            allow('address = "*"'),
            1,
            "users",
            "rule 'r' names no caller: add users, groups, units or slices "
            '(users = ["*"] for everyone)',
        ),
        (
            rule(f"{BASE}\nmanaged = false", effect="deny"),
            6,
            "managed",
            "deny rules grant nothing: remove managed from rule 'r', or make it effect = \"allow\"",
        ),
        (
            f'default-backend = "legacy"\n{allow(BASE)}',
            1,
            "default-backend",
            "unknown key 'default-backend': daemon settings go in /etc/vfiod/vfiod.toml",
        ),
        (
            f"[settings]\nx = 1\n{allow(BASE)}",
            1,
            "settings",
            "unknown key 'settings': a policy file holds only [[rule]] and [[reserve]] tables",
        ),
        (
            "rule = 1\n",
            1,
            "rule",
            "expected [[rule]] tables, got an integer (1); write each one under its own "
            "[[rule]] header",
        ),
        (
            '[[rule]]\nname = "r"\neffect = allow\n',
            3,
            SYNTAX_KEY,
            "Invalid value (column 10); fix the TOML syntax (https://toml.io/en/v1.0.0)",
        ),
        (
            allow(f'{BASE}\nvendor = "10de"\nvendor = "1002"'),
            7,
            SYNTAX_KEY,
            "Cannot overwrite a value (column 16)",
        ),
    ],
)
def test_error_messages(text: str, line: int, key: str, message: str) -> None:
    problems = problems_of(text)
    assert (line, key) in [(p.line, p.key) for p in problems], problems
    [problem] = [p for p in problems if (p.line, p.key) == (line, key)]
    assert problem.file == "10-test.toml"
    assert message in problem.message
    assert str(problem) == f"10-test.toml:{line}: {key}: {problem.message}"


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ('[[rule]]\nname = "r"\nusers = ["alice",\n', 3, "Invalid value"),
        ('[[rule]]\nname = "r"\nusers = ["alice"', 3, "Unclosed array"),
        ('[[rule]]\nname = "r"\ncomment = """never\nclosed\n', 4, "Unterminated string"),
        ('[[rule]]\nname = "r"\neffect =', 3, "Invalid value"),
        (
            '[[rule]]\nname = "r"\n\n[[rule',
            4,
            "Expected ']]' at the end of an array declaration",
        ),
    ],
)
def test_syntax_errors_at_the_end_of_the_file_are_at_its_last_line(
    text: str, line: int, message: str
) -> None:
    [problem] = problems_of(text)
    assert (problem.line, problem.key) == (line, SYNTAX_KEY)
    assert problem.message == (
        f"{message} (at the end of the file); fix the TOML syntax (https://toml.io/en/v1.0.0)"
    )


DEEP = 1000  # levels: more than tomllib can take


@pytest.mark.parametrize(
    ("text", "line"),
    [
        (f"{allow(BASE)}vendor = {'[' * DEEP}{']' * DEEP}\n", 6),
        # One level a line: the line where nesting first passes MAX_NESTING.
        (f"{allow(BASE)}vendor = [\n" + "{a = [\n" * DEEP, 6 + MAX_NESTING // 2),
        (f"{allow(BASE)}vendor = " + "[\n" * DEEP, 6 + MAX_NESTING),
    ],
)
def test_nesting_too_deep_is_reported_where_it_happens(text: str, line: int) -> None:
    [problem] = problems_of(text)
    assert (problem.line, problem.key) == (line, SYNTAX_KEY)
    assert problem.message == (
        "arrays or inline tables nest too deeply (more than 32 levels; a policy needs three at "
        "most): flatten them"
    )


def test_check_policy_shows_the_line_of_every_syntax_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    unclosed = put(tmp_path, f"{POLICY_D}/10-a.toml", allow('address = "*"\nusers = ["a"'))
    deep = put(tmp_path, f"{POLICY_D}/20-b.toml", allow(f"address = {'[' * DEEP}"))
    assert main(["check-policy", "--root", str(tmp_path)]) == 1
    assert capsys.readouterr().out.splitlines()[:2] == [
        f"error: {unclosed}:5: (syntax): Unclosed array (at the end of the file); fix the TOML "
        "syntax (https://toml.io/en/v1.0.0)",
        f"error: {deep}:4: (syntax): arrays or inline tables nest too deeply (more than 32 "
        "levels; a policy needs three at most): flatten them",
    ]


@pytest.mark.parametrize(
    ("text", "line", "key", "message"),
    [
        (
            "allow-unsafe-noiommu = 1\n",
            1,
            "allow-unsafe-noiommu",
            "expected true or false, got an integer (1)",
        ),
        (
            '# comment\ndefault-backend = "vfio"\n',
            2,
            "default-backend",
            'expected "legacy" or "iommufd", got a string (\'vfio\')',
        ),
        (
            "allow_unsafe_noiommu = true\n",
            1,
            "allow_unsafe_noiommu",
            "unknown key 'allow_unsafe_noiommu' in vfiod.toml; did you mean "
            "'allow-unsafe-noiommu'?",
        ),
        (
            allow(BASE),
            1,
            "rule",
            "[[rule]] tables go in policy.d/*.toml files, not in vfiod.toml",
        ),
    ],
)
def test_settings_error_messages(text: str, line: int, key: str, message: str) -> None:
    [problem] = problems_of(settings=text)
    assert (problem.file, problem.line, problem.key) == ("vfiod.toml", line, key)
    assert message in problem.message


def test_file_problems(tmp_path: Path) -> None:
    put(tmp_path, f"{POLICY_D}/10-latin1.toml", "").write_bytes(b"# caf\xe9\n[[rule]]\n")
    (tmp_path / POLICY_D / "20-dir.toml").mkdir()
    with pytest.raises(PolicyError) as raised:
        load(tmp_path)
    latin1, directory = raised.value.problems
    assert str(latin1) == (
        f"{tmp_path}/{POLICY_D}/10-latin1.toml:1: (file): is not UTF-8 text; save it as UTF-8"
    )
    assert directory.key == FILE_KEY
    assert directory.line == 0
    assert str(directory) == (
        f"{tmp_path}/{POLICY_D}/20-dir.toml: (file): is a directory, not a regular file: vfiod "
        "reads policy only from regular files; replace it with one, or remove it"
    )


def test_every_problem_in_every_file_is_reported_at_once(tmp_path: Path) -> None:
    put(tmp_path, "etc/vfiod/vfiod.toml", "allow-unsafe-noiommu = 1\n")
    put(tmp_path, f"{USR_POLICY_D}/10-a.toml", "[[rule]\n")
    put(
        tmp_path,
        f"{POLICY_D}/20-b.toml",
        allow('users = ["nobody-here"]\nvendor = "x"\nmanaged = 2', "b")
        + allow('address = "*"\nusers = ["*"]\nbogus = 1', "c"),
    )
    with pytest.raises(PolicyError) as raised:
        load(tmp_path)
    where = [(os.path.basename(p.file), p.line, p.key) for p in raised.value.problems]
    assert where == [
        ("vfiod.toml", 1, "allow-unsafe-noiommu"),
        ("10-a.toml", 1, SYNTAX_KEY),
        ("20-b.toml", 5, "vendor"),
        ("20-b.toml", 6, "managed"),
        ("20-b.toml", 12, "bogus"),
    ]
    assert str(raised.value).count("\n") == len(where) - 1
    [warning] = raised.value.warnings
    assert (warning.line, warning.key) == (4, "users")


def test_line_numbers_survive_multi_line_values_and_odd_layout() -> None:
    text = '''\
# A comment with "quotes" and [brackets]
[[ rule ]]
  name = "r"   # trailing comment
  effect = 'allow'
  comment = """
bogus = 1
[[rule]]
"""
  address = [
    "0000:00:10.0",  # the NIC ]
    "0000:00:11.0",
  ]
  users = ["*"]
  "vendr" = "10de"

[[rule]]
name = "s"
effect = "allow"
address = "*"
users = ["*"]
rule.nested = 1
'''
    problems = problems_of(text)
    assert [(p.line, p.key) for p in problems] == [(14, "vendr"), (21, "rule")]


def test_inline_rule_tables_report_the_line_of_the_array() -> None:
    text = (
        "x = 1\n"
        "rule = [\n"
        '  {name = "r", effect = "allow", address = "*", users = ["*"], y = 1},\n'
        "]\n"
    )
    problems = problems_of(text)
    assert [(p.line, p.key) for p in problems] == [(1, "x"), (2, "y")]


def test_key_lines_of_dotted_and_quoted_keys() -> None:
    lines = KeyLines("a.b = 1\n\"c.d\".e = 2\n[t]\n'q' = 3\n[[arr]]\nk = 4\n[[arr]]\nk = 5\n")
    assert lines.line_of(("a", "b")) == 1
    assert lines.line_of(("c.d", "e")) == 2
    assert lines.line_of(("t", "q")) == 4
    assert lines.line_of(("arr", 1, "k")) == 8
    assert lines.line_of(("arr", 7, "k")) == 5  # unknown element: the array's first line
    assert lines.line_of(("nothing",)) == 1


TRICKY_TOML = "\n".join(
    [
        '"a=b" = 1',
        """x = ["]", "[", '#', \"\"\"""",
        """]\"\"\", '''""",
        "[[rule]]",
        "''']",
        "y = 2 # [",
        '["a]b"]',
        'k = { p = "]", q = [1, 2] }',
        "[[rule]]",
        'name = "x"   ',
        "\r",
        '[[ "rule" ]]\r',
        'name = "y"\r',
        'm = """a\\',
        '  b"""',
        "n = 3",
        "",
    ]
)


def test_key_lines_are_not_fooled_by_strings_brackets_and_line_ends() -> None:
    assert tomllib.loads(TRICKY_TOML)["x"] == ["]", "[", "#", "]", "[[rule]]\n"]
    assert KeyLines(TRICKY_TOML).lines == {
        ("a=b",): 1,
        ("x",): 2,
        ("y",): 6,
        ("a]b",): 7,
        ("a]b", "k"): 8,
        ("rule",): 9,
        ("rule", 0): 9,
        ("rule", 0, "name"): 10,
        ("rule", 1): 12,
        ("rule", 1, "name"): 13,
        ("rule", 1, "m"): 14,
        ("rule", 1, "n"): 16,
    }


def test_warnings_do_not_stop_the_policy() -> None:
    result = parse(
        allow('address = "*"\nusers = ["alice", "carol"]\ngroups = ["kvm", "ghosts"]'),
        allow('address = "*"\nusers = [1234]\nunsafe-noiommu = true', "u"),
    )
    assert len(result.policy.rules) == 2
    assert [str(w) for w in result.warnings] == [
        "10-test.toml:5: users: rule 'r' names the user 'carol', which does not exist (yet): "
        "the rule applies once it does (write a numeric id unquoted)",
        "10-test.toml:6: groups: rule 'r' names the group 'ghosts', which does not exist "
        "(yet): the rule applies once it does (write a numeric id unquoted)",
        "20-test.toml:6: unsafe-noiommu: rule 'u' grants unsafe-noiommu, which has no effect "
        "until allow-unsafe-noiommu = true is set in /etc/vfiod/vfiod.toml",
    ]


# ---------------------------------------------------------------------------
# The holder: never without a policy


def test_holder_starts_deny_all_on_errors_and_keeps_the_error(tmp_path: Path) -> None:
    put(tmp_path, f"{POLICY_D}/50-bad.toml", "[[rule]]\nname = 1\n")
    holder = PolicyHolder(str(tmp_path))
    assert holder.current == Policy()
    assert holder.error is not None
    assert "50-bad.toml:2: name:" in str(holder.error)
    assert not decide(holder.current, ALICE, pci(), LEGACY).allowed


def test_holder_keeps_the_last_good_policy_when_a_reload_fails(tmp_path: Path) -> None:
    path = put(tmp_path, f"{POLICY_D}/50-x.toml", allow('address = "*"\nusers = ["alice"]'))
    holder = PolicyHolder(str(tmp_path), user_exists=KNOWN_USERS.__contains__)
    good = holder.current
    assert [holder.error] == [None]  # (a list: mypy would narrow the attribute for good)
    assert [r.name for r in good.rules] == ["r"]
    path.write_text(allow('address = "*"\nusers = ["alice"]\nmanaged = maybe'))
    with pytest.raises(PolicyError, match=r"50-x.toml:6: \(syntax\): Invalid value"):
        holder.reload()
    assert holder.current is good
    assert holder.error is not None
    path.write_text(allow('address = "*"\nusers = ["bob"]', "s"))
    assert holder.reload() is holder.current
    assert [r.name for r in holder.current.rules] == ["s"]
    assert holder.error is None


def test_holder_warnings(tmp_path: Path) -> None:
    put(tmp_path, f"{POLICY_D}/50-x.toml", allow('address = "*"\nusers = ["nobody-by-that-name"]'))
    holder = PolicyHolder(str(tmp_path))
    assert holder.error is None
    assert [w.key for w in holder.warnings] == ["users"]


# ---------------------------------------------------------------------------
# The shipped examples, each loaded and evaluated


def install_example(root: Path, name: str) -> Policy:
    shutil.copy(EXAMPLES / name, put(root, f"{POLICY_D}/{name}", ""))
    shutil.copy(PROJECT / "policy/vfiod.toml", put(root, "etc/vfiod/vfiod.toml", ""))
    return load(root).policy


GPU = pci(
    "0000:01:00.0", vendor=0x10DE, device=0x2204, pci_class=0x030000, driver="nvidia", group="1"
)
GPU_AUDIO = pci(
    "0000:01:00.1",
    vendor=0x10DE,
    device=0x1AEF,
    pci_class=0x040300,
    driver="snd_hda_intel",
    group="1",
)


def test_example_gpu_for_alice(tmp_path: Path) -> None:
    policy = install_example(tmp_path, "10-gpu-for-alice.toml")
    request = Request("iommufd", managed=True, unsafe_noiommu=False)
    for function in (GPU, GPU_AUDIO):
        decision = decide_one(policy, ALICE, function, request)
        assert decision.allowed
        assert decision.grants == Grants(
            managed=True,
            companions=True,
            backends=("iommufd", "legacy"),
            max_leases=1,
            max_locked_memory=16 * 2**30,
        )
    # Named exactly, so it may go even when it shows the host's console.
    assert decide_one(policy, ALICE, GPU, request, host_critical=("boot VGA",)).allowed
    assert decide_one(policy, BOB, GPU, request).refusal is Refusal.NO_RULE
    other_card = dataclasses.replace(GPU, vendor=0x1002)
    assert not decide_one(policy, ALICE, other_card, request).allowed


def test_example_reserved_gpu(tmp_path: Path) -> None:
    policy = install_example(tmp_path, "15-reserved-gpu.toml")
    [reservation] = policy.reservations
    assert [str(a) for a in reservation.addresses] == ["0000:0a:00.0", "0000:0a:00.1"]
    gpu = pci("0000:0a:00.0", pci_class=0x030000, driver="vfio-pci", group="3")
    kvm = dataclasses.replace(ALICE, gids=(*ALICE.gids, 36), groups=(*ALICE.groups, "kvm"))
    decision = decide_one(policy, kvm, gpu, Request("legacy", False, False))
    assert decision.grants is not None
    assert decision.grants.require_reset
    assert decide_one(policy, BOB, gpu).refusal is Refusal.NO_RULE


def test_example_sriov_vfs_for_a_slice(tmp_path: Path) -> None:
    policy = install_example(tmp_path, "20-sriov-vfs-for-vms.toml")
    vf = pci("0000:03:10.2", device=0x10CA, driver="igbvf", group="20")
    decision = decide_one(policy, VMM, vf, Request("legacy", True, False))
    assert decision.allowed
    assert decision.grants is not None
    assert decision.grants.max_leases == 7
    pf = pci("0000:03:00.0", device=0x10C9, driver="igb", group="12")
    assert not decide_one(policy, VMM, pf).allowed
    outside = dataclasses.replace(VMM, slices=("user.slice",))
    assert decide_one(policy, outside, vf).refusal is Refusal.NO_RULE


def test_example_noiommu_for_a_service(tmp_path: Path) -> None:
    warned = install_example(tmp_path, "30-noiommu-for-service.toml")
    service = dataclasses.replace(BOB, unit="dpdk-forwarder.service")
    device = pci("0000:00:09.0", group="0")
    consent = Request("legacy", managed=True, unsafe_noiommu=True)
    decision = decide_one(warned, service, device, consent, noiommu=True)
    assert decision.refusal is Refusal.UNSAFE_NOIOMMU
    assert "allow-unsafe-noiommu = true" in decision.reasons[0]
    assert [w.key for w in load(tmp_path).warnings] == ["unsafe-noiommu"]

    put(tmp_path, "etc/vfiod/vfiod.toml", "allow-unsafe-noiommu = true\n")
    policy = load(tmp_path).policy
    assert decide_one(policy, service, device, consent, noiommu=True).allowed
    no_consent = dataclasses.replace(consent, unsafe_noiommu=False)
    decision = decide_one(policy, service, device, no_consent, noiommu=True)
    assert decision.refusal is Refusal.UNSAFE_NOIOMMU
    assert decision.reasons[0].endswith(
        "missing: your own consent: ask with the option unsafe-noiommu = true."
    )
    iommufd = dataclasses.replace(consent, backend="iommufd")
    assert decide_one(policy, service, device, iommufd, noiommu=True).refusal is Refusal.BACKEND
    assert not decide_one(policy, BOB, device, consent, noiommu=True).allowed


def test_example_deny_rule_protects_a_device(tmp_path: Path) -> None:
    install_example(tmp_path, "40-deny-boot-disk.toml")
    put(tmp_path, f"{POLICY_D}/50-all.toml", allow('address = "*"\nusers = ["alice"]', "all"))
    policy = load(tmp_path).policy
    nvme = pci("0000:02:00.0", vendor=0x144D, device=0xA808, pci_class=0x010802, driver="nvme")
    decision = decide_one(policy, ALICE, nvme)
    assert decision.refusal is Refusal.DENY_RULE
    assert "never-the-boot-nvme" in decision.reasons[0]
    assert decide_one(policy, ALICE, pci()).allowed


def test_example_libvirt_hostdevs_for_root(tmp_path: Path) -> None:
    policy = install_example(tmp_path, "50-libvirt-hostdevs.toml")
    nic = pci("0000:03:00.0", group="12")
    hook = Request("iommufd", managed=True, unsafe_noiommu=False)
    assert decide_one(policy, ROOT, nic, hook).allowed
    assert decide_one(policy, ROOT, nic, Request("legacy", True, False)).refusal is Refusal.BACKEND
    assert decide_one(policy, ALICE, nic, hook).refusal is Refusal.NO_RULE
    assert not decide_one(policy, ROOT, pci("0000:05:00.0"), hook).allowed


def test_all_examples_load_together(tmp_path: Path) -> None:
    for example in sorted(EXAMPLES.glob("*.toml")):
        shutil.copy(example, put(tmp_path, f"{POLICY_D}/{example.name}", ""))
    policy = load(tmp_path).policy
    assert len(policy.rules) == 6
    assert len(policy.reservations) == 1
    assert {r.effect for r in policy.rules} == {Effect.ALLOW, Effect.DENY}
    assert all(r.comment for r in policy.rules)


# ---------------------------------------------------------------------------
# vfiod check-policy


def test_cli_check_valid(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    put(tmp_path, f"{POLICY_D}/50-x.toml", allow('address = "*"\nusers = ["root"]'))
    assert main(["check-policy", "--root", str(tmp_path)]) == 0
    assert capsys.readouterr().out == (
        "policy is valid: 1 rule(s) (1 allow, 0 deny) read from 1 file(s); "
        "allow-unsafe-noiommu = "
        'false, default-backend = "legacy", dma-limit = "1G"\n'
    )
    assert main(["check-policy", "--root", str(tmp_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is True
    assert report["errors"] == []
    assert report["rules"][0]["name"] == "r"
    assert report["rules"][0]["grants"]["backends"] == ["legacy", "iommufd"]
    assert report["settings"] == {
        "allow-unsafe-noiommu": False,
        "default-backend": "legacy",
        "dma-limit": 2**30,
    }


def test_cli_check_empty_says_deny_all(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-policy", "--root", str(tmp_path)]) == 0
    assert "no rules: every request is denied (the default)" in capsys.readouterr().out


def test_cli_check_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = put(
        tmp_path, f"{POLICY_D}/50-x.toml", allow('address = "*"\nusers = ["*"]\nmanaged = 1')
    )
    assert main(["check-policy", "--root", str(tmp_path)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out == [
        f"error: {path}:6: managed: expected true or false, got an integer (1)",
        "1 error(s), 0 warning(s): fix them; until then a running vfiod keeps the last policy "
        "that loaded (deny-all if none did)",
    ]
    assert main(["check-policy", "--root", str(tmp_path), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False
    assert report["errors"] == [
        {
            "file": str(path),
            "line": 6,
            "key": "managed",
            "message": "expected true or false, got an integer (1)",
        }
    ]


@pytest.fixture
def host(tmp_path: Path) -> FakeSysfs:
    fs = FakeSysfs(tmp_path / "sys")
    fs.add_driver("vfio-pci")
    add_e1000e(fs)
    return fs


def test_cli_explain(host: FakeSysfs, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "root"
    put(root, f"{POLICY_D}/50-x.toml", allow('address = "0000:00:10.0"\nusers = ["root"]'))
    argv = ["check-policy", "--root", str(root), "--sysfs", host.root, "--proc", str(tmp_path)]
    assert main([*argv, "--explain", "00:10.0", "--user", "root", "--managed"]) == 0
    out = capsys.readouterr().out
    assert "caller:  user root (uid 0), groups root\n" in out
    assert "device:  0000:00:10.0 8086:10d3 Ethernet controller" in out
    assert ", driver e1000e, IOMMU group 10\n" in out
    assert "request: backend legacy, managed true, unsafe-noiommu false\n" in out
    assert "ALLOWED\n  Allowed by rule 'r'" in out
    assert "won         allow 'r'" in out

    assert main([*argv, "--explain", "0000:00:10.0", "--user", "nobody", "--group", "kvm"]) == 1
    out = capsys.readouterr().out
    assert "caller:  user nobody (uid 65534), groups nogroup, kvm\n" in out
    assert "DENIED (no-rule)" in out
    assert "not-matched allow 'r' (" in out
    assert "users: wants root, has nobody (uid 65534)" in out

    assert main([*argv, "--explain", "0000:00:10.0", "--user", "0", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["allowed"] is True
    assert report["caller"]["user"] == "root"
    assert report["device"]["ids"] == "8086:10d3"
    assert report["device"]["host_critical"] == []
    assert report["rule"]["name"] == "r"
    assert report["trace"][0]["outcome"] == "won"


def unused_id(lookup: Callable[[int], object], start: int = 4242) -> int:
    """The first id from ``start`` that ``lookup`` (pwd.getpwuid, grp.getgrgid) does not know."""
    for number in range(start, start + 1000):
        try:
            lookup(number)
        except KeyError:
            return number
    raise AssertionError("no free id")


def test_cli_explain_a_uid_and_gid_without_names(
    host: FakeSysfs, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The daemon sees callers by uid and gids, named or not: so does --explain."""
    uid, gid = unused_id(pwd.getpwuid), unused_id(grp.getgrgid, 4343)
    root = tmp_path / "root"
    put(root, f"{POLICY_D}/50-x.toml", allow(f'address = "0000:00:10.0"\nusers = [{uid}]', "uid"))
    put(root, f"{POLICY_D}/60-x.toml", allow(f'address = "0000:00:10.0"\ngroups = [{gid}]', "gid"))
    argv = ["check-policy", "--root", str(root), "--sysfs", host.root, "--proc", str(tmp_path)]
    assert main([*argv, "--explain", "0000:00:10.0", "--user", str(uid)]) == 0
    out = capsys.readouterr().out
    assert f"caller:  uid {uid}, groups none\n" in out
    assert "ALLOWED\n  Allowed by rule 'uid'" in out

    other = unused_id(pwd.getpwuid, uid + 1)
    assert (
        main([*argv, "--explain", "0000:00:10.0", "--user", str(other), "--group", str(gid)]) == 0
    )
    assert "Allowed by rule 'gid'" in capsys.readouterr().out
    assert main([*argv, "--explain", "0000:00:10.0", "--user", str(other), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["caller"] == {
        "uid": other,
        "user": None,
        "gids": [],
        "groups": [],
        "unit": None,
        "slices": [],
    }
    assert report["refusal"] == "no-rule"


def test_cli_explain_a_numeric_group_that_has_a_name(
    host: FakeSysfs, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "root"
    put(root, f"{POLICY_D}/50-x.toml", allow('address = "0000:00:10.0"\ngroups = ["users"]'))
    argv = ["check-policy", "--root", str(root), "--sysfs", host.root, "--proc", str(tmp_path)]
    users = grp.getgrnam("users").gr_gid
    assert (
        main([*argv, "--explain", "0000:00:10.0", "--user", "nobody", "--group", str(users)]) == 0
    )
    assert "caller:  user nobody (uid 65534), groups nogroup, users\n" in capsys.readouterr().out


def test_cli_explain_a_host_critical_device(
    host: FakeSysfs, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The NIC carries the default route.
    proc = tmp_path / "proc"
    put(
        proc,
        "net/route",
        "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n"
        "eth0\t00000000\t0102A8C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n",
    )
    os.makedirs(host.device_path(NIC) + "/net/eth0")
    os.makedirs(host.path("class/net"))
    os.symlink(os.path.realpath(host.device_path(NIC) + "/net/eth0"), host.path("class/net/eth0"))
    root = tmp_path / "root"
    put(root, f"{POLICY_D}/50-x.toml", allow('address = "0000:00:1*"\nusers = ["root"]'))
    argv = ["check-policy", "--root", str(root), "--sysfs", host.root, "--proc", str(proc)]
    assert main([*argv, "--explain", "0000:00:10.0", "--user", "root"]) == 1
    out = capsys.readouterr().out
    assert "         host-critical: carries the default route (eth0)\n" in out
    assert "DENIED (host-critical)" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--explain", "0000:00:10.0"], "--explain needs --user NAME"),
        (["--explain", "nic", "--user", "root"], "malformed PCI address 'nic'"),
        (["--explain", "0000:00:10.0", "--user", "no-such-user"], "no user 'no-such-user'"),
        (["--explain", "0000:00:10.0", "--user", "4294967295"], "out of range for a uid"),
        (["--user", "root"], "--user only means something with --explain ADDRESS"),
    ],
)
def test_cli_usage_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    assert main(["check-policy", "--root", str(tmp_path), *args]) == 2
    assert message in capsys.readouterr().err


def test_cli_explain_refuses_a_broken_policy(
    host: FakeSysfs, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "root"
    put(root, f"{POLICY_D}/50-x.toml", "[[rule]]\n")
    argv = ["check-policy", "--root", str(root), "--sysfs", host.root]
    assert main([*argv, "--explain", "0000:00:10.0", "--user", "root"]) == 1
    out = capsys.readouterr().out
    assert "error: " in out
    assert out.endswith("the policy has errors: fix them before explaining a decision\n")


def test_cli_explain_an_absent_device(
    host: FakeSysfs, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["check-policy", "--root", str(tmp_path), "--sysfs", host.root]
    assert main([*argv, "--explain", "0000:00:1e.0", "--user", "root"]) == 1
    assert "no PCI device 0000:00:1e.0" in capsys.readouterr().err
