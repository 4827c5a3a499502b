"""The serving benchmark: our path against the in-process limit, a naive server and
transformers' own server, in one run, with ratios (issue 7).

    python -m benchmarks.serving [--smoke] [--concurrency 1,8,32,64]
        [--dtype float32|bfloat16] [--rounds 5] [--json out.json]
        [--systems limit,ours1,ours2,direct,naive,null,null_interval,peer,llamacpp_q4,llamacpp_f32]

Systems (same model, dtype and prompts):
  limit   the continuous-batching engine driven in-process, no gRPC (a child process)
  ours1   router + 1 worker over gRPC on loopback
  ours2   router + 2 workers (each given half the cores)
  direct  clients straight to ours1's worker (router overhead = ours1 - direct)
  naive   one ``model.generate`` per request, one at a time, behind gRPC
  null    router + a ``--engine null`` worker: the router+gRPC ceiling at many streams
  null_interval  the same worker behind a router run with ``--stream-interval-ms``
  peer    ``transformers serve MODEL --continuous-batching --device cpu`` (OpenAI SSE)
  llamacpp_q4   llama.cpp's ``llama-server`` on the GGUF the model ships as (Q4_1)
  llamacpp_f32  ``llama-server`` on the same weights as F32 (the weights ours serves)

Every system but the null ones runs with its processes up together. At the target concurrency
(where ours/limit, ours/naive and ours/peer are judged) limit, ours1, direct, peer,
the llama.cpp systems and naive run ``--rounds`` interleaved rounds (naive
``--naive-rounds``); at the lowest level (router overhead) limit, ours1 and direct do; at
every other level ours1 and the llama.cpp systems run ``--llamacpp-rounds`` (ours/llama.cpp
is judged at every level); the rest run once. llama-server's slot count is fixed at start,
so it is restarted for each level with slots = the level's concurrency. This machine's speed
drifts by 10% and more over minutes. A level's figures are its median round's; every
ratio between two interleaved systems is the median of its per-round ratios.

Every request is greedy with ``ignore_eos``, so each generates exactly max_new_tokens.
Clients are real streaming clients (grpc.aio, or HTTP SSE for the peer) in this process,
a closed loop that keeps ``concurrency`` requests in flight. The run prints a table,
ratios and targets, and writes JSON (schema below in :func:`build_report`).

Targets are checked only in the full mode (exit 1 on a miss unless --no-fail); --smoke
runs a seconds-scale workload of every system and never judges speed.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import importlib.util
import json
import logging
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from benchmarks import llamacpp
from benchmarks.clients import GrpcStreamClient, OpenAIStreamClient, run_closed_loop
from benchmarks.metrics import RequestRecord, cpu_seconds, summarize
from benchmarks.procs import ProcessRegistry, ServerProc, free_port, llmcluster_argv, stop_all
from benchmarks.workload import Workload, build_workload, load_tokenizer
from common.models import WEIGHTS

logger = logging.getLogger("benchmarks.serving")

SCHEMA = "llmcluster.bench.serving/1"
ALL_SYSTEMS = (
    "limit",
    "ours1",
    "ours2",
    "direct",
    "naive",
    "null",
    "null_interval",
    "peer",
    *llamacpp.SYSTEMS,
)
# Measured level by level in interleaved rounds (ModelPhase), in this order in round 0.
INTERLEAVED = ("limit", "ours1", "direct", "peer", *llamacpp.SYSTEMS, "naive")
PEER_PACKAGES = {
    "fastapi": "fastapi==0.165.0",
    "uvicorn": "uvicorn==0.54.0",
    "openai": "openai==3.57.0",
}

# The workers' periodic self-test stays on (its small cost is part of what is measured),
# but with a long timeout: its probe queues behind a full batch, and on an oversubscribed
# machine a 30 s default fails, rebuilding the engine mid-run (seen at load 17).
SELF_TEST_ARGS = ("--self-test-timeout-s", "600")

DESCRIPTIONS = {
    "limit": "engine in-process, no gRPC",
    "ours1": "router + 1 worker (gRPC, loopback)",
    "ours2": "router + 2 workers (gRPC, loopback; cores split between workers)",
    "direct": "clients straight to the ours1 worker (no router)",
    "naive": "one model.generate per request, one at a time, gRPC streaming",
    "null": "router + null-engine worker (no model): router+gRPC ceiling, a message per token",
    "null_interval": "null, through a router with --stream-interval-ms (merged messages)",
    "peer": "transformers serve --continuous-batching --device cpu (OpenAI SSE)",
    "llamacpp_q4": "llama.cpp llama-server, the shipped Q4_1 GGUF, slots = concurrency",
    "llamacpp_f32": "llama.cpp llama-server, the same weights as F32, slots = concurrency",
}


@dataclasses.dataclass
class Settings:
    """One benchmark run's parameters (the CLI fills them; --smoke changes defaults)."""

    smoke: bool = False
    concurrency: tuple[int, ...] = (1, 8, 32, 64)
    dtype: str = "float32"
    # The worker's (and limit's) --weights: the precision of the projection/MLP matrices.
    weights: str = "auto"
    systems: tuple[str, ...] = ALL_SYSTEMS
    json_path: str | None = None
    num_prompts: int = 64
    max_new_tokens: int = 64
    seed: int = 0
    min_prompt_tokens: int = 16
    max_prompt_tokens: int = 200
    max_running: int = 32
    null_streams: int = 256
    null_new_tokens: int = 256
    null_step_ms: float = 5.0
    # null_interval's router --stream-interval-ms (null's router keeps the default, 0).
    null_stream_interval_ms: float = 20.0
    target_concurrency: int = 32
    # Each judged level this many times, interleaved (ModelPhase, ``rounds_at``).
    rounds: int = 5
    # naive's rounds at the target concurrency: each takes minutes (one request at a time).
    naive_rounds: int = 3
    # transformers serve sizes its paged KV cache from free RAM by default (~10 GB here,
    # ~50 s to allocate); None keeps that default, as a user would run it.
    peer_cb_num_blocks: int | None = None
    # The llama.cpp systems' (and ours1's) rounds at the levels other than the target
    # concurrency, where ours/llama.cpp is judged too (at most ``rounds``).
    llamacpp_rounds: int = 3
    llama_server: str = str(llamacpp.DEFAULT_SERVER)
    # llama-server --threads; None: the cores, as our worker's torch gets. Its thread pool
    # spins at every op's barrier, so where other work holds a core, 2 threads on 2 cores
    # collapse (1-5 tok/s against 38 with 1 thread, measured here at load 4).
    llamacpp_threads: int | None = None
    fail_on_miss: bool = True
    system_timeout_s: float = 3600.0
    start_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        unknown = set(self.systems) - set(ALL_SYSTEMS)
        if unknown:
            raise ValueError(f"unknown systems {sorted(unknown)}; choose from {ALL_SYSTEMS}")
        if not self.concurrency or min(self.concurrency) < 1:
            raise ValueError(f"concurrency levels must be >= 1, got {self.concurrency}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be float32 or bfloat16, got {self.dtype!r}")
        if self.weights not in WEIGHTS:
            raise ValueError(f"weights must be one of {', '.join(WEIGHTS)}, got {self.weights!r}")
        if self.rounds < 1 or self.naive_rounds < 1 or self.llamacpp_rounds < 1:
            raise ValueError(
                f"rounds, naive rounds and llama.cpp rounds must be >= 1, got {self.rounds}, "
                f"{self.naive_rounds} and {self.llamacpp_rounds}"
            )
        if self.llamacpp_threads is not None and self.llamacpp_threads < 1:
            raise ValueError(f"llama.cpp threads must be >= 1, got {self.llamacpp_threads}")
        if self.num_prompts < 1 or self.max_new_tokens < 1:
            raise ValueError(
                f"need num_prompts >= 1 and max_new_tokens >= 1, got "
                f"{self.num_prompts} and {self.max_new_tokens}"
            )

    def requests_at(self, concurrency: int) -> int:
        """Requests sent at one level: twice the streams (so the loop reaches steady
        state), at least 8, at most the prompt set (or the streams, when more)."""
        return min(max(2 * concurrency, 8), max(self.num_prompts, concurrency))

    def rounds_at(self, concurrency: int, system: str) -> int:
        """Interleaved rounds of one system at a level: ``rounds`` where a target on it is
        judged, else one. At the target concurrency every system of the ratios (naive:
        ``naive_rounds``); at the lowest level limit, ours1 and direct (router overhead);
        ours/llama.cpp is judged at every level: there the llama.cpp systems, and ours1 when
        they run, get ``llamacpp_rounds`` at least."""
        if system not in INTERLEAVED:
            return 1
        if concurrency == self.target_concurrency:
            return min(self.rounds, self.naive_rounds) if system == "naive" else self.rounds
        if concurrency == min(self.concurrency) and system in ("limit", "ours1", "direct"):
            return self.rounds
        llamacpp_rounds = min(self.rounds, self.llamacpp_rounds)
        if system in llamacpp.SYSTEMS:
            return llamacpp_rounds
        if system == "ours1" and any(x in self.systems for x in llamacpp.SYSTEMS):
            return llamacpp_rounds
        return 1

    @property
    def levels(self) -> list[tuple[int, int]]:
        return [(c, self.requests_at(c)) for c in self.concurrency]


