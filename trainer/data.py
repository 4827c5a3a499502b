"""Training data: parse JSONL (or in-memory dicts), clean, split, tokenise, batch.

Three row shapes are accepted, one per row:

- ``{"prompt": ..., "completion": ...}``: the prompt is context (masked out of the loss),
  the completion is learned, followed by the tokenizer's EOS so the model learns to stop;
- ``{"messages": [{"role": ..., "content": ...}, ...]}``: rendered with the tokenizer's
  chat template; assistant turns are learned, everything else is masked;
- ``{"text": ...}``: learned in full.

A row with nothing to learn (a prompt without its completion, an empty ``text``, an
empty assistant turn) is an error naming its line and field, unless ``drop_invalid`` is
set: then it (and any other invalid row) is dropped and counted with its reason. A job
needs at least :data:`MIN_TRAIN_EXAMPLES` training examples and, when ``eval_fraction``
is above 0, at least one eval example (set ``eval_fraction`` 0 to train without one).

The eval split is either held out of the training dataset (``eval_fraction``, shuffled
with ``seed``) or a separate eval dataset (:class:`TrainEval`), cleaned the same way,
whose rows identical to a training row are removed (leakage). :class:`DataStats` is the
report of all this plus the training set's balance (token lengths, and the most
frequent completions of a classification-like set): a job event and the job's
``DatasetReport``.

Parsing needs no torch (the worker validates a dataset up front, before a job starts);
only :func:`collate` imports it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label of tokens that do not count in the loss (torch CE default)
ROLES = ("system", "user", "assistant", "tool")
_SHAPE_FIELDS = ("prompt", "completion", "messages", "text")
MIN_TRAIN_EXAMPLES = 2  # one example is memorised, not learned; the loss means nothing
_DROPPED_SHOWN = 5  # reasons of dropped rows quoted in the summary
TOP_CLASSES = 10  # most frequent completions in the balance summary
_CLASS_CHARS = 80  # a class label is cut to this many characters
EVAL_LABEL = "eval dataset"  # how rows and errors of the eval dataset are named


class DatasetError(ValueError):
    """A malformed or unusable dataset; the message names the line (or example) and field."""

    def __init__(
        self,
        message: str,
        *,
        line: int | None = None,
        field: str | None = None,
        eval_dataset: bool = False,
    ):
        super().__init__(message)
        self.line = line
        self.field = field
        self.eval_dataset = eval_dataset  # about the separate eval dataset, not training's


class NothingToLearn(DatasetError):
    """A row of a known shape whose learned part is empty (dropped with drop_invalid)."""


@dataclass(frozen=True)
class JsonlText:
    """A whole JSONL dataset passed inline (CreateJobRequest.dataset_jsonl); errors name
    its line numbers like a file's."""

    text: str


RowSource = str | Path | JsonlText | Sequence[Mapping[str, Any]]


@dataclass(frozen=True)
class TrainEval:
    """A training dataset with a separate eval dataset: the eval split is ``eval`` (less
    its rows identical to a training row) and ``eval_fraction`` is not used."""

    train: RowSource
    eval: RowSource


DatasetSource = RowSource | TrainEval


@dataclass(frozen=True)
class Example:
    """One cleaned example. ``kind`` is "completion", "messages" or "text"."""

    kind: str
    prompt: str = ""
    completion: str = ""
    messages: tuple[tuple[str, str], ...] = ()  # (role, content)
    text: str = ""
    where: str = ""  # "line 3" / "example 3": where it came from, for error messages

    def key(self) -> str:
        """Identity used for de-duplication."""
        return json.dumps([self.kind, self.prompt, self.completion, self.messages, self.text])

    def learned_text(self) -> str:
        """The part of the example the model learns."""
        if self.kind == "completion":
            return self.completion
        if self.kind == "messages":
            return "".join(c for r, c in self.messages if r == "assistant")
        return self.text


