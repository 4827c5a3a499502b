"""Client commands: ``llmcluster generate`` and ``llmcluster models``."""

from __future__ import annotations

import argparse
import json
import math
import sys

import grpc
from google.protobuf import json_format

from common.config import env
from common.errors import InvalidArgument
from common.pb import generate_pb2, generate_pb2_grpc
from common.validation import (
    GenerationLimits,
    generation_spec_from_pb,
    sampling_params_from_values,
)
from llmcluster.connection import add_connection_arguments, open_channel

DEFAULT_TARGET = "127.0.0.1:50051"


def default_target() -> str:
    """The local cluster's router, unless LLMCLUSTER_TARGET says otherwise."""
    return env("LLMCLUSTER_TARGET", DEFAULT_TARGET) or DEFAULT_TARGET


def positive_seconds(text: str) -> float:
    """argparse type of a deadline: a finite number of seconds above 0 (argparse turns
    the ValueError into a usage error, exit 2)."""
    value = float(text)
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, got {text}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type of a count that may be 0 (unsigned on the wire)."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def add_target_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--target",
        default=None,
        help=f"router or worker address host:port (default: $LLMCLUSTER_TARGET or {DEFAULT_TARGET})",
    )
    add_connection_arguments(parser)  # --token, --tls-ca, --tls-cert, --tls-key


class UsageError(Exception):
    """A flag or input the client refuses before any call (exit code 2, no traceback)."""


def read_prompt(args: argparse.Namespace) -> str:
    """The prompt: the argument, stdin when it is ``-``, or ``--prompt-file`` (a prompt of
    any length: an argument hits the shell's limit)."""
    if args.prompt_file is not None and args.prompt is not None:
        raise UsageError("give the prompt as an argument or with --prompt-file, not both")
    if args.prompt_file is not None:
        try:
            with open(args.prompt_file, encoding="utf-8") as fh:
                return fh.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"--prompt-file: cannot read {args.prompt_file}: {exc}") from None
    if args.prompt is None:
        raise UsageError("a prompt is needed: an argument, '-' for stdin, or --prompt-file")
    if args.prompt == "-":
        return sys.stdin.read()
    return str(args.prompt)


def build_request(
    args: argparse.Namespace, prompt: str | None = None
) -> generate_pb2.GenerateRequest:
    """The GenerateRequest for the flags, checked with the server's rules and wording
    (common/validation.py); raises UsageError naming the flag's field."""
    values = {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "repetition_penalty": args.repetition_penalty,
        "seed": args.seed,
        "stop": args.stop or None,
        "logprobs": args.logprobs,
    }
    # The upper bound of max_new_tokens is the server's setting: only it can refuse more.
    requested = args.max_new_tokens or 0
    limits = GenerationLimits()
    limits = GenerationLimits(max_new_tokens_limit=max(limits.max_new_tokens_limit, requested))
    text = read_prompt(args) if prompt is None else prompt
    try:
        params = sampling_params_from_values(values, limits)
        req = generate_pb2.GenerateRequest(
            model=args.model,
            adapter=args.adapter,
            params=params,
            user=getattr(args, "user", "") or "",
        )
        if args.chat:
            if args.system:
                req.messages.add(role="system", content=args.system)
            req.messages.add(role="user", content=text)
        else:
            req.prompt = text
        generation_spec_from_pb(req, limits)
    except InvalidArgument as exc:
        raise UsageError(str(exc)) from None
    return req


def _generate(args: argparse.Namespace) -> int:
    try:
        request = build_request(args)
    except UsageError as exc:
        print(f"error: INVALID_ARGUMENT: {exc}", file=sys.stderr)
        return 2
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
            print(
                f"adapter  {m.name}@{m.version}  base={m.base_model}  method={m.method}"
                f"  constraints={'yes' if m.supports_constraints else 'no'}"
            )
        else:
            default = " (default)" if m.is_default else ""
            print(
                f"base     {m.name}{default}  context={m.max_context_tokens}"
                f"  constraints={'yes' if m.supports_constraints else 'no'}"
            )
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    gen = sub.add_parser("generate", help="stream a generation, printing tokens as they arrive")
    gen.add_argument(
        "prompt",
        nargs="?",
        default=None,
        help="prompt text (with --chat: the user message); '-' reads it from stdin",
    )
    gen.add_argument("--prompt-file", default=None, help="read the prompt from this file")
    add_target_argument(gen)
    gen.add_argument("--chat", action="store_true", help="apply the model's chat template")
    gen.add_argument("--system", default="", help="system message (with --chat)")
    gen.add_argument("--json", action="store_true", help="print one JSON object per message")
    gen.add_argument("--model", default="", help="base model (default: the cluster's default)")
    gen.add_argument("--adapter", default="", help="adapter name or name@version")
    gen.add_argument(
        "--user",
        default="",
        help="caller key: keeps you on one version of an adapter with a traffic split",
    )
    gen.add_argument("--max-new-tokens", type=int, default=None, help="default: server's (128)")
    gen.add_argument("--temperature", type=float, default=None, help="0 = greedy (default)")
    gen.add_argument("--top-p", type=float, default=None, help="nucleus mass in (0, 1]")
    gen.add_argument("--top-k", type=int, default=None, help="0 = disabled (default)")
    gen.add_argument("--repetition-penalty", type=float, default=None, help="1.0 = none")
    gen.add_argument("--seed", type=int, default=None, help="sampling seed")
    gen.add_argument("--stop", action="append", help="stop string (repeatable)")
    gen.add_argument("--logprobs", type=int, default=None, help="top alternatives per token")
    gen.add_argument("--timeout", type=positive_seconds, default=None, help="deadline in seconds")
    gen.set_defaults(func=_generate)

    models = sub.add_parser("models", help="list base models and adapter versions")
    add_target_argument(models)
    models.add_argument("--json", action="store_true", help="print JSON")
    models.add_argument(
        "--timeout", type=positive_seconds, default=10.0, help="deadline in seconds"
    )
    models.set_defaults(func=_models)
