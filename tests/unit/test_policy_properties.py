"""Property-based tests of the policy (hypothesis).

* The loader, fed random and mutated TOML, only ever raises PolicyError.
* Rules generated key by key, each value valid or not: the loader accepts a
  file exactly when every value is valid, reads each valid value as meant,
  and names every bad key at the line where it was written.
* decide() agrees with a reference written from policy/README.md, and its
  indexed fast path gives the same answer as the full trace.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vfiod.host.inventory import PciDevice
from vfiod.pci import PciAddress
from vfiod.policy.decide import decide
from vfiod.policy.load import (
    CALLER_KEYS,
    DEVICE_KEYS,
    GRANT_KEYS,
    RULE_KEYS,
    LoadResult,
    PolicyError,
    Source,
    parse_policy,
)
from vfiod.policy.model import (
    WILDCARD,
    Caller,
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
SAMPLES = [p.read_text() for p in sorted((PROJECT / "policy/examples").glob("*.toml"))] + [
    (PROJECT / "policy/vfiod.toml").read_text()
]
FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEWER = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def load_text(text: str | bytes, *, as_settings: bool = False) -> LoadResult:
    data = text.encode() if isinstance(text, str) else text
    source = Source("fuzz.toml", data)
    return parse_policy(
        [] if as_settings else [source],
        source if as_settings else None,
        user_exists=lambda _: True,
        group_exists=lambda _: True,
    )


def outcome(text: str | bytes, *, as_settings: bool = False) -> LoadResult | PolicyError:
    """What the loader makes of ``text``: a result or the PolicyError (any
    other exception fails the test)."""
    try:
        return load_text(text, as_settings=as_settings)
    except PolicyError as e:
        return e


def only_policy_errors(text: str | bytes, *, as_settings: bool = False) -> LoadResult | None:
    result = outcome(text, as_settings=as_settings)
    if isinstance(result, LoadResult):
        return result
    assert result.problems, "a PolicyError names at least one problem"
    for problem in result.problems:
        assert problem.file == "fuzz.toml"
        assert problem.line >= 1, f"a problem in the text without a line: {problem}"
        assert problem.key
        assert problem.message
    return None


# ---------------------------------------------------------------------------
# Random and mutated input


@FAST
@given(st.text(st.characters(codec="utf-8")))
def test_random_text_raises_only_policy_errors(text: str) -> None:
    only_policy_errors(text)
    only_policy_errors(text, as_settings=True)


@FAST
@given(st.binary())
def test_random_bytes_raise_only_policy_errors(data: bytes) -> None:
    only_policy_errors(data)


_TOML_BITS = st.sampled_from(
    ["[", "]", "[[", "]]", "{", "}", '"', "'", '"""', "=", "#", "\n", ".", ",", "*", "-", "\\"]
    + ["rule", "name", "effect", "true", "1", "0x10", "1e3", "\t", " ", "\x00", "é", "\r\n"]
    + [f'"{k}"' for k in ("allow", "deny", "0000:00:10.0", "16G", "*")]
    + list(RULE_KEYS)
)


@st.composite
def mutated(draw: st.DrawFn) -> str:
    text = draw(st.sampled_from(SAMPLES))
    for _ in range(draw(st.integers(1, 4))):
        lines = text.split("\n")
        operation = draw(st.sampled_from(["insert", "delete", "duplicate", "swap", "replace"]))
        if operation == "insert":
            at = draw(st.integers(0, len(text)))
            text = text[:at] + draw(_TOML_BITS) + text[at:]
        elif operation == "delete":
            at = draw(st.integers(0, len(text)))
            text = text[:at] + text[at + draw(st.integers(1, 8)) :]
        elif operation == "duplicate":
            at = draw(st.integers(0, len(lines) - 1))
            text = "\n".join([*lines[: at + 1], lines[at], *lines[at + 1 :]])
        elif operation == "swap":
            a, b = draw(st.integers(0, len(lines) - 1)), draw(st.integers(0, len(lines) - 1))
            lines[a], lines[b] = lines[b], lines[a]
            text = "\n".join(lines)
        else:  # a value replaced by another TOML value
            candidates = [i for i, line in enumerate(lines) if " = " in line]
            if candidates:
                at = draw(st.sampled_from(candidates))
                key = lines[at].split(" = ", 1)[0]
                lines[at] = f"{key} = {draw(toml_values)}"
                text = "\n".join(lines)
    return text


