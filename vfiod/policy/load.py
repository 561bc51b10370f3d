"""Reading policy files: TOML in, a Policy (or every problem at once) out.

Files, under a root directory (``/`` on a host, a temporary tree in tests):

* ``etc/vfiod/vfiod.toml`` daemon settings (else ``usr/lib/vfiod/vfiod.toml``,
  else the defaults);
* ``etc/vfiod/policy.d/*.toml`` and ``usr/lib/vfiod/policy.d/*.toml``: rules.
  A file in etc replaces the file of the same name in usr/lib, and all are
  read in file name order (the systemd drop-in convention); a file that is
  empty or a symlink to /dev/null masks its namesake.

Policy decides who gets root's devices, so only what root alone can change
is read: a file or directory that another user owns or may write is an
error, and so is anything but a regular file (a FIFO would block the read,
/dev/zero would never end it) or a file above MAX_FILE_SIZE.

tomllib reports no positions for values, so a small scanner (``key_lines``)
finds the line of every key and ``[[rule]]`` header in the text tomllib has
already accepted. Parsing (``parse_policy``) is pure: bytes in, a LoadResult
or a PolicyError out; reading the files is at the edge (``load_policy``).
"""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import fnmatch
import grp
import logging
import os
import pwd
import re
import stat
import tomllib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from vfiod.files import NotRegularError, TooLargeError, read_regular
from vfiod.pci import AddressError, PciAddress
from vfiod.policy.model import (
    BACKENDS,
    WILDCARD,
    Effect,
    Grants,
    Policy,
    Reservation,
    Rule,
    Settings,
    is_glob,
)

log = logging.getLogger(__name__)

SETTINGS_PATHS = ("etc/vfiod/vfiod.toml", "usr/lib/vfiod/vfiod.toml")  # first found wins
POLICY_DIRECTORIES = ("usr/lib/vfiod/policy.d", "etc/vfiod/policy.d")  # later ones override
# Every directory load_policy reads, checked for writers besides root; not the
# root itself nor its parents (on a host they are / and /etc, root's anyway).
POLICY_TREE = tuple(
    sorted({*POLICY_DIRECTORIES, *(os.path.dirname(path) for path in SETTINGS_PATHS)})
)
FILE_KEY = "(file)"  # Problem.key of problems with a whole file or directory
SYNTAX_KEY = "(syntax)"  # Problem.key of TOML syntax errors
# 10,000 generated rules (bench/policy_eval.py) take about 1 MiB.
MAX_FILE_SIZE = 16 * 2**20
# Nesting past this is reported at the line where it happens when tomllib gives
# up (a policy nests at most three levels: rule = [{users = [...]}]).
MAX_NESTING = 32


# ---------------------------------------------------------------------------
# Problems


@dataclasses.dataclass(frozen=True)
class Problem:
    """One thing wrong (or, as a warning, suspicious) in a policy file."""

    file: str
    line: int  # 1-based; 0 when no line applies (a directory, an unreadable file)
    key: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.key}: {self.message}"

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class PolicyError(Exception):
    """The policy files have errors; ``problems`` lists every one of them."""

    def __init__(self, problems: Sequence[Problem], warnings: Sequence[Problem] = ()) -> None:
        self.problems = tuple(problems)
        self.warnings = tuple(warnings)
        super().__init__("\n".join(str(p) for p in self.problems))

    def __str__(self) -> str:
        return "\n".join(str(p) for p in self.problems)


@dataclasses.dataclass(frozen=True)
class LoadResult:
    policy: Policy
    warnings: tuple[Problem, ...] = ()


@dataclasses.dataclass(frozen=True)
class Source:
    """A policy file's path (as shown in messages) and contents."""

    path: str
    data: bytes


# ---------------------------------------------------------------------------
# Where keys are: line numbers for a text tomllib accepted

KeyPath = tuple[str | int, ...]
_DOTTED_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+(?:[ \t]*\.[ \t]*[A-Za-z0-9_-]+)*")
_VALUE_TOKEN = re.compile(r"\"\"\"|'''|[\"'#\[\]{}]")
_POSITION = re.compile(r"\s*\(at line (\d+), column (\d+)\)$")
_END_OF_DOCUMENT = " (at end of document)"


# The rest of a string after its opening delimiter, up to its closing one.
_STRING_REST = {
    '"': re.compile(r'(?:[^"\\]|\\.)*"'),
    "'": re.compile(r"[^']*'"),
    '"""': re.compile(r'(?:[^"\\]|\\.|"(?!""))*"""'),
    "'''": re.compile(r"(?:[^']|'(?!''))*'''"),
}


def _string_end(line: str, start: int, quote: str) -> int:
    """Index after the string whose delimiter ``quote`` ends before ``start``;
    -1 when it runs past the line (only multi-line strings may)."""
    m = _STRING_REST[quote].match(line, start)
    if m is None:
        return -1
    end = m.end()
    if len(quote) == 3:  # """"" closes with up to two quotes of content before it
        while end < len(line) and line[end] == quote[0] and end - m.end() < 2:
            end += 1
    return end


def _key_end(line: str, start: int, stop: str) -> int:
    """Index of the first ``stop`` character outside quoted key parts."""
    i = start
    while i < len(line):
        c = line[i]
        if c in "\"'":
            end = _string_end(line, i + 1, c)
            if end < 0:
                return -1
            i = end
            continue
        if c in stop:
            return i
        i += 1
    return -1


