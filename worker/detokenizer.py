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
    """Turns a growing list of generated token ids into text deltas, and gives each token
    its own share of that text: a token's text is what it adds to the decoded text (the
    token that completes a multi-byte character carries all of it, the one before it
    ""), released together with that text. So the tokens' texts always add up to the
    text, message by message, and a matched stop string is in neither: the token where it
    starts keeps only the text before it, the tokens that only spell it come with ""."""

    def __init__(self, tokenizer: Any, stop: tuple[str, ...] = ()) -> None:
        self._decode = text_decoder(tokenizer)
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self._stop = stop
        self._max_stop = max((len(s) for s in stop), default=0)
        self.text = ""  # all decoded text so far (stop string excluded once matched)
        self._emitted = 0  # characters of self.text already returned (a token boundary)
        self._ends: list[int] = []  # per token: len(self.text) once it was decoded
        self._released = 0  # tokens whose text was handed out
        self._token_texts: list[str] = []  # released, not yet taken by take_token_texts
        self.stopped = False

    def add_token(self, token_id: int) -> str:
        """Adds one token; returns the text that is now safe to emit (may be empty)."""
        if self.stopped:
            return ""
        self._ids.append(token_id)
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._decode(self._ids[self._prefix_offset :])
        if not full.endswith(_REPLACEMENT) and len(full) > len(prefix):
            self.text += full[len(prefix) :]
            self._read_offset = len(self._ids)
            self._prefix_offset = max(0, self._read_offset - _CONTEXT_TOKENS)
        self._ends.append(len(self.text))
        return self._release()

    def take_token_texts(self) -> list[str]:
        """The texts of the tokens released since the last call, oldest first (one per
        token, in the order they were added; they add up to the text returned since)."""
        texts, self._token_texts = self._token_texts, []
        return texts

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
        # Release whole tokens only: a token whose text runs into the held part waits.
        safe = len(self.text) - hold
        count = self._released
        while count < len(self._ends) and self._ends[count] <= safe:
            count += 1
        return self._release_tokens(count)

    def _release_tokens(self, count: int) -> str:
        """Hands out tokens up to ``count`` and their text, cut at the end of the text
        (a matched stop string was cut off it)."""
        end = len(self.text)
        begin = self._ends[self._released - 1] if self._released else 0
        for i in range(self._released, count):
            stop_at = min(self._ends[i], end)
            self._token_texts.append(self.text[begin:stop_at] if begin < stop_at else "")
            begin = max(begin, self._ends[i])
        self._released = max(self._released, count)
        release_to = min(self._ends[count - 1], end) if count else 0
        out = self.text[self._emitted : release_to] if release_to > self._emitted else ""
        self._emitted = max(self._emitted, release_to)
        return out

    def flush(self) -> str:
        """Returns everything not yet emitted (at the end of the sequence)."""
        return self._release_tokens(len(self._ends))
