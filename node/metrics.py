"""How a node updates its Prometheus metrics, and the HTTP server for ``/metrics`` and ``/health``.

``NodeMetrics`` holds every metric as an attribute (the families, their names, help texts and labels,
are ``NodeMetricFamilies``' in node/metric_families.py) and adds what the node calls to update them;
``MetricsServer`` serves it from the first moments of the process, before the swarm is joined (DESIGN
§5). docs/metrics.md lists every metric; tests/unit/test_node_metrics.py fails when the table and the
served families disagree.

Importing this module is cheap (no torch), so the daemon can serve metrics before it loads a model.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, generate_latest

from node.metric_families import (
    BAN_PLACES,
    BOOTSTRAP_STATES,
    DHT_OPS,
    DOWNLOAD_RESULTS,
    DROP_REASONS,
    EVAL_RESULTS,
    MICROBATCH_RESULTS,
    PIPELINE_DIRECTIONS,
    PIPELINE_PHASES,
    PIPELINE_WAYS,
    REFUSAL_CODES,
    REJECT_REASONS,
    STATES,
    WIRE_CODECS,
    NodeMetricFamilies,
)
from protocol.errors import ERROR_CODES

logger = logging.getLogger(__name__)

DEFAULT_METRICS_PORT = 9464


def _bounded(value: str, allowed: tuple[str, ...]) -> str:
    """Label values may come from peer data: anything unknown becomes "other" to bound cardinality."""
    return value if value in allowed else "other"


class NodeMetrics(NodeMetricFamilies):
    """Every metric of one node, in its own registry, and the calls that update them."""

    def __init__(self, *, peer_id: str = "", run_id: str = "", protocol: str = "") -> None:
        super().__init__(peer_id=peer_id, run_id=run_id, protocol=protocol)
        self._stage: int | None = None
        self._last_stage: int | None = None
        self._view_stages: set[str] = set()
        self._lock = threading.Lock()
        # Plain running totals for the live status line and the rates announced in stage records.
        self._totals = {"tokens": 0, "bytes_sent": 0, "bytes_received": 0}
        self.first_step_at: float | None = None  # unix time of this process's first optimizer step

    def set_info(self, *, peer_id: str | None = None, run_id: str | None = None,
                 protocol: str | None = None) -> None:
        """Fill in identity labels once known (the peer id exists only after the DHT starts)."""
        with self._lock:
            for key, value in (("peer_id", peer_id), ("run_id", run_id), ("protocol", protocol)):
                if value is not None:
                    self._info[key] = str(value)
            self.info.info(self._info)

    def set_state(self, state: str) -> None:
        """Set the node state, one of ``STATES``."""
        if state not in STATES:
            raise ValueError(f"unknown node state {state!r}; expected one of {STATES}")
        self._state = state

    def set_bootstrap_state(self, state: str) -> None:
        """Set the bootstrap state (one of ``BOOTSTRAP_STATES``); entering "bootstrapping" counts an attempt."""
        if state not in BOOTSTRAP_STATES:
            raise ValueError(f"unknown bootstrap state {state!r}; expected one of {BOOTSTRAP_STATES}")
        if state == "bootstrapping":
            self.bootstrap_attempts_total.inc()
        self._bootstrap_state = state

    def set_stage(self, stage: int | None) -> None:
        """Set the served stage (None = none). Moving to a stage other than the last one served counts."""
        with self._lock:
            if stage is not None and self._last_stage is not None and stage != self._last_stage:
                self.stage_changes_total.inc()
            if stage is not None:
                self._last_stage = stage
            self._stage = stage
            self.stage.set(-1 if stage is None else stage)

    def set_swarm_view(self, *, peers_known: int, stage_peers: Mapping[int, int],
                       stage_throughput: Mapping[int, float], tokens_per_second: float = 0.0,
                       loss: float = math.nan, val_loss: float = math.nan) -> None:
        """Publish this node's view of the swarm: peer count, peers and summed samples/s per stage, and the
        swarm's training tokens/s, loss and validation loss as announced in the records."""
        with self._lock:
            self.peers_known.set(peers_known)
            self.swarm_tokens.set(tokens_per_second)
            self.swarm_loss.set(loss)
            self.swarm_val_loss.set(val_loss)
            stages = {str(s) for s in (*stage_peers, *stage_throughput)}
            for stage in stages:
                self.stage_peers.labels(stage).set(stage_peers.get(int(stage), 0))
                self.stage_throughput.labels(stage).set(stage_throughput.get(int(stage), 0.0))
            for stage in self._view_stages - stages:
                self.stage_peers.remove(stage)
                self.stage_throughput.remove(stage)
            self._view_stages = stages

    @contextlib.contextmanager
    def time_dht(self, op: str) -> Iterator[None]:
        """Observe the latency (s) of a DHT ``op`` ("store" or "get"); an exception also counts a failure.

        An operation that reports failure by its return value (hivemind's ``store`` returns False)
        should be counted by the caller: ``metrics.dht_failures_total.labels(op="store").inc()``.
        Cancellation is neither observed nor counted: it says nothing about the DHT.
        """
        if op not in DHT_OPS:
            raise ValueError(f"unknown DHT op {op!r}; expected one of {DHT_OPS}")
        start = time.perf_counter()
        try:
            yield
        except Exception:
            self.dht_failures_total.labels(op).inc()
            self.dht_seconds.labels(op).observe(time.perf_counter() - start)
            raise
        self.dht_seconds.labels(op).observe(time.perf_counter() - start)

    def count_record_rejected(self, reason: str) -> None:
        """Count a DHT record rejected for ``reason`` (one of ``REJECT_REASONS``, else "other")."""
        self.records_rejected_total.labels(_bounded(reason, REJECT_REASONS)).inc()

    def count_protocol_error(self, code: str) -> None:
        """Count bad input from a peer by ``ProtocolError.code`` (unknown codes count as "other")."""
        self.protocol_errors_total.labels(_bounded(code, ERROR_CODES)).inc()

    def count_state_download(self, result: str) -> None:
        """Count one stage-state download by ``result`` (one of ``DOWNLOAD_RESULTS``, else "other")."""
        self.state_downloads_total.labels(_bounded(result, DOWNLOAD_RESULTS)).inc()

    def stepped(self, step: int) -> None:
        """An optimizer step of this node's stage finished (local training or a pipeline stage)."""
        self.train_step.set(step)
        if self.first_step_at is None:
            self.first_step_at = time.time()

    def record_train_step(self, *, step: int, loss: float, tokens: int, seconds: float = 0.0) -> None:
        """Record one finished local training step: its index, loss (nats/token), tokens and compute time."""
        self.train_compute_seconds_total.inc(seconds)
        self.stepped(step)
        self.train_loss.set(loss)
        self.train_tokens_total.inc(tokens)
        with self._lock:
            self._totals["tokens"] += tokens

    # pipeline (swarm.dataplane.PipelineEvents) -----------------------------------------------------------

    def pipeline_bytes(self, direction: str, way: str, codec: str, nbytes: int, dense_nbytes: int) -> None:
        direction, way = _bounded(direction, PIPELINE_DIRECTIONS), _bounded(way, PIPELINE_WAYS)
        self.pipeline_bytes_total.labels(direction, way, _bounded(codec, WIRE_CODECS)).inc(nbytes)
        self.pipeline_dense_bytes_total.labels(direction, way).inc(dense_nbytes)
        with self._lock:
            self._totals["bytes_sent" if way == "sent" else "bytes_received"] += nbytes
            if way == "sent":
                self._sent["bytes"] += nbytes
                self._sent["dense"] += dense_nbytes

    def pipeline_microbatch(self, result: str, tokens: int = 0) -> None:
        self.pipeline_microbatches_total.labels(_bounded(result, MICROBATCH_RESULTS)).inc()
        if tokens:
            self.pipeline_tokens_total.inc(tokens)
            with self._lock:
                self._totals["tokens"] += tokens

    def outer_bytes(self, sent: int, received: int) -> None:
        """Fragment-exchange bytes of one of this replica's rounds."""
        self.outer_bytes_total.labels("sent").inc(sent)
        self.outer_bytes_total.labels("received").inc(received)
        with self._lock:
            self._totals["bytes_sent"] += sent
            self._totals["bytes_received"] += received

    def watch_bans(self, where: str, source: Callable[[], Mapping[str, float]]) -> None:
        """Export the bans ``source()`` reports (peer → seconds left) as ``peer_banned_seconds{where}``."""
        self._ban_sources[_bounded(where, BAN_PLACES)] = source

    def banned(self) -> dict[str, dict[str, float]]:
        """Peers banned now, by where: for /health."""
        out = {}
        for where, source in list(self._ban_sources.items()):
            try:
                out[where] = {peer: round(left, 1) for peer, left in source().items()}
            except Exception:
                continue
        return out

    def totals(self) -> dict[str, int]:
        """Tokens trained (local steps and, on stage 0, completed microbatches) and pipeline + exchange bytes."""
        with self._lock:
            return dict(self._totals)

    def pipeline_refused(self, code: str) -> None:
        self.pipeline_refused_total.labels(_bounded(code, REFUSAL_CODES)).inc()

    def pipeline_dropped(self, reason: str) -> None:
        self.pipeline_dropped_total.labels(_bounded(reason, DROP_REASONS)).inc()

    def pipeline_hop(self, seconds: float) -> None:
        self.pipeline_hop_seconds.observe(seconds)

    def pipeline_compute(self, phase: str, seconds: float) -> None:
        self.pipeline_compute_seconds.labels(_bounded(phase, PIPELINE_PHASES)).observe(seconds)

    def pipeline_loss(self, loss: float, tokens: int) -> None:
        """The last stage's loss of one microbatch (nats/token) and the tokens it scored."""
        self.train_loss.set(loss)
        self.train_tokens_total.inc(tokens)

    def pipeline_eval(self, result: str) -> None:
        self.eval_microbatches_total.labels(_bounded(result, EVAL_RESULTS)).inc()

    def pipeline_val_loss(self, loss: float) -> None:
        """A validation measurement of this stage-0 driver (node/pipeline.py, swarm/dataplane/drive.py)."""
        self.val_loss.set(loss)

    def protocol_error(self, code: str) -> None:
        self.count_protocol_error(code)

    def health(self) -> dict[str, Any]:
        """A minimal health body, used when the server is given no ``health`` callable."""
        return {"state": self._state, "bootstrap_state": self._bootstrap_state, "stage": self._stage,
                "uptime_seconds": round(time.monotonic() - self._started, 3)}

    def render(self) -> bytes:
        """The registry in Prometheus text exposition format."""
        return generate_latest(self.registry)


