"""The pipeline data plane: microbatches between stage replicas over hivemind P2P streams.

One hop is one request on a fresh P2P stream (handler ``protoswarm.pipeline.v1``): the sender
writes an :class:`ActivationFrame` and reads back a :class:`GradientFrame` (or an ErrorReply). A
middle stage answers by running its forward, forwarding the result one hop further the same way,
and backpropagating the gradient that comes back, so a microbatch's backward follows exactly the
replicas its forward used, and the stash of a stage lives only as long as its request:

    stage 0 ──A──▶ stage 1 ──A──▶ … ──A──▶ stage S-1   (forward, coefficients + ids)
    stage 0 ◀──G── stage 1 ◀──G── … ◀──G── stage S-1   (the replies: ∂L/∂c, loss)

Failure handling is nested deadlines, not bookkeeping: the stage-0 driver gives each microbatch
``dataplane.microbatch_timeout_s``; every frame carries the sender's remaining budget, and each
hop gives the next one what is left minus a reserve for its own backward. A hop that fails fast
(refused, busy, connection lost) is retried on another replica while budget remains; a hop that
times out has used the budget. Either way the stash is freed, the drop is counted and the router
steers new work away (bans with backoff). Nothing waits without a deadline.

Every input is untrusted. The handler refuses, with an ErrorReply, a counted code and a strike
against the sender: frames for another run or stage, another subspace basis, wrong widths or
lengths, backward frames for microbatches it never saw, duplicates. Undecodable or non-finite
frames are refused by ``protocol.streams.serve_stream`` before the handler sees them. A peer with
``peer_strikes`` offences is refused outright for ``ban_max_s``.

:class:`DataPlane` takes the ``[dataplane]`` config section as it is (:class:`DataplaneConfig`), plus
the ``[wire]`` codecs and the model's widths. The compute itself is the node's
(``node.pipeline.PipelineCompute``); this module only needs the duck type :class:`StageCompute`.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import statistics
import time
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from protocol.codecs import get_codec
from protocol.errors import ProtocolError, RemoteError
from protocol.framing import PREFIX_BYTES, read_frame, write_frame
from protocol.messages import (
    ActivationFrame,
    ErrorReply,
    GradientFrame,
    Message,
    decode_message,
    encode_message,
)
from protocol.settings import ConfigError, check_positive, setting
from protocol.streams import PeerStrikes, serve_stream
from protocol.tensors import WireConfig, WireLimits
from swarm.routing import Router

logger = logging.getLogger(__name__)

HANDLER = "protoswarm.pipeline.v1"
DENSE_BYTES_PER_VALUE = 2  # the reference a compression ratio is quoted against: dense bf16
REFUSAL_CODES = (
    "wrong_run", "wrong_stage", "basis", "shape", "route", "unknown_microbatch", "duplicate", "busy",
    "banned", "downstream", "expired", "no_stage", "bad_reply", "loss", "outlier",
)
# Refusals that are the sender's fault (strikes toward a ban); the others are load or our own state.
BUSY_PAUSE_S = 0.5  # wait before asking full replicas again (also the retry_after a busy refusal carries)
MAX_BATCH = 4096  # sequences in one received microbatch; more is refused as a malformed shape
OFFENCES = frozenset({"wrong_run", "basis", "shape", "route", "unknown_microbatch", "duplicate", "outlier"})


class StageCompute(Protocol):
    stage: int
    num_stages: int
    width: int
    basis: str
    is_first: bool
    is_last: bool

    @property
    def queue_depth(self) -> int: ...
    @property
    def in_flight(self) -> int: ...
    async def forward(self, key: Hashable, ids: torch.Tensor, boundary_in: torch.Tensor | None) -> torch.Tensor: ...
    async def backward(self, key: Hashable, grad_out: torch.Tensor) -> torch.Tensor | None: ...
    async def forward_backward_last(self, ids: torch.Tensor, boundary_in: torch.Tensor) -> tuple[float, torch.Tensor]: ...
    def drop(self, key: Hashable) -> bool: ...


class PipelineEvents:
    """Hooks for metrics; the node's NodeMetrics implements them. These defaults do nothing."""

    def pipeline_bytes(self, direction: str, way: str, codec: str, nbytes: int, dense_nbytes: int) -> None: ...
    def pipeline_microbatch(self, result: str, tokens: int = 0) -> None: ...
    def pipeline_refused(self, code: str) -> None: ...
    def pipeline_hop(self, seconds: float) -> None: ...
    def pipeline_loss(self, loss: float, tokens: int) -> None: ...
    def protocol_error(self, code: str) -> None: ...


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
    ban_base_s: float = setting(2.0, "First ban of a next-stage replica after a hard error (doubles per repeat).")
    ban_max_s: float = setting(60.0, "Longest such ban (seconds).")
    peer_strikes: int = setting(8, "Bad frames from one peer before its requests are refused for ban_max_s.")
    outlier_ratio: float = setting(
        100.0, "Refuse activations and gradient replies whose RMS exceeds this × the median of the last 64 accepted."
    )

    def __post_init__(self) -> None:
        check_positive(self, "max_inflight", "max_queue", "max_stash", "microbatch_timeout_s", "ban_base_s",
                       "ban_max_s", "peer_strikes", "outlier_ratio")
        if self.backward not in ("recompute", "stash"):
            raise ConfigError(f"dataplane.backward must be 'recompute' or 'stash', got {self.backward!r}")
        if self.max_retries < 0:
            raise ConfigError(f"dataplane.max_retries must be >= 0, got {self.max_retries}")


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


