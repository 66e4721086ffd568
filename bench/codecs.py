"""Size, error and speed of the tensor codecs (protocol/codecs.py), ours and hivemind's side by side.

For every codec (fp32, bf16, fp16, int8, e3m0, hivemind-float16, hivemind-uniform8bit) measures:

- ``bits_per_value``: ``8·len(encode(x)) / numel`` on the benchmark tensor, block scales and codebooks
  included; ``bits_per_value_with_header`` is the same for ``protocol.tensors.encode_tensor`` (length
  prefix + msgpack descriptor + payload, the self-describing form);
- ``rel_l2_error``: ``‖decode(encode(x)) − x‖ / ‖x‖`` for x ~ N(0, 1);
- ``rel_l2_error_pseudo_grad``: the same for a real pseudo-gradient ``θ_a − θ_b`` between two
  checkpoints of the ``tiny`` model trained here (embedded corpus, no downloads), all parameters
  concatenated flat; ``..._per_tensor_mean`` encodes each parameter tensor on its own and averages
  the per-tensor errors;
- ``encode_GBps`` / ``decode_GBps``: float32 input bytes per second, one torch thread, best of
  several repeats after a warm-up (decode includes the finiteness check receivers run;
  ``decode_GBps_no_finite_check`` is without it — quantized codecs only check their scales).

    python bench/codecs.py --quick      # 2^22 values, 40 training steps (10 s measured on 2 CPU cores)
    python bench/codecs.py              # 2^24 values, 200 training steps, more repeats

Prints one JSON object as its last line and writes a PNG of error vs bits per value.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from node.checkpoint import CheckpointError, list_checkpoints, load_latest
from node.config import load_config
from node.train_local import train_local
from protocol.codecs import Codec, get_codec
from protocol.tensors import encode_tensor

ROOT = Path(__file__).resolve().parents[1]
CODEC_NAMES = ("fp32", "bf16", "fp16", "int8", "e3m0", "hivemind-float16", "hivemind-uniform8bit")
E3M0_TARGET_BITS = 4.25  # issue: E3M0 at most 4.25 bits per value, scales included


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def rel_l2(approx: torch.Tensor, exact: torch.Tensor) -> float:
    exact64 = exact.reshape(-1).double()
    return ((approx.reshape(-1).double() - exact64).norm() / exact64.norm().clamp_min(1e-300)).item()


def roundtrip(codec: Codec, x: torch.Tensor) -> tuple[bytes, torch.Tensor]:
    payload = codec.encode(x)
    back = codec.decode(payload, tuple(x.shape))
    if back.dtype != torch.float32 or tuple(back.shape) != tuple(x.shape):
        raise AssertionError(f"{codec.name}: decoded {back.dtype} {list(back.shape)} for {list(x.shape)}")
    return payload, back


def best_seconds(fn, repeats: int) -> float:
    fn()  # warm-up (first-call allocations, lazy imports)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _weights(state: dict) -> dict[str, torch.Tensor]:
    """Every stage's weights of a checkpoint, named as in the whole model (``stages.<s>.<name>``)."""
    return {f"stages.{s}.{name}": t for s, stage in state["stages"].items() for name, t in stage["model"].items()}


