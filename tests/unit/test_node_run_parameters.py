"""What a joiner takes from the swarm's published run parameters, and what stays its own."""

from __future__ import annotations

import msgpack
import pytest

from node.config import ConfigError, load_config
from node.model import stage_layers
from node.run_params import config_from_run, run_parameters
from protocol.messages import RunRecord
from swarm.records import choose_run


def test_run_parameters_round_trip_without_local_fields(tmp_path):
    creator = load_config("swarm/tiny-2stage", ["train.device='cpu'", f"train.checkpoint_dir='{tmp_path}'"])
    params = msgpack.unpackb(msgpack.packb(run_parameters(creator)), raw=False)
    assert "checkpoint_dir" not in params["train"] and "path" not in params["data"] and "swarm" not in params
    joiner_local = load_config("swarm/tiny", ["train.checkpoint_dir='/elsewhere'", "swarm.metrics_port=0"])
    joined = config_from_run(params, joiner_local, peer_id="QmPeer")
    assert joined.pipeline.num_stages == 2 and joined.model == creator.model and joined.wire == creator.wire
    assert joined.train.checkpoint_dir == "/elsewhere" and joined.swarm.metrics_port == 0
    assert joined.data.seed != 0  # derived from the peer id: replicas read different windows
    assert config_from_run(params, joiner_local, peer_id="QmOther").data.seed != joined.data.seed


def test_a_published_run_cannot_choose_the_joiners_files():
    params = run_parameters(load_config("swarm/tiny"))
    params["data"].update(source="text", path="/etc")  # a hostile run points at local files
    with pytest.raises(ConfigError, match=r"data\.path is required"):
        config_from_run(params, load_config("swarm/tiny"), peer_id="QmPeer")


def test_hostile_run_parameters_are_config_errors():
    params = run_parameters(load_config("swarm/tiny"))
    params["model"]["d_model"] = "huge"
    with pytest.raises(ConfigError):
        config_from_run(params, load_config("swarm/tiny"))


def test_joiners_follow_the_majority_of_signing_keys():
    """Votes count per signing key: one key publishing many copies under invented names counts once."""
    good, bad = msgpack.packb({"a": 1}), msgpack.packb({"a": 2})
    copies = [RunRecord(run_id="r", creator="c", created=1.0, publisher=f"p{i}", config=good) for i in range(3)]
    forged = [RunRecord(run_id="r", creator="x", created=0.5, publisher=f"sybil{i}", config=bad) for i in range(5)]
    owners = [b"k0", b"k1", b"k2"] + [b"evil"] * 5
    assert choose_run(copies + forged, owners, None).config == good
    assert choose_run([], [], None) is None
    other = RunRecord(run_id="other", creator="c", created=1.0, publisher="p", config=good)
    assert "several runs" in choose_run([*copies, other], [b"k0", b"k1", b"k2", b"k3"], None)
    assert choose_run([*copies, other], [b"k0", b"k1", b"k2", b"k3"], "other").run_id == "other"


def test_local_limits_and_budget_are_the_joiners():
    params = run_parameters(load_config("swarm/tiny"))
    assert "max_frame_mib" not in params["wire"] and "fragment_codec" in params["wire"]
    params["wire"]["max_frame_mib"] = 1e9  # a hostile run would raise the joiner's receive caps
    local = load_config("swarm/tiny", ["swarm.max_stage_params_m=1"])
    with pytest.raises(ConfigError, match="largest stage has ~6M parameters"):
        config_from_run(params, local)  # the tiny model has ~6.5M in its one stage, over the budget of 1M
    params["model"].update(d_model=262144, n_layers=4096)
    with pytest.raises(ConfigError, match="largest stage"):
        config_from_run(params, load_config("swarm/tiny"))


def test_the_stage_budget_checks_the_largest_stage_not_the_mean():
    params = run_parameters(load_config("swarm/tiny", ["pipeline.num_stages=2"]))  # stages of 2.26M and 3.28M
    config_from_run(params, load_config("swarm/tiny", ["swarm.max_stage_params_m=3.3"]))
    with pytest.raises(ConfigError, match="largest stage has ~3M parameters"):
        config_from_run(params, load_config("swarm/tiny", ["swarm.max_stage_params_m=3.0"]))  # the mean is 2.77M


def test_a_joiner_splits_stages_by_the_published_dense_tail_not_its_own_preset():
    """The 125m preset's tail minimum went from 3 to 4 (d2d67e9): a joiner with the new preset joining a run
    published with 3 must take the run's split, or its stages' layers would not line up with its peers'."""
    old = load_config("model/125m", ["pipeline.num_stages=4", "model.min_dense_tail_layers=3"])
    new = load_config("model/125m", ["pipeline.num_stages=4"])
    assert stage_layers(old.model, old.pipeline) != stage_layers(new.model, new.pipeline)  # the splits differ
    params = msgpack.unpackb(msgpack.packb(run_parameters(old)), raw=False)
    assert params["model"]["min_dense_tail_layers"] == 3  # published, not left to each node's preset
    joined = config_from_run(params, new, peer_id="QmPeer")
    assert stage_layers(joined.model, joined.pipeline) == stage_layers(old.model, old.pipeline)
