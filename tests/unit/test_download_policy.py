"""The node's download policy without a network (node/stage_download.py): a stage nobody serves starts
from the seeded initialisation, a served one is retried with exponential back-off and then fails the
node with the peers and their errors; a cut download resumes into the stage's store from the chunks
kept under its checkpoint directory. Back-off waits go to a fake ``wait`` (no sleeps, no clocks)."""

from __future__ import annotations

import asyncio
import logging
import threading
from types import SimpleNamespace

import pytest
from download_util import RUN, FakeDonor, FakeP2P

from node.config import SwarmConfig, load_config
from node.metrics import NodeMetrics
from node.stage_download import DOWNLOAD_DIR, RetryPolicy, StageDownloader, StageUnavailable
from node.stage_store import StageStore
from node.status_line import format_status
from protocol.messages import StageRecord

PEERS = ["QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N", "QmNnooDu7bfjPFoTZYxMNLWUQJyrVwtbZg5gBMjTezGAJN"]


def _record(peer: str, progress: int = 10) -> StageRecord:
    return StageRecord(peer_id=peer, run_id=RUN, stage=0, num_stages=1, state="online", progress=progress)


def _cfg(tmp_path, attempts: int = 4):
    return load_config(None, model={"name": "t", "vocab_size": 256, "d_model": 32, "n_layers": 2, "n_heads": 2,
                                    "ffn_hidden": 64, "max_seq_len": 32, "subspace_rank": 4},
                       train={"seq_len": 16, "checkpoint_dir": str(tmp_path)},
                       swarm={"download_attempts": attempts, "download_backoff_s": 1.0, "download_stall_s": 5.0})


def _downloader(tmp_path, peers, outcomes=(), attempts=4, services=None, error="refused [banned]"):
    """A StageDownloader whose DHT shows ``peers`` (a list, or a list of lists read in turn) and whose
    rounds end as ``outcomes`` says, then fail (unless ``services`` is given: real rounds over it);
    the back-off waits it asked for are in ``.waits``."""
    ctx = SimpleNamespace(cfg=_cfg(tmp_path, attempts), run_id=RUN, peer_id="me", metrics=NodeMetrics(),
                          stop=threading.Event(), services=services, dht=None)
    waits: list[float] = []

    def wait(delay: float) -> bool:
        waits.append(delay)
        return ctx.stop.is_set()

    loader = StageDownloader(ctx, wait=wait)
    loader.waits = waits
    reads = [peers] if not peers or isinstance(peers[0], StageRecord) else list(peers)
    loader._peers = lambda stage: reads.pop(0) if len(reads) > 1 else reads[0]
    if services is None:
        results = list(outcomes)

        def one_round(store, prefer=None, peers=None):
            loader.errors[peers[0].peer_id] = f"peer {peers[0].peer_id}: {error}"
            return results.pop(0) if results else False

        loader.download_into = one_round
    return loader


def _store(tmp_path):
    return SimpleNamespace(stage=0, checkpoint_dir=tmp_path / "stage0", outer=None)


def test_the_back_off_doubles_up_to_its_cap():
    policy = RetryPolicy.from_config(SwarmConfig(download_attempts=9, download_backoff_s=5.0))
    assert [policy.delay_s(n) for n in range(1, 9)] == [5, 10, 20, 40, 80, 160, 300, 300]


def test_the_seeded_start_is_only_for_a_stage_nobody_serves(tmp_path, caplog):
    loader = _downloader(tmp_path, [])
    with caplog.at_level(logging.INFO):
        assert loader.load_from_swarm(_store(tmp_path)) is False
    assert loader.waits == [3.0]  # swarm.vacant_confirm_s: a second read before the seeded start
    assert "no peer serves stage 0: starting it from the seeded initialisation" in caplog.text


def test_a_read_that_missed_the_servers_is_confirmed_by_a_second_one(tmp_path, caplog):
    """The first read shows the stage vacant, the one vacant_confirm_s later finds its server: downloaded."""
    loader = _downloader(tmp_path, [[], [_record(PEERS[0])]], outcomes=[True])
    with caplog.at_level(logging.INFO):
        assert loader.load_from_swarm(_store(tmp_path)) is True
    assert loader.waits == [3.0] and "no peer serves stage 0" not in caplog.text
    stopped = _downloader(tmp_path, [])
    stopped.wait = lambda s: True  # the node stops during the wait: no seeded start either
    with pytest.raises(StageUnavailable, match="stopped while looking for the servers of stage 0"):
        stopped.load_from_swarm(_store(tmp_path))


