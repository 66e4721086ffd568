"""A real Prometheus server scraping a real localhost swarm that `node sim` started.

`node sim --prometheus-sd FILE` keeps FILE listing the live nodes' /metrics endpoints; Prometheus
(Debian's package: tests/prom_util.py) discovers them through ``file_sd_configs``. The assertions go
through Prometheus's HTTP API in PromQL: every node is scraped with ``up == 1``, training counters
grow, the swarm summary a node reads from the DHT covers the whole swarm, and every expression of the
Grafana dashboard evaluates against the live data.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from grafana_util import dashboard_exprs
from prom_util import PromServer, prometheus_tools

from swarm.sim.swarm import processes_mentioning

REPO = Path(__file__).resolve().parents[2]
NODES = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(predicate, timeout: float, what: str, log=None):
    """Poll ``predicate`` until it returns a truthy value; fail with ``what`` (and ``log()``) at the deadline."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
        except Exception as exc:  # Prometheus not there yet, a query error: report the last one
            last = exc
        else:
            if last:
                return last
        time.sleep(1.0)
    pytest.fail(f"{what} within {timeout:.0f} s (last: {last!r})" + (f"\n{log()}" if log else ""))


@pytest.fixture(scope="module")
def tools():
    found = prometheus_tools()
    if isinstance(found, str):
        pytest.skip(found)
    return found


def _prometheus_config(tools, tmp_path: Path, sd: Path) -> Path:
    """A Prometheus config that scrapes every second whatever ``sd`` lists, checked by promtool."""
    config = tmp_path / "prometheus.yml"
    config.write_text(json.dumps({  # JSON is YAML
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "protoswarm",
                            "file_sd_configs": [{"files": [str(sd)], "refresh_interval": "1s"}]}],
    }))
    check = subprocess.run([str(tools.promtool), "check", "config", str(config)], capture_output=True, text=True,
                           timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    return config


def _start_sim(sd: Path, workdir: Path, log) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "node.cli", "--log-level", "WARNING", "sim", "--nodes", str(NODES),
         "--duration", "300", "--set", "swarm.refresh_s=1", "--set", "swarm.expiry_s=5",
         "--prometheus-sd", str(sd), "--workdir", str(workdir)],
        stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
    )


def _stop_sim(sim: subprocess.Popen, workdir: Path) -> list[int]:
    """SIGTERM the sim (it shuts its nodes down gracefully); the processes it left behind, killed."""
    if sim.poll() is None:
        sim.send_signal(signal.SIGTERM)
        try:
            sim.wait(120)
        except subprocess.TimeoutExpired:
            sim.kill()
            sim.wait(30)
    leftover = processes_mentioning(str(workdir))  # the sim must have reaped its nodes...
    for pid in leftover:  # ...but never leave them running for the rest of the suite
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    return leftover


def _assert_every_node_scraped(prom: PromServer, sd: Path, sim_output) -> None:
    """Discovery: the sim lists every node, Prometheus scrapes each of them successfully."""
    _wait(lambda: sd.exists() and len(json.loads(sd.read_text())) == NODES, 180,
          f"node sim listing {NODES} targets in {sd}", sim_output)
    targets = _wait(lambda: (t := [a for a in prom.api("targets")["activeTargets"] if a["health"] == "up"])
                    and len(t) == NODES and t, 60, f"{NODES} healthy targets", sim_output)
    listed = {g["targets"][0] for g in json.loads(sd.read_text())}
    assert {t["labels"]["instance"] for t in targets} == listed
    up = prom.query('up{job="protoswarm"}')
    assert len(up) == NODES and all(float(s["value"][1]) == 1.0 for s in up), up
    assert {s["metric"]["node"] for s in up} == {str(i) for i in range(NODES)}  # labels from the sd file


def _assert_training_counters_grow(prom: PromServer, sim_output) -> None:
    """Training counters increase on every node, as Prometheus sees them."""
    _wait(lambda: len(prom.query("rate(protoswarm_train_tokens_total[10s]) > 0")) == NODES, 180,
          "tokens/s > 0 on every node", sim_output)
    before = {s["metric"]["instance"]: float(s["value"][1]) for s in prom.query("protoswarm_train_tokens_total")}
    _wait(lambda: all(float(s["value"][1]) > before[s["metric"]["instance"]]
                      for s in prom.query("protoswarm_train_tokens_total")), 60,
          "train_tokens_total growing between two scrapes", sim_output)
    assert all(int(float(s["value"][1])) >= 1 for s in prom.query("protoswarm_train_step"))
    assert all(float(s["value"][1]) == 1 for s in prom.query('protoswarm_state{state="online"}'))


def _assert_summary_covers_the_swarm(prom: PromServer, sim_output) -> None:
    """One scrape target shows the whole swarm: each node's DHT-read summary counts every peer,
    and the swarm's tokens/s it reports is the sum of the nodes' own announced rates."""
    _wait(lambda: len(prom.query(f'protoswarm_stage_peers{{stage="0"}} == {NODES}')) == NODES, 60,
          f"every node seeing {NODES} peers on stage 0", sim_output)
    _wait(lambda: len(prom.query("protoswarm_swarm_tokens_per_second > 0")) == NODES, 60,
          "every node reporting the swarm's tokens/s", sim_output)
    swarm_rate = prom.query("max(protoswarm_swarm_tokens_per_second)")[0]["value"][1]
    node_rate = prom.query("sum(rate(protoswarm_train_tokens_total[30s]))")[0]["value"][1]
    # Two estimates of one rate (30 s windows, taken at different moments): same order of magnitude.
    assert 0.2 < float(swarm_rate) / float(node_rate) < 5, (swarm_rate, node_rate)
    loss = [float(s["value"][1]) for s in prom.query("protoswarm_swarm_loss")]
    assert loss and all(math.isfinite(v) and 0 < v < 20 for v in loss), loss


def _assert_dashboard_evaluates(prom: PromServer) -> None:
    """Every expression of the Grafana dashboard runs against the live data; the core panels have some."""
    failures = {}
    empty = []
    for name, expr in dashboard_exprs().items():
        try:
            if not prom.query(expr):
                empty.append(name)
        except Exception as exc:
            failures[name] = f"{expr}: {exc}"
    assert not failures, failures
    for needed in ("protoswarm_stage_peers", "protoswarm_swarm_tokens_per_second", "protoswarm_train_loss"):
        assert any(needed in expr and name not in empty for name, expr in dashboard_exprs().items()), \
            (needed, empty)


@pytest.mark.timeout(480)
def test_prometheus_scrapes_every_node_of_a_sim_swarm(tools, tmp_path):
    sd = tmp_path / "targets.json"
    config = _prometheus_config(tools, tmp_path, sd)
    workdir = tmp_path / "sim"
    sim_log = tmp_path / "sim.log"
    with PromServer(tools.prometheus, config, tmp_path / "prom", _free_port()) as prom, open(sim_log, "w") as log:
        sim = _start_sim(sd, workdir, log)

        def sim_output() -> str:
            return sim_log.read_text()[-3000:] + "\nprometheus:\n" + prom.log.read_text()[-1500:]

        try:
            _assert_every_node_scraped(prom, sd, sim_output)
            _assert_training_counters_grow(prom, sim_output)
            _assert_summary_covers_the_swarm(prom, sim_output)
            _assert_dashboard_evaluates(prom)
        finally:
            leftover = _stop_sim(sim, workdir)
    assert json.loads(sd.read_text()) == [], "the sim leaves an empty target list when its nodes are gone"
    assert leftover == [], "node sim left processes behind after SIGTERM"
