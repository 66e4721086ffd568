"""Restarting is resuming (node/last_run.py): the identity's run memory, `node start`'s choice between
rejoining, resuming as founder and a new swarm, several --join / a standing swarm.initial_peers, and the
fixed listen port that is checked rather than silently shared."""

from __future__ import annotations

import json
import socket
from contextlib import closing
from pathlib import Path
from types import SimpleNamespace

import pytest

from node.cli import build_parser, main, prepare_start
from node.config import DEFAULT_P2P_PORT, ConfigError, load_config
from node.last_run import (
    LastRun,
    LastRunError,
    RunMemory,
    any_reachable,
    busy_listen_port,
    last_run_path,
    load_last_run,
    merge_peers,
    plan_start,
    save_last_run,
)
from node.run_params import run_parameters
from protocol.messages import StageRecord

A, B, C, ME = ("12D3KooWAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", "12D3KooWBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBB",
               "12D3KooWCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCC", "12D3KooWMEMEMEMEMEMEMEMEMEMEMEMEMEMEMEMEMEMEMEMEMEME")


def _listening() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


def _closed_port() -> int:
    with closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start(tmp_path: Path, *argv: str):
    args = build_parser().parse_args(["start", "--identity", str(tmp_path / "id.key"),
                                      "--set", f"train.checkpoint_dir={str(tmp_path / 'ckpt')!r}", *argv])
    return prepare_start(args)


def _record(peer: str, state: str = "online", addrs: tuple[str, ...] = ()) -> StageRecord:
    return StageRecord(peer_id=peer, run_id="r", stage=0, num_stages=1, state=state, addrs=list(addrs))


def test_the_memory_round_trips_next_to_the_identity_and_is_none_before_any_run(tmp_path):
    key = tmp_path / "keys" / "id.key"
    assert load_last_run(key) is None
    last = LastRun(run_id="tiny-abc123", founder=True, peers=(f"/ip4/10.0.0.2/tcp/31337/p2p/{A}",),
                   checkpoint_dir="/ckpt")
    save_last_run(key, last)
    assert last_run_path(key) == tmp_path / "keys" / "id.key.last-run.json"
    assert load_last_run(key) == last
    kept = LastRun(run_id="tiny-abc123", founder=True, params={"model": {"init_std": 0.02, "subspace_rank": 8}})
    save_last_run(key, kept)
    assert load_last_run(key) == kept
    assert [p.name for p in (tmp_path / "keys").iterdir()] == ["id.key.last-run.json"]  # no temp file left


@pytest.mark.parametrize("text, why", [
    ("{not json", "cannot be read"),
    ('{"version": 1, "run_id": "r", "founder": "yes"}', "founder must be true or false"),
    ('{"version": 1, "run_id": "../x", "founder": true}', "is not a run id"),
    ('{"version": 1, "run_id": "r", "founder": true, "peers": ["ftp://x"]}', "peers must be"),
    ('{"version": 9, "run_id": "r", "founder": true}', "version 1"),
    ('{"version": 1, "run_id": "r", "founder": true, "params": [1]}', "params must be a table"),
    ('{"version": 1, "run_id": "r", "founder": true, "params": {"model": 3}}', "params must be a table"),
    ("[]", "version 1"),
])
def test_an_unusable_memory_is_a_clear_error_never_a_crash(tmp_path, capsys, text, why):
    last_run_path(tmp_path / "id.key").write_text(text)
    with pytest.raises(LastRunError, match=why) as err:
        load_last_run(tmp_path / "id.key")
    assert "id.key.last-run.json" in str(err.value) and "--new" in str(err.value)
    # `node start` says so and exits 2 before starting anything; --new does not read the file.
    assert main(["start", "--identity", str(tmp_path / "id.key"), "--metrics-port", "0"]) == 2
    assert "error:" in capsys.readouterr().err
    assert _start(tmp_path, "--new")[1] is True


