"""``llmcluster up``, the README's main command, run as a user runs it: a router and two
real workers on the default model, the demo answer streamed, the cluster serving other
clients, and Ctrl-C stopping every process (also while the workers are still loading)."""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import grpc
import openai
import pytest

from common.pb import generate_pb2, generate_pb2_grpc
from tests.procs import REPO_ROOT, free_port


class UpProcess:
    """``llmcluster up`` with its stdout read line by line on a thread."""

    def __init__(self, *args: str) -> None:
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "llmcluster", "up", *args],
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            text=True,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, pattern: str, timeout_s: float) -> re.Match[str]:
        """The first line (from now on) matching ``pattern``; fails with the output so far."""
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            try:
                line = self._queue.get(timeout=max(0.01, left))
            except queue.Empty:
                line = ""
            if line is None:
                raise AssertionError(f"up exited before {pattern!r}:\n" + "\n".join(self.lines))
            if line:
                self.lines.append(line)
                match = re.search(pattern, line)
                if match:
                    return match
            if time.monotonic() > deadline:
                raise AssertionError(f"no {pattern!r} in {timeout_s}s:\n" + "\n".join(self.lines))

    def interrupt(self, timeout_s: float) -> int:
        """Ctrl-C (SIGINT to ``up`` alone; its children are in their own sessions)."""
        self.popen.send_signal(signal.SIGINT)
        return self.popen.wait(timeout_s)

    def kill(self) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(10)


@pytest.fixture
def up_factory() -> Iterator[list[UpProcess]]:
    started: list[UpProcess] = []
    yield started
    for proc in started:
        proc.kill()


def _port_is_free(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    with socket.socket() as s:
        # As a server binds: a connection in TIME_WAIT is no process holding the port
        # (whichever side closed first keeps one for a minute).
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, int(port)))
        except OSError:
            return False
    return True


def _llmcluster_cmdlines() -> list[list[str]]:
    """argv of every live (non-zombie) ``python -m llmcluster ...`` process."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().decode(errors="replace").split("\0")
            with open(f"/proc/{entry}/stat") as f:
                zombie = f.read().rsplit(")", 1)[1].split()[0] == "Z"
        except OSError:
            continue
        if not zombie and "llmcluster" in argv:
            found.append(argv)
    return found


def _cluster_ports(router_port: int) -> list[str]:
    """The router's port and its workers' ports, read off the router's command line."""
    for argv in _llmcluster_cmdlines():
        if "router" in argv and str(router_port) in argv:
            workers = argv[argv.index("--workers") + 1].split(",")
            return [str(router_port), *(w.rsplit(":", 1)[1] for w in workers)]
    raise AssertionError(f"no router process on port {router_port}")


def _wait_stopped(ports: list[str], timeout_s: float) -> None:
    """No process of the cluster is left and none of its ports is still bound."""
    deadline = time.monotonic() + timeout_s
    while True:
        alive = [a for a in _llmcluster_cmdlines() if any(p in a for p in ports)]
        bound = [p for p in ports if not _port_is_free(f"127.0.0.1:{p}")]
        if not alive and not bound:
            return
        assert time.monotonic() < deadline, f"left after up exited: {alive} {bound}"
        time.sleep(0.2)


