"""Swarm access (swarm/access.py, docs/security.md): the swarm key's record proofs and keyed handler
names, the allow-list, and a real localhost swarm where a peer without the key cannot load a stage (it
stops rather than serve seeded weights) or count as a server, and forged records are ignored."""

from __future__ import annotations

import asyncio
import urllib.request

import pytest
from hivemind.p2p import P2P
from p2p_util import run_p2p
from prometheus_client.parser import text_string_to_metric_families

from node.config import ConfigError, load_config
from protocol.framing import read_frame, write_frame
from protocol.messages import ErrorReply, RunRecord, StageRecord, decode_message, encode_message
from swarm.access import AccessError, GatedP2P, SwarmAccess, load_key
from swarm.dht import SwarmDHT
from swarm.sim.swarm import LocalSwarm, processes_mentioning

KEY = b"0123456789abcdef-the-swarm-secret"
PEER_A = "QmRf24vKpZ8C8aZ4b2sYVk3DdDDf5bvp7VdQYxGfUkXgxA"
PEER_B = "QmVrbSqaKXxwgVz6bKzQiEbqFxN5p6fUZR9LqxR7VYs1Ex"


def test_a_record_proof_holds_for_its_own_run_and_peer_only():
    keyed = SwarmAccess(KEY)
    proof = keyed.proof("run1", PEER_A)
    assert len(proof) == 64 and keyed.admits_record("run1", PEER_A, proof)
    assert not keyed.admits_record("run1", PEER_A, "")  # no proof
    assert not keyed.admits_record("run1", PEER_B, proof)  # lifted onto another peer id
    assert not keyed.admits_record("run2", PEER_A, proof)  # another run
    assert not keyed.admits_record("run1", PEER_A, SwarmAccess(KEY + b"x").proof("run1", PEER_A))  # another key
    assert SwarmAccess().admits_record("run1", PEER_A, "") and SwarmAccess().proof("run1", PEER_A) == ""
    # Records carry the proof through encoding.
    record = StageRecord(peer_id=PEER_A, run_id="run1", stage=0, num_stages=1, state="online", access=proof)
    assert decode_message(encode_message(record)).access == proof
    with pytest.raises(ValueError, match="access"):
        encode_message(RunRecord(run_id="r", creator=PEER_A, created=0.0, publisher=PEER_A, config=b"", access="xyz"))


def test_the_allow_list_admits_only_listed_peers_and_the_node_itself():
    access = SwarmAccess(allow=[PEER_A], self_id=PEER_B)
    assert access.admits_peer(PEER_A) and access.admits_peer(PEER_B)
    assert not access.admits_peer("QmSomeoneElse1111111111111111111111111111111")
    assert not access.admits_record("run1", "QmSomeoneElse1111111111111111111111111111111", "")
    assert access.protocol("protoswarm.pipeline.v1") == "protoswarm.pipeline.v1"  # no key: plain names
    assert SwarmAccess(KEY).protocol("protoswarm.pipeline.v1").startswith("protoswarm.pipeline.v1.k")
    assert SwarmAccess(KEY).protocol("x") != SwarmAccess(KEY + b"x").protocol("x")


def test_key_files_and_allow_lists_are_checked(tmp_path):
    with pytest.raises(AccessError, match=r"[Nn]o such file"):
        load_key(tmp_path / "missing.key")
    short = tmp_path / "short.key"
    short.write_bytes(b"tooshort\n")
    with pytest.raises(AccessError, match="at least 16"):
        load_key(short)
    good = tmp_path / "swarm.key"
    good.write_bytes(KEY + b"\n")
    assert load_key(good) == KEY  # the trailing newline is not part of the key
    with pytest.raises(ConfigError, match="allow_peers"):
        load_config("swarm/tiny", ['swarm.allow_peers=["not a peer id"]'])
    cfg = load_config("swarm/tiny", [f'swarm.access_key_file="{good}"', f'swarm.allow_peers=["{PEER_A}"]'])
    access = SwarmAccess.from_config(cfg.swarm)
    assert access.key == KEY and access.allow == {PEER_A} and access.describe() == "swarm key + 1 allowed peer(s)"