def toml_string(text: str) -> str:
    escaped = []
    for c in text:
        if c in '"\\':
            escaped.append("\\" + c)
        elif ord(c) < 0x20 or ord(c) == 0x7F:
            escaped.append(f"\\u{ord(c):04x}")
        else:
            escaped.append(c)
    return '"' + "".join(escaped) + '"'


_SCALARS = st.one_of(
    st.booleans().map(lambda b: str(b).lower()),
    st.integers(-(2**63), 2**63 - 1).map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.text(st.characters(codec="utf-8"), max_size=20).map(toml_string),
    st.sampled_from(['"0000:00:10.0"', '"0000:0?:*"', '"10de"', '"16G"', '"*"', "1979-05-27"]),
)
toml_values = st.one_of(
    _SCALARS,
    st.lists(_SCALARS, max_size=4).map(lambda items: "[" + ", ".join(items) + "]"),
    st.dictionaries(st.sampled_from(["a", "name", "x"]), _SCALARS, max_size=2).map(
        lambda d: "{" + ", ".join(f"{k} = {v}" for k, v in d.items()) + "}"
    ),
)


_GRANT_TYPES: dict[str, Callable[[Any], bool]] = {
    "managed": lambda v: isinstance(v, bool),
    "companions": lambda v: isinstance(v, bool),
    "unsafe-noiommu": lambda v: isinstance(v, bool),
    "restore-driver": lambda v: isinstance(v, bool),
    "max-leases": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
    "require-reset": lambda v: isinstance(v, bool),
}


def _bad_table(table: object) -> bool:
    if not isinstance(table, dict):
        return True
    keys = set(table)
    return (
        bool(keys - set(RULE_KEYS))
        or not {"name", "effect"} <= keys
        or table["effect"] not in ("allow", "deny")
        or not keys & set(DEVICE_KEYS)
        or not keys & set(CALLER_KEYS)
        or (table["effect"] == "deny" and bool(keys & set(GRANT_KEYS)))
        or any(k in table and not ok(table[k]) for k, ok in _GRANT_TYPES.items())
    )


_EXACT_ADDRESS = re.compile(r"(?:[0-9a-fA-F]{4}:)?[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7]")


def _bad_reservation(table: object) -> bool:
    if not isinstance(table, dict):
        return True
    addresses = table.get("address")
    if isinstance(addresses, str):
        addresses = [addresses]
    return (
        bool(set(table) - {"name", "address", "comment"})
        or not isinstance(table.get("name"), str)
        or not isinstance(addresses, list)
        or not addresses
        or not all(isinstance(a, str) and _EXACT_ADDRESS.fullmatch(a.strip()) for a in addresses)
        or ("comment" in table and not isinstance(table["comment"], str))
    )


def must_fail(data: dict[str, Any]) -> bool:
    """Reasons any correct loader must reject, checked independently of it."""
    tables = data.get("rule", [])
    reservations = data.get("reserve", [])
    if set(data) - {"rule", "reserve"} or not isinstance(tables, list):
        return True
    if not isinstance(reservations, list) or any(_bad_reservation(r) for r in reservations):
        return True
    names = [repr(t.get("name")) for t in [*tables, *reservations] if isinstance(t, dict)]
    return any(_bad_table(t) for t in tables) or len(names) != len(set(names))


