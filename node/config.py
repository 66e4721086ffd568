"""Typed run configuration, loaded from TOML presets in ``configs/`` with command-line overrides.

A run config has one table per component: ``[model]``, ``[pipeline]``, ``[data]``, ``[train]`` and
``[swarm]`` are defined here; ``[wire]`` (protocol/tensors.py), ``[dataplane]`` (swarm/dataplane/config.py),
``[diloco]`` (swarm/diloco.py) and ``[exchange]`` (swarm/exchange/config.py) next to the component that takes
the section itself as its config. The field helpers and ``ConfigError`` are protocol/settings.py's.
A file may start with ``extends = ["model/tiny.toml", ...]``: those files are merged first (paths
relative to the extending file, or to the shipped ``configs/`` directory), then the file's own
tables override them key by key. Overrides from the CLI use dotted keys: ``train.lr=3e-4``. Finding,
layering and overriding the TOML tables, and checking each value against its field's type, is
node/config_toml.py's; this module builds the sections from them.

Every field carries a ``doc`` (with units) in its metadata; ``describe_fields`` prints them.
User mistakes raise ``ConfigError`` naming the offending field.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from node.config_toml import coerce_value, merge_tables, parse_override, read_layered, resolve_config_path
from node.model_config import ModelConfig, automatic_dense_tail
from protocol.settings import ConfigError, check_positive, setting, setting_list
from protocol.tensors import WireConfig
from swarm.dataplane import DataplaneConfig
from swarm.diloco import DilocoConfig
from swarm.exchange import ExchangeConfig


@dataclass(kw_only=True)
class PipelineConfig:
    """How the model's layers are split into stages."""

    SECTION = "pipeline"

    num_stages: int = setting(1, "Number of pipeline stages S the layers are split into.")
    layer_splits: list[int] | None = setting(
        None,
        "First layer index of stages 1..S-1 (S-1 increasing ints); None = as even as possible.",
    )

    def __post_init__(self) -> None:
        check_positive(self, "num_stages")
        if self.num_stages > 1024:
            raise ConfigError(f"pipeline.num_stages={self.num_stages} exceeds the supported 1024")
        if self.layer_splits is not None and len(self.layer_splits) != self.num_stages - 1:
            raise ConfigError(
                f"pipeline.layer_splits has {len(self.layer_splits)} entries; "
                f"pipeline.num_stages={self.num_stages} needs {self.num_stages - 1}"
            )

    def stage_ranges(self, n_layers: int) -> list[range]:
        """Layer range of each stage; raises ConfigError when the split does not fit n_layers."""
        if self.num_stages > n_layers:
            raise ConfigError(f"pipeline.num_stages={self.num_stages} exceeds model.n_layers={n_layers}")
        if self.layer_splits is None:
            base, extra = divmod(n_layers, self.num_stages)
            starts = [0]
            for s in range(self.num_stages - 1):
                starts.append(starts[-1] + base + (1 if s < extra else 0))
        else:
            starts = [0, *self.layer_splits]
            if any(b <= a for a, b in itertools.pairwise(starts)) or starts[-1] >= n_layers:
                raise ConfigError(
                    f"pipeline.layer_splits={self.layer_splits} must be strictly increasing "
                    f"and inside 1..{n_layers - 1}"
                )
        ends = [*starts[1:], n_layers]
        return [range(a, b) for a, b in zip(starts, ends, strict=True)]


