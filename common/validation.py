"""Validation of requests, shared by the router and the worker servicers.

Converts protobuf to plain dataclasses and raises :class:`common.errors.InvalidArgument`
with a message naming the offending field. The worker adds what needs the model
(prompt length after tokenisation, model and adapter existence).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

from common.errors import InvalidArgument
from common.model_store import SPLIT_TOTAL, parse_ref
from common.pb import finetune_pb2, generate_pb2

DEFAULT_MAX_NEW_TOKENS = 128
MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 8
MAX_STOP_LENGTH = 128
MAX_REQUEST_ID_LENGTH = 128
MAX_USER_LENGTH = 256  # GenerateRequest.user: a caller key, hashed for traffic splits
CHAT_ROLES = ("system", "user", "assistant")
# Beyond this a penalty is no longer a penalty but an overflow (score / p or score * p
# leaves float32); 100 already pins every seen token's probability to ~0 or ~1.
MIN_REPETITION_PENALTY = 0.01
MAX_REPETITION_PENALTY = 100.0
MAX_TOP_K = 1 << 20  # larger than any vocabulary: k above the vocabulary means "all"
MAX_PROMPT_CHARS = 1 << 20  # 1 MiB of text; the token context is checked by the worker
# Structured output (params.constraint): bounds on the documents a worker compiles. The
# compile time of a grammar grows with its size; these keep one request from holding a
# compile thread for long, and the compiled-constraint cache small.
MAX_CONSTRAINT_CHARS = 64 * 1024  # json_schema, regex, grammar
MAX_CHOICES = 256
MAX_CHOICE_CHARS = 1024  # each option
MAX_CHOICES_TOTAL_CHARS = 64 * 1024
CONSTRAINT_KINDS = ("json_schema", "json_object", "regex", "grammar", "choice")


def parse_adapter_ref(ref: str) -> tuple[str, str]:
    """Splits ``name`` / ``name@version`` / ``name@latest`` into (name, version); the name
    rules are the model store's (no path separators, no '..', a fixed charset)."""
    name, version = parse_ref(ref)
    return name, "latest" if version is None else str(version)


@dataclass(frozen=True)
class GenerationLimits:
    """Server-side bounds a request is checked against."""

    max_new_tokens_limit: int = 2048
    max_context_tokens: int = 8192


@dataclass(frozen=True)
class ConstraintSpec:
    """A validated params.constraint: ``kind`` is one of CONSTRAINT_KINDS; ``document`` is
    the schema / regex / grammar text ("" for json_object); ``choices`` the options."""

    kind: str
    document: str = ""
    choices: tuple[str, ...] = ()

    @property
    def cache_key(self) -> str:
        """Stable hash of the constraint: equal constraints share one compiled form."""
        h = hashlib.sha256(self.kind.encode())
        for part in (self.document, *self.choices):
            h.update(b"\0" + part.encode("utf-8", "surrogatepass"))
        return h.hexdigest()

    @classmethod
    def from_pb(cls, pb: generate_pb2.Constraint) -> ConstraintSpec:
        """Checks the shape and sizes (compiling needs the model's tokenizer: the worker
        does that); raises InvalidArgument naming the field."""
        kind = pb.WhichOneof("kind")
        if kind is None:
            raise InvalidArgument(
                f"params.constraint is set but empty: set one of {', '.join(CONSTRAINT_KINDS)}"
            )
        field_name = f"params.constraint.{kind}"
        if kind == "json_object":
            if not pb.json_object:
                raise InvalidArgument(f"{field_name} must be true when set")
            return cls(kind)
        if kind == "choice":
            options = tuple(pb.choice.options)
            if not options or len(options) > MAX_CHOICES:
                raise InvalidArgument(
                    f"{field_name}.options must hold 1 to {MAX_CHOICES} strings, got {len(options)}"
                )
            for i, option in enumerate(options):
                if not option or len(option) > MAX_CHOICE_CHARS:
                    raise InvalidArgument(
                        f"{field_name}.options[{i}] must be 1 to {MAX_CHOICE_CHARS} characters, "
                        f"got {len(option)}"
                    )
            if sum(len(o) for o in options) > MAX_CHOICES_TOTAL_CHARS:
                raise InvalidArgument(
                    f"{field_name}.options hold more than {MAX_CHOICES_TOTAL_CHARS} characters"
                )
            return cls(kind, choices=options)
        document = str(getattr(pb, kind))
        if not document.strip():
            raise InvalidArgument(f"{field_name} is empty")
        if len(document) > MAX_CONSTRAINT_CHARS:
            raise InvalidArgument(
                f"{field_name} has {len(document)} characters; at most {MAX_CONSTRAINT_CHARS}"
            )
        return cls(kind, document=document)


