"""State downloads over a home link between real `node start` processes (S = 1, replica sync off).

- A joiner on a 16 Mbit/s link downloading the donor's trained state is cut twice. First its link
  goes down (the namespace lab's link cut, then restored; root only): the attempt stalls out and the
  retry takes the verified chunks from disk. Then it is SIGKILLed and started again (same identity,
  same checkpoint directory): the restarted download takes the chunks it verified before from disk
  too, fetches only the others, and the node goes online with the donor's exact weights.
- A joiner whose every donor refuses it (the donor's allow-list leaves it out: its streams are
  closed unread) retries with back-off, then exits 2 with an error naming the donor and the reason.
  It never starts the stage from the seeded initialisation while a peer serves it.

Deadlines, never sleeps; every process is reaped by LocalSwarm.
"""

from __future__ import annotations

import urllib.request
from pathlib import Path

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from node.checkpoint import load_latest, stage_state
from swarm.sim.link import LinkSpec
from swarm.sim.netns import netns_unavailable
from swarm.sim.swarm import LocalSwarm, processes_mentioning

OVERRIDES = ["swarm.refresh_s=1", "swarm.expiry_s=6", "diloco.enabled=false", "train.steps=3", "train.batch_size=2",
             "train.seq_len=32", "train.log_every=1000", "train.checkpoint_every=0", "swarm.download_backoff_s=0.5"]
OUTSIDER = "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"  # a peer id no node here has


def _stage_dir(swarm: LocalSwarm, index: int) -> Path | None:
    found = list((swarm.nodes[index].home / "checkpoints" / "sim").glob("*-stage0"))
    return found[0] if len(found) == 1 else None


def _kept_chunks(swarm: LocalSwarm, index: int) -> int:
    stage = _stage_dir(swarm, index)
    chunks = stage / "download" / "all" if stage else None
    return sum(1 for p in chunks.iterdir() if not p.name.startswith(".")) if chunks and chunks.is_dir() else 0


def _counter(swarm: LocalSwarm, index: int, name: str) -> float:
    with urllib.request.urlopen(swarm.metrics_url(index), timeout=10) as reply:
        text = reply.read().decode()
    return next(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)


NETNS = netns_unavailable()  # the link-down phase needs the namespace lab (root); the crash phase does not


def _wait_chunks(swarm: LocalSwarm, joiner: int, at_least: int) -> None:
    swarm.wait_until(lambda: _kept_chunks(swarm, joiner) >= at_least, 120,
                     f"{at_least} verified chunk(s) on the joiner's disk", interval=0.2)


@pytest.mark.timeout(300)
def test_a_download_cut_by_a_link_down_and_by_a_crash_resumes_from_its_verified_chunks(tmp_path):
    """Cut twice: the home link goes down (the attempt stalls out; the retry, in the same process,
    takes the kept chunks from disk), then the joiner is SIGKILLed (the restarted node does the same)."""
    joiner_settings = {1: ["swarm.download_stall_s=4", "swarm.download_backoff_s=1"]}
    link = {"link": LinkSpec.parse("16mbit"), "link_mode": "netns"} if NETNS is None else {}
    if NETNS is not None:  # no lab: the link is emulated in-process, and only the crash is tested
        joiner_settings[1].append("swarm.link=16mbit")
    with LocalSwarm(1, "swarm/tiny", OVERRIDES, workdir=tmp_path, node_overrides=joiner_settings, **link) as swarm:
        swarm.start_all()
        swarm.wait_until(lambda: (h := swarm.health(0)) is not None and h["state"] == "online" and h["progress"] >= 3,
                         90, "the donor online, done training (its state no longer changes)")
        donor = swarm.health(0)
        joiner = swarm.add_node()
        swarm.start(joiner)
        _wait_chunks(swarm, joiner, 2)
        health = swarm.health(joiner)
        assert health["state"] == "joining" and health["download"]["total_bytes"] > 0, health
        total, log = health["download"]["total_bytes"], swarm.nodes[joiner].log
        if NETNS is None:
            swarm.partition(joiner)  # the home link goes down mid-download
            swarm.wait_until(lambda: "download attempt 1 of" in log.read_text(errors="replace"), 60,
                             "the stalled attempt given up", interval=0.2)
            kept = _kept_chunks(swarm, joiner)
            swarm.heal(joiner)
            _wait_chunks(swarm, joiner, kept + 1)  # the retry goes on from there...
            assert f"resuming the whole state download: {kept} chunk(s)" in log.read_text(errors="replace")
            # ...and every chunk crossed the link once: the kept ones came from disk the second time.
            fetched = _counter(swarm, joiner, "protoswarm_state_download_bytes_total")
            assert fetched == _kept_chunks(swarm, joiner) * (4 << 20), fetched

        swarm.kill(joiner)  # mid-download: no shutdown, possibly in the middle of a chunk write
        kept = _kept_chunks(swarm, joiner)
        assert kept >= 2 and kept * (4 << 20) < total, (kept, total)
        swarm.start(joiner)  # same identity and checkpoint directory
        swarm.wait_until(lambda: (h := swarm.health(joiner)) is not None and h["state"] == "online", 120,
                         "the restarted joiner online")
        assert swarm.health(joiner)["progress"] == donor["progress"]
        text = log.read_text(errors="replace")
        assert f"resuming the whole state download: {kept} chunk(s)" in text
        assert f"loaded stage 0 (step {donor['progress']}) from {donor['peer_id']}" in text
        fetched = _counter(swarm, joiner, "protoswarm_state_download_bytes_total")
        from_disk = _counter(swarm, joiner, "protoswarm_state_download_kept_bytes_total")
        assert from_disk == kept * (4 << 20) and fetched + from_disk == total  # no verified chunk fetched again
        assert not (_stage_dir(swarm, joiner) / "download").exists()  # removed once loaded
    # Both wrote a checkpoint at shutdown: the joiner holds the donor's trained weights, bit for bit.
    got, want = (stage_state(load_latest(_stage_dir(swarm, i)), 0)["model"] for i in (joiner, 0))
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert processes_mentioning(str(tmp_path)) == []


@pytest.mark.timeout(180)
def test_a_joiner_every_donor_refuses_exits_with_a_clear_error_instead_of_seeding(tmp_path):
    refused = {0: [f'swarm.allow_peers=["{OUTSIDER}"]'], 1: ["swarm.download_attempts=2"]}
    with LocalSwarm(2, "swarm/tiny", OVERRIDES, workdir=tmp_path, node_overrides=refused) as swarm:
        swarm.start_all()
        code = swarm.nodes[1].proc.wait(150)
        donor = swarm.health(0)
        log = swarm.nodes[1].log.read_text(errors="replace")
        assert code == 2, log[-3000:]
        assert f"error: stage 0 is served by 1 peer(s) ({donor['peer_id']}), but its state could not be downloaded" \
               in log, log[-3000:]
        assert "in 2 attempt(s) over " in log and f"peer {donor['peer_id']}, stage 0 state: " in log  # the reason
        assert "Not starting it from the seeded initialisation" in log
        assert "no peer serves stage" not in log and "serving stage 0" not in log  # never seeded, never online
        assert donor["state"] == "online"
    assert processes_mentioning(str(tmp_path)) == []
