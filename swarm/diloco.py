"""Streaming DiLoCo's outer loop for one replica: fragments, the shared schedule, the outer step.

This module is the arithmetic of DESIGN §1.2, with no network: the fragment exchange (groups,
deadlines, 4-bit parts over P2P) calls into it, and so do the golden tests, which check it against a
straightforward re-implementation.

- **Fragments.** A stage's parameters are cut into *units*: one unit per transformer block (every
  parameter under ``...blocks.<i>.``) and one per remaining parameter (embedding, final norm, LM
  head), in the module's order. Fragment ``p`` holds units ``p, p+P, p+2P, ...`` (``strided``, the
  paper's default: each fragment spans the depth) or the ``p``-th contiguous run of them
  (``sequential``). :class:`FragmentLayout` flattens a fragment into one fp32 vector and back, so a
  part on the wire is one tensor whatever the fragment holds.
- **Schedule.** Progress ``t`` is an integer count of inner steps (the daemon sums it over the
  replicas of a stage, so fast and slow replicas meet at the same rounds). Fragment ``p`` syncs at
  ``t_p + r·H`` for every ``r >= 0`` where that is ``> 0``, with ``t_p = floor(p·H/P)``: the
  boundary of round ``r``. :func:`due` lists the boundaries a progress jump crosses, in order, and
  the (fragment, round) pair is a pure function of the counter, the same on every replica.
- **Outer step.** At a boundary a replica calls :meth:`OuterLoop.begin`: its outer gradient for the
  fragment, ``Δ_p = θ_global,p − θ_local,p``. The swarm averages the replicas' Δ_p (every replica must
  average *the same values*, so with a lossy codec a replica uses its own part quantized too, as
  :func:`quantized` does). ``overlap`` (τ) inner steps later the replica calls
  :meth:`OuterLoop.apply` with the mean: Nesterov SGD on the global copy (``m ← μ·m + Δ``,
  ``θ̃ = θ_global − lr·(Δ + μ·m)``), then ``θ_global,p ← θ̃`` and ``θ_local,p ← α·θ_local,p + (1−α)·θ̃``,
  which keeps part of the τ steps of local progress made while the exchange ran (``merge = "since"``:
  ``θ_local,p ← θ̃ + (θ_local,p − θ_local,p at begin)``, exactly those τ steps on top of θ̃). A round with no
  mean (the exchange failed or was skipped) changes nothing: the next round's Δ covers both periods.
- **Robust mean.** :func:`robust_mean` drops non-finite parts and parts whose norm is more than
  ``max_norm_ratio`` times the lower median norm, so one peer cannot poison the average.

The knobs are the ``[diloco]`` config section itself, :class:`DilocoConfig`; a stage runs on
:meth:`DilocoConfig.for_units` of it (P capped at the stage's units, H a multiple of P).

The global copy and momentum are float32 on ``outer_device`` (the CPU by default, in page-locked
memory when the parameters are on a GPU: DESIGN §1.2 counts them as +66% over data parallel, which an
accelerator need not hold). A fragment crosses between the two as one flat vector each way per round.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from protocol.codecs import Codec, MeanAccumulator, all_finite, get_codec
from protocol.settings import ConfigError, check_positive, setting

FRAGMENT_MODES = ("strided", "sequential")
MERGES = ("alpha", "since")
OUTER_DEVICES = ("auto", "cpu", "pinned", "device")
_BLOCK = re.compile(r"^(.*?blocks\.\d+)\.")


@dataclass(kw_only=True)
class DilocoConfig:
    """Streaming DiLoCo among the replicas of each stage (run-level: every replica must agree)."""

    SECTION = "diloco"

    enabled: bool = setting(
        True, "Average each stage's replicas with Streaming DiLoCo (false: replicas train apart).")
    inner_steps: int = setting(
        400, "H: inner optimizer steps, summed over a stage's replicas, between two syncs of one fragment "
        "(4 replicas at H=400 each take about 100 steps).")
    fragments: int = setting(4, "P: fragments a stage's parameters are cut into (1..H); one is synced every H/P "
                             "summed steps (capped at the stage's blocks + other parameters).")
    fragment_mode: str = setting(
        "strided", "'strided': fragment p holds blocks p, p+P, ... ; 'sequential': contiguous.")
    outer_lr: float = setting(0.8, "Outer SGD learning rate on the averaged outer gradient (0.8: BENCHMARKS.md, \"Streaming "
                              "DiLoCo vs data parallel\", the full run: better than 0.4 on two seeds).")
    inner_lr: float | None = setting(
        None, "Peak inner AdamW learning rate of a stage whose replicas sync (warm-up and cosine as train.lr's); "
        "None = train.lr. Streaming DiLoCo's replicas train on a share of the batch each and do better at a lower "
        "rate than data parallel's (BENCHMARKS.md, \"Streaming DiLoCo vs data parallel\"); node train-local "
        "ignores it.")
    outer_momentum: float = setting(0.9, "Outer Nesterov momentum.")
    nesterov: bool = setting(True, "Nesterov (true) or plain heavy-ball (false) outer momentum.")
    overlap: int = setting(1, "τ: this replica's inner steps between the start of a fragment's exchange and its use "
                           "(0..H-1).")
    blocking: bool = setting(
        False, "Wait τ steps after a boundary until the fragment's mean is back (the paper's schedule; 0 = no "
        "overlap). false: never stall; the mean is applied at the first step it is back and τ have passed.")
    alpha: float = setting(
        0.5, "Weight of the local parameters when an averaged fragment is merged (0 = take it whole); "
        "merge = 'alpha' only.")
    merge: str = setting(
        "alpha", "How a replica takes an averaged fragment: 'alpha' (θ_local ← α·θ_local + (1−α)·θ_global, the "
        "paper's) or 'since' (θ_local ← θ_global + the replica's own change since its part was taken: exactly the "
        "τ overlapped steps kept on the new global copy; at τ = 0 the global copy whole). 'since' keeps one more "
        "copy of the fragment in flight (fp32, on outer_device).")
    error_feedback: bool = setting(
        False, "Keep what quantizing this replica's part lost (wire.fragment_codec) and add it to its next part "
        "of that fragment (+4 bytes a parameter of outer state; the residual starts over after a resync or resume).")
    first_moment: bool = setting(
        False, "Average each synced fragment's inner AdamW first moment too, sent in wire.fragment_codec beside "
        "the part (about twice the bytes a round); each replica clips the mean to its own Adam bound "
        "(swarm/first_moment.py).")
    resync_rounds: int = setting(
        3, "A replica that falls more than this many rounds behind downloads the stage's state again.")
    outer_device: str = setting(
        "auto", "Where the global copy and momentum live (node-local): 'auto' (pinned host memory when training "
        "on CUDA, else the CPU), 'cpu', 'pinned' (page-locked host memory; needs CUDA) or 'device' (the GPU: "
        "+8 bytes a parameter there).")

    def __post_init__(self) -> None:
        if self.outer_device not in OUTER_DEVICES:
            raise ConfigError(f"diloco.outer_device must be one of {OUTER_DEVICES}, got {self.outer_device!r}")
        for name in ("inner_steps", "fragments", "overlap", "resync_rounds"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigError(f"diloco.{name} must be an integer, got {value!r}")
        check_positive(self, "inner_steps", "fragments", "outer_lr", "resync_rounds", "inner_lr")
        if self.fragments > self.inner_steps:
            raise ConfigError(f"diloco.fragments={self.fragments} exceeds diloco.inner_steps={self.inner_steps}: "
                              "every fragment needs its own offset")
        if self.merge not in MERGES:
            raise ConfigError(f"diloco.merge must be one of {MERGES}, got {self.merge!r}")
        if self.fragment_mode not in FRAGMENT_MODES:
            raise ConfigError(f"diloco.fragment_mode must be one of {FRAGMENT_MODES}, got {self.fragment_mode!r}")
        if not 0.0 <= self.outer_momentum < 1.0:
            raise ConfigError(f"diloco.outer_momentum must be in [0, 1), got {self.outer_momentum!r}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"diloco.alpha must be in [0, 1], got {self.alpha!r}")
        if not 0 <= self.overlap < self.inner_steps:
            raise ConfigError(f"diloco.overlap (τ) must be in [0, diloco.inner_steps={self.inner_steps}), "
                              f"got {self.overlap}")

    def for_units(self, n_units: int) -> DilocoConfig:
        """This config for a stage of ``n_units`` units (blocks and other parameters): P capped at them,
        H rounded down to a multiple of P so the P offsets are evenly spaced, τ kept below that H."""
        fragments = max(1, min(self.fragments, n_units))
        inner = max(1, self.inner_steps // fragments) * fragments
        return dataclasses.replace(self, inner_steps=inner, fragments=fragments, overlap=min(self.overlap, inner - 1))

    def offset(self, fragment: int) -> int:
        """t_p: the progress at which fragment ``p``'s round 0 falls (floor(p·H/P))."""
        return fragment * self.inner_steps // self.fragments


