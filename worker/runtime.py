"""The worker's model runtime: loads the model, owns the engine, turns validated specs
into engine requests (chat template, tokenisation, context checks), and bridges engine
outputs into asyncio."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from common.errors import InvalidArgument, NotFound, Unavailable, status_of
from common.metrics import WorkerMetrics
from common.model_store import ModelStore
from common.models import ModelSource, load_model, load_tokenizer, resolve_model
from common.validation import GenerationLimits, GenerationSpec, SamplingParams
from worker.adapters import AdapterSet, method_of
from worker.config import WorkerConfig
from worker.constraints import ConstraintCompiler
from worker.cores import release_openmp_workers, serving_threads
from worker.engine import Engine, EngineConfig, EngineRequest
from worker.full_models import FULL_METHOD, FullModels
from worker.weights import cpu_features_line, prepare_for_serving

logger = logging.getLogger(__name__)


class ModelRuntime:
    """One base model and its engine."""

    def __init__(self, config: WorkerConfig, serve_full_models: bool = True) -> None:
        self.config = config
        self.source: ModelSource = resolve_model(config.model or None)
        if config.engine == "null":
            self.model, self.tokenizer = None, load_tokenizer(self.source)
            self.device, self.dtype, model_limit = "none", "none", 8192
            self.weights = "none"
        else:
            self.model, self.tokenizer = load_model(self.source, config.dtype, config.device)
            first = next(self.model.parameters())
            self.device = str(first.device)
            self.dtype = str(first.dtype).removeprefix("torch.")
            self.weights = prepare_for_serving(self.model, config.weights)
            logger.info(
                "weights %s (--weights %s, --dtype %s on %s, %s)",
                self.weights, config.weights, self.dtype, self.device, cpu_features_line(),
            )  # fmt: skip
            model_limit = int(getattr(self.model.config, "max_position_embeddings", 0) or 0) or 8192
        context = config.max_context_tokens or model_limit
        self.limits = GenerationLimits(
            max_new_tokens_limit=config.max_new_tokens_limit,
            max_context_tokens=min(context, model_limit),
        )
        hidden = getattr(getattr(self.model, "config", None), "hidden_size", None)
        self.adapters = AdapterSet(
            ModelStore(config.store_dir or None),
            self.source.name,
            config.max_loaded_adapters,
            hidden_size=hidden,
        )
        self.engine = self._new_engine()
        # model="name@version": full fine-tunes of this base, loaded beside it on demand
        # (None in a full fine-tune's own runtime, and on the null engine).
        self.full_models: FullModels | None = None
        if serve_full_models and self.model is not None:
            self.full_models = FullModels(self, self.adapters.store, config.max_loaded_models)
        # Structured output (params.constraint); None on the null engine, which has no
        # logits to mask.
        self.constraints: ConstraintCompiler | None = None
        if self.model is not None:
            self.constraints = ConstraintCompiler(
                self.tokenizer,
                vocab_size=int(self.model.get_output_embeddings().weight.shape[0]),
                stop_token_ids=sorted(Engine._eos_ids(self.model, self.tokenizer)),
            )
        # Loaded on this thread (a worker's executor thread): its OpenMP pool would slow
        # every parallel region of the engine thread (worker/cores.py).
        release_openmp_workers()

    def _new_engine(self) -> Engine:
        config = EngineConfig(
            max_running=self.config.max_running,
            max_kv_tokens=self.config.max_kv_tokens,
            max_queue=self.config.max_queue,
            max_context_tokens=self.limits.max_context_tokens,
            max_prefill_tokens_per_step=self.config.max_prefill_tokens_per_step,
            max_prefill_stall=self.config.max_prefill_stall,
        )
        if self.model is None:
            from worker.null_engine import NullEngine

            return NullEngine(self.tokenizer, config, step_s=self.config.null_step_ms / 1000.0)
        engine = Engine(self.model, self.tokenizer, config, adapters=self.adapters)
        # On the engine thread itself: torch may have started its OpenMP pool (one thread
        # per core) before --threads/--cpus were applied, and a pinned worker then ran 2
        # threads on 1 core (20x slower decoding, measured with up --workers 2).
        engine.set_compute_threads(serving_threads(self.config.threads))
        return engine

    def rebuild_engine(self, old: Engine) -> Engine:
        """A fresh engine on the same model, keeping the old one's hooks and its thread
        count (lowered while a training process shares the cores)."""
        engine = self._new_engine()
        engine.on_step, engine.on_fatal, engine.fault_file, engine.compute_lock = (
            old.on_step,
            old.on_fatal,
            old.fault_file,
            old.compute_lock,
        )
        if old.compute_threads is not None:
            engine.set_compute_threads(old.compute_threads)
        return engine

    @property
    def model_names(self) -> list[str]:
        return [self.source.name]

    def check_model(self, requested: str) -> None:
        """Raises NotFound unless ``requested`` (empty = default) is this worker's model."""
        if requested and requested not in (self.source.name, self.source.path):
            raise NotFound(f"model {requested!r} is not served here (serving {self.source.name!r})")

    def prompt_ids(self, spec: GenerationSpec) -> list[int]:
        if spec.prompt is not None:
            return list(self.tokenizer(spec.prompt, add_special_tokens=True)["input_ids"])
        if not getattr(self.tokenizer, "chat_template", None):
            raise InvalidArgument(f"model {self.source.name!r} has no chat template: send a prompt")
        messages = [{"role": r, "content": c} for r, c in spec.messages]
        ids = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=False
        )
        return list(ids)

    def build_request(
        self,
        spec: GenerationSpec,
        sink: Any,
        deadline_monotonic: float | None,
        on_admitted: Callable[[], None] | None = None,
    ) -> EngineRequest:
        """Checks what needs the model and returns a request ready for submit()."""
        self.check_model(spec.model)
        adapter = self.adapters.resolve(spec.adapter, spec.user or None) if spec.adapter else None
        ids = self.prompt_ids(spec)
        if not ids:  # the engine needs at least one position to predict from
            raise InvalidArgument("prompt has no tokens after tokenisation")
        context = self.limits.max_context_tokens
        virtual = self.adapters.virtual_tokens(adapter)  # prompt tuning: they take context too
        if virtual + len(ids) >= context:
            with_virtual = (
                f" + {virtual} virtual tokens of {adapter.ref}" if adapter and virtual else ""
            )
            raise InvalidArgument(
                f"prompt has {len(ids)} tokens{with_virtual}; the model's context is {context}"
            )
        params = spec.params
        room = context - virtual - len(ids)
        if params.max_new_tokens > room:  # the context ends first: finish with LENGTH there
            params = SamplingParams(**{**params.__dict__, "max_new_tokens": room})
        constraint = None
        if params.constraint is not None:  # compiled here: off the loop, before queuing
            if self.constraints is None:
                raise InvalidArgument(
                    "params.constraint: this worker's engine has no logits to mask"
                )
            constraint = self.constraints.compile(params.constraint)
        return EngineRequest(
            prompt_ids=ids,
            constraint=constraint,
            params=params,
            sink=sink,
            deadline_monotonic=deadline_monotonic,
            arrival_monotonic=time.monotonic(),
            on_admitted=on_admitted,
            adapter=adapter,
            virtual_tokens=virtual,
        )

    @property
    def supports_constraints(self) -> bool:
        """Whether params.constraint is served (WorkerInfo and ModelEntry say so)."""
        return self.constraints is not None

    def list_models(self) -> list[Any]:
        from common.pb import generate_pb2

        entries = [
            generate_pb2.ModelEntry(
                name=self.source.name,
                kind=generate_pb2.BASE,
                is_default=True,
                max_context_tokens=self.limits.max_context_tokens,
                supports_constraints=self.supports_constraints,
            )
        ]
        full = self.full_models
        for ref in self.adapters.store.list():
            method = method_of(ref)
            if method == FULL_METHOD:
                if full is None or not full.servable(ref):
                    continue
            elif not self.adapters.servable(ref):
                continue  # advertise only what a request here can use
            base = ref.metadata.get("base_model", "")
            entries.append(
                generate_pb2.ModelEntry(
                    name=ref.name,
                    version=str(ref.version),
                    kind=generate_pb2.ADAPTER,
                    base_model=base or self.source.name,
                    method=method,
                    created_unix_ms=int(ref.metadata.get("created_unix_ms", 0)),
                    supports_constraints=self.supports_constraints,
                )
            )
        return entries

    def loaded_adapters(self) -> list[str]:
        """Adapters and full fine-tunes in memory (``name@version``): the router prefers
        a worker that has what a request names."""
        full = self.full_models.loaded_refs() if self.full_models is not None else []
        return self.adapters.loaded_refs() + full


class WorkerState:
    """What the servicers share: the runtime once loaded, whether new work is accepted
    (cleared while loading, draining or after a failed self-test), and the worker id."""

    def __init__(self, worker_id: str, metrics: WorkerMetrics | None = None) -> None:
        self.worker_id = worker_id
        self.metrics = metrics
        self.accepting = asyncio.Event()
        self._runtime: ModelRuntime | None = None
        self._front: Any = None  # worker.front.EngineFront once the runtime is loaded

    def record_rejected(self, method: str, exc: BaseException) -> None:
        """Counts a request refused before it reached the engine."""
        if self.metrics is not None:
            self.metrics.record_request(method, status_of(exc)[0])

    @property
    def runtime(self) -> ModelRuntime:
        if self._runtime is None:
            raise Unavailable("worker is still loading its model")
        return self._runtime

    @runtime.setter
    def runtime(self, value: ModelRuntime) -> None:
        self._runtime = value

    @property
    def front(self) -> Any:
        """The engine front (worker.front.EngineFront): what every servicer submits to."""
        if self._front is None:
            raise Unavailable("worker is still loading its model")
        return self._front

    @front.setter
    def front(self, value: Any) -> None:
        self._front = value
