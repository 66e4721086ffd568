"""Every stage of a model in one process (:class:`StageChain`), crossing each boundary as a swarm does."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from node.config import RunConfig, TrainConfig
from node.engine import StageEngine, build_engine
from node.model import Stage, shared_tensors
from protocol.codecs import get_codec


@dataclass
class StagedStep:
    """One microbatch through a :class:`StageChain`: its loss and what crossed each boundary."""

    loss: float
    boundaries: list[torch.Tensor] = field(default_factory=list)  # output of stage s, s = 0..S-2
    boundary_grads: list[torch.Tensor] = field(default_factory=list)  # ∂L/∂ output of stage s


class StageChain:
    """Every stage of a model in one process, one engine each, crossing every boundary as a swarm does:
    the only coupling between stages is the boundary tensor (no autograd edge), so this is the swarm's
    computation without the network. ``node train-local`` trains with it; the exactness tests compare
    it with the unsplit :class:`node.model.LanguageModel`."""

    def __init__(self, engines: Sequence[StageEngine], codecs: tuple[str, str] | None = None) -> None:
        """``codecs``: (activation, gradient) wire codecs every boundary and its gradient are rounded
        through, as a swarm's network would (None: passed exactly)."""
        if not engines or not engines[0].is_first or not engines[-1].is_last:
            raise ValueError("a chain needs every stage, first to last")
        self.engines = list(engines)
        self._keys = 0
        self.codecs = None if codecs is None else tuple(get_codec(name) for name in codecs)

    @classmethod
    def build(cls, cfg: RunConfig, device: torch.device | str = "cpu", backward: str = "stash",
              wire: bool = False) -> StageChain:
        """Engines for all of ``cfg``'s stages at their seeded init, sharing one basis and table; ``wire``
        rounds the boundaries through ``cfg.wire``'s activation and gradient codecs."""
        shared = shared_tensors(cfg.model, torch.device(device))
        codecs = (cfg.wire.activation_codec, cfg.wire.gradient_codec) if wire else None
        return cls([build_engine(cfg, s, device, backward=backward, shared=shared)
                    for s in range(cfg.pipeline.num_stages)], codecs)

    def _wire(self, tensor: torch.Tensor, which: int) -> torch.Tensor:
        if self.codecs is None:
            return tensor
        codec = self.codecs[which]
        return codec.decode(codec.encode(tensor.detach().float().cpu()), tuple(tensor.shape)).to(tensor.device)

    @classmethod
    def around(cls, stages: Sequence[Stage], train: TrainConfig, backward: str = "stash") -> StageChain:
        """Engines around stage modules that already exist (e.g. an unsplit ``LanguageModel``'s stages,
        for the exactness tests): the same parameter tensors, on the device they are on."""
        return cls([StageEngine(stage, train, next(stage.parameters()).device, backward=backward) for stage in stages])

    @property
    def progress(self) -> int:
        return self.engines[-1].progress

    def train_microbatch(self, ids: torch.Tensor, record: bool = False) -> StagedStep:
        """Forward and backward of one window through every stage (each engine steps on its own after
        ``train.grad_accum`` microbatches). ``record`` keeps copies of the boundaries and their gradients."""
        self._keys += 1
        key, boundary, out = self._keys, None, StagedStep(loss=math.nan)
        for engine in self.engines[:-1]:
            boundary = self._wire(engine.forward(key, ids, boundary), 0)
            if record:
                out.boundaries.append(boundary.clone())
        out.loss, grad = self.engines[-1].forward_backward_last(ids, boundary)
        for engine in reversed(self.engines[:-1]):
            grad = self._wire(grad, 1)
            if record:
                out.boundary_grads.insert(0, grad.clone())
            grad = engine.backward(key, grad)
        return out

    def evaluate(self, ids: torch.Tensor) -> float:
        """The loss of one window, forward only."""
        boundary = None
        for i, engine in enumerate(self.engines):
            boundary = engine.infer(ids, boundary)
            if i < len(self.engines) - 1:
                boundary = self._wire(boundary, 0)
        return float(boundary)

    def modules(self) -> list[Stage]:
        return [e.module for e in self.engines]
