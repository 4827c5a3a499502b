"""Behaviour on the real default model: a short LoRA run teaches a new output format.

The bar from issue 5: on ~200 examples of a format the base model never produces, eval
loss falls by at least half, and greedy answers to held-out prompts show the trained
format where the base model's answers do not. Marked slow: it trains SmolLM2-135M on CPU.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import torch

from tests.trainer_fixtures import DATA_DIR, real_model_fixture  # noqa: F401  (fixture)
from trainer import EvalEvent, MetricsEvent, TrainConfig, train

# Chosen by measurement: 8 steps of 8 examples (a third of an epoch) at 5x the default
# LoRA rate take the eval loss from 3.26 to 0.02 and copy all 20 held-out records exactly;
# 12 steps reach 0.002. A high rate keeps this CPU test short; the default suits longer runs.
LEARN_CONFIG = TrainConfig(
    method="lora",
    epochs=1,
    max_steps=8,
    batch_size=8,
    learning_rate=1e-3,
    warmup_ratio=0.1,
    max_seq_length=64,
    eval_fraction=0.05,
    seed=0,
)
RECORD = re.compile(r"^ ?<<NAME: [A-Za-z]+ \| AGE: \d+ \| CITY: [A-Za-z ]+>>$")


def greedy(model, tokenizer, prompt: str, max_new_tokens: int = 24) -> str:
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


@pytest.mark.slow
@pytest.mark.timeout(1800)  # CPU training of a 135M model; minutes on a busy 2-core box
def test_lora_learns_a_new_format(real_model, tmp_path: Path) -> None:
    from peft import PeftModel

    from common.models import load_model

    events: list = []
    started = time.monotonic()
    done = train(
        LEARN_CONFIG,
        real_model,
        DATA_DIR / "records.jsonl",
        tmp_path / "job",
        on_event=events.append,
        device="cpu",
    )
    seconds = time.monotonic() - started
    before, after = done.eval_before, done.eval_after
    assert isinstance(before, EvalEvent) and isinstance(after, EvalEvent)
    tokens_per_s = [e.tokens_per_second for e in events if isinstance(e, MetricsEvent)]
    print(
        f"\neval loss {before.eval_loss:.3f} -> {after.eval_loss:.3f} "
        f"({after.eval_loss / before.eval_loss:.1%}); {done.steps} steps in {seconds:.0f} s; "
        f"median {sorted(tokens_per_s)[len(tokens_per_s) // 2]:.0f} tok/s"
    )
    assert after.eval_loss <= 0.5 * before.eval_loss

    heldout = [
        json.loads(line)
        for line in (DATA_DIR / "records_heldout.jsonl").read_text().splitlines()[:5]
    ]
    base, tokenizer = load_model(real_model, dtype="float32", device="cpu")
    base_answers = [greedy(base, tokenizer, row["prompt"]) for row in heldout]
    tuned = PeftModel.from_pretrained(base, done.artifact_dir)
    tuned.eval()
    tuned_answers = [greedy(tuned, tokenizer, row["prompt"]) for row in heldout]
    print("base: ", base_answers, "\ntuned:", tuned_answers)

    assert not any("<<NAME:" in a for a in base_answers)
    assert all(RECORD.match(a) for a in tuned_answers), tuned_answers
    # Most values are copied correctly too, not just the shape.
    exact = sum(
        a.strip() == row["completion"].strip()
        for a, row in zip(tuned_answers, heldout, strict=True)
    )
    assert exact >= 3, list(zip(tuned_answers, [r["completion"] for r in heldout], strict=True))