def _split_key(text: str) -> tuple[str, ...]:
    text = text.strip()
    if _DOTTED_BARE_KEY.fullmatch(text):
        return tuple(part.strip() for part in text.split("."))
    try:  # quoted parts: let tomllib undo the escapes
        data: Any = tomllib.loads(text + " = 0")
    except tomllib.TOMLDecodeError:
        return (text,)
    path = []
    while isinstance(data, dict) and len(data) == 1:
        ((key, data),) = data.items()
        path.append(key)
    return tuple(path)


class KeyLines:
    """Line numbers of keys and table headers, by key path; an array of
    tables element is its name then its index: ("rule", 0, "name")."""

    def __init__(self, text: str) -> None:
        self.lines: dict[KeyPath, int] = {}
        # The first line where arrays and inline tables nest deeper than MAX_NESTING.
        self.too_deep: int | None = None
        self._arrays: dict[KeyPath, int] = {}  # array of tables -> elements so far
        self._scan(text)

    def line_of(self, path: KeyPath) -> int:
        """The line of ``path``, else of its nearest ancestor, else 1."""
        for n in range(len(path), 0, -1):
            line = self.lines.get(path[:n])
            if line is not None:
                return line
        return 1

    def _resolve(self, path: tuple[str, ...]) -> KeyPath:
        """Insert the current element's index after each array of tables."""
        out: list[str | int] = []
        for part in path:
            out.append(part)
            count = self._arrays.get(tuple(out))
            if count:
                out.append(count - 1)
        return tuple(out)

    def _record(self, path: KeyPath, line: int, start: int = 1) -> None:
        for n in range(max(start, 1), len(path) + 1):
            self.lines.setdefault(path[:n], line)

    def _scan(self, text: str) -> None:
        current: KeyPath = ()
        depth = 0  # open arrays and inline tables in a value
        open_string = ""  # the delimiter of a multi-line string running on
        for number, line in enumerate(text.split("\n"), 1):
            pos = 0
            if open_string:
                pos = _string_end(line, 0, open_string)
                if pos < 0:
                    continue
                open_string = ""
            elif depth == 0:
                current, start = self._line_start(line, number, current)
                if start is None:
                    continue
                pos = start
            depth, open_string, deepest = _scan_value(line, pos, depth)
            if deepest > MAX_NESTING and self.too_deep is None:
                self.too_deep = number

    def _line_start(self, line: str, number: int, current: KeyPath) -> tuple[KeyPath, int | None]:
        """Record a header or key starting the line; the table now current and
        where the value starts (None: no value on this line)."""
        stripped = line.lstrip(" \t")
        indent = len(line) - len(stripped)
        if stripped.startswith("["):
            array = stripped.startswith("[[")
            start = indent + (2 if array else 1)
            end = _key_end(line, start, "]")
            path = _split_key(line[start:end]) if end > 0 else ()
            if path and array:
                key = (*self._resolve(path[:-1]), path[-1])
                self._arrays[key] = self._arrays.get(key, 0) + 1
                current = (*key, self._arrays[key] - 1)
            elif path:
                current = self._resolve(path)
            self._record(current, number)
            return current, None
        if not stripped or stripped.startswith(("#", "\r")):
            return current, None
        end = _key_end(line, indent, "=")
        if end < 0:
            return current, None
        self._record((*current, *_split_key(line[indent:end])), number, len(current) + 1)
        return current, end + 1


def _scan_value(line: str, pos: int, depth: int) -> tuple[int, str, int]:
    """Follow a value to the end of its line: the nesting depth of arrays and
    inline tables then, the delimiter of a multi-line string left open, and
    the deepest nesting on the line."""
    deepest = depth
    while (m := _VALUE_TOKEN.search(line, pos)) is not None:
        lexeme = m.group()
        pos = m.end()
        if lexeme == "#":
            break
        if lexeme[0] in "\"'":
            pos = _string_end(line, pos, lexeme)
            if pos < 0:
                return depth, lexeme, deepest  # only multi-line strings get here in valid TOML
        elif lexeme in "[{":
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth = max(depth - 1, 0)
    return depth, "", deepest


# ---------------------------------------------------------------------------
# Values


def _type_name(value: object) -> str:
    """A TOML value's type in words, with the value when it is short."""
    if isinstance(value, bool):
        kind = f"a boolean ({str(value).lower()})"
    elif isinstance(value, str):
        kind = f"a string ({value!r})" if len(value) <= 40 else "a string"
    elif isinstance(value, int):
        kind = f"an integer ({value})"
    elif isinstance(value, float):
        kind = f"a float ({value})"
    elif isinstance(value, list):
        kind = "an array"
    elif isinstance(value, dict):
        kind = "a table"
    elif isinstance(value, datetime.datetime | datetime.date | datetime.time):
        kind = "a date or time"
    else:
        kind = type(value).__name__
    return kind


class _InvalidValueError(Exception):
    """A value is wrong; the message says what is expected."""


def _items(value: object, what: str) -> list[object]:
    """A value that may be one item or a non-empty array of items."""
    if isinstance(value, list):
        if not value:
            raise _InvalidValueError(
                f"expected {what} or a non-empty array of them, got an empty array"
            )
        return value
    return [value]


def _each(parser: Callable[[object], Any], what: str) -> Callable[[object], tuple[Any, ...]]:
    """A parser of one item or an array of items, from a parser of one."""
    return lambda value: tuple(parser(item) for item in _items(value, what))


def _glob_syntax(pattern: str) -> str | None:
    """What is wrong with a glob's brackets, or None."""
    i = 0
    while i < len(pattern):
        if pattern[i] == "[":
            j = i + 1
            if j < len(pattern) and pattern[j] == "!":
                j += 1
            if j < len(pattern) and pattern[j] == "]":
                j += 1  # a "]" first in a set is part of the set
            close = pattern.find("]", j)
            if close < 0:
                return "has a '[' without its ']'"
            i = close + 1
        else:
            i += 1
    return None


