"""worker.proto's Load counts what arrived "on this link": two Serve streams to one real
worker each see their own SubmitBatch / request counts, and Info (no link) the sum."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc

from common.pb import generate_pb2, worker_pb2, worker_pb2_grpc
from tests.procs import start_worker


class _Link:
    """One Serve stream, as the router opens it: messages in from a queue, out to one."""

    def __init__(self, stub: worker_pb2_grpc.WorkerStub) -> None:
        self._outbox: queue.Queue[worker_pb2.RouterMessage | None] = queue.Queue()
        self.inbox: queue.Queue[worker_pb2.WorkerMessage] = queue.Queue()
        self._call = stub.Serve(self._messages(), timeout=120)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _messages(self) -> Iterator[worker_pb2.RouterMessage]:
        while (msg := self._outbox.get()) is not None:
            yield msg

    def _read(self) -> None:
        try:
            for msg in self._call:
                self.inbox.put(msg)
        except grpc.RpcError:
            pass  # closed by close()

    def submit(self, batch_id: int, link_ids: list[str]) -> None:
        items = [
            worker_pb2.WorkItem(
                link_request_id=link_id,
                request=generate_pb2.GenerateRequest(
                    prompt="hi", params=generate_pb2.SamplingParams(max_new_tokens=3)
                ),
            )
            for link_id in link_ids
        ]
        self._outbox.put(
            worker_pb2.RouterMessage(
                submit_batch=worker_pb2.SubmitBatch(batch_id=batch_id, items=items)
            )
        )

    def wait_finished(self, link_ids: set[str]) -> None:
        pending = set(link_ids)
        while pending:
            msg = self.inbox.get(timeout=60)
            if msg.WhichOneof("kind") == "finished":
                pending.discard(msg.finished.link_request_id)
            assert msg.WhichOneof("kind") != "rejected", msg

    def next_load(self) -> worker_pb2.Load:
        while True:
            msg = self.inbox.get(timeout=30)
            if msg.WhichOneof("kind") == "load":
                return msg.load

    def close(self) -> None:
        self._outbox.put(None)
        self._call.cancel()


def test_load_reports_the_counts_of_its_own_link(tmp_path: Path) -> None:
    worker = start_worker(
        "--engine", "null", "--load-interval-ms", "50", "--self-test-interval-s", "0",
        env={"LLMCLUSTER_HOME": str(tmp_path)},
    )  # fmt: skip
    try:
        worker.wait_healthy(120)
        with grpc.insecure_channel(worker.address) as channel:
            stub = worker_pb2_grpc.WorkerStub(channel)
            a, b = _Link(stub), _Link(stub)
            try:
                # Everything is sent on both links before either is read back.
                a.submit(1, ["a1", "a2"])
                a.submit(2, ["a3"])
                b.submit(1, ["b1"])
                a.wait_finished({"a1", "a2", "a3"})
                b.wait_finished({"b1"})
                load_a, load_b = a.next_load(), b.next_load()
                assert (load_a.batches_received, load_a.requests_received) == (2, 3)
                assert (load_b.batches_received, load_b.requests_received) == (1, 1)
                total = stub.Info(worker_pb2.InfoRequest(), timeout=10).load
                assert (total.batches_received, total.requests_received) == (3, 4)
            finally:
                a.close()
                b.close()
    finally:
        worker.stop()
