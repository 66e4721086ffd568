"""A served stage's checkpoints (node/serving.py): contents, periodic background writes, resume, catching up."""

from __future__ import annotations

import asyncio

import pytest
import torch

from node.checkpoint import list_checkpoints
from node.config import load_config
from node.metrics import NodeMetrics
from node.replica_sync import ReplicaSync, rounds_behind
from node.stage_store import StageStore
from protocol.messages import StageRecord

MODEL = {"name": "t", "vocab_size": 256, "d_model": 32, "n_layers": 3, "n_heads": 2, "ffn_hidden": 64,
         "max_seq_len": 32, "subspace_rank": 4}


def config(tmp_path, stages=1, **train):
    return load_config(None, model=MODEL, pipeline={"num_stages": stages},
                       train={"seq_len": 16, "checkpoint_dir": str(tmp_path), "checkpoint_every": 3, **train},
                       diloco={"inner_steps": 30, "fragments": 3})


def record(peer, history, state="online"):
    return StageRecord(peer_id=peer, run_id="r", stage=0, num_stages=1, state=state, outer_history=list(history))


def step(work: StageStore, seed: int) -> None:
    """One inner optimizer step with made-up gradients, as training takes it."""
    gen = torch.Generator().manual_seed(seed)
    with work.lock:
        for p in work.module.parameters():
            p.grad = torch.randn(p.shape, generator=gen)
        work.optimizer.step()
        work.optimizer.zero_grad(set_to_none=True)
        work.progress += 1


def train_a_little(work: StageStore) -> None:
    for i in range(4):
        step(work, i)
    work.outer.begin(1, 0)
    work.outer.apply(1, torch.full((work.outer.layouts[1].numel,), 1e-3))


def saved_and_reopened(cfg, tmp_path, schedule: dict[str, int]) -> tuple[StageStore, StageStore]:
    """A stage trained a little and checkpointed at schedule position ``schedule``, and a fresh
    StageStore on the same checkpoint directory (not resumed yet)."""
    a = StageStore.fresh(cfg, "r", 0, tmp_path / "a")
    train_a_little(a)
    a.schedule_state = lambda: dict(schedule)
    a.save_checkpoint()
    return a, StageStore.fresh(cfg, "r", 0, tmp_path / "a")


def test_a_checkpoint_holds_weights_optimizers_outer_state_and_positions_and_resume_restores_them(tmp_path):
    cfg = config(tmp_path)
    a, b = saved_and_reopened(cfg, tmp_path, {"outer_epoch": 5, "epoch_steps": 3})
    assert b.resume() and b.resumed_from == b.progress == b.saved_step == 4
    assert all(torch.equal(x, y) for x, y in zip(a.module.state_dict().values(), b.module.state_dict().values(),
                                                 strict=True))
    sa, sb = a.optimizer.state_dict()["state"], b.optimizer.state_dict()["state"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k]["exp_avg_sq"], sb[k]["exp_avg_sq"]) for k in sa)
    assert b.outer.history() == a.outer.history() and b.outer.rounds_applied == [0, 1, 0]
    assert all(torch.equal(x, y) for x, y in zip(a.outer.momentum, b.outer.momentum, strict=True))
    assert b.resumed_schedule == {"outer_epoch": 5, "epoch_steps": 3}

    # ReplicaSync continues the schedule where the checkpoint stood, once, and saves its own position.
    loop = asyncio.new_event_loop()
    try:
        sync = ReplicaSync(cfg, NodeMetrics(), loop, None, "P5", "r")
        sync.attach(b)
        assert (sync.epoch, sync.epoch_steps) == (5, 3) and b.resumed_schedule is None
        assert b.checkpoint_state()["schedule"] == {"outer_epoch": 5, "epoch_steps": 3}
        sync.attach(StageStore.fresh(cfg, "r", 0, tmp_path / "other"))  # a stage change: b's position is no longer kept
        assert b.checkpoint_state()["schedule"] is None
    finally:
        loop.close()


