"""The registry: configuration, the static backend, and the Consul backend against an agent.

Consul-backed tests run against the in-process stand-in and, when a ``consul`` binary is
on PATH, against a real ``consul agent -dev``.
"""

from __future__ import annotations

import argparse
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.config import add_arguments, from_arguments
from common.registry import (
    WORKER_SERVICE,
    HealthCheck,
    RegistryConfig,
    RegistryError,
    ServiceInstance,
    StaticRegistry,
    WatchStatus,
    make_registry,
    model_tag,
    parse_endpoint,
)
from common.registry.consul import ConsulRegistry, go_duration
from tests import consul_standin
from tests.consul_standin import (
    ConsulDevAgent,
    ConsulStandin,
    HealthServer,
    wait_for,
)

pytestmark = pytest.mark.timeout(60)

# The shared agent fixture (stand-in, plus a real agent when on PATH).
consul_agent = consul_standin.consul_agent

CONSUL_ENV = (
    "CONSUL_HTTP_ADDR",
    "CONSUL_HTTP_TOKEN",
    "CONSUL_HTTP_TOKEN_FILE",
    "CONSUL_HTTP_SSL",
    "CONSUL_HTTP_SSL_VERIFY",
    "CONSUL_CACERT",
)


@pytest.fixture(autouse=True)
def _clean_consul_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in CONSUL_ENV:
        monkeypatch.delenv(name, raising=False)


# -- configuration --------------------------------------------------------------


def test_config_defaults() -> None:
    config = RegistryConfig()
    assert config.registry == "static"
    assert config.consul_endpoint() == ("http", "127.0.0.1", 8500)
    assert config.consul_token is None
    assert config.consul_verify() is True


def test_config_from_consul_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CONSUL_HTTP_ADDR", "https://consul.internal:8501")
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", "tok")
    monkeypatch.setenv("CONSUL_CACERT", "/etc/ca.pem")
    config = RegistryConfig(registry="consul")
    assert config.consul_endpoint() == ("https", "consul.internal", 8501)
    assert config.consul_token == "tok"
    assert config.consul_verify() == "/etc/ca.pem"

    monkeypatch.setenv("CONSUL_HTTP_ADDR", "consul:8500")
    monkeypatch.setenv("CONSUL_HTTP_SSL", "true")
    monkeypatch.setenv("CONSUL_HTTP_SSL_VERIFY", "false")
    monkeypatch.delenv("CONSUL_HTTP_TOKEN")
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    monkeypatch.setenv("CONSUL_HTTP_TOKEN_FILE", str(token_file))
    config = RegistryConfig()
    assert config.consul_endpoint() == ("https", "consul", 8500)
    assert config.consul_verify() is False
    assert config.consul_token == "from-file"


