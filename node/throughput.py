"""How fast a run can go on given cards and links, from the config alone: the speed half of ``node plan``.

``speed_plan(cfg, tflops=..., mfu=..., link=...)`` predicts, for one card per stage and one access link
per node (the same rate each way):

- **compute**: the FLOPs a token costs each stage (below) over ``tflops × mfu``; the slowest stage sets
  ``compute_tokens_per_s``.
- **boundaries**: the bytes one microbatch puts on a hop, measured by encoding a real
  :class:`~protocol.messages.ActivationFrame` and :class:`~protocol.messages.GradientFrame` of the run's
  shape (token ids, the codec's scales, the header and the 12-byte frame prefix all counted), times
  ``TRANSPORT_OVERHEAD`` for TCP/IP, Ethernet and the libp2p stream framing. Three boundaries are
  compared: the dense model in bf16, the subspace model in bf16 and in int8. A middle stage's uplink
  carries its activations forward and its gradients backward; ``link_tokens_per_s`` is the rate the
  busiest direction of the busiest stage allows.
- **the pipeline**: a stage overlaps compute and transfers, so it passes ``n / max(compute, link)``
  tokens a second (n tokens a microbatch); a microbatch's round trip (every stage's compute, every
  hop's transfers both ways, 2 × (one-way delay + ``hop_overhead_s``) a hop) with
  ``dataplane.max_inflight`` in flight caps it at ``inflight · n / round trip``. A trip longer than
  ``dataplane.microbatch_timeout_s`` means stage 0 would drop every microbatch (``trip_exceeds_timeout``).
  Transfers are priced on an idle link: with several microbatches in flight they queue behind each
  other, so the plan is optimistic where the link's period and trip / inflight are close
  (BENCHMARKS.md, ``node plan`` against the tiny swarm: 0.72 of the plan for dense at 5 Mbit/s).
  ``gpu_utilisation`` is the pipeline's tokens/s over ``compute_tokens_per_s``. ``compression_needed``
  is how many times smaller than dense bf16 the boundary must be for the link to keep up with compute.
- **Streaming DiLoCo** (``diloco.enabled``): a fragment of the largest stage in ``wire.fragment_codec``
  (twice that with ``diloco.first_moment``: its first moment travels in a twin round at the same time),
  averaged by groups of G = ``min(replicas, exchange.max_group)``. ``exchange.mode = "balanced"`` (the
  default; swarm/exchange/balanced.py): a round trip to agree the group, then every member sends each
  slice to its reducer and its checker (2(G−1)/G of a fragment out and in, at once), then each reducer
  sends its slice's mean to the others ((G−1)/G out and in). ``"star"`` (swarm/exchange/star.py): the
  leader downloads every member's part and uploads the mean to each. The round's time is set against
  the inner step's for H (``diloco.inner_steps``, summed over replicas), P and τ: utilisation without
  overlap (τ = 0, blocking), with the paper's overlap (τ blocking), and for the default schedule
  (never blocks; ``link_busy`` > 1 means rounds cannot keep up and some are skipped). A blocking wait
  ends at ``exchange.timeout_s``, when the round is given up: ``rounds_time_out`` says every round
  would be. (It does not hold once a round outlasts ``exchange.gather_s``, where the swarm's leader
  or reducers stop gathering and replicas wait far less: docs/plan.md.) Every member is assumed
  dialable; the balanced figures are arithmetic not yet checked against a swarm (bench/plan_check.py ran
  the star).

FLOPs a token, per stage (multiply-adds × 2): every weight matmul of node/model.py (the U·Z writers as
two thin matmuls, dense writers on the last stage), causal attention (n/2 keys on average, scores
and values), the boundary's encode/decode through U and the LM head; training costs 3 × the forward
(forward, input and weight gradients), and ``dataplane.backward = "recompute"`` runs the forward again
on every stage but the last. Norms, RoPE, softmax and the optimizer step are not counted: they are part
of what MFU (model FLOPs utilisation, an assumption the caller states) absorbs.

Not modelled: the DHT's own traffic, the pipeline's and the fragment exchange's traffic sharing one
link, asymmetric links (cable uploads are often 1/10 of the download: give the upload rate), stragglers.
bench/plan_check.py validates the model against the tiny swarm on this machine's links (BENCHMARKS.md).
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass
from typing import Any

import torch

from configs import CONFIG_DIR
from node.config import ConfigError, RunConfig
from node.model import stage_layers, stage_parameters
from protocol.codecs import get_codec
from protocol.framing import PREFIX_BYTES
from protocol.messages import ActivationFrame, GradientFrame
from protocol.schema import encode_message

GPU_CATALOGUE = CONFIG_DIR / "hardware" / "gpus.toml"
# Bytes on the wire per byte of frame: TCP/IPv4 headers with timestamps and an Ethernet header (66 B)
# per 1,448-byte segment, plus yamux and noise framing (28 B per frame of up to 64 KiB). ACKs in the
# other direction are not counted.
TRANSPORT_OVERHEAD = 1.05
HOP_OVERHEAD_S = 0.001  # software time a hop adds to a microbatch's trip (bench/hop_latency.py: ~0.5 ms)
VARIANTS = {  # name → (subspace model?, activation and gradient codec)
    "dense_bf16": (False, "bf16"),
    "subspace_bf16": (True, "bf16"),
    "subspace_int8": (True, "int8"),
}
_PEER_ID = "12D3KooW" + "x" * 44  # the length of an ed25519 libp2p peer id


@dataclass(frozen=True)
class Gpu:
    name: str
    label: str
    bf16_tflops: float
    memory_gib: float
    source: str


def gpu_catalogue() -> dict[str, Gpu]:
    """The shipped cards (configs/hardware/gpus.toml), by name."""
    raw = tomllib.loads(GPU_CATALOGUE.read_text())
    return {name: Gpu(name=name, label=row["label"], bf16_tflops=float(row["bf16_tflops"]),
                      memory_gib=float(row["memory_gib"]), source=row["source"]) for name, row in raw.items()}


def find_gpu(name: str) -> Gpu:
    cards = gpu_catalogue()
    if name.lower() not in cards:
        raise ConfigError(f"unknown GPU {name!r}; the catalogue ({GPU_CATALOGUE.name}) has: {', '.join(cards)}")
    return cards[name.lower()]


# ------------------------------------------------------------------------------------------- compute

def stage_flops_per_token(cfg: RunConfig, ranges: list[range], s: int) -> float:
    """Training FLOPs one token costs stage ``s`` (see the module docstring for what is counted)."""
    m, n = cfg.model, cfg.train.seq_len
    d, k, hd = m.d_model, m.subspace_rank, m.d_model // m.n_heads
    last, first = s == len(ranges) - 1, s == 0
    rank = d if last or not k else k
    writer_extra = 0 if last or not k else k * d  # y·Uᵀ after the thin Z
    block = (d * m.n_heads * hd + d * 2 * m.kv_heads * hd + m.n_heads * hd * rank + writer_extra
             + d * 2 * m.hidden + m.hidden * rank + writer_extra + n * m.n_heads * hd)
    macs = len(ranges[s]) * block
    if k:
        macs += k * d if first else 0  # the embedding's k columns through U
        macs += 0 if last else k * d  # encode: x·U
        macs += 0 if first else k * d  # decode: c·Uᵀ
    if last:
        macs += d * m.vocab_size
    passes = 3 + (1 if cfg.dataplane.backward == "recompute" and not last and len(ranges) > 1 else 0)
    return 2.0 * macs * passes


# ------------------------------------------------------------------------------------------ boundary

def _variant_cfg(cfg: RunConfig, subspace: bool) -> RunConfig:
    if subspace == bool(cfg.model.subspace_rank):
        return cfg
    if subspace:
        raise ConfigError("this model has no subspace (model.subspace_rank is none): only dense_bf16 applies")
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, subspace_rank=None))


def hop_frame_bytes(cfg: RunConfig, codec: str, batch: int | None = None) -> tuple[int, int]:
    """(activation, gradient) frame bytes one microbatch puts on a hop, prefix included: real frames
    of batch 1 and 2 encoded, extrapolated to ``train.batch_size`` (the bytes are linear in it)."""
    m, n = cfg.model, cfg.train.seq_len
    width = m.subspace_rank or m.d_model
    gen = torch.Generator().manual_seed(0)
    sizes = []
    for b in (1, 2):
        ids = torch.randint(0, m.vocab_size, (b, n), generator=gen)
        values = torch.randn(b, n, width, generator=gen)
        act = ActivationFrame(run_id="run", microbatch_id=1 << 40, stage=0, route=[_PEER_ID], token_ids=ids,
                              coefficients=values, codec=codec, basis="f" * 16, step=1 << 20, budget_s=20.0)
        grad = GradientFrame(run_id="run", microbatch_id=1 << 40, stage=1, grad=values, codec=codec,
                             loss=2.5, step=1 << 20, queue=3)
        sizes.append((len(encode_message(act)) + PREFIX_BYTES, len(encode_message(grad)) + PREFIX_BYTES))
    b = cfg.train.batch_size if batch is None else batch
    return tuple(one + (b - 1) * (two - one) for one, two in zip(*sizes, strict=True))  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------- the plan

def _rate_bytes_per_s(rate_bps: float | None) -> float:
    return math.inf if rate_bps is None else rate_bps / 8.0


def _pipeline(cfg: RunConfig, compute_s: list[float], frames: tuple[int, int], rate: float, one_way_s: float,
              inflight: int) -> dict[str, Any]:
    """Tokens/s of the pipeline for per-stage compute seconds a microbatch and one boundary's frames."""
    n, S = cfg.train.batch_size * cfg.train.seq_len, len(compute_s)
    fwd, bwd = (TRANSPORT_OVERHEAD * b for b in frames)
    link_s = []
    for s in range(S):
        up = (fwd if s < S - 1 else 0) + (bwd if s > 0 else 0)
        down = (fwd if s > 0 else 0) + (bwd if s < S - 1 else 0)
        link_s.append(max(up, down) / rate)
    trip = sum(compute_s) + (S - 1) * ((fwd + bwd) / rate + 2 * one_way_s)
    period = max(max(c, lk) for c, lk in zip(compute_s, link_s, strict=True))
    tokens = n / max(period, trip / inflight)
    link_bound = max(link_s)
    return {"tokens_per_s": tokens, "link_tokens_per_s": math.inf if link_bound == 0 else n / link_bound,
            "link_bytes_per_token": (fwd + bwd) / n if S > 1 else 0.0, "round_trip_s": trip,
            "bound": "link" if max(link_s) >= max(compute_s) and max(link_s) * inflight >= trip
            else "latency" if trip / inflight > period else "compute",
            "inflight_needed": math.ceil(trip / period) if S > 1 else 1,
            "trip_exceeds_timeout": trip > cfg.dataplane.microbatch_timeout_s}


