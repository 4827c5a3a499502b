"""``llmcluster up``: the embedded local cluster (a router and N workers over the static
registry), in the foreground until Ctrl-C, shutting every process down cleanly."""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.config import home_dir
from common.listen import port_is_free
from common.pb import generate_pb2, generate_pb2_grpc
from worker.cores import allowed_cpus, format_cpus, split_cores

DEMO_QUESTION = "In two sentences, what is continuous batching in LLM serving?"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _spawn(args: list[str], log_level: str) -> subprocess.Popen[bytes]:
    # Own process group: Ctrl-C reaches us once, and we stop children in order.
    return subprocess.Popen(
        [sys.executable, "-m", "llmcluster", "--log-level", log_level, *args],
        start_new_session=True,
    )


def _make_tls(directory: str) -> tuple[grpc.ChannelCredentials, list[str], list[str]]:
    """``--tls``: a throwaway CA and one localhost certificate in ``directory``. Workers
    serve mTLS (only the router, holding the certificate, reaches them); the router
    serves TLS. Returns our channel credentials and the worker and router flags."""
    from pathlib import Path

    from common.certs import write_cluster_certificates  # local: needs cryptography

    c = write_cluster_certificates(Path(directory))
    serve = ["--tls-cert", str(c.cert), "--tls-key", str(c.key)]
    worker_flags = [*serve, "--tls-client-ca", str(c.ca)]
    router_flags = [*serve, "--worker-tls-ca", str(c.ca)]
    router_flags += ["--worker-tls-cert", str(c.cert), "--worker-tls-key", str(c.key)]
    credentials = grpc.ssl_channel_credentials(
        c.ca.read_bytes(), c.key.read_bytes(), c.cert.read_bytes()
    )
    return credentials, worker_flags, router_flags


def _channel(address: str, credentials: grpc.ChannelCredentials | None) -> grpc.Channel:
    if credentials is None:
        return grpc.insecure_channel(address)
    return grpc.secure_channel(address, credentials)


def _wait_serving(
    address: str,
    procs: list[subprocess.Popen[bytes]],
    timeout_s: float,
    credentials: grpc.ChannelCredentials | None = None,
) -> None:
    deadline = time.monotonic() + timeout_s
    with _channel(address, credentials) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            dead = [p for p in procs if p.poll() is not None]
            if dead:
                raise RuntimeError(f"a cluster process exited with code {dead[0].returncode}")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.3)
    raise TimeoutError(f"{address} did not become healthy within {timeout_s:.0f}s")


def _demo(address: str, credentials: grpc.ChannelCredentials | None = None) -> None:
    request = generate_pb2.GenerateRequest(
        messages=[generate_pb2.ChatMessage(role="user", content=DEMO_QUESTION)],
        params=generate_pb2.SamplingParams(max_new_tokens=64),
    )
    print(f"\n> {DEMO_QUESTION}\n", flush=True)
    with _channel(address, credentials) as channel:
        for msg in generate_pb2_grpc.GenerateStub(channel).GenerateStream(request, timeout=300):
            sys.stdout.write(msg.text)
            sys.stdout.flush()
            if msg.HasField("usage"):
                u = msg.usage
                print(
                    f"\n\n[{generate_pb2.FinishReason.Name(msg.finish_reason)}: "
                    f"{u.completion_tokens} tokens, first token after "
                    f"{u.time_to_first_token_ms:.0f} ms, served by {u.worker_id}]",
                    flush=True,
                )


def _stop_all(procs: list[subprocess.Popen[bytes]], timeout_s: float = 15.0) -> None:
    for p in procs:  # router first (list order), then workers drain
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


class _Interrupted(Exception):
    """Ctrl-C or SIGTERM: raised from the signal handler so that every wait (health,
    demo stream, foreground loop) ends at once and the cluster is stopped."""


def _raise_interrupted(signum: int, frame: object) -> None:
    raise _Interrupted(signal.Signals(signum).name)