@FAST
@given(mutated())
def test_mutated_files_raise_only_policy_errors_and_never_pass_bad_input(text: str) -> None:
    result = only_policy_errors(text)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        assert result is None, "a file tomllib rejects must not load"
        return
    if must_fail(data):
        assert result is None, f"accepted an invalid file:\n{text}"
    if result is not None:
        policy = result.policy
        assert len(policy.rules) == len(data.get("rule", []))
        for device in DEVICES[:3]:
            assert_fast_path_agrees(policy, CALLERS[0], device, LEGACY)


@FAST
@given(mutated())
def test_mutated_settings_raise_only_policy_errors(text: str) -> None:
    result = only_policy_errors(text, as_settings=True)
    if result is not None:
        assert result.policy.settings.default_backend in ("legacy", "iommufd")


# ---------------------------------------------------------------------------
# Generated rules: every value valid or not, and the loader must agree


@dataclasses.dataclass(frozen=True)
class Value:
    toml: str  # the value as written in the file
    valid: bool
    field: str | None = None  # the Rule (or Grants) attribute
    expected: Any = None  # what the attribute must hold when valid


def q(text: str) -> str:
    return toml_string(text)


def array(items: list[str]) -> str:
    return "[" + ", ".join(items) + "]"


_ADDRESSES = st.builds(
    PciAddress,
    st.integers(0, 0xFFFF),
    st.integers(0, 0xFF),
    st.integers(0, 0x1F),
    st.integers(0, 7),
)
_HEX4 = st.integers(0, 0xFFFF)
_NAME = st.builds(
    str.__add__,
    st.sampled_from("abcdefghijklmnopqrstuvwxyz_"),
    st.text("abcdefghijklmnopqrstuvwxyz0123456789_-", max_size=12),
)


Choices = tuple[st.SearchStrategy[Value], st.SearchStrategy[Value]]  # (valid, invalid)


def _flag(field: str, bad: list[str]) -> Choices:
    return (
        st.booleans().map(lambda b: Value(str(b).lower(), True, field, b)),
        st.sampled_from(bad).map(lambda t: Value(t, False)),
    )


def _one_or_many(
    item: st.SearchStrategy[tuple[str, Any]],
    bad: st.SearchStrategy[str],
    field: str,
    *,
    split: Callable[[list[Any]], dict[str, tuple[Any, ...]]] | None = None,
) -> Choices:
    """A list selector: one item or an array of valid items; or a bad value."""

    def valid(items: list[tuple[str, Any]], single: bool) -> Value:
        values = [v for _, v in items]
        toml = items[0][0] if single and len(items) == 1 else array([t for t, _ in items])
        if split is not None:
            return Value(toml, True, "*split*", split(values))
        return Value(toml, True, field, tuple(values))

    good = st.builds(valid, st.lists(item, min_size=1, max_size=3), st.booleans())
    invalid = st.one_of(
        bad.map(lambda t: Value(t, False)),
        st.tuples(item, bad).map(lambda pair: Value(array([pair[0][0], pair[1]]), False)),
        st.just(Value("[]", False)),
    )
    return good, invalid


def _address_item() -> st.SearchStrategy[tuple[str, Any]]:
    exact = _ADDRESSES.map(lambda a: (q(str(a).upper() if a.bus % 2 else str(a)), str(a)))
    bus_glob = _ADDRESSES.map(lambda a: f"{a.domain:04x}:{a.bus:02x}:*").map(lambda g: (q(g), g))
    function_glob = _ADDRESSES.map(lambda a: f"{str(a)[:-1]}[0-7]").map(lambda g: (q(g), g))
    return st.one_of(exact, bus_glob, function_glob)


def _hex_item() -> st.SearchStrategy[tuple[str, Any]]:
    return st.one_of(
        _HEX4.map(lambda v: (q(f"{v:04x}"), v)),
        _HEX4.map(lambda v: (q(f"{v:04X}"), v)),
        _HEX4.map(lambda v: (hex(v), v)),
    )


_BAD_HEX = st.one_of(
    st.integers(0x10000, 2**40).map(str),
    st.integers(-(2**31), -1).map(str),
    st.from_regex(r"[0-9a-f]{1,3}|[0-9a-f]{5,6}|[g-z]{4}", fullmatch=True).map(q),
    st.sampled_from(["true", "1.5", "{a = 1}"]),
)


