"""DHT records over real hivemind DHTs: signed records are read back, foreign junk is refused and counted."""

from __future__ import annotations

import time

import hivemind
import msgpack
import pytest
from hivemind.utils import get_dht_time

from protocol.messages import RunRecord, StageRecord, encode_message
from swarm.dht import SwarmDHT
from swarm.records import SUBKEY_PREFIX, stage_key

LOCAL = ["/ip4/127.0.0.1/tcp/0"]


@pytest.fixture
def two_nodes():
    a = SwarmDHT(host_maddrs=LOCAL)
    a.run_in_background()
    assert a.wait_online(60), a.last_error
    b = SwarmDHT(initial_peers=a.visible_maddrs(), host_maddrs=LOCAL)
    b.run_in_background()
    assert b.wait_online(60), b.last_error
    try:
        yield a, b
    finally:
        b.shutdown()
        a.shutdown()


def _record(peer: str, stage: int = 1, state: str = "online", **kw) -> StageRecord:
    return StageRecord(peer_id=peer, run_id="r1", stage=stage, num_stages=2, state=state, throughput=2.0,
                       timestamp=time.time(), **kw)


def test_signed_records_round_trip_and_junk_is_refused_and_counted(two_nodes):
    a, b = two_nodes
    assert b.store_stage_record(_record(b.peer_id), expiry_s=30)
    run = RunRecord(run_id="r1", creator=a.peer_id, created=1.0, publisher=a.peer_id,
                    config=msgpack.packb({"pipeline": {"num_stages": 2}}))
    assert a.store_run_record(run, expiry_s=30)

    foreign = hivemind.DHT(start=True, initial_peers=a.visible_maddrs(), host_maddrs=LOCAL)
    try:
        exp = get_dht_time() + 30
        key = stage_key("r1", 1)
        forged = encode_message(_record("Qmforged"))
        # Looks like ours but unsigned: every protoswarm DHT node refuses to store it.
        assert not foreign.store(key, subkey=SUBKEY_PREFIX + b"Qmforged", value=forged, expiration_time=exp)
        # A subkey the DHT cannot recognise as ours: stored, but skipped and counted by readers.
        assert foreign.store(key, subkey=b"plain", value=b"junk", expiration_time=exp)
        # A record claiming b's peer id cannot overwrite b's signed subkey (it has no owner key).
        foreign.store(key, subkey=b.validator.subkey(b.peer_id), value=forged, expiration_time=exp + 5)
    finally:
        foreign.shutdown()

    by_stage, rejected = a.get_stage_records("r1", 2)
    assert [r.peer_id for r in by_stage[1]] == [b.peer_id] and by_stage[0] == []
    assert rejected["foreign"] >= 1
    inside = a.rejected_inside_dht() + b.rejected_inside_dht()
    assert inside["unsigned"] >= 1 and inside["bad_signature"] >= 1

    runs, owners, _ = b.get_run_records()
    assert len(owners) == 1 and owners[0].startswith(b"[owner:")
    assert [(r.run_id, r.publisher) for r in runs] == [("r1", a.peer_id)]


def test_a_record_under_another_peers_name_is_refused(two_nodes):
    a, b = two_nodes
    # b correctly signs its own subkey, but the record inside names another peer: a peer can speak
    # only for itself, so every DHT node refuses it (wrong_owner) and b's earlier record stays.
    assert b.store_stage_record(_record(b.peer_id, stage=0), expiry_s=30)
    forged = encode_message(_record("someone-else", stage=0))
    ok = b.dht.store(stage_key("r1", 0), subkey=b.validator.subkey(b.peer_id), value=forged,
                     expiration_time=get_dht_time() + 40)
    assert not ok  # peer id in the record disagrees with the subkey: refused as wrong_owner
    by_stage, _ = a.get_stage_records("r1", 2)
    assert [r.peer_id for r in by_stage[0]] == [b.peer_id]
    assert (a.rejected_inside_dht() + b.rejected_inside_dht())["wrong_owner"] >= 1


def test_unreachable_initial_peers_keep_retrying():
    dht = SwarmDHT(initial_peers=["/ip4/127.0.0.1/tcp/1/p2p/QmVrbSqaKXxwgVz6bKzQiEbqFxN5p6fUZR9LqxR7VYs1Ex"],
                   host_maddrs=LOCAL, retry_max_s=0.5)
    dht.run_in_background()
    try:
        deadline = time.monotonic() + 60
        while dht.attempts < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert dht.attempts >= 3 and not dht.online
        assert dht.state in ("retrying", "bootstrapping") and dht.last_error
    finally:
        dht.shutdown()


def test_a_peer_cannot_announce_another_peer(two_nodes):
    """Records are signed with the identity key, so b cannot speak for a (e.g. mark it OFFLINE) even
    under a subkey that names a and carries b's own valid signature."""
    a, b = two_nodes
    assert a.store_stage_record(_record(a.peer_id, stage=1), expiry_s=30)
    forged = encode_message(StageRecord(peer_id=a.peer_id, run_id="r1", stage=1, num_stages=2, state="offline",
                                        timestamp=time.time() + 60))
    subkey = SUBKEY_PREFIX + a.peer_id.encode() + b.validator.local_public_key
    assert not b.dht.store(stage_key("r1", 1), subkey=subkey, value=forged, expiration_time=get_dht_time() + 30)
    by_stage, _ = b.get_stage_records("r1", 2)
    assert [(r.peer_id, r.state) for r in by_stage[1]] == [(a.peer_id, "online")]
    assert (a.rejected_inside_dht() + b.rejected_inside_dht())["wrong_owner"] >= 1


def test_a_record_outlasts_this_peers_own_longer_lived_record(two_nodes):
    """A shutdown leaves an "offline" record that lives longer than the refreshed ones; the DHT keeps, per
    subkey, the value that expires last. A node of that identity back on the stage within that time (a
    restart, a move back) must still be seen online at once, not after the old record expires."""
    a, b = two_nodes
    assert b.store_stage_record(_record(b.peer_id, stage=1, state="offline"), expiry_s=60)
    assert b.store_stage_record(_record(b.peer_id, stage=1), expiry_s=8)
    by_stage, _ = a.get_stage_records("r1", 2)
    assert [(r.peer_id, r.state) for r in by_stage[1]] == [(b.peer_id, "online")]
    # Later refreshes (each expiring sooner than the record that outlasted) keep replacing it.
    later = _record(b.peer_id, stage=1, progress=7)
    assert b.store_stage_record(later, expiry_s=8)
    by_stage, _ = a.get_stage_records("r1", 2)
    assert [(r.state, r.progress) for r in by_stage[1]] == [("online", 7)]
