"""Engine dataclasses → protobuf messages."""

from __future__ import annotations

from common.pb import generate_pb2
from worker.engine import SeqOutput, TokenOut, UsageStats

FINISH_REASON_PB = {
    "LENGTH": generate_pb2.LENGTH,
    "STOP": generate_pb2.STOP,
    "EOS": generate_pb2.EOS,
}


def token_to_pb(token: TokenOut) -> generate_pb2.Token:
    return generate_pb2.Token(
        id=token.token_id,
        text=token.text,
        logprob=token.logprob,
        top_logprobs=[generate_pb2.TopLogprob(id=i, text=t, logprob=lp) for i, t, lp in token.top],
    )


def usage_to_pb(usage: UsageStats, worker_id: str) -> generate_pb2.Usage:
    return generate_pb2.Usage(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        queue_ms=usage.queue_ms,
        time_to_first_token_ms=usage.time_to_first_token_ms,
        total_ms=usage.total_ms,
        worker_id=worker_id,
        adapter=usage.adapter,
    )


def stream_response_to_pb(
    out: SeqOutput, request_id: str, worker_id: str
) -> generate_pb2.GenerateStreamResponse:
    msg = generate_pb2.GenerateStreamResponse(
        request_id=request_id,
        tokens=[token_to_pb(t) for t in out.tokens],
        text=out.text,
    )
    if out.finish_reason is not None and out.usage is not None:
        msg.finish_reason = FINISH_REASON_PB[out.finish_reason]
        msg.usage.CopyFrom(usage_to_pb(out.usage, worker_id))
    return msg
