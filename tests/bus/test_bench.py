"""The broker benchmarks run, each at a tiny size: this checks that they work
and measure what they say, not their targets (timed tests flake; the targets
are for ``python -m bench.NAME``)."""

from __future__ import annotations

import pytest

from bench import concurrency, scale, slow_rebind, warm_acquire
from tests.bus import BusUnavailableError, require_tools


@pytest.fixture(autouse=True)
def _tools() -> None:
    """The benchmarks start their own private bus."""
    try:
        require_tools()
    except BusUnavailableError as e:
        pytest.skip(str(e))


def test_warm_acquire_runs() -> None:
    figures = warm_acquire.run(cycles=10, devices=4)
    assert len(figures.baseline) == len(figures.acquire) == len(figures.release) == 10
    assert figures.fds == ["container", "device", "device", "group"]
    assert all(0 < t < 5 for t in figures.baseline + figures.cycle)
    assert figures.ratio > 0
    assert figures.vfiod_cpu.service > 0
    assert "Acquire + Release" in warm_acquire.report(figures)


def test_warm_acquire_with_leases_held_runs() -> None:
    figures = warm_acquire.run(cycles=4, devices=4, held=3)
    assert figures.held == 3
    assert len(figures.held_cycle) == 4
    assert figures.held_ratio > 0
    assert "with 3 leases held" in warm_acquire.report(figures)


def test_scale_runs() -> None:
    figures = scale.run(devices=(16, 32), baseline_devices=2, calls=2, leases=(0, 3, 6), cycles=4)
    assert [h.devices for h in figures.hosts] == [2, 16, 32]
    for host in figures.hosts:
        assert host.groups == host.devices // 2
        assert host.objects == host.devices + host.groups
        assert 0 < host.built_s < host.start_s < 60
        assert host.logged_start_s is not None
        assert len(host.round_trips) == len(host.decodes) == len(host.inventories) == 2
        assert host.rss > 10_000_000
    assert [(s.leases, s.taken, len(s.cycle)) for s in figures.steps] == [
        (0, 0, 4),
        (3, 3, 4),
        (6, 3, 4),
    ]
    assert figures.steps[2].fds > figures.steps[0].fds, "the daemon holds the leases' fds"
    assert all(s.state_bytes > 0 for s in figures.steps[1:])
    text = scale.report(figures)
    assert "GetManagedObjects" in text
    assert "Client.inventory(), p50 of the rest" in text
    assert "start on a host (no fake host's build)" in text
    assert "growth per 1,000 devices" in text
    assert "leases held" in text


def test_concurrency_runs() -> None:
    figures = concurrency.run(clients=4, cycles=3, processes=2)
    for run in (figures.vfiod, figures.baseline):
        assert run.errors == []
        assert run.ops == 12
        assert run.seconds > 0
    assert figures.leaked == []
    assert figures.fds_before > 0
    assert "ops/s" in concurrency.report(figures)


def test_slow_rebind_runs() -> None:
    figures = slow_rebind.run(unbind=0.3, baseline_calls=5)
    assert figures.acquire >= 0.5  # two unbinds of 0.3 s
    for phase in (figures.baseline, figures.moving, figures.restoring):
        assert all(phase.latencies[call] for call in slow_rebind.CALLS)
    assert "longest wait of another caller" in slow_rebind.report(figures)
