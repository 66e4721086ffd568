"""Llama-style decoder whose stage boundaries are exactly compressible (DESIGN §1.1).

Blocks are pre-norm (RMSNorm), attention uses RoPE and optional grouped-query heads, the MLP is
SwiGLU. With ``subspace_rank = k`` the residual *writers* — the attention output projection and the
MLP down projection — are re-parameterised as ``W = U·Z`` (``Z ∈ R^{k×d_in}`` trainable, ``U`` the
shared orthonormal basis), and the trainable token embedding is ``E[ids]·Uᵀ`` with ``E ∈ R^{V×k}``.
The first block's input is ``T_fixed[ids] + E[ids]·Uᵀ``, so every residual stream up to the last
stage satisfies ``x − T_fixed[ids] ∈ span(U)`` by construction and plain AdamW keeps it so.
The last stage's blocks are ordinary dense blocks: nothing downstream reads their output.

The model is a list of ``Stage`` modules (layer ranges from ``PipelineConfig``). ``LanguageModel``
runs them back to back, passing the full residual stream (the "unsplit" model, the reference the
exactness tests compare with); ``node.engine`` trains stages through the boundary codec, as a swarm does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from node.config import ModelConfig, PipelineConfig
from node.model_config import automatic_dense_tail
from protocol import subspace


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (x[2i], x[2i+1]) of x (b, heads, n, head_dim) by position angles."""
    n = x.shape[-2]
    cos, sin = cos[:n].to(x.dtype), sin[:n].to(x.dtype)
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)


class ResidualWriter(nn.Module):
    """A projection that writes into the residual stream: dense ``W``, ``U·Z`` inside span(U)
    (``factored``), or a dense ``W`` kept in span(U) by :meth:`Stage.project_` (``projected``)."""

    def __init__(self, d_in: int, d_out: int, rank: int | None, std: float, projected: bool = False) -> None:
        super().__init__()
        self.rank = rank
        self.projected = projected and rank is not None
        if rank is None or self.projected:
            # A projected W is drawn dense and projected by the stage (which holds U), std raised there.
            self.weight = nn.Parameter(torch.empty(d_out, d_in).normal_(0.0, std))
        else:
            # Z's std is raised by sqrt(d/k) so |U·Z·x| matches the dense init's output norm.
            self.weight = nn.Parameter(torch.empty(rank, d_in).normal_(0.0, std * math.sqrt(d_out / rank)))

    @property
    def factored(self) -> bool:
        return self.rank is not None and not self.projected

    def forward(self, x: torch.Tensor, basis: torch.Tensor | None) -> torch.Tensor:
        y = F.linear(x, self.weight)
        if not self.factored:
            return y
        # Two thin matmuls: never materialise the d×d_in product U·Z.
        return y @ basis.to(y.dtype).T


def writer_std(cfg: ModelConfig, rank: int | None) -> float:
    """The init std of a residual writer (as a dense weight's; a factored one raises it by sqrt(d/k)): scaled by
    1/sqrt(2·n_layers), from the span(U) parts' std where the writer is held in span(U)."""
    return (cfg.init_std if rank is None else cfg.span_init_std) / math.sqrt(2 * cfg.n_layers)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, writer_rank: int | None) -> None:
        super().__init__()
        projected = cfg.subspace_param == "projected"
        self.n_heads, self.n_kv = cfg.n_heads, cfg.kv_heads
        self.head_dim = cfg.d_model // cfg.n_heads
        std = cfg.init_std
        self.wq = nn.Linear(cfg.d_model, cfg.n_heads * self.head_dim, bias=False)
        self.wkv = nn.Linear(cfg.d_model, 2 * self.n_kv * self.head_dim, bias=False)
        for lin in (self.wq, self.wkv):
            nn.init.normal_(lin.weight, 0.0, std)
        self.wo = ResidualWriter(cfg.d_model, cfg.d_model, writer_rank, writer_std(cfg, writer_rank), projected)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], basis: torch.Tensor | None) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.wq(x).view(b, n, self.n_heads, self.head_dim).transpose(1, 2)
        k, v = self.wkv(x).view(b, n, 2, self.n_kv, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_kv != self.n_heads)
        return self.wo(out.transpose(1, 2).reshape(b, n, -1), basis)


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig, writer_rank: int | None) -> None:
        super().__init__()
        self.w_gate_up = nn.Linear(cfg.d_model, 2 * cfg.hidden, bias=False)
        nn.init.normal_(self.w_gate_up.weight, 0.0, cfg.init_std)
        self.w_down = ResidualWriter(cfg.hidden, cfg.d_model, writer_rank, writer_std(cfg, writer_rank),
                                     cfg.subspace_param == "projected")

    def forward(self, x: torch.Tensor, basis: torch.Tensor | None) -> torch.Tensor:
        gate, up = self.w_gate_up(x).chunk(2, dim=-1)
        return self.w_down(F.silu(gate) * up, basis)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, writer_rank: int | None) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg, writer_rank)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg, writer_rank)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], basis: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), rope, basis)
        return x + self.mlp(self.mlp_norm(x), basis)


