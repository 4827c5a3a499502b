"""Iteration-level (continuous) batching engine over a Hugging Face causal LM.

One engine thread owns the model and the batched KV cache. Each iteration it
1. applies control messages (new requests, cancels),
2. drops sequences that were cancelled or passed their deadline,
3. schedules this iteration's prompt work within the running-sequence and KV-token
   budgets and the per-iteration prompt-token budget (chunked prefill: a long prompt is
   prefilled a chunk per iteration, so the running rows keep decoding while it is
   admitted; see ``_schedule_prefill``),
4. computes the next token of every running sequence and the prompt chunks (the first
   token of every sequence whose prompt is now complete): on Llama-architecture models
   (the default) in one packed forward (``worker.packed_llama``: all tokens of the
   iteration share the projections and the MLP, attention is split per sequence); on
   other models one decode step over the batch (per-row position ids and a 2-D
   attention mask hide the padding) and then a forward per prompt chunk (no padding
   inside a prompt),
5. merges each completed prompt's cache into the batch cache, left-padded with zeros so
   every row ends at the same column, and
6. hands each sink the outputs of its sequences for this iteration in one call.
Every iteration that computed anything, a prompt chunk alone included, is one step: the
step counter is the engine's progress signal.
Finished or cancelled rows leave the batch at once; nobody restarts.

Why not transformers' own continuous batching (``generate_batch``): measured on this
model it was slower than padded decoding and takes no per-row LoRA adapter, which the
fine-tuning issue needs (peft's ``adapter_names=`` works per row on a padded batch, and
per token in the packed forward).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch

from common.errors import (
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    RequestError,
    ResourceExhausted,
    Unavailable,
)
from common.validation import SamplingParams
from worker.adapters import method_of
from worker.config import WorkerConfig
from worker.constraints import RowMatcher, mask_rows
from worker.cores import ComputeLock, release_openmp_workers
from worker.detokenizer import IncrementalDetokenizer
from worker.kv_cache import cache_views, slab_cache, stacked_cache
from worker.packed_llama import PackedLlama, PromptChunk, base_causal_lm, supports_packed
from worker.sampling import TokenChoice, make_generator, select_token

logger = logging.getLogger(__name__)

FINISH_LENGTH = "LENGTH"
FINISH_STOP = "STOP"
FINISH_EOS = "EOS"

# Request ids for the process lifetime, shared by every engine: a rebuilt engine never
# reuses an id, so a late cancel cannot reach another request (itertools.count's next()
# is atomic under the GIL).
_REQUEST_IDS = itertools.count(1)


@dataclass(frozen=True)
class EngineConfig:
    """Budgets of the engine."""

    max_running: int = 32
    max_kv_tokens: int = 65536
    max_queue: int = 256
    max_context_tokens: int = 8192
    # Prompt tokens prefilled per iteration (chunked prefill): bounds how long a long
    # prompt, or a burst of prompts, delays the streams already running. A prompt token
    # that attends to c earlier tokens counts as 1 + c / attention_break_even(model)
    # tokens, its real work: late chunks of a long prompt are shorter. Default: the
    # worker's (one place: worker/config.py, measured by benchmarks/prefill_fairness.py).
    max_prefill_tokens_per_step: int = WorkerConfig.max_prefill_tokens_per_step
    # While rows decode, a step carrying prompt work takes at most this many times a
    # decode-only step: the budget above shrinks to what the measured step times allow
    # (StepClock). On a small CPU a 128-token chunk costs ~10 decode steps; on a GPU the
    # whole budget may fit. 0 = the fixed budget alone.
    max_prefill_stall: float = WorkerConfig.max_prefill_stall
    # Llama-architecture models: decode rows and newcomers' prompts in one packed forward
    # per iteration (worker.packed_llama); False = one model.forward per stage.
    packed_step: bool = True


class StepClock:
    """Measured step times of one engine: a decode-only step, and the extra time per
    prefill budget unit (``Engine._prefill_cost``) a step with prompt work adds to it;
    exponential moving averages, so they follow the batch size and the machine's load."""

    ALPHA = 0.2
    # The fewest prompt tokens a step takes while rows decode: an 8k prompt still gets in.
    MIN_BUDGET = 16.0
    # Steps with less prompt work than this say little about its cost per unit: a chunk's
    # fixed cost spread over a few units inflated the estimate, which shrank the budget,
    # which kept chunks small (at 32 streams: 85 tok/s, TTFT p50 16 s, against 140 and
    # 1.4 s with a fixed budget, on the 2-core VM).
    MIN_LEARNING_COST = 48.0

    def __init__(self) -> None:
        self.decode_s: float | None = None
        self.prefill_unit_s: float | None = None

    def observe(self, elapsed_s: float, decoding: bool, prefill_cost: float) -> None:
        if not decoding:
            return  # a prompt-only step says nothing about the streams' normal pace
        if prefill_cost <= 0:
            self.decode_s = self._ema(self.decode_s, elapsed_s)
        elif self.decode_s is not None and prefill_cost >= self.MIN_LEARNING_COST:
            unit = max(0.0, elapsed_s - self.decode_s) / prefill_cost
            self.prefill_unit_s = self._ema(self.prefill_unit_s, unit)

    def budget(self, stall: float, ceiling: float) -> float:
        """The prompt budget of a step beside decoding rows: its prompt work adds at most
        ``stall - 1`` decode steps (``ceiling`` until both times are measured)."""
        if stall <= 0 or self.decode_s is None or not self.prefill_unit_s:
            return ceiling
        allowed = (stall - 1.0) * self.decode_s / self.prefill_unit_s
        return min(ceiling, max(self.MIN_BUDGET, allowed))

    def _ema(self, old: float | None, new: float) -> float:
        return new if old is None else old + self.ALPHA * (new - old)


