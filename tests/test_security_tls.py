"""TLS and mTLS on the router's and workers' gRPC ports: real certificates made here,
real processes, real handshakes (plaintext refused, wrong CA, expired and foreign
client certificates), and certificate rotation without a restart."""

from __future__ import annotations

import asyncio
import os
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from common.certs import Authority
from common.tls import ServerTlsFields, server_credentials
from router.config import RouterConfig
from tests.procs import start_router, start_worker
from tests.security_fixtures import NULL_WORKER, make_pki, stream_texts, wait_serving
from worker.config import WorkerConfig


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


def test_flags_must_come_in_pairs():
    with pytest.raises(ValueError, match="tls-key"):
        RouterConfig(tls_cert="a.crt")
    with pytest.raises(ValueError, match="needs --tls-cert"):
        WorkerConfig(tls_client_ca="ca.crt")
    with pytest.raises(ValueError, match="worker-tls-key"):
        RouterConfig(worker_tls_ca="ca.crt", worker_tls_cert="c.crt")
    with pytest.raises(ValueError, match="needs --worker-tls-ca"):
        RouterConfig(worker_tls_cert="c.crt", worker_tls_key="c.key")


def test_non_pem_key_fails_start_up(tmp_path, pki):
    bad = tmp_path / "bad.key"
    bad.write_text("not a key")
    with pytest.raises(ValueError, match="not a PEM"):
        server_credentials(ServerTlsFields(tls_cert=str(pki.cert), tls_key=str(bad)))


async def _check(address: str, credentials: grpc.ChannelCredentials) -> int:
    async with grpc.aio.secure_channel(address, credentials) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
        return reply.status


def test_rotated_certificate_is_served_without_restart(tmp_path):
    """The files are replaced by a certificate from another CA: new handshakes use it;
    clients trusting only the old CA are refused from then on."""
    old, new, other = Authority("old CA"), Authority("new CA"), Authority("other CA")
    cert, key = old.issue("server").write(tmp_path, "server")
    old_ca, new_ca = old.write_ca(tmp_path, "old"), new.write_ca(tmp_path, "new")

    async def body() -> None:
        server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(HealthServicer(), server)
        credentials = server_credentials(ServerTlsFields(tls_cert=str(cert), tls_key=str(key)))
        assert credentials is not None
        port = server.add_secure_port("127.0.0.1:0", credentials)
        await server.start()
        address = f"127.0.0.1:{port}"
        trust_old = grpc.ssl_channel_credentials(old_ca.read_bytes())
        trust_new = grpc.ssl_channel_credentials(new_ca.read_bytes())
        try:
            assert await _check(address, trust_old) == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await _check(address, trust_new)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            # Rotate: write the new pair, with an mtime that surely differs.
            new.issue("server").write(tmp_path, "server")
            stamp = os.stat(cert).st_mtime_ns + 2_000_000_000
            for f in (cert, key):
                os.utime(f, ns=(stamp, stamp))
            assert await _check(address, trust_new) == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.aio.AioRpcError):
                await _check(address, trust_old)
            # A half-done rotation (a certificate whose key is not there yet, or garbage)
            # keeps the current certificate.
            key_pem = key.read_bytes()
            other.issue("server").write(tmp_path, "server")
            key.write_bytes(key_pem)
            os.utime(cert, ns=(stamp + 10**9, stamp + 10**9))
            assert await _check(address, trust_new) == health_pb2.HealthCheckResponse.SERVING
            key.write_text("garbage")
            os.utime(key, ns=(stamp + 2 * 10**9, stamp + 2 * 10**9))
            assert await _check(address, trust_new) == health_pb2.HealthCheckResponse.SERVING
        finally:
            await server.stop(0)

    asyncio.run(body())