def _accounts(values: list[Any]) -> dict[str, tuple[Any, ...]]:
    names = tuple(v for v in values if isinstance(v, str))
    ids = tuple(v for v in values if isinstance(v, int))
    return {"names": names, "ids": ids}


def _account_item() -> st.SearchStrategy[tuple[str, Any]]:
    return st.one_of(
        _NAME.map(lambda n: (q(n), n)),
        st.just((q("*"), "*")),
        st.integers(0, 2**32 - 2).map(lambda i: (str(i), i)),
    )


_BAD_ACCOUNT = st.one_of(
    st.sampled_from([q("a*"), q(""), q("a b"), q("x/y"), "true", "-1", "1.0", q("[x]")]),
    st.integers(2**32 - 1, 2**40).map(str),
)


KEY_VALUES: dict[str, Choices] = {
    "address": _one_or_many(
        _address_item(),
        st.sampled_from(
            [
                "10",
                q(""),
                q("0000:00:20.0"),
                q("0000:00:1[0-7.*"),
                q("10de*"),
                q("0000:00:10"),
                q("zz:zz.z"),
                "true",
                q("0000:00:1f.8"),
                q("0000:00:2?.*"),
            ]
        ),
        "addresses",
    ),
    "vendor": _one_or_many(_hex_item(), _BAD_HEX, "vendors"),
    "device": _one_or_many(_hex_item(), _BAD_HEX, "devices"),
    "subsystem-vendor": _one_or_many(_hex_item(), _BAD_HEX, "subsystem_vendors"),
    "subsystem-device": _one_or_many(_hex_item(), _BAD_HEX, "subsystem_devices"),
    "class": _one_or_many(
        st.from_regex(r"([0-9a-f]{2}){1,3}", fullmatch=True).map(lambda c: (q(c), c)),
        st.one_of(
            st.from_regex(r"[0-9a-f]|[0-9a-f]{3}|[0-9a-f]{5}|[0-9a-f]{7}", fullmatch=True).map(q),
            st.just("3"),
        ),
        "classes",
    ),
    "iommu-group": _one_or_many(
        st.one_of(
            st.integers(0, 2**31).map(lambda g: (str(g), str(g))),
            st.integers(0, 999).map(lambda g: (q(str(g)), str(g))),
        ),
        st.sampled_from(["-1", q("one"), "true", q(""), "1.5"]),
        "iommu_groups",
    ),
    "driver": _one_or_many(
        st.from_regex(r"[a-z0-9_]{1,10}\*?", fullmatch=True).map(lambda d: (q(d), d)),
        st.sampled_from([q(""), q("a b"), q("x/y"), "1", q("[ab")]),
        "drivers",
    ),
    "users": _one_or_many(_account_item(), _BAD_ACCOUNT, "users", split=_accounts),
    "groups": _one_or_many(_account_item(), _BAD_ACCOUNT, "groups", split=_accounts),
    "units": _one_or_many(
        st.one_of(
            st.from_regex(r"[a-z0-9@-]{1,10}\.(service|scope)", fullmatch=True),
            st.just("vm@*.service"),
            st.just("*"),
        ).map(lambda u: (q(u), u)),
        st.sampled_from([q("vm1"), q("a.slice"), q(""), "1", q("vm@[.service")]),
        "units",
    ),
    "slices": _one_or_many(
        st.from_regex(r"[a-z0-9-]{1,10}\.slice", fullmatch=True).map(lambda s: (q(s), s)),
        st.sampled_from([q("machine"), q(""), q("a.service"), "true"]),
        "slices",
    ),
    "managed": _flag("managed", ["1", q("yes"), "[true]"]),
    "companions": _flag("companions", ["0", q("no")]),
    "unsafe-noiommu": _flag("unsafe_noiommu", ["1"]),
    "restore-driver": _flag("restore_driver", [q("true")]),
    "backends": (
        st.sampled_from(
            [("legacy",), ("iommufd",), ("legacy", "iommufd"), ("iommufd", "legacy")]
        ).map(lambda b: Value(array([q(x) for x in b]), True, "backends", b))
        | st.just(Value(q("iommufd"), True, "backends", ("iommufd",))),
        st.sampled_from(
            [array([q("vfio")]), "[]", array([q("legacy"), q("legacy")]), "1", q("LEGACY")]
        ).map(lambda t: Value(t, False)),
    ),
    "max-leases": (
        st.integers(1, 2**31 - 1).map(lambda n: Value(str(n), True, "max_leases", n)),
        st.sampled_from(["0", "-3", "1.0", q("2"), "true"]).map(lambda t: Value(t, False)),
    ),
    "max-locked-memory": (
        st.integers(1, 2**40).map(lambda n: Value(str(n), True, "max_locked_memory", n))
        | st.tuples(st.integers(1, 4096), st.sampled_from(["K", "M", "G", "T", "Gi", "GiB"])).map(
            lambda p: Value(
                q(f"{p[0]}{p[1]}"),
                True,
                "max_locked_memory",
                p[0] * 1024 ** (1 + "KMGT".index(p[1][0])),
            )
        ),
        st.sampled_from(["0", q("16X"), q("-1G"), q("G"), "1.5", q("9E"), "true"]).map(
            lambda t: Value(t, False)
        ),
    ),
    "comment": (
        st.text(st.characters(codec="utf-8"), max_size=30).map(
            lambda c: Value(q(c), True, "comment", c)
        ),
        st.just(Value("5", False)),
    ),
}