@dataclass(frozen=True)
class TokenOut:
    """A generated token as clients see it. ``text`` is the part of the sequence's text
    this token adds (worker.detokenizer): the tokens' texts add up to the text, so a
    matched stop string is in neither; ``top`` carries each alternative's own text."""

    token_id: int
    text: str
    logprob: float
    top: tuple[tuple[int, str, float], ...] = ()


@dataclass(frozen=True)
class UsageStats:
    prompt_tokens: int
    completion_tokens: int
    queue_ms: float
    time_to_first_token_ms: float
    total_ms: float
    adapter: str = ""  # "name@version" that served it ("" = base model)


@dataclass
class SeqOutput:
    """What one sequence produced in one iteration (or how it ended)."""

    key: int
    tokens: list[TokenOut]
    text: str
    finish_reason: str | None = None
    usage: UsageStats | None = None
    error: RequestError | None = None
    # Set by the engine front (worker.front) on errors: may another worker take it?
    retryable: bool = False

    @property
    def done(self) -> bool:
        return self.finish_reason is not None or self.error is not None


class OutputSink(Protocol):
    """Receives outputs. Called on the engine thread: implementations must only hand the
    data over (e.g. ``loop.call_soon_threadsafe``), never block."""

    def on_outputs(self, step: int, outputs: list[SeqOutput]) -> None: ...


@dataclass
class EngineRequest:
    """A tokenised, validated request ready for the engine."""

    prompt_ids: list[int]
    params: SamplingParams
    sink: OutputSink
    deadline_monotonic: float | None = None
    adapter: Any = None  # a resolved common.model_store.ArtifactRef, or None for the base model
    arrival_monotonic: float = field(default_factory=time.monotonic)
    key: int = -1  # assigned by Engine.submit
    on_admitted: Callable[[], None] | None = None
    # params.constraint compiled (worker.constraints.ConstraintCompiler), or None.
    constraint: Any = None
    # A prompt-tuning adapter's virtual tokens: positions 0 .. n-1 of the sequence, before
    # prompt_ids (peft prepends them to the whole input), whose input embeddings are the
    # artifact's. They take KV and context like prompt tokens; prompt_ids stays what the
    # client's text became (usage.prompt_tokens, the repetition penalty's history).
    virtual_tokens: int = 0
    # The engine EngineFront.submit queues this on: a full fine-tune's (worker.full_models);
    # None = the base model's current engine.
    served_by: Any = None

    @property
    def prompt_len(self) -> int:
        """Positions prefilled before the first generated token (virtual ones included)."""
        return self.virtual_tokens + len(self.prompt_ids)

    def prompt_slice(self, start: int, end: int) -> list[int]:
        """Input ids of prompt positions ``[start, end)``; a virtual position's id is a
        placeholder (0) whose embedding the forward replaces."""
        n = self.virtual_tokens
        return [0] * max(0, min(end, n) - start) + self.prompt_ids[
            max(0, start - n) : max(0, end - n)
        ]

    @property
    def kv_tokens(self) -> int:
        return self.prompt_len + self.params.max_new_tokens


def attention_break_even(model: Any) -> float:
    """The context length at which a token's attention costs as many FLOPs as its matrix
    multiplications (4 * layers * heads * head_dim per earlier token against 2 per
    weight of the layers); infinite when the model does not say (no weighting)."""
    config = getattr(base_causal_lm(model), "config", None)
    layers = getattr(config, "num_hidden_layers", 0)
    heads = getattr(config, "num_attention_heads", 0)
    hidden = getattr(config, "hidden_size", 0)
    if not (layers and heads and hidden):
        return float("inf")
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    weights = sum(
        p.numel()
        for name, p in model.named_parameters()
        if p.dim() == 2 and "embed" not in name and "lm_head" not in name
    )
    return 2.0 * weights / (4.0 * layers * heads * head_dim) or float("inf")


class _Sequence:
    """Engine-thread state of one admitted request."""

    def __init__(
        self, req: EngineRequest, tokenizer: Any, now: float, device: torch.device | str = "cpu"
    ) -> None:
        self.req = req
        self.generated: list[int] = []
        self.detok = IncrementalDetokenizer(tokenizer, req.params.stop)
        # RNG and penalty indices live on the logits' device (ATen rejects a mix).
        self.generator = make_generator(req.params, device)
        self.admitted = now
        self.first_token: float | None = None
        # Chunked prefill: prompt tokens whose keys/values are in ``prompt_cache`` (a
        # batch-1 cache of this sequence alone, until the whole prompt joins the batch).
        self.prefilled = 0
        self.prompt_cache: Any = None
        # Generated tokens whose text the detokenizer still holds back (a possible start
        # of a stop string): they go out with it, so no token shows a stop string.
        self.held: deque[TokenOut] = deque()
        # Token ids seen so far, for the repetition penalty (kept only when used).
        self.seen: torch.Tensor | None = (
            torch.tensor(req.prompt_ids, dtype=torch.long, device=device)
            if req.params.repetition_penalty != 1.0
            else None
        )
        self.matcher = RowMatcher(req.constraint) if req.constraint is not None else None

    @property
    def length(self) -> int:
        return self.req.prompt_len + len(self.generated)


