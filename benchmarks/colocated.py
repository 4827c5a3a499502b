"""Co-located workers: 16 greedy streams through ``llmcluster up --workers N``.

Issue 14 measured two workers on one machine thrashing each other (each took every core).
This starts the real cluster as a user does, sends ``--streams`` greedy requests at once
(each ``--tokens`` new tokens, distinct prompts) and prints the wall time of the batch,
once per worker count:

    PYTHONPATH=$PWD .venv/bin/python -m benchmarks.colocated --workers 1 2 --pinned

(``--pinned`` adds ``up --pin-cores``, each worker on its own share of the cores.)
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc

from common.listen import port_is_free
from common.pb import generate_pb2, generate_pb2_grpc
from worker.cores import allowed_cpus


def _free_port(start: int = 52051) -> int:
    port = start
    while not port_is_free("127.0.0.1", port):
        port += 1
    return port


def _stream(address: str, i: int, tokens: int) -> tuple[int, str]:
    """Streams one request; its token count and the worker that served it."""
    request = generate_pb2.GenerateRequest(
        prompt=f"Question {i}: name a river in country number {i}. Answer:",
        params=generate_pb2.SamplingParams(max_new_tokens=tokens, ignore_eos=True),
    )
    with grpc.insecure_channel(address) as channel:
        stub = generate_pb2_grpc.GenerateStub(channel)
        messages = list(stub.GenerateStream(request, timeout=600))
        return sum(len(m.tokens) for m in messages), messages[-1].usage.worker_id


def measure(
    workers: int, streams: int, tokens: int, rounds: int, pin_cores: bool = False
) -> dict[str, object]:
    port = _free_port()
    up = subprocess.Popen(
        [sys.executable, "-m", "llmcluster", "up", "--workers", str(workers)]
        + ["--port", str(port), "--no-http"]
        + (["--pin-cores"] if pin_cores else []),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in up.stdout or []], daemon=True).start()
    try:
        while True:
            line = lines.get(timeout=900)
            print(f"  up: {line.rstrip()}", file=sys.stderr)
            if "cluster running" in line:
                break
        address = f"127.0.0.1:{port}"
        _stream(address, -1, 4)  # warm the router's links
        times: list[float] = []
        errors: list[str] = []
        served_by: dict[str, int] = {}
        for _ in range(rounds):
            start = time.perf_counter()
            try:
                with ThreadPoolExecutor(streams) as pool:
                    got = list(pool.map(lambda i: _stream(address, i, tokens), range(streams)))
            except grpc.RpcError as exc:  # reported, not hidden: a failed round has no time
                errors.append(f"{exc.code().name}: {exc.details()}")
                continue
            times.append(round(time.perf_counter() - start, 2))
            assert all(n == tokens for n, _ in got), got
            for _, worker in got:
                served_by[worker] = served_by.get(worker, 0) + 1
        return {
            "workers": workers,
            "cores": "pinned shares" if pin_cores else "all, in turns" if workers > 1 else "all",
            "streams": streams,
            "tokens": tokens,
            "seconds": times,
            "served_by": served_by,
            "errors": errors,
            "loadavg": os.getloadavg()[0],
        }
    finally:
        os.killpg(up.pid, signal.SIGINT)
        up.wait(60)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--pinned", action="store_true", help="also measure each N > 1 with up --pin-cores"
    )
    args = parser.parse_args()
    print(f"cores this process may use: {len(allowed_cpus())}", file=sys.stderr)
    for n in args.workers:
        for pin in (False, True) if args.pinned and n > 1 else (False,):
            result = measure(n, args.streams, args.tokens, args.rounds, pin)
            print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