class HopFailed(Exception):
    """No replica of the next stage answered a microbatch within its budget and retries."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class _Refused(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class DataPlane:
    """This node's end of the pipeline: serves its stage to the previous one, drives it if it is stage 0.

    All methods run on the event loop of ``p2p`` (one thread); ``compute`` does the torch work on its own.
    """

    def __init__(self, p2p: Any, peer_id: str, run_id: str, config: DataplaneConfig, wire: WireConfig, *,
                 d_model: int, max_seq_len: int, limits: WireLimits | None = None,
                 events: PipelineEvents | None = None) -> None:
        """``wire``: the codecs frames are sent with; ``limits``: what is accepted (default ``wire.limits()``).
        ``d_model`` is the width a dense boundary would carry (for the compression ratio); ``max_seq_len``
        the longest microbatch accepted (tokens)."""
        self.p2p, self.peer_id, self.run_id = p2p, peer_id, run_id
        self.config, self.wire = config, wire
        self.limits = limits if limits is not None else wire.limits()
        self.d_model, self.max_seq_len = d_model, max_seq_len
        self.events = events or PipelineEvents()
        self.compute: StageCompute | None = None
        self.router = Router(ban_base_s=config.ban_base_s, ban_max_s=config.ban_max_s)
        self._ids = itertools.count(1)
        # Offences per peer (bounded): peer_strikes within ban_max_s ban it for ban_max_s.
        self.strikes = PeerStrikes(config.peer_strikes, config.ban_max_s, config.ban_max_s)
        # Finite garbage of absurd size from a neighbour: incoming activations, gradient replies.
        self.activation_guard = ScaleGuard(config.outlier_ratio)
        self.gradient_guard = ScaleGuard(config.outlier_ratio)
        self.stats: dict[str, float] = collections.Counter()
        self.losses: collections.deque[tuple[float, float]] = collections.deque(maxlen=4096)
        self._driver: asyncio.Task | None = None

    # setup ---------------------------------------------------------------------------------------------

    async def register(self) -> None:
        await self.p2p.add_binary_stream_handler(HANDLER, self._on_stream)

    def attach(self, compute: StageCompute | None) -> None:
        """Serve ``compute``'s stage from now on (None: serve nothing); the routes are for its next stage."""
        self.compute = compute
        self.router = Router(ban_base_s=self.config.ban_base_s, ban_max_s=self.config.ban_max_s)

    def set_next_replicas(self, replicas: Iterable[tuple[str, float]]) -> None:
        """The ONLINE replicas of the next stage (peer id, announced throughput), from the DHT records."""
        self.router.update([(p, t) for p, t in replicas if p != self.peer_id])

    def health(self) -> dict[str, Any]:
        compute = self.compute
        return {
            **{k: int(v) if float(v).is_integer() else v for k, v in self.stats.items()},
            "queue": compute.queue_depth if compute else 0,
            "stash": compute.in_flight if compute else 0,
            "routes": self.router.snapshot(),
            "recent_losses": [[round(t, 3), round(v, 5)] for t, v in list(self.losses)[-512:]],
        }

    # serving -------------------------------------------------------------------------------------------

    async def _on_stream(self, info: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = str(info.peer_id)
        size = [0]

        def on_frame(nbytes: int) -> None:
            size[0] = nbytes

        def on_sent(reply: Message, nbytes: int) -> None:
            if isinstance(reply, GradientFrame):
                self._count_bytes("backward", "sent", reply.codec, nbytes, reply.grad.numel(), 0)

        def on_error(exc: ProtocolError) -> None:
            self.events.protocol_error(exc.code)
            self.stats["refused"] += 1
            self._strike(peer)

        async def handle(msg: Message) -> Message:
            return await self.handle(msg, peer, size[0])

        await serve_stream(reader, writer, handle, self.limits, on_error=on_error, on_frame=on_frame,
                           on_sent=on_sent, peer=peer,
                           frame_timeout=self.config.microbatch_timeout_s, idle_timeout=self.config.microbatch_timeout_s)

    async def handle(self, msg: Message, peer: str, nbytes: int = 0) -> Message:
        """The reply to one request from ``peer`` (public so tests can drive it without a stream)."""
        try:
            return await self._handle(msg, peer, nbytes)
        except _Refused as exc:
            self.stats["refused"] += 1
            self.stats[f"refused_{exc.code}"] += 1
            self.events.pipeline_refused(exc.code)
            if exc.code in OFFENCES:
                self._strike(peer)
            logger.info("refused a frame from %s: [%s] %s", peer, exc.code, exc)
            retry = BUSY_PAUSE_S if exc.code == "busy" else None
            return ErrorReply(code=exc.code, message=str(exc)[:500], retry_after=retry)

    async def _handle(self, msg: Message, peer: str, nbytes: int) -> Message:
        start = time.monotonic()
        if (left := self.strikes.banned_for(peer)) > 0:
            raise _Refused("banned", f"too many bad frames; refused for {left:.0f} s more")
        if isinstance(msg, GradientFrame):
            raise _Refused("unknown_microbatch", f"no microbatch {msg.microbatch_id} awaits a backward from {peer}: "
                           "gradients travel only as replies to activation frames")
        if not isinstance(msg, ActivationFrame):
            raise _Refused("route", f"{HANDLER} takes activation frames, not {type(msg).__name__}")
        compute = self.compute
        if compute is None:
            raise _Refused("no_stage", "this node serves no pipeline stage right now")
        self._check(msg, compute)
        self._count_bytes("forward", "received", msg.codec, nbytes, msg.coefficients.numel(), msg.token_ids.numel())
        if compute.in_flight >= self.config.max_stash or compute.queue_depth >= self.config.max_queue:
            raise _Refused("busy", f"stage {compute.stage} holds {compute.in_flight} microbatches, "
                           f"{compute.queue_depth} jobs queued")
        budget = msg.budget_s if 0 < msg.budget_s <= self.config.microbatch_timeout_s \
            else self.config.microbatch_timeout_s
        deadline = start + budget
        ids, boundary = msg.token_ids, msg.coefficients
        self.stats["served"] += 1
        if compute.is_last:
            try:
                loss, grad = await asyncio.wait_for(compute.forward_backward_last(ids, boundary), budget)
            except FloatingPointError as exc:
                raise _Refused("loss", str(exc)) from None
            except TimeoutError:
                raise _Refused("expired", "the microbatch's budget ran out in this stage's queue") from None
            tokens = ids.shape[0] * (ids.shape[1] - 1)
            self.losses.append((time.time(), loss))
            self.events.pipeline_loss(loss, tokens)
            return self._reply(msg, compute, grad, loss)
        key = (peer, msg.microbatch_id)
        try:
            out = await asyncio.wait_for(compute.forward(key, ids, boundary), max(0.0, deadline - time.monotonic()))
        except ValueError as exc:  # already in flight
            compute.drop(key)
            raise _Refused("duplicate", str(exc)) from None
        except TimeoutError:
            compute.drop(key)
            raise _Refused("expired", "the microbatch's budget ran out in this stage's queue") from None
        try:
            # Keep a reserve for our own backward and reply: a third of what we spent so far, at least 0.5 s.
            reserve = max(0.5, (time.monotonic() - start) / 3)
            reply = await self.send_forward(out, ids, list(msg.route), compute, deadline - reserve)
            grad = await compute.backward(key, reply.grad)
        except HopFailed as exc:
            raise _Refused("downstream", f"stage {compute.stage + 1}: {exc}") from None
        finally:
            compute.drop(key)
        return self._reply(msg, compute, grad, reply.loss)

    def _check(self, msg: ActivationFrame, compute: StageCompute) -> None:
        if msg.run_id != self.run_id:
            raise _Refused("wrong_run", f"this node trains run {self.run_id!r}, not {msg.run_id[:64]!r}")
        if msg.stage != compute.stage - 1:
            raise _Refused("wrong_stage", f"this node serves stage {compute.stage}: it takes frames from stage "
                           f"{compute.stage - 1}, not {msg.stage}")
        if msg.basis != compute.basis:
            raise _Refused("basis", f"subspace basis {msg.basis[:16]!r} is not this run's {compute.basis[:16]!r}")
        batch, seq, width = msg.coefficients.shape
        if width != compute.width:
            raise _Refused("shape", f"coefficients carry {width} values per token; stage {compute.stage} "
                           f"takes {compute.width}")
        if not (1 <= batch <= MAX_BATCH and 2 <= seq <= self.max_seq_len):
            raise _Refused("shape", f"microbatch of {batch}×{seq} tokens is outside 1..{MAX_BATCH} × 2..{self.max_seq_len}")
        if len(msg.route) != msg.stage + 1:
            raise _Refused("route", f"a frame from stage {msg.stage} must carry {msg.stage + 1} route entries, "
                           f"not {len(msg.route)}")
        if (problem := self.activation_guard.check(msg.coefficients, "activation")) is not None:
            raise _Refused("outlier", problem)

    def _reply(self, msg: ActivationFrame, compute: StageCompute, grad: torch.Tensor, loss: float | None) -> GradientFrame:
        reply = GradientFrame(run_id=self.run_id, microbatch_id=msg.microbatch_id, stage=compute.stage,
                              grad=grad.detach().float().contiguous(), codec=self.wire.gradient_codec, loss=loss,
                              step=getattr(getattr(compute, "work", None), "progress", 0), queue=compute.queue_depth)
        return reply  # serve_stream sends it; on_sent counts its bytes

    def _strike(self, peer: str) -> None:
        if self.strikes.strike(peer):
            self.stats["peers_banned"] += 1
            logger.warning("peer %s sent %d bad frames: refusing it for %.0f s", peer, self.config.peer_strikes,
                           self.config.ban_max_s)

    def _count_bytes(self, direction: str, way: str, codec: str, nbytes: int, values: int, ids: int) -> None:
        """Count a frame and what the same frame would weigh with a dense bf16 boundary."""
        width = self.compute.width if self.compute else 1
        tokens = values // max(1, width)
        payload = get_codec(codec).payload_nbytes(values)
        dense = nbytes - payload + tokens * self.d_model * DENSE_BYTES_PER_VALUE
        self.stats[f"bytes_{direction}_{way}"] += nbytes
        self.stats[f"dense_{direction}_{way}"] += dense
        self.events.pipeline_bytes(direction, way, codec, nbytes, dense)

    # sending ---------------------------------------------------------------------------------------------

    async def send_forward(self, out: torch.Tensor, ids: torch.Tensor, route: list[str], compute: StageCompute,
                           deadline: float) -> GradientFrame:
        """Send this stage's output one hop on (retrying other replicas) and return the validated reply.

        ``route``: the peers the microbatch went through before this one (stage 0 first)."""
        route = [*route, self.peer_id]
        frame = ActivationFrame(
            run_id=self.run_id, microbatch_id=next(self._ids), stage=compute.stage, route=route,
            token_ids=ids, coefficients=out.detach().float().contiguous(), codec=self.wire.activation_codec,
            basis=compute.basis, step=getattr(getattr(compute, "work", None), "progress", 0),
        )
        tried: list[str] = []
        last = "no replica of the next stage is known"
        code = "no_route"
        busy: list[str] = []  # replicas that were full: healthy, worth another try after a pause
        failures = attempt = 0
        while failures <= self.config.max_retries:
            remaining = deadline - time.monotonic()
            if remaining <= 0.05:
                code, last = "expired", f"budget spent after {attempt} attempt(s) ({last})"
                break
            peer = self.router.choose(exclude=tried)
            if peer is None and busy and remaining > BUSY_PAUSE_S + 0.05:
                # Every replica left is full: that is backpressure, not failure. Wait and ask them again.
                await asyncio.sleep(BUSY_PAUSE_S)
                tried = [p for p in tried if p not in busy]
                busy.clear()
                continue
            if peer is None:
                break
            attempt += 1
            if attempt > 1:
                self.stats["microbatches_retried"] += 1
                self.events.pipeline_microbatch("retried")
            tried.append(peer)
            frame.budget_s = remaining
            body = encode_message(frame, self.limits)
            self.router.started(peer)
            sent = time.monotonic()
            try:
                reply, reply_bytes = await asyncio.wait_for(self._exchange(peer, body), remaining)
            except RemoteError as exc:
                soft = exc.remote_code in ("busy", "downstream", "expired")
                self.router.failed(peer, hard=not soft)
                code, last = "remote", f"{peer}: {exc}"
                if exc.remote_code == "busy":
                    busy.append(peer)
                else:
                    failures += 1
                continue
            except asyncio.CancelledError:
                self.router.failed(peer, hard=False)
                raise
            except TimeoutError:
                self.router.failed(peer, hard=True)
                code, last = "timeout", f"{peer} did not answer within {remaining:.1f} s"
                failures += 1
                continue
            except Exception as exc:  # connection refused/reset, a dead peer, a broken frame
                self.router.failed(peer, hard=True)
                code, last = "connection", f"{peer}: {type(exc).__name__}: {exc}"
                failures += 1
                continue
            finally:
                self._count_bytes("forward", "sent", frame.codec, len(body) + PREFIX_BYTES,
                                  frame.coefficients.numel(), ids.numel())
            problem = self._check_reply(reply, frame, compute)
            if problem is not None:
                self.router.failed(peer, hard=True)
                self.stats["refused_bad_reply"] += 1
                self.events.pipeline_refused("bad_reply")
                code, last = "bad_reply", f"{peer}: {problem}"
                failures += 1
                continue
            self._count_bytes("backward", "received", reply.codec, reply_bytes, reply.grad.numel(), 0)
            self.router.succeeded(peer, time.monotonic() - sent, reply.queue)
            self.events.pipeline_hop(time.monotonic() - sent)
            return reply
        raise HopFailed(code, last)

    def _check_reply(self, reply: Message, frame: ActivationFrame, compute: StageCompute) -> str | None:
        if not isinstance(reply, GradientFrame):
            return f"replied with {type(reply).__name__}, not a GradientFrame"
        if reply.microbatch_id != frame.microbatch_id:
            return f"gradient for unknown microbatch {reply.microbatch_id} (sent {frame.microbatch_id})"
        if reply.run_id != self.run_id or reply.stage != compute.stage + 1:
            return f"gradient from run {reply.run_id[:64]!r} stage {reply.stage}"
        if tuple(reply.grad.shape) != tuple(frame.coefficients.shape):
            return f"gradient shape {list(reply.grad.shape)} for coefficients {list(frame.coefficients.shape)}"
        if compute.num_stages - 1 == reply.stage and reply.loss is None:
            return "the last stage's reply carries no loss"
        return self.gradient_guard.check(reply.grad, "gradient")

    async def _exchange(self, peer: str, body: bytes) -> tuple[Message, int]:
        from hivemind.p2p import PeerID

        _, reader, writer = await self.p2p.call_binary_stream_handler(PeerID.from_base58(peer), HANDLER)
        try:
            await write_frame(writer, body, timeout=None)
            raw = await read_frame(reader, self.limits, timeout=None)
            if raw is None:
                raise RemoteError("peer closed the stream without replying", remote_code="closed")
            reply = decode_message(raw, self.limits)
        finally:
            writer.close()
        if isinstance(reply, ErrorReply):
            raise RemoteError(f"[{reply.code}] {reply.message}", remote_code=reply.code, retry_after=reply.retry_after)
        return reply, len(raw) + PREFIX_BYTES

    # driving (stage 0) -----------------------------------------------------------------------------------

    def start_driver(self, next_batch: Callable[[], torch.Tensor]) -> None:
        """Stage 0: keep ``max_inflight`` microbatches from ``next_batch()`` going through the pipeline."""
        self.stop_driver()
        self._driver = asyncio.get_running_loop().create_task(self._drive(next_batch))

    def stop_driver(self) -> None:
        if self._driver is not None:
            self._driver.cancel()
            self._driver = None

    async def _drive(self, next_batch: Callable[[], torch.Tensor]) -> None:
        slots = asyncio.Semaphore(self.config.max_inflight)
        tasks: set[asyncio.Task] = set()
        try:
            while True:
                await slots.acquire()
                compute = self.compute
                if compute is None or not compute.is_first or not self.router.peers or self.router.choose() is None:
                    slots.release()
                    await asyncio.sleep(0.2)  # no next stage to send to (yet, or all banned): poll
                    continue
                task = asyncio.get_running_loop().create_task(self._one(compute, next_batch(), slots))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _one(self, compute: StageCompute, ids: torch.Tensor, slots: asyncio.Semaphore) -> None:
        key = ("driver", next(self._ids))
        start = time.monotonic()
        deadline = start + self.config.microbatch_timeout_s
        tokens = ids.shape[0] * (ids.shape[1] - 1)
        try:
            out = await compute.forward(key, ids, None)
            reply = await self.send_forward(out, ids, [], compute, deadline)
            await compute.backward(key, reply.grad)
        except HopFailed as exc:
            self.stats["microbatches_dropped"] += 1
            self.stats[f"dropped_{exc.code}"] += 1
            self.events.pipeline_microbatch("dropped")
            logger.info("microbatch dropped: [%s] %s", exc.code, exc)
        except asyncio.CancelledError:
            raise
        except Exception:
            self.stats["microbatches_dropped"] += 1
            self.events.pipeline_microbatch("dropped")
            logger.exception("microbatch failed on this stage")
        else:
            self.stats["microbatches_ok"] += 1
            self.stats["tokens_ok"] += tokens
            self.events.pipeline_microbatch("ok", tokens)
        finally:
            compute.drop(key)
            slots.release()