def _row_error(exc: BaseException) -> RequestError:
    """The status of a request that failed on its own inside a step."""
    if isinstance(exc, RequestError):
        return exc
    return RequestError(f"request failed in the engine: {type(exc).__name__}: {exc}")


class Engine:
    """The continuous-batching engine. Thread-safe entry points: submit, cancel, stats,
    start, stop. Everything else runs on the engine thread."""

    def __init__(
        self, model: Any, tokenizer: Any, config: EngineConfig, adapters: Any = None
    ) -> None:
        self.model = model
        self.adapters = adapters  # worker.adapters.AdapterSet, or None: no adapters served
        self.tokenizer = tokenizer
        self.config = config
        self.device = self._init_device(model)
        self.eos_ids = self._eos_ids(model, tokenizer)
        # Each token's own text, decoded once per id (at most the vocabulary): a decode
        # through transformers costs more per token than a small model's share of a step.
        self._token_texts: dict[int, str] = {}
        self._packed = PackedLlama(model) if config.packed_step and supports_packed(model) else None
        self._break_even_context = (
            attention_break_even(model) if model is not None else float("inf")
        )
        self._control: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._pending = 0  # submitted, not yet seen by the engine thread (bounded queue)
        self._pending_lock = threading.Lock()
        # Engine-thread state.
        self._waiting: deque[EngineRequest] = deque()
        self._rows: list[_Sequence] = []
        # Admitted, KV reserved, prompt partly prefilled (oldest first); not yet decoding.
        self._prefilling: list[_Sequence] = []
        self._cache: Any = None  # batched KV cache (worker.kv_cache), rows = self._rows
        self._mask: torch.Tensor | None = None  # [B, T] 1 = real token
        self._reserved_kv = 0
        self._hand_back = False
        self.clock = StepClock()
        # Test hook: while this file exists the engine thread hangs (wedged-engine tests).
        self.fault_file: str | None = None
        # Held for each step's compute when workers share the cores (worker/cores.py).
        self.compute_lock: ComputeLock | None = None
        # Counters read by stats() from other threads (plain ints: atomic enough).
        self.step = 0
        self.finished_total = 0
        self.generated_tokens_total = 0
        self.last_step_monotonic = time.monotonic()
        self.fatal_error: BaseException | None = None
        self.on_fatal: Callable[[BaseException], None] | None = None
        self.on_step: Callable[[int, int], None] | None = None  # (batch size, new tokens)
        self.compute_threads: int | None = None  # set_compute_threads' last value, if any
        self._merge_s = 0.0  # this iteration's time in _merge (engine thread)
        # Computed since going idle: the engine thread's OpenMP pool may be alive.
        self._holds_openmp_workers = False

    def _init_device(self, model: Any) -> torch.device:
        return next(model.parameters()).device

    @staticmethod
    def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
        ids: set[int] = set()
        gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        for value in (gen_eos, tokenizer.eos_token_id):
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, list | tuple):
                ids.update(int(v) for v in value)
        return ids

    # ----- thread-safe API -------------------------------------------------------------

    def start(self) -> None:
        release_openmp_workers()  # the loading thread's pool would slow the engine's
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stopping.set()
        self._control.put(("wake", None))
        if self._thread is not None:
            self._thread.join(timeout_s)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.fatal_error is None

    def submit(self, req: EngineRequest) -> int:
        """Queues a request; returns its key. Raises ResourceExhausted when the waiting
        queue is full and InvalidArgument when it can never fit the KV budget."""
        if req.kv_tokens > self.config.max_kv_tokens:
            raise InvalidArgument(
                f"prompt ({req.prompt_len} tokens) + max_new_tokens "
                f"({req.params.max_new_tokens}) exceeds the KV budget of {self.config.max_kv_tokens}"
            )
        if self.fatal_error is not None or self._stopping.is_set():
            raise Unavailable("engine is not running") from self.fatal_error
        with self._pending_lock:
            if self._pending + len(self._waiting) >= self.config.max_queue:
                raise ResourceExhausted(f"worker queue is full ({self.config.max_queue} waiting)")
            self._pending += 1
        req.key = next(_REQUEST_IDS)
        self._control.put(("submit", req))
        return req.key

    def hand_back_waiting(self) -> None:
        """Ends every request still waiting for admission with a retryable UNAVAILABLE
        (drain: the router re-routes them); running sequences go on."""
        self._control.put(("hand_back", None))

    def set_compute_threads(self, threads: int) -> None:
        """Torch threads of the engine's forward passes from the next iteration on. A
        worker lowers it while a training process uses some cores: more busy threads than
        cores makes every OpenMP barrier wait for a descheduled thread, and decoding
        crawls (seen here: seconds per token with 2 engine threads + 1 trainer on 2 cores)."""
        self.compute_threads = max(1, int(threads))
        self._control.put(("threads", self.compute_threads))

    def cancel(self, key: int, reason: str = "cancelled") -> None:
        """Frees the sequence at the next iteration (no-op if it already ended)."""
        self._control.put(("cancel", (key, reason)))

    def stats(self) -> dict[str, int]:
        rows = [*self._rows, *self._prefilling]
        waiting = list(self._waiting)
        return {
            "queued": len(waiting) + self._pending,
            "running": len(rows),
            "free_kv_tokens": max(0, self.config.max_kv_tokens - self._reserved_kv),
            "max_kv_tokens": self.config.max_kv_tokens,
            # Reserved at admission (prompt + max_new_tokens each) vs held now.
            "reserved_kv_tokens": self._reserved_kv,
            "occupied_kv_tokens": sum(s.length for s in rows),
            "queued_tokens": sum(r.kv_tokens for r in waiting),
            "running_tokens": sum(s.req.params.max_new_tokens - len(s.generated) for s in rows),
            "finished_total": self.finished_total,
            "generated_tokens_total": self.generated_tokens_total,
            "steps_total": self.step,
        }

    # ----- engine thread ---------------------------------------------------------------

    def _run(self) -> None:
        try:
            with torch.inference_mode():
                while not self._stopping.is_set():
                    self._iteration()
        except BaseException as exc:  # engine-fatal: fail everything, tell the worker
            logger.exception("engine failed")
            self.fatal_error = exc
            # UNAVAILABLE: the worker recovers; requests that sent no token may go elsewhere.
            self._fail_all(Unavailable(f"engine failed: {type(exc).__name__}: {exc}"))
            if self.on_fatal is not None:
                self.on_fatal(exc)
        finally:
            if self._stopping.is_set():
                self._fail_all(Unavailable("worker is shutting down"))

    def _drain_control(self, block: bool) -> list[tuple[int, str]]:
        cancels: list[tuple[int, str]] = []
        while True:
            try:
                kind, payload = self._control.get(block=block, timeout=0.5 if block else None)
            except queue.Empty:
                return cancels
            block = False
            if kind == "submit":
                with self._pending_lock:
                    self._pending -= 1
                self._waiting.append(payload)
            elif kind == "cancel":
                cancels.append(payload)
            elif kind == "hand_back":
                self._hand_back = True
            elif kind == "threads":
                torch.set_num_threads(payload)  # on the thread that runs the forward passes

    def _iteration(self) -> None:
        while self.fault_file and os.path.exists(self.fault_file) and not self._stopping.is_set():
            time.sleep(0.05)  # simulated wedge: no iteration, no heartbeat
        # A prompt part-way through its chunks is work too: blocking on the control queue
        # here stalled every chunk after the first by the 0.5 s timeout.
        idle = not self._rows and not self._waiting and not self._prefilling
        if idle and self._holds_openmp_workers:
            self._holds_openmp_workers = not release_openmp_workers()
        cancels = self._drain_control(block=idle)
        self.last_step_monotonic = time.monotonic()
        outputs: dict[int, SeqOutput] = {}
        sinks: dict[int, OutputSink] = {}
        now = time.monotonic()
        cancel_reasons = dict(cancels)
        if self._hand_back:
            self._hand_back = False
            for req in list(self._waiting):
                self._waiting.remove(req)
                handed_back = Unavailable(
                    "worker is draining: request handed back before it started"
                )
                outputs[req.key] = SeqOutput(req.key, [], "", error=handed_back)
                sinks[req.key] = req.sink
        # Cancelled or expired waiting requests leave without ever running.
        for req in list(self._waiting):
            err = self._lifetime_error(req, cancel_reasons.get(req.key), now)
            if err is not None:
                self._waiting.remove(req)
                outputs[req.key] = SeqOutput(req.key, [], "", error=err)
                sinks[req.key] = req.sink
        for seq in list(self._prefilling):
            err = self._lifetime_error(seq.req, cancel_reasons.get(seq.req.key), now)
            if err is not None:
                self._prefilling.remove(seq)
                self._reserved_kv -= seq.req.kv_tokens
                seq.prompt_cache = None
                outputs[seq.req.key] = SeqOutput(seq.req.key, [], "", error=err)
                sinks[seq.req.key] = seq.req.sink
        drop = []
        for i, seq in enumerate(self._rows):
            err = self._lifetime_error(seq.req, cancel_reasons.get(seq.req.key), now)
            if err is not None:
                outputs[seq.req.key] = SeqOutput(seq.req.key, [], "", error=err)
                sinks[seq.req.key] = seq.req.sink
                drop.append(i)
        self._remove_rows(drop)
        decoding = bool(self._rows)
        has_work = self._rows or self._waiting or self._prefilling
        self._holds_openmp_workers |= bool(has_work)
        with (self.compute_lock if has_work else None) or contextlib.nullcontext():
            started = time.perf_counter()
            self._merge_s = 0.0
            chunks, cost = self._compute(outputs, sinks)
        # Joining finished prompts to the batch cache costs per admission, not per prompt
        # token: left out of what the step clock learns the prompt unit's cost from.
        self.clock.observe(time.perf_counter() - started - self._merge_s, decoding, cost)
        if outputs or chunks:  # a prompt chunk alone is progress too
            self.step += 1
            self._deliver(outputs, sinks)

    def _compute(
        self, outputs: dict[int, SeqOutput], sinks: dict[int, OutputSink]
    ) -> tuple[list[tuple[_Sequence, int]], float]:
        """One iteration's forward passes: the prompt chunks it prefilled and their cost."""
        if self._packed is not None:
            chunks = self._schedule_prefill(outputs, sinks)
            cost = self._plan_cost(chunks)
            if self._rows or chunks:
                self._packed_step(chunks, outputs, sinks)
                self._remove_finished(outputs)
        else:
            # Decode the running batch first, then prefill: a newcomer's first token comes
            # from its prefill, so it must not ride in this iteration's decode.
            if self._rows:
                self._decode(outputs, sinks)
                self._remove_finished(outputs)
            chunks = self._schedule_prefill(outputs, sinks)
            cost = self._plan_cost(chunks)
            if chunks:
                self._prefill(chunks, outputs, sinks)
                self._remove_finished(outputs)
        return chunks, cost

    def _remove_finished(self, outputs: dict[int, SeqOutput]) -> None:
        done = [
            i for i, s in enumerate(self._rows) if s.req.key in outputs and outputs[s.req.key].done
        ]
        self._remove_rows(done)

    def _lifetime_error(
        self, req: EngineRequest, cancel: str | None, now: float
    ) -> RequestError | None:
        if cancel is not None:
            return Cancelled(f"request cancelled: {cancel}")
        if req.deadline_monotonic is not None and now >= req.deadline_monotonic:
            return DeadlineExceeded("deadline passed before the request finished")
        return None

    def _schedule_prefill(
        self, outputs: dict[int, SeqOutput], sinks: dict[int, OutputSink]
    ) -> list[tuple[_Sequence, int]]:
        """This iteration's prompt work, ``(sequence, tokens)`` per prompt chunk, within
        ``max_prefill_tokens_per_step``: first the waiting prompts that fit the budget
        whole (a short request never waits behind a long prompt's chunks), then the next
        chunk of the prompts being prefilled (oldest first; the oldest gets at least one
        token, so a prefill always ends), then a first chunk of the next waiting prompt.
        Admission is FIFO within the running-sequence and KV budgets; starvation of a
        long prompt by short ones is bounded by ``max_running``."""
        budget = float(self.config.max_prefill_tokens_per_step)
        if self._rows:  # streams are decoding: keep their step within the stall bound
            budget = self.clock.budget(self.config.max_prefill_stall, budget)
        plan: list[tuple[_Sequence, int]] = []
        whole: list[_Sequence] = []  # admitted this iteration, prompt prefilled in one go
        while self._head_admissible(len(whole)):
            prompt_len = self._waiting[0].prompt_len
            cost = self._prefill_cost(0, prompt_len)
            if cost > budget:
                break
            seq = self._admit_head(whole, outputs, sinks)
            if seq is not None:
                budget -= cost
                whole.append(seq)
                plan.append((seq, prompt_len))
        for i, seq in enumerate(self._prefilling):
            n = self._chunk_within(seq.prefilled, seq.req.prompt_len, budget)
            if n == 0 and i == 0:
                n = 1
            if n == 0:
                break
            budget -= self._prefill_cost(seq.prefilled, n)
            plan.append((seq, n))
        while budget >= 1 and self._head_admissible(len(whole)):
            n = self._chunk_within(0, self._waiting[0].prompt_len, budget)
            seq = self._admit_head(whole, outputs, sinks)
            if seq is not None:
                budget -= self._prefill_cost(0, n)
                self._prefilling.append(seq)
                plan.append((seq, n))
        return plan

    def _head_admissible(self, admitted_now: int) -> bool:
        """The oldest waiting request fits the running-sequence and KV budgets (FIFO: the
        head waits for KV space rather than being overtaken)."""
        if not self._waiting:
            return False
        slots = len(self._rows) + len(self._prefilling) + admitted_now
        kv = self._reserved_kv + self._waiting[0].kv_tokens
        return slots < self.config.max_running and kv <= self.config.max_kv_tokens

    def _admit_head(
        self,
        admitted_now: list[_Sequence],
        outputs: dict[int, SeqOutput],
        sinks: dict[int, OutputSink],
    ) -> _Sequence | None:
        """Takes the oldest waiting request in: KV reserved, adapter loaded. None when its
        adapter failed to load (that request alone ends with the error)."""
        req = self._waiting.popleft()
        if req.adapter is not None:
            error = self._activate_adapter(req, [*self._prefilling, *admitted_now])
            if error is not None:
                outputs[req.key] = SeqOutput(req.key, [], "", error=error)
                sinks[req.key] = req.sink
                return None
        try:
            seq = _Sequence(req, self.tokenizer, time.monotonic(), self.device)
        except Exception as exc:  # this request's own state failed to build: it alone ends
            logger.exception("request %d failed at admission", req.key)
            outputs[req.key] = SeqOutput(req.key, [], "", error=_row_error(exc))
            sinks[req.key] = req.sink
            return None
        self._reserved_kv += req.kv_tokens
        if req.on_admitted is not None:
            req.on_admitted()
        return seq

    def _prefill_cost(self, start: int, n: int) -> float:
        """Budget tokens of prompt positions ``[start, start + n)``: one per token plus
        its attention over the positions before it, in units of a token's weights."""
        return n + (n * start + n * (n - 1) / 2) / self._break_even_context

    def _plan_cost(self, plan: list[tuple[_Sequence, int]]) -> float:
        return sum(self._prefill_cost(seq.prefilled, n) for seq, n in plan)

    def _chunk_within(self, start: int, total: int, budget: float) -> int:
        """The most prompt tokens from ``start`` (at most to ``total``) within ``budget``."""
        low, high = 0, total - start
        while low < high:  # cost grows with n: bisect for the last n that fits
            mid = (low + high + 1) // 2
            if self._prefill_cost(start, mid) <= budget:
                low = mid
            else:
                high = mid - 1
        return low

    def _prompt_done(self, seq: _Sequence, n: int) -> bool:
        """Counts a chunk of ``n`` prompt tokens as prefilled; True once the whole prompt
        is (the sequence then leaves ``_prefilling``: the caller merges it into the batch)."""
        seq.prefilled += n
        if seq.prefilled < seq.req.prompt_len:
            return False
        if seq in self._prefilling:
            self._prefilling.remove(seq)
        return True

    def _activate_adapter(
        self, req: EngineRequest, admitted: list[_Sequence]
    ) -> RequestError | None:
        """Loads the request's adapter into the model (engine thread: the only one that
        touches the model), keeping those of the running rows and of ``admitted``
        (sequences not in the batch yet). A load failure fails this request only."""
        in_use = {
            self.adapters.key_of(s.req.adapter)
            for s in [*self._rows, *admitted]
            if s.req.adapter is not None
        }
        if self._packed is None and method_of(req.adapter) == "bottleneck":
            return FailedPrecondition(
                f"adapter {req.adapter.ref} is a bottleneck adapter; this worker's model runs "
                "the generic path (not Llama-architecture, or packed steps off), which does "
                "not serve them"
            )
        try:
            self.model = self.adapters.activate(self.model, req.adapter, in_use)
        except RequestError as exc:
            return exc
        except Exception as exc:
            logger.exception("loading adapter %s failed", req.adapter.ref)
            return RequestError(f"loading adapter {req.adapter.ref} failed: {exc}")
        return None

    def _forward(self, input_ids: torch.Tensor, **kwargs: Any) -> Any:
        return self.model(input_ids=input_ids, use_cache=True, logits_to_keep=1, **kwargs)

    def _prefill(
        self,
        plan: list[tuple[_Sequence, int]],
        outputs: dict[int, SeqOutput],
        sinks: dict[int, OutputSink],
    ) -> None:
        """Generic path: one forward per prompt chunk, over the sequence's own cache."""
        from transformers import DynamicCache

        done: list[_Sequence] = []
        new_caches: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []
        logits_rows = []
        for seq, n in plan:
            chunk = seq.req.prompt_slice(seq.prefilled, seq.prefilled + n)
            ids = torch.tensor([chunk], dtype=torch.long, device=self.device)
            if seq.prompt_cache is None:
                seq.prompt_cache = DynamicCache()
            # The cache's length gives the chunk's positions and its causal offset.
            kwargs = {"past_key_values": seq.prompt_cache, **self._adapter_kwargs([seq])}
            virtual = self._virtual_embeddings(seq, n)
            if virtual is not None:
                embeds = self.model.get_input_embeddings()(ids)
                embeds[0, : virtual.shape[0]] = virtual
                out = self.model(inputs_embeds=embeds, use_cache=True, logits_to_keep=1, **kwargs)
            else:
                out = self._forward(ids, **kwargs)
            if self._prompt_done(seq, n):
                layers = seq.prompt_cache.layers
                new_caches.append(
                    ([layer.keys for layer in layers], [layer.values for layer in layers])
                )
                seq.prompt_cache = None
                done.append(seq)
                logits_rows.append(out.logits[:, -1, :])
        if done:
            self._merge(done, new_caches)
            self._emit(done, torch.cat(logits_rows, dim=0), outputs, sinks)

    def _packed_step(
        self,
        plan: list[tuple[_Sequence, int]],
        outputs: dict[int, SeqOutput],
        sinks: dict[int, OutputSink],
    ) -> None:
        """One forward for the whole iteration: the next token of every running row and
        this iteration's prompt chunks; a sequence whose prompt is then complete gets its
        first token and its cache joins the batch."""
        assert self._packed is not None
        running = list(self._rows)
        decode_ids = positions = None
        if running:
            decode_ids, positions = self._next_decode_inputs()
        chunks = [
            PromptChunk(
                torch.tensor(
                    seq.req.prompt_slice(seq.prefilled, seq.prefilled + n),
                    dtype=torch.long,
                    device=self.device,
                ),
                seq.prefilled,
                seq.prompt_cache,
                self._virtual_embeddings(seq, n),
            )
            for seq, n in plan
        ]
        batch = [*running, *(seq for seq, _ in plan)]
        names = self._adapter_kwargs(batch).get("adapter_names")
        bottlenecks = None
        if self.adapters is not None:
            bottlenecks = [self.adapters.bottleneck_set(s.req.adapter) for s in batch]
        out = self._packed.forward(
            decode_ids, positions, self._cache, self._mask, chunks, names, bottlenecks
        )
        if running:
            assert out.decode_logits is not None
            self._emit(running, out.decode_logits, outputs, sinks)
        done: list[_Sequence] = []
        done_rows: list[int] = []
        new_caches: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []
        for j, (seq, n) in enumerate(plan):
            first_chunk = seq.prompt_cache is None
            if not self._prompt_done(seq, n):
                if first_chunk:  # room for the whole prompt: later chunks write in place
                    keys, values = out.prompt_kv[j]
                    rest = seq.req.prompt_len - seq.prefilled
                    seq.prompt_cache = slab_cache(keys, values, headroom=rest)
                continue
            new_caches.append(out.prompt_kv[j] if first_chunk else cache_views(seq.prompt_cache))
            seq.prompt_cache = None
            done.append(seq)
            done_rows.append(j)
        if done:
            assert out.prompt_logits is not None
            self._merge(done, new_caches)
            index = torch.tensor(done_rows, dtype=torch.long, device=out.prompt_logits.device)
            self._emit(done, out.prompt_logits.index_select(0, index), outputs, sinks)

    def _merge(
        self,
        admitted: list[_Sequence],
        new_caches: list[tuple[list[torch.Tensor], list[torch.Tensor]]],
    ) -> None:
        """Appends prefilled rows to the batch cache, left-padding so all rows end together."""
        merge_started = time.perf_counter()
        lengths = [s.req.prompt_len for s in admitted]
        current = self._mask.shape[1] if self._mask is not None else 0
        target = max([current, *lengths])
        parts: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []
        masks: list[torch.Tensor] = []
        if self._mask is not None and self._rows:
            parts.append(cache_views(self._cache))
            masks.append(
                torch.cat(
                    [self._mask.new_zeros(self._mask.shape[0], target - current), self._mask],
                    dim=1,
                )
            )
        for new_cache, length in zip(new_caches, lengths, strict=True):
            parts.append(new_cache)
            row_mask = torch.zeros(1, target, dtype=torch.long, device=self.device)
            row_mask[0, target - length :] = 1
            masks.append(row_mask)
        self._cache = stacked_cache(parts, target)
        self._mask = torch.cat(masks, dim=0)
        self._rows.extend(admitted)
        self._merge_s += time.perf_counter() - merge_started

    def _next_decode_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each running row's last token and its position (``[rows]``); the batch mask
        gains the column that this step's keys/values will fill."""
        assert self._mask is not None
        last = torch.tensor(
            [s.generated[-1] for s in self._rows], dtype=torch.long, device=self.device
        )
        positions = torch.tensor(
            [s.length - 1 for s in self._rows], dtype=torch.long, device=self.device
        )
        self._mask = torch.cat([self._mask, self._mask.new_ones(self._mask.shape[0], 1)], dim=1)
        return last, positions

    def _decode(self, outputs: dict[int, SeqOutput], sinks: dict[int, OutputSink]) -> None:
        last, positions = self._next_decode_inputs()
        out = self._forward(
            last[:, None],
            past_key_values=self._cache,  # grows in place
            attention_mask=self._mask,
            position_ids=positions[:, None],
            **self._adapter_kwargs(self._rows),
        )
        self._emit(self._rows, out.logits[:, -1, :], outputs, sinks)

    def _adapter_kwargs(self, rows: list[_Sequence]) -> dict[str, Any]:
        if self.adapters is None:
            return {}
        keys = [self.adapters.lora_key(s.req.adapter) for s in rows]
        return dict(self.adapters.forward_kwargs(keys))

    def _virtual_embeddings(self, seq: _Sequence, n: int) -> torch.Tensor | None:
        """The artifact's embeddings of the virtual positions among the sequence's next
        ``n`` prompt positions (``[k, hidden]``, a chunk's first k), or None."""
        start, virtual = seq.prefilled, seq.req.virtual_tokens
        if start >= virtual:
            return None
        embeddings = self.adapters.prompt_embeddings(seq.req.adapter)
        return embeddings[start : min(start + n, virtual)]

    def _emit(
        self,
        rows: list[_Sequence],
        logits: torch.Tensor,
        outputs: dict[int, SeqOutput],
        sinks: dict[int, OutputSink],
    ) -> None:
        choices: list[TokenChoice | BaseException] = []
        # Structured output: only constrained rows get masked logits (the others' stay
        # as the forward produced them).
        masked = mask_rows(logits, [s.matcher for s in rows])
        for row, seq in enumerate(rows):
            try:
                row_logits = masked.get(row, logits[row])
                if isinstance(row_logits, BaseException):
                    raise row_logits
                choices.append(select_token(row_logits, seq.req.params, seq.generator, seq.seen))
            except Exception as exc:  # the row's own failure: it ends alone (see _emit_choices)
                choices.append(exc)
        self._emit_choices(rows, choices, outputs, sinks)

    def _emit_choices(
        self,
        rows: list[_Sequence],
        choices: list[TokenChoice] | list[TokenChoice | BaseException],
        outputs: dict[int, SeqOutput],
        sinks: dict[int, OutputSink],
    ) -> None:
        """Advances each row by its token. The per-row exception boundary: a failure that
        belongs to one row (sampling, stop handling, detokenisation) ends that request
        alone with INTERNAL; the other rows go on token-identical. Only the forward pass
        is engine-fatal."""
        now = time.monotonic()
        for seq, choice in zip(rows, choices, strict=True):
            key = seq.req.key
            sinks[key] = seq.req.sink
            try:
                if isinstance(choice, BaseException):
                    raise choice
                outputs[key] = self._advance(seq, choice, now)
            except Exception as exc:
                logger.exception("request %d failed in the engine step", key)
                outputs[key] = SeqOutput(key, [], "", error=_row_error(exc))
        self.generated_tokens_total += len(rows)
        if self.on_step is not None:
            self.on_step(len(rows), len(rows))

    def _advance(self, seq: _Sequence, choice: TokenChoice, now: float) -> SeqOutput:
        tok = choice.token_id
        if seq.matcher is not None:
            seq.matcher.accept(tok)
        seq.generated.append(tok)
        if seq.first_token is None:
            seq.first_token = now
        if seq.seen is not None:
            seq.seen = torch.cat([seq.seen, seq.seen.new_tensor([tok])])
        text_of = self._token_text
        token = TokenOut(
            tok, "", choice.logprob, tuple((i, text_of(i), lp) for i, lp in choice.top)
        )
        finish: str | None = None
        eos = tok in self.eos_ids and not seq.req.params.ignore_eos
        if eos:  # never decoded (a special token): it adds no text
            finish = FINISH_EOS
            text = seq.detok.flush()
        else:
            seq.held.append(token)
            text = seq.detok.add_token(tok)
            if seq.detok.stopped:
                finish = FINISH_STOP
            elif seq.matcher is not None and seq.matcher.complete:
                finish = FINISH_STOP  # the constraint allows nothing more
                text += seq.detok.flush()
            elif len(seq.generated) >= seq.req.params.max_new_tokens:
                finish = FINISH_LENGTH
                text += seq.detok.flush()
        # The tokens whose text was released now, with it (possibly earlier held ones).
        tokens = [replace(seq.held.popleft(), text=t) for t in seq.detok.take_token_texts()]
        if eos:
            tokens.append(token)
        out = SeqOutput(seq.req.key, tokens, text)
        if finish is not None:
            out.finish_reason = finish
            arrival = seq.req.arrival_monotonic
            out.usage = UsageStats(
                prompt_tokens=len(seq.req.prompt_ids),
                completion_tokens=len(seq.generated),
                queue_ms=(seq.admitted - arrival) * 1000.0,
                time_to_first_token_ms=(seq.first_token - arrival) * 1000.0,
                total_ms=(now - arrival) * 1000.0,
                adapter=seq.req.adapter.ref if seq.req.adapter is not None else "",
            )
            self.finished_total += 1
        return out

    def _token_text(self, token_id: int) -> str:
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._token_texts[token_id] = str(self.tokenizer.decode([token_id]))
        return text

    def _remove_rows(self, indices: list[int]) -> None:
        if not indices:
            return
        gone = set(indices)
        for i in indices:
            self._reserved_kv -= self._rows[i].req.kv_tokens
        keep = [i for i in range(len(self._rows)) if i not in gone]
        self._rows = [self._rows[i] for i in keep]
        if not keep:
            self._cache, self._mask = None, None
            return
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        assert self._mask is not None
        mask = self._mask.index_select(0, index)
        # Columns that are padding in every remaining row can go (the longest row left).
        first = int(mask.any(dim=0).nonzero()[0])
        self._mask = mask[:, first:]
        keys, values = cache_views(self._cache)
        # Runs of consecutive kept rows, copied straight into the new buffers.
        runs: list[tuple[int, int]] = []
        for i in keep:
            if runs and runs[-1][1] == i:
                runs[-1] = (runs[-1][0], i + 1)
            else:
                runs.append((i, i + 1))
        self._cache = stacked_cache(
            [
                ([k[a:b, :, first:] for k in keys], [v[a:b, :, first:] for v in values])
                for a, b in runs
            ],
            self._mask.shape[1],
        )

    def _deliver(self, outputs: dict[int, SeqOutput], sinks: dict[int, OutputSink]) -> None:
        by_sink: dict[int, tuple[OutputSink, list[SeqOutput]]] = {}
        for key, out in outputs.items():
            sink = sinks[key]
            by_sink.setdefault(id(sink), (sink, []))[1].append(out)
        for sink, outs in by_sink.values():
            try:
                sink.on_outputs(self.step, outs)
            except Exception:  # a broken sink must not take the engine down
                logger.exception("output sink failed")

    def _fail_all(self, error: RequestError) -> None:
        outputs: dict[int, SeqOutput] = {}
        sinks: dict[int, OutputSink] = {}
        for req in [*self._waiting, *(s.req for s in [*self._prefilling, *self._rows])]:
            outputs[req.key] = SeqOutput(req.key, [], "", error=error)
            sinks[req.key] = req.sink
        while True:
            try:
                kind, payload = self._control.get_nowait()
            except queue.Empty:
                break
            if kind == "submit":
                outputs[payload.key] = SeqOutput(payload.key, [], "", error=error)
                sinks[payload.key] = payload.sink
        self._waiting.clear()
        self._prefilling = []
        self._rows = []
        self._cache, self._mask = None, None
        self._reserved_kv = 0
        self._deliver(outputs, sinks)