def test_the_memory_keeps_the_run_its_founder_and_the_peers_it_sees(tmp_path):
    cfg = load_config("swarm/tiny", [f"swarm.identity_path={str(tmp_path / 'id.key')!r}",
                                     f"swarm.initial_peers={json.dumps(['http://boot:9464', f'/ip4/1.2.3.4/tcp/1/p2p/{ME}'])}"])
    dht = SimpleNamespace(peer_id=ME)
    memory = RunMemory.online(cfg, SimpleNamespace(run_id="r", creator=A), dht)
    saved = load_last_run(tmp_path / "id.key")
    assert saved.run_id == "r" and saved.founder is False and saved.peers == ("http://boot:9464",)  # not itself
    assert saved.params == json.loads(json.dumps(run_parameters(cfg)))  # the run's parameters, as JSON keeps them
    assert saved.checkpoint_dir == str(Path(cfg.train.checkpoint_dir).resolve())
    records = {0: [_record(ME, addrs=(f"/ip4/1.2.3.4/tcp/1/p2p/{ME}",)),
                   _record(B, "offline", (f"/ip4/10.0.0.3/tcp/31337/p2p/{B}",)),
                   _record(A, addrs=(f"/ip4/127.0.0.1/tcp/31337/p2p/{A}", f"/ip4/10.0.0.2/tcp/31337/p2p/{A}")),
                   _record(C, addrs=(f"/ip4/10.0.0.9/tcp/5/p2p/{A}",))]}  # C announcing A's address: dropped
    memory.refresh(records)
    # Serving peers first, their routable addresses only; then those that left; then what it joined through.
    assert load_last_run(tmp_path / "id.key").peers == (
        f"/ip4/10.0.0.2/tcp/31337/p2p/{A}", f"/ip4/10.0.0.3/tcp/31337/p2p/{B}", "http://boot:9464")
    last_run_path(tmp_path / "id.key").unlink()
    memory.refresh(records)  # nothing changed: nothing written
    assert load_last_run(tmp_path / "id.key") is None
    save_last_run(tmp_path / "id.key", memory.last)
    # A restart into the same run keeps what it knew; the founder flag follows the run record's creator.
    again = RunMemory.online(load_config("swarm/tiny", [f"swarm.identity_path={str(tmp_path / 'id.key')!r}"]),
                             SimpleNamespace(run_id="r", creator=ME), dht)
    assert again.last.founder is True and again.last.peers == memory.last.peers
    assert load_last_run(tmp_path / "id.key").params == saved.params  # a refresh keeps them


def test_a_founder_resumes_with_its_runs_parameters_not_a_preset_changed_since(tmp_path):
    """The tiny preset's model changed under runs founded before (init, table, dense tail): a founder resuming
    alone takes the parameters its memory kept, so its checkpoints are still its model's; a run-level --set is
    ignored with a note, as for a rejoining node; local settings stay its own."""
    old = load_config("swarm/tiny", ["model.init_std=0.02", "model.fixed_table_std=0.1", "model.min_dense_tail_layers=3",
                                     "pipeline.num_stages=2"])
    params = json.loads(json.dumps(run_parameters(old)))
    save_last_run(tmp_path / "id.key", LastRun(run_id="tiny-7", founder=True, params=params))
    cfg, create, notes = _start(tmp_path, "--set", "train.lr=0.5")
    assert create and cfg.swarm.run_id == "tiny-7"
    assert cfg.to_dict()["model"] == old.to_dict()["model"] and cfg.pipeline == old.pipeline and cfg.train.lr == old.train.lr
    assert cfg.train.checkpoint_dir == str(tmp_path / "ckpt")  # a local setting: this node's
    assert "model.init_std=0.02 (this config: 0.06)" in notes[-1] and "model.min_dense_tail_layers=3" in notes[-1]
    assert notes[-1].endswith("ignoring train.lr=0.5 (--new starts a new swarm with them)")
    assert _start(tmp_path, "--new")[0].model.init_std == 0.06  # a new swarm: the preset as it is now
    params["model"]["n_layers"] = -1
    save_last_run(tmp_path / "id.key", LastRun(run_id="tiny-7", founder=True, params=params))
    with pytest.raises(ConfigError, match="tiny-7's remembered parameters cannot be used here"):
        _start(tmp_path)
    save_last_run(tmp_path / "id.key", LastRun(run_id="tiny-7", founder=True))  # a memory from before: the preset
    assert _start(tmp_path)[0].model.init_std == 0.06


def test_merge_keeps_the_first_peers_and_a_few_addresses_each():
    many = [f"/ip4/10.0.0.{i}/tcp/{port}/p2p/{peer}" for i, peer in enumerate((A, B, C)) for port in (1, 2, 3, 4)]
    assert merge_peers(many, limit=2) == tuple(many[0:3] + many[4:7])


def test_plan_start_rejoins_resumes_or_founds(tmp_path):
    cfg = load_config("swarm/tiny", [f"train.checkpoint_dir={str(tmp_path)!r}"])
    here = str(tmp_path.resolve())
    peers = (f"/ip4/10.0.0.2/tcp/31337/p2p/{A}", f"/ip4/10.0.0.3/tcp/31337/p2p/{B}")
    up, down = (lambda p: True), (lambda p: False)
    assert plan_start(cfg, None).create is True  # never in a run: a new swarm

    founder = LastRun(run_id="tiny-1", founder=True, checkpoint_dir=here)
    alone = plan_start(cfg, founder, up)
    assert alone.create and alone.overrides == ['swarm.run_id="tiny-1"']
    assert alone.notes == ["resuming run tiny-1 as its founder (no other peer known); `--new` starts a new swarm"]

    joined = plan_start(cfg, LastRun(run_id="tiny-1", founder=True, peers=peers, checkpoint_dir=here), up)
    assert not joined.create and joined.overrides == ['swarm.run_id="tiny-1"', f"swarm.initial_peers={json.dumps(peers)}"]
    assert joined.notes == ["rejoining run tiny-1 via 2 known peer(s); `--new` starts a new swarm"]
    gone = plan_start(cfg, LastRun(run_id="tiny-1", founder=True, peers=peers, checkpoint_dir=here), down)
    assert gone.create and gone.overrides == ['swarm.run_id="tiny-1"'] and "none of its 2 known" in gone.notes[0]

    joiner = plan_start(cfg, LastRun(run_id="tiny-1", founder=False, peers=peers, checkpoint_dir=here), down)
    assert not joiner.create and "keeps trying in the background" in joiner.notes[1]
    with pytest.raises(LastRunError, match="--join ADDR rejoins it"):
        plan_start(cfg, LastRun(run_id="tiny-1", founder=False), up)

    other = plan_start(load_config("swarm/tiny", ["swarm.run_id='mine'"]), founder, up)
    assert other.create and not other.overrides and "this identity was last in run tiny-1" in other.notes[0]
    moved = plan_start(cfg, LastRun(run_id="tiny-1", founder=True, checkpoint_dir="/elsewhere"), up)
    assert "written under /elsewhere" in moved.notes[1]


