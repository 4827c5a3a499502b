"""Configuration of the registry; CLI flags derive from :class:`RegistryConfig`.

Consul connection settings default to Consul's own environment variables
(``CONSUL_HTTP_ADDR``, ``CONSUL_HTTP_TOKEN``/``CONSUL_HTTP_TOKEN_FILE``,
``CONSUL_HTTP_SSL``, ``CONSUL_HTTP_SSL_VERIFY``, ``CONSUL_CACERT``), read through
:func:`common.config.env`; a flag given on the command line wins over them.
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from common.config import env, field

BACKENDS = ("static", "consul")
DEFAULT_CONSUL_PORT = 8500


def _env_bool(name: str, default: bool) -> bool:
    """Parses a boolean the way Consul does (Go's strconv.ParseBool)."""
    value = env(name)
    if value is None:
        return default
    if value in ("1", "t", "T", "true", "TRUE", "True"):
        return True
    if value in ("0", "f", "F", "false", "FALSE", "False"):
        return False
    raise ValueError(f"${name} must be a boolean (true/false/1/0), got {value!r}")


def _env_token() -> str | None:
    token = env("CONSUL_HTTP_TOKEN")
    if token is None and (path := env("CONSUL_HTTP_TOKEN_FILE")):
        token = Path(path).read_text().strip() or None
    return token


def parse_consul_addr(addr: str, ssl: bool = False) -> tuple[str, str, int]:
    """``host:port`` or ``http(s)://host[:port]`` to (scheme, host, port).

    As with Consul's CLI, ``ssl`` (``$CONSUL_HTTP_SSL``) upgrades the scheme to https.
    """
    text = addr.strip()
    parsed = urllib.parse.urlsplit(text if "://" in text else "//" + text)
    scheme = parsed.scheme or "http"
    if scheme not in ("http", "https"):
        raise ValueError(f"consul address must be http(s)://host:port or host:port, got {addr!r}")
    try:
        port = parsed.port
    except ValueError as exc:
        raise ValueError(f"consul address has a bad port: {addr!r}") from exc
    if not parsed.hostname:
        raise ValueError(f"consul address has no host: {addr!r}")
    if ssl:
        scheme = "https"
    return scheme, parsed.hostname, port or DEFAULT_CONSUL_PORT


@dataclass
class RegistryConfig:
    """Which registry a process uses, how it reaches Consul, and the health check it asks for."""

    registry: str = field("static", help="discovery backend: static (fixed address list) or consul")
    consul_addr: str = field(
        default_factory=lambda: env("CONSUL_HTTP_ADDR", "127.0.0.1:8500"),
        help="Consul agent HTTP address, host:port or http(s)://host:port ($CONSUL_HTTP_ADDR)",
    )
    # Kept off the command line: a token in argv is visible to every local user.
    consul_token: str | None = field(
        default_factory=_env_token,
        flag=False,
        help="ACL token ($CONSUL_HTTP_TOKEN or the file $CONSUL_HTTP_TOKEN_FILE)",
    )
    consul_ssl: bool = field(
        default_factory=lambda: _env_bool("CONSUL_HTTP_SSL", False),
        help="talk https to Consul ($CONSUL_HTTP_SSL)",
    )
    consul_ssl_verify: bool = field(
        default_factory=lambda: _env_bool("CONSUL_HTTP_SSL_VERIFY", True),
        help="verify Consul's TLS certificate ($CONSUL_HTTP_SSL_VERIFY)",
    )
    consul_cacert: str | None = field(
        default_factory=lambda: env("CONSUL_CACERT"),
        help="CA bundle that signs Consul's certificate ($CONSUL_CACERT)",
    )
    consul_timeout_s: float = field(
        5.0, help="bound on one non-blocking request to Consul (blocking ones add their wait)"
    )
    consul_check_interval_s: float = field(
        2.0, help="how often Consul polls each instance's grpc.health.v1 endpoint"
    )
    consul_check_timeout_s: float = field(2.0, help="bound on one gRPC health check by Consul")
    consul_check_tls_server_name: str = field(
        "",
        help="name Consul verifies in a TLS instance's certificate when checking it "
        "(instances registered by host name sharing one certificate; default: the address)",
    )
    consul_deregister_critical_after_s: float = field(
        60.0,
        help="Consul removes an instance whose check stays critical this long "
        "(Consul's minimum is 60 s; 0 disables)",
    )
    consul_watch_wait_s: float = field(
        30.0, help="longest a blocking query on the health endpoint waits for a change"
    )
    consul_retry_initial_s: float = field(
        0.25, help="first delay before retrying after Consul failed to answer"
    )
    consul_retry_max_s: float = field(5.0, help="longest delay between retries to Consul")
    consul_reregister_interval_s: float = field(
        15.0,
        help="how often a registered instance checks it is still known to Consul and "
        "registers again if not (agent restarted, or reaped while critical); 0 disables",
    )

    def __post_init__(self) -> None:
        if self.registry not in BACKENDS:
            raise ValueError(f"registry must be one of {BACKENDS}, got {self.registry!r}")
        parse_consul_addr(self.consul_addr, self.consul_ssl)  # raises on a bad address
        positive = {
            "consul_timeout_s": self.consul_timeout_s,
            "consul_check_interval_s": self.consul_check_interval_s,
            "consul_check_timeout_s": self.consul_check_timeout_s,
            "consul_watch_wait_s": self.consul_watch_wait_s,
            "consul_retry_initial_s": self.consul_retry_initial_s,
        }
        for name, value in positive.items():
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        if self.consul_deregister_critical_after_s < 0:
            raise ValueError(
                "consul_deregister_critical_after_s must be >= 0, got "
                f"{self.consul_deregister_critical_after_s}"
            )
        if self.consul_reregister_interval_s < 0:
            raise ValueError(
                f"consul_reregister_interval_s must be >= 0, got {self.consul_reregister_interval_s}"
            )
        if self.consul_retry_max_s < self.consul_retry_initial_s:
            raise ValueError(
                "need consul_retry_initial_s <= consul_retry_max_s, got "
                f"{self.consul_retry_initial_s} and {self.consul_retry_max_s}"
            )
        if self.consul_watch_wait_s > 600:
            raise ValueError(
                f"consul_watch_wait_s is capped at 600 by Consul, got {self.consul_watch_wait_s}"
            )

    def consul_endpoint(self) -> tuple[str, str, int]:
        """(scheme, host, port) of the Consul agent."""
        return parse_consul_addr(self.consul_addr, self.consul_ssl)

    def consul_verify(self) -> bool | str:
        """The ``verify`` argument for py-consul / requests: a CA path, or a bool."""
        if not self.consul_ssl_verify:
            return False
        return self.consul_cacert or True
