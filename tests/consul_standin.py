"""An in-process stand-in for the Consul agent's HTTP API, for tests without a consul binary.

It implements the endpoints llmcluster uses, with Consul's documented semantics, and is
driven through py-consul exactly like a real agent:

- ``PUT /v1/agent/service/register`` (``Check``/``Checks`` of type GRPC or TTL, initial
  ``Status``, ``DeregisterCriticalServiceAfter``, ``?replace-existing-checks``);
  snake_case and any-case keys are accepted, as Consul's decoder does.
- ``PUT /v1/agent/service/deregister/<id>``, ``GET /v1/agent/service/<id>``,
  ``GET /v1/agent/services``, ``GET /v1/agent/checks``.
- ``PUT /v1/agent/check/pass|warn|fail/<id>`` and ``/update/<id>`` for TTL checks; a TTL
  check not updated within its TTL turns critical ("TTL expired").
- GRPC checks dialled with ``grpc.health.v1`` at their interval (first probe after a
  random stagger within one interval, as Consul does); SERVING is passing, anything
  else (other status, error, timeout) critical. A check starts critical.
- ``GET /v1/health/service/<name>`` (``passing``, ``tag``) and
  ``GET /v1/catalog/service/<name>``, with blocking queries: ``X-Consul-Index`` on every
  answer; with ``index`` the request waits until the service's index passes it or
  ``wait`` (default 5 min, max 10 min, plus up to wait/16 of jitter) elapses.
- Critical services are reaped: a service whose check has been critical for its
  ``DeregisterCriticalServiceAfter`` is removed. Consul floors that at 1 minute and
  reaps every 30 s; both are constructor arguments here so tests can be fast.
- ``GET /v1/status/leader``.
- Optional ACL: with ``acl_token`` set, requests without it get 403.

Not implemented (answered 400 or 404 with a message saying so): other check types,
``filter`` expressions, GRPC checks with TLS, namespaces, ``dc``.

:meth:`ConsulStandin.stop` closes the port and drops open connections (clients see
the agent vanish) while keeping registrations, as an agent with a data directory
does; :meth:`ConsulStandin.start` brings it back on the same port;
:meth:`ConsulStandin.clear` forgets everything, as a restarted dev agent does.

:class:`ConsulDevAgent` runs a real ``consul agent -dev`` with the same interface so
integration tests can be parametrized over both.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import logging
import random
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import consul
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

logger = logging.getLogger(__name__)

PASSING, WARNING, CRITICAL = "passing", "warning", "critical"
_STATUSES = (PASSING, WARNING, CRITICAL)
_DEFAULT_WAIT_S = 300.0  # Consul's default blocking wait
_MAX_WAIT_S = 600.0  # and its cap
_DEFAULT_CHECK_TIMEOUT_S = 10.0
_TICK_S = 0.02  # how often TTL expiry and reaping are evaluated
_FIRST_INDEX = 10
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


class _BadRequest(Exception):
    """A request Consul would answer with 400; the message is the body."""


class _Abort(Exception):
    """The agent is going down under this request: drop the connection unanswered."""


def parse_go_duration(value: Any) -> float:
    """A Go duration (``"1m30s"``, ``"500ms"``, ``"0"``) or integer nanoseconds, in seconds."""
    if isinstance(value, bool):
        raise _BadRequest(f"invalid duration {value!r}")
    if isinstance(value, int | float):
        return float(value) / 1e9
    text = str(value).strip()
    if text in ("0", ""):
        return 0.0
    sign = -1.0 if text.startswith("-") else 1.0
    body = text.lstrip("+-")
    parts = _DURATION_PART.findall(body)
    if not parts or "".join(n + u for n, u in parts) != body:
        raise _BadRequest(f'time: invalid duration "{text}"')
    return sign * sum(float(n) * _UNIT_S[u] for n, u in parts)


def _canon(obj: Any) -> dict[str, Any]:
    """Keys folded as Consul's decoder matches them: any case, snake_case or not."""
    if not isinstance(obj, dict):
        raise _BadRequest(f"expected a JSON object, got {type(obj).__name__}")
    return {str(k).lower().replace("_", ""): v for k, v in obj.items()}


