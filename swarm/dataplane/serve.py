"""Serving this node's stage to the previous one: decode, validate, refuse with codes, compute, reply.

A middle stage answers an activation frame by running its forward, forwarding the result one hop
further (:class:`~swarm.dataplane.send.HopSender`), and backpropagating the gradient that comes back,
so a microbatch's backward follows exactly the replicas its forward used, and the stash of a stage
lives only as long as its request. The last stage answers with the loss and its input's gradient.

Evaluation microbatches (``EVAL_HANDLER``) take the same frames through the same checks, but every
stage runs them forward only, on its agreed weights (``StageCompute.evaluate``: nothing is kept and no
gradient is taken), and the last stage answers with an :class:`EvalResult`, relayed back unchanged.

Every input is untrusted. The handler refuses, with an ErrorReply, a counted code and a strike
against the sender: frames for another run or stage, another subspace basis, wrong widths or
lengths, backward frames for microbatches it never saw, duplicates. Undecodable or non-finite
frames are refused by ``protocol.streams.serve_stream`` before the handler sees them. A peer with
``peer_strikes`` offences is refused outright for ``ban_max_s``.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import Any

import torch

from protocol.admission import Admission, StreamLimits
from protocol.errors import ProtocolError
from protocol.framing import write_frame
from protocol.messages import ActivationFrame, ErrorReply, EvalResult, GradientFrame, Message
from protocol.streams import LogLimiter, PeerStrikes, serve_stream
from swarm.dataplane.config import BACKPRESSURE, BUSY_PAUSE_S, HANDLER, MAX_BATCH, OFFENCES, PONG, ScaleGuard
from swarm.dataplane.send import HopFailed, HopSender
from swarm.dataplane.state import PlaneState, StageCompute

logger = logging.getLogger(__name__)
_refusal_log = LogLimiter(logger)  # one line per refusal code every 10 s at most (counts: metrics)


class _Refused(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def _downstream(compute: StageCompute, exc: HopFailed) -> _Refused:
    """The refusal for a microbatch this middle stage could not send on: ``expired`` when the budget ran out
    further down (the sender's drop is a deadline), ``no_route`` when the next stage's replicas all went
    (backpressure: asked again), ``downstream`` otherwise."""
    code = {"deadline": "expired", "no_route": "no_route"}.get(exc.reason, "downstream")
    return _Refused(code, f"stage {compute.stage + 1}: [{exc.code}] {exc}")


class HopServer:
    """The handler of ``protoswarm.pipeline.v1``: answers activation frames with gradient frames."""

    def __init__(self, state: PlaneState, sender: HopSender) -> None:
        self.state, self.sender = state, sender
        config = state.config
        # Offences per peer (bounded): peer_strikes within ban_max_s ban it for ban_max_s.
        self.strikes = PeerStrikes(config.peer_strikes, config.ban_max_s, config.ban_max_s)
        # Finite garbage of absurd size from a neighbour: incoming activations.
        self.activation_guard = ScaleGuard(config.outlier_ratio)
        self.losses: collections.deque[tuple[float, float]] = collections.deque(maxlen=4096)
        # Before a byte of a stream is read (training, evaluation and liveness together): a banned peer, one
        # holding max_streams_per_peer streams, one over max_requests_per_s (protocol/admission.py).
        limits = StreamLimits(max_streams=config.max_streams_per_peer, rate=config.max_requests_per_s,
                              burst=2 * config.max_requests_per_s, ban_s=config.ban_max_s)
        self.admission = Admission(HANDLER, limits, banned=self.strikes.banned_for, on_refused=self._count_refusal,
                                   wire_limits=state.limits)

    def _count_refusal(self, peer: str, code: str) -> None:
        """One refusal counted (stats, events): the handler's own, or a stream's at admission (banned, flood,
        rate_limited)."""
        stats = self.state.stats
        stats["refused"] += 1
        stats[f"refused_{code}"] += 1
        self.state.events.pipeline_refused(code)

    async def on_stream(self, info: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                        evaluate: bool = False) -> None:
        """One request stream (admitted already): a training microbatch (``HANDLER``), or with ``evaluate``
        an evaluation one."""
        await self._serve(str(info.peer_id), reader, writer, evaluate)

    async def _serve(self, peer: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     evaluate: bool) -> None:
        state = self.state
        size = [0]

        def on_frame(nbytes: int) -> None:
            size[0] = nbytes

        def on_sent(reply: Message, nbytes: int) -> None:
            if isinstance(reply, GradientFrame):
                state.count_bytes("backward", "sent", reply.codec, nbytes, reply.grad.numel(), 0)

        def on_error(exc: ProtocolError) -> None:
            state.events.protocol_error(exc.code)
            state.stats["refused"] += 1
            self._strike(peer)

        async def handle(msg: Message) -> Message:
            return await self.handle(msg, peer, size[0], evaluate)

        timeout = state.config.microbatch_timeout_s
        await serve_stream(reader, writer, handle, state.limits, on_error=on_error, on_frame=on_frame,
                           on_sent=on_sent, peer=peer, frame_timeout=timeout, idle_timeout=timeout,
                           admit=lambda: self.admission.request(peer))

    async def on_eval_stream(self, info: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self.on_stream(info, reader, writer, evaluate=True)

    async def on_ping(self, info: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """The liveness handler (admitted already): answers at once, reads nothing (nothing to validate)."""
        try:
            await write_frame(writer, PONG, timeout=5.0)
        except Exception:  # the asker went away
            pass
        finally:
            writer.close()

    async def handle(self, msg: Message, peer: str, nbytes: int = 0, evaluate: bool = False) -> Message:
        """The reply to one request from ``peer`` (public so tests can drive it without a stream)."""
        try:
            if evaluate:
                return await self._evaluate(msg, peer, nbytes)
            return await self._handle(msg, peer, nbytes)
        except _Refused as exc:
            return self._refused(exc, peer)

    def _refused(self, exc: _Refused, peer: str) -> ErrorReply:
        """Count, strike (for an offence), log (rate-limited) and answer one refusal."""
        self._count_refusal(peer, exc.code)
        if exc.code in OFFENCES:
            self._strike(peer)
        _refusal_log.info(exc.code, "refused a frame from %s: [%s] %s", peer, exc.code, exc)
        retry = BUSY_PAUSE_S if exc.code in BACKPRESSURE else None
        return ErrorReply(code=exc.code, message=str(exc)[:500], retry_after=retry)

    async def _handle(self, msg: Message, peer: str, nbytes: int) -> Message:
        start = time.monotonic()
        frame, compute, budget = self._accept(msg, peer, nbytes)
        self.state.stats["served"] += 1
        if compute.is_last:
            return await self._score(frame, compute, budget)
        return await self._relay(frame, peer, compute, start, start + budget)

    async def _evaluate(self, msg: Message, peer: str, nbytes: int) -> EvalResult:
        """An evaluation microbatch: forward only on this stage's agreed weights, then one hop on (a middle
        stage) or scored (the last stage). Nothing is stashed, no gradient taken, no step counted."""
        start = time.monotonic()
        frame, compute, budget = self._accept(msg, peer, nbytes)
        stats = self.state.stats
        deadline = start + budget
        stats["eval_served"] += 1
        ids = frame.token_ids
        try:
            out, tag = await asyncio.wait_for(compute.evaluate(ids, frame.coefficients), budget)
        except TimeoutError:
            raise _Refused("expired", "the evaluation microbatch's budget ran out in this stage's queue") from None
        if compute.is_last:
            loss = float(out)
            if not 0.0 <= loss < float("inf"):
                raise _Refused("loss", f"stage {compute.stage}: evaluation loss is {loss}")
            return EvalResult(run_id=self.state.run_id, microbatch_id=frame.microbatch_id, stage=compute.stage,
                              loss=loss, tokens=ids.shape[0] * (ids.shape[1] - 1), agreed=[tag])
        reserve = max(0.5, (time.monotonic() - start) / 3)
        try:
            result = await self.sender.send_eval(out, ids, list(frame.route), compute, deadline - reserve)
        except HopFailed as exc:
            raise _downstream(compute, exc) from None
        # Ours to answer: the microbatch id the sender gave this hop (the result was checked against ours).
        return EvalResult(run_id=result.run_id, microbatch_id=frame.microbatch_id, stage=result.stage,
                          loss=result.loss, tokens=result.tokens, agreed=[tag, *result.agreed])

    def _accept(self, msg: Message, peer: str, nbytes: int) -> tuple[ActivationFrame, StageCompute, float]:
        """The frame, the stage that takes it and the seconds it may take (its budget, at most
        ``microbatch_timeout_s``), or a refusal (below; ``no_route`` for a middle stage without one)."""
        frame, compute = self._admit(msg, peer, nbytes)
        self._need_route(compute)
        limit = self.state.config.microbatch_timeout_s
        return frame, compute, frame.budget_s if 0 < frame.budget_s <= limit else limit

    def _admit(self, msg: Message, peer: str, nbytes: int) -> tuple[ActivationFrame, StageCompute]:
        """The frame and the stage that takes it, or a refusal: a banned peer, a wrong frame, a full stage."""
        state = self.state
        if (left := self.strikes.banned_for(peer)) > 0:
            raise _Refused("banned", f"too many bad frames; refused for {left:.0f} s more")
        if isinstance(msg, GradientFrame):
            raise _Refused("unknown_microbatch", f"no microbatch {msg.microbatch_id} awaits a backward from {peer}: "
                           "gradients travel only as replies to activation frames")
        if not isinstance(msg, ActivationFrame):
            raise _Refused("route", f"{HANDLER} takes activation frames, not {type(msg).__name__}")
        compute = state.compute
        if compute is None:
            raise _Refused("no_stage", "this node serves no pipeline stage right now")
        self._check(msg, compute)
        state.count_bytes("forward", "received", msg.codec, nbytes, msg.coefficients.numel(), msg.token_ids.numel())
        if compute.in_flight >= state.config.max_stash or compute.queue_depth >= state.config.max_queue:
            raise _Refused("busy", f"stage {compute.stage} holds {compute.in_flight} microbatches, "
                           f"{compute.queue_depth} jobs queued")
        return msg, compute

    def _need_route(self, compute: StageCompute) -> None:
        """A middle stage refuses, before computing anything, while it knows no replica of the next stage: a node
        that has just come online has not read the next stage's records yet. The sender waits and asks again
        (backpressure); computing first and failing downstream would cost every stage before a drop."""
        if not compute.is_last and not self.state.router.routable():
            raise _Refused("no_route", f"stage {compute.stage} knows no replica of stage {compute.stage + 1} yet")

    async def _score(self, msg: ActivationFrame, compute: StageCompute, budget: float) -> GradientFrame:
        """The last stage: loss and the gradient of its input, within ``budget`` seconds."""
        ids, boundary = msg.token_ids, msg.coefficients
        try:
            loss, grad = await asyncio.wait_for(compute.forward_backward_last(ids, boundary), budget)
        except FloatingPointError as exc:
            raise _Refused("loss", str(exc)) from None
        except TimeoutError:
            raise _Refused("expired", "the microbatch's budget ran out in this stage's queue") from None
        tokens = ids.shape[0] * (ids.shape[1] - 1)
        self.losses.append((time.time(), loss))
        self.state.events.pipeline_loss(loss, tokens)
        return self._reply(msg, compute, grad, loss)

    async def _relay(self, msg: ActivationFrame, peer: str, compute: StageCompute, start: float,
                     deadline: float) -> GradientFrame:
        """A middle stage: forward, send one hop on, backward the gradient that comes back."""
        key = (peer, msg.microbatch_id)
        ids, boundary = msg.token_ids, msg.coefficients
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
            reply = await self.sender.send_forward(out, ids, list(msg.route), compute, deadline - reserve)
            grad = await compute.backward(key, reply.grad)
        except HopFailed as exc:
            raise _downstream(compute, exc) from None
        finally:
            compute.drop(key)
        return self._reply(msg, compute, grad, reply.loss)

    def _check(self, msg: ActivationFrame, compute: StageCompute) -> None:
        state = self.state
        if msg.run_id != state.run_id:
            raise _Refused("wrong_run", f"this node trains run {state.run_id!r}, not {msg.run_id[:64]!r}")
        if msg.stage != compute.stage - 1:
            raise _Refused("wrong_stage", f"this node serves stage {compute.stage}: it takes frames from stage "
                           f"{compute.stage - 1}, not {msg.stage}")
        if msg.basis != compute.basis:
            raise _Refused("basis", f"subspace basis {msg.basis[:16]!r} is not this run's {compute.basis[:16]!r}")
        batch, seq, width = msg.coefficients.shape
        if width != compute.width:
            raise _Refused("shape", f"coefficients carry {width} values per token; stage {compute.stage} "
                           f"takes {compute.width}")
        if not (1 <= batch <= MAX_BATCH and 2 <= seq <= state.max_seq_len):
            raise _Refused("shape", f"microbatch of {batch}×{seq} tokens is outside 1..{MAX_BATCH} × 2..{state.max_seq_len}")
        if len(msg.route) != msg.stage + 1:
            raise _Refused("route", f"a frame from stage {msg.stage} must carry {msg.stage + 1} route entries, "
                           f"not {len(msg.route)}")
        if (problem := self.activation_guard.check(msg.coefficients, "activation")) is not None:
            raise _Refused("outlier", problem)

    def _reply(self, msg: ActivationFrame, compute: StageCompute, grad: torch.Tensor, loss: float | None) -> GradientFrame:
        reply = GradientFrame(run_id=self.state.run_id, microbatch_id=msg.microbatch_id, stage=compute.stage,
                              grad=grad.detach().float().contiguous(), codec=self.state.wire.gradient_codec, loss=loss,
                              step=getattr(getattr(compute, "work", None), "progress", 0), queue=compute.queue_depth)
        return reply  # serve_stream sends it; on_sent counts its bytes

    def _strike(self, peer: str) -> None:
        if self.strikes.strike(peer):
            self.state.stats["peers_banned"] += 1
            _refusal_log.warning("ban", "peer %s sent %d bad frames: refusing it for %.0f s", peer,
                                 self.state.config.peer_strikes, self.state.config.ban_max_s)
