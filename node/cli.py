"""The ``node`` (alias ``protoswarm``) command.

    node start [--join MADDR ... | --new] [--run-id ID] [--config NAME|PATH] [--set section.field=value ...]
               [--stage N] [--identity PATH] [--metrics-port P] ...      run the daemon (without --join:
                                                                         rejoin the identity's last run,
                                                                         else a new swarm)
    node status [--join MADDR] [--run-id ID] [--json]   the swarm as a table (asks the local node
                                                         for an address when --join is not given)
    node sim --nodes N [--config ...] [--duration S] [--faults T:ACTION:TARGET,...] [--nat N] [--json]
    node train-local [--config NAME|PATH] [--set section.field=value ...] [--device cpu|cuda|auto]
    node config show [--config ...] [--set ...]     resolved config as TOML
    node config fields                               every field with type, default and meaning
    node plan --model PRESET [--stages S] --device-mem GIB [--device-type cuda|cpu] [--json]
              [--config ...] [--set ...] [--batch-size B] [--seq-len N] [--inflight M]
                                                    memory per stage (docs/memory.md); without
                                                    --stages the fewest stages that fit; exit 1
                                                    when a stage does not fit
    node export (--join MADDR | --checkpoint DIR) --out DIR [--format native|hf]
                                                    the whole model as files (docs/export.md)
    node eval --model DIR [--text PATH]             validation loss of an export
    node generate --model DIR --prompt TEXT         sample from an export

User mistakes (bad config, missing paths, unusable checkpoints) print one ``error:`` line and exit 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from typing import TYPE_CHECKING

from node.checkpoint import CheckpointError
from node.config import ConfigError, RunConfig, describe_fields, load_config
from node.config_toml import toml_value
from node.model_cli import add_model_parsers
from node.plan_cli import add_plan_parser

if TYPE_CHECKING:
    from node.last_run import StartPlan

DEFAULT_LOCAL_CONFIG = "local/tiny"
DEFAULT_SWARM_CONFIG = "swarm/tiny"
LOCAL_SECTIONS = ("swarm", "dataplane")  # node-local tables: a joiner may set any of their fields


def _add_config_args(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument("--config", "-c", default=default,
                        help=f"preset name under configs/ or a TOML path (default: {default})")
    parser.add_argument("--set", "-o", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override one config field, e.g. --set train.lr=3e-4 (repeatable)")


def _load(args: argparse.Namespace) -> RunConfig:
    overrides = list(args.overrides)
    if getattr(args, "device", None):
        overrides.append(f"train.device={args.device!r}")
    if getattr(args, "steps", None) is not None:
        overrides.append(f"train.steps={args.steps}")
    return load_config(args.config, overrides)


def config_to_toml(cfg: RunConfig) -> str:
    out = []
    for section, values in cfg.to_dict().items():
        out.append(f"[{section}]")
        out += [f"{key} = {toml_value(value)}" for key, value in values.items()]
        out.append("")
    return "\n".join(out)


def cmd_train_local(args: argparse.Namespace) -> int:
    from node.train_local import train_local  # heavy imports only when training

    cfg = _load(args)
    result = train_local(cfg)
    summary = {
        "steps": result.steps,
        "tokens": result.tokens,
        "tokens_per_s": round(result.tokens_per_s, 1),
        "loss_start": result.train_losses[0][1] if result.train_losses else None,
        "loss_end": result.train_losses[-1][1] if result.train_losses else None,
        "val_loss": result.final_val_loss,
        "resumed_from": result.resumed_from,
        "checkpoint_dir": cfg.train.checkpoint_dir,
    }
    print(json.dumps(summary) if args.json else
          f"done: {summary['steps']} steps, val loss {summary['val_loss']:.4f}, "
          f"{summary['tokens_per_s']:.0f} tok/s, checkpoints in {summary['checkpoint_dir']}")
    return 0


def _start_overrides(args: argparse.Namespace) -> list[str]:
    out = []
    if args.join:
        out.append(f"swarm.initial_peers={json.dumps(args.join)}")
    for flag, field in (("run_id", "run_id"), ("identity", "identity_path"), ("metrics_host", "metrics_host"),
                        ("swarm_key", "access_key_file")):
        if getattr(args, flag) is not None:
            out.append(f"swarm.{field}={json.dumps(getattr(args, flag))}")
    for flag in ("host_maddrs", "announce_maddrs"):
        if getattr(args, flag):
            out.append(f"swarm.{flag}={json.dumps(getattr(args, flag))}")
    if args.allow_peer:
        out.append(f"swarm.allow_peers={json.dumps(args.allow_peer)}")
    if args.stage is not None:
        out.append(f"swarm.stage={args.stage}")
    if args.metrics_port is not None:
        out.append(f"swarm.metrics_port={args.metrics_port}")
    if args.device:
        out.append(f"train.device={args.device!r}")
    if args.threads is not None:
        out.append(f"train.threads={args.threads}")
    return out


def _run_level(overrides: list[str]) -> list[str]:
    """The ``--set`` overrides a joining node cannot apply: they are the run's, read from the swarm."""
    from node.run_params import LOCAL_FIELDS

    local = [f"{section}.{f}=" for section, names in LOCAL_FIELDS.items() for f in names]
    local += [f"{section}." for section in LOCAL_SECTIONS]
    return [o for o in overrides if not o.startswith(tuple(local))]


