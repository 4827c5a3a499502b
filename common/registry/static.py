"""The static registry: a fixed list of addresses (``llmcluster up``, Kubernetes headless).

Registration is a no-op and the watch reports the list once; deciding which of the
addresses is alive is left to the router's own health checking.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from common.registry.interface import (
    WORKER_SERVICE,
    OnChange,
    OnStatus,
    Registry,
    ServiceInstance,
    Watch,
    WatchBase,
    WatchStatus,
    parse_endpoint,
)

logger = logging.getLogger(__name__)


class _StaticWatch(WatchBase):
    """A watch whose set never changes after the first report."""


class StaticRegistry(Registry):
    """Reports ``addresses`` (``host:port``) as the instances of ``service_name``.

    Instance ids are the addresses themselves; tags and meta are empty (the router
    learns models and capacity from each worker's ``Info``). Watching any other
    service reports an empty set.
    """

    def __init__(self, addresses: Sequence[str], service_name: str = WORKER_SERVICE) -> None:
        self.service_name = service_name
        self._instances: list[ServiceInstance] = []
        for address in addresses:
            host, port = parse_endpoint(address)
            self._instances.append(
                ServiceInstance(name=service_name, id=address.strip(), address=host, port=port)
            )

    def register(self, instance: ServiceInstance) -> bool:
        logger.debug("static registry: not registering %s (no-op)", instance.id)
        return True

    def deregister(self, instance_id: str) -> bool:
        logger.debug("static registry: not deregistering %s (no-op)", instance_id)
        return True

    def watch(
        self,
        service_name: str,
        on_change: OnChange,
        on_status: OnStatus | None = None,
    ) -> Watch:
        """Calls ``on_change`` once, on the calling thread, before returning."""
        watch = _StaticWatch(on_change, on_status)
        watch._set_status(WatchStatus(healthy=True))
        found = self._instances if service_name == self.service_name else []
        watch._publish(list(found), force=True)
        return watch
