"""The operators' Grafana setup in docker/grafana/: provisioning files, the dashboard's structure, and its PromQL.

Every expression must parse (``promtool check rules``, from Debian's prometheus package, see prom_util)
and select only metrics in the catalogue (the table in docs/metrics.md) or Prometheus's own ``up``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from grafana_util import (
    CATALOGUE,
    DASHBOARD,
    REPO,
    base_metric,
    catalogue_metrics,
    dashboard_exprs,
    referenced_metrics,
    substitute_variables,
)
from prom_util import prometheus_tools, promtool_check_exprs

GRAFANA = REPO / "docker" / "grafana"
DATASOURCES = GRAFANA / "provisioning" / "datasources" / "prometheus.yaml"
PROVIDERS = GRAFANA / "provisioning" / "dashboards" / "protoswarm.yaml"
DASHBOARDS_MOUNT = "/var/lib/grafana/dashboards"  # where compose mounts docker/grafana/dashboards
DATASOURCE = {"type": "prometheus", "uid": "protoswarm-prometheus"}

# The topics, each by a metric the dashboard must select.
REQUIRED_METRICS = {
    "peers per stage": "protoswarm_stage_peers",
    "tokens/s": "protoswarm_swarm_tokens_per_second",
    "loss": "protoswarm_train_loss",
    "bytes in/out": "protoswarm_pipeline_bytes_total",
    "outer exchange bytes": "protoswarm_outer_bytes_total",
    "compression ratio": "protoswarm_pipeline_compression_ratio",
    "round commits/skips": "protoswarm_outer_rounds_total",
    "drops": "protoswarm_pipeline_microbatches_total",
    "state syncs": "protoswarm_state_downloads_total",
}


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _all_panels(panels: list[dict]) -> list[dict]:
    out = []
    for panel in panels:
        out.append(panel)
        out.extend(_all_panels(panel.get("panels") or []))
    return out


def _compose_mounts() -> list[tuple[Path, str]] | None:
    """(host source, container target) of the bind mounts of docker/'s compose file, None without one."""
    files = sorted(p for p in (REPO / "docker").glob("*compose*.y*ml"))
    if not files:
        return None
    mounts = []
    for file in files:
        for service in (yaml.safe_load(file.read_text()) or {}).get("services", {}).values():
            for volume in service.get("volumes") or []:
                if isinstance(volume, str):
                    parts = volume.split(":")
                    source, target = parts[0], parts[1] if len(parts) > 1 else ""
                else:
                    source, target = volume.get("source", ""), volume.get("target", "")
                if source.startswith((".", "/")):  # a bind mount, not a named volume
                    mounts.append(((file.parent / source).resolve(), target))
    return mounts


# --- provisioning ------------------------------------------------------------------------------------


def test_datasource_provisioning():
    config = yaml.safe_load(DATASOURCES.read_text())
    assert config["apiVersion"] == 1
    (source,) = config["datasources"]
    assert source["name"] == "Prometheus"
    assert source["type"] == DATASOURCE["type"] and source["uid"] == DATASOURCE["uid"]
    assert source["access"] == "proxy"
    assert source["url"] == "http://prometheus:9090"  # the compose service `prometheus`
    assert source["isDefault"] is True


def test_dashboard_provider_provisioning():
    config = yaml.safe_load(PROVIDERS.read_text())
    assert config["apiVersion"] == 1
    (provider,) = config["providers"]
    assert provider["name"] and provider["type"] == "file"
    assert provider["folder"] == "protoswarm"
    assert provider["options"]["path"] == DASHBOARDS_MOUNT


def test_compose_mounts_what_the_provisioning_expects():
    mounts = _compose_mounts()
    if mounts is None:
        pytest.skip("no compose file in docker/ yet")
    assert (GRAFANA / "dashboards", DASHBOARDS_MOUNT) in [(s, t) for s, t in mounts], \
        f"docker/grafana/dashboards is not mounted at {DASHBOARDS_MOUNT}: {mounts}"
    provisioning = GRAFANA / "provisioning"
    assert any(
        (s == provisioning and t == "/etc/grafana/provisioning")
        or (s.parent == provisioning and t == f"/etc/grafana/provisioning/{s.name}")
        for s, t in mounts
    ), f"docker/grafana/provisioning is not mounted under /etc/grafana/provisioning: {mounts}"


# --- dashboard structure -----------------------------------------------------------------------------


