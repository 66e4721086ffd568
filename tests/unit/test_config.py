from __future__ import annotations

import dataclasses
import typing

import pytest

from configs import CONFIG_DIR
from node.config import SECTIONS, ConfigError, describe_fields, load_config, parse_override
from node.model import LanguageModel, parameter_count
from node.run_params import config_from_run, run_parameters
from swarm import dataplane, diloco, diloco_group, exchange

SHIPPED = sorted(p for p in CONFIG_DIR.rglob("*.toml") if p.parent.name != "hardware")  # hardware/: the GPU catalogue


def test_presets_are_shipped():
    names = {p.relative_to(CONFIG_DIR).as_posix() for p in SHIPPED}
    assert {"model/tiny.toml", "model/small.toml", "model/125m.toml", "model/1b.toml", "model/8b.toml"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.relative_to(CONFIG_DIR).as_posix())
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.model.n_layers >= cfg.pipeline.num_stages
    assert parameter_count(cfg.model, cfg.pipeline) > 0


@pytest.mark.parametrize(("preset", "low", "high"), [
    ("tiny", 3e6, 8e6), ("small", 20e6, 30e6), ("125m", 100e6, 150e6), ("1b", 0.9e9, 1.3e9), ("8b", 7e9, 9e9),
])
def test_preset_sizes_match_their_names(preset, low, high):
    cfg = load_config(preset, ["model.subspace_rank='none'"])
    assert low <= parameter_count(cfg.model) <= high


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_parameter_count_matches_the_built_model(preset):
    for stages in (1, 4):
        cfg = load_config(preset, [f"pipeline.num_stages={stages}"])
        assert LanguageModel(cfg.model, cfg.pipeline).num_parameters() == parameter_count(cfg.model, cfg.pipeline)


def test_extends_and_overrides_layer_in_order():
    cfg = load_config("local/tiny", ["train.lr=3e-4", "model.subspace_rank=16", "pipeline.layer_splits=[1, 2, 5]"])
    assert cfg.model.name == "tiny" and cfg.pipeline.num_stages == 4
    assert cfg.train.lr == 3e-4 and cfg.model.subspace_rank == 16
    assert [(r.start, r.stop) for r in cfg.pipeline.stage_ranges(8)] == [(0, 1), (1, 2), (2, 5), (5, 8)]
    dense = load_config("local/tiny-dense")
    assert dense.model.subspace_rank is None and not dense.model.uses_fixed_table


def test_even_stage_split():
    cfg = load_config("tiny", ["pipeline.num_stages=3"])
    assert [len(r) for r in cfg.pipeline.stage_ranges(8)] == [3, 3, 2]


