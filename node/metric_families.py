"""The Prometheus families of one node: every metric's name, help text, labels and buckets.

``NodeMetricFamilies`` creates them in a private ``CollectorRegistry`` (never the global one, so
several nodes and tests can share a process), grouped by what they watch: the node itself, the swarm
and its DHT, local training, the pipeline, DiLoCo rounds and state downloads. Every known value of a
fixed label set has its child from the start, so ``rate()`` sees a 0 first. The gauges read at scrape
time read the state fields set up here (``_state``, ``_bootstrap_state``, ``_sent``, ``_ban_sources``);
``NodeMetrics`` (node/metrics.py) is the subclass that updates the families and those fields.

docs/metrics.md lists every family; tests/unit/test_node_metrics.py fails when the table and the
families served disagree, so a new metric is one attribute in the group it belongs to here plus one
row in that table. Importing this module is cheap (no torch).
"""

from __future__ import annotations

import importlib.metadata
import math
import threading
import time
from collections.abc import Callable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from protocol.admission import REFUSED
from protocol.errors import ERROR_CODES

NAMESPACE = "protoswarm"
STATES = ("starting", "joining", "online", "offline")
BOOTSTRAP_STATES = ("starting", "bootstrapping", "online", "retrying", "failed")
DHT_OPS = ("store", "get")
BAN_PLACES = ("pipeline", "exchange", "state", "admission", "other")  # where a peer earned its ban
MAX_BANNED_SERIES = 32
REJECT_REASONS = (  # swarm.records.REJECT_REASONS, plus "expired" and "other"
    "malformed", "unsigned", "bad_signature", "wrong_owner", "wrong_kind", "foreign", "future", "version", "expired",
    "access", "other",
)
DOWNLOAD_RESULTS = ("ok", "hash_mismatch", "failed", "other")
MICROBATCH_RESULTS = ("ok", "dropped", "retried")
EVAL_RESULTS = ("ok", "failed")
PIPELINE_DIRECTIONS = ("forward", "backward")
PIPELINE_WAYS = ("sent", "received")
PIPELINE_PHASES = ("forward", "backward", "step")
BUILTIN_WIRE_CODECS = ("fp32", "bf16", "fp16", "int8", "e3m0", "int2", "topk")
WIRE_CODECS = (*BUILTIN_WIRE_CODECS, "hivemind-float16", "hivemind-uniform8bit")
REFUSAL_CODES = (  # swarm.dataplane.REFUSAL_CODES plus "other"
    "wrong_run", "wrong_stage", "basis", "shape", "route", "unknown_microbatch", "duplicate", "busy",
    "banned", "downstream", "expired", "no_stage", "bad_reply", "loss", "outlier", "no_route", "flood",
    "rate_limited", "other",
)
DROP_REASONS = (  # swarm.dataplane.DROP_REASONS plus "other"
    "deadline", "no_route", "refused", "peer_lost", "stage_moved", "downstream", "error", "other",
)
OUTER_REJECT_REASONS = ("non_finite", "shape", "norm")
OUTER_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)
# From 1 ms (one tiny stage on a fast machine) to 60 s (a whole pipeline round trip under load).
PIPELINE_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# From 1 ms (a local store) to 30 s (a get that waits out hivemind's timeouts).
DHT_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class NodeMetricFamilies:
    """Every metric family of one node, in its own registry. Attributes are prometheus_client metric objects."""

    def __init__(self, *, peer_id: str = "", run_id: str = "", protocol: str = "") -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._started = time.monotonic()
        self._state = "starting"
        self._bootstrap_state = "starting"
        self._sent = {"bytes": 0, "dense": 0}  # pipeline frames sent: actual and dense-bf16 bytes
        # Peers banned now, by where (bounded: MAX_BANNED_SERIES series at most, gone when the ban ends).
        self._ban_sources: dict[str, Callable[[], Mapping[str, float]]] = {}
        self._define_node(peer_id=peer_id, run_id=run_id, protocol=protocol)
        self._define_swarm()
        self._define_training()
        self._define_pipeline()
        self._define_outer()
        self.registry.register(_BannedPeers(self))
        self.registry.register(_AdmissionRefusals())

    def _gauge(self, name: str, doc: str, labels: tuple[str, ...] = ()) -> Gauge:
        return Gauge(name, doc, labels, namespace=NAMESPACE, registry=self.registry)

    def _counter(self, name: str, doc: str, label: str | None = None, values: tuple[str, ...] = ()) -> Counter:
        metric = Counter(name, doc, (label,) if label else (), namespace=NAMESPACE, registry=self.registry)
        for value in values:  # every known child exists from the start, so rate() sees a 0 first
            metric.labels(value)
        return metric

    def _define_node(self, *, peer_id: str, run_id: str, protocol: str) -> None:
        """Identity, process, state and stage."""
        gauge, counter = self._gauge, self._counter
        self.info = Info("node", "Identity of this node: peer id, run id, package and protocol version.",
                         namespace=NAMESPACE, registry=self.registry)
        try:
            version = importlib.metadata.version("protoswarm")
        except importlib.metadata.PackageNotFoundError:
            version = "unknown"
        self._info = {"peer_id": peer_id, "run_id": run_id, "version": version, "protocol": protocol}
        self.info.info(self._info)
        self.uptime_seconds = gauge("uptime_seconds", "Seconds since this node's metrics were created.")
        self.uptime_seconds.set_function(lambda: time.monotonic() - self._started)
        self.threads = gauge("threads", "Live Python threads in the node process.")
        self.threads.set_function(threading.active_count)
        ProcessCollector(namespace=NAMESPACE, registry=self.registry)

        self.stage = gauge("stage", "Pipeline stage this node serves; -1 while it serves none.")
        self.stage.set(-1)
        self.num_stages = gauge("num_stages", "Number of pipeline stages in the run.")
        self.state = gauge("state", "1 for the node's current state, 0 for the others.", ("state",))
        self.bootstrap_state = gauge("bootstrap_state", "1 for the current bootstrap state.", ("state",))
        # Read one attribute at scrape time, so a scrape never sees two states at 1 (or none).
        for name in STATES:
            self.state.labels(name).set_function(lambda name=name: float(self._state == name))
        for name in BOOTSTRAP_STATES:
            self.bootstrap_state.labels(name).set_function(
                lambda name=name: float(self._bootstrap_state == name))
        self.bootstrap_attempts_total = counter("bootstrap_attempts", "Attempts to join the swarm's DHT.")
        self.stage_changes_total = counter("stage_changes", "Times this node moved to a different stage.")

    def _define_swarm(self) -> None:
        """This node's view of the swarm, its DHT, and what peers sent that was refused."""
        gauge, counter = self._gauge, self._counter
        self.peers_known = gauge("peers_known", "Distinct peers in this node's view of the swarm.")
        self.stage_peers = gauge("stage_peers", "Peers announcing each stage.", ("stage",))
        self.stage_throughput = gauge("stage_throughput_samples_per_second",
                                      "Summed announced throughput of each stage (samples/s).", ("stage",))
        self.throughput = gauge("throughput_samples_per_second", "This node's measured throughput (samples/s).")
        self.swarm_tokens = gauge("swarm_tokens_per_second",
                                  "Training tokens/s of the whole swarm: the sum of the live rates in the stage records.")
        self.swarm_loss = gauge("swarm_loss", "Mean recent training loss announced by the swarm's loss-scoring nodes.")
        self.swarm_loss.set(math.nan)
        self.swarm_val_loss = gauge("swarm_val_loss", "The swarm's validation loss on the agreed weights: the newest "
                                    "measurement a stage-0 driver announced in the records (nats/token).")
        self.swarm_val_loss.set(math.nan)

        self.dht_seconds = Histogram("dht_seconds", "Latency of DHT operations (s), failed ones included.",
                                     ("op",), namespace=NAMESPACE, registry=self.registry,
                                     buckets=DHT_BUCKETS_S)
        for op in DHT_OPS:
            self.dht_seconds.labels(op)
        self.dht_failures_total = counter("dht_failures", "DHT operations that raised or reported failure.",
                                          "op", DHT_OPS)
        self.records_rejected_total = counter("records_rejected", "Stage records from the DHT rejected.",
                                              "reason", REJECT_REASONS)
        self.access_denied_total = counter("access_denied", "Streams from peers outside the allow-list, closed "
                                           "unread, and calls to them refused.")
        self.protocol_errors_total = counter("protocol_errors", "Bad input from peers, by error code.",
                                             "code", (*ERROR_CODES, "other"))
        self.state_downloads_total = counter("state_downloads", "Stage state downloads, by result.",
                                             "result", DOWNLOAD_RESULTS)

    def _define_training(self) -> None:
        """Local training steps."""
        self.train_step = self._gauge("train_step", "Last local training step completed.")
        self.train_loss = self._gauge("train_loss", "Training loss of the last step (nats/token); NaN before one.")
        self.train_loss.set(float("nan"))
        self.train_tokens_total = self._counter("train_tokens", "Tokens trained on by this node.")
        self.train_compute_seconds_total = self._counter(
            "train_compute_seconds", "Wall time inside local training steps (forward, backward, optimizer step), S = 1.")

    def _define_pipeline(self) -> None:
        """Microbatches, frames and their bytes, refusals, hop and compute times of the pipeline."""
        counter = self._counter
        self.pipeline_microbatches_total = counter(
            "pipeline_microbatches", "Microbatches a stage-0 node drove: completed, dropped, and retries "
            "of a hop on another replica.", "result", MICROBATCH_RESULTS)
        self.eval_microbatches_total = counter(
            "eval_microbatches", "Validation microbatches a stage-0 node sent through the pipeline (forward only, "
            "agreed weights): scored, or failed (the measurement is abandoned).", "result", EVAL_RESULTS)
        self.val_loss = self._gauge("val_loss", "This stage-0 node's latest measurement of the swarm's validation "
                                    "loss on the agreed weights (nats/token); NaN before one.")
        self.val_loss.set(math.nan)
        self.pipeline_tokens_total = counter("pipeline_tokens", "Tokens of the microbatches this stage-0 node "
                                             "completed through the whole pipeline.")
        self.pipeline_bytes_total = Counter(
            "pipeline_bytes", "Pipeline frame bytes (framing included) by direction (forward: activations, "
            "backward: gradients), way and codec.", ("direction", "way", "codec"),
            namespace=NAMESPACE, registry=self.registry)
        self.pipeline_dense_bytes_total = Counter(
            "pipeline_dense_bytes", "What the same pipeline frames would weigh with dense bf16 boundaries "
            "(d values a token).", ("direction", "way"), namespace=NAMESPACE, registry=self.registry)
        for direction in PIPELINE_DIRECTIONS:
            for way in PIPELINE_WAYS:
                self.pipeline_dense_bytes_total.labels(direction, way)
                for codec in BUILTIN_WIRE_CODECS:
                    self.pipeline_bytes_total.labels(direction, way, codec)
        self.pipeline_compression_ratio = self._gauge(
            "pipeline_compression_ratio", "Dense-bf16 bytes over actual bytes of the pipeline frames this node "
            "sent; NaN before the first.")
        self.pipeline_compression_ratio.set_function(
            lambda: self._sent["dense"] / self._sent["bytes"] if self._sent["bytes"] else float("nan"))
        self.pipeline_refused_total = counter("pipeline_refused", "Pipeline frames this node refused, by reason.",
                                              "code", REFUSAL_CODES)
        self.pipeline_dropped_total = counter(
            "pipeline_dropped", "Microbatches a stage-0 node dropped, by why (every dropped one has one reason).",
            "reason", DROP_REASONS)
        self.pipeline_hop_seconds = Histogram(
            "pipeline_hop_seconds", "Round trip of one hop to the next stage: its forward, the rest of the "
            "pipeline and the gradient back.", namespace=NAMESPACE, registry=self.registry,
            buckets=PIPELINE_BUCKETS_S)
        self.pipeline_compute_seconds = Histogram(
            "pipeline_compute_seconds", "Compute time of this stage's jobs, by phase.", ("phase",),
            namespace=NAMESPACE, registry=self.registry, buckets=PIPELINE_BUCKETS_S)
        for phase in PIPELINE_PHASES:
            self.pipeline_compute_seconds.labels(phase)

    def _define_outer(self) -> None:
        """Streaming DiLoCo rounds of this replica, state downloads, and the stage's queues."""
        gauge, counter = self._gauge, self._counter
        self.outer_rounds_total = Counter(
            "outer_rounds", "Streaming DiLoCo fragment rounds of this replica, by fragment: started, committed (the "
            "mean was applied), skipped (no mean: the exchange failed or timed out), missed (boundaries jumped over).",
            ("fragment", "result"), namespace=NAMESPACE, registry=self.registry)
        for result in ("started", "committed", "skipped", "missed"):  # fragment 0 always exists
            self.outer_rounds_total.labels("0", result)
        self.outer_round_seconds = Histogram(
            "outer_round_seconds", "From a fragment's boundary to its mean being applied or given up (s).",
            namespace=NAMESPACE, registry=self.registry, buckets=OUTER_BUCKETS_S)
        self.outer_bytes_total = counter("outer_bytes", "Fragment exchange bytes of this replica's rounds (framing "
                                         "included), by way.", "way", PIPELINE_WAYS)
        self.outer_group_size = gauge("outer_group_size", "Replicas averaged in this replica's last committed round.")
        self.outer_rounds_alone_total = counter(
            "outer_rounds_alone", "Committed rounds whose mean held only this replica's own part (no other "
            "replica's part arrived in time: nothing was averaged).")
        self.outer_epoch = gauge("outer_epoch", "Sync boundaries this replica has passed (the shared schedule).")
        self.outer_lag_epochs = gauge("outer_lag_epochs", "How many boundaries the furthest replica of this "
                                      "stage is ahead of this one.")
        self.outer_wait_seconds_total = counter(
            "outer_wait_seconds", "Time training stood still waiting for a fragment's mean (diloco.blocking).")
        self.outer_parts_rejected_total = counter(
            "outer_parts_rejected", "Replicas' parts this node, as group leader, left out of an average.",
            "reason", OUTER_REJECT_REASONS)
        self.state_download_bytes_total = counter("state_download_bytes", "Bytes of stage state (weights and "
                                                  "outer state) received and verified, failed attempts included.")
        self.state_download_kept_bytes_total = counter(
            "state_download_kept_bytes", "Bytes of stage state taken from verified chunks kept on disk instead of "
            "fetched again (a resumed download).")
        self.state_download_seconds = Histogram(
            "state_download_seconds", "Duration of successful stage state downloads (s).", namespace=NAMESPACE,
            registry=self.registry, buckets=OUTER_BUCKETS_S)
        self.state_download_done_bytes = gauge("state_download_done_bytes", "Verified bytes of the stage-state "
                                               "download in progress (from disk and fetched); 0 when none.")
        self.state_download_size_bytes = gauge("state_download_size_bytes",
                                               "Size of the stage state being downloaded; 0 when none.")
        self.state_download_eta_seconds = gauge("state_download_eta_seconds", "Seconds the download in progress "
                                                "still needs at its measured rate; NaN when none or not known yet.")
        self.state_download_eta_seconds.set(math.nan)
        self.download = DownloadWatch(self)
        self.pipeline_queue_depth = gauge("pipeline_queue_depth", "Forward/backward jobs queued on this stage.")
        self.pipeline_stash = gauge("pipeline_stash", "Microbatches this stage holds awaiting their backward.")


