"""Service registry: workers and routers register, the router watches healthy workers.

Two backends behind :class:`Registry`: ``static`` (a fixed list of addresses) and
``consul`` (py-consul; gRPC health checks polled by Consul, blocking-query watches).
Choose one with :class:`RegistryConfig` (``--registry consul``) and
:func:`make_registry`. No torch here: the router imports this package.
"""

from __future__ import annotations

from collections.abc import Sequence

from common.registry.config import RegistryConfig, parse_consul_addr
from common.registry.interface import (
    MODEL_TAG_PREFIX,
    ROUTER_SERVICE,
    WORKER_SERVICE,
    HealthCheck,
    OnChange,
    OnStatus,
    Registry,
    RegistryError,
    ServiceInstance,
    Watch,
    WatchStatus,
    format_endpoint,
    model_tag,
    parse_endpoint,
    same_instances,
)
from common.registry.static import StaticRegistry

__all__ = [
    "MODEL_TAG_PREFIX",
    "ROUTER_SERVICE",
    "WORKER_SERVICE",
    "HealthCheck",
    "OnChange",
    "OnStatus",
    "Registry",
    "RegistryConfig",
    "RegistryError",
    "ServiceInstance",
    "StaticRegistry",
    "Watch",
    "WatchStatus",
    "format_endpoint",
    "make_registry",
    "model_tag",
    "parse_consul_addr",
    "parse_endpoint",
    "same_instances",
]


def make_registry(
    config: RegistryConfig,
    static_addresses: Sequence[str] = (),
    service_name: str = WORKER_SERVICE,
) -> Registry:
    """The backend ``config.registry`` names.

    ``static_addresses`` (``host:port``) are the instances of ``service_name`` the
    static backend reports; the consul backend ignores them.
    """
    if config.registry == "consul":
        # Imported here so the static path never loads py-consul / requests.
        from common.registry.consul import ConsulRegistry

        return ConsulRegistry(config)
    return StaticRegistry(static_addresses, service_name=service_name)
