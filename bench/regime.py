"""Time-scaled emulation of a target regime (``PRESET:GPU:LINK``) with the tiny CPU swarm: bench/wan.py --regime.

A volunteer's card computes a token orders of magnitude faster than these 2 CPU cores, and its model
sends orders of magnitude more bytes a token. What decides how much the link costs is the *ratio* of
link time to compute time, so the lab's links are shaped to give the tiny swarm the target's ratio:

- **pipeline**: for each boundary (dense bf16, subspace bf16, subspace int8), with B the bytes a token
  puts on a middle stage's link (node/throughput.py, real frames) and C the compute time a token costs
  the slowest stage (target: its FLOPs over the card's peak × MFU; tiny: measured by bench/plan_check.py's
  calibration, times nodes / cores because the 3 nodes share this machine's cores):

      tiny rate  = target rate  × (B_tiny / B_target) × (C_target / C_tiny)
      tiny delay = target delay × (C_tiny / C_target)            (time runs C_tiny / C_target slower)

  and the target's deadlines (``dataplane.microbatch_timeout_s``, ``wire.frame_timeout_s``) are
  stretched by the same C_tiny / C_target.

  Each boundary gets its own scaled link, so each row has the target's ratio for that boundary. The
  tiny swarm's tokens/s times C_tiny / C_target is the target's equivalent. What is not emulated: the
  depth (3 stages stand for S; a deep pipeline's latency bound with few microbatches in flight is
  the plan's figure, reported beside), the target's own per-hop software overhead, and the DHT and
  /health polls, which share the shaped links (bytes the target would not send at the target's scale).
- **diloco**: one fragment round against one inner step. With F the bytes of one fragment's part and
  T the time of one inner step (target: the plan's; tiny: calibrated, times replicas / cores):

      tiny rate = target rate × (F_tiny / F_target) × (T_target / T_tiny)

  and the tiny run takes the target's schedule in each replica's steps (H summed over the same number
  of replicas, P, τ), the target's exchange deadlines and record refresh scaled by T_tiny / T_target.
  The tiny replicas train at ``--tiny-batch`` (default 1): the shorter the tiny step, the faster the
  scaled link and the shorter a round in the tiny swarm's time. A round ends when it commits or at
  the (scaled) ``exchange.timeout_s``, when it is given up; the window (twice ``--window-s``) is
  stretched to hold ``MIN_ROUND_ENDS`` of them, and when that would pass ``MAX_DILOCO_WINDOW_S``, the
  regime is not emulable here and the JSON says so. A scaled rate under
  ``MIN_RATE_BPS`` is run but flagged ``below_min_rate``: the DHT's and the polls' own traffic then
  takes a real share of the link, which each row measures (``background_share``, beside
  ``step_s_measured`` against the ``step_s_assumed`` the scaling used).
- **hivemind**: hivemind.Optimizer's synchronous DP over the DiLoCo scaling's link and batch for the
  same wall-clock window (its fp16 gradients scale with the model as the fragments do).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from wan import PIPE_VARIANTS  # bench/wan.py (this folder is on sys.path): the same boundaries

from node.config import RunConfig, load_config
from node.memory import GIB, smallest_stages
from node.model import stage_layers
from node.throughput import Gpu, find_gpu, speed_plan
from swarm.sim.link import LinkSpec

MFU = 0.4  # the target's model FLOPs utilisation: an assumption, as in node plan
MIN_RATE_BPS = 1e6
MAX_DILOCO_WINDOW_S = 600.0  # the longest DiLoCo window a schedule is given
MIN_ROUND_ENDS = 3  # a DiLoCo run must see this many fragment rounds end (committed or given up) in its window
TINY_PIPE = "swarm/pipeline-local"
TINY_DILOCO = "swarm/diloco-local"


@dataclasses.dataclass(frozen=True)
class Regime:
    preset: str
    gpu: Gpu
    link: LinkSpec

    def __str__(self) -> str:
        return f"{self.preset}:{self.gpu.name}:{self.link}"


def parse_regime(text: str) -> Regime:
    """``8b:rtx4090:80mbit`` or ``1b:h100:20mbit,delay=30ms``."""
    parts = text.split(":", 2)
    if len(parts) != 3 or not all(parts):
        raise ValueError(f"a regime is PRESET:GPU:LINK (e.g. 8b:rtx4090:80mbit), got {text!r}")
    preset, gpu, link_text = parts
    load_config(f"model/{preset}")  # an unknown preset fails here, with the config loader's message
    link = LinkSpec.parse(link_text)
    if link is None or link.rate_bps is None:
        raise ValueError(f"the regime's link needs a rate (e.g. 80mbit), got {link_text!r}")
    return Regime(preset, find_gpu(gpu), link)


def target_config(regime: Regime, stages: int | None, diloco: bool, overrides: list[str] = ()) -> RunConfig:
    """The target run: node/config.py's defaults with the preset's model; ``stages`` None = one layer per
    stage for the pipeline (the split the issue works out), the whole model for DiLoCo."""
    model = load_config(f"model/{regime.preset}").model
    base = [f"diloco.enabled={'true' if diloco else 'false'}", *overrides]
    cfg = load_config(None, base)
    cfg = dataclasses.replace(cfg, model=model)
    count = 1 if diloco else (stages or model.n_layers)
    return dataclasses.replace(cfg, pipeline=dataclasses.replace(cfg.pipeline, num_stages=count, layer_splits=None))


def target_fits(cfg: RunConfig, gpu: Gpu) -> dict[str, Any]:
    from node.memory import plan

    result = plan(cfg, int(gpu.memory_gib * GIB), "cuda")
    return {"fits": result["fits"], "largest_stage_gib": result["largest_stage_gib"],
            "smallest_stages_that_fit": smallest_stages(cfg, int(gpu.memory_gib * GIB), "cuda")
            if cfg.pipeline.num_stages > 1 else None}


def pipeline_scales(regime: Regime, target: RunConfig, tiny_stage_s: dict[str, list[float]],
                    contention: float) -> dict[str, dict[str, Any]]:
    """Per boundary: the tiny link and the factors. ``tiny_stage_s[variant]``: calibrated seconds per
    microbatch of each tiny stage (one thread, no contention)."""
    plan_t = speed_plan(target, tflops=regime.gpu.bf16_tflops, mfu=MFU, link_rate_bps=regime.link.rate_bps,
                        delay_s=regime.link.delay_s)
    out = {}
    for name, extra in PIPE_VARIANTS.items():
        tiny = load_config(TINY_PIPE, extra)
        n_tiny = tiny.train.batch_size * tiny.train.seq_len
        plan_s = speed_plan(tiny, tflops=1.0, mfu=1.0, link_rate_bps=None)  # for the bytes only
        b_tiny = plan_s["variants"][name]["link_bytes_per_token"]
        b_target = plan_t["variants"][name]["link_bytes_per_token"]
        c_target = 1.0 / plan_t["variants"][name]["compute_tokens_per_s"]
        c_tiny = max(tiny_stage_s[name]) * contention / n_tiny
        rate = regime.link.rate_bps * (b_tiny / b_target) * (c_target / c_tiny)
        # the target's deadlines in the tiny swarm's slower time (a microbatch's, a frame's)
        deadlines = [f"dataplane.microbatch_timeout_s={target.dataplane.microbatch_timeout_s * c_tiny / c_target:.1f}",
                     f"wire.frame_timeout_s={max(target.wire.frame_timeout_s, target.wire.frame_timeout_s * c_tiny / c_target):.1f}"]
        out[name] = {
            "overrides": [*extra, *deadlines], "tiny_link": str(LinkSpec(rate, regime.link.delay_s * c_tiny / c_target)),
            "rate_bps": rate, "delay_s": regime.link.delay_s * c_tiny / c_target,
            "bytes_per_token": {"tiny": b_tiny, "target": b_target, "ratio": b_tiny / b_target},
            "compute_s_per_token": {"tiny": c_tiny, "target": c_target, "ratio": c_target / c_tiny},
            "rate_factor": rate / regime.link.rate_bps, "time_factor": c_tiny / c_target,
            # under MIN_RATE_BPS the DHT's and the polls' own traffic (~0.2 Mbit/s a node) distorts the row
            "below_min_rate": rate < MIN_RATE_BPS,
            "plan_target": {k: plan_t["variants"][name][k] for k in ("tokens_per_s", "link_tokens_per_s",
                                                                     "gpu_utilisation", "bound", "round_trip_s",
                                                                     "trip_exceeds_timeout")},
        }
    enough = dataclasses.replace(target, dataplane=dataclasses.replace(target.dataplane,
                                                                       max_inflight=4 * target.pipeline.num_stages))
    deep = speed_plan(enough, tflops=regime.gpu.bf16_tflops, mfu=MFU, link_rate_bps=regime.link.rate_bps,
                      delay_s=regime.link.delay_s)
    for name in out:
        out[name]["plan_target_enough_inflight"] = {
            "inflight": enough.dataplane.max_inflight,
            **{k: deep["variants"][name][k] for k in ("tokens_per_s", "gpu_utilisation", "bound")}}
    return out


def diloco_scale(regime: Regime, target: RunConfig, replicas: int, tiny_step_s: float, tiny_batch: int,
                 contention: float) -> dict[str, Any]:
    """The tiny DiLoCo run's link, schedule and deadlines for the target's fragment round vs inner step.

    ``tiny_step_s``: calibrated seconds of one tiny inner step at ``tiny_batch`` sequences (one thread)."""
    plan_t = speed_plan(target, tflops=regime.gpu.bf16_tflops, mfu=MFU, link_rate_bps=regime.link.rate_bps,
                        delay_s=regime.link.delay_s, replicas=replicas)["diloco"]
    d = target.diloco
    tiny = load_config(TINY_DILOCO, [f"diloco.inner_steps={d.inner_steps}", f"diloco.fragments={d.fragments}",
                                     f"diloco.overlap={d.overlap}"])
    plan_s = speed_plan(tiny, tflops=1.0, mfu=1.0, link_rate_bps=None, replicas=replicas)["diloco"]
    f_tiny, f_target = plan_s["fragment_bytes"], plan_t["fragment_bytes"]
    t_target = plan_t["inner_step_s"]
    batch, step = tiny_batch, tiny_step_s * contention
    rate = regime.link.rate_bps * (f_tiny / f_target) * (t_target / step)
    dilation = step / t_target
    x, sw = target.exchange, target.swarm
    # The records' refresh too (the DHT's traffic, how soon the summed schedule is seen), floored at the
    # tiny demo's own 2 s; expiry keeps its ratio to it.
    refresh = max(2.0, sw.refresh_s * dilation)
    overrides = [f"diloco.inner_steps={d.inner_steps}", f"diloco.fragments={d.fragments}",
                 f"train.batch_size={batch}", f"swarm.refresh_s={refresh:.3f}",
                 f"swarm.expiry_s={refresh * sw.record_expiry_s / sw.refresh_s:.3f}",
                 f"exchange.timeout_s={x.timeout_s * dilation:.3f}", f"exchange.gather_s={x.gather_s * dilation:.3f}"]
    return {
        "round_end_tiny_s": min(plan_t["round_s"], x.timeout_s) * dilation,
        "tiny_link": str(LinkSpec(rate, regime.link.delay_s * dilation)), "rate_bps": rate,
        "delay_s": regime.link.delay_s * dilation, "overrides": overrides, "tiny_batch": batch,
        "fragment_bytes": {"tiny": f_tiny, "target": f_target, "ratio": f_tiny / f_target},
        "inner_step_s": {"tiny": step, "target": t_target}, "time_factor": dilation,
        "rate_factor": rate / regime.link.rate_bps, "replicas": replicas,
        "schedule": {"inner_steps_summed": d.inner_steps, "fragments": d.fragments, "overlap": d.overlap},
        "plan_target": plan_t,
    }


def stages_of(cfg: RunConfig) -> int:
    return len(stage_layers(cfg.model, cfg.pipeline))


# ------------------------------------------------------------------------------------------ the runs

def calibrate_step(config: str, overrides: list[str], repeats: int = 7, warmup: int = 2) -> float:
    """Median seconds of one inner step (forward, loss, backward, AdamW) of a one-stage config, one thread."""
    import statistics
    import time

    import torch

    from node.engine import build_engine

    torch.set_num_threads(1)
    cfg = load_config(config, overrides)
    engine = build_engine(cfg, 0, "cpu")
    gen = torch.Generator().manual_seed(0)
    times = []
    for i in range(warmup + repeats):
        ids = torch.randint(0, cfg.model.vocab_size, (cfg.train.batch_size, cfg.train.seq_len + 1), generator=gen)
        started = time.perf_counter()
        engine.forward_backward_last(ids, None)
        if i >= warmup:
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def _after(window_s: float):
    """An ``enough`` for run_swarm: true once ``window_s`` have passed since its first call (the window
    opening) and every node answered."""
    import time

    started: list[float] = []

    def enough(_, healths) -> bool:
        if not started:
            started.append(time.monotonic())
        return all(healths) and time.monotonic() - started[0] >= window_s

    return enough


def run_pipeline(regime: Regime, scales: dict[str, dict], window_s: float, deadline_s: float, link_mode: str,
                 variants: list[str], log) -> dict[str, Any]:
    """Each boundary over its scaled link and unshaped: tokens/s over a window that opens when tokens flow
    and closes after ``window_s``; the target's equivalent tokens/s."""
    from wan import PIPE_COMMON, _pipe_tokens, run_swarm

    rows: dict[str, Any] = {}
    for name in variants:
        scale = scales[name]
        row = {**scale}
        for label, link in (("shaped", LinkSpec(scale["rate_bps"], scale["delay_s"])), ("unshaped", LinkSpec(None, 0.0))):
            log(f"pipeline {name} {label} ({link}): 3 nodes, {window_s:.0f} s window")
            def flowing(healths) -> bool:
                return _pipe_tokens(healths) > 0 and all(healths)

            res = run_swarm(TINY_PIPE.replace("swarm/", "configs/swarm/") + ".toml", 3, PIPE_COMMON + scale["overrides"],
                            link, _after(window_s), deadline_s, link_mode, ready=flowing, shape_late=True,
                            node_overrides={i: [f"swarm.stage={i}"] for i in range(3)})
            if res["opened"] is None:
                row[label] = {"error": "tokens never flowed before the deadline", "run_s": res["run_s"]}
                continue
            wall = res["end"] - res["opened_at"]
            tokens = _pipe_tokens(res["healths"]) - _pipe_tokens(res["opened"])
            row[label] = {"link": str(link), "link_mode": res["link_mode"], "window_s": round(wall, 1),
                          "tokens": tokens, "tokens_per_s": round(tokens / wall, 1),
                          "microbatches_dropped": res.get("microbatches_dropped"),
                          "link_bytes_window": res["link_bytes_window"], "run_s": res["run_s"]}
            log(f"  {row[label]['tokens_per_s']} tokens/s")
        shaped, unshaped = row["shaped"].get("tokens_per_s"), row["unshaped"].get("tokens_per_s")
        row["vs_unshaped"] = round(shaped / unshaped, 4) if shaped and unshaped else None
        # the tiny swarm's time runs time_factor slower than the target's
        row["target_equivalent_tokens_per_s"] = round(shaped * scale["time_factor"], 1) if shaped else None
        rows[name] = row
    return rows


