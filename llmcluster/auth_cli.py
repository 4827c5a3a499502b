"""``llmcluster auth new-key``: a random API key for a tenant; only its hash is stored."""

from __future__ import annotations

import argparse
import sys

from common.auth import AuthFileError, append_tenant, new_token
from common.config import home_dir


def default_auth_file() -> str:
    return str(home_dir() / "auth.toml")


def _new_key(args: argparse.Namespace) -> int:
    token = new_token()
    limits = {
        "requests_per_minute": args.requests_per_minute,
        "tokens_per_minute": args.tokens_per_minute,
        "max_concurrent": args.max_concurrent,
        "allow_finetune": args.allow_finetune,
    }
    try:
        append_tenant(args.auth_file, args.tenant, token, **limits)
    except (AuthFileError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # The token is shown this once; the file keeps only its sha256.
    print(token)
    print(
        f"tenant {args.tenant!r} added to {args.auth_file}; the key above is not stored, "
        "keep it now (clients: --token or LLMCLUSTER_TOKEN)",
        file=sys.stderr,
    )
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    auth = sub.add_parser("auth", help="manage API keys of the auth file (--auth-file)")
    actions = auth.add_subparsers(dest="auth_command", required=True, metavar="ACTION")
    new = actions.add_parser(
        "new-key", help="generate a tenant's API key: print it once, append its hash"
    )
    new.add_argument("--tenant", required=True, help="tenant name ([A-Za-z0-9._-], unique)")
    new.add_argument(
        "--auth-file",
        default=default_auth_file(),
        help="auth file to append to, created if missing (default: $LLMCLUSTER_HOME/auth.toml)",
    )
    new.add_argument("--requests-per-minute", type=int, default=0, help="0 = unlimited")
    new.add_argument("--tokens-per-minute", type=int, default=0, help="0 = unlimited")
    new.add_argument("--max-concurrent", type=int, default=0, help="0 = unlimited")
    new.add_argument(
        "--allow-finetune", action="store_true", help="the tenant may create fine-tuning jobs"
    )
    new.set_defaults(func=_new_key)