def test_dashboard_identity():
    dashboard = _dashboard()
    assert dashboard["uid"] == "protoswarm-overview"
    assert dashboard["title"] == "protoswarm swarm overview"
    assert isinstance(dashboard["schemaVersion"], int) and dashboard["schemaVersion"] >= 36
    assert dashboard["refresh"] == "10s"
    assert dashboard["time"]["from"] == "now-30m"


def test_panels_have_unique_ids_positions_and_queries():
    panels = _all_panels(_dashboard()["panels"])
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    titles = [p["title"] for p in panels]
    assert len(titles) == len(set(titles)), "duplicate panel titles"
    assert any(p["type"] == "row" for p in panels)
    for panel in panels:
        assert panel.get("title"), panel
        grid = panel["gridPos"]
        assert {"x", "y", "w", "h"} <= set(grid) and 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert [t for t in panel.get("targets", []) if t.get("expr")], f"{panel['title']} has no query"
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), f"{panel['title']}: duplicate refIds"


def test_every_query_uses_the_provisioned_datasource():
    dashboard = _dashboard()
    for panel in _all_panels(dashboard["panels"]):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == DATASOURCE, panel["title"]
        for target in panel["targets"]:
            assert target.get("datasource", DATASOURCE) == DATASOURCE, f"{panel['title']} / {target['refId']}"
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            assert variable["datasource"] == DATASOURCE, variable["name"]


def test_template_variables():
    variables = {v["name"]: v for v in _dashboard()["templating"]["list"]}
    assert set(variables) >= {"job", "instance"}
    assert variables["job"]["current"]["value"] == "protoswarm"
    assert variables["instance"]["multi"] and variables["instance"]["includeAll"]
    assert variables["instance"]["allValue"] == ".*"
    raw = dashboard_exprs(substitute=False)
    assert raw["var job"] == "protoswarm_node_info"
    assert raw["var instance"] == 'protoswarm_node_info{job="$job"}'
    # `instance` may hold several values or ".*": it is only ever matched as a regex.
    for key, expr in raw.items():
        assert 'instance="' not in expr.replace(" ", ""), f"{key}: use instance=~\"$instance\""


def test_required_topics_are_covered():
    referenced = set().union(*map(referenced_metrics, dashboard_exprs().values()))
    missing = {topic: metric for topic, metric in REQUIRED_METRICS.items() if metric not in referenced}
    assert not missing, f"topics of the issue without a panel: {missing}"
    assert {"protoswarm_swarm_loss", "protoswarm_pipeline_tokens_total", "protoswarm_train_tokens_total",
            "protoswarm_state_download_bytes_total", "protoswarm_outer_round_seconds_bucket", "up"} <= referenced


def test_substitution_leaves_no_grafana_variables():
    for key, expr in dashboard_exprs().items():
        assert "$" not in expr and "[[" not in expr, key
    assert substitute_variables('rate(x{instance=~"${instance}"}[[[__rate_interval]]])') == \
        'rate(x{instance=~".*"}[1m])'
    assert substitute_variables("increase(x[$__range]) offset $__interval") == "increase(x[1m]) offset 1m"
    with pytest.raises(ValueError, match="nope"):
        substitute_variables('x{a="$nope"}')


# --- PromQL: parses, and selects catalogued metrics --------------------------------------------------


@pytest.fixture(scope="module")
def promtool() -> Path:
    tools = prometheus_tools()
    if isinstance(tools, str):
        pytest.skip(tools)
    return tools.promtool


def test_every_expression_parses(promtool, tmp_path):
    exprs = dashboard_exprs()
    assert len(exprs) > 30
    got = promtool_check_exprs(promtool, exprs, tmp_path)
    assert got.returncode == 0, f"promtool rejected a dashboard expression:\n{got.stdout}\n{got.stderr}"


def test_promtool_check_catches_a_broken_expression(promtool, tmp_path):
    good = dashboard_exprs()
    broken = {**good, "broken / A": "sum(rate(protoswarm_train_tokens_total[1m])"}
    got = promtool_check_exprs(promtool, broken, tmp_path)
    assert got.returncode != 0
    out = got.stdout + got.stderr
    # promtool names the rule it could not parse: the broken one, the last of them.
    assert "parse error" in out and f"check:expr_{len(good)}" in out, out
    unsubstituted = promtool_check_exprs(promtool, dashboard_exprs(substitute=False), tmp_path)
    assert unsubstituted.returncode != 0, "Grafana's $__rate_interval should not parse as PromQL"


