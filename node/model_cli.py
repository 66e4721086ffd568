"""``node export``, ``node eval`` and ``node generate``: the trained model out of the swarm, and used.

    node export --join MADDR [--run-id RUN] --out DIR [--format native|hf] [--swarm-key FILE] [--json]
    node export --checkpoint DIR --out DIR [--format native|hf]      from a `node train-local` checkpoint
    node eval --model DIR [--text PATH] [--device cpu|cuda|auto] [--seq-len N] [--batches N]
    node generate --model DIR --prompt TEXT [--max-new-tokens N] [--temperature T] [--top-k K] [--seed S]

docs/export.md says what an export holds and how the swarm's agreed weights are chosen.
"""

from __future__ import annotations

import argparse
import json
import sys

from node.config import ConfigError, build_config
from node.model_files import FORMATS, ExportError


def add_model_parsers(sub: argparse._SubParsersAction) -> None:
    export = sub.add_parser("export", help="fetch every stage's agreed weights from a swarm (or read a train-local "
                                           "checkpoint) and write the whole model as files (docs/export.md)")
    source = export.add_mutually_exclusive_group(required=True)
    source.add_argument("--join", action="append", metavar="MADDR", help="any peer of the swarm (repeatable)")
    source.add_argument("--checkpoint", metavar="DIR", help="a `node train-local` checkpoint directory instead")
    export.add_argument("--run-id", help="which run (default: the only one in the swarm)")
    export.add_argument("--out", required=True, metavar="DIR", help="directory to write (must not exist or be empty)")
    export.add_argument("--format", choices=FORMATS, default="native",
                        help="native: the stages as trained, reloads bit-exactly; hf: the merged dense Llama that "
                             "transformers' LlamaForCausalLM loads (default native)")
    export.add_argument("--tokenizer", metavar="PATH", help="the run's tokenizer.json, when it is a file (not bytes)")
    export.add_argument("--swarm-key", metavar="FILE", help="the swarm's key, if it has one (docs/security.md)")
    export.add_argument("--timeout", type=float, default=60.0, help="seconds to reach the swarm (default 60)")
    export.add_argument("--stall", type=float, default=60.0,
                        help="seconds without a verified chunk before a download is given up (default 60)")
    export.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    export.set_defaults(func=cmd_export)

    ev = sub.add_parser("eval", help="validation loss of an exported model (the run's validation split, or a text file)")
    ev.add_argument("--model", required=True, metavar="DIR", help="a `node export` directory (either format)")
    ev.add_argument("--text", metavar="PATH", help="score this UTF-8 text file instead of the run's validation split")
    ev.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default auto)")
    ev.add_argument("--seq-len", type=int, help="window length (default: the run's train.seq_len)")
    ev.add_argument("--batch-size", type=int, help="windows per batch (default: the run's train.batch_size)")
    ev.add_argument("--batches", type=int, help="batches at most (default: the run's train.eval_batches)")
    ev.set_defaults(func=cmd_eval)

    gen = sub.add_parser("generate", help="sample a continuation of a prompt from an exported model")
    gen.add_argument("--model", required=True, metavar="DIR", help="a `node export` directory (either format)")
    gen.add_argument("--prompt", required=True, help="the text to continue")
    gen.add_argument("--max-new-tokens", type=int, default=200, help="tokens to add (default 200)")
    gen.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    gen.add_argument("--top-k", type=int, default=40, help="sample among the k likeliest tokens; 0 = all (default 40)")
    gen.add_argument("--seed", type=int, help="sampling seed (default: random)")
    gen.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default auto)")
    gen.add_argument("--json", action="store_true", help="print prompt, text and ids as one JSON object")
    gen.set_defaults(func=cmd_generate)


def cmd_export(args: argparse.Namespace) -> int:
    from swarm.access import AccessError, SwarmAccess, load_key

    try:
        if args.checkpoint:
            summary = _export_checkpoint(args)
        else:
            from node.export_swarm import SwarmExport

            access = SwarmAccess(load_key(args.swarm_key) if args.swarm_key else None)
            export = SwarmExport(args.join, args.run_id, access, timeout=args.timeout, stall_s=args.stall)
            summary = export.run(args.out, args.format, args.tokenizer)
    except (ExportError, AccessError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"wrote {summary['out']} ({summary['format']}, {summary['parameters'] / 1e6:.1f}M parameters) from "
              f"{summary.get('run_id') or summary.get('checkpoint')} in {summary['seconds']:.1f} s")
    return 0


def _export_checkpoint(args: argparse.Namespace) -> dict:
    import time

    import torch

    from node.checkpoint import load_latest
    from node.model import LanguageModel
    from node.model_files import write_export

    started = time.monotonic()
    state = load_latest(args.checkpoint)
    if state is None:
        raise ExportError(f"no checkpoint in {args.checkpoint}")
    cfg = build_config(state["config"])
    stages = state.get("stages") or {}
    if sorted(stages) != list(range(cfg.pipeline.num_stages)):
        raise ExportError(f"{args.checkpoint} holds stage(s) {sorted(stages)} of {cfg.pipeline.num_stages}: a daemon's "
                          "checkpoint holds one stage; export a swarm with --join, or a train-local checkpoint")
    model = LanguageModel(cfg.model, cfg.pipeline)
    with torch.no_grad():
        for s, stage in enumerate(model.stages):
            stage.load_state_dict(stages[s]["model"])
    provenance = {"checkpoint": str(args.checkpoint), "step": state.get("step")}
    path = write_export(args.out, model.eval(), cfg, args.format, provenance, args.tokenizer)
    return {"out": str(path), "format": args.format, "checkpoint": str(args.checkpoint), "step": state.get("step"),
            "parameters": sum(p.numel() for p in model.parameters()), "seconds": round(time.monotonic() - started, 1)}


def _load(args: argparse.Namespace):
    from node.device import resolve_device
    from node.model_files import load_export

    try:
        return load_export(args.model, resolve_device(args.device))
    except ExportError as err:
        raise ConfigError(str(err)) from None


def cmd_eval(args: argparse.Namespace) -> int:
    from node.model_use import evaluate_model, export_tokenizer

    exported = _load(args)
    result = evaluate_model(exported.model, exported.cfg, text=args.text, seq_len=args.seq_len,
                            batch_size=args.batch_size, max_batches=args.batches, tokenizer=export_tokenizer(exported))
    print(json.dumps({"model": str(exported.path), "format": exported.meta["format"], **result}))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from node.model_use import export_tokenizer, generate

    exported = _load(args)
    tok = export_tokenizer(exported)
    prompt = [int(i) for i in tok.encode(args.prompt)]
    ids = generate(exported.model, prompt, args.max_new_tokens, args.temperature, args.top_k or None, args.seed)
    text = tok.decode(ids[len(prompt):])
    if args.json:
        print(json.dumps({"prompt": args.prompt, "text": text, "ids": ids[len(prompt):]}))
    else:
        print(args.prompt + text)
    return 0
