"""Property-based tests of reading a damaged state file (hypothesis).

Random damage to an intact state file (flipped, inserted and deleted bytes,
truncation; values, types, keys and fields changed in the JSON) never makes
loading raise, never yields a record the damaged file does not hold, and
leaves a state file that loads clean with the same records. Damage to one
record costs that record only.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit.test_state_corrupt import GOOD, _good_text
from vfiod.pci import AddressError, PciAddress
from vfiod.state import BindingRecord, BindPhase, LeaseRecord, State, StateFile

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
INTACT = _good_text().encode()

# Values near the valid ones, and anything else JSON can say.
NEAR: st.SearchStrategy[object] = st.sampled_from(
    [
        "0000:00:10.0",
        "00:10.0",
        "0000:00:10.1",
        "0000:01:00.0",
        "vfio-pci",
        "e1000e",
        "bound",
        "binding",
        "restore-failed",
        "legacy",
        "iommufd",
        ":1.7",
        "10",
        "0",
        "a1b2c3d4e5f60718.container",
        "",
        0,
        1,
        3,
        -1,
        2**64,
        1.5,
        True,
        False,
        None,
        [],
        {},
        [[0, 4096]],
        ["10"],
        ["0000:00:10.0"],
    ]
)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | NEAR
)
JSON = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)


@contextmanager
def state_file(data: bytes) -> Iterator[str]:
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "state.json")
        with open(path, "wb") as f:
            f.write(data)
        yield path


def canonical(address: object) -> str | None:
    try:
        return str(PciAddress.parse(address)) if isinstance(address, str) else None
    except AddressError:
        return None


def plain(value: object) -> object:
    """A record's field as JSON has it."""
    if isinstance(value, tuple):
        return [plain(v) for v in value]
    return value


def same(record_value: object, file_value: object, field: str) -> bool:
    if field in ("devices", "moved"):
        return (
            isinstance(file_value, list) and tuple(canonical(a) for a in file_value) == record_value
        )
    if field == "created":
        return (
            isinstance(file_value, int | float)
            and not isinstance(file_value, bool)
            and math.isfinite(file_value)
            and float(file_value) == record_value
        )
    return type(plain(record_value)) is type(file_value) and plain(record_value) == file_value


def expect_only_what_the_file_holds(state: State, data: bytes) -> None:
    """Every record loaded is in the file as it is (read by json itself)."""
    try:
        raw: Any = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        assert state == State(), "records from a file that is not JSON"
        return
    if not isinstance(raw, dict) or type(raw.get("version")) is not int or raw["version"] != 1:
        assert state == State(), "records from a file that is not of format 1"
        return
    for address, binding in state.bindings.items():
        entries = raw.get("bindings")
        assert isinstance(entries, dict)
        (entry,) = [e for k, e in entries.items() if canonical(k) == address]
        assert isinstance(entry, dict)
        assert entry["driver"] == binding.driver
        assert entry["original_driver"] == binding.original_driver
        assert entry["original_override"] == binding.original_override
        assert entry["phase"] == binding.phase.value
    for lease_id, lease in state.leases.items():
        entries = raw.get("leases")
        assert isinstance(entries, dict)
        entry = entries[lease_id]
        assert isinstance(entry, dict)
        assert lease.id == lease_id
        for name, value in vars(lease).items():
            if name == "id":
                continue
            if name in entry:
                assert same(value, entry[name], name), (name, value, entry[name])
            else:
                assert value == LeaseRecord.__dataclass_fields__[name].default, name


def load_damaged(data: bytes) -> State:
    """Load ``data`` as the state file: it does not raise; what it gives is
    in ``data``; a damaged file is kept aside as it was and the new one
    loads clean with the same records."""
    with state_file(data) as path:
        store = StateFile(path)
        state = store.load()
        expect_only_what_the_file_holds(state, data)
        if store.problems:
            assert store.moved_aside is not None
            with open(store.moved_aside, "rb") as f:
                assert f.read() == data
            again = StateFile(path)
            assert again.load() == state
            assert again.problems == ()
        else:
            assert store.moved_aside is None
            assert sorted(os.listdir(os.path.dirname(path))) == ["state.json"]
        return state


@SETTINGS
@given(
    flips=st.lists(
        st.tuples(st.integers(0, len(INTACT) - 1), st.integers(0, 255)), min_size=1, max_size=8
    )
)
def test_flipped_bytes(flips: list[tuple[int, int]]) -> None:
    data = bytearray(INTACT)
    for position, byte in flips:
        data[position] = byte
    load_damaged(bytes(data))