def _run(args: argparse.Namespace) -> int:
    if args.workers < 1:
        print("--workers must be >= 1", file=sys.stderr)
        return 2
    if args.routers < 1:
        print("--routers must be >= 1", file=sys.stderr)
        return 2
    # Routers bind 127.0.0.1 (their default) on --port, --port+1, ...; a taken port is
    # said before any worker starts loading, not after a minute of start-up.
    router_ports = [args.port + i for i in range(args.routers)]
    for port in router_ports:
        if not 0 < port < 65536 or not port_is_free("127.0.0.1", port):
            print(
                f"llmcluster up: router port {port} is in use or invalid (another cluster?); "
                "stop it or pick another with --port",
                file=sys.stderr,
            )
            return 2
    http = None if args.no_http else (args.http_host, args.http_port)
    if http is not None and http[1] and not port_is_free(*http):
        # Fail before anything starts: a gateway on a surprise port would be missed.
        print(
            f"llmcluster up: HTTP port {http[1]} is in use; pass --http-port N (0 = any free "
            "port) or --no-http",
            file=sys.stderr,
        )
        return 2
    signal.signal(signal.SIGINT, _raise_interrupted)
    signal.signal(signal.SIGTERM, _raise_interrupted)
    procs: list[subprocess.Popen[bytes]] = []
    tls_dir = ""
    try:
        credentials: grpc.ChannelCredentials | None = None
        worker_tls: list[str] = []
        router_tls: list[str] = []
        if args.tls:
            home_dir().mkdir(parents=True, exist_ok=True)
            tls_dir = tempfile.mkdtemp(prefix="up-tls-", dir=home_dir())
            credentials, worker_tls, router_tls = _make_tls(tls_dir)
        worker_addresses = []
        workers = []
        # Co-located workers that each take every core at once thrash each other. By
        # default they take turns per engine step with every core (one compute lock) and
        # the routers fill them in order, so a light load runs as one full batch, as fast
        # as on one worker; --pin-cores gives each its own share instead (worker/cores.py).
        cpus = allowed_cpus()
        cores = split_cores(cpus, args.workers) if args.pin_cores else [cpus] * args.workers
        shared = args.workers > 1 and not args.pin_cores
        if shared:
            home_dir().mkdir(parents=True, exist_ok=True)
            compute_lock = str(home_dir() / f"up-{args.port}.compute.lock")
        for i in range(args.workers):
            port = _free_port()
            worker_addresses.append(f"127.0.0.1:{port}")
            cmd = ["worker", "--port", str(port), "--worker-id", f"local-{i}"]
            cmd += ["--dtype", args.dtype]
            cmd += ["--cpus", ",".join(map(str, cores[i])), "--threads", str(len(cores[i]))]
            if shared:
                cmd += ["--compute-lock", compute_lock]
            print(
                f"worker local-{i}: core(s) {format_cpus(cores[i])}, "
                f"{len(cores[i])} compute thread(s)"
                + (", taking turns per step with the other workers" if shared else ""),
                flush=True,
            )
            if args.model:
                cmd += ["--model", args.model]
            cmd += worker_tls
            workers.append(_spawn(cmd, args.child_log_level))
            procs.append(workers[-1])
        # Interchangeable routers over the same workers (each has its own links); the
        # first also serves the HTTP gateway.
        for i, port in enumerate(router_ports):
            router_cmd = ["router", "--port", str(port), "--workers", ",".join(worker_addresses)]
            if shared:
                router_cmd += ["--balance", "pack"]
            if http is not None and i == 0:
                if not http[1]:
                    http = (http[0], _free_port())
                router_cmd += ["--http-host", http[0], "--http-port", str(http[1])]
            procs.insert(i, _spawn(router_cmd + router_tls, args.child_log_level))
        # Routers are stopped first (list order), so workers drain what they sent.
        addresses = [f"127.0.0.1:{port}" for port in router_ports]
        address = addresses[0]
        print(
            f"starting {args.routers} router(s) on {', '.join(addresses)} and "
            f"{args.workers} worker(s)...",
            flush=True,
        )
        # Every worker, then the routers: a router is SERVING once any one worker is, and
        # "up --workers 2" should not hand out its address with one still loading.
        # Each worker says its own phases and "serving on" line (common/startup.py).
        for worker_address in worker_addresses:
            _wait_serving(worker_address, procs, args.start_timeout_s, credentials)
        for router_address in addresses:
            _wait_serving(router_address, procs, args.start_timeout_s, credentials)
            print(
                f"router listening on {router_address}" + (" (TLS)" if tls_dir else ""),
                flush=True,
            )
        ca_flag = f" --tls-ca {tls_dir}/ca.crt" if tls_dir else ""
        print(f'try: llmcluster generate --chat "Hello!" --target {address}{ca_flag}', flush=True)
        if http is not None:
            url = f"http://{http[0]}:{http[1]}"
            print(f"OpenAI-compatible HTTP API on {url}/v1 (playground: {url}/)", flush=True)
        if args.demo:
            _demo(address, credentials)
        print("cluster running; Ctrl-C to stop", flush=True)
        while True:
            if any(p.poll() is not None for p in procs):
                print("a cluster process exited; stopping", file=sys.stderr)
                return 1
            time.sleep(0.5)
    except _Interrupted:
        return 0
    finally:
        # A second Ctrl-C must not cut the shutdown short and orphan the workers.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("stopping cluster...", flush=True)
        _stop_all(procs)
        if tls_dir:
            shutil.rmtree(tls_dir, ignore_errors=True)  # throwaway: the CA dies with the cluster


def register(sub: argparse._SubParsersAction) -> None:
    up = sub.add_parser("up", help="start a local cluster: router + workers + the default model")
    up.add_argument("--workers", type=int, default=1, help="number of workers (default: 1)")
    up.add_argument("--port", type=int, default=50051, help="router port (default: 50051)")
    up.add_argument(
        "--routers",
        type=int,
        default=1,
        help="number of routers over the same workers, on --port, --port+1, ... (default: 1)",
    )
    up.add_argument(
        "--http-port",
        type=int,
        default=8000,
        help="port of the router's OpenAI-compatible HTTP gateway (default: 8000; 0 = any)",
    )
    up.add_argument(
        "--http-host", default="127.0.0.1", help="address of the HTTP gateway (default: 127.0.0.1)"
    )
    up.add_argument("--no-http", action="store_true", help="do not serve the HTTP gateway")
    up.add_argument(
        "--pin-cores",
        action="store_true",
        help="give each worker its own share of the cores (CPU affinity) instead of every "
        "core in turns; the routers then spread requests over the workers",
    )
    up.add_argument("--model", default="", help="base model (default: the offline default)")
    up.add_argument("--dtype", default="auto", help="worker dtype (default: auto)")
    up.add_argument("--demo", action="store_true", help="stream a sample answer once healthy")
    up.add_argument(
        "--tls",
        action="store_true",
        help="TLS end to end with a throwaway CA: the router serves TLS, workers accept "
        "only the router (mTLS); clients pass the printed --tls-ca",
    )
    up.add_argument(
        "--child-log-level",
        default="WARNING",
        help="log level of the router and worker processes (default: WARNING)",
    )
    up.add_argument(
        "--start-timeout-s", type=float, default=600.0, help="wait for health (default: 600)"
    )
    up.set_defaults(func=_run)