@dataclass(frozen=True)
class SamplingParams:
    """Plain, validated sampling parameters (the engine never sees protobuf)."""

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int = 0
    ignore_eos: bool = False
    constraint: ConstraintSpec | None = None  # structured output; None = free generation

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @classmethod
    def from_pb(cls, pb: generate_pb2.SamplingParams, limits: GenerationLimits) -> SamplingParams:
        """Validates and converts; raises InvalidArgument naming the field."""
        if pb.HasField("max_new_tokens"):
            max_new = pb.max_new_tokens
        else:
            max_new = min(DEFAULT_MAX_NEW_TOKENS, limits.max_new_tokens_limit)
        if max_new < 1 or max_new > limits.max_new_tokens_limit:
            raise InvalidArgument(
                f"params.max_new_tokens must be in [1, {limits.max_new_tokens_limit}], got {max_new}"
            )
        temperature = float(pb.temperature)
        if not math.isfinite(temperature) or temperature < 0:
            raise InvalidArgument(
                f"params.temperature must be a finite number >= 0, got {temperature}"
            )
        top_p = float(pb.top_p) if pb.HasField("top_p") else 1.0
        if not math.isfinite(top_p) or not 0.0 < top_p <= 1.0:
            raise InvalidArgument(f"params.top_p must be in (0, 1], got {top_p}")
        penalty = float(pb.repetition_penalty) if pb.HasField("repetition_penalty") else 1.0
        if not math.isfinite(penalty) or not (
            MIN_REPETITION_PENALTY <= penalty <= MAX_REPETITION_PENALTY
        ):
            raise InvalidArgument(
                f"params.repetition_penalty must be in [{MIN_REPETITION_PENALTY}, "
                f"{MAX_REPETITION_PENALTY}], got {penalty}"
            )
        if not 0 <= pb.top_k <= MAX_TOP_K:
            raise InvalidArgument(f"params.top_k must be in [0, {MAX_TOP_K}], got {pb.top_k}")
        if not 0 <= pb.logprobs <= MAX_LOGPROBS:
            raise InvalidArgument(
                f"params.logprobs must be in [0, {MAX_LOGPROBS}], got {pb.logprobs}"
            )
        stops = tuple(pb.stop)
        if len(stops) > MAX_STOP_STRINGS:
            raise InvalidArgument(
                f"params.stop has {len(stops)} strings; at most {MAX_STOP_STRINGS}"
            )
        for i, s in enumerate(stops):
            if not s or len(s) > MAX_STOP_LENGTH:
                raise InvalidArgument(
                    f"params.stop[{i}] must be 1 to {MAX_STOP_LENGTH} characters, got {len(s)}"
                )
        return cls(
            max_new_tokens=max_new,
            temperature=temperature,
            top_p=top_p,
            top_k=int(pb.top_k),
            repetition_penalty=penalty,
            seed=pb.seed if pb.HasField("seed") else None,
            stop=stops,
            logprobs=int(pb.logprobs),
            ignore_eos=bool(pb.ignore_eos),
            constraint=ConstraintSpec.from_pb(pb.constraint) if pb.HasField("constraint") else None,
        )


