"""The registry interface: what a service instance is, how it is registered and watched.

Workers and routers register a :class:`ServiceInstance`; the router watches the set of
healthy worker instances. Backends (:mod:`common.registry.static`,
:mod:`common.registry.consul`) implement :class:`Registry`.
"""

from __future__ import annotations

import abc
import dataclasses
import logging
import re
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass

WORKER_SERVICE = "llmcluster-worker"
ROUTER_SERVICE = "llmcluster-router"

logger = logging.getLogger(__name__)

# Tag naming one model an instance serves, e.g. ``model=SmolLM2-135M-Instruct``.
MODEL_TAG_PREFIX = "model="

# Consul's limits on service meta (agent/structs/structs.go, ValidateServiceMetadata):
# keys of at most 128 characters from [A-Za-z0-9_-], values of at most 512, 64 pairs,
# and no "consul-" key prefix. Checked here so a bad key fails at startup, not in Consul.
_META_KEY = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
_META_MAX_PAIRS = 64
_META_MAX_VALUE = 512


class RegistryError(Exception):
    """The registry backend rejected a request (retrying the same request will not help)."""


def model_tag(model: str) -> str:
    """The tag that advertises ``model`` (``model=<name>``)."""
    return MODEL_TAG_PREFIX + model


def format_endpoint(host: str, port: int) -> str:
    """``host:port`` as a gRPC target; IPv6 literals get brackets."""
    if ":" in host and not host.startswith("["):
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def parse_endpoint(text: str) -> tuple[str, int]:
    """Splits ``host:port`` or ``[v6]:port`` into host and port; raises ``ValueError``."""
    host, sep, port_text = text.strip().rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ValueError(f"address must be host:port, got {text!r}")
    port = int(port_text)
    if not 0 < port <= 65535:
        raise ValueError(f"port must be in [1, 65535], got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, port


@dataclass
class HealthCheck:
    """How the registry's health checker probes an instance's ``grpc.health.v1`` endpoint.

    Fields left ``None`` take the registry's configured defaults.
    """

    interval_s: float | None = None
    timeout_s: float | None = None
    # Consul removes the instance once its check has been critical this long
    # (Consul enforces at least 1 minute and reaps every 30 s); 0 disables.
    deregister_critical_after_s: float | None = None
    # The service name sent in HealthCheckRequest; "" is the whole server's status.
    grpc_service: str = ""
    # host:port the checker dials; None dials the instance's own address and port.
    target: str | None = None
    # The instance serves TLS (--tls-cert): the checker must dial TLS. With mTLS the
    # Consul agent presents its own certificate (its tls.defaults.cert_file).
    use_tls: bool = False


@dataclass
class ServiceInstance:
    """One registered endpoint of a service (a worker or a router).

    ``tags`` carry one ``model=<name>`` per model served (see :func:`model_tag`);
    ``meta`` carries string facts such as ``capacity`` and ``version``. Instances that
    come back from a watch have ``check=None``.
    """

    name: str
    id: str
    address: str
    port: int
    tags: tuple[str, ...] = ()
    meta: dict[str, str] = dataclasses.field(default_factory=dict)
    check: HealthCheck | None = None

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("service name must not be empty")
        if not self.id:
            raise ValueError(f"instance id of service {self.name!r} must not be empty")
        if not self.address:
            raise ValueError(f"instance {self.id!r} needs an address")
        if not 0 < self.port <= 65535:
            raise ValueError(f"instance {self.id!r}: port must be in [1, 65535], got {self.port}")
        self.tags = tuple(self.tags)
        # Consul meta values are strings; coerce numbers such as capacity here, once.
        self.meta = {str(k): str(v) for k, v in self.meta.items()}
        if len(self.meta) > _META_MAX_PAIRS:
            raise ValueError(f"instance {self.id!r}: at most {_META_MAX_PAIRS} meta pairs")
        for key, value in self.meta.items():
            if not _META_KEY.match(key) or key.lower().startswith("consul-"):
                raise ValueError(
                    f"instance {self.id!r}: meta key {key!r} must match [A-Za-z0-9_-]{{1,128}} "
                    "and not start with 'consul-'"
                )
            if len(value) > _META_MAX_VALUE:
                raise ValueError(f"instance {self.id!r}: meta {key!r} longer than 512 characters")

    @property
    def endpoint(self) -> str:
        """The gRPC target ``host:port`` of this instance."""
        return format_endpoint(self.address, self.port)

    @property
    def models(self) -> list[str]:
        """Models named by ``model=`` tags, in tag order."""
        return [t[len(MODEL_TAG_PREFIX) :] for t in self.tags if t.startswith(MODEL_TAG_PREFIX)]


def same_instances(a: Iterable[ServiceInstance], b: Iterable[ServiceInstance]) -> bool:
    """True when both sets describe the same instances (id, endpoint, tags, meta)."""

    def key(items: Iterable[ServiceInstance]) -> list[tuple[object, ...]]:
        return sorted(
            (i.id, i.address, i.port, i.tags, tuple(sorted(i.meta.items()))) for i in items
        )

    return key(a) == key(b)


@dataclass(frozen=True)
class WatchStatus:
    """Health of one watch, for logs and metrics.

    ``healthy`` is False from the first failed query until the next success; the watch
    keeps reporting its last known set meanwhile.
    """

    healthy: bool
    last_error: str | None = None
    consecutive_failures: int = 0
    # time.monotonic() of the last successful query; None before the first.
    last_success_monotonic: float | None = None
    # The blocking-query index the watch waits on; 0 when it has none (Consul only).
    index: int = 0


OnChange = Callable[[list[ServiceInstance]], None]
OnStatus = Callable[[WatchStatus], None]


class Watch(abc.ABC):
    """A running watch of one service's healthy instances; stop it with :meth:`stop`."""

    @abc.abstractmethod
    def instances(self) -> list[ServiceInstance]:
        """The last known set of healthy instances (empty before the first answer)."""

    @abc.abstractmethod
    def status(self) -> WatchStatus:
        """Whether the backend answered the last query, and the failure count."""

    @abc.abstractmethod
    def stop(self) -> None:
        """Stops the watch; no callback runs after this returns. Idempotent."""


class Registry(abc.ABC):
    """Registers instances and watches services. Every method is safe from any thread.

    Calls block for at most one request to the backend (milliseconds; bounded by the
    configured timeout), so an asyncio caller should use ``asyncio.to_thread``.
    """

    @abc.abstractmethod
    def register(self, instance: ServiceInstance) -> bool:
        """Registers (or re-registers, replacing) ``instance`` with its health check.

        Returns True when the backend holds the registration now. Where the backend is
        unreachable it returns False and keeps retrying in the background; a
        registration the backend rejects (bad request, ACL) raises
        :class:`RegistryError`.
        """

    @abc.abstractmethod
    def deregister(self, instance_id: str) -> bool:
        """Removes the instance and stops re-registering it; unknown ids are ignored.

        Returns False when the backend could not be told (it is unreachable); the
        health check's deregister-critical-after then removes the instance.
        """

    @abc.abstractmethod
    def watch(
        self,
        service_name: str,
        on_change: OnChange,
        on_status: OnStatus | None = None,
    ) -> Watch:
        """Starts watching ``service_name``'s healthy instances.

        ``on_change(instances)`` runs with the first answer (possibly empty) and then
        whenever the set changes; ``on_status(status)`` whenever the watch's health
        changes. Callbacks run on a registry thread (Consul) or on the calling thread
        (static), never two at once for one watch; an asyncio caller should hand
        results to its loop with ``loop.call_soon_threadsafe``. A callback that raises
        is logged and does not stop the watch.
        """

    def close(self) -> None:  # noqa: B027 - optional hook, default does nothing
        """Stops background threads and watches; does not deregister anything."""


class WatchBase(Watch):
    """Shared state keeping for watches: last set, status, stop flag, callback guard."""

    def __init__(self, on_change: OnChange, on_status: OnStatus | None) -> None:
        self._on_change = on_change
        self._on_status = on_status
        # Guards _instances/_status; callbacks run under _callback_lock so stop()
        # can promise that none runs after it returns.
        self._lock = threading.Lock()
        self._callback_lock = threading.Lock()
        self._stopped = threading.Event()
        self._instances: list[ServiceInstance] = []
        self._status = WatchStatus(healthy=False)

    def instances(self) -> list[ServiceInstance]:
        with self._lock:
            return list(self._instances)

    def status(self) -> WatchStatus:
        with self._lock:
            return self._status

    def stop(self) -> None:
        self._stopped.set()
        with self._callback_lock:
            pass  # waits out a callback in progress

    def _publish(self, instances: list[ServiceInstance], *, force: bool = False) -> None:
        with self._lock:
            changed = force or not same_instances(self._instances, instances)
            self._instances = list(instances)
        if changed:
            self._call(self._on_change, list(instances))

    def _set_status(self, status: WatchStatus) -> None:
        with self._lock:
            previous = self._status
            self._status = status
        if self._on_status is not None and (
            previous.healthy != status.healthy
            or previous.consecutive_failures != status.consecutive_failures
        ):
            self._call(self._on_status, status)

    def _call(self, fn: Callable[..., None], arg: object) -> None:
        with self._callback_lock:
            if self._stopped.is_set():
                return
            try:
                fn(arg)
            except Exception:
                logger.exception("registry watch callback failed")