def run_diloco(scale: dict[str, Any], window_s: float, deadline_s: float, link_mode: str, schedules: list[str],
               log) -> dict[str, Any]:
    """Four replicas of the tiny model under the target's schedule and scaled link, per schedule."""
    from wan import DILOCO_CONFIG, DILOCO_VARIANTS, diloco_window, run_swarm

    link = LinkSpec(scale["rate_bps"], scale["delay_s"])
    rows: dict[str, Any] = {}
    for name in schedules:
        extra = [*scale["overrides"], *DILOCO_VARIANTS[name]]  # τ = 0 or 1, as the target's default
        log(f"diloco {name} ({link}): {scale['replicas']} replicas, {window_s:.0f} s window once all train")

        def ready(healths) -> bool:
            return sum(1 for h in healths if h and (h.get("train") or {}).get("started_at")) == scale["replicas"]

        res = run_swarm(DILOCO_CONFIG, scale["replicas"], extra, link, _after(window_s), deadline_s, link_mode, ready=ready,
                        shape_late=True)
        row: dict[str, Any] = {"overrides": extra, "link": str(link), "link_mode": res["link_mode"], "run_s": res["run_s"]}
        if res["opened"] is None:
            row["error"] = f"the {scale['replicas']} replicas never all trained before the deadline"
        else:
            row.update(diloco_window(res, scale["tiny_batch"] * load_config(TINY_DILOCO).train.seq_len))
            row.update(_fidelity(scale, row))
        log(f"  utilisation {row.get('utilization')}, rounds in the window {row.get('rounds_in_window')}")
        rows[name] = row
    return rows


