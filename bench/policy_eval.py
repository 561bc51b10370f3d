"""Policy evaluation at scale: 10,000 rules against 4,096 devices, one caller.

Every device is decided for one caller, each decision timed on its own; the
baseline is the same decisions under a one-rule policy, measured in the same
run. The rules are varied the way a big site's are: most for other users and
groups, some for systemd units and slices, some for everyone, a few hundred
for this caller (by exact address, by vendor, by glob) and some deny rules.
The policy is also written as TOML and loaded, to time the loader.

    python -m bench.policy_eval [--rules N] [--devices N] [--seed S]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import statistics
import time
from collections.abc import Sequence
from typing import Any

from vfiod.host.inventory import PciDevice
from vfiod.pci import PciAddress
from vfiod.policy.decide import decide
from vfiod.policy.load import Source, parse_policy
from vfiod.policy.model import Caller, Effect, Grants, Policy, Request, Rule

CALLER = Caller(
    uid=64055,
    user="libvirt-qemu",
    gids=(64055, 107),
    groups=("libvirt-qemu", "kvm"),
    unit="machine-qemu\\x2d7\\x2dwin10.scope",
    slices=("machine.slice",),
)
REQUEST = Request(backend="iommufd", managed=True, unsafe_noiommu=False)
# (vendor, device, class): a NIC, a GPU, its audio function, an HCA, virtio.
_KINDS = (
    (0x8086, 0x10CA, 0x020000),
    (0x10DE, 0x2204, 0x030000),
    (0x10DE, 0x1AEF, 0x040300),
    (0x15B3, 0x101E, 0x020000),
    (0x1AF4, 0x1041, 0x020000),
)


def make_devices(count: int) -> list[PciDevice]:
    """``count`` devices, 32 slots per bus, each in its own IOMMU group."""
    if count > 32 * 255:
        raise ValueError(f"at most {32 * 255} devices: one function per slot, buses 1 to 255")
    devices = []
    for i in range(count):
        vendor, device, pci_class = _KINDS[i % len(_KINDS)]
        devices.append(
            PciDevice(
                address=PciAddress(0, 1 + i // 32, i % 32, 0),
                vendor=vendor,
                device=device,
                subsystem_vendor=vendor,
                subsystem_device=0x0001,
                pci_class=pci_class,
                driver="vfio-pci" if i % 3 else None,
                group=str(i),
                reset_methods=("flr",),
                physfn=None,
                virtfns=(),
            )
        )
    return devices


def make_rules(count: int, devices: Sequence[PciDevice], seed: int = 0) -> tuple[Rule, ...]:
    rng = random.Random(seed)  # noqa: S311 (reproducible rules, not secrets)
    rules = []
    for i in range(count):
        device = rng.choice(devices)
        address = str(device.address)
        bus = address[:7]
        roll = rng.random()
        fields: dict[str, Any]
        if roll < 0.80:  # another user's device, named exactly or by a bus glob
            fields = {
                "users": (f"user{rng.randrange(5000)}",),
                "addresses": (address,) if rng.random() < 0.7 else (f"{bus}:*.*",),
            }
        elif roll < 0.88:  # a group the caller is not in, by vendor
            fields = {"groups": (f"team{rng.randrange(500)}",), "vendors": (device.vendor,)}
        elif roll < 0.92:  # units and slices, most not the caller's
            fields = {
                "units": (f"vm@{rng.randrange(1000)}.service",),
                "addresses": (f"{bus}:*.*",),
            }
        elif roll < 0.93:  # everyone, a class on one bus
            fields = {"users": ("*",), "addresses": (f"{bus}:*.*",), "classes": ("03",)}
        elif roll < 0.98:  # this caller, by exact address (the common case)
            fields = {"users": (CALLER.user,), "addresses": (address,)}
        elif roll < 0.99:  # this caller's group, by vendor and a glob
            fields = {"groups": ("kvm",), "vendors": (device.vendor,), "addresses": (f"{bus}:*.*",)}
        else:  # deny rules, for everyone
            fields = {"users": ("*",), "addresses": (address,)}
        effect = Effect.DENY if roll >= 0.99 else Effect.ALLOW
        grants = Grants(managed=True) if effect is Effect.ALLOW else Grants()
        rules.append(
            Rule(
                name=f"rule-{i}",
                effect=effect,
                source=f"bench.toml:{i}",
                grants=grants,
                **fields,
            )
        )
    return tuple(rules)


def to_toml(rules: Sequence[Rule]) -> str:
    """The rules as a policy file (the keys make_rules uses)."""
    out = []
    for rule in rules:
        lines = ["[[rule]]", f'name = "{rule.name}"', f'effect = "{rule.effect}"']
        for key, values in (
            ("address", [f'"{a}"' for a in rule.addresses]),
            ("vendor", [f'"{v:04x}"' for v in rule.vendors]),
            ("class", [f'"{c}"' for c in rule.classes]),
            ("users", [f'"{u}"' for u in rule.users]),
            ("groups", [f'"{g}"' for g in rule.groups]),
            ("units", [f'"{u}"' for u in rule.units]),
        ):
            if values:
                lines.append(f"{key} = [{', '.join(values)}]")
        if rule.grants.managed:
            lines.append("managed = true")
        out.append("\n".join(lines))
    return "\n\n".join(out) + "\n"


@dataclasses.dataclass(frozen=True)
class Timing:
    """Seconds of each decision of one pass over the devices."""

    times: tuple[float, ...]

    @property
    def total(self) -> float:
        return sum(self.times)

    @property
    def p50(self) -> float:
        return statistics.median(self.times)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.times)

    def __str__(self) -> str:
        return (
            f"total {self.total * 1e3:.1f} ms, per decision p50 {self.p50 * 1e6:.1f} us, "
            f"mean {self.mean * 1e6:.1f} us"
        )


@dataclasses.dataclass(frozen=True)
class Figures:
    rules: int
    devices: int
    allowed: int
    load_s: float  # parsing the rules from TOML
    cold: Timing  # first pass: builds the indexes, compiles the rules it meets
    warm: Timing  # second pass over the same policy: what the broker sees
    baseline: Timing  # warm, under a one-rule policy

    @property
    def ratio_p50(self) -> float:
        return self.warm.p50 / self.baseline.p50

    @property
    def ratio_mean(self) -> float:
        return self.warm.mean / self.baseline.mean


def time_decisions(policy: Policy, devices: Sequence[PciDevice]) -> tuple[Timing, int]:
    """Each decision for CALLER timed on its own, and how many were allowed."""
    times = []
    allowed = 0
    clock = time.perf_counter
    for device in devices:
        start = clock()
        decision = decide(policy, CALLER, device, REQUEST)
        times.append(clock() - start)
        allowed += decision.allowed
    return Timing(tuple(times)), allowed


def run(rules: int = 10_000, devices: int = 4_096, seed: int = 0) -> Figures:
    hardware = make_devices(devices)
    rule_set = make_rules(rules, hardware, seed)
    text = to_toml(rule_set)
    start = time.perf_counter()
    loaded = parse_policy(
        [Source("bench.toml", text.encode())], user_exists=bool, group_exists=bool
    )
    load_s = time.perf_counter() - start
    unsourced = [dataclasses.replace(r, source="") for r in loaded.policy.rules]
    assert unsourced == [dataclasses.replace(r, source="") for r in rule_set], "TOML differs"

    policy = Policy(rules=rule_set)
    cold, allowed = time_decisions(policy, hardware)
    warm, again = time_decisions(policy, hardware)
    assert again == allowed
    one_rule = Policy(
        rules=(
            Rule(
                name="everything",
                effect=Effect.ALLOW,
                source="baseline.toml:1",
                addresses=("*",),
                users=(str(CALLER.user),),
                grants=Grants(managed=True),
            ),
        )
    )
    time_decisions(one_rule, hardware)
    baseline, _ = time_decisions(one_rule, hardware)
    return Figures(rules, devices, allowed, load_s, cold, warm, baseline)


def report(f: Figures) -> str:
    return "\n".join(
        [
            f"policy evaluation: {f.rules} rules, {f.devices} devices, one caller "
            f"({f.allowed} allowed)",
            f"  load the rules from TOML: {f.load_s * 1e3:.0f} ms",
            f"  first pass (builds indexes, compiles rules): {f.cold}; "
            f"first decision {f.cold.times[0] * 1e3:.1f} ms",
            f"  second pass (steady state):                  {f.warm}",
            f"  baseline, one-rule policy (steady state):    {f.baseline}",
            f"  ratio to baseline: p50 {f.ratio_p50:.2f}, mean {f.ratio_mean:.2f}",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.policy_eval", description=__doc__)
    parser.add_argument("--rules", type=int, default=10_000)
    parser.add_argument("--devices", type=int, default=4_096)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args()
    figures = run(args.rules, args.devices, args.seed)
    if args.json:
        summary = {
            name: {"total_s": t.total, "p50_s": t.p50, "mean_s": t.mean}
            for name, t in (
                ("cold", figures.cold),
                ("warm", figures.warm),
                ("baseline", figures.baseline),
            )
        }
        print(
            json.dumps(
                {
                    "rules": figures.rules,
                    "devices": figures.devices,
                    "allowed": figures.allowed,
                    "load_s": figures.load_s,
                    **summary,
                    "ratio_p50": figures.ratio_p50,
                    "ratio_mean": figures.ratio_mean,
                }
            )
        )
    else:
        print(report(figures))


if __name__ == "__main__":
    main()
