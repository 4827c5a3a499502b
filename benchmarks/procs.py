"""The processes a benchmark run starts: each in its own process group, tracked in one
registry so that every exit path (error, Ctrl-C, SIGTERM) kills all of them."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from benchmarks.metrics import peak_rss_mb

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A free loopback port (bind to 0, read it, release it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProc:
    """A started server process listening on 127.0.0.1:``port``.

    ``health`` is ``"grpc"`` (grpc.health.v1), ``"http"`` (GET /health -> 200) or
    ``"none"`` (a batch job, not a server).
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        port: int,
        health: str = "grpc",
        env: dict[str, str] | None = None,
        stdin_pipe: bool = False,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.port = port
        self.address = f"127.0.0.1:{port}"
        self.health = health
        self.log_path = Path(tempfile.mkstemp(prefix=f"bench-{name}-", suffix=".log")[1])
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        logger.info("starting %s: %s", name, " ".join(self.argv))
        self.popen = subprocess.Popen(
            self.argv,
            cwd=REPO_ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.PIPE if stdin_pipe else subprocess.DEVNULL,
            env=full_env,
            start_new_session=True,  # own process group: killpg reaches its children
        )
        self.peak_rss_mb: float | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self, tail_chars: int = 5000) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-tail_chars:]

    def _check_alive(self) -> None:
        if self.popen.poll() is not None:
            raise RuntimeError(
                f"{self.name} exited with {self.popen.returncode}; log {self.log_path}:\n"
                f"{self.output()}"
            )

    def wait_healthy(self, timeout_s: float = 300.0) -> None:
        """Polls health until ready; raises with the log if the process died or hung."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self._check_alive()
            if self._probe():
                return
            time.sleep(0.25)
        raise TimeoutError(f"{self.name} not healthy in {timeout_s}s:\n{self.output()}")

    def _probe(self) -> bool:
        if self.health == "none":
            return True
        if self.health == "http":
            try:
                with urllib.request.urlopen(f"http://{self.address}/health", timeout=2) as r:
                    return r.status == 200
            except (urllib.error.URLError, OSError):
                return False
        with grpc.insecure_channel(self.address) as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=""), timeout=2.0
                )
                return reply.status == health_pb2.HealthCheckResponse.SERVING
            except grpc.RpcError:
                return False

    def sample_rss(self) -> float | None:
        """Reads the peak RSS now (VmHWM only grows, so the last read is the peak)."""
        value = peak_rss_mb(self.pid)
        if value is not None:
            self.peak_rss_mb = value
        return self.peak_rss_mb

    def terminate(self) -> None:
        """Sends SIGTERM to the group (graceful drain); see :meth:`stop`."""
        if self.popen.poll() is None:
            self.sample_rss()
            try:
                os.killpg(self.popen.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM the group, then SIGKILL whatever is left; idempotent."""
        self.terminate()
        try:
            self.popen.wait(timeout_s)
        except subprocess.TimeoutExpired:
            pass
        # SIGKILL the group even when the leader is gone: a child may still hold it.
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.popen.wait(5)
        except subprocess.TimeoutExpired:
            logger.error("%s (pid %d) survived SIGKILL", self.name, self.pid)
        if not self._log.closed:
            self._log.close()
        if self.popen.stdin is not None and not self.popen.stdin.closed:
            try:
                self.popen.stdin.close()
            except BrokenPipeError:
                pass


def stop_all(procs: Sequence[ServerProc], timeout_s: float = 10.0) -> None:
    """Stops processes together: SIGTERM to all first, so their graceful drains overlap
    (a worker waits for its router's link to close), then wait / SIGKILL each."""
    for proc in procs:
        try:
            proc.terminate()
        except Exception:  # noqa: BLE001 - keep stopping the others
            logger.exception("stopping %s failed", proc.name)
    deadline = time.monotonic() + timeout_s
    for proc in procs:
        try:
            proc.stop(max(0.0, deadline - time.monotonic()))
        except Exception:  # noqa: BLE001
            logger.exception("stopping %s failed", proc.name)


class ProcessRegistry:
    """Every process of a run; ``stop_all`` is safe to call from any exit path."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        self.procs: list[ServerProc] = []
        self.env = dict(env or {})  # under every process's own env

    def start(
        self,
        name: str,
        argv: Sequence[str],
        port: int,
        health: str = "grpc",
        env: dict[str, str] | None = None,
        stdin_pipe: bool = False,
    ) -> ServerProc:
        """Starts a :class:`ServerProc` (the registry's env under ``env``) and tracks it."""
        proc = ServerProc(
            name, argv, port, health, env={**self.env, **(env or {})}, stdin_pipe=stdin_pipe
        )
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        stop_all(list(reversed(self.procs)))


def llmcluster_argv(*args: str) -> list[str]:
    """``python -m llmcluster ARGS`` with this interpreter (the venv's)."""
    return [sys.executable, "-m", "llmcluster", "--log-level", "WARNING", *args]
