"""deploy/grafana-dashboard.json is built on the exported metric names: every metric a query
names is in the exposition (the instruments, once each has a sample, and the fleet collector),
and every exported family is on the dashboard."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from batchsvc.metrics import instruments
from batchsvc.metrics.collector import FleetCollector
from tests.unit.workers.test_dispatcher import MODEL, make_world

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana-dashboard.json"
METRIC = re.compile(r"\bbatchsvc_[a-z0-9_]+\b")


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def queries(data: dict[str, Any]) -> list[str]:
    found = [t["expr"] for p in data["panels"] for t in p.get("targets", [])]
    for variable in data["templating"]["list"]:
        query = variable.get("query")
        if isinstance(query, dict):
            found.append(query["query"])
    return found


def exposition(tmp_path: Path) -> dict[str, set[str]]:
    """Family name -> the sample names it exports, with a sample in every instrument."""
    instruments.set_enabled(True)
    instruments.line_received("dash", 1.0, 2.0)
    instruments.line_upstream("dash", 0.5)
    instruments.line_recorded("dash", True, None, 0.6)
    instruments.line_recorded("dash", False, "internal_error", 0.6)
    instruments.usage("dash", {"usage": {"prompt_tokens": 3, "completion_tokens": 2}})
    instruments.upstream_attempt("dash", "503")
    instruments.upstream_retry("dash", "503")
    instruments.sync_request("dash", "ok")
    instruments.lines_dispatched("dash", 2)
    instruments.lines_republished("dash", 1)
    instruments.batch_assembled("completed", 0.2)
    instruments.batch_ended("completed")
    instruments.http_request("GET", "/readyz", 200, 0.001)
    instruments.worker_threads("dash", 8)
    w = make_world(tmp_path, **{MODEL: 4})
    w.submit(w.project("a"), [MODEL] * 6)
    w.dispatcher().dispatch(MODEL)
    fleet = CollectorRegistry()
    fleet.register(FleetCollector(w.env.redis, lambda: [MODEL]))
    text = generate_latest(REGISTRY).decode() + generate_latest(fleet).decode()
    families: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        names = families.setdefault(family.name, set())
        names.update(sample.name for sample in family.samples)
        if family.type == "counter":
            names.add(family.name + "_total")
    return families


def test_every_metric_the_dashboard_names_is_exported(tmp_path: Path) -> None:
    exported = exposition(tmp_path)
    samples = set().union(*exported.values())
    named = {name for expr in queries(dashboard()) for name in METRIC.findall(expr)}
    assert named, "the dashboard names no metric"
    assert named - samples == set()


def test_every_batchsvc_family_is_on_the_dashboard(tmp_path: Path) -> None:
    ours = {name for name in exposition(tmp_path) if name.startswith("batchsvc_")}
    text = " ".join(queries(dashboard()))
    assert sorted(name for name in ours if name not in text) == []


def test_the_dashboard_is_well_formed() -> None:
    data = dashboard()
    assert data["uid"] and data["title"] == "batchsvc"
    ids = [p["id"] for p in data["panels"]]
    assert len(ids) == len(set(ids))
    for panel in data["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert panel["targets"], panel["title"]
            refs = [t["refId"] for t in panel["targets"]]
            assert len(refs) == len(set(refs)), panel["title"]
    variables = {v["name"] for v in data["templating"]["list"]}
    assert variables == {"datasource", "model"}