def speed_plan(cfg: RunConfig, *, tflops: float, mfu: float, link_rate_bps: float | None, delay_s: float = 0.0,
               hop_overhead_s: float = HOP_OVERHEAD_S, replicas: int = 8) -> dict[str, Any]:
    """The speed plan of ``cfg`` on cards of ``tflops`` (peak bf16 dense) at ``mfu``, over a link of
    ``link_rate_bps`` (None: unlimited) with a one-way ``delay_s``; a JSON-able dict."""
    if not (tflops > 0 and math.isfinite(tflops)):
        raise ConfigError(f"the card's TFLOP/s must be a positive number, got {tflops}")
    if not 0 < mfu <= 1:
        raise ConfigError(f"MFU must be in (0, 1], got {mfu}")
    if replicas < 1:
        raise ConfigError(f"replicas must be at least 1, got {replicas}")
    flops_s = tflops * 1e12 * mfu
    rate = _rate_bytes_per_s(link_rate_bps)
    one_way = delay_s + hop_overhead_s
    n = cfg.train.batch_size * cfg.train.seq_len
    ranges = stage_layers(cfg.model, cfg.pipeline)
    S, inflight = len(ranges), cfg.dataplane.max_inflight
    variants: dict[str, dict[str, Any]] = {}
    for name, (subspace, codec) in VARIANTS.items():
        if subspace and not cfg.model.subspace_rank:
            continue
        vcfg = _variant_cfg(cfg, subspace)
        vranges = stage_layers(vcfg.model, vcfg.pipeline)
        flops = [stage_flops_per_token(vcfg, vranges, s) for s in range(S)]
        compute_s = [n * f / flops_s for f in flops]
        frames = hop_frame_bytes(vcfg, codec) if S > 1 else (0, 0)
        pipe = _pipeline(vcfg, compute_s, frames, rate, one_way, inflight)
        variants[name] = {
            "compute_tokens_per_s": n / max(compute_s), "frame_bytes": {"activation": frames[0], "gradient": frames[1]},
            "stage_flops_per_token": flops, **pipe,
            "gpu_utilisation": pipe["tokens_per_s"] / (n / max(compute_s)),
        }
    own = "subspace_" + cfg.wire.activation_codec if cfg.model.subspace_rank else "dense_bf16"
    own = own if own in variants else next(iter(variants))
    base = variants[own]
    dense = variants["dense_bf16"]
    out: dict[str, Any] = {
        "model": cfg.model.name, "num_stages": S, "tokens_per_microbatch": n, "inflight": inflight,
        "assumptions": {"tflops": tflops, "mfu": mfu, "effective_tflops": round(flops_s / 1e12, 3),
                        "link": {"rate_bps": link_rate_bps, "one_way_delay_s": delay_s},
                        "hop_overhead_s": hop_overhead_s, "transport_overhead": TRANSPORT_OVERHEAD,
                        "backward": cfg.dataplane.backward, "replicas": replicas,
                        "layout": "one card per stage, one link per node, the same rate both ways"},
        "variant": own,
        "compute_tokens_per_s": _r(base["compute_tokens_per_s"]),
        "link_tokens_per_s": {k: _r(v["link_tokens_per_s"]) for k, v in variants.items()},
        "pipeline_tokens_per_s": {k: _r(v["tokens_per_s"]) for k, v in variants.items()},
        "gpu_utilisation": {k: round(v["gpu_utilisation"], 4) for k, v in variants.items()},
        "compression_needed": _r(max(1.0, base["compute_tokens_per_s"] / dense["link_tokens_per_s"]))
        if S > 1 else None,
        "compression": {k: _r(dense["link_bytes_per_token"] / v["link_bytes_per_token"])
                        for k, v in variants.items()} if S > 1 else None,
        "variants": {k: {key: _r(val) if isinstance(val, float) else val for key, val in v.items()}
                     for k, v in variants.items()},
    }
    if cfg.diloco.enabled:
        out["diloco"] = diloco_plan(cfg, ranges, flops_s, rate, one_way, replicas,
                                    step_s=n / base["tokens_per_s"])
    return out


