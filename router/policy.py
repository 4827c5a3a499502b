"""Balancing policy: which worker takes a request, as a pure function of worker snapshots.

Order of preference (ARCHITECTURE.md, "Data path"): only healthy workers that serve
the model; among them, those with the adapter already loaded; then the least
outstanding work; near-ties are broken by power-of-two random choices, which keeps
several routers with the same stale view from herding onto one worker
(Mitzenmacher, "The Power of Two Choices in Randomized Load Balancing").
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

    @property
    def outstanding_tokens(self) -> int:
        """Work waiting on this worker, in tokens."""
        return self.queued_tokens + self.running_tokens + self.router_tokens

    def serves(self, model: str) -> bool:
        """True if the worker serves ``model`` ("" = any worker's default)."""
        return not model or model in self.models

    def has_adapter(self, adapter: str) -> bool:
        """True if ``adapter`` (``name``, ``name@latest`` or ``name@version``) is loaded.

        A bare name or ``@latest`` matches any loaded version: a hint only, since the
        worker resolves "latest" against the store itself.
        """
        name, _, version = adapter.partition("@")
        if version and version != "latest":
            return adapter in self.loaded_adapters
        return any(a.partition("@")[0] == name for a in self.loaded_adapters)


class Policy:
    """Interface: picks the worker for a request; raises Unavailable when none fits."""

    def choose(self, model: str, adapter: str, workers: Sequence[WorkerState]) -> WorkerState:
        raise NotImplementedError


class LeastOutstandingPolicy(Policy):
    """Healthy + serves model → adapter loaded → least outstanding tokens → P2C on ties.

    ``tie_tokens``: workers whose outstanding work is within this many tokens of the
    least are considered tied; two of them are drawn at random and the one with less
    work (then fewer outstanding requests) wins.
    """

    def __init__(self, seed: int | None = None, tie_tokens: int = 0) -> None:
        self._rng = random.Random(seed)
        self.tie_tokens = tie_tokens

    def choose(self, model: str, adapter: str, workers: Sequence[WorkerState]) -> WorkerState:
        healthy = [w for w in workers if w.healthy]
        if not healthy:
            raise Unavailable(
                f"no healthy worker ({len(workers)} known)"
                if workers
                else "no worker is configured"
            )
        candidates = [w for w in healthy if w.serves(model)]
        if not candidates:
            served = sorted({m for w in healthy for m in w.models})
            raise Unavailable(
                f"model {model!r} is not served by any healthy worker (served: {served})"
            )
        if adapter:
            with_adapter = [w for w in candidates if w.has_adapter(adapter)]
            candidates = with_adapter or candidates
        least = min(w.outstanding_tokens for w in candidates)
        tied = [w for w in candidates if w.outstanding_tokens <= least + self.tie_tokens]
        if len(tied) == 1:
            return tied[0]
        a, b = self._rng.sample(tied, 2)
        return min((a, b), key=lambda w: (w.outstanding_tokens, w.outstanding_requests))
