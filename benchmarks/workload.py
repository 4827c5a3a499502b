"""The seeded benchmark workload: prompts of mixed token lengths, shared by every system.

Prompts are plain English-like text built from a fixed word list, cut to a target token
count with the model's own tokenizer (``tokenizers``, no torch), so every system sees
byte-identical prompts whose lengths are known before the run.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

# Common words: realistic sub-word statistics without shipping a corpus.
_WORDS = (
    "the of and to in is was for on that with as by at from his her they this which be or "
    "an are had not but have one all were we when there can their been has more if will "
    "who out about so up what time year people way day man thing woman life child world "
    "school state family student group country problem hand part place case week company "
    "system program question work government number night point home water room mother area "
    "money story fact month lot right study book eye job word business issue side kind head "
    "house service friend father power hour game line end member law car city community name "
    "president team minute idea kid body information back parent face others level office "
    "door health person art war history party result change morning reason research girl guy "
    "moment air teacher force education river mountain garden village engine model server "
    "request token stream cluster worker router batch cache memory latency network signal "
    "quickly slowly carefully because although however therefore meanwhile suddenly finally"
).split()


@dataclass(frozen=True)
class Prompt:
    """One prompt of the workload and its length under the model's tokenizer."""

    index: int
    text: str
    prompt_tokens: int


@dataclass(frozen=True)
class Workload:
    """Prompts plus the generation settings every system uses for them."""

    prompts: tuple[Prompt, ...]
    max_new_tokens: int
    seed: int
    min_prompt_tokens: int
    max_prompt_tokens: int

    def to_json(self) -> dict:
        return {
            "max_new_tokens": self.max_new_tokens,
            "seed": self.seed,
            "min_prompt_tokens": self.min_prompt_tokens,
            "max_prompt_tokens": self.max_prompt_tokens,
            "prompts": [asdict(p) for p in self.prompts],
        }

    @classmethod
    def from_json(cls, data: dict) -> Workload:
        return cls(
            prompts=tuple(Prompt(**p) for p in data["prompts"]),
            max_new_tokens=int(data["max_new_tokens"]),
            seed=int(data["seed"]),
            min_prompt_tokens=int(data["min_prompt_tokens"]),
            max_prompt_tokens=int(data["max_prompt_tokens"]),
        )

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_json()))

    @classmethod
    def load(cls, path: Path) -> Workload:
        return cls.from_json(json.loads(Path(path).read_text()))

    def cycle(self, n: int) -> list[Prompt]:
        """The first ``n`` requests: the prompts in order, repeated when n exceeds them."""
        return [self.prompts[i % len(self.prompts)] for i in range(n)]


def load_tokenizer(model_dir: str):
    """The fast tokenizer of ``model_dir`` via ``tokenizers`` (keeps torch out of the
    driver, whose CPU time competes with the servers it measures)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))


def count_tokens(tokenizer, text: str) -> int:
    """Tokens the worker will see: it tokenises raw prompts with special tokens added."""
    return len(tokenizer.encode(text, add_special_tokens=True).ids)


def build_workload(
    tokenizer,
    num_prompts: int,
    max_new_tokens: int,
    seed: int = 0,
    min_prompt_tokens: int = 16,
    max_prompt_tokens: int = 200,
) -> Workload:
    """``num_prompts`` prompts with token lengths drawn uniformly from
    [min_prompt_tokens, max_prompt_tokens]; the same seed gives the same prompts."""
    if not 1 <= min_prompt_tokens <= max_prompt_tokens:
        raise ValueError(
            f"need 1 <= min_prompt_tokens <= max_prompt_tokens, got "
            f"{min_prompt_tokens} and {max_prompt_tokens}"
        )
    rng = random.Random(seed)
    prompts = []
    for index in range(num_prompts):
        target = rng.randint(min_prompt_tokens, max_prompt_tokens)
        # Words are ~1.3 tokens each: generate more than needed, then cut by tokens.
        words = [rng.choice(_WORDS) for _ in range(target * 2 + 8)]
        words[0] = words[0].capitalize()
        ids = tokenizer.encode(" ".join(words), add_special_tokens=False).ids[:target]
        text = tokenizer.decode(ids)
        # Decoding then re-encoding can merge or split a token at the cut; record the
        # count the servers will actually see.
        prompts.append(Prompt(index, text, count_tokens(tokenizer, text)))
    return Workload(
        prompts=tuple(prompts),
        max_new_tokens=max_new_tokens,
        seed=seed,
        min_prompt_tokens=min_prompt_tokens,
        max_prompt_tokens=max_prompt_tokens,
    )