VALID = {k: v[0] for k, v in KEY_VALUES.items()}
INVALID = {k: v[1] for k, v in KEY_VALUES.items()}


@dataclasses.dataclass
class GeneratedRule:
    name: str
    effect: str
    values: dict[str, Value]
    text: str
    lines: dict[str, int]  # key -> line written
    header: int
    problems: set[str]  # keys the loader must name


# True about one time in 16. Not st.integers(...) == 0: hypothesis favours
# boundary values, which would make the rare case common.
RARE = st.integers(0, 15).map(lambda n: n == 7)


def expected_problems(effect: str, values: dict[str, Value], written: set[str]) -> set[str]:
    """The keys the loader must name for a rule written with these values."""
    keys = set(values)
    problems = {k for k, v in values.items() if not v.valid}
    problems.update(written - set(RULE_KEYS))  # the unknown key, if any
    if "name" not in written:
        problems.add("name")
    if effect not in ("allow", "deny"):
        problems.add("effect")
    if not keys & set(DEVICE_KEYS):
        problems.add("address")
    if not keys & set(CALLER_KEYS):
        problems.add("users")
    if effect == "deny":
        problems.update(keys & set(GRANT_KEYS))
    elif "companions" in values and values["companions"].valid and values["companions"].expected:
        managed = values.get("managed")
        if managed is None or not (managed.valid and managed.expected):
            problems.add("companions")
    return problems