@SETTINGS
@given(
    start=st.integers(0, len(INTACT)),
    length=st.integers(0, 64),
    inserted=st.binary(max_size=64),
)
def test_deleted_and_inserted_bytes(start: int, length: int, inserted: bytes) -> None:
    load_damaged(INTACT[:start] + inserted + INTACT[start + length :])


@SETTINGS
@given(length=st.integers(0, len(INTACT)))
def test_truncated(length: int) -> None:
    state = load_damaged(INTACT[:length])
    if length < len(INTACT.rstrip()):
        assert state == State()


SECTIONS = ("bindings", "leases")


@st.composite
def record_damage(draw: st.DrawFn) -> tuple[str, set[str], dict[str, Any]]:
    """One record of the intact file, damaged: (its section, the keys of the
    section it may cost, the file)."""
    raw: dict[str, Any] = json.loads(INTACT)
    section = draw(st.sampled_from(SECTIONS))
    key = draw(st.sampled_from(sorted(raw[section])))
    entry = raw[section][key]
    how = draw(st.sampled_from(["value", "delete", "add", "rename", "replace"]))
    lost = {key}
    if how == "value":
        entry[draw(st.sampled_from(sorted(entry)))] = draw(JSON)
    elif how == "delete":
        del entry[draw(st.sampled_from(sorted(entry)))]
    elif how == "add":
        entry[draw(st.text(max_size=8))] = draw(JSON)
    elif how == "rename":
        new = draw(st.text(max_size=16) | NEAR.filter(lambda v: isinstance(v, str)))
        raw[section] = {new if k == key else k: v for k, v in raw[section].items()}
        # It may now be another record's key, or another spelling of one.
        target = canonical(new)
        lost |= {k for k in raw[section] if k == new or (target and canonical(k) == target)}
    else:
        raw[section][key] = draw(JSON)
    return section, lost, raw


@SETTINGS
@given(damage=record_damage())
def test_damage_to_one_record_costs_that_record_only(
    damage: tuple[str, set[str], dict[str, Any]],
) -> None:
    section, lost, raw = damage
    state = load_damaged(json.dumps(raw).encode())
    for name in SECTIONS:
        intact = {k: v for k, v in getattr(GOOD, name).items() if name != section or k not in lost}
        loaded = getattr(state, name)
        assert {k: loaded.get(k) for k in intact} == intact


@SETTINGS
@given(
    section=st.sampled_from(SECTIONS),
    value=JSON,
    version=st.sampled_from([1, 1, 1, 2, "1", 1.0, True, None]),
)
def test_damaged_sections_and_version(section: str, value: object, version: object) -> None:
    raw: dict[str, Any] = json.loads(INTACT)
    raw[section] = value
    raw["version"] = version
    state = load_damaged(json.dumps(raw).encode())
    if type(version) is not int or version != 1:
        assert state == State()
        return
    (other,) = [s for s in SECTIONS if s != section]
    assert getattr(state, other) == getattr(GOOD, other)


# The JSON types each field may have (what vfiod writes): a record with any
# other type in a field is not one vfiod wrote, and does not survive.
TYPES = {
    "driver": {"str"},
    "original_driver": {"str", "null"},
    "original_override": {"str", "null"},
    "phase": {"str"},
    "original_unknown": {"bool"},
    "uid": {"int"},
    "pid": {"int", "null"},
    "unit": {"str", "null"},
    "owner": {"str"},
    "owner_pid": {"int", "null"},
    "label": {"str"},
    "backend": {"str"},
    "unsafe": {"bool"},
    "groups": {"list"},
    "devices": {"list"},
    "rules": {"list"},
    "created": {"int", "float"},
    "restore": {"bool"},
    "max_locked_memory": {"int", "null"},
    "moved": {"list"},
    "fds": {"list"},
    "iommu_type": {"int", "null"},
    "mappings": {"list"},
    "gids": {"list"},
    "slices": {"list"},
}


def json_type(value: object) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return "not finite"
    names = {type(None): "null", bool: "bool", int: "int", float: "float", str: "str"}
    return names.get(type(value), "list" if isinstance(value, list) else "object")


@SETTINGS
@given(data=st.data())
def test_a_field_of_another_type_costs_its_record(data: st.DataObject) -> None:
    raw: dict[str, Any] = json.loads(INTACT)
    section = data.draw(st.sampled_from(SECTIONS))
    key = data.draw(st.sampled_from(sorted(raw[section])))
    field = data.draw(st.sampled_from(sorted(raw[section][key])))
    value = data.draw(SCALARS | JSON)
    raw[section][key][field] = value
    state = load_damaged(json.dumps(raw).encode())
    if json_type(value) not in TYPES[field]:
        assert key not in getattr(state, section), (field, value)
    for name in SECTIONS:
        intact = {k: v for k, v in getattr(GOOD, name).items() if name != section or k != key}
        assert {k: getattr(state, name).get(k) for k in intact} == intact


