"""Adaptive speculation: budgets follow measured acceptance and step cost."""

from __future__ import annotations

from streamgen.spec.config import SpeculationConfig
from streamgen.spec.policy import SpeculationPolicy

CONFIG = SpeculationConfig(max_nodes=8, max_depth=4, branching=2)


def measured(policy: SpeculationPolicy, c0: float, c1: float) -> SpeculationPolicy:
    """Feed exact step costs t = c0 + c1 * tokens over a range of batch sizes."""
    for tokens in (1, 4, 16, 64, 128, 8, 32):
        policy.observe_step(tokens, c0 + c1 * tokens)
    return policy


def test_high_acceptance_at_batch_one_gets_the_full_tree() -> None:
    policy = measured(SpeculationPolicy(CONFIG), c0=0.040, c1=0.0005)
    for _ in range(10):
        policy.observe_verify("a", depth=4, accepted=4)
    assert policy.acceptance_rate("a") > 0.9
    assert policy.budget("a", num_decoding=1) == (8, 4)


def test_low_acceptance_switches_speculation_off_then_probes() -> None:
    policy = measured(SpeculationPolicy(CONFIG, probe_interval=5), c0=0.040, c1=0.004)
    for _ in range(10):
        policy.observe_verify("a", depth=4, accepted=0)
    budgets = [policy.budget("a", num_decoding=8) for _ in range(5)]
    assert budgets[:4] == [(0, 0)] * 4
    assert budgets[4] == (1, 1)  # a probe, so the estimate can recover


def test_compute_bound_steps_raise_the_bar() -> None:
    # Same acceptance; a step whose cost grows with its tokens (large batch) pays
    # for fewer draft nodes than a launch-bound one.
    cheap = measured(SpeculationPolicy(CONFIG), c0=0.040, c1=0.0002)
    costly = measured(SpeculationPolicy(CONFIG), c0=0.005, c1=0.002)
    for policy in (cheap, costly):
        for _ in range(10):
            policy.observe_verify("a", depth=4, accepted=1)
    alpha = cheap.acceptance_rate("a")
    assert 0.4 < alpha < 0.6
    assert cheap.budget("a", num_decoding=1)[1] >= 2
    assert costly.budget("a", num_decoding=64) == (0, 0)


def test_drafting_time_counts_as_cost() -> None:
    fast_drafter = measured(SpeculationPolicy(CONFIG), c0=0.040, c1=0.0005)
    slow_drafter = measured(SpeculationPolicy(CONFIG), c0=0.040, c1=0.0005)
    slow_drafter.observe_draft(num_nodes=8, seconds=0.040)  # 5 ms per node
    for policy in (fast_drafter, slow_drafter):
        for _ in range(10):
            policy.observe_verify("a", depth=4, accepted=2)
    assert fast_drafter.budget("a", 8)[1] > slow_drafter.budget("a", 8)[1]


def test_non_adaptive_always_gives_the_configured_budget() -> None:
    policy = SpeculationPolicy(SpeculationConfig(max_nodes=5, max_depth=3, adaptive=False))
    for _ in range(10):
        policy.observe_verify("a", depth=3, accepted=0)
    assert policy.budget("a", num_decoding=64) == (5, 3)


def test_branches_are_paid_for_per_node() -> None:
    """A level of b branches costs b nodes but yields at most one accepted token: with
    the same acceptance and step cost, a tree gets fewer levels than a chain, and off
    when one level cannot pay for its branches (batch 25, compute-bound steps)."""
    chain = measured(SpeculationPolicy(SpeculationConfig(max_nodes=8, max_depth=8,
                                                         branching=1)), c0=0.08, c1=0.0047)
    tree = measured(SpeculationPolicy(SpeculationConfig(max_nodes=8, max_depth=8,
                                                        branching=2)), c0=0.08, c1=0.0047)
    for policy in (chain, tree):
        for _ in range(20):
            policy.observe_verify("a", depth=5, accepted=4)  # alpha ~0.8
    assert 0.75 < tree.acceptance_rate("a") < 0.85
    assert chain.budget("a", num_decoding=25)[1] >= 2
    assert tree.budget("a", num_decoding=25) == (0, 0)
    assert tree.budget("a", num_decoding=1)[1] >= 4  # at batch 1 the tree still pays
