"""Training mechanics on a tiny random Llama: methods, events, export, determinism,
checkpoint/resume equivalence, cancel, gradient accumulation, local runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from common.model_store import ModelStore
from tests.trainer_fixtures import (  # noqa: F401  (fixtures)
    one_torch_thread_fixture,
    small_rows,
    tiny_model_fixture,
    write_jsonl,
)
from trainer import (
    CheckpointEvent,
    DoneEvent,
    EvalEvent,
    LogEvent,
    MetricsEvent,
    PhaseEvent,
    TrainConfig,
    TrainingCancelled,
    latest_checkpoint,
    run_local,
    train,
)
from trainer.train import LORA_TARGETS, lr_factor

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FAST = {"batch_size": 4, "max_seq_length": 32, "eval_fraction": 0.2}


def run(config: TrainConfig, source, out: Path, rows=None, **kw):
    events: list = []
    done = train(config, source, rows or small_rows(), out, on_event=events.append, **kw)
    return done, events


def adapter_weights(done: DoneEvent) -> dict[str, torch.Tensor]:
    return load_file(str(Path(done.artifact_dir) / "adapter_model.safetensors"))


def losses(events) -> list[float]:
    return [e.loss for e in events if isinstance(e, MetricsEvent)]


def test_lora_run_reports_events_and_exports_peft(tiny_model, tmp_path: Path) -> None:
    config = TrainConfig(method="lora", epochs=2, learning_rate=5e-3, **FAST)
    done, events = run(config, tiny_model, tmp_path / "job")

    phases = [e.phase for e in events if isinstance(e, PhaseEvent)]
    assert phases == ["data", "load_model", "evaluate", "train", "evaluate", "export"]
    assert any(isinstance(e, LogEvent) and "19 train, 5 eval" in e.message for e in events)
    metrics = [e for e in events if isinstance(e, MetricsEvent)]
    assert [m.step for m in metrics] == list(range(1, 11))  # ceil(19/4)=5 steps x 2 epochs
    assert all(m.total_steps == 10 and m.tokens_per_second > 0 for m in metrics)
    assert metrics[4].epoch == pytest.approx(1.0) and metrics[-1].epoch == pytest.approx(2.0)
    # Warmup (ceil(0.05 * 10) = 1 step) reaches the peak, then linear decay.
    assert metrics[0].learning_rate == pytest.approx(5e-3)
    assert metrics[-1].learning_rate == pytest.approx(5e-3 / 9)
    evals = [e for e in events if isinstance(e, EvalEvent)]
    assert [(e.stage, e.step) for e in evals] == [("before", 0), ("after", 10)]
    assert evals[1].eval_loss < evals[0].eval_loss
    assert evals[0].perplexity == pytest.approx(torch.tensor(evals[0].eval_loss).exp().item())
    # One checkpoint at the end of epoch 1 (checkpoint_every_steps=0), none at the end.
    assert [e.step for e in events if isinstance(e, CheckpointEvent)] == [5]
    assert events[-1] is done

    artifact = Path(done.artifact_dir)
    assert artifact == tmp_path / "job" / "artifact"
    assert sorted(p.name for p in artifact.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    adapter_config = json.loads((artifact / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "LORA"
    assert adapter_config["base_model_name_or_path"] == "tiny-llama"
    assert set(adapter_config["target_modules"]) == set(LORA_TARGETS["llama"])
    assert adapter_config["r"] == 16 and adapter_config["lora_alpha"] == 32
    weights = adapter_weights(done)
    assert weights and all("lora_" in k for k in weights)
    assert done.metadata["base_model"] == "tiny-llama"
    assert done.metadata["metrics"]["eval_loss_after"] == evals[1].eval_loss
    assert done.metadata["hyperparameters"]["learning_rate"] == 5e-3


def test_exported_adapter_reproduces_the_trained_model(tiny_model, tmp_path: Path) -> None:
    """What the worker will do: load base + adapter with peft; same logits as training."""
    from peft import PeftModel

    from common.models import load_model

    config = TrainConfig(method="lora", epochs=1, learning_rate=1e-2, lora_dropout=0.0, **FAST)
    done, _ = run(config, tiny_model, tmp_path / "job")
    base, tok = load_model(tiny_model, dtype="float32", device="cpu")
    ids = tok("Word: cat 3\nTag:", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        before = base(ids).logits
        model = PeftModel.from_pretrained(base, done.artifact_dir)
        after = model(ids).logits
    assert not torch.allclose(before, after)  # the adapter changes the output
    # Loading twice gives the same weights: the artifact is complete.
    base2, _ = load_model(tiny_model, dtype="float32", device="cpu")
    with torch.no_grad():
        again = PeftModel.from_pretrained(base2, done.artifact_dir)(ids).logits
    torch.testing.assert_close(after, again)


def test_target_modules_override(tiny_model, tmp_path: Path) -> None:
    config = TrainConfig(method="lora", max_steps=1, lora_target_modules=["q_proj", "v_proj"])
    done, _ = run(config, tiny_model, tmp_path / "job")
    adapter_config = json.loads((Path(done.artifact_dir) / "adapter_config.json").read_text())
    assert set(adapter_config["target_modules"]) == {"q_proj", "v_proj"}
    with pytest.raises(ValueError, match="lora_target_modules"):
        run(TrainConfig(lora_target_modules=["nope_proj"]), tiny_model, tmp_path / "bad")


def test_full_fine_tune_exports_a_loadable_hf_folder(tiny_model, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = TrainConfig(method="full", epochs=2, learning_rate=1e-3, **FAST)
    done, events = run(config, tiny_model, tmp_path / "job")
    assert done.eval_after.eval_loss < done.eval_before.eval_loss
    artifact = Path(done.artifact_dir)
    names = {p.name for p in artifact.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pkl"))]
    trained = AutoModelForCausalLM.from_pretrained(str(artifact), dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tiny_model.path, dtype=torch.float32)
    AutoTokenizer.from_pretrained(str(artifact))
    changed = [
        n
        for (n, a), (_, b) in zip(trained.named_parameters(), base.named_parameters(), strict=True)
        if not torch.equal(a, b)
    ]
    assert len(changed) == len(list(base.parameters()))  # every weight trained


def test_prompt_tuning_exports_a_soft_prompt(tiny_model, tmp_path: Path) -> None:
    config = TrainConfig(method="prompt_tuning", epochs=2, num_virtual_tokens=5, **FAST)
    done, _ = run(config, tiny_model, tmp_path / "job")
    adapter_config = json.loads((Path(done.artifact_dir) / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "PROMPT_TUNING"
    assert adapter_config["num_virtual_tokens"] == 5
    (weights,) = adapter_weights(done).values()
    assert weights.shape == (5, 64)
    assert done.eval_after.eval_loss < done.eval_before.eval_loss


def test_same_seed_same_result_other_seed_differs(tiny_model, tmp_path: Path) -> None:
    config = TrainConfig(method="lora", epochs=2, learning_rate=5e-3, seed=3, **FAST)
    a, ev_a = run(config, tiny_model, tmp_path / "a")
    b, ev_b = run(config, tiny_model, tmp_path / "b")
    assert losses(ev_a) == losses(ev_b)
    assert a.eval_after == b.eval_after
    wa, wb = adapter_weights(a), adapter_weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)

    c, ev_c = run(TrainConfig(**{**config.to_dict(), "seed": 4}), tiny_model, tmp_path / "c")
    assert losses(ev_c) != losses(ev_a)
    assert any(not torch.equal(wa[k], adapter_weights(c)[k]) for k in wa)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_resume_from_checkpoint_matches_uninterrupted_run(
    tiny_model, tmp_path: Path, method: str
) -> None:
    # Dropout on: the resumed run only matches if the RNG state was restored too.
    config = TrainConfig(
        method=method,
        epochs=2,
        learning_rate=5e-3 if method == "lora" else 1e-3,
        lora_dropout=0.1,
        checkpoint_every_steps=3,
        lr_scheduler="cosine",
        warmup_ratio=0.2,
        weight_decay=0.01,
        **FAST,
    )
    full_run, full_events = run(config, tiny_model, tmp_path / "uninterrupted")

    # Cancel after step 4: the newest checkpoint is step 3.
    seen: list[int] = []

    def on_event(e) -> None:
        if isinstance(e, MetricsEvent):
            seen.append(e.step)

    with pytest.raises(TrainingCancelled) as info:
        train(
            config,
            tiny_model,
            small_rows(),
            tmp_path / "interrupted",
            on_event=on_event,
            should_cancel=lambda: len(seen) >= 4,
        )
    assert info.value.step == 4
    assert not (tmp_path / "interrupted" / "artifact").exists()
    checkpoint = latest_checkpoint(tmp_path / "interrupted")
    assert checkpoint is not None and checkpoint.name == "step-0000003"
    assert latest_checkpoint(tmp_path / "interrupted" / "checkpoints") == checkpoint
    # No pickle anywhere in a checkpoint.
    assert sorted(p.suffix for p in checkpoint.iterdir()) == [
        ".json",
        ".json",
        ".safetensors",
        ".safetensors",
        ".safetensors",
    ]

    resumed, resumed_events = run(
        config, tiny_model, tmp_path / "interrupted", resume_from=checkpoint
    )
    assert [e.step for e in resumed_events if isinstance(e, MetricsEvent)] == list(range(4, 11))
    assert any(isinstance(e, LogEvent) and "resumed" in e.message for e in resumed_events)
    assert losses(resumed_events) == pytest.approx(losses(full_events)[3:], rel=1e-5)
    assert resumed.eval_before == full_run.eval_before
    assert resumed.eval_after.eval_loss == pytest.approx(full_run.eval_after.eval_loss, rel=1e-5)
    if method == "lora":
        wa, wb = adapter_weights(full_run), adapter_weights(resumed)
    else:
        wa = load_file(str(Path(full_run.artifact_dir) / "model.safetensors"))
        wb = load_file(str(Path(resumed.artifact_dir) / "model.safetensors"))
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-5, atol=1e-6)


def test_resume_refuses_other_hyperparameters_or_data(tiny_model, tmp_path: Path) -> None:
    config = TrainConfig(method="lora", epochs=2, checkpoint_every_steps=2, **FAST)
    run(config, tiny_model, tmp_path / "job")
    checkpoint = latest_checkpoint(tmp_path / "job" / "checkpoints")
    assert checkpoint is not None
    other = TrainConfig(**{**config.to_dict(), "learning_rate": 1e-3})
    with pytest.raises(ValueError, match="different hyperparameters"):
        run(other, tiny_model, tmp_path / "job2", resume_from=checkpoint)
    with pytest.raises(ValueError, match="different dataset"):
        run(config, tiny_model, tmp_path / "job3", rows=small_rows(30), resume_from=checkpoint)


def test_cancel_before_first_step_writes_nothing(tiny_model, tmp_path: Path) -> None:
    events: list = []
    with pytest.raises(TrainingCancelled) as info:
        train(
            TrainConfig(**FAST),
            tiny_model,
            small_rows(),
            tmp_path / "job",
            on_event=events.append,
            should_cancel=lambda: True,
        )
    assert info.value.step == 0
    assert not [e for e in events if isinstance(e, MetricsEvent)]
    assert not (tmp_path / "job" / "artifact").exists()


def test_gradient_accumulation_equals_one_big_batch(tiny_model, tmp_path: Path) -> None:
    """Loss is normalised by the step's tokens, so 2 x 4 accumulated == 1 x 8."""
    common = {"method": "lora", "max_steps": 2, "lora_dropout": 0.0, "learning_rate": 1e-2}
    big, ev_big = run(TrainConfig(batch_size=8, **common), tiny_model, tmp_path / "big")
    acc, ev_acc = run(
        TrainConfig(batch_size=4, gradient_accumulation_steps=2, **common),
        tiny_model,
        tmp_path / "acc",
    )
    assert losses(ev_acc) == pytest.approx(losses(ev_big), rel=1e-5)
    wa, wb = adapter_weights(big), adapter_weights(acc)
    # Adam divides by sqrt(v): where a gradient is ~0 the summation order of the two runs
    # flips the update's sign (1.4e-5 seen on one of 2048 weights). A wrong batch split
    # moves weights by about the learning rate (1e-2), far above this tolerance.
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-3, atol=1e-4)