def test_a_served_stage_is_retried_with_back_off_then_the_node_gives_up_naming_peers_and_errors(tmp_path, caplog):
    loader = _downloader(tmp_path, [_record(PEERS[0]), _record(PEERS[1], 5)])
    with caplog.at_level(logging.INFO), pytest.raises(StageUnavailable) as failed:
        loader.load_from_swarm(_store(tmp_path))
    assert loader.waits == [1.0, 2.0, 4.0]  # 4 attempts, 3 waits, doubling
    text = str(failed.value)
    assert "served by 2 peer(s)" in text and PEERS[0] in text and PEERS[1] in text and "[banned]" in text
    assert "in 4 attempt(s)" in text and "Not starting it from the seeded initialisation" in text
    assert "no peer serves" not in caplog.text and "seeded initialisation" not in caplog.text


def test_peers_without_this_nodes_handler_get_a_hint_about_swarm_keys(tmp_path):
    loader = _downloader(tmp_path, [_record(PEERS[0])], attempts=1,
                         error="protocols not supported: [protoswarm.state.v1]")
    with pytest.raises(StageUnavailable, match="a swarm key it lacks"):
        loader.load_from_swarm(_store(tmp_path))
    assert loader.waits == []


def test_a_retry_that_succeeds_loads_the_stage(tmp_path):
    loader = _downloader(tmp_path, [_record(PEERS[0])], outcomes=[False, False, True])
    assert loader.load_from_swarm(_store(tmp_path)) is True
    assert loader.waits == [1.0, 2.0]


def test_servers_seen_once_are_tried_again_when_a_dht_read_finds_none(tmp_path):
    """A DHT read that fails (or a record that expired meanwhile) must not turn into a seeded start."""
    loader = _downloader(tmp_path, [[_record(PEERS[0])], []], attempts=3)
    with pytest.raises(StageUnavailable, match="served by 1 peer"):
        loader.load_from_swarm(_store(tmp_path))
    assert loader.waits == [1.0, 2.0]


def test_servers_the_claim_saw_are_tried_when_the_downloads_first_read_finds_none(tmp_path, caplog):
    """The stage was chosen on one DHT read and is downloaded after another: a miss on the second (a
    record expired, a lookup that timed out) must not start a served stage from its seeded init."""
    claimed_on = [_record(PEERS[0]), _record("me"), StageRecord(peer_id=PEERS[1], run_id=RUN, stage=1, num_stages=1,
                                                                state="online", progress=3)]
    loader = _downloader(tmp_path, [], outcomes=[True])
    with caplog.at_level(logging.INFO):
        assert loader.load_from_swarm(_store(tmp_path), seen=claimed_on) is True
    assert "downloading its state from 1 peer(s)" in caplog.text and "seeded" not in caplog.text
    # ... and with nothing seen either (this node's own record aside), the stage is nobody's: the seeded start.
    assert _downloader(tmp_path, []).load_from_swarm(_store(tmp_path), seen=[_record("me")]) is False


def test_a_node_stopped_during_the_back_off_stops_downloading(tmp_path):
    loader = _downloader(tmp_path, [_record(PEERS[0])])
    loader.wait = lambda s: loader.ctx.stop.set() or True
    with pytest.raises(StageUnavailable, match="stopped while downloading stage 0"):
        loader.load_from_swarm(_store(tmp_path))