# ---------------------------------------------------------------------------------------- schedule

@dataclass(frozen=True, order=True)
class Boundary:
    """One sync point: at progress ``at``, fragment ``fragment`` starts its round ``round``."""

    at: int
    fragment: int
    round: int


def due(settings: DilocoConfig, before: int, now: int) -> list[Boundary]:
    """Boundaries in ``(before, now]``, in progress order (then fragment order); [] if ``now <= before``."""
    if now <= before:
        return []
    H, found = settings.inner_steps, []
    for p in range(settings.fragments):
        t_p = settings.offset(p)
        # smallest r with t_p + r·H > max(before, 0)
        r = max(0, (max(before, 0) - t_p) // H + 1)
        while (at := t_p + r * H) <= now:
            found.append(Boundary(at, p, r))
            r += 1
    return sorted(found)


# ---------------------------------------------------------------------------------------- fragments

def units(names: Iterable[str]) -> list[list[str]]:
    """Parameter names grouped into units (a transformer block, or one other parameter), in order."""
    grouped: dict[str, list[str]] = {}
    for name in names:
        match = _BLOCK.match(name)
        grouped.setdefault(match.group(1) if match else name, []).append(name)
    return list(grouped.values())


def split_fragments(names: Sequence[str], count: int, mode: str = "strided") -> list[list[str]]:
    """The parameter names of each of ``count`` fragments (see the module docstring)."""
    if mode not in FRAGMENT_MODES:
        raise ValueError(f"fragment mode must be one of {FRAGMENT_MODES}, got {mode!r}")
    groups = units(names)
    if not 1 <= count <= len(groups):
        raise ValueError(f"{count} fragment(s) asked of {len(groups)} unit(s) (blocks and other parameters); "
                         f"use between 1 and {len(groups)}")
    if mode == "strided":
        picked = [groups[p::count] for p in range(count)]
    else:
        bounds = [round(i * len(groups) / count) for i in range(count + 1)]
        picked = [groups[bounds[p]:bounds[p + 1]] for p in range(count)]
    return [[name for unit in unit_list for name in unit] for unit_list in picked]


class FragmentLayout:
    """Names, shapes and offsets of one fragment's parameters in its flat fp32 vector."""

    def __init__(self, named: Mapping[str, torch.Tensor] | Sequence[tuple[str, torch.Tensor]]):
        items = list(named.items()) if isinstance(named, Mapping) else list(named)
        self.names = [name for name, _ in items]
        self.shapes = [tuple(t.shape) for _, t in items]
        self.sizes = [math.prod(shape) for shape in self.shapes]
        self.numel = sum(self.sizes)

    def flatten(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """One fp32 vector of the fragment's tensors, in layout order, on the tensors' device (one
        concatenation there: moving it elsewhere is then one copy, not one per tensor)."""
        if not self.names:
            return torch.zeros(0)
        return torch.cat([tensors[n].detach().reshape(-1).float() for n in self.names])

    def unflatten(self, vector: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of ``vector`` (length :attr:`numel`) shaped as the fragment's tensors."""
        if tuple(vector.shape) != (self.numel,):
            raise ValueError(f"a fragment vector of {self.numel} values was expected, got shape {list(vector.shape)}")
        return {n: v.view(shape) for n, v, shape in zip(self.names, vector.split(self.sizes), self.shapes, strict=True)}


# ---------------------------------------------------------------------------------------- the outer loop


def history_tag(history: list[str]) -> str:
    """16 hex digits naming a stage's agreed state by its per-fragment history (:meth:`OuterLoop.history`)."""
    return hashlib.sha256("|".join(history).encode()).hexdigest()[:16]

class OuterLoop:
    """One replica's outer state: the global copy and momentum of each fragment, and the step.

    ``params`` are the live (inner-optimized) parameters by name, e.g. ``dict(module.named_parameters())``;
    they are updated in place by :meth:`apply`. Not thread-safe: call it where the inner optimizer runs.
    """

    def __init__(self, params: Mapping[str, torch.Tensor], settings: DilocoConfig,
                 outer_device: str | torch.device = "cpu", pin_memory: bool = False) -> None:
        self.settings = settings
        self.params = dict(params)
        self.outer_device = torch.device(outer_device)
        # Page-locked host memory for the outer state when the parameters are on a GPU: fragments move
        # between them in one DMA copy each way, and host memory is what a volunteer has more of.
        self.pin_memory = pin_memory and self.outer_device.type == "cpu"
        names = split_fragments(list(self.params), settings.fragments, settings.fragment_mode)
        self.layouts = [FragmentLayout([(n, self.params[n]) for n in fragment]) for fragment in names]
        self.global_ = [self._outer(self._flat(p)) for p in range(settings.fragments)]
        self.momentum = [self._outer(torch.zeros_like(g)) for g in self.global_]
        self.rounds_applied = [0] * settings.fragments
        # History of each fragment: the last round applied and a hash chain over every (round, mean)
        # applied. Replicas that applied the same means hold the same chain whatever their floats.
        # One (round, chain) tuple per fragment, replaced whole: a reader on another thread (the record
        # publisher) never sees a round with the previous round's chain.
        self._history: list[tuple[int, bytes]] = [(-1, bytes(32))] * settings.fragments
        self._pending: dict[int, int] = {}  # fragment -> round begun and not yet applied
        # Error feedback: what quantizing each fragment's last sent part lost (None: nothing yet), and
        # the part begun this round, until its round ends.
        self.residual: list[torch.Tensor | None] = [None] * settings.fragments
        self._parts: dict[int, torch.Tensor] = {}
        self._taken: dict[int, torch.Tensor] = {}  # merge = 'since': the local fragment each pending part was taken from

    def _flat(self, fragment: int) -> torch.Tensor:
        """The fragment's live parameters as one fp32 vector, where the parameters are."""
        return self.layouts[fragment].flatten(self.params)

    def _outer(self, tensor: torch.Tensor) -> torch.Tensor:
        """A new fp32 copy of ``tensor`` on the outer device (pinned when configured): one copy."""
        out = torch.empty(tensor.shape, dtype=torch.float32, device=self.outer_device, pin_memory=self.pin_memory)
        out.copy_(tensor, non_blocking=self.pin_memory)
        if self.pin_memory and tensor.is_cuda:
            torch.cuda.current_stream(tensor.device).synchronize()  # the copy must land before it is read
        return out

    def _param_device(self, fragment: int) -> torch.device:
        names = self.layouts[fragment].names
        return self.params[names[0]].device if names else self.outer_device

    def begin(self, fragment: int, round_id: int) -> torch.Tensor:
        """Δ_p = θ_global,p − θ_local,p now (flat fp32, on ``outer_device``): this replica's part. With
        ``error_feedback``, plus what quantizing the fragment's last committed part lost."""
        if fragment in self._pending:
            raise RuntimeError(f"fragment {fragment}: round {self._pending[fragment]} was begun and never applied")
        self._pending[fragment] = round_id
        local = self._outer(self._flat(fragment))
        part = self.global_[fragment] - local
        if self.settings.merge == "since":
            self._taken[fragment] = local
        if self.settings.error_feedback:
            if self.residual[fragment] is not None:
                part.add_(self.residual[fragment])
            self._parts[fragment] = part.clone()
        return part

    def pending(self, fragment: int) -> int | None:
        """The round begun on ``fragment`` and not yet applied, if any."""
        return self._pending.get(fragment)

    @torch.no_grad()
    def apply(self, fragment: int, mean_delta: torch.Tensor | None, sent: torch.Tensor | None = None) -> bool:
        """Finish the pending round of ``fragment`` with the group's mean Δ (None: the round was skipped).
        ``sent``: this replica's part as the others decoded it (for error feedback; None: sent exactly).

        Returns True if parameters changed. A skipped round leaves the global copy, the momentum, the
        local parameters and the error-feedback residual as they are (the next Δ covers both periods).
        """
        round_id = self._pending.pop(fragment, None)
        part = self._parts.pop(fragment, None)
        taken = self._taken.pop(fragment, None)
        if round_id is None:
            raise RuntimeError(f"fragment {fragment}: apply() without begin()")
        if mean_delta is None:
            return False
        s, layout = self.settings, self.layouts[fragment]
        delta = mean_delta.to(self.outer_device, torch.float32).reshape(-1)
        if delta.numel() != layout.numel or not all_finite(delta):
            raise ValueError(f"fragment {fragment}: the mean outer gradient must be {layout.numel} finite values")
        m = self.momentum[fragment]
        m.mul_(s.outer_momentum).add_(delta)
        step = delta.add(m, alpha=s.outer_momentum) if s.nesterov else m
        self.global_[fragment].sub_(step, alpha=s.outer_lr)
        # The merge runs where the parameters are: the new global copy crosses once, whole.
        fresh = self.global_[fragment].to(self._param_device(fragment), non_blocking=self.pin_memory)
        if taken is not None:  # merge = 'since': the new global copy plus this replica's τ steps since begin()
            fresh = fresh + (self._flat(fragment) - taken.to(fresh.device, non_blocking=self.pin_memory))
            for name, value in layout.unflatten(fresh).items():
                self.params[name].copy_(value)
        else:
            for name, value in layout.unflatten(fresh).items():
                param = self.params[name]
                param.mul_(s.alpha).add_(value.to(param.dtype), alpha=1.0 - s.alpha)
        if self.pin_memory and fresh.is_cuda:
            torch.cuda.current_stream(fresh.device).synchronize()  # the pinned source is written again later
        self.rounds_applied[fragment] += 1
        if part is not None:  # error feedback: what the wire lost of the part that went into this mean
            self.residual[fragment] = part.sub_(sent.to(part.device, torch.float32).reshape(-1)) \
                if sent is not None else None
        digest = hashlib.sha256(self._history[fragment][1] + round_id.to_bytes(8, "little", signed=True))
        digest.update(delta.cpu().numpy().tobytes())
        self._history[fragment] = (round_id, digest.digest())
        return True

    @property
    def last_round(self) -> list[int]:
        return [r for r, _ in self._history]

    @property
    def chain(self) -> list[bytes]:
        return [c for _, c in self._history]

    def history(self) -> list[str]:
        """Per fragment ``"<last round>:<chain prefix>"``: what replicas compare to find drifted copies."""
        return [f"{r}:{c.hex()[:16]}" for r, c in list(self._history)]

    def agreed_tag(self) -> str:
        """A short name of the global copies: equal on every replica that applied the same means (the
        validation measurements and exports of one agreed state carry the same tag)."""
        return history_tag(self.history())

    def reset(self) -> None:
        """Restart the outer state from the current parameters (global copy = them, momentum 0)."""
        self.global_ = [self._outer(self._flat(p)) for p in range(self.settings.fragments)]
        self.momentum = [self._outer(torch.zeros_like(g)) for g in self.global_]
        self.rounds_applied = [0] * self.settings.fragments
        self._history = [(-1, bytes(32))] * self.settings.fragments
        self._pending.clear()
        self.residual, self._parts, self._taken = [None] * self.settings.fragments, {}, {}

    def state_dict(self, copy: bool = True) -> dict:
        """Global copies, momenta and round counts (for checkpoints and joiners' state sync): copies on the
        CPU, or with ``copy=False`` the live tensors (for a writer that holds the owner's lock)."""
        take = (lambda t: t.to("cpu", copy=True)) if copy else (lambda t: t)
        return {"global": [take(g) for g in self.global_],
                "momentum": [take(m) for m in self.momentum],
                "rounds_applied": list(self.rounds_applied), "last_round": list(self.last_round),
                "chain": list(self.chain)}

    def load_state_dict(self, state: Mapping) -> None:
        for key, own in (("global", self.global_), ("momentum", self.momentum)):
            got = state[key]
            if len(got) != len(own) or any(tuple(a.shape) != tuple(b.shape) for a, b in zip(got, own, strict=True)):
                raise ValueError(f"outer state {key!r} does not match this stage's {len(own)} fragment(s)")
        self.global_ = [self._outer(t) for t in state["global"]]
        self.momentum = [self._outer(t) for t in state["momentum"]]
        self.rounds_applied = [int(r) for r in state["rounds_applied"]]
        n = len(self.global_)
        rounds = [int(r) for r in state.get("last_round", [-1] * n)]
        chains = [bytes(c) for c in state.get("chain", [bytes(32)] * n)]
        if len(rounds) != n or len(chains) != n or any(len(c) != 32 for c in chains):
            raise ValueError("outer state history does not match the fragments")
        self._history = list(zip(rounds, chains, strict=True))
        self._pending.clear()
        # The residual is this replica's own (never in a state another replica sends): it starts over.
        self.residual, self._parts, self._taken = [None] * len(self.global_), {}, {}


# ---------------------------------------------------------------------------------------- averaging

def quantized(part: torch.Tensor, codec: str | Codec) -> tuple[bytes, torch.Tensor]:
    """``(payload, what every receiver will decode)``: a replica averages its own part as sent."""
    codec = get_codec(codec) if isinstance(codec, str) else codec
    payload = codec.encode(part.to("cpu", torch.float32).contiguous())
    return payload, codec.decode(payload, tuple(part.shape))


@dataclass
class MeanResult:
    mean: torch.Tensor | None  # None when no part survived
    kept: list[int]
    rejected: dict[int, str]  # index -> reason ("non_finite", "shape", "norm")


def robust_mean(parts: Sequence[torch.Tensor], max_norm_ratio: float = 10.0,
                weights: Sequence[float] | None = None, max_weight_ratio: float = 4.0) -> MeanResult:
    """FP32 mean of the parts that are finite, of the right size, and whose L2 norm is at most
    ``max_norm_ratio`` × the lower median of the finite, non-zero norms. The parts' size is the most
    common one; with two parts the lower median is the smaller norm, so of an honest part and a huge
    one, the huge one goes.

    ``weights`` (e.g. each replica's inner steps since its last part; None: equal) weigh the kept
    parts, each capped at ``max_weight_ratio`` × the lower median of the kept parts' weights, so no
    part counts for more than that however much its sender claims."""
    if not max_norm_ratio >= 1.0:
        raise ValueError(f"max_norm_ratio must be >= 1, got {max_norm_ratio!r}")
    if weights is not None and (len(weights) != len(parts) or not all(0 < w < math.inf for w in weights)):
        raise ValueError("weights must be one positive finite number per part")
    rejected: dict[int, str] = {}
    numel = statistics.mode([p.numel() for p in parts]) if parts else 0
    norms: dict[int, float] = {}
    for i, part in enumerate(parts):
        if part.numel() != numel or part.dim() != 1:
            rejected[i] = "shape"
        elif not all_finite(part):
            rejected[i] = "non_finite"
        else:
            norms[i] = float(torch.linalg.vector_norm(part.to(torch.float32)))
    moved = [norm for norm in norms.values() if norm > 0]  # an idle replica's zero part sets no scale
    if moved:
        bound = max_norm_ratio * statistics.median_low(moved)
        for i, norm in norms.items():
            if norm > bound:
                rejected[i] = "norm"
    kept = [i for i in range(len(parts)) if i not in rejected]
    if not kept:
        return MeanResult(None, [], rejected)
    cap = max_weight_ratio * statistics.median_low([weights[i] for i in kept]) if weights is not None else 1.0
    acc = MeanAccumulator((numel,))
    for i in kept:
        acc.add(parts[i], weight=min(weights[i], cap) if weights is not None else 1.0)
    return MeanResult(acc.mean(), kept, rejected)