def diloco_plan(cfg: RunConfig, ranges: list[range], flops_s: float, rate: float, one_way_s: float,
                replicas: int, step_s: float) -> dict[str, Any]:
    """Fragment rounds of the largest stage against its inner steps (``step_s`` a microbatch step)."""
    d, x = cfg.diloco, cfg.exchange
    S = len(ranges)
    params = max(stage_parameters(cfg.model, ranges[s], s, S) for s in range(S))
    fragments = min(d.fragments, params)
    codec = get_codec(cfg.wire.fragment_codec)
    part = TRANSPORT_OVERHEAD * codec.payload_nbytes(math.ceil(params / fragments))
    if d.first_moment:  # the fragment's first moment in a twin round beside the part, on the same link
        part *= 2
    group = max(1, min(replicas, x.max_group))
    balanced = x.mode == "balanced"
    if balanced:  # the roster's round trip, the slices to reducers and checkers, the means back
        share = (group - 1) / group * part / rate
        gather_s = 2 * share + 3 * one_way_s if group > 1 else 0.0  # every slice at its reducer
        round_s = 3 * share + 4 * one_way_s if group > 1 else 0.0
    else:  # the members' parts share the leader's link on the way in, the mean shares it on the way out
        transfer = (group - 1) * part / rate
        gather_s = transfer + 2 * one_way_s if group > 1 else 0.0  # every part at the leader
        round_s = 2 * transfer + 4 * one_way_s if group > 1 else 0.0
    # Past exchange.gather_s the leader (or a reducer) averages what it has and refuses the parts still
    # coming ("late"): such a round averages nothing.
    averages = group > 1 and gather_s <= x.gather_s
    tau = d.overlap
    phase_s = _phase_s(d.inner_steps / fragments, step_s, replicas, cfg.swarm.refresh_s)
    waits = _blocking_waits(group, averages, gather_s, round_s, x.gather_s, x.timeout_s, balanced)

    def util(shift_s: float) -> float:  # the replicas' mean wait, each shortened by shift_s of training
        wait = sum(max(0.0, w - shift_s) for w in waits) / len(waits)
        return phase_s / (phase_s + wait)

    busy = round_s / phase_s if phase_s else math.inf
    kept = round(min(1.0, 1.0 / busy), 4) if busy else 1.0
    return {
        "exchange": x.mode, "stage_parameters": params, "fragments": fragments, "replicas": replicas, "group": group,
        "codec": cfg.wire.fragment_codec, "fragment_bytes": round(part), "first_moment": d.first_moment,
        "inner_steps_summed": d.inner_steps, "overlap": tau,
        "inner_step_s": _r(step_s), "round_s": _r(round_s), "round_in_inner_steps": _r(round_s / step_s),
        "gather_s": _r(gather_s), "rounds_average": averages or group == 1,
        "replica_steps_between_rounds": _r(phase_s / step_s), "record_refresh_s": cfg.swarm.refresh_s,
        "blocking_wait_s": {"leader": _r(waits[0]), "member": _r(waits[-1])},
        "utilisation": {"no_overlap": round(util(0.0), 4), "overlap_blocking": round(util(tau * step_s), 4),
                        "default": 1.0},
        "link_busy": _r(busy),
        "default_rounds_kept": kept if averages or group == 1 else 0.0,
        # to keep up with the inner steps, and to reach the leader within exchange.gather_s
        "compression_needed": _r(max(1.0, busy, gather_s / x.gather_s)),
        "exchange_timeout_s": x.timeout_s, "exchange_gather_s": x.gather_s,
        "rounds_time_out": round_s > x.timeout_s,
    }