def test_keyed_handlers_are_unreachable_without_the_key_and_the_allow_list_closes_streams():
    """Over real P2P: a keyed handler answers callers holding the key only; an allow-list closes
    streams from anyone else before the handler runs, and refuses to dial them."""

    async def body(server_p2p, member_p2p, outsider_p2p):
        served, denied = [], []

        async def echo(info, reader, writer):
            served.append(str(info.peer_id))
            msg = await read_frame(reader)
            await write_frame(writer, msg)
            writer.close()

        server = GatedP2P(server_p2p, SwarmAccess(KEY, allow=[member_p2p.peer_id.to_base58()]),
                          on_denied=denied.append)
        await server.add_binary_stream_handler("protoswarm.test.v1", echo)
        ping = encode_message(ErrorReply(code="protocol", message="ping"))

        member = GatedP2P(member_p2p, SwarmAccess(KEY))
        _, reader, writer = await member.call_binary_stream_handler(server_p2p.peer_id, "protoswarm.test.v1")
        await write_frame(writer, ping)
        assert decode_message(await read_frame(reader)).message == "ping"
        writer.close()

        # Without the key (plain name) or with another key (another tag): libp2p has no such protocol.
        for access in (SwarmAccess(), SwarmAccess(KEY + b"other")):
            with pytest.raises(Exception):  # noqa: B017 (hivemind raises its P2P daemon error type)
                caller = GatedP2P(outsider_p2p, access)
                _, reader, writer = await caller.call_binary_stream_handler(server_p2p.peer_id, "protoswarm.test.v1")
                await write_frame(writer, ping)
                await asyncio.wait_for(read_frame(reader), 10)

        # With the key but not on the allow-list: closed unread, counted.
        outsider = GatedP2P(outsider_p2p, SwarmAccess(KEY))
        _, reader, writer = await outsider.call_binary_stream_handler(server_p2p.peer_id, "protoswarm.test.v1")
        try:
            await write_frame(writer, ping)
            reply = await asyncio.wait_for(read_frame(reader), 10)
        except (ConnectionError, OSError) as exc:  # reset instead of a clean end: closed all the same
            reply = exc
        assert reply is None or isinstance(reply, OSError | ConnectionError), reply  # no answer, stream ended
        assert served == [member_p2p.peer_id.to_base58()]
        assert denied == [outsider_p2p.peer_id.to_base58()]
        with pytest.raises(PermissionError):
            await server.call_binary_stream_handler(outsider_p2p.peer_id, "protoswarm.test.v1")

    run_p2p(3, body)
    assert P2P  # the real daemon type is what run_p2p starts


def _metric(url: str, name: str, **labels: str) -> float:
    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def _assert_forged_records_ignored(swarm: LocalSwarm, url: str) -> None:
    """Forged records: one copying node 1's valid proof onto another identity, one claiming node 1's
    peer id under another key. Both are ignored by the keyed nodes (``url``: node 0's /metrics)."""
    member = swarm.health(1)
    proof = SwarmAccess(KEY).proof("sim", member["peer_id"])
    forger = SwarmDHT(initial_peers=swarm.join_addresses()[:1], host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                      client_mode=True)
    forger.run_in_background()
    try:
        assert forger.wait_online(60)
        rejected_before = _metric(url, "protoswarm_records_rejected_total", reason="access")
        lifted = StageRecord(peer_id=forger.peer_id, run_id="sim", stage=0, num_stages=1, state="online",
                             throughput=1e6, access=proof)
        assert forger.store_stage_record(lifted, 60)
        impostor = StageRecord(peer_id=member["peer_id"], run_id="sim", stage=0, num_stages=1, state="offline",
                               access=proof)
        try:
            forger.store_stage_record(impostor, 60)  # refused by the DHT's validators, or stored and skipped
        except Exception:
            pass
        swarm.wait_until(lambda: _metric(url, "protoswarm_records_rejected_total", reason="access")
                         > rejected_before, 60, "the lifted proof rejected")
        swarm.wait_until(lambda: swarm.health(1)["state"] == "online", 10, "node 1 still online")
        for i in (0, 1):
            m = swarm.metrics_url(i)
            assert _metric(m, "protoswarm_stage_peers", stage="0") == 2  # neither forgery counted
    finally:
        forger.shutdown()


@pytest.mark.timeout(420)
def test_a_peer_without_the_key_cannot_load_a_stage_or_count_as_its_server(tmp_path):
    key = tmp_path / "swarm.key"
    key.write_bytes(KEY)
    keyed = [f'swarm.access_key_file="{key}"']
    fast = ["swarm.refresh_s=1", "swarm.expiry_s=6", "diloco.inner_steps=30", "exchange.gather_s=4",
            "exchange.timeout_s=15"]
    # Nodes 0 and 1 hold the key; node 2 joins the same swarm without it (and gives up after one attempt).
    outsider = ["swarm.download_attempts=1", "swarm.download_backoff_s=1"]
    with LocalSwarm(3, "swarm/diloco-local", fast, workdir=tmp_path / "sim",
                    node_overrides={0: keyed, 1: keyed, 2: outsider}) as swarm:
        swarm.start_all()
        swarm.wait_until(lambda: all((h := swarm.health(i)) and h["state"] == "online" for i in (0, 1)), 150,
                         "the keyed nodes online")
        url = swarm.metrics_url(0)

        # The outsider reads the swarm's records, but the keyed nodes' state handler does not exist for it:
        # it cannot load stage 0, and rather than serve seeded weights it stops with the reason.
        swarm.wait_until(lambda: not swarm.nodes[2].alive, 150, "the outsider giving up")
        assert swarm.nodes[2].proc.returncode == 2
        log = swarm.nodes[2].log.read_text()
        assert "could not be downloaded" in log and "a swarm key it lacks?" in log, log[-3000:]
        assert "no peer serves stage" not in log and "serving stage" not in log

        # The keyed nodes commit rounds together and never counted the outsider as a server or a peer.
        swarm.wait_until(lambda: all(swarm.health(i)["outer"]["rounds_committed"] >= 2 for i in (0, 1)), 150,
                         "the keyed replicas committing rounds")
        for i in (0, 1):
            m = swarm.metrics_url(i)
            assert _metric(m, "protoswarm_stage_peers", stage="0") == 2
            assert _metric(m, "protoswarm_peers_known") == 2
            assert swarm.health(i)["outer"]["group_size"] <= 2

        _assert_forged_records_ignored(swarm, url)
    assert processes_mentioning(str(tmp_path)) == []