@pytest.fixture(scope="module")
def mtls_cluster(pki):
    """A null worker that requires client certificates, behind a TLS router holding one."""
    tls = ("--tls-cert", str(pki.cert), "--tls-key", str(pki.key))
    worker = start_worker(*NULL_WORKER, *tls, "--tls-client-ca", str(pki.ca))
    router = None
    try:
        wait_serving(worker, pki.channel_credentials(client=True))
        router = start_router(
            [worker.address],
            *tls,
            "--worker-tls-ca",
            str(pki.ca),
            "--worker-tls-cert",
            str(pki.cert),
            "--worker-tls-key",
            str(pki.key),
        )
        wait_serving(router, pki.channel_credentials())
        yield router, worker
    finally:
        if router is not None:
            router.stop()
        worker.stop()


def test_router_serves_tls_and_refuses_plaintext(mtls_cluster, pki):
    router, _ = mtls_cluster
    with grpc.secure_channel(router.address, pki.channel_credentials()) as channel:
        assert "".join(stream_texts(channel))
    with grpc.insecure_channel(router.address) as channel, pytest.raises(grpc.RpcError) as err:
        stream_texts(channel, timeout_s=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_client_trusting_another_ca_is_refused(mtls_cluster, pki):
    router, _ = mtls_cluster
    creds = pki.channel_credentials(ca=pki.other_ca)
    with grpc.secure_channel(router.address, creds) as channel, pytest.raises(grpc.RpcError) as err:
        stream_texts(channel, timeout_s=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mtls_worker_answers_only_clients_with_a_certificate(mtls_cluster, pki):
    _, worker = mtls_cluster
    # No client certificate: the handshake fails, Generate gets no answer.
    with grpc.secure_channel(worker.address, pki.channel_credentials()) as channel:
        with pytest.raises(grpc.RpcError) as err:
            stream_texts(channel, timeout_s=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    # A client certificate signed by another CA, and an expired one: refused too.
    for cert, key in ((pki.other_cert, pki.other_key), (pki.expired_cert, pki.expired_key)):
        creds = grpc.ssl_channel_credentials(
            pki.ca.read_bytes(), key.read_bytes(), cert.read_bytes()
        )
        with grpc.secure_channel(worker.address, creds) as channel:
            with pytest.raises(grpc.RpcError) as err:
                stream_texts(channel, timeout_s=5)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE, cert
    # An operator holding the CA's certificate reaches it.
    with grpc.secure_channel(worker.address, pki.channel_credentials(client=True)) as channel:
        assert "".join(stream_texts(channel))


def test_router_with_expired_certificate_is_refused(pki):
    router = start_router(
        ["127.0.0.1:1"], "--tls-cert", str(pki.expired_cert), "--tls-key", str(pki.expired_key)
    )
    try:
        deadline = time.monotonic() + 60
        while "router listening" not in router.output():
            assert router.popen.poll() is None and time.monotonic() < deadline, router.output()
            time.sleep(0.1)
        assert "(TLS, no authentication;" in router.output()
        # The server is up (a plaintext client reaches the TCP port but not gRPC), and a
        # TLS client rejects its expired certificate instead of answering NOT_SERVING.
        with grpc.secure_channel(router.address, pki.channel_credentials()) as channel:
            with pytest.raises(grpc.RpcError) as err:
                health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=5
                )
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        router.stop()


def test_up_tls_serves_tls_end_to_end(tmp_path):
    """`llmcluster up --tls`: the router answers TLS clients holding the printed CA,
    refuses plaintext, and its workers refuse clients without a certificate."""
    import re
    import signal
    import subprocess
    import sys

    from tests.procs import REPO_ROOT, free_port
    from tests.test_finetune import temp_home

    (tmp_path / "home").mkdir()
    home = temp_home(tmp_path / "home")
    port = free_port()
    up = subprocess.Popen(
        [sys.executable, "-m", "llmcluster", "up", "--tls", "--port", str(port)],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "LLMCLUSTER_HOME": str(home)},
        text=True,
        start_new_session=True,
    )
    lines: list[str] = []
    try:
        assert up.stdout is not None
        for line in up.stdout:  # ends when up exits
            lines.append(line)
            if "--tls-ca" in line:
                break
        output = "".join(lines)
        assert "(TLS)" in output, output
        ca = re.search(r"--tls-ca (\S+)", output).group(1)
        worker = re.search(r"worker local-0 serving on (\S+)", output).group(1)
        creds = grpc.ssl_channel_credentials(open(ca, "rb").read())
        with grpc.secure_channel(f"127.0.0.1:{port}", creds) as channel:
            assert "".join(stream_texts(channel, max_new_tokens=3))
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            with pytest.raises(grpc.RpcError):
                stream_texts(channel, timeout_s=5)
        with grpc.secure_channel(worker, creds) as channel:
            with pytest.raises(grpc.RpcError) as err:
                stream_texts(channel, timeout_s=5)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        os.killpg(up.pid, signal.SIGINT)
        assert up.wait(60) == 0
        assert not os.path.exists(ca)  # the throwaway CA is gone with the cluster
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)
            up.wait()


