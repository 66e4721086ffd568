"""Streaming DiLoCo's replicas agreeing in one process: the harness of the golden test, the
poisoning test and bench/diloco.py (the swarm agrees through swarm/exchange/star.py instead)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from protocol.codecs import Codec, get_codec
from swarm.diloco import DilocoConfig, OuterLoop, due, quantized, robust_mean
from swarm.first_moment import FirstMoment


class InProcessGroup:
    """M replicas' outer loops agreeing in one process as the fragment exchange makes them agree: at
    each boundary every replica's part (as sent: quantized with ``codec`` when given) goes through
    :func:`robust_mean`, and the mean is applied τ inner steps later (at once with τ = 0). The golden
    test, the benches and the poisoning test drive replicas with it; the swarm uses swarm/exchange/star.py.

    ``corrupt(replica, part) -> part``, if given, replaces what a replica sends (a poisoner). ``moments``
    (one :class:`swarm.first_moment.FirstMoment` per replica, for ``diloco.first_moment``): each replica's
    first moment of the fragment goes through the same codec and mean beside its part, and is merged
    when the part's mean is applied. Call :meth:`after_step` once after every replica finished inner
    step ``t`` (1-based).
    """

    def __init__(self, loops: Sequence[OuterLoop], settings: DilocoConfig, codec: str | Codec | None = None,
                 max_norm_ratio: float = 10.0, corrupt=None, requantize_mean: bool = False,
                 moments: Sequence[FirstMoment] | None = None):
        self.loops, self.settings, self.max_norm_ratio, self.corrupt = list(loops), settings, max_norm_ratio, corrupt
        if moments is not None and len(moments) != len(self.loops):
            raise ValueError(f"one first-moment exchange per replica: {len(moments)} for {len(self.loops)}")
        self.moments = list(moments) if moments is not None else None
        self.codec = get_codec(codec) if isinstance(codec, str) else codec
        self.requantize_mean = requantize_mean  # the mean rounded with ``codec`` again, as a leader sends it
        # fragment -> (step begun, mean part, parts as sent, mean first moment)
        self.in_flight: dict[int, tuple[int, torch.Tensor, list[torch.Tensor] | None, torch.Tensor | None]] = {}
        self.rejected: list[dict[int, str]] = []  # per round: replica → reason, when any part was dropped
        self.kept: list[list[int]] = []

    def after_step(self, t: int) -> int:
        """Finish rounds whose τ steps are done, start the rounds due at ``t``; returns the payload bytes
        one replica sent at this step."""
        tau, sent = self.settings.overlap, 0
        for p in [p for p, (t0, *_) in self.in_flight.items() if tau > 0 and t0 + tau == t]:
            self._apply(p, *self.in_flight.pop(p)[1:])
        for b in due(self.settings, t - 1, t):
            parts = [loop.begin(b.fragment, b.round) for loop in self.loops]
            as_sent, sent = self._as_sent(parts, sent)
            if as_sent is not None:
                parts = as_sent
            moment = None
            if self.moments is not None:  # the first moments travel and are averaged as the parts are
                ms = [fm.snapshot(b.fragment) for fm in self.moments]
                ms_sent, sent = self._as_sent(ms, sent)
                moment = robust_mean(ms_sent if ms_sent is not None else ms, self.max_norm_ratio).mean
            if self.corrupt is not None:
                parts = [self.corrupt(r, part) for r, part in enumerate(parts)]
            result = robust_mean(parts, self.max_norm_ratio)
            self.kept.append(result.kept)
            if result.rejected:
                self.rejected.append(dict(result.rejected))
            if result.mean is None:
                for r, loop in enumerate(self.loops):  # every part dropped: the round is skipped, as a leader would
                    loop.apply(b.fragment, None)
                    if self.moments is not None:
                        self.moments[r].merge(b.fragment, None, 0)
                continue
            mean = result.mean
            if self.requantize_mean and self.codec is not None:
                mean = quantized(mean, self.codec)[1]
            self.in_flight[b.fragment] = (t, mean, as_sent, moment)
            if tau == 0:
                self._apply(b.fragment, *self.in_flight.pop(b.fragment)[1:])
        return sent

    def _as_sent(self, values: list[torch.Tensor], sent: int) -> tuple[list[torch.Tensor] | None, int]:
        """``values`` as receivers decode them (None: sent exact, fp32) and ``sent`` plus one replica's bytes."""
        if self.codec is None:
            return None, sent + 4 * values[0].numel()
        return [quantized(v, self.codec)[1] for v in values], sent + self.codec.payload_nbytes(values[0].numel())

    def _apply(self, fragment: int, mean: torch.Tensor, as_sent: list[torch.Tensor] | None,
               moment: torch.Tensor | None) -> None:
        for r, loop in enumerate(self.loops):
            applied = loop.apply(fragment, mean, sent=as_sent[r] if as_sent is not None else None)
            if self.moments is not None:
                self.moments[r].merge(fragment, moment if applied else None, self.settings.overlap)
