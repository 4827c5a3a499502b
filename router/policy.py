"""Balancing policy: which worker takes a request, as a pure function of worker snapshots.

Order of preference (ARCHITECTURE.md, "Data path"): only healthy workers that serve
the model; among them, those with the adapter already loaded; then power-of-two
choices: two drawn at random, the one with less outstanding work wins, which keeps
several routers with the same stale view from herding onto one worker
(Mitzenmacher, "The Power of Two Choices in Randomized Load Balancing"). Workers that
share one machine's cores are instead filled in order (``--balance pack``, PackPolicy).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from common.errors import Unavailable


@dataclass(frozen=True)
class WorkerState:
    """A snapshot of one worker as the router sees it (built by the link)."""

    address: str
    worker_id: str = ""
    healthy: bool = False
    models: tuple[str, ...] = ()
    """Base models served; the first is the worker's default."""
    loaded_adapters: frozenset[str] = field(default_factory=frozenset)
    """Adapters in memory, ``name@version``."""
    queued_tokens: int = 0
    """From the last Load: tokens still to process by queued requests."""
    running_tokens: int = 0
    """From the last Load: tokens still to generate by running sequences."""
    router_tokens: int = 0
    """The router's own estimate of work it sent since that Load."""
    outstanding_requests: int = 0
    """Requests the router has on this worker now (tie-break only)."""
    reported_requests: int = 0
    """From the last Load: requests queued or running there (every router's)."""
    max_running: int = 0
    """Sequences the worker decodes together (its WorkerInfo; 0 = not known yet)."""

    @property
    def outstanding_tokens(self) -> int:
        """Work waiting on this worker, in tokens."""
        return self.queued_tokens + self.running_tokens + self.router_tokens

    def serves(self, model: str) -> bool:
        """True if the worker serves ``model`` ("" = any worker's default). A store
        artifact spec (``name@version`` / ``name@latest``, a full fine-tune) may be
        served by any worker: the worker checks it was trained on its base model (the
        router has no store to look the base up in)."""
        return not model or model in self.models or "@" in model

    def has_adapter(self, adapter: str) -> bool:
        """True if ``adapter`` (``name``, ``name@latest`` or ``name@version``) is loaded.

        A bare name or ``@latest`` matches any loaded version: a hint only, since the
        worker resolves "latest" against the store itself.
        """
        name, _, version = adapter.partition("@")
        if version and version != "latest":
            return adapter in self.loaded_adapters
        return any(a.partition("@")[0] == name for a in self.loaded_adapters)


def eligible(model: str, adapter: str, workers: Sequence[WorkerState]) -> list[WorkerState]:
    """Healthy workers that serve ``model``; those with ``adapter`` loaded if any has it.
    Raises Unavailable naming why none fits."""
    healthy = [w for w in workers if w.healthy]
    if not healthy:
        raise Unavailable(
            f"no healthy worker ({len(workers)} known)" if workers else "no worker is configured"
        )
    candidates = [w for w in healthy if w.serves(model)]
    if not candidates:
        served = sorted({m for w in healthy for m in w.models})
        raise Unavailable(f"model {model!r} is not served by any healthy worker (served: {served})")
    if "@" in model:  # a full fine-tune: prefer workers that have it loaded
        with_model = [w for w in candidates if w.has_adapter(model)]
        candidates = with_model or candidates
    if adapter:
        with_adapter = [w for w in candidates if w.has_adapter(adapter)]
        candidates = with_adapter or candidates
    return candidates


class Policy:
    """Interface: picks the worker for a request; raises Unavailable when none fits."""

    def choose(self, model: str, adapter: str, workers: Sequence[WorkerState]) -> WorkerState:
        raise NotImplementedError


class PowerOfTwoChoicesPolicy(Policy):
    """Healthy + serves model → adapter loaded → two drawn at random → less outstanding.

    Among the eligible workers two are drawn at random and the one with fewer outstanding
    tokens (then fewer outstanding requests) wins. A pure least-loaded pick sends every
    router holding the same stale view (Load reports arrive every few hundred ms) to the
    same worker; the random pair spreads them, while the most loaded worker still never
    wins (it loses any pair). With two eligible workers it is exactly least-loaded.
    """

    def __init__(self, seed: int | None = None) -> None:
        self._rng = random.Random(seed)

    def choose(self, model: str, adapter: str, workers: Sequence[WorkerState]) -> WorkerState:
        candidates = eligible(model, adapter, workers)
        if len(candidates) == 1:
            return candidates[0]
        pair = self._rng.sample(candidates, 2)  # random order: equal pairs split evenly
        return min(pair, key=lambda w: (w.outstanding_tokens, w.outstanding_requests))


class PackPolicy(Policy):
    """Fill the workers in their configured order: the first eligible one with a free
    running slot takes the request; when all are full, the least loaded.

    For workers that share one machine's cores (``llmcluster up --workers N``): spreading
    16 streams over two of them runs two half-full batches that each read every weight
    per step, on half the cores each; one full batch on all the cores finishes sooner
    (issue 14: 3.3-3.5 s against 3.9-5.3 s). The later workers take the overflow.
    """

    def choose(self, model: str, adapter: str, workers: Sequence[WorkerState]) -> WorkerState:
        candidates = eligible(model, adapter, workers)
        for w in candidates:
            # Our own requests count at once; the Load report adds other routers'.
            busy = max(w.outstanding_requests, w.reported_requests)
            if w.max_running and busy < w.max_running:
                return w
        return min(candidates, key=lambda w: (w.outstanding_tokens, w.outstanding_requests))


BALANCES = ("spread", "pack")
"""``--balance`` values: power-of-two choices, or filling workers in order."""


def make_policy(balance: str, seed: int | None = None) -> Policy:
    """The policy ``--balance`` names."""
    if balance == "pack":
        return PackPolicy()
    if balance == "spread":
        return PowerOfTwoChoicesPolicy(seed=seed)
    raise ValueError(f"balance must be one of {BALANCES}, got {balance!r}")