def test_periodic_checkpoints_stream_the_live_state_in_the_background_and_stay_consistent(tmp_path):
    """No copy of the state is made: the writer holds the engine's lock while it writes the live tensors, so
    a checkpoint holds exactly the weights and optimizer state of the step it is named after, however
    training went on meanwhile (its steps take the same lock)."""
    cfg = config(tmp_path)  # checkpoint_every = 3
    work = StageStore.fresh(cfg, "r", 0, tmp_path / "w")
    first = lambda: next(work.module.parameters())  # noqa: E731
    weights_at = {0: first().detach().clone()}
    started = []
    for i in range(7):
        step(work, i)
        weights_at[work.progress] = first().detach().clone()
        started.append(work.maybe_checkpoint())
        if started[-1]:
            step(work, 100 + i)  # training goes on at once, racing the writer for the lock
            weights_at[work.progress] = first().detach().clone()
            assert work.wait_for_checkpoint(30)
            path = list_checkpoints(work.checkpoint_dir)[-1][1]
            saved = torch.load(path, weights_only=True)
            stage = saved["stages"][0]
            assert saved["step"] == stage["progress"] == work.saved_step and path.name.endswith(f"{saved['step']:08d}.pt")
            assert torch.equal(next(iter(stage["model"].values())), weights_at[saved["step"]])
            assert len(stage["optimizer"]["state"]) > 0
    assert started == [False, False, True, False, True, False, True]
    # While training holds the lock the write cannot take the state (it would be half an update).
    with work.lock:
        work.progress = 12
        assert work.maybe_checkpoint() and not work.wait_for_checkpoint(0.2)
    assert work.wait_for_checkpoint(30) and work.saved_step == 12


def test_a_busy_writer_delays_the_next_periodic_checkpoint_to_the_next_step(tmp_path):
    import threading

    work = StageStore.fresh(config(tmp_path), "r", 0, tmp_path / "w")
    gate = threading.Event()
    work._writer = threading.Thread(target=gate.wait)  # a write still in progress
    work._writer.start()
    work.progress = 3
    assert not work.maybe_checkpoint()
    gate.set()
    work.wait_for_checkpoint(5)
    work.progress = 4
    assert work.maybe_checkpoint() and work.wait_for_checkpoint(30)
    assert [s for s, _ in list_checkpoints(work.checkpoint_dir)] == [4]


def test_resume_falls_back_to_the_previous_checkpoint_and_honours_train_resume(tmp_path):
    cfg = config(tmp_path)
    a = StageStore.fresh(cfg, "r", 0, tmp_path / "a")
    step(a, 0)
    a.save_checkpoint()
    step(a, 1)
    newest = a.save_checkpoint()
    newest.write_bytes(newest.read_bytes()[:500])  # damaged on disk
    b = StageStore.fresh(cfg, "r", 0, tmp_path / "a")
    assert b.resume() and b.resumed_from == 1
    off = StageStore.fresh(config(tmp_path, resume=False), "r", 0, tmp_path / "a")
    assert not off.resume() and off.progress == 0 and off.resumed_from is None


def set_aside_folders(directory) -> list:
    return sorted(p for p in directory.iterdir() if p.is_dir() and p.name.startswith("set-aside-"))


