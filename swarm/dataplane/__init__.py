"""The pipeline data plane: microbatches between stage replicas over hivemind P2P streams.

One hop is one request on a fresh P2P stream (handler ``protoswarm.pipeline.v1``): the sender
writes an :class:`ActivationFrame` and reads back a :class:`GradientFrame` (or an ErrorReply). A
middle stage answers by running its forward, forwarding the result one hop further the same way,
and backpropagating the gradient that comes back, so a microbatch's backward follows exactly the
replicas its forward used, and the stash of a stage lives only as long as its request:

    stage 0 ──A──▶ stage 1 ──A──▶ … ──A──▶ stage S-1   (forward, coefficients + ids)
    stage 0 ◀──G── stage 1 ◀──G── … ◀──G── stage S-1   (the replies: ∂L/∂c, loss)

Failure handling is nested deadlines (send.py); every input is untrusted (serve.py). The
``[dataplane]`` section is taken as it is (:class:`DataplaneConfig`), plus the ``[wire]`` codecs and
the model's widths. The compute itself is the node's (``node.pipeline.PipelineCompute``); the data
plane only needs the duck type :class:`StageCompute`. Docs: docs/pipeline.md.

- ``swarm.dataplane.config``  ``DataplaneConfig`` (the ``[dataplane]`` section), ``ScaleGuard`` (the
  outlier check on received tensors), ``HANDLER``, ``EVAL_HANDLER`` (evaluation microbatches),
  ``REFUSAL_CODES``, ``DROP_REASONS`` (why stage 0 drops a microbatch) and the limits the roles share.
- ``swarm.dataplane.state``   ``PlaneState``: what the roles share (the attached ``StageCompute``, the
  router, microbatch ids, counters, byte counting); ``PipelineEvents``, the metric hooks.
- ``swarm.dataplane.serve``   ``HopServer``: the handler; validates, refuses with codes, strikes and
  bans peers, runs the stage and relays a middle stage's output one hop on.
- ``swarm.dataplane.send``    ``HopSender``: one hop to a replica of the next stage (router choice,
  retries, deadlines, bans on hard errors, gradient reply validation); ``HopFailed``.
- ``swarm.dataplane.drive``   ``MicrobatchDriver``: stage 0's loop (``max_inflight`` backpressure,
  drawing batches, completing or dropping microbatches).
- ``swarm.dataplane.plane``   ``DataPlane``: this node's end of the pipeline, composing the three roles.
"""

from swarm.dataplane.config import (
    DROP_REASONS,
    EVAL_HANDLER,
    HANDLER,
    REFUSAL_CODES,
    DataplaneConfig,
    ScaleGuard,
)
from swarm.dataplane.drive import MicrobatchDriver
from swarm.dataplane.plane import DataPlane
from swarm.dataplane.send import HopFailed, HopSender
from swarm.dataplane.serve import HopServer
from swarm.dataplane.state import PipelineEvents, PlaneState, StageCompute

__all__ = [
    "DROP_REASONS",
    "EVAL_HANDLER",
    "HANDLER",
    "REFUSAL_CODES",
    "DataPlane",
    "DataplaneConfig",
    "HopFailed",
    "HopSender",
    "HopServer",
    "MicrobatchDriver",
    "PipelineEvents",
    "PlaneState",
    "ScaleGuard",
    "StageCompute",
]