def test_max_steps_and_no_eval_split(tiny_model, tmp_path: Path) -> None:
    config = TrainConfig(max_steps=2, eval_fraction=0.0, batch_size=4)
    done, events = run(config, tiny_model, tmp_path / "job")
    assert done.steps == 2 and done.eval_before is None and done.eval_after is None
    assert not [e for e in events if isinstance(e, EvalEvent)]


def test_loss_skipping_prompt_logits_is_exact(tiny_model, monkeypatch) -> None:
    """The loss computes logits only from the batch's first label on; it must equal the
    loss over full logits, for plain models and for prompt tuning's shifted positions."""
    import sys

    from common.models import load_model
    from trainer import prepare_data
    from trainer.data import collate

    train_module = sys.modules["trainer.train"]
    for method in ("lora", "prompt_tuning"):
        model, tok = load_model(tiny_model, dtype="float32", device="cpu")
        model = train_module._apply_method(model, TrainConfig(method=method))
        model.eval()
        data = prepare_data(small_rows(), tok, max_seq_length=64, eval_fraction=0, seed=0)
        batch = collate(data.train[:5], tok.pad_token_id)
        assert batch["labels"][:, :4].eq(-100).all()  # there is a prompt to skip
        with torch.no_grad():
            fast = train_module._token_loss_sum(model, batch)
            monkeypatch.setattr(train_module, "_accepts_logits_to_keep", lambda m: False)
            full = train_module._token_loss_sum(model, batch)
            monkeypatch.undo()
        assert fast[1] == full[1] > 0
        torch.testing.assert_close(fast[0], full[0], rtol=1e-5, atol=1e-4)