@st.composite
def generated_rule(draw: st.DrawFn, name: str, first_line: int) -> GeneratedRule:
    # Mostly valid rules, so that both outcomes are common: each kind of
    # mistake is rare on its own.
    effect = draw(st.sampled_from(["allow", "allow", "allow", "deny"]))
    if draw(RARE):
        effect = "permit"
    keys = draw(st.sets(st.sampled_from(sorted(KEY_VALUES)), max_size=6))
    if not draw(RARE):  # one device and one caller selector
        keys.add(draw(st.sampled_from(DEVICE_KEYS)))
        keys.add(draw(st.sampled_from(CALLER_KEYS)))
    if effect == "deny" and not draw(RARE):
        keys -= set(GRANT_KEYS)
    values = {k: draw(INVALID[k] if draw(RARE) else VALID[k]) for k in sorted(keys)}
    unknown = None
    if draw(RARE):
        unknown = draw(st.sampled_from(["vendr", "max_leases", "grants", "x"]))

    body: list[tuple[str, str]] = []
    if not draw(RARE):
        body.append(("name", q(name)))
    body.append(("effect", q(effect)))
    body.extend((k, v.toml) for k, v in values.items())
    if unknown is not None:
        body.append((unknown, "1"))
    body = draw(st.permutations(body))

    out = [f"[[rule]]{draw(st.sampled_from(['', '  # a rule']))}"]
    lines = {}
    for key, toml in body:
        for _ in range(draw(st.integers(0, 1))):
            out.append(draw(st.sampled_from(["", "# comment = 1", "   "])))
        lines[key] = first_line + len(out)
        out.append(f"{key} = {toml}")

    problems = expected_problems(effect, values, set(lines))
    return GeneratedRule(name, effect, values, "\n".join(out) + "\n", lines, first_line, problems)


@st.composite
def generated_file(draw: st.DrawFn) -> list[GeneratedRule]:
    names = draw(st.lists(_NAME, min_size=1, max_size=2, unique=True))
    rules = []
    line = 1
    for name in names:
        rule = draw(generated_rule(name, line))
        rules.append(rule)
        line += rule.text.count("\n") + 1  # a blank line between rules
    return rules


def expected_rule(generated: GeneratedRule) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    grants: dict[str, Any] = {}
    for key, value in generated.values.items():
        if value.field == "*split*":
            prefix = "u" if key == "users" else "g"
            fields[key] = value.expected["names"]
            fields[f"{prefix}ids"] = value.expected["ids"]
        elif value.field in {f.name for f in dataclasses.fields(Grants)}:
            grants[value.field] = value.expected
        elif value.field is not None:
            fields[value.field] = value.expected
    fields["grants"] = Grants(**grants)
    return fields


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(generated_file())
def test_generated_rules_load_exactly_when_valid(rules: list[GeneratedRule]) -> None:
    text = "\n".join(r.text for r in rules)
    must_problems = {(r.name, key) for r in rules for key in r.problems}
    result = outcome(text)
    if isinstance(result, PolicyError):
        assert must_problems, f"rejected a valid file:\n{text}\n{result}"
        found = {(p.line, p.key) for p in result.problems}
        for rule in rules:
            for key in rule.problems:
                line = rule.lines.get(key, rule.header)
                assert (line, key) in found, f"{key} (line {line}) not reported:\n{text}\n{result}"
        for problem in result.problems:
            assert str(problem).startswith(f"fuzz.toml:{problem.line}: {problem.key}: ")
        return
    assert not must_problems, f"accepted an invalid file:\n{text}"
    assert len(result.policy.rules) == len(rules)
    for generated, loaded in zip(rules, result.policy.rules, strict=True):
        assert loaded.name == generated.name
        assert loaded.effect == Effect(generated.effect)
        assert loaded.source == f"fuzz.toml:{generated.header}"
        for field, value in expected_rule(generated).items():
            assert getattr(loaded, field) == value, (field, text)


# ---------------------------------------------------------------------------
# decide() against a reference


ADDRESSES = ["0000:00:10.0", "0000:00:1f.2", "0000:01:00.0", "0000:01:00.1", "0001:00:10.0"]
DEVICES = [
    PciDevice(
        address=PciAddress.parse(address),
        vendor=vendor,
        device=0x1234,
        subsystem_vendor=vendor,
        subsystem_device=0x0001,
        pci_class=pci_class,
        driver=driver,
        group=group,
        reset_methods=(),
        physfn=None,
        virtfns=(),
    )
    for address, vendor, pci_class, driver, group in [
        (ADDRESSES[0], 0x8086, 0x020000, "e1000e", "10"),
        (ADDRESSES[1], 0x8086, 0x010601, "ahci", "5"),
        (ADDRESSES[2], 0x10DE, 0x030000, None, "1"),
        (ADDRESSES[3], 0x10DE, 0x040300, "vfio-pci", "1"),
        (ADDRESSES[4], 0x1AF4, 0x020000, "virtio-pci", None),
    ]
]
CALLERS = [
    Caller(1000, "alice", (1000, 107), ("alice", "kvm"), None, ()),
    Caller(1001, "bob", (1001,), ("bob",), "vm@1.service", ("machine.slice",)),
    Caller(0, "root", (0,), ("root",), "machine-qemu\\x2d1.scope", ("machine.slice",)),
    Caller(4242, None, (4242,), (), None, ("user.slice", "user-4242.slice")),
]
LEGACY = Request("legacy", False, False)