@pytest.mark.parametrize("other", ["model", "run", "stage", "resume off", "unreadable"])
def test_checkpoints_a_node_does_not_resume_are_set_aside_not_pruned_by_its_fresh_saves(tmp_path, caplog, other):
    a = StageStore.fresh(config(tmp_path), "r", 0, tmp_path / "a")
    train_a_little(a)
    saved = a.save_checkpoint()
    if other == "unreadable":
        saved.write_bytes(saved.read_bytes()[:500])
    cfg = config(tmp_path, resume=other != "resume off", checkpoint_keep=1)
    if other == "model":
        cfg = load_config(None, model={**MODEL, "d_model": 48}, pipeline={"num_stages": 1},
                          train={"seq_len": 16, "checkpoint_dir": str(tmp_path), "checkpoint_keep": 1},
                          diloco={"inner_steps": 30, "fragments": 3})
    b = StageStore.fresh(cfg, "other" if other == "run" else "r", 0, tmp_path / "a")
    if other == "stage":  # the checkpoint of stage 0, found where stage 1 of the same run looks
        b = StageStore.fresh(config(tmp_path, stages=2, checkpoint_keep=1), "r", 1, tmp_path / "a")
    assert not b.resume() and b.progress == 0
    [folder] = set_aside_folders(tmp_path / "a")
    assert [p.name for p in folder.iterdir()] == [saved.name] and "set-aside-" in caplog.text
    for _ in range(2):  # the fresh start's own saves (keep 1) leave the set-aside checkpoint alone
        step(b, 0)
        b.save_checkpoint()
    assert [s for s, _ in list_checkpoints(tmp_path / "a")] == [2] and (folder / saved.name).exists()


def test_a_pipeline_stage_saves_and_restores_its_data_position(tmp_path):
    cfg = config(tmp_path, stages=2)
    a = StageStore.fresh(cfg, "r", 0, tmp_path / "s0")
    a.progress, a.data_position = 5, 23  # stage 0 drew 23 microbatches (some still in flight)
    a.save_checkpoint()
    b = StageStore.fresh(cfg, "r", 0, tmp_path / "s0")
    assert b.resume() and (b.progress, b.data_position) == (5, 23)
    fresh = StageStore.fresh(cfg, "r", 0, tmp_path / "fresh")
    fresh.progress = 4
    assert fresh.checkpoint_state()["data_position"] == 4 * cfg.train.grad_accum  # nothing drawn yet: the progress
    later = StageStore.fresh(cfg, "r", 1, tmp_path / "s1")  # a later stage draws no data
    later.progress = 5
    assert later.checkpoint_state()["data_position"] is None


def test_rounds_behind_compares_the_last_round_of_every_fragment():
    mine = ["3:aa", "2:bb", "-1:00"]
    assert rounds_behind(mine, []) is None
    assert rounds_behind(mine, [record("P1", ["3:cc", "2:dd", "-1:00"])]) is None  # same rounds: drift, not lag
    assert rounds_behind(mine, [record("P1", ["2:aa", "2:bb", "-1:00"])]) is None  # a peer behind us
    assert rounds_behind(mine, [record("P1", ["3", "x:y"])]) is None  # another fragment count: not comparable
    found = rounds_behind(mine, [record("P1", ["3:aa", "2:bb", "-1:00"]), record("P2", ["3:aa", "3:ee", "-1:00"])])
    assert found is not None and found.startswith("P2 applied rounds [3, 3, -1]")


@pytest.mark.parametrize("ahead", [True, False])
def test_a_resumed_replica_compares_itself_with_the_stage_at_its_first_view(tmp_path, ahead):
    cfg = config(tmp_path)
    _, b = saved_and_reopened(cfg, tmp_path, {"outer_epoch": 4, "epoch_steps": 1})
    assert b.resume()
    loop = asyncio.new_event_loop()
    try:
        sync = ReplicaSync(cfg, NodeMetrics(), loop, None, "P5", "r")
        sync.attach(b)
        mine = b.outer.history()
        theirs = [mine[0], "1:" + "ab" * 8, mine[2]] if ahead else mine
        sync.observe({0: [record("P1", theirs)]})
        assert sync.resync_requested is ahead
        sync.resync_requested = False
        sync.observe({0: [record("P1", [mine[0], "1:" + "ab" * 8, mine[2]])]})  # only the first view is checked
        assert not sync.resync_requested
    finally:
        loop.close()