class MetricsBindError(OSError):
    """The metrics server could not bind its address; the message says what to change."""


def _float_param(url: str, name: str) -> float | None:
    values = parse_qs(urlsplit(url).query).get(name)
    try:
        return float(values[0]) if values else None
    except ValueError:
        return None


def _losses_after(body: dict[str, Any], since: float | None) -> dict[str, Any]:
    """``/health?since=T``: only the losses scored after unix time T (pollers take just what is new)."""
    if since is None:
        return body
    for section in ("pipeline", "train"):
        part = body.get(section)
        if isinstance(part, dict) and "recent_losses" in part:
            body[section] = {**part, "recent_losses": [x for x in part["recent_losses"] if x[0] > since]}
    return body


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = 10.0  # seconds a client may take to send its request; a stuck one must not pin a thread

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        if path == "/metrics":
            try:
                body, status = self.server.metrics.render(), 200
            except Exception:
                logger.exception("rendering /metrics failed")
                body, status = b"metrics rendering failed\n", 500
            self._reply(status, body, CONTENT_TYPE_PLAIN_0_0_4 if status == 200 else "text/plain")
        elif path == "/health":
            try:
                since = _float_param(self.path, "since")
                body, status = json.dumps(_losses_after(self.server.health(), since), default=str).encode(), 200
            except Exception as exc:
                logger.exception("health callable failed")
                body, status = json.dumps({"status": "error", "error": repr(exc)}).encode(), 500
            self._reply(status, body, "application/json")
        else:
            self._reply(404, b"not found; try /metrics or /health\n", "text/plain")

    do_HEAD = do_GET

    def _reply(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("metrics http %s: " + format, self.address_string(), *args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True  # restart at once despite TIME_WAIT from earlier scrapes
    allow_reuse_port = False  # but never share a port with a live server

    def __init__(self, address: tuple[str, int], metrics: NodeMetrics,
                 health: Callable[[], dict[str, Any]]) -> None:
        self.metrics, self.health = metrics, health
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind does a reverse DNS lookup (getfqdn), which can stall startup.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])

    def handle_error(self, request: Any, client_address: Any) -> None:
        logger.debug("metrics http request from %s failed", client_address, exc_info=True)