@dataclass
class _Service:
    id: str
    name: str
    address: str
    port: int
    tags: list[str]
    meta: dict[str, str]
    create_index: int
    modify_index: int


@dataclass
class _Check:
    id: str
    name: str
    service_id: str
    kind: str  # "grpc" or "ttl"
    status: str
    interval_s: float = 0.0
    timeout_s: float = _DEFAULT_CHECK_TIMEOUT_S
    grpc: str = ""
    ttl_s: float = 0.0
    deregister_after_s: float = 0.0
    notes: str = ""
    output: str = ""
    critical_since: float | None = None
    ttl_deadline: float = 0.0
    create_index: int = 0
    modify_index: int = 0
    stop: threading.Event = field(default_factory=threading.Event)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], standin: ConsulStandin) -> None:
        self.standin = standin
        self.generation = standin._generation
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._open_lock:
            self._open.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._open_lock:
            self._open.discard(request)
        super().shutdown_request(request)

    def drop_connections(self) -> None:
        """Shuts every open connection, as a dying agent's kernel would."""
        with self._open_lock:
            sockets = list(self._open)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as py-consul's requests session expects
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        logger.debug("consul stand-in: " + format, *args)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _dispatch(self, method: str) -> None:
        url = urllib.parse.urlsplit(self.path)
        query = urllib.parse.parse_qs(url.query, keep_blank_values=True)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        standin = self.server.standin
        try:
            code, payload, index = standin._handle(
                method, urllib.parse.unquote(url.path), query, body, self.headers, self.server
            )
        except _Abort:
            self.close_connection = True
            return
        except _BadRequest as exc:
            code, payload, index = 400, str(exc), None
        except Exception as exc:  # a stand-in bug must not hang the client
            logger.exception("consul stand-in failed on %s %s", method, self.path)
            code, payload, index = 500, f"stand-in error: {exc}", None
        if isinstance(payload, str):
            data, ctype = payload.encode(), "text/plain; charset=utf-8"
        else:
            data, ctype = json.dumps(payload).encode(), "application/json"
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        if index is not None:
            self.send_header("X-Consul-Index", str(index))
            self.send_header("X-Consul-KnownLeader", "true")
            self.send_header("X-Consul-LastContact", "0")
        self.end_headers()
        self.wfile.write(data)