@pytest.fixture
def p2p_loop():
    """An event loop on a thread, as the node's P2P loop is."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()


def test_a_cut_download_resumes_into_the_stage_store_and_loads_the_donors_state(tmp_path, monkeypatch, p2p_loop):
    donor = StageStore.fresh(_cfg(tmp_path), RUN, 0, tmp_path / "donor")
    donor.progress = 42  # a trained stage, not the seeded init
    fake = FakeDonor(donor.snapshot(), cut_at=7)
    services = SimpleNamespace(loop=p2p_loop, p2p=FakeP2P(monkeypatch, {PEERS[0]: fake}), sync=None)
    loader = _downloader(tmp_path, [_record(PEERS[0], progress=42)], services=services)
    store = StageStore.fresh(loader.ctx.cfg, RUN, 0, tmp_path / "joiner")
    metrics, lines = loader.ctx.metrics, []
    update = metrics.download.update

    def watch(progress):  # what the status line shows meanwhile
        update(progress)
        lines.append(format_status({"state": "joining", "download": metrics.download.view()}))

    def heal(delay: float) -> bool:  # the back-off: the link comes back meanwhile
        loader.waits.append(delay)
        fake.cut_at = None
        return False

    metrics.download.update, loader.wait = watch, heal
    assert loader.load_from_swarm(store) is True
    assert loader.waits == [1.0]  # one failed attempt (the cut), then the resumed one
    assert fake.sent == list(range(len(fake.manifest.chunk_sha256)))  # every chunk sent once: 0-6 were kept
    assert store.progress == 42
    for name, want in donor.snapshot().tensors.items():
        assert (store.snapshot().tensors[name] == want).all(), name
    assert not (store.checkpoint_dir / DOWNLOAD_DIR).exists()  # the kept chunks are gone once loaded
    assert metrics.state_download_kept_bytes_total._value.get() == 7 * 1000
    assert metrics.state_download_bytes_total._value.get() == fake.manifest.total_bytes  # each byte once
    assert metrics.download.view() is None and metrics.state_download_size_bytes._value.get() == 0
    assert any((line.startswith("joining · state ") and "MB/s" not in line) or "/s" in line for line in lines)


def test_the_daemon_hands_the_read_a_stage_was_chosen_on_to_its_download(monkeypatch):
    """node/placement.py: the claim's records reach StageHost.open once (then are dropped), a move's own read is
    used for a move, and only the run's founder skips the confirming read of a vacant stage."""
    from node import placement

    opened = []

    def fake_open(ctx, stage, throughput, probe=None, seen=(), confirm_vacant=True):
        opened.append((stage, list(seen), confirm_vacant))
        return SimpleNamespace(stage=stage)

    monkeypatch.setattr(placement.StageHost, "open", staticmethod(fake_open))
    cfg = load_config("local/tiny", ["train.device='cpu'"])
    mover = StageRecord(peer_id=PEERS[1], run_id=RUN, stage=1, num_stages=4, state="online", progress=3)
    for create in (False, True):
        node = placement.StagePlacement(SimpleNamespace(cfg=cfg), SimpleNamespace(announce=lambda host, state, **kw: None),
                                        create=create, fail=print)
        node._claim_records = {0: [_record(PEERS[0])]}
        assert node.host_stage(0) and node._claim_records == {}
        assert node.host_stage(1, records={1: [mover]})
        assert opened[-2:] == [(0, [_record(PEERS[0])], not create), (1, [mover], not create)]


def test_a_rebalancing_node_moves_to_a_lighter_stage_it_can_take_past_ones_it_cannot(monkeypatch, caplog):
    """node/placement.py: the lightest stage does not fit this device and the next one's servers could not give
    it before: the move goes to the lightest stage left (before, a target it could not take kept it put)."""
    from node import placement

    cfg = load_config("local/tiny", ["train.device='cpu'"])
    me = "QmMe"

    def rec(peer, stage):
        return StageRecord(peer_id=peer, run_id=RUN, stage=stage, num_stages=4, state="online", throughput=1.0)

    records = {0: [rec(me, 0)] + [rec(f"Qm0{i}", 0) for i in range(6)], 1: [rec("Qm10", 1)],
               2: [rec("Qm20", 2)], 3: [rec("Qm30", 3), rec("Qm31", 3)]}
    moved, said = [], []
    announce = lambda host, state, stage=None, **kw: said.append((state, host.stage if stage is None else stage))  # noqa: E731
    node = placement.StagePlacement(SimpleNamespace(cfg=cfg, dht=SimpleNamespace(peer_id=me),
                                                    stop=threading.Event()),
                                    SimpleNamespace(announce=announce), create=False, fail=print)
    node.host = SimpleNamespace(stage=0, throughput=1.0, stop=lambda save: None, start=lambda: None)
    node.fit = [0, 2, 3]  # stage 1, the lightest with stage 2, does not fit
    node._undownloadable = {2: frozenset({"Qm20"})}  # stage 2 failed to download from the peer serving it now
    monkeypatch.setattr(node, "host_stage", lambda stage, fail=True, records=None: moved.append(stage) or True)
    monkeypatch.setattr(placement, "mover_of_round", lambda ids, round_index: me)  # this round's mover
    with caplog.at_level(logging.INFO, logger="node.placement"):
        node.rebalance(records)
    assert moved == [3]
    # It leaves its stage and is counted on the target before its download, so peers deciding meanwhile see it.
    assert said == [("offline", 0), ("joining", 3), ("online", 0)]
    assert "stage 2 would be better served, but its servers (the same peers) could not give it" in caplog.text
    node.last_move, moved[:] = 0.0, []
    node._undownloadable = {2: frozenset({"QmGone"})}  # other peers serve it now: it may be tried again
    node.rebalance(records)
    assert moved == [2]
    # A target whose download fails is said to be left, and the node serves its own stage again.
    node.last_move, said[:] = 0.0, []
    monkeypatch.setattr(node, "host_stage", lambda stage, fail=True, records=None: stage == 0)
    node.rebalance(records)
    assert said == [("offline", 0), ("joining", 2), ("offline", 2), ("online", 0)]


