"""The dataset report on real JSONL files and the default model's tokenizer: rows read,
kept and dropped by reason, a separate eval dataset with its leakage, errors that name
the eval dataset's line and field, and the training set's balance (token lengths, the
classes of a labelled set)."""

from __future__ import annotations

import pytest

from tests.trainer_fixtures import (  # noqa: F401  (fixtures)
    one_torch_thread_fixture,
    small_rows,
    tiny_model_fixture,
    tokenizer_fixture,
    write_jsonl,
)
from trainer.data import (
    DatasetError,
    LengthSummary,
    TrainEval,
    load_examples,
    prepare_data,
    tokenize_example,
)
from trainer.job_process import job_dataset


def test_length_summary_is_nearest_rank() -> None:
    assert LengthSummary.of([5, 1, 3, 2, 4]) == LengthSummary(1, 3, 5, 5)
    assert LengthSummary.of(list(range(100, 0, -1))) == LengthSummary(1, 50, 95, 100)
    assert LengthSummary.of([7]) == LengthSummary(7, 7, 7, 7)
    assert LengthSummary.of([]) == LengthSummary()


def test_report_counts_duplicates_empty_invalid_and_too_long_rows(tokenizer, tmp_path) -> None:
    path = write_jsonl(
        tmp_path / "train.jsonl",
        [
            {"prompt": "Q: a\nA:", "completion": " yes"},
            {"prompt": "Q: b\nA:", "completion": " no"},
            {"prompt": "Q: a\nA:", "completion": " yes"},  # duplicate of line 1
            {"prompt": "Q: c\nA:", "completion": ""},  # nothing to learn
            "",  # a blank line is not a row
            {"text": 3},  # invalid
            {"prompt": "very long prompt " * 20, "completion": " x"},  # no room to learn
            {"prompt": "Q: d\nA:", "completion": " word" * 30},  # truncated, kept
            {"prompt": "Q: e\nA:", "completion": " yes"},
        ],
    )
    with pytest.raises(DatasetError, match="^line 4: field 'completion' is empty"):
        prepare_data(path, tokenizer, max_seq_length=16, eval_fraction=0.0, seed=0)
    data = prepare_data(
        path, tokenizer, max_seq_length=16, eval_fraction=0.0, seed=0, drop_invalid=True
    )
    report = data.stats.to_pb()
    assert (report.rows, report.train, report.eval, report.eval_rows) == (8, 4, 0, 0)
    assert (report.empty, report.invalid, report.duplicates) == (1, 1, 1)
    assert (report.no_learned_tokens, report.truncated, report.too_short) == (1, 2, 0)
    assert report.dropped_reasons[0].startswith("line 4: field 'completion' is empty")
    assert report.dropped_reasons[1].startswith("line 6: field 'text' must be a string")
    summary = data.stats.summary()
    assert summary.startswith("kept 4 of 8 rows (4 train, 0 eval); dropped 4: ")
    # Lengths of the training set: the truncated row fills max_seq_length; the shortest
    # learned part is " no" and its EOS.
    no = len(tokenizer(" no", add_special_tokens=False)["input_ids"]) + 1
    assert report.total_tokens.max == 16
    assert report.learned_tokens.min == no
    assert report.learned_tokens.max > report.learned_tokens.median >= no
    # " yes" twice among 4 completions: a repeated completion makes a class table.
    assert report.completion_examples == 4 and report.distinct_completions == 3
    assert (report.top_classes[0].completion, report.top_classes[0].count) == ("yes", 2)
    assert report.top_classes[0].share == 0.5


def test_eval_dataset_replaces_the_fraction_and_loses_its_leaked_rows(tokenizer, tmp_path) -> None:
    rows = small_rows(6)
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    evals = write_jsonl(
        tmp_path / "eval.jsonl",
        [
            rows[2],  # also in the training set: leakage
            {"prompt": "Word: owl\nTag:", "completion": " <<OWL>>"},
            {"prompt": "Word: owl\nTag:", "completion": " <<OWL>>"},  # duplicate within eval
            {"prompt": "Word: elk\nTag:", "completion": " <<ELK>>"},
        ],
    )
    source = TrainEval(str(train), str(evals))
    data = prepare_data(source, tokenizer, max_seq_length=64, eval_fraction=0.5, seed=3)
    stats = data.stats
    # eval_fraction is not used: every training row trains, the eval dataset evaluates.
    assert (stats.rows, stats.eval_rows, stats.train, stats.eval) == (6, 4, 6, 2)
    assert (stats.eval_leaked, stats.duplicates) == (1, 1)
    assert stats.dropped_reasons == ["eval dataset line 1: also in the training set (leakage)"]
    assert (
        "kept 8 of 10 rows (6 training + 4 eval dataset rows; 6 train, 2 eval)" in stats.summary()
    )
    assert "1 eval rows also in the training set (leakage)" in stats.summary()
    assert stats.to_pb().eval_leaked == 1
    # The seed orders the training examples; the same seed the same data.
    again = prepare_data(source, tokenizer, max_seq_length=64, eval_fraction=0.5, seed=3)
    other = prepare_data(source, tokenizer, max_seq_length=64, eval_fraction=0.5, seed=4)
    assert again.fingerprint() == data.fingerprint() != other.fingerprint()

    # A job folder with eval.jsonl beside data.jsonl is read as the same pair.
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    (job_dir / "data.jsonl").write_text(train.read_text())
    assert job_dataset(job_dir) == str(job_dir / "data.jsonl")
    (job_dir / "eval.jsonl").write_text(evals.read_text())
    assert job_dataset(job_dir) == TrainEval(
        str(job_dir / "data.jsonl"), str(job_dir / "eval.jsonl")
    )

    # An eval dataset made only of training rows leaves nothing to evaluate.
    only_leaks = write_jsonl(tmp_path / "leaks.jsonl", rows[:2])
    with pytest.raises(DatasetError, match="every eval dataset row is also in the training set"):
        prepare_data(
            TrainEval(str(train), str(only_leaks)),
            tokenizer,
            max_seq_length=64,
            eval_fraction=0.0,
            seed=0,
        )


