"""Forward and backward of one stage on boundary tensors, as a pipeline peer runs it.

``StageRunner.forward`` takes what arrived from upstream (coefficients, or nothing on the first
stage) and returns what goes downstream (coefficients, or the loss on the last stage), keeping the
autograd graph of that microbatch. ``StageRunner.backward`` takes the gradient of the loss with
respect to the stage's output boundary, accumulates parameter gradients, and returns the gradient
with respect to its input boundary — k numbers per token for a subspace model. Stashes are keyed
by microbatch id and can be dropped (a microbatch whose downstream died).

``run_staged`` chains runners in one process, crossing every boundary through the codec; it is
what the exactness benchmark and tests compare against the unsplit ``LanguageModel``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from node.model import LanguageModel, Stage, lm_loss


@dataclass
class _Stash:
    boundary_in: torch.Tensor | None
    output: torch.Tensor


class StageRunner:
    """Runs one ``Stage`` for many concurrent microbatches."""

    def __init__(self, stage: Stage) -> None:
        self.stage = stage
        self._stash: dict[int, _Stash] = {}

    @property
    def in_flight(self) -> int:
        return len(self._stash)

    def forward(
        self,
        microbatch: int,
        ids: torch.Tensor,
        boundary_in: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run the stage; returns a detached output boundary, or the detached loss on the last stage."""
        if microbatch in self._stash:
            raise ValueError(f"microbatch {microbatch} is already in flight on stage {self.stage.index}")
        if self.stage.is_first != (boundary_in is None):
            raise ValueError(f"stage {self.stage.index}: boundary_in must be given to every stage but the first")
        if self.stage.is_last and targets is None:
            raise ValueError("the last stage needs targets to compute the loss")
        leaf = None
        if boundary_in is not None:
            leaf = boundary_in.detach().requires_grad_(True)
        output = self.stage(leaf, ids)
        if self.stage.is_last:
            output = lm_loss(output, targets)
        self._stash[microbatch] = _Stash(leaf, output)
        return output.detach()

    def backward(self, microbatch: int, grad_out: torch.Tensor | None = None, loss_scale: float = 1.0) -> torch.Tensor | None:
        """Backpropagate one microbatch; returns the gradient for the upstream stage (None on the first).

        ``grad_out`` is the gradient w.r.t. this stage's output boundary; the last stage passes None and
        its loss is scaled by ``loss_scale`` (e.g. 1/grad_accum).
        """
        stash = self._stash.pop(microbatch)
        if self.stage.is_last:
            (stash.output * loss_scale).backward()
        else:
            if grad_out is None:
                raise ValueError(f"stage {self.stage.index} needs the gradient of its output boundary")
            stash.output.backward(grad_out.to(stash.output.dtype))
        return None if stash.boundary_in is None else stash.boundary_in.grad

    def drop(self, microbatch: int) -> bool:
        """Forget a microbatch's stash (its downstream failed); True when there was one."""
        return self._stash.pop(microbatch, None) is not None


@dataclass
class StagedStep:
    loss: float
    boundaries: list[torch.Tensor]
    boundary_grads: list[torch.Tensor]


def run_staged(model: LanguageModel, ids: torch.Tensor, targets: torch.Tensor, loss_scale: float = 1.0) -> StagedStep:
    """Forward and backward through every stage, crossing each boundary as a swarm would.

    Boundaries are cloned on the way (what would be serialized), so no autograd edge connects stages:
    the only coupling is the tensors a peer would send.
    """
    runners = [StageRunner(stage) for stage in model.stages]
    boundary, boundaries = None, []
    for runner in runners:
        out = runner.forward(0, ids, boundary, targets if runner.stage.is_last else None)
        if not runner.stage.is_last:
            boundary = out.clone()
            boundaries.append(boundary)
    loss = out.item()
    grad, grads = None, []
    for runner in reversed(runners):
        grad = runner.backward(0, grad, loss_scale)
        if grad is not None:
            grad = grad.clone()
            grads.append(grad)
    return StagedStep(loss=loss, boundaries=boundaries, boundary_grads=grads[::-1])