def test_config_flags_override_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONSUL_HTTP_ADDR", "envhost:1")
    parser = argparse.ArgumentParser()
    add_arguments(parser, RegistryConfig)
    assert not any("token" in a.dest for a in parser._actions)  # never in argv
    ns = parser.parse_args(
        ["--registry", "consul", "--consul-addr", "flaghost:2", "--consul-check-interval-s", "0.5"]
    )
    config = from_arguments(RegistryConfig, ns)
    assert config.registry == "consul"
    assert config.consul_endpoint() == ("http", "flaghost", 2)
    assert config.consul_check_interval_s == 0.5
    assert from_arguments(RegistryConfig, parser.parse_args([])).consul_addr == "envhost:1"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"registry": "etcd"}, "registry must be one of"),
        ({"consul_addr": "unix:///x"}, "consul address"),
        ({"consul_addr": "host:notaport"}, "bad port"),
        ({"consul_check_interval_s": 0}, "consul_check_interval_s"),
        ({"consul_retry_initial_s": 2, "consul_retry_max_s": 1}, "consul_retry_initial_s"),
        ({"consul_deregister_critical_after_s": -1}, "deregister"),
    ],
)
def test_config_rejects_bad_values(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RegistryConfig(**kwargs)  # type: ignore[arg-type]


def test_bad_ssl_env_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONSUL_HTTP_SSL", "maybe")
    with pytest.raises(ValueError, match="CONSUL_HTTP_SSL"):
        RegistryConfig()


def test_go_duration() -> None:
    assert go_duration(0.5) == "500ms"
    assert go_duration(60) == "60000ms"


# -- instances and the static backend -------------------------------------------


def test_service_instance() -> None:
    inst = ServiceInstance(
        name=WORKER_SERVICE,
        id="w-1",
        address="::1",
        port=50051,
        tags=[model_tag("SmolLM2-135M-Instruct"), "gpu"],  # type: ignore[arg-type]
        meta={"capacity": 64, "version": "0.1.0"},  # type: ignore[dict-item]
    )
    assert inst.endpoint == "[::1]:50051"
    assert inst.models == ["SmolLM2-135M-Instruct"]
    assert inst.tags == ("model=SmolLM2-135M-Instruct", "gpu")
    assert inst.meta == {"capacity": "64", "version": "0.1.0"}
    with pytest.raises(ValueError, match="meta key"):
        ServiceInstance(name="s", id="i", address="h", port=1, meta={"bad key": "x"})
    with pytest.raises(ValueError, match="consul-"):
        ServiceInstance(name="s", id="i", address="h", port=1, meta={"consul-x": "x"})
    with pytest.raises(ValueError, match="port"):
        ServiceInstance(name="s", id="i", address="h", port=0)


def test_parse_endpoint() -> None:
    assert parse_endpoint("10.0.0.1:50051") == ("10.0.0.1", 50051)
    assert parse_endpoint("[::1]:7") == ("::1", 7)
    for bad in ("nohost", ":80", "h:0", "h:x"):
        with pytest.raises(ValueError):
            parse_endpoint(bad)


def test_static_registry() -> None:
    registry = make_registry(RegistryConfig(), static_addresses=["127.0.0.1:1", "[::1]:2"])
    assert isinstance(registry, StaticRegistry)
    seen: list[list[str]] = []
    statuses: list[WatchStatus] = []
    watch = registry.watch(
        WORKER_SERVICE, lambda xs: seen.append([x.endpoint for x in xs]), statuses.append
    )
    assert seen == [["127.0.0.1:1", "[::1]:2"]]  # once, before watch() returns
    assert statuses and statuses[-1].healthy
    assert watch.status().healthy
    assert [i.id for i in watch.instances()] == ["127.0.0.1:1", "[::1]:2"]
    assert registry.register(ServiceInstance(name=WORKER_SERVICE, id="x", address="h", port=1))
    assert registry.deregister("x")
    other: list[list[object]] = []
    registry.watch("llmcluster-router", other.append)
    assert other == [[]]
    watch.stop()
    registry.close()


def test_make_registry_consul() -> None:
    registry = make_registry(RegistryConfig(registry="consul"))
    assert isinstance(registry, ConsulRegistry)
    registry.close()


# -- the Consul backend -----------------------------------------------------------


@pytest.fixture
def standin() -> Iterator[ConsulStandin]:
    with ConsulStandin(check_reap_interval_s=0.1, check_deregister_interval_min_s=0) as s:
        yield s


@pytest.fixture
def health_servers() -> Iterator[list[HealthServer]]:
    servers: list[HealthServer] = []
    try:
        yield servers
    finally:
        for server in servers:
            server.stop()


def _config(agent: ConsulStandin | ConsulDevAgent, **overrides: object) -> RegistryConfig:
    values: dict[str, object] = {
        "registry": "consul",
        "consul_addr": agent.addr,
        "consul_timeout_s": 2.0,
        "consul_check_interval_s": 0.2,
        "consul_check_timeout_s": 1.0,
        "consul_watch_wait_s": 5.0,
        "consul_retry_initial_s": 0.05,
        "consul_retry_max_s": 0.4,
        "consul_reregister_interval_s": 0.2,
    }
    values.update(overrides)
    return RegistryConfig(**values)  # type: ignore[arg-type]


class Recorder:
    """Collects watch callbacks; tests wait on its condition with a deadline."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.sets: list[tuple[float, list[ServiceInstance]]] = []
        self.statuses: list[WatchStatus] = []

    def on_change(self, instances: list[ServiceInstance]) -> None:
        with self.cond:
            self.sets.append((time.monotonic(), instances))
            self.cond.notify_all()

    def on_status(self, status: WatchStatus) -> None:
        with self.cond:
            self.statuses.append(status)
            self.cond.notify_all()

    def ids(self) -> list[str]:
        with self.cond:
            return sorted(i.id for i in self.sets[-1][1]) if self.sets else []

    def wait_ids(self, ids: list[str], timeout_s: float) -> float:
        """Waits until the last reported set has exactly ``ids``; returns when it arrived."""
        deadline = time.monotonic() + timeout_s
        with self.cond:
            while not self.sets or sorted(i.id for i in self.sets[-1][1]) != sorted(ids):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"watch never reported {ids}; got {self.sets[-3:]}")
                self.cond.wait(remaining)
            return self.sets[-1][0]


def _worker(server: HealthServer, n: int) -> ServiceInstance:
    return ServiceInstance(
        name=WORKER_SERVICE,
        id=f"worker-{n}",
        address=server.address,
        port=server.port,
        tags=(model_tag("SmolLM2-135M-Instruct"),),
        meta={"capacity": "64", "version": "0.1.0"},
    )


def _check_passing(client: object, check_id: str) -> bool:
    check = client.agent.checks().get(check_id)  # type: ignore[attr-defined]
    return bool(check) and check["Status"] == "passing"


def test_consul_registry_watch_follows_checks(
    consul_agent: ConsulStandin | ConsulDevAgent, health_servers: list[HealthServer]
) -> None:
    registry = ConsulRegistry(_config(consul_agent))
    client = consul_agent.client()
    recorder = Recorder()
    watch = registry.watch(WORKER_SERVICE, recorder.on_change, recorder.on_status)
    try:
        recorder.wait_ids([], 5)  # the first answer is reported even when empty
        assert watch.status().healthy

        health_servers.append(HealthServer())
        assert registry.register(_worker(health_servers[0], 1))
        check = client.agent.checks()["service:worker-1"]
        assert check["ServiceID"] == "worker-1"
        assert check["Type"] == "grpc"
        passed_at = wait_for(
            lambda: _check_passing(client, "service:worker-1"), 5, "worker-1 check passing"
        )
        seen_at = recorder.wait_ids(["worker-1"], 5)
        assert seen_at - passed_at < 1.0
        (instance,) = watch.instances()
        assert instance.endpoint == f"127.0.0.1:{health_servers[0].port}"
        assert instance.models == ["SmolLM2-135M-Instruct"]
        assert instance.meta == {"capacity": "64", "version": "0.1.0"}

        # A second worker joins.
        health_servers.append(HealthServer())
        assert registry.register(_worker(health_servers[1], 2))
        passed_at = wait_for(
            lambda: _check_passing(client, "service:worker-2"), 5, "worker-2 check passing"
        )
        assert recorder.wait_ids(["worker-1", "worker-2"], 5) - passed_at < 1.0

        # Health flips drive the set; so does deregistration.
        health_servers[0].set_serving(False)
        recorder.wait_ids(["worker-2"], 5)
        health_servers[0].set_serving(True)
        recorder.wait_ids(["worker-1", "worker-2"], 5)
        started = time.monotonic()
        assert registry.deregister("worker-2")
        recorder.wait_ids(["worker-1"], 5)
        assert time.monotonic() - started < 1.0
        assert watch.status().consecutive_failures == 0
    finally:
        registry.close()

    # No callback after close().
    count = len(recorder.sets)
    registry.deregister("worker-1")
    time.sleep(0.3)  # negative check: give a stray callback the chance to show up
    assert len(recorder.sets) == count


def test_watch_survives_consul_outage(
    standin: ConsulStandin, health_servers: list[HealthServer]
) -> None:
    registry = ConsulRegistry(_config(standin))
    recorder = Recorder()
    health_servers.append(HealthServer())
    registry.register(_worker(health_servers[0], 1))
    watch = registry.watch(WORKER_SERVICE, recorder.on_change, recorder.on_status)
    try:
        recorder.wait_ids(["worker-1"], 5)
        sets_before = len(recorder.sets)

        standin.stop()
        with recorder.cond:
            assert recorder.cond.wait_for(
                lambda: any(s.consecutive_failures >= 2 for s in recorder.statuses), 5
            )
        status = watch.status()
        assert not status.healthy
        assert status.last_error
        # The last known set is kept, and nobody was told the workers vanished.
        assert [i.id for i in watch.instances()] == ["worker-1"]
        assert len(recorder.sets) == sets_before
        # Retries back off: failures arrive at most about every retry_max_s.
        wait_for(lambda: watch.status().consecutive_failures >= 5, 5, "more retries")

        standin.start()
        wait_for(lambda: watch.status().healthy, 5, "watch healthy again")
        assert recorder.statuses[-1].healthy
        assert len(recorder.sets) == sets_before  # same set: no spurious change

        # Discovery resumes: a new worker shows up promptly.
        health_servers.append(HealthServer())
        registry.register(_worker(health_servers[1], 2))
        recorder.wait_ids(["worker-1", "worker-2"], 5)
    finally:
        registry.close()


def test_registration_restored_after_agent_loses_state(
    standin: ConsulStandin, health_servers: list[HealthServer]
) -> None:
    registry = ConsulRegistry(_config(standin, consul_watch_wait_s=1.0))
    recorder = Recorder()
    health_servers.append(HealthServer())
    client = standin.client()
    for n in range(5):  # unrelated churn first, so the worker's index ends up high
        client.agent.service.register("churn", service_id=f"churn-{n}", port=1)
        client.agent.service.deregister(f"churn-{n}")
    try:
        registry.register(_worker(health_servers[0], 1))
        watch = registry.watch(WORKER_SERVICE, recorder.on_change)
        recorder.wait_ids(["worker-1"], 5)
        old_index = watch.status().index

        # A dev agent restarted: registrations gone, index starts over (goes backwards).
        standin.clear()
        wait_for(lambda: "worker-1" in standin.service_ids(), 5, "keeper re-registers")
        recorder.wait_ids(["worker-1"], 5)
        wait_for(lambda: watch.status().index < old_index, 5, "watch resets its index")

        # With the index reset, the next change arrives promptly again.
        health_servers.append(HealthServer())
        registry.register(_worker(health_servers[1], 2))
        passed_at = wait_for(
            lambda: standin.check_status("service:worker-2") == "passing", 5, "worker-2 passing"
        )
        assert recorder.wait_ids(["worker-1", "worker-2"], 5) - passed_at < 1.0
    finally:
        registry.close()


def test_register_while_consul_down_retries(
    standin: ConsulStandin, health_servers: list[HealthServer]
) -> None:
    standin.stop()
    registry = ConsulRegistry(_config(standin))
    health_servers.append(HealthServer())
    try:
        assert registry.register(_worker(health_servers[0], 1)) is False
        standin.start()
        wait_for(lambda: "worker-1" in standin.service_ids(), 5, "registration after outage")
        # Deregistration stops the background re-registration for good.
        assert registry.deregister("worker-1")
        time.sleep(0.5)  # negative check: two keeper periods with nothing re-registered
        assert "worker-1" not in standin.service_ids()
    finally:
        registry.close()


def test_check_definition_sent_to_consul(standin: ConsulStandin) -> None:
    registry = ConsulRegistry(_config(standin, consul_deregister_critical_after_s=90))
    try:
        inst = ServiceInstance(
            name="llmcluster-router",
            id="router-1",
            address="10.1.2.3",
            port=50050,
            check=HealthCheck(interval_s=5, grpc_service="llmcluster.v1.Generate", target="x:1"),
        )
        assert registry.register(inst)
        check = standin.client().agent.checks()["service:router-1"]
        assert check["Type"] == "grpc"
        with standin._cond:
            raw = standin._checks["service:router-1"]
            assert raw.grpc == "x:1/llmcluster.v1.Generate"
            assert raw.interval_s == 5
            assert raw.timeout_s == 1.0
            assert raw.deregister_after_s == 90
    finally:
        registry.close()


def test_acl_token(monkeypatch: pytest.MonkeyPatch, health_servers: list[HealthServer]) -> None:
    health_servers.append(HealthServer())
    inst = _worker(health_servers[0], 1)
    with ConsulStandin(acl_token="s3cret") as standin:
        denied = ConsulRegistry(_config(standin, consul_token="wrong"))
        try:
            with pytest.raises(RegistryError, match="rejected"):
                denied.register(inst)
            assert denied.registered() == []  # not retried in the background
        finally:
            denied.close()
        # The token comes from $CONSUL_HTTP_TOKEN by default.
        monkeypatch.setenv("CONSUL_HTTP_TOKEN", "s3cret")
        allowed = ConsulRegistry(_config(standin))
        try:
            assert allowed.register(inst)
            recorder = Recorder()
            allowed.watch(WORKER_SERVICE, recorder.on_change)
            recorder.wait_ids(["worker-1"], 5)
        finally:
            allowed.close()
