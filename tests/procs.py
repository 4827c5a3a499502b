"""Starting real llmcluster processes in tests: free port, health polling, group kill.

Each process runs ``python -m llmcluster ...`` in its own process group so teardown
kills it and any children; a process that dies before it is healthy fails the test
with its log.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A free loopback port (bind to 0, read it, release it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Proc:
    """A started ``llmcluster`` subcommand listening on ``port``."""

    def __init__(self, args: Sequence[str], port: int, env: dict[str, str] | None = None):
        self.args = list(args)
        self.port = port
        self.address = f"127.0.0.1:{port}"
        self.log = tempfile.NamedTemporaryFile(  # noqa: SIM115 - closed in stop()
            prefix="llmcluster-", suffix=".log", delete=False
        )
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "llmcluster", *self.args],
            cwd=REPO_ROOT,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=full_env,
            start_new_session=True,
        )

    def output(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return Path(self.log.name).read_text(errors="replace")

    def wait_healthy(self, timeout_s: float = 120.0, service: str = "") -> None:
        """Polls grpc.health.v1 until SERVING; fails with the log if the process died."""
        deadline = time.monotonic() + timeout_s
        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.popen.poll() is not None:
                    raise RuntimeError(
                        f"{self.args[0]} exited with {self.popen.returncode}:\n{self.output()[-5000:]}"
                    )
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1.0)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.2)
        raise TimeoutError(f"{self.args[0]} not healthy in {timeout_s}s:\n{self.output()[-5000:]}")

    def signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, sig)

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM the group, then SIGKILL whatever is left."""
        try:
            self.signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.popen.wait(5)
        except ProcessLookupError:
            pass
        finally:
            self.log.close()


_COMPUTE_LOCK: list[str] = []


def compute_lock() -> str:
    """One lock file for every model worker of the test run (in the run's home)."""
    if not _COMPUTE_LOCK:
        _COMPUTE_LOCK.append(str(Path(os.environ["LLMCLUSTER_HOME"]) / "workers.compute.lock"))
    return _COMPUTE_LOCK[0]


def start_worker(*extra: str, port: int | None = None, env: dict[str, str] | None = None) -> Proc:
    """Starts ``llmcluster worker`` on a free port (not yet waited for).

    Model workers take turns per engine step on the cores (``--compute-lock``, as
    ``llmcluster up`` starts them): two or three of them, each with a thread per core,
    made every OpenMP barrier wait for a descheduled thread on a 2-core run, seconds per
    token, and a 64-stream test outran its deadlines."""
    port = port or free_port()
    if "null" not in extra and "--compute-lock" not in extra:
        extra = (*extra, "--compute-lock", compute_lock())
    return Proc(["worker", "--port", str(port), *extra], port, env)


def start_router(
    workers: Sequence[str], *extra: str, port: int | None = None, env: dict[str, str] | None = None
) -> Proc:
    """Starts ``llmcluster router`` on a free port over the given worker addresses."""
    port = port or free_port()
    return Proc(["router", "--port", str(port), "--workers", ",".join(workers), *extra], port, env)
