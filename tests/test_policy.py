"""The balancing policy as a pure function of worker snapshots."""

from __future__ import annotations

from collections import Counter

import pytest

from common.errors import Unavailable
from router.policy import LeastOutstandingPolicy, WorkerState

MODEL = "SmolLM2-135M-Instruct"


def w(address: str, **kw) -> WorkerState:
    kw.setdefault("healthy", True)
    kw.setdefault("models", (MODEL,))
    return WorkerState(address=address, **kw)


def test_only_healthy_workers_serving_the_model():
    policy = LeastOutstandingPolicy(seed=0)
    workers = [
        w("a", healthy=False),
        w("b", models=("other",)),
        w("c", queued_tokens=10_000),
    ]
    for _ in range(20):
        assert policy.choose(MODEL, "", workers).address == "c"
    # Empty model means "the default": any healthy worker will do (least loaded: "b").
    assert {policy.choose("", "", workers).address for _ in range(20)} == {"b"}


def test_no_healthy_worker_is_unavailable_with_a_message():
    policy = LeastOutstandingPolicy(seed=0)
    with pytest.raises(Unavailable, match="no worker is configured"):
        policy.choose(MODEL, "", [])
    with pytest.raises(Unavailable, match="no healthy worker"):
        policy.choose(MODEL, "", [w("a", healthy=False)])
    with pytest.raises(Unavailable, match="'nope' is not served.*SmolLM2"):
        policy.choose("nope", "", [w("a")])


def test_adapter_loaded_is_preferred_over_less_load():
    policy = LeastOutstandingPolicy(seed=1)
    workers = [
        w("a"),
        w("b", loaded_adapters=frozenset({"tone@2"}), running_tokens=5_000),
        w("c", loaded_adapters=frozenset({"tone@1"}), running_tokens=9_000),
    ]
    for _ in range(20):
        assert policy.choose(MODEL, "tone@2", workers).address == "b"
        # A bare name / @latest matches any loaded version; least loaded of those wins.
        assert policy.choose(MODEL, "tone", workers).address == "b"
        assert policy.choose(MODEL, "tone@latest", workers).address == "b"
    # Nobody has it loaded: plain least-outstanding.
    assert policy.choose(MODEL, "other@1", workers).address == "a"


def test_least_outstanding_counts_load_and_router_accounting():
    policy = LeastOutstandingPolicy(seed=2)
    workers = [
        w("a", queued_tokens=100, running_tokens=100),
        w("b", queued_tokens=0, running_tokens=150, router_tokens=100),
        w("c", queued_tokens=50, running_tokens=50, router_tokens=10),
    ]
    for _ in range(20):
        assert policy.choose(MODEL, "", workers).address == "c"


def test_ties_are_broken_at_random_and_the_rng_is_seedable():
    workers = [w(x) for x in "abcd"]
    counts = Counter(
        LeastOutstandingPolicy(seed=s).choose(MODEL, "", workers).address for s in range(400)
    )
    assert set(counts) == set("abcd")
    assert min(counts.values()) > 50  # roughly uniform over 4
    policy_1, policy_2 = LeastOutstandingPolicy(seed=7), LeastOutstandingPolicy(seed=7)
    seq_1 = [policy_1.choose(MODEL, "", workers).address for _ in range(30)]
    seq_2 = [policy_2.choose(MODEL, "", workers).address for _ in range(30)]
    assert seq_1 == seq_2 and len(set(seq_1)) > 1


def test_power_of_two_within_tie_tolerance_prefers_less_work():
    # With a tolerance, "a" and "b" are tied; of the two drawn, the less loaded wins,
    # so "b" (more work) is never chosen when both are drawn: with two tied, always "a".
    policy = LeastOutstandingPolicy(seed=3, tie_tokens=100)
    workers = [w("a", running_tokens=10), w("b", running_tokens=60), w("c", running_tokens=500)]
    assert {policy.choose(MODEL, "", workers).address for _ in range(50)} == {"a"}
    # Equal work: fewer outstanding requests on the router wins.
    workers = [w("a", outstanding_requests=3), w("b", outstanding_requests=1)]
    assert {policy.choose(MODEL, "", workers).address for _ in range(50)} == {"b"}