def test_start_flags_new_several_joins_and_a_standing_bootstrap_list(tmp_path):
    with pytest.raises(SystemExit) as exit_:  # parse-time: --new and --join exclude each other
        build_parser().parse_args(["start", "--new", "--join", "/ip4/1.2.3.4/tcp/1/p2p/x"])
    assert exit_.value.code == 2
    cfg, create, _ = _start(tmp_path, "--join", f"/ip4/10.0.0.2/tcp/1/p2p/{A}", "--initial-peers", "http://b:9464")
    assert not create and cfg.swarm.initial_peers == [f"/ip4/10.0.0.2/tcp/1/p2p/{A}", "http://b:9464"]
    standing = tmp_path / "standing.toml"
    standing.write_text('extends = ["swarm/tiny.toml"]\n[swarm]\n'
                        f'initial_peers = ["/ip4/10.0.0.2/tcp/31337/p2p/{A}", "/ip4/10.0.0.3/tcp/31337/p2p/{B}"]\n')
    cfg, create, _ = _start(tmp_path, "--config", str(standing))
    assert not create and len(cfg.swarm.initial_peers) == 2
    with pytest.raises(ConfigError, match=r"--new starts a new swarm, but swarm\.initial_peers"):
        _start(tmp_path, "--config", str(standing), "--new")
    cfg, create, notes = _start(tmp_path)
    assert create and not cfg.swarm.run_id and notes == []  # nothing remembered: a new swarm
    assert cfg.swarm.host_maddrs == [f"/ip4/0.0.0.0/tcp/{DEFAULT_P2P_PORT}"]


def test_start_without_flags_rejoins_the_identitys_last_run(tmp_path):
    with closing(_listening()) as peer:
        address = f"/ip4/127.0.0.1/tcp/{peer.getsockname()[1]}/p2p/{A}"
        save_last_run(tmp_path / "id.key", LastRun(run_id="tiny-9", founder=False, peers=(address,)))
        cfg, create, notes = _start(tmp_path, "--set", "train.lr=0.5")
    assert not create and cfg.swarm.run_id == "tiny-9" and cfg.swarm.initial_peers == [address]
    assert notes[0] == "rejoining run tiny-9 via 1 known peer(s); `--new` starts a new swarm"
    assert notes[-1].startswith("ignoring train.lr=0.5: a rejoining node takes the run's parameters")
    cfg, create, notes = _start(tmp_path, "--new")
    assert create and not cfg.swarm.initial_peers and notes == ["starting a new swarm (--new)"]


def test_a_busy_listen_port_is_an_error_naming_it_and_the_way_out(tmp_path, capsys):
    with closing(_listening()) as taken:
        port = taken.getsockname()[1]
        why = busy_listen_port(["/ip4/0.0.0.0/tcp/0", f"/ip4/127.0.0.1/tcp/{port}"])
        assert f"TCP port {port} (/ip4/127.0.0.1/tcp/{port}) is already in use" in why
        assert "--host-maddrs /ip4/0.0.0.0/tcp/PORT" in why and "--host-maddrs /ip4/0.0.0.0/tcp/0" in why
        assert main(["start", "--new", "--identity", str(tmp_path / "id.key"), "--metrics-port", "0",
                     "--host-maddrs", f"/ip4/127.0.0.1/tcp/{port}", "--device", "cpu"]) == 2
        assert f"error: TCP port {port}" in capsys.readouterr().err
    assert busy_listen_port([f"/ip4/127.0.0.1/tcp/{port}"]) is None  # free again
    assert busy_listen_port(["/ip4/127.0.0.1/tcp/0", "/ip4/127.0.0.1/udp/5/quic"]) is None


def test_any_reachable_asks_every_address_at_once():
    with closing(_listening()) as up:
        live = f"/ip4/127.0.0.1/tcp/{up.getsockname()[1]}/p2p/{A}"
        assert any_reachable([f"/ip4/127.0.0.1/tcp/{_closed_port()}/p2p/{B}", live])
        assert any_reachable([f"http://127.0.0.1:{up.getsockname()[1]}"])
    assert not any_reachable([f"/ip4/127.0.0.1/tcp/{_closed_port()}/p2p/{B}", "/p2p-circuit", "garbage"])
    assert not any_reachable([])