class DownloadWatch:
    """The stage-state download in progress, from its ``swarm.transfer_pace.TransferProgress``: the view
    for /health and the status line, the gauges, and the byte counters (by difference, so the bytes of
    a failed attempt count too)."""

    def __init__(self, metrics: NodeMetricFamilies):
        self.metrics = metrics
        self._lock = threading.Lock()
        self._attempt: object | None = None
        self._counted = (0, 0)  # (fetched, kept) of the attempt already counted
        self._view: dict | None = None

    def update(self, progress) -> None:
        m = self.metrics
        with self._lock:
            if progress is not self._attempt:
                self._attempt, self._counted = progress, (0, 0)
            fetched, kept = progress.fetched - self._counted[0], progress.kept - self._counted[1]
            self._counted = (progress.fetched, progress.kept)
            self._view = progress.view()
            eta = self._view["eta_s"]
        m.state_download_bytes_total.inc(max(0, fetched))
        m.state_download_kept_bytes_total.inc(max(0, kept))
        m.state_download_done_bytes.set(progress.done)
        m.state_download_size_bytes.set(progress.total)
        m.state_download_eta_seconds.set(math.nan if eta is None else eta)

    def finish(self) -> None:
        """No download in progress any more."""
        with self._lock:
            self._attempt, self._view = None, None
        self.metrics.state_download_done_bytes.set(0)
        self.metrics.state_download_size_bytes.set(0)
        self.metrics.state_download_eta_seconds.set(math.nan)

    def view(self) -> dict | None:
        """The download in progress (stage, part, source, done/total/kept/fetched bytes, rate, ETA), or None."""
        with self._lock:
            return dict(self._view) if self._view is not None else None


