"""Incremental detokenisation: never half a UTF-8 character; stop strings across tokens."""

from __future__ import annotations

import pytest

from worker.detokenizer import IncrementalDetokenizer

TEXTS = [
    "春天来了，花开了。🌸🌼 我们一起去公园吧！",
    "Emoji family: 👨‍👩‍👧‍👦 and flags 🇯🇵🇫🇷, done.",
    "def f(x):\n    return x ** 2  # 平方",
]


@pytest.fixture(scope="module")
def tokenizer(default_model):
    return default_model[1]


@pytest.mark.parametrize("text", TEXTS)
def test_chunks_are_whole_characters_and_add_up(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(tokenizer)
    chunks = [detok.add_token(i) for i in ids]
    chunks.append(detok.flush())
    assert all("\ufffd" not in c for c in chunks)
    assert "".join(chunks) == tokenizer.decode(ids, skip_special_tokens=True) == text
    # Multi-byte characters span several tokens here, so some calls emitted nothing.
    assert "" in chunks[:-1]


def test_stop_string_split_across_tokens_is_excluded(tokenizer):
    text = "The answer is forty-two. END OF ANSWER and more text"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(tokenizer, stop=("END OF ANSWER", "zzz"))
    out = []
    for i in ids:
        out.append(detok.add_token(i))
        if detok.stopped:
            break
    assert detok.stopped
    assert "".join(out) + detok.flush() == "The answer is forty-two. "
    # The partial "END" was held back, never emitted before the match was known.
    assert not any("END" in c for c in out)


def test_held_back_prefix_is_released_when_it_does_not_match(tokenizer):
    ids = tokenizer("a ENDLESS road", add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(tokenizer, stop=("END OF",))
    text = "".join(detok.add_token(i) for i in ids) + detok.flush()
    assert not detok.stopped
    assert text == "a ENDLESS road"


@pytest.mark.parametrize(
    ("text", "stop", "expected"),
    [
        (
            "The answer is forty-two. END OF ANSWER and more",
            "END OF ANSWER",
            "The answer is forty-two. ",
        ),
        ("xy ENDz and on", "ND", "xy E"),  # the stop starts inside a token
        ("春天来了🌸🌼 and so on", "🌼", "春天来了🌸"),  # and inside a multi-byte character
        ("abc😀def", "", "abc😀def"),
    ],
)
def test_token_texts_add_up_to_the_text_and_never_show_the_stop(tokenizer, text, stop, expected):
    """Each token's text is its share of the released text, released with it: per call
    they add up to the delta, and a matched stop string is in none of them."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(tokenizer, stop=(stop,) if stop else ())
    deltas, token_texts, added = [], [], 0
    for i in ids:
        added += 1
        deltas.append(detok.add_token(i))
        token_texts.append(detok.take_token_texts())
        if detok.stopped:
            break
    deltas.append(detok.flush())
    token_texts.append(detok.take_token_texts())
    assert deltas == ["".join(t) for t in token_texts]
    flat = [t for texts in token_texts for t in texts]
    assert "".join(deltas) == "".join(flat) == expected
    assert len(flat) == added  # one text per token, those spelling the stop included
    assert not stop or not any(stop in t for t in flat)
    assert "\ufffd" not in "".join(flat)