class _Server6(_Server):
    address_family = socket.AF_INET6


class MetricsServer:
    """Serves ``/metrics`` (Prometheus text) and ``/health`` (JSON) from a daemon thread.

    ``health`` returns the JSON body of ``/health`` (status 200); if it raises, the reply is 500 with
    ``{"status": "error", "error": ...}`` and the server keeps running. ``port=0`` picks a free port.
    """

    def __init__(self, metrics: NodeMetrics, *, host: str = "127.0.0.1", port: int = DEFAULT_METRICS_PORT,
                 health: Callable[[], dict[str, Any]] | None = None) -> None:
        self.metrics, self.host, self._port = metrics, host, port
        self.health = health or metrics.health
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> MetricsServer:
        """Bind now and serve in the background; raise ``MetricsBindError`` if the address is unusable."""
        if self._server is not None:
            raise RuntimeError("MetricsServer.start() called twice")
        cls = _Server6 if ":" in self.host else _Server
        try:
            server = cls((self.host, self._port), self.metrics, self.health)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise MetricsBindError(f"metrics port {self._port} on {self.host} is in use — "
                                       "pass --metrics-port 0 or another port") from exc
            raise MetricsBindError(f"cannot serve metrics on {self.host}:{self._port}: {exc}") from exc
        self._server, self._port = server, int(server.server_address[1])
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name=f"metrics-http-{self._port}", daemon=True)
        self._thread.start()
        logger.info("serving metrics at %s/metrics and %s/health", self.url, self.url)
        return self

    def shutdown(self) -> None:
        """Stop serving and close the socket, releasing the port. Safe to call more than once."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join()

    @property
    def port(self) -> int:
        """The bound port once started (the requested one before)."""
        return self._port

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:9464``."""
        host = self.host or "0.0.0.0"
        return f"http://[{host}]:{self._port}" if ":" in host else f"http://{host}:{self._port}"

    def __enter__(self) -> MetricsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