def _phase_s(spacing: float, step_s: float, replicas: int, refresh_s: float) -> float:
    """Seconds between two boundaries. A replica crosses when its own steps since the last one plus
    the others' published counts reach ``spacing`` (U, summed over replicas); it sees the others'
    counts through DHT records up to ``refresh_s`` old. Alone it needs U steps; with R replicas,
    t = (U·step + (R − 1)·refresh) / R once the records arrive before it gets there alone."""
    alone = spacing * step_s
    return min(alone, (alone + (replicas - 1) * refresh_s) / replicas)


def _blocking_waits(group: int, averages: bool, gather_s: float, round_s: float, gather_cap_s: float,
                    timeout_s: float, balanced: bool = False) -> list[float]:
    """One group's waits for a round under diloco.blocking: the leader's first, then each member's.
    Star: the leader has its mean once the parts are in (or at ``gather_cap_s``, alone); a member waits
    for the mean, or, when its part lands after the leader closed the round, until it has sent it.
    Balanced: every member waits for every slice's mean, or until its slices are sent and refused."""
    if group == 1:
        return [0.0]
    if balanced:
        return [min(round_s if averages else gather_s, timeout_s)] * group
    if averages:
        return [gather_s] + [min(round_s, timeout_s)] * (group - 1)
    return [gather_cap_s] + [min(gather_s, timeout_s)] * (group - 1)


