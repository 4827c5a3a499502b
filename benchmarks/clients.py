"""Streaming benchmark clients: gRPC (``Generate.GenerateStream``) and OpenAI-style HTTP
server-sent events, driven as a closed loop of N concurrent streams.

Each client stamps every message with ``time.perf_counter()`` the moment it is read, so
TTFT and inter-token gaps are what a caller on this machine would see.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable

import grpc

from benchmarks.metrics import RequestRecord
from benchmarks.workload import Prompt
from common.pb import generate_pb2, generate_pb2_grpc

# Many concurrent streams share one channel (HTTP/2 multiplexing, as a real client
# library would); the limits keep large messages and long runs from tripping defaults.
_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 60_000),
]

RequestFn = Callable[[Prompt, RequestRecord], Awaitable[None]]


async def run_closed_loop(
    prompts: list[Prompt], concurrency: int, request: RequestFn
) -> list[RequestRecord]:
    """Keeps ``concurrency`` requests in flight until every prompt was sent once; a new
    request starts as soon as one finishes (the usual serving-benchmark closed loop)."""
    records = [RequestRecord(prompt_index=p.index) for p in prompts]
    next_index = 0

    async def stream_slot() -> None:
        nonlocal next_index
        while next_index < len(prompts):
            i = next_index
            next_index += 1
            record = records[i]
            record.start_s = time.perf_counter()
            try:
                await request(prompts[i], record)
            except grpc.aio.AioRpcError as exc:
                record.error = f"{exc.code().name}: {exc.details()}"
            except Exception as exc:  # noqa: BLE001 - one failure must not stop the run
                record.error = f"{type(exc).__name__}: {exc}"

    await asyncio.gather(*(stream_slot() for _ in range(max(1, concurrency))))
    return records


class GrpcStreamClient:
    """Streams through ``Generate.GenerateStream`` of a router or worker."""

    def __init__(self, address: str, max_new_tokens: int) -> None:
        self.address = address
        self.max_new_tokens = max_new_tokens
        self._channel: grpc.aio.Channel | None = None
        self._stub: generate_pb2_grpc.GenerateStub | None = None

    async def __aenter__(self) -> GrpcStreamClient:
        self._channel = grpc.aio.insecure_channel(self.address, options=_CHANNEL_OPTIONS)
        await asyncio.wait_for(self._channel.channel_ready(), timeout=30)
        self._stub = generate_pb2_grpc.GenerateStub(self._channel)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._channel is not None:
            await self._channel.close()

    def _request(self, prompt: Prompt, max_new_tokens: int) -> generate_pb2.GenerateRequest:
        params = generate_pb2.SamplingParams(
            max_new_tokens=max_new_tokens, temperature=0.0, ignore_eos=True
        )
        return generate_pb2.GenerateRequest(
            request_id=f"bench-{prompt.index}", prompt=prompt.text, params=params
        )

    async def request(self, prompt: Prompt, record: RequestRecord) -> None:
        await self.request_tokens(prompt, record, self.max_new_tokens)

    async def request_tokens(self, prompt: Prompt, record: RequestRecord, max_new: int) -> None:
        assert self._stub is not None, "use as an async context manager"
        call = self._stub.GenerateStream(self._request(prompt, max_new), timeout=3600)
        clock = time.perf_counter
        async for msg in call:
            # Stamp before touching the message: parsing cost is the client's, not the
            # server's.
            now = clock()
            record.on_tokens(now, len(msg.tokens))
            if msg.finish_reason:
                record.end_s = now
                record.server_ttft_ms = msg.usage.time_to_first_token_ms
                record.server_tokens = msg.usage.completion_tokens
                record.worker_id = msg.usage.worker_id
        if record.end_s is None:
            record.end_s = clock()


class OpenAIStreamClient:
    """Streams ``/v1/completions`` with ``stream: true`` over plain asyncio sockets.

    A hand-rolled HTTP/1.1 client keeps the driver free of an HTTP library and its
    per-chunk overhead; each request has its own connection (``Connection: close``),
    as concurrent OpenAI clients effectively do.
    """

    def __init__(
        self,
        host: str,
        port: int,
        max_new_tokens: int,
        extra_fields: Callable[[int], dict[str, object]] | None = None,
    ) -> None:
        """``extra_fields(max_new_tokens)``: what one server needs beside the OpenAI
        fields to be greedy with EOS ignored (each has its own way to say it)."""
        self.host = host
        self.port = port
        self.max_new_tokens = max_new_tokens
        self.extra_fields = extra_fields

    # A connection per request: nothing to open or close, but used like GrpcStreamClient.
    async def __aenter__(self) -> OpenAIStreamClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    def _body(self, prompt: Prompt, max_new_tokens: int) -> bytes:
        body: dict[str, object] = {
            "prompt": prompt.text,
            "stream": True,
            "max_tokens": max_new_tokens,
            "temperature": 0.0,
        }
        if self.extra_fields is not None:
            body.update(self.extra_fields(max_new_tokens))
        return json.dumps(body).encode()

    async def request(self, prompt: Prompt, record: RequestRecord) -> None:
        await self.request_tokens(prompt, record, self.max_new_tokens)

    async def request_tokens(self, prompt: Prompt, record: RequestRecord, max_new: int) -> None:
        body = self._body(prompt, max_new)
        reader, writer = await asyncio.open_connection(self.host, self.port)
        try:
            head = (
                f"POST /v1/completions HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                "Content-Type: application/json\r\nAccept: text/event-stream\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            ).encode()
            writer.write(head + body)
            await writer.drain()
            status = await reader.readline()
            if b" 200 " not in status:
                rest = await reader.read(2000)
                raise RuntimeError(
                    f"HTTP {status.decode().strip()}: {rest.decode(errors='replace')}"
                )
            chunked = False
            while True:
                line = await reader.readline()
                if line in (b"\r\n", b""):
                    break
                if line.lower().startswith(b"transfer-encoding:") and b"chunked" in line.lower():
                    chunked = True
            await self._read_events(reader, chunked, record)
        finally:
            writer.close()
        if record.end_s is None:
            record.end_s = time.perf_counter()

    async def _read_events(
        self, reader: asyncio.StreamReader, chunked: bool, record: RequestRecord
    ) -> None:
        buffer = b""
        while True:
            if chunked:
                size_line = await reader.readline()
                if not size_line:
                    return
                size = int(size_line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    return
                data = await reader.readexactly(size + 2)  # chunk + CRLF
                now = time.perf_counter()
                buffer += data[:-2]
            else:
                data = await reader.read(65536)
                if not data:
                    return
                now = time.perf_counter()
                buffer += data
            while b"\n\n" in buffer:
                event, buffer = buffer.split(b"\n\n", 1)
                if self._on_event(event, now, record):
                    return

    @staticmethod
    def _on_event(event: bytes, now: float, record: RequestRecord) -> bool:
        """Handles one SSE event; True when the stream is over."""
        for line in event.split(b"\n"):
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                record.end_s = record.end_s or now
                return True
            msg = json.loads(payload)
            if "error" in msg:
                raise RuntimeError(f"server error: {msg['error']}")
            choice = (msg.get("choices") or [{}])[0]
            if choice.get("text"):
                # One text delta per decoded chunk; the real token count comes with
                # the final usage and is reconciled below.
                record.on_tokens(now, 1)
            if choice.get("finish_reason"):
                record.end_s = now
                usage = msg.get("usage") or {}
                completion = usage.get("completion_tokens")
                if completion is not None:
                    record.server_tokens = int(completion)
                    if completion > record.tokens and record.first_token_s is not None:
                        # Tokens that decoded to no visible text still count as
                        # generated; they arrived with a neighbour (0 gap).
                        extra = completion - record.tokens
                        record.gaps_s.extend([0.0] * extra)
                        record.tokens = completion
                return True
        return False