@dataclass(kw_only=True)
class DataConfig:
    """Where training tokens come from and how they are split and sharded (docs/data.md)."""

    SECTION = "data"

    source: str = setting(
        "stdlib",
        "'stdlib' (embedded default: this Python's standard-library sources), 'text' (a UTF-8 file "
        "or directory) or 'tokens' (pre-tokenized little-endian uint16 .bin shards).",
    )
    path: str | None = setting(None, "File or directory for source 'text' or 'tokens'.")
    tokenizer: str = setting("bytes", "'bytes' (vocabulary 256) or the path of a local tokenizer.json file.")
    val_fraction: float = setting(0.02, "Share of the corpus held out for validation (0..0.5).")
    max_bytes: int | None = setting(None, "Read at most this many bytes of text (bytes); None = all.")
    seed: int = setting(0, "Peer data seed: picks the shard and the order of training windows.")
    shard_count: int = setting(1, "Number of disjoint shards the training split is cut into.")

    def __post_init__(self) -> None:
        if self.source not in ("stdlib", "text", "tokens"):
            raise ConfigError(f"data.source must be 'stdlib', 'text' or 'tokens', got {self.source!r}")
        if self.source != "stdlib" and not self.path:
            raise ConfigError(f"data.path is required when data.source={self.source!r}")
        if not 0.0 < self.val_fraction <= 0.5:
            raise ConfigError(f"data.val_fraction must be in (0, 0.5], got {self.val_fraction!r}")
        check_positive(self, "max_bytes", "shard_count")

    def check_paths(self) -> None:
        """Fail early, naming the field, when a configured path does not exist."""
        if self.path is not None and not Path(self.path).expanduser().exists():
            raise ConfigError(f"data.path={self.path!r} does not exist")
        if self.tokenizer != "bytes" and not Path(self.tokenizer).expanduser().is_file():
            raise ConfigError(f"data.tokenizer={self.tokenizer!r} is neither 'bytes' nor an existing file")


