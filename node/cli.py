"""The ``node`` (alias ``protoswarm``) command.

    node train-local [--config NAME|PATH] [--set section.field=value ...] [--device cpu|cuda|auto]
    node config show [--config ...] [--set ...]     resolved config as TOML
    node config fields                               every field with type, default and meaning

User mistakes (bad config, missing paths, unusable checkpoints) print one ``error:`` line and exit 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from node.checkpoint import CheckpointError
from node.config import ConfigError, RunConfig, describe_fields, load_config

DEFAULT_LOCAL_CONFIG = "local/tiny"


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


def _toml_value(value: Any) -> str:
    if value is None:
        return '"none"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)


def config_to_toml(cfg: RunConfig) -> str:
    out = []
    for section, values in cfg.to_dict().items():
        out.append(f"[{section}]")
        out += [f"{key} = {_toml_value(value)}" for key, value in values.items()]
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


def cmd_config(args: argparse.Namespace) -> int:
    if args.action == "fields":
        print(describe_fields())
    else:
        print(config_to_toml(_load(args)), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="node", description="protoswarm: peer-to-peer decentralized training node")
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train-local", help="train every stage in this one process")
    _add_config_args(train, DEFAULT_LOCAL_CONFIG)
    train.add_argument("--device", help="cpu, cuda, cuda:N or auto (shortcut for --set train.device=...)")
    train.add_argument("--steps", type=int, help="shortcut for --set train.steps=N")
    train.add_argument("--json", action="store_true", help="print the final summary as one JSON line")
    train.set_defaults(func=cmd_train_local)

    config = sub.add_parser("config", help="show the resolved config or document every field")
    config.add_argument("action", choices=["show", "fields"])
    _add_config_args(config, DEFAULT_LOCAL_CONFIG)
    config.set_defaults(func=cmd_config)
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
