"""A simulated GPU fleet: how far one router (or two) carries N null-engine workers.

Each worker runs ``--engine null`` with a step time and batch shape that mimic a GPU
worker (``--null-step-ms``; every running stream gets one token per step, up to
``--streams-per-worker`` streams), so a worker alone offers ``streams / step`` tokens/s
(64 streams at 20 ms = 3,200 tokens/s, a small model on one GPU). For every
(routers, workers) pair this starts the workers and routers, streams
``workers x streams-per-worker`` requests spread evenly over the routers (a message per
token, the router's default) and prints achieved vs offered tokens/s and where the CPU
went: router CPU microseconds per streamed token is the figure that says how many real
GPU workers one router core carries (see benchmarks/README.md, "A simulated fleet").

    PYTHONPATH=$PWD .venv/bin/python -m benchmarks.fleet --routers 1 2 --workers 1 2 4

The measuring client is this process (grpc.aio, one channel per router); on a small
machine it shares the cores with everything it measures, so the absolute tokens/s are a
floor and the per-token CPU costs are the portable figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time

from benchmarks.clients import GrpcStreamClient, run_closed_loop
from benchmarks.metrics import cpu_seconds, summarize
from benchmarks.procs import ProcessRegistry, ServerProc, free_port, llmcluster_argv
from benchmarks.workload import Prompt


def start_fleet(
    registry: ProcessRegistry, routers: int, workers: int, args: argparse.Namespace
) -> tuple[list[ServerProc], list[ServerProc]]:
    """Starts ``workers`` null workers and ``routers`` routers over all of them."""
    fleet = []
    for i in range(workers):
        port = free_port()
        argv = llmcluster_argv(
            "worker", "--engine", "null", "--host", "127.0.0.1", "--port", str(port),
            "--worker-id", f"null-{i}", "--null-step-ms", str(args.null_step_ms),
            "--max-running", str(args.streams_per_worker),
            "--max-queue", str(4 * args.streams_per_worker),
            "--max-new-tokens-limit", str(max(2048, args.tokens)),
            "--self-test-interval-s", "0",
        )  # fmt: skip
        fleet.append(registry.start(f"null-worker-{i}", argv, port=port))
    for w in fleet:
        w.wait_healthy(120)
    addresses = ",".join(w.address for w in fleet)
    front = []
    for i in range(routers):
        port = free_port()
        argv = llmcluster_argv(
            "router", "--host", "127.0.0.1", "--port", str(port), "--workers", addresses,
            "--max-queue", str(8 * workers * args.streams_per_worker),
        )  # fmt: skip
        front.append(registry.start(f"router-{i}", argv, port=port))
    for r in front:
        r.wait_healthy(120)
    return front, fleet


async def drive(routers: list[ServerProc], streams: int, requests: int, tokens: int) -> list:
    """``streams`` concurrent streams in all, split evenly over the routers."""
    prompts = [Prompt(i, f"Request {i}: tell a story.", 8) for i in range(requests)]
    share = [prompts[i :: len(routers)] for i in range(len(routers))]
    clients = [GrpcStreamClient(r.address, tokens) for r in routers]
    for c in clients:
        await c.__aenter__()
    try:
        await asyncio.gather(*(run_closed_loop(share[0][:4], 4, c.request) for c in clients))
        per = [max(1, streams // len(routers))] * len(routers)
        runs = await asyncio.gather(
            *(run_closed_loop(p, n, c.request) for p, n, c in zip(share, per, clients, strict=True))
        )
    finally:
        for c in clients:
            await c.__aexit__(None, None, None)
    return [rec for run in runs for rec in run]


def measure(routers: int, workers: int, args: argparse.Namespace) -> dict:
    registry = ProcessRegistry()
    try:
        front, fleet = start_fleet(registry, routers, workers, args)
        streams = workers * args.streams_per_worker
        requests = streams * args.requests_per_stream
        procs = {p.name: p for p in (*front, *fleet)}
        cpu_before = {n: cpu_seconds(p.pid) or 0.0 for n, p in procs.items()}
        client_before = time.process_time()
        records = asyncio.run(drive(front, streams, requests, args.tokens))
        client_cpu = time.process_time() - client_before
        cpu = {n: round((cpu_seconds(p.pid) or 0.0) - cpu_before[n], 2) for n, p in procs.items()}
        summary = summarize(records, expected_tokens=args.tokens)
        tokens = summary.get("generated_tokens") or 0
        router_cpu = sum(cpu[p.name] for p in front)
        offered = workers * args.streams_per_worker * 1000.0 / args.null_step_ms
        return {
            "routers": routers,
            "workers": workers,
            "streams": streams,
            "errors": summary["errors"],
            "first_errors": summary["first_errors"],
            "tokens": tokens,
            "tokens_per_s": summary.get("tokens_per_s"),
            "offered_tokens_per_s": round(offered, 1),
            "achieved_share": round((summary.get("tokens_per_s") or 0.0) / offered, 3),
            "ttft_p50_ms": (summary.get("ttft_ms") or {}).get("p50"),
            "itl_p99_ms": (summary.get("itl_ms") or {}).get("p99"),
            "router_cpu_s": round(router_cpu, 2),
            "router_us_per_token": round(1e6 * router_cpu / tokens, 1) if tokens else None,
            "router_cores_busy": round(router_cpu / summary["wall_s"], 2)
            if summary.get("wall_s")
            else None,
            "worker_us_per_token": round(1e6 * sum(cpu[p.name] for p in fleet) / tokens, 1)
            if tokens
            else None,
            "client_us_per_token": round(1e6 * client_cpu / tokens, 1) if tokens else None,
            "cpu_s": cpu,
            "loadavg": round(os.getloadavg()[0], 2),
        }
    finally:
        registry.stop_all()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--routers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--streams-per-worker", type=int, default=64)
    parser.add_argument("--null-step-ms", type=float, default=20.0)
    parser.add_argument("--tokens", type=int, default=128, help="new tokens per request")
    parser.add_argument(
        "--requests-per-stream", type=int, default=2, help="requests per concurrent stream"
    )
    parser.add_argument("--json", default="", help="also write every result to this file")
    args = parser.parse_args(argv)
    if min(args.routers + args.workers) < 1 or args.null_step_ms <= 0 or args.tokens < 1:
        parser.error("--routers, --workers and --tokens must be >= 1, --null-step-ms > 0")
    print(f"{'R':>2} {'N':>2} {'streams':>7} {'offered':>9} {'tok/s':>9} {'share':>6} "
          f"{'router us/tok':>13} {'router cores':>12} {'worker us/tok':>13} "
          f"{'client us/tok':>13} {'errors':>6}")  # fmt: skip
    results = []
    for routers in args.routers:
        for workers in args.workers:
            r = measure(routers, workers, args)
            results.append(r)
            print(
                f"{r['routers']:>2} {r['workers']:>2} {r['streams']:>7} "
                f"{r['offered_tokens_per_s']:>9.0f} {r['tokens_per_s'] or 0:>9.0f} "
                f"{r['achieved_share']:>6.2f} {r['router_us_per_token'] or 0:>13.1f} "
                f"{r['router_cores_busy'] or 0:>12.2f} {r['worker_us_per_token'] or 0:>13.1f} "
                f"{r['client_us_per_token'] or 0:>13.1f} {r['errors']:>6}",
                flush=True,
            )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"settings": vars(args), "results": results}, fh, indent=2)
    return 1 if any(r["errors"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