def _glob_parts(pattern: str) -> list[str]:
    """The parts of a glob whose brackets _glob_syntax found balanced: "*",
    "?", a whole "[set]", or one literal character each."""
    parts = []
    i = 0
    while i < len(pattern):
        if pattern[i] == "[":
            j = i + 1
            if j < len(pattern) and pattern[j] == "!":
                j += 1
            if j < len(pattern) and pattern[j] == "]":
                j += 1
            close = pattern.find("]", j)
            parts.append(pattern[i : close + 1])
            i = close + 1
        else:
            parts.append(pattern[i])
            i += 1
    return parts


_HEX = frozenset("0123456789abcdef")
# What each position of "dddd:bb:dd.f" may hold (the kernel's form: slot < 0x20, function < 8).
_ADDRESS_SHAPE: tuple[frozenset[str], ...] = (
    *([_HEX] * 4),
    frozenset(":"),
    _HEX,
    _HEX,
    frozenset(":"),
    frozenset("01"),
    _HEX,
    frozenset("."),
    frozenset("01234567"),
)
_ADDRESS_EXAMPLE = (
    'expected a PCI address DDDD:BB:DD.F in hex or a glob of one, like "0000:01:00.*"'
)


def _part_allows(part: str, chars: frozenset[str]) -> bool:
    """Can one glob part ("?", "[set]" or a literal) match one of ``chars``?"""
    if part == "?":
        return True
    if part.startswith("["):
        regex = re.compile(fnmatch.translate(part))
        return any(regex.match(c) for c in chars)
    return part in chars


def _can_match_address(pattern: str) -> bool:
    """Can this glob match some PCI address? Follows the glob over the
    address's shape, position by position."""
    states = {0}
    end = len(_ADDRESS_SHAPE)
    for part in _glob_parts(pattern):
        if part == "*":
            states = set(range(min(states), end + 1))
        else:
            states = {p + 1 for p in states if p < end and _part_allows(part, _ADDRESS_SHAPE[p])}
        if not states:
            return False
    return end in states


def _address(value: object) -> str:
    if not isinstance(value, str):
        raise _InvalidValueError(f"{_ADDRESS_EXAMPLE}, got {_type_name(value)}")
    pattern = value.strip().lower()
    if pattern == WILDCARD:
        return pattern
    if not pattern:
        raise _InvalidValueError(
            f'{_ADDRESS_EXAMPLE} (or "*" for every device), got an empty string'
        )
    if not is_glob(pattern):
        try:
            return str(PciAddress.parse(pattern))
        except AddressError:
            raise _InvalidValueError(f"{_ADDRESS_EXAMPLE}, got {value!r}") from None
    problem = _glob_syntax(pattern)
    if problem is not None:
        raise _InvalidValueError(f"the glob {value!r} {problem}; {_ADDRESS_EXAMPLE}")
    if ":" not in pattern and "." not in pattern:
        raise _InvalidValueError(f"{value!r} does not look like an address; {_ADDRESS_EXAMPLE}")
    if _can_match_address(pattern):
        return pattern
    if pattern.count(":") == 1 and _can_match_address("0000:" + pattern):
        return "0000:" + pattern  # the short BB:DD.F form is domain 0, as in lspci
    raise _InvalidValueError(
        f"the glob {value!r} can never match a PCI address; {_ADDRESS_EXAMPLE}"
    )


_HEX_ID = re.compile(r"(?:0x)?([0-9a-f]{4})")


def _hex_id(value: object) -> int:
    expected = 'expected a 4-digit hex id as a string like "10de"'
    if isinstance(value, int) and not isinstance(value, bool):
        if 0 <= value <= 0xFFFF:
            return value
        raise _InvalidValueError(f"{expected}, got {value}, which is out of range")
    if not isinstance(value, str):
        raise _InvalidValueError(f"{expected}, got {_type_name(value)}")
    m = _HEX_ID.fullmatch(value.strip().lower())
    if m is None:
        raise _InvalidValueError(f"{expected}, got {value!r}")
    return int(m[1], 16)


_CLASS = re.compile(r"(?:0x)?((?:[0-9a-f]{2}){1,3})")


def _class_prefix(value: object) -> str:
    expected = (
        'expected a class code prefix as a string of 2, 4 or 6 hex digits, like "03" '
        '(display) or "0300" (VGA)'
    )
    if not isinstance(value, str):
        raise _InvalidValueError(f"{expected}, got {_type_name(value)}")
    m = _CLASS.fullmatch(value.strip().lower())
    if m is None:
        raise _InvalidValueError(f"{expected}, got {value!r}")
    return m[1]


def _iommu_group(value: object) -> str:
    expected = "expected an IOMMU group number, like 14"
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**32:
        return str(value)
    if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():
        return str(int(value.strip()))
    raise _InvalidValueError(f"{expected}, got {_type_name(value)}")


_DRIVER = re.compile(r"[A-Za-z0-9_.*?\[\]!-]+")


def _name_glob(value: object, what: str, pattern: re.Pattern[str], example: str) -> str:
    if not isinstance(value, str) or not value:
        raise _InvalidValueError(f"expected {what}, like {example}, got {_type_name(value)}")
    if not pattern.fullmatch(value):
        raise _InvalidValueError(f"expected {what}, like {example}, got {value!r}")
    problem = _glob_syntax(value)
    if problem is not None:
        raise _InvalidValueError(f"the glob {value!r} {problem}; expected {what}, like {example}")
    return value


def _driver(value: object) -> str:
    return _name_glob(
        value, 'a driver name or glob ("none" for no driver)', _DRIVER, '"nvidia" or "*_vfio_pci"'
    )


