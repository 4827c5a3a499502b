"""Helpers of the security tests: certificates on disk, TLS health polling, null workers."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.certs import Authority
from common.pb import generate_pb2, generate_pb2_grpc
from tests.procs import Proc

NULL_WORKER = ("--engine", "null", "--null-step-ms", "2", "--self-test-interval-s", "0")


@dataclass
class Pki:
    """A CA with a server/client certificate, and a foreign CA with its own certificate."""

    ca: Path
    cert: Path
    key: Path
    other_ca: Path
    other_cert: Path
    other_key: Path
    expired_cert: Path
    expired_key: Path

    def channel_credentials(self, ca: Path | None = None, client: bool = False):
        ca = ca or self.ca
        return grpc.ssl_channel_credentials(
            root_certificates=ca.read_bytes(),
            private_key=self.key.read_bytes() if client else None,
            certificate_chain=self.cert.read_bytes() if client else None,
        )


def make_pki(directory: Path) -> Pki:
    authority, other = Authority("test CA"), Authority("other CA")
    ca, other_ca = authority.write_ca(directory), other.write_ca(directory, "other-ca")
    cert, key = authority.issue("node").write(directory, "node")
    other_cert, other_key = other.issue("intruder").write(directory, "intruder")
    expired_cert, expired_key = authority.issue("old", expired=True).write(directory, "expired")
    return Pki(ca, cert, key, other_ca, other_cert, other_key, expired_cert, expired_key)


def wait_serving(
    proc: Proc,
    credentials: grpc.ChannelCredentials | None,
    timeout_s: float = 120.0,
    metadata: tuple[tuple[str, str], ...] = (),
) -> None:
    """Polls the process's grpc.health.v1 over TLS (or plaintext) until SERVING."""
    deadline = time.monotonic() + timeout_s
    channel = (
        grpc.secure_channel(proc.address, credentials)
        if credentials is not None
        else grpc.insecure_channel(proc.address)
    )
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc.popen.poll() is not None:
                raise RuntimeError(f"exited with {proc.popen.returncode}:\n{proc.output()[-5000:]}")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0, metadata=metadata)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise TimeoutError(f"not serving in {timeout_s}s:\n{proc.output()[-5000:]}")


def stream_texts(
    channel: grpc.Channel,
    prompt: str = "hello",
    max_new_tokens: int = 4,
    metadata: tuple[tuple[str, str], ...] = (),
    timeout_s: float = 30.0,
) -> list[str]:
    """GenerateStream's text deltas (raises grpc.RpcError on failure)."""
    return [
        m.text for m in stream_messages(channel, prompt, max_new_tokens, metadata, timeout_s)[:-1]
    ]


def stream_messages(
    channel: grpc.Channel,
    prompt: str = "hello",
    max_new_tokens: int = 4,
    metadata: tuple[tuple[str, str], ...] = (),
    timeout_s: float = 30.0,
) -> list[generate_pb2.GenerateStreamResponse]:
    """GenerateStream's messages, the last one its finish (raises grpc.RpcError on failure)."""
    stub = generate_pb2_grpc.GenerateStub(channel)
    request = generate_pb2.GenerateRequest(
        prompt=prompt, params=generate_pb2.SamplingParams(max_new_tokens=max_new_tokens)
    )
    msgs = list(stub.GenerateStream(request, timeout=timeout_s, metadata=metadata))
    assert msgs[-1].finish_reason, msgs[-1]
    return msgs
