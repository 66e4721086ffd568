"""The ``[dataplane]`` config section and the limits every role of the data plane shares."""

from __future__ import annotations

import collections
import statistics
from dataclasses import dataclass

import torch

from protocol.settings import ConfigError, check_positive, setting

HANDLER = "protoswarm.pipeline.v1"
# Evaluation microbatches (1.4): the same ActivationFrame, forward only on the agreed weights, answered with an
# EvalResult. A handler of its own, so a 1.3 peer (which lacks it) refuses the stream instead of training on it.
EVAL_HANDLER = "protoswarm.pipeline.eval.v1"
# Liveness (1.5): a stream answered at once with PONG, whatever it carries (nothing is read). A hop unanswered
# for dataplane.liveness_s asks it; a replica whose process is frozen cannot answer (docs/pipeline.md).
PING_HANDLER = "protoswarm.pipeline.ping.v1"
PONG = b"alive"
DENSE_BYTES_PER_VALUE = 2  # the reference a compression ratio is quoted against: dense bf16
REFUSAL_CODES = (
    "wrong_run", "wrong_stage", "basis", "shape", "route", "unknown_microbatch", "duplicate", "busy",
    "banned", "downstream", "expired", "no_stage", "bad_reply", "loss", "outlier", "no_route", "flood",
    "rate_limited",
)
# Refusals that say "healthy, not ready yet": the sender waits BUSY_PAUSE_S and asks the same replica again
# (within the microbatch's budget) instead of counting a failure. busy: its queue is full; no_route: a middle
# stage that knows no replica of the stage after it yet (a node just online, or the next stage all banned).
BACKPRESSURE = frozenset({"busy", "no_route"})
# Why stage 0 dropped a microbatch (stats drop_reason_<reason>, protoswarm_pipeline_dropped_total{reason}).
DROP_REASONS = ("deadline", "no_route", "refused", "peer_lost", "stage_moved", "downstream", "error")
BUSY_PAUSE_S = 0.5  # wait before asking full replicas again (also the retry_after a busy refusal carries)
MAX_BATCH = 4096  # sequences in one received microbatch; more is refused as a malformed shape
# Refusals that are the sender's fault (strikes toward a ban); the others are load or our own state.
OFFENCES = frozenset({"wrong_run", "basis", "shape", "route", "unknown_microbatch", "duplicate", "outlier"})
# (flood and rate_limited are struck by the handler's admission: protocol/admission.py)


@dataclass(kw_only=True)
class DataplaneConfig:
    """How this node moves microbatches between pipeline stages (node-local: never taken from the run)."""

    SECTION = "dataplane"

    max_inflight: int = setting(4, "Microbatches a stage-0 node keeps in flight through the pipeline (backpressure).")
    max_queue: int = setting(16, "Forward/backward jobs queued on this stage before new work is refused as busy.")
    max_stash: int = setting(32, "Microbatches this stage holds awaiting their backward before refusing new ones.")
    backward: str = setting(
        "recompute", "'recompute': keep a stage's input and rerun the forward at backward time (less memory, "
        "no stale graph across optimizer steps); 'stash': keep the forward graph (less compute)."
    )
    microbatch_timeout_s: float = setting(
        30.0, "A stage-0 node drops a microbatch whose gradient has not come back within this (seconds)."
    )
    max_retries: int = setting(2, "Other next-stage replicas tried when one refuses or fails a microbatch.")
    max_streams_per_peer: int = setting(
        32, "Pipeline streams one peer may hold open on this node at once (training, evaluation and liveness "
        "together); more are refused as 'flood' before a byte of them is read. An honest stage-0 node holds at "
        "most max_inflight + 1."
    )
    max_requests_per_s: float = setting(
        500.0, "Pipeline streams and requests one peer may open or send a second (training, evaluation and "
        "liveness together; twice that at once after a quiet spell); more are refused as 'rate_limited' before "
        "a byte of them is read. An honest stage-0 node sends one stream per microbatch and one ping a second."
    )
    ban_base_s: float = setting(2.0, "First ban of a next-stage replica after a hard error (doubles per repeat).")
    ban_max_s: float = setting(60.0, "Longest such ban (seconds).")
    peer_strikes: int = setting(8, "Bad frames from one peer before its requests are refused for ban_max_s.")
    outlier_ratio: float = setting(
        100.0, "Refuse activations and gradient replies whose RMS exceeds this × the median of the last 64 accepted."
    )
    liveness_s: float = setting(
        2.0, "A hop unanswered this long (seconds) makes the sender ping the replica on its own handler; one that "
        "does not answer the ping within this is suspended (no new work, no ban) and the hop retried elsewhere; "
        "it is pinged every second and taken back when it answers. 0 = wait for the microbatch deadline only."
    )
    eval_every_s: float = setting(
        120.0, "A stage-0 node measures the swarm's validation loss this often (seconds): eval_batches forward-only "
        "microbatches of the validation split through every stage, on the agreed weights (a whole-model replica, "
        "S = 1, scores them itself). 0 = never."
    )
    eval_batches: int = setting(
        4, "Validation microbatches per measurement (train.batch_size windows of train.seq_len tokens each; the "
        "same fixed windows every time): its cost, one forward per stage each."
    )

    def __post_init__(self) -> None:
        check_positive(self, "max_inflight", "max_queue", "max_stash", "max_streams_per_peer", "max_requests_per_s",
                       "microbatch_timeout_s", "ban_base_s", "ban_max_s", "peer_strikes", "outlier_ratio")
        if self.backward not in ("recompute", "stash"):
            raise ConfigError(f"dataplane.backward must be 'recompute' or 'stash', got {self.backward!r}")
        if self.liveness_s < 0:
            raise ConfigError(f"dataplane.liveness_s must be >= 0, got {self.liveness_s}")
        if self.max_retries < 0:
            raise ConfigError(f"dataplane.max_retries must be >= 0, got {self.max_retries}")
        if self.eval_every_s < 0 or self.eval_batches < 1:
            raise ConfigError(f"dataplane.eval_every_s must be >= 0 and dataplane.eval_batches >= 1, got "
                              f"{self.eval_every_s} and {self.eval_batches}")


class ScaleGuard:
    """Refuses tensors far larger than what this node recently accepted: garbage from a broken or
    malicious neighbour that is finite and well-formed. The RMS of each accepted tensor is kept (the
    last ``window``); once ``warmup`` are known, one whose RMS exceeds ``ratio`` × their median is refused
    and not remembered. Slow drifts pass (the median follows them); so does garbage of ordinary
    size, which no check on magnitudes can tell from a real update (docs/security.md)."""

    def __init__(self, ratio: float, window: int = 64, warmup: int = 8):
        self.ratio, self.warmup = ratio, warmup
        self.history: collections.deque[float] = collections.deque(maxlen=window)

    def check(self, tensor: torch.Tensor, what: str) -> str | None:
        rms = float(tensor.detach().float().pow(2).mean().sqrt()) if tensor.numel() else 0.0
        if len(self.history) >= self.warmup:
            median = statistics.median(self.history)
            if median > 0 and rms > self.ratio * median:
                return f"{what} RMS {rms:.3g} is over {self.ratio:g}× the recent median {median:.3g}"
        self.history.append(rms)
        return None
