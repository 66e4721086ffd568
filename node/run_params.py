"""A run's parameters in the swarm: what the creator publishes and what a joiner keeps as its own.

The run-level tables (model, pipeline, data, train, wire, diloco, exchange) are published as a
msgpack map in a :class:`~protocol.messages.RunRecord`; node-local fields are stripped before
publishing and always taken from the joiner's own config. A joiner also refuses runs whose stages exceed its parameter
budget (``swarm.max_stage_params_m``). :func:`created_run` and :func:`joined_run` make the record a
creator publishes and the config and record a joiner takes from the one it chose.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from typing import Any

import msgpack

from node.config import ConfigError, RunConfig, build_config
from node.model import largest_stage_parameters
from protocol.messages import RunRecord
from swarm.exchange import ExchangeConfig

# Node-local settings: never taken from the swarm's published run parameters. data.path is local so
# a published run cannot point a volunteer's trainer at the volunteer's own files; data.seed is local
# so every replica reads its own shard.
LOCAL_TRAIN_FIELDS = ("device", "threads", "checkpoint_dir", "checkpoint_keep", "resume", "log_every")
LOCAL_DATA_FIELDS = ("path", "seed")
# What this node accepts from peers protects this node: its receive limits are its own, only the codecs
# (what the run sends) are run-level.
LOCAL_WIRE_FIELDS = ("max_frame_mib", "max_tensor_mvalues", "max_decoded_mib", "frame_timeout_s", "check_finite")
# The exchange's groups, outlier bound and chunking are the run's (every replica must plan the same
# groups and cut parts the same way); its deadlines and bans are each node's own.
LOCAL_EXCHANGE_FIELDS = ExchangeConfig.LOCAL_FIELDS
# Where the outer state lives depends on this node's hardware, not on the run.
LOCAL_DILOCO_FIELDS = ("outer_device",)
RUN_SECTIONS = ("model", "pipeline", "data", "train", "wire", "diloco", "exchange")
# Each run-level section's node-local fields: stripped before publishing, always the joiner's own.
LOCAL_FIELDS = {"train": LOCAL_TRAIN_FIELDS, "data": LOCAL_DATA_FIELDS, "wire": LOCAL_WIRE_FIELDS,
                "diloco": LOCAL_DILOCO_FIELDS, "exchange": LOCAL_EXCHANGE_FIELDS}


def run_parameters(cfg: RunConfig) -> dict[str, Any]:
    """The run-level part of a config: what every peer of a run must agree on."""
    full = cfg.to_dict()
    params = {s: dict(full[s]) for s in RUN_SECTIONS}
    for section, names in LOCAL_FIELDS.items():
        for name in names:
            params[section].pop(name, None)
    return params


def config_from_run(params: dict[str, Any], local: RunConfig, peer_id: str = "") -> RunConfig:
    """A joiner's config: the run's parameters plus this node's local settings.

    A joiner that left ``data.seed`` at its default gets a seed derived from its peer id, so replicas
    do not all read the same windows.
    """
    data = {s: dict(params.get(s, {})) if isinstance(params.get(s), dict) else {} for s in RUN_SECTIONS}
    local_dict = local.to_dict()
    for section, names in LOCAL_FIELDS.items():
        for name in names:
            data[section][name] = local_dict[section][name]
    if local.data.seed == 0 and peer_id:
        data["data"]["seed"] = int.from_bytes(hashlib.sha256(peer_id.encode()).digest()[:4], "little") >> 1
    data["swarm"] = local_dict["swarm"]
    data["dataplane"] = local_dict["dataplane"]
    cfg = build_config(data)
    largest = largest_stage_parameters(cfg.model, cfg.pipeline) / 1e6
    if largest > local.swarm.max_stage_params_m:
        raise ConfigError(
            f"the run's largest stage has ~{largest:,.0f}M parameters, over this node's "
            f"swarm.max_stage_params_m={local.swarm.max_stage_params_m:,.0f}"
        )
    return cfg


class RunUnusable(Exception):
    """The swarm's run cannot be joined here (several runs and none named, or unusable parameters)."""


def created_run(cfg: RunConfig, peer_id: str, proof) -> RunRecord:
    """The record of a new run this node creates (``swarm.run_id``, else ``<model>-<random>``)."""
    run_id = cfg.swarm.run_id or f"{cfg.model.name}-{secrets.token_hex(3)}"
    return RunRecord(run_id=run_id, creator=peer_id, created=time.time(), publisher=peer_id,
                     config=msgpack.packb(run_parameters(cfg)), access=proof(run_id, peer_id))


def joined_run(chosen: RunRecord, local: RunConfig, peer_id: str, proof) -> tuple[RunConfig, RunRecord]:
    """This node's config for the run ``chosen`` (its parameters plus the local fields) and the record this
    node republishes for it; RunUnusable when the parameters cannot be used here."""
    try:
        params = msgpack.unpackb(chosen.config, raw=False)
        if not isinstance(params, dict):
            raise ConfigError("the run parameters are not a table")
        cfg = config_from_run(params, local, peer_id)
    except (ConfigError, ValueError, TypeError, msgpack.UnpackException) as exc:
        raise RunUnusable(f"the swarm's run parameters are not usable here: {exc}") from None
    record = RunRecord(run_id=chosen.run_id, creator=chosen.creator, created=chosen.created, publisher=peer_id,
                       config=chosen.config, access=proof(chosen.run_id, peer_id))
    return cfg, record