class ConsulStandin:
    """The stand-in agent: ``start()`` it, point py-consul at ``host``/``port``.

    ``check_reap_interval_s`` and ``check_deregister_interval_min_s`` default to
    Consul's fixed 30 s and 1 min; tests pass small values to see reaping quickly.
    """

    def __init__(
        self,
        *,
        acl_token: str | None = None,
        check_reap_interval_s: float = 30.0,
        check_deregister_interval_min_s: float = 60.0,
        node_name: str = "consul-standin",
        datacenter: str = "dc1",
    ) -> None:
        self.host = "127.0.0.1"
        self.port = 0
        self.acl_token = acl_token
        self.check_reap_interval_s = check_reap_interval_s
        self.check_deregister_interval_min_s = check_deregister_interval_min_s
        self.node_name = node_name
        self.datacenter = datacenter
        # One lock for all state; the condition wakes blocking queries on any change.
        self._cond = threading.Condition(threading.RLock())
        self._services: dict[str, _Service] = {}
        self._checks: dict[str, _Check] = {}
        self._index = _FIRST_INDEX
        self._name_index: dict[str, int] = {}
        self._generation = 0  # bumped by stop(): requests of an older generation abort
        self._up = threading.Event()
        self._closed = threading.Event()
        self._server: _Server | None = None
        self._serve_thread: threading.Thread | None = None
        self._ticker: threading.Thread | None = None
        self._next_reap = 0.0

    # -- lifecycle --------------------------------------------------------------

    @property
    def addr(self) -> str:
        """``host:port`` (the form of ``CONSUL_HTTP_ADDR``)."""
        return f"{self.host}:{self.port}"

    def start(self) -> ConsulStandin:
        """Listens (on the same port as before, after a stop) and resumes checks."""
        if self._up.is_set():
            return self
        with self._cond:
            self._server = _Server((self.host, self.port), self)
            self.port = self._server.server_address[1]
            now = time.monotonic()
            for check in self._checks.values():
                if check.kind == "ttl":
                    check.ttl_deadline = now + check.ttl_s
            self._next_reap = now + self.check_reap_interval_s
        self._serve_thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"consul-standin-{self.port}",
            daemon=True,
        )
        self._serve_thread.start()
        if self._ticker is None:
            self._ticker = threading.Thread(
                target=self._tick, name="consul-standin-tick", daemon=True
            )
            self._ticker.start()
        self._up.set()
        logger.info("consul stand-in listening on %s", self.addr)
        return self

    def stop(self) -> None:
        """Closes the port and drops connections; keeps state, pauses checks."""
        if not self._up.is_set():
            return
        self._up.clear()
        with self._cond:
            self._generation += 1
            self._cond.notify_all()
        assert self._server is not None
        self._server.shutdown()
        self._server.server_close()
        self._server.drop_connections()
        self._server = None
        logger.info("consul stand-in on port %d stopped", self.port)

    def close(self) -> None:
        """Stops for good: also ends check threads."""
        self.stop()
        self._closed.set()
        with self._cond:
            for check in self._checks.values():
                check.stop.set()

    def clear(self) -> None:
        """Forgets all services and checks and restarts the index, like a new dev agent."""
        with self._cond:
            for check in self._checks.values():
                check.stop.set()
            self._services.clear()
            self._checks.clear()
            self._name_index.clear()
            self._index = _FIRST_INDEX
            self._cond.notify_all()

    def __enter__(self) -> ConsulStandin:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def client(self, token: str | None = None, timeout_s: float = 5.0) -> consul.Consul:
        """A py-consul client for this agent."""
        c = consul.Consul(host=self.host, port=self.port, connections_timeout=timeout_s)
        c.token = token
        return c

    # -- introspection for tests ------------------------------------------------

    def check_status(self, check_id: str) -> str | None:
        """Current status of a check, or None if there is no such check."""
        with self._cond:
            check = self._checks.get(check_id)
            return check.status if check else None

    def service_ids(self) -> list[str]:
        """Ids of the registered services."""
        with self._cond:
            return sorted(self._services)

    # -- state changes (all under _cond) ----------------------------------------

    def _bump(self, service_name: str) -> int:
        self._index += 1
        self._name_index[service_name] = self._index
        self._cond.notify_all()
        return self._index

    def _set_status(self, check: _Check, status: str, output: str) -> None:
        check.output = output
        if check.status == status:
            return  # output-only changes do not move the index (Consul batches them)
        check.status = status
        check.critical_since = time.monotonic() if status == CRITICAL else None
        service = self._services.get(check.service_id)
        if service is not None:
            check.modify_index = self._bump(service.name)
        logger.debug("consul stand-in: check %s is %s (%s)", check.id, status, output)

    def _remove_service(self, service_id: str) -> bool:
        service = self._services.pop(service_id, None)
        if service is None:
            return False
        for check_id in [c.id for c in self._checks.values() if c.service_id == service_id]:
            self._checks.pop(check_id).stop.set()
        self._bump(service.name)
        return True

    # -- background: TTL expiry, reaping, GRPC probes ---------------------------

    def _tick(self) -> None:
        while not self._closed.wait(_TICK_S):
            if not self._up.is_set():
                continue
            now = time.monotonic()
            with self._cond:
                for check in list(self._checks.values()):
                    if (
                        check.kind == "ttl"
                        and check.status != CRITICAL
                        and now > check.ttl_deadline
                    ):
                        self._set_status(check, CRITICAL, "TTL expired")
                if now < self._next_reap:
                    continue
                self._next_reap = now + self.check_reap_interval_s
                for check in list(self._checks.values()):
                    if check.deregister_after_s <= 0 or check.critical_since is None:
                        continue
                    limit = max(check.deregister_after_s, self.check_deregister_interval_min_s)
                    if now - check.critical_since >= limit and check.service_id in self._services:
                        logger.info(
                            "consul stand-in: check %s critical for %.1fs; deregistering %s",
                            check.id,
                            now - check.critical_since,
                            check.service_id,
                        )
                        self._remove_service(check.service_id)

    def _run_grpc_check(self, check: _Check) -> None:
        # Consul staggers a check's first run randomly within one interval.
        if check.stop.wait(random.uniform(0, check.interval_s)):
            return
        while not self._closed.is_set():
            if self._up.is_set():
                status, output = self._probe(check)
                with self._cond:
                    if self._checks.get(check.id) is check:  # not replaced meanwhile
                        self._set_status(check, status, output)
            if check.stop.wait(check.interval_s):
                return

    @staticmethod
    def _probe(check: _Check) -> tuple[str, str]:
        target, _, service = check.grpc.partition("/")
        try:
            with grpc.insecure_channel(target) as channel:
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=service), timeout=check.timeout_s
                )
        except grpc.RpcError as exc:
            code = exc.code() if isinstance(exc, grpc.Call) else None
            details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
            return CRITICAL, f"gRPC check {check.grpc}: failed: {code}: {details}"
        if reply.status == health_pb2.HealthCheckResponse.SERVING:
            return PASSING, f"gRPC check {check.grpc}: success"
        name = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        return CRITICAL, f"gRPC check {check.grpc}: failed with status {name}"

    # -- HTTP -------------------------------------------------------------------

    def _handle(
        self,
        method: str,
        path: str,
        query: dict[str, list[str]],
        body: bytes,
        headers: Any,
        server: _Server,
    ) -> tuple[int, Any, int | None]:
        if server.generation != self._generation or not self._up.is_set():
            raise _Abort
        parts = [p for p in path.split("/") if p]
        if parts[:1] != ["v1"]:
            return 404, f"stand-in: no endpoint {path}", None
        route = parts[1:]
        if route == ["status", "leader"]:
            return 200, "127.0.0.1:8300", None
        if self.acl_token is not None:
            token = (
                headers.get("X-Consul-Token")
                or (query.get("token") or [""])[0]
                or (headers.get("Authorization") or "").removeprefix("Bearer ").strip()
            )
            if token != self.acl_token:
                return 403, "Permission denied: token not found or not allowed", None
        if "filter" in query or "ns" in query:
            raise _BadRequest("stand-in: filter and ns are not implemented")
        verb = (method, *route[:3])
        if verb == ("PUT", "agent", "service", "register"):
            return self._register(query, body)
        if verb[:3] == ("PUT", "agent", "service") and route[2:3] == ["deregister"]:
            with self._cond:
                sid = "/".join(route[3:])
                if not self._remove_service(sid):
                    return 404, f'Unknown service ID "{sid}"', None
            return 200, "", None
        if method == "GET" and route == ["agent", "services"]:
            with self._cond:
                return 200, {s.id: self._agent_service(s) for s in self._services.values()}, None
        if method == "GET" and route[:2] == ["agent", "service"] and len(route) > 2:
            sid = "/".join(route[2:])
            with self._cond:
                service = self._services.get(sid)
                if service is None:
                    return 404, f'unknown service ID: "{sid}"', None
                return 200, self._agent_service(service), None
        if method == "GET" and route == ["agent", "checks"]:
            with self._cond:
                return 200, {c.id: self._check_json(c) for c in self._checks.values()}, None
        if method == "PUT" and route[:2] == ["agent", "check"] and len(route) > 3:
            return self._ttl_update(route[2], "/".join(route[3:]), query, body)
        if method == "GET" and route[:2] in (["health", "service"], ["catalog", "service"]):
            if len(route) != 3:
                return 404, f"stand-in: no endpoint {path}", None
            return self._service_query(route[0], route[2], query, server)
        return 404, f"stand-in: no endpoint {method} {path}", None

    def _register(self, query: dict[str, list[str]], body: bytes) -> tuple[int, Any, int | None]:
        try:
            spec = _canon(json.loads(body or b"{}"))
        except json.JSONDecodeError as exc:
            raise _BadRequest(f"Request decode failed: {exc}") from exc
        name = spec.get("name") or ""
        if not name:
            raise _BadRequest("Missing service name")
        service_id = spec.get("id") or name
        try:
            port = int(spec.get("port") or 0)
        except (TypeError, ValueError) as exc:
            raise _BadRequest(f"Invalid port {spec.get('port')!r}") from exc
        meta = spec.get("meta") or {}
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise _BadRequest("Invalid Service Meta: values must be strings")
        raw_checks = ([spec["check"]] if spec.get("check") else []) + list(spec.get("checks") or [])
        raw_checks = [c for c in raw_checks if c]
        replace = (query.get("replace-existing-checks") or ["false"])[0] in ("true", "1", "")
        now = time.monotonic()
        new_checks: list[_Check] = []
        for i, raw in enumerate(raw_checks):
            c = _canon(raw)
            check_id = c.get("checkid") or c.get("id") or f"service:{service_id}"
            if not (c.get("checkid") or c.get("id")) and len(raw_checks) > 1:
                check_id += f":{i + 1}"
            status = c.get("status") or CRITICAL
            if status not in _STATUSES:
                raise _BadRequest(f"Invalid check status: {status!r}")
            check = _Check(
                id=check_id,
                name=c.get("name") or f"Service '{name}' check",
                service_id=service_id,
                kind="",
                status=status,
                notes=c.get("notes") or "",
                deregister_after_s=parse_go_duration(c.get("deregistercriticalserviceafter") or 0),
                critical_since=now if status == CRITICAL else None,
            )
            if c.get("grpc"):
                if c.get("grpcusetls"):
                    raise _BadRequest("stand-in: GRPCUseTLS checks are not implemented")
                check.kind, check.grpc = "grpc", str(c["grpc"])
                check.interval_s = parse_go_duration(c.get("interval") or 0)
                if check.interval_s <= 0:
                    raise _BadRequest(
                        "Invalid check: Interval must be > 0 for Script, HTTP, H2PING, TCP, "
                        "UDP or GRPC checks"
                    )
                if c.get("timeout"):
                    check.timeout_s = parse_go_duration(c["timeout"])
            elif c.get("ttl"):
                check.kind, check.ttl_s = "ttl", parse_go_duration(c["ttl"])
                if check.ttl_s <= 0:
                    raise _BadRequest("Invalid check: TTL must be > 0")
                check.ttl_deadline = now + check.ttl_s
            else:
                raise _BadRequest(
                    f"stand-in: only GRPC and TTL checks are implemented, got keys {sorted(c)}"
                )
            new_checks.append(check)
        with self._cond:
            old = self._services.get(service_id)
            index = self._bump(name)
            self._services[service_id] = _Service(
                id=service_id,
                name=name,
                address=str(spec.get("address") or ""),
                port=port,
                tags=[str(t) for t in spec.get("tags") or []],
                meta=dict(meta),
                create_index=old.create_index if old else index,
                modify_index=index,
            )
            if old is not None and old.name != name:
                self._bump(old.name)
            keep = {c.id for c in new_checks}
            for check in list(self._checks.values()):
                if check.service_id == service_id and (check.id in keep or replace):
                    self._checks.pop(check.id).stop.set()
                    previous = check
                    # Re-registering the same check keeps its state, so an instance
                    # refreshing its registration does not flap to critical.
                    for fresh in new_checks:
                        if fresh.id == previous.id and fresh.kind == previous.kind:
                            fresh.status = previous.status
                            fresh.output = previous.output
                            fresh.critical_since = previous.critical_since
            for check in new_checks:
                check.create_index = check.modify_index = index
                self._checks[check.id] = check
                if check.kind == "grpc":
                    threading.Thread(
                        target=self._run_grpc_check,
                        args=(check,),
                        name=f"consul-standin-check-{check.id}",
                        daemon=True,
                    ).start()
        return 200, "", None

    def _ttl_update(
        self, action: str, check_id: str, query: dict[str, list[str]], body: bytes
    ) -> tuple[int, Any, int | None]:
        note = (query.get("note") or [""])[0]
        if action == "update":
            spec = _canon(json.loads(body or b"{}"))
            status, note = spec.get("status") or "", spec.get("output") or ""
        else:
            status = {"pass": PASSING, "warn": WARNING, "fail": CRITICAL}.get(action, "")
        if status not in _STATUSES:
            raise _BadRequest(f"Invalid check status: {status!r}")
        with self._cond:
            check = self._checks.get(check_id)
            if check is None:
                return 404, f'Unknown check ID "{check_id}"', None
            if check.kind != "ttl":
                raise _BadRequest(f'Check "{check_id}" is not a TTL check')
            check.ttl_deadline = time.monotonic() + check.ttl_s
            self._set_status(check, status, note)
        return 200, "", None

    def _service_query(
        self, kind: str, name: str, query: dict[str, list[str]], server: _Server
    ) -> tuple[int, Any, int | None]:
        try:
            min_index = int((query.get("index") or ["0"])[0] or 0)
        except ValueError as exc:
            raise _BadRequest(f"Invalid index: {exc}") from exc
        wait_s = _DEFAULT_WAIT_S
        if query.get("wait"):
            wait_s = min(parse_go_duration(query["wait"][0]), _MAX_WAIT_S)
        passing = "passing" in query and query["passing"][0].lower() not in ("0", "false")
        tags = query.get("tag") or []
        with self._cond:
            if min_index > 0:
                deadline = time.monotonic() + wait_s + random.uniform(0, wait_s / 16)
                while self._name_index.get(name, self._index) <= min_index:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
                    if server.generation != self._generation:
                        raise _Abort
            index = self._name_index.get(name, self._index)
            services = [
                s
                for s in self._services.values()
                if s.name == name and all(t in s.tags for t in tags)
            ]
            services.sort(key=lambda s: s.id)
            if kind == "catalog":
                return 200, [self._catalog_entry(s) for s in services], index
            entries = []
            for service in services:
                checks = [self._serf_check()] + [
                    self._check_json(c)
                    for c in sorted(self._checks.values(), key=lambda c: c.id)
                    if c.service_id == service.id
                ]
                if passing and any(c["Status"] != PASSING for c in checks):
                    continue
                entries.append(
                    {
                        "Node": self._node(),
                        "Service": self._agent_service(service),
                        "Checks": checks,
                    }
                )
            return 200, entries, index

    # -- JSON shapes (as Consul returns them; fields the project never reads omitted) --

    def _node(self) -> dict[str, Any]:
        return {
            "ID": "00000000-0000-4000-8000-000000000001",
            "Node": self.node_name,
            "Address": self.host,
            "Datacenter": self.datacenter,
            "TaggedAddresses": {"lan": self.host, "wan": self.host},
            "Meta": {"consul-network-segment": ""},
            "CreateIndex": _FIRST_INDEX,
            "ModifyIndex": _FIRST_INDEX,
        }

    def _agent_service(self, s: _Service) -> dict[str, Any]:
        return {
            "ID": s.id,
            "Service": s.name,
            "Tags": list(s.tags),
            "Address": s.address,
            "Meta": dict(s.meta),
            "Port": s.port,
            "Weights": {"Passing": 1, "Warning": 1},
            "EnableTagOverride": False,
            "Datacenter": self.datacenter,
            "CreateIndex": s.create_index,
            "ModifyIndex": s.modify_index,
        }

    def _catalog_entry(self, s: _Service) -> dict[str, Any]:
        return {
            "ID": "00000000-0000-4000-8000-000000000001",
            "Node": self.node_name,
            "Address": self.host,
            "Datacenter": self.datacenter,
            "ServiceID": s.id,
            "ServiceName": s.name,
            "ServiceAddress": s.address,
            "ServicePort": s.port,
            "ServiceTags": list(s.tags),
            "ServiceMeta": dict(s.meta),
            "CreateIndex": s.create_index,
            "ModifyIndex": s.modify_index,
        }

    def _check_json(self, c: _Check) -> dict[str, Any]:
        service = self._services.get(c.service_id)
        return {
            "Node": self.node_name,
            "CheckID": c.id,
            "Name": c.name,
            "Status": c.status,
            "Notes": c.notes,
            "Output": c.output,
            "ServiceID": c.service_id,
            "ServiceName": service.name if service else "",
            "ServiceTags": list(service.tags) if service else [],
            "Type": c.kind,
            "Interval": f"{c.interval_s}s" if c.kind == "grpc" else "",
            "Timeout": f"{c.timeout_s}s" if c.kind == "grpc" else "",
            "CreateIndex": c.create_index,
            "ModifyIndex": c.modify_index,
        }

    def _serf_check(self) -> dict[str, Any]:
        return {
            "Node": self.node_name,
            "CheckID": "serfHealth",
            "Name": "Serf Health Status",
            "Status": PASSING,
            "Notes": "",
            "Output": "Agent alive and reachable",
            "ServiceID": "",
            "ServiceName": "",
            "ServiceTags": [],
            "Type": "",
            "CreateIndex": _FIRST_INDEX,
            "ModifyIndex": _FIRST_INDEX,
        }