@pytest.mark.parametrize(
    ("eval_line", "message", "field"),
    [
        ('{"prompt": "x"}', "eval dataset line 2: field 'completion' is missing", "completion"),
        (
            '{"prompt": "x", "completion": 5}',
            "eval dataset line 2: field 'completion' must",
            "completion",
        ),
        ('{"prompt": "x", ', "eval dataset line 2: invalid JSON", None),
    ],
)
def test_bad_eval_dataset_names_itself_its_line_and_field(
    tokenizer, tmp_path, eval_line: str, message: str, field: str | None
) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", small_rows(4))
    evals = write_jsonl(
        tmp_path / "eval.jsonl",
        [{"prompt": "Word: owl\nTag:", "completion": " <<OWL>>"}, eval_line],
    )
    with pytest.raises(DatasetError) as info:
        prepare_data(
            TrainEval(str(train), str(evals)),
            tokenizer,
            max_seq_length=64,
            eval_fraction=0.1,
            seed=0,
        )
    assert str(info.value).startswith(message), str(info.value)
    assert info.value.eval_dataset and info.value.line == 2 and info.value.field == field
    # The training dataset's own errors do not claim to be the eval dataset's.
    bad_train = write_jsonl(tmp_path / "bad.jsonl", [*small_rows(3), eval_line])
    with pytest.raises(DatasetError) as info:
        prepare_data(bad_train, tokenizer, max_seq_length=64, eval_fraction=0.1, seed=0)
    assert str(info.value).startswith("line 4") and not info.value.eval_dataset


def test_class_summary_of_a_labelled_set(tokenizer, tmp_path) -> None:
    labels = [" positive"] * 5 + [" negative"] * 3 + [" neutral"] * 2
    path = write_jsonl(
        tmp_path / "sentiment.jsonl",
        [
            {"prompt": f"Review {i}: it was ok\nSentiment:", "completion": c}
            for i, c in enumerate(labels)
        ],
    )
    data = prepare_data(path, tokenizer, max_seq_length=64, eval_fraction=0.0, seed=0)
    report = data.stats.to_pb()
    assert report.completion_examples == 10 and report.distinct_completions == 3
    assert [(c.completion, c.count, c.share) for c in report.top_classes] == [
        ("positive", 5, 0.5),
        ("negative", 3, 0.3),
        ("neutral", 2, 0.2),
    ]
    balance = data.stats.balance_summary()
    assert "3 distinct completions in 10 prompt/completion examples" in balance
    assert "top classes: 'positive' 5 (50%), 'negative' 3 (30%), 'neutral' 2 (20%)" in balance
    one_token = len(tokenizer(" positive", add_special_tokens=False)["input_ids"]) + 1
    assert report.learned_tokens.max == one_token

    # Distinct completions everywhere (a generation set): a count, no class table.
    data = prepare_data(small_rows(12), tokenizer, max_seq_length=64, eval_fraction=0.0, seed=0)
    assert data.stats.distinct_completions == 12 and data.stats.top_classes == []
    assert "top classes" not in data.stats.balance_summary()

    # More than ten classes: the ten most frequent, ties broken by the label.
    many = [{"prompt": f"Item {i}\nLabel:", "completion": f" c{i % 12:02d}"} for i in range(30)]
    data = prepare_data(many, tokenizer, max_seq_length=64, eval_fraction=0.0, seed=0)
    assert data.stats.distinct_completions == 12
    assert [label for label, _ in data.stats.top_classes] == [f"c{i:02d}" for i in range(10)]
    assert [n for _, n in data.stats.top_classes] == [3] * 6 + [2] * 4


def test_training_run_reports_the_eval_dataset_and_balance(
    tiny_model, tokenizer, tmp_path, one_torch_thread
) -> None:
    from trainer import LogEvent, TrainConfig, train
    from trainer.events import EvalEvent

    rows = small_rows(8)
    train_path = write_jsonl(tmp_path / "train.jsonl", rows)
    eval_path = write_jsonl(
        tmp_path / "eval.jsonl", [rows[0], {"prompt": "Word: owl\nTag:", "completion": " <<OWL>>"}]
    )
    config = TrainConfig(method="lora", batch_size=4, max_seq_length=32, max_steps=1)
    events: list = []
    done = train(
        config,
        tiny_model,
        TrainEval(str(train_path), str(eval_path)),
        tmp_path / "job",
        on_event=events.append,
    )
    logs = [e.message for e in events if isinstance(e, LogEvent)]
    assert any(m.startswith("data: kept 9 of 10 rows (8 training + 2 eval") for m in logs), logs
    assert any(m.startswith("data: training set balance: learned tokens min") for m in logs)
    # The eval split is the one eval row left: its learned tokens are what is evaluated.
    (before,) = [e for e in events if isinstance(e, EvalEvent) and e.stage == "before"]
    owl = load_examples([{"prompt": "Word: owl\nTag:", "completion": " <<OWL>>"}])[0]
    assert before.eval_tokens == tokenize_example(tokenizer, owl, 32).learned_tokens
    data = done.metadata["data"]
    assert (data["train"], data["eval"], data["eval_leaked"], data["eval_rows"]) == (8, 1, 1, 2)
    assert data["learned_tokens"]["max"] >= data["learned_tokens"]["min"] > 0
