"""Client commands: ``llmcluster generate`` and ``llmcluster models``."""

from __future__ import annotations

import argparse
import json
import sys

import grpc
from google.protobuf import json_format

from common.config import env
from common.pb import generate_pb2, generate_pb2_grpc
from llmcluster.connection import add_connection_arguments, open_channel

DEFAULT_TARGET = "127.0.0.1:50051"


def default_target() -> str:
    """The local cluster's router, unless LLMCLUSTER_TARGET says otherwise."""
    return env("LLMCLUSTER_TARGET", DEFAULT_TARGET) or DEFAULT_TARGET


def add_target_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--target",
        default=None,
        help=f"router or worker address host:port (default: $LLMCLUSTER_TARGET or {DEFAULT_TARGET})",
    )
    add_connection_arguments(parser)  # --token, --tls-ca, --tls-cert, --tls-key


def build_request(args: argparse.Namespace) -> generate_pb2.GenerateRequest:
    params = generate_pb2.SamplingParams(
        temperature=args.temperature,
        top_k=args.top_k,
        stop=args.stop or [],
        logprobs=args.logprobs,
    )
    if args.max_new_tokens is not None:
        params.max_new_tokens = args.max_new_tokens
    if args.top_p is not None:
        params.top_p = args.top_p
    if args.repetition_penalty is not None:
        params.repetition_penalty = args.repetition_penalty
    if args.seed is not None:
        params.seed = args.seed
    req = generate_pb2.GenerateRequest(model=args.model, adapter=args.adapter, params=params)
    if args.chat:
        if args.system:
            req.messages.add(role="system", content=args.system)
        req.messages.add(role="user", content=args.prompt)
    else:
        req.prompt = args.prompt
    return req


def _generate(args: argparse.Namespace) -> int:
    request = build_request(args)
    target = args.target or default_target()
    with open_channel(args, target) as channel:
        stub = generate_pb2_grpc.GenerateStub(channel)
        try:
            for msg in stub.GenerateStream(request, timeout=args.timeout):
                if args.json:
                    print(json.dumps(json_format.MessageToDict(msg)), flush=True)
                    continue
                sys.stdout.write(msg.text)
                sys.stdout.flush()
                if msg.HasField("usage"):
                    u = msg.usage
                    print(
                        f"\n[{generate_pb2.FinishReason.Name(msg.finish_reason)}] "
                        f"prompt={u.prompt_tokens} completion={u.completion_tokens} "
                        f"ttft={u.time_to_first_token_ms:.0f}ms total={u.total_ms:.0f}ms "
                        f"worker={u.worker_id}",
                        file=sys.stderr,
                    )
        except grpc.RpcError as exc:
            print(f"\nerror: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    return 0


def _models(args: argparse.Namespace) -> int:
    with open_channel(args, args.target or default_target()) as channel:
        try:
            reply = generate_pb2_grpc.GenerateStub(channel).ListModels(
                generate_pb2.ListModelsRequest(), timeout=args.timeout
            )
        except grpc.RpcError as exc:
            print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    if args.json:
        print(json.dumps(json_format.MessageToDict(reply), indent=2))
        return 0
    for m in reply.models:
        if m.kind == generate_pb2.ADAPTER:
            print(f"adapter  {m.name}@{m.version}  base={m.base_model}  method={m.method}")
        else:
            default = " (default)" if m.is_default else ""
            print(f"base     {m.name}{default}  context={m.max_context_tokens}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    gen = sub.add_parser("generate", help="stream a generation, printing tokens as they arrive")
    gen.add_argument("prompt", help="prompt text (with --chat: the user message)")
    add_target_argument(gen)
    gen.add_argument("--chat", action="store_true", help="apply the model's chat template")
    gen.add_argument("--system", default="", help="system message (with --chat)")
    gen.add_argument("--json", action="store_true", help="print one JSON object per message")
    gen.add_argument("--model", default="", help="base model (default: the cluster's default)")
    gen.add_argument("--adapter", default="", help="adapter name or name@version")
    gen.add_argument("--max-new-tokens", type=int, default=None, help="default: server's (128)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-p", type=float, default=None, help="nucleus mass in (0, 1]")
    gen.add_argument("--top-k", type=int, default=0, help="0 = disabled")
    gen.add_argument("--repetition-penalty", type=float, default=None, help="1.0 = none")
    gen.add_argument("--seed", type=int, default=None, help="sampling seed")
    gen.add_argument("--stop", action="append", help="stop string (repeatable)")
    gen.add_argument("--logprobs", type=int, default=0, help="top alternatives per token")
    gen.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
    gen.set_defaults(func=_generate)

    models = sub.add_parser("models", help="list base models and adapter versions")
    add_target_argument(models)
    models.add_argument("--json", action="store_true", help="print JSON")
    models.add_argument("--timeout", type=float, default=10.0, help="deadline in seconds")
    models.set_defaults(func=_models)