SMOKE_DEFAULTS = {
    "concurrency": (2,),
    "rounds": 1,
    "num_prompts": 4,
    "max_new_tokens": 4,
    "max_prompt_tokens": 48,
    "null_streams": 8,
    "null_new_tokens": 8,
    "peer_cb_num_blocks": 32,
    "system_timeout_s": 180.0,
    "start_timeout_s": 240.0,
}


def load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# ----- measuring ------------------------------------------------------------------------


async def measure_client(
    client,
    workload: Workload,
    levels: list[tuple[int, int]],
    *,
    warmup_requests: int,
    expect_workers: int = 0,
    procs: Sequence[ServerProc] = (),
) -> dict[str, dict]:
    """Warms the system up, then runs each (concurrency, requests) level in turn.

    Each level also records the CPU seconds every server process and this client used
    during it: on a 2-core machine that shows where the time goes."""
    warm_tokens = min(4, workload.max_new_tokens)

    async def warm(prompt, record):
        await client.request_tokens(prompt, record, warm_tokens)

    seen: set[str] = set()
    for _ in range(5):
        # Untimed: first-call allocations, connection set-up, the peer's CB start-up.
        records = await run_closed_loop(workload.cycle(warmup_requests), warmup_requests, warm)
        if all(r.error for r in records):
            raise RuntimeError(f"warm-up failed: {records[0].error}")
        seen.update(r.worker_id for r in records if r.worker_id)
        # A router over two workers must reach both before the timed run.
        if len(seen) >= expect_workers:
            break
    levels_out: dict[str, dict] = {}
    for concurrency, n_requests in levels:
        cpu_before = _cpu_snapshot(procs)
        records = await run_closed_loop(workload.cycle(n_requests), concurrency, client.request)
        cpu_after = _cpu_snapshot(procs)
        summary = summarize(records, workload.max_new_tokens)
        summary["cpu_s"] = {
            name: round(after - before, 2)
            for name, before in cpu_before.items()
            if before is not None and (after := cpu_after.get(name)) is not None
        }
        by_worker = Counter(r.worker_id for r in records if r.worker_id)
        if by_worker:
            summary["by_worker"] = dict(by_worker)
        summary["concurrency"] = concurrency
        levels_out[str(concurrency)] = summary
        logger.info(
            "  c=%d: %s tok/s, TTFT p50 %s ms, errors %d",
            concurrency,
            summary.get("tokens_per_s"),
            (summary.get("ttft_ms") or {}).get("p50"),
            summary["errors"],
        )
    return levels_out


def _cpu_snapshot(procs: Sequence[ServerProc]) -> dict[str, float | None]:
    snapshot = {p.name: cpu_seconds(p.pid) for p in procs}
    snapshot["client"] = time.process_time()
    return snapshot


def run_async(coro: Awaitable, timeout_s: float):
    async def bounded():
        return await asyncio.wait_for(coro, timeout_s)

    return asyncio.run(bounded())


def measure_levels(
    client: GrpcStreamClient | OpenAIStreamClient,
    workload: Workload,
    levels: list[tuple[int, int]],
    settings: Settings,
    procs: list[ServerProc],
    expect_workers: int = 0,
) -> dict[str, dict]:
    """:func:`measure_client` with ``client`` (opened and closed here), bounded by the
    system timeout."""

    async def go():
        async with client:
            return await measure_client(
                client,
                workload,
                levels,
                warmup_requests=min(4, max(c for c, _ in levels)),
                expect_workers=expect_workers,
                procs=procs,
            )

    return run_async(go(), settings.system_timeout_s)


def router_argv(workers: Sequence[ServerProc], port: int, *flags: str) -> list[str]:
    """``llmcluster router`` on loopback ``port`` over ``workers``, plus ``flags``."""
    addresses = ",".join(w.address for w in workers)
    return llmcluster_argv(
        "router", "--host", "127.0.0.1", "--port", str(port), "--workers", addresses, *flags
    )


# ----- phases: which processes to start for which systems -----------------------------


class Phase:
    """A group of processes and the systems measured on them."""

    name = "phase"
    provides: tuple[str, ...] = ()

    def __init__(self, settings: Settings, workload: Workload, registry: ProcessRegistry):
        self.settings = settings
        self.workload = workload
        self.registry = registry
        self.procs: list[ServerProc] = []
        self.wanted = [s for s in self.provides if s in settings.systems]
        self.done: dict[str, dict] = {}  # systems measured so far (kept on Ctrl-C)

    def skip_reasons(self) -> dict[str, str]:
        """{system: why it cannot run here}, for the wanted systems that cannot."""
        return {}

    def start(self) -> None:
        """Launches the processes (does not wait for them)."""

    def wait_ready(self) -> None:
        for proc in self.procs:
            proc.wait_healthy(self.settings.start_timeout_s)

    def measure(self) -> dict[str, dict]:
        """Returns {system: {"levels": ..., "processes": [...]}}."""
        raise NotImplementedError

    def processes(self, *names: str) -> dict[str, dict]:
        out = {}
        for proc in self.procs:
            if not names or proc.name in names:
                out[proc.name] = {"pid": proc.pid, "peak_rss_mb": proc.sample_rss()}
        return out

    def stop(self) -> None:
        stop_all(list(reversed(self.procs)))  # routers before their workers


