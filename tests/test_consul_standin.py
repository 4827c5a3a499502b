"""The Consul agent stand-in, driven through py-consul, against Consul's documented semantics.

Each test runs against the stand-in and, when a ``consul`` binary is on PATH, against a
real ``consul agent -dev`` too, so the stand-in stays honest.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import consul
import pytest
from consul.exceptions import BadRequest

from tests import consul_standin
from tests.consul_standin import (
    ConsulDevAgent,
    ConsulStandin,
    HealthServer,
    parse_go_duration,
    wait_for,
)

pytestmark = pytest.mark.timeout(60)

# The shared agent fixture (stand-in, plus a real agent when on PATH).
consul_agent = consul_standin.consul_agent


@pytest.fixture
def health_server() -> Iterator[HealthServer]:
    server = HealthServer()
    try:
        yield server
    finally:
        server.stop()


def _check(client: consul.Consul, check_id: str) -> dict[str, Any] | None:
    return client.agent.checks().get(check_id)


def _status(client: consul.Consul, check_id: str) -> str | None:
    check = _check(client, check_id)
    return check["Status"] if check else None


def _passing_ids(client: consul.Consul, name: str) -> list[str]:
    _, entries = client.health.service(name, passing=True)
    return sorted(e["Service"]["ID"] for e in entries)


def test_register_and_deregister(consul_agent: ConsulStandin | ConsulDevAgent) -> None:
    client = consul_agent.client()
    assert client.agent.service.register(
        "svc",
        service_id="svc-1",
        address="10.0.0.7",
        port=7000,
        tags=["model=tiny", "v1"],
        meta={"capacity": "8", "version": "0.1.0"},
    )
    services = client.agent.services()
    assert services["svc-1"]["Service"] == "svc"
    assert services["svc-1"]["Port"] == 7000
    assert services["svc-1"]["Meta"] == {"capacity": "8", "version": "0.1.0"}
    assert client.agent.service_definition("svc-1")["Address"] == "10.0.0.7"

    index, entries = client.health.service("svc")
    assert int(index) > 0
    (entry,) = entries
    assert entry["Service"]["Tags"] == ["model=tiny", "v1"]
    # No service check: only the node's serfHealth, which passes.
    assert [c["CheckID"] for c in entry["Checks"]] == ["serfHealth"]
    assert _passing_ids(client, "svc") == ["svc-1"]
    _, by_tag = client.health.service("svc", tag="model=tiny")
    assert len(by_tag) == 1
    _, by_other_tag = client.health.service("svc", tag="model=other")
    assert by_other_tag == []
    _, catalog = client.catalog.service("svc")
    assert [(c["ServiceID"], c["ServicePort"]) for c in catalog] == [("svc-1", 7000)]

    assert client.agent.service.deregister("svc-1")
    assert "svc-1" not in client.agent.services()
    assert client.health.service("svc")[1] == []
    assert client.agent.service_definition("svc-1") is None


def test_grpc_check_follows_health_server(
    consul_agent: ConsulStandin | ConsulDevAgent, health_server: HealthServer
) -> None:
    client = consul_agent.client()
    check = consul.Check.grpc(
        f"127.0.0.1:{health_server.port}", "200ms", use_tls=False, timeout="1s"
    )
    assert client.agent.service.register(
        "w", service_id="w-1", address="127.0.0.1", port=health_server.port, check=check
    )
    registered = _check(client, "service:w-1")
    assert registered is not None and registered["ServiceID"] == "w-1"
    wait_for(lambda: _passing_ids(client, "w") == ["w-1"], 5, "gRPC check to pass")

    health_server.set_serving(False)
    wait_for(lambda: _status(client, "service:w-1") == "critical", 5, "NOT_SERVING -> critical")
    assert _passing_ids(client, "w") == []
    assert "NOT_SERVING" in _check(client, "service:w-1")["Output"]

    health_server.set_serving(True)
    wait_for(lambda: _passing_ids(client, "w") == ["w-1"], 5, "SERVING -> passing again")

    health_server.stop()
    wait_for(lambda: _status(client, "service:w-1") == "critical", 5, "stopped -> critical")
    assert _passing_ids(client, "w") == []


def test_grpc_check_starts_critical(consul_agent: ConsulStandin | ConsulDevAgent) -> None:
    client = consul_agent.client()
    # A long interval: the first probe comes after a random stagger within it, so
    # the status read right after registration is the initial one.
    check = consul.Check.grpc("127.0.0.1:9", "30s", use_tls=False)
    assert client.agent.service.register("w", service_id="w-2", port=9, check=check)
    assert _status(client, "service:w-2") == "critical"
    assert _passing_ids(client, "w") == []


def test_ttl_check(consul_agent: ConsulStandin | ConsulDevAgent) -> None:
    client = consul_agent.client()
    assert client.agent.service.register(
        "t", service_id="t-1", port=1234, check=consul.Check.ttl("600ms")
    )
    assert _status(client, "service:t-1") == "critical"

    assert client.agent.check.ttl_pass("service:t-1", notes="alive")
    assert _passing_ids(client, "t") == ["t-1"]
    assert _check(client, "service:t-1")["Output"] == "alive"

    assert client.agent.check.ttl_warn("service:t-1")
    assert _status(client, "service:t-1") == "warning"
    assert _passing_ids(client, "t") == []  # ?passing excludes warning too
    assert len(client.health.service("t")[1]) == 1

    assert client.agent.check.ttl_pass("service:t-1")
    passed_at = time.monotonic()
    expired_at = wait_for(lambda: _status(client, "service:t-1") == "critical", 5, "TTL expiry")
    assert expired_at - passed_at >= 0.5
    assert "TTL expired" in _check(client, "service:t-1")["Output"]

    assert client.agent.check.ttl_pass("service:t-1")
    assert client.agent.check.ttl_fail("service:t-1", notes="broken")
    assert _status(client, "service:t-1") == "critical"
    assert not client.agent.check.ttl_pass("no-such-check")


def test_blocking_query_returns_on_change_and_waits_otherwise(
    consul_agent: ConsulStandin | ConsulDevAgent,
) -> None:
    client = consul_agent.client()
    other = consul_agent.client()
    index, entries = client.health.service("b", passing=True)
    assert entries == []

    # Nothing changes: the query holds for the whole wait and returns the same data.
    started = time.monotonic()
    same_index, entries = client.health.service("b", passing=True, index=index, wait="500ms")
    assert time.monotonic() - started >= 0.45
    assert entries == []
    assert int(same_index) >= int(index)

    # A registration during the wait releases the query at once.
    timer = threading.Timer(
        0.3, lambda: other.agent.service.register("b", service_id="b-1", port=1)
    )
    started = time.monotonic()
    timer.start()
    try:
        new_index, entries = client.health.service("b", passing=True, index=same_index, wait="10s")
    finally:
        timer.join()
    elapsed = time.monotonic() - started
    assert 0.25 <= elapsed < 2.0, elapsed
    assert int(new_index) > int(same_index)
    assert [e["Service"]["ID"] for e in entries] == ["b-1"]


@pytest.mark.parametrize(
    "consul_agent",
    ["standin", pytest.param("consul", marks=pytest.mark.slow)],
    indirect=True,
)
def test_deregister_critical_service_after(consul_agent: ConsulStandin | ConsulDevAgent) -> None:
    client = consul_agent.client()
    # Nothing listens on port 9: the check stays critical from registration on.
    check = consul.Check.grpc("127.0.0.1:9", "200ms", use_tls=False, deregister="1s")
    assert client.agent.service.register("d", service_id="d-1", port=9, check=check)
    alive = consul.Check.ttl("1h")
    assert client.agent.service.register("d", service_id="d-keep", port=9, check=alive)
    assert client.agent.check.ttl_pass("service:d-keep")

    registered_at = time.monotonic()
    # Consul itself floors the timeout at 1 min and reaps every 30 s.
    limit_s = consul_agent.check_deregister_interval_min_s + consul_agent.check_reap_interval_s + 10
    gone_at = wait_for(
        lambda: "d-1" not in client.agent.services(), limit_s, "critical service reaped"
    )
    assert gone_at - registered_at >= 0.9
    assert "d-keep" in client.agent.services()  # passing services stay


def test_reregistration_replaces_checks(consul_agent: ConsulStandin | ConsulDevAgent) -> None:
    client = consul_agent.client()
    ttl = consul.Check.ttl("1h")
    assert client.agent.service.register("r", service_id="r-1", port=1, check=ttl)
    assert client.agent.check.ttl_pass("service:r-1")
    assert client.agent.service.register(
        "r", service_id="r-1", port=2, tags=["new"], check=ttl, replace_existing_checks=True
    )
    services = client.agent.services()
    assert services["r-1"]["Port"] == 2 and services["r-1"]["Tags"] == ["new"]
    assert [c for c in client.agent.checks() if c.startswith("service:r-1")] == ["service:r-1"]


# -- stand-in specifics -----------------------------------------------------------


def test_standin_acl_token() -> None:
    with ConsulStandin(acl_token="s3cret") as standin:
        with pytest.raises(consul.ACLPermissionDenied):
            standin.client().agent.services()
        with pytest.raises(consul.ACLPermissionDenied):
            standin.client(token="wrong").agent.service.register("a", port=1)
        assert standin.client(token="s3cret").agent.service.register("a", port=1)
        assert "a" in standin.client(token="s3cret").agent.services()


def test_standin_stop_and_restart_on_same_port() -> None:
    with ConsulStandin() as standin:
        client = standin.client(timeout_s=2)
        assert client.agent.service.register("s", service_id="s-1", port=1)
        index, _ = client.health.service("s")
        port = standin.port

        # A blocking query in flight when the agent goes down fails, as the
        # connection drops; it does not hang until its wait.
        errors: list[BaseException] = []

        def blocked() -> None:
            try:
                standin.client(timeout_s=2).health.service("s", index=index, wait="30s")
            except Exception as exc:
                errors.append(exc)

        thread = threading.Thread(target=blocked)
        thread.start()
        time.sleep(0.2)  # let the query reach the server; not a correctness gate
        standin.stop()
        thread.join(5)
        assert not thread.is_alive()
        assert errors, "in-flight blocking query should fail when the agent stops"
        with pytest.raises(Exception, match="(?i)connection"):
            client.agent.services()

        standin.start()
        assert standin.port == port
        assert "s-1" in client.agent.services()  # state survives, as with a data dir

        standin.clear()  # a dev agent restarted: nothing, and the index starts over
        new_index, entries = client.health.service("s")
        assert entries == []
        assert int(new_index) < int(index) + 2


def test_standin_rejects_what_it_does_not_implement() -> None:
    with ConsulStandin() as standin:
        client = standin.client()
        with pytest.raises(BadRequest, match="only GRPC and TTL"):
            client.agent.service.register("h", check=consul.Check.http("http://127.0.0.1:1/", "1s"))
        with pytest.raises(BadRequest, match="Interval"):
            client.agent.service.register("h", check={"GRPC": "127.0.0.1:1"})
        with pytest.raises(BadRequest):
            client.health.service("h", filter_expr="Service.Port == 1")


def test_parse_go_duration() -> None:
    assert parse_go_duration("1m30s") == 90
    assert parse_go_duration("500ms") == pytest.approx(0.5)
    assert parse_go_duration("1.5h") == 5400
    assert parse_go_duration("0") == 0
    assert parse_go_duration(2_000_000_000) == 2
    with pytest.raises(Exception, match="invalid duration"):
        parse_go_duration("10 seconds")