_UNIT = re.compile(r"[A-Za-z0-9:_.\\@*?\[\]!-]+")


def _unit(value: object) -> str:
    what = "a systemd unit name or glob ending in .service or .scope (or *)"
    unit = _name_glob(value, what, _UNIT, '"vm@*.service"')
    if not unit.endswith((".service", ".scope", "*")):
        raise _InvalidValueError(f'expected {what}, like "vm@*.service", got {unit!r}')
    return unit


def _slice(value: object) -> str:
    what = "a systemd slice name or glob ending in .slice (or *)"
    name = _name_glob(value, what, _UNIT, '"machine.slice"')
    if not name.endswith((".slice", "*")):
        raise _InvalidValueError(f'expected {what}, like "machine.slice", got {name!r}')
    return name


_ACCOUNT = re.compile(r"[A-Za-z0-9_.][A-Za-z0-9_.@$-]{0,255}")


def _account(value: object, what: str) -> str | int:
    """A user or group name, "*", or a numeric id."""
    if isinstance(value, int) and not isinstance(value, bool):
        if 0 <= value < 2**32 - 1:
            return value
        raise _InvalidValueError(
            f"expected a {what} name or a numeric id, got {value}, out of range"
        )
    if not isinstance(value, str):
        raise _InvalidValueError(
            f'expected a {what} name, a numeric id or "*", got {_type_name(value)}'
        )
    if value == WILDCARD:
        return value
    if is_glob(value):
        raise _InvalidValueError(
            f'{what} names are exact (or "*" for everyone), got the glob {value!r}; '
            "put the users in a group and name the group"
        )
    if not _ACCOUNT.fullmatch(value):
        raise _InvalidValueError(
            f"expected a {what} name (letters, digits, _ . @ $ -), got {value!r}"
        )
    return value


def _boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise _InvalidValueError(f"expected true or false, got {_type_name(value)}")
    return value


def _backends(value: object) -> tuple[str, ...]:
    expected = "expected " + " or ".join(f'"{b}"' for b in BACKENDS)
    items = _items(value, "a backend name")
    backends: list[str] = []
    for item in items:
        if item not in BACKENDS:
            raise _InvalidValueError(f"{expected} (or an array of them), got {_type_name(item)}")
        assert isinstance(item, str)
        if item in backends:
            raise _InvalidValueError(f"{item!r} is listed twice; list each backend once")
        backends.append(item)
    return tuple(backends)


def _count(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value < 2**31:
        return value
    raise _InvalidValueError(
        "expected a whole number of leases of at least 1 (leave the key out for no limit; "
        f'use effect = "deny" to refuse), got {_type_name(value)}'
    )


_SIZE = re.compile(r"([0-9]+)[ \t]*(?:([kmgtpe])(?:i?b?)|b)?", re.IGNORECASE)
_UNIT_POWERS = {"k": 1, "m": 2, "g": 3, "t": 4, "p": 5, "e": 6}
_MAX_SIZE = 2**63 - 1


def parse_size(value: object) -> int:
    """Bytes from "16G", "512M", "1T", "4096" or an integer; K, M, G, T, P, E
    are powers of 1024 (as in systemd's LimitMEMLOCK=)."""
    expected = (
        'expected a size like "16G" or "512M" (K, M, G, T: powers of 1024) or a number of '
        "bytes, at least 1"
    )
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    elif isinstance(value, str) and (m := _SIZE.fullmatch(value.strip())) is not None:
        size = int(m[1]) * 1024 ** _UNIT_POWERS.get((m[2] or "").lower(), 0)
    else:
        raise _InvalidValueError(f"{expected}, got {_type_name(value)}")
    if not 1 <= size <= _MAX_SIZE:
        raise _InvalidValueError(f"{expected}; {value!r} is out of range (1 byte to 8 EiB)")
    return size


def format_size(size: int) -> str:
    """A size as parse_size reads it: "1G" for 2**30, "1536M", "1000" bytes."""
    for unit, power in reversed(_UNIT_POWERS.items()):
        if size > 0 and size % 1024**power == 0:
            return f"{size // 1024**power}{unit.upper()}"
    return str(size)


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise _InvalidValueError(f"expected a string, got {_type_name(value)}")
    return value


_RULE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:@+-]{0,127}")


def _rule_name(value: object) -> str:
    expected = (
        'expected a name like "alice-gpu" (letters, digits and _ . : @ + -, at most 128, '
        "unique across all policy files)"
    )
    if not isinstance(value, str) or not _RULE_NAME.fullmatch(value):
        raise _InvalidValueError(f"{expected}, got {_type_name(value)}")
    return value


def _effect(value: object) -> Effect:
    if value not in ("allow", "deny"):
        raise _InvalidValueError(f'expected "allow" or "deny", got {_type_name(value)}')
    return Effect(value)


# ---------------------------------------------------------------------------
# Rules

DEVICE_KEYS = (
    "address",
    "vendor",
    "device",
    "subsystem-vendor",
    "subsystem-device",
    "class",
    "iommu-group",
    "driver",
)
CALLER_KEYS = ("users", "groups", "units", "slices")
GRANT_KEYS = (
    "managed",
    "companions",
    "unsafe-noiommu",
    "backends",
    "max-leases",
    "max-locked-memory",
    "restore-driver",
    "require-reset",
)
RULE_KEYS = ("name", "effect", "comment", *DEVICE_KEYS, *CALLER_KEYS, *GRANT_KEYS)


def _default_backend(value: object) -> str:
    if not isinstance(value, str) or value not in BACKENDS:
        raise _InvalidValueError(f'expected "legacy" or "iommufd", got {_type_name(value)}')
    return value