SELECTOR_OPTIONS: dict[str, list[Any]] = {
    "addresses": [*ADDRESSES, "0000:00:*", "0000:01:00.?", "*", "0000:0[01]:*"],
    "vendors": [0x8086, 0x10DE, 0x1AF4],
    "classes": ["02", "0300", "01"],
    "iommu_groups": ["1", "10", "5"],
    "drivers": ["e1000e", "none", "*vfio*", "a*"],
    "users": ["alice", "bob", "root", WILDCARD],
    "uids": [0, 1001, 4242],
    "groups": ["kvm", "bob", WILDCARD],
    "gids": [107, 4242],
    "units": ["vm@*.service", "machine-qemu*.scope", "*"],
    "slices": ["machine.slice", "user-*.slice"],
}


@st.composite
def rules(draw: st.DrawFn, index: int) -> Rule:
    """A rule using a few selectors (any, even none: decide() must cope with
    hand-built rules the loader would refuse)."""
    effect = draw(st.sampled_from([Effect.ALLOW, Effect.ALLOW, Effect.DENY]))
    kinds = draw(st.sets(st.sampled_from(sorted(SELECTOR_OPTIONS)), max_size=4))
    fields: dict[str, Any] = {
        kind: tuple(draw(st.lists(st.sampled_from(SELECTOR_OPTIONS[kind]), min_size=1, max_size=2)))
        for kind in kinds
    }
    grants = Grants()
    if effect is Effect.ALLOW:
        grants = Grants(
            managed=draw(st.booleans()),
            unsafe_noiommu=draw(st.booleans()),
            backends=draw(st.sampled_from([("legacy", "iommufd"), ("legacy",), ("iommufd",)])),
        )
    return Rule(name=f"r{index}", effect=effect, source=f"t.toml:{index}", grants=grants, **fields)


@st.composite
def policies(draw: st.DrawFn) -> Policy:
    count = draw(st.integers(0, 12))
    return Policy(
        settings=Settings(allow_unsafe_noiommu=draw(st.booleans())),
        rules=tuple(draw(rules(i)) for i in range(count)),
    )


def reference_matches(rule: Rule, caller: Caller, device: PciDevice) -> bool:
    """policy/README.md's matching, written plainly."""
    address = str(device.address)
    driver = device.driver or "none"
    tests = [
        not rule.addresses or any(fnmatch.fnmatchcase(address, a) for a in rule.addresses),
        not rule.vendors or device.vendor in rule.vendors,
        not rule.classes or any(f"{device.pci_class:06x}".startswith(c) for c in rule.classes),
        not rule.iommu_groups or device.group in rule.iommu_groups,
        not rule.drivers or any(fnmatch.fnmatchcase(driver, d) for d in rule.drivers),
        not (rule.users or rule.uids)
        or WILDCARD in rule.users
        or caller.user in rule.users
        or caller.uid in rule.uids,
        not (rule.groups or rule.gids)
        or WILDCARD in rule.groups
        or bool(set(caller.groups) & set(rule.groups))
        or bool(set(caller.gids) & set(rule.gids)),
        not rule.units
        or (
            caller.unit is not None and any(fnmatch.fnmatchcase(caller.unit, u) for u in rule.units)
        ),
        not rule.slices
        or any(fnmatch.fnmatchcase(s, p) for s in caller.slices for p in rule.slices),
    ]
    return all(tests)


