"""Feedback on finished requests, counted per adapter version (the A/B reading).

A server remembers the adapter version (``Usage.adapter``) of its latest finished
requests, by request id, in a bounded LRU; ``RecordFeedback(request_id, score)`` then
adds the score to ``llmcluster_feedback_score{adapter,version}`` (a Prometheus summary:
``_sum / _count`` is the mean score of a version). A request older than the last
``max_requests``, or answered by another router, is NOT_FOUND: the score would be
counted for a guess.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

from common.errors import NotFound
from common.model_store import parse_ref

MAX_REMEMBERED_REQUESTS = 100_000


class FeedbackBook:
    """Request id → the adapter version that served it, and the scores by version."""

    def __init__(self, metrics: Any = None, max_requests: int = MAX_REMEMBERED_REQUESTS) -> None:
        self.metrics = metrics  # a common.metrics._ServingMetrics (record_feedback)
        self.max_requests = max_requests
        self._served: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()  # the worker records from its engine's callbacks too

    def served(self, request_id: str, adapter_ref: str) -> None:
        """Remembers that ``request_id`` was served by ``adapter_ref`` ("" = base model)."""
        if not request_id:
            return
        with self._lock:
            self._served[request_id] = adapter_ref
            self._served.move_to_end(request_id)
            while len(self._served) > self.max_requests:
                self._served.popitem(last=False)

    def record(self, request_id: str, score: float) -> str:
        """Counts ``score`` for the version that served ``request_id``; returns that
        version's ref. NotFound for a request this server does not remember."""
        with self._lock:
            ref = self._served.get(request_id)
        if ref is None:
            raise NotFound(
                f"request {request_id!r} is not among the last {self.max_requests} requests "
                "this server finished; send feedback to the server that answered it"
            )
        name, version = ("", "")
        if ref:
            parsed_name, parsed_version = parse_ref(ref)
            name, version = parsed_name, str(parsed_version or "")
        if self.metrics is not None:
            self.metrics.record_feedback(name, version, score)
        return ref
