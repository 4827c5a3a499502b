"""A port that is taken says so: servers bind with port reuse off, and a router, a worker
or a metrics endpoint on a taken port exits 2 with "port N is in use" (gRPC's default
SO_REUSEPORT would otherwise let two clusters answer on one address)."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest

from common.listen import PortInUse, bind, port_is_free, server_options
from tests.procs import REPO_ROOT, Proc, free_port


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port held by a listening socket of this process."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


def _exit_of(*args: str, timeout_s: float = 120.0) -> tuple[int, str]:
    result = subprocess.run(
        [sys.executable, "-m", "llmcluster", *args],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    return result.returncode, result.stdout + result.stderr


def test_bind_refuses_a_taken_port_and_reports_a_free_one(taken_port: int) -> None:
    async def body() -> None:
        server = grpc.aio.server(options=server_options())
        with pytest.raises(PortInUse, match=f"^port {taken_port} is in use$"):
            bind(server, "127.0.0.1", taken_port)
        port = bind(server, "127.0.0.1", 0)
        assert port > 0 and not port_is_free("127.0.0.1", port)
        await server.stop(0)

    asyncio.run(body())
    assert not port_is_free("127.0.0.1", taken_port)
    assert port_is_free("127.0.0.1", free_port())


def test_a_grpc_server_with_default_port_reuse_does_not_share_its_port() -> None:
    # The case: the first server used gRPC's defaults (SO_REUSEPORT on).
    first = grpc.server(futures.ThreadPoolExecutor(1))
    port = first.add_insecure_port("127.0.0.1:0")
    first.start()
    try:

        async def body() -> None:
            second = grpc.aio.server(options=server_options())
            with pytest.raises(PortInUse, match=f"port {port} is in use"):
                bind(second, "127.0.0.1", port)

        asyncio.run(body())
    finally:
        first.stop(0)


def test_a_second_router_on_a_taken_port_exits_2_naming_the_port() -> None:
    port = free_port()
    first = Proc(["router", "--port", str(port), "--workers", f"127.0.0.1:{free_port()}"], port)
    try:
        _wait_answering(first)
        code, output = _exit_of("router", "--port", str(port), "--workers", "127.0.0.1:1")
        assert code == 2, output
        assert f"port {port} is in use" in output
        assert "Traceback" not in output
        assert first.popen.poll() is None, "the first router keeps running"
    finally:
        first.stop()


def test_router_metrics_port_taken_exits_2(taken_port: int) -> None:
    code, output = _exit_of(
        "router", "--port", str(free_port()), "--workers", "127.0.0.1:1",
        "--metrics-port", str(taken_port),
    )  # fmt: skip
    assert code == 2, output
    assert f"metrics port {taken_port} is in use" in output


def test_worker_on_a_taken_port_exits_2_before_loading_the_model(taken_port: int) -> None:
    code, output = _exit_of("worker", "--port", str(taken_port))
    assert code == 2, output
    assert f"port {taken_port} is in use" in output
    assert "Traceback" not in output


def test_up_says_the_router_port_is_taken_before_starting_workers(taken_port: int) -> None:
    code, output = _exit_of("up", "--port", str(taken_port), timeout_s=60)
    assert code == 2, output
    assert f"router port {taken_port} is in use" in output
    assert "starting" not in output


def _wait_answering(proc: Proc, timeout_s: float = 60.0) -> None:
    """Until the router answers health at all (NOT_SERVING: it has no worker)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(proc.address) as ch:
        health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(), timeout=timeout_s, wait_for_ready=True
        )
