"""The Grafana dashboard (deploy/grafana/pdserve-dashboard.json, kept in the chart as
dashboards/pdserve.json): every PromQL expression names only metrics a real worker
exports, its variables are the ones the panels use, and the Helm chart ships it as a
ConfigMap only when ``grafana.dashboard.enabled``."""
from __future__ import annotations

import json
import re
import subprocess
import tarfile
from pathlib import Path
from typing import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helm.test_chart import CHART, HELM, ROOT, objects, render
from tests.services.test_request_metrics import running_worker

DASHBOARD = ROOT / "deploy" / "grafana" / "pdserve-dashboard.json"
IN_CHART = CHART / "dashboards" / "pdserve.json"
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "offset",
                "bool", "inf", "nan"}
pytestmark = pytest.mark.timeout(120)
needs_helm = pytest.mark.skipif(not HELM.exists(), reason=f"no helm at {HELM} (bash deploy/helm/check.sh fetches it)")


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels(board: dict) -> Iterator[dict]:
    for panel in board["panels"]:
        yield panel
        yield from panel.get("panels", ())


def expressions(board: dict) -> list[str]:
    return [t["expr"] for p in panels(board) for t in p.get("targets", ())]


def metric_names(expr: str) -> set[str]:
    """The metric names in a PromQL expression: identifiers that are not functions, keywords,
    label names (matchers, grouping clauses) or durations."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    names = set()
    for match in re.finditer(r"(?<![\w:$.])([A-Za-z_:][\w:]*)(\s*\()?", expr):
        if match.group(2) is None and match.group(1).lower() not in PROMQL_WORDS:
            names.add(match.group(1))
    return names


def exported_names(text: str) -> set[str]:
    """The series names a /metrics page defines, from its families (so a labelled metric with
    no samples yet counts): counters as <name>_total, histograms with their _bucket/_sum/_count."""
    names = set()
    for family in text_string_to_metric_families(text):
        if family.type == "counter":
            names.add(f"{family.name}_total")
        elif family.type == "histogram":
            names.update(f"{family.name}{suffix}" for suffix in ("", "_bucket", "_sum", "_count"))
        else:
            names.add(family.name)
    return names


@pytest.fixture(scope="module")
def worker_metrics(tmp_path_factory) -> str:
    with running_worker(str(tmp_path_factory.mktemp("dashboard"))) as live:
        live.generate(list(range(100, 110)), 4, ignore_eos=True)
        return live.metrics_text()


def test_metric_name_extraction() -> None:
    expr = ('histogram_quantile(0.9, sum by (le, role) (rate(pdserve:ttft_bucket{role=~"$role", x="a{b}"}'
            '[$__rate_interval]))) / on (role) group_left sum(pdserve_worker_x_total offset 5m)')
    assert metric_names(expr) == {"pdserve:ttft_bucket", "pdserve_worker_x_total"}


def test_every_expression_uses_exported_metrics(worker_metrics: str) -> None:
    exported = exported_names(worker_metrics)
    board = dashboard()
    exprs = expressions(board)
    assert len(exprs) >= 20
    for expr in exprs:
        names = metric_names(expr)
        assert names, expr
        assert names <= exported, f"{sorted(names - exported)} not exported by a worker: {expr}"
    for variable in board["templating"]["list"]:
        queried = re.findall(r"label_values\(([A-Za-z_:][\w:]*)", variable.get("definition", ""))
        assert set(queried) <= exported, variable["name"]
    used = {n for e in exprs for n in metric_names(e)}
    for name in ("pdserve:time_to_first_token_seconds_bucket", "pdserve:time_per_output_token_seconds_bucket",
                 "pdserve:e2e_request_latency_seconds_bucket", "pdserve:request_queue_time_seconds_bucket",
                 "pdserve:request_success_total", "pdserve:prompt_tokens_total", "pdserve:generation_tokens_total",
                 "pdserve:num_requests_running", "pdserve:num_requests_waiting", "pdserve:kv_cache_usage_perc",
                 "pdserve_kv_transfer_bytes_total", "pdserve_worker_prefills_total",
                 "pdserve_worker_lora_swaps_total"):
        assert name in used, name


def test_variables_and_datasource() -> None:
    board = dashboard()
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource" and variables["DS_PROMETHEUS"]["query"] == "prometheus"
    assert {"role", "model_name"} <= set(variables)
    ids = [p["id"] for p in panels(board)]
    assert len(ids) == len(set(ids))
    for panel in panels(board):
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
        for expr in (t["expr"] for t in panel["targets"]):
            assert "$role" in expr and "$model_name" in expr, expr


def test_grafana_copy_is_the_charts() -> None:
    assert DASHBOARD.resolve() == IN_CHART.resolve() or DASHBOARD.read_text() == IN_CHART.read_text()


@needs_helm
def test_chart_ships_the_dashboard_only_when_enabled() -> None:
    assert not [m for m in objects(render(), "ConfigMap") if "grafana" in m]
    docs = render("--set", "grafana.dashboard.enabled=true", "--set", "grafana.dashboard.labelValue=pd",
                  "--set", "grafana.dashboard.annotations.grafana_folder=LLM")
    config_map = objects(docs, "ConfigMap")["pdserve-grafana-dashboard"]
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "pd"
    assert config_map["metadata"]["annotations"] == {"grafana_folder": "LLM"}
    assert json.loads(config_map["data"]["pdserve.json"]) == dashboard()
    default_label = objects(render("--set", "grafana.dashboard.enabled=true"), "ConfigMap")
    assert default_label["pdserve-grafana-dashboard"]["metadata"]["labels"]["grafana_dashboard"] == "1"


@needs_helm
def test_packaged_chart_holds_the_dashboard(tmp_path: Path) -> None:
    subprocess.run([str(HELM), "package", str(CHART), "-d", str(tmp_path)], capture_output=True, timeout=60,
                   check=True)
    (archive,) = tmp_path.glob("pdserve-*.tgz")
    with tarfile.open(archive) as tar:
        assert "pdserve/dashboards/pdserve.json" in tar.getnames()
