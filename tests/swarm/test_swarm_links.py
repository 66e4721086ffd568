"""Home-link emulation: tc tbf in network namespaces shapes for real, and `node sim --link` uses it.

The namespace tests need root (and iproute2); they skip with the reason otherwise. The in-process
fallback is tested without root.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from p2p_util import run_sim

from swarm.sim.link import LinkSpec
from swarm.sim.netns import NetnsLab, netns_unavailable, remove_stale_labs
from swarm.sim.swarm import LocalSwarm

NO_NETNS = netns_unavailable()
needs_netns = pytest.mark.skipif(NO_NETNS is not None, reason=f"needs network namespaces: {NO_NETNS}")

# A bulk TCP transfer: the receiver prints bytes and seconds from its first byte to the end.
BULK = textwrap.dedent("""
    import socket, sys, time
    mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if mode == "recv":
        server = socket.create_server((host, port))
        print("READY", flush=True)
        conn, _ = server.accept()
        total, first = 0, None
        while chunk := conn.recv(1 << 20):
            first = first or time.monotonic()
            total += len(chunk)
        print(total, time.monotonic() - first, flush=True)
    else:
        sock = socket.create_connection((host, port))
        block, left = b"x" * (1 << 16), int(sys.argv[4])
        while left > 0:
            sock.sendall(block)
            left -= len(block)
        sock.close()
""")


def _bulk(lab: NetnsLab, sender: int | None, receiver: int, nbytes: int, port: int) -> float:
    """Goodput in bits/s of one TCP transfer to ``receiver`` (sender None: from the root namespace)."""
    address = lab.hosts[receiver].address
    recv = subprocess.Popen([*lab.exec_prefix(receiver), sys.executable, "-c", BULK, "recv", address, str(port)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert recv.stdout.readline().strip() == "READY"
        send_prefix = lab.exec_prefix(sender) if sender is not None else []
        subprocess.run([*send_prefix, sys.executable, "-c", BULK, "send", address, str(port), str(nbytes)],
                       check=True, timeout=120)
        total, seconds = recv.communicate(timeout=120)[0].split()
    finally:
        if recv.poll() is None:
            recv.kill()
    assert int(total) >= nbytes
    return int(total) * 8 / float(seconds)


@needs_netns
@pytest.mark.timeout(180)
def test_tbf_shapes_both_directions_of_a_namespaced_link():
    rate = LinkSpec.parse("40mbit")
    with NetnsLab() as lab:
        lab.add(0, rate)
        lab.add(1, rate)
        lab.add(2, None)  # unshaped: the control
        # ~3 s at 40 Mbit/s. Goodput sits a few % under the rate (tbf counts Ethernet/IP/TCP headers).
        uplink = _bulk(lab, 0, 2, 15 << 20, 5201)  # node 0's uplink is the only shaped hop
        downlink = _bulk(lab, None, 1, 15 << 20, 5202)  # root namespace → node 1: its downlink
        control = _bulk(lab, 2, 2, 15 << 20, 5203)  # loopback inside an unshaped namespace
        counted = lab.link_bytes(0)
        namespaces = [h.netns for h in lab.hosts.values()]
    for name, measured in (("uplink", uplink), ("downlink", downlink)):
        assert abs(measured / rate.rate_bps - 1) <= 0.15, f"{name}: {measured / 1e6:.1f} Mbit/s for 40mbit"
    assert control > 3 * rate.rate_bps  # the shaping, not the machine, set the rate
    assert counted["sent"] >= 15 << 20  # the link counters saw the transfer, headers included
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(ns in listed for ns in namespaces)  # the lab cleaned up after itself


@needs_netns
@pytest.mark.timeout(60)
def test_a_lab_left_by_a_dead_process_is_removed():
    code = "from swarm.sim.netns import NetnsLab; lab = NetnsLab(); lab.add(0); print(lab.hosts[0].netns, flush=True)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).resolve().parents[2])  # exits without closing its lab
    netns = out.stdout.split()[-1]
    assert netns in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    remove_stale_labs()
    assert netns not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


@needs_netns
@pytest.mark.timeout(400)
def test_sim_pipeline_over_80mbit_namespaced_links(tmp_path):
    summary = run_sim(3, "configs/swarm/pipeline-local.toml", 55, "", tmp_path, 360,
                      extra=["--link", "80mbit", "--set", "diloco.enabled=false"])
    link = summary["link"]
    assert link["mode"] == "netns" and link["spec"] == "80mbit"
    assert sorted(summary["stage_of_node"]) == [0, 1, 2]
    assert summary["microbatches_ok"] >= 5 and summary["loss_end"] < summary["loss_start"]
    boundary = summary["bytes_forward"] + summary["bytes_backward"]
    on_links = sum(b["sent"] for b in link["bytes"])
    assert on_links > boundary  # the links carried the frames plus the DHT and libp2p overhead


@pytest.mark.timeout(120)
def test_in_process_fallback_says_so(tmp_path):
    with LocalSwarm(1, "configs/swarm/tiny.toml", ["train.steps=2"], tmp_path, link=LinkSpec.parse("8mbit"),
                    link_mode="app") as swarm:
        assert swarm.link_mode == "app" and "in-process" in swarm.link_note
        swarm.start_all()
        deadline = time.monotonic() + 60
        while "link: emulating" not in swarm.nodes[0].log.read_text():
            assert time.monotonic() < deadline and swarm.nodes[0].alive, swarm.nodes[0].log.read_text()[-2000:]
            time.sleep(0.2)
        assert "link: emulating 8mbit in-process" in swarm.nodes[0].log.read_text()


def test_sim_refuses_a_bad_link_spec():
    out = subprocess.run([sys.executable, "-m", "node.cli", "sim", "--nodes", "1", "--link", "80mbps"],
                         capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 2 and "80mbps" in out.stderr, out.stderr
