"""Real localhost swarms: `node start` processes over the real hivemind DHT/P2P, read with `node status`.

Every wait is a poll with a deadline (LocalSwarm.wait_until); every process is reaped by the
LocalSwarm context manager, whose process groups are killed on exit even if a test fails.
"""

from __future__ import annotations

import json
import os
import re
import selectors
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import hivemind
import pytest
from hivemind.utils import get_dht_time
from prometheus_client.parser import text_string_to_metric_families

from protocol.messages import StageRecord, encode_message
from swarm.procs import p2pd_sockets
from swarm.records import SUBKEY_PREFIX, stage_key
from swarm.sim.swarm import LocalSwarm, SimError, processes_mentioning

# Fast record timing so expiry and rebalancing happen within a test.
FAST = ["swarm.refresh_s=1", "swarm.expiry_s=8", "swarm.rebalance_period_s=3"]
# These tests are about membership: keep the 2-stage pipeline's training traffic light on 2 cores, and no
# validation measurements (their forward passes land in the start-up window the 60 s deadline covers).
LIGHT = [*FAST, "dataplane.max_inflight=1", "dataplane.eval_every_s=0"]
REPO = Path(__file__).resolve().parents[2]


def _online(status: dict, n: int) -> bool:
    online = [p for p in status["peers"] if p["state"] == "ONLINE"]
    return len(online) == n and all(s["servers"] > 0 for s in status["stages"])


def _metrics(url: str) -> dict[str, list]:
    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def _kill_a_stage_and_see_it_refilled(swarm: LocalSwarm, status: dict) -> None:
    """Kill every server of the smaller stage (2 or 3 peers): the rest must refill it, and the killed
    peers vanish from `node status` once their records expire."""
    holder: dict = {}
    index_of = {swarm.health(i)["peer_id"]: i for i in range(6)}
    counts = {s: [p["peer_id"] for p in status["peers"] if p["stage"] == s] for s in (0, 1)}
    victim_stage = min(counts, key=lambda s: len(counts[s]))
    victims = counts[victim_stage]
    assert 2 <= len(victims) <= 3
    for peer in victims:
        swarm.kill(index_of[peer])

    def refilled() -> bool:
        holder["status"] = swarm.status()
        return any(p["stage"] == victim_stage and p["state"] == "ONLINE" and p["peer_id"] not in victims
                   for p in holder["status"]["peers"])

    swarm.wait_until(refilled, 120, f"stage {victim_stage} served again after killing {len(victims)} peers")

    def victims_gone() -> bool:
        holder["status"] = swarm.status()
        return not any(p["peer_id"] in victims for p in holder["status"]["peers"])

    swarm.wait_until(victims_gone, 60, "killed peers dropped from status after their records expire")
    assert all(s["servers"] > 0 for s in holder["status"]["stages"])