def _fidelity(scale: dict[str, Any], row: dict[str, Any]) -> dict[str, Any]:
    """How faithful the window was to the scaling: the step time it assumed (against the row's
    ``step_s_measured``) and the share of the scaled links' capacity the window used."""
    link, replicas = row.get("link_bytes_window"), len(row["utilization_per_replica"])
    return {
        "step_s_assumed": round(scale["inner_step_s"]["tiny"], 4),
        "link_capacity_used": round(link / (scale["rate_bps"] / 8 * row["window_s"] * replicas), 3)
        if link and replicas else None,
    }


def run_hivemind(scale: dict[str, Any], wall_s: float, link_mode: str, log) -> dict[str, Any]:
    """hivemind.Optimizer synchronous DP in the DiLoCo regime's emulation: the same tiny link and batch
    (a gradient all-reduce moves the model's size in fp16 as a fragment round moves it in 4 bits, so the
    one scaling serves both), for ``wall_s`` of training from a common start. hivemind's averaging
    timeout is raised to three times the all-reduce's expected time on that link, so that averaging can
    finish at all (its default, 30 s, is for fast links), but not past ``wall_s``: an all-reduce that
    cannot end inside the window gives up there (hivemind then steps on local gradients)."""
    from wan import hivemind_row

    if link_mode == "app":
        return {"error": "hivemind's traffic cannot be shaped in-process: run as root (namespaces)"}
    tiny = load_config(TINY_DILOCO, [f"train.batch_size={scale['tiny_batch']}"])
    from node.model import parameter_count

    grads = 2 * parameter_count(tiny.model, tiny.pipeline)  # fp16 gradients
    peers = scale["replicas"]
    allreduce_s = 2 * (peers - 1) / peers * grads * 8 / scale["rate_bps"]
    timeout = max(30.0, min(3 * allreduce_s, wall_s))  # never past the window: it is the comparison's clock
    extra = ("--wall-s", f"{wall_s:.0f}", "--set", f"train.batch_size={scale['tiny_batch']}",
             "--averaging-timeout-s", f"{timeout:.0f}")
    row = hivemind_row(LinkSpec(scale["rate_bps"], 0.0), 10**9, wall_s + max(300.0, 2 * timeout), peers, extra,
                       shape_late=True)
    row.update({"expected_allreduce_s": round(allreduce_s, 1), "averaging_timeout_s": round(timeout), "flags": extra})
    return row


