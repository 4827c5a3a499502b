"""The balancing policy as a pure function of worker snapshots."""

from __future__ import annotations

from collections import Counter

import pytest

from common.errors import Unavailable
from router.config import RouterConfig
from router.policy import PackPolicy, PowerOfTwoChoicesPolicy, WorkerState, make_policy

MODEL = "SmolLM2-135M-Instruct"


def w(address: str, **kw) -> WorkerState:
    kw.setdefault("healthy", True)
    kw.setdefault("models", (MODEL,))
    return WorkerState(address=address, **kw)


def test_only_healthy_workers_serving_the_model():
    policy = PowerOfTwoChoicesPolicy(seed=0)
    workers = [
        w("a", healthy=False),
        w("b", models=("other",)),
        w("c", queued_tokens=10_000),
    ]
    for _ in range(20):
        assert policy.choose(MODEL, "", workers).address == "c"
    # Empty model means "the default": any healthy worker will do; of the two healthy,
    # the less loaded ("b") always wins.
    assert {policy.choose("", "", workers).address for _ in range(20)} == {"b"}


def test_no_healthy_worker_is_unavailable_with_a_message():
    policy = PowerOfTwoChoicesPolicy(seed=0)
    with pytest.raises(Unavailable, match="no worker is configured"):
        policy.choose(MODEL, "", [])
    with pytest.raises(Unavailable, match="no healthy worker"):
        policy.choose(MODEL, "", [w("a", healthy=False)])
    with pytest.raises(Unavailable, match="'nope' is not served.*SmolLM2"):
        policy.choose("nope", "", [w("a")])


def test_adapter_loaded_is_preferred_over_less_load():
    policy = PowerOfTwoChoicesPolicy(seed=1)
    workers = [
        w("a"),
        w("b", loaded_adapters=frozenset({"tone@2"}), running_tokens=5_000),
        w("c", loaded_adapters=frozenset({"tone@1"}), running_tokens=9_000),
    ]
    for _ in range(20):
        assert policy.choose(MODEL, "tone@2", workers).address == "b"
        # A bare name / @latest matches any loaded version; less loaded of those wins.
        assert policy.choose(MODEL, "tone", workers).address == "b"
        assert policy.choose(MODEL, "tone@latest", workers).address == "b"
    # Nobody has it loaded: power of two over all three; the most loaded never wins.
    picks = Counter(policy.choose(MODEL, "other@1", workers).address for _ in range(300))
    assert set(picks) == {"a", "b"} and picks["a"] > picks["b"]


def test_outstanding_counts_load_and_router_accounting():
    """Two eligible workers: the pair is both, so it is exactly least-loaded."""
    policy = PowerOfTwoChoicesPolicy(seed=2)
    workers = [
        w("a", queued_tokens=100, running_tokens=100),
        w("b", queued_tokens=0, running_tokens=150, router_tokens=100),
        w("c", queued_tokens=50, running_tokens=50, router_tokens=10),
    ]
    for pair in (workers[:2], workers[1:], workers[::2]):
        expected = min(pair, key=lambda x: x.outstanding_tokens).address
        assert {policy.choose(MODEL, "", pair).address for _ in range(20)} == {expected}
    # Three: "c" (least) wins whenever drawn, "b" (most: 250 tokens) never.
    picks = Counter(policy.choose(MODEL, "", workers).address for _ in range(300))
    assert set(picks) == {"a", "c"} and picks["c"] > picks["a"]


def test_the_pair_is_random_and_the_rng_is_seedable():
    workers = [w(x) for x in "abcd"]
    counts = Counter(
        PowerOfTwoChoicesPolicy(seed=s).choose(MODEL, "", workers).address for s in range(400)
    )
    assert set(counts) == set("abcd")
    assert min(counts.values()) > 50  # roughly uniform over 4
    policy_1, policy_2 = PowerOfTwoChoicesPolicy(seed=7), PowerOfTwoChoicesPolicy(seed=7)
    seq_1 = [policy_1.choose(MODEL, "", workers).address for _ in range(30)]
    seq_2 = [policy_2.choose(MODEL, "", workers).address for _ in range(30)]
    assert seq_1 == seq_2 and len(set(seq_1)) > 1


def test_of_the_pair_fewer_outstanding_requests_breaks_equal_work():
    workers = [w("a", outstanding_requests=3), w("b", outstanding_requests=1)]
    policy = PowerOfTwoChoicesPolicy(seed=3)
    assert {policy.choose(MODEL, "", workers).address for _ in range(50)} == {"b"}


