"""The trained model as files: what `node export` writes and `node eval` / `node generate` read.

An export is one directory (docs/export.md) in one of two formats:

- ``native``: every stage's parameters as the swarm trained them (names ``stages.<s>.…`` of
  :class:`node.model.LanguageModel`; the subspace factors Z and E, not their products) in
  ``model.safetensors``, with the run's parameters in ``protoswarm.json``. It reloads bit-exactly into
  the same model, which computes exactly what the swarm computes (the shared basis U and table
  T_fixed are rebuilt from the seed, as every peer rebuilds them).
- ``hf``: the same function as a plain dense Llama. With the subspace constraint a residual writer
  ``W = U·Z`` is a dense matrix and the input embedding ``T_fixed + E·Uᵀ`` a dense table, so the
  model *is* a Llama once multiplied out (:func:`merge_dense`). The tensors carry the names of
  ``transformers``' ``LlamaForCausalLM``, with ``config.json`` beside them; RoPE's channel pairs are
  reordered for its half-split rotation (:func:`hf_tensors`). Merging rounds differently from the
  factored forward (a product of two matrices against two products), so logits agree to float
  rounding, not bit for bit.

Both formats hold ``tokenizer.json`` (the byte tokenizer written as a Hugging Face byte-level model
with no merges, so ids are bytes; or the run's own tokenizer file) and ``protoswarm.json``: the format,
the run's parameters (model, pipeline, data, train: what evaluation needs to rebuild the validation
split) and where each stage came from. Nothing in an export is pickled.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from node.config import ConfigError, ModelConfig, PipelineConfig, RunConfig, build_config
from node.model import LanguageModel, ResidualWriter, Stage

FORMAT_VERSION = 1
FORMATS = ("native", "hf")
META_FILE = "protoswarm.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
HF_CONFIG_FILE = "config.json"


class ExportError(RuntimeError):
    """An export that cannot be written or read (a clear message for the user)."""


# merging ------------------------------------------------------------------------------------------------


def _dense_writer(writer: ResidualWriter, basis: torch.Tensor | None) -> torch.Tensor:
    """A residual writer as the dense matrix it applies: ``U·Z`` when factored, else its weight."""
    w = writer.weight.detach().float()
    return basis.float() @ w if writer.factored else w.clone()


def dense_config(cfg: ModelConfig) -> ModelConfig:
    """The dense model with the same function: no subspace, no separate table, every writer dense."""
    return dataclasses.replace(cfg, subspace_rank=None, fixed_table=False, table_gain=False, dense_tail_layers=None,
                               subspace_param="factored")


@torch.no_grad()
def merge_dense(model: LanguageModel) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """``model`` as a dense one-stage model: its config and the state dict of ``LanguageModel`` built from it
    (fp32). Refused for ``model.subspace_param = 'boundary'`` (a projection between layers) and for
    ``model.table_gain``: a gain that changes between stages adds the table again in the
    middle of the network, which a Llama cannot express."""
    cfg = model.cfg
    stages: list[Stage] = list(model.stages)
    if cfg.bottleneck and len(stages) > 1:
        raise ExportError("model.subspace_param='boundary' projects the residual stream onto T_fixed + span(U) at "
                          "every stage boundary: this model has no plain Llama form (export it with --format native)")
    if any(s.table_gain is not None for s in stages):
        raise ExportError("model.table_gain adds T_fixed again at every stage boundary with a learned gain: "
                          "this model has no plain Llama form (export it with --format native)")
    first = stages[0]
    embedding = first.embedding.detach().float()
    if first.rank_k_embedding:
        embedding = embedding @ first.basis.float().T
    if first.table is not None:
        embedding = embedding + first.table.float()
    out = {"stages.0.embedding": embedding.contiguous()}
    layer = 0
    for stage in stages:
        for block in stage.blocks:
            p = f"stages.0.blocks.{layer}."
            out[p + "attn_norm.weight"] = block.attn_norm.weight.detach().float().clone()
            out[p + "attn.wq.weight"] = block.attn.wq.weight.detach().float().clone()
            out[p + "attn.wkv.weight"] = block.attn.wkv.weight.detach().float().clone()
            out[p + "attn.wo.weight"] = _dense_writer(block.attn.wo, stage.basis).contiguous()
            out[p + "mlp_norm.weight"] = block.mlp_norm.weight.detach().float().clone()
            out[p + "mlp.w_gate_up.weight"] = block.mlp.w_gate_up.weight.detach().float().clone()
            out[p + "mlp.w_down.weight"] = _dense_writer(block.mlp.w_down, stage.basis).contiguous()
            layer += 1
    last = stages[-1]
    out["stages.0.final_norm.weight"] = last.final_norm.weight.detach().float().clone()
    out["stages.0.lm_head.weight"] = last.lm_head.weight.detach().float().clone()
    return dense_config(cfg), out


# the transformers (Hugging Face) Llama layout --------------------------------------------------------------


def _pair_order(head_dim: int) -> torch.Tensor:
    """Our RoPE rotates channel pairs (2i, 2i+1); transformers' Llama rotates (i, i + head_dim/2). Taking the
    rows of q and k in this order (evens, then odds) turns one into the other; q·k is unchanged."""
    return torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])


def _reorder_heads(w: torch.Tensor, heads: int, order: torch.Tensor) -> torch.Tensor:
    head_dim = w.shape[0] // heads
    return w.view(heads, head_dim, -1)[:, order, :].reshape(heads * head_dim, -1).contiguous()


def hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """``config.json`` of transformers' ``LlamaForCausalLM`` for a dense ``cfg``."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "intermediate_size": cfg.hidden,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.d_model // cfg.n_heads, "hidden_act": "silu", "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False,
        "initializer_range": cfg.init_std, "bos_token_id": None, "eos_token_id": None, "pad_token_id": None,
        "dtype": "float32", "use_cache": True,
    }