def test_up_streams_the_demo_serves_clients_and_stops_on_ctrl_c(
    up_factory: list[UpProcess],
) -> None:
    port, http_port = free_port(), free_port()
    while not _port_is_free(f"127.0.0.1:{port + 1}") or port + 1 == http_port:
        port = free_port()  # the second router takes --port + 1
    up = UpProcess(
        "--workers", "2", "--routers", "2", "--port", str(port), "--dtype", "float32", "--demo",
        "--http-port", str(http_port),
    )  # fmt: skip
    up_factory.append(up)
    # Each worker prints its own "serving on" line (children share the terminal).
    seen: dict[str, str] = {}  # worker id -> its address
    while set(seen) != {"local-0", "local-1"}:
        match = up.wait_for(r"worker (local-\d) serving on (\S+)", 300)
        seen[match.group(1)] = match.group(2)
        assert set(seen) <= {"local-0", "local-1"}, seen
    router = up.wait_for(r"router listening on (\S+)", 120).group(1)
    assert router == f"127.0.0.1:{port}"
    second_router = up.wait_for(r"router listening on (\S+)", 120).group(1)
    assert second_router == f"127.0.0.1:{port + 1}"
    gateway = up.wait_for(r"OpenAI-compatible HTTP API on (\S+) ", 30).group(1)
    assert gateway == f"http://127.0.0.1:{http_port}/v1"
    # The demo: a real streamed answer, then its finish reason and usage.
    served = up.wait_for(r"\[(LENGTH|EOS|STOP): (\d+) tokens, .* served by (local-\d)\]", 300)
    assert int(served.group(2)) > 0
    up.wait_for(r"cluster running; Ctrl-C to stop", 30)
    demo_text = "\n".join(up.lines)
    assert "continuous batching" in demo_text  # the question, echoed before the answer
    # Start-up output: the cores each worker got, one line per phase with its seconds,
    # one "serving on" per worker, no library progress bars or warnings.
    for worker in ("local-0", "local-1"):
        assert re.search(rf"^worker {worker}: core\(s\) \S+, \d+ compute thread", demo_text, re.M)
        assert re.search(rf"^worker {worker}: loaded \S+ in \d+\.\d s$", demo_text, re.M)
        assert re.search(rf"^worker {worker}: warmed up in \d+\.\d s$", demo_text, re.M)
        assert len(re.findall(rf"^worker {worker} serving on ", demo_text, re.M)) == 1
    assert "it/s]" not in demo_text and "Warning" not in demo_text, demo_text

    # Other clients get served while up is in the foreground, by either router.
    for address in (router, second_router):
        with grpc.insecure_channel(address) as channel:
            request = generate_pb2.GenerateRequest(
                prompt="The capital of France is",
                params=generate_pb2.SamplingParams(max_new_tokens=4, temperature=0.0),
            )
            messages = list(
                generate_pb2_grpc.GenerateStub(channel).GenerateStream(request, timeout=120)
            )
        assert messages[-1].usage.completion_tokens == 4
        # The routers fill co-located workers in order (--balance pack): an idle
        # cluster's first worker takes a lone request.
        assert messages[-1].usage.worker_id == "local-0"
    # Both workers take turns on the cores through one lock file; the routers pack.
    lock = f"up-{port}.compute.lock"
    argvs = [a for a in _llmcluster_cmdlines() if any(lock in x for x in a)]
    assert len(argvs) == 2 and all("worker" in a for a in argvs), argvs
    routers = [a for a in _llmcluster_cmdlines() if "router" in a and str(port) in a]
    assert routers and all(a[a.index("--balance") + 1] == "pack" for a in routers), routers
    # And the official OpenAI client, through up's HTTP gateway (issue 16's first bar):
    # content deltas in chunks of their own, usage on the last; completions and models;
    # an unknown model is NotFoundError, temperature=-1 BadRequestError.
    model = "SmolLM2-135M-Instruct"
    with openai.OpenAI(base_url=gateway, api_key="unused", max_retries=0) as client:
        chunks = list(
            client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "Hi"}],
                max_tokens=4, stream=True, stream_options={"include_usage": True},
                extra_body={"ignore_eos": True},
            )
        )  # fmt: skip
        content = [c for c in chunks if c.choices and c.choices[0].delta.content]
        assert len(content) >= 2, "content deltas arrive as separate chunks"
        assert chunks[-1].choices == [] and chunks[-1].usage is not None
        assert chunks[-1].usage.completion_tokens == 4
        completion = client.completions.create(model=model, prompt="Hello", max_tokens=2)
        assert completion.usage is not None and completion.usage.completion_tokens >= 1
        assert model in {m.id for m in client.models.list()}
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(
                model="no-such-model", messages=[{"role": "user", "content": "Hi"}]
            )
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "Hi"}], temperature=-1
            )

    ports = _cluster_ports(port)
    assert sorted(ports[1:]) == sorted(a.rsplit(":", 1)[1] for a in seen.values())
    assert up.interrupt(timeout_s=60) == 0
    up.wait_for(r"stopping cluster", 5)
    _wait_stopped([*ports, str(port + 1), str(http_port)], timeout_s=10)


def test_ctrl_c_while_workers_load_stops_everything(up_factory: list[UpProcess]) -> None:
    port = free_port()
    up = UpProcess("--workers", "1", "--port", str(port), "--dtype", "float32", "--no-http")
    up_factory.append(up)
    up.wait_for(r"starting 1 router\(s\) on", 60)
    ports = _cluster_ports(port)
    started = time.monotonic()
    # Interrupted before anything is healthy: up must not sit in its health wait.
    assert up.interrupt(timeout_s=60) == 0
    assert time.monotonic() - started < 30
    _wait_stopped(ports, timeout_s=10)