@dataclass(frozen=True)
class GenerationSpec:
    """A validated GenerateRequest in plain form."""

    request_id: str
    model: str
    adapter: str  # "" = base model; else "name@version" / "name@latest"
    prompt: str | None
    messages: tuple[tuple[str, str], ...] = field(default=())
    params: SamplingParams = field(default_factory=SamplingParams)
    user: str = ""  # caller key: keeps a caller on one version of a split adapter


def generation_spec_from_pb(
    req: generate_pb2.GenerateRequest, limits: GenerationLimits
) -> GenerationSpec:
    """Validates every field of a GenerateRequest that needs no model."""
    if len(req.request_id) > MAX_REQUEST_ID_LENGTH:
        raise InvalidArgument(f"request_id is longer than {MAX_REQUEST_ID_LENGTH} characters")
    if len(req.user) > MAX_USER_LENGTH:
        raise InvalidArgument(f"user is longer than {MAX_USER_LENGTH} characters")
    if req.prompt and len(req.messages):
        raise InvalidArgument("set either prompt or messages, not both")
    if not req.prompt and not len(req.messages):
        raise InvalidArgument("prompt is empty: set prompt or messages")
    if len(req.prompt) > MAX_PROMPT_CHARS:
        raise InvalidArgument(
            f"prompt has {len(req.prompt)} characters; at most {MAX_PROMPT_CHARS}"
        )
    messages: list[tuple[str, str]] = []
    total_chars = 0
    for i, m in enumerate(req.messages):
        if m.role not in CHAT_ROLES:
            raise InvalidArgument(
                f"messages[{i}].role must be one of {CHAT_ROLES}, got {m.role[:64]!r}"
            )
        if not m.content:
            raise InvalidArgument(f"messages[{i}].content is empty")
        total_chars += len(m.content)
        if total_chars > MAX_PROMPT_CHARS:
            raise InvalidArgument(
                f"messages hold more than {MAX_PROMPT_CHARS} characters of content"
            )
        messages.append((m.role, m.content))
    adapter = ""
    if req.adapter:
        try:
            name, version = parse_adapter_ref(req.adapter)
        except InvalidArgument as exc:
            raise InvalidArgument(f"adapter: {exc}") from exc
        adapter = f"{name}@{version}"
    return GenerationSpec(
        request_id=req.request_id,
        model=req.model,
        adapter=adapter,
        prompt=req.prompt or None,
        messages=tuple(messages),
        params=SamplingParams.from_pb(req.params, limits),
        user=req.user,
    )


# Unsigned protobuf fields: a negative value cannot even be put on the wire, so a client
# must refuse it itself; the wording matches the server's for the same field.
_UNSIGNED_PARAMS = {
    "max_new_tokens": "must be in [1, {limit}]",
    "top_k": "must be >= 0 (0 = disabled)",
    "seed": "must be >= 0",
    "logprobs": f"must be in [0, {MAX_LOGPROBS}]",
}


def sampling_params_from_values(
    values: dict[str, object], limits: GenerationLimits | None = None
) -> generate_pb2.SamplingParams:
    """A client's sampling flags (None = not given) as a SamplingParams message, checked
    with the server's rules and wording (:meth:`SamplingParams.from_pb`), so that a bad
    flag is refused before any call. Raises InvalidArgument naming the field."""
    limits = limits or GenerationLimits()
    for name, rule in _UNSIGNED_PARAMS.items():
        value = values.get(name)
        if isinstance(value, int) and value < 0:
            raise InvalidArgument(
                f"params.{name} {rule.format(limit=limits.max_new_tokens_limit)}, got {value}"
            )
    pb = generate_pb2.SamplingParams()
    for name, value in values.items():
        if value is None:
            continue
        if name == "stop":
            pb.stop.extend(value)  # type: ignore[call-overload]
        else:
            try:
                setattr(pb, name, value)
            except (TypeError, ValueError) as exc:  # out of the wire type's range
                raise InvalidArgument(f"params.{name}: {exc}, got {value!r}") from None
    SamplingParams.from_pb(pb, limits)
    return pb


