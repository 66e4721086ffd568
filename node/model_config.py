"""``[model]``: the decoder's shape and its subspace constraint (re-exported by node/config.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from protocol.settings import ConfigError, check_positive, setting

# The fewest dense final layers the automatic split gives a subspace model (docs/model.md; BENCHMARKS.md
# "Training cost of the constraint", k = 8 against dense + table, three seeds each: 8 layers, 2 dense +4.3%,
# 3 dense +0.9%; 12 layers, 3 dense +2.2%, 4 dense +0.9%, so the 12-layer 125m preset sets 4). 3 keeps 8b's last
# stage on a 24 GiB card at S = 8.
MIN_DENSE_TAIL = 3
SUBSPACE_PARAMS = ("factored", "projected", "boundary")


def automatic_dense_tail(*, n_layers: int, num_stages: int, subspace_rank: int | None,
                         dense_tail_layers: int | None, min_dense_tail_layers: int,
                         layer_splits: object = None, subspace_param: str = "factored") -> int | None:
    """How many final layers the automatic stage split keeps dense, or None where no layer is kept dense (a
    dense model or one held in span(U) at its boundaries only, ``subspace_param = 'boundary'``) or the split is
    not automatic (explicit ``pipeline.layer_splits``, one stage). An explicit
    ``dense_tail_layers`` is that count; unset, ``min_dense_tail_layers`` capped by what the stage count
    leaves (n_layers - num_stages + 1). The one rule ``stage_layers`` and the config check use (and the
    bench's unit keys, which must not change where the minimum changes nothing). Raises ConfigError where an
    explicit count leaves a stage before the last without a constrained layer."""
    if not subspace_rank or subspace_param == "boundary" or layer_splits is not None or num_stages <= 1:
        return None
    if dense_tail_layers is None:
        return min(min_dense_tail_layers, n_layers - num_stages + 1)
    if num_stages > _most_stages(n_layers, dense_tail_layers):
        raise ConfigError(f"model.dense_tail_layers={dense_tail_layers} leaves {n_layers - dense_tail_layers} "
                          f"constrained layer(s) for the {num_stages - 1} stage(s) before the last (each needs "
                          "one): lower it or pipeline.num_stages")
    return dense_tail_layers


def most_stages(model: ModelConfig) -> int:
    """The most stages an automatic split of ``model`` can have: one layer each, and a subspace model's
    explicit dense tail (``dense_tail_layers``) all in the last stage."""
    return _most_stages(model.n_layers, model.dense_tail_layers if model.constrained_writers else None)


def _most_stages(n_layers: int, tail: int | None) -> int:
    """Every stage before the last needs a constrained layer; the last holds the tail, and one layer at least."""
    return n_layers - max(tail or 0, 1) + 1


@dataclass(kw_only=True)
class ModelConfig:
    """Shape of the Llama-style decoder and the subspace constraint (docs/model.md)."""

    SECTION = "model"

    name: str = setting("custom", "Preset name, for logs and checkpoints only.")
    vocab_size: int = setting(256, "Token vocabulary size (tokens). 256 = raw bytes.")
    d_model: int = setting(256, "Residual stream width d (features per token).")
    n_layers: int = setting(8, "Number of transformer blocks.")
    n_heads: int = setting(4, "Attention query heads; d_model must be divisible by it.")
    n_kv_heads: int | None = setting(None, "Key/value heads for grouped-query attention; None = n_heads.")
    ffn_hidden: int | None = setting(None, "SwiGLU hidden width (features); None = 8/3·d rounded up to 64.")
    max_seq_len: int = setting(256, "Longest sequence the RoPE tables cover (tokens).")
    rope_theta: float = setting(10000.0, "RoPE base frequency.")
    norm_eps: float = setting(1e-5, "RMSNorm epsilon.")
    init_std: float = setting(0.02, "Std of the normal init of dense weights and the dense embedding.")
    constrained_init_std: float | None = setting(
        None, "Std of the init of the parts held in span(U) (the constrained residual writers and the rank-k "
        "embedding, each raised by sqrt(d/k) as with init_std), as a dense weight's. None = init_std (a recipe "
        "knob: the subspace model and the dense parts may want different scales, docs/model.md)."
    )
    subspace_rank: int | None = setting(
        None,
        "k: rank of the shared subspace every stage boundary lives in (numbers per token sent "
        "between stages). None = ordinary dense model.",
    )
    subspace_seed: int = setting(
        0, "Seed the swarm agrees on; derives the basis U (d×k) and the frozen token table T_fixed (V×d)."
    )
    fixed_table_std: float = setting(
        0.1, "Std of the entries of the frozen high-rank token table T_fixed (5× init_std; 1.0 and 0.03 cost "
        "+7.8% and +16% validation loss at k=8, BENCHMARKS.md)."
    )
    fixed_table_rank: int | None = setting(
        None, "Rank of T_fixed: None = full (i.i.d. entries); r = a product of seed-derived V×r and r×d factors "
        "with the same entry std (a recipe knob, docs/model.md)."
    )
    fixed_table: bool | None = setting(
        None,
        "Add the frozen token table T_fixed to the input embedding. None = on exactly when "
        "subspace_rank is set; true with a dense model gives the fair dense baseline (DESIGN §1.1).",
    )
    table_gain: bool = setting(
        False, "Learn a scalar gain on T_fixed in every stage (init 1; each stage adds and removes its own "
        "gain·T_fixed at its boundaries, so nothing extra crosses the wire)."
    )
    dense_tail_layers: int | None = setting(
        None, "Final layers whose residual writers stay dense (unconstrained). None = the last stage's layers; "
        "every layer before the last stage must be constrained, so they must all lie in the last stage."
    )
    min_dense_tail_layers: int = setting(
        MIN_DENSE_TAIL, "With dense_tail_layers unset: the automatic stage split gives the last stage (whose "
        "layers are dense) at least this many layers, as many as the stage count leaves room for "
        "(n_layers - num_stages + 1). 0 = the split by parameters alone. An explicit pipeline.layer_splits is "
        "kept as given (docs/model.md)."
    )
    boundary_learned: bool = setting(
        False, "With subspace_param='boundary': each stage learns its own d×k maps (from U at init): the one its "
        "output is sent through and the one its input is rebuilt with (MAPL-style per-stage projections; no "
        "orthogonality is kept). The boundary stays k numbers a token."
    )
    boundary_anchor_rank: int | None = setting(
        None, "With subspace_param='boundary': every stage after the first adds a learned token table of rank r "
        "(V×r times r×d, the second factor zero at init) to the input it rebuilds (MAPL's anchor embeddings: what "
        "the bottleneck dropped of each token's identity, restored from the ids). None = none."
    )
    subspace_param: str = setting(
        "factored", "How the stage boundaries stay in span(U): 'factored' (every residual writer before the dense "
        "tail is W = U·Z, Z trained, and the embedding rank k), 'projected' (those writers dense, projected onto "
        "span(U) after every optimizer step, the paper's form) or 'boundary' (every writer and the embedding "
        "dense; each stage's output is projected onto T_fixed + span(U), so the model has a rank-k bottleneck "
        "at each stage boundary and depends on the split; no plain Llama export, docs/model.md)."
    )

    def __post_init__(self) -> None:
        check_positive(self, "vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden")
        check_positive(self, "max_seq_len", "rope_theta", "norm_eps", "init_std", "constrained_init_std", "subspace_rank", "fixed_table_std",
                       "fixed_table_rank", "boundary_anchor_rank")
        if self.d_model % self.n_heads:
            raise ConfigError(f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}")
        if (self.d_model // self.n_heads) % 2:
            raise ConfigError("model.d_model / model.n_heads (head size) must be even for RoPE")
        if self.n_heads % self.kv_heads:
            raise ConfigError(f"model.n_heads={self.n_heads} is not a multiple of model.n_kv_heads={self.kv_heads}")
        if self.dense_tail_layers is not None and not 0 <= self.dense_tail_layers <= self.n_layers:
            raise ConfigError(f"model.dense_tail_layers={self.dense_tail_layers} must be in 0..n_layers={self.n_layers}")
        if self.min_dense_tail_layers < 0:
            raise ConfigError(f"model.min_dense_tail_layers={self.min_dense_tail_layers} must be >= 0")
        if self.fixed_table_rank is not None and self.fixed_table_rank > min(self.vocab_size, self.d_model):
            raise ConfigError(f"model.fixed_table_rank={self.fixed_table_rank} exceeds min(vocab_size, d_model)="
                              f"{min(self.vocab_size, self.d_model)}")
        if self.subspace_param not in SUBSPACE_PARAMS:
            raise ConfigError(f"model.subspace_param must be one of {', '.join(map(repr, SUBSPACE_PARAMS))}, "
                              f"got {self.subspace_param!r}")
        if self.subspace_param == "boundary" and self.dense_tail_layers is not None:
            raise ConfigError("model.dense_tail_layers does not apply with model.subspace_param='boundary' (every "
                              "residual writer is dense there; the boundaries alone are projected): unset it")
        if (self.boundary_learned or self.boundary_anchor_rank is not None) and not self.bottleneck:
            raise ConfigError("model.boundary_learned and model.boundary_anchor_rank need a subspace model with "
                              "model.subspace_param='boundary'")
        if self.boundary_anchor_rank is not None and self.boundary_anchor_rank > self.d_model:
            raise ConfigError(f"model.boundary_anchor_rank={self.boundary_anchor_rank} exceeds d_model={self.d_model}")
        if self.subspace_param == "boundary" and self.constrained_init_std is not None:
            raise ConfigError("model.constrained_init_std does not apply with model.subspace_param='boundary' "
                              "(no parameter is held in span(U) there; init_std draws them all): unset it")
        if self.subspace_rank is not None and self.subspace_rank > self.d_model:
            raise ConfigError(
                f"model.subspace_rank={self.subspace_rank} exceeds model.d_model={self.d_model}: "
                "the subspace must be a proper part of the residual stream"
            )

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def hidden(self) -> int:
        if self.ffn_hidden is not None:
            return self.ffn_hidden
        return 64 * math.ceil(8 * self.d_model / 3 / 64)

    @property
    def bottleneck(self) -> bool:
        """A subspace model held in span(U) at its stage boundaries only (``subspace_param = 'boundary'``)."""
        return bool(self.subspace_rank) and self.subspace_param == "boundary"

    @property
    def constrained_writers(self) -> bool:
        """Whether residual writers (those before the dense tail) are held in span(U): a subspace model whose
        boundaries are not merely projected (``subspace_param`` 'factored' or 'projected')."""
        return bool(self.subspace_rank) and not self.bottleneck

    @property
    def factored(self) -> bool:
        """A subspace model whose constrained writers are ``U·Z`` and whose embedding is rank k."""
        return self.constrained_writers and self.subspace_param == "factored"

    @property
    def span_init_std(self) -> float:
        """The init std of the parts held in span(U): ``constrained_init_std``, or ``init_std`` where unset."""
        return self.init_std if self.constrained_init_std is None else self.constrained_init_std

    @property
    def uses_fixed_table(self) -> bool:
        return self.subspace_rank is not None if self.fixed_table is None else self.fixed_table
