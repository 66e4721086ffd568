"""Node metrics over real HTTP on 127.0.0.1: docs/metrics.md and the served families agree, updates show
up as label values, /health and its failures, isolation between nodes, and the port lifecycle."""

from __future__ import annotations

import json
import math
import re
import socket
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families

from node.metrics import MetricsBindError, MetricsServer, NodeMetrics
from protocol.admission import Admission

DOCS = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"


def _get(url: str) -> tuple[int, str, bytes]:
    """Status, content type and body of a GET; HTTP errors are answers too."""
    try:
        with urllib.request.urlopen(url, timeout=10) as reply:
            return reply.status, reply.headers["Content-Type"], reply.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.headers["Content-Type"], exc.read()


def _scrape(server: MetricsServer) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample served at /metrics, keyed by (sample name, labels)."""
    status, content_type, body = _get(server.url + "/metrics")
    assert status == 200 and content_type.startswith("text/plain")
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


def _value(samples: dict, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def _documented_names() -> set[str]:
    names = set(re.findall(r"^\|\s*`(protoswarm_[a-z0-9_]+)`", DOCS.read_text(), flags=re.MULTILINE))
    assert len(names) > 20, "the metrics table in docs/metrics.md was not found"
    return names


@pytest.fixture
def serve() -> Iterator[Callable[..., MetricsServer]]:
    """Start a MetricsServer on 127.0.0.1 (free port unless told); every one is shut down afterwards."""
    servers: list[MetricsServer] = []

    def start(metrics: NodeMetrics | None = None, **kwargs: Any) -> MetricsServer:
        kwargs.setdefault("port", 0)
        server = MetricsServer(metrics or NodeMetrics(), host="127.0.0.1", **kwargs)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.shutdown()


def test_served_families_match_the_documented_table(serve):
    Admission("protoswarm.test.v1")  # a handler's admission: its refusal counters are served from 0
    server = serve()
    _, _, body = _get(server.url + "/metrics")
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    served = set(families) | {s.name for f in families.values() for s in f.samples}
    documented = _documented_names()
    if not Path("/proc/self/stat").exists():  # ProcessCollector reads /proc (Linux only)
        documented = {n for n in documented if not n.startswith("protoswarm_process_")}
    assert documented - served == set(), "documented in docs/metrics.md but not served"
    undocumented = {
        name for name in families
        if name.startswith("protoswarm_")
        and not {name, name + "_total", name.removesuffix("_created"),
                 name.removesuffix("_created") + "_total"} & documented
    }
    assert undocumented == set(), "served but missing from the table in docs/metrics.md"
    assert all(name.startswith("protoswarm_") for name in families)


def _documented_rows() -> dict[str, tuple[str, set[str], str]]:
    """name → (type, label names, unit) from the table in docs/metrics.md."""
    rows = {}
    for line in DOCS.read_text().splitlines():
        match = re.match(r"\|\s*`(protoswarm_\w+)`\s*\|([^|]+)\|([^|]+)\|([^|]+)\|", line)
        if match:
            name, kind, labels, unit = (g.strip() for g in match.groups())
            rows[name] = (kind.split()[0], set(re.findall(r"`(\w+)`", labels)), unit)
    return rows


def test_documented_types_labels_and_names_follow_prometheus_conventions(serve):
    """Types and label names in the table are the served ones; names carry their unit and type suffixes;
    no label can grow with the number of peers except the one-series-per-node info metric."""
    metrics = NodeMetrics()
    metrics.watch_bans("pipeline", lambda: {"QmOffender": 30.0})  # so the collector-made family has a sample
    Admission("protoswarm.test.v1")  # ... and this one
    _, _, body = _get(serve(metrics).url + "/metrics")
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    # Label names as declared (children may not exist yet): prometheus_client keeps them on the wrapper.
    declared = {m._name: set(m._labelnames) for m in vars(metrics).values() if isinstance(m, MetricWrapperBase)}
    assert "protoswarm_stage_peers" in declared
    rows = _documented_rows()
    assert len(rows) == len(_documented_names())
    for name, (kind, labels, unit) in rows.items():
        family = families.get(name) or families.get(name.removesuffix("_total"))
        if family is None:
            continue  # /proc-only metrics on other systems; existence is the test above
        assert family.type == {"info": "gauge"}.get(kind, kind), (name, family.type, kind)  # info: a gauge of 1
        if kind != "info":
            served = declared.get(name.removesuffix("_total"))
            if served is None:  # made by a custom collector: its samples carry the label names
                served = {k for s in family.samples for k in s.labels}
            assert served == labels, (name, served, labels)
        if kind == "counter":
            assert name.endswith("_total"), name
        if unit.split()[0] == "s":
            assert "_seconds" in name, name
        if unit == "bytes":
            assert "_bytes" in name, name
        if name not in ("protoswarm_node_info", "protoswarm_peer_banned_seconds"):  # both bounded (docs)
            assert not {"peer", "peer_id", "instance", "addr"} & labels, (name, labels)


def test_banned_peers_are_shown_bounded_and_vanish_with_their_bans(serve):
    metrics = NodeMetrics()
    bans = {f"QmPeer{i:03d}": float(i + 1) for i in range(100)}
    metrics.watch_bans("exchange", lambda: dict(bans))
    metrics.watch_bans("state", lambda: 1 / 0)  # a broken source is skipped, not fatal to the scrape
    samples = _scrape(serve(metrics))
    banned = {dict(labels)["peer_id"]: v for (name, labels), v in samples.items()
              if name == "protoswarm_peer_banned_seconds"}
    assert len(banned) == 32 and min(banned.values()) == 69.0  # the 32 longest bans
    assert all(dict(labels)["where"] == "exchange" for (name, labels) in samples if name == "protoswarm_peer_banned_seconds")
    bans.clear()
    assert not [k for k in _scrape(serve(metrics)) if k[0] == "protoswarm_peer_banned_seconds"]
    assert metrics.banned() == {"exchange": {}}


def test_updates_show_up_as_label_values(serve):
    metrics = NodeMetrics()
    server = serve(metrics)
    before = _scrape(server)
    assert _value(before, "protoswarm_state", state="starting") == 1
    assert _value(before, "protoswarm_stage") == -1
    assert math.isnan(_value(before, "protoswarm_train_loss"))
    assert _value(before, "protoswarm_protocol_errors_total", code="non_finite") == 0

    metrics.set_info(peer_id="QmPeer", run_id="run-7", protocol="1.0")
    metrics.set_state("online")
    for state in ("bootstrapping", "retrying", "bootstrapping", "online"):
        metrics.set_bootstrap_state(state)
    for stage in (None, 2, None, 2, 0):
        metrics.set_stage(stage)
    metrics.set_swarm_view(peers_known=5, stage_peers={0: 3, 1: 1, 2: 1}, stage_throughput={0: 7.5, 1: 2.0})
    metrics.set_swarm_view(peers_known=4, stage_peers={0: 3, 1: 1}, stage_throughput={0: 7.5, 1: 2.0})
    with metrics.time_dht("store"):
        pass
    with pytest.raises(TimeoutError), metrics.time_dht("get"):
        raise TimeoutError("dht get timed out")
    metrics.count_record_rejected("bad_signature")
    metrics.count_record_rejected("a reason a peer made up")
    metrics.count_protocol_error("non_finite")
    metrics.count_protocol_error("\x00weird")
    metrics.count_state_download("ok")
    metrics.record_train_step(step=12, loss=3.25, tokens=512)
    metrics.record_train_step(step=13, loss=3.0, tokens=512)

    after = _scrape(server)
    info = {"peer_id": "QmPeer", "run_id": "run-7", "protocol": "1.0"}
    info_series = [dict(labels) for name, labels in after if name == "protoswarm_node_info"]
    assert len(info_series) == 1 and info_series[0].items() >= info.items()
    assert _value(after, "protoswarm_state", state="online") == 1
    assert sum(v for (name, _), v in after.items() if name == "protoswarm_state") == 1
    assert _value(after, "protoswarm_bootstrap_state", state="online") == 1
    assert _value(after, "protoswarm_bootstrap_attempts_total") == 2
    assert _value(after, "protoswarm_stage") == 0
    assert _value(after, "protoswarm_stage_changes_total") == 1  # 2 → 0; leaving and coming back is not
    assert _value(after, "protoswarm_peers_known") == 4
    assert _value(after, "protoswarm_stage_peers", stage="0") == 3
    assert _value(after, "protoswarm_stage_throughput_samples_per_second", stage="0") == 7.5
    assert ("protoswarm_stage_peers", frozenset({("stage", "2")})) not in after  # stale stage removed
    assert _value(after, "protoswarm_dht_seconds_count", op="store") == 1
    assert _value(after, "protoswarm_dht_seconds_count", op="get") == 1
    assert _value(after, "protoswarm_dht_failures_total", op="get") == 1
    assert _value(after, "protoswarm_dht_failures_total", op="store") == 0
    assert _value(after, "protoswarm_records_rejected_total", reason="bad_signature") == 1
    assert _value(after, "protoswarm_records_rejected_total", reason="other") == 1
    assert _value(after, "protoswarm_protocol_errors_total", code="non_finite") == 1
    assert _value(after, "protoswarm_protocol_errors_total", code="other") == 1
    assert _value(after, "protoswarm_state_downloads_total", result="ok") == 1
    assert _value(after, "protoswarm_train_step") == 13
    assert _value(after, "protoswarm_train_loss") == 3.0
    assert _value(after, "protoswarm_train_tokens_total") == 1024
    assert _value(after, "protoswarm_uptime_seconds") >= _value(before, "protoswarm_uptime_seconds")
    assert _value(after, "protoswarm_threads") >= 2  # this one and the server's


def test_unknown_names_from_our_own_code_raise():
    metrics = NodeMetrics()
    with pytest.raises(ValueError, match="node state"):
        metrics.set_state("ONLINE")
    with pytest.raises(ValueError, match="bootstrap state"):
        metrics.set_bootstrap_state("done")
    with pytest.raises(ValueError, match="DHT op"), metrics.time_dht("delete"):
        pass


def test_health_returns_the_callables_json(serve):
    server = serve(health=lambda: {"state": "joining", "bootstrap_state": "retrying", "peers": 3})
    status, content_type, body = _get(server.url + "/health")
    assert (status, content_type) == (200, "application/json")
    assert json.loads(body) == {"state": "joining", "bootstrap_state": "retrying", "peers": 3}

    metrics = NodeMetrics()
    metrics.set_bootstrap_state("bootstrapping")
    status, _, body = _get(serve(metrics).url + "/health?verbose=1")
    assert status == 200
    assert json.loads(body).items() >= {"state": "starting", "bootstrap_state": "bootstrapping"}.items()


def test_health_failure_is_a_500_and_the_server_survives(serve):
    def broken() -> dict:
        raise RuntimeError("daemon lock poisoned")

    server = serve(health=broken)
    status, content_type, body = _get(server.url + "/health")
    assert (status, content_type) == (500, "application/json")
    reply = json.loads(body)
    assert reply["status"] == "error" and "daemon lock poisoned" in reply["error"]
    assert _get(server.url + "/metrics")[0] == 200
    assert _get(server.url + "/health")[0] == 500


def test_other_paths_are_404(serve):
    server = serve()
    for path in ("/", "/metrics/extra", "/healthz", "/favicon.ico"):
        assert _get(server.url + path)[0] == 404


def test_two_nodes_in_one_process_do_not_share_metrics(serve):
    first, second = NodeMetrics(), NodeMetrics()
    server_a, server_b = serve(first), serve(second)
    assert server_a.port != server_b.port
    first.set_state("online")
    first.peers_known.set(9)
    a, b = _scrape(server_a), _scrape(server_b)
    assert _value(a, "protoswarm_state", state="online") == 1
    assert _value(b, "protoswarm_state", state="starting") == 1
    assert (_value(a, "protoswarm_peers_known"), _value(b, "protoswarm_peers_known")) == (9, 0)


def test_shutdown_releases_the_port(serve):
    first = serve()
    port = first.port
    assert port != 0 and first.url == f"http://127.0.0.1:{port}"
    assert _get(first.url + "/metrics")[0] == 200  # leaves a connection in TIME_WAIT
    first.shutdown()
    first.shutdown()  # idempotent
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(first.url + "/metrics", timeout=10)
    second = serve(port=port)
    assert second.port == port and _get(second.url + "/metrics")[0] == 200


def test_a_taken_port_gives_a_clear_error(serve):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(MetricsBindError, match=rf"metrics port {port} on 127.0.0.1 is in use.*--metrics-port"):
            serve(port=port)


def test_drop_reasons_and_refusal_codes_are_the_data_planes() -> None:
    from node import metric_families
    from swarm.dataplane import DROP_REASONS, REFUSAL_CODES

    assert metric_families.DROP_REASONS == (*DROP_REASONS, "other")
    assert set(metric_families.REFUSAL_CODES) == {*REFUSAL_CODES, "other"}