# -- a real agent behind the same interface -------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ConsulDevAgent:
    """A real ``consul agent -dev`` on free loopback ports (needs ``consul`` on PATH).

    Reaping is Consul's own (critical for at least 1 min, checked every 30 s), and a
    restart loses all state, as dev mode keeps nothing on disk.
    """

    check_reap_interval_s = 30.0
    check_deregister_interval_min_s = 60.0

    def __init__(self, acl_token: str | None = None) -> None:
        binary = shutil.which("consul")
        if binary is None:
            raise RuntimeError("no consul binary on PATH")
        self.binary = binary
        self.host = "127.0.0.1"
        self.port = _free_port()
        self.acl_token = acl_token
        self._ports = {
            "-serf-lan-port": _free_port(),
            "-serf-wan-port": _free_port(),
            "-server-port": _free_port(),
        }
        self._proc: subprocess.Popen[bytes] | None = None
        self._log = tempfile.NamedTemporaryFile(  # noqa: SIM115 - closed in close()
            prefix="consul-dev-", suffix=".log", delete=False
        )

    @property
    def addr(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, timeout_s: float = 30.0) -> ConsulDevAgent:
        if self._proc is not None and self._proc.poll() is None:
            return self
        args = [self.binary, "agent", "-dev", "-bind", self.host, "-client", self.host]
        args += ["-http-port", str(self.port), "-dns-port", "-1", "-grpc-port", "-1"]
        help_text = subprocess.run(
            [self.binary, "agent", "-h"], capture_output=True, text=True, check=False
        )
        if "-grpc-tls-port" in help_text.stdout + help_text.stderr:
            args += ["-grpc-tls-port", "-1"]
        for flag, port in self._ports.items():
            args += [flag, str(port)]
        if self.acl_token is not None:
            hcl = (
                'acl { enabled = true default_policy = "deny" '
                f'tokens {{ initial_management = "{self.acl_token}" }} }}'
            )
            args += ["-hcl", hcl]
        self._proc = subprocess.Popen(
            args, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"consul exited {self._proc.returncode}:\n{self.output()}")
            if self._ready():
                return self
            time.sleep(0.1)
        raise TimeoutError(f"consul dev agent not ready in {timeout_s}s:\n{self.output()}")

    def _ready(self) -> bool:
        headers = {"X-Consul-Token": self.acl_token} if self.acl_token else {}
        try:
            for path in ("/v1/status/leader", "/v1/catalog/nodes"):
                request = urllib.request.Request(f"http://{self.addr}{path}", headers=headers)
                with urllib.request.urlopen(request, timeout=1) as reply:
                    if json.loads(reply.read()) in ("", []):
                        return False
        except (OSError, ValueError):
            return False
        return True

    def output(self) -> str:
        self._log.flush()
        return Path(self._log.name).read_text(errors="replace")[-5000:]

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()

    def close(self) -> None:
        self.stop()
        self._log.close()

    def client(self, token: str | None = None, timeout_s: float = 5.0) -> consul.Consul:
        c = consul.Consul(host=self.host, port=self.port, connections_timeout=timeout_s)
        c.token = token
        return c


