"""Incremental detokenisation that never emits half a UTF-8 character, and stop strings
matched across token boundaries (held back until they can no longer start a stop)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

# Byte-level BPE decodes an incomplete UTF-8 sequence to U+FFFD; wait for more tokens.
_REPLACEMENT = "\ufffd"
# Decoding restarts this many tokens before the unread ones: merges and leading-space
# rules depend on the neighbouring tokens (the same trick as vLLM/TGI).
_CONTEXT_TOKENS = 5


def text_decoder(tokenizer: Any) -> Callable[[list[int]], str]:
    """``tokenizer.decode(ids, skip_special_tokens=True)``, straight through the Rust
    backend when that gives the same text (no clean-up pass configured): the engine
    decodes twice per generated token, and transformers' Python wrapper around the
    backend call costs several times the decode itself."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return lambda ids: str(backend.decode(ids, skip_special_tokens=True))
    return lambda ids: str(tokenizer.decode(ids, skip_special_tokens=True))


class IncrementalDetokenizer:
    """Turns a growing list of generated token ids into text deltas."""

    def __init__(self, tokenizer: Any, stop: tuple[str, ...] = ()) -> None:
        self._decode = text_decoder(tokenizer)
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self._stop = stop
        self._max_stop = max((len(s) for s in stop), default=0)
        self.text = ""  # all decoded text so far (stop string excluded once matched)
        self._emitted = 0  # characters of self.text already returned
        self.stopped = False

    def add_token(self, token_id: int) -> str:
        """Adds one token; returns the text that is now safe to emit (may be empty)."""
        if self.stopped:
            return ""
        self._ids.append(token_id)
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._decode(self._ids[self._prefix_offset :])
        if full.endswith(_REPLACEMENT) or len(full) <= len(prefix):
            return ""
        self.text += full[len(prefix) :]
        self._read_offset = len(self._ids)
        self._prefix_offset = max(0, self._read_offset - _CONTEXT_TOKENS)
        return self._release()

    def _release(self) -> str:
        if not self._stop:
            return self.flush()
        # Search only where a new match can start: a stop may straddle the old boundary.
        start = max(0, self._emitted - self._max_stop + 1)
        hits = [i for i in (self.text.find(s, start) for s in self._stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True
            return self.flush()
        hold = 0
        for s in self._stop:  # longest suffix of the text that begins some stop string
            for n in range(min(len(s) - 1, len(self.text)), 0, -1):
                if self.text.endswith(s[:n]):
                    hold = max(hold, n)
                    break
        end = max(self._emitted, len(self.text) - hold)
        out = self.text[self._emitted : end]
        self._emitted = end
        return out

    def flush(self) -> str:
        """Returns everything not yet emitted (at the end of the sequence)."""
        out = self.text[self._emitted :]
        self._emitted = len(self.text)
        return out