@pytest.mark.parametrize("behind_nat", [0, 2])
def test_of_a_stages_servers_that_see_the_same_move_exactly_one_moves_each_round(monkeypatch, behind_nat):
    """node/placement.py: stage 1 lost its server and both servers of stage 0 read it at once. Each round exactly
    one of them moves (the round's elected server), and each is elected in some round. (Each moving with
    probability 1/k, as before, both went in a quarter of the rounds and neither in another quarter.) Peers of
    the stage behind NAT are never elected: they cannot move, so a round they won would move nobody."""
    from node import placement

    cfg = load_config("local/tiny", ["train.device='cpu'", "pipeline.num_stages=2"])
    peers = ("QmA", "QmB")
    records = {0: [*(StageRecord(peer_id=p, run_id=RUN, stage=0, num_stages=2, state="online", throughput=1.0)
                     for p in peers),
                   *(StageRecord(peer_id=f"QmNat{i}", run_id=RUN, stage=0, num_stages=2, state="online",
                                 throughput=1.0, reachable="private") for i in range(behind_nat))]}
    nodes = []
    for peer in peers:
        node = placement.StagePlacement(SimpleNamespace(cfg=cfg, dht=SimpleNamespace(peer_id=peer), stop=threading.Event()),
                                        SimpleNamespace(announce=lambda host, state, **kw: None), create=False,
                                        fail=print)
        node.host = SimpleNamespace(stage=0, throughput=1.0, stop=lambda save: None, start=lambda: None)
        node.fit = [0, 1]
        nodes.append(node)
    movers_per_round = []
    for round_index in range(40):
        moved: list[str] = []
        movers_per_round.append(moved)
        for peer, node in zip(peers, nodes, strict=True):
            node.last_move = 0.0
            monkeypatch.setattr(node, "_round", lambda r=round_index: r)
            monkeypatch.setattr(node, "host_stage",
                                lambda stage, fail=True, records=None, p=peer, out=moved: out.append(p) or True)
            node.rebalance(records)
    assert all(len(m) == 1 and m[0] in peers for m in movers_per_round), movers_per_round
    assert {m[0] for m in movers_per_round} == set(peers)


def test_a_move_is_announced_on_its_target_without_the_old_stages_schedule_or_progress():
    """node/presence.py: the "joining" record a mover puts on its target before downloading carries its
    throughput (it counts for the stage's load and coverage) but not the schedule position, progress or
    validation loss of the stage it leaves, which would mislead the target's replicas; an "offline" record
    lives swarm.expiry_s, and only a stopping node's lingers."""
    from node.presence import SwarmPresence

    cfg = load_config("local/tiny", ["train.device='cpu'", "swarm.refresh_s=1", "swarm.expiry_s=8"])
    stored = []
    sync = SimpleNamespace(record_fields=lambda: {"outer_epoch": 5, "epoch_steps": 3, "outer_history": ["4:ab"]})
    ctx = SimpleNamespace(
        cfg=cfg, peer_id=PEERS[0], run_id=RUN,
        services=SimpleNamespace(sync=sync, reachable=lambda: "public"),
        dht=SimpleNamespace(visible_maddrs=lambda: ["/ip4/1.2.3.4/tcp/1"],
                            store_stage_record=lambda record, expiry: stored.append((record, expiry)) or True),
        metrics=SimpleNamespace(totals=lambda: {"tokens": 0}),
    )
    presence = SwarmPresence(ctx, SimpleNamespace(proof=lambda run, peer: ""), lambda: 2.5)
    host = SimpleNamespace(stage=0, throughput=1.5, store=SimpleNamespace(progress=40),
                           latest_val_loss=lambda: (100.0, 3.1))
    presence.announce(host, "joining", stage=1)
    presence.announce(host, "online")
    presence.announce(host, "offline")
    presence.announce(host, "offline", linger=True)
    (moving, e1), (here, _), (_, e3), (_, e4) = stored
    assert (moving.stage, moving.state, moving.throughput, moving.progress) == (1, "joining", 1.5, 0)
    assert (moving.outer_epoch, moving.epoch_steps, moving.outer_history, moving.val_loss) == (0, 0, [], 0.0)
    assert (here.stage, here.progress, here.outer_epoch, here.outer_history, here.val_loss) == (0, 40, 5, ["4:ab"], 3.1)
    assert (e1, e3, e4) == (8.0, 8.0, 60.0)