# vfiod.toml's keys: the Settings field each sets, and its parser.
_SETTINGS_PARSERS: dict[str, tuple[str, Callable[[object], Any]]] = {
    "allow-unsafe-noiommu": ("allow_unsafe_noiommu", _boolean),
    "default-backend": ("default_backend", _default_backend),
    "dma-limit": ("dma_limit", parse_size),
    "polkit": ("polkit", _boolean),
}
SETTINGS_KEYS = tuple(_SETTINGS_PARSERS)

_LIST_PARSERS: dict[str, tuple[str, Callable[[object], Any]]] = {
    "address": ("a PCI address or glob", _address),
    "vendor": ("a hex id", _hex_id),
    "device": ("a hex id", _hex_id),
    "subsystem-vendor": ("a hex id", _hex_id),
    "subsystem-device": ("a hex id", _hex_id),
    "class": ("a class prefix", _class_prefix),
    "iommu-group": ("an IOMMU group number", _iommu_group),
    "driver": ("a driver name", _driver),
    "users": ("a user", lambda v: _account(v, "user")),
    "groups": ("a group", lambda v: _account(v, "group")),
    "units": ("a unit", _unit),
    "slices": ("a slice", _slice),
}
_GRANT_PARSERS: dict[str, Callable[[object], Any]] = {
    "managed": _boolean,
    "companions": _boolean,
    "unsafe-noiommu": _boolean,
    "backends": _backends,
    "max-leases": _count,
    "max-locked-memory": parse_size,
    "restore-driver": _boolean,
    "require-reset": _boolean,
}

RESERVE_KEYS = ("name", "address", "comment")


def _exact_address(value: object) -> PciAddress:
    if not isinstance(value, str) or is_glob(value):
        raise _InvalidValueError(
            'a reservation names each device by its exact address, like "0000:01:00.0" '
            f"(no globs: a device that appears later must not be taken by surprise), got "
            f"{_type_name(value) if not isinstance(value, str) else repr(value)}"
        )
    try:
        return PciAddress.parse(value.strip().lower())
    except AddressError:
        raise _InvalidValueError(f"{_ADDRESS_EXAMPLE}, got {value!r}") from None


def _unknown_key(key: str, known: Sequence[str], where: str) -> str:
    close = difflib.get_close_matches(key.replace("_", "-").lower(), known, n=1)
    if close:
        return f"unknown key {key!r} in {where}; did you mean {close[0]!r}?"
    return f"unknown key {key!r} in {where}; expected one of: {', '.join(known)}"


@dataclasses.dataclass
class _Context:
    """What parsing collects across files."""

    settings: Settings
    user_exists: Callable[[str], bool]
    group_exists: Callable[[str], bool]
    errors: list[Problem] = dataclasses.field(default_factory=list)
    warnings: list[Problem] = dataclasses.field(default_factory=list)
    names: dict[str, str] = dataclasses.field(default_factory=dict)  # rule name -> source
    reserved: dict[PciAddress, str] = dataclasses.field(default_factory=dict)  # -> its source