class _BannedPeers:
    """``protoswarm_peer_banned_seconds{peer_id, where}``: seconds each banned peer's ban still lasts.

    Read at scrape time from the ban tables (``NodeMetrics.watch_bans``); the longest
    ``MAX_BANNED_SERIES`` bans are shown, so a flood of identities cannot grow the series count."""

    def __init__(self, metrics: NodeMetricFamilies):
        self.metrics = metrics

    def describe(self):
        return [GaugeMetricFamily(f"{NAMESPACE}_peer_banned_seconds", self.__doc__.split("\n")[0], labels=("peer_id", "where"))]

    def collect(self):
        family = GaugeMetricFamily(f"{NAMESPACE}_peer_banned_seconds",
                                   "Seconds each banned peer's ban still lasts, by where it misbehaved.",
                                   labels=("peer_id", "where"))
        bans = []
        for where, source in list(self.metrics._ban_sources.items()):
            try:
                bans += [(left, peer, where) for peer, left in source().items()]
            except Exception:  # a table being replaced (stage move): skip it this scrape
                continue
        for left, peer, where in sorted(bans, reverse=True)[:MAX_BANNED_SERIES]:
            family.add_metric([peer, where], round(left, 1))
        yield family


class _AdmissionRefusals:
    """``protoswarm_admission_refused_total{handler, code}``: streams and requests refused before a byte of
    them was read (protocol/admission.py: banned, flood, rate_limited). Read at scrape time; the labels
    are this node's handler names and the three codes, so the series count is fixed."""

    NAME = f"{NAMESPACE}_admission_refused"

    def describe(self):
        return [CounterMetricFamily(self.NAME, "", labels=("handler", "code"))]

    def collect(self):
        family = CounterMetricFamily(self.NAME, "Streams and requests refused before a byte was read, by handler and "
                                     "why (banned, flood, rate_limited).", labels=("handler", "code"))
        for (handler, code), count in sorted(REFUSED.items()):
            family.add_metric([handler, code], count)
        yield family