def test_worker_certificate_named_otherwise_needs_the_server_name_flag(tmp_path):
    """Workers found by host name (Consul) share one certificate for a service name:
    the router verifies that name with --worker-tls-server-name, and refuses without."""
    import subprocess
    import sys

    from tests.procs import REPO_ROOT

    authority = Authority("deploy CA")
    ca = authority.write_ca(tmp_path)
    cert, key = authority.issue("worker", hosts=("llmcluster-worker",)).write(tmp_path, "worker")
    worker = start_worker(*NULL_WORKER, "--tls-cert", str(cert), "--tls-key", str(key))
    routers = []
    try:
        base = ["--worker-tls-ca", str(ca)]
        routers = [
            start_router([worker.address], *base),
            start_router([worker.address], *base, "--worker-tls-server-name", "llmcluster-worker"),
        ]
        wait_serving(routers[1], None)
        with grpc.insecure_channel(routers[1].address) as channel:
            assert "".join(stream_texts(channel))
        # The first router dials 127.0.0.1, which the certificate does not name.
        with grpc.insecure_channel(routers[0].address) as channel:
            with pytest.raises(grpc.RpcError) as err:
                stream_texts(channel, timeout_s=5)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        # `llmcluster health` probes a TLS port (Kubernetes' own gRPC probe cannot).
        probe = [sys.executable, "-m", "llmcluster", "health", "--target"]
        done = subprocess.run(
            [*probe, "localhost:" + str(worker.port), "--tls-ca", str(ca)],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 1 and "UNAVAILABLE" in done.stderr  # name mismatch
        done = subprocess.run(
            [*probe, routers[1].address], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0 and done.stdout.strip() == "SERVING", done.stderr
    finally:
        for router in routers:
            router.stop()
        worker.stop()


def test_consul_check_of_a_tls_worker_dials_tls_with_the_shared_name():
    from common.registry import HealthCheck, RegistryConfig, ServiceInstance
    from common.registry.consul import ConsulRegistry
    from tests.consul_standin import ConsulStandin

    with ConsulStandin() as standin:
        config = RegistryConfig(
            registry="consul",
            consul_addr=standin.addr,
            consul_check_tls_server_name="llmcluster-worker",
        )
        registry = ConsulRegistry(config)
        try:
            instance = ServiceInstance(name="w", id="w-1", address="host-1", port=1)
            plain = registry._check_definition(instance)
            assert not plain.get("grpc_use_tls") and "TLSServerName" not in plain
            instance.check = HealthCheck(use_tls=True)
            tls = registry._check_definition(instance)
            assert tls["grpc_use_tls"] is True and tls["TLSServerName"] == "llmcluster-worker"
        finally:
            registry.close()


@pytest.mark.parametrize("role", ["worker", "router"])
def test_missing_or_non_pem_tls_file_exits_2(tmp_path, pki, role):
    import subprocess
    import sys

    from tests.procs import REPO_ROOT

    bad = tmp_path / "bad.key"
    bad.write_text("not a key")
    for key, expected in ((tmp_path / "missing.key", "cannot read TLS file"), (bad, "not a PEM")):
        argv = [role, "--port", "0", "--tls-cert", str(pki.cert), "--tls-key", str(key)]
        if role == "router":
            argv += ["--workers", "127.0.0.1:1"]
        done = subprocess.run(
            [sys.executable, "-m", "llmcluster", *argv],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 2, done.stderr[-2000:]
        assert expected in done.stderr and "Traceback" not in done.stderr