# ---------------------------------------------------------------- traffic splits


def traffic_split_from_values(
    adapter: str, weights: dict[int, int], clear: bool = False
) -> tuple[str, dict[int, int]]:
    """A SetTrafficSplit request checked (name, version → weight); ``{}`` means clear.

    Weights are percentages: non-negative integers summing to 100 over versions >= 1.
    Whether the versions exist is the model store's check (NOT_FOUND)."""
    if not adapter:
        raise InvalidArgument("adapter is required")
    if "@" in adapter:
        raise InvalidArgument(
            f"adapter {adapter!r}: a split belongs to the bare name; drop the '@version'"
        )
    try:
        name, _ = parse_ref(adapter)
    except InvalidArgument as exc:
        raise InvalidArgument(f"adapter: {exc}") from None
    if clear:
        if weights:
            raise InvalidArgument("clear and weights are exclusive: clear removes the split")
        return name, {}
    if not weights:
        raise InvalidArgument("weights are empty: give version=weight pairs or clear the split")
    for version, weight in sorted(weights.items()):
        if not isinstance(version, int) or version < 1:
            raise InvalidArgument(f"weights: version {version!r} must be an integer >= 1")
        if not isinstance(weight, int) or isinstance(weight, bool) or weight < 0:
            raise InvalidArgument(
                f"weights: weight of version {version} must be a non-negative integer, "
                f"got {weight!r}"
            )
    total = sum(weights.values())
    if total != SPLIT_TOTAL:
        raise InvalidArgument(
            f"weights must sum to {SPLIT_TOTAL}, got {total} "
            f"({', '.join(f'{v}={w}' for v, w in sorted(weights.items()))})"
        )
    return name, dict(weights)


# ---------------------------------------------------------------- jobs

MAX_JOB_NPROC = 64  # ranks of one job on one worker; more only share the same devices


def job_nproc(requested: int, default: int, available: int, batch_size: int) -> int:
    """CreateJobRequest.nproc checked: unset (0) takes the worker's ``default``; a
    divisor of ``batch_size``, since every rank takes an equal share of each micro-batch;
    at most the worker's ``available`` cores (CPU) or devices (CUDA)."""
    nproc = requested or default
    if not 1 <= nproc <= MAX_JOB_NPROC:
        raise InvalidArgument(f"nproc must be in [1, {MAX_JOB_NPROC}], got {nproc}")
    if batch_size % nproc:
        raise InvalidArgument(
            f"nproc {nproc} must divide hyperparameters.batch_size {batch_size}: each rank "
            "takes an equal share of every micro-batch"
        )
    if nproc > available:
        raise InvalidArgument(
            f"nproc {nproc} is more than the {available} cores or devices this worker trains on"
        )
    return nproc


# ---------------------------------------------------------------- sweeps

MAX_SWEEP_TRIALS = 256
MAX_SWEEP_PARALLELISM = 16
SWEEP_OBJECTIVES = ("eval_loss",)
# SearchSpace list fields -> the Hyperparameters field each one varies.
SWEEP_CHOICE_FIELDS = ("learning_rate", "lora_r", "lora_alpha", "epochs", "batch_size")


@dataclass(frozen=True)
class SweepSpec:
    """A validated CreateSweepRequest without its base job (the job manager checks that).

    ``choices``: field → the values to try (only the non-empty dimensions);
    ``learning_rate_range``: (min, max, log) for RANDOM, else None."""

    strategy: str  # "grid" | "random" | "tpe"
    choices: dict[str, tuple[float, ...]]
    learning_rate_range: tuple[float, float, bool] | None
    max_trials: int
    parallelism: int
    objective: str
    seed: int


