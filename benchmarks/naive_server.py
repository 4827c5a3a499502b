"""The **naive baseline**: a gRPC Generate server as a first attempt would write it.

One ``model.generate`` per request, one request at a time behind a lock, streaming each
token through a generate streamer as it is produced. No batching: concurrent clients
queue on the lock. Run as ``python -m benchmarks.naive_server --port P --dtype D``.
"""

from __future__ import annotations

import argparse
import logging
import queue
import signal
import sys
import threading
import time
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from common.pb import generate_pb2, generate_pb2_grpc

logger = logging.getLogger(__name__)

_END = object()


class _TokenStreamer:
    """A ``generate`` streamer that forwards each new token id to a queue (the first
    ``put`` is the prompt, which is skipped)."""

    def __init__(self) -> None:
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self._prompt_seen = False

    def put(self, value) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        for token_id in value.reshape(-1).tolist():
            self.queue.put(int(token_id))

    def end(self) -> None:
        self.queue.put(_END)


class NaiveGenerateServicer(generate_pb2_grpc.GenerateServicer):
    """GenerateStream = tokenize, ``model.generate`` with a streamer, yield each token."""

    def __init__(self, model, tokenizer) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.lock = threading.Lock()  # one generation at a time: the naive part

    def GenerateStream(self, request, context):  # noqa: N802 - gRPC method name
        import torch

        max_new = request.params.max_new_tokens or 128
        kwargs = {"max_new_tokens": max_new, "do_sample": False}
        if request.params.ignore_eos:
            kwargs["min_new_tokens"] = max_new  # suppresses EOS until max_new_tokens
        arrival = time.perf_counter()
        with self.lock:
            inputs = self.tokenizer(request.prompt, return_tensors="pt")
            streamer = _TokenStreamer()
            error: list[BaseException] = []

            def run() -> None:
                try:
                    with torch.inference_mode():
                        self.model.generate(
                            **inputs,
                            streamer=streamer,
                            pad_token_id=self.tokenizer.pad_token_id,
                            **kwargs,
                        )
                except BaseException as exc:  # noqa: BLE001 - reported to the client
                    error.append(exc)
                    streamer.end()

            thread = threading.Thread(target=run, daemon=True)
            thread.start()
            count, first_ms = 0, 0.0
            while True:
                item = streamer.queue.get()
                if item is _END:
                    break
                count += 1
                if count == 1:
                    first_ms = (time.perf_counter() - arrival) * 1000.0
                yield generate_pb2.GenerateStreamResponse(
                    request_id=request.request_id,
                    tokens=[generate_pb2.Token(id=item, text=self.tokenizer.decode([item]))],
                    text=self.tokenizer.decode([item]),
                )
            thread.join()
        if error:
            context.abort(grpc.StatusCode.INTERNAL, f"generate failed: {error[0]}")
        usage = generate_pb2.Usage(
            prompt_tokens=int(inputs["input_ids"].shape[-1]),
            completion_tokens=count,
            time_to_first_token_ms=first_ms,
            total_ms=(time.perf_counter() - arrival) * 1000.0,
            worker_id="naive",
        )
        yield generate_pb2.GenerateStreamResponse(
            request_id=request.request_id, finish_reason=generate_pb2.LENGTH, usage=usage
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)

    from common.models import load_model, resolve_model

    model, tokenizer = load_model(resolve_model(None), dtype=args.dtype, device="cpu")
    # Enough threads for every waiting client to hold its stream open on the lock.
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=512))
    generate_pb2_grpc.add_GenerateServicer_to_server(
        NaiveGenerateServicer(model, tokenizer), server
    )
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    server.add_insecure_port(f"127.0.0.1:{args.port}")
    server.start()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    logger.info("naive server on 127.0.0.1:%d", args.port)
    stop.wait()
    server.stop(grace=1).wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
