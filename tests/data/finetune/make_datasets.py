"""Generates the fine-tuning test datasets (deterministic; rerun to regenerate).

``records.jsonl``: 200 prompt/completion examples of a format the base model never
produces on its own: a sentence about a person in, a ``<<NAME: ... | AGE: ... | CITY:
...>>`` record out. The values are copied from the sentence, so a small model can learn
the whole completion and the eval loss can fall far (the behaviour test needs >= 50 %).

    python tests/data/finetune/make_datasets.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).parent

NAMES = [
    "Maria", "John", "Aisha", "Kenji", "Olga", "Pedro", "Fatima", "Liam", "Chen", "Sofia",
    "Omar", "Emma", "Ivan", "Priya", "Lucas", "Hana", "Noah", "Amara", "Mateo", "Elena",
    "Yusuf", "Clara", "Diego", "Ingrid", "Tariq", "Mei", "Oscar", "Zara", "Felix", "Nadia",
]  # fmt: skip
CITIES = [
    "Paris", "Lagos", "Tokyo", "Lima", "Oslo", "Cairo", "Berlin", "Quito", "Hanoi", "Dublin",
    "Madrid", "Nairobi", "Seoul", "Austin", "Prague", "Lisbon", "Denver", "Manila", "Rome",
    "Perth",
]  # fmt: skip
TEMPLATES = [
    "{name} is {age} years old and lives in {city}.",
    "Meet {name}, a {age}-year-old from {city}.",
    "My neighbour {name} moved to {city} at age {age}.",
    "{name} ({age}) works in {city}.",
    "Yesterday I met {name} in {city}; {name} is {age}.",
    "Born {age} years ago, {name} now calls {city} home.",
]


def record_rows(n: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < n:
        name, city, age = rng.choice(NAMES), rng.choice(CITIES), rng.randint(18, 89)
        template = rng.choice(TEMPLATES)
        if (name, city, age) in seen:
            continue
        seen.add((name, city, age))
        sentence = template.format(name=name, age=age, city=city)
        rows.append(
            {
                "prompt": f"Text: {sentence}\nRecord:",
                "completion": f" <<NAME: {name} | AGE: {age} | CITY: {city}>>",
            }
        )
    return rows


def main() -> None:
    rows = record_rows(220, seed=5)
    with open(HERE / "records.jsonl", "w", encoding="utf-8") as fh:
        for row in rows[:200]:
            fh.write(json.dumps(row) + "\n")
    # Prompts never seen in training, for the greedy-generation check.
    with open(HERE / "records_heldout.jsonl", "w", encoding="utf-8") as fh:
        for row in rows[200:]:
            fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
