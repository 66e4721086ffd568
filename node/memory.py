"""What one pipeline stage needs in memory, estimated from the config alone (no allocation).

``estimate_stage(cfg, s)`` lists, component by component, the bytes stage ``s`` of a run holds while it
trains: weights, gradients and AdamW state (fp32), the Streaming DiLoCo outer state, the frozen tensors
every stage rebuilds (T_fixed, U, RoPE tables), the microbatches in flight, the autograd graph(s), the
last stage's logits and the optimizer step's temporaries. ``plan(cfg, mem)`` checks every stage against a
card's memory; ``smallest_stages(cfg, mem)`` finds the fewest stages that fit. docs/memory.md gives the
formulas and how tests/unit/test_memory_plan.py checks the cpu figures against peaks measured through
:mod:`node.engine`; the cuda figures (bf16 autocast) are unmeasured until bench/gpu.py runs on a GPU.

The stages' layers and parameter counts come from :func:`node.model.stage_layers` and
:func:`node.model.stage_parameters`, the very functions the engine builds stages with.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from node.config import ModelConfig, RunConfig
from node.model import layer_parameters, stage_layers, stage_parameters
from node.model_config import most_stages

GIB = 1 << 30
DEVICE_TYPES = ("cuda", "cpu")

# Added to every cuda plan. The CUDA context (driver state and the kernel images of torch, cuBLAS and
# cuDNN, loaded lazily: ~0.3-0.6 GiB on recent cards) lives outside torch's caching allocator, so
# torch.cuda.memory_allocated() never shows it; the allocator's own slack (blocks reserved but not
# allocated: fragmentation, cuBLAS workspaces) is not in the allocated count either.
CUDA_OVERHEAD_BYTES = 1 * GIB

FP32, BF16, INT64 = 4, 2, 8


@dataclass(frozen=True, kw_only=True)
class StageMemory:
    """The memory of one stage, in bytes.

    ``parts`` holds every component at its own largest size. ``device_bytes`` is the peak of the
    device's tensors, not the sum of ``parts``: the resident parts (weights, optimizer, frozen tensors,
    inputs in flight, outer state when on the device, the CUDA allowance) plus the larger of two
    working sets that never coexist — the backward's (graphs, logits, backward temporaries; the
    gradients too when ``train.grad_accum`` > 1, else only the LM head's, allocated while the graph is
    still alive) and the optimizer step's (all gradients plus the step's temporaries). With
    ``grad_accum`` = 1 the step frees the gradients (``zero_grad(set_to_none=True)``) and the next
    backward allocates them again as it frees the graph, so gradients and graph do not peak together.
    ``peak_phase`` says which working set sets the peak. ``host_bytes``: what lives in host memory
    outside the device (the outer state on a cuda plan).
    """

    stage: int
    layers: range
    params: int
    parts: dict[str, int]
    device_bytes: int
    host_bytes: int
    peak_phase: str
    device_type: str


def _block_saved_per_token(m: ModelConfig, cuda: bool) -> int:
    """Bytes autograd keeps per token for one block of node/model.py (the block's input included).

    Per block, in order: the input x (fp32 residual, saved by RMSNorm's pow and mul), RMSNorm's rsqrt
    (one value) and normalised x (fp32) and its output (the Linear's input: fp32 on cpu, its bf16 cast
    under autocast); attention's q and k after RoPE, the k|v projection output (v is a view of it), the
    SDPA output and its logsumexp (one fp32 per head); on cpu the attention output reshaped for the
    writer is a copy (the CPU flash kernel returns (b, heads, n, hd) contiguous; CUDA flash returns a
    view); the residual after attention (fp32) and the MLP's RMSNorm as above; the gate|up output (gate
    and up are views of it), silu(gate) and silu(gate)·up. The writers' ``y·Uᵀ`` saves nothing (U needs
    no gradient), nor does RoPE's multiply by the tables.
    """
    d, h, heads = m.d_model, m.hidden, m.n_heads
    kvd = m.kv_heads * (d // heads)
    act = BF16 if cuda else FP32  # outputs of matmuls (autocast) and what is computed from them
    norm_out = BF16 if cuda else FP32  # the Linear's input: the bf16 cast of the fp32 norm output
    attn_norm = FP32 * d + FP32 + FP32 * d + norm_out * d  # x, rsqrt, normalised, output
    attention = act * (d + kvd + 2 * kvd + d) + FP32 * heads + (0 if cuda else FP32 * d)
    mlp_norm = FP32 * d + FP32 + FP32 * d + norm_out * d  # x after attention, rsqrt, normalised, output
    mlp = act * (2 * h + h + h)
    return attn_norm + attention + mlp_norm + mlp


def _final_norm_saved_per_token(m: ModelConfig, cuda: bool) -> int:
    """The last stage's final RMSNorm: its input x, rsqrt, normalised x and output (the LM head's input)."""
    return FP32 * m.d_model + FP32 + FP32 * m.d_model + (BF16 if cuda else FP32) * m.d_model


def _graph_bytes(m: ModelConfig, num_layers: int, first: bool, last: bool, tokens: int, cuda: bool) -> int:
    """Bytes one microbatch's autograd graph keeps: its blocks, plus the final norm on the last stage.
    The boundary decode and encode save nothing of their own (their matmuls are with U, which needs no
    gradient; the table lookups keep only the ids, which the microbatch's input already holds)."""
    per_token = num_layers * _block_saved_per_token(m, cuda)
    if last:
        per_token += _final_norm_saved_per_token(m, cuda)
    if not first and not m.subspace_rank:  # dense boundary: the first block's input is the input itself
        per_token -= FP32 * m.d_model
    return tokens * per_token


def _matrix_parameters(m: ModelConfig, num_layers: int, last: bool) -> int:
    """Parameters the Linear layers multiply with: autocast keeps a bf16 copy of each in the graph."""
    blocks = num_layers * (layer_parameters(m, dense_writers=last) - 2 * m.d_model)  # less the norms
    return blocks + (m.d_model * m.vocab_size if last else 0)


def _largest_tensor(m: ModelConfig, first: bool, last: bool) -> int:
    """Elements of the stage's largest parameter tensor (the CPU AdamW step works one tensor at a time)."""
    d, k = m.d_model, m.subspace_rank
    kvd = m.kv_heads * (d // m.n_heads)
    writer_rows = d if last or not k else k
    sizes = [d * d, 2 * kvd * d, 2 * m.hidden * d, writer_rows * d, writer_rows * m.hidden]
    if first:
        sizes.append(m.vocab_size * (k or d))
    if last:
        sizes.append(m.vocab_size * d)
    return max(sizes)


def estimate_stage(cfg: RunConfig, stage: int, device_type: str = "cuda", *, inflight: int | None = None,
                   outer_on_device: bool | None = None) -> StageMemory:
    """The memory of stage ``stage`` of ``cfg`` (``cfg.pipeline``'s split) training on ``device_type``.

    ``inflight``: microbatches in flight per stage (default ``dataplane.max_inflight``).
    ``outer_on_device``: where the Streaming DiLoCo outer state lives when ``diloco.enabled`` (default:
    host memory on cuda, as the engine's ``outer_device = "auto"`` puts it; the same RAM on cpu)."""
    return _estimate(cfg, stage_layers(cfg.model, cfg.pipeline), stage, device_type, inflight, outer_on_device)


def _estimate(cfg: RunConfig, ranges: list[range], stage: int, device_type: str, inflight: int | None,
              outer_on_device: bool | None) -> StageMemory:
    """:func:`estimate_stage` for the split ``ranges`` (computed once per split by the callers)."""
    if device_type not in DEVICE_TYPES:
        raise ValueError(f"device type must be one of {DEVICE_TYPES}, got {device_type!r}")
    m, t = cfg.model, cfg.train
    num_stages = len(ranges)
    if not 0 <= stage < num_stages:
        raise ValueError(f"stage {stage} does not exist: the run has {num_stages} stage(s)")
    inflight = cfg.dataplane.max_inflight if inflight is None else inflight
    if inflight < 1:
        raise ValueError(f"inflight must be >= 1, got {inflight}")
    cuda = device_type == "cuda"
    outer_on_device = not cuda if outer_on_device is None else outer_on_device
    layers = ranges[stage]
    first, last = stage == 0, stage == num_stages - 1
    params = stage_parameters(m, layers, stage, num_stages)
    d, vocab, width = m.d_model, m.vocab_size, m.subspace_rank or m.d_model
    tokens = t.batch_size * (t.seq_len + 1)  # a microbatch is a window of seq_len + 1 ids
    scored = t.batch_size * t.seq_len  # positions the loss scores
    # Non-last stages keep each in-flight microbatch until its backward; the last stage (and a lone
    # stage) runs forward and backward at once, so one microbatch at a time.
    held = 1 if last else inflight
    graphs = held if cfg.dataplane.backward == "stash" else 1

    parts = {
        "weights": FP32 * params,
        "gradients": FP32 * params,
        "optimizer": 2 * FP32 * params,  # AdamW exp_avg, exp_avg_sq
        "outer": _outer_bytes(cfg, params, len(layers)),
        "fixed_table": FP32 * vocab * d if m.uses_fixed_table else 0,
        "basis": FP32 * d * m.subspace_rank if m.subspace_rank else 0,
        "rope": 2 * FP32 * m.max_seq_len * (d // m.n_heads // 2),  # cos, sin
        # ids (int64) and, past the first stage, the input boundary (fp32) of each microbatch held
        "inputs": held * tokens * (INT64 + (0 if first else FP32 * width)),
        "activations": graphs * _graph_bytes(m, len(layers), first, last, tokens, cuda),
        "autocast_weights": graphs * BF16 * _matrix_parameters(m, len(layers), last) if cuda else 0,
        "logits": _loss_bytes(tokens, scored, vocab, cuda) if last else 0,
        "backward_temporaries": _backward_temporaries(m, tokens, last, cuda),
        "step_temporaries": _step_temporaries(m, len(layers), params, first, last, cuda),
        "cuda_overhead": CUDA_OVERHEAD_BYTES if cuda else 0,
    }
    resident = sum(parts[p] for p in ("weights", "optimizer", "fixed_table", "basis", "rope", "inputs",
                                      "cuda_overhead"))
    resident += parts["outer"] if outer_on_device else 0
    backward, step = _working_sets(m, parts, tokens, t.grad_accum, last, cuda)
    return StageMemory(stage=stage, layers=layers, params=params, parts=parts,
                       device_bytes=resident + max(backward, step),
                       host_bytes=0 if outer_on_device else parts["outer"],
                       peak_phase="backward" if backward >= step else "step", device_type=device_type)


def _outer_bytes(cfg: RunConfig, params: int, num_layers: int) -> int:
    """The Streaming DiLoCo outer state of a stage of ``params`` parameters (fp32): its global copy and
    momentum; the error-feedback residual; and, for one fragment in flight (the staggered schedule's usual
    state: a slow round can hold more), the part begun (error feedback), the local fragment taken
    (``merge = 'since'``) and the first moment sent (``first_moment``). P is capped as the stage's outer loop
    caps it (``DilocoConfig.for_units``), at its blocks: a stage has at least that many units, so its fragments
    are never fewer than counted (nor larger on average)."""
    d = cfg.diloco
    if not d.enabled:
        return 0
    fragments = d.for_units(max(1, num_layers)).fragments
    in_flight = -(-params // fragments) * (d.error_feedback + (d.merge == "since") + d.first_moment)
    return FP32 * ((2 + d.error_feedback) * params + in_flight)


def _working_sets(m: ModelConfig, parts: dict[str, int], tokens: int, grad_accum: int, last: bool,
                  cuda: bool) -> tuple[int, int]:
    """The two working sets of a stage that never coexist, in bytes: the backward's and the optimizer
    step's (see :class:`StageMemory`), from the stage's ``parts``.

    The backward's: the graph, plus the largest of the loss's tensors, the LM head's backward (∂L/∂logits
    padded back to every position, and the head's gradient) and one block's temporaries (by then the
    final norm's saved tensors are freed). The step's: every gradient and the step's temporaries."""
    d, vocab = m.d_model, m.vocab_size
    graph = parts["activations"] + parts["autocast_weights"]
    head_grad = FP32 * vocab * d if last else 0
    head_backward = tokens * vocab * (BF16 if cuda else FP32) if last else 0
    blocks = parts["backward_temporaries"] - (tokens * _final_norm_saved_per_token(m, cuda) if last else 0)
    if grad_accum > 1:  # gradients of earlier microbatches are there from the start of the backward
        backward = graph + parts["gradients"] + max(parts["logits"], head_backward, blocks)
    else:  # no gradient exists before the loss's backward; the head's is made first
        backward = graph + max(parts["logits"], head_grad + head_backward, head_grad + blocks)
    return backward, parts["gradients"] + parts["step_temporaries"]


def _loss_bytes(tokens: int, scored: int, vocab: int, cuda: bool) -> int:
    """The most the loss's tensors take at once (node.model.lm_loss on ``logits[:, :-1]``).

    cpu: forward holds the logits (all positions), their scored slice made contiguous by ``flatten``,
    and log_softmax's output (kept for backward); backward holds that output, ∂L/∂log_softmax (nll's
    dense gradient) and ∂L/∂logits. cuda: the logits are bf16, ``.float()`` makes the fp32 copy, the
    rest is fp32."""
    if cuda:
        return max(BF16 * tokens * vocab + 2 * FP32 * scored * vocab, 3 * FP32 * scored * vocab)
    return max(FP32 * tokens * vocab + 2 * FP32 * scored * vocab, 3 * FP32 * scored * vocab)


def _backward_temporaries(m: ModelConfig, tokens: int, last: bool, cuda: bool) -> int:
    """Gradients in flight inside one block's backward beyond the graph (autograd frees each saved tensor
    once its node has run, so only the net growth counts). Always ∂L/∂x of the residual stream (fp32;
    on cuda also its bf16 cast into the branch) and, before the last stage, the output boundary and its
    gradient (w wide each). The MLP at its widest: ∂L/∂(silu·up) has been turned into ∂L/∂silu and
    ∂L/∂up while only the product's own saved input is freed (net 2·hidden). Attention at its widest:
    ∂L/∂out from the writer, and ∂L/∂q, ∂L/∂k, ∂L/∂v made by the SDPA backward before it frees q, k, v
    and out (2·d + 2·kv width)."""
    d, h = m.d_model, m.hidden
    kvd = m.kv_heads * (d // m.n_heads)
    act = BF16 if cuda else FP32
    residual = FP32 * d + (BF16 * d if cuda else 0)
    boundary = 0 if last else 2 * FP32 * (m.subspace_rank or d)
    return tokens * (residual + boundary + act * max(2 * h, 2 * d + 2 * kvd))


def _step_temporaries(m: ModelConfig, num_layers: int, params: int, first: bool, last: bool, cuda: bool) -> int:
    """AdamW's temporaries during the step. cuda: none (the engine uses the fused kernel, which updates
    in place); cpu (one tensor at a time): sqrt(exp_avg_sq) and its quotient for the largest tensor."""
    if cuda:
        return 0
    return 2 * FP32 * _largest_tensor(m, first, last)


# ---------------------------------------------------------------------------------------------- plans

def plan(cfg: RunConfig, device_mem_bytes: int, device_type: str = "cuda", *,
         inflight: int | None = None) -> dict[str, Any]:
    """Every stage of ``cfg``'s split against a device of ``device_mem_bytes``: a JSON-able dict."""
    if device_mem_bytes <= 0:
        raise ValueError(f"device memory must be positive, got {device_mem_bytes}")
    ranges = stage_layers(cfg.model, cfg.pipeline)
    stages = [_estimate(cfg, ranges, s, device_type, inflight, None) for s in range(len(ranges))]
    rows = [{
        "stage": e.stage,
        "layers": [e.layers.start, e.layers.stop - 1],
        "params": e.params,
        "memory_gib": round(e.device_bytes / GIB, 3),
        "host_gib": round(e.host_bytes / GIB, 3),
        "fits": e.device_bytes <= device_mem_bytes,
        "peak_phase": e.peak_phase,
        "memory_bytes": e.device_bytes,
        "host_bytes": e.host_bytes,
        "parts_bytes": dict(e.parts),
    } for e in stages]
    largest = max(e.device_bytes for e in stages)
    t, dp = cfg.train, cfg.dataplane
    return {
        "model": cfg.model.name,
        "num_stages": len(stages),
        "device_type": device_type,
        "device_mem_gib": round(device_mem_bytes / GIB, 3),
        "fits": all(row["fits"] for row in rows),
        "largest_stage_gib": round(largest / GIB, 3),
        "assumptions": {
            "batch_size": t.batch_size,
            "seq_len": t.seq_len,
            "tokens_per_microbatch": t.batch_size * (t.seq_len + 1),
            "grad_accum": t.grad_accum,
            "backward": dp.backward,
            "inflight": dp.max_inflight if inflight is None else inflight,
            "precision": ("bf16 autocast; fp32 weights, gradients, optimizer and residual stream" if device_type == "cuda"
                          else "fp32"),
            "outer_state": ("none" if not cfg.diloco.enabled else "host" if device_type == "cuda" else "device"),
            "cuda_overhead_gib": round(CUDA_OVERHEAD_BYTES / GIB, 3) if device_type == "cuda" else 0,
        },
        "stages": rows,
    }


def smallest_stages(cfg: RunConfig, device_mem_bytes: int, device_type: str = "cuda", *,
                    inflight: int | None = None) -> int | None:
    """The fewest stages (balanced split, 1..most_stages) whose every stage fits ``device_mem_bytes``;
    None when even the most stages the model can be split into (one layer each, an explicit dense tail in
    the last) do not fit."""
    for count in range(1, most_stages(cfg.model) + 1):
        ranges = stage_layers(cfg.model, dataclasses.replace(cfg.pipeline, num_stages=count, layer_splits=None))
        if all(_estimate(cfg, ranges, s, device_type, inflight, None).device_bytes <= device_mem_bytes
               for s in range(count)):
            return count
    return None


def format_plan(result: dict[str, Any]) -> str:
    """A :func:`plan` as a table for people (the CLI's default output)."""
    a = result["assumptions"]
    outer = {"none": "no DiLoCo outer state", "host": "DiLoCo outer state in host memory",
             "device": "DiLoCo outer state on the device"}[a["outer_state"]]
    lines = [
        f"model {result['model']}: {result['num_stages']} stage(s) on a {result['device_mem_gib']:g} GiB "
        f"{result['device_type']} device",
        f"  {a['precision']}; microbatch {a['batch_size']} x {a['seq_len'] + 1} tokens, grad_accum {a['grad_accum']}, "
        f"backward {a['backward']}, {a['inflight']} in flight; {outer}"
        + (f"; {a['cuda_overhead_gib']:g} GiB CUDA context allowance" if result["device_type"] == "cuda" else ""),
        f"{'stage':>5}  {'layers':>7}  {'params':>8}  {'device GiB':>10}  {'host GiB':>8}  {'peak':>8}  fits",
    ]
    for row in result["stages"]:
        first, last = row["layers"]
        lines.append(f"{row['stage']:>5}  {f'{first}-{last}':>7}  {row['params'] / 1e6:>7.1f}M  {row['memory_gib']:>10.2f}  "
                     f"{row['host_gib']:>8.2f}  {row['peak_phase']:>8}  {'yes' if row['fits'] else 'NO'}")
    lines.append(f"fits: {'yes' if result['fits'] else 'no'} (largest stage {result['largest_stage_gib']:.2f} GiB of "
                 f"{result['device_mem_gib']:g} GiB)")
    return "\n".join(lines)
