"""Sending a microbatch one hop on: choose a replica of the next stage, retry, validate the reply.

Failure handling is nested deadlines, not bookkeeping: the stage-0 driver gives each microbatch
``dataplane.microbatch_timeout_s``; every frame carries the sender's remaining budget, and each
hop gives the next one what is left minus a reserve for its own backward. A hop that fails fast
(refused, busy, connection lost) is retried on another replica while budget remains; a hop that
times out has used the budget. Either way the stash is freed, the drop is counted and the router
steers new work away (bans with backoff). Nothing waits without a deadline.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import torch

from protocol.errors import ProtocolError, RemoteError
from protocol.framing import PREFIX_BYTES, read_frame, write_frame
from protocol.messages import (
    ActivationFrame,
    ErrorReply,
    EvalResult,
    GradientFrame,
    Message,
    decode_message,
    encode_message,
)
from swarm.dataplane.config import (
    BACKPRESSURE,
    BUSY_PAUSE_S,
    EVAL_HANDLER,
    HANDLER,
    PING_HANDLER,
    PONG,
    ScaleGuard,
)
from swarm.dataplane.state import PlaneState, StageCompute

logger = logging.getLogger(__name__)
REVIVE_EVERY_S = 1.0  # how often a suspended replica is pinged


class HopFailed(Exception):
    """No replica of the next stage answered a microbatch within its budget and retries. ``code`` is how the
    last try failed; ``reason`` is why the microbatch is lost, one of ``swarm.dataplane.config.DROP_REASONS``."""

    def __init__(self, code: str, message: str, reason: str = "error") -> None:
        super().__init__(message)
        self.code, self.reason = code, reason


# The reason a hop's last failure gives a drop: its own code, and a refusal's code when the replica refused.
_CODE_REASONS = {"expired": "deadline", "timeout": "deadline", "no_route": "no_route", "connection": "peer_lost",
                 "unresponsive": "peer_lost", "bad_reply": "refused"}


class _Unresponsive(Exception):
    """The replica did not answer a liveness ping while a hop to it was outstanding."""
_REMOTE_REASONS = {"expired": "deadline", "busy": "deadline", "no_route": "no_route", "downstream": "downstream",
                   "wrong_stage": "stage_moved", "no_stage": "stage_moved", "closed": "peer_lost",
                   "internal": "peer_lost"}


def drop_reason(code: str, remote: str | None) -> str:
    """One of ``DROP_REASONS`` for a hop that failed with ``code`` (and the replica's refusal ``remote``)."""
    if code == "remote":
        return _REMOTE_REASONS.get(remote or "", "refused")
    return _CODE_REASONS.get(code, "error")


@dataclass
class _Attempts:
    """One hop's tries so far: whom it asked, who was full, and why the last try failed."""

    tried: list[str] = field(default_factory=list)
    busy: list[str] = field(default_factory=list)  # replicas that were full: healthy, worth another try after a pause
    code: str = "no_route"
    last: str = "no replica of the next stage is known"
    remote: str | None = None  # the refusal's code, when the last try was refused
    failures: int = 0
    count: int = 0

    def failed(self, code: str, last: str, remote: str | None = None) -> None:
        self.code, self.last, self.remote = code, last, remote
        self.failures += 1


class HopSender:
    """Sends this stage's output to a replica of the next stage and returns its validated gradient."""

    def __init__(self, state: PlaneState) -> None:
        self.state = state
        # Finite garbage of absurd size from a neighbour: gradient replies.
        self.gradient_guard = ScaleGuard(state.config.outlier_ratio)
        self._reviving: dict[str, asyncio.Task] = {}  # suspended peers being pinged until they answer
        self._pings: dict[str, asyncio.Future] = {}  # the ping in flight to each peer, shared by its silent hops

    async def send_forward(self, out: torch.Tensor, ids: torch.Tensor, route: list[str], compute: StageCompute,
                           deadline: float) -> GradientFrame:
        """Send this stage's output one hop on (retrying other replicas) and return the validated reply.

        ``route``: the peers the microbatch went through before this one (stage 0 first)."""
        return await self._send(self._frame(out, ids, route, compute), compute, deadline, HANDLER)

    async def send_eval(self, out: torch.Tensor, ids: torch.Tensor, route: list[str], compute: StageCompute,
                        deadline: float) -> EvalResult:
        """An evaluation microbatch one hop on, on the evaluation handler (forward only from here on, on each
        stage's agreed weights); the last stage's validated :class:`EvalResult`. Retried like a training hop."""
        return await self._send(self._frame(out, ids, route, compute), compute, deadline, EVAL_HANDLER)

    def _frame(self, out: torch.Tensor, ids: torch.Tensor, route: list[str], compute: StageCompute) -> ActivationFrame:
        state = self.state
        return ActivationFrame(
            run_id=state.run_id, microbatch_id=next(state.ids), stage=compute.stage, route=[*route, state.peer_id],
            token_ids=ids, coefficients=out.detach().float().contiguous(), codec=state.wire.activation_codec,
            basis=compute.basis, step=getattr(getattr(compute, "work", None), "progress", 0),
        )

    async def _send(self, frame: ActivationFrame, compute: StageCompute, deadline: float, handler: str):
        state = self.state
        hop = _Attempts()
        while hop.failures <= state.config.max_retries:
            remaining = deadline - time.monotonic()
            if remaining <= 0.05:
                hop.code, hop.last = "expired", f"budget spent after {hop.count} attempt(s) ({hop.last})"
                break
            peer = state.router.choose(exclude=hop.tried)
            if peer is None and hop.busy and remaining > BUSY_PAUSE_S + 0.05:
                # Every replica left is full or not ready: backpressure, not failure. Wait and ask them again.
                await asyncio.sleep(BUSY_PAUSE_S)
                hop.tried = [p for p in hop.tried if p not in hop.busy]
                hop.busy.clear()
                continue
            if peer is None:
                break
            hop.count += 1
            if hop.count > 1 and handler == HANDLER:
                state.stats["microbatches_retried"] += 1
                state.events.pipeline_microbatch("retried")
            hop.tried.append(peer)
            reply = await self._attempt(peer, frame, compute, remaining, hop, handler)
            if reply is not None:
                return reply
        raise HopFailed(hop.code, hop.last, drop_reason(hop.code, hop.remote))

    async def _attempt(self, peer: str, frame: ActivationFrame, compute: StageCompute, remaining: float,
                       hop: _Attempts, handler: str = HANDLER) -> GradientFrame | EvalResult | None:
        """One try of ``frame`` on ``peer``: its validated reply, or None with the failure noted in ``hop``."""
        state = self.state
        frame.budget_s = remaining
        body = encode_message(frame, state.limits)
        state.router.started(peer)
        sent = time.monotonic()
        try:
            reply, reply_bytes = await self._exchange_live(peer, body, handler, remaining)
        except _Unresponsive as exc:
            state.router.failed(peer, hard=False)
            self._suspend(peer)
            hop.failed("unresponsive", f"{peer}: {exc}")
            return None
        except RemoteError as exc:
            soft = exc.remote_code in BACKPRESSURE or exc.remote_code in ("downstream", "expired")
            state.router.failed(peer, hard=not soft)
            if exc.remote_code in BACKPRESSURE:
                hop.code, hop.last, hop.remote = "remote", f"{peer}: {exc}", exc.remote_code
                hop.busy.append(peer)
            else:
                hop.failed("remote", f"{peer}: {exc}", exc.remote_code)
            return None
        except asyncio.CancelledError:
            state.router.failed(peer, hard=False)
            raise
        except TimeoutError:
            state.router.failed(peer, hard=True)
            hop.failed("timeout", f"{peer} did not answer within {remaining:.1f} s")
            return None
        except Exception as exc:  # connection refused/reset, a dead peer, a broken frame
            state.router.failed(peer, hard=True)
            hop.failed("connection", f"{peer}: {type(exc).__name__}: {exc}")
            return None
        finally:
            state.count_bytes("forward", "sent", frame.codec, len(body) + PREFIX_BYTES,
                              frame.coefficients.numel(), frame.token_ids.numel())
        check = self._check_reply if handler == HANDLER else self._check_eval
        problem = check(reply, frame, compute)
        if problem is not None:
            state.router.failed(peer, hard=True)
            state.stats["refused_bad_reply"] += 1
            state.events.pipeline_refused("bad_reply")
            hop.failed("bad_reply", f"{peer}: {problem}")
            return None
        if isinstance(reply, EvalResult):  # a routing success, not a training hop
            state.router.succeeded(peer, time.monotonic() - sent, 0)
            return reply
        state.count_bytes("backward", "received", reply.codec, reply_bytes, reply.grad.numel(), 0)
        state.router.succeeded(peer, time.monotonic() - sent, reply.queue)
        state.events.pipeline_hop(time.monotonic() - sent)
        return reply

    def _check_eval(self, reply: Message, frame: ActivationFrame, compute: StageCompute) -> str | None:
        if not isinstance(reply, EvalResult):
            return f"replied with {type(reply).__name__}, not an EvalResult"
        if reply.microbatch_id != frame.microbatch_id or reply.run_id != self.state.run_id:
            return f"evaluation result for microbatch {reply.microbatch_id} of run {reply.run_id[:64]!r}"
        if reply.stage != compute.num_stages - 1:
            return f"evaluation result from stage {reply.stage}, not the last ({compute.num_stages - 1})"
        tokens = frame.token_ids.shape[0] * (frame.token_ids.shape[1] - 1)
        if reply.tokens != tokens:
            return f"evaluation result scores {reply.tokens} tokens, the microbatch has {tokens}"
        if len(reply.agreed) != compute.num_stages - compute.stage - 1:
            return f"evaluation result names {len(reply.agreed)} stages' states, not the {compute.num_stages - compute.stage - 1} after this one"
        return None

    def _check_reply(self, reply: Message, frame: ActivationFrame, compute: StageCompute) -> str | None:
        if not isinstance(reply, GradientFrame):
            return f"replied with {type(reply).__name__}, not a GradientFrame"
        if reply.microbatch_id != frame.microbatch_id:
            return f"gradient for unknown microbatch {reply.microbatch_id} (sent {frame.microbatch_id})"
        if reply.run_id != self.state.run_id or reply.stage != compute.stage + 1:
            return f"gradient from run {reply.run_id[:64]!r} stage {reply.stage}"
        if tuple(reply.grad.shape) != tuple(frame.coefficients.shape):
            return f"gradient shape {list(reply.grad.shape)} for coefficients {list(frame.coefficients.shape)}"
        if compute.num_stages - 1 == reply.stage and reply.loss is None:
            return "the last stage's reply carries no loss"
        return self.gradient_guard.check(reply.grad, "gradient")

    async def _exchange_live(self, peer: str, body: bytes, handler: str, remaining: float) -> tuple[Message, int]:
        """:meth:`_exchange` within ``remaining`` seconds (TimeoutError after), pinging ``peer`` whenever it has
        been silent for ``dataplane.liveness_s``: a replica that is working (or queueing) answers the ping at
        once and is waited for; one that does not answer is given up (_Unresponsive) long before the deadline."""
        every = self.state.config.liveness_s
        if every <= 0:
            return await asyncio.wait_for(self._exchange(peer, body, handler), remaining)
        deadline = time.monotonic() + remaining
        task = asyncio.ensure_future(self._exchange(peer, body, handler))
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                await asyncio.wait({task}, timeout=min(left, every))
                if task.done():
                    return task.result()
                left = deadline - time.monotonic()
                answered = await self.ping(peer, min(every, left)) if left > 0 else True
                if answered is False and not task.done():
                    raise _Unresponsive(f"no answer to a liveness ping within {min(every, left):.1f} s")
        finally:
            if not task.done():
                task.cancel()

    async def ping(self, peer: str, timeout: float) -> bool | None:
        """Ask ``peer``'s liveness handler: True when it answered within ``timeout``, False when it did not,
        None when it could not be asked (e.g. a 1.4 peer without the handler: alive, but unknown). Hops to the
        same peer that are silent at once share one ping."""
        pending = self._pings.get(peer)
        if pending is None:
            pending = self._pings[peer] = asyncio.ensure_future(self._ping(peer, timeout))
            pending.add_done_callback(lambda _: self._pings.pop(peer, None))
        return await asyncio.shield(pending)

    async def _ping(self, peer: str, timeout: float) -> bool | None:
        from hivemind.p2p import PeerID

        async def ask() -> bool:
            _, reader, writer = await self.state.p2p.call_binary_stream_handler(PeerID.from_base58(peer),
                                                                                 PING_HANDLER)
            try:  # the handler was reached: from here on, anything but a well-formed PONG is no answer
                return await read_frame(reader, self.state.limits, timeout=None) == PONG
            except ProtocolError as exc:
                self.state.stats["pings_malformed"] += 1
                logger.info("replica %s answered a liveness ping with a malformed frame: %s", peer, exc)
                return False
            finally:
                writer.close()

        try:
            return await asyncio.wait_for(ask(), timeout)
        except TimeoutError:
            return False
        except asyncio.CancelledError:
            raise
        except Exception:
            return None

    def _suspend(self, peer: str) -> None:
        """No new work for ``peer`` (not a ban); ping it every second and take it back once it answers."""
        state = self.state
        router = state.router
        router.suspend(peer)
        state.stats["peers_suspended"] += 1
        logger.info("next-stage replica %s does not answer: no new work for it until it does", peer)
        if peer in self._reviving:
            return

        async def revive() -> None:
            try:
                while peer in router.suspended() and router is state.router:
                    await asyncio.sleep(REVIVE_EVERY_S)
                    if await self.ping(peer, max(state.config.liveness_s, REVIVE_EVERY_S)) is not False:
                        router.revive(peer)
                        state.stats["peers_revived"] += 1
                        logger.info("next-stage replica %s answers again: routing to it", peer)
            finally:
                self._reviving.pop(peer, None)

        self._reviving[peer] = asyncio.get_running_loop().create_task(revive())

    async def _exchange(self, peer: str, body: bytes, handler: str = HANDLER) -> tuple[Message, int]:
        from hivemind.p2p import PeerID

        state = self.state
        _, reader, writer = await state.p2p.call_binary_stream_handler(PeerID.from_base58(peer), handler)
        try:
            await write_frame(writer, body, timeout=None)
            raw = await read_frame(reader, state.limits, timeout=None)
            if raw is None:
                raise RemoteError("peer closed the stream without replying", remote_code="closed")
            reply = decode_message(raw, state.limits)
        finally:
            writer.close()
        if isinstance(reply, ErrorReply):
            raise RemoteError(f"[{reply.code}] {reply.message}", remote_code=reply.code, retry_after=reply.retry_after)
        return reply, len(raw) + PREFIX_BYTES
