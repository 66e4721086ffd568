"""``node plan``: what a run needs (memory per stage, docs/memory.md) and how fast it can go (tokens/s,
GPU utilisation, Streaming DiLoCo rounds over a given link, node/throughput.py), from the config alone.

    node plan --model 8b --stages 32 --gpu rtx4090 --link 80mbit [--mfu 0.4] [--json]
    node plan --model 1b --device-mem 24 [--stages S]          memory only

The speed half runs when a card (``--gpu`` from configs/hardware/gpus.toml, or ``--tflops``) or a link
is given. Exit 0 when every stage fits the card's memory, 1 when one does not.
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

from node.config import ConfigError, load_config
from node.config_toml import toml_value
from node.model_config import most_stages


def add_plan_parser(sub: argparse._SubParsersAction, add_config_args) -> None:
    plan = sub.add_parser("plan", help="memory each stage needs and the speed a card and link allow, from the config "
                                       "alone (docs/memory.md, docs/plan.md); exit 0 when every stage fits, 1 when "
                                       "one does not")
    plan.add_argument("--model", metavar="PRESET",
                      help="model preset under configs/model (tiny, small, 125m, 1b, 8b) or a TOML path; its [model] "
                           "table replaces the config's")
    add_config_args(plan, None)  # no config: node/config.py's defaults for everything but the model
    plan.add_argument("--stages", type=int, help="pipeline stages S (default: print the fewest that fit)")
    plan.add_argument("--device-mem", type=float, metavar="GIB",
                      help="memory of one device (GiB; default: the --gpu card's)")
    plan.add_argument("--device-type", choices=("cuda", "cpu"), default="cuda",
                      help="cuda: bf16 autocast, DiLoCo outer state in host memory, a CUDA context allowance; "
                           "cpu: fp32, everything in RAM (default cuda)")
    plan.add_argument("--gpu", metavar="NAME", help="a card of configs/hardware/gpus.toml (rtx4090, h100, ...): "
                                                    "its peak bf16 TFLOP/s and memory")
    plan.add_argument("--tflops", type=float, help="peak TFLOP/s of one card (overrides --gpu's)")
    plan.add_argument("--mfu", type=float, default=0.4,
                      help="model FLOPs utilisation: the fraction of peak a training step reaches (default 0.4, "
                           "an assumption)")
    plan.add_argument("--link", metavar="RATE[,delay=D]",
                      help="every node's access link, the same rate each way: 20mbit, 80mbit,delay=30ms "
                           "(default: unlimited)")
    plan.add_argument("--replicas", type=int, default=8, help="replicas of each stage, for the DiLoCo rounds (default 8)")
    plan.add_argument("--hop-overhead-ms", type=float, default=1.0,
                      help="software time one pipeline hop adds to a microbatch's trip (default 1 ms)")
    plan.add_argument("--batch-size", type=int, help="shortcut for --set train.batch_size=B")
    plan.add_argument("--seq-len", type=int, help="shortcut for --set train.seq_len=N")
    plan.add_argument("--inflight", type=int, help="shortcut for --set dataplane.max_inflight=M")
    plan.add_argument("--json", action="store_true", help="print one JSON object (the last line)")
    plan.set_defaults(func=cmd_plan)


def cmd_plan(args: argparse.Namespace) -> int:
    from node.memory import GIB, format_plan, plan, smallest_stages
    from node.throughput import find_gpu, format_speed, speed_plan
    from swarm.sim.link import LinkSpec

    gpu = find_gpu(args.gpu) if args.gpu else None
    device_mem = args.device_mem if args.device_mem is not None else gpu.memory_gib if gpu else None
    if device_mem is None:
        raise ConfigError("give --device-mem GIB or --gpu NAME (the card's memory)")
    if not 0 < device_mem < math.inf:
        raise ConfigError(f"--device-mem must be a positive number of GiB, got {device_mem}")
    tflops = args.tflops if args.tflops is not None else gpu.bf16_tflops if gpu else None
    if tflops is None and args.link:
        raise ConfigError("the speed plan needs a card: --gpu NAME or --tflops T")
    try:
        link = LinkSpec.parse(args.link) if args.link else None
    except ValueError as err:
        raise ConfigError(f"--link: {err}") from None
    overrides = []
    if args.model is not None:  # the preset's [model] table, under any --set model.* the user gives
        preset = load_config(args.model if args.model.endswith(".toml") else f"model/{args.model}")
        overrides += [f"model.{key}={toml_value(value)}" for key, value in preset.to_dict()["model"].items()]
    overrides += args.overrides
    for flag, field in (("batch_size", "train.batch_size"), ("seq_len", "train.seq_len"),
                        ("inflight", "dataplane.max_inflight"), ("stages", "pipeline.num_stages")):
        if getattr(args, flag) is not None:
            overrides.append(f"{field}={getattr(args, flag)}")
    args.overrides = overrides
    cfg = load_config(args.config, args.overrides)
    memory = int(device_mem * GIB)
    smallest = None
    if args.stages is None:
        smallest = smallest_stages(cfg, memory, args.device_type)
        args.overrides += [f"pipeline.num_stages={smallest or most_stages(cfg.model)}", 'pipeline.layer_splits="none"']
        cfg = load_config(args.config, args.overrides)
    result: dict[str, Any] = plan(cfg, memory, args.device_type)
    if args.stages is None:
        result["smallest_stages"] = smallest
    speed = None
    if tflops is not None:
        speed = speed_plan(cfg, tflops=tflops, mfu=args.mfu, link_rate_bps=link.rate_bps if link else None,
                           delay_s=link.delay_s if link else 0.0, hop_overhead_s=args.hop_overhead_ms / 1e3,
                           replicas=args.replicas)
        if gpu is not None:
            speed["gpu"] = {"name": gpu.name, "label": gpu.label, "bf16_tflops": gpu.bf16_tflops,
                            "memory_gib": gpu.memory_gib, "source": gpu.source}
    if args.json:
        print(json.dumps(result if speed is None else {**speed, "fits": result["fits"], "memory": result}))
    else:
        if args.stages is None:
            print(f"smallest number of stages that fits: {smallest}" if smallest else
                  f"does not fit at any stage count (shown: the most, {cfg.pipeline.num_stages}):")
        print(format_plan(result))
        if speed is not None:
            print(format_speed(speed))
    return 0 if result["fits"] else 1