# -- test support shared by the test modules ------------------------------------


class HealthServer:
    """A tiny gRPC server serving only ``grpc.health.v1`` on a free loopback port."""

    def __init__(self) -> None:
        from concurrent import futures

        from grpc_health.v1 import health

        self._servicer = health.HealthServicer()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        health_pb2_grpc.add_HealthServicer_to_server(self._servicer, self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self.address = "127.0.0.1"
        self._server.start()
        self.set_serving(True)

    def set_serving(self, serving: bool) -> None:
        """Sets the whole server's status ("" service), which Consul's check reads."""
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        self._servicer.set("", status)

    def stop(self) -> None:
        self._server.stop(0)


AGENT_KINDS = ("standin", "consul")
NO_CONSUL_REASON = "no consul binary on PATH (real-agent variant of this test)"


def make_agent(kind: str) -> ConsulStandin | ConsulDevAgent:
    """A started agent of ``kind``; the stand-in reaps fast so tests stay short."""
    if kind == "consul":
        if shutil.which("consul") is None:  # also where a test re-parametrises the kinds
            pytest.skip(NO_CONSUL_REASON)
        return ConsulDevAgent().start()
    return ConsulStandin(check_reap_interval_s=0.1, check_deregister_interval_min_s=0).start()


@pytest.fixture(
    params=[
        "standin",
        pytest.param(
            "consul",
            marks=pytest.mark.skipif(shutil.which("consul") is None, reason=NO_CONSUL_REASON),
        ),
    ]
)
def consul_agent(request: pytest.FixtureRequest) -> Iterator[ConsulStandin | ConsulDevAgent]:
    """A started agent: the stand-in, and a real ``consul agent -dev`` when on PATH.

    Import it into a test module to use it; a test can narrow or mark the kinds with
    ``@pytest.mark.parametrize("consul_agent", [...], indirect=True)``.
    """
    agent = make_agent(request.param)
    try:
        yield agent
    finally:
        agent.close()


def wait_for(predicate: Any, timeout_s: float, what: str, poll_s: float = 0.02) -> float:
    """Polls ``predicate`` until truthy; returns the monotonic time it became so."""
    deadline = time.monotonic() + timeout_s
    while True:
        if predicate():
            return time.monotonic()
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(poll_s)