class LimitRunner:
    """The limit child (``benchmarks.limit``): a warm engine that runs one level per
    command, so its levels can be interleaved with the gRPC systems'."""

    def __init__(self, settings: Settings, workload: Workload, registry: ProcessRegistry):
        self.settings = settings
        self.dir = Path(tempfile.mkdtemp(prefix="bench-limit-"))
        self.ready_path = self.dir / "ready.json"
        workload_path = self.dir / "workload.json"
        workload.save(workload_path)
        argv = [
            sys.executable,
            "-m",
            "benchmarks.limit",
            "--workload",
            str(workload_path),
            "--dtype",
            settings.dtype,
            "--weights",
            settings.weights,
            "--max-running",
            str(settings.max_running),
            "--ready",
            str(self.ready_path),
        ]
        self.proc = registry.start("limit", argv, port=0, health="none", stdin_pipe=True)
        self.peak_rss_mb: float | None = None
        self._levels_run = 0

    def _wait_for(self, path: Path, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not path.exists():
            if self.proc.popen.poll() is not None:
                raise RuntimeError(
                    f"limit runner exited with {self.proc.popen.returncode} {what}:\n"
                    f"{self.proc.output()}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(f"limit runner not done {what} in {timeout_s}s")
            time.sleep(0.05)

    def wait_ready(self) -> None:
        self._wait_for(self.ready_path, self.settings.start_timeout_s, "loading the model")

    def run_level(self, concurrency: int, n_requests: int) -> dict:
        """Runs one closed-loop level in the child; returns its summary."""
        self._levels_run += 1
        out_path = self.dir / f"level-{self._levels_run}.json"
        command = {"concurrency": concurrency, "requests": n_requests, "out": str(out_path)}
        stdin = self.proc.popen.stdin
        assert stdin is not None
        cpu_before = cpu_seconds(self.proc.pid)
        stdin.write((json.dumps(command) + "\n").encode())
        stdin.flush()
        self._wait_for(out_path, self.settings.system_timeout_s, f"with level {concurrency}")
        cpu_after = cpu_seconds(self.proc.pid)
        data = json.loads(out_path.read_text())
        self.peak_rss_mb = data.get("peak_rss_mb")
        records = [RequestRecord.from_json(r) for r in data["records"]]
        summary = summarize(records, self.settings.max_new_tokens)
        if cpu_before is not None and cpu_after is not None:
            summary["cpu_s"] = {"limit": round(cpu_after - cpu_before, 2)}
        return summary


def combine_rounds(summaries: list[dict]) -> dict:
    """One level measured in several interleaved rounds: the median round (by
    throughput) stands for it; ``rounds`` keeps each round's key figures, for the
    paired ratios; requests / completed / errors count every round."""
    if len(summaries) == 1:
        return summaries[0]
    measured = sorted(
        (s for s in summaries if s.get("tokens_per_s") is not None),
        key=lambda s: s["tokens_per_s"],
    )
    out = dict(measured[(len(measured) - 1) // 2] if measured else summaries[-1])
    out["rounds"] = [
        {
            "round": s.get("round", i),
            "tokens_per_s": s.get("tokens_per_s"),
            "ttft_ms": {"p50": (s.get("ttft_ms") or {}).get("p50")},
            "client_minus_server_ttft_ms": s.get("client_minus_server_ttft_ms"),
            "errors": s.get("errors"),
        }
        for i, s in enumerate(summaries)
    ]
    for key in ("requests", "completed", "errors"):
        out[key] = sum(s.get(key, 0) for s in summaries)
    out["first_errors"] = [e for s in summaries for e in s.get("first_errors", [])][:3]
    return out


def peer_skip_reason() -> str | None:
    """Why the peer cannot run here (None = it can): ``transformers serve``'s packages."""
    missing = [m for m in PEER_PACKAGES if importlib.util.find_spec(m) is None]
    if missing:
        pins = " ".join(PEER_PACKAGES[m] for m in PEER_PACKAGES)
        return f"transformers serve needs {', '.join(missing)}: pip install {pins}"
    return None


def peer_request_fields(max_new_tokens: int) -> dict[str, object]:
    """transformers serve's request fields: ``generation_config`` replaces its defaults:
    greedy, exactly max_new_tokens, and eos_token_id -1 (transformers' "no EOS") so EOS
    is ignored as in every other system."""
    generation_config = {"max_new_tokens": max_new_tokens, "do_sample": False, "eos_token_id": -1}
    return {"generation_config": json.dumps(generation_config)}


def llamacpp_request_fields(max_new_tokens: int) -> dict[str, object]:
    """llama-server's request fields (:data:`benchmarks.llamacpp.REQUEST_FIELDS`)."""
    return dict(llamacpp.REQUEST_FIELDS)


class ModelPhase(Phase):
    """Every system that runs the model, on processes up together.

    limit, ours1, direct (ours1's worker, no router), peer, the llama.cpp systems and
    naive are measured level by level in interleaved rounds (``Settings.rounds_at``), the
    order rotating each round: a machine whose speed drifts over minutes (seen here:
    +/-10%, and -40% in a bad hour, between measurements minutes apart) then drifts under
    both sides of a ratio alike. ours2 gets two workers with half the cores each (two
    full-width torch pools on the same cores would thrash) and is measured once, after
    them. Idle processes wait on sockets or stdin and use no CPU (the idle peer: 0.5% of
    a core).
    A llama.cpp system's server starts at its first level and restarts whenever the
    level's concurrency (its slot count) changes.
    """

    name = "model"
    provides = ("limit", "ours1", "direct", "peer", *llamacpp.SYSTEMS, "naive", "ours2")

    limit: LimitRunner | None = None
    w1: ServerProc | None = None
    w2a: ServerProc | None = None
    w2b: ServerProc | None = None
    r1: ServerProc | None = None
    r2: ServerProc | None = None
    naive: ServerProc | None = None
    peer: ServerProc | None = None

    def __init__(self, settings: Settings, workload: Workload, registry: ProcessRegistry):
        super().__init__(settings, workload, registry)
        self.start_failed: dict[str, str] = {}  # {system: why its server did not start}
        self.ggufs: dict[str, Path] = {}  # {llama.cpp system: the GGUF it serves}
        # {llama.cpp system: (slots, its server now)}, and every server it ran on.
        self.llamacpp_now: dict[str, tuple[int, ServerProc]] = {}
        self.llamacpp_servers: dict[str, list[ServerProc]] = {}

    def skip_reasons(self) -> dict[str, str]:
        reasons = {}
        reason = peer_skip_reason() if "peer" in self.wanted else None
        if reason:
            reasons["peer"] = reason
        reason = llamacpp.server_skip_reason(Path(self.settings.llama_server))
        for system in llamacpp.SYSTEMS:
            if system in self.wanted and reason:
                reasons[system] = reason
        return reasons

    def _worker(self, name: str, threads: int | None = None) -> ServerProc:
        port = free_port()
        argv = llmcluster_argv(
            "worker",
            "--port",
            str(port),
            "--dtype",
            self.settings.dtype,
            "--weights",
            self.settings.weights,
            "--device",
            "cpu",
            "--worker-id",
            name,
            "--max-running",
            str(self.settings.max_running),
            *SELF_TEST_ARGS,
        )
        env = {"OMP_NUM_THREADS": str(threads)} if threads else None
        return self.registry.start(name, argv, port=port, env=env)

    def _router(self, name: str, workers: list[ServerProc]) -> ServerProc:
        port = free_port()
        return self.registry.start(name, router_argv(workers, port), port=port)

    def _start_naive(self) -> ServerProc:
        port = free_port()
        argv = [
            sys.executable,
            "-m",
            "benchmarks.naive_server",
            "--port",
            str(port),
            "--dtype",
            self.settings.dtype,
        ]
        return self.registry.start("naive", argv, port=port)

    def _start_peer(self) -> ServerProc:
        from common.models import resolve_model

        port = free_port()
        argv = [
            sys.executable,
            "-m",
            "transformers.cli.transformers",
            "serve",
            resolve_model(None).path,
            "--continuous-batching",
            "--device",
            "cpu",
            "--dtype",
            self.settings.dtype,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ]
        if self.settings.peer_cb_num_blocks:
            argv += ["--cb-num-blocks", str(self.settings.peer_cb_num_blocks)]
        # Offline, and no "new version available" look-up at start.
        env = {"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_UPDATE_CHECK": "1"}
        return self.registry.start("peer", argv, port=port, health="http", env=env)

    def _llamacpp_server(self, system: str, slots: int) -> ServerProc:
        """``system``'s llama-server with ``slots`` slots, (re)started when the slot
        count differs: it is fixed at start, and slots = the level's concurrency."""
        now = self.llamacpp_now.get(system)
        if now is not None and now[0] == slots:
            return now[1]
        if now is not None:
            now[1].stop()
        s = self.settings
        port = free_port()
        argv = llamacpp.server_argv(
            Path(s.llama_server),
            self.ggufs[system],
            port,
            slots=slots,
            slot_context_tokens=s.max_prompt_tokens
            + s.max_new_tokens
            + llamacpp.CONTEXT_MARGIN_TOKENS,
            # --smoke: one thread, as every torch process there gets.
            threads=s.llamacpp_threads or (1 if s.smoke else cpu_count()),
        )
        proc = self.registry.start(f"{system}-np{slots}", argv, port=port, health="http")
        self.procs.append(proc)
        self.llamacpp_servers.setdefault(system, []).append(proc)
        self.llamacpp_now[system] = (slots, proc)
        proc.wait_healthy(s.start_timeout_s)
        return proc

    def start(self) -> None:
        if "limit" in self.wanted:
            self.limit = LimitRunner(self.settings, self.workload, self.registry)
            self.procs.append(self.limit.proc)
        if "ours1" in self.wanted or "direct" in self.wanted:
            self.w1 = self._worker("worker1")
            self.procs.append(self.w1)
        if "ours2" in self.wanted:
            if self.settings.smoke and self.w1 is not None:
                # Seconds matter in --smoke: reuse worker1 as one of the two.
                self.w2a = self.w1
                self.w2b = self._worker("worker2b")
                self.procs.append(self.w2b)
            else:
                half = max(1, cpu_count() // 2)
                self.w2a = self._worker("worker2a", threads=half)
                self.w2b = self._worker("worker2b", threads=half)
                self.procs += [self.w2a, self.w2b]
        if "naive" in self.wanted:
            self.naive = self._start_naive()
            self.procs.append(self.naive)
        if "peer" in self.wanted and self.settings.smoke:
            self.peer = self._start_peer()  # listed and waited for in wait_ready

    def wait_ready(self) -> None:
        super().wait_ready()  # the limit's "none" health passes at once
        if self.limit is not None:
            self.limit.wait_ready()
        # Routers start once their workers serve, so their first health check passes.
        if "ours1" in self.wanted:
            assert self.w1 is not None
            self.r1 = self._router("router1", [self.w1])
            self.procs.append(self.r1)
            self.r1.wait_healthy(self.settings.start_timeout_s)
        if "ours2" in self.wanted:
            assert self.w2a is not None and self.w2b is not None
            self.r2 = self._router("router2", [self.w2a, self.w2b])
            self.procs.append(self.r2)
            self.r2.wait_healthy(self.settings.start_timeout_s)
        for system in llamacpp.SYSTEMS:
            if system in self.wanted:
                try:  # the F32 GGUF is written here on first use (untimed)
                    self.ggufs[system] = llamacpp.model_gguf(system)
                except Exception as exc:  # noqa: BLE001 - the others are still measured
                    logger.exception("no GGUF for %s", system)
                    self.start_failed[system] = f"{type(exc).__name__}: {exc}"
        if "peer" in self.wanted:
            if self.peer is None:
                # Last: transformers serve sizes its KV cache from the RAM left free, so
                # it must see the others' memory already taken.
                self.peer = self._start_peer()
            self.procs.append(self.peer)
            try:  # not in super().wait_ready(): a peer that fails must not stop ours
                self.peer.wait_healthy(self.settings.start_timeout_s)
            except Exception as exc:  # noqa: BLE001 - ours are still measured
                logger.exception("the peer did not start")
                self.start_failed["peer"] = f"{type(exc).__name__}: {exc}"

    def _servers(self, system: str) -> list[ServerProc]:
        """The processes a served system runs on; the first is the one clients call."""
        if system in llamacpp.SYSTEMS:
            return [self.llamacpp_now[system][1]]
        servers = {
            "ours1": [self.r1, self.w1],
            "direct": [self.w1],
            "ours2": [self.r2, self.w2a, self.w2b],
            "naive": [self.naive],
            "peer": [self.peer],
        }[system]
        assert all(p is not None for p in servers), system
        return [p for p in servers if p is not None]

    def _measure_level(self, system: str, concurrency: int, n_requests: int) -> dict:
        if system == "limit":
            assert self.limit is not None
            return self.limit.run_level(concurrency, n_requests)
        if system in llamacpp.SYSTEMS:
            self._llamacpp_server(system, slots=concurrency)
        servers = self._servers(system)
        max_new = self.workload.max_new_tokens
        client: GrpcStreamClient | OpenAIStreamClient
        if system == "peer":
            client = OpenAIStreamClient("127.0.0.1", servers[0].port, max_new, peer_request_fields)
        elif system in llamacpp.SYSTEMS:
            client = OpenAIStreamClient(
                "127.0.0.1", servers[0].port, max_new, llamacpp_request_fields
            )
        else:
            client = GrpcStreamClient(servers[0].address, max_new)
        by_level = measure_levels(
            client,
            self.workload,
            [(concurrency, n_requests)],
            self.settings,
            servers,
            expect_workers=2 if system == "ours2" else 0,
        )
        return by_level[str(concurrency)]

    def _processes_of(self, system: str) -> dict[str, dict]:
        if system == "limit":
            assert self.limit is not None
            return {"limit": {"pid": self.limit.proc.pid, "peak_rss_mb": self.limit.peak_rss_mb}}
        if system in llamacpp.SYSTEMS:  # every server it ran on, one per slot count
            return self.processes(*(p.name for p in self.llamacpp_servers.get(system, [])))
        return self.processes(*(p.name for p in self._servers(system)))

    def schedule(self) -> list[tuple[str, int, int, int]]:
        """(system, concurrency, requests, round), in the order they run."""
        interleaved = [x for x in INTERLEAVED if x in self.wanted]
        out: list[tuple[str, int, int, int]] = []
        for concurrency, n_requests in self.settings.levels:
            rounds = {x: self.settings.rounds_at(concurrency, x) for x in interleaved}
            for r in range(max(rounds.values(), default=0)):
                here = [x for x in interleaved if rounds[x] > r]
                shift = r % len(here)
                out += [(x, concurrency, n_requests, r) for x in here[shift:] + here[:shift]]
        if "ours2" in self.wanted:
            out += [("ours2", c, n, 0) for c, n in self.settings.levels]
        return out

    def measure(self) -> dict[str, dict]:
        rounds: dict[str, dict[str, list[dict]]] = {x: {} for x in self.wanted}
        failed = dict(self.start_failed)
        for system, concurrency, n_requests, r in self.schedule():
            if system in failed:
                continue
            logger.info("measuring %s at %d streams (round %d)", system, concurrency, r)
            try:
                summary = self._measure_level(system, concurrency, n_requests)
            except Exception as exc:  # noqa: BLE001 - the others still run
                logger.exception("%s failed", system)
                failed[system] = f"{type(exc).__name__}: {exc}"
                continue
            summary["concurrency"] = concurrency
            summary["round"] = r
            rounds[system].setdefault(str(concurrency), []).append(summary)
            # Kept as it goes, so Ctrl-C still reports the levels measured so far.
            self.done[system] = self._result(system, rounds[system])
        out: dict[str, dict] = {}
        for system in self.wanted:
            if system in failed:
                out[system] = {"status": "failed", "reason": failed[system]}
            else:
                out[system] = self._result(system, rounds[system])
        return out

    def _result(self, system: str, by_level: dict[str, list[dict]]) -> dict:
        levels = {c: combine_rounds(summaries) for c, summaries in by_level.items()}
        return {"levels": levels, "processes": self._processes_of(system)}


class NullPhase(Phase):
    """One null-engine worker at ``null_streams`` concurrent streams, behind a router
    with its default (``null``: a message per token) and, measured after it, one with
    ``--stream-interval-ms`` (``null_interval``)."""

    name = "null"
    provides = ("null", "null_interval")
    routers: dict[str, ServerProc]  # {system: its router}, set by wait_ready

    def start(self) -> None:
        s = self.settings
        streams = s.null_streams
        worker_port = free_port()
        argv = llmcluster_argv(
            "worker",
            "--engine",
            "null",
            "--port",
            str(worker_port),
            "--worker-id",
            "null-worker",
            "--null-step-ms",
            str(s.null_step_ms),
            "--max-running",
            str(streams),
            "--max-queue",
            str(max(256, 2 * streams)),
            "--max-kv-tokens",
            str(max(65536, 2 * streams * (s.max_prompt_tokens + 8 + s.null_new_tokens))),
            "--max-new-tokens-limit",
            str(max(2048, s.null_new_tokens)),
            *SELF_TEST_ARGS,
        )
        self.worker = self.registry.start("null-worker", argv, port=worker_port)
        self.procs = [self.worker]

    def _router(self, name: str, stream_interval_ms: float) -> ServerProc:
        port = free_port()
        argv = router_argv(
            [self.worker],
            port,
            "--max-queue",
            str(max(1024, 4 * self.settings.null_streams)),
            "--stream-interval-ms",
            str(stream_interval_ms),
        )
        return self.registry.start(name, argv, port=port)

    def wait_ready(self) -> None:
        super().wait_ready()
        self.routers = {}
        if "null" in self.wanted:
            self.routers["null"] = self._router("null-router", 0.0)
        if "null_interval" in self.wanted:
            self.routers["null_interval"] = self._router(
                "null-router-interval", self.settings.null_stream_interval_ms
            )
        self.procs += list(self.routers.values())
        for router in self.routers.values():
            router.wait_healthy(self.settings.start_timeout_s)

    def measure(self) -> dict[str, dict]:
        s = self.settings
        workload = dataclasses.replace(self.workload, max_new_tokens=s.null_new_tokens)
        levels = [(s.null_streams, 2 * s.null_streams)]
        out = {}
        for system, router in self.routers.items():
            servers = [router, self.worker]
            client = GrpcStreamClient(router.address, workload.max_new_tokens)
            lv = measure_levels(client, workload, levels, s, servers)
            out[system] = {"levels": lv, "processes": self.processes(*(p.name for p in servers))}
            self.done[system] = out[system]
        return out


PHASES: tuple[type[Phase], ...] = (ModelPhase, NullPhase)


def run_phases(settings: Settings, workload: Workload) -> tuple[dict[str, dict], bool]:
    """Starts, measures and stops each phase; returns (systems, interrupted). In --smoke
    every process starts at once (seconds matter, timings do not); in the full mode one
    phase runs at a time so
    idle servers and start-ups do not steal the measured system's cores."""
    # In --smoke every process shares the cores at once: one torch thread each keeps
    # OpenMP from spinning on preempted threads, which slows an oversubscribed machine
    # to a crawl.
    registry = ProcessRegistry({"OMP_NUM_THREADS": "1"} if settings.smoke else None)
    systems: dict[str, dict] = {}
    phases: list[Phase] = []
    interrupted = False
    try:
        for cls in PHASES:
            phase = cls(settings, workload, registry)
            for system, reason in phase.skip_reasons().items():
                logger.warning("skipping %s: %s", system, reason)
                systems[system] = {"status": "skipped", "reason": reason}
                phase.wanted.remove(system)
            if phase.wanted:
                phases.append(phase)
        if settings.smoke:
            for phase in phases:
                phase.start()
        for phase in phases:
            load_before = load_avg()
            started = time.monotonic()
            try:
                if not settings.smoke:
                    phase.start()
                phase.wait_ready()
                logger.info("phase %s ready in %.1fs", phase.name, time.monotonic() - started)
                results = phase.measure()
            except Exception as exc:  # noqa: BLE001 - report it, run the other phases
                logger.exception("phase %s failed", phase.name)
                results = {
                    s: {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"}
                    for s in phase.wanted
                }
            except KeyboardInterrupt:
                # Ctrl-C / SIGTERM: keep what was measured, report it, run nothing more.
                logger.warning("interrupted during %s: reporting what was measured", phase.name)
                interrupted = True
                results = dict(phase.done)
            finally:
                phase.stop()
            for system, result in results.items():
                result.setdefault("status", "ok")
                result["load_avg_before"] = load_before
                result["load_avg_after"] = load_avg()
                # RSS sampled at stop time is the final peak (VmHWM never shrinks).
                for name, info in result.get("processes", {}).items():
                    proc = next((p for p in phase.procs if p.name == name), None)
                    if proc is not None and proc.peak_rss_mb is not None and name != "limit":
                        info["peak_rss_mb"] = proc.peak_rss_mb
                systems[system] = result
            if interrupted:
                break
    finally:
        registry.stop_all()
    for system in settings.systems:
        reason = "interrupted" if interrupted else "not run"
        systems.setdefault(
            system, {"status": "failed" if interrupted else "skipped", "reason": reason}
        )
        systems[system]["description"] = DESCRIPTIONS[system]
    return {s: systems[s] for s in ALL_SYSTEMS if s in systems}, interrupted


# ----- ratios, targets, report -----------------------------------------------------------


def _level(systems: dict, system: str, concurrency: int | str) -> dict | None:
    result = systems.get(system) or {}
    if result.get("status") != "ok":
        return None
    level = (result.get("levels") or {}).get(str(concurrency))
    return level if level and level.get("completed") else None


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return round(a / b, 3)


def _difference(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(a - b, 3)


def _paired(
    la: dict,
    lb: dict,
    metric: Callable[[dict], float | None],
    compare: Callable[[float | None, float | None], float | None] = _ratio,
) -> float | None:
    """``compare(metric(a), metric(b))`` of two levels. Where both were measured in
    interleaved rounds, the median over their common rounds of each round's comparison:
    the two measurements of a round ran minutes apart at most, so drift cancels."""
    ra, rb = la.get("rounds"), lb.get("rounds")
    if ra and rb:
        by_round = {y["round"]: y for y in rb}
        values = sorted(
            v
            for x in ra
            if (y := by_round.get(x["round"])) is not None
            and (v := compare(metric(x), metric(y))) is not None
        )
        if values:
            return round(statistics.median(values), 3)
    return compare(metric(la), metric(lb))


def _per_level(
    systems: dict,
    concurrency: tuple[int, ...],
    a: str,
    b: str,
    metric: Callable[[dict], float | None],
) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for c in concurrency:
        la, lb = _level(systems, a, c), _level(systems, b, c)
        out[str(c)] = _paired(la, lb, metric) if la and lb else None
    return out


def _tps(level: dict) -> float | None:
    return level.get("tokens_per_s")


def _ttft50(level: dict | None) -> float | None:
    if level is None:
        return None
    return (level.get("ttft_ms") or {}).get("p50")


def _ours_llamacpp(systems: dict, concurrency: tuple[int, ...]) -> dict[str, dict]:
    """ours1 against the best llama.cpp configuration at each level, each metric against
    the configuration best at it: tokens/s against the faster one, TTFT p50 against the
    one with the lower TTFT p50 (the stricter reading of "no worse than theirs")."""
    throughput: dict[str, float | None] = {}
    ttft: dict[str, float | None] = {}
    best: dict[str, dict[str, str] | None] = {}
    for c in concurrency:
        key = str(c)
        ours = _level(systems, "ours1", c)
        theirs = {x: lv for x in llamacpp.SYSTEMS if (lv := _level(systems, x, c))}
        if ours is None or not theirs:
            throughput[key] = ttft[key] = best[key] = None
            continue
        fastest = max(theirs, key=lambda x: _tps(theirs[x]) or 0.0)
        quickest = min(theirs, key=lambda x: _ttft50(theirs[x]) or float("inf"))
        throughput[key] = _paired(ours, theirs[fastest], _tps)
        ttft[key] = _paired(ours, theirs[quickest], _ttft50)
        best[key] = {"throughput": fastest, "ttft_p50": quickest}
    return {
        "ours_llamacpp_throughput": throughput,
        "ours_llamacpp_ttft_p50": ttft,
        "llamacpp_best": best,
    }


def compute_ratios(systems: dict, settings: Settings) -> dict:
    """Every printed ratio, per concurrency level where both systems ran."""
    conc = settings.concurrency
    ratios: dict = {
        "ours_limit_throughput": _per_level(systems, conc, "ours1", "limit", _tps),
        "ours2_limit_throughput": _per_level(systems, conc, "ours2", "limit", _tps),
        "ours_naive_throughput": _per_level(systems, conc, "ours1", "naive", _tps),
        "ours_peer_throughput": _per_level(systems, conc, "ours1", "peer", _tps),
        "ours_peer_ttft_p50": _per_level(systems, conc, "ours1", "peer", _ttft50),
        **_ours_llamacpp(systems, conc),
    }
    # Router TTFT overhead. Client TTFT minus the worker's own TTFT (from its arrival)
    # is transport + routing; the router's share is that through the router minus the
    # same straight to the worker. Prefill time, which varies far more than the
    # overhead, cancels out. Measured at the lowest concurrency (no queueing).
    c0 = min(conc)
    ours, direct = _level(systems, "ours1", c0), _level(systems, "direct", c0)
    overhead: dict = {"concurrency": c0, "p50": None, "p99": None}
    if ours and direct:
        for q in ("p50", "p99"):

            def transport(level: dict, q: str = q) -> float | None:
                return (level.get("client_minus_server_ttft_ms") or {}).get(q)

            overhead[q] = _paired(ours, direct, transport, _difference)
        differences: dict[str, float | None] = {}
        for c in conc:
            la, lb = _level(systems, "ours1", c), _level(systems, "direct", c)
            differences[str(c)] = _paired(la, lb, _ttft50, _difference) if la and lb else None
        overhead["ttft_p50_difference_ms"] = differences
    ratios["router_ttft_overhead_ms"] = overhead
    null = _level(systems, "null", settings.null_streams)
    null_interval = _level(systems, "null_interval", settings.null_streams)
    ratios["null_tokens_per_s"] = {
        "streams": settings.null_streams,
        "step_ms": settings.null_step_ms,
        "value": null.get("tokens_per_s") if null else None,
        "stream_interval_ms": settings.null_stream_interval_ms,
        "value_with_interval": null_interval.get("tokens_per_s") if null_interval else None,
    }
    router_rss = {}
    for system, names in (
        ("ours1", ["router1"]),
        ("ours2", ["router2"]),
        ("null", ["null-router"]),
        ("null_interval", ["null-router-interval"]),
    ):
        for name in names:
            info = ((systems.get(system) or {}).get("processes") or {}).get(name)
            if info and info.get("peak_rss_mb") is not None:
                router_rss[name] = info["peak_rss_mb"]
    ratios["router_peak_rss_mb"] = {
        "max": max(router_rss.values()) if router_rss else None,
        "by_process": router_rss,
    }
    return ratios


def evaluate_targets(ratios: dict, settings: Settings) -> list[dict]:
    """PASS / MISS per target of issues 7 and 19; n/a where the run did not measure it."""
    at = str(settings.target_concurrency)

    def check(name: str, value, ok: Callable[[float], bool], target: str, where: str) -> dict:
        if value is None:
            status = "n/a"
        else:
            status = "PASS" if ok(value) else "MISS"
        return {"name": name, "target": target, "value": value, "at": where, "status": status}

    overhead = ratios["router_ttft_overhead_ms"]
    null = ratios["null_tokens_per_s"]
    return [
        check(
            "ours/limit throughput",
            ratios["ours_limit_throughput"].get(at),
            lambda v: v >= 0.90,
            ">= 0.90",
            f"{at} streams",
        ),
        check(
            "ours/naive throughput",
            ratios["ours_naive_throughput"].get(at),
            lambda v: v >= 5.0,
            ">= 5x",
            f"{at} streams",
        ),
        check(
            "ours/peer throughput",
            ratios["ours_peer_throughput"].get(at),
            lambda v: v >= 2.0,
            ">= 2x",
            f"{at} streams",
        ),
        check(
            "ours/peer TTFT p50",
            ratios["ours_peer_ttft_p50"].get(at),
            lambda v: v <= 0.5,
            "<= 0.5",
            f"{at} streams",
        ),
        *(
            check(
                "ours/best llama.cpp throughput",
                ratios["ours_llamacpp_throughput"].get(str(c)),
                lambda v: v >= 1.25,
                ">= 1.25x",
                f"{c} stream(s)",
            )
            for c in settings.concurrency
        ),
        *(
            check(
                "ours/best llama.cpp TTFT p50",
                ratios["ours_llamacpp_ttft_p50"].get(str(c)),
                lambda v: v <= 1.0,
                "<= 1.0",
                f"{c} stream(s)",
            )
            for c in settings.concurrency
        ),
        check(
            "router TTFT overhead p50 (ms)",
            overhead.get("p50"),
            lambda v: v < 3.0,
            "< 3 ms",
            f"{overhead['concurrency']} stream(s)",
        ),
        check(
            "null engine tokens/s",
            null["value"] if null["streams"] == 256 else None,
            lambda v: v >= 25000,
            ">= 25000",
            f"{null['streams']} streams, a message per token",
        ),
        check(
            "null engine tokens/s, interval",
            null["value_with_interval"] if null["streams"] == 256 else None,
            lambda v: v >= 40000,
            ">= 40000",
            f"{null['streams']} streams, --stream-interval-ms {_fmt(null['stream_interval_ms'], 0)}",
        ),
        check(
            "router peak RSS (MB)",
            ratios["router_peak_rss_mb"]["max"],
            lambda v: v < 150,
            "< 150 MB",
            "max over routers",
        ),
    ]


def build_report(
    settings: Settings, workload: Workload, systems: dict, started: str, load_start
) -> dict:
    """The JSON document.

    ``schema``, ``mode`` (smoke|full), ``started_at``, ``machine`` (cpus, platform,
    load averages), ``settings``, ``workload`` (prompt-length stats), ``systems``
    ({name: {status ok|skipped|failed, reason, description, processes {name: {pid,
    peak_rss_mb}}, levels {concurrency: summary}}}, where a summary holds requests,
    completed, errors, wall_s, generated_tokens, tokens_per_s, requests_per_s,
    ttft_ms / itl_ms / e2e_ms {p50, p90, p99, mean}, short_requests,
    client_minus_server_ttft_ms, cpu_s, round, and for interleaved systems rounds [{round,
    tokens_per_s, ttft_ms {p50}, client_minus_server_ttft_ms, errors}]: the summary is then
    the median round's, with requests / completed / errors over all rounds}), ``ratios``
    (see :func:`compute_ratios`; paired by round where both systems have rounds; ours vs
    the best llama.cpp configuration: :func:`_ours_llamacpp`) and
    ``targets`` ([{name, target, value, at, status PASS|MISS|n/a}]).
    """
    ratios = compute_ratios(systems, settings)
    lengths = [p.prompt_tokens for p in workload.prompts]
    return {
        "schema": SCHEMA,
        "mode": "smoke" if settings.smoke else "full",
        "started_at": started,
        "machine": {
            "cpus": cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_avg_start": load_start,
            "load_avg_end": load_avg(),
        },
        "settings": dataclasses.asdict(settings),
        "workload": {
            "num_prompts": len(lengths),
            "prompt_tokens": {
                "min": min(lengths),
                "max": max(lengths),
                "mean": round(sum(lengths) / len(lengths), 1),
            },
            "max_new_tokens": workload.max_new_tokens,
            "seed": workload.seed,
            "requests_per_level": {str(c): n for c, n in settings.levels},
        },
        "systems": systems,
        "ratios": ratios,
        "targets": evaluate_targets(ratios, settings),
    }


def _fmt(value, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def format_report(report: dict) -> str:
    """The human-readable table, ratios and targets."""
    lines = []
    m = report["machine"]
    w = report["workload"]
    lines.append(
        f"serving benchmark ({report['mode']}, {report['settings']['dtype']}, "
        f"weights {report['settings'].get('weights', 'auto')}): "
        f"{w['num_prompts']} prompts of {w['prompt_tokens']['min']}-{w['prompt_tokens']['max']} "
        f"tokens, {w['max_new_tokens']} new tokens each, greedy, EOS ignored; "
        f"{m['cpus']} cpus, load avg {m['load_avg_start']} -> {m['load_avg_end']}"
    )
    header = (
        f"{'system':<13} {'conc':>5} {'reqs':>5} {'tok/s':>9} {'req/s':>7} "
        f"{'TTFT p50':>9} {'p90':>8} {'p99':>8} {'ITL p50':>8} {'p90':>7} {'p99':>7} {'err':>4}"
    )
    lines += ["", header, "-" * len(header)]
    for name, result in report["systems"].items():
        if result.get("status") != "ok":
            lines.append(f"{name:<13} {result.get('status')}: {result.get('reason')}")
            continue
        for c, lv in result["levels"].items():
            t, i = lv.get("ttft_ms") or {}, lv.get("itl_ms") or {}
            lines.append(
                f"{name:<13} {c:>5} {lv['requests']:>5} {_fmt(lv.get('tokens_per_s')):>9} "
                f"{_fmt(lv.get('requests_per_s'), 2):>7} {_fmt(t.get('p50')):>9} "
                f"{_fmt(t.get('p90')):>8} {_fmt(t.get('p99')):>8} {_fmt(i.get('p50')):>8} "
                f"{_fmt(i.get('p90')):>7} {_fmt(i.get('p99')):>7} {lv['errors']:>4}"
            )
    rounds_lines = []
    for name, result in report["systems"].items():
        for c, lv in (result.get("levels") or {}).items():
            if lv.get("rounds"):
                values = ", ".join(_fmt(r.get("tokens_per_s")) for r in lv["rounds"])
                rounds_lines.append(f"  {name:<13} {c:>5}  {values}")
    if rounds_lines:
        lines += ["", "tok/s of each interleaved round (the table shows the median round):"]
        lines += rounds_lines
    lines += ["", "CPU seconds used during each level (where the time goes):"]
    for name, result in report["systems"].items():
        for c, lv in (result.get("levels") or {}).items():
            if lv.get("cpu_s"):
                parts = ", ".join(f"{k} {v:.1f}" for k, v in lv["cpu_s"].items())
                lines.append(f"  {name:<13} {c:>5}  wall {_fmt(lv.get('wall_s'))}s: {parts}")
    lines += ["", "peak RSS (MB):"]
    for name, result in report["systems"].items():
        for proc, info in (result.get("processes") or {}).items():
            lines.append(f"  {name:<13} {proc:<20} {_fmt(info.get('peak_rss_mb'))}")
    r = report["ratios"]
    lines += ["", "ratios (per concurrency):"]
    for key in (
        "ours_limit_throughput",
        "ours2_limit_throughput",
        "ours_naive_throughput",
        "ours_peer_throughput",
        "ours_peer_ttft_p50",
        "ours_llamacpp_throughput",
        "ours_llamacpp_ttft_p50",
    ):
        values = ", ".join(f"{c}: {_fmt(v, 3)}" for c, v in r[key].items())
        lines.append(f"  {key:<24} {values}")
    best = ", ".join(
        f"{c}: {b['throughput']} / {b['ttft_p50']}" for c, b in r["llamacpp_best"].items() if b
    )
    if best:
        lines.append(f"  best llama.cpp (tok/s / TTFT) {best}")
    o = r["router_ttft_overhead_ms"]
    lines.append(
        f"  router TTFT overhead     p50 {_fmt(o['p50'], 2)} ms, p99 {_fmt(o['p99'], 2)} ms "
        f"(at {o['concurrency']} stream(s))"
    )
    n = r["null_tokens_per_s"]
    lines.append(
        f"  null engine              {_fmt(n['value'])} tok/s at {n['streams']} streams; "
        f"{_fmt(n['value_with_interval'])} with the router's --stream-interval-ms "
        f"{_fmt(n['stream_interval_ms'], 0)}"
    )
    lines.append(f"  router peak RSS          {_fmt(r['router_peak_rss_mb']['max'])} MB")
    lines += ["", "targets:"]
    for t in report["targets"]:
        lines.append(
            f"  {t['status']:<5} {t['name']:<30} {_fmt(t['value'], 3):>10}  "
            f"(target {t['target']} at {t['at']})"
        )
    return "\n".join(lines)


# ----- CLI -------------------------------------------------------------------------------


def _int_list(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def _str_list(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The benchmark's flags (shared by ``python -m benchmarks.serving`` and
    ``llmcluster bench``). Unset flags take the mode's default (--smoke or full)."""
    d = Settings()
    parser.add_argument("--smoke", action="store_true", help="seconds-scale run of every system")
    parser.add_argument(
        "--concurrency",
        type=_int_list,
        help=f"concurrent streams per level, comma-separated (default {d.concurrency})",
    )
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), help="model dtype")
    parser.add_argument(
        "--weights",
        choices=WEIGHTS,
        help="our workers' (and limit's) --weights: fp32, bf16, int8 or int4 matrices",
    )
    parser.add_argument(
        "--systems",
        type=_str_list,
        help=f"systems to run, comma-separated (default all: {ALL_SYSTEMS})",
    )
    parser.add_argument("--json", dest="json_path", help="write the JSON report here")
    parser.add_argument(
        "--num-prompts", type=int, help=f"distinct prompts (default {d.num_prompts})"
    )
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        help=f"tokens generated per request (default {d.max_new_tokens})",
    )
    parser.add_argument("--seed", type=int, help="workload seed (default 0)")
    parser.add_argument(
        "--rounds",
        type=int,
        help=f"interleaved rounds at the judged levels: limit, ours1, direct, peer, the "
        f"llama.cpp systems and naive at the target concurrency, limit, ours1 and direct at "
        f"the lowest; a level's figures are its median round's, ratios are medians of "
        f"per-round ratios "
        f"(default {d.rounds}; --smoke: 1)",
    )
    parser.add_argument(
        "--naive-rounds",
        type=int,
        help=f"naive's rounds at the target concurrency, at most --rounds (each takes "
        f"minutes; default {d.naive_rounds})",
    )
    parser.add_argument(
        "--max-running",
        type=int,
        help=f"engine batch cap, limit and workers (default {d.max_running})",
    )
    parser.add_argument(
        "--null-streams",
        type=int,
        help=f"null-engine concurrent streams (default {d.null_streams})",
    )
    parser.add_argument(
        "--null-new-tokens",
        type=int,
        help=f"tokens per null-engine request (default {d.null_new_tokens})",
    )
    parser.add_argument("--null-step-ms", type=float, help="null engine iteration time (default 5)")
    parser.add_argument(
        "--null-stream-interval-ms",
        type=float,
        help=f"null_interval's router --stream-interval-ms (default "
        f"{d.null_stream_interval_ms:g}; null's router sends a message per delta)",
    )
    parser.add_argument(
        "--peer-cb-num-blocks",
        type=int,
        help="transformers serve --cb-num-blocks (default: its own, sized from free RAM; "
        "--smoke: 32)",
    )
    parser.add_argument(
        "--llamacpp-rounds",
        type=int,
        help=f"rounds of ours1 and the llama.cpp systems at the levels other than the target "
        f"concurrency, at most --rounds (default {d.llamacpp_rounds})",
    )
    parser.add_argument(
        "--llama-server",
        help=f"llama.cpp's llama-server binary (default {d.llama_server}, built by "
        "scripts/install_llama_cpp.sh; absent: the llama.cpp systems are skipped)",
    )
    parser.add_argument(
        "--llamacpp-threads",
        type=int,
        help="llama-server --threads (default: the cores, as the worker's torch gets; --smoke: 1)",
    )
    parser.add_argument(
        "--no-fail", action="store_true", help="full mode: exit 0 even when a target is missed"
    )


def settings_from_args(args: argparse.Namespace) -> Settings:
    values: dict[str, Any] = dict(SMOKE_DEFAULTS) if args.smoke else {}
    values["smoke"] = args.smoke
    values["fail_on_miss"] = not args.smoke and not args.no_fail
    for name in (
        "concurrency",
        "dtype",
        "weights",
        "systems",
        "json_path",
        "num_prompts",
        "max_new_tokens",
        "seed",
        "rounds",
        "naive_rounds",
        "max_running",
        "null_streams",
        "null_new_tokens",
        "null_step_ms",
        "null_stream_interval_ms",
        "peer_cb_num_blocks",
        "llamacpp_rounds",
        "llama_server",
        "llamacpp_threads",
    ):
        value = getattr(args, name, None)
        if value is not None:
            values[name] = value
    return Settings(**values)


def _raise_interrupt(signum, frame):
    # SIGTERM takes the same path as Ctrl-C, so the finally blocks stop every process;
    # a second SIGTERM must not cut that clean-up short.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt(f"signal {signum}")


def run(settings: Settings) -> tuple[dict, int]:
    """Runs the benchmark; returns (report, exit code)."""
    from common.models import resolve_model

    started = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    load_start = load_avg()
    if not settings.smoke and load_start[0] >= 1.5:
        logger.warning(
            "load average %s: another job is using the cores, timings will be noisy", load_start
        )
    tokenizer = load_tokenizer(resolve_model(None).path)
    workload = build_workload(
        tokenizer,
        settings.num_prompts,
        settings.max_new_tokens,
        seed=settings.seed,
        min_prompt_tokens=settings.min_prompt_tokens,
        max_prompt_tokens=settings.max_prompt_tokens,
    )
    systems, interrupted = run_phases(settings, workload)
    report = build_report(settings, workload, systems, started, load_start)
    failed = [s for s, r in systems.items() if r.get("status") == "failed"]
    code = 130 if interrupted else 2 if failed else 0
    if settings.fail_on_miss and any(t["status"] == "MISS" for t in report["targets"]):
        code = code or 1
    return report, code


def run_from_args(args: argparse.Namespace) -> int:
    """Entry point shared by ``python -m benchmarks.serving`` and ``llmcluster bench``."""
    try:
        settings = settings_from_args(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        report, code = run(settings)
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(format_report(report))
    if settings.json_path:
        Path(settings.json_path).write_text(json.dumps(report, indent=2))
        print(f"\nJSON written to {settings.json_path}")
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.serving",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return run_from_args(args)


if __name__ == "__main__":
    sys.exit(main())
