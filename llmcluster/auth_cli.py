"""``llmcluster auth new-key``: a random API key for a tenant; only its hash is stored."""

from __future__ import annotations

import argparse
import sys

from common.auth import AuthFileError, append_tenant, new_token
from common.config import home_dir

DEFAULT_CERT_HOSTS = ("localhost", "127.0.0.1", "llmcluster-router", "llmcluster-worker")


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


def _certs(args: argparse.Namespace) -> int:
    from pathlib import Path

    from common.certs import Authority  # local: needs cryptography

    out = Path(args.out)
    hosts = tuple(args.host or DEFAULT_CERT_HOSTS)
    authority = Authority(args.ca_name)
    ca = authority.write_ca(out)
    node = authority.issue(f"{args.ca_name} node", hosts=hosts, valid_days=args.valid_days)
    cert, key = node.write(out, "node")
    print(f"wrote {ca}, {cert}, {key} (valid {args.valid_days:g} days) for {', '.join(hosts)}")
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

    certs = actions.add_parser(
        "certs",
        help="make a private CA and one certificate for the given hosts (ca.crt, node.crt, "
        "node.key): for trying TLS/mTLS; use your own PKI or cert-manager in production",
    )
    certs.add_argument("out", help="folder to write to")
    certs.add_argument(
        "--host",
        action="append",
        default=None,
        help="DNS name or IP the certificate is valid for (repeatable; default: "
        "localhost, 127.0.0.1, llmcluster-router, llmcluster-worker)",
    )
    certs.add_argument("--valid-days", type=float, default=365.0, help="validity")
    certs.add_argument("--ca-name", default="llmcluster", help="CA common name")
    certs.set_defaults(func=_certs)