def _route_from_two_routers(
    policies: list[PowerOfTwoChoicesPolicy],
    base_tokens: list[int],
    requests_per_router: int,
    refresh_every: int,
) -> Counter[str]:
    """Two routers over the same workers' true state, each choosing from its own
    snapshot, refreshed (a Load report) only every ``refresh_every`` of its requests:
    between refreshes a router sees its own sends, not the other's. Each request is
    100 tokens of work. Returns requests per worker."""
    names = [chr(ord("a") + i) for i in range(len(base_tokens))]
    true_tokens = dict(zip(names, base_tokens, strict=True))
    snapshots = [dict(true_tokens) for _ in policies]
    picks: Counter[str] = Counter()
    for i in range(requests_per_router):
        if i % refresh_every == 0:  # both routers' Load reports arrive together
            for view in snapshots:
                view.update(true_tokens)
        for policy, view in zip(policies, snapshots, strict=True):
            states = [w(n, running_tokens=view[n]) for n in names]
            chosen = policy.choose(MODEL, "", states).address
            view[chosen] += 100  # the router's own accounting (router_tokens)
            true_tokens[chosen] += 100
            picks[chosen] += 1
    return picks


def test_two_routers_with_the_same_stale_view_spread_over_equally_loaded_workers():
    """Equal load on four workers, two routers whose views refresh every 8 requests:
    every worker gets a fair share, none is herded onto."""
    picks = _route_from_two_routers(
        [PowerOfTwoChoicesPolicy(seed=11), PowerOfTwoChoicesPolicy(seed=12)],
        base_tokens=[1000, 1000, 1000, 1000],
        requests_per_router=400,
        refresh_every=8,
    )
    total = sum(picks.values())
    assert set(picks) == set("abcd")
    for name, count in picks.items():
        assert 0.15 * total <= count <= 0.35 * total, (name, picks)


def test_two_routers_do_not_herd_onto_the_momentarily_least_loaded_worker():
    """Near-equal load (a few tokens apart), both routers holding the same snapshot:
    their picks do not all land on the one that looks least loaded (a least-loaded
    policy would send every one there), and the most loaded never wins."""
    policies = [PowerOfTwoChoicesPolicy(seed=21), PowerOfTwoChoicesPolicy(seed=22)]
    snapshot = [
        w(n, running_tokens=t) for n, t in zip("abcd", (1000, 1001, 1002, 1003), strict=True)
    ]
    picks = Counter(p.choose(MODEL, "", snapshot).address for _ in range(200) for p in policies)
    assert picks["a"] < 0.7 * sum(picks.values()), picks
    assert set(picks) == {"a", "b", "c"}, picks


def test_pack_fills_workers_in_order_then_takes_the_least_loaded():
    """``--balance pack`` (co-located workers): the first worker with a free running slot
    takes the request, counting the router's own requests and the reported ones; when
    every worker is full, the least loaded; unhealthy or adapter-less ones as usual."""
    policy = make_policy("pack")
    assert isinstance(policy, PackPolicy)
    assert policy.choose(MODEL, "", [w("a", max_running=4), w("b", max_running=4)]).address == "a"
    # Three of ours and one another router sent: full.
    full = w("a", max_running=4, outstanding_requests=3, reported_requests=4, running_tokens=900)
    assert policy.choose(MODEL, "", [full, w("b", max_running=4)]).address == "b"
    also_full = w("b", max_running=4, outstanding_requests=4, running_tokens=100)
    assert policy.choose(MODEL, "", [full, also_full]).address == "b"
    assert policy.choose(MODEL, "", [w("a", healthy=False), w("b", max_running=4)]).address == "b"
    # Capacity not known yet (no Info): not filled, just the least loaded.
    assert policy.choose(MODEL, "", [w("a", queued_tokens=5), w("b")]).address == "b"
    lora = w("b", max_running=4, loaded_adapters=frozenset({"bot@1"}))
    assert policy.choose(MODEL, "bot@1", [w("a", max_running=4), lora]).address == "b"
    with pytest.raises(Unavailable, match="no healthy worker"):
        policy.choose(MODEL, "", [w("a", healthy=False)])


def test_the_balance_flag_names_a_policy():
    assert isinstance(make_policy("spread", seed=1), PowerOfTwoChoicesPolicy)
    with pytest.raises(ValueError, match="balance must be one of"):
        make_policy("random")
    with pytest.raises(ValueError, match="balance must be one of"):
        RouterConfig(balance="nearest")