def hf_tensors(cfg: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A dense one-stage state dict (:func:`merge_dense`) under transformers' Llama names."""
    head_dim, kv = cfg.d_model // cfg.n_heads, cfg.kv_heads
    order = _pair_order(head_dim)
    out = {"model.embed_tokens.weight": state["stages.0.embedding"]}
    for i in range(cfg.n_layers):
        p, h = f"stages.0.blocks.{i}.", f"model.layers.{i}."
        wkv = state[p + "attn.wkv.weight"]
        gate, up = state[p + "mlp.w_gate_up.weight"].chunk(2, dim=0)
        out.update({
            h + "input_layernorm.weight": state[p + "attn_norm.weight"],
            h + "self_attn.q_proj.weight": _reorder_heads(state[p + "attn.wq.weight"], cfg.n_heads, order),
            h + "self_attn.k_proj.weight": _reorder_heads(wkv[: kv * head_dim], kv, order),
            h + "self_attn.v_proj.weight": wkv[kv * head_dim:].contiguous(),
            h + "self_attn.o_proj.weight": state[p + "attn.wo.weight"],
            h + "post_attention_layernorm.weight": state[p + "mlp_norm.weight"],
            h + "mlp.gate_proj.weight": gate.contiguous(), h + "mlp.up_proj.weight": up.contiguous(),
            h + "mlp.down_proj.weight": state[p + "mlp.w_down.weight"],
        })
    out["model.norm.weight"] = state["stages.0.final_norm.weight"]
    out["lm_head.weight"] = state["stages.0.lm_head.weight"]
    return out


def from_hf(config: dict[str, Any], tensors: dict[str, torch.Tensor], base: ModelConfig | None = None
            ) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The inverse of :func:`hf_config` and :func:`hf_tensors`: a dense config and one-stage state dict.
    ``base``: the fields config.json does not carry (name, init), else the defaults."""
    try:
        heads, kv = int(config["num_attention_heads"]), int(config.get("num_key_value_heads") or config["num_attention_heads"])
        rope = config.get("rope_parameters") or {}
        cfg = dataclasses.replace(
            dense_config(base or ModelConfig()), vocab_size=int(config["vocab_size"]),
            d_model=int(config["hidden_size"]), n_layers=int(config["num_hidden_layers"]), n_heads=heads,
            n_kv_heads=kv, ffn_hidden=int(config["intermediate_size"]),
            max_seq_len=int(config["max_position_embeddings"]), norm_eps=float(config["rms_norm_eps"]),
            rope_theta=float(rope.get("rope_theta", config.get("rope_theta", 10000.0))))
    except (KeyError, TypeError, ValueError) as exc:
        raise ExportError(f"{HF_CONFIG_FILE} is not a Llama config this loader reads: {exc!r}") from None
    if config.get("tie_word_embeddings") or config.get("attention_bias") or config.get("mlp_bias"):
        raise ExportError("tied embeddings and biases are not part of this model family")
    head_dim = cfg.d_model // heads
    inverse = torch.argsort(_pair_order(head_dim))
    out = {"stages.0.embedding": tensors["model.embed_tokens.weight"]}
    for i in range(cfg.n_layers):
        p, h = f"stages.0.blocks.{i}.", f"model.layers.{i}."
        out.update({
            p + "attn_norm.weight": tensors[h + "input_layernorm.weight"],
            p + "attn.wq.weight": _reorder_heads(tensors[h + "self_attn.q_proj.weight"], heads, inverse),
            p + "attn.wkv.weight": torch.cat([_reorder_heads(tensors[h + "self_attn.k_proj.weight"], kv, inverse),
                                              tensors[h + "self_attn.v_proj.weight"]]),
            p + "attn.wo.weight": tensors[h + "self_attn.o_proj.weight"],
            p + "mlp_norm.weight": tensors[h + "post_attention_layernorm.weight"],
            p + "mlp.w_gate_up.weight": torch.cat([tensors[h + "mlp.gate_proj.weight"], tensors[h + "mlp.up_proj.weight"]]),
            p + "mlp.w_down.weight": tensors[h + "mlp.down_proj.weight"],
        })
    out["stages.0.final_norm.weight"] = tensors["model.norm.weight"]
    out["stages.0.lm_head.weight"] = tensors["lm_head.weight"]
    return cfg, out


# the tokenizer ----------------------------------------------------------------------------------------------


def _byte_chars() -> list[str]:
    """The printable character standing for each byte in a byte-level tokenizer (GPT-2's convention: bytes
    that are printable stand for themselves, the others are shifted past 255)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def byte_tokenizer_json() -> dict[str, Any]:
    """The byte tokenizer (``data.tokenizer = "bytes"``) as a Hugging Face ``tokenizer.json``: a byte-level
    BPE with no merges, so every byte is one token and its id is the byte's value."""
    chars = _byte_chars()
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {c: b for b, c in enumerate(chars)}, "merges": []},
    }


