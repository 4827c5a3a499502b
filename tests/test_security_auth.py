"""API keys, tenants and quotas: the auth file's checks (with line numbers), bearer-token
lookup, `llmcluster auth new-key`, and a real TLS router with an auth file in front of
a real worker: UNAUTHENTICATED, PERMISSION_DENIED, RESOURCE_EXHAUSTED with
retry-after-ms while another tenant is served, open health, per-tenant metrics."""

from __future__ import annotations

import subprocess
import sys
import threading
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.auth import (
    AuthFileError,
    AuthTable,
    Tenant,
    append_tenant,
    hash_token,
    load_auth_file,
    parse_auth_file,
)
from common.errors import Unauthenticated
from common.pb import finetune_pb2, finetune_pb2_grpc
from router.quotas import QuotaExceeded, TenantQuotas
from tests.procs import REPO_ROOT, free_port, start_router, start_worker
from tests.security_fixtures import (
    NULL_WORKER,
    make_pki,
    stream_messages,
    stream_texts,
    wait_serving,
)

TOKENS = {"team-a": "tok-a", "team-b": "tok-b", "limited": "tok-limited", "trainer": "tok-t"}
GENERATE_STREAM = "/llmcluster.v1.Generate/GenerateStream"


def auth_file_text() -> str:
    return f"""
[[tenant]]
name = "team-a"
key_sha256 = "{hash_token(TOKENS["team-a"])}"

[[tenant]]
name = "team-b"
key_sha256 = "{hash_token(TOKENS["team-b"])}"

[[tenant]]
name = "limited"
key_sha256 = "{hash_token(TOKENS["limited"])}"
requests_per_minute = 2

[[tenant]]
name = "trainer"
key_sha256 = "{hash_token(TOKENS["trainer"])}"
allow_finetune = true
"""


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


# ---- the auth file ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ('[[tenant]]\nname = "a"\nkey_sha256 = \n', 3, "not valid TOML"),
        ('[[tenant]]\nname = "a"\n', 1, "missing 'key_sha256'"),
        ('[[tenant]]\nname = "a"\nkey_sha256 = "abc"\n', 3, "64 hex digits"),
        (f'[[tenant]]\nname = "a"\nkey_sha256 = "{"0" * 64}"\nrpm = 3\n', 4, "unknown key"),
        (
            f'[[tenant]]\nname = "a"\nkey_sha256 = "{"0" * 64}"\nrequests_per_minute = -1\n',
            4,
            ">= 0",
        ),
        (
            f'[[tenant]]\nname = "a"\nkey_sha256 = "{"0" * 64}"\nallow_finetune = "yes"\n',
            4,
            "must be bool",
        ),
        (
            f'[[tenant]]\nname = "a"\nkey_sha256 = "{"0" * 64}"\n\n'
            f'[[tenant]]\nname = "a"\nkey_sha256 = "{"1" * 64}"\n',
            5,
            "appears twice",
        ),
        (
            f'[[tenant]]\nname = "a"\nkey_sha256 = "{"0" * 64}"\n\n'
            f'[[tenant]]\nname = "b"\nkey_sha256 = "{"0" * 64}"\n',
            7,
            "already belongs",
        ),
        ('[[tenant]]\nname = "../x"\nkey_sha256 = "' + "0" * 64 + '"\n', 2, "tenant name"),
        ("[tenant]\nname = 1\n", 1, "array of tables"),
    ],
)
def test_malformed_auth_file_names_the_line(text, line, message):
    with pytest.raises(AuthFileError, match=message) as err:
        parse_auth_file(text, "auth.toml")
    assert str(err.value).startswith(f"auth.toml:{line}:"), str(err.value)


def test_auth_file_parses_limits(tmp_path):
    path = tmp_path / "auth.toml"
    path.write_text(auth_file_text())
    table = load_auth_file(path)
    limited = next(t for t in table.tenants if t.name == "limited")
    assert limited.requests_per_minute == 2 and not limited.allow_finetune
    assert next(t for t in table.tenants if t.name == "trainer").allow_finetune


@pytest.mark.parametrize(
    "metadata",
    [
        (),
        (("authorization", ""),),
        (("authorization", "Bearer"),),
        (("authorization", "Bearer "),),
        (("authorization", "Bearer tok a"),),
        (("authorization", "Bearer  tok-a"),),
        (("authorization", "Basic tok-a"),),
        (("authorization", "Bearer tok-a "),),
        (("authorization", "Bearer wrong"),),
        (("authorization", "Bearer tok-a"), ("authorization", "Bearer tok-a")),
    ],
)
def test_bad_credentials_are_unauthenticated(metadata):
    table = AuthTable([Tenant("team-a", hash_token("tok-a"))])
    with pytest.raises(Unauthenticated):
        table.authenticate(metadata)