def prepare_start(args: argparse.Namespace) -> tuple[RunConfig, bool, list[str]]:
    """``node start``'s config, whether it founds a swarm, and what to tell the user first: ``--join`` (or
    ``swarm.initial_peers``) joins, ``--new`` founds, neither rejoins the identity's last run
    (node/last_run.py) or founds when it has none."""
    from node.last_run import load_last_run, plan_start
    from node.run_params import LOCAL_FIELDS

    if args.join and (run_level := _run_level(args.overrides)):
        fields = [f"{section}.{{{','.join(names)}}}" for section, names in LOCAL_FIELDS.items()]
        raise ConfigError(
            f"{', '.join(run_level)}: a joining node takes the run's parameters from the swarm; only "
            f"swarm.*, dataplane.*, {', '.join(fields[:-1])} and {fields[-1]} can be set locally"
        )
    if args.status_every <= 0:
        raise ConfigError(f"--status-every must be positive, got {args.status_every}")
    overrides = [*args.overrides, *_start_overrides(args)]
    cfg = load_config(args.config, overrides)
    if cfg.swarm.initial_peers:
        if args.new:
            raise ConfigError("--new starts a new swarm, but swarm.initial_peers (from the config) names peers "
                              "to join: drop one of them")
        return cfg, False, []
    if args.new:
        return cfg, True, ["starting a new swarm (--new)"]
    plan = plan_start(cfg, load_last_run(cfg.swarm.identity_path))
    if not plan.create and (run_level := _run_level(args.overrides)):
        plan.notes.append(f"ignoring {', '.join(run_level)}: a rejoining node takes the run's parameters from the "
                          f"swarm (--new starts a new swarm with them)")
    if plan.overrides:
        cfg = load_config(args.config, [*overrides, *plan.overrides])
    if plan.params is not None:
        cfg = _resumed_run_config(cfg, plan, _run_level(args.overrides))
    return cfg, plan.create, plan.notes


