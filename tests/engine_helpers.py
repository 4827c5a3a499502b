"""A collecting sink and small helpers for in-process engine tests."""

from __future__ import annotations

import threading
from collections import defaultdict

from worker.engine import SeqOutput


class CollectingSink:
    """Collects engine outputs per key; events fire on first tokens and on completion."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.tokens: dict[int, list[int]] = defaultdict(list)
        self.text: dict[int, str] = defaultdict(str)
        self.chunks: dict[int, list[str]] = defaultdict(list)
        self.token_texts: dict[int, list[str]] = defaultdict(list)  # each Token.text
        # Messages whose text is not the concatenation of their tokens' texts.
        self.misaligned: list[tuple[str, list[str]]] = []
        self.final: dict[int, SeqOutput] = {}
        self.steps: list[tuple[int, int]] = []  # (step, outputs in the call)
        self.token_events: dict[int, threading.Event] = defaultdict(threading.Event)
        self.done_events: dict[int, threading.Event] = defaultdict(threading.Event)
        self.min_tokens: dict[int, int] = {}

    def on_outputs(self, step: int, outputs: list[SeqOutput]) -> None:
        with self.lock:
            self.steps.append((step, len(outputs)))
            for out in outputs:
                self.tokens[out.key].extend(t.token_id for t in out.tokens)
                self.token_texts[out.key].extend(t.text for t in out.tokens)
                if out.text != "".join(t.text for t in out.tokens):
                    self.misaligned.append((out.text, [t.text for t in out.tokens]))
                self.text[out.key] += out.text
                if out.text:
                    self.chunks[out.key].append(out.text)
                if len(self.tokens[out.key]) >= self.min_tokens.get(out.key, 1):
                    self.token_events[out.key].set()
                if out.done:
                    self.final[out.key] = out
                    self.token_events[out.key].set()
                    self.done_events[out.key].set()

    def wait_done(self, keys: list[int], timeout_s: float = 300.0) -> None:
        for key in keys:
            assert self.done_events[key].wait(timeout_s), f"request {key} did not finish"
