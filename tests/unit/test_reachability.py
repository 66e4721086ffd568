"""Reachability: the dial-back check (swarm/reachability.py) and how the plan uses its verdict."""

from __future__ import annotations

import asyncio
import socket

import pytest

from node.reachability import stages_for
from protocol.errors import MalformedMessage
from protocol.messages import DialbackReply, DialbackRequest, ErrorReply, StageRecord
from swarm.claiming import stage_servers
from swarm.exchange import RoundKey, plan_groups
from swarm.reachability import DialbackServer, observed_ip, tcp_ports, verdict


def test_observed_ip_and_ports_come_from_multiaddrs():
    assert observed_ip("/ip4/203.0.113.7/tcp/4001") == "203.0.113.7"
    assert observed_ip("/ip6/2001:db8::1/tcp/4001/p2p/QmX") == "2001:db8::1"
    assert observed_ip("/ip4/198.51.100.1/tcp/4001/p2p/QmR/p2p-circuit") == ""  # relayed: nothing to dial
    assert observed_ip("/ip4/1.2.3.4/udp/4001/quic") == ""
    assert observed_ip(None) == ""
    assert tcp_ports(["/ip4/10.0.0.2/tcp/31337/p2p/Qm", "/ip4/127.0.0.1/tcp/31337/p2p/Qm", "/ip4/1.1.1.1/tcp/5/p2p/Q/p2p-circuit",
                      "/ip6/::1/tcp/4002"]) == [31337, 4002]


def test_verdict_needs_an_answer_and_one_reached_port_is_public():
    seen = DialbackReply(observed="203.0.113.7", open_ports=[])
    assert verdict([]) == ""
    assert verdict([DialbackReply(observed="", open_ports=[])]) == ""  # relayed streams say nothing
    assert verdict([seen, seen]) == "private"
    assert verdict([seen, DialbackReply(observed="203.0.113.7", open_ports=[31337])]) == "public"