@dataclass(kw_only=True)
class TrainConfig:
    """Inner optimisation and the local training loop."""

    SECTION = "train"

    steps: int = setting(200, "Optimizer steps to run (steps).")
    batch_size: int = setting(16, "Sequences per microbatch.")
    seq_len: int = setting(128, "Tokens per training sequence (tokens); at most model.max_seq_len.")
    grad_accum: int = setting(1, "Microbatches accumulated per optimizer step.")
    lr: float = setting(1e-3, "Peak AdamW learning rate.")
    min_lr_ratio: float = setting(0.1, "Cosine schedule floor as a fraction of lr.")
    warmup_steps: int = setting(20, "Linear warm-up length (steps).")
    weight_decay: float = setting(0.1, "AdamW decoupled weight decay (matrices only).")
    beta1: float = setting(0.9, "AdamW beta1.")
    beta2: float = setting(0.95, "AdamW beta2.")
    grad_clip: float = setting(1.0, "Clip the global gradient L2 norm to this; 0 disables.")
    subspace_lr_mult: float = setting(
        1.0, "Learning-rate multiplier for the subspace coefficients Z of constrained residual writers."
    )
    embedding_lr_mult: float = setting(
        1.0, "Learning-rate multiplier for the token embedding (its k-dim coefficients in a subspace model)."
    )
    wire_boundaries: bool = setting(
        False, "train-local only: round every boundary and its gradient through wire.activation_codec and "
        "wire.gradient_codec, as a swarm's network would (false: boundaries pass exactly)."
    )
    eval_every: int = setting(50, "Validate every this many steps (steps); 0 = only at the end.")
    eval_batches: int = setting(8, "Validation microbatches per evaluation.")
    log_every: int = setting(10, "Print progress every this many steps (steps).")
    checkpoint_every: int = setting(100, "Write a checkpoint every this many steps (steps); 0 = only at the end.")
    checkpoint_keep: int = setting(
        2, "Newest checkpoints kept (>= 1); older ones are removed once a new one is written."
    )
    checkpoint_dir: str = setting("runs/local", "Directory for checkpoints (created if missing).")
    resume: bool = setting(True, "Resume from the latest checkpoint in checkpoint_dir when one exists.")
    seed: int = setting(0, "Seed for parameter init (trainable parts) and dropout-free sampling.")
    device: str = setting(
        "auto", "Compute device: 'auto' (the first CUDA device when torch sees one, else the CPU), 'cpu', 'cuda' or "
        "'cuda:N'. An explicit CUDA device that is not there is an error, never a fall-back to the CPU."
    )
    threads: int | None = setting(None, "torch intra-op threads; None = torch's default.")

    def __post_init__(self) -> None:
        check_positive(self, "steps", "batch_size", "seq_len", "grad_accum", "lr", "log_every", "eval_batches",
                       "checkpoint_keep")
        check_positive(self, "threads", "subspace_lr_mult", "embedding_lr_mult")
        for name in ("warmup_steps", "eval_every", "checkpoint_every", "weight_decay", "grad_clip"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be >= 0, got {getattr(self, name)!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"train.{name} must be in [0, 1), got {getattr(self, name)!r}")
        if not re.fullmatch(r"auto|cpu|cuda|cuda:\d+", self.device):
            raise ConfigError(f"train.device must be 'cpu', 'cuda', 'cuda:N' or 'auto', got {self.device!r}")


DEFAULT_P2P_PORT = 31337  # libp2p TCP listen port: fixed, so it can be forwarded (docs/networking.md)


@dataclass(kw_only=True)
class SwarmConfig:
    """How this node finds and joins a swarm: DHT, identity, stage claiming, endpoints, timing."""

    SECTION = "swarm"

    run_id: str = setting(
        "", "Run to create or join; empty = the identity's last run, else a fresh id when creating, discovered "
        "when joining."
    )
    initial_peers: list[str] = setting_list(
        [], "Peers to join: multiaddrs (…/p2p/<id>) or http://HOST:PORT metrics URLs, any one answering is enough "
        "(a standing bootstrap list in a config file). Empty = rejoin the identity's last run, else start a swarm."
    )
    host_maddrs: list[str] = setting_list(
        [f"/ip4/0.0.0.0/tcp/{DEFAULT_P2P_PORT}"], f"libp2p listen addresses: TCP {DEFAULT_P2P_PORT} by default (the "
        "port to forward, docs/networking.md; a busy port is an error, never swapped); port 0 = any free port."
    )
    announce_maddrs: list[str] = setting_list(
        [], "Addresses other peers should dial, e.g. /ip4/<public IP>/tcp/<forwarded port> behind NAT."
    )
    identity_path: str = setting(
        "~/.protoswarm/identity.key", "Persistent libp2p identity (created on first run); one per daemon."
    )
    stage: int | None = setting(None, "Serve this stage and never rebalance; None = claim the weakest stage.")
    refresh_s: float = setting(10.0, "Re-publish this node's record every this many seconds.")
    expiry_s: float | None = setting(None, "Records expire after this many seconds; None = 2 × refresh_s.")
    rebalance_period_s: float = setting(30.0, "Mean interval between rebalancing checks (seconds, jittered).")
    rebalance_jitter: float = setting(0.5, "Random fraction ± applied to each rebalancing interval.")
    rebalance_gain: float = setting(
        1.2, "Move stage only if the lighter of this node's stage and the target, after the move, carries at "
        "least this factor times the target's throughput now; joiners treat loads within it of the lowest as ties."
    )
    min_replicas: int = setting(
        2, "Servers each stage should have before throughput is balanced (redundancy, DiLoCo partners)."
    )
    bootstrap_retry_max_s: float = setting(30.0, "Longest wait between attempts to reach initial_peers (seconds).")
    metrics_host: str = setting("0.0.0.0", "Interface for /metrics and /health.")
    metrics_port: int = setting(9464, "Port for /metrics and /health; 0 = any free port (printed at start).")
    shutdown_timeout_s: float = setting(20.0, "Most time a graceful shutdown may take before exiting anyway.")
    max_stage_params_m: float = setting(
        4000.0, "Refuse to join runs whose largest stage holds more than this many million parameters."
    )
    download_stall_s: float = setting(
        60.0, "A stage-state download attempt is cut when no verified chunk arrived for this many seconds."
    )
    download_floor_mbit: float = setting(
        1.0, "The slowest link a state download is sized for (Mbit/s): an attempt trickling below it is cut once "
        "it ran 3x as long as the state needs at this rate."
    )
    download_attempts: int = setting(
        6, "Attempts at a stage's state, with exponential back-off, before a node whose stage other peers serve "
        "exits with an error (it never starts a served stage from the seeded initialisation)."
    )
    download_backoff_s: float = setting(
        5.0, "Wait after the first failed download attempt (seconds); it doubles after each one, up to 5 minutes."
    )
    vacant_confirm_s: float = setting(
        3.0, "A stage that no DHT read showed a server of is read again this many seconds later before this node "
        "starts it from the seeded initialisation (a read that missed its servers must not seed a served stage); "
        "0 = no second read."
    )
    link: str = setting(
        "", "Emulate a home link: RATE[,delay=D] (e.g. 80mbit,delay=30ms) throttles this node's protoswarm streams "
        "in-process and delays each frame sent; the DHT is not shaped. `node sim` emulates it with namespaces when "
        "root. Empty = none."
    )
    access_key_file: str = setting(
        "", "Swarm key: a file with a shared secret (>= 16 bytes). Only peers holding it serve stages, join exchanges "
        "or publish run parameters in this node's view (docs/security.md). Empty = an open swarm."
    )
    allow_peers: list[str] = setting_list(
        [], "Allow-list of peer ids: records and streams of any other peer are ignored. Empty = no allow-list."
    )

    def __post_init__(self) -> None:
        bad = [p for p in self.allow_peers if not re.fullmatch(r"[1-9A-HJ-NP-Za-km-z]{20,128}", p)]
        if bad:
            raise ConfigError(f"swarm.allow_peers: {bad[0]!r} is not a base58 peer id")
        if self.link:
            from swarm.sim.link import LinkSpec

            try:
                LinkSpec.parse(self.link)
            except ValueError as exc:
                raise ConfigError(f"swarm.link: {exc}") from None
        check_positive(self, "refresh_s", "expiry_s", "rebalance_period_s", "bootstrap_retry_max_s",
                       "shutdown_timeout_s", "max_stage_params_m", "download_stall_s", "download_floor_mbit",
                       "download_backoff_s")
        if self.vacant_confirm_s < 0:
            raise ConfigError(f"swarm.vacant_confirm_s must be >= 0, got {self.vacant_confirm_s!r}")
        if self.download_attempts < 1:
            raise ConfigError(f"swarm.download_attempts must be >= 1, got {self.download_attempts}")
        if not 0.0 <= self.rebalance_jitter < 1.0:
            raise ConfigError(f"swarm.rebalance_jitter must be in [0, 1), got {self.rebalance_jitter!r}")
        if self.rebalance_gain < 1.0:
            raise ConfigError(f"swarm.rebalance_gain must be >= 1, got {self.rebalance_gain!r}")
        if self.expiry_s is not None and self.expiry_s <= self.refresh_s:
            raise ConfigError(f"swarm.expiry_s={self.expiry_s} must exceed swarm.refresh_s={self.refresh_s}")
        if self.min_replicas < 1:
            raise ConfigError(f"swarm.min_replicas must be >= 1, got {self.min_replicas}")
        if self.stage is not None and self.stage < 0:
            raise ConfigError(f"swarm.stage must be >= 0, got {self.stage}")
        if not 0 <= self.metrics_port < 65536:
            raise ConfigError(f"swarm.metrics_port must be a TCP port (0..65535), got {self.metrics_port}")
        if self.run_id and not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", self.run_id):
            raise ConfigError(f"swarm.run_id must be 1-64 of [A-Za-z0-9_.-], got {self.run_id!r}")

    @property
    def record_expiry_s(self) -> float:
        return self.expiry_s if self.expiry_s is not None else 2.0 * self.refresh_s


@dataclass(kw_only=True)
class RunConfig:
    """Everything one process needs; one attribute per TOML table."""

    model: ModelConfig = field(default_factory=ModelConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    wire: WireConfig = field(default_factory=WireConfig)
    dataplane: DataplaneConfig = field(default_factory=DataplaneConfig)
    diloco: DilocoConfig = field(default_factory=DilocoConfig)
    exchange: ExchangeConfig = field(default_factory=ExchangeConfig)
    swarm: SwarmConfig = field(default_factory=SwarmConfig)

    def __post_init__(self) -> None:
        ranges = self.pipeline.stage_ranges(self.model.n_layers)
        tail = self.model.dense_tail_layers
        if self.model.constrained_writers and tail is not None and self.pipeline.layer_splits is not None \
                and ranges[-1].start > self.model.n_layers - tail:
            raise ConfigError(
                f"model.dense_tail_layers={tail} reaches into an earlier stage (the last stage starts at layer "
                f"{ranges[-1].start}): a boundary after a dense layer is not in the subspace; lower it or move "
                "pipeline.layer_splits"
            )
        # Called for its check only: an explicit dense tail the stage count cannot hold raises ConfigError.
        automatic_dense_tail(n_layers=self.model.n_layers, num_stages=self.pipeline.num_stages,
                             subspace_rank=self.model.subspace_rank, dense_tail_layers=self.model.dense_tail_layers,
                             min_dense_tail_layers=self.model.min_dense_tail_layers,
                             layer_splits=self.pipeline.layer_splits, subspace_param=self.model.subspace_param)
        if self.swarm.stage is not None and self.swarm.stage >= self.pipeline.num_stages:
            raise ConfigError(
                f"swarm.stage={self.swarm.stage} does not exist: pipeline.num_stages={self.pipeline.num_stages}"
            )
        if self.train.seq_len > self.model.max_seq_len:
            raise ConfigError(
                f"train.seq_len={self.train.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}"
            )
        if self.diloco.enabled and self.diloco.blocking and self.pipeline.num_stages > 1:
            raise ConfigError("diloco.blocking needs pipeline.num_stages = 1: a waiting replica would stall the "
                              "compute thread that every microbatch through its stage needs")
        if self.diloco.enabled and self.diloco.first_moment and not self.train.beta1 ** 2 < self.train.beta2:
            raise ConfigError(f"diloco.first_moment needs train.beta1² < train.beta2 (the bound each replica clips the "
                              f"averaged first moment to), got {self.train.beta1} and {self.train.beta2}")

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {name: _fields_dict(getattr(self, name)) for name in SECTIONS}


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "pipeline": PipelineConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "wire": WireConfig,
    "dataplane": DataplaneConfig,
    "diloco": DilocoConfig,
    "exchange": ExchangeConfig,
    "swarm": SwarmConfig,
}


def _fields_dict(obj: object) -> dict[str, Any]:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}  # type: ignore[arg-type]


