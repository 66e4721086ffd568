"""One peer of the hivemind data-parallel baseline that bench/wan.py runs against protoswarm.

Trains the whole model (S = 1) of a protoswarm config on the embedded corpus with hivemind's own
``hivemind.Optimizer`` in its synchronous data-parallel mode (``use_local_updates=False``): every
local step adds this peer's gradient to an accumulator and reports progress in the DHT; once the
swarm has accumulated ``target_batch_size`` samples (default peers · batch: one global step per
local step of each peer, plain synchronous data parallel) the peers all-reduce their gradients (``Float16Compression``) and
every peer applies the same AdamW step. Parameters are also averaged every epoch (fp32), in the
background: hivemind's defaults (``delay_state_averaging=True``, ``average_state_every=1``); the
gradient step itself is never delayed (``delay_optimizer_step``/``delay_grad_averaging`` False).
``matchmaking_time=3`` s, ``averaging_timeout=30`` s, ``request_timeout=1`` s (below the matchmaking
time, as hivemind asks), ``offload_optimizer=True``. The final JSON repeats them under "settings".
bench/wan.py starts N of these (often in separate network namespaces) and reads their stdout.

Fair to node/train_local.py: the same model builder and seeded init as a one-stage stage engine
(``train.seed · 1_000_003``), AdamW with the config's lr, betas and decoupled weight decay on matrices
only (``parameter_groups``), the global gradient norm clipped to ``train.grad_clip`` (applied to the
averaged gradient just before the AdamW step), and ``lr_at`` (warm-up + cosine to ``train.steps``) as
the LR schedule, advanced by hivemind once per global epoch and scaled by the local steps per epoch,
so each local step gets the LR it would get in protoswarm.

Data: peer I reads ``BatchSampler(corpus.train, ..., seed=data.seed, shard_index=I, shard_count=N)``:
the training tokens are cut into N contiguous shards and each peer draws its windows from its own,
so peers never see the same windows (as in bench/diloco.py). Validation at the end: the mean
cross-entropy of the final local model on ``train.eval_batches`` fixed windows of ``corpus.val``
(``validation_batches`` + ``evaluate`` of node/train_local.py).

Output (stdout): peer 0 prints ``JOIN <multiaddr>`` once its DHT is up; every ~5 s a line
``PROGRESS {json}`` (t, tokens, loss, epoch, step); the last line is one JSON object: tokens,
steps, wall_s (first to last step), tokens_per_s, loss_end (mean of the last 20 steps), losses
([unix time, loss] per step), epochs (final ``local_epoch``), compute_s (forward/backward),
optimizer_step_s (inside ``opt.step()``, where hivemind communicates), val_loss, complete, settings.
Errors go to stderr with a non-zero exit (2: ``--deadline-s`` came before ``--tokens``, the JSON is
still printed); a watchdog ends the process at ``--deadline-s`` whatever hivemind is doing.

    python bench/hivemind_dp.py --config configs/swarm/diloco-local.toml --peer-index 0 --peers 2 \\
        --host 127.0.0.1 --tokens 20000 --run-id demo --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hivemind
from hivemind.compression import Float16Compression
from hivemind.optim.grad_averager import GradientAverager

from node.chain import StageChain
from node.config import load_config
from node.data import BatchSampler, load_corpus, validation_batches
from node.engine import build_engine
from node.model import lm_loss, parameter_groups
from node.train_local import evaluate, lr_at

PROGRESS_EVERY_S = 5.0
REQUEST_TIMEOUT_S = 1.0
_print_lock = threading.Lock()


def _emit(line: str) -> None:
    with _print_lock:
        print(line, flush=True)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="preset name under configs/ or a TOML path")
    p.add_argument("--peer-index", type=int, required=True)
    p.add_argument("--peers", type=int, required=True, help="number of peers N (shards the data N ways)")
    p.add_argument("--host", default="127.0.0.1", help="IP the libp2p host listens on")
    p.add_argument("--initial-peers", nargs="+", action="extend", default=[], metavar="MADDR")
    p.add_argument("--tokens", type=int, required=True, help="this peer's own token budget")
    p.add_argument("--run-id", required=True)
    p.add_argument("--target-batch-size", type=int,
                   help="samples per global epoch (default peers·batch: one optimizer step per local step of each "
                        "peer, i.e. plain synchronous data parallel)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--deadline-s", type=float, default=600.0)
    p.add_argument("--wall-s", type=float, help="stop training this many seconds after the first step (the JSON "
                                                "is complete), or at --tokens, whichever first")
    p.add_argument("--averaging-timeout-s", type=float, default=30.0,
                   help="hivemind's averaging_timeout: how long one gradient all-reduce may take (default 30)")
    p.add_argument("--start-file", help="print READY once set up, then wait for this file before training "
                                        "(the driver creates it when every peer is READY)")
    args = p.parse_args(argv)
    if not 0 <= args.peer_index < args.peers:
        p.error(f"--peer-index {args.peer_index} is outside 0..{args.peers - 1}")
    if args.peer_index > 0 and not args.initial_peers:
        p.error("peers other than 0 need --initial-peers")
    return args


class _ClippedAdamW(torch.optim.AdamW):
    """AdamW that first clips the global norm of the gradient it is given (hivemind: the averaged one)."""

    def __init__(self, params, *, clip: float, **kwargs) -> None:
        super().__init__(params, **kwargs)
        self.clip = clip

    def step(self, closure=None):
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_([p for g in self.param_groups for p in g["params"]], self.clip)
        return super().step(closure)


def _shutdown(*objs, timeout: float) -> bool:
    """Shut hivemind objects down in a helper thread; False when that did not finish within ``timeout``."""

    def run() -> None:
        for obj in objs:
            if obj is not None:
                obj.shutdown()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(max(timeout, 1.0))
    return not thread.is_alive()


def run(args: argparse.Namespace, state: dict, started: float) -> dict:
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, args.overrides)
    t = cfg.train
    if cfg.pipeline.num_stages != 1:
        raise ValueError(f"this baseline trains the whole model: pipeline.num_stages must be 1, got "
                         f"{cfg.pipeline.num_stages}")
    dht = hivemind.DHT(start=True, host_maddrs=[f"/ip4/{args.host}/tcp/0"], initial_peers=args.initial_peers)
    state["dht"] = dht
    if args.peer_index == 0:
        maddrs = [str(m) for m in dht.get_visible_maddrs()]
        ours = [m for m in maddrs if m.startswith(f"/ip4/{args.host}/")] or maddrs
        _emit(f"JOIN {ours[0]}")

    corpus = load_corpus(cfg.data)
    sampler = BatchSampler(corpus.train, t.seq_len, t.batch_size, cfg.data.seed, args.peer_index, args.peers)
    val_batches = validation_batches(corpus.val, t.seq_len, t.batch_size, t.eval_batches)
    # The stage engine's seeded init of stage 0 (what every protoswarm replica starts from); hivemind's
    # optimizer steps it, so only the module is used.
    model = build_engine(cfg, 0, "cpu").module
    model.train()

    samples_per_step = t.batch_size * t.grad_accum
    hm = {  # hivemind.Optimizer's settings (the gradient compression and averager timeouts are added below)
        "batch_size_per_step": samples_per_step,
        "target_batch_size": args.target_batch_size or args.peers * samples_per_step,
        "use_local_updates": False, "matchmaking_time": 3.0, "averaging_timeout": args.averaging_timeout_s, "load_state_timeout": 60.0,
        # hivemind's defaults: gradients averaged in step (synchronous DP), parameters in the background
        "delay_optimizer_step": False, "delay_grad_averaging": False, "delay_state_averaging": True,
        "average_state_every": 1, "offload_optimizer": True, "verbose": False,
    }
    # The LR schedule runs in global epochs; scale it so the LR at each of this peer's local steps is
    # what the same local step gets in protoswarm (warm-up over train.warmup_steps local steps).
    steps_per_epoch = hm["target_batch_size"] / (args.peers * samples_per_step)
    opt = hivemind.Optimizer(
        dht=dht, run_id=args.run_id, params=parameter_groups(model, t.weight_decay),
        optimizer=lambda groups: _ClippedAdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), clip=t.grad_clip),
        scheduler=lambda inner: torch.optim.lr_scheduler.LambdaLR(inner, lambda epoch: lr_at(int(epoch * steps_per_epoch), cfg) / t.lr),
        grad_compression=Float16Compression(),
        # hivemind warns that request_timeout (default 3 s) must stay below matchmaking_time; its
        # averager_opts reach only the state averager, so the gradient averager gets it via its factory.
        averager_opts={"request_timeout": REQUEST_TIMEOUT_S},
        grad_averager_factory=partial(GradientAverager, request_timeout=REQUEST_TIMEOUT_S),
        **hm,
    )
    settings = {
        **hm, "grad_compression": "float16", "request_timeout": REQUEST_TIMEOUT_S,
        "optimizer": {"name": "AdamW", "lr": t.lr, "betas": [t.beta1, t.beta2], "weight_decay": t.weight_decay,
                      "grad_clip": t.grad_clip},
        "scheduler": f"lr_at(epoch × {steps_per_epoch:g} local steps): warmup {t.warmup_steps} local steps, cosine "
                     f"to {t.steps} (floor {t.min_lr_ratio})",
        "seq_len": t.seq_len, "batch_size": t.batch_size, "grad_accum": t.grad_accum,
        "data_shard": [args.peer_index, args.peers], "threads": args.threads, "host": args.host,
    }
    state["opt"] = opt

    soft_deadline = started + args.deadline_s - min(60.0, 0.25 * args.deadline_s)  # room to shut down
    tokens_per_step = samples_per_step * t.seq_len
    if args.start_file:  # a common start: no peer trains alone while the others are still joining
        _emit("READY")
        while not os.path.exists(args.start_file):
            if time.monotonic() > soft_deadline:
                raise SystemExit("error: the start file never appeared")
            time.sleep(0.1)
    losses: list[list[float]] = []
    compute_s = step_s = 0.0
    first_step = last_step = None
    complete = True
    while state["tokens"] < args.tokens:
        if time.monotonic() > soft_deadline:
            complete = False
            break
        if args.wall_s is not None and first_step is not None and time.time() - first_step >= args.wall_s:
            break
        t0 = time.perf_counter()
        first_step = first_step or time.time()
        opt.zero_grad()
        loss_sum = 0.0
        for micro in range(t.grad_accum):
            batch = sampler.batch(state["steps"] * t.grad_accum + micro)
            loss = lm_loss(model(None, batch)[:, :-1], batch[:, 1:])  # the engine's loss on the window
            (loss / t.grad_accum).backward()
            loss_sum += loss.item()
        t1 = time.perf_counter()
        opt.step()
        t2 = time.perf_counter()
        compute_s, step_s = compute_s + t1 - t0, step_s + t2 - t1
        last_step = time.time()
        loss_value = loss_sum / t.grad_accum
        losses.append([round(last_step, 3), round(loss_value, 4)])
        state.update(steps=state["steps"] + 1, tokens=state["tokens"] + tokens_per_step, loss=loss_value,
                     epoch=opt.local_epoch)

    wall_s = (last_step - first_step) if losses else 0.0
    tail = [loss for _, loss in losses[-20:]]
    return {
        "peer": args.peer_index, "tokens": state["tokens"], "steps": state["steps"], "wall_s": round(wall_s, 3),
        "tokens_per_s": round(state["tokens"] / wall_s, 2) if wall_s > 0 else 0.0,
        "loss_end": round(sum(tail) / len(tail), 4) if tail else None, "losses": losses,
        "epochs": opt.local_epoch, "compute_s": round(compute_s, 3), "optimizer_step_s": round(step_s, 3),
        "val_loss": round(evaluate(StageChain.around([model], t), val_batches), 4),
        "grad_compression": "float16", "complete": complete, "settings": settings,
    }


def _progress_loop(state: dict, stop: threading.Event) -> None:
    while not stop.wait(PROGRESS_EVERY_S):
        _emit("PROGRESS " + json.dumps(_progress(state)))


def _progress(state: dict) -> dict:
    return {"t": round(time.time(), 3), "tokens": state["tokens"], "loss": state["loss"],
            "epoch": state["epoch"], "step": state["steps"]}


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    started = time.monotonic()

    def out_of_time() -> None:
        print(f"ERROR: peer {args.peer_index}: --deadline-s {args.deadline_s} exceeded; exiting hard",
              file=sys.stderr, flush=True)
        os._exit(3)

    watchdog = threading.Timer(args.deadline_s, out_of_time)
    watchdog.daemon = True
    watchdog.start()
    state = {"tokens": 0, "steps": 0, "loss": None, "epoch": 0, "dht": None, "opt": None}
    stop = threading.Event()
    reporter = threading.Thread(target=_progress_loop, args=(state, stop), daemon=True)
    reporter.start()
    summary, code = None, 0
    try:
        summary = run(args, state, started)
        if not summary["complete"]:
            print(f"ERROR: peer {args.peer_index}: deadline reached after {summary['tokens']} of "
                  f"{args.tokens} tokens", file=sys.stderr, flush=True)
            code = 2
    except Exception as exc:  # report any failure plainly, then still shut hivemind down
        print(f"ERROR: peer {args.peer_index}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        code = 1
    stop.set()
    reporter.join()
    remaining = started + args.deadline_s - time.monotonic() - 2.0
    clean = _shutdown(state["opt"], state["dht"], timeout=remaining)
    if not clean:
        print(f"WARNING: peer {args.peer_index}: hivemind did not shut down in time", file=sys.stderr, flush=True)
    if summary is not None:
        _emit("PROGRESS " + json.dumps(_progress(state)))
        summary["shutdown_clean"] = clean
        _emit(json.dumps(summary))
    sys.stderr.flush()
    os._exit(code)  # hivemind's helper processes and threads must not keep the interpreter alive


if __name__ == "__main__":
    main()
