"""The fd store's names: short enough that systemd can still start vfiod
with a full store, and never two leases' at once."""

from __future__ import annotations

import configparser
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.unit.test_broker import ALICE, BOB, FakeFdStore, close_all, die, make_world, restarted
from vfiod.broker import LeaseState
from vfiod.store_names import (
    MAX_ARG_STRLEN,
    StoreNames,
    fdnames_bytes,
    store_index,
    store_name,
)

PROJECT = Path(__file__).resolve().parents[2]


def _store_max() -> int:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string((PROJECT / "systemd/vfiod.service.in").read_text())
    return int(unit["Service"]["FileDescriptorStoreMax"])


def test_names_and_indexes_are_one_to_one() -> None:
    names = [store_name(i) for i in range(64 + 64**2 + 500)]
    assert len(set(names)) == len(names)
    assert [store_index(n) for n in names] == list(range(len(names)))
    assert (names[0], names[63], names[64], names[64 + 64**2]) == ("0", "-", "00", "000")
    assert all(":" not in n and n.isprintable() and len(n) <= 3 for n in names)
    # An older vfiod's names (a lease's id) are no index: never given, never taken back.
    assert store_index("5f0c2a9e1b7d4c63") is None
    assert store_index("5f0c2a9e1b7d4c63.group.10") is None
    with pytest.raises(ValueError, match="no fd store name"):
        store_name(64 + 64**2 + 64**3)


def test_a_full_store_fits_in_what_execve_takes() -> None:
    """The unit's FileDescriptorStoreMax= of fds, one lease each (the
    longest names for the fds), as LISTEN_FDNAMES; a lease's 16-character
    id as the name would not fit a quarter of them."""
    fds = _store_max()
    names = StoreNames()
    full = [names.take() for _ in range(fds)]
    assert fdnames_bytes(full) <= MAX_ARG_STRLEN, (fds, fdnames_bytes(full))
    assert fdnames_bytes(["5f0c2a9e1b7d4c63"] * (fds // 4)) > MAX_ARG_STRLEN


def test_execve_takes_what_fdnames_bytes_allows_and_no_more() -> None:
    """The kernel's MAX_ARG_STRLEN, as fdnames_bytes counts it (with the NUL)."""
    longest = "x" * (MAX_ARG_STRLEN - len("LISTEN_FDNAMES=") - 1)
    assert fdnames_bytes([longest]) == MAX_ARG_STRLEN
    run = [sys.executable, "-c", "pass"]
    subprocess.run(run, env={"LISTEN_FDNAMES": longest}, check=True)
    with pytest.raises(OSError, match="Argument list too long"):
        subprocess.run(run, env={"LISTEN_FDNAMES": longest + "x"}, check=True)


def test_the_smallest_free_name_goes_first() -> None:
    names = StoreNames()
    assert [names.take() for _ in range(3)] == ["0", "1", "2"]
    names.give_back("1")
    names.give_back("5f0c2a9e1b7d4c63")  # an older vfiod's: nothing to give back
    assert [names.take(), names.take()] == ["1", "3"]
    # After a restart: the names the adopted records give are in use.
    again = StoreNames(["2", "0", "5f0c2a9e1b7d4c63"])
    assert [again.take(), again.take()] == ["1", "3"]


def test_a_draining_leases_name_is_not_given_to_the_next(tmp_path: Path) -> None:
    """A released lease whose client still holds a device fd drains; its
    record, naming its fds, stays until it is free, and so does its name:
    were the name given to the next lease, a restart would find that
    lease's fds under both records."""
    w = make_world(tmp_path)
    store = FakeFdStore()
    w.broker.fd_store = store
    try:
        first = w.acquire(ALICE)
        device_fd = first.fds.pop("device:0000:00:10.0")
        close_all(first.fds)
        w.broker.release(first.lease.id, ALICE)
        assert first.lease.state is LeaseState.DRAINING
        assert "0" not in store.fds, "its fds left the store"
        second = w.acquire(BOB, devices=("0000:02:01.0", "0000:02:02.0"))
        assert second.lease.stored == ("1",)
        close_all(second.fds)
        die(w.broker)  # a restart while the first still drains
        again = restarted(w, store)
        leases = {lease.id: lease for lease in again.recover(store.passed())}
        assert leases[first.lease.id].state is LeaseState.DRAINING
        assert leases[second.lease.id].state is LeaseState.ACTIVE
        assert again.store_names.take() == "2", "both names are still in use"
        os.close(device_fd)
        again.drain()
        assert first.lease.id not in again.leases
        assert again.store_names.take() == "0", "free again once its record is gone"
        again.release(second.lease.id, BOB)
        assert store.fds == {}
    finally:
        store.close()