def regime_main(args, log) -> dict[str, Any]:
    """``bench/wan.py --regime PRESET:GPU:LINK``: the families asked (default: the pipeline when the model
    does not fit one card, Streaming DiLoCo and hivemind's DP when it does), each against its baseline."""
    import os
    import time

    from plan_check import MODEL_OF, calibrate  # bench/plan_check.py: the same calibration as the plan check

    started = time.monotonic()
    regime = parse_regime(args.regime)
    cores = os.cpu_count() or 1
    whole = target_config(regime, None, diloco=True, overrides=args.target_set)
    whole_fits = target_fits(whole, regime.gpu)["fits"]
    families = args.only or (["diloco", "hivemind"] if whole_fits else ["pipeline"])
    window = args.window_s or (90.0 if args.quick else 180.0)
    summary: dict[str, Any] = {
        "bench": "wan", "regime": str(regime), "quick": args.quick, "mfu_assumed": MFU,
        "gpu": dataclasses.asdict(regime.gpu), "link": str(regime.link), "window_s": window, "cores": cores,
        "target_overrides": args.target_set,
    }
    if "pipeline" in families:
        cal = calibrate(repeats=5, warmup=2)
        stage_s = {v: [st["wall_s"] for st in cal["models"][MODEL_OF[v]]["stages"]] for v in PIPE_VARIANTS}
        target = target_config(regime, args.target_stages, diloco=False, overrides=args.target_set)
        contention = max(1.0, 3 / cores)
        scales = pipeline_scales(regime, target, stage_s, contention)
        variants = ["subspace_bf16", "dense_bf16"] if args.quick else list(PIPE_VARIANTS)
        rows = run_pipeline(regime, scales, window, window + 150.0, args.link_mode, variants, log)
        eq = {k: r["target_equivalent_tokens_per_s"] for k, r in rows.items()}
        summary["pipeline"] = {
            "target": {"stages": stages_of(target), "inflight": target.dataplane.max_inflight,
                       "batch": [target.train.batch_size, target.train.seq_len], **target_fits(target, regime.gpu)},
            "contention": contention, "calibration_stage_s": stage_s, "rows": rows,
            "target_equivalent_tokens_per_s": eq,
            "subspace_over_dense": round(eq["subspace_bf16"] / eq["dense_bf16"], 3)
            if eq.get("subspace_bf16") and eq.get("dense_bf16") else None,
            "subspace_int8_over_dense": round(eq["subspace_int8"] / eq["dense_bf16"], 3)
            if eq.get("subspace_int8") and eq.get("dense_bf16") else None,
            "subspace_vs_unshaped": rows["subspace_bf16"]["vs_unshaped"] if "subspace_bf16" in rows else None,
            "vs_unshaped": {k: r["vs_unshaped"] for k, r in rows.items()},
        }
    scale = None
    if "diloco" in families or "hivemind" in families:
        replicas = args.replicas
        tiny_batch = args.tiny_batch or load_config(TINY_DILOCO).train.batch_size
        contention = max(1.0, replicas / cores)
        step = calibrate_step(TINY_DILOCO, [f"train.batch_size={tiny_batch}"])
        scale = diloco_scale(regime, whole, replicas, step, tiny_batch, contention)
    if scale is not None:  # does a round end (committed, or given up at the deadline) inside the window?
        ends_s = scale["round_end_tiny_s"]
        scale["below_min_rate"] = scale["rate_bps"] < MIN_RATE_BPS
        # twice the pipeline's window, longer where that holds too few round ends, up to a cap
        dl_window = max(window * 2, min(MIN_ROUND_ENDS * ends_s, MAX_DILOCO_WINDOW_S))
        summary["diloco_window_s"] = round(dl_window, 1)
        if ends_s * MIN_ROUND_ENDS > dl_window:
            summary["diloco"] = {
                "error": f"not emulable here: a fragment round of the target ({scale['plan_target']['round_s']:.0f} s, "
                         f"{scale['plan_target']['round_in_inner_steps']:.0f} inner steps; given up at "
                         f"exchange.timeout_s = {scale['plan_target']['exchange_timeout_s']:g} s) ends after "
                         f"{ends_s:.0f} s of the tiny swarm's time (tiny step {scale['inner_step_s']['tiny']:.3f} s): "
                         f"{MIN_ROUND_ENDS} of them do not fit a {dl_window:.0f} s window",
                "scale": scale, "plan_utilisation": scale["plan_target"]["utilisation"]}
            families = [f for f in families if f not in ("diloco", "hivemind")]
            log(summary["diloco"]["error"])
        elif scale["below_min_rate"]:
            log(f"the scaled link ({scale['rate_bps'] / 1e3:.0f} kbit/s) is under {MIN_RATE_BPS / 1e6:g} Mbit/s: the "
                "DHT's and the polls' own traffic takes a share of it (measured: background_share)")
    if "diloco" in families:
        schedules = ["no_overlap", "overlap", "nonblocking"]
        rows = run_diloco(scale, dl_window, dl_window + 240.0, args.link_mode, schedules, log)
        summary["diloco"] = {
            "target": {"whole_model_fits": whole_fits, "replicas": replicas}, "scale": scale, "rows": rows,
            "utilisation": {k: r.get("utilization") for k, r in rows.items()},
            # the window's round ends summed over replicas; "alone" commits averaged nothing
            "rounds": {k: r.get("rounds_in_window") for k, r in rows.items()},
            "plan_utilisation": scale["plan_target"]["utilisation"],
        }
    if "hivemind" in families:
        summary["hivemind"] = run_hivemind(scale, dl_window, args.link_mode, log)
        nonblocking = summary.get("diloco", {}).get("rows", {}).get("nonblocking", {})
        summary["hivemind_vs_diloco"] = {
            "wall_s": dl_window, "hivemind": {k: summary["hivemind"].get(k) for k in ("tokens", "loss_end", "val_loss",
                                                                                     "utilization", "tokens_per_s")},
            "diloco_default": {k: nonblocking.get(k) for k in ("tokens", "loss_end", "utilization", "tokens_per_s")},
        }
    summary["wall_s"] = round(time.monotonic() - started, 1)
    return summary