# -- everything vfiod writes, it reads back

ADDRESSES = st.builds(
    lambda d, b, s, f: str(PciAddress(d, b, s, f)),
    st.integers(0, 0xFFFF),
    st.integers(0, 0xFF),
    st.integers(0, 0x1F),
    st.integers(0, 7),
)
DRIVERS = st.sampled_from(
    ["vfio-pci", "e1000e", "pci-stub", "xhci_hcd", "nvme", "snd_hda_intel", "8139too", "i915"]
)
GROUP_IDS = st.integers(0, 10**9).map(str)


@st.composite
def bindings(draw: st.DrawFn) -> BindingRecord:
    return BindingRecord(
        address=draw(ADDRESSES),
        driver=draw(st.sampled_from(["vfio-pci", "pci-stub"])),
        original_driver=draw(st.none() | DRIVERS),
        original_override=draw(st.none() | DRIVERS),
        phase=draw(st.sampled_from(BindPhase)),
    )


@st.composite
def mappings(draw: st.DrawFn) -> tuple[tuple[int, int], ...]:
    starts = sorted(draw(st.sets(st.integers(0, 2**40), max_size=5)))
    pairs = []
    for start, after in itertools.pairwise([*starts, 2**40 + 1]):
        pairs.append((start << 12, draw(st.integers(1, after - start)) << 12))
    return tuple(draw(st.permutations(pairs)))


@st.composite
def leases(draw: st.DrawFn) -> LeaseRecord:
    lease_id = draw(st.binary(min_size=8, max_size=8)).hex()
    groups = tuple(draw(st.lists(GROUP_IDS, min_size=1, max_size=4, unique=True)))
    backend = draw(st.sampled_from(["legacy", "iommufd"]))
    owned = draw(st.booleans())
    fds = (
        [f"{lease_id}.container", *(f"{lease_id}.group.{g}" for g in groups)]
        if backend == "legacy"
        else [f"{lease_id}.iommufd"]
    ) + ([f"{lease_id}.owner"] if owned else [])
    if backend == "legacy" and draw(st.booleans()):
        fds.append(f"{lease_id}.group.noiommu-{groups[0]}")
    pids = st.integers(1, 4194304)
    return LeaseRecord(
        id=lease_id,
        uid=draw(st.integers(0, 2**32 - 2)),
        pid=draw(st.none() | pids),
        unit=draw(
            st.none()
            | st.sampled_from(
                ["app-qemu-1.scope", "user@1000.service", r"machine-qemu\x2d1.scope", "a.service"]
            )
        ),
        owner=f":{draw(st.integers(0, 2**31))}.{draw(st.integers(0, 2**31))}",
        owner_pid=draw(pids) if owned else None,
        label=draw(st.text(max_size=256).filter(str.isprintable)),
        backend=backend,
        unsafe=draw(st.booleans()),
        groups=groups,
        devices=tuple(draw(st.lists(ADDRESSES, min_size=1, max_size=4, unique=True))),
        rules=tuple(
            draw(
                st.lists(
                    st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.:@+-]{0,127}", fullmatch=True),
                    max_size=3,
                    unique=True,
                )
            )
        ),
        created=draw(st.floats(0, 2**34, allow_nan=False)),
        restore=draw(st.booleans()),
        max_locked_memory=draw(st.none() | st.integers(0, 2**64 - 1)),
        moved=tuple(draw(st.lists(ADDRESSES, max_size=4, unique=True))),
        fds=tuple(draw(st.permutations(fds))),
        iommu_type=draw(st.none() | st.sampled_from([1, 3, 8, 9])) if backend == "legacy" else None,
        mappings=draw(mappings()),
        gids=tuple(draw(st.lists(st.integers(0, 2**32 - 2), max_size=3, unique=True))),
        slices=tuple(
            draw(
                st.lists(
                    st.from_regex(r"[a-z][a-z0-9-]{0,20}\.slice", fullmatch=True),
                    max_size=3,
                    unique=True,
                )
            )
        ),
    )


@settings(max_examples=200, deadline=None)
@given(
    binding_list=st.lists(bindings(), max_size=4, unique_by=lambda b: b.address),
    lease_list=st.lists(leases(), max_size=4, unique_by=lambda lease: lease.id),
)
def test_what_vfiod_writes_it_reads_back_intact(
    binding_list: list[BindingRecord], lease_list: list[LeaseRecord]
) -> None:
    state = State({b.address: b for b in binding_list}, {r.id: r for r in lease_list})
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "state.json")
        StateFile(path).save(state)
        store = StateFile(path)
        assert store.load() == state
        assert (store.problems, store.moved_aside) == ((), None)