def test_right_token_finds_its_tenant():
    table = AuthTable([Tenant("team-a", hash_token("tok-a")), Tenant("b", hash_token("tok-b"))])
    assert table.authenticate(bearer("tok-b")).name == "b"
    assert table.authenticate((("authorization", "bearer tok-a"),)).name == "team-a"


def test_new_key_prints_token_once_and_appends_only_its_hash(tmp_path):
    path = tmp_path / "auth.toml"
    append_tenant(path, "existing", "tok-x")
    cmd = [sys.executable, "-m", "llmcluster", "auth", "new-key", "--tenant", "team-c"]
    cmd += ["--auth-file", str(path), "--requests-per-minute", "5", "--allow-finetune"]
    done = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    token = done.stdout.strip()
    assert token and " " not in token
    text = path.read_text()
    assert token not in text and hash_token(token) in text
    tenant = load_auth_file(path).authenticate(bearer(token))
    assert (tenant.name, tenant.requests_per_minute, tenant.allow_finetune) == ("team-c", 5, True)
    again = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and "appears twice" in again.stderr
    assert load_auth_file(path).tenants[-1].name == "team-c"  # file unchanged


# ---- quotas (clock under the test's control) --------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_requests_per_minute_refills_and_names_the_limit():
    clock = Clock()
    quotas = TenantQuotas(clock)
    a, b = Tenant("a", "0" * 64, requests_per_minute=2), Tenant("b", "1" * 64)
    for _ in range(2):
        quotas(a, GENERATE_STREAM).release()
    with pytest.raises(QuotaExceeded, match="requests_per_minute=2") as err:
        quotas(a, GENERATE_STREAM)
    assert err.value.trailing_metadata == (("retry-after-ms", "30000"),)
    quotas(b, GENERATE_STREAM).release()  # another tenant is not affected
    clock.now += 29.9
    with pytest.raises(QuotaExceeded):
        quotas(a, GENERATE_STREAM)
    clock.now += 0.2
    quotas(a, GENERATE_STREAM).release()
    # Health, ListModels, GetJob are not counted.
    quotas(a, "/llmcluster.v1.Generate/ListModels").release()


def test_concurrency_cap_counts_running_requests():
    quotas = TenantQuotas(Clock())
    a = Tenant("a", "0" * 64, max_concurrent=2)
    first, second = quotas(a, GENERATE_STREAM), quotas(a, GENERATE_STREAM)
    with pytest.raises(QuotaExceeded, match="max_concurrent=2"):
        quotas(a, GENERATE_STREAM)
    first.release()
    first.release()  # idempotent
    assert quotas.running("a") == 1
    quotas(a, GENERATE_STREAM)
    second.release()


def test_tokens_per_minute_charges_usage_and_refuses_while_in_debt():
    from common.pb import generate_pb2

    clock = Clock()
    quotas = TenantQuotas(clock)
    a = Tenant("a", "0" * 64, tokens_per_minute=60)
    admission = quotas(a, GENERATE_STREAM)
    last = generate_pb2.GenerateStreamResponse()
    last.usage.prompt_tokens, last.usage.completion_tokens = 50, 40
    admission.observe(generate_pb2.GenerateStreamResponse(text="x"))  # no usage yet
    admission.observe(last)
    admission.release()
    with pytest.raises(QuotaExceeded, match="tokens_per_minute=60; 30 tokens over") as err:
        quotas(a, GENERATE_STREAM)
    assert err.value.retry_after_ms == 31000  # 30 over at 1/s, then one to spare
    clock.now += 31
    quotas(a, GENERATE_STREAM).release()


# ---- a real router with TLS and an auth file ----------------------------------------------


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    """A null worker and a TLS router with the auth file and a metrics port."""
    directory = tmp_path_factory.mktemp("secured")
    pki = make_pki(directory)
    auth = directory / "auth.toml"
    auth.write_text(auth_file_text())
    worker = start_worker(*NULL_WORKER)
    router = None
    try:
        worker.wait_healthy(timeout_s=120)
        metrics_port = free_port()
        router = start_router(
            [worker.address],
            "--tls-cert",
            str(pki.cert),
            "--tls-key",
            str(pki.key),
            "--auth-file",
            str(auth),
            "--metrics-port",
            str(metrics_port),
        )
        wait_serving(router, pki.channel_credentials())
        channel = grpc.secure_channel(router.address, pki.channel_credentials())
        yield channel, router, metrics_port, pki
        channel.close()
    finally:
        if router is not None:
            router.stop()
        worker.stop()


