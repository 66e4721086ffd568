"""Averaging the inner AdamW first moment of each synced fragment (``diloco.first_moment``).

Between two syncs every replica's AdamW keeps its own moving averages of the gradient (``exp_avg``, m)
and of its square (``exp_avg_sq``, v). After an outer step the replicas share their parameters but
not their m, so each keeps pushing in the direction of its own shard's recent gradients. With
``diloco.first_moment`` every fragment's part travels with that fragment's m (in the same codec, as a
second round beside the part's: a round costs about twice the bytes), the replicas average it like
the part, and each replica takes the mean as its m:

- **When.** m is read when the round begins (:meth:`FirstMoment.snapshot`) and replaced when its mean
  is applied, τ of this replica's steps later (:meth:`FirstMoment.merge`). The replica's own steps
  since then are kept: ``m ← m_now + β1^τ·(mean − m_then)``, which is exactly the m the replica would
  hold had the mean replaced its m when the round began and the same τ gradients followed.
- **Clipped to this replica's own bound.** AdamW's moments satisfy |m| ≤ c·√v element by element
  whatever the gradients, with c = √((1−β1)² / ((1−β2)(1 − β1²/β2))) (1.165 at β 0.9/0.95; Cauchy-
  Schwarz over the two moving averages, :func:`first_moment_bound`). A mean taken from replicas whose
  gradients are larger can break it where this replica's v is small, and the step m/√v then grows past
  anything Adam would take on its own; the merged m is clipped back to ± c·√v (BENCHMARKS.md: without
  the clip the norm check dropped parts, with it none, and the loss was lower on every seed).

Only the optimizer state changes: the parameters, the global copies and the history chain are the
outer step's, so replicas that disagree about m (a moment round that failed for some of them) still
hold the same agreed state.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from protocol.codecs import all_finite
from swarm.exchange import RoundKey


def first_moment_bound(beta1: float, beta2: float) -> float:
    """The largest |m| / √v AdamW's own moments reach (any gradients, any number of steps): by Cauchy-Schwarz
    over the two moving averages, √(Σ a_i² / b_i) with a_i = (1−β1)β1^i and b_i = (1−β2)β2^i, which needs
    β1² < β2; 1.165 at (0.9, 0.95)."""
    if not beta1 * beta1 < beta2:
        raise ValueError(f"no bound on the first moment with beta1² >= beta2 ({beta1}, {beta2})")
    return ((1 - beta1) ** 2 / ((1 - beta2) * (1 - beta1 * beta1 / beta2))) ** 0.5


def clip_to_bound_(m: torch.Tensor, v: torch.Tensor, bound: float) -> None:
    """Clip ``m`` in place, element by element, to ± ``bound`` × √``v``."""
    limit = v.sqrt().mul_(bound)
    torch.minimum(m, limit, out=m)
    torch.maximum(m, limit.neg_(), out=m)


class FirstMoment:
    """One replica's first-moment exchange: reads and replaces ``optimizer``'s ``exp_avg`` of each fragment.

    ``params``: the live parameters by name (those ``optimizer`` steps); ``layouts``: each fragment's
    :class:`swarm.diloco.FragmentLayout`. Call it where the optimizer steps (not thread-safe)."""

    def __init__(self, optimizer: torch.optim.Optimizer, params: Mapping[str, torch.Tensor],
                 layouts: Sequence, beta1: float, beta2: float) -> None:
        self.optimizer, self.params, self.layouts = optimizer, dict(params), list(layouts)
        self.beta1 = float(beta1)
        self.bound = first_moment_bound(beta1, beta2)
        self._then: dict[int, torch.Tensor] = {}  # fragment -> its m when its round began (exact)

    def _state(self, name: str) -> dict | None:
        state = self.optimizer.state.get(self.params[name])
        return state if state and "exp_avg" in state and "exp_avg_sq" in state else None

    @torch.no_grad()
    def snapshot(self, fragment: int) -> torch.Tensor:
        """The fragment's m now, flat fp32 on the CPU (zeros for parameters that took no step yet): what this
        replica sends. Kept until :meth:`merge` (a second snapshot replaces it), so callers only read it."""
        layout = self.layouts[fragment]
        pieces = []
        for name, size in zip(layout.names, layout.sizes, strict=True):
            state = self._state(name)
            pieces.append(state["exp_avg"].reshape(-1).float().cpu() if state is not None else torch.zeros(size))
        flat = torch.cat(pieces) if pieces else torch.zeros(0)
        self._then[fragment] = flat
        return flat

    @torch.no_grad()
    def merge(self, fragment: int, mean: torch.Tensor | None, steps: int) -> bool:
        """Take the group's mean m of ``fragment`` (None: no mean, nothing changes), ``steps`` of this
        replica's optimizer steps after the snapshot; True when m changed. A mean of the wrong size or
        with a non-finite value is refused (ValueError) before anything changes."""
        then = self._then.pop(fragment, None)
        if mean is None or then is None:
            return False
        layout = self.layouts[fragment]
        mean = mean.reshape(-1).to("cpu", torch.float32)
        if mean.numel() != layout.numel or not all_finite(mean):
            raise ValueError(f"fragment {fragment}: the mean first moment must be {layout.numel} finite values")
        shift = (mean - then).mul_(self.beta1 ** max(0, int(steps)))  # β1^τ (mean − m_then); the mean stays as given
        changed = False
        for name, delta in layout.unflatten(shift).items():
            state = self._state(name)
            if state is None:  # no step taken yet: the next step starts m from this gradient alone
                continue
            m, v = state["exp_avg"], state["exp_avg_sq"]
            m.add_(delta.to(m.device, m.dtype))
            clip_to_bound_(m, v, self.bound)
            changed = True
        return changed

    def forget(self) -> None:
        """Drop the snapshots of rounds that will not be merged (the stage's state was replaced)."""
        self._then.clear()


async def round_with_moment(exchange: Any, key: RoundKey, part: torch.Tensor, weight: float,
                            moment: torch.Tensor | None) -> Any:
    """``exchange.run_round`` of the part; with a first moment (``exchange``'s fragments doubled: p's moment is
    fragment P + p), the moment's round at the same time, its mean in the part's result as ``moment`` (None
    where it averaged nothing: this replica's own m back is no mean) and its bytes in the result's."""
    if moment is None:
        return await exchange.run_round(key, part, weight)
    of_moment = RoundKey(key.stage, key.fragment + len(exchange.fragment_sizes) // 2, key.round)
    result, averaged = await asyncio.gather(exchange.run_round(key, part, weight),
                                            exchange.run_round(of_moment, moment, weight))
    result.moment = averaged.mean if averaged.group_size > 1 else None
    result.bytes_sent += averaged.bytes_sent
    result.bytes_received += averaged.bytes_received
    return result