@dataclass(frozen=True)
class LengthSummary:
    """min / median / p95 / max of per-example token counts (nearest-rank percentiles:
    every value is one of the counts)."""

    min: int = 0
    median: int = 0
    p95: int = 0
    max: int = 0

    @classmethod
    def of(cls, values: Sequence[int]) -> LengthSummary:
        if not values:
            return cls()
        ordered = sorted(values)
        n = len(ordered)
        return cls(
            ordered[0], ordered[(n - 1) // 2], ordered[max(0, math.ceil(0.95 * n) - 1)], ordered[-1]
        )

    def text(self) -> str:
        return f"min {self.min} / median {self.median} / p95 {self.p95} / max {self.max}"


@dataclass
class DataStats:
    """What cleaning did and the training set's balance, for the job's events and
    metadata (``DatasetReport``)."""

    rows: int = 0
    eval_rows: int = 0  # rows of the separate eval dataset (0: eval held out of training's)
    empty: int = 0  # nothing to learn, dropped (only with drop_invalid)
    invalid: int = 0  # other invalid rows, dropped (only with drop_invalid)
    too_short: int = 0
    duplicates: int = 0
    eval_leaked: int = 0  # eval rows identical to a training row, dropped from eval
    truncated: int = 0
    no_learned_tokens: int = 0
    train: int = 0
    eval: int = 0
    dropped_reasons: list[str] = field(default_factory=list)  # the first few, quoted
    # Balance of the training set (after cleaning, truncation and the split).
    learned_tokens: LengthSummary = field(default_factory=LengthSummary)
    total_tokens: LengthSummary = field(default_factory=LengthSummary)
    completion_examples: int = 0
    distinct_completions: int = 0
    # (completion, count), most frequent first; only when completions repeat.
    top_classes: list[tuple[str, int]] = field(default_factory=list)

    @property
    def dropped(self) -> int:
        return (
            self.empty
            + self.invalid
            + self.too_short
            + self.duplicates
            + self.eval_leaked
            + self.no_learned_tokens
        )

    def drop(self, counter: str, reason: str) -> None:
        """Counts one dropped row under ``counter`` and keeps the first few reasons."""
        setattr(self, counter, getattr(self, counter) + 1)
        if len(self.dropped_reasons) < _DROPPED_SHOWN:
            self.dropped_reasons.append(reason)

    def summary(self) -> str:
        """Rows kept, dropped and why: the job's dataset event."""
        rows = f"{self.rows} rows ("
        if self.eval_rows:
            rows = f"{self.rows + self.eval_rows} rows ({self.rows} training + "
            rows += f"{self.eval_rows} {EVAL_LABEL} rows; "
        leaked = (
            f"{self.eval_leaked} eval rows also in the training set (leakage), "
            if self.eval_rows
            else ""
        )
        text = (
            f"kept {self.train + self.eval} of {rows}{self.train} train, "
            f"{self.eval} eval); dropped {self.dropped}: {self.empty} with nothing to learn, "
            f"{self.invalid} invalid, {self.too_short} too short, {self.duplicates} duplicates, "
            f"{leaked}{self.no_learned_tokens} with nothing left to learn after truncation; "
            f"{self.truncated} truncated"
        )
        if self.dropped_reasons:
            quoted = self.empty + self.invalid + self.too_short + self.eval_leaked
            more = quoted - len(self.dropped_reasons)
            text += "; " + "; ".join(self.dropped_reasons)
            text += f"; and {more} more" if more > 0 else ""
        return text

    def balance_summary(self) -> str:
        """The training set's balance: the job's second dataset event."""
        text = (
            f"training set balance: learned tokens {self.learned_tokens.text()}; "
            f"total tokens {self.total_tokens.text()}"
        )
        if self.completion_examples:
            text += (
                f"; {self.distinct_completions} distinct completions in "
                f"{self.completion_examples} prompt/completion examples"
            )
        if self.top_classes:
            shown = ", ".join(
                f"{label!r} {count} ({count / self.completion_examples:.0%})"
                for label, count in self.top_classes
            )
            text += f"; top classes: {shown}"
        return text

    def measure_balance(self, train: Sequence[tuple[Example, TokenizedExample]]) -> None:
        """Fills the balance fields from the final training set (deterministic: ties
        between classes are broken by the completion's text)."""
        self.learned_tokens = LengthSummary.of([tok.learned_tokens for _, tok in train])
        self.total_tokens = LengthSummary.of([len(tok.input_ids) for _, tok in train])
        classes = Counter(ex.completion.strip() for ex, _ in train if ex.kind == "completion")
        self.completion_examples = sum(classes.values())
        self.distinct_completions = len(classes)
        self.top_classes = []
        if self.distinct_completions < self.completion_examples:
            ranked = sorted(classes.items(), key=lambda item: (-item[1], item[0]))
            self.top_classes = [(label[:_CLASS_CHARS], n) for label, n in ranked[:TOP_CLASSES]]

    def to_pb(self) -> Any:
        """The ``llmcluster.v1.DatasetReport`` of these statistics."""
        from common.pb import finetune_pb2

        def lengths(summary: LengthSummary) -> Any:
            return finetune_pb2.LengthSummary(
                min=summary.min, median=summary.median, p95=summary.p95, max=summary.max
            )

        return finetune_pb2.DatasetReport(
            rows=self.rows,
            eval_rows=self.eval_rows,
            train=self.train,
            eval=self.eval,
            empty=self.empty,
            invalid=self.invalid,
            too_short=self.too_short,
            duplicates=self.duplicates,
            eval_leaked=self.eval_leaked,
            no_learned_tokens=self.no_learned_tokens,
            truncated=self.truncated,
            dropped_reasons=self.dropped_reasons,
            learned_tokens=lengths(self.learned_tokens),
            total_tokens=lengths(self.total_tokens),
            completion_examples=self.completion_examples,
            distinct_completions=self.distinct_completions,
            top_classes=[
                finetune_pb2.ClassCount(
                    completion=label, count=n, share=n / self.completion_examples
                )
                for label, n in self.top_classes
            ],
        )


@dataclass
class TokenizedExample:
    """Token ids and labels (IGNORE_INDEX where masked) of equal length."""

    input_ids: list[int]
    labels: list[int]

    @property
    def learned_tokens(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


@dataclass
class PreparedData:
    """Tokenised train and eval splits plus cleaning statistics."""

    train: list[TokenizedExample]
    eval: list[TokenizedExample]
    stats: DataStats = field(default_factory=DataStats)

    def fingerprint(self) -> str:
        """sha256 of the tokenised splits: a resumed run refuses different data."""
        h = hashlib.sha256()
        for split in (self.train, self.eval):
            for ex in split:
                h.update(json.dumps([ex.input_ids, ex.labels]).encode())
            h.update(b"|")
        return h.hexdigest()


# ---------------------------------------------------------------- parsing


def _where(index: int, source: str) -> str:
    return f"{source} {index}"


def _string_field(row: Mapping[str, Any], name: str, where: str, index: int) -> str:
    value = row.get(name)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DatasetError(
            f"{where}: field '{name}' must be a string, got {type(value).__name__}",
            line=index,
            field=name,
        )
    return value


def _parse_messages(value: Any, where: str, index: int) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, list):
        raise DatasetError(
            f"{where}: field 'messages' must be a list of {{role, content}} objects, "
            f"got {type(value).__name__}",
            line=index,
            field="messages",
        )
    out = []
    for i, msg in enumerate(value):
        name = f"messages[{i}]"
        if not isinstance(msg, Mapping):
            raise DatasetError(
                f"{where}: field '{name}' must be an object with 'role' and 'content'",
                line=index,
                field=name,
            )
        role, content = msg.get("role"), msg.get("content")
        if role not in ROLES:
            raise DatasetError(
                f"{where}: field '{name}.role' must be one of {', '.join(ROLES)}, got {role!r}",
                line=index,
                field=f"{name}.role",
            )
        if not isinstance(content, str):
            raise DatasetError(
                f"{where}: field '{name}.content' must be a string, got {type(content).__name__}",
                line=index,
                field=f"{name}.content",
            )
        if role == "assistant" and not content.strip():
            raise NothingToLearn(
                f"{where}: field '{name}.content' is an empty assistant turn (nothing to learn)",
                line=index,
                field=f"{name}.content",
            )
        # Surrounding whitespace of a turn is noise: the chat template adds the separators.
        out.append((role, content.strip()))
    if out and not any(r == "assistant" for r, _ in out):
        raise DatasetError(
            f"{where}: field 'messages' has no assistant turn to learn",
            line=index,
            field="messages",
        )
    return tuple(out)


def parse_row(row: Any, index: int, source: str = "line") -> Example:
    """Validates one row; raises DatasetError naming the line and field (NothingToLearn
    for a row whose learned part is missing or empty).

    Empty strings and lists count as unset, so rows converted from protobuf (where every
    field is present) are read by the fields that carry something.
    """
    where = _where(index, source)
    if not isinstance(row, Mapping):
        raise DatasetError(
            f"{where}: expected a JSON object, got {type(row).__name__}", line=index, field=None
        )
    if not any(k in row for k in _SHAPE_FIELDS):
        raise DatasetError(
            f"{where}: needs 'prompt' and 'completion', 'messages', or 'text' "
            f"(found {', '.join(sorted(map(str, row))) or 'no fields'})",
            line=index,
            field=None,
        )
    # Whitespace: leading space of a prompt and trailing space of a completion are noise;
    # the prompt's trailing separator ("A:" vs "A:\n") and the completion's leading space
    # are what the model sees at inference, so they are kept.
    prompt = _string_field(row, "prompt", where, index).lstrip()
    completion = _string_field(row, "completion", where, index).rstrip()
    text = _string_field(row, "text", where, index).strip()
    raw_messages = row.get("messages")
    messages = () if raw_messages in (None, []) else _parse_messages(raw_messages, where, index)

    shapes = [
        name
        for name, present in (
            ("prompt/completion", bool(prompt.strip() or completion.strip())),
            ("messages", bool(messages)),
            ("text", bool(text)),
        )
        if present
    ]
    if len(shapes) > 1:
        raise DatasetError(
            f"{where}: fields of more than one shape are set ({' and '.join(shapes)}); "
            "use exactly one",
            line=index,
            field=shapes[1].split("/")[0],
        )
    if not shapes:
        empty = next((k for k in ("completion", "text", "messages") if k in row), "completion")
        raise NothingToLearn(
            f"{where}: field '{empty}' is empty (nothing to learn)", line=index, field=empty
        )
    if shapes[0] == "messages":
        return Example("messages", messages=messages, where=where)
    if shapes[0] == "text":
        return Example("text", text=text, where=where)
    if not completion.strip():
        state = "empty" if "completion" in row else "missing"
        raise NothingToLearn(
            f"{where}: field 'completion' is {state}: the prompt has nothing to learn",
            line=index,
            field="completion",
        )
    return Example("completion", prompt=prompt, completion=completion, where=where)


def _parse_lines(lines: Iterable[str]) -> list[tuple[int, Any]]:
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append((number, json.loads(line)))
        except json.JSONDecodeError as exc:
            raise DatasetError(
                f"line {number}: invalid JSON: {exc.msg} (column {exc.colno})",
                line=number,
                field=None,
            ) from None
    return rows


def read_jsonl(path: str | Path) -> list[tuple[int, Any]]:
    """(line number, parsed JSON) for each non-blank line; invalid JSON raises DatasetError."""
    with open(path, encoding="utf-8") as fh:
        return _parse_lines(fh)


def parse_jsonl_text(text: str) -> list[tuple[int, Any]]:
    """Like :func:`read_jsonl` for a dataset passed inline as a string."""
    return _parse_lines(text.splitlines())


def _read_rows(source: RowSource) -> tuple[list[tuple[int, Any]], str]:
    """The rows of a source and what its rows are called ("line" or "example")."""
    if isinstance(source, (str, Path)):
        return read_jsonl(source), "line"
    if isinstance(source, JsonlText):
        return parse_jsonl_text(source.text), "line"
    return list(enumerate(source, start=1)), "example"


def load_examples(
    source: RowSource,
    *,
    min_chars: int = 1,
    stats: DataStats | None = None,
    drop_invalid: bool = False,
    eval_dataset: bool = False,
) -> list[Example]:
    """Parses and cleans a dataset: a JSONL path, inline JSONL text, or a list of dicts
    (inline examples). Call it to validate a dataset before queueing a job.

    An invalid row raises DatasetError naming the line (JSONL) or the 1-based example
    index (lists) and the field, unless ``drop_invalid``: then it is dropped and counted.
    Cleaning drops rows whose learned part is shorter than ``min_chars`` characters and
    exact duplicates (the first copy is kept). Raises DatasetError if nothing is left.
    With ``eval_dataset`` (a separate eval dataset) rows and errors are named
    "eval dataset line N", errors carry ``eval_dataset``, and the rows count as
    ``stats.eval_rows``.
    """
    stats = stats if stats is not None else DataStats()
    try:
        rows, label = _read_rows(source)
    except DatasetError as exc:
        if not eval_dataset:
            raise
        raise DatasetError(
            f"{EVAL_LABEL} {exc}", line=exc.line, field=exc.field, eval_dataset=True
        ) from None
    if eval_dataset:
        label = f"{EVAL_LABEL} {label}"
        stats.eval_rows = len(rows)
    else:
        stats.rows = len(rows)
    seen: set[str] = set()
    examples: list[Example] = []
    for index, row in rows:
        try:
            example = parse_row(row, index, label)
        except DatasetError as exc:
            if not drop_invalid:
                exc.eval_dataset = eval_dataset
                raise
            stats.drop("empty" if isinstance(exc, NothingToLearn) else "invalid", str(exc))
            continue
        if len(example.learned_text().strip()) < min_chars:
            stats.drop("too_short", f"{example.where}: shorter than {min_chars} characters")
            continue
        key = example.key()
        if key in seen:
            stats.duplicates += 1
            continue
        seen.add(key)
        examples.append(example)
    if not examples:
        name = EVAL_LABEL if eval_dataset else "dataset"
        raise DatasetError(
            f"{name} is empty after cleaning: {stats.summary()}", eval_dataset=eval_dataset
        )
    return examples


def drop_leaked(
    train: Sequence[Example], evals: Sequence[Example], stats: DataStats
) -> list[Example]:
    """The eval examples that are not also training examples: a row in both would
    measure memorisation, not generalisation. Each one removed counts as ``eval_leaked``."""
    train_keys = {ex.key() for ex in train}
    kept = []
    for ex in evals:
        if ex.key() in train_keys:
            stats.drop("eval_leaked", f"{ex.where}: also in the training set (leakage)")
        else:
            kept.append(ex)
    return kept


def check_split_sizes(train: int, evals: int, eval_fraction: float, summary: str) -> None:
    """Refuses a job too small to mean anything, before it starts."""
    if train < MIN_TRAIN_EXAMPLES:
        raise DatasetError(
            f"{train} training example(s); at least {MIN_TRAIN_EXAMPLES} are needed ({summary})"
        )
    if eval_fraction > 0 and evals == 0:
        raise DatasetError(
            f"eval_fraction={eval_fraction} leaves no eval example ({summary}); add "
            "examples, or set eval_fraction 0 to train without evaluation"
        )


def split_examples(
    examples: Sequence[Example], eval_fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """Shuffles with ``seed`` and holds out ``eval_fraction`` (at least one example when the
    fraction is > 0 and two or more examples exist; the train split is never empty)."""
    order = list(examples)
    random.Random(seed).shuffle(order)
    n_eval = round(len(order) * eval_fraction)
    if eval_fraction > 0 and len(order) >= 2:
        n_eval = max(1, n_eval)
    n_eval = min(n_eval, len(order) - 1)
    return order[n_eval:], order[:n_eval]


# ---------------------------------------------------------------- tokenising


def _encode(tokenizer: Any, text: str, *, special: bool) -> list[int]:
    if not text:
        return []
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _render(tokenizer: Any, messages: Sequence[tuple[str, str]], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        [{"role": r, "content": c} for r, c in messages],
        tokenize=False,
        add_generation_prompt=generation_prompt,
    )


def _chat_segments(tokenizer: Any, example: Example) -> list[tuple[str, bool]]:
    """Splits the rendered conversation into (text, learned) segments.

    Each assistant turn is the difference between the conversation rendered up to it
    with the generation prompt and rendered including it — exactly the tokens the model
    produces when serving ``messages``. Templates whose renderings are not prefixes of
    each other cannot be split this way and are refused.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise DatasetError(
            f"{example.where}: field 'messages' needs a tokenizer with a chat template",
            field="messages",
        )
    msgs = example.messages
    segments: list[tuple[str, bool]] = []
    done = ""
    for i, (role, _) in enumerate(msgs):
        if role != "assistant":
            continue
        before = _render(tokenizer, msgs[:i], True)
        upto = _render(tokenizer, msgs[: i + 1], False)
        if not before.startswith(done) or not upto.startswith(before):
            raise DatasetError(
                f"{example.where}: the chat template does not render conversations "
                "incrementally, so assistant turns cannot be masked",
                field="messages",
            )
        segments.append((before[len(done) :], False))
        segments.append((upto[len(before) :], True))
        done = upto
    full = _render(tokenizer, msgs, False)
    if full.startswith(done) and len(full) > len(done):
        segments.append((full[len(done) :], False))
    return segments


def tokenize_example(tokenizer: Any, example: Example, max_seq_length: int) -> TokenizedExample:
    """Token ids and labels with everything but the learned part masked, truncated on the
    right to ``max_seq_length``.

    Prompt and completion are tokenised separately, as at inference time, where the
    prompt is encoded alone and the completion is generated token by token.
    """
    ids: list[int] = []
    labels: list[int] = []
    eos = tokenizer.eos_token_id
    if example.kind == "messages":
        # The template carries its own special tokens and end-of-turn markers.
        for text, learned in _chat_segments(tokenizer, example):
            seg = _encode(tokenizer, text, special=False)
            ids += seg
            labels += seg if learned else [IGNORE_INDEX] * len(seg)
    elif example.kind == "completion":
        prompt = _encode(tokenizer, example.prompt, special=True)
        completion = _encode(tokenizer, example.completion, special=not prompt)
        if eos is not None:
            completion.append(eos)
        ids = prompt + completion
        labels = [IGNORE_INDEX] * len(prompt) + completion
    else:
        seg = _encode(tokenizer, example.text, special=True)
        if eos is not None:
            seg.append(eos)
        ids, labels = seg, list(seg)
    return TokenizedExample(ids[:max_seq_length], labels[:max_seq_length])


def tokenize_examples(
    tokenizer: Any,
    examples: Iterable[Example],
    max_seq_length: int,
    stats: DataStats | None = None,
) -> list[TokenizedExample]:
    """Tokenises examples; drops those left with no learned token after truncation
    (a prompt longer than ``max_seq_length``)."""
    return [tok for _, tok in _tokenize_kept(tokenizer, examples, max_seq_length, stats)]


def _tokenize_kept(
    tokenizer: Any,
    examples: Iterable[Example],
    max_seq_length: int,
    stats: DataStats | None = None,
) -> list[tuple[Example, TokenizedExample]]:
    """:func:`tokenize_examples`, with each kept example beside its tokens."""
    stats = stats if stats is not None else DataStats()
    out = []
    for example in examples:
        full = tokenize_example(tokenizer, example, 1 << 30)
        if len(full.input_ids) > max_seq_length:
            stats.truncated += 1
        tok = TokenizedExample(full.input_ids[:max_seq_length], full.labels[:max_seq_length])
        # A label at position 0 predicts nothing (the loss is over shifted positions).
        if sum(1 for x in tok.labels[1:] if x != IGNORE_INDEX) == 0:
            stats.no_learned_tokens += 1
            continue
        out.append((example, tok))
    return out


def prepare_data(
    source: DatasetSource,
    tokenizer: Any,
    *,
    max_seq_length: int,
    eval_fraction: float,
    seed: int,
    min_chars: int = 1,
    drop_invalid: bool = False,
) -> PreparedData:
    """Load, clean, split with ``seed`` and tokenise: the whole data phase of a job.

    With a :class:`TrainEval` source the eval split is its eval dataset less the rows
    also in the training set, and ``eval_fraction`` is not used (the training examples
    are still shuffled with ``seed``). ``stats`` ends with the training set's balance.
    Raises DatasetError for an invalid row (unless ``drop_invalid``) and for splits too
    small to train or evaluate on (:func:`check_split_sizes`)."""
    stats = DataStats()
    train_source = source.train if isinstance(source, TrainEval) else source
    examples = load_examples(
        train_source, min_chars=min_chars, stats=stats, drop_invalid=drop_invalid
    )
    if isinstance(source, TrainEval):
        held_out = load_examples(
            source.eval,
            min_chars=min_chars,
            stats=stats,
            drop_invalid=drop_invalid,
            eval_dataset=True,
        )
        train_ex, _ = split_examples(examples, 0.0, seed)
        eval_ex = drop_leaked(train_ex, held_out, stats)
        if not eval_ex:
            raise DatasetError(
                f"every {EVAL_LABEL} row is also in the training set ({stats.summary()})",
                eval_dataset=True,
            )
    else:
        train_ex, eval_ex = split_examples(examples, eval_fraction, seed)
    train_kept = _tokenize_kept(tokenizer, train_ex, max_seq_length, stats)
    evals = tokenize_examples(tokenizer, eval_ex, max_seq_length, stats)
    if not train_kept:
        raise DatasetError(
            f"no training example has a learned token within max_seq_length={max_seq_length}"
        )
    stats.train, stats.eval = len(train_kept), len(evals)
    stats.measure_balance(train_kept)
    if isinstance(source, TrainEval) and not evals:
        raise DatasetError(
            f"no {EVAL_LABEL} example has a learned token within "
            f"max_seq_length={max_seq_length} ({stats.summary()})",
            eval_dataset=True,
        )
    check_split_sizes(
        stats.train,
        stats.eval,
        0.0 if isinstance(source, TrainEval) else eval_fraction,
        stats.summary(),
    )
    logger.info("prepared data: %s; %s", stats.summary(), stats.balance_summary())
    return PreparedData([tok for _, tok in train_kept], evals, stats)


def collate(batch: Sequence[TokenizedExample], pad_token_id: int) -> dict[str, Any]:
    """Right-pads a micro-batch: input_ids, attention_mask and labels (padding = ignored).

    Padding is recognised by the attention mask, never by token id: the pad token is
    often the EOS token, which the model must still learn at the end of a completion.
    """
    import torch

    width = max(len(ex.input_ids) for ex in batch)
    input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(batch), width), dtype=torch.long)
    for i, ex in enumerate(batch):
        n = len(ex.input_ids)
        input_ids[i, :n] = torch.tensor(ex.input_ids, dtype=torch.long)
        labels[i, :n] = torch.tensor(ex.labels, dtype=torch.long)
        attention[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