def assert_fast_path_agrees(
    policy: Policy, caller: Caller, device: PciDevice, request: Request, **kw: Any
) -> None:
    fast = decide(policy, caller, device, request, **kw)
    full = decide(policy, caller, device, request, explain=True, **kw)
    assert (fast.allowed, fast.rule, fast.grants, fast.reasons, fast.refusal) == (
        full.allowed,
        full.rule,
        full.grants,
        full.reasons,
        full.refusal,
    )
    matched = {e.rule for e in full.trace if e.outcome in (Outcome.WON, Outcome.MATCHED)}
    assert {e.rule for e in fast.trace if e.outcome is not Outcome.SKIPPED} == matched
    assert sum(e.count for e in fast.trace) == len(policy.rules)
    assert len(full.trace) == len(policy.rules)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    policies(),
    st.sampled_from(CALLERS),
    st.sampled_from(DEVICES),
    st.builds(Request, st.sampled_from([None, "legacy", "iommufd"]), st.booleans(), st.booleans()),
    st.booleans(),
    st.booleans(),
)
def test_decide_follows_the_documented_semantics(
    policy: Policy,
    caller: Caller,
    device: PciDevice,
    request: Request,
    critical: bool,
    noiommu: bool,
) -> None:
    host_critical = ("backs /",) if critical else ()
    kw: dict[str, Any] = {"host_critical": host_critical, "noiommu": noiommu}
    assert_fast_path_agrees(policy, caller, device, request, **kw)
    decision = decide(policy, caller, device, request, explain=True, **kw)

    matching = [r for r in policy.rules if reference_matches(r, caller, device)]
    traced = [e.rule for e in decision.trace if e.outcome in (Outcome.WON, Outcome.MATCHED)]
    assert traced == [r.name for r in matching]
    denies = [r for r in matching if r.effect is Effect.DENY]
    allows = [r for r in matching if r.effect is Effect.ALLOW]
    if denies:
        assert decision.refusal is Refusal.DENY_RULE
        assert decision.rule == denies[0]
        return
    if not allows:
        assert decision.refusal is Refusal.NO_RULE
        assert decision.rule is None
        return

    def specificity(rule: Rule) -> tuple[bool, int, int, int]:
        return (
            device.address in rule.exact_addresses,
            rule.device_selectors,
            rule.caller_selectors,
            -policy.rules.index(rule),
        )

    winner = max(allows, key=specificity)
    assert decision.rule == winner
    backend = request.backend or policy.settings.default_backend
    expected = [
        (Refusal.HOST_CRITICAL, critical and device.address not in winner.exact_addresses),
        (
            Refusal.UNSAFE_NOIOMMU,
            noiommu
            and not (
                policy.settings.allow_unsafe_noiommu
                and winner.grants.unsafe_noiommu
                and request.unsafe_noiommu
            ),
        ),
        (Refusal.BACKEND, backend not in winner.grants.backends),
    ]
    failed = [refusal for refusal, fails in expected if fails]
    if failed:
        assert not decision.allowed
        assert decision.refusal is failed[0]
        assert decision.grants is None
    else:
        assert decision.allowed
        assert decision.refusal is None
        assert decision.grants == winner.grants


@FEWER
@given(st.lists(st.sampled_from(CALLERS), min_size=1, max_size=4), policies())
def test_caller_views_do_not_leak_between_callers(callers: list[Caller], policy: Policy) -> None:
    """The per-caller index cache: asking for callers in any order, or a copy
    of a caller, gives what a fresh policy gives."""
    for caller in callers:
        for device in DEVICES:
            fresh = Policy(settings=policy.settings, rules=policy.rules)
            copy = dataclasses.replace(caller)
            got = decide(policy, copy, device, LEGACY)
            want = decide(fresh, caller, device, LEGACY)
            assert (got.allowed, got.rule, got.refusal) == (want.allowed, want.rule, want.refusal)