def _listener() -> tuple[socket.socket, int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock, sock.getsockname()[1]


def _closed_port() -> int:
    sock, port = _listener()
    sock.close()
    return port


def test_the_server_dials_back_only_the_observed_address_and_rate_limits():
    listener, open_port = _listener()
    closed = _closed_port()
    now = [100.0]
    server = DialbackServer("run", dial_timeout_s=2.0, min_interval_s=10.0, clock=lambda: now[0])
    try:
        reply = asyncio.run(server.handle(DialbackRequest(run_id="run", ports=[closed, open_port]), "peerA", "127.0.0.1"))
        assert reply == DialbackReply(observed="127.0.0.1", open_ports=[open_port])
        again = asyncio.run(server.handle(DialbackRequest(run_id="run", ports=[open_port]), "peerA", "127.0.0.1"))
        assert isinstance(again, ErrorReply) and again.code == "busy" and again.retry_after == pytest.approx(10.0)
        other = asyncio.run(server.handle(DialbackRequest(run_id="run", ports=[closed]), "peerB", "127.0.0.1"))
        assert other == DialbackReply(observed="127.0.0.1", open_ports=[])
        relayed = asyncio.run(server.handle(DialbackRequest(run_id="run", ports=[open_port]), "peerC", ""))
        assert relayed == DialbackReply(observed="", open_ports=[])
        now[0] += 10.5
        assert asyncio.run(server.handle(DialbackRequest(run_id="run", ports=[open_port]), "peerA", "127.0.0.1")).open_ports
    finally:
        listener.close()
    assert server.stats["reached"] == 2 and server.stats["unreached"] == 1 and server.stats["refused_busy"] == 1


def test_the_server_refuses_other_runs_and_other_messages_and_bans_repeat_offenders():
    server = DialbackServer("run", peer_strikes=2, ban_s=60.0)
    with pytest.raises(MalformedMessage):
        asyncio.run(server.handle(DialbackRequest(run_id="other", ports=[1]), "p", "127.0.0.1"))
    with pytest.raises(MalformedMessage):
        asyncio.run(server.handle(DialbackReply(observed="x", open_ports=[]), "p", "127.0.0.1"))
    server.strikes.strike("p")
    server.strikes.strike("p")  # what serve_stream's on_error does for each refused message
    banned = asyncio.run(server.handle(DialbackRequest(run_id="run", ports=[1]), "p", "127.0.0.1"))
    assert isinstance(banned, ErrorReply) and banned.code == "banned"


def test_unreachable_replicas_never_lead_a_group():
    peers = [f"peer{i}" for i in range(10)]
    key = RoundKey(stage=0, fragment=1, round=7)
    plain = plan_groups("run", key, peers, max_group=4)
    assert plan_groups("run", key, peers, max_group=4, cannot_lead=()) == plain  # unchanged without NAT
    for r in range(30):
        key = RoundKey(stage=0, fragment=r % 3, round=r)
        private = set(peers[:7])
        groups = plan_groups("run", key, peers, max_group=4, cannot_lead=private)
        assert sorted(p for g in groups for p in g) == sorted(peers)  # everyone takes part once
        assert all(g[0] not in private for g in groups)
        assert len(groups) == 3  # ceil(10 / 4): three groups, three possible leaders
    groups = plan_groups("run", key, peers, max_group=2, cannot_lead=set(peers[:8]))
    assert len(groups) == 2 and {g[0] for g in groups} == {"peer8", "peer9"}  # fewer leaders: larger groups
    everyone = plan_groups("run", key, peers, max_group=4, cannot_lead=set(peers))
    assert sorted(p for g in everyone for p in g) == sorted(peers)  # nobody can lead: still a plan (rounds fail)


def _record(peer: str, stage: int, reachable: str) -> StageRecord:
    return StageRecord(peer_id=peer, run_id="run", stage=stage, num_stages=2, state="online", throughput=1.0,
                       reachable=reachable)


def test_a_node_behind_nat_adds_no_coverage():
    records = {0: [_record("a", 0, "private"), _record("b", 0, "public")],
               1: [_record("c", 1, "private"), _record("d", 1, "")]}
    assert stage_servers(records, 2) == [1, 1]
    assert stage_servers({1: [_record("c", 1, "private")]}, 2) == [0, 0]


class _Probe:
    def __init__(self, state: str) -> None:
        self.state, self.waited = state, []

    def wait(self, timeout: float) -> str:
        self.waited.append(timeout)
        return self.state


def test_behind_nat_a_pipeline_node_serves_stage_zero_only():
    assert stages_for(_Probe("private"), [0, 1, 2], 3, None, 30.0) == ([0], None)
    assert stages_for(_Probe("public"), [0, 1, 2], 3, None, 30.0) == ([0, 1, 2], None)
    assert stages_for(_Probe(""), [0, 1, 2], 3, None, 30.0) == ([0, 1, 2], None)  # not known: as reachable
    fit, failure = stages_for(_Probe("private"), [1, 2], 3, None, 30.0)
    assert fit == [] and "stage 0" in failure and "forward its port" in failure
    assert stages_for(_Probe("private"), [0, 1], 2, 1, 30.0) == ([0, 1], None)  # told to serve stage 1: warned
    one_stage = _Probe("private")
    assert stages_for(one_stage, [0], 1, None, 30.0) == ([0], None) and one_stage.waited == []  # S = 1: no wait
    founder = _Probe("private")
    assert stages_for(founder, [0, 1], 2, None, 0) == ([0, 1], None) and founder.waited == []


def test_the_sim_summary_names_bans_on_nodes_behind_nat():
    from swarm.sim.monitor import PipelineMonitor
    from swarm.sim.run import NatWatch

    watch, monitor = NatWatch([2]), PipelineMonitor()
    monitor.listeners.append(watch.observe)
    for index, pid, health in ((0, 10, {"peer_id": "A", "state": "online", "reachable": "public"}),
                               (2, 12, {"peer_id": "C", "state": "online", "reachable": "private", "stage": 0,
                                        "outer": {"rounds_committed": 3}})):
        monitor.observe(index, pid, health)
        watch.observe(index, health)
    watch.observe(1, {"peer_id": "B", "state": "online", "banned": {"exchange": {"C": 30.0, "A": 10.0}}})
    summary = watch.summary(monitor, [{"state": "online"}, {"state": "online"}, {"state": "joining"}],
                            [{"peer_id": "C", "reachable": "private"}, {"peer_id": "A", "reachable": "public"}])
    assert summary["bans"] == [{"by": 1, "where": "exchange", "on": 2}]  # the ban on A is not NAT's business
    assert summary["online"] == 0 and summary["rounds_committed"] == [3] and summary["stages"] == [0]
    assert {r["node"]: (r["own"], r["records"]) for r in summary["reachability"]} == {
        0: ("public", "public"), 1: (None, None), 2: ("private", "private")}


def test_the_join_banner_prints_the_address_peers_reached_or_says_nobody_can():
    from types import SimpleNamespace

    from node.config import load_config
    from node.daemon import join_banner
    from node.reachability import ReachabilityProbe

    cfg = load_config("swarm/tiny", [])
    dht = SimpleNamespace(peer_id="QmMe", visible_maddrs=lambda: ["/ip4/192.168.1.5/tcp/31337/p2p/QmMe"])
    host = SimpleNamespace(stage=0, store=SimpleNamespace(progress=3), throughput=1.5)
    probe = ReachabilityProbe(None, "QmMe", "run", lambda: [], None)
    assert "/ip4/192.168.1.5/tcp/31337/p2p/QmMe" in join_banner(cfg, "run", dht, host, "cpu", probe)[-1]  # not known yet
    probe.state, probe.observed, probe.port = "public", "203.0.113.7", 31337
    assert join_banner(cfg, "run", dht, host, "cpu", probe)[-1] == \
        "    node start --join /ip4/203.0.113.7/tcp/31337/p2p/QmMe --run-id run"
    probe.state, probe.port = "private", None
    lines = join_banner(cfg, "run", dht, host, "cpu", probe)
    assert "peers cannot dial this node" in lines[-1] and not any("--join" in line for line in lines)


def test_the_probe_asks_connected_peers_and_keeps_the_verdict(monkeypatch):
    from types import SimpleNamespace

    import node.reachability as reach

    answers = {"A": DialbackReply(observed="203.0.113.7", open_ports=[]), "B": RuntimeError("no handler"),
               "C": DialbackReply(observed="203.0.113.7", open_ports=[])}
    asked = []

    async def fake_ask(p2p, peer, run_id, ports, limits):
        asked.append((peer, tuple(ports)))
        if isinstance(answers[peer], Exception):
            raise answers[peer]
        return answers[peer]

    async def list_peers():
        return [SimpleNamespace(peer_id=p) for p in ("Me", "A", "B", "C")]

    monkeypatch.setattr(reach, "ask_dialback", fake_ask)
    probe = reach.ReachabilityProbe(SimpleNamespace(list_peers=list_peers), "Me", "run",
                                    lambda: ["/ip4/10.0.0.2/tcp/31337/p2p/Me"], None)
    changes = []
    probe.on_change.append(changes.append)
    assert asyncio.run(probe.check_once()) is True
    assert sorted(asked) == [("A", (31337,)), ("B", (31337,)), ("C", (31337,))]  # never itself
    assert probe.state == "private" and probe.wait(0) == "private" and probe.address() is None
    assert changes == ["private"]
    answers["A"] = DialbackReply(observed="203.0.113.7", open_ports=[31337])  # a port forwarded since
    assert asyncio.run(probe.check_once()) is True
    assert probe.state == "public" and probe.address() == "/ip4/203.0.113.7/tcp/31337/p2p/Me"
    assert changes == ["private", "public"]
    answers.update(A=RuntimeError("gone"), C=RuntimeError("gone"))
    assert asyncio.run(probe.check_once()) is False and probe.state == "public"  # no answer: the verdict stays