def test_lr_schedules() -> None:
    # 10 steps, 2 warmup: 1/2, 1, then decay over the 8 remaining steps.
    assert [lr_factor(s, 10, 2, "constant") for s in range(4)] == [0.5, 1.0, 1.0, 1.0]
    assert [lr_factor(s, 10, 2, "linear") for s in (2, 6, 9)] == [1.0, 0.5, 0.125]
    assert lr_factor(6, 10, 2, "cosine") == pytest.approx(0.5)
    assert lr_factor(2, 10, 0, "cosine") == pytest.approx(
        0.5 * (1 + torch.cos(torch.tensor(0.2 * torch.pi)).item())
    )


def test_run_local_publishes_to_the_store(tiny_model, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "train.jsonl", small_rows())
    result = run_local(
        data,
        name="tags",
        config=TrainConfig(max_steps=2, **FAST),
        base_model=tiny_model.path,
        work_dir=tmp_path / "work",
        store_root=tmp_path / "store",
        metadata={"trace_id": "00" * 16},
    )
    assert result.artifact_ref == "tags@1"
    store = ModelStore(tmp_path / "store")
    ref = store.verify("tags@latest")
    assert ref.sha256 == result.sha256
    assert ref.metadata["method"] == "lora"
    assert ref.metadata["base_model"] == Path(tiny_model.path).name
    assert ref.metadata["trace_id"] == "00" * 16
    assert ref.metadata["metrics"]["steps"] == 2
    assert (ref.path / "adapter_model.safetensors").is_file()
    # A bad name fails before any training.
    with pytest.raises(ValueError, match="slashes"):
        run_local(data, name="../x", base_model=tiny_model.path, store_root=tmp_path / "store")
    assert [r.ref for r in store.list()] == ["tags@1"]


def test_cli_entry(tiny_model, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from trainer.__main__ import main

    data = write_jsonl(tmp_path / "train.jsonl", small_rows())
    argv = ["--data", str(data), "--model", tiny_model.path, "--max-steps", "2"]
    argv += ["--name", "cli-bot", "--store", str(tmp_path / "store"), "--batch-size", "4"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "step 2/2" in out and "eval after" in out and "published cli-bot@1" in out
    bad = write_jsonl(tmp_path / "bad.jsonl", ['{"prompt": "p", "completion": 1}'])
    assert main(["--data", str(bad), "--model", tiny_model.path]) == 2
    assert "line 1: field 'completion' must be a string" in capsys.readouterr().err
    argv = ["--data", str(data), "--eval-data", str(bad), "--model", tiny_model.path]
    assert main(argv) == 2
    assert "eval dataset line 1: field 'completion' must be a string" in capsys.readouterr().err