def load_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), **sections: dict[str, Any]
) -> RunConfig:
    """Load a run config: preset file (optional) < ``sections`` dicts < ``section.field=value`` overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        data = read_layered(resolve_config_path(path))
    merge_tables(data, {k: dict(v) for k, v in sections.items()})
    for text in overrides:
        section, name, value = parse_override(text)
        data.setdefault(section, {})[name] = value
    return build_config(data)


def build_config(data: dict[str, Any]) -> RunConfig:
    unknown = set(data) - set(SECTIONS)
    if unknown:
        raise ConfigError(f"unknown config section(s) {sorted(unknown)}; known: {sorted(SECTIONS)}")
    built = {}
    for name, cls in SECTIONS.items():
        table = data.get(name, {})
        if not isinstance(table, dict):
            raise ConfigError(f"config section [{name}] must be a table, got {type(table).__name__}")
        built[name] = _build_section(name, cls, table)
    return RunConfig(**built)


def _build_section(section: str, cls: type, table: dict[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(table) - fields
    if unknown:
        raise ConfigError(f"unknown key(s) {sorted(f'{section}.{k}' for k in unknown)}; known: {sorted(fields)}")
    kwargs = {key: coerce_value(f"{section}.{key}", hints[key], value) for key, value in table.items()}
    return cls(**kwargs)


def describe_fields() -> str:
    """Every field with its type, default and documentation, one per line (for `node config --help`)."""
    lines = []
    for section, cls in SECTIONS.items():
        lines.append(f"[{section}]  {cls.__doc__.strip().splitlines()[0]}")
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            type_name = getattr(hints[f.name], "__name__", str(hints[f.name]))
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"  {section}.{f.name}: {type_name} = {default!r}\n      {f.metadata.get('doc', '')}")
    return "\n".join(lines)
