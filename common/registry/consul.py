"""The Consul registry (py-consul): agent registration with a gRPC check, blocking-query watch.

Registration goes to the local agent (``PUT /v1/agent/service/register``) with a
``GRPC`` check that the agent polls against the instance's ``grpc.health.v1`` and
``DeregisterCriticalServiceAfter``. A keeper thread re-registers an instance the agent
no longer knows (agent restarted without its state, or reaped while critical).

A watch long-polls ``/v1/health/service/<name>?passing`` with ``index``/``wait``
(Consul's blocking queries), so a change reaches the caller as soon as Consul sees
it, with one outstanding request per watch and no polling. When Consul cannot be
reached the watch keeps its last set, retries with capped exponential backoff and
jitter, and reports ``healthy=False`` in its :class:`WatchStatus`.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from typing import Any

import consul
from consul.exceptions import ACLDisabled, ACLPermissionDenied, BadRequest, ClientError

from common.registry.config import RegistryConfig
from common.registry.interface import (
    OnChange,
    OnStatus,
    Registry,
    RegistryError,
    ServiceInstance,
    Watch,
    WatchBase,
    WatchStatus,
)

logger = logging.getLogger(__name__)

# Consul's docs ask blocking-query loops to rate-limit themselves: an index that
# moves on every write would otherwise turn the loop into a busy poll.
_MIN_QUERY_GAP_S = 0.05
# A failure is logged at WARNING at most this often; the rest go to DEBUG.
_LOG_EVERY_S = 30.0


def go_duration(seconds: float) -> str:
    """Seconds as a Go duration string Consul accepts, in whole milliseconds (``"500ms"``)."""
    return f"{max(0, round(seconds * 1000))}ms"


def _retryable(exc: BaseException) -> bool:
    """False for answers that retrying cannot change (4xx: bad request, ACL denied)."""
    return not isinstance(exc, ACLPermissionDenied | ACLDisabled | BadRequest | ClientError)


def instance_from_health_entry(entry: dict[str, Any]) -> ServiceInstance:
    """One element of ``/v1/health/service/<name>`` as a :class:`ServiceInstance`.

    A service registered without an address takes its node's address, as Consul's
    DNS interface does.
    """
    service = entry["Service"]
    node = entry.get("Node") or {}
    return ServiceInstance(
        name=service["Service"],
        id=service["ID"],
        address=service.get("Address") or node.get("Address") or "",
        port=int(service["Port"]),
        tags=tuple(service.get("Tags") or ()),
        meta=dict(service.get("Meta") or {}),
    )


class _Backoff:
    """Capped exponential backoff with "equal jitter" (half fixed, half random)."""

    def __init__(self, initial_s: float, max_s: float) -> None:
        self.initial_s = initial_s
        self.max_s = max_s
        self._next_s = initial_s

    def next(self) -> float:
        delay = self._next_s
        self._next_s = min(self._next_s * 2, self.max_s)
        return delay / 2 + random.uniform(0, delay / 2)

    def reset(self) -> None:
        self._next_s = self.initial_s


class _ConsulWatch(WatchBase):
    """One thread long-polling the health endpoint of one service."""

    def __init__(
        self,
        config: RegistryConfig,
        new_client: Callable[[], consul.Consul],
        service_name: str,
        on_change: OnChange,
        on_status: OnStatus | None,
    ) -> None:
        super().__init__(on_change, on_status)
        self.service_name = service_name
        self._config = config
        self._new_client = new_client
        # Daemon: stop() cannot interrupt a blocking query already sent, and that
        # query may hold the thread for up to consul_watch_wait_s; no callback runs
        # after stop(), so an orphaned query is harmless.
        self._thread = threading.Thread(
            target=self._run, name=f"consul-watch-{service_name}", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout_s: float) -> None:
        self._thread.join(timeout_s)

    def _run(self) -> None:
        client = self._new_client()
        wait = go_duration(self._config.consul_watch_wait_s)
        backoff = _Backoff(self._config.consul_retry_initial_s, self._config.consul_retry_max_s)
        index = 0
        failures = 0
        published = False
        last_success: float | None = None
        last_warning = -float("inf")
        while not self._stopped.is_set():
            started = time.monotonic()
            try:
                raw_index, entries = client.health.service(
                    self.service_name,
                    index=str(index) if index > 0 else None,
                    wait=wait,
                    passing=True,
                )
            except Exception as exc:  # requests' connection errors and ConsulException
                if self._stopped.is_set():
                    break
                failures += 1
                # Ask without an index after an outage so the first answer comes at once.
                index = 0
                delay = backoff.next()
                now = time.monotonic()
                level = logging.DEBUG
                if failures == 1 or now - last_warning >= _LOG_EVERY_S:
                    level, last_warning = logging.WARNING, now
                logger.log(
                    level,
                    "consul watch of %s failed (%d in a row; keeping %d known instances; "
                    "retrying in %.2fs): %s",
                    self.service_name,
                    failures,
                    len(self.instances()),
                    delay,
                    exc,
                )
                self._set_status(
                    WatchStatus(
                        healthy=False,
                        last_error=f"{type(exc).__name__}: {exc}",
                        consecutive_failures=failures,
                        last_success_monotonic=last_success,
                        index=0,
                    )
                )
                self._stopped.wait(delay)
                continue

            if failures:
                logger.info(
                    "consul watch of %s answering again after %d failures",
                    self.service_name,
                    failures,
                )
            failures = 0
            backoff.reset()
            new_index = int(raw_index)
            if new_index < index:
                # Consul's blocking-query rules: an index that goes backwards (agent
                # restarted, snapshot restored) means start over from this answer.
                logger.info(
                    "consul index of %s went backwards (%d -> %d); resetting",
                    self.service_name,
                    index,
                    new_index,
                )
            # An index of 0 would make the next query non-blocking: a busy loop.
            index = max(new_index, 1)
            last_success = time.monotonic()
            instances: list[ServiceInstance] = []
            for entry in entries or []:
                try:
                    instances.append(instance_from_health_entry(entry))
                except (KeyError, TypeError, ValueError) as exc:
                    logger.warning("ignoring malformed consul health entry %r: %s", entry, exc)
            self._set_status(
                WatchStatus(
                    healthy=True,
                    consecutive_failures=0,
                    last_success_monotonic=last_success,
                    index=index,
                )
            )
            self._publish(instances, force=not published)
            published = True
            elapsed = time.monotonic() - started
            if elapsed < _MIN_QUERY_GAP_S:
                self._stopped.wait(_MIN_QUERY_GAP_S - elapsed)


class ConsulRegistry(Registry):
    """Registers with and watches a Consul agent through py-consul.

    Thread-safe: registration calls share one HTTP client under a lock; each watch
    owns its own client and thread.
    """

    def __init__(self, config: RegistryConfig) -> None:
        self.config = config
        # Held across each registration request (bounded by consul_timeout_s) so a
        # background re-registration can never land after a caller's deregister;
        # also guards the shared HTTP client, which is not thread-safe.
        self._lock = threading.RLock()
        self._client = self._new_client()
        self._registered: dict[str, ServiceInstance] = {}
        self._pending: set[str] = set()  # registered by the caller, not yet by Consul
        self._watches: list[_ConsulWatch] = []
        self._closed = threading.Event()
        self._wake = threading.Event()
        self._keeper: threading.Thread | None = None

    def _new_client(self) -> consul.Consul:
        scheme, host, port = self.config.consul_endpoint()
        client = consul.Consul(
            host=host,
            port=port,
            token=self.config.consul_token,
            scheme=scheme,
            verify=self.config.consul_verify(),
            connections_timeout=self.config.consul_timeout_s,
        )
        # py-consul lets $CONSUL_HTTP_TOKEN override the token argument; the
        # configuration (which already defaults to that variable) decides here.
        client.token = self.config.consul_token
        return client

    def _check_definition(self, instance: ServiceInstance) -> dict[str, Any]:
        spec = instance.check
        interval = (spec.interval_s if spec else None) or self.config.consul_check_interval_s
        timeout = (spec.timeout_s if spec else None) or self.config.consul_check_timeout_s
        deregister = (
            spec.deregister_critical_after_s
            if spec and spec.deregister_critical_after_s is not None
            else self.config.consul_deregister_critical_after_s
        )
        target = (spec.target if spec else None) or instance.endpoint
        if spec and spec.grpc_service:
            target = f"{target}/{spec.grpc_service}"
        check: dict[str, Any] = consul.Check.grpc(
            target,
            go_duration(interval),
            use_tls=bool(spec and spec.use_tls),
            timeout=go_duration(timeout),
            deregister=go_duration(deregister) if deregister > 0 else None,
        )
        check["Name"] = "grpc.health.v1"
        if spec and spec.use_tls and self.config.consul_check_tls_server_name:
            check["TLSServerName"] = self.config.consul_check_tls_server_name
        return check

    def _send_register(self, instance: ServiceInstance) -> None:
        ok = self._client.agent.service.register(
            instance.name,
            service_id=instance.id,
            address=instance.address,
            port=instance.port,
            tags=list(instance.tags),
            meta=dict(instance.meta),
            check=self._check_definition(instance),
            # Re-registration replaces checks instead of accumulating them.
            replace_existing_checks=True,
        )
        if not ok:
            raise RegistryError(f"consul did not accept registration of {instance.id}")

    def register(self, instance: ServiceInstance) -> bool:
        with self._lock:
            self._registered[instance.id] = instance
            try:
                self._send_register(instance)
            except Exception as exc:
                if not _retryable(exc):
                    del self._registered[instance.id]
                    self._pending.discard(instance.id)
                    raise RegistryError(
                        f"consul rejected registration of {instance.id}: {exc}"
                    ) from exc
                self._pending.add(instance.id)
                logger.warning(
                    "consul registration of %s failed, retrying in the background: %s",
                    instance.id,
                    exc,
                )
                self._ensure_keeper()
                self._wake.set()
                return False
            self._pending.discard(instance.id)
            self._ensure_keeper()
        logger.info(
            "registered %s (%s at %s, tags %s) with consul",
            instance.id,
            instance.name,
            instance.endpoint,
            list(instance.tags),
        )
        return True

    def deregister(self, instance_id: str) -> bool:
        with self._lock:
            self._registered.pop(instance_id, None)
            self._pending.discard(instance_id)
            try:
                self._client.agent.service.deregister(instance_id)
            except Exception as exc:
                logger.warning(
                    "consul deregistration of %s failed (its check's "
                    "deregister-critical-after will remove it): %s",
                    instance_id,
                    exc,
                )
                return False
        logger.info("deregistered %s from consul", instance_id)
        return True

    def registered(self) -> list[str]:
        """Ids this registry keeps registered."""
        with self._lock:
            return list(self._registered)

    def watch(
        self,
        service_name: str,
        on_change: OnChange,
        on_status: OnStatus | None = None,
    ) -> Watch:
        """Starts a thread long-polling ``service_name``'s passing instances."""
        watch = _ConsulWatch(self.config, self._new_client, service_name, on_change, on_status)
        with self._lock:
            self._watches.append(watch)
        watch.start()
        return watch

    def close(self) -> None:
        self._closed.set()
        self._wake.set()
        with self._lock:
            watches, self._watches = self._watches, []
        for watch in watches:
            watch.stop()
        if self._keeper is not None:
            self._keeper.join(timeout=self.config.consul_timeout_s + 1)

    # -- keeper: retries failed registrations, restores lost ones ---------------

    def _ensure_keeper(self) -> None:
        # Called with _lock held.
        if self._keeper is not None or self._closed.is_set():
            return
        self._keeper = threading.Thread(target=self._keep, name="consul-keeper", daemon=True)
        self._keeper.start()

    def _keep(self) -> None:
        backoff = _Backoff(self.config.consul_retry_initial_s, self.config.consul_retry_max_s)
        interval = self.config.consul_reregister_interval_s
        while not self._closed.is_set():
            with self._lock:
                pending = bool(self._pending)
            if pending:
                delay = backoff.next()
            elif interval > 0:
                delay = interval
            else:
                delay = 3600.0  # nothing to do until register() wakes us
            self._wake.wait(delay)
            self._wake.clear()
            if self._closed.is_set():
                return
            if self._sync_once():
                backoff.reset()

    def _sync_once(self) -> bool:
        """Registers what is pending or missing from the agent; True if Consul answered."""
        with self._lock:
            ids = list(self._registered)
        for instance_id in ids:
            with self._lock:
                instance = self._registered.get(instance_id)
                if instance is None:
                    continue  # deregistered meanwhile
                try:
                    if instance_id not in self._pending:
                        if self._client.agent.service_definition(instance_id) is not None:
                            continue
                        logger.warning(
                            "consul no longer knows %s (agent restarted or reaped it); "
                            "registering again",
                            instance_id,
                        )
                    self._send_register(instance)
                except Exception as exc:
                    self._pending.add(instance_id)
                    logger.debug("consul registration retry of %s failed: %s", instance_id, exc)
                    return False
                if instance_id in self._pending:
                    self._pending.discard(instance_id)
                logger.info("registered %s with consul again", instance_id)
        return True