def writer_rank(cfg: ModelConfig, layer: int, last_stage: bool) -> int | None:
    """k when layer ``layer``'s residual writers are constrained to span(U), None when they are dense: the
    last ``model.dense_tail_layers`` layers, or (unset) the layers of the last stage."""
    if not cfg.constrained_writers:
        return None
    tail = cfg.dense_tail_layers
    dense = last_stage if tail is None else layer >= cfg.n_layers - tail
    return None if dense else cfg.subspace_rank


def shared_tensors(cfg: ModelConfig, device: torch.device | str = "cpu") -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The seed-derived basis U (None for a dense model) and frozen table T_fixed (None when unused),
    built on ``device`` (the same bits on any device: protocol/subspace.py)."""
    basis = None
    if cfg.subspace_rank:
        basis = subspace.make_basis(cfg.subspace_seed, cfg.d_model, cfg.subspace_rank, device=device)
    table = None
    if cfg.uses_fixed_table:
        table = subspace.make_fixed_table(cfg.subspace_seed, cfg.vocab_size, cfg.d_model, cfg.fixed_table_std,
                                          device=device, rank=cfg.fixed_table_rank)
    return basis, table


class Stage(nn.Module):
    """Layers ``layers`` of the model, plus the embedding (first stage) and the LM head (last stage).

    The shared tensors (basis U, table T_fixed, RoPE tables) are non-persistent buffers: they are
    rebuilt from the config's seed on every peer, never stored in checkpoints or sent.
    """

    def __init__(self, cfg: ModelConfig, layers: range, index: int, num_stages: int,
                 shared: tuple[torch.Tensor | None, torch.Tensor | None] | None = None) -> None:
        super().__init__()
        self.cfg, self.layers, self.index, self.num_stages = cfg, layers, index, num_stages
        self.is_first, self.is_last = index == 0, index == num_stages - 1
        k = cfg.subspace_rank
        basis, table = shared if shared is not None else shared_tensors(cfg)
        self.register_buffer("basis", basis, persistent=False)
        self.register_buffer("table", table, persistent=False)
        cos, sin = rope_tables(cfg.d_model // cfg.n_heads, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

        self.blocks = nn.ModuleList(Block(cfg, writer_rank(cfg, layer, self.is_last)) for layer in layers)
        self.projected = bool(k) and cfg.subspace_param == "projected"
        # A rank-k embedding E[ids]·Uᵀ when factored; dense when projected or at 'boundary' (only the stage's
        # output is projected there), and in a dense model.
        self.rank_k_embedding = cfg.factored
        if self.is_first:
            emb_width = k if self.rank_k_embedding else cfg.d_model
            # (a projected embedding is drawn dense and raised by sqrt(d/k) after its projection, below)
            emb_std = (cfg.span_init_std if cfg.constrained_writers else cfg.init_std) * (
                math.sqrt(cfg.d_model / k) if self.rank_k_embedding else 1.0)
            self.embedding = nn.Parameter(torch.empty(cfg.vocab_size, emb_width).normal_(0.0, emb_std))
        # Each stage's own gain on T_fixed: it adds gain·T at its input and removes it at its output.
        self.table_gain = nn.Parameter(torch.ones(())) if cfg.table_gain and table is not None else None
        # 'boundary' with model.boundary_learned: this stage's own d×k maps, U at init: the one its output is
        # sent through (every stage but the last) and the one its input is rebuilt with (every stage but the
        # first). With model.boundary_anchor_rank: a learned token table of that rank added to the rebuilt input.
        # (ModelConfig allows both only on a bottleneck model.)
        self.proj_out = nn.Parameter(basis.clone()) if cfg.boundary_learned and not self.is_last else None
        self.proj_in = nn.Parameter(basis.clone()) if cfg.boundary_learned and not self.is_first else None
        rank = None if self.is_first else cfg.boundary_anchor_rank
        self.anchor_embedding = None if rank is None else nn.Parameter(
            torch.empty(cfg.vocab_size, rank, device=basis.device).normal_(0.0, 1.0 / math.sqrt(rank)))
        self.anchor_out = None if rank is None else nn.Parameter(torch.zeros(rank, cfg.d_model, device=basis.device))
        if self.is_last:
            self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
            self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
            nn.init.normal_(self.lm_head.weight, 0.0, cfg.init_std)
        if self.projected:
            # Projection shrinks a dense draw's norm by sqrt(k/d): raise it back, as the factored init does.
            self.project_()
            with torch.no_grad():
                for p in self.constrained_parameters():
                    p.mul_(math.sqrt(cfg.d_model / k))

    def constrained_parameters(self) -> list[nn.Parameter]:
        """Parameters kept in span(U) by projection (``projected`` parameterisation only)."""
        if not self.projected:
            return []
        out = [m.weight for m in self.modules() if isinstance(m, ResidualWriter) and m.projected]
        return [*out, self.embedding] if self.is_first else out

    @torch.no_grad()
    def project_(self) -> None:
        """``projected`` parameterisation: put every constrained dense writer (and the embedding) back in
        span(U), ``W ← U·(Uᵀ·W)``; the optimizer calls it after every step. A no-op otherwise."""
        if not self.projected:
            return
        basis = self.basis.to(torch.float32)
        for p in self.constrained_parameters():
            if self.is_first and p is self.embedding:  # V×d: its rows live in span(U)
                p.copy_(((p.float() @ basis) @ basis.T).to(p.dtype))
            else:  # d×h writers: their columns do
                p.copy_((basis @ (basis.T @ p.float())).to(p.dtype))

    def table_rows(self, ids: torch.Tensor) -> torch.Tensor | None:
        """``gain·T_fixed[ids]`` in fp32 (None without a table)."""
        return None if self.table is None else subspace.table_rows(self.table, ids, self.table_gain)

    @property
    def boundary_width(self) -> int:
        """Numbers per token this stage's output boundary carries (k, or d for a dense model)."""
        return self.cfg.subspace_rank or self.cfg.d_model

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        x = F.embedding(ids, self.embedding)
        if self.rank_k_embedding:
            x = x @ self.basis.to(x.dtype).T
        if self.table is not None:
            # Keep the residual stream fp32 under autocast: T_fixed is most of |x|, and a bf16 stream
            # would round the trainable part at the table's scale.
            x = x.float() + self.table_rows(ids)
        return x

    def run_blocks(self, x: torch.Tensor) -> torch.Tensor:
        rope = (self.rope_cos, self.rope_sin)
        for block in self.blocks:
            x = block(x, rope, self.basis)
        return x

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.final_norm(x))

    def encode(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Residual stream → what crosses the boundary after this stage (coefficients, or x if dense)."""
        if self.basis is None:
            return x
        return subspace.encode(x, ids, self.basis if self.proj_out is None else self.proj_out, self.table,
                               self.table_gain)

    def decode(self, boundary: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """What crossed the boundary before this stage → residual stream."""
        if self.basis is None:
            return boundary
        x = subspace.decode(boundary, ids, self.basis if self.proj_in is None else self.proj_in, self.table,
                            self.table_gain)
        if self.anchor_embedding is not None:
            x = x + F.embedding(ids, self.anchor_embedding) @ self.anchor_out.to(x.dtype)
        return x

    def forward(self, boundary_in: torch.Tensor | None, ids: torch.Tensor) -> torch.Tensor:
        """First stage: ids → boundary; middle: boundary → boundary; last: boundary → logits."""
        x = self.embed(ids) if self.is_first else self.decode(boundary_in, ids)
        x = self.run_blocks(x)
        return self.logits(x) if self.is_last else self.encode(x, ids)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (nats per token), computed in float32."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


class LanguageModel(nn.Module):
    """All stages in one process, residual stream passed directly between them (the unsplit model)."""

    def __init__(self, cfg: ModelConfig, pipeline: PipelineConfig | None = None,
                 stages: list[Stage] | None = None) -> None:
        """Build the stages (``torch``'s global seed decides the init), or hold ``stages`` already built
        (e.g. the modules of a :class:`node.chain.StageChain`: the same tensors, no copy)."""
        super().__init__()
        self.cfg = cfg
        if stages is None:
            ranges = stage_layers(cfg, pipeline or PipelineConfig())
            shared = shared_tensors(cfg)  # one copy of T_fixed for all stages in this process
            stages = [Stage(cfg, r, i, len(ranges), shared) for i, r in enumerate(ranges)]
        self.stages = nn.ModuleList(stages)

    def forward(self, ids: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (b, n, V), or the mean loss when ``targets`` are given."""
        x = self.stages[0].embed(ids)
        for i, stage in enumerate(self.stages):
            if i and self.cfg.bottleneck:
                # The model's rank-k bottleneck at each stage boundary: what the previous stage sends (its
                # stream's part in span(U), off T_fixed), as this stage rebuilds it.
                x = stage.decode(self.stages[i - 1].encode(x, ids), ids)
            elif i and stage.table_gain is not None:  # each stage holds its own gain on T_fixed
                x = x + (stage.table_gain - self.stages[i - 1].table_gain) * stage.table[ids].float()
            x = stage.run_blocks(x)
        logits = self.stages[-1].logits(x)
        return logits if targets is None else lm_loss(logits, targets)

    def num_parameters(self, trainable_only: bool = True) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)


def parameter_groups(module: nn.Module, weight_decay: float, subspace_lr_mult: float = 1.0,
                     embedding_lr_mult: float = 1.0) -> list[dict]:
    """AdamW groups: decay on weight matrices (incl. Z), none on norms, gains and embeddings; each group's
    ``lr_mult`` scales the scheduled learning rate (Z of factored writers, the embedding)."""
    z_ids = {id(m.weight) for m in module.modules() if isinstance(m, ResidualWriter) and m.factored}
    groups: dict[tuple[bool, float], list[nn.Parameter]] = {}
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        embedding = name.endswith("embedding")
        decay = param.ndim >= 2 and not embedding
        mult = embedding_lr_mult if embedding else subspace_lr_mult if id(param) in z_ids else 1.0
        groups.setdefault((decay, mult), []).append(param)
    return [{"params": params, "weight_decay": weight_decay if decay else 0.0, "lr_mult": mult}
            for (decay, mult), params in sorted(groups.items(), key=lambda kv: (not kv[0][0], kv[0][1]))]


def layer_parameters(cfg: ModelConfig, dense_writers: bool) -> int:
    """Trainable parameters of one block: dense writers (the unconstrained tail, or projected ones), else
    ``U·Z`` writers."""
    d, k, head_dim = cfg.d_model, cfg.subspace_rank, cfg.d_model // cfg.n_heads
    attn = d * cfg.n_heads * head_dim + 2 * d * cfg.kv_heads * head_dim
    rank = k if cfg.factored and not dense_writers else d
    writers = rank * (cfg.n_heads * head_dim + cfg.hidden)
    return 2 * d + attn + 2 * d * cfg.hidden + writers


def stage_parameters(cfg: ModelConfig, layers: range, index: int, num_stages: int) -> int:
    """Trainable parameters of stage ``index`` holding ``layers``: blocks, plus the embedding on the
    first stage and the final norm and LM head on the last."""
    last = index == num_stages - 1
    total = sum(layer_parameters(cfg, dense_writers=writer_rank(cfg, layer, last) is None) for layer in layers)
    if index == 0:
        total += cfg.vocab_size * (cfg.subspace_rank if cfg.factored else cfg.d_model)
    if cfg.table_gain and cfg.uses_fixed_table:
        total += 1
    if cfg.boundary_learned:  # the d×k maps out of every stage but the last, into every stage but the first
        total += cfg.d_model * cfg.subspace_rank * ((index < num_stages - 1) + (index > 0))
    if cfg.boundary_anchor_rank is not None and index > 0:
        total += cfg.boundary_anchor_rank * (cfg.vocab_size + cfg.d_model)
    if last:
        total += cfg.d_model + cfg.d_model * cfg.vocab_size
    return total


def stage_layers(cfg: ModelConfig, pipeline: PipelineConfig | None = None) -> list[range]:
    """The layers of each stage: ``pipeline.layer_splits`` when given, else the contiguous split (every
    stage at least one layer) whose largest stage holds the fewest parameters, counting the embedding
    on the first stage and the LM head on the last (an 8b model's head is ~2.4 layers' worth); among
    those, the one with the most even stages (least sum of squared stage sizes). A subspace model's dense
    final layers (``model.dense_tail_layers``, or unset at least ``model.min_dense_tail_layers``) all lie in
    the last stage."""
    pipeline = pipeline or PipelineConfig()
    if pipeline.layer_splits is not None or pipeline.num_stages == 1:
        return pipeline.stage_ranges(cfg.n_layers)
    n, count = cfg.n_layers, pipeline.num_stages
    pipeline.stage_ranges(n)  # the same errors as an explicit split (too many stages)

    # With model.dense_tail_layers every stage but the last must hold constrained layers only; without
    # it the last stage's layers are the dense ones, and it holds at least model.min_dense_tail_layers.
    tail = automatic_dense_tail(n_layers=n, num_stages=count, subspace_rank=cfg.subspace_rank,
                                dense_tail_layers=cfg.dense_tail_layers,
                                min_dense_tail_layers=cfg.min_dense_tail_layers, subspace_param=cfg.subspace_param) or 0
    first_dense = n - tail

    def size(s: int, a: int, b: int) -> float:
        if s < count - 1 and b > first_dense:
            return math.inf
        return stage_parameters(cfg, range(a, b), s, count)

    largest = _partition(n, count, lambda s, a, b, before: max(before, size(s, a, b)))[0]
    _, starts = _partition(n, count, lambda s, a, b, before: before + size(s, a, b) ** 2
                           if size(s, a, b) <= largest else math.inf)
    return [range(a, b) for a, b in zip(starts, [*starts[1:], n], strict=True)]


def _partition(n: int, count: int, extend) -> tuple[float, list[int]]:
    """Dynamic programme over contiguous splits of ``n`` layers into ``count`` non-empty stages:
    ``extend(stage, first, end, cost so far)`` gives the cost with one more stage; returns the least
    total cost and the first layer of each stage."""
    best = [[math.inf] * (n + 1) for _ in range(count + 1)]
    cut = [[0] * (n + 1) for _ in range(count + 1)]
    best[0][0] = 0
    for s in range(1, count + 1):
        for i in ([n] if s == count else range(s, n - (count - s) + 1)):
            for j in range(s - 1, i):
                if best[s - 1][j] < math.inf and (cost := extend(s - 1, j, i, best[s - 1][j])) < best[s][i]:
                    best[s][i], cut[s][i] = cost, j
    starts, i = [], n
    for s in range(count, 0, -1):
        i = cut[s][i]
        starts.append(i)
    return best[count][n], starts[::-1]


def parameter_count(cfg: ModelConfig, pipeline: PipelineConfig | None = None) -> int:
    """Trainable parameters of the model, computed from the config alone (no allocation)."""
    ranges = stage_layers(cfg, pipeline)
    return sum(stage_parameters(cfg, r, i, len(ranges)) for i, r in enumerate(ranges))


def largest_stage_parameters(cfg: ModelConfig, pipeline: PipelineConfig | None = None) -> int:
    """Trainable parameters of the model's largest stage."""
    ranges = stage_layers(cfg, pipeline)
    return max(stage_parameters(cfg, r, i, len(ranges)) for i, r in enumerate(ranges))