def _r(value: float) -> float | None:
    if value is None or math.isinf(value):
        return None
    return float(f"{value:.4g}")


def format_speed(plan: dict[str, Any]) -> str:
    """A :func:`speed_plan` for people."""
    a = plan["assumptions"]
    rate = a["link"]["rate_bps"]
    lines = [f"speed: {plan['model']} in {plan['num_stages']} stage(s), {a['tflops']:g} TFLOP/s cards at MFU "
             f"{a['mfu']:g} ({a['effective_tflops']:g} effective), link "
             f"{'unlimited' if rate is None else f'{rate / 1e6:g} Mbit/s'} each way, one-way delay "
             f"{a['link']['one_way_delay_s'] * 1e3:g} ms; {plan['tokens_per_microbatch']} tokens a microbatch, "
             f"{plan['inflight']} in flight",
             f"  compute-bound: {_fmt(plan['compute_tokens_per_s'])} tokens/s (slowest stage)"]
    if plan["num_stages"] > 1:
        lines.append(f"  {'boundary':<14} {'link tok/s':>11} {'pipeline tok/s':>15} {'GPU util':>9} {'B/token':>9}  bound")
        for name, v in plan["variants"].items():
            lines.append(f"  {name:<14} {_fmt(v['link_tokens_per_s']):>11} {_fmt(v['tokens_per_s']):>15} "
                         f"{v['gpu_utilisation']:>9.3f} {v['link_bytes_per_token']:>9.1f}  {v['bound']}")
        late = [name for name, v in plan["variants"].items() if v["trip_exceeds_timeout"]]
        if late:
            lines.append(f"  a microbatch's round trip exceeds dataplane.microbatch_timeout_s for {', '.join(late)}: "
                         "stage 0 would drop every microbatch (raise the timeout)")
        lines.append(f"  compression over dense bf16 needed to keep the GPU busy: {plan['compression_needed']:g}x "
                     f"(have: " + ", ".join(f"{k} {v:g}x" for k, v in plan["compression"].items()) + ")")
    if "diloco" in plan:
        dl = plan["diloco"]
        u = dl["utilisation"]
        lines.append(f"  Streaming DiLoCo: {dl['fragment_bytes'] / 1e6:.3g} MB fragments ({dl['codec']}), groups of "
                     f"{dl['group']} ({dl['exchange']} exchange), a round {_fmt(dl['round_s'])} s = {_fmt(dl['round_in_inner_steps'])} inner steps; "
                     f"{_fmt(dl['replica_steps_between_rounds'])} steps a replica between rounds (records every "
                     f"{dl['record_refresh_s']:g} s)")
        lines.append(f"    utilisation: no overlap {u['no_overlap']:.3f}, tau={dl['overlap']} blocking "
                     f"{u['overlap_blocking']:.3f}, default (never blocks) 1.0 with {dl['default_rounds_kept']:.0%} "
                     f"of rounds kept (link busy {_fmt(dl['link_busy'])})")
        if not dl["rounds_average"]:
            where, then = (("their reducers", "they average what they have") if dl["exchange"] == "balanced"
                           else ("the leader", "it averages its own part alone"))
            lines.append(f"    the parts reach {where} after {_fmt(dl['gather_s'])} s, past exchange.gather_s = "
                         f"{dl['exchange_gather_s']:g} s: {then} and the rest is refused late, so no round "
                         "averages anything (compress the fragments more)")
        if dl["rounds_time_out"]:
            lines.append(f"    a round takes longer than exchange.timeout_s = {dl['exchange_timeout_s']:g} s: every round "
                         "would time out and be skipped (raise the timeout, or compress the fragments more)")
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "unbounded" if value is None else f"{value:,.4g}"
