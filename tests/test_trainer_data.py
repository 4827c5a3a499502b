"""Trainer data: the three shapes, errors naming line and field, cleaning, split, masking."""

from __future__ import annotations

import pytest

from tests.trainer_fixtures import tokenizer_fixture, write_jsonl  # noqa: F401  (fixture)
from trainer.config import DEFAULT_LEARNING_RATES, TrainConfig
from trainer.data import (
    IGNORE_INDEX,
    DatasetError,
    DataStats,
    Example,
    JsonlText,
    collate,
    load_examples,
    parse_jsonl_text,
    prepare_data,
    split_examples,
    tokenize_example,
)


def learned_text(tok, ex) -> str:
    return tok.decode(
        [t for t, lab in zip(ex.input_ids, ex.labels, strict=True) if lab != IGNORE_INDEX]
    )


def masked_text(tok, ex) -> str:
    return tok.decode(
        [t for t, lab in zip(ex.input_ids, ex.labels, strict=True) if lab == IGNORE_INDEX]
    )


# ---------------------------------------------------------------- shapes and masking


def test_prompt_completion_masks_the_prompt_and_learns_eos(tokenizer, tmp_path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Q: 2+2?\nA:", "completion": " 4"}])
    (example,) = load_examples(path)
    tok = tokenize_example(tokenizer, example, 512)
    prompt_ids = tokenizer("Q: 2+2?\nA:", add_special_tokens=True)["input_ids"]
    # The prompt is encoded alone, exactly as the server encodes a prompt.
    assert tok.input_ids[: len(prompt_ids)] == prompt_ids
    assert tok.labels[: len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
    assert learned_text(tokenizer, tok) == " 4" + tokenizer.eos_token
    assert tok.labels[-1] == tokenizer.eos_token_id
    assert masked_text(tokenizer, tok) == "Q: 2+2?\nA:"


def test_messages_learn_assistant_turns_only(tokenizer) -> None:
    rows = [
        {
            "messages": [
                {"role": "system", "content": "Be terse."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": " Bye "},
                {"role": "assistant", "content": "Goodbye."},
            ]
        }
    ]
    (example,) = load_examples(rows)
    tok = tokenize_example(tokenizer, example, 512)
    full = tokenizer.apply_chat_template(
        [{"role": r, "content": c} for r, c in example.messages], tokenize=False
    )
    assert tokenizer.decode(tok.input_ids) == full  # the template, untouched
    assert learned_text(tokenizer, tok) == "Hello.<|im_end|>\nGoodbye.<|im_end|>\n"
    masked = masked_text(tokenizer, tok)
    assert "Be terse." in masked and "Hi" in masked and "Bye" in masked
    assert "Hello" not in masked and "Goodbye" not in masked
    # The generation prompt ("<|im_start|>assistant\n") is context, not learned.
    assert masked.endswith("<|im_start|>assistant\n")


def test_text_is_learned_in_full(tokenizer) -> None:
    (example,) = load_examples([{"text": "  The quick brown fox.  "}])
    assert example.text == "The quick brown fox."
    tok = tokenize_example(tokenizer, example, 512)
    assert tok.labels == tok.input_ids
    assert tokenizer.decode(tok.input_ids) == "The quick brown fox." + tokenizer.eos_token


def test_rows_converted_from_protobuf_read_the_set_fields(tokenizer) -> None:
    # Every field is present in a converted Example message; empty means unset.
    rows = [
        {"prompt": "a", "completion": " b", "messages": [], "text": ""},
        {"prompt": "", "completion": "", "messages": [], "text": "plain"},
        {
            "prompt": "",
            "completion": "",
            "text": "",
            "messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "v"}],
        },
    ]
    kinds = [e.kind for e in load_examples(rows)]
    assert kinds == ["completion", "text", "messages"]


def test_inline_jsonl_text() -> None:
    rows = parse_jsonl_text('{"text": "a"}\n\n{"text": "b"}\n')
    assert rows == [(1, {"text": "a"}), (3, {"text": "b"})]
    with pytest.raises(DatasetError, match="line 2: invalid JSON"):
        parse_jsonl_text('{"text": "a"}\n{"text": \n')
    assert [e.text for e in load_examples(JsonlText('{"text": "a"}\n{"text": "b"}'))] == ["a", "b"]
    with pytest.raises(DatasetError, match="^line 3: field 'text' must be a string"):
        load_examples(JsonlText('{"text": "a"}\n\n{"text": 1}'))


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("line", "field", "message"),
    [
        ('{"prompt": "p", "completion": 5}', "completion", "field 'completion' must be a string"),
        ('{"prompt": ["p"], "completion": "c"}', "prompt", "field 'prompt' must be a string"),
        ('{"text": null, "prompt": 1}', "prompt", "field 'prompt' must be a string"),
        ('{"messages": "hi"}', "messages", "field 'messages' must be a list"),
        ('{"messages": ["hi"]}', "messages[0]", "field 'messages[0]' must be an object"),
        (
            '{"messages": [{"role": "robot", "content": "x"}]}',
            "messages[0].role",
            "field 'messages[0].role' must be one of system, user, assistant",
        ),
        (
            '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant"}]}',
            "messages[1].content",
            "field 'messages[1].content' must be a string",
        ),
        (
            '{"messages": [{"role": "user", "content": "a"}]}',
            "messages",
            "no assistant turn",
        ),
        ('{"text": "t", "prompt": "p"}', "text", "more than one shape"),
        ('{"input": "x", "output": "y"}', None, "needs 'prompt' and 'completion'"),
        ('["not", "an", "object"]', None, "expected a JSON object"),
        ('{"text": "unterminated}', None, "invalid JSON"),
    ],
)
def test_errors_name_line_and_field(tmp_path, line: str, field: str | None, message: str) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", ['{"text": "fine"}', "", line])
    with pytest.raises(DatasetError) as info:
        load_examples(path)
    assert str(info.value).startswith("line 3: ")
    assert message in str(info.value)
    assert (info.value.line, info.value.field) == (3, field)
    assert isinstance(info.value, ValueError)  # servicers map it to INVALID_ARGUMENT


def test_inline_examples_errors_name_the_example() -> None:
    with pytest.raises(DatasetError, match="^example 2: field 'completion' must be a string"):
        load_examples([{"text": "ok"}, {"prompt": "p", "completion": 3}])


def test_empty_dataset_is_an_error(tmp_path) -> None:
    with pytest.raises(DatasetError, match="empty after cleaning"):
        load_examples(write_jsonl(tmp_path / "e.jsonl", []))
    rows = [{"text": "  "}, {"prompt": "p", "completion": " "}, {"messages": []}]
    with pytest.raises(DatasetError, match=r"empty after cleaning: kept 0 of 3 rows"):
        load_examples(rows, drop_invalid=True)


@pytest.mark.parametrize(
    ("line", "field", "message"),
    [
        ('{"prompt": "c"}', "completion", "field 'completion' is missing"),
        ('{"prompt": "c", "completion": "  "}', "completion", "field 'completion' is empty"),
        ('{"text": ""}', "text", "field 'text' is empty"),
        ('{"messages": []}', "messages", "field 'messages' is empty"),
        (
            '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}',
            "messages[1].content",
            "field 'messages[1].content' is an empty assistant turn",
        ),
    ],
)
def test_a_row_with_nothing_to_learn_names_its_line_and_field(
    tmp_path, line: str, field: str, message: str
) -> None:
    good = '{"prompt": "a", "completion": " b"}'
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join([good, "", line, good.replace("b", "c")]) + "\n")
    with pytest.raises(DatasetError) as info:
        load_examples(path)
    assert str(info.value).startswith(f"line 3: {message}")
    assert (info.value.line, info.value.field) == (3, field)

    stats = DataStats()
    kept = load_examples(path, stats=stats, drop_invalid=True)
    assert len(kept) == 2 and (stats.rows, stats.empty, stats.dropped) == (3, 1, 1)
    assert stats.dropped_reasons == [str(info.value)]


def test_drop_invalid_drops_and_counts_every_invalid_row_and_the_summary_says_why() -> None:
    rows = [
        {"prompt": "q1", "completion": " a1"},
        {"prompt": "q2"},  # nothing to learn
        {"prompt": "q3", "completion": 3},  # invalid type
        {"prompt": "q1", "completion": " a1"},  # duplicate
        {"prompt": "q4", "completion": " a4"},
    ]
    with pytest.raises(DatasetError, match="^example 2: field 'completion' is missing"):
        load_examples(rows)
    stats = DataStats()
    kept = load_examples(rows, stats=stats, drop_invalid=True)
    assert [e.prompt for e in kept] == ["q1", "q4"]
    assert (stats.empty, stats.invalid, stats.duplicates, stats.dropped) == (1, 1, 1, 3)
    stats.train, stats.eval = 2, 0
    summary = stats.summary()
    assert summary.startswith("kept 2 of 5 rows (2 train, 0 eval); dropped 3: ")
    assert "1 with nothing to learn, 1 invalid" in summary and "1 duplicates" in summary
    assert "example 2: field 'completion' is missing" in summary
    assert "example 3: field 'completion' must be a string" in summary


def test_too_small_a_job_is_refused_before_it_starts(tokenizer) -> None:
    one = [{"prompt": "a", "completion": " b"}]
    with pytest.raises(DatasetError, match=r"^1 training example\(s\); at least 2 are needed"):
        prepare_data(one, tokenizer, max_seq_length=32, eval_fraction=0.0, seed=0)
    two = one + [{"prompt": "c", "completion": " d"}]
    # Two rows and eval_fraction > 0: one would train, one evaluate; below the minimum.
    with pytest.raises(DatasetError, match="training example"):
        prepare_data(two, tokenizer, max_seq_length=32, eval_fraction=0.1, seed=0)
    three = two + [{"prompt": "e", "completion": " f"}]
    data = prepare_data(three, tokenizer, max_seq_length=32, eval_fraction=0.1, seed=0)
    assert (data.stats.train, data.stats.eval) == (2, 1)
    assert prepare_data(two, tokenizer, max_seq_length=32, eval_fraction=0.0, seed=0).eval == []
    # An eval example left with nothing to learn after truncation empties the eval split.
    long_prompt = [{"prompt": "word " * 40, "completion": " x"}]
    rows = three + long_prompt
    for seed in range(20):
        try:
            prepare_data(rows, tokenizer, max_seq_length=16, eval_fraction=0.2, seed=seed)
        except DatasetError as exc:
            assert "leaves no eval example" in str(exc)
            assert "set eval_fraction 0" in str(exc)
            break
    else:
        raise AssertionError("no seed put the long prompt in the eval split")


# ---------------------------------------------------------------- cleaning and split


def test_cleaning_strips_drops_empty_short_and_duplicates() -> None:
    rows = [
        {"prompt": "  Q1\n", "completion": " Ans  "},
        {"prompt": "Q1\n", "completion": " Ans"},  # duplicate once stripped
        {"prompt": "Q2", "completion": "   "},  # empty
        {"text": "ok"},  # too short with min_chars=3
        {"text": "long enough"},
        {"text": "  long enough "},  # duplicate
        {"text": "long enough."},
    ]
    stats = DataStats()
    examples = load_examples(rows, min_chars=3, stats=stats, drop_invalid=True)
    assert [(e.prompt, e.completion, e.text) for e in examples] == [
        ("Q1\n", " Ans", ""),  # the prompt keeps its trailing separator
        ("", "", "long enough"),
        ("", "", "long enough."),
    ]
    assert (stats.rows, stats.empty, stats.too_short, stats.duplicates) == (7, 1, 1, 2)


def test_split_is_seeded_and_sized() -> None:
    examples = [Example("text", text=f"row {i}") for i in range(50)]
    a = split_examples(examples, 0.2, seed=1)
    b = split_examples(examples, 0.2, seed=1)
    c = split_examples(examples, 0.2, seed=2)
    assert a == b
    assert a != c
    train, evals = a
    assert (len(train), len(evals)) == (40, 10)
    assert sorted(e.text for e in train + evals) == sorted(e.text for e in examples)
    # Tiny datasets: at least one eval example, never an empty train split.
    assert [len(s) for s in split_examples(examples[:3], 0.1, 0)] == [2, 1]
    assert [len(s) for s in split_examples(examples[:1], 0.5, 0)] == [1, 0]
    assert [len(s) for s in split_examples(examples, 0.0, 0)] == [50, 0]


def test_prepare_truncates_and_drops_rows_with_nothing_to_learn(tokenizer) -> None:
    rows = [
        {"prompt": "word " * 40, "completion": " tail"},  # prompt fills the window
        {"prompt": "short", "completion": " " + "x y " * 40},  # truncated completion
        {"text": "a b c d e f g h i j k l m n o p q r s t u v w x y z " * 3},
    ]
    data = prepare_data(rows, tokenizer, max_seq_length=16, eval_fraction=0.0, seed=0)
    assert data.stats.no_learned_tokens == 1
    assert data.stats.truncated == 3
    assert len(data.train) == 2
    assert all(len(ex.input_ids) == 16 == len(ex.labels) for ex in data.train)
    with pytest.raises(DatasetError, match="max_seq_length=4"):
        prepare_data(rows[:1], tokenizer, max_seq_length=4, eval_fraction=0.0, seed=0)


def test_prepare_split_and_fingerprint_are_deterministic(tokenizer) -> None:
    rows = [{"prompt": f"Q{i}:", "completion": f" A{i}"} for i in range(30)]
    a = prepare_data(rows, tokenizer, max_seq_length=64, eval_fraction=0.2, seed=7)
    b = prepare_data(rows, tokenizer, max_seq_length=64, eval_fraction=0.2, seed=7)
    c = prepare_data(rows, tokenizer, max_seq_length=64, eval_fraction=0.2, seed=8)
    assert (len(a.train), len(a.eval)) == (24, 6)
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()


def test_collate_pads_right_and_ignores_padding_not_eos(tokenizer) -> None:
    rows = [{"prompt": "Q:", "completion": " yes"}, {"prompt": "Question:", "completion": " no no"}]
    data = prepare_data(rows, tokenizer, max_seq_length=64, eval_fraction=0.0, seed=0)
    short, long = sorted(data.train, key=lambda e: len(e.input_ids))
    batch = collate([short, long], tokenizer.pad_token_id)
    width = len(long.input_ids)
    assert batch["input_ids"].shape == batch["labels"].shape == (2, width)
    n = len(short.input_ids)
    assert batch["attention_mask"][0].tolist() == [1] * n + [0] * (width - n)
    assert batch["labels"][0, n:].tolist() == [IGNORE_INDEX] * (width - n)
    # pad == eos for this tokenizer: the real EOS stays learned, padding does not.
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    assert batch["labels"][0, n - 1].item() == tokenizer.eos_token_id
    assert batch["labels"][1].tolist() == long.labels


# ---------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lora_r": 0}, "lora_r must be a positive integer, got 0"),
        ({"learning_rate": 0.0}, "learning_rate must be a finite number > 0, got 0.0"),
        ({"learning_rate": -1e-4}, "learning_rate must be a finite number > 0, got -0.0001"),
        (
            {"method": "qlora"},
            "method must be one of lora, full, prompt_tuning, bottleneck, got 'qlora'",
        ),
        ({"lr_scheduler": "step"}, "lr_scheduler must be one of"),
        ({"epochs": 0}, "epochs must be a positive integer"),
        ({"batch_size": -2}, "batch_size must be a positive integer, got -2"),
        ({"warmup_ratio": 1.0}, "warmup_ratio must be in [0, 1), got 1.0"),
        ({"eval_fraction": 0.7}, "eval_fraction must be in [0, 0.5], got 0.7"),
        ({"lora_dropout": 1.0}, "lora_dropout must be in [0, 1)"),
        ({"lora_alpha": 0}, "lora_alpha must be > 0"),
        ({"weight_decay": -0.1}, "weight_decay must be >= 0"),
        ({"max_steps": -1}, "max_steps must be an integer >= 0"),
        ({"lora_target_modules": ["q_proj", "../x"]}, "lora_target_modules must hold"),
    ],
)
def test_config_rejects_bad_values(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError) as info:
        TrainConfig(**kwargs)
    assert message in str(info.value)


def test_config_defaults_depend_on_method() -> None:
    for method, lr in DEFAULT_LEARNING_RATES.items():
        assert TrainConfig(method=method).learning_rate == lr
    assert TrainConfig(method="FULL", learning_rate=1e-3).learning_rate == 1e-3
    config = TrainConfig(method="lora", lora_r=8)
    assert TrainConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown hyperparameter.*lora_rank"):
        TrainConfig.from_dict({"lora_rank": 8})