def _assert_foreign_records_refused(swarm: LocalSwarm, survivor: int) -> None:
    """A foreign peer writes junk under the run's stage key: ignored by readers and counted."""
    foreign = hivemind.DHT(start=True, initial_peers=swarm.join_addresses()[:1],
                           host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    try:
        exp = get_dht_time() + 60
        junk = encode_message(StageRecord(peer_id="QmFake", run_id="sim", stage=0, num_stages=2,
                                          state="online", throughput=1e9))
        foreign.store(stage_key("sim", 0), subkey=SUBKEY_PREFIX + b"QmFake", value=junk, expiration_time=exp)
        foreign.store(stage_key("sim", 0), subkey=b"junk", value=b"\x00garbage", expiration_time=exp)

        def counted() -> bool:
            samples = _metrics(swarm.metrics_url(survivor))["protoswarm_records_rejected"]
            return sum(s.value for s in samples if s.name.endswith("_total")) > 0

        swarm.wait_until(counted, 60, "a node counts the foreign records it rejected")
        assert "QmFake" not in {p["peer_id"] for p in swarm.status()["peers"]}
    finally:
        foreign.shutdown()


def _assert_documented_families(url: str) -> None:
    """/metrics on a running node: the documented families, with values that match the swarm."""
    families = _metrics(url)
    for name in ("protoswarm_peers_known", "protoswarm_stage", "protoswarm_state", "protoswarm_bootstrap_state",
                 "protoswarm_dht_seconds", "protoswarm_dht_failures", "protoswarm_records_rejected",
                 "protoswarm_uptime_seconds", "protoswarm_process_resident_memory_bytes"):
        assert name in families, name
    online_flag = {s.labels["state"]: s.value for s in families["protoswarm_state"]}
    assert online_flag["online"] == 1.0


@pytest.mark.timeout(600)
def test_six_nodes_two_stages_recover_a_lost_stage(tmp_path):
    """1+5 nodes, S = 2: all ONLINE with both stages served within 60 s (a joiner confirms a vacant stage
    with a second DHT read before seeding it, the founder does not); once balanced, SIGKILL every
    server of one stage and it is served again within 120 s; the killed peers vanish once their records expire;
    foreign junk under the run's keys is refused and counted; SIGTERM → OFFLINE at once, exit 0, no
    process left; /metrics carries the documented families; restarted at once, it is ONLINE again (its record
    outlasts the OFFLINE one it left)."""
    with LocalSwarm(6, "swarm/tiny-2stage", LIGHT, workdir=tmp_path) as swarm:
        start = time.monotonic()
        swarm.start_all()
        holder: dict = {}

        def all_online() -> bool:
            holder["status"] = swarm.status()
            return _online(holder["status"], 6)

        try:
            swarm.wait_until(all_online, 60 - (time.monotonic() - start), "6 peers ONLINE, both stages served")
        except SimError as exc:  # say where each peer was, so that a slow start can be told from a stuck one
            last = holder.get("status") or {"peers": [], "stages": []}
            raise SimError(f"{exc}; last seen: peers {[(p['state'], p['stage']) for p in last['peers']]}, "
                           f"servers per stage {[s['servers'] for s in last['stages']]}") from exc
        status = holder["status"]
        assert status["num_stages"] == 2 and status["run_id"] == "sim"
        # The founder starts its stage at once; a joiner that finds a stage vacant reads the DHT once more
        # (swarm.vacant_confirm_s) before it starts that stage from the seeded initialisation.
        logs = [swarm.nodes[i].log.read_text(errors="replace") for i in range(6)]
        assert "no peer serves stage" in logs[0] and "reading the DHT again" not in logs[0]
        seeded = [log for log in logs[1:] if "no peer serves stage" in log]
        assert seeded and all(0 <= log.find("reading the DHT again") < log.index("no peer serves stage")
                              for log in seeded), seeded[:1]

        # Joiners that arrive together all pick the emptiest stage; rebalancing then evens it out.
        def balanced() -> bool:
            holder["status"] = swarm.status()
            servers = [s["servers"] for s in holder["status"]["stages"]]
            return _online(holder["status"], 6) and min(servers) >= 2

        swarm.wait_until(balanced, 90, "rebalancing leaves at least 2 servers on each stage")
        _kill_a_stage_and_see_it_refilled(swarm, holder["status"])
        survivor = next(i for i in range(6) if swarm.nodes[i].alive)
        _assert_foreign_records_refused(swarm, survivor)
        _assert_documented_families(swarm.metrics_url(survivor))

        # SIGTERM: OFFLINE at once, exit 0, nothing left behind.
        node = swarm.nodes[survivor]
        peer = swarm.health(survivor)["peer_id"]
        assert swarm.term(survivor) == 0
        assert processes_mentioning(str(node.home)) == []
        after = {p["peer_id"]: p["state"] for p in swarm.status()["peers"]}
        assert after.get(peer) == "OFFLINE"

        # Restarted while its OFFLINE record (which outlives the refreshed ones) is still in the DHT: the DHT
        # keeps what expires last per peer, so the node must outlast it to be seen, not wait for it to expire.
        swarm.start(survivor)
        swarm.wait_until(lambda: (swarm.health(survivor) or {}).get("state") == "online", 120, "the restart online")
        back = {p["peer_id"]: (p["state"], p["stage"]) for p in swarm.status()["peers"]}  # its own stage, as a rule
        failed = _metrics(swarm.metrics_url(survivor))["protoswarm_dht_failures"]
        assert back.get(peer, ("", -1))[0] == "ONLINE", back
        assert not [s for s in failed if s.name.endswith("_total") and s.labels.get("op") == "store" and s.value], failed


def _start_cli(args: list[str], home: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "node.cli", "start", "--identity", str(home / "id.key"), "--metrics-port", "0",
         "--metrics-host", "127.0.0.1", "--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--threads", "1", *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, start_new_session=True,
    )


def _read_until(proc: subprocess.Popen, pattern: str, timeout: float) -> tuple[str, re.Match]:
    """Read the process's output line by line until ``pattern`` matches, within ``timeout`` seconds."""
    seen = []
    deadline = time.monotonic() + timeout
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    while time.monotonic() < deadline:
        if not sel.select(timeout=max(0.0, deadline - time.monotonic())):
            break
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        match = re.search(pattern, line)
        if match:
            return "".join(seen), match
    raise AssertionError(f"no {pattern!r} within {timeout} s; output:\n{''.join(seen)[-3000:]}")


def test_join_to_an_unreachable_address_keeps_retrying_and_says_so(tmp_path):
    unreachable = "/ip4/127.0.0.1/tcp/1/p2p/QmVrbSqaKXxwgVz6bKzQiEbqFxN5p6fUZR9LqxR7VYs1Ex"
    sockets_before = p2pd_sockets()
    proc = _start_cli(["--join", unreachable, "--set", "swarm.bootstrap_retry_max_s=1"], tmp_path)
    try:
        _, port = _read_until(proc, r"metrics: http://[^:]+:(\d+)/", 60)
        _read_until(proc, r"cannot reach the swarm yet", 60)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with urllib.request.urlopen(f"http://127.0.0.1:{port.group(1)}/health", timeout=5) as r:
                health = json.load(r)
            if health["bootstrap_attempts"] >= 3:
                break
            time.sleep(0.2)
        assert health["bootstrap_attempts"] >= 3 and health["state"] == "joining"
        assert health["bootstrap_state"] in ("retrying", "bootstrapping") and health["last_error"]
        proc.terminate()
        assert proc.wait(60) == 0
        assert p2pd_sockets() - sockets_before == set()  # failed attempts leave no socket files behind
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait(10)


def test_a_second_daemon_with_the_same_identity_is_refused(tmp_path):
    """Also: `node status` with no --join finds the local node through its /health endpoint."""
    first = _start_cli(["--set", f"train.checkpoint_dir='{tmp_path / 'ckpt'}'"], tmp_path)
    try:
        _, port = _read_until(first, r"metrics: http://[^:]+:(\d+)/", 60)
        second = _start_cli([], tmp_path)
        out, _ = second.communicate(timeout=60)
        assert second.returncode == 2
        assert "already used by a running daemon" in out and "--identity" in out

        _read_until(first, r"to join this swarm", 60)
        status = subprocess.run(
            [sys.executable, "-m", "node.cli", "--log-level", "WARNING", "status",
             "--health-url", f"http://127.0.0.1:{port.group(1)}/health"],
            capture_output=True, text=True, timeout=120, cwd=REPO,
        )
        assert status.returncode == 0, status.stderr[-2000:]
        assert "1 stage(s)" in status.stdout and " ONLINE " in status.stdout
    finally:
        first.terminate()
        if first.wait(60) != 0:
            pytest.fail("the first daemon did not exit cleanly")


def test_node_sim_cli_replays_a_fault_script(tmp_path):
    """`node sim`: two nodes of one stage, one killed and restarted; the JSON summary is the last line."""
    out = subprocess.run(
        [sys.executable, "-m", "node.cli", "--log-level", "WARNING", "sim", "--nodes", "2", "--duration", "25",
         "--set", "swarm.refresh_s=1", "--set", "swarm.expiry_s=4", "--faults", "8:kill:1,12:start:1",
         "--workdir", str(tmp_path), "--json"],
        capture_output=True, text=True, timeout=240, cwd=REPO,
    )
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["ok"] and summary["nodes"] == 2
    assert [(e["action"], e["node"]) for e in summary["events"]] == [("kill", 1), ("start", 1)]
    assert summary["stages"][0]["servers"] >= 1
    # One stage: replicas train the whole model; the swarm's tokens/s counts their local steps.
    assert summary["tokens"] > 0 and summary["tokens_per_s"] > 0 and summary["devices"] == ["cpu"]
    assert processes_mentioning(str(tmp_path)) == []


@pytest.mark.timeout(420)
def test_a_joiner_whose_stage_cannot_be_downloaded_claims_another(tmp_path):
    """A peer announces itself ONLINE on the stage the founder left empty, at a tiny throughput (so a joiner
    claims that stage), but serves no state. The joiner's download fails; instead of exiting it claims the
    other stage, downloads it from the founder and goes ONLINE there, saying why in its log; its rebalancing
    then never moves it to the liar's stage while the liar alone serves it."""
    import dataclasses
    import threading

    from swarm.dht import SwarmDHT

    with LocalSwarm(2, "swarm/tiny-2stage", [*LIGHT, "swarm.download_attempts=1"], workdir=tmp_path) as swarm:
        swarm.start_founder()
        swarm.wait_until(lambda: (swarm.health(0) or {}).get("state") == "online", 120, "the founder ONLINE")
        founder_stage = swarm.health(0)["stage"]
        empty = 1 - founder_stage
        liar = SwarmDHT(initial_peers=swarm.join_addresses()[:1], host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                        identity_path=str(tmp_path / "liar.key"))
        liar.run_in_background()
        stop = threading.Event()
        try:
            assert liar.wait_online(60), liar.last_error
            record = StageRecord(peer_id=liar.peer_id, run_id="sim", stage=empty, num_stages=2, state="online",
                                 throughput=1e-6, timestamp=time.time())
            assert liar.store_stage_record(record, 8.0)

            def keep_announcing() -> None:  # as a live peer would (records expire after swarm.expiry_s = 8 s)
                while not stop.wait(2.0):
                    try:
                        liar.store_stage_record(dataclasses.replace(record, timestamp=time.time()), 8.0)
                    except Exception:
                        pass

            threading.Thread(target=keep_announcing, daemon=True).start()
            swarm.wait_until(lambda: any(p["peer_id"] == liar.peer_id for p in swarm.status()["peers"]), 60,
                             "the liar's record visible in the swarm")
            swarm.start(1)

            def joined() -> bool:
                assert swarm.nodes[1].alive, swarm.nodes[1].log.read_text(errors="replace")[-3000:]
                h = swarm.health(1) or {}
                return h.get("state") == "online" and h.get("stage") == founder_stage

            swarm.wait_until(joined, 180, f"the joiner ONLINE on stage {founder_stage}")
            log = swarm.nodes[1].log.read_text(errors="replace")
            assert f"servers [1, 1]: claiming stage {empty}" in log, log[-3000:]  # it took the liar's stage first
            assert (f"stage {empty} is served but its state could not be downloaded from its servers; claiming "
                    f"stage {founder_stage} instead") in log, log[-3000:]
            # Rebalancing would send it to the liar's stage (its load is tiny): it is not tried again while the
            # same peers serve it (each try stops training for a checkpoint and a failed download).
            told = f"stage {empty} would be better served, but its servers (the same peers) could not give it"
            swarm.wait_until(lambda: told in swarm.nodes[1].log.read_text(errors="replace"), 90,
                             "the joiner's rebalancing passing over the liar's stage")
            assert "moving from stage" not in swarm.nodes[1].log.read_text(errors="replace")
        finally:
            stop.set()
            liar.shutdown()
