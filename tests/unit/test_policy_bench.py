"""bench/policy_eval.py, run small (full size: `python -m bench.policy_eval`)."""

from __future__ import annotations

from bench.policy_eval import CALLER, REQUEST, make_devices, make_rules, report, run
from vfiod.policy.decide import decide
from vfiod.policy.model import Policy


def test_the_benchmark_runs_small() -> None:
    figures = run(rules=300, devices=96, seed=1)
    assert (figures.rules, figures.devices) == (300, 96)
    assert 0 < figures.allowed < 96
    assert len(figures.cold.times) == len(figures.warm.times) == len(figures.baseline.times) == 96
    assert figures.warm.p50 > 0
    assert figures.baseline.p50 > 0
    text = report(figures)
    assert text.startswith("policy evaluation: 300 rules, 96 devices, one caller")
    assert "ratio to baseline: p50 " in text


def test_the_benchmark_decisions_match_the_full_trace() -> None:
    """The benchmark times the indexed path: it must decide as the full scan does."""
    devices = make_devices(64)
    policy = Policy(rules=make_rules(400, devices, seed=2))
    for device in devices:
        fast = decide(policy, CALLER, device, REQUEST)
        full = decide(policy, CALLER, device, REQUEST, explain=True)
        assert (fast.allowed, fast.rule, fast.refusal) == (full.allowed, full.rule, full.refusal)