def test_health_and_reflection_answer_without_a_token(secured):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    channel, *_ = secured
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    answer = next(iter(stub.ServerReflectionInfo(iter([request]), timeout=5)))
    names = {s.name for s in answer.list_services_response.service}
    assert {"llmcluster.v1.Generate", "llmcluster.v1.FineTune"} <= names


@pytest.mark.parametrize(
    "metadata",
    [(), bearer("wrong"), bearer(""), bearer("tok a"), (("authorization", "tok-a"),)],
    ids=["missing", "wrong", "empty", "spaces", "no-scheme"],
)
def test_router_refuses_bad_tokens(secured, metadata):
    channel, *_ = secured
    with pytest.raises(grpc.RpcError) as err:
        stream_texts(channel, metadata=metadata, timeout_s=10)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, err.value.details()


def test_right_token_streams_tokens(secured):
    channel, *_ = secured
    assert len(stream_texts(channel, metadata=bearer(TOKENS["team-a"]))) == 4


def test_finetune_without_permission_is_denied(secured):
    channel, *_ = secured
    stub = finetune_pb2_grpc.FineTuneStub(channel)
    request = finetune_pb2.CreateJobRequest(output_name="x", method=finetune_pb2.LORA)
    with pytest.raises(grpc.RpcError) as err:
        stub.CreateJob(request, timeout=10, metadata=bearer(TOKENS["team-a"]))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "allow_finetune" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        stub.ListJobs(finetune_pb2.ListJobsRequest(), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_tenant_over_its_rate_is_refused_while_another_is_served(secured):
    channel, *_ = secured
    limited = bearer(TOKENS["limited"])
    for _ in range(2):
        stream_texts(channel, metadata=limited)
    # A flood from the limited tenant while team-b's requests run beside it.
    stub_errors: list[grpc.RpcError] = []
    start = threading.Barrier(9)

    def flood() -> None:
        start.wait()
        try:
            stream_texts(channel, metadata=limited, timeout_s=10)
        except grpc.RpcError as exc:
            stub_errors.append(exc)

    def served() -> int:
        start.wait()
        msgs = stream_messages(channel, metadata=bearer(TOKENS["team-b"]), max_new_tokens=8)
        # Tokens, not text deltas: under load a stream may carry several tokens per message.
        return msgs[-1].usage.completion_tokens

    with ThreadPoolExecutor(9) as pool:
        floods = [pool.submit(flood) for _ in range(6)]
        others = [pool.submit(served) for _ in range(3)]
        assert [f.result() for f in others] == [8, 8, 8]
        for f in floods:
            f.result()
    assert len(stub_errors) == 6
    for exc in stub_errors:
        assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "requests_per_minute=2" in exc.details()
        retry_ms = int(dict(exc.trailing_metadata())["retry-after-ms"])
        assert 0 < retry_ms <= 60_000


def test_request_counters_carry_the_tenant(secured):
    channel, _, metrics_port, _ = secured
    stream_texts(channel, metadata=bearer(TOKENS["team-b"]))
    with pytest.raises(grpc.RpcError):
        stream_texts(channel, metadata=bearer("wrong"))
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read()
    lines = text.decode().splitlines()
    ok = (
        'llmcluster_router_tenant_requests_total{code="OK",method="GenerateStream",tenant="team-b"}'
    )
    assert any(line.startswith(ok) for line in lines), [x for x in lines if "tenant" in x]
    refused = 'llmcluster_requests_total{code="UNAUTHENTICATED",method="GenerateStream"'
    assert any(line.startswith(refused) for line in lines)


def test_malformed_auth_file_exits_2_naming_the_line(tmp_path):
    auth = tmp_path / "auth.toml"
    auth.write_text(f'[[tenant]]\nname = "a"\nkey_sha256 = "{"0" * 64}"\nrpm = 1\n')
    router = start_router(["127.0.0.1:1"], "--auth-file", str(auth))
    try:
        assert router.popen.wait(60) == 2
        assert f"{auth}:4: unknown key 'rpm'" in router.output()
    finally:
        router.stop()


def test_auth_health_closes_health_too(tmp_path):
    auth = tmp_path / "auth.toml"
    auth.write_text(auth_file_text())
    router = start_router(["127.0.0.1:1"], "--auth-file", str(auth), "--auth-health")
    try:
        with grpc.insecure_channel(router.address) as channel:
            grpc.channel_ready_future(channel).result(timeout=60)
            stub = health_pb2_grpc.HealthStub(channel)
            with pytest.raises(grpc.RpcError) as err:
                stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            reply = stub.Check(
                health_pb2.HealthCheckRequest(), timeout=5, metadata=bearer(TOKENS["team-a"])
            )
            assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING  # no worker
    finally:
        router.stop()


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    full_env = {
        k: v for k, v in os.environ.items() if k not in ("LLMCLUSTER_TOKEN", "LLMCLUSTER_TLS_CA")
    }
    return subprocess.run(
        [sys.executable, "-m", "llmcluster", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**full_env, **(env or {})},
    )


def test_cli_takes_token_and_ca_from_flags_or_environment(secured):
    _, router, _, pki = secured
    target = ("--target", router.address)
    done = _cli(
        "generate", "hi", "--max-new-tokens", "3", *target,
        "--token", TOKENS["team-a"], "--tls-ca", str(pki.ca),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "[LENGTH]" in done.stderr and "completion=3" in done.stderr
    env = {"LLMCLUSTER_TOKEN": TOKENS["team-b"], "LLMCLUSTER_TLS_CA": str(pki.ca)}
    done = _cli("models", *target, env=env)
    assert done.returncode == 0 and "(default)" in done.stdout, done.stderr
    done = _cli("models", *target, "--tls-ca", str(pki.ca))
    assert done.returncode == 1 and "UNAUTHENTICATED" in done.stderr
    done = _cli("finetune", "list", *target, env=env)
    assert done.returncode != 0 and "PERMISSION_DENIED" in done.stderr, done.stderr
    done = _cli("models", *target, "--tls-ca", str(router.address))  # not a file
    assert done.returncode == 2 and "TLS flags" in done.stderr


def test_auth_file_changes_apply_without_restart(tmp_path):
    clock = Clock()
    path = tmp_path / "auth.toml"
    append_tenant(path, "team-a", "tok-a")
    table = AuthTable(load_auth_file(path).tenants, path=path, clock=clock)
    append_tenant(path, "team-b", "tok-b", requests_per_minute=1)
    with pytest.raises(Unauthenticated):  # checked at most once per interval
        table.authenticate(bearer("tok-b"))
    clock.now += 1.5
    assert table.authenticate(bearer("tok-b")).requests_per_minute == 1
    # Limits change: the quota follows; running requests stay counted.
    quotas = TenantQuotas(clock)
    running = quotas(table.authenticate(bearer("tok-b")), GENERATE_STREAM)
    with pytest.raises(QuotaExceeded):
        quotas(table.authenticate(bearer("tok-b")), GENERATE_STREAM)
    path.write_text(path.read_text().replace("requests_per_minute = 1", "max_concurrent = 1"))
    clock.now += 1.5
    tenant_b = table.authenticate(bearer("tok-b"))
    with pytest.raises(QuotaExceeded, match="max_concurrent=1"):
        quotas(tenant_b, GENERATE_STREAM)
    running.release()
    quotas(tenant_b, GENERATE_STREAM).release()
    # A broken edit keeps the last good tenants; removing a tenant revokes its key.
    good = path.read_text()
    path.write_text(good + "\n[[tenant]]\nname = 'x'\n")
    clock.now += 1.5
    assert table.authenticate(bearer("tok-a")).name == "team-a"
    path.write_text(good.split("\n\n[[tenant]]")[0] + "\n")
    clock.now += 1.5
    assert table.authenticate(bearer("tok-a")).name == "team-a"
    with pytest.raises(Unauthenticated):
        table.authenticate(bearer("tok-b"))


def test_router_span_carries_the_tenant(tmp_path):
    from tests.otlp_receiver import OtlpReceiver

    auth = tmp_path / "auth.toml"
    auth.write_text(auth_file_text())
    worker = start_worker(*NULL_WORKER)
    router = None
    with OtlpReceiver() as receiver:
        try:
            worker.wait_healthy(timeout_s=120)
            env = receiver.env(OTEL_BSP_SCHEDULE_DELAY="200", OTEL_TRACES_SAMPLER="always_on")
            router = start_router([worker.address], "--auth-file", str(auth), env=env)
            router.wait_healthy(timeout_s=60)
            with grpc.insecure_channel(router.address) as channel:
                stream_texts(channel, metadata=bearer(TOKENS["team-b"]))

            def tenant_spans(spans):
                return [s for s in spans if s.attributes.get("llmcluster.tenant") == "team-b"]

            spans = receiver.wait_for(lambda s: bool(tenant_spans(s)), timeout_s=30)
            assert [s.name for s in tenant_spans(spans)] == ["router request"]
        finally:
            if router is not None:
                router.stop()
            worker.stop()