def sweep_spec_from_pb(req: finetune_pb2.CreateSweepRequest) -> SweepSpec:
    """Checks a CreateSweepRequest's search space, strategy, budget, parallelism and
    objective; raises InvalidArgument naming the field."""
    strategies = {
        finetune_pb2.SWEEP_STRATEGY_UNSPECIFIED: "grid",
        finetune_pb2.GRID: "grid",
        finetune_pb2.RANDOM: "random",
        finetune_pb2.TPE: "tpe",
    }
    if req.strategy not in strategies:
        raise InvalidArgument(f"strategy {req.strategy} is not a known SweepStrategy")
    strategy = strategies[req.strategy]
    objective = req.objective or "eval_loss"
    if objective not in SWEEP_OBJECTIVES:
        raise InvalidArgument(
            f"objective must be one of {', '.join(SWEEP_OBJECTIVES)}, got {req.objective!r}"
        )
    space = req.space
    choices: dict[str, tuple[float, ...]] = {}
    for name in SWEEP_CHOICE_FIELDS:
        values = tuple(getattr(space, name))
        if not values:
            continue
        for v in values:
            if not math.isfinite(v) or v <= 0:
                raise InvalidArgument(f"space.{name}: every value must be > 0, got {v!r}")
        if len(set(values)) != len(values):
            raise InvalidArgument(f"space.{name}: values repeat ({', '.join(map(str, values))})")
        choices[name] = values
    lr_range = None
    if space.HasField("learning_rate_range"):
        r = space.learning_rate_range
        if strategy == "grid":
            raise InvalidArgument(
                "space.learning_rate_range: a grid sweep takes listed values only "
                "(space.learning_rate); use strategy RANDOM or TPE for a range"
            )
        if "learning_rate" in choices:
            raise InvalidArgument("space: set learning_rate or learning_rate_range, not both")
        if not (math.isfinite(r.min) and math.isfinite(r.max)) or r.min <= 0 or r.max < r.min:
            raise InvalidArgument(
                f"space.learning_rate_range must have 0 < min <= max, got [{r.min}, {r.max}]"
            )
        lr_range = (r.min, r.max, r.log)
    if not choices and lr_range is None:
        raise InvalidArgument("space is empty: give at least one dimension to vary")
    if strategy == "grid":
        size = math.prod(len(v) for v in choices.values())
        max_trials = min(size, req.max_trials) if req.max_trials else size
    else:
        if not req.max_trials:
            raise InvalidArgument(f"max_trials: a {strategy} sweep needs a trial budget (> 0)")
        max_trials = req.max_trials
    if max_trials > MAX_SWEEP_TRIALS:
        raise InvalidArgument(f"the sweep has {max_trials} trials; at most {MAX_SWEEP_TRIALS}")
    parallelism = req.parallelism or 1
    if parallelism > MAX_SWEEP_PARALLELISM:
        raise InvalidArgument(
            f"parallelism must be in [1, {MAX_SWEEP_PARALLELISM}], got {req.parallelism}"
        )
    return SweepSpec(
        strategy=strategy,
        choices=choices,
        learning_rate_range=lr_range,
        max_trials=max_trials,
        parallelism=parallelism,
        objective=objective,
        seed=req.seed,
    )


# ---------------------------------------------------------------- feedback

MAX_FEEDBACK_SCORE = 1e9  # far beyond any rating scale; keeps Prometheus sums finite


def feedback_from_pb(req: generate_pb2.RecordFeedbackRequest) -> tuple[str, float]:
    """A RecordFeedback request checked: (request_id, score)."""
    if not req.request_id:
        raise InvalidArgument("request_id is required: the id of the request to score")
    if len(req.request_id) > MAX_REQUEST_ID_LENGTH:
        raise InvalidArgument(f"request_id is longer than {MAX_REQUEST_ID_LENGTH} characters")
    if not math.isfinite(req.score) or abs(req.score) > MAX_FEEDBACK_SCORE:
        raise InvalidArgument(
            f"score must be a finite number in [-{MAX_FEEDBACK_SCORE:g}, "
            f"{MAX_FEEDBACK_SCORE:g}], got {req.score!r}"
        )
    return req.request_id, req.score