class _RuleParser:
    """One [[rule]] table to a Rule, every problem recorded in the context."""

    TABLE = "rule"

    def __init__(
        self, table: Mapping[str, Any], index: int, path: str, lines: KeyLines, ctx: _Context
    ) -> None:
        self.table = table
        self.index = index
        self.path = path
        self.lines = lines
        self.ctx = ctx
        self.header = lines.line_of((self.TABLE, index))
        self.label = f"the [[rule]] at line {self.header}"

    def problem(self, key: str, message: str) -> Problem:
        return Problem(self.path, self.lines.line_of((self.TABLE, self.index, key)), key, message)

    def error(self, key: str, message: str) -> None:
        self.ctx.errors.append(self.problem(key, message))

    def value(self, key: str, parser: Callable[[object], Any]) -> Any:
        """The parsed value of ``key``, or None when it is absent or wrong."""
        if key not in self.table:
            return None
        try:
            return parser(self.table[key])
        except _InvalidValueError as e:
            self.error(key, str(e))
            return None

    def parse(self) -> Rule | None:
        errors_before = len(self.ctx.errors)
        name, effect, comment = self.identity()
        for key in self.table:
            if key not in RULE_KEYS:
                self.error(key, _unknown_key(key, RULE_KEYS, self.label))
        lists = self.selectors()
        grants = self.grants(effect)
        users, groups = lists.get("users", ()), lists.get("groups", ())
        self.warn_unknown_accounts("users", users, self.ctx.user_exists)
        self.warn_unknown_accounts("groups", groups, self.ctx.group_exists)
        if len(self.ctx.errors) > errors_before or name is None or effect is None:
            return None
        return Rule(
            name=name,
            effect=effect,
            source=f"{self.path}:{self.header}",
            addresses=lists.get("address", ()),
            vendors=lists.get("vendor", ()),
            devices=lists.get("device", ()),
            subsystem_vendors=lists.get("subsystem-vendor", ()),
            subsystem_devices=lists.get("subsystem-device", ()),
            classes=lists.get("class", ()),
            iommu_groups=lists.get("iommu-group", ()),
            drivers=lists.get("driver", ()),
            users=tuple(u for u in users if isinstance(u, str)),
            uids=tuple(u for u in users if isinstance(u, int)),
            groups=tuple(g for g in groups if isinstance(g, str)),
            gids=tuple(g for g in groups if isinstance(g, int)),
            units=lists.get("units", ()),
            slices=lists.get("slices", ()),
            grants=grants,
            comment=comment,
        )

    def named(self, kind: str) -> str | None:
        """The table's name (unique across rules and reservations of all
        files); the label of its messages becomes ``kind`` and the name."""
        name: str | None = self.value("name", _rule_name)
        if name is not None:
            self.label = f"{kind} {name!r}"
            other = self.ctx.names.setdefault(name, f"{self.path}:{self.header}")
            if other != f"{self.path}:{self.header}":
                self.error("name", f"the name {name!r} is already used at {other}; rename one")
        elif "name" not in self.table:
            self.error(
                "name",
                f'{self.label} has no name: add name = "..." (unique across all policy files)',
            )
        return name

    def identity(self) -> tuple[str | None, Effect | None, str | None]:
        name = self.named("rule")
        effect: Effect | None = self.value("effect", _effect)
        if "effect" not in self.table:
            self.error(
                "effect", f'{self.label} has no effect: add effect = "allow" or effect = "deny"'
            )
        return name, effect, self.value("comment", _text)

    def selectors(self) -> dict[str, tuple[Any, ...]]:
        lists: dict[str, tuple[Any, ...]] = {}
        for key, (what, parser) in _LIST_PARSERS.items():
            value = self.value(key, _each(parser, what))
            if value is not None:
                lists[key] = value
        if not any(key in self.table for key in DEVICE_KEYS):
            self.error(
                "address",
                f"{self.label} names no device: add address, vendor, device, subsystem-vendor, "
                "subsystem-device, class, iommu-group or driver "
                '(address = "*" for every device)',
            )
        if not any(key in self.table for key in CALLER_KEYS):
            self.error(
                "users",
                f"{self.label} names no caller: add users, groups, units or slices "
                '(users = ["*"] for everyone)',
            )
        return lists

    def grants(self, effect: Effect | None) -> Grants:
        values: dict[str, Any] = {}
        for key, parser in _GRANT_PARSERS.items():
            if key in self.table and effect is Effect.DENY:
                self.error(
                    key,
                    f"deny rules grant nothing: remove {key} from {self.label}, or make it "
                    'effect = "allow"',
                )
                continue
            value = self.value(key, parser)
            if value is not None:
                values[key.replace("-", "_")] = value
        if values.get("companions") and not values.get("managed"):
            self.error(
                "companions",
                f"companions = true in {self.label} lets vfiod rebind group companions, which "
                "needs managed = true too: add it, or remove companions",
            )
        if values.get("unsafe_noiommu") and not self.ctx.settings.allow_unsafe_noiommu:
            self.ctx.warnings.append(
                self.problem(
                    "unsafe-noiommu",
                    f"{self.label} grants unsafe-noiommu, which has no effect until "
                    "allow-unsafe-noiommu = true is set in /etc/vfiod/vfiod.toml",
                )
            )
        return Grants(**values)

    def warn_unknown_accounts(
        self, key: str, entries: tuple[str | int, ...], exists: Callable[[str], bool]
    ) -> None:
        for entry in entries:
            if isinstance(entry, str) and entry != WILDCARD and not exists(entry):
                self.ctx.warnings.append(
                    self.problem(
                        key,
                        f"{self.label} names the {key[:-1]} {entry!r}, which does not exist "
                        "(yet): the rule applies once it does (write a numeric id unquoted)",
                    )
                )


class _ReserveParser(_RuleParser):
    """One [[reserve]] table to a Reservation."""

    TABLE = "reserve"

    def parse_reservation(self) -> Reservation | None:
        errors_before = len(self.ctx.errors)
        self.label = f"the [[reserve]] at line {self.header}"
        name = self.named("reservation")
        for key in self.table:
            if key not in RESERVE_KEYS:
                self.error(key, _unknown_key(key, RESERVE_KEYS, self.label))
        addresses: tuple[PciAddress, ...] | None = self.value(
            "address", _each(_exact_address, "an exact PCI address")
        )
        if "address" not in self.table:
            self.error("address", f'{self.label} names no device: add address = "0000:01:00.0"')
        here = f"{self.path}:{self.header}"
        for address in addresses or ():
            other = self.ctx.reserved.setdefault(address, here)
            if other != here:
                self.error("address", f"{address} is reserved at {other} already; keep one")
        comment = self.value("comment", _text)
        if len(self.ctx.errors) > errors_before or name is None or not addresses:
            return None
        return Reservation(name, here, tuple(dict.fromkeys(addresses)), comment)


def _read_toml(source: Source, ctx: _Context) -> tuple[dict[str, Any], KeyLines] | None:
    try:
        text = source.data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = source.data[: e.start].count(b"\n") + 1
        ctx.errors.append(
            Problem(source.path, line, FILE_KEY, "is not UTF-8 text; save it as UTF-8")
        )
        return None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        ctx.errors.append(_syntax_problem(source.path, str(e), text))
        return None
    except RecursionError:
        # tomllib recurses per nesting level; say where the nesting runs away.
        line = KeyLines(text).too_deep or _last_line(text)
        ctx.errors.append(
            Problem(
                source.path,
                line,
                SYNTAX_KEY,
                f"arrays or inline tables nest too deeply (more than {MAX_NESTING} levels; a "
                "policy needs three at most): flatten them",
            )
        )
        return None
    return data, KeyLines(text)


def _last_line(text: str) -> int:
    """The number of the file's last line (a final newline ends it, starts none)."""
    return max(text.count("\n") + (not text.endswith("\n")), 1)


def _syntax_problem(path: str, message: str, text: str) -> Problem:
    """A tomllib error as a Problem at its line ("at end of document": the last line)."""
    m = _POSITION.search(message)
    if m is not None:
        line = int(m[1])
        message = f"{message[: m.start()]} (column {m[2]})"
    else:
        line = _last_line(text)
        message = message.removesuffix(_END_OF_DOCUMENT) + " (at the end of the file)"
    return Problem(
        path, line, SYNTAX_KEY, f"{message}; fix the TOML syntax (https://toml.io/en/v1.0.0)"
    )