# writing and reading -----------------------------------------------------------------------------------------


@dataclass
class Exported:
    """A model read back from an export directory."""

    model: LanguageModel
    cfg: RunConfig  # the run's parameters (the dense equivalent's model section for the hf format)
    meta: dict[str, Any]
    path: Path


def write_export(out: str | Path, model: LanguageModel, cfg: RunConfig, fmt: str = "native",
                 provenance: dict[str, Any] | None = None, tokenizer_file: str | Path | None = None) -> Path:
    """Write ``model`` (trained under ``cfg``) to the directory ``out`` in format ``fmt``; returns it.

    The directory is written whole or not at all: files go to a temporary sibling, renamed into place at
    the end. An existing non-empty ``out`` is refused. ``tokenizer_file``: the run's tokenizer.json when
    ``data.tokenizer`` is a file (the byte tokenizer is written from scratch)."""
    from safetensors.torch import save_file

    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}: one of {', '.join(FORMATS)}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out} exists and is not an empty directory: choose another --out")
    tokenizer = _tokenizer_source(cfg, tokenizer_file)
    if fmt == "hf":
        dense, state = merge_dense(model)
        tensors, model_section = hf_tensors(dense, state), dataclasses.asdict(dense)
    else:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
        model_section = dataclasses.asdict(model.cfg)
    full = cfg.to_dict()
    meta = {
        "format": fmt, "format_version": FORMAT_VERSION,
        "run": {"model": model_section, "pipeline": full["pipeline"] if fmt == "native" else {"num_stages": 1},
                "data": full["data"], "train": full["train"]},
        "stage_layers": [[r.start, r.stop] for r in (s.layers for s in model.stages)] if fmt == "native" else None,
        "parameters": sum(t.numel() for t in tensors.values()),
        "provenance": provenance or {},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "protoswarm_format": fmt})
        if fmt == "hf":
            (tmp / HF_CONFIG_FILE).write_text(json.dumps(hf_config(dense), indent=2) + "\n")
            (tmp / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": 0.8,
                                                                     "top_k": 40}, indent=2) + "\n")
        if tokenizer is None:
            (tmp / TOKENIZER_FILE).write_text(json.dumps(byte_tokenizer_json()) + "\n")
        else:
            shutil.copyfile(tokenizer, tmp / TOKENIZER_FILE)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        _plain_modes(tmp)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _plain_modes(directory: Path) -> None:
    """The modes any file the user writes gets (mkdtemp and safetensors make private ones)."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for file in directory.iterdir():
        file.chmod(0o666 & ~umask)


def _tokenizer_source(cfg: RunConfig, tokenizer_file: str | Path | None) -> Path | None:
    """The tokenizer.json to copy (None: the byte tokenizer, written from scratch)."""
    spec = cfg.data.tokenizer
    if spec == "bytes":
        if tokenizer_file is not None:
            raise ExportError("this run uses the byte tokenizer: --tokenizer is not needed")
        return None
    path = Path(tokenizer_file if tokenizer_file is not None else spec).expanduser()
    if not path.is_file():
        raise ExportError(f"the run's tokenizer is the file {spec!r}, not found here: pass --tokenizer PATH")
    return path


def load_export(path: str | Path, device: torch.device | str = "cpu") -> Exported:
    """Read an export directory (either format) into a :class:`LanguageModel` on ``device``, in eval mode."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    meta_file = path / META_FILE
    if not meta_file.is_file():
        raise ExportError(f"{path} is not a protoswarm export: no {META_FILE} in it")
    try:
        meta = json.loads(meta_file.read_text())
        fmt, version, run = meta["format"], meta["format_version"], meta["run"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ExportError(f"{meta_file} is unreadable: {exc!r}") from None
    if fmt not in FORMATS or version != FORMAT_VERSION:
        raise ExportError(f"{path}: export format {fmt!r} version {version!r}, this node reads "
                          f"{'/'.join(FORMATS)} version {FORMAT_VERSION}")
    try:
        tensors = load_file(str(path / WEIGHTS_FILE), device="cpu")
    except (OSError, SafetensorError) as exc:
        raise ExportError(f"{path / WEIGHTS_FILE}: {exc}") from None
    try:
        cfg = build_config({"model": run["model"], "pipeline": run["pipeline"], "data": run["data"],
                            "train": run["train"]})
    except (ConfigError, TypeError) as exc:
        raise ExportError(f"{meta_file}: the run's parameters do not make a config here: {exc}") from None
    if fmt == "hf":
        hf = json.loads((path / HF_CONFIG_FILE).read_text())
        model_cfg, tensors = from_hf(hf, tensors, base=cfg.model)
        cfg = dataclasses.replace(cfg, model=model_cfg, pipeline=PipelineConfig())
        pipeline = PipelineConfig()
    else:
        layers = meta.get("stage_layers")
        splits = [b for _, b in layers[:-1]] if layers and len(layers) > 1 else None
        pipeline = dataclasses.replace(cfg.pipeline, layer_splits=splits) if splits else cfg.pipeline
    model = LanguageModel(cfg.model, pipeline)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise ExportError(f"{path / WEIGHTS_FILE} does not fit the model in {META_FILE}: missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]}")
    bad = [n for n, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise ExportError(f"{path / WEIGHTS_FILE}: {len(bad)} tensor(s) hold NaN or inf, e.g. {bad[0]}")
    return Exported(model.to(device).eval(), cfg, meta, path)


__all__ = ["FORMATS", "ExportError", "Exported", "byte_tokenizer_json", "dense_config", "from_hf", "hf_config",
           "hf_tensors", "load_export", "merge_dense", "write_export"]
