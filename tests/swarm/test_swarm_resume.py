"""A node SIGKILLed in a real 2-replica swarm (S = 1, Streaming DiLoCo) resumes from its own checkpoint.

Node 1 writes periodic checkpoints, is SIGKILLed (no OFFLINE record, no shutdown checkpoint), and is
started again with the same identity and checkpoint directory. Its /health must say it resumed from
the newest complete checkpoint it wrote, its progress must continue from there (not from 0), and its
outer state must rejoin the swarm's: it commits rounds with node 0 again (after taking the stage's
consensus state if node 0 applied rounds while it was down). Deadlines, never sleeps; every process
is reaped by LocalSwarm.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from node.checkpoint import list_checkpoints, load_latest
from swarm.sim.swarm import LocalSwarm, processes_mentioning

OVERRIDES = ["swarm.refresh_s=1", "swarm.expiry_s=6", "train.checkpoint_every=20", "train.batch_size=2",
             "train.seq_len=32", "train.log_every=1000"]


def _checkpoints(home: Path) -> list[tuple[int, Path]]:
    dirs = list((home / "checkpoints" / "sim").glob("*-stage0"))
    return list_checkpoints(dirs[0]) if len(dirs) == 1 else []


@pytest.mark.timeout(240)
def test_a_killed_replica_resumes_from_its_checkpoint_and_rejoins_the_outer_rounds(tmp_path):
    started = time.monotonic()
    with LocalSwarm(2, "swarm/diloco-local", OVERRIDES, workdir=tmp_path) as swarm:
        swarm.start_all()
        home = swarm.nodes[1].home
        swarm.wait_until(lambda: (h := swarm.health(1)) is not None and h["state"] == "online"
                         and h["resumed_from"] is None and len(_checkpoints(home)) > 0, 120,
                         "node 1 online and one periodic checkpoint written")
        before = swarm.health(1)["progress"]
        swarm.kill(1)  # SIGKILL to its process group: possibly in the middle of a checkpoint write

        found = _checkpoints(home)
        newest = found[-1][0]
        assert 20 <= newest <= before + 20, (found, before)
        assert load_latest(found[-1][1].parent)["step"] == newest  # complete, whatever the kill interrupted

        swarm.start(1)  # same identity, same checkpoint directory
        swarm.wait_until(lambda: (h := swarm.health(1)) is not None and h["state"] == "online", 120,
                         "node 1 online again")
        health = swarm.health(1)
        assert health["resumed_from"] == newest, health  # the newest complete checkpoint, not a download
        assert health["progress"] >= newest, health  # continues from there (or from the stage, if ahead)
        log = swarm.nodes[1].log.read_text(errors="replace")
        assert f"resumed from checkpoint step {newest} " in log

        # Training goes on, and the outer state is the swarm's: rounds commit with both replicas again.
        swarm.wait_until(lambda: (h := swarm.health(1)) is not None and h["progress"] >= health["progress"] + 10
                         and h["outer"]["rounds_committed"] >= 1 and h["outer"]["group_size"] == 2, 90,
                         "node 1 commits an outer round with node 0 after resuming")
        after = swarm.health(1)
        behind = "is behind the stage" in swarm.nodes[1].log.read_text(errors="replace")
        assert after["outer"]["resyncs"] >= int(behind), after["outer"]  # a resync at resume counts as one
        zero = swarm.health(0)
        assert abs(zero["outer"]["epoch"] - after["outer"]["epoch"]) <= 1, (zero["outer"], after["outer"])
    assert processes_mentioning(str(tmp_path)) == []
    assert time.monotonic() - started < 200
