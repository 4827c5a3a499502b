"""deploy/'s secured variants: the compose override (docker-compose.secure.yml) and the
Kubernetes overlay (k8s-secure/): TLS and auth flags the CLI accepts, secrets mounted
where the flags point, workers reachable only from the router, probes that speak TLS.
The overlay is rendered with `kubectl kustomize` when kubectl is installed."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.procs import REPO_ROOT

yaml = pytest.importorskip("yaml", reason="PyYAML is needed to parse deploy/")

DEPLOY = REPO_ROOT / "deploy"
OVERLAY = DEPLOY / "k8s-secure"


def _rest(argv: list[str]) -> list[str]:
    """Arguments the real CLI does not accept."""
    from llmcluster.cli import build_parser

    _ns, rest = build_parser(argv).parse_known_args(argv)
    return rest


def _flags(argv: list[str]) -> dict[str, str]:
    return dict(a.split("=", 1) for a in argv if a.startswith("--") and "=" in a)


@pytest.fixture(scope="module")
def secure() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "docker-compose.secure.yml").read_text())


def test_compose_override_serves_tls_with_an_auth_file(secure) -> None:
    services = secure["services"]
    router = [str(a) for a in services["router"]["command"]]
    assert not _rest(router), _rest(router)
    flags = _flags(router)
    mounted = {s["target"] for s in services["router"]["secrets"]}
    for flag in (
        "--tls-cert", "--tls-key", "--worker-tls-ca", "--worker-tls-cert", "--worker-tls-key",
        "--auth-file",
    ):  # fmt: skip
        assert flags[flag] in mounted, flag
    for name in ("worker", "worker-gpu"):
        worker = [str(a) for a in services[name]["command"]]
        assert not _rest(worker), (name, _rest(worker))
        wflags = _flags(worker)
        assert {wflags["--tls-client-ca"], wflags["--tls-cert"], wflags["--tls-key"]} <= {
            s["target"] for s in services[name]["secrets"]
        }
        probe = [str(a) for a in services[name]["healthcheck"]["test"][2:]]  # CMD llmcluster
        assert probe[0] == "health" and not _rest(probe), probe
        # Workers only on the internal network, which has no route outside.
        assert services[name]["networks"] == ["backend"]
        assert "ports" not in services[name]
    assert secure["networks"]["backend"]["internal"] is True
    for name in ("router", "router-2", "consul", "jaeger", "prometheus"):
        assert "backend" in services[name]["networks"], name
    for secret in secure["secrets"].values():
        assert secret["file"].startswith("./secrets/")  # kept out of git (.gitignore)


def _render_overlay(tmp_path: Path) -> list[dict[str, Any]]:
    """The overlay rendered by kubectl with throwaway secrets (copied, so nothing is
    written into deploy/)."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the overlay is not rendered")
    from common.auth import append_tenant
    from common.certs import write_cluster_certificates

    shutil.copytree(DEPLOY / "k8s", tmp_path / "k8s")
    shutil.copytree(OVERLAY, tmp_path / "k8s-secure", ignore=shutil.ignore_patterns("secrets"))
    secrets = tmp_path / "k8s-secure" / "secrets"
    write_cluster_certificates(secrets)
    append_tenant(secrets / "auth.toml", "team-a", "tok")
    done = subprocess.run(
        [kubectl, "kustomize", str(tmp_path / "k8s-secure")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def test_k8s_overlay_renders_tls_auth_probes_and_network_policy(tmp_path) -> None:
    objects = {(o["kind"], o["metadata"]["name"]): o for o in _render_overlay(tmp_path)}
    secrets = {n for k, n in objects if k == "Secret"}
    assert {"llmcluster-tls", "llmcluster-auth"} <= secrets
    assert set(objects[("Secret", "llmcluster-tls")]["data"]) == {"ca.crt", "node.crt", "node.key"}
    for name, port in (("llmcluster-router", 50051), ("llmcluster-worker", 50061)):
        pod = objects[("Deployment", name)]["spec"]["template"]["spec"]
        container = pod["containers"][0]
        args = [str(a) for a in container["args"]]
        assert not _rest(args), (name, _rest(args))
        flags = _flags(args)
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"] if m.get("readOnly")}
        volumes = {v["name"]: v for v in pod["volumes"]}
        for flag, path in flags.items():
            if flag.startswith(("--tls", "--worker-tls", "--auth")) and path.startswith("/"):
                if flag == "--worker-tls-server-name":
                    continue
                folder, file = path.rsplit("/", 1)
                secret = volumes[mounts[folder]]["secret"]["secretName"]
                assert file in objects[("Secret", secret)]["data"], (name, flag)
        for probe in ("readinessProbe", "livenessProbe"):
            spec = container[probe]
            assert "grpc" not in spec, (name, probe)  # plaintext-only probe is gone
            command = [str(a) for a in spec["exec"]["command"]]
            assert command[:2] == ["llmcluster", "health"] and not _rest(command[1:])
            assert _flags(command)["--target"] == f"localhost:{port}"
    router_flags = _flags(objects[("Deployment", "llmcluster-router")]["spec"]["template"]["spec"]["containers"][0]["args"])  # fmt: skip
    assert router_flags["--worker-tls-server-name"] == "llmcluster-worker"
    assert "--auth-file" in router_flags
    policy = objects[("NetworkPolicy", "llmcluster-worker")]["spec"]
    assert policy["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "llmcluster-worker"}
    grpc_rule = next(r for r in policy["ingress"] if r["ports"][0]["port"] == 50061)
    assert grpc_rule["from"] == [
        {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "llmcluster-router"}}}
    ]


def test_every_router_of_the_base_file_is_secured(secure) -> None:
    """A router the base compose file adds (router-2) without an override here would serve
    plaintext with no auth beside the secured one."""
    base = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())["services"]
    routers = {n for n, s in base.items() if s.get("command", [""])[0] == "router"}
    assert routers >= {"router", "router-2"}
    for name in routers:
        flags = _flags([str(a) for a in secure["services"][name]["command"]])
        assert {"--tls-cert", "--auth-file", "--worker-tls-ca"} <= set(flags), name
        assert "backend" in secure["services"][name]["networks"], name
