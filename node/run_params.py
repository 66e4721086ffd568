"""A run's parameters in the swarm: what the creator publishes and what a joiner keeps as its own.

The run-level tables (model, pipeline, data, train, wire, diloco) are published as a msgpack map in a
:class:`~protocol.messages.RunRecord`; node-local fields are stripped before publishing and always
taken from the joiner's own config. A joiner also refuses runs whose stages exceed its parameter
budget (``swarm.max_stage_params_m``).
"""

from __future__ import annotations

import hashlib
from typing import Any

from node.config import ConfigError, RunConfig, build_config
from node.model import parameter_count

# Node-local settings: never taken from the swarm's published run parameters. data.path is local so
# a published run cannot point a volunteer's trainer at the volunteer's own files; data.seed is local
# so every replica reads its own shard.
LOCAL_TRAIN_FIELDS = ("device", "threads", "checkpoint_dir", "checkpoint_keep", "resume", "log_every")
LOCAL_DATA_FIELDS = ("path", "seed")
# What this node accepts from peers protects this node: its receive limits are its own, only the codecs
# (what the run sends) are run-level.
LOCAL_WIRE_FIELDS = ("max_frame_mib", "max_tensor_mvalues", "max_decoded_mib", "frame_timeout_s", "check_finite")
RUN_SECTIONS = ("model", "pipeline", "data", "train", "wire", "diloco")


def run_parameters(cfg: RunConfig) -> dict[str, Any]:
    """The run-level part of a config: what every peer of a run must agree on."""
    full = cfg.to_dict()
    params = {s: dict(full[s]) for s in RUN_SECTIONS}
    for name in LOCAL_TRAIN_FIELDS:
        params["train"].pop(name, None)
    for name in LOCAL_DATA_FIELDS:
        params["data"].pop(name, None)
    for name in LOCAL_WIRE_FIELDS:
        params["wire"].pop(name, None)
    return params


def config_from_run(params: dict[str, Any], local: RunConfig, peer_id: str = "") -> RunConfig:
    """A joiner's config: the run's parameters plus this node's local settings.

    A joiner that left ``data.seed`` at its default gets a seed derived from its peer id, so replicas
    do not all read the same windows.
    """
    data = {s: dict(params.get(s, {})) if isinstance(params.get(s), dict) else {} for s in RUN_SECTIONS}
    local_dict = local.to_dict()
    for name in LOCAL_TRAIN_FIELDS:
        data["train"][name] = local_dict["train"][name]
    for name in LOCAL_DATA_FIELDS:
        data["data"][name] = local_dict["data"][name]
    for name in LOCAL_WIRE_FIELDS:
        data["wire"][name] = local_dict["wire"][name]
    if local.data.seed == 0 and peer_id:
        data["data"]["seed"] = int.from_bytes(hashlib.sha256(peer_id.encode()).digest()[:4], "little") >> 1
    data["swarm"] = local_dict["swarm"]
    data["dataplane"] = local_dict["dataplane"]
    cfg = build_config(data)
    per_stage = parameter_count(cfg.model, cfg.pipeline) / cfg.pipeline.num_stages / 1e6
    if per_stage > local.swarm.max_stage_params_m:
        raise ConfigError(
            f"the run's model has ~{per_stage:,.0f}M parameters per stage, over this node's "
            f"swarm.max_stage_params_m={local.swarm.max_stage_params_m:,.0f}"
        )
    return cfg