def _parse_settings(source: Source, ctx: _Context) -> Settings:
    parsed = _read_toml(source, ctx)
    if parsed is None:
        return Settings()
    data, lines = parsed
    values: dict[str, Any] = {}
    for key, value in data.items():
        line = lines.line_of((key,))
        if key in _SETTINGS_PARSERS:
            field, parser = _SETTINGS_PARSERS[key]
            try:
                values[field] = parser(value)
            except _InvalidValueError as e:
                ctx.errors.append(Problem(source.path, line, key, str(e)))
        elif key in ("rule", "reserve"):
            ctx.errors.append(
                Problem(
                    source.path,
                    line,
                    key,
                    f"[[{key}]] tables go in policy.d/*.toml files, not in vfiod.toml",
                )
            )
        else:
            ctx.errors.append(
                Problem(source.path, line, key, _unknown_key(key, SETTINGS_KEYS, "vfiod.toml"))
            )
    return Settings(**values)


def _parse_rules(source: Source, ctx: _Context) -> tuple[list[Rule], list[Reservation]]:
    parsed = _read_toml(source, ctx)
    if parsed is None:
        return [], []
    data, lines = parsed
    rules: list[Rule] = []
    reservations: list[Reservation] = []
    for key, value in data.items():
        line = lines.line_of((key,))
        if key not in ("rule", "reserve"):
            hint = (
                "daemon settings go in /etc/vfiod/vfiod.toml"
                if key in SETTINGS_KEYS
                else "a policy file holds only [[rule]] and [[reserve]] tables"
            )
            ctx.errors.append(Problem(source.path, line, key, f"unknown key {key!r}: {hint}"))
            continue
        if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
            ctx.errors.append(
                Problem(
                    source.path,
                    line,
                    key,
                    f"expected [[{key}]] tables, got {_type_name(value)}; write each one "
                    f"under its own [[{key}]] header",
                )
            )
            continue
        for index, table in enumerate(value):
            if key == "rule":
                rule = _RuleParser(table, index, source.path, lines, ctx).parse()
                if rule is not None:
                    rules.append(rule)
            else:
                reservation = _ReserveParser(
                    table, index, source.path, lines, ctx
                ).parse_reservation()
                if reservation is not None:
                    reservations.append(reservation)
    return rules, reservations


def _in_order(problems: Sequence[Problem], files: Sequence[str]) -> list[Problem]:
    """Problems by file in the order files are read (directories first), then by line."""
    rank = {path: i for i, path in enumerate(files)}
    return sorted(problems, key=lambda p: (rank.get(p.file, -1), p.line))


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except (KeyError, ValueError):
        return False
    return True


def _group_exists(name: str) -> bool:
    try:
        grp.getgrnam(name)
    except (KeyError, ValueError):
        return False
    return True


def parse_policy(
    rule_files: Sequence[Source],
    settings: Source | None = None,
    *,
    user_exists: Callable[[str], bool] = _user_exists,
    group_exists: Callable[[str], bool] = _group_exists,
    problems: Sequence[Problem] = (),
    order: Sequence[str] = (),
) -> LoadResult:
    """The policy from file contents, in the order given. Raises PolicyError
    with every problem found, plus ``problems`` found while reading the files
    (sorted by the file order in ``order``, else that of the sources)."""
    ctx = _Context(Settings(), user_exists, group_exists, errors=list(problems))
    if settings is not None:
        ctx.settings = _parse_settings(settings, ctx)
    rules: list[Rule] = []
    reservations: list[Reservation] = []
    for source in rule_files:
        more_rules, more_reservations = _parse_rules(source, ctx)
        rules.extend(more_rules)
        reservations.extend(more_reservations)
    files = list(order) or [s.path for s in ([settings] if settings else []) + list(rule_files)]
    if ctx.errors:
        raise PolicyError(_in_order(ctx.errors, files), _in_order(ctx.warnings, files))
    policy = Policy(
        settings=ctx.settings,
        rules=tuple(rules),
        files=tuple(s.path for s in ([settings] if settings else []) + list(rule_files)),
        reservations=tuple(reservations),
    )
    return LoadResult(policy, tuple(_in_order(ctx.warnings, files)))


# ---------------------------------------------------------------------------
# Files


def _is_dev_null(status: os.stat_result) -> bool:
    """Is this /dev/null (a mask, as in systemd)?"""
    if not stat.S_ISCHR(status.st_mode):
        return False
    null = os.stat(os.devnull)
    return status.st_rdev == null.st_rdev


def _writers_besides_root(status: os.stat_result) -> str | None:
    """Who but root may change a file or directory with this status, in
    words; None when only root may."""
    writers = []
    if status.st_uid != 0:
        writers.append(f"its owner uid {status.st_uid}")
    if status.st_mode & stat.S_IWGRP and status.st_gid != 0:
        writers.append(f"group {status.st_gid}")
    if status.st_mode & stat.S_IWOTH:
        writers.append("everyone")
    return " and ".join(writers) or None


def _ownership(status: os.stat_result) -> str:
    return f"owner {status.st_uid}:{status.st_gid}, mode {stat.S_IMODE(status.st_mode):04o}"


class _RefusedFileError(Exception):
    """A policy file that must not be used; the message says why and what to do."""


def _trusted(path: str) -> Callable[[os.stat_result], None]:
    def check(status: os.stat_result) -> None:
        writers = _writers_besides_root(status)
        if writers is not None:
            raise _RefusedFileError(
                f"can be changed by {writers}, not only by root ({_ownership(status)}), so "
                f"vfiod does not trust it: `chown root:root {path} && chmod go-w {path}`"
            )

    return check