def _load_step(path: Path, step: int) -> dict:
    """One checkpoint by path, read the way node.checkpoint reads (weights_only, step checked)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"checkpoint {path} cannot be read ({err})") from err
    if not isinstance(state, dict) or state.get("step") != step:
        raise CheckpointError(f"checkpoint {path} does not hold step {step}")
    return state


def pseudo_gradient(quick: bool) -> tuple[torch.Tensor, list[tuple[str, torch.Tensor]], dict]:
    """θ_a − θ_b between the last two checkpoints of a short tiny run (a = earlier, as DiLoCo's Δ)."""
    steps, every = (40, 20) if quick else (200, 100)
    data = (["data.max_bytes=1000000", "train.batch_size=4", "train.seq_len=64"] if quick
            else ["data.max_bytes=4000000", "train.batch_size=16", "train.seq_len=128"])
    log(f"training tiny for {steps} steps (checkpoint every {every}) for a pseudo-gradient ...")
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config("local/tiny", [
            *data, f"train.steps={steps}", f"train.checkpoint_every={every}", f"train.warmup_steps={every // 2}",
            "train.eval_every=0", "train.eval_batches=2", "train.log_every=100000", "train.seed=0", "data.seed=0",
            f"train.checkpoint_dir='{tmp}'", "train.resume=false",
        ])
        result = train_local(cfg)
        found = list_checkpoints(tmp)
        if len(found) < 2:
            raise RuntimeError(f"expected two checkpoints in {tmp}, found {[s for s, _ in found]}")
        (step_a, path_a), (step_b, _) = found[-2], found[-1]
        state_a, state_b = _load_step(path_a, step_a), load_latest(tmp)
    trainable = {n for n, p in result.model.named_parameters() if p.requires_grad}
    model_a, model_b = _weights(state_a), _weights(state_b)
    tensors = [(name, (model_a[name].float() - model_b[name].float()).contiguous())
               for name in model_b if name in trainable]
    flat = torch.cat([t.reshape(-1) for _, t in tensors])
    info = {
        "preset": "tiny", "steps_a": step_a, "steps_b": step_b, "inner_steps": step_b - step_a,
        "definition": f"theta(step {step_a}) - theta(step {step_b}), all trainable parameters, flat",
        "overrides": data, "numel": flat.numel(), "tensors": len(tensors),
        "tensors_all_zero": sum(1 for _, t in tensors if not bool(t.any())),
        "std": flat.std().item(), "absmax": flat.abs().max().item(),
        "absmax_over_std": (flat.abs().max() / flat.std()).item(),
        "train_seconds": round(time.time() - t0, 1),
    }
    log(json.dumps(info))
    return flat, tensors, info


def per_tensor_errors(codec: Codec, tensors: list[tuple[str, torch.Tensor]]) -> dict:
    errors, err_sq, ref_sq, nbytes, nbytes_header = [], 0.0, 0.0, 0, 0
    worst = (-1.0, "")
    for name, t in tensors:
        payload, back = roundtrip(codec, t)
        nbytes += len(payload)
        nbytes_header += len(encode_tensor(t, codec.name))
        diff = (back.double() - t.double()).norm().item() ** 2
        ref = t.double().norm().item() ** 2
        err_sq, ref_sq = err_sq + diff, ref_sq + ref
        if ref > 0:
            errors.append((diff / ref) ** 0.5)
            worst = max(worst, (errors[-1], name))
    numel = sum(t.numel() for _, t in tensors)
    return {
        "rel_l2_error_pseudo_grad_per_tensor_mean": sum(errors) / len(errors),
        "rel_l2_error_pseudo_grad_per_tensor_max": worst[0],
        "per_tensor_max_at": worst[1],
        "rel_l2_error_pseudo_grad_per_tensor_global": (err_sq / ref_sq) ** 0.5,
        "bits_per_value_pseudo_grad_per_tensor_with_header": 8.0 * nbytes_header / numel,
        "bits_per_value_pseudo_grad_per_tensor": 8.0 * nbytes / numel,
    }


def measure(codec: Codec, x: torch.Tensor, grad: torch.Tensor, tensors, repeats: int) -> dict:
    numel = x.numel()
    payload, back = roundtrip(codec, x)
    bits = 8.0 * len(payload) / numel
    if len(payload) != codec.payload_nbytes(numel):
        raise AssertionError(f"{codec.name}: payload {len(payload)} B, payload_nbytes says {codec.payload_nbytes(numel)}")
    _, grad_back = roundtrip(codec, grad)
    row = {
        "codec": codec.name,
        "bits_per_value": bits,
        "bits_per_value_with_header": 8.0 * len(encode_tensor(x, codec.name)) / numel,
        "rel_l2_error": rel_l2(back, x),
        "rel_l2_error_pseudo_grad": rel_l2(grad_back, grad),
    }
    row.update(per_tensor_errors(codec, tensors))
    shape = tuple(x.shape)
    enc_s = best_seconds(lambda: codec.encode(x), repeats)
    dec_s = best_seconds(lambda: codec.decode(payload, shape), repeats)
    raw_s = best_seconds(lambda: codec.decode(payload, shape, check_finite=False), repeats)
    row["encode_GBps"] = 4 * numel / enc_s / 1e9
    row["decode_GBps"] = 4 * numel / dec_s / 1e9
    row["encode_ms"] = 1e3 * enc_s
    row["decode_ms"] = 1e3 * dec_s
    row["decode_GBps_no_finite_check"] = 4 * numel / raw_s / 1e9
    if codec.name == "e3m0":
        row["meets_4_25_bits"] = bits <= E3M0_TARGET_BITS
    return row


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for key, label, marker in (("rel_l2_error", "N(0,1) data", "o"),
                               ("rel_l2_error_pseudo_grad", "tiny pseudo-gradient (flat)", "s")):
        pts = [(r["bits_per_value"], r[key], r["codec"]) for r in rows if r[key] > 0]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=label, alpha=0.8)
        if key == "rel_l2_error":
            labels: dict[tuple[float, float], list[str]] = {}
            for bits, err, name in pts:  # codecs that give identical results share one label
                labels.setdefault((bits, err), []).append(name)
            for (bits, err), names in labels.items():
                ax.annotate(" = ".join(names), (bits, err), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("bits per value (payload, scales/codebook included)")
    ax.set_ylabel("relative L2 error  ||x̂ − x|| / ||x||")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(title="fp32 is lossless (error 0), not shown", fontsize=8, title_fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2^22 values, 40 training steps (about 10 s)")
    parser.add_argument("--log2-numel", type=int, help="benchmark tensor size as a power of two (22 quick / 24)")
    parser.add_argument("--repeats", type=int, help="timed repeats per codec and direction (5 quick / 10)")
    parser.add_argument("--codecs", nargs="+", default=list(CODEC_NAMES), help="codecs to measure")
    parser.add_argument("--out", help="PNG path (default bench/out/codecs-quick.png or bench/out/codecs.png)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    log2 = args.log2_numel or (22 if args.quick else 24)
    repeats = args.repeats or (5 if args.quick else 10)
    out = Path(args.out or ("bench/out/codecs-quick.png" if args.quick else "bench/out/codecs.png"))

    t0 = time.time()
    grad, tensors, grad_info = pseudo_gradient(args.quick)
    torch.set_num_threads(1)  # every codec measurement below runs on one thread
    numel = 1 << log2
    x = torch.randn(numel, generator=torch.Generator().manual_seed(0))
    rows = []
    for name in args.codecs:
        log(f"measuring {name} ...")
        rows.append(measure(get_codec(name), x, grad, tensors, repeats))
        log(json.dumps(rows[-1]))
    plot(rows, out, f"tensor codecs: {numel:,} N(0,1) values and a {grad.numel():,}-value tiny pseudo-gradient")
    if args.quick and args.out is None:
        shutil.copyfile(out, ROOT / "docs/img/codecs-quick.png")
    import hivemind

    e3m0 = next((r for r in rows if r["codec"] == "e3m0"), None)
    summary = {
        "bench": "codecs",
        "numel": numel,
        "data": "torch.randn(numel), generator seed 0",
        "pseudo_grad": grad_info,
        "e3m0_meets_4_25_bits": e3m0["meets_4_25_bits"] if e3m0 else None,
        "targets": {"e3m0_bits_per_value": f"<= {E3M0_TARGET_BITS}"},
        "timing": {"threads": torch.get_num_threads(), "repeats": repeats, "statistic": "best after 1 warm-up",
                   "bytes": "float32 input bytes (4 per value)", "decode_check_finite": True},
        "rows": rows,
        "machine": {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__, "hivemind": hivemind.__version__},
        "plot": str(out),
        "quick": args.quick,
        "seconds": round(time.time() - t0, 1),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