def test_catalogue_is_read():
    catalogue = catalogue_metrics()
    assert len(catalogue) > 40
    assert catalogue["protoswarm_stage_peers"] == "gauge"
    assert catalogue["protoswarm_outer_rounds_total"] == "counter"
    assert catalogue["protoswarm_outer_round_seconds"] == "histogram"
    assert catalogue["protoswarm_node_info"] == "info"
    assert set(catalogue.values()) <= {"gauge", "counter", "histogram", "info"}
    assert CATALOGUE.name == "metrics.md"


def test_every_referenced_metric_is_in_the_catalogue():
    catalogue = catalogue_metrics()
    unknown = {
        key: sorted(name for name in referenced_metrics(expr) if name != "up" and base_metric(name, catalogue) is None)
        for key, expr in dashboard_exprs().items()
    }
    unknown = {key: names for key, names in unknown.items() if names}
    assert not unknown, f"metrics not in docs/metrics.md: {unknown}"


def test_unknown_metrics_are_flagged():
    catalogue = catalogue_metrics()
    names = referenced_metrics('sum(rate(protoswarm_nonexistent_total{job="protoswarm"}[1m]))')
    assert names == {"protoswarm_nonexistent_total"}
    assert base_metric("protoswarm_nonexistent_total", catalogue) is None
    assert base_metric("protoswarm_train_tokens", catalogue) is None  # a counter without _total
    assert base_metric("protoswarm_outer_round_seconds", catalogue) is None  # a histogram's bare name
    assert base_metric("protoswarm_stage_peers_bucket", catalogue) is None  # _bucket of a gauge
    assert base_metric("up", catalogue) is None


def test_base_metric_maps_series_to_catalogue_rows():
    catalogue = catalogue_metrics()
    assert base_metric("protoswarm_stage_peers", catalogue) == "protoswarm_stage_peers"
    assert base_metric("protoswarm_train_tokens_total", catalogue) == "protoswarm_train_tokens_total"
    assert base_metric("protoswarm_train_tokens_created", catalogue) == "protoswarm_train_tokens_total"
    for suffix in ("_bucket", "_sum", "_count", "_created"):
        assert base_metric(f"protoswarm_outer_round_seconds{suffix}", catalogue) == "protoswarm_outer_round_seconds"
    assert base_metric("protoswarm_node_info", catalogue) == "protoswarm_node_info"


@pytest.mark.parametrize(("expr", "expected"), [
    ('sum by (state) (protoswarm_state{job="protoswarm"})', {"protoswarm_state"}),
    ("sum(protoswarm_state) by (state, protoswarm_stage)", {"protoswarm_state"}),
    ('protoswarm_stage{instance=~"protoswarm_fake_.*", code!="protoswarm_other_total"}', {"protoswarm_stage"}),
    ("histogram_quantile(0.95, sum by (le, op) (rate(protoswarm_dht_seconds_bucket[5m])))",
     {"protoswarm_dht_seconds_bucket"}),
    ("rate(protoswarm_train_tokens_total[5m] offset 1h)", {"protoswarm_train_tokens_total"}),
    ("protoswarm_train_loss offset -5m @ start()", {"protoswarm_train_loss"}),
    ("sum(rate(protoswarm_pipeline_dense_bytes_total[1m])) / sum(rate(protoswarm_pipeline_bytes_total[1m]))",
     {"protoswarm_pipeline_dense_bytes_total", "protoswarm_pipeline_bytes_total"}),
    ("protoswarm_stage * on (instance) group_left (peer_id, run_id) protoswarm_node_info",
     {"protoswarm_stage", "protoswarm_node_info"}),
    ('count(up{job="protoswarm"}) - sum(up{job="protoswarm"})', {"up"}),
    ('label_replace(protoswarm_stage, "s", "$1", "instance", "(protoswarm_x.*)")', {"protoswarm_stage"}),
    ('topk(3, protoswarm_threads) > bool 2e1 and protoswarm_uptime_seconds < Inf', {"protoswarm_threads",
                                                                                       "protoswarm_uptime_seconds"}),
    ('count_values("v", protoswarm_stage)', {"protoswarm_stage"}),
    ('{__name__="protoswarm_swarm_loss", job="protoswarm"}', {"protoswarm_swarm_loss"}),
    ("max_over_time(protoswarm_outer_lag_epochs[10m:30s])", {"protoswarm_outer_lag_epochs"}),
    ("avg without (instance) (protoswarm_threads) unless ignoring (job) protoswarm_stage", {"protoswarm_threads",
                                                                                          "protoswarm_stage"}),
    ("vector(1) + scalar(protoswarm_num_stages) # protoswarm_in_a_comment", {"protoswarm_num_stages"}),
])
def test_referenced_metrics(expr, expected):
    assert referenced_metrics(expr) == expected