@pytest.mark.parametrize(("override", "message"), [
    ("model.bogus=1", "model.bogus"),
    ("train.lr=-1.0", "train.lr must be positive"),
    ("model.d_model=0", "model.d_model must be positive"),
    ("train.batch_size=0", "train.batch_size"),
    ("model.subspace_rank=512", "subspace_rank=512 exceeds model.d_model=256"),
    ("model.n_heads=3", "not divisible"),
    ("train.steps='many'", "train.steps must be of type int"),
    ("train.device='tpu'", "train.device"),
    ("data.source='web'", "data.source"),
    ("data.source='text'", "data.path is required"),
    ("pipeline.num_stages=9", "num_stages=9 exceeds model.n_layers=8"),
    ("pipeline.layer_splits=[3, 2, 5]", "strictly increasing"),
    ("train.seq_len=1024", "exceeds model.max_seq_len"),
    ("train.lr=nan", "train.lr must be a finite number"),
    ("train.grad_clip=inf", "train.grad_clip must be a finite number"),
    ("model.rope_theta=nan", "model.rope_theta must be a finite number"),
    ("train.device='cuda:x'", "train.device"),
    ("diloco.overlap=400", "diloco.overlap"),
    ("diloco.fragments=500", "diloco.fragments=500 exceeds diloco.inner_steps=400"),
    ("exchange.gather_s=60", "exchange.gather_s=60.0 must be below exchange.timeout_s=60.0"),
    ("exchange.max_group=0", "exchange.max_group must be positive"),
    ("exchange.max_norm_ratio=0.5", "exchange.max_norm_ratio must be >= 1"),
    ("dataplane.backward='none'", "dataplane.backward"),
])
def test_invalid_values_name_the_field(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_config("local/tiny", [override])


def test_unknown_section_and_bad_toml(tmp_path):
    with pytest.raises(ConfigError, match="unknown config section"):
        load_config(None, optimizer={"lr": 1})
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\nd_model = 1")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config("no-such-preset")
    loop = tmp_path / "loop.toml"
    loop.write_text('extends = ["loop.toml"]\n')
    with pytest.raises(ConfigError, match="cycle"):
        load_config(loop)


def test_missing_data_path_is_rejected_at_start(tmp_path):
    cfg = load_config("local/tiny", ["data.source='text'", f"data.path='{tmp_path / 'nope.txt'}'"])
    with pytest.raises(ConfigError, match=r"data.path=.*does not exist"):
        cfg.data.check_paths()


def test_override_syntax():
    assert parse_override("train.lr=3e-4") == ("train", "lr", 3e-4)
    assert parse_override("data.path=/tmp/x y") == ("data", "path", "/tmp/x y")
    with pytest.raises(ConfigError, match=r"section.field=value"):
        parse_override("lr=3")


def test_every_field_is_documented():
    text = describe_fields()
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert f.metadata.get("doc"), f"{section}.{f.name} has no doc"
            assert f"{section}.{f.name}:" in text


def test_wire_codecs_are_checked_by_name():
    """A misspelt codec is a ConfigError naming the field; valid names give matching wire limits."""
    with pytest.raises(ConfigError, match=r"wire\.fragment_codec.*e3m0"):
        load_config("local/tiny", ["wire.fragment_codec='e4m0'"])
    cfg = load_config("local/tiny", ["wire.activation_codec='bf16'", "wire.max_frame_mib=1"])
    limits = cfg.wire.limits(vocab_size=cfg.model.vocab_size)
    assert cfg.wire.activation_codec == "bf16"
    assert limits.max_frame_bytes == 1 << 20 and limits.max_token_id == cfg.model.vocab_size


@pytest.mark.parametrize(("section", "component", "parameter"), [
    ("wire", dataplane.DataPlane.__init__, "wire"),
    ("dataplane", dataplane.DataPlane.__init__, "config"),
    ("diloco", diloco.OuterLoop.__init__, "settings"),
    ("diloco", diloco_group.InProcessGroup.__init__, "settings"),
    ("diloco", diloco.due, "settings"),
    ("exchange", exchange.FragmentExchange.__init__, "config"),
])
def test_each_section_is_the_config_its_component_takes(section, component, parameter):
    """A component takes its config section itself: no settings class copies the section field by field."""
    assert typing.get_type_hints(component)[parameter] is SECTIONS[section]
    for module in (dataplane, diloco, exchange):
        assert not [name for name in vars(module) if name.endswith("Settings")], module.__name__
    assert SECTIONS[section].SECTION == section


def test_the_exchange_plans_groups_from_the_run_and_keeps_its_deadlines_local():
    creator = load_config("swarm/diloco-local", ["exchange.max_group=4", "exchange.max_norm_ratio=3.0",
                                                 "exchange.mode='balanced'"])
    params = run_parameters(creator)
    assert params["exchange"] == {"mode": "balanced", "max_group": 4, "max_norm_ratio": 3.0, "max_weight_ratio": 4.0,
                                  "max_values_per_part": 1 << 24}
    local = load_config("swarm/tiny", ["exchange.max_group=8", "exchange.timeout_s=15", "exchange.ban_s=5"])
    joined = config_from_run(params, local, peer_id="QmPeer")
    assert (joined.exchange.mode, joined.exchange.max_group, joined.exchange.max_norm_ratio) == ("balanced", 4, 3.0)
    assert (joined.exchange.timeout_s, joined.exchange.ban_s, joined.exchange.gather_s) == (15.0, 5.0, 10.0)  # its own
