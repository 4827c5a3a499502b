"""The experiments dashboard (deploy/grafana) queries only series a worker exports, with
the labels they carry: a renamed metric or label breaks this test, not the dashboard."""

from __future__ import annotations

import json
import re

from common.metrics import WorkerMetrics
from tests.procs import REPO_ROOT

DASHBOARD = REPO_ROOT / "deploy" / "grafana" / "experiments-dashboard.json"


def _exported() -> dict[str, set[str]]:
    """Sample name (with _bucket/_sum/_count/_total) → its label names, after one
    request of each kind is recorded so every labelled series exists."""
    metrics = WorkerMetrics()
    metrics.record_adapter_request("support-bot", "2", "OK")
    metrics.observe_adapter_ttft("support-bot", "2", 0.05)
    metrics.set_training_loss("ft-1", 1.0)
    metrics.record_feedback("support-bot", "2", 1.0)
    samples: dict[str, set[str]] = {}
    for family in metrics.registry.collect():
        for sample in family.samples:
            samples.setdefault(sample.name, set()).update(sample.labels)
    return samples


def test_every_query_names_an_exported_series_and_its_labels() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exported = _exported()
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exprs.append(dashboard["templating"]["list"][1]["query"]["query"])
    assert len(exprs) >= 7
    for expr in exprs:
        names = re.findall(r"\bllmcluster_\w+", expr)
        assert names, expr
        labels = set()
        for name in names:
            assert name in exported, f"{name} is not exported by a worker ({expr})"
            labels |= exported[name]
        used = {
            label
            for group in re.findall(r"\bby \(([^)]*)\)", expr)
            for label in (x.strip() for x in group.split(","))
        }
        used |= set(re.findall(r"(\w+)\s*(?:=~|!=|=)\s*\"", expr))
        assert used - {"le"} <= labels, (expr, used - labels)