def _resumed_run_config(cfg: RunConfig, plan: StartPlan, run_level: list[str]) -> RunConfig:
    """A founder resuming its run alone: the run's remembered parameters with this node's local settings, so
    a preset changed since the run began (or a run-level --set) cannot make its checkpoints another model's."""
    from node.run_params import config_from_run, run_parameters

    params = plan.params
    now = run_parameters(cfg)
    changed = [f"{section}.{name}={params[section][name]!r} (this config: {now.get(section, {}).get(name)!r})"
               for section in sorted(params) if isinstance(params[section], dict)
               for name in sorted(params[section]) if now.get(section, {}).get(name) != params[section][name]]
    try:
        resumed = config_from_run(params, cfg)
    except (ConfigError, TypeError, ValueError) as exc:
        raise ConfigError(f"run {cfg.swarm.run_id}'s remembered parameters cannot be used here ({exc}): "
                          "--new starts a new swarm") from None
    if changed:
        plan.notes.append(f"the run keeps its own parameters where this config differs: {', '.join(changed)}"
                          + (f"; ignoring {', '.join(run_level)} (--new starts a new swarm with them)" if run_level else ""))
    return resumed


def cmd_start(args: argparse.Namespace) -> int:
    from node.daemon import NodeDaemon
    from node.identity import IdentityInUse, IdentityLock
    from node.last_run import busy_listen_port
    from node.metrics import MetricsBindError
    from swarm.access import AccessError
    from swarm.records import IdentityError

    cfg, create, notes = prepare_start(args)
    if cfg.train.threads:
        import torch

        torch.set_num_threads(cfg.train.threads)
    try:
        daemon = NodeDaemon(cfg, create=create, status_mode=args.status, status_every_s=args.status_every)
        IdentityLock(cfg.swarm.identity_path).acquire().release()  # a running daemon: say so, not "port busy"
        if (busy := busy_listen_port(cfg.swarm.host_maddrs)) is not None:
            raise ConfigError(busy)
        for note in notes:
            print(note, flush=True)
        return daemon.run()
    except (IdentityInUse, IdentityError, MetricsBindError, AccessError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def cmd_status(args: argparse.Namespace) -> int:
    from swarm.access import AccessError, SwarmAccess, load_key
    from swarm.status import StatusError, collect_status, format_status, peers_from_health

    try:
        access = SwarmAccess(load_key(args.swarm_key) if args.swarm_key else None)
        join = args.join or peers_from_health(args.health_url)
        status = collect_status(join, run_id=args.run_id, timeout=args.timeout, access=access)
    except (StatusError, AccessError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(status) if args.json else format_status(status))
    return 0


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def cmd_sim(args: argparse.Namespace) -> int:
    from swarm.sim.faults import Waves, parse_faults
    from swarm.sim.link import LinkSpec
    from swarm.sim.run import run_simulation
    from swarm.sim.swarm import SimError

    # SIGTERM and SIGINT both unwind through the swarm's shutdown (every node stopped, nothing left
    # behind), also when SIGINT arrives ignored from a background shell.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    try:
        # --link, else the config's swarm.link: the sim emulates it for every node (namespaces when root)
        cfg = _load(args)
        text = args.link if args.link is not None else cfg.swarm.link
        link = LinkSpec.parse(text) if text else None
        # A hang: silence or no optimizer step for 3 round deadlines (at least a minute).
        hang_s = max(60.0, 3 * cfg.exchange.timeout_s, 3 * cfg.dataplane.microbatch_timeout_s)
        summary = run_simulation(
            nodes=args.nodes, config=args.config, overrides=args.overrides, duration=args.duration,
            faults=parse_faults(args.faults), workdir=args.workdir, quiet=args.json, link=link,
            link_mode=args.link_mode, prometheus_sd=args.prometheus_sd, nat=args.nat,
            waves=Waves.parse(args.waves, args.seed) if args.waves else None, stages=cfg.pipeline.num_stages,
            hang_s=hang_s, stagger=args.stagger,
        )
    except ValueError as err:  # a bad --link
        print(f"error: {err}", file=sys.stderr)
        return 2
    except SimError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0 if summary.get("ok") else 1


def cmd_config(args: argparse.Namespace) -> int:
    if args.action == "fields":
        print(describe_fields())
    else:
        print(config_to_toml(_load(args)), end="")
    return 0


def _add_train_local_parser(sub: argparse._SubParsersAction) -> None:
    """``node train-local``: every stage in this one process."""
    train = sub.add_parser("train-local", help="train every stage in this one process")
    _add_config_args(train, DEFAULT_LOCAL_CONFIG)
    train.add_argument("--device", help="cpu, cuda, cuda:N or auto (shortcut for --set train.device=...)")
    train.add_argument("--steps", type=int, help="shortcut for --set train.steps=N")
    train.add_argument("--json", action="store_true", help="print the final summary as one JSON line")
    train.set_defaults(func=cmd_train_local)


def _add_start_parser(sub: argparse._SubParsersAction) -> None:
    """``node start``: the daemon, founding a swarm or joining one."""
    start = sub.add_parser("start", help="run the daemon: rejoin this identity's last run, join one with "
                                         "--join, or start a new swarm")
    _add_config_args(start, DEFAULT_SWARM_CONFIG)
    swarm = start.add_mutually_exclusive_group()
    swarm.add_argument("--join", "--initial-peers", dest="join", action="append", default=[], metavar="MADDR",
                       help="multiaddr of a swarm peer (…/p2p/<peer id>), or the http://HOST:PORT of a peer's metrics "
                            "port (its addresses are read from /health); repeatable, any one answering is enough. "
                            "Without it (nor swarm.initial_peers): rejoin this identity's last run, else a new swarm")
    swarm.add_argument("--new", action="store_true",
                       help="start a new swarm (a new run) even if this identity was in one before")
    start.add_argument("--run-id", help="run to create (default: the identity's last run, else <model>-<random>) or "
                                        "to join")
    start.add_argument("--stage", type=int, help="serve this stage and never rebalance")
    start.add_argument("--identity", help="key file of this daemon's identity (default ~/.protoswarm/identity.key)")
    start.add_argument("--swarm-key", metavar="FILE",
                       help="file with the swarm's shared secret: only peers holding it take part (docs/security.md)")
    start.add_argument("--allow-peer", action="append", default=[], metavar="PEER_ID",
                       help="take part only with these peers (repeatable; docs/security.md)")
    start.add_argument("--host-maddrs", action="append", default=[], metavar="MADDR",
                       help="libp2p listen address (repeatable; default /ip4/0.0.0.0/tcp/31337, an error when that "
                            "port is busy; /ip4/0.0.0.0/tcp/0 = any free port)")
    start.add_argument("--announce-maddrs", action="append", default=[], metavar="MADDR",
                       help="address other peers should dial, e.g. your public IP and forwarded port (repeatable)")
    start.add_argument("--metrics-host", help="interface for /metrics and /health (default 0.0.0.0)")
    start.add_argument("--metrics-port", type=int, help="port for /metrics and /health (default 9464; 0 = any)")
    start.add_argument("--device", help="cpu, cuda, cuda:N or auto (one daemon per GPU: cuda:0, cuda:1, …)")
    start.add_argument("--threads", type=int, help="torch threads for this daemon")
    start.add_argument("--status", choices=("auto", "line", "log", "off"), default="auto",
                       help="live status (stage, peers, tok/s, loss, bytes): auto = a line redrawn in place on a "
                            "terminal, a log line every --status-every seconds otherwise (default auto)")
    start.add_argument("--status-every", type=float, default=60.0, metavar="S",
                       help="seconds between status log lines when not on a terminal (default 60)")
    start.set_defaults(func=cmd_start)


def _add_status_parser(sub: argparse._SubParsersAction) -> None:
    """``node status``: the swarm as a table or one JSON object."""
    status = sub.add_parser("status", help="print the swarm: stages, peers, state, throughput, progress")
    status.add_argument("--join", action="append", default=[], metavar="MADDR", help="any peer of the swarm")
    status.add_argument("--run-id", help="which run (default: the only one)")
    status.add_argument("--health-url", default="http://127.0.0.1:9464/health",
                        help="without --join, ask this local node for its address (default: %(default)s)")
    status.add_argument("--timeout", type=float, default=30.0, help="seconds to reach the swarm")
    status.add_argument("--swarm-key", metavar="FILE",
                        help="the swarm's key file: show only peers holding it, as members see the swarm")
    status.add_argument("--json", action="store_true", help="one JSON object for scripts")
    status.set_defaults(func=cmd_status)


def _add_sim_parser(sub: argparse._SubParsersAction) -> None:
    """``node sim``: a local swarm of ``node start`` processes, with scripted faults."""
    sim = sub.add_parser("sim", help="a local swarm of real `node start` processes on 127.0.0.1")
    sim.add_argument("--nodes", type=int, default=3, help="nodes including the bootstrap (default 3)")
    _add_config_args(sim, DEFAULT_SWARM_CONFIG)
    sim.add_argument("--duration", type=float, default=60.0, help="seconds to run (default 60)")
    sim.add_argument("--faults", default="", metavar="T:ACTION:TARGET,...",
                     help="fault script: at T seconds kill|kill-in-round|term|start|pause|resume|partition|heal a node (partition "
                          "and heal need --link with namespaces): TARGET is its index, "
                          "sS (a node serving stage S then) or new (start only), e.g. 60:kill:s1,90:start:new")
    sim.add_argument("--waves", metavar="EVERY,COUNT,DOWN[,FIRST]",
                     help="kill-and-restart waves: every EVERY s (from FIRST, default EVERY) SIGKILL COUNT live "
                          "nodes other than node 0, spread over the stages and never a stage's last one, and start "
                          "each again DOWN s later, e.g. 60,4,20")
    sim.add_argument("--seed", type=int, default=0, help="seed for the wave victims (default 0)")
    sim.add_argument("--stagger", type=float, default=0.0, metavar="S",
                     help="seconds between the starts of the joiners (default 0: all at once)")
    sim.add_argument("--workdir", help="directory for identities, checkpoints and logs (default: a temp dir)")
    sim.add_argument("--json", action="store_true", help="print only the JSON summary (last line either way)")
    sim.add_argument("--link", metavar="RATE[,delay=D]",
                     help="give every node a home link, e.g. 80mbit or 20mbit,delay=30ms (default: the config's "
                          "swarm.link; none). As root: a network namespace per node with tc tbf; otherwise "
                          "in-process throttling of protoswarm's own streams")
    sim.add_argument("--link-mode", choices=("auto", "netns", "app"), default="auto",
                     help="how --link is emulated: auto (namespaces when root), netns (fail without root), "
                          "app (in-process)")
    sim.add_argument("--nat", type=int, default=0, metavar="N",
                     help="put the last N nodes each behind a home router of its own (a namespace that masquerades: "
                          "they dial out, nobody dials in); needs root and iptables; works with --link")
    sim.add_argument("--prometheus-sd", metavar="FILE",
                     help="keep FILE listing the live nodes' /metrics endpoints for Prometheus's file_sd_configs "
                          "(rewritten atomically as nodes start and stop; docs/metrics.md)")
    sim.set_defaults(func=cmd_sim)


def _add_config_parser(sub: argparse._SubParsersAction) -> None:
    """``node config show|fields``."""
    config = sub.add_parser("config", help="show the resolved config or document every field")
    config.add_argument("action", choices=["show", "fields"])
    _add_config_args(config, DEFAULT_LOCAL_CONFIG)
    config.set_defaults(func=cmd_config)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="node", description="protoswarm: peer-to-peer decentralized training node")
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train_local_parser(sub)
    _add_start_parser(sub)
    _add_status_parser(sub)
    _add_sim_parser(sub)
    _add_config_parser(sub)
    add_plan_parser(sub, _add_config_args)
    add_model_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname).1s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)
    try:
        return args.func(args)
    except (ConfigError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except FloatingPointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
