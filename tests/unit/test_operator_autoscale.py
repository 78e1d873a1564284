"""Autoscaling decisions: HPA's rule with a tolerance band, bounds, scale-down hysteresis."""

from __future__ import annotations

from radixfleet.operator.autoscale import ScaleHistory, recommend, stabilize
from radixfleet.operator.spec import AutoscalingSpec

SPEC = AutoscalingSpec(min_replicas=1, max_replicas=8, target=4.0, scale_down_stabilization_seconds=300)


def test_recommendation_follows_load_within_bounds():
    assert recommend(2, 8.0, SPEC) == 4  # twice the target per replica
    assert recommend(2, 4.2, SPEC) == 2  # inside the 10% tolerance band
    assert recommend(4, 1.0, SPEC) == 1
    assert recommend(4, 100.0, SPEC) == 8  # max
    assert recommend(0, 3.0, SPEC) == 1  # from zero on any load


def test_scale_up_is_immediate_and_scale_down_waits_for_the_window():
    history = ScaleHistory()
    assert stabilize(history, current=2, recommendation=4, now=0, window=300) == 4
    # Load drops: a fresh lull does not scale down while a higher recommendation is recent.
    assert stabilize(history, current=4, recommendation=1, now=10, window=300) == 4
    assert stabilize(history, current=4, recommendation=1, now=200, window=300) == 4
    # After the window the high recommendations have aged out.
    assert stabilize(history, current=4, recommendation=1, now=400, window=300) == 1


def test_a_restarted_operator_does_not_scale_down_at_once():
    history = ScaleHistory()
    assert stabilize(history, current=3, recommendation=1, now=1000, window=300) == 3