def _read_checked(path: str) -> Source | None:
    """A policy file's contents, None for a mask (/dev/null); raises
    _RefusedFileError or OSError. No device or FIFO is ever opened, and the
    file read is the one checked (vfiod.files)."""
    if _is_dev_null(os.stat(path)):
        return None
    try:
        return Source(path, read_regular(path, MAX_FILE_SIZE, trust=_trusted(path)))
    except NotRegularError as e:
        link = f" (a symlink to {os.readlink(path)})" if os.path.islink(path) else ""
        raise _RefusedFileError(
            f"is {e.kind}{link}, not a regular file: vfiod reads policy only from regular "
            "files; replace it with one, or remove it"
        ) from None
    except TooLargeError as e:
        raise _RefusedFileError(
            f"is {e.size} bytes, more than the {MAX_FILE_SIZE // 2**20} MiB a policy file may "
            "hold: split it into several files"
        ) from None


def _read(path: str, problems: list[Problem]) -> Source | None:
    """A policy file's contents; None when it is a mask or must not be used
    (then the reason is in ``problems``)."""
    try:
        return _read_checked(path)
    except _RefusedFileError as e:
        problems.append(Problem(path, 0, FILE_KEY, str(e)))
    except OSError as e:
        problems.append(
            Problem(
                path,
                0,
                FILE_KEY,
                f"cannot be read ({e.strerror}): make it a readable file, or remove it",
            )
        )
    return None


def untrusted_directories(root: str = "/") -> list[Problem]:
    """A problem for each directory of POLICY_TREE under ``root`` that
    anyone but root may change: its files could be replaced or masked."""
    problems = []
    for directory in POLICY_TREE:
        path = os.path.join(root, directory)
        try:
            status = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            continue  # not there: nothing is read from it
        except OSError as e:
            problems.append(
                Problem(
                    path, 0, FILE_KEY, f"cannot be examined ({e.strerror}): fix its permissions"
                )
            )
            continue
        writers = _writers_besides_root(status)
        if stat.S_ISDIR(status.st_mode) and writers is not None:
            problems.append(
                Problem(
                    path,
                    0,
                    FILE_KEY,
                    f"is a policy directory that {writers} can change, not only root "
                    f"({_ownership(status)}), so vfiod trusts no file in it: "
                    f"`chown root:root {path} && chmod go-w {path}`",
                )
            )
    return problems


def policy_paths(root: str = "/") -> tuple[list[str], list[Problem]]:
    """The rule files to read, in order: etc replaces usr/lib by file name."""
    chosen: dict[str, str] = {}
    problems: list[Problem] = []
    for directory in POLICY_DIRECTORIES:
        path = os.path.join(root, directory)
        try:
            names = os.listdir(path)
        except FileNotFoundError:
            continue
        except OSError as e:
            problems.append(
                Problem(
                    path,
                    0,
                    FILE_KEY,
                    f"cannot be listed ({e.strerror}): make it a directory root can read, "
                    "or remove it",
                )
            )
            continue
        for name in names:
            if name.endswith(".toml") and not name.startswith("."):
                chosen[name] = os.path.join(path, name)
    return [chosen[name] for name in sorted(chosen)], problems


def load_policy(
    root: str = "/",
    *,
    user_exists: Callable[[str], bool] = _user_exists,
    group_exists: Callable[[str], bool] = _group_exists,
) -> LoadResult:
    """Read and check every policy file under ``root``; raises PolicyError
    listing every problem in every file."""
    paths, listing_problems = policy_paths(root)
    problems = [*untrusted_directories(root), *listing_problems]
    settings_path = None
    for candidate in SETTINGS_PATHS:
        if os.path.lexists(os.path.join(root, candidate)):
            settings_path = os.path.join(root, candidate)
            break
    settings = None if settings_path is None else _read(settings_path, problems)
    sources = [source for path in paths if (source := _read(path, problems)) is not None]
    return parse_policy(
        sources,
        settings,
        user_exists=user_exists,
        group_exists=group_exists,
        problems=problems,
        order=[p for p in (settings_path, *paths) if p is not None],
    )


class PolicyHolder:
    """The policy in force. A broken file never leaves the daemon without a
    policy: the constructor starts with deny-all on errors (kept in
    ``error``), and a failed reload keeps the last good policy."""

    def __init__(
        self,
        root: str = "/",
        *,
        user_exists: Callable[[str], bool] = _user_exists,
        group_exists: Callable[[str], bool] = _group_exists,
    ) -> None:
        self.root = root
        self._user_exists = user_exists
        self._group_exists = group_exists
        self.current = Policy()
        self.warnings: tuple[Problem, ...] = ()
        self.error: PolicyError | None = None
        try:
            self.reload()
        except PolicyError:
            log.error("policy not loaded, denying every request until it is fixed: %s", self.error)
        except Exception as e:  # a bug must not stop the daemon from starting
            log.exception("policy not loaded, denying every request")
            self.error = PolicyError(
                [Problem(root, 0, FILE_KEY, f"could not be loaded ({e!r}); please report this")]
            )

    def reload(self) -> Policy:
        """Read the files again; on errors raise PolicyError and keep the current policy."""
        try:
            result = load_policy(
                self.root, user_exists=self._user_exists, group_exists=self._group_exists
            )
        except PolicyError as e:
            self.error = e
            self.warnings = e.warnings
            log.error("policy reload failed, the previous policy stays in force:\n%s", e)
            raise
        self.current = result.policy
        self.warnings = result.warnings
        self.error = None
        for warning in result.warnings:
            log.warning("%s", warning)
        return result.policy
